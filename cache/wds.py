"""WebDataset export of a feature cache, and the numpy side of reading it back (no torch).

An export of cache NAME into folder DIR::

    DIR/NAME-header.json            written last (the export's commit mark): cache metadata
                                    (dims, layers, views, dtype, config, key), per split its shard
                                    files with their sample counts, byte sizes, index ranges and
                                    member checksums, the byte size of each .npy member, counts
                                    and failures; the size and checksum of each extra-tar member
    DIR/NAME-extra.tar              small arrays as .npy: text/<set>.npy (class text embeddings),
                                    aux/<name>.npy (frozen backbone tensors), split/<s>/label.npy
                                    and split/<s>/status.npy (every video of the source list)
    DIR/NAME-<split>-000000.tar     one series of shards per split, ~--shard-bytes each

One sample per done video (failed and pending ones are absent), in list order, key
``<split>_<index>`` (no dots: webdataset splits a member name at the first dot). Members::

    <key>.json                      {"split", "index", "label", "path"}
    <key>.frame_emb.npy             (V, T, E) fp16, exactly as stored
    <key>.cls.npy                   (V, T, L, D) fp16, or for an int8 cache the quantised parts
    <key>.cls.q.npy, .cls.scale.npy, .cls.oidx.npy, .cls.oval.npy   (cache/quant.py)
    <key>.patch.npy                 (V, T, L, P, D), same rule as cls
    <key>.frames.npy                (V, T, H, W, 3) uint8

Every .npy is written with ``allow_pickle=False`` and read back with ``allow_pickle=False``;
nothing is ever unpickled. Each tar is written to a temporary name and renamed into place, so a
killed export leaves whole shards or none, and the header appears only when every shard is there.
Shard s holds the done videos with index in [first, last] of its header entry, which is what lets
a reader given a subset of the shards know exactly which videos it will see.

Integrity (format version 2): tar checks its member headers, not their data, so the header keeps
a crc32c of every member (``crc32c`` of a shard entry: 8 hex digits per member, in tar order) and
the byte size every .npy member of a split has (``member_bytes``; ``json_max_bytes`` bounds the
.json one). A reader compares a member's size in its tar header with these before reading it
(a crafted or damaged size is refused unread) and its crc32c after, and names the shard and the
member when either disagrees. A version 1 export (no checksums) is still read, with a note that
it is unchecked; its member sizes are bounded by the array specs.

An export only ever overwrites or deletes files that an export header of the same cache (or the
claim file ``.NAME-export.json`` of an export of it that was interrupted) lists: a folder holding
other files named like this export's shards is refused, untouched.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import google_crc32c
import numpy as np

from cache.errors import CacheError, CacheMismatchError, ConfigError
from cache.files import atomic_write_text
from cache.meta import StoreMeta
from cache.quant import QUANT_SUFFIXES, dequantize_int8
from cache.source import DONE, FAILED, ArraySpec, CacheSource
from cache.store import FeatureStore

__all__ = [
    "WDS_FORMAT",
    "export_wds",
    "parse_bytes",
    "WdsCache",
    "open_url",
    "expand_shards",
    "member_names",
    "iter_tar_samples",
    "load_npy",
    "sample_info",
    "sample_array",
    "header_for",
    "ShardCheck",
]

WDS_FORMAT = "clipcache-wds"
WDS_VERSION = 2  # 2: member checksums and sizes in the header (1: none)
_CLAIM_FORMAT = "clipcache-wds-claim"
_JSON_MAX_V1 = 1 << 20  # a version 1 header does not bound the .json member: a sample's json is < 1 MiB
_NPY_HEADER_MAX = 65536 + 12  # magic, version, length and the longest header .npy format 2 allows of these
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads a closed archive to a multiple of this
_MTIME = 1_700_000_000  # fixed member mtime: the same cache exports to the same bytes


# ----------------------------------------------------------------------------- small helpers
def parse_bytes(text: str | int) -> int:
    """'1GB' -> 10**9, '512MiB' -> 512 * 2**20, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(text).lower())
    if not m or (m.group(3) and not m.group(2)):
        raise ConfigError(f"bad size '{text}': use e.g. 1GB, 500MB, 64MiB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    value = float(m.group(1)) * base ** " kmgt".index(m.group(2) or " ")
    if value < 1:
        raise ConfigError(f"size '{text}' must be at least one byte")
    return int(value)


def npy_bytes(arr: np.ndarray) -> bytes:
    """One array as the bytes of a .npy file (no pickles): a shard member."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """One .npy member as a read-only view of its bytes (no copy; index it, then convert only
    what is used). Object arrays, which would need unpickling, are refused."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read_header(buf)
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded when allow_pickle=False")
    count = int(np.prod(shape, dtype=np.int64))
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def member_names(spec_name: str, dtype: str) -> list[str]:
    """Member extensions (after '<key>.') that hold one array of the cache."""
    if dtype == "int8":
        return [f"{spec_name}.{s}.npy" for s in QUANT_SUFFIXES]
    return [f"{spec_name}.npy"]


def member_crc(data: bytes) -> int:
    """A member's checksum: crc32c, by zarr's own google_crc32c (a dependency of zarr 3; cache/rows.py
    uses it too): 5-16 GB/s against zlib crc32's 0.7-1.7 here (bench/bench_wds_item.py), which
    matters because every member read is checked, every epoch."""
    return google_crc32c.value(data)


def _tar_member_size(n: int) -> int:
    return _BLOCK + math.ceil(n / _BLOCK) * _BLOCK  # ustar header + data padded to blocks


def _closed_size(offset: int) -> int:
    return math.ceil((offset + 2 * _BLOCK) / _RECORD) * _RECORD  # end-of-archive blocks + record padding


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardSeries:
    """Writes NAME-<split>-%06d.tar files of at most ``limit`` bytes, each atomically, keeping the
    crc32c of every member and the size of every .npy member kind. ``claim(file)`` is called
    before a shard file is first created (the export records it as its own)."""

    def __init__(self, out: Path, prefix: str, limit: int, claim: Callable[[str], Any] = lambda f: None):
        self.out, self.prefix, self.limit, self.claim = out, prefix, limit, claim
        self.shards: list[dict] = []
        self.tar: tarfile.TarFile | None = None
        self.tmp: Path | None = None
        self.offset = 0
        self.entry: dict = {}
        self.crcs: list[int] = []
        self.member_bytes: dict[str, int] = {}
        self.json_max = 0
        self.oversized = 0

    def add(self, index: int, members: list[tuple[str, bytes]]) -> None:
        need = sum(_tar_member_size(len(d)) for _, d in members)
        if self.tar is not None and self.entry["samples"] and _closed_size(self.offset + need) > self.limit:
            self.close()
        if self.tar is None:
            self._open()
        for name, data in members:
            _add(self.tar, name, data)
            self.crcs.append(member_crc(data))
            ext = name.split(".", 1)[1]
            if ext == "json":
                self.json_max = max(self.json_max, len(data))
            else:  # every video's array has the spec's shape and dtype: one size per member kind
                assert self.member_bytes.setdefault(ext, len(data)) == len(data), (name, len(data))
        self.offset += need
        if self.entry["samples"] == 0 and _closed_size(self.offset) > self.limit:
            self.oversized += 1  # one video larger than the limit: it gets a shard of its own
        self.entry["samples"] += 1
        self.entry["first"] = index if self.entry["first"] is None else self.entry["first"]
        self.entry["last"] = index

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.claim(name)
        self.tmp = self.out / f".{name}.tmp-{os.getpid()}"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.offset = 0
        self.entry = {"file": name, "samples": 0, "first": None, "last": None}
        self.crcs = []

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        final = self.out / self.entry["file"]
        os.replace(self.tmp, final)
        self.entry["bytes"] = final.stat().st_size
        self.entry["crc32c"] = "".join(f"{c:08x}" for c in self.crcs)  # one per member, in tar order
        self.shards.append(self.entry)
        self.tar, self.tmp = None, None

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tmp.unlink(missing_ok=True)
            self.tar = None


# ----------------------------------------------------------------------------- export
def export_wds(store: FeatureStore, out: str | Path, name: str | None = None, shard_bytes: int | str = "1GB",
               splits: list[str] | None = None, partial: bool = False, log: Callable[[str], Any] | None = None) -> dict:
    """Write the cache's done videos as WebDataset shards; returns the header (plus timing)."""
    t0 = time.perf_counter()
    limit = parse_bytes(shard_bytes)
    name = name or store.path.name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--name must be a plain file-name prefix, got '{name}'")
    splits = list(splits or store.splits)
    for split in splits:
        if split not in store.splits:
            raise CacheMismatchError(f"cache {store.path} has no split '{split}' (has {', '.join(store.splits)})")
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise ConfigError(f"split name '{split}' cannot be part of a sample key (letters, digits, _ only)")
        pending = store.counts(split)["pending"]
        if pending and not partial:
            raise CacheError(f"cache {store.path} is not complete ({pending} pending video(s) in '{split}'): "
                             "finish the extraction (`pipeline cache finalize` names what is missing), "
                             "or pass --partial to export only the done videos")
    store.require_sound({s: list(store.specs(s)) for s in splits}, allow_partial=partial)  # checksums, once
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create export folder {out}: {exc.strerror}") from None
    header_path = out / f"{name}-header.json"
    claim_path = out / f".{name}-export.json"
    # the files this export may overwrite or delete: those an export of this cache wrote (its
    # header lists them, or the claim file of one that was interrupted); a damaged header, or one
    # of another cache, is refused before anything is touched
    claimed = _listed_files(header_path, name, store.key) | _listed_files(claim_path, name, store.key)
    ours = re.compile(rf"{re.escape(name)}-(?:{'|'.join(map(re.escape, splits))})-\d{{6}}\.tar"
                      rf"|{re.escape(name)}-extra\.tar")
    strangers = sorted(f.name for f in out.iterdir() if ours.fullmatch(f.name) and f.name not in claimed)
    if strangers:
        more = f" (and {len(strangers) - 1} more)" if len(strangers) > 1 else ""
        raise CacheError(f"{out / strangers[0]}{more} is named like a file of this export but no export header of "
                         f"this cache lists it; nothing was changed: choose another --out (or --name), or remove "
                         "the file(s) if they are not needed")

    def claim(file: str) -> None:
        """Record ``file`` as this export's before it is created: an interrupted export can be redone."""
        claimed.add(file)
        atomic_write_text(claim_path, json.dumps({"format": _CLAIM_FORMAT, "key": store.key, "name": name,
                                                  "files": sorted(claimed)}))

    claim(f"{name}-extra.tar")
    # the shards are about to be replaced one by one: without its header the old export is no
    # export, so a re-export killed half-way cannot leave a header describing other shards (the
    # claim file written above keeps its files this export's own)
    header_path.unlink(missing_ok=True)
    for stale in out.glob(f".{name}-*.tmp-*"):
        stale.unlink(missing_ok=True)

    header: dict[str, Any] = {
        "format": WDS_FORMAT, "version": WDS_VERSION, "name": name, "key": store.key, "source": str(store.path),
        "shard_bytes": limit, "extra": f"{name}-extra.tar", "checksum": "crc32c", "meta": store.meta, "splits": {},
    }
    extra: list[tuple[str, bytes]] = []
    for tname in store.text_names():
        extra.append((f"text/{tname}.npy", npy_bytes(store.text(tname))))
    for aname in store.aux_names():
        extra.append((f"aux/{aname}.npy", npy_bytes(store.aux(aname))))
    for split in splits:
        info = _export_split(store, split, out, name, limit, log, claim)
        extra.append((f"split/{split}/label.npy", npy_bytes(store.labels(split).astype(np.int64))))
        extra.append((f"split/{split}/status.npy", npy_bytes(store.status(split))))
        header["splits"][split] = info
    header["extra_members"] = {member: {"bytes": len(data), "crc32c": f"{member_crc(data):08x}"} for member, data in extra}
    tmp = out / f".{name}-extra.tar.tmp-{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in extra:
            _add(tar, member, data)
    os.replace(tmp, out / header["extra"])
    atomic_write_text(header_path, json.dumps(header, indent=1))
    # files of an earlier export of this cache that this one did not rewrite (more shards, other
    # splits) would be picked up by a glob: drop them; nothing else is ever deleted
    keep = {header["extra"]} | {s["file"] for info in header["splits"].values() for s in info["shards"]}
    for file in sorted(claimed - keep):
        (out / file).unlink(missing_ok=True)
    claim_path.unlink()
    header["seconds"] = time.perf_counter() - t0
    header["bytes"] = sum(s["bytes"] for info in header["splits"].values() for s in info["shards"]) \
        + (out / header["extra"]).stat().st_size + header_path.stat().st_size
    return header


def _listed_files(path: Path, name: str, key: str) -> set[str]:
    """The files that the export header (or claim file) ``path`` of cache ``key`` lists, and that
    an export named ``name`` writes (NAME-<split>-NNNNNN.tar, NAME-extra.tar); none if there is no
    such file. A damaged one, or one of another cache, is refused with one line."""
    claim = not path.name.endswith("-header.json")
    what = "the claim file of an interrupted export" if claim else "export header"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"not JSON: {str(exc)[:100]}"
        raise CacheError(f"{what} {path} is damaged ({why}); nothing was changed: remove it and the shards it "
                         "listed, or choose another --out") from None
    try:
        if doc.get("format") != (_CLAIM_FORMAT if claim else WDS_FORMAT):
            raise ValueError("not written by pipeline cache export")
        if doc.get("key") != key:
            raise CacheMismatchError(f"{path.parent} already holds {'an interrupted' if claim else 'an'} export "
                                     f"named '{name}' of another cache (key {doc.get('key')}); choose another "
                                     "--name or --out")
        files = doc["files"] if claim else [doc["extra"]] + [s["file"] for info in doc["splits"].values()
                                                              for s in info["shards"]]
        files = [str(f) for f in files]
    except CacheMismatchError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{what} {path} is damaged ({exc.__class__.__name__}: {str(exc)[:100]}); nothing was "
                         "changed: remove it and the shards it listed, or choose another --out") from None
    # only names an export writes, in this folder: a header naming '../x' or 'x.zarr' claims nothing
    mine = re.compile(rf"{re.escape(name)}-[A-Za-z0-9_]+-\d{{6}}\.tar|{re.escape(name)}-extra\.tar")
    return {f for f in files if mine.fullmatch(f)}


