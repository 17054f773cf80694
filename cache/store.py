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
    <split>/records/shard-000007.json   that shard's commit record: crc32 + size of every array's
                                  shard file, the status it commits, the failures file's crc32,
                                  and per video {index, path, size, mtime_ns[, sha256], ...}
    checksums.json                crc32 + size of every file the store was built with (metadata,
                                  labels, manifest, text and aux arrays)
    text/<name>        (K, E) or (K, M, E) float32 class text embeddings
    aux/<name>         float32 frozen backbone tensors a head needs (e.g. EVL's ln_1, in_proj)
    summary.json       written by whoever completes the cache

Shard s of a split holds videos [s*S, (s+1)*S). One process writes a whole shard at once
(data arrays first, then its failures file, then its record, then its status chunk last), so
concurrent writers of disjoint shards never touch the same file, and a shard whose status chunk
was not written is simply redone. Missing chunks read as the fill value (NaN for floats), which
is why "done" is never inferred from data: the status array says it, and `verify` cross-checks
it against the record's checksums (a deleted, truncated or flipped file is named, one line each).
Reads never turn a lost file into fill values: a shard file of a done shard that is missing, or of
another size than its record says, when a read meets it is a CacheError naming it
(``written_shards``, ``_check_shard``); ``verify_reads`` checks its crc32 as well.

Checksums are zlib's crc32 plus the byte size, of whole files: the stdlib's fastest hash here
(2.7 GB/s against sha256's 0.9 GB/s on this machine), no new dependency, and it is meant to
catch accidental damage (truncation, lost or flipped bytes, half copies), not tampering.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zarr

from cache.errors import CacheError, CacheMismatchError
from cache.meta import FORMAT_VERSION, Record, StoreMeta
from cache.quant import FP16_MAX, QUANT_SUFFIXES, dequantize_int8, finite_rows, quantize_int8
from cache.source import DONE, FAILED, PENDING, CacheSource

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
    "Problem",
    "file_checksum",
    "repair_static",
    "FAULT_ENV",
]

META_KEY = "clipcache"
CHECKSUMS = "checksums.json"
INTEGRITY_VERSION = 1             # StoreMeta.integrity: the store keeps checksums and shard records
FAULT_ENV = "CLIPCACHE_FAULT"     # tests: die (os._exit or SIGKILL) at one step of write_shard
FAULT_STEPS = ("after_data", "after_failures", "before_status", "after_status")
FAULT_EXIT = 75
_fault_counts: dict[str, int] = {}


def _fault(step: str) -> None:
    """Fault injection for tests: CLIPCACHE_FAULT=STEP[:N[:sigkill]] ends the process at the N-th
    (default first) time write_shard reaches STEP, as a crash would (os._exit: no cleanup, no
    flush), or by a real SIGKILL sent to itself with ``:sigkill``. A test that must kill a run
    part-way uses this rather than racing a poller against a run that commits shards in ms."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    nth, _, how = rest.partition(":")
    if name == "after_records":  # the record is the last thing written before the status chunk
        name = "before_status"
    if name != step:
        return
    _fault_counts[step] = _fault_counts.get(step, 0) + 1
    if _fault_counts[step] >= int(nth or 1):
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(FAULT_EXIT)


def file_checksum(path: Path) -> dict | None:
    """{"size", "crc32"} of a file (None when it does not exist), read in 8 MiB blocks."""
    crc, size = 0, 0
    try:
        with open(path, "rb") as fh:
            while block := fh.read(8 << 20):
                crc = zlib.crc32(block, crc)
                size += len(block)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return {"size": size, "crc32": f"{crc:08x}"}


def _file_version(st: os.stat_result) -> tuple:
    """What changes whenever a file's bytes do: any write sets its ctime (mtime can be set back)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def _path_version(path: Path) -> tuple | None:
    try:
        return _file_version(os.stat(path))
    except OSError:
        return None


def _expected_file(entry) -> dict | bool | None:
    """What a shard record's entry of one array says its file must be (FeatureStore.written_shards):
    {"size", "crc32"}; None when it recorded no file; True (it must exist) for no usable entry."""
    if not isinstance(entry, dict):
        return True
    got = entry.get("checksum")
    if got is None and "checksum" in entry:
        return None
    if isinstance(got, dict) and isinstance(got.get("size"), int) and isinstance(got.get("crc32"), str):
        return got
    return True


def _damage(rel: str, want: dict | None, got: dict | None) -> str | None:
    """What is wrong with file ``rel`` given its recorded and its current checksum (None: fine)."""
    if want is None:
        return None if got is None else f"{rel}: present but recorded as never written"
    if got is None:
        return f"{rel}: missing"
    if got["size"] < want["size"]:
        return f"{rel}: truncated ({got['size']} of {want['size']} bytes)"
    if got["size"] != want["size"]:
        return f"{rel}: size changed ({got['size']} bytes, recorded {want['size']})"
    if got["crc32"] != want["crc32"]:
        return f"{rel}: corrupt (checksum mismatch)"
    return None


class Problem(str):
    """One line of `verify`: a str (the line), with where it is: split, array, shard (None for
    files the store was built with) and the file (relative to the store) when one is named."""

    split: str | None
    array: str | None
    shard: int | None
    file: str | None

    def __new__(cls, text: str, split: str | None = None, array: str | None = None, shard: int | None = None,
                file: str | None = None) -> "Problem":
        self = super().__new__(cls, text)
        self.split, self.array, self.shard, self.file = split, array, shard, file
        return self

    @property
    def what(self) -> str:
        return str(self)


def _read_json(path: Path):
    """Parsed JSON of a file, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def artifacts_root() -> Path:
    """The one folder every default location is under: $CLIPCACHE_ROOT (artifacts)."""
    return Path(os.environ.get("CLIPCACHE_ROOT", "artifacts"))


def default_cache_root() -> Path:
    """Where keyed caches go, for every command: $CLIPCACHE_ROOT/caches (artifacts/caches)."""
    return artifacts_root() / "caches"


def latest_cache(cache_root: Path, dataset: str) -> Path | None:
    """The cache last completed for ``dataset`` under ``cache_root`` (None if none or gone)."""
    marker = Path(cache_root) / f".latest-{dataset}"
    if marker.exists():
        path = Path(marker.read_text().strip())
        if path.exists():
            return path
    return None


def mark_latest(store_path: Path, dataset: str, cache_root: Path | None) -> None:
    """Record ``store_path`` as the latest complete cache of ``dataset`` in the cache root's own
    folder, where ``latest_cache`` reads it (best effort). ``cache_root``: the root a keyed cache was
    made under, or the one --cache-root names; None (a cache at an --out path of its own, no
    --cache-root) records nothing, so nothing is left beside the user's folder."""
    if cache_root is None:
        return
    try:
        Path(cache_root).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cache_root) / f".latest-{dataset}", str(Path(store_path).resolve()))
    except OSError:
        pass


