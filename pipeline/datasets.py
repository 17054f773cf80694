"""Dataset definitions: which videos, with which labels, in which splits.

Every dataset, whatever its official layout, becomes one `DatasetSpec`: the class names (line i
is class i), ordered lists of `VideoItem` per split and the files it was read from. Reading is
strict and early: a malformed list line, a label out of range or a bad class file is a
`DatasetError` naming the file and line before any video is decoded. Videos themselves are not
checked here; a missing or unreadable video is recorded as failed by the extractor.

Layouts read:

- generic lists (mmaction2 / EVL / Text4Vis): `relative/path.mp4 <label>` or the frame-folder
  form `dir <num_frames> <label>`; used by `demo`, `custom`, and by the built-in datasets when
  a `.txt` list is given explicitly. The label is the last field and, in the frame-folder form,
  the frame count the one before it, so a video path may contain spaces (Kinetics class folders
  such as `air drumming/x.mp4`).
- k400: the official CSVs (`label,youtube_id,time_start,time_end,...`) with videos named
  `<youtube_id>_<start:06d>_<end:06d>.mp4` anywhere under the video root.
- ucf101: `classInd.txt`, `trainlist0N.txt`, `testlist0N.txt` (testlist -> split "val", as the
  mmaction2 / Text4Vis UCF lists call it).
- hmdb51: `<class>_test_split<N>.txt` files (1 = train, 2 = test -> split "val", 0 = unused).
- ssv2: the official JSON files; class = template with the brackets removed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from cache.errors import DatasetError

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "VideoItem",
    "builtin_classnames",
    "load_dataset",
    "read_class_file",
    "read_video_list",
]

DATASETS = ("demo", "k400", "ucf101", "hmdb51", "ssv2", "custom")
BUILTIN_CLASSES = ("k400", "ucf101", "hmdb51", "ssv2")
CLASSNAMES_DIR = Path(__file__).resolve().parent / "classnames"
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv")
_INT = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class VideoItem:
    path: str  # absolute path to a video file, or to a frame folder
    label: int
    num_frames: int | None = None  # set for frame folders (`dir <num_frames> <label>` lines)


@dataclass
class DatasetSpec:
    name: str
    classes: list[str]
    splits: dict[str, list[VideoItem]]  # keys among "train", "val", "test"; order = list order
    video_root: str
    sources: dict[str, str]  # what files it was built from (paths), for the cache metadata / key
    # the load_dataset arguments it was built with (absolute paths): what rebuilds it exactly
    args: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _as_int(token: str) -> int | None:
    return int(token) if _INT.fullmatch(token) else None


def _read_text(path, what: str) -> str:
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


def _norm(name: str) -> str:
    """Loose key for matching folder names and label spellings to class names."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _first_existing(candidates) -> Path | None:
    for c in candidates:
        if c is not None and Path(c).exists():
            return Path(c)
    return None


def _need_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise DatasetError(f"{what} {p} is not a folder" if p.exists() else f"{what} {p} does not exist")
    return p


def _video_root(name: str, video_root, root: Path | None, subfolders: Sequence[str], holds: str) -> Path:
    """The folder of an official layout's videos: ``video_root`` if given, else the first of
    ``subfolders`` that exists under ``root``, else ``root`` itself; it must be a folder."""
    if video_root is not None:
        vroot = Path(video_root)
    elif root is not None:
        vroot = _first_existing([root / sub for sub in subfolders]) or root
    else:
        raise DatasetError(f"{name} needs video_root ({holds}) or data_root")
    return _need_dir(vroot, f"{name} video root")


def _abs(path) -> str:
    return os.path.abspath(os.fspath(path))


# ---------------------------------------------------------------------------------------------
# Class files


def read_class_file(path) -> list[str]:
    """Class names from one-name-per-line text (line i = class i) or an `id,name` CSV."""
    text = _read_text(path, "class file")
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
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    by_id: dict[int, tuple[str, int]] = {}
    line_of_name: dict[str, int] = {}
    for row in reader:
        n = reader.line_num
        if not any(c.strip() for c in row):
            continue
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
        cid, name = _as_int(row[id_col].strip()), row[name_col].strip()
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