def _export_split(store: FeatureStore, split: str, out: Path, name: str, limit: int, log,
                  claim: Callable[[str], Any] = lambda f: None) -> dict:
    specs = store.specs(split)
    labels = store.labels(split)
    items = store.items(split)
    status = store.status(split)
    width = max(8, len(str(store.num_videos(split))))
    series = ShardSeries(out, f"{name}-{split}", limit, claim)
    try:
        for shard in range(store.num_shards(split)):
            start, stop = store.shard_range(split, shard)
            rows = np.flatnonzero(status[start:stop] == DONE)
            if rows.size == 0:
                continue
            # one whole Zarr shard at a time, as stored (fp16 / uint8 / int8 parts): no re-rounding
            # (read_rows: the shard files' bytes, int8 as its parts; zarr's read took ~0.5 ms a video)
            raw: dict[str, Any] = {aname: store.read_rows(split, aname, np.arange(start, stop)) for aname in specs}
            for r in rows:
                index = start + int(r)
                key = f"{split}_{index:0{width}d}"
                meta = {"split": split, "index": index, "label": int(labels[index]), "path": items[index][0]}
                members = [(f"{key}.json", json.dumps(meta).encode())]
                for aname, spec in specs.items():
                    if spec.dtype == "int8":
                        members += [(f"{key}.{aname}.{s}.npy", npy_bytes(raw[aname][s][r])) for s in QUANT_SUFFIXES]
                    else:
                        members.append((f"{key}.{aname}.npy", npy_bytes(raw[aname][r])))
                series.add(index, members)
        series.close()
    except BaseException:
        series.abort()
        raise
    if series.oversized and log:
        log(f"note: {series.oversized} video(s) of '{split}' are larger than the shard limit alone; "
            "each got a shard of its own")
    c = store.counts(split)
    return {"num_videos": store.num_videos(split), "samples": sum(s["samples"] for s in series.shards),
            "counts": c, "failures": store.failures(split), "key_width": width, "shards": series.shards,
            "members": ["json"] + [m for aname, spec in specs.items() for m in member_names(aname, spec.dtype)],
            "member_bytes": series.member_bytes, "json_max_bytes": series.json_max}


