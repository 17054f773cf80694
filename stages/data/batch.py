"""The batch plumbing stage two's splits and loader share: which cached views an item yields,
the tensor a head gets from a video's array, the pixel stats frames are normalised with, and
the collate and device move of a batch dict.

A leaf of the wing (it imports no stage module): the Zarr split, the streamed split and the
loader all stand on it, so that they draw and convert the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from cache.meta import CLIP_MEAN, CLIP_STD, CacheMeta

__all__ = ["pixel_stats", "epoch_seed", "view_pick", "view_tensor", "collate_items", "to_device"]


def pixel_stats(meta: CacheMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's pixel mean and std recorded in the cache, shaped (3, 1, 1)."""
    pre = meta.preprocess
    mean = torch.tensor(pre.mean if pre else CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(pre.std if pre else CLIP_STD).view(3, 1, 1)
    return mean, std


def epoch_seed(epoch: int, seed: int) -> int:
    """The seed of one epoch's random view draws (the same for the Zarr and the streamed data)."""
    return seed * 100003 + epoch


def view_pick(epoch_seed: int, position: int, views: int, train: bool) -> slice:
    """Which cached views a sample yields: in training one view drawn from (epoch, position in
    the selection), so that the Zarr cache and the shards draw the same; in evaluation all."""
    if train and views > 1:
        view = int(np.random.default_rng((epoch_seed, position)).integers(views))
        return slice(view, view + 1)
    return slice(None)


def view_tensor(name: str, arr: np.ndarray, pick: slice, train: bool, mean: torch.Tensor,
                std: torch.Tensor) -> torch.Tensor:
    """One video's array (V, T, ...) -> the tensor a head gets: the picked views (training: the
    single drawn view, no V axis); uint8 frames normalised to (.., T, 3, H, W) floats."""
    t = torch.from_numpy(np.ascontiguousarray(arr[pick]))  # (V or 1, T, ...)
    if name == "frames":
        t = (t.movedim(-1, -3).float() / 255.0 - mean) / std  # (V, T, 3, H, W)
    return t[0] if train else t


def collate_items(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a list of per-video tensor dicts into one batch dict (the collate of stage two)."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch dict on ``device`` (non-blocking: pinned host memory copies asynchronously)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