def _classes_arg(classes, default: str | None) -> tuple[list[str], str] | None:
    """Resolve a `classes` argument: a class file, a built-in dataset name, or the default."""
    if classes is None:
        if default is None:
            return None
        return builtin_classnames(default), str(CLASSNAMES_DIR / f"{default}.txt")
    if str(classes) in BUILTIN_CLASSES and not Path(classes).exists():
        return builtin_classnames(str(classes)), str(CLASSNAMES_DIR / f"{classes}.txt")
    return read_class_file(classes), _abs(classes)


# ---------------------------------------------------------------------------------------------
# Generic list format


def read_video_list(path, video_root, num_classes, *, split: str | None = None, classes=None) -> list[VideoItem]:
    """Read an mmaction2-style list: `path label` or `dir num_frames label` per line.

    `split` only names the list in messages ("train list ..."). With `classes` (built-in
    datasets only), a video inside a folder named like a class must carry that class's label;
    this catches the 1-based official UCF-101 lists passed where 0-based labels are expected.
    """
    what = f"{split} list" if split else "video list"
    text = _read_text(path, what)
    if num_classes <= 0:
        raise DatasetError(f"{what} {path}: there are no classes to label videos with")
    root = _abs(video_root) if video_root is not None else os.path.dirname(_abs(path))
    folder_class = _folder_class_map(classes) if classes else {}
    items: list[VideoItem] = []
    seen: dict[str, tuple[int, int]] = {}  # full path -> (label, line): one video, one label
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{what} {path} line {n}"
        fields = line.split()
        if len(fields) < 2:
            raise DatasetError(f"{where}: expected `path label` or `dir num_frames label`, got one field {line!r}")
        head, label_tok = line.rsplit(None, 1)
        label = _as_int(label_tok)
        if label is None:
            raise DatasetError(f"{where}: label {label_tok!r} is not an integer")
        num_frames = None
        rel = head
        if len(fields) >= 3 and _as_int(fields[-2]) is not None:
            rel, frames_tok = head.rsplit(None, 1)
            num_frames = int(frames_tok)
            if len(rel.split()) > 1 and _as_int(rel.split()[-1]) is not None:
                raise DatasetError(f"{where}: too many fields ({len(fields)}); expected `path label` or `dir num_frames label`")
            if rel.lower().endswith(VIDEO_EXTENSIONS):
                raise DatasetError(
                    f"{where}: three fields mean `dir num_frames label`, but {rel!r} is a video file; "
                    "write `path label` for videos"
                )
            if num_frames <= 0:
                raise DatasetError(f"{where}: frame count {num_frames} must be positive")
        elif len(fields) > 2 and not rel.lower().endswith(VIDEO_EXTENSIONS):
            # a path with spaces is only taken for a video file; otherwise the line is malformed
            if len(fields) == 3:
                raise DatasetError(f"{where}: frame count {fields[1]!r} is not an integer (`dir num_frames label`)")
            raise DatasetError(f"{where}: too many fields ({len(fields)}); expected `path label` or `dir num_frames label`")
        if not 0 <= label < num_classes:
            hint = " (1-based labels? labels start at 0)" if label == num_classes else ""
            raise DatasetError(
                f"{where}: label {label} is out of range for {num_classes} classes "
                f"(labels must be 0..{num_classes - 1}){hint}"
            )
        if folder_class:
            _check_folder(where, rel, label, classes, folder_class)
        full = os.path.normpath(os.path.join(root, rel))
        if full in seen and seen[full][0] != label:
            raise DatasetError(f"{where}: {rel!r} is listed again with label {label}, but line {seen[full][1]} gives it "
                               f"label {seen[full][0]}; a video has one label: remove or fix one of the two lines")
        seen.setdefault(full, (label, n))
        items.append(VideoItem(full, label, num_frames))
    if not items:
        raise DatasetError(f"{what} {path}: no videos listed (the file is empty or holds only blank and comment lines)")
    return items


