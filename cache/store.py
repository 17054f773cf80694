"""The Zarr v3 feature store: preallocated, sharded per group of videos, with a status array.

Layout of a cache folder (one Zarr group)::

    zarr.json                     group; attrs["clipcache"] = metadata (resolved config, key, dims)
    manifest.json                 per split: [[path, label], ...] in list order
    <split>/label      (N,)            int32
    <split>/status     (N,)            int8, one chunk per shard; 0 pending, 1 done, 2 failed
    <split>/frame_emb  (N, V, T, E)    fp16
    <split>/cls        (N, V, T, L, D) fp16, or a group {q, scale, oidx, oval} for int8
    <split>/patch      (N, V, T, L, P, D) chunked per video and layer (large; optional)
    <split>/frames     (N, V, T, H, W, 3) uint8 preprocessed input frames (optional)
    <split>/failures/shard-000007.json  [{"index", "path", "reason"}] of that shard
    <split>/videos/shard-000007.json    [{"index", "decoder", "warnings"}] of its decoded videos
    text/<name>        (K, E) or (K, M, E) float32 class text embeddings
    aux/<name>         float32 frozen backbone tensors a head needs (e.g. EVL's ln_1, in_proj)
    summary.json       written by whoever completes the cache

Shard s of a split holds videos [s*S, (s+1)*S). One process writes a whole shard at once
(data arrays first, then its failures file, then its status chunk last), so concurrent writers
of disjoint shards never touch the same file, and a shard whose status chunk was not written
is simply redone. Missing chunks read as the fill value (NaN for floats), which is why "done"
is never inferred from data: the status array says it, and `verify` cross-checks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zarr

from cache.errors import CacheError, CacheMismatchError
from cache.quant import QUANT_SUFFIXES, dequantize_int8, quantize_int8

__all__ = [
    "PENDING",
    "DONE",
    "FAILED",
    "FORMAT_VERSION",
    "ArraySpec",
    "FeatureStore",
    "atomic_write_text",
    "create_store",
    "open_store",
    "list_stores",
]

PENDING, DONE, FAILED = 0, 1, 2
FORMAT_VERSION = 1
META_KEY = "clipcache"


def default_cache_root() -> Path:
    """Where keyed caches go, for every command: $CLIPCACHE_ROOT/caches (artifacts/caches)."""
    return Path(os.environ.get("CLIPCACHE_ROOT", "artifacts")) / "caches"


def latest_cache(cache_root: Path, dataset: str) -> Path | None:
    """The cache last completed for ``dataset`` under ``cache_root`` (None if none or gone)."""
    marker = Path(cache_root) / f".latest-{dataset}"
    if marker.exists():
        path = Path(marker.read_text().strip())
        if path.exists():
            return path
    return None


def mark_latest(store_path: Path, dataset: str) -> None:
    """Record ``store_path`` as the latest complete cache of ``dataset`` (beside it; best effort)."""
    try:
        (Path(store_path).parent / f".latest-{dataset}").write_text(str(Path(store_path).resolve()))
    except OSError:
        pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # readable like any other file (mkstemp makes it private)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def _chunk(spec: ArraySpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-video chunk of an array of per-video ``shape`` (spec.shape or a quantised part)."""
    chunk = [1, *shape]
    if spec.layer_axis is not None and spec.layer_axis < len(shape):
        chunk[1 + spec.layer_axis] = 1
    return tuple(chunk)


