"""The batch plumbing stage two's splits and loader share: which cached views an item yields,
the tensor a head gets from a video's array, the pixel stats frames are normalised with, and
the collate and device move of a batch dict.

A leaf of the wing (it imports no stage module): the Zarr split, the streamed split and the
loader all stand on it, so that they draw and convert the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache.flips import FLIP_COLUMN, flip_label
from cache.meta import CLIP_MEAN, CLIP_STD, CacheMeta

__all__ = ["pixel_stats", "epoch_seed", "view_pick", "view_tensor", "collate_items", "to_device", "LabelSwap",
           "label_swap", "view_label", "view_labels"]


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


@dataclass(frozen=True)
class LabelSwap:
    """How a view bank's flipped views relabel: the dataset's swap table (cache/flips.py) and the
    column of the view parameters that says a view was mirrored."""

    table: tuple[int, ...]
    column: int


def label_swap(meta: CacheMeta, split: str) -> LabelSwap | None:
    """The label swap of ``split``'s views: set when the split is a view bank (its views were
    mirrored at random) and the dataset's flips swap labels (Something-Something v2's left/right
    classes); None otherwise, so every other cache reads its labels as before. The flip column is
    found by its name among the parameter columns the cache records (the first column in every
    bank so far, which a cache that records no names is read with)."""
    bank = meta.view_bank
    if bank is None or bank.split != split:
        return None
    table = meta.dataset.swap_table()
    if table is None:
        return None
    columns = list(bank.param_columns)
    return LabelSwap(table, columns.index(FLIP_COLUMN) if columns else 0)


def view_label(label: int, flipped: bool, swap: LabelSwap | None, label_map: dict[int, int] | None = None) -> int:
    """The training label of one cached view: the stored ``label``, swapped to its mirror class when
    the view was ``flipped`` and ``swap`` says flips swap labels (a mirror class outside a class
    selection, ``label_map``, leaves it as is), then mapped through ``label_map``."""
    if swap is not None and flipped:
        mirrored = flip_label(label, True, swap.table)
        if label_map is None or mirrored in label_map:
            label = mirrored
    return label_map[int(label)] if label_map else int(label)


def view_labels(labels: np.ndarray, params: np.ndarray, swap: LabelSwap,
                label_map: dict[int, int] | None = None) -> np.ndarray:
    """(N, V) training label of every view of N videos, from their stored ``labels`` (N,) and view
    parameters (N, V, P)."""
    flipped = params[..., swap.column] > 0.5  # (N, V)
    return np.array([[view_label(int(lab), bool(f), swap, label_map) for f in row]
                     for lab, row in zip(labels, flipped)], dtype=np.int64).reshape(flipped.shape)


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