def _folder_class_map(classes) -> dict[str, int]:
    out: dict[str, int] = {}
    clash: set[str] = set()
    for i, c in enumerate(classes):
        k = _norm(c)
        if k in out:
            clash.add(k)
        out[k] = i
    return {k: v for k, v in out.items() if k and k not in clash}


def _check_folder(where: str, rel: str, label: int, classes, folder_class: dict[str, int]) -> None:
    folder = os.path.basename(os.path.dirname(rel.replace("\\", "/")))
    idx = folder_class.get(_norm(folder))
    if idx is not None and idx != label:
        raise DatasetError(
            f"{where}: label {label} is class {classes[label]!r} but the video is in folder {folder!r}, "
            f"which is class {idx} (labels shifted? official UCF-101 lists are 1-based: give data_root instead)"
        )


# ---------------------------------------------------------------------------------------------
# Kinetics-400


def _k400_name(label: str) -> str:
    """Official CSV label -> class name as in kinetics_400_labels.csv: the shipped spelling when the
    label matches a shipped name loosely (a mirror's `passing American football in game` ->
    `passing American football (in game)`), else the label as written."""
    shipped = {_norm(c): c for c in builtin_classnames("k400")}
    return shipped.get(_norm(label)) or " ".join(label.split())


def _read_k400_csv(path, what: str, *, need_label: bool = True):
    """Rows of an official Kinetics CSV as (line, label or None, file stem)."""
    text = _read_text(path, what)
    reader = csv.reader(io.StringIO(text))
    header = None
    rows = []
    for row in reader:
        n = reader.line_num
        if not any(c.strip() for c in row):
            continue
        if header is None:
            header = [h.strip().lower() for h in row]
            need = ["youtube_id", "time_start", "time_end"] + (["label"] if need_label else [])
            missing = [c for c in need if c not in header]
            if missing:
                raise DatasetError(
                    f"{what} {path} line {n}: header lacks column(s) {', '.join(missing)} "
                    f"(expected label,youtube_id,time_start,time_end,split; got {','.join(header)})"
                )
            col = {c: header.index(c) for c in header}
            continue
        where = f"{what} {path} line {n}"
        if len(row) != len(header):
            raise DatasetError(f"{where}: expected {len(header)} comma-separated fields, got {len(row)}")
        times = []
        for c in ("time_start", "time_end"):
            tok = row[col[c]].strip()
            try:
                t = float(tok)
            except ValueError:
                t = None
            if t is None or t != int(t) or t < 0:
                raise DatasetError(f"{where}: {c} {tok!r} is not a whole number of seconds")
            times.append(int(t))
        yid = row[col["youtube_id"]].strip()
        if not yid:
            raise DatasetError(f"{where}: empty youtube_id")
        label = row[col["label"]].strip() if "label" in col else None
        if need_label and not label:
            raise DatasetError(f"{where}: empty label")
        rows.append((n, label, f"{yid}_{times[0]:06d}_{times[1]:06d}"))
    if header is None:
        raise DatasetError(f"{what} {path}: the file is empty")
    if not rows:
        raise DatasetError(f"{what} {path}: a header but no videos")
    return rows, "label" in header


