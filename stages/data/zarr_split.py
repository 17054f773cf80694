"""Stage two's view of a cache: the arrays one head declares, as tensors, for chosen videos.

Small arrays (frame_emb, cls) load whole into memory once; large ones (patch tokens, frames)
are read per video from the Zarr store. Only the layers a head asks for are read.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from cache.errors import CacheMismatchError, DatasetError
from cache.meta import extract_command
from cache.store import DONE, FeatureStore
from stages.data.batch import epoch_seed, label_swap, pixel_stats, view_labels, view_pick, view_tensor
from stages.heads.needs import DataKeys, recommended_train_aug, resolve_layers

__all__ = ["HeadInputs", "CacheSplit", "check_cache_for_head", "select_videos", "extraction_hint"]

IN_MEMORY_LIMIT = 2 << 30  # bytes of one array above which it is read per video instead


class HeadInputs:
    """Absolute layer positions of what a head reads, checked against a cache."""

    def __init__(self, store: FeatureStore, keys: DataKeys, split: str):
        depth = store.info.dims.depth
        cached = list(store.info.layers)
        self.keys = keys
        self.cls_layers = resolve_layers(keys.cls_layers, depth)
        self.patch_layers = resolve_layers(keys.patch_layers, depth)
        self.cls_pos = [cached.index(x) for x in self.cls_layers] if set(self.cls_layers) <= set(cached) else None
        self.patch_pos = [cached.index(x) for x in self.patch_layers] if set(self.patch_layers) <= set(cached) else None
        self.split = split
        missing = []
        has = store.specs(split)
        if keys.frame_emb and "frame_emb" not in has:
            missing.append("frame_emb")
        if self.cls_layers and (self.cls_pos is None or "cls" not in has):
            missing.append(f"cls of blocks {list(self.cls_layers)}")
        if self.patch_layers and (self.patch_pos is None or "patch" not in has):
            missing.append(f"patch tokens of blocks {list(self.patch_layers)}")
        if keys.frames and "frames" not in has:
            missing.append("uint8 input frames")
        self.missing = missing

    def layer_pos(self, name: str) -> list[int] | None:
        """Positions, in the cache's layer axis, of the layers the head reads from array
        ``name`` (cls or patch); None for arrays without a layer axis."""
        return {"cls": self.cls_pos, "patch": self.patch_pos}.get(name)

    def array_names(self) -> list[str]:
        """The cached arrays this head reads, in a fixed order."""
        names = ["frame_emb"] if self.keys.frame_emb else []
        names += ["cls"] * bool(self.cls_layers) + ["patch"] * bool(self.patch_layers)
        return names + (["frames"] if self.keys.frames else [])


def extraction_hint(store: FeatureStore, keys: DataKeys, head: str = "") -> str:
    """The extraction command that would produce a cache holding what ``keys`` needs (with the
    cache's view bank, or ``head``'s recommended one when the cache has none)."""
    depth = store.info.dims.depth
    layers = sorted(set(store.info.layers) | set(resolve_layers(keys.cls_layers, depth))
                    | set(resolve_layers(keys.patch_layers, depth)))
    cfg = store.info.config
    command = extract_command(store.info, layers=layers, patch=bool(keys.patch_layers or cfg.patch),
                              frames_uint8=bool(keys.frames or cfg.store_frames))
    k = recommended_train_aug(head)
    if k and not cfg.train_aug:  # the cache's own bank is in the command
        command += f" --train-aug {k}"
    return command


def check_cache_for_head(store: FeatureStore, keys: DataKeys, head_name: str, splits: list[str]) -> dict[str, HeadInputs]:
    out = {}
    for split in splits:
        if split not in store.splits:
            raise CacheMismatchError(f"cache {store.path} has no split '{split}' (has {', '.join(store.splits)})")
        inputs = HeadInputs(store, keys, split)
        if inputs.missing:
            raise CacheMismatchError(
                f"head '{head_name}' needs {', '.join(inputs.missing)}, which cache {store.path.name} lacks; "
                f"extract them with: {extraction_hint(store, keys, head_name)}")
        out[split] = inputs
    return out


def select_videos(store: FeatureStore, split: str, *, shots: int = 0, fraction: float = 1.0,
                  classes: list[int] | None = None, seed: int = 0) -> np.ndarray:
    """Indices of done videos in ``split``: optional class subset, K shots per class, or a fraction."""
    labels = store.labels(split)
    ok = store.status(split) == DONE
    idx = np.flatnonzero(ok)
    if classes is not None:
        idx = idx[np.isin(labels[idx], classes)]
    rng = np.random.default_rng(seed)
    if shots > 0:
        chosen = []
        for c in sorted(set(labels[idx].tolist()) if classes is None else classes):
            members = idx[labels[idx] == c]
            if len(members) < shots:
                raise DatasetError(f"--shots {shots}: class {c} has only {len(members)} usable videos in '{split}'")
            chosen.append(rng.choice(members, size=shots, replace=False))
        idx = np.sort(np.concatenate(chosen)) if chosen else idx[:0]
    if not 0 < fraction <= 1:
        raise DatasetError(f"--fraction must be in (0, 1], got {fraction}")
    if fraction < 1:
        n = max(1, int(round(len(idx) * fraction)))
        idx = np.sort(rng.choice(idx, size=n, replace=False))
    if len(idx) == 0:
        raise DatasetError(f"no usable videos in split '{split}' for this selection")
    return idx


class CacheSplit(Dataset):
    """Videos of one split as dicts of tensors.

    Training (``train=True``): one view per sample, drawn at random when several were cached.
    Evaluation: every view, with a leading V axis (multi-view test).
    ``preload=False``: nothing is read here (stage two's loader, stages/data/loader.py, reads the
    stored bytes itself; items are then read per video).
    """

    def __init__(self, store: FeatureStore, inputs: HeadInputs, indices: np.ndarray, train: bool,
                 label_map: dict[int, int] | None = None, preload: bool = True):
        self.store, self.inputs, self.indices, self.train = store, inputs, np.asarray(indices), train
        split = inputs.split
        labels = store.labels(split)[self.indices]
        self.labels = np.array([label_map[int(x)] for x in labels] if label_map else labels, dtype=np.int64)
        # (N, V) label of each training view where flipped views swap labels (SSv2's left/right
        # classes in a view bank), else None: every view has its video's label
        self.view_labels: np.ndarray | None = None
        swap = label_swap(store.info, split) if train else None
        if swap is not None:
            params = store.read(split, "view_params", self.indices)  # (N, V, P)
            self.view_labels = view_labels(labels, params, swap, label_map)
        self.memory: dict[str, np.ndarray] = {}
        specs = store.specs(split)
        self.wanted = wanted = inputs.array_names()
        for name in wanted:
            spec = specs[name]
            per_video = 4 * int(np.prod(spec.shape))  # held as float32
            picked = inputs.layer_pos(name)
            if picked is not None:
                per_video = per_video * len(picked) // spec.shape[2]  # only the head's layers
            if preload and per_video * len(self.indices) <= IN_MEMORY_LIMIT:
                self.memory[name] = self._read(name, self.indices)
        self.mean, self.std = pixel_stats(store.info)
        self.views = specs[wanted[0]].shape[0] if wanted else 1
        self.epoch_seed = 0

    def _read(self, name: str, rows) -> np.ndarray:
        return self.store.read(self.inputs.split, name, rows, dtype=np.float32, layers=self.inputs.layer_pos(name))

    def set_epoch(self, epoch: int, seed: int) -> None:
        self.epoch_seed = epoch_seed(epoch, seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pick = view_pick(self.epoch_seed, i, self.views, self.train)
        label = self.labels[i] if self.view_labels is None else self.view_labels[i, pick.start or 0]
        item: dict[str, torch.Tensor] = {"label": torch.tensor(label)}
        for name in self.wanted:
            arr = self.memory[name][i] if name in self.memory else self._read(name, int(self.indices[i]))
            item[name] = view_tensor(name, arr, pick, self.train, self.mean, self.std)
        return item