# ----------------------------------------------------------------------------- reading (numpy side)
def open_url(url: str):
    """A readable binary stream for a local path, file:, http(s): or pipe: URL (webdataset's forms)."""
    if url.startswith("pipe:"):
        return _PipeReader(url[5:])
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url)
    if url.startswith("file:"):
        url = url[5:]
        if url.startswith("//"):
            url = url[2:]
    try:
        return open(url, "rb")
    except OSError as exc:
        raise CacheError(f"cannot open {url}: {exc.strerror}") from None


class _PipeReader(io.RawIOBase):
    """stdout of a shell command (``pipe:curl -s URL``); closing waits for it and checks its status."""

    def __init__(self, cmd: str):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.proc.stdout.readinto(b)

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            code = self.proc.wait()
            super().close()
            if code not in (0, 141, -13):  # SIGPIPE (via the shell: 141) when the reader stopped early
                raise CacheError(f"command '{self.cmd}' exited with status {code}")


def expand_shards(spec: str | Iterable[str]) -> list[str]:
    """Brace patterns ('a-{000000..000003}.tar'), '::'-joined lists, or a list -> shard URLs."""
    import braceexpand

    parts = spec.split("::") if isinstance(spec, str) else list(spec)
    return [u for p in parts if p for u in braceexpand.braceexpand(p)]