class FeatureStore:
    """A cache folder opened for reading and writing shards."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.root = zarr.open_group(str(self.path), mode="r+")
        except Exception as exc:  # zarr raises several types for a missing/corrupt group
            raise CacheError(f"not a clipcache store: {self.path} ({exc.__class__.__name__})") from None
        meta = self.root.attrs.get(META_KEY)
        if not meta:
            raise CacheError(f"not a clipcache store (no metadata): {self.path}")
        self.meta: dict[str, Any] = meta
        self._manifest: dict | None = None
        # opened arrays and parsed specs: neither changes while a store is open, and opening a
        # zarr array reads its zarr.json (~0.4 ms), which per-video reads would pay every time
        self._arrays: dict[str, Any] = {}
        self._specs: dict[str, dict[str, ArraySpec]] = {}

    # ----------------------------------------------------------------- structure
    source_id = "zarr"  # what the videos are read from (WdsCache: the shards in use); part of run ids

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def shard_size(self) -> int:
        return int(self.meta["shard_size"])

    def specs(self, split: str) -> dict[str, ArraySpec]:
        if split not in self._specs:
            self._specs[split] = {d["name"]: ArraySpec.from_json(d) for d in self.meta["splits"][split]["arrays"]}
        return dict(self._specs[split])

    def _array(self, key: str):
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = self.root[key]
        return arr

    def num_videos(self, split: str) -> int:
        return int(self.meta["splits"][split]["num_videos"])

    def num_shards(self, split: str) -> int:
        return math.ceil(self.num_videos(split) / self.shard_size)

    def shard_range(self, split: str, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_videos(split))

    def has(self, split: str, name: str) -> bool:
        return name in self.specs(split)

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = json.loads((self.path / "manifest.json").read_text())
        return self._manifest

    def items(self, split: str) -> list[tuple[str, int]]:
        return [tuple(x) for x in self.manifest["splits"][split]]

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self._array(f"{split}/label")[:], dtype=np.int64)

    # ----------------------------------------------------------------- status
    def status(self, split: str) -> np.ndarray:
        return np.asarray(self._array(f"{split}/status")[:], dtype=np.int8)

    def pending_shards(self, split: str) -> list[int]:
        st = self.status(split)
        return [s for s in range(self.num_shards(split)) if (st[slice(*self.shard_range(split, s))] == PENDING).any()]

    def failures(self, split: str) -> list[dict]:
        folder = self.path / split / "failures"
        out: list[dict] = []
        if folder.is_dir():
            for f in sorted(folder.glob("shard-*.json")):
                out.extend(json.loads(f.read_text()))
        return out

    def video_records(self, split: str) -> list[dict]:
        """Which reader decoded each video and what it warned of: [{"index", "decoder", "warnings"}]."""
        folder = self.path / split / "videos"
        out: list[dict] = []
        if folder.is_dir():
            for f in sorted(folder.glob("shard-*.json")):
                out.extend(json.loads(f.read_text()))
        return out

    def counts(self, split: str) -> dict[str, int]:
        st = self.status(split)
        return {"done": int((st == DONE).sum()), "failed": int((st == FAILED).sum()), "pending": int((st == PENDING).sum())}

    def is_complete(self) -> bool:
        return all(self.counts(s)["pending"] == 0 for s in self.splits)

    # ----------------------------------------------------------------- writing
    def write_shard(self, split: str, shard: int, arrays: dict[str, np.ndarray], status: np.ndarray,
                    failures: list[dict], videos: list[dict] | None = None) -> None:
        """Write one whole shard: data, then failures and video records, then status (the commit mark)."""
        start, stop = self.shard_range(split, shard)
        n = stop - start
        if status.shape != (n,):
            raise ValueError(f"status for shard {shard} has shape {status.shape}, expected ({n},)")
        specs = self.specs(split)
        if set(arrays) != set(specs):
            raise ValueError(f"shard arrays {sorted(arrays)} do not match the store's {sorted(specs)}")
        for name, data in arrays.items():
            spec = specs[name]
            if data.shape != (n, *spec.shape):
                raise ValueError(f"{name}: shape {data.shape}, expected {(n, *spec.shape)}")
            if spec.dtype == "int8":
                parts = quantize_int8(data, outliers=int(self.meta.get("int8_outliers", 4)))
                for suffix in QUANT_SUFFIXES:
                    self._array(f"{split}/{name}/{suffix}")[start:stop] = parts[suffix]
            else:
                self._array(f"{split}/{name}")[start:stop] = data.astype(spec.dtype, copy=False)
        folder = self.path / split / "failures"
        folder.mkdir(exist_ok=True)
        atomic_write_text(folder / f"shard-{shard:06d}.json", json.dumps(failures, indent=0))
        if videos is not None:
            folder = self.path / split / "videos"
            folder.mkdir(exist_ok=True)
            atomic_write_text(folder / f"shard-{shard:06d}.json", json.dumps(videos, indent=0))
        self._array(f"{split}/status")[start:stop] = status.astype(np.int8)

    def write_text(self, name: str, array: np.ndarray) -> None:
        self.root.create_array(f"text/{name}", data=np.asarray(array, dtype=np.float32), overwrite=True)

    def write_aux(self, name: str, array: np.ndarray) -> None:
        self.root.create_array(f"aux/{name}", data=np.asarray(array, dtype=np.float32), overwrite=True)

    # ----------------------------------------------------------------- reading
    def read(self, split: str, name: str, index: Any = slice(None), dtype=np.float32,
             layers: list[int] | None = None) -> np.ndarray:
        """Read videos ``index`` (an int, a slice or an array of row numbers) of one array.

        ``layers`` picks positions on the layer axis of cls/patch (only those chunks are read).
        Arrays of row numbers are read as runs of consecutive rows: zarr 3.1's fancy indexing
        took 20-60x longer and ~150 bytes of scratch memory per element (bench_train.py).
        """
        spec = self.specs(split).get(name)
        if spec is None:
            raise CacheMismatchError(f"cache {self.path} has no '{name}' for split '{split}'")
        if not isinstance(index, (int, np.integer, slice)):
            rows = np.asarray(index, dtype=np.int64).ravel()
            if rows.size == 0:
                return self.read(split, name, slice(0, 0), dtype, layers)
            order = np.argsort(rows, kind="stable")
            srt = rows[order]
            cuts = np.flatnonzero(np.diff(srt) != 1) + 1
            parts = [self.read(split, name, slice(int(r[0]), int(r[-1]) + 1), dtype, layers)
                     for r in np.split(srt, cuts)]
            out = np.concatenate(parts)
            return out[np.argsort(order, kind="stable")]
        sel: tuple = (index,)
        if layers is not None:
            # per-video shape (V, T, L, ...): the layer axis is 3 counting N
            lay = list(layers)
            contiguous = lay == list(range(lay[0], lay[0] + len(lay))) if lay else True
            sel = (index, slice(None), slice(None), slice(lay[0], lay[-1] + 1) if contiguous and lay else lay)
        if spec.dtype == "int8":
            parts = {s: self._get(f"{split}/{name}/{s}", sel) for s in QUANT_SUFFIXES}
            return dequantize_int8(parts, dtype=dtype)
        data = self._get(f"{split}/{name}", sel)
        return data if spec.dtype == "uint8" else data.astype(dtype, copy=False)

    def _get(self, key: str, sel: tuple) -> np.ndarray:
        arr = self._array(key)
        if any(isinstance(x, list) for x in sel):
            return arr.oindex[sel]
        return arr[sel]

    def text_names(self) -> list[str]:
        if "text" not in self.root:
            return []
        return sorted(self.root["text"].array_keys())

    def text(self, name: str) -> np.ndarray:
        if name not in self.text_names():
            raise CacheMismatchError(
                f"cache {self.path} has no text embeddings '{name}' (has: {', '.join(self.text_names()) or 'none'})")
        return np.asarray(self.root[f"text/{name}"][:], dtype=np.float32)

    def aux_names(self) -> list[str]:
        if "aux" not in self.root:
            return []
        return sorted(self.root["aux"].array_keys())

    def aux(self, name: str) -> np.ndarray:
        return np.asarray(self.root[f"aux/{name}"][:], dtype=np.float32)

    # ----------------------------------------------------------------- reporting
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def summary(self) -> dict:
        return {
            "path": str(self.path),
            "key": self.key,
            "bytes": self.size_bytes(),
            "splits": {s: self.counts(s) for s in self.splits},
            "complete": self.is_complete(),
        }

    def write_summary(self) -> dict:
        summary = self.summary()
        summary["failures"] = {s: self.failures(s) for s in self.splits}
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=1))
        return summary

    def verify(self) -> list[str]:
        """Cross-check status against data; returns a list of problems (empty when sound)."""
        problems: list[str] = []
        for split in self.splits:
            st = self.status(split)
            failed_idx = {f["index"] for f in self.failures(split)}
            for i in np.flatnonzero(st == FAILED):
                if int(i) not in failed_idx:
                    problems.append(f"{split}[{i}]: failed without a recorded reason")
            done = np.flatnonzero(st == DONE)
            for name, spec in self.specs(split).items():
                for shard in range(self.num_shards(split)):
                    start, stop = self.shard_range(split, shard)
                    rows = done[(done >= start) & (done < stop)]
                    if rows.size == 0:
                        continue
                    if spec.dtype == "uint8":  # 0 is a valid pixel: check that the shard was written
                        if not self._shard_written(split, name, shard):
                            problems.append(f"{split}/{name} shard {shard}: marked done but no data written")
                        continue
                    data = self.read(split, name, slice(start, stop))[rows - start]
                    bad = ~np.isfinite(data.reshape(len(rows), -1)).all(axis=1)
                    for i in rows[bad]:
                        problems.append(f"{split}/{name}[{i}]: marked done but holds NaN/inf (missing or corrupt data)")
        return problems

    def _shard_written(self, split: str, name: str, shard: int) -> bool:
        arr = self._array(f"{split}/{name}")
        coords = (shard,) + (0,) * (arr.ndim - 1)
        key = arr.metadata.encode_chunk_key(coords)
        return (self.path / split / name / key).exists()


# --------------------------------------------------------------------------- creation
@contextlib.contextmanager
def _creation_lock(path: Path) -> Iterator[None]:
    lock_path = path.parent / f".{path.name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def create_store(path: str | Path, meta: dict, splits: dict[str, dict], shard_size: int,
                 init: Callable[[Path], None] | None = None) -> FeatureStore:
    """Create (or open, when an identical one exists) a preallocated store atomically.

    ``splits[name] = {"items": [(path, label), ...], "arrays": [ArraySpec, ...]}``. The store is
    built in a temporary sibling folder and renamed into place, so a crash never leaves a
    half-made store; concurrent creators (``--shard i/n``) serialise on a lock file, and the
    later one opens what the first made after checking that the keys agree. ``init(folder)``
    writes anything else that belongs to a new store (text embeddings, aux tensors) before the
    rename, so it is there exactly when the store is.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create cache folder {path.parent}: {exc.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise CacheError(f"cache folder {path.parent} is not writable")
    with _creation_lock(path):
        if path.exists():
            store = open_store(path)
            if store.key != meta["key"]:
                raise CacheMismatchError(
                    f"{path} already holds a different cache (key {store.key}, asked {meta['key']}); "
                    "choose another --out or remove it")
            return store
        # Holding the lock, nobody else is building: leftovers are from killed runs.
        for stale in path.parent.glob(f".{path.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.building-"))
        try:
            _build(tmp, meta, splits, shard_size)
            if init is not None:
                init(tmp)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return FeatureStore(path)


