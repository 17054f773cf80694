"""The dataset registry and what every layout shares.

A layout is one module that reads its files into a `DatasetSpec` and registers itself:

    register_dataset("flat", load_flat, help="every video in one folder, named <class>__<n>.mp4")

where ``load_flat(args: DatasetArgs) -> DatasetSpec``. `load_dataset(name, ...)` looks the name
up, runs the loader and records the arguments the spec was built with (`spec.args`, what
rebuilds it exactly). The modules of this package register the built-in layouts on import; a
module anywhere else registers its own the same way.

Shared here: the class files (one name per line, or an `id,name` CSV; the shipped class names of
the built-in datasets), the strict text reading with the file and line in every message, the
one-label-per-video check, and how an official layout finds its video folder. Reading is strict
and early: a malformed line, a label out of range or a bad class file is a `DatasetError` naming
the file and line before any video is decoded. Videos themselves are not checked here; a
missing or unreadable video is recorded as failed by the extractor.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cache.datasets import DatasetSpec, VideoItem
from cache.errors import DatasetError

__all__ = [
    "BUILTIN_CLASSES",
    "CLASSNAMES_DIR",
    "VIDEO_EXTENSIONS",
    "DatasetArgs",
    "DatasetEntry",
    "DatasetSpec",
    "LabelOnce",
    "VideoItem",
    "abs_path",
    "as_int",
    "builtin_classnames",
    "csv_records",
    "find_file",
    "find_video_root",
    "first_existing",
    "get_dataset",
    "list_datasets",
    "load_dataset",
    "need_dir",
    "norm_name",
    "read_class_file",
    "read_splits",
    "read_text",
    "register_dataset",
    "resolve_classes",
    "text_lines",
]

BUILTIN_CLASSES = ("k400", "ucf101", "hmdb51", "ssv2")
CLASSNAMES_DIR = Path(__file__).resolve().parent.parent / "classnames"
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv")
_INT = re.compile(r"[+-]?\d+")


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class DatasetArgs:
    """What `load_dataset` hands a layout's loader: the user's arguments, unresolved (paths as
    given; ``data_root`` already defaulted to ``data/<name>`` where the layout takes one)."""

    data_root: Path | str | None = None
    video_root: Path | str | None = None
    train_list: Path | str | None = None
    val_list: Path | str | None = None
    test_list: Path | str | None = None
    classes: Path | str | None = None  # a class file, or a built-in dataset name ("ucf101")
    split_id: int = 1

    def root(self, name: str) -> Path | None:
        """``data_root`` as a folder that exists (a DatasetError naming ``name`` otherwise), or None."""
        return need_dir(self.data_root, f"{name} data root") if self.data_root is not None else None

    def lists(self) -> dict[str, Path | str | None]:
        """The lists the user gave, by split: {"train": ..., "val": ..., "test": ...}."""
        return {"train": self.train_list, "val": self.val_list, "test": self.test_list}


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Callable[[DatasetArgs], DatasetSpec]
    help: str = ""
    # data_root defaults to data/<name> when neither data_root nor train_list is given
    default_root: bool = True
    # the official splits the layout numbers (split_id is checked and recorded); () = none
    split_ids: tuple[int, ...] = ()
    # the folder tree the loader reads and where its files come from, shown when data_root is missing
    layout: str = ""
    # a horizontal flip swaps the labels of the mirror class pairs (cache/flips.py): SSv2, demo
    flip_swaps: bool = False


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, loader: Callable[[DatasetArgs], DatasetSpec], *, help: str = "",
                     default_root: bool = True, split_ids: Sequence[int] = (), layout: str = "",
                     flip_swaps: bool = False) -> DatasetEntry:
    """Make ``name`` a dataset `load_dataset` (and ``--dataset``) accepts. ``layout``: the tree
    under data_root the loader reads and where its files come from (printed when it is missing).
    ``flip_swaps``: a horizontal flip swaps the labels of the classes whose names differ only by
    left <-> right or clockwise <-> counter-clockwise (cache/flips.py), as in Something-Something v2
    and the demo world."""
    if name in _REGISTRY:
        raise RuntimeError(f"dataset '{name}' registered twice")
    entry = DatasetEntry(name, loader, help, default_root, tuple(split_ids), layout.strip("\n"), flip_swaps)
    _REGISTRY[name] = entry
    return entry


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset(name: str) -> DatasetEntry:
    if name not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    return _REGISTRY[name]


def load_dataset(
    name: str,
    *,
    data_root=None,
    video_root=None,
    train_list=None,
    val_list=None,
    test_list=None,
    classes=None,
    split_id: int = 1,
) -> DatasetSpec:
    """Build a dataset from its official layout under `data_root`, or from explicit lists.

    Explicit arguments override the defaults found under `data_root`. `classes` is a class
    file (or a built-in dataset name such as "ucf101"). `split_id` picks the official
    UCF-101 / HMDB-51 split (1..3).
    """
    entry = get_dataset(name)
    if entry.default_root and data_root is None and train_list is None:
        data_root = Path("data") / name  # the default layout location, recorded as such
    given = {"data_root": data_root, "video_root": video_root, "train_list": train_list, "val_list": val_list,
             "test_list": test_list, "classes": classes}
    if entry.split_ids and split_id not in entry.split_ids:
        *head, last = map(str, entry.split_ids)
        allowed = f"{', '.join(head)} or {last}" if head else last
        raise DatasetError(f"{name} split_id must be {allowed}, got {split_id!r}")
    if data_root is not None and train_list is None and not Path(data_root).exists() and entry.layout:
        raise DatasetError(f"{name} data root {data_root} does not exist; put the dataset there as\n"
                           + entry.layout.replace("DATA_ROOT", str(data_root))
                           + f"\nor pass --data-root DIR (or your own lists: --train-list, --val-list, --video-root)")
    spec = entry.loader(DatasetArgs(split_id=split_id, **given))
    spec.args = {k: (str(Path(v).resolve()) if k != "classes" or Path(v).exists() else str(v))
                 for k, v in given.items() if v is not None}
    if entry.split_ids:
        spec.args["split_id"] = split_id
    spec.flip_swaps = entry.flip_swaps
    return spec


# ---------------------------------------------------------------------------------------------
# Small helpers


class LabelOnce:
    """One video, one label: remembers where each video was first labelled, so a second line
    that gives it another label is caught (the same label twice is allowed)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int]] = {}

    def clash(self, key: str, label: int, line: int) -> tuple[int, int] | None:
        """The (label, line) that labelled ``key`` differently before, else None."""
        first = self._seen.setdefault(key, (label, line))
        return first if first[0] != label else None


