"""Clip-level video augmentation for stage three (end-to-end fine-tuning from raw video).

Every frame of a clip gets the same random crop, flip, colour change and RandAugment ops: the
clip is one ``tv_tensors.Video`` (T, C, H, W) and torchvision.transforms.v2 draws a transform's
parameters once per call, then applies them to all leading dimensions (checked in
tests/test_finetune.py: a clip of T identical frames stays T identical frames).

Training (the defaults, the ``quick`` recipe's): random resized crop (area 0.08-1, aspect ratio
3/4-4/3) straight to the model's input size, horizontal flip, colour jitter (p=0.8) and
grayscale (p=0.2), optionally RandAugment. The ``paper`` recipes (stages/recipes.py, SPEC
section 7) set each paradigm's own: Text4Vis scales the short side to 256 (for a 224 input),
random resized crop, flip, grayscale, no colour jitter; ActionCLIP scales to 256, takes a
multi-scale crop (side = the short side x one of 1, .875, .75, .66 for width and height, at most
one step apart, at one of 13 fixed positions) resized to the input, flip, colour jitter (0.4,
0.4, 0.2, 0.1), grayscale and RandAugment N2 M9.
Evaluation: the deterministic views of stage one (C clips x S crops) at the paradigm's test
scale, as published: the short side resized to round(input size x resize_ratio) (256 for 224
crops, both paper recipes), then the centre (or 3) crops of the input size; without a scale (the
quick recipe) the short side is the input size. A fine-tuned model is so evaluated on exactly
what a stage-one cache of it with the same --resize-ratio would hold (``eval_resize``).

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

__all__ = ["AugmentCfg", "MultiScaleCrop", "HorizontalFlip", "build_train_transform", "augment_clip",
           "augment_clip_flip", "eval_resize", "eval_views"]


CROPS = ("random_resized", "multiscale")


@dataclass
class AugmentCfg:
    resize_ratio: float = 0.0         # first scale the short side to round(input size x ratio) (256/224: "scale 256"); 0 = no
    crop: str = "random_resized"      # random_resized | multiscale (TSN's multi-scale crop, ActionCLIP)
    ms_scales: str = "1,0.875,0.75,0.66"  # multi-scale crop: side fractions of the short side
    ms_max_distort: int = 1           # multi-scale crop: width and height scales at most this many steps apart
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
        if self.crop not in CROPS:
            raise ConfigError(f"augmentation crop must be one of {', '.join(CROPS)}, got '{self.crop}'")
        if self.resize_ratio < 0:
            raise ConfigError(f"resize_ratio must be >= 0 (0 = no resize), got {self.resize_ratio}")
        self.scales()
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise ConfigError("crop area range must satisfy 0 < min <= max <= 1, "
                              f"got {self.scale_min}-{self.scale_max}")
        if not 0 < self.ratio_min <= self.ratio_max:
            raise ConfigError(f"crop ratio range must satisfy 0 < min <= max, got {self.ratio_min}-{self.ratio_max}")
        for name in ("flip", "jitter", "grayscale"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augmentation probability '{name}' must be in [0, 1], got {getattr(self, name)}")

    def scales(self) -> list[float]:
        try:
            out = [float(x) for x in self.ms_scales.split(",") if x.strip()]
        except ValueError:
            out = []
        if not out or not all(0 < x <= 1 for x in out):
            raise ConfigError(f"ms_scales must be a comma list of fractions in (0, 1], got '{self.ms_scales}'")
        return out


class MultiScaleCrop:
    """TSN-style multi-scale crop of a whole clip, then a resize to ``size`` (bilinear).

    The crop's width and height are the short side times one of ``scales`` each (indices at most
    ``max_distort`` apart), placed at one of 13 fixed positions (corners, centre, edge midpoints,
    quarter points) of the free room; one draw per clip from the torch RNG (``augment_clip``
    seeds it)."""

    _GRID = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3))

    def __init__(self, size: int, scales: list[float], max_distort: int = 1):
        self.size, self.scales, self.max_distort = size, list(scales), max_distort

    def params(self, height: int, width: int) -> tuple[int, int, int, int]:
        base = min(height, width)
        sides = [max(1, int(base * s)) for s in self.scales]
        pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= self.max_distort]
        cw, ch = pairs[int(torch.randint(len(pairs), ()).item())]
        gx, gy = self._GRID[int(torch.randint(len(self._GRID), ()).item())]
        return gy * (height - ch) // 4, gx * (width - cw) // 4, ch, cw

    def __call__(self, clip):
        from torchvision.transforms import v2

        H, W = clip.shape[-2:]
        top, left, h, w = self.params(H, W)
        return v2.functional.resized_crop(clip, top, left, h, w, [self.size, self.size],
                                          interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


class HorizontalFlip:
    """v2.RandomHorizontalFlip whose draw can be read back: it draws ``torch.rand(1)`` where and as
    torchvision's does (mirror when below ``p``; drawn even at p 0), so the draws of the ops around
    it and every augmented clip stay what they were with torchvision's, and it keeps whether it
    mirrored the last clip in ``flipped`` (``augment_clip_flip``): a Something-Something v2 clip's
    label must follow its flip (cache/flips.py)."""

    def __init__(self, p: float):
        self.p = p
        self.flipped = False

    def __call__(self, clip):
        from torchvision.transforms import v2

        self.flipped = bool(torch.rand(1) < self.p)
        return v2.functional.horizontal_flip(clip) if self.flipped else clip


def build_train_transform(size: int, cfg: AugmentCfg | None = None):
    """The v2 pipeline for one clip: (T, 3, H, W) uint8 Video -> (T, 3, size, size) uint8 Video."""
    from torchvision.transforms import v2

    cfg = cfg or AugmentCfg()
    cfg.validate()
    ops = []
    if cfg.resize_ratio:
        ops.append(v2.Resize(round(size * cfg.resize_ratio), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True))
    if cfg.crop == "multiscale":
        ops.append(MultiScaleCrop(size, cfg.scales(), cfg.ms_max_distort))
    else:
        ops.append(v2.RandomResizedCrop(size, scale=(cfg.scale_min, cfg.scale_max),
                                        ratio=(cfg.ratio_min, cfg.ratio_max),
                                        interpolation=v2.InterpolationMode.BICUBIC, antialias=True))
    ops.append(HorizontalFlip(cfg.flip))
    if cfg.jitter:
        ops.append(v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                                  p=cfg.jitter))
    ops.append(v2.RandomGrayscale(cfg.grayscale))
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


def augment_clip_flip(frames: np.ndarray, transform, seed: int | list[int]) -> tuple[torch.Tensor, bool]:
    """``augment_clip``, and whether the clip was mirrored (the transform's ``HorizontalFlip``; False
    for a transform without one)."""
    out = augment_clip(frames, transform, seed)
    flips = [t for t in getattr(transform, "transforms", [transform]) if isinstance(t, HorizontalFlip)]
    return out, any(t.flipped for t in flips)


def eval_resize(size: int, cfg: AugmentCfg | None = None) -> int:
    """The short side the evaluation views are cut from: the paradigm's test scale,
    round(size x resize_ratio) (224 x 256/224 = 256), or ``size`` itself without one."""
    ratio = (cfg or AugmentCfg()).resize_ratio
    return int(round(size * ratio)) if ratio else size


def eval_views(clips: list[np.ndarray], size: int, crops: int, resize: int | None = None,
               frame_size: tuple[int, int] | None = None) -> torch.Tensor:
    """C clips of (T, H, W, 3) -> (V = S*C, T, 3, size, size) uint8: stage one's views, the short
    side first resized to ``resize`` (default ``size``), or the frames to ``frame_size`` (H, W)."""
    views = torch.from_numpy(make_views(clips, size, crops, resize, frame_size))  # (V, T, S, S, 3)
    return views.permute(0, 1, 4, 2, 3).contiguous()