def _basename(url: str) -> str:
    found = re.findall(r"[^/\s'\"]+\.(?:tar|json)\b", url)
    return found[-1] if found else url.rsplit("/", 1)[-1]


def header_for(shard_url: str) -> str:
    """Where the header of a shard is by the naming rule: NAME-<split>-000000.tar -> NAME-header.json."""
    base = _basename(shard_url)
    m = re.fullmatch(r"(.+)-[A-Za-z0-9_]+-\d{6}\.tar", base)
    if not m:
        raise ConfigError(f"cannot tell the export header from shard name '{base}' "
                          "(expected NAME-<split>-000000.tar): pass the header explicitly")
    return _sibling(shard_url, f"{m.group(1)}-header.json")


def _sibling(url: str, name: str) -> str:
    """``url`` with its file name replaced by ``name`` (works for paths, URLs and pipe: commands)."""
    base = _basename(url)
    i = url.rfind(base)
    return url[:i] + name + url[i + len(base):] if i >= 0 else name


class _Location(str):
    """A header location that also answers ``.name`` like a Path (URLs must not go through Path)."""

    @property
    def name(self) -> str:
        return _basename(self)


class ShardCheck:
    """What an export header says of one shard's members, checked as the shard streams: a member's
    size (from its tar header) before it is read, its crc32c after, the member count at the end.
    Any disagreement is one CacheError naming the shard, the member and the fix."""

    def __init__(self, url: str, sizes: dict[str, int], json_max: int, crcs: str | None, exact: bool = True):
        self.url, self.sizes, self.json_max, self.exact = url, sizes, json_max, exact
        self.crcs = crcs  # 8 hex digits per member in tar order; None: a version 1 export (unchecked)

    def _error(self, member: str, what: str, why: str = "truncated or damaged") -> CacheError:
        return CacheError(f"WebDataset shard {self.url} is {why} (member {member} {what}): copy the shard again, "
                          "or re-export the cache (pipeline cache export)")

    def before(self, n: int, member: str, ext: str, size: int) -> None:
        """Member ``n`` (of the shard's regular files) is about to be read whole: is its size right?"""
        other = "damaged or not this export's"
        if self.crcs is not None and 8 * n >= len(self.crcs):
            raise self._error(member, f"is member {n + 1}, its header entry lists {len(self.crcs) // 8}", other)
        if ext == "json":
            if size > self.json_max:
                raise self._error(member, f"is {size} bytes, more than the {self.json_max} the export header "
                                          "allows; not read", other)
            return
        want = self.sizes.get(ext)
        if want is None:
            raise self._error(member, "is no member this export writes; not read", other)
        if (size != want) if self.exact else (size > want):
            raise self._error(member, f"is {size} bytes where the export header says "
                                      f"{'' if self.exact else 'at most '}{want}; not read", other)

    def after(self, n: int, member: str, data: bytes) -> None:
        if self.crcs is None:
            return
        got, want = member_crc(data), self.crcs[8 * n:8 * n + 8]
        if f"{got:08x}" != want:
            raise self._error(member, f"fails its crc32c check (reads {got:08x}, the export header says {want})")

    def end(self, count: int) -> None:
        """The whole shard was read: it holds as many members as its header entry lists."""
        if self.crcs is not None and count != len(self.crcs) // 8:
            raise CacheError(f"WebDataset shard {self.url} is truncated or damaged (it holds {count} members where "
                             f"its header entry lists {len(self.crcs) // 8}): copy the shard again, or re-export "
                             "the cache (pipeline cache export)")