def _index_videos(video_root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """One walk of the video root: file name -> path and stem -> path (flat or per-class layout)."""
    by_name: dict[str, str] = {}
    by_stem: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(video_root, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            by_name.setdefault(f, full)
            stem, ext = os.path.splitext(f)
            if ext.lower() in VIDEO_EXTENSIONS:
                by_stem.setdefault(stem, full)
    return by_name, by_stem


def _k400_items(path, what, rows, video_root, index, to_label) -> list[VideoItem]:
    by_name, by_stem = index
    items = []
    seen: dict[str, tuple[int, int]] = {}
    for n, label, stem in rows:
        idx = to_label(label)
        if idx is None:
            raise DatasetError(f"{what} {path} line {n}: label {label!r} is not one of the classes")
        found = by_name.get(stem + ".mp4") or by_stem.get(stem) or os.path.join(video_root, stem + ".mp4")
        if stem in seen and seen[stem][0] != idx:
            raise DatasetError(f"{what} {path} line {n}: video {stem!r} is listed again with label {label!r}, but "
                               f"line {seen[stem][1]} gives it another label; a video has one label: fix one line")
        seen.setdefault(stem, (idx, n))
        items.append(VideoItem(_abs(found), idx))
    return items


def _load_k400(data_root, video_root, train_list, val_list, test_list, classes) -> DatasetSpec:
    root = Path(data_root) if data_root is not None else None
    if root is not None:
        _need_dir(root, "k400 data root")
    search = [root, root / "annotations"] if root is not None else []

    def find(names):
        return _first_existing(d / n for d in search for n in names)

    def csv_names(*stems):
        return [f"{pre}{st}.csv" for st in stems for pre in ("", "kinetics_", "kinetics-400_", "kinetics400_")]

    train = train_list if train_list is not None else find(csv_names("train"))
    val = val_list if val_list is not None else find(csv_names("validate", "val"))
    test = test_list
    csv_rows: dict[str, list] = {}  # each official CSV parsed once (the K400 train CSV: 240k rows)
    if test is None:
        auto = find(csv_names("test"))
        if auto is not None:
            rows, labelled = _read_k400_csv(auto, "test list", need_label=False)
            if labelled:  # the original test.csv has no labels: nothing to evaluate on
                test = auto
                if all(lab for _, lab, _ in rows):
                    csv_rows["test"] = rows
    if train is None:
        raise DatasetError(
            "k400 needs a train list: train.csv in data_root"
            + (f" ({root})" if root is not None else "")
            + " or train_list (official CSV, or a `path label` .txt list)"
        )
    vroot = _video_root("k400", video_root, root, ["videos"], "the folder holding the videos")

    if str(train).lower().endswith(".txt"):  # `path label` lists: only the lists given (not the official CSVs)
        return _generic("k400", vroot, train, val_list, test_list, classes, default_classes="k400",
                        check_folders=True)

    if classes is not None:
        names, cls_src = _classes_arg(classes, None)
        lookup = {_norm(c): i for i, c in enumerate(names)}
        to_label = lambda lab: lookup.get(_norm(lab))  # noqa: E731
    else:
        rows = csv_rows["train"] = _read_k400_csv(train, "train list")[0]
        raw = sorted({lab for _, lab, _ in rows})  # official ids: sorted raw labels
        names = [_k400_name(lab) for lab in raw]
        shipped = builtin_classnames("k400")
        if set(names) == set(shipped):
            names = shipped  # the full 400: official ids even if the CSV spells them differently
            cls_src = str(CLASSNAMES_DIR / "k400.txt")
        else:
            cls_src = _abs(train)
        lookup = {_norm(c): i for i, c in enumerate(names)}
        to_label = lambda lab: lookup.get(_norm(lab))  # noqa: E731

    index = _index_videos(vroot)
    splits: dict[str, list[VideoItem]] = {}
    sources = {"classes": cls_src}
    for split, lst in (("train", train), ("val", val), ("test", test)):
        if lst is None:
            continue
        if str(lst).lower().endswith(".txt"):
            splits[split] = read_video_list(lst, vroot, len(names), split=split, classes=names)
        else:
            rows = csv_rows.get(split) or _read_k400_csv(lst, f"{split} list")[0]
            splits[split] = _k400_items(lst, f"{split} list", rows, str(vroot), index, to_label)
        sources[split] = _abs(lst)
    return DatasetSpec("k400", list(names), splits, _abs(vroot), sources)


# ---------------------------------------------------------------------------------------------
# UCF-101


def _read_class_ind(path) -> list[str]:
    text = _read_text(path, "ucf101 class index")
    names: dict[int, tuple[str, int]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        fields = line.split()
        where = f"ucf101 class index {path} line {n}"
        if len(fields) != 2 or _as_int(fields[0]) is None:
            raise DatasetError(f"{where}: expected `<1-based id> <ClassName>`, got {line!r}")
        cid = int(fields[0])
        if cid in names:
            raise DatasetError(f"{where}: id {cid} repeats line {names[cid][1]}")
        names[cid] = (fields[1], n)
    k = len(names)
    if k == 0:
        raise DatasetError(f"ucf101 class index {path}: no classes")
    if set(names) != set(range(1, k + 1)):
        bad = min(set(names) - set(range(1, k + 1)))
        raise DatasetError(f"ucf101 class index {path} line {names[bad][1]}: id {bad} out of range; ids must be 1..{k}")
    return [names[i][0] for i in range(1, k + 1)]


def _read_ucf_split(path, what, video_root, names) -> list[VideoItem]:
    """trainlist (`Class/v_x.avi <1-based label>`) or testlist (`Class/v_x.avi`, label from folder)."""
    text = _read_text(path, what)
    folder = {_norm(c): i for i, c in enumerate(names)}
    items = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{what} {path} line {n}"
        fields = line.split()
        if len(fields) > 2:
            raise DatasetError(f"{where}: expected `Class/video.avi [label]`, got {len(fields)} fields")
        rel = fields[0]
        cls = rel.replace("\\", "/").split("/")[0] if "/" in rel.replace("\\", "/") else ""
        from_folder = folder.get(_norm(cls))
        if len(fields) == 2:
            lab = _as_int(fields[1])
            if lab is None:
                raise DatasetError(f"{where}: label {fields[1]!r} is not an integer")
            if not 1 <= lab <= len(names):
                raise DatasetError(f"{where}: label {lab} is out of range; UCF-101 labels are 1..{len(names)} (1-based)")
            label = lab - 1
            if from_folder is not None and from_folder != label:
                raise DatasetError(
                    f"{where}: label {lab} is {names[label]!r} but the folder is {cls!r} (class {from_folder + 1})"
                )
        else:
            if from_folder is None:
                raise DatasetError(f"{where}: folder {cls!r} of {rel!r} is not a class in the class index")
            label = from_folder
        items.append(VideoItem(os.path.normpath(os.path.join(video_root, rel)), label))
    if not items:
        raise DatasetError(f"{what} {path}: no videos listed")
    return items


def _load_ucf101(data_root, video_root, train_list, val_list, test_list, classes, split_id) -> DatasetSpec:
    root = Path(data_root) if data_root is not None else None
    ann = None
    if root is not None:
        _need_dir(root, "ucf101 data root")
        ann = _first_existing([root / "ucfTrainTestlist" / "classInd.txt", root / "classInd.txt"])
        ann = ann.parent if ann is not None else None
    if train_list is None and ann is None:
        where = f" in {root} or {root / 'ucfTrainTestlist'}" if root is not None else ""
        raise DatasetError(f"ucf101 needs classInd.txt and trainlist0{split_id}.txt{where} (give data_root), or train_list")
    vroot = _video_root("ucf101", video_root, root, ["UCF-101"], "the UCF-101 folder")

    if classes is not None:
        names, cls_src = _classes_arg(classes, None)
    elif ann is not None:
        cls_src = _abs(ann / "classInd.txt")
        names = _read_class_ind(cls_src)
    else:
        names, cls_src = _classes_arg(None, "ucf101")

    splits: dict[str, list[VideoItem]] = {}
    sources = {"classes": cls_src}
    official = {"train": f"trainlist0{split_id}.txt", "val": f"testlist0{split_id}.txt"}
    for split, lst in (("train", train_list), ("val", val_list), ("test", test_list)):
        if lst is not None:
            splits[split] = read_video_list(lst, vroot, len(names), split=split, classes=names)
        elif split in official and ann is not None:
            lst = ann / official[split]
            if split == "val" and not lst.exists():
                continue
            splits[split] = _read_ucf_split(lst, f"ucf101 {split} list", str(vroot), names)
        else:
            continue
        sources[split] = _abs(lst)
    return DatasetSpec("ucf101", names, splits, _abs(vroot), sources)


# ---------------------------------------------------------------------------------------------
# HMDB-51


def _load_hmdb51(data_root, video_root, train_list, val_list, test_list, classes, split_id) -> DatasetSpec:
    root = Path(data_root) if data_root is not None else None
    if root is not None:
        _need_dir(root, "hmdb51 data root")
    vroot = _video_root("hmdb51", video_root, root, ["hmdb51_org", "videos"], "the folder of class folders")
    if train_list is not None:
        return _generic("hmdb51", vroot, train_list, val_list, test_list, classes, default_classes="hmdb51", check_folders=True)
    if root is None:
        raise DatasetError("hmdb51 needs data_root (with testTrainMulti_7030_splits/) or train_list")
    if val_list is not None or test_list is not None:
        raise DatasetError("hmdb51: val_list/test_list need train_list too (or use the official split files alone)")

    pat = re.compile(rf"^(.+)_test_split{split_id}\.txt$")
    split_files: dict[str, Path] = {}
    for d in (root / "testTrainMulti_7030_splits", root):
        if d.is_dir():
            for f in sorted(d.iterdir()):
                m = pat.match(f.name)
                if m and f.is_file():
                    split_files.setdefault(m.group(1), f)
            if split_files:
                break
    if not split_files:
        raise DatasetError(
            f"hmdb51: no split files <class>_test_split{split_id}.txt in {root / 'testTrainMulti_7030_splits'} or {root}"
        )
    if classes is not None:
        names, cls_src = _classes_arg(classes, None)
        lookup = {_norm(c): i for i, c in enumerate(names)}
        for cls, f in split_files.items():
            if _norm(cls) not in lookup:
                raise DatasetError(f"hmdb51 split file {f}: class {cls!r} is not in class file {cls_src}")
        label_of = {cls: lookup[_norm(cls)] for cls in split_files}
    else:
        folders = sorted(split_files)  # ids: the sorted folder names (`brush_hair`, ...)
        label_of = {cls: i for i, cls in enumerate(folders)}
        # class names as the official list spells them (`brush hair`): the folders use underscores
        spelled = {_norm(c): c for c in builtin_classnames("hmdb51")}
        names = [spelled.get(_norm(f)) or " ".join(f.replace("_", " ").split()) for f in folders]
        shipped = builtin_classnames("hmdb51")
        cls_src = str(CLASSNAMES_DIR / "hmdb51.txt") if names == shipped else str(split_files[folders[0]].parent)

    train: list[VideoItem] = []
    val: list[VideoItem] = []
    for cls in sorted(split_files, key=lambda c: label_of[c]):
        f = split_files[cls]
        text = _read_text(f, "hmdb51 split file")
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line:
                continue
            where = f"hmdb51 split file {f} line {n}"
            fields = line.split()
            if len(fields) != 2:
                raise DatasetError(f"{where}: expected `<video>.avi <0|1|2>`, got {len(fields)} field(s)")
            tag = _as_int(fields[1])
            if tag not in (0, 1, 2):
                raise DatasetError(f"{where}: split tag {fields[1]!r} must be 0 (unused), 1 (train) or 2 (test)")
            item = VideoItem(_abs(Path(vroot) / cls / fields[0]), label_of[cls])
            if tag == 1:
                train.append(item)
            elif tag == 2:
                val.append(item)
    if not train:
        raise DatasetError(f"hmdb51: the split {split_id} files in {next(iter(split_files.values())).parent} mark no video as train (1)")
    splits = {"train": train}
    if val:
        splits["val"] = val
    sources = {"classes": cls_src}
    sources.update({f"split/{cls}": _abs(f) for cls, f in sorted(split_files.items())})
    return DatasetSpec("hmdb51", names, splits, _abs(vroot), sources)


# ---------------------------------------------------------------------------------------------
# Something-Something v2


def _ssv2_class(template: str) -> str:
    return " ".join(template.replace("[", "").replace("]", "").split())


def _json_array_with_lines(path, what):
    """Parse a JSON array and keep the line each element starts on, for messages."""
    text = _read_text(path, what)
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{what} {path} line {e.lineno}: not valid JSON ({e.msg})") from None
    dec = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    i = ws.match(text, 0).end()
    if text[i : i + 1] != "[":
        raise DatasetError(f"{what} {path} line 1: expected a JSON list of videos")
    i += 1
    out = []
    line, pos = 1, 0
    while True:
        i = ws.match(text, i).end()
        if text[i] == "]":
            break
        line += text.count("\n", pos, i)
        pos = i
        obj, i = dec.raw_decode(text, i)
        out.append((line, obj))
    return out


def _read_ssv2_labels(path) -> list[str]:
    text = _read_text(path, "ssv2 labels")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"ssv2 labels {path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"ssv2 labels {path}: expected a JSON object {{template: id}}")

    def line_of(key):
        at = text.find(json.dumps(key)[1:-1])
        return text.count("\n", 0, at) + 1 if at >= 0 else 1

    by_id: dict[int, str] = {}
    for name, cid in data.items():
        i = _as_int(str(cid).strip())
        if i is None:
            raise DatasetError(f"ssv2 labels {path} line {line_of(name)}: id {cid!r} of {name!r} is not an integer")
        if i in by_id:
            raise DatasetError(f"ssv2 labels {path} line {line_of(name)}: id {i} used by {by_id[i]!r} and {name!r}")
        by_id[i] = _ssv2_class(name)
    k = len(by_id)
    if set(by_id) != set(range(k)):
        bad = min(set(by_id) - set(range(k)))
        raise DatasetError(f"ssv2 labels {path} line {line_of(next(n for n, c in data.items() if int(c) == bad))}: "
                           f"id {bad} out of range; ids must be 0..{k - 1}")
    return [by_id[i] for i in range(k)]


def _ssv2_items(path, what, video_root: Path, names) -> list[VideoItem]:
    exact = {c: i for i, c in enumerate(names)}
    loose = {_norm(c): i for i, c in enumerate(names)}
    items = []
    entries = _json_array_with_lines(path, what)
    for line, e in entries:
        where = f"{what} {path} line {line}"
        if not isinstance(e, dict) or "id" not in e:
            raise DatasetError(f"{where}: expected an object with an \"id\"")
        if "template" not in e:
            raise DatasetError(f"{where}: video {e['id']} has no \"template\" (the test file carries no labels)")
        cls = _ssv2_class(str(e["template"]))
        label = exact.get(cls, loose.get(_norm(cls)))
        if label is None:
            raise DatasetError(f"{where}: template {e['template']!r} (class {cls!r}) is not in the labels")
        items.append(VideoItem(_abs(video_root / f"{e['id']}.webm"), label))
    if not items:
        raise DatasetError(f"{what} {path}: no videos listed")
    return items


def _load_ssv2(data_root, video_root, train_list, val_list, test_list, classes) -> DatasetSpec:
    root = Path(data_root) if data_root is not None else None
    if root is not None:
        _need_dir(root, "ssv2 data root")
    search = [root, root / "labels", root / "annotations"] if root is not None else []

    def find(names):
        return _first_existing(d / n for d in search for n in names)

    train = train_list if train_list is not None else find(["something-something-v2-train.json", "train.json"])
    val = val_list if val_list is not None else find(["something-something-v2-validation.json", "validation.json"])
    if train is None:
        raise DatasetError(
            "ssv2 needs something-something-v2-train.json in data_root (or its labels/ folder), or train_list"
        )
    vroot = _video_root("ssv2", video_root, root, ["20bn-something-something-v2", "videos"],
                        "the folder of <id>.webm files")
    if str(train).lower().endswith(".txt"):  # `path label` lists: only the lists given (not the official JSON)
        return _generic("ssv2", vroot, train, val_list, test_list, classes, default_classes="ssv2",
                        check_folders=False)

    if classes is not None and str(classes).lower().endswith(".json"):
        names, cls_src = _read_ssv2_labels(classes), _abs(classes)
    elif classes is not None:
        names, cls_src = _classes_arg(classes, None)
    else:
        lab = find(["something-something-v2-labels.json", "labels.json"])
        if lab is not None:
            names, cls_src = _read_ssv2_labels(lab), _abs(lab)
        else:
            names, cls_src = _classes_arg(None, "ssv2")

    splits: dict[str, list[VideoItem]] = {}
    sources = {"classes": cls_src}
    for split, lst in (("train", train), ("val", val), ("test", test_list)):
        if lst is None:
            continue
        if str(lst).lower().endswith(".txt"):
            splits[split] = read_video_list(lst, vroot, len(names), split=split)
        else:
            splits[split] = _ssv2_items(lst, f"{split} list", vroot, names)
        sources[split] = _abs(lst)
    return DatasetSpec("ssv2", names, splits, _abs(vroot), sources)


# ---------------------------------------------------------------------------------------------
# Generic datasets: custom, demo, and built-ins given `.txt` lists


def _generic(name, video_root, train, val, test, classes, *, default_classes=None, check_folders=False) -> DatasetSpec:
    resolved = _classes_arg(classes, default_classes)
    if resolved is None:
        raise DatasetError(f"{name} needs a class file (classes=...)")
    names, cls_src = resolved
    splits: dict[str, list[VideoItem]] = {}
    sources = {"classes": cls_src}
    for split, lst in (("train", train), ("val", val), ("test", test)):
        if lst is None:
            continue
        splits[split] = read_video_list(lst, video_root, len(names), split=split, classes=names if check_folders else None)
        sources[split] = _abs(lst)
    return DatasetSpec(name, names, splits, _abs(video_root), sources)


def _load_demo(data_root, video_root, train_list, val_list, test_list, classes) -> DatasetSpec:
    root = _need_dir(data_root if data_root is not None else Path("data") / "demo", "demo data root")
    train = train_list if train_list is not None else root / "train.txt"
    val = val_list if val_list is not None else (root / "val.txt" if (root / "val.txt").exists() else None)
    test = test_list if test_list is not None else (root / "test.txt" if (root / "test.txt").exists() else None)
    cls = classes if classes is not None else root / "classes.txt"
    if video_root is None:
        video_root = root / "videos"
        # lists written relative to data_root (`videos/x.mp4`) rather than to videos/
        first = next((ln.split()[0] for ln in _read_text(train, "train list").splitlines()
                      if ln.strip() and not ln.strip().startswith("#")), "")
        if first.replace("\\", "/").startswith("videos/"):
            video_root = root
    return _generic("demo", _need_dir(video_root, "demo video root"), train, val, test, cls)


def _load_custom(video_root, train_list, val_list, test_list, classes) -> DatasetSpec:
    missing = [n for n, v in (("video_root", video_root), ("train_list", train_list), ("classes", classes)) if v is None]
    if missing:
        raise DatasetError(f"custom dataset needs {', '.join(missing)} (val_list and test_list are optional)")
    return _generic("custom", _need_dir(video_root, "custom video root"), train_list, val_list, test_list, classes)


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
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name != "custom" and data_root is None and train_list is None:
        data_root = Path("data") / name  # the default layout location, recorded as such
    given = {"data_root": data_root, "video_root": video_root, "train_list": train_list, "val_list": val_list,
             "test_list": test_list, "classes": classes}
    spec = _load_dataset(name, data_root, video_root, train_list, val_list, test_list, classes, split_id)
    spec.args = {k: (str(Path(v).resolve()) if k != "classes" or Path(v).exists() else str(v))
                 for k, v in given.items() if v is not None}
    if name in ("ucf101", "hmdb51"):
        spec.args["split_id"] = split_id
    return spec


def _load_dataset(name, data_root, video_root, train_list, val_list, test_list, classes, split_id) -> DatasetSpec:
    if name in ("ucf101", "hmdb51") and split_id not in (1, 2, 3):
        raise DatasetError(f"{name} split_id must be 1, 2 or 3, got {split_id!r}")
    if name == "demo":
        return _load_demo(data_root, video_root, train_list, val_list, test_list, classes)
    if name == "custom":
        return _load_custom(video_root, train_list, val_list, test_list, classes)
    if name == "k400":
        return _load_k400(data_root, video_root, train_list, val_list, test_list, classes)
    if name == "ucf101":
        return _load_ucf101(data_root, video_root, train_list, val_list, test_list, classes, split_id)
    if name == "hmdb51":
        return _load_hmdb51(data_root, video_root, train_list, val_list, test_list, classes, split_id)
    return _load_ssv2(data_root, video_root, train_list, val_list, test_list, classes)