def keyed_root(path: Path, key: str) -> Path | None:
    """The cache root a cache was made under when its folder is the keyed name extract gives it
    (``<dataset>-<model>-<key[:10]>``), else None (a folder the user named with --out)."""
    path = Path(path)
    return path.parent if path.name.endswith(f"-{key[:10]}") else None


def human_bytes(n: float) -> str:
    """A byte count (or a difference of two, negative) in B, KB, MB, GB or TB (1024-based)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
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


class FeatureStore(CacheSource):
    """A cache folder opened for reading and writing shards (``info``: its metadata, typed)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.root = zarr.open_group(str(self.path), mode="r+")
            meta = self.root.attrs.get(META_KEY)
        except Exception as exc:  # zarr raises several types for a missing/corrupt group
            if (self.path / "zarr.json").is_file():
                raise CacheError(f"cache metadata {self.path / 'zarr.json'} is unreadable ({exc.__class__.__name__}): "
                                 f"it cannot be repaired in place; remove {self.path} and extract again") from None
            raise CacheError(f"not a clipcache store: {self.path} ({exc.__class__.__name__})") from None
        if not meta:
            raise CacheError(f"not a clipcache store (no metadata): {self.path}")
        self.meta: dict[str, Any] = meta
        try:
            self._layout = StoreMeta.from_dict(meta)  # what the store itself reads; the stages read .info
        except CacheError as exc:
            raise CacheError(f"not a clipcache store ({exc}): {self.path}") from None
        self._manifest: dict | None = None
        # opened arrays and parsed specs: neither changes while a store is open, and opening a
        # zarr array reads its zarr.json (~0.4 ms), which per-video reads would pay every time
        self._arrays: dict[str, Any] = {}
        self._specs: dict[str, dict[str, ArraySpec]] = {}
        # what a read may expect of each shard file (written_shards), taken once per split: a file
        # deleted or replaced under a reader is then told from one never written
        self._written: dict[str, dict[int, dict[str, dict | bool | None]]] = {}
        # (split, key, shard) -> the version (_file_version) of its file whose bytes matched its record
        self._verified: dict[tuple[str, str, int], tuple] = {}
        #: check each shard file's recorded crc32 when a read first meets a version of it (size,
        #: mtime, ctime, inode): a same-length rewrite during a run is caught at its next read
        self.verify_reads = False

    # ----------------------------------------------------------------- structure
    source_id = "zarr"  # what the videos are read from (WdsCache: the shards in use); part of run ids

    @property
    def key(self) -> str:
        return self._layout.key

    @property
    def splits(self) -> list[str]:
        return list(self._layout.splits)

    @property
    def shard_size(self) -> int:
        return self._layout.shard_size

    def specs(self, split: str) -> dict[str, ArraySpec]:
        if split not in self._specs:
            self._specs[split] = {d["name"]: ArraySpec.from_json(d) for d in self._layout.splits[split].arrays}
        return dict(self._specs[split])

    def _array(self, key: str):
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = self.root[key]
        return arr

    def num_videos(self, split: str) -> int:
        return self._layout.splits[split].num_videos

    def num_shards(self, split: str) -> int:
        return math.ceil(self.num_videos(split) / self.shard_size)

    def shard_range(self, split: str, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_videos(split))

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            got = _read_json(self.path / "manifest.json")
            if not isinstance(got, dict) or "splits" not in got:
                raise CacheError(f"{self.path / 'manifest.json'} is missing or damaged: "
                                 f"repair it with `pipeline cache repair {self.path}`")
            self._manifest = got
        return self._manifest

    def items(self, split: str) -> list[tuple[str, int]]:
        return [tuple(x) for x in self.manifest["splits"][split]]

    def labels(self, split: str) -> np.ndarray:
        try:
            return np.asarray(self._array(f"{split}/label")[:], dtype=np.int64)
        except Exception as exc:  # a damaged chunk or metadata file: zarr raises several types
            raise CacheError(f"the labels of split '{split}' in {self.path} are unreadable ({exc.__class__.__name__}): "
                             f"repair the cache with `pipeline cache repair {self.path}`") from None

    # ----------------------------------------------------------------- status
    def status(self, split: str) -> np.ndarray:
        """Per video PENDING / DONE / FAILED. A status chunk that is missing, unreadable or holds
        other values reads as PENDING: that shard is then redone, never taken as done."""
        try:
            st = np.asarray(self._array(f"{split}/status")[:], dtype=np.int8)
        except Exception:
            st = np.full(self.num_videos(split), PENDING, dtype=np.int8)
            for shard in range(self.num_shards(split)):
                a, b = self.shard_range(split, shard)
                raw = self._status_chunk(split, shard)
                if raw is not None:
                    st[a:b] = raw
        return np.where((st == DONE) | (st == FAILED), st, PENDING).astype(np.int8)

    def _status_chunk(self, split: str, shard: int) -> np.ndarray | None:
        """The stored status bytes of one shard read from its chunk file (None: missing or not
        one byte per row of the chunk). Status chunks are raw int8 (no compressor)."""
        a, b = self.shard_range(split, shard)
        try:
            data = self._status_file(split, shard).read_bytes()
        except OSError:
            return None
        if len(data) != self._status_chunk_len(split):
            return None
        return np.frombuffer(data, dtype=np.int8)[: b - a].copy()

    def _status_chunk_len(self, split: str) -> int:
        return max(1, min(self.shard_size, self.num_videos(split)))

    def _status_file(self, split: str, shard: int) -> Path:
        return self.path / split / "status" / "c" / str(shard)

    def _record_file(self, split: str, shard: int) -> Path:
        return self.path / split / "records" / f"shard-{shard:06d}.json"

    def _failures_file(self, split: str, shard: int) -> Path:
        return self.path / split / "failures" / f"shard-{shard:06d}.json"

    def record(self, split: str, shard: int) -> dict | None:
        """The commit record of one shard (None: none, or unreadable)."""
        rec = _read_json(self._record_file(split, shard))
        return rec if isinstance(rec, dict) else None

    def records(self, split: str) -> dict[int, dict]:
        """Shard number -> commit record, for the shards that have a readable one."""
        out = {}
        for shard in range(self.num_shards(split)):
            rec = self.record(split, shard)
            if rec is not None:
                out[shard] = rec
        return out

    def _data_keys(self, split: str) -> list[str]:
        """Zarr array paths (under the split) of the per-video arrays: int8 ones are 4 arrays."""
        keys = []
        for name, spec in self.specs(split).items():
            keys += [f"{name}/{q}" for q in QUANT_SUFFIXES] if spec.dtype == "int8" else [name]
        return keys

    def _shard_file(self, split: str, key: str, shard: int) -> Path:
        """The file of one store shard of array ``split/key`` (the default "c/" chunk key encoding)."""
        nd = len(self._data_ndim(split, key))
        return self.path / split / key / "c" / "/".join([str(shard)] + ["0"] * (nd - 1))

    def _data_ndim(self, split: str, key: str) -> tuple[int, ...]:
        name, _, part = key.partition("/")
        spec = self.specs(split)[name]
        if not part or part == "q":
            return (0, *spec.shape)
        return (0, *spec.shape[:-1]) if part == "scale" else (0, *spec.shape[:-1], 0)

    def pending_shards(self, split: str) -> list[int]:
        st = self.status(split)
        return [s for s in range(self.num_shards(split)) if (st[slice(*self.shard_range(split, s))] == PENDING).any()]

    def failures(self, split: str) -> list[dict]:
        folder = self.path / split / "failures"
        out: list[dict] = []
        if folder.is_dir():
            for f in sorted(folder.glob("shard-*.json")):
                got = _read_json(f)  # a damaged file is verify's to report; readers skip it
                if isinstance(got, list):
                    out.extend(x for x in got if isinstance(x, dict) and "index" in x)
        return out

    def video_records(self, split: str) -> list[dict]:
        """Per decoded video, from the shards' commit records: [{"index", "decoder", "warnings", ...}]
        (which reader decoded it, what it warned of, and its source's size / mtime)."""
        out: list[dict] = []
        for rec in self.records(split).values():
            out.extend(v for v in rec.get("videos") or [] if "decoder" in v)
        return sorted(out, key=lambda v: v["index"])

    def is_complete(self) -> bool:
        return all(self.counts(s)["pending"] == 0 for s in self.splits)

    # ----------------------------------------------------------------- writing
    def write_shard(self, split: str, shard: int, arrays: dict[str, np.ndarray], status: np.ndarray,
                    failures: list[dict], videos: list[dict] | None = None) -> dict:
        """Write one whole shard: data, then failures, then its record, then status (the commit mark).

        ``videos``: per video of the shard a dict with at least "index" (and e.g. "path", "size",
        "mtime_ns", "sha256" of its source, the decoder...), kept in the record. Returns the record.
        """
        start, stop = self.shard_range(split, shard)
        n = stop - start
        if status.shape != (n,):
            raise ValueError(f"status for shard {shard} has shape {status.shape}, expected ({n},)")
        specs = self.specs(split)
        if set(arrays) != set(specs):
            raise ValueError(f"shard arrays {sorted(arrays)} do not match the store's {sorted(specs)}")
        done = np.asarray(status) == DONE
        stored: dict[str, np.ndarray] = {}  # every array checked before any is written
        for name, data in arrays.items():
            spec = specs[name]
            if data.shape != (n, *spec.shape):
                raise ValueError(f"{name}: shape {data.shape}, expected {(n, *spec.shape)}")
            with np.errstate(over="ignore"):  # beyond fp16 becomes inf: refused next
                stored[name] = data.astype("float16" if spec.dtype == "int8" else spec.dtype, copy=False)
            if spec.dtype != "uint8":  # int8 is quantised from the fp16 values
                self._refuse_non_finite(split, name, start, stored[name], done, data)
        for name, data in stored.items():
            if specs[name].dtype == "int8":
                data = arrays[name]  # quantised as given (the check above was on its fp16 values)
                # rows not done hold no data (NaN in a shard buffer): quantised as zeros, read back as NaN
                rows = data if done.all() else np.where(done.reshape(-1, *[1] * (data.ndim - 1)), data, 0)
                parts = quantize_int8(rows, outliers=self._layout.int8_outliers)
                parts["scale"][~done] = np.nan
                parts["oval"][~done] = np.nan
                for suffix in QUANT_SUFFIXES:
                    self._array(f"{split}/{name}/{suffix}")[start:stop] = parts[suffix]
            else:
                self._array(f"{split}/{name}")[start:stop] = data
        _fault("after_data")
        folder = self.path / split / "failures"
        folder.mkdir(exist_ok=True)
        atomic_write_text(folder / f"shard-{shard:06d}.json", json.dumps(failures, indent=0))
        _fault("after_failures")
        record = {
            "version": INTEGRITY_VERSION, "shard": shard, "rows": [start, stop],
            "status": [int(x) for x in status],
            "arrays": {key: {"file": str(self._shard_file(split, key, shard).relative_to(self.path)),
                             "checksum": file_checksum(self._shard_file(split, key, shard))}
                       for key in self._data_keys(split)},
            "failures": file_checksum(self._failures_file(split, shard)),
            "videos": list(videos or []),
        }
        self._record_file(split, shard).parent.mkdir(exist_ok=True)
        atomic_write_text(self._record_file(split, shard), json.dumps(record, indent=0))
        _fault("before_status")
        self._array(f"{split}/status")[start:stop] = status.astype(np.int8)
        _fault("after_status")
        self._written.pop(split, None)  # this store's own write: what reads expect changed with it
        return record

    @staticmethod
    def _refuse_non_finite(split: str, name: str, start: int, kept: np.ndarray, done: np.ndarray,
                           source: np.ndarray) -> None:
        """A video marked done must hold finite data as the store keeps it (``kept``: fp16, or the
        fp16 values int8 is quantised from): one CacheError naming the first video that does not
        (NaN/inf in ``source``, or beyond fp16's range), before anything of the shard is written."""
        bad = np.flatnonzero(done & ~finite_rows(kept))
        if bad.size:
            first = np.asarray(source[bad[0]], dtype=np.float32)
            why = ("holds NaN/inf" if not np.isfinite(first).all() else
                   f"reaches {float(np.abs(first).max()):.3g}, beyond the {FP16_MAX:g} of fp16")
            raise CacheError(f"{split}/{name}[{start + int(bad[0])}] is marked done but {why}"
                             + (f" (and {bad.size - 1} more video(s) of the shard)" if bad.size > 1 else "")
                             + "; a cache never stores non-finite features: record such a video as failed")

    def reset_shards(self, split: str, shards: list[int]) -> None:
        """Make shards pending again (status first, so a crash half-way leaves them pending), and
        drop their record, failures and data files: the next extraction redoes exactly these."""
        status = self._status_file(split, 0).parent
        status.mkdir(parents=True, exist_ok=True)
        for shard in shards:
            self._status_file(split, shard).unlink(missing_ok=True)  # missing chunk = fill value = PENDING
            self._record_file(split, shard).unlink(missing_ok=True)
            self._failures_file(split, shard).unlink(missing_ok=True)
            for key in self._data_keys(split):
                self._shard_file(split, key, shard).unlink(missing_ok=True)
        self._written.pop(split, None)

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

    def read_rows(self, split: str, name: str, rows, layers: list[int] | None = None,
                  out: np.ndarray | dict[str, np.ndarray] | None = None) -> np.ndarray | dict[str, np.ndarray]:
        """Videos ``rows`` (row numbers, any order; sorted ones read sequentially) of one array in
        its stored dtype: fp16 / uint8 as one array, int8 as its parts {q, scale, oidx, oval}
        (cache/quant.py). ``layers``: positions on the layer axis, as in ``read``. ``out``: where
        to put them (e.g. a shared-memory tensor's numpy view), shaped (len(rows), ...).

        The bytes are read straight from the shard files (cache/rows.py), one system call per run
        of consecutive chunks, no float conversion: the stage-two loader's read (stages/loader.py).
        A shard that does not read back (damaged after the reader's start-of-run check) is one
        CacheError naming the array, the file and the fix.
        """
        spec = self.specs(split).get(name)
        if spec is None:
            raise CacheMismatchError(f"cache {self.path} has no '{name}' for split '{split}'")
        rows = np.asarray(rows, dtype=np.int64).ravel()
        keys = {s: f"{split}/{name}/{s}" for s in QUANT_SUFFIXES} if spec.dtype == "int8" else {"": f"{split}/{name}"}
        got = {}
        for part, key in keys.items():
            dest = out if not part else (out or {}).get(part)
            try:
                got[part] = self._read_raw_rows(key, rows, layers, dest)
            except OSError as exc:  # cache/rows.ShardReadError
                raise self._unreadable(key, rows, exc) from None
        return got if spec.dtype == "int8" else got[""]

    def _unreadable(self, key: str, rows, exc: Exception) -> CacheError:
        """The one line for a shard of array ``key`` (split/name[/part]) that failed to read rows
        ``rows``: cache/rows.ShardReadError, or what zarr raises (its crc32c check of a shard index)."""
        from cache.rows import ShardReadError

        if isinstance(exc, ShardReadError):
            files, why = [exc.path], exc.why
        else:
            split, sub = key.split("/", 1)
            shards = sorted({int(r) // self.shard_size for r in np.asarray(rows).ravel().tolist()})
            files = [self._shard_file(split, sub, s) for s in shards]
            why = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
            if "checksum do not match" in why:
                why = "truncated or overwritten: its chunk index fails its crc32c check"
        where = ", ".join(os.path.relpath(f, self.path) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        why = " ".join(why.split())[:200]
        return CacheError(f"cache {self.path}: shard file {where} of array '{key}' cannot be read ({why}): it was "
                          f"damaged; `pipeline cache verify {self.path}` names the damage and `pipeline cache repair "
                          f"{self.path}` (or rerunning the cache's `pipeline extract` command) redoes it")

    def row_shape(self, split: str, name: str, layers: list[int] | None = None) -> dict[str, tuple[tuple, str]]:
        """Per stored part ("" for plain arrays, q/scale/oidx/oval for int8) the per-video shape
        (layer axis cut to ``layers``) and numpy dtype that ``read_rows`` returns."""
        spec = self.specs(split)[name]
        out = {}
        for part, key in ({s: f"{split}/{name}/{s}" for s in QUANT_SUFFIXES} if spec.dtype == "int8"
                          else {"": f"{split}/{name}"}).items():
            arr = self._array(key)
            shape = list(arr.shape[1:])
            if layers is not None:
                shape[2] = len(layers)
            out[part] = (tuple(shape), str(arr.dtype))
        return out

    def _raw(self, key: str):
        from cache.rows import RawArray

        raw = self._arrays.get(("raw", key))
        if raw is None:
            split, sub = key.split("/", 1)
            check = (lambda shard, fd: self._check_shard(split, sub, shard, fd)) if split in self.splits else None
            raw = self._arrays[("raw", key)] = RawArray(self.path / key, check=check)
        return raw

    def _read_raw_rows(self, key: str, rows: np.ndarray, layers, out) -> np.ndarray:
        raw = self._raw(key)
        if raw.direct and (layers is None or raw.chunk_axis == 3 or raw.chunk_axis is None):
            shape = list(raw.shape[1:])
            if layers is not None:
                shape[2] = len(layers)
            if out is None:
                out = np.empty((len(rows), *shape), dtype=raw.dtype)
            if raw.chunk_axis is None and layers is not None:  # layers inside one chunk: read whole, then pick
                full = raw.read_into(rows, np.empty((len(rows), *raw.shape[1:]), dtype=raw.dtype))
                out[...] = full[:, :, :, list(layers)]
                return out
            return raw.read_into(rows, out, None if layers is None else list(layers))
        # another layout: zarr, a run of consecutive rows per call
        sel_layers = (slice(None), slice(None), list(layers)) if layers is not None else ()
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        parts = [self._get(key, (slice(int(r[0]), int(r[-1]) + 1), *sel_layers))
                 for r in np.split(srt, np.flatnonzero(np.diff(srt) != 1) + 1)] if len(rows) else []
        data = np.concatenate(parts)[np.argsort(order, kind="stable")] if parts else None
        if out is None:
            return data if data is not None else np.empty((0, *self._array(key).shape[1:]), self._array(key).dtype)
        if data is not None:
            out[...] = data
        return out

    def _get(self, key: str, sel: tuple) -> np.ndarray:
        arr = self._array(key)
        data_array = key.split("/", 1)[0] in self.splits and bool(arr.shape)
        try:
            data = arr.oindex[sel] if any(isinstance(x, list) for x in sel) else arr[sel]
            if data_array:  # zarr reads a missing shard file as the fill value: was it written?
                rows = np.arange(arr.shape[0])[sel[0]]
                split, sub = key.split("/", 1)
                for shard in np.unique(np.atleast_1d(rows) // self.shard_size).tolist():
                    self._check_shard_path(split, sub, int(shard))
            return data
        except (OSError, ValueError) as exc:  # zarr's "stored and computed checksum do not match": a damaged shard
            if not data_array:
                raise
            raise self._unreadable(key, np.arange(arr.shape[0])[sel[0]], exc) from None

    # ----------------------------------------------------------------- what a read may expect
    def written_shards(self, split: str) -> dict[int, dict[str, dict | bool | None]]:
        """Per shard of ``split`` holding done videos, per data key (name or name/part): what its
        file must be when read: its recorded {"size", "crc32"}, True (a cache without records: it
        must exist), or None (recorded as never written: every chunk equal to the fill value).
        Shards without done videos are absent (their files may be missing: fill values, never read
        as data since only done videos are). Taken once per split and kept (a reader's view of the
        cache it checked: a file deleted or rewritten afterwards is damage, named at its read)."""
        got = self._written.get(split)
        if got is None:
            st = self.status(split)
            got = {}
            for shard in range(self.num_shards(split)):
                a, b = self.shard_range(split, shard)
                if not (st[a:b] == DONE).any():
                    continue
                rec = self.record(split, shard) if self.has_checksums else None
                recorded = rec.get("arrays") if rec is not None and isinstance(rec.get("arrays"), dict) else {}
                got[shard] = {key: _expected_file(recorded.get(key)) for key in self._data_keys(split)}
            self._written[split] = got
        return got

    def _check_shard(self, split: str, key: str, shard: int, fd: int | None) -> None:
        """Raise cache/rows.ShardReadError when the file of shard ``shard`` of array ``split/key``,
        opened as ``fd`` (None: it does not exist), is not the one its shard was written with:
        missing, or of another size than recorded; with ``verify_reads``, its crc32 too (once per
        version of the file: size, mtime, ctime and inode; any write to it changes its ctime)."""
        want = self.written_shards(split).get(shard, {}).get(key)
        if want is None:
            return
        from cache.rows import ShardReadError

        if fd is None:
            raise ShardReadError(self._shard_file(split, key, shard),
                                 "missing: deleted after its shard was committed as written")
        if not isinstance(want, dict):
            return
        st = os.fstat(fd)
        if st.st_size != want["size"]:
            raise ShardReadError(self._shard_file(split, key, shard),
                                 f"truncated ({st.st_size} of {want['size']} bytes)" if st.st_size < want["size"]
                                 else f"size changed ({st.st_size} bytes, recorded {want['size']})")
        if self.verify_reads:
            version = _file_version(st)
            if self._verified.get((split, key, shard)) != version:
                crc, off = 0, 0
                while off < st.st_size:
                    block = os.pread(fd, min(8 << 20, st.st_size - off), off)
                    if not block:
                        break
                    crc, off = zlib.crc32(block, crc), off + len(block)
                if f"{crc:08x}" != want["crc32"] or off != want["size"]:
                    raise ShardReadError(self._shard_file(split, key, shard), "corrupt: its crc32 does not match the "
                                         "shard's record (rewritten since it was written)")
                self._verified[(split, key, shard)] = version

    def _check_shard_path(self, split: str, key: str, shard: int) -> None:
        """``_check_shard`` of a file read by zarr (which reads a missing file as fill values)."""
        if self.written_shards(split).get(shard, {}).get(key) is None:
            return
        try:
            fd = os.open(self._shard_file(split, key, shard), os.O_RDONLY)
        except FileNotFoundError:
            self._check_shard(split, key, shard, None)
            return
        try:
            self._check_shard(split, key, shard, fd)
        finally:
            os.close(fd)

    def _group_arrays(self, group: str) -> list[str]:
        # the folders holding a zarr.json: what was written, even when a metadata file is damaged
        folder = self.path / group
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "zarr.json").exists())

    def _small_array(self, key: str) -> np.ndarray:
        try:
            return np.asarray(self.root[key][:], dtype=np.float32)
        except Exception as exc:  # damaged chunk or metadata: zarr raises several types
            raise CacheError(f"{self.path / key} is unreadable ({exc.__class__.__name__}): "
                             f"repair the cache with `pipeline cache repair {self.path}`") from None

    def text_names(self) -> list[str]:
        return self._group_arrays("text")

    def text(self, name: str) -> np.ndarray:
        if name not in self.text_names():
            raise CacheMismatchError(
                f"cache {self.path} has no text embeddings '{name}' (has: {', '.join(self.text_names()) or 'none'})")
        return self._small_array(f"text/{name}")

    def aux_names(self) -> list[str]:
        return self._group_arrays("aux")

    def aux(self, name: str) -> np.ndarray:
        return self._small_array(f"aux/{name}")

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

    # ----------------------------------------------------------------- integrity
    @property
    def has_checksums(self) -> bool:
        """Made by a version that writes checksums and shard records (older caches: data checks only)."""
        return bool(self._layout.integrity)

    def static_problems(self) -> list[Problem]:
        """The files the store was built with (metadata, labels, manifest, text, aux) against
        checksums.json: one Problem per missing, truncated or changed file."""
        if not self.has_checksums:
            return []
        sums = _read_json(self.path / CHECKSUMS)
        if not isinstance(sums, dict) or not isinstance(sums.get("files"), dict):
            return [Problem(f"{CHECKSUMS}: missing or unreadable (the store's own files cannot be checked)",
                            file=CHECKSUMS)]
        out = []
        for rel, want in sorted(sums["files"].items()):
            bad = _damage(rel, want, file_checksum(self.path / rel))
            if bad:
                parts = rel.split("/")
                split = parts[0] if parts[0] in self._layout.splits else None
                inner = parts[1:parts.index("c")] if "c" in parts else parts[1:-1]
                out.append(Problem(bad, split=split, array="/".join(inner) if split and inner else None, file=rel))
        return out

    def shard_problems(self, split: str, shard: int, arrays: list[str] | None = None) -> list[Problem]:
        """One shard: status chunk readable and equal to the status its record commits, the
        record readable, the failures file and every array file (or those of ``arrays``) equal
        to their checksums. A shard with no status chunk and no record is pending: no problem."""
        a, b = self.shard_range(split, shard)
        where = f"{split} shard {shard} (videos {a}-{b - 1})"
        status_rel = str(self._status_file(split, shard).relative_to(self.path))
        rec_path = self._record_file(split, shard)
        rec = self.record(split, shard)
        status_file = self._status_file(split, shard)
        raw = self._status_chunk(split, shard)

        def problem(text: str, array: str | None = None, file: str | None = None) -> Problem:
            return Problem(f"{where}: {text}", split=split, array=array, shard=shard, file=file)

        if status_file.exists() and raw is None:
            size = status_file.stat().st_size
            return [problem(f"status chunk {status_rel} truncated or damaged ({size} of "
                            f"{self._status_chunk_len(split)} bytes)", "status", status_rel)]
        if raw is not None and not np.isin(raw, (PENDING, DONE, FAILED)).all():
            return [problem(f"status chunk {status_rel} corrupt (values other than pending/done/failed)",
                            "status", status_rel)]
        committed = raw is not None and (raw != PENDING).any()
        if not self.has_checksums:
            return []
        rec_rel = str(rec_path.relative_to(self.path))
        if rec is None:
            if rec_path.exists():
                return [problem(f"record {rec_rel} unreadable (truncated or damaged)", "records", rec_rel)]
            if committed:
                return [problem(f"committed but its record {rec_rel} is missing", "records", rec_rel)]
            return []
        if raw is None:
            return [problem(f"status chunk {status_rel} missing (the shard was written but is not committed)",
                            "status", status_rel)]
        if [int(x) for x in raw] != list(rec.get("status", [])):
            return [problem(f"status chunk {status_rel} does not match the shard's record (corrupt)",
                            "status", status_rel)]
        out = []
        fail_rel = str(self._failures_file(split, shard).relative_to(self.path))
        bad = _damage(fail_rel, rec.get("failures"), file_checksum(self._failures_file(split, shard)))
        if bad:
            out.append(problem(bad, "failures", fail_rel))
        recorded = rec.get("arrays", {})
        if (raw == DONE).any():
            for key in self._data_keys(split):
                if arrays is not None and key.split("/")[0] not in arrays:
                    continue
                if key not in recorded:
                    out.append(problem(f"record has no checksum of {key}", key, rec_rel))
                    continue
                rel = recorded[key]["file"]
                before = _path_version(self.path / rel)
                bad = _damage(rel, recorded[key]["checksum"], file_checksum(self.path / rel))
                if bad:
                    out.append(problem(bad, key, rel))
                elif before is not None and before == _path_version(self.path / rel):
                    self._verified[(split, key, shard)] = before  # verify_reads: sound as of this version
        return out

    def _labels_problems(self, split: str) -> list[Problem]:
        try:
            want = np.asarray([lab for _, lab in self.items(split)], dtype=np.int64)
        except (CacheError, KeyError, ValueError, TypeError):
            return [Problem("manifest.json: missing or damaged", file="manifest.json")]
        try:
            got = self.labels(split)
        except CacheError as exc:
            return [Problem(str(exc), split=split, array="label")]
        if got.shape != want.shape or (got != want).any():
            n = int((got != want).sum()) if got.shape == want.shape else len(want)
            return [Problem(f"{split}/label: {n} label(s) differ from manifest.json", split=split, array="label")]
        return []

    def verify(self, finite: bool = True) -> list[Problem]:
        """Every check, one Problem (a str: one line) per damaged thing, never an exception:
        the files the store was built with against their checksums, labels against
        manifest.json, each shard's status chunk, record, failures file and array files against
        its record (a missing, truncated or corrupt file is named), failed videos have reasons;
        ``finite``: also read the done rows and check that they hold no NaN/inf (the only data
        check a cache made before checksums can get)."""
        problems: list[Problem] = self.static_problems()
        for split in self.splits:
            if not any(p.file == "manifest.json" or (p.split == split and p.array == "label") for p in problems):
                problems += self._labels_problems(split)
            sound = []
            for shard in range(self.num_shards(split)):
                got = self.shard_problems(split, shard)
                problems += got
                if not got:
                    sound.append(shard)
            st = self.status(split)
            failed_idx = {f["index"] for f in self.failures(split)}
            for i in np.flatnonzero(st == FAILED):
                if int(i) not in failed_idx and int(i) // self.shard_size in sound:
                    problems.append(Problem(f"{split}[{i}]: failed without a recorded reason", split=split,
                                            array="failures", shard=int(i) // self.shard_size))
            if finite or not self.has_checksums:
                damaged = {p.array.split("/")[0] for p in problems if p.split == split and p.array}
                problems += self._finite_problems(split, st, sound, skip=damaged)
        return problems

    def _finite_problems(self, split: str, st: np.ndarray, shards: list[int], skip=()) -> list[Problem]:
        out: list[Problem] = []
        done = np.flatnonzero(st == DONE)
        for name, spec in self.specs(split).items():
            if name in skip:  # already named (e.g. its metadata file is damaged)
                continue
            for shard in shards:
                start, stop = self.shard_range(split, shard)
                rows = done[(done >= start) & (done < stop)]
                if rows.size == 0:
                    continue
                expect = self.written_shards(split).get(shard, {})
                if any(expect.get(k) is not None and not self._shard_file(split, k, shard).exists()
                       for k in self._data_keys(split) if k.split("/")[0] == name):
                    out.append(Problem(f"{split}/{name} shard {shard}: marked done but no data written",
                                       split=split, array=name, shard=shard))
                    continue
                if spec.dtype == "uint8":  # 0 is a valid pixel: that the shard was written is all to check
                    continue
                try:
                    data = self.read_rows(split, name, rows)  # the shard files' bytes: zarr took ~0.5 ms a video
                    data = dequantize_int8(data) if isinstance(data, dict) else data
                except Exception as exc:  # a damaged shard file: zarr raises several types
                    out.append(Problem(f"{split}/{name} shard {shard}: unreadable ({exc.__class__.__name__})",
                                       split=split, array=name, shard=shard))
                    continue
                bad = ~np.isfinite(data.reshape(len(rows), -1)).all(axis=1)
                for i in rows[bad]:
                    out.append(Problem(f"{split}/{name}[{i}]: marked done but holds NaN/inf (missing or corrupt data)",
                                       split=split, array=name, shard=shard))
        return out

    def require_sound(self, reads: dict[str, list[str]], allow_partial: bool = False, log=None) -> dict[str, int]:
        """Refuse (one CacheError line) to let a reader use rows that are not done and sound.

        ``reads``: split -> the per-video arrays it reads. Pending videos in those splits are
        refused unless ``allow_partial`` (then said through ``log``); the built-with files and,
        for every shard with done videos, its status, record and the files of those arrays are
        checked against their checksums (once, here: the reader's epochs pay nothing). Returns
        the pending count per split.
        """
        pending = {}
        for split, names in reads.items():
            st = self.status(split)
            pending[split] = int((st == PENDING).sum())
        if any(pending.values()):
            what = ", ".join(f"{n} of {self.num_videos(s)} in '{s}'" for s, n in pending.items() if n)
            if not allow_partial:
                raise CacheError(f"cache {self.path} is unfinished ({what} pending): finish it with "
                                 f"`pipeline cache repair {self.path}` (or rerun its extract command), "
                                 "or pass --allow-partial to use its done videos only")
            if log is not None:
                log(f"WARNING: cache {self.path} is unfinished ({what} pending); --allow-partial: using its done "
                    "videos only, results are not comparable with a run on the whole cache")
        problems = self.static_problems()
        for split, names in reads.items():
            if not self.has_checksums:
                break
            st = self.status(split)
            for shard in range(self.num_shards(split)):
                a, b = self.shard_range(split, shard)
                if (st[a:b] != PENDING).any() or self._record_file(split, shard).exists():
                    problems += self.shard_problems(split, shard, arrays=list(names))
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CacheError(f"cache {self.path} fails verification: {problems[0]}{more}; repair it with "
                             f"`pipeline cache repair {self.path}`")
        return pending

    def _shard_written(self, split: str, name: str, shard: int) -> bool:
        return self._shard_file(split, name, shard).exists()


def _static_checksums(folder: Path) -> dict[str, dict]:
    """crc32 + size of every file of a freshly built store (what later writes never touch)."""
    out = {}
    for f in sorted(Path(folder).rglob("*")):
        rel = str(f.relative_to(folder))
        if f.is_file() and rel != CHECKSUMS and not f.name.startswith(".") and not f.name.endswith(".partial"):
            out[rel] = file_checksum(f)
    return out


def _write_checksums(folder: Path, files: dict[str, dict]) -> None:
    atomic_write_text(Path(folder) / CHECKSUMS, json.dumps({"version": INTEGRITY_VERSION, "algorithm": "crc32",
                                                            "files": files}, indent=0))


def repair_static(path: str | Path, splits: dict[str, dict], shard_size: int, meta: dict | Record,
                  init: Callable[[Path], None] | None = None) -> list[str]:
    """Rebuild the files a store was built with (array metadata, labels, manifest, text and aux
    arrays) into a temporary sibling from the same request, and put back every one that is
    missing or differs from its checksum; returns their paths. The root zarr.json (the store's
    metadata and key) is never rewritten: damaged, it cannot be repaired in place."""
    meta = meta.to_dict() if isinstance(meta, Record) else meta
    path = Path(path)
    store = FeatureStore(path)
    sums = _read_json(path / CHECKSUMS)
    recorded = sums.get("files") if isinstance(sums, dict) and isinstance(sums.get("files"), dict) else None
    if recorded is not None and _damage("zarr.json", recorded.get("zarr.json"), file_checksum(path / "zarr.json")):
        raise CacheError(f"cache metadata {path / 'zarr.json'} is damaged: it cannot be repaired in place; "
                         f"remove {path} and extract again")
    fixed: list[str] = []
    with _creation_lock(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.repair-"))
        try:
            _build(tmp, meta, splits, shard_size)
            if init is not None:
                init(tmp)
            fresh = _static_checksums(tmp)
            files = dict(recorded or {})
            files["zarr.json"] = (recorded or {}).get("zarr.json") or file_checksum(path / "zarr.json")
            for rel, sum_ in fresh.items():
                if rel == "zarr.json":
                    continue
                want = (recorded or {}).get(rel, sum_)
                if _damage(rel, want, file_checksum(path / rel)):
                    dest = path / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(tmp / rel, dest.with_name(f".{dest.name}.repair"))
                    os.replace(dest.with_name(f".{dest.name}.repair"), dest)
                    fixed.append(rel)
                    files[rel] = sum_
                elif rel not in files:
                    files[rel] = sum_
            if fixed or recorded is None:
                _write_checksums(path, files)
                if recorded is None:
                    fixed.append(CHECKSUMS)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    store._arrays.clear()
    return fixed


# --------------------------------------------------------------------------- creation
@contextlib.contextmanager
def _creation_lock(path: Path) -> Iterator[None]:
    """Exclude the other creators of the store at ``path`` (ranks of one extraction) while it is made.

    The lock file sits beside ``path`` only while someone holds or waits for it: the holder removes
    it before letting go. A waiter that then gets the lock on the removed file sees that the name
    no longer leads to its file and takes the lock again on the name's current file, so two
    creators never both hold it."""
    lock_path = path.parent / f".{path.name}.lock"
    while True:
        fh = open(lock_path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                now = os.stat(lock_path)
            except FileNotFoundError:
                now = None
            mine = os.fstat(fh.fileno())
            if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                continue  # the holder before us removed this file: lock the name's current one
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)  # before unlocking: a waiter on this file then retries
            return
        finally:
            fh.close()  # releases the lock


def create_store(path: str | Path, meta: dict | Record, splits: dict[str, dict], shard_size: int,
                 init: Callable[[Path], None] | None = None) -> FeatureStore:
    """Create (or open, when an identical one exists) a preallocated store atomically.

    ``splits[name] = {"items": [(path, label), ...], "arrays": [ArraySpec, ...]}``. The store is
    built in a temporary sibling folder and renamed into place, so a crash never leaves a
    half-made store; concurrent creators (``--shard i/n``) serialise on a lock file, and the
    later one opens what the first made after checking that the keys agree. ``init(folder)``
    writes anything else that belongs to a new store (text embeddings, aux tensors) before the
    rename, so it is there exactly when the store is. ``meta``: a CacheMeta (or its dict).
    """
    meta = meta.to_dict() if isinstance(meta, Record) else meta
    want = StoreMeta.from_dict(meta).key
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
            if store.key != want:
                raise CacheMismatchError(
                    f"{path} already holds a different cache (key {store.key}, asked {want}); "
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
            _write_checksums(tmp, _static_checksums(tmp))
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return FeatureStore(path)


def _build(folder: Path, meta: dict, splits: dict[str, dict], shard_size: int) -> None:
    root = zarr.open_group(str(folder), mode="w")
    meta = dict(meta)
    meta.update(format_version=FORMAT_VERSION, shard_size=shard_size, splits={}, integrity=INTEGRITY_VERSION)
    manifest: dict[str, Any] = {"splits": {}}
    for split, info in splits.items():
        items = [(str(p), int(label)) for p, label in info["items"]]
        n = len(items)
        S = max(1, min(shard_size, n))
        manifest["splits"][split] = items
        if info.get("num_frames") and any(x is not None for x in info["num_frames"]):
            manifest.setdefault("num_frames", {})[split] = list(info["num_frames"])  # frame folders
        root.create_array(f"{split}/label", data=np.asarray([lab for _, lab in items], dtype=np.int32))
        root.create_array(f"{split}/status", shape=(n,), chunks=(S,), dtype="int8", fill_value=PENDING,
                          compressors=None)
        specs: list[ArraySpec] = info["arrays"]
        for spec in specs:
            if spec.dtype == "int8":
                outl = StoreMeta.from_dict(meta).int8_outliers
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


def list_stores(root: str | Path, damaged: list[tuple[Path, str]] | None = None) -> list[FeatureStore]:
    """The caches directly under ``root``. A folder that holds a cache's files but does not open
    (its root metadata zarr.json missing or damaged) is not a cache to read: with ``damaged`` given,
    it is appended there as (folder, why), so a listing can show it rather than drop it."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        if (child / "zarr.json").exists():
            try:
                out.append(FeatureStore(child))
            except CacheError as exc:
                if damaged is not None:
                    damaged.append((child, str(exc)))
        elif damaged is not None and any((child / name).exists() for name in ("manifest.json", CHECKSUMS)):
            damaged.append((child, f"its root metadata {child / 'zarr.json'} is missing; remove {child} and "
                                   "extract again"))
    return out