def iter_tar_samples(stream, select: Callable[[str], bool] | None = None, check: ShardCheck | None = None,
                     url: str | None = None) -> Iterator[dict[str, Any]]:
    """Group a tar stream's members into samples {'__key__', '<ext>': bytes} (webdataset's rule).

    Only selected members are read (the others are skipped in blocks, never held whole);
    ``check`` vets each one's size before reading it and its bytes after. ``url`` is kept in each
    sample as '__url__' (webdataset's key)."""
    current: dict[str, Any] | None = None
    count = 0
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            tar.members = []  # a stream keeps every member's TarInfo otherwise (webdataset does the same)
            if not info.isreg():
                continue
            n, count = count, count + 1
            base = info.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            key, ext = info.name[:len(info.name) - len(base)] + base.split(".", 1)[0], base.split(".", 1)[1]
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key} if url is None else {"__key__": key, "__url__": url}
            if select is None or select(ext):
                if check is not None:
                    check.before(n, info.name, ext, info.size)
                data = tar.extractfile(info).read()
                if check is not None:
                    check.after(n, info.name, data)
                current[ext] = data
    if current is not None:
        yield current
    if check is not None:
        check.end(count)


def sample_info(sample: dict[str, Any]) -> dict:
    return json.loads(sample["json"])


