"""clipcache's Python API: a cache's features as numpy arrays, or as a torch Dataset.

    import clipcache

    feats = clipcache.open(PATH)                  # a cache folder, or its npy export (`cache export --format npy`)
    feats.arrays("train")                         # ['frame_emb', 'cls.block11', 'cls.block12', ...]
    x = feats.features("train", "frame_emb")      # (videos, views, frames, E) float16
    y = feats.labels("train")                     # (videos,) int64 class ids
    feats.class_names()[y[0]]                     # its class name
    ds = feats.dataset("train", "frame_emb")      # a torch Dataset of (float32 tensor, label)

A split holds its done videos in list order (failed ones are left out); ``videos(split)`` gives
each one's index in the split's list and its path. Array names: ``frame_emb`` (the projected
frame embeddings), ``cls.block<b>`` / ``patch.block<b>`` (the CLS / patch tokens after backbone
block b, 1-based), ``frames`` (uint8 input frames), as the cache holds them. From an npy export
``features`` memory-maps the file (nothing is read until used); from a cache folder it reads the
array (int8 dequantised to float16). Importing this module does not import torch: only
``dataset`` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache.errors import CacheMismatchError
from cache.npy_export import NpyExport, array_names, read_array
from cache.source import DONE
from cache.store import open_store

__all__ = ["open", "Features"]


class Features:
    """The features of a cache folder or of an npy export, read the same way (``open``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if (self.path / "index.json").is_file():
            self._export, self._store = NpyExport(self.path), None
        else:
            self._export, self._store = None, open_store(self.path)
        self._rows: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        kind = "npy export" if self._export is not None else "cache"
        return f"clipcache.Features({kind} {self.path}, splits {self.splits})"

    # ----------------------------------------------------------------- what is there
    @property
    def key(self) -> str:
        """The cache key (an export keeps its cache's)."""
        return (self._export or self._store).key

    @property
    def splits(self) -> list[str]:
        return list((self._export or self._store).splits)

    def class_names(self) -> list[str]:
        return (self._export or self._store).class_names()

    def arrays(self, split: str) -> list[str]:
        """The array names of a split (frame_emb, cls.block<b>, patch.block<b>, frames)."""
        self._check(split)
        return self._export.arrays(split) if self._export is not None else array_names(self._store, split)

    def _check(self, split: str) -> None:
        if split not in self.splits:
            raise CacheMismatchError(f"{self.path} has no split '{split}' (has {', '.join(self.splits)})")

    def _done(self, split: str) -> np.ndarray:
        if split not in self._rows:
            self._check(split)
            self._rows[split] = np.flatnonzero(self._store.status(split) == DONE)
        return self._rows[split]

    # ----------------------------------------------------------------- numpy
    def features(self, split: str, name: str = "frame_emb") -> np.ndarray:
        """(videos, ...) array ``name`` of a split's done videos (float16; frames uint8)."""
        if self._export is not None:
            return self._export.features(split, name)
        return read_array(self._store, split, name, self._done(split))

    def labels(self, split: str) -> np.ndarray:
        """(videos,) int64 class id of each done video of a split."""
        if self._export is not None:
            return self._export.labels(split)
        return self._store.labels(split)[self._done(split)].astype(np.int64)

    def videos(self, split: str) -> list[tuple[int, str]]:
        """(index in the split's list, path) of each done video of a split."""
        if self._export is not None:
            return self._export.videos(split)
        items = self._store.items(split)
        return [(int(i), items[i][0]) for i in self._done(split)]

    def text(self, name: str) -> np.ndarray:
        """Class text embeddings of a text set (K, E) or (K, M, E) float32 (zero-shot classifiers)."""
        return (self._export or self._store).text(name)

    def text_names(self) -> list[str]:
        return (self._export or self._store).text_names()

    # ----------------------------------------------------------------- torch
    def dataset(self, split: str, names: str | list[str] = "frame_emb"):
        """A torch Dataset over a split's done videos: item i is (float32 tensor, label) for one
        array name, ({name: tensor}, label) for a list; rows are read as they are asked for."""
        from clipcache.torch_data import FeatureDataset

        one = isinstance(names, str)
        names = [names] if one else list(names)
        for name in names:
            if name not in self.arrays(split):
                raise CacheMismatchError(f"{self.path} has no array '{name}' in split '{split}' "
                                         f"(it has {', '.join(self.arrays(split))})")
        if self._export is not None:
            sources = {n: self._export.features(split, n) for n in names}
            read = lambda n, i: np.asarray(sources[n][i])  # noqa: E731 - a memory-mapped row
        else:
            rows = self._done(split)
            read = lambda n, i: read_array(self._store, split, n, rows[i:i + 1])[0]  # noqa: E731
        return FeatureDataset(read, names, self.labels(split), one)


def open(path: str | Path) -> Features:  # noqa: A001 - clipcache.open, as io.open / zarr.open
    """Open a cache folder or an npy export folder for reading."""
    return Features(path)
