"""Rows of a stored array read straight from its shard files, in the stored dtype.

The store writes every per-video array as an uncompressed sharded Zarr v3 array (cache/store.py:
``compressors=None``, one shard file per group of videos, inner chunks of one video, or of one
video and one layer). Such a shard file is the inner chunks' raw little-endian bytes followed by
an index of (offset, nbytes) pairs per inner chunk and a crc32c. Going through zarr to read them
costs ~10x the bytes' own read time (a 2-core box: 0.4-0.9 GB/s against `cat`'s 8 GB/s for
patch tokens), so this module reads the bytes itself: the shard's index (parsed once per file
version), then one ``os.preadv`` per contiguous byte range of the file, scattered straight into
the caller's output (a shared-memory or pinned tensor's memory): one copy, page cache to output.

An array stored any other way (a codec this module does not know) is read through zarr instead:
``RawArray.direct`` says which. Chunks never written read as the array's fill value, as zarr's;
but a shard file is never taken for "never written" on its absence alone: ``check(shard, fd)``
(the store's, cache/integrity.py ``StoreIntegrity._check_shard``: its status and records say
which shards were written, their sizes and checksums) is asked at every open, and for a missing file, and raises
``ShardReadError`` for a shard that was written and is gone, or is not the file that was written.

A shard file that cannot be read as written (shorter than its index, an index whose crc32c does not
match, a chunk entry of the wrong size or past the end, a short read, an I/O error) raises
``ShardReadError``, an OSError that names the file; never a silent fill value or partial row.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["RawArray", "ShardReadError"]

_EMPTY = np.uint64(2 ** 64 - 1)
_IOV_MAX = 1024


class ShardReadError(OSError):
    """A shard file that does not read back as it was written: ``path`` (the file) and ``why``."""

    def __init__(self, path: str | Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = Path(path), why

    def __reduce__(self):  # raised in a loader worker, re-raised in the main process: pickled
        return ShardReadError, (self.path, self.why)


def _plain_sharding(meta: dict) -> bool:
    """True for the layout cache/store.py writes: one sharding codec, raw bytes inside, index at the end."""
    codecs = meta.get("codecs") or []
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return False
    cfg = codecs[0].get("configuration", {})
    inner = cfg.get("codecs", [])
    index = [c.get("name") for c in cfg.get("index_codecs", [])]
    endian_ok = all(c.get("configuration", {}).get("endian", "little") == "little" for c in inner)
    return ([c.get("name") for c in inner] == ["bytes"] and endian_ok and index == ["bytes", "crc32c"]
            and cfg.get("index_location", "end") == "end"
            and meta.get("chunk_key_encoding", {}).get("name") == "default"
            and meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") == "/")


class RawArray:
    """One sharded array of a store folder, for reading whole rows (videos) by file offsets."""

    def __init__(self, folder: str | Path, check=None):
        self.folder = Path(folder)
        self.check = check  # check(shard, fd or None): raises ShardReadError for a shard that is not as written
        meta = json.loads((self.folder / "zarr.json").read_text())
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"])
        fill = meta.get("fill_value", 0)
        self.fill = np.nan if fill == "NaN" else fill
        self.direct = _plain_sharding(meta) and self.dtype.byteorder in ("=", "<", "|")
        if self.direct:
            self.shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            self.inner = tuple(meta["codecs"][0]["configuration"]["chunk_shape"])
            self.grid = tuple(s // c for s, c in zip(self.shard, self.inner))
            split = [i for i, (s, c) in enumerate(zip(self.shard, self.inner)) if c != s]
            # rows are split into chunks along axis 0 (one row each) and at most one more axis (layers)
            self.direct = (self.inner[0] == 1 and all(s % c == 0 for s, c in zip(self.shard, self.inner))
                           and set(split) <= {0, max(split[1:], default=0)}
                           and all(self.inner[i] == 1 for i in split))
            self.chunk_axis = max(split[1:], default=None)
            self.chunk_bytes = math.prod(self.inner) * self.dtype.itemsize
        self._index: dict[int, tuple[tuple, np.ndarray]] = {}

    def _shard_file(self, shard: int) -> Path:
        return self.folder / "c" / "/".join([str(shard)] + ["0"] * (len(self.shape) - 1))

    def _shard_index(self, shard: int, fd: int) -> np.ndarray:
        """(chunks, 2) uint64 offsets and sizes of one shard file, cached per (size, mtime)."""
        st = os.fstat(fd)
        version = (st.st_size, st.st_mtime_ns, st.st_ino)
        got = self._index.get(shard)
        if got is not None and got[0] == version:
            return got[1]
        n = math.prod(self.grid)
        nbytes = 16 * n + 4
        raw = os.pread(fd, nbytes, st.st_size - nbytes) if st.st_size >= nbytes else b""
        if len(raw) != nbytes:
            raise ShardReadError(self._shard_file(shard), f"{st.st_size} bytes, shorter than its index")
        import google_crc32c  # zarr's own crc32c (a dependency of zarr 3)

        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            # a truncated or overwritten file: what sits where the index should be is not one
            raise ShardReadError(self._shard_file(shard), "truncated or overwritten: its chunk index fails its "
                                                          "crc32c check")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n, 2)
        used = index[~((index[:, 0] == _EMPTY) & (index[:, 1] == _EMPTY))]
        if used.size and int((used[:, 0] + used[:, 1]).max()) > st.st_size - nbytes:
            raise ShardReadError(self._shard_file(shard), "a chunk lies past the end of the file (truncated)")
        self._index[shard] = (version, index)
        return index

    def read_into(self, rows: np.ndarray, out: np.ndarray, picks: list[int] | None = None) -> np.ndarray:
        """Fill ``out`` (len(rows), *row shape with the chunked axis cut to ``picks``) with those rows.

        ``picks``: positions on the chunked axis (the layer axis) to read; None: all. File ranges
        are read in file order (sequential for sorted rows), each into its own output rows.
        """
        assert self.direct and out.dtype == self.dtype and out.flags.c_contiguous
        rows = np.asarray(rows, dtype=np.int64)
        ax = self.chunk_axis
        picks = list(range(self.shape[ax])) if ax is not None and picks is None else picks
        S = self.shard[0]
        strides = np.cumprod((1, *self.grid[::-1]))[::-1][1:]  # C-order position of a chunk in the grid
        jobs: dict[int, list] = {}  # shard -> [(offset, nbytes, out row, pick position, chunk number)]
        for i, r in enumerate(rows.tolist()):
            shard, local = divmod(r, S)
            if ax is None:
                jobs.setdefault(shard, []).append((local * strides[0], i, None))
            else:
                for j, p in enumerate(picks):
                    jobs.setdefault(shard, []).append((local * strides[0] + p * strides[ax], i, j))
        for shard, items in jobs.items():
            self._read_shard(shard, items, out)
        return out

    def _dest(self, out: np.ndarray, i: int, j: int | None) -> list[memoryview]:
        """Memory of one chunk in ``out``: row i (and position j of the chunked axis)."""
        if j is None:
            return [memoryview(out[i]).cast("B")]
        lead = out.shape[1:self.chunk_axis]  # axes before the chunked one: one block each
        block = out[i].reshape(*(lead or (1,)), out.shape[self.chunk_axis], -1)
        if not lead:
            return [memoryview(block[0, j]).cast("B")]
        flat = block.reshape(-1, out.shape[self.chunk_axis], block.shape[-1])
        return [memoryview(flat[k, j]).cast("B") for k in range(flat.shape[0])]

    def _read_shard(self, shard: int, items: list, out: np.ndarray) -> None:
        try:
            self._read_shard_file(shard, items, out)
        except ShardReadError:
            raise
        except OSError as exc:  # an I/O error of the disk or file system: named with its file
            raise ShardReadError(self._shard_file(shard), exc.strerror or str(exc)) from exc

    def _read_shard_file(self, shard: int, items: list, out: np.ndarray) -> None:
        try:
            fd = os.open(self._shard_file(shard), os.O_RDONLY)
        except FileNotFoundError:
            if self.check is not None:
                self.check(shard, None)  # a shard that was written must be there: raises
            for _, i, j in items:
                for mv in self._dest(out, i, j):
                    np.frombuffer(mv, dtype=self.dtype)[:] = self.fill
            return
        try:
            if self.check is not None:
                self.check(shard, fd)
            index = self._shard_index(shard, fd)
            ranges = []
            for chunk, i, j in items:
                off, size = index[chunk]
                if off == _EMPTY and size == _EMPTY:  # never written: the fill value
                    for mv in self._dest(out, i, j):
                        np.frombuffer(mv, dtype=self.dtype)[:] = self.fill
                    continue
                if int(size) != self.chunk_bytes:
                    raise ShardReadError(self._shard_file(shard), f"chunk {chunk} holds {int(size)} bytes, "
                                                                  f"expected {self.chunk_bytes}")
                ranges.append((int(off), i, j))
            ranges.sort()
            k = 0
            while k < len(ranges):  # coalesce chunks that follow each other in the file: one preadv
                start = ranges[k][0]
                bufs = self._dest(out, ranges[k][1], ranges[k][2])
                end = start + self.chunk_bytes
                k += 1
                while (k < len(ranges) and ranges[k][0] == end and len(bufs) < _IOV_MAX - 64
                       and end - start < 1 << 30):  # preadv moves at most ~2 GB a call
                    bufs += self._dest(out, ranges[k][1], ranges[k][2])
                    end += self.chunk_bytes
                    k += 1
                got = os.preadv(fd, bufs, start)
                if got != end - start:
                    raise ShardReadError(self._shard_file(shard), f"short read ({got} of {end - start} bytes)")
        finally:
            os.close(fd)
