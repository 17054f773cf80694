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
another size than its record says, when a read meets it is a CacheError naming it.

The checks (checksums, what a read may expect of a shard, `verify`, `require_sound`, the repair
of the built-with files) are cache/integrity.py's: ``FeatureStore`` inherits them from
``StoreIntegrity``. Where caches live (roots, the latest marker) is cache/paths.py's; atomic
writes, JSON reads and the creation lock are cache/files.py's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from cache.errors import CacheError, CacheMismatchError
from cache.files import atomic_write_text, creation_lock, read_json
from cache.integrity import (
    CHECKSUMS,
    INTEGRITY_VERSION,
    StoreIntegrity,
    file_checksum,
    repair_built_files,
    static_checksums,
    write_checksums,
)
from cache.meta import FORMAT_VERSION, Record, StoreMeta
from cache.quant import FP16_MAX, QUANT_SUFFIXES, dequantize_int8, finite_rows, quantize_int8
from cache.source import DONE, FAILED, PENDING, ArraySpec, CacheSource

__all__ = [
    "PENDING",
    "DONE",
    "FAILED",
    "FORMAT_VERSION",
    "FeatureStore",
    "create_store",
    "open_store",
    "list_stores",
    "repair_static",
    "FAULT_ENV",
]

META_KEY = "clipcache"
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


def _chunk(spec: ArraySpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-video chunk of an array of per-video ``shape`` (spec.shape or a quantised part)."""
    chunk = [1, *shape]
    if spec.layer_axis is not None and spec.layer_axis < len(shape):
        chunk[1 + spec.layer_axis] = 1
    return tuple(chunk)


class FeatureStore(StoreIntegrity, CacheSource):
    """A cache folder opened for reading and writing shards (``info``: its metadata, typed; its checks:
    cache/integrity.py ``StoreIntegrity``)."""

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
        # (split, key, shard) -> the version (cache/integrity.py) of its file whose bytes matched its record
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
            got = read_json(self.path / "manifest.json")
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
        return read_json(self._record_file(split, shard), dict)

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
                got = read_json(f)  # a damaged file is verify's to report; readers skip it
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
        of consecutive chunks, no float conversion: the stage-two loader's read (stages/data/loader.py).
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


def repair_static(path: str | Path, splits: dict[str, dict], shard_size: int, meta: dict | Record,
                  init: Callable[[Path], None] | None = None) -> list[str]:
    """Rebuild the files a store was built with (array metadata, labels, manifest, text and aux
    arrays) into a temporary sibling from the same request, and put back every one that is
    missing or differs from its checksum; returns their paths. The root zarr.json (the store's
    metadata and key) is never rewritten: damaged, it cannot be repaired in place. The building
    is the store's (``_build``, ``init``); the checking and putting back, cache/integrity.py's."""
    meta = meta.to_dict() if isinstance(meta, Record) else meta
    FeatureStore(Path(path))  # a folder that does not open as a store is refused here, one line

    def build(folder: Path) -> None:
        _build(folder, meta, splits, shard_size)
        if init is not None:
            init(folder)

    return repair_built_files(Path(path), build)


# --------------------------------------------------------------------------- creation
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
    with creation_lock(path):
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
            write_checksums(tmp, static_checksums(tmp))
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
