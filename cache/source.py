"""The read side of a cache, declared once: what every back-end answers, and how.

A Zarr store (cache/store.py ``FeatureStore``) and a WebDataset export (cache/wds.py
``WdsCache``) both subclass ``CacheSource``, so the stages ask a source, never which back-end it
is: its typed metadata (``info``), splits, per-video labels and status, array specs, array reads,
class names and text embeddings. One contract test (tests/test_source_contract.py) runs the same
assertions against a cache and its export. Which back-end a path names is decided in one place
above this floor (stages/data/open.py ``open_source``).

Status codes and ``ArraySpec`` live here because they are part of the contract: every back-end
says PENDING, DONE or FAILED per video, the same way, and describes its per-video arrays with the
same specs (the store lays its arrays out from them: cache/store.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from cache.errors import CacheError
from cache.meta import CacheMeta

__all__ = ["PENDING", "DONE", "FAILED", "ArraySpec", "CacheSource"]

PENDING, DONE, FAILED = 0, 1, 2


@dataclass(frozen=True)
class ArraySpec:
    """One per-video array: its shape per video (after N), dtype and storage."""

    name: str
    shape: tuple[int, ...]          # per video, e.g. (V, T, L, D)
    dtype: str                      # "float16" | "int8" (quantised per token) | "uint8"
    layer_axis: int | None = None   # chunk this axis (of the per-video shape) one by one

    def nbytes(self, outliers: int = 4) -> int:
        n = math.prod(self.shape)
        if self.dtype == "int8":
            tokens = n // self.shape[-1]
            return n + tokens * (2 + 4 * outliers)
        return n * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "layer_axis": self.layer_axis}

    @classmethod
    def from_json(cls, d: dict) -> "ArraySpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d.get("layer_axis"))


class CacheSource(Protocol):
    """What stage two (and `cache info`-like readers) may ask of any cache back-end.

    A back-end declares it by subclassing; the methods with a body here are shared by all."""

    path: Any                  # a Path (Zarr folder), or the header's location (a path, URL or pipe: command)
    meta: dict[str, Any]       # the metadata as stored (plain JSON); read it through ``info``

    @property
    def key(self) -> str:
        """The cache key (cache/meta.py KeyContent): equal for a cache and its exports."""
        ...

    @property
    def splits(self) -> list[str]:
        ...

    @property
    def source_id(self) -> str:
        """What the videos are read from (the store, or the shards in use): part of run ids."""
        ...

    def specs(self, split: str) -> dict[str, ArraySpec]:
        """The per-video arrays of a split, by name, as stored."""
        ...

    def num_videos(self, split: str) -> int:
        """Every video of the split's list (done, failed or pending)."""
        ...

    def labels(self, split: str) -> np.ndarray:
        """(num_videos,) int64 class index per video of the list."""
        ...

    def status(self, split: str) -> np.ndarray:
        """(num_videos,) int8 PENDING / DONE / FAILED: DONE only for videos this source can read."""
        ...

    def failures(self, split: str) -> list[dict]:
        """[{"index", "path", "reason"}] of the split's failed videos."""
        ...

    def read(self, split: str, name: str, index: Any = slice(None), dtype=np.float32) -> np.ndarray:
        """Rows ``index`` (an int, a slice or row numbers) of one array, int8 dequantised to ``dtype``,
        uint8 frames as stored."""
        ...

    def text_names(self) -> list[str]:
        ...

    def text(self, name: str) -> np.ndarray:
        """Class text embeddings (K, E) or (K, M, E) float32."""
        ...

    def aux_names(self) -> list[str]:
        ...

    def aux(self, name: str) -> np.ndarray:
        """A frozen backbone tensor a head needs (float32)."""
        ...

    # ----------------------------------------------------------------- shared by every back-end
    @cached_property
    def info(self) -> CacheMeta:
        """The metadata, typed (read once)."""
        try:
            return CacheMeta.from_dict(self.meta)
        except CacheError as exc:
            raise CacheError(f"{self.path}: {exc}") from None

    def has(self, split: str, name: str) -> bool:
        return name in self.specs(split)

    def counts(self, split: str) -> dict[str, int]:
        st = self.status(split)
        return {"done": int((st == DONE).sum()), "failed": int((st == FAILED).sum()),
                "pending": int((st == PENDING).sum())}

    def class_names(self) -> list[str]:
        """Class i's name is line i of the dataset's class list."""
        return list(self.info.dataset.classes)