def as_int(token: str) -> int | None:
    return int(token) if _INT.fullmatch(token) else None


def read_text(path, what: str) -> str:
    """Whole file as text; a missing or undecodable file is the user's error, named."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{what} {p} does not exist")
    if not p.is_file():
        raise DatasetError(f"{what} {p} is not a file")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise DatasetError(f"{what} {p} line {line}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DatasetError(f"{what} {p} cannot be read: {e.strerror or e}") from None


def norm_name(name: str) -> str:
    """Loose key for matching folder names and label spellings to class names."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def first_existing(candidates) -> Path | None:
    for c in candidates:
        if c is not None and Path(c).exists():
            return Path(c)
    return None


def find_file(folders: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The first of ``names`` found in the first of ``folders`` that holds one."""
    return first_existing(d / n for d in folders for n in names)


def text_lines(text: str, comments: bool = True) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) of each line that holds something: blank lines are
    skipped, and lines starting with ``#`` too when ``comments``."""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not (comments and line.startswith("#")):
            yield n, line


def csv_records(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each CSV row with any non-blank field (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(text))
    for row in reader:
        if any(c.strip() for c in row):
            yield reader.line_num, row


def read_splits(lists: dict[str, Path | str | None], read: Callable[[str, Path | str], list[VideoItem]],
                classes_source: str) -> tuple[dict[str, list[VideoItem]], dict[str, str]]:
    """Each split's videos, ``read(split, list)`` for every split whose list is not None, and the
    sources a DatasetSpec records (the class file, then each list as an absolute path)."""
    splits: dict[str, list[VideoItem]] = {}
    sources = {"classes": classes_source}
    for split, lst in lists.items():
        if lst is None:
            continue
        splits[split] = read(split, lst)
        sources[split] = abs_path(lst)
    return splits, sources


def need_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise DatasetError(f"{what} {p} is not a folder" if p.exists() else f"{what} {p} does not exist")
    return p


def find_video_root(name: str, video_root, root: Path | None, subfolders: Sequence[str], holds: str) -> Path:
    """The folder of an official layout's videos: ``video_root`` if given, else the first of
    ``subfolders`` that exists under ``root``, else ``root`` itself; it must be a folder."""
    if video_root is not None:
        vroot = Path(video_root)
    elif root is not None:
        vroot = first_existing([root / sub for sub in subfolders]) or root
    else:
        raise DatasetError(f"{name} needs video_root ({holds}) or data_root")
    return need_dir(vroot, f"{name} video root")


def abs_path(path) -> str:
    return os.path.abspath(os.fspath(path))


# ---------------------------------------------------------------------------------------------
# Class files


def read_class_file(path) -> list[str]:
    """Class names from one-name-per-line text (line i = class i) or an `id,name` CSV."""
    text = read_text(path, "class file")
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        raise DatasetError(f"class file {path}: no class names (the file is empty)")
    header = [h.strip().lower() for h in next(csv.reader([first]))]
    if "id" in header and "name" in header:
        return _read_class_csv(path, text)
    last = max(i for i, ln in enumerate(lines) if ln.strip())
    names: list[str] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(lines[: last + 1], 1):
        name = raw.strip()
        if not name:
            raise DatasetError(
                f"class file {path} line {n}: blank line inside the list (line i is class i-1, "
                "so a blank line would shift every class after it)"
            )
        if name in seen:
            raise DatasetError(f"class file {path} line {n}: class {name!r} repeats line {seen[name]}")
        seen[name] = n
        names.append(name)
    return names


def _read_class_csv(path, text: str) -> list[str]:
    header: list[str] | None = None
    by_id: dict[int, tuple[str, int]] = {}
    line_of_name: dict[str, int] = {}
    for n, row in csv_records(text):
        if header is None:
            header = [h.strip().lower() for h in row]
            id_col, name_col = header.index("id"), header.index("name")
            continue
        where = f"class file {path} line {n}"
        if len(row) != len(header):
            raise DatasetError(
                f"{where}: expected {len(header)} comma-separated fields ({','.join(header)}), "
                f"got {len(row)} (quote names that contain commas)"
            )
        cid, name = as_int(row[id_col].strip()), row[name_col].strip()
        if cid is None:
            raise DatasetError(f"{where}: id {row[id_col].strip()!r} is not an integer")
        if not name:
            raise DatasetError(f"{where}: empty class name")
        if cid in by_id:
            raise DatasetError(f"{where}: id {cid} repeats line {by_id[cid][1]}")
        if name in line_of_name:
            raise DatasetError(f"{where}: class {name!r} repeats line {line_of_name[name]}")
        by_id[cid] = (name, n)
        line_of_name[name] = n
    k = len(by_id)
    if k == 0:
        raise DatasetError(f"class file {path}: a header but no classes")
    bad = sorted(i for i in by_id if not 0 <= i < k)
    if bad:
        missing = sorted(set(range(k)) - set(by_id))
        raise DatasetError(
            f"class file {path} line {by_id[bad[0]][1]}: id {bad[0]} is out of range; ids must be "
            f"0..{k - 1} for {k} classes (missing: {', '.join(map(str, missing[:5]))})"
        )
    return [by_id[i][0] for i in range(k)]


@lru_cache(maxsize=None)
def _builtin(name: str) -> tuple[str, ...]:
    return tuple(read_class_file(CLASSNAMES_DIR / f"{name}.txt"))


def builtin_classnames(name) -> list[str]:
    """The class names shipped with the project for a built-in dataset (official order)."""
    if name not in BUILTIN_CLASSES:
        raise DatasetError(f"no shipped class names for {name!r}; known: {', '.join(BUILTIN_CLASSES)}")
    return list(_builtin(name))


def resolve_classes(classes, default: str | None) -> tuple[list[str], str] | None:
    """Resolve a `classes` argument: a class file, a built-in dataset name, or the default."""
    if classes is None:
        if default is None:
            return None
        return builtin_classnames(default), str(CLASSNAMES_DIR / f"{default}.txt")
    if str(classes) in BUILTIN_CLASSES and not Path(classes).exists():
        return builtin_classnames(str(classes)), str(CLASSNAMES_DIR / f"{classes}.txt")
    return read_class_file(classes), abs_path(classes)

