"""Clip-level video augmentation for stage three (end-to-end fine-tuning from raw video).

Every frame of a clip gets the same random crop, flip, colour change and RandAugment ops: the
clip is one ``tv_tensors.Video`` (T, C, H, W) and torchvision.transforms.v2 draws a transform's
parameters once per call, then applies them to all leading dimensions (checked in
tests/test_finetune.py: a clip of T identical frames stays T identical frames).

Training: random resized crop (area 0.08-1, aspect ratio 3/4-4/3) straight to the model's
input size, horizontal flip, colour jitter (p=0.8) and grayscale (p=0.2) as in the
SimCLR/CLIP-finetuning recipes Text4Vis and ActionCLIP follow, optionally RandAugment.
Evaluation: the deterministic views of stage one (resize the short side, C clips x S crops),
so a fine-tuned model is evaluated on exactly what a stage-one cache of it would hold.

Randomness is drawn from a seed per (run seed, epoch, video), not from a worker's RNG, so a
video gets the same augmentation whatever the number of DataLoader workers or DDP ranks, and
a resumed run sees the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache.errors import ConfigError
from stages.video import make_views

__all__ = ["AugmentCfg", "build_train_transform", "augment_clip", "eval_views"]


@dataclass
class AugmentCfg:
    scale_min: float = 0.08           # random resized crop: area fraction range
    scale_max: float = 1.0
    ratio_min: float = 3 / 4          # and aspect ratio range
    ratio_max: float = 4 / 3
    flip: float = 0.5                 # horizontal flip probability
    jitter: float = 0.8               # probability of colour jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale: float = 0.2            # probability of grayscale
    randaugment: bool = False
    ra_ops: int = 2                   # RandAugment: ops per clip
    ra_magnitude: int = 9

    def validate(self) -> None:
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise ConfigError("crop area range must satisfy 0 < min <= max <= 1, "
                              f"got {self.scale_min}-{self.scale_max}")
        if not 0 < self.ratio_min <= self.ratio_max:
            raise ConfigError(f"crop ratio range must satisfy 0 < min <= max, got {self.ratio_min}-{self.ratio_max}")
        for name in ("flip", "jitter", "grayscale"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augmentation probability '{name}' must be in [0, 1], got {getattr(self, name)}")


def build_train_transform(size: int, cfg: AugmentCfg | None = None):
    """The v2 pipeline for one clip: (T, 3, H, W) uint8 Video -> (T, 3, size, size) uint8 Video."""
    from torchvision.transforms import v2

    cfg = cfg or AugmentCfg()
    cfg.validate()
    ops = [
        v2.RandomResizedCrop(size, scale=(cfg.scale_min, cfg.scale_max), ratio=(cfg.ratio_min, cfg.ratio_max),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(cfg.flip),
        v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter),
        v2.RandomGrayscale(cfg.grayscale),
    ]
    if cfg.randaugment:
        ops.append(v2.RandAugment(num_ops=cfg.ra_ops, magnitude=cfg.ra_magnitude))
    return v2.Compose(ops)


def augment_clip(frames: np.ndarray, transform, seed: int | list[int]) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, S, S) uint8 with one set of random parameters for all frames.

    ``seed`` fixes the draw (torchvision samples from the global torch RNG, so it runs inside a
    forked RNG state and leaves the caller's stream untouched).
    """
    from torchvision import tv_tensors

    clip = tv_tensors.Video(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))  # (T, 3, H, W)
    s = np.random.SeedSequence(seed).generate_state(1, dtype=np.uint64)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(s) & ((1 << 63) - 1))
        out = transform(clip)
    return out.as_subclass(torch.Tensor).contiguous()


def eval_views(clips: list[np.ndarray], size: int, crops: int) -> torch.Tensor:
    """C clips of (T, H, W, 3) -> (V = C*S, T, 3, size, size) uint8: stage one's views."""
    views = torch.from_numpy(make_views(clips, size, crops))  # (V, T, S, S, 3)
    return views.permute(0, 1, 4, 2, 3).contiguous()
