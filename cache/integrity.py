"""A cache's integrity: checksums of its files, what a read may expect of each shard, `verify`
and the repair of the files a store was built with.

What is checked (cache/store.py writes it): ``checksums.json`` holds the crc32 + size of every
file the store was built with (metadata, labels, manifest, text and aux arrays); each shard's
commit record (``<split>/records/shard-NNNNNN.json``) holds the crc32 + size of every array's shard
file, the status it commits and its failures file's crc32. ``verify`` names each missing,
truncated or changed file in one line (a ``Problem``); reads refuse a shard file of a done shard
that is missing or of another size than recorded (``written_shards``, ``_check_shard``), and with
``verify_reads`` check its crc32 as well.

Checksums are zlib's crc32 plus the byte size, of whole files: the stdlib's fastest hash here
(2.7 GB/s against sha256's 0.9 GB/s on this machine), no new dependency, and it is meant to
catch accidental damage (truncation, lost or flipped bytes, half copies), not tampering.

``StoreIntegrity`` is the checking half of cache/store.py's ``FeatureStore`` (its base class): its
methods work on the store's own layout (status chunks, records, shard files), so they read the
store's private helpers; nothing else subclasses it. The store stands on this module, never the
other way round: ``repair_static`` (cache/store.py) rebuilds through ``repair_built_files`` here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from cache.errors import CacheError
from cache.files import atomic_write_text, creation_lock, read_json
from cache.quant import dequantize_int8
from cache.source import DONE, FAILED, PENDING

__all__ = ["CHECKSUMS", "INTEGRITY_VERSION", "Problem", "StoreIntegrity", "file_checksum", "static_checksums",
           "write_checksums", "repair_built_files"]

CHECKSUMS = "checksums.json"
INTEGRITY_VERSION = 1             # StoreMeta.integrity: the store keeps checksums and shard records


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


class StoreIntegrity:
    """The checks of a FeatureStore (cache/store.py: its base class): what a read may expect of
    each shard file, ``verify``, ``require_sound``. The store sets ``_written`` and ``_verified``
    (empty dicts) and ``verify_reads`` in its ``__init__``."""

    _written: dict[str, dict[int, dict[str, dict | bool | None]]]
    _verified: dict[tuple[str, str, int], tuple]
    verify_reads: bool

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

    @property
    def has_checksums(self) -> bool:
        """Made by a version that writes checksums and shard records (older caches: data checks only)."""
        return bool(self._layout.integrity)

    def static_problems(self) -> list[Problem]:
        """The files the store was built with (metadata, labels, manifest, text, aux) against
        checksums.json: one Problem per missing, truncated or changed file."""
        if not self.has_checksums:
            return []
        sums = read_json(self.path / CHECKSUMS)
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


def static_checksums(folder: Path) -> dict[str, dict]:
    """crc32 + size of every file of a freshly built store (what later writes never touch)."""
    out = {}
    for f in sorted(Path(folder).rglob("*")):
        rel = str(f.relative_to(folder))
        if f.is_file() and rel != CHECKSUMS and not f.name.startswith(".") and not f.name.endswith(".partial"):
            out[rel] = file_checksum(f)
    return out


def write_checksums(folder: Path, files: dict[str, dict]) -> None:
    atomic_write_text(Path(folder) / CHECKSUMS, json.dumps({"version": INTEGRITY_VERSION, "algorithm": "crc32",
                                                            "files": files}, indent=0))


def repair_built_files(path: Path, build: Callable[[Path], None]) -> list[str]:
    """Rebuild the files a store was built with into a temporary sibling (``build(folder)``: the
    store's layout from the same request, cache/store.py ``repair_static``) and put back every one
    that is missing or differs from its checksum; returns their paths. The root zarr.json (the
    store's metadata and key) is never rewritten: damaged, it cannot be repaired in place."""
    path = Path(path)
    sums = read_json(path / CHECKSUMS)
    recorded = sums.get("files") if isinstance(sums, dict) and isinstance(sums.get("files"), dict) else None
    if recorded is not None and _damage("zarr.json", recorded.get("zarr.json"), file_checksum(path / "zarr.json")):
        raise CacheError(f"cache metadata {path / 'zarr.json'} is damaged: it cannot be repaired in place; "
                         f"remove {path} and extract again")
    fixed: list[str] = []
    with creation_lock(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.repair-"))
        try:
            build(tmp)
            fresh = static_checksums(tmp)
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
                write_checksums(path, files)
                if recorded is None:
                    fixed.append(CHECKSUMS)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return fixed