def sample_array(sample: dict[str, Any], name: str, dtype_stored: str, dtype=np.float32,
                 index: tuple = ()) -> np.ndarray:
    """One cache array of a sample, as FeatureStore.read would return it (int8 dequantised).

    ``index`` selects along the leading axes (view, frame, layer, ...) before anything is
    converted, so a head that wants one view and two of twelve cached layers converts just those.
    """
    if dtype_stored == "int8":
        parts = {s: load_npy(sample[f"{name}.{s}.npy"])[index] for s in QUANT_SUFFIXES}
        return dequantize_int8(parts, dtype=dtype)
    arr = load_npy(sample[f"{name}.npy"])[index]
    if dtype_stored == "uint8":
        return np.array(arr)  # a writable copy of just the selection
    return arr.astype(dtype)


class WdsCache(CacheSource):
    """An export opened for reading: the source every back-end declares (cache/source.py).

    Metadata, labels, status, text and aux arrays come from the header and the extra tar (small,
    read at once); per-video arrays stream from the shards. ``shards={split: [urls]}`` narrows a
    split to some of its shards: ``status`` then says DONE only for the videos those shards hold,
    so selections (shots, fractions) and counts are exact for what will actually be read.
    """

    def __init__(self, header: str, opener: Callable[[str], Any] = open_url,
                 shards: dict[str, list[str]] | None = None):
        self.path = _Location(header)
        self.opener = opener
        try:
            with opener(header) as fh:
                self.header = json.loads(fh.read())
        except CacheError:
            raise
        except (OSError, ValueError) as exc:
            raise CacheError(f"cannot read WebDataset header {header}: {exc}") from None
        if self.header.get("format") != WDS_FORMAT:
            raise CacheError(f"{header} is not a clipcache WebDataset header")
        version = self.header.get("version")
        if version not in (1, WDS_VERSION):
            raise CacheError(f"{header} is a WebDataset export of format version {version}, which this clipcache "
                             f"does not read (it reads 1 and {WDS_VERSION}): re-export the cache "
                             "(pipeline cache export) or update clipcache")
        # version 1 exports carry no member checksums: still read (the cache they came from may be
        # gone), and the note says so; sizes are then bounded by the array specs
        self.checked = version >= 2
        self.note = None if self.checked else (
            f"note: export {header} has no member checksums (format version 1): damaged bytes in its shards would "
            "go unnoticed; re-export the cache (pipeline cache export) to have every member checked")
        if self.checked and not all(isinstance(info.get("member_bytes"), dict) and "json_max_bytes" in info
                                    and all("crc32c" in e for e in info["shards"])
                                    for info in self.header["splits"].values()):
            raise CacheError(f"WebDataset header {header} is damaged (a split lacks its member sizes or a shard its "
                             "checksums): copy it again, or re-export the cache (pipeline cache export)")
        self.meta: dict[str, Any] = self.header["meta"]
        self._layout = StoreMeta.from_dict(self.meta)
        self._arrays: dict[str, np.ndarray] = {}
        self._member_sizes: dict[str, dict[str, int]] = {}
        extra = _sibling(header, self.header["extra"])
        listed = self.header.get("extra_members") if self.checked else None
        try:
            with opener(extra) as fh:
                for sample_name, data in _iter_members(fh, extra, listed):
                    self._arrays[sample_name] = np.array(load_npy(data))  # writable, own memory
        except (tarfile.TarError, EOFError, ValueError) as exc:
            raise CacheError(f"WebDataset file {extra} is truncated or damaged ({str(exc)[:120]}): copy it again, "
                             "or re-export the cache (pipeline cache export)") from None
        for split in self.header["splits"]:
            if f"split/{split}/status.npy" not in self._arrays:
                raise CacheError(f"WebDataset file {extra} lacks the status of split '{split}' (truncated?): copy "
                                 "it again, or re-export the cache (pipeline cache export)")
        self._shards: dict[str, list[str]] = {}
        for split, info in self.header["splits"].items():
            self._shards[split] = [_sibling(header, s["file"]) for s in info["shards"]]
        self._status: dict[str, np.ndarray] = {}
        for split, urls in (shards or {}).items():
            self.use_shards(split, urls)

    # ----------------------------------------------------------------- structure (FeatureStore API)
    @property
    def key(self) -> str:
        return self.header["key"]

    @property
    def splits(self) -> list[str]:
        return list(self.header["splits"])

    @property
    def source_id(self) -> str:
        """The shards in use, by file name per split (where they are read from does not matter)."""
        return "wds:" + json.dumps({split: sorted(_basename(u) for u in urls)
                                    for split, urls in sorted(self._shards.items())})

    def specs(self, split: str):
        return {d["name"]: ArraySpec.from_json(d) for d in self._layout.splits[split].arrays}

    def num_videos(self, split: str) -> int:
        return int(self.header["splits"][split]["num_videos"])

    def labels(self, split: str) -> np.ndarray:
        self._check_split(split)
        return np.asarray(self._arrays[f"split/{split}/label.npy"], dtype=np.int64)

    def status(self, split: str) -> np.ndarray:
        self._check_split(split)
        if split in self._status:
            return self._status[split].copy()
        st = np.asarray(self._arrays[f"split/{split}/status.npy"], dtype=np.int8).copy()
        return st

    def failures(self, split: str) -> list[dict]:
        return list(self.header["splits"][split].get("failures", []))

    def text_names(self) -> list[str]:
        return sorted(k[5:-4] for k in self._arrays if k.startswith("text/"))

    def text(self, name: str) -> np.ndarray:
        if name not in self.text_names():
            raise CacheMismatchError(f"export {self.path} has no text embeddings '{name}' "
                                     f"(has: {', '.join(self.text_names()) or 'none'})")
        return np.asarray(self._arrays[f"text/{name}.npy"], dtype=np.float32)

    def aux_names(self) -> list[str]:
        return sorted(k[4:-4] for k in self._arrays if k.startswith("aux/"))

    def aux(self, name: str) -> np.ndarray:
        return np.asarray(self._arrays[f"aux/{name}.npy"], dtype=np.float32)

    def _check_split(self, split: str) -> None:
        if split not in self.header["splits"]:
            raise CacheMismatchError(f"export {self.path} has no split '{split}' (has {', '.join(self.splits)})")

    # ----------------------------------------------------------------- shards
    def shard_urls(self, split: str) -> list[str]:
        self._check_split(split)
        return list(self._shards[split])

    def shard_entries(self, split: str) -> dict[str, dict]:
        """Header entry of each shard in use, by URL."""
        by_name = {s["file"]: s for s in self.header["splits"][split]["shards"]}
        return {u: by_name[_basename(u)] for u in self._shards[split]}

    def use_shards(self, split: str, urls: list[str]) -> None:
        """Read ``split`` from these shard URLs (a subset, or copies elsewhere) instead of the header's."""
        self._check_split(split)
        urls = list(dict.fromkeys(urls))  # a shard named twice is still read once
        by_name = {s["file"]: s for s in self.header["splits"][split]["shards"]}
        unknown = [u for u in urls if _basename(u) not in by_name]
        if unknown:
            named = f" (named {min(by_name)}, ...)" if by_name else ""
            raise CacheMismatchError(f"shard(s) {', '.join(unknown[:3])} are not among the {len(by_name)} "
                                     f"'{split}' shards of export {self.path}{named}")
        if not urls:
            raise CacheMismatchError(f"no shards given for split '{split}'")
        self._shards[split] = list(urls)
        full = np.asarray(self._arrays[f"split/{split}/status.npy"], dtype=np.int8)
        st = np.where(full == DONE, FAILED, full).astype(np.int8)  # done elsewhere = not readable here
        for u in urls:
            e = by_name[_basename(u)]
            sl = slice(e["first"], e["last"] + 1)
            st[sl] = np.where(full[sl] == DONE, DONE, st[sl])
        self._status[split] = st

    def shard_check(self, split: str, url: str) -> ShardCheck:
        """The header's word on the members of shard ``url`` of ``split`` (cache/wds.py ShardCheck)."""
        info = self.header["splits"][split]
        entry = {s["file"]: s for s in info["shards"]}.get(_basename(url), {})
        if self.checked:
            return ShardCheck(url, info["member_bytes"], info["json_max_bytes"], entry.get("crc32c", ""))
        if split not in self._member_sizes:  # version 1: an upper bound per member from the array specs
            bounds = {}
            for aname, spec in self.specs(split).items():
                for m in member_names(aname, spec.dtype):  # int8's parts are each at most 2 bytes a value
                    bounds[m] = math.prod(spec.shape) * max(2, np.dtype(spec.dtype).itemsize) + _NPY_HEADER_MAX
            self._member_sizes[split] = bounds
        return ShardCheck(url, self._member_sizes[split], _JSON_MAX_V1, None, exact=False)

    def iter_samples(self, split: str, urls: list[str] | None = None,
                     select: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
        for url in (self.shard_urls(split) if urls is None else urls):
            try:
                fh = self.opener(url)
            except OSError as exc:  # gone since the export was opened (webdataset's gopen raises it as is)
                raise CacheError(f"WebDataset shard {url} cannot be read ({exc.strerror or exc}): copy it again, "
                                 "or re-export the cache (pipeline cache export)") from None
            with fh:
                samples = iter_tar_samples(fh, select, self.shard_check(split, url), url)
                while True:
                    try:
                        sample = next(samples)
                    except StopIteration:
                        break
                    except (tarfile.TarError, EOFError, OSError) as exc:
                        raise CacheError(f"WebDataset shard {url} is truncated or damaged ({str(exc)[:120]}): copy "
                                         "it again, or re-export the cache (pipeline cache export)") from None
                    yield sample

    def read(self, split: str, name: str, index: Any = slice(None), dtype=np.float32) -> np.ndarray:
        """Rows of one array by video index, like FeatureStore.read (one pass over the split's shards)."""
        spec = self.specs(split).get(name)
        if spec is None:
            raise CacheMismatchError(f"export {self.path} has no '{name}' for split '{split}'")
        wanted = np.arange(self.num_videos(split))[index]
        scalar = np.ndim(wanted) == 0
        uniq, inverse = np.unique(np.atleast_1d(wanted), return_inverse=True)  # a video may be asked twice
        pos = {int(v): i for i, v in enumerate(uniq)}
        out = np.full((len(uniq), *spec.shape), np.nan if spec.dtype != "uint8" else 0,
                      dtype=np.uint8 if spec.dtype == "uint8" else dtype)
        seen = np.zeros(len(uniq), dtype=bool)
        names = set(member_names(name, spec.dtype)) | {"json"}
        for sample in self.iter_samples(split, select=names.__contains__):
            j = pos.get(sample_info(sample)["index"])
            if j is not None and not seen[j]:
                out[j] = sample_array(sample, name, spec.dtype, dtype)
                seen[j] = True
        if not seen.all():
            raise CacheMismatchError(f"export {self.path}: {int((~seen).sum())} requested '{split}' video(s) "
                                     "are not in its shards (failed, or in shards not given)")
        out = out[inverse.reshape(-1)]
        return out[0] if scalar else out


def _iter_members(stream, url: str, listed: dict[str, dict] | None = None) -> Iterator[tuple[str, bytes]]:
    """The members of the extra tar; with ``listed`` (the header's {member: {bytes, crc32c}}) each is
    checked, its size before it is read, and every listed one must be there."""

    def damaged(what: str) -> CacheError:
        return CacheError(f"WebDataset file {url} is damaged or not this export's: {what}: copy it again, or "
                          "re-export the cache (pipeline cache export)")

    seen = set()
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            if listed is None:
                yield info.name, tar.extractfile(info).read()
                continue
            want = listed.get(info.name)
            if want is None:
                raise damaged(f"member {info.name} is not listed in the export header (not read)")
            if info.size != want["bytes"]:
                raise damaged(f"member {info.name} is {info.size} bytes where the export header says "
                              f"{want['bytes']} (not read)")
            data = tar.extractfile(info).read()
            if f"{member_crc(data):08x}" != want["crc32c"]:
                raise damaged(f"member {info.name} fails its crc32c check (reads {member_crc(data):08x}, the export "
                              f"header says {want['crc32c']})")
            seen.add(info.name)
            yield info.name, data
    if listed is not None and set(listed) - seen:
        raise damaged(f"member {min(set(listed) - seen)} is missing")