def _build(folder: Path, meta: dict, splits: dict[str, dict], shard_size: int) -> None:
    root = zarr.open_group(str(folder), mode="w")
    meta = dict(meta)
    meta.update(format_version=FORMAT_VERSION, shard_size=shard_size, splits={})
    manifest: dict[str, Any] = {"splits": {}}
    for split, info in splits.items():
        items = [(str(p), int(label)) for p, label in info["items"]]
        n = len(items)
        S = max(1, min(shard_size, n))
        manifest["splits"][split] = items
        root.create_array(f"{split}/label", data=np.asarray([lab for _, lab in items], dtype=np.int32))
        root.create_array(f"{split}/status", shape=(n,), chunks=(S,), dtype="int8", fill_value=PENDING,
                          compressors=None)
        specs: list[ArraySpec] = info["arrays"]
        for spec in specs:
            if spec.dtype == "int8":
                outl = int(meta.get("int8_outliers", 4))
                parts = {"q": (spec.shape, "int8", 0), "scale": (spec.shape[:-1], "float16", np.nan),
                         "oidx": ((*spec.shape[:-1], outl), "int16", 0),
                         "oval": ((*spec.shape[:-1], outl), "float16", np.nan)}
                for suffix, (shape, dtype, fill) in parts.items():
                    _create(root, f"{split}/{spec.name}/{suffix}", spec, n, shape, dtype, fill, S)
            else:
                fill = 0 if spec.dtype == "uint8" else np.nan
                _create(root, f"{split}/{spec.name}", spec, n, spec.shape, spec.dtype, fill, S)
        meta["splits"][split] = {"num_videos": n, "arrays": [s.to_json() for s in specs]}
    root.attrs[META_KEY] = meta
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _create(root, name: str, spec: ArraySpec, n: int, shape: tuple[int, ...], dtype: str, fill, S: int) -> None:
    chunk = _chunk(spec, shape)
    shards = (S, *shape)
    root.create_array(name, shape=(n, *shape), chunks=chunk, shards=shards, dtype=dtype, fill_value=fill,
                      compressors=None)


def open_store(path: str | Path) -> FeatureStore:
    path = Path(path)
    if not path.exists():
        raise CacheError(f"no cache at {path}")
    if not (path / "zarr.json").exists():
        raise CacheError(f"not a clipcache store: {path}")
    return FeatureStore(path)


def list_stores(root: str | Path) -> list[FeatureStore]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and (child / "zarr.json").exists():
            with contextlib.suppress(CacheError):
                out.append(FeatureStore(child))
    return out
