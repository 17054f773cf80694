"""Kinetics-400: the official CSVs (`label,youtube_id,time_start,time_end,...`) with videos named
`<youtube_id>_<start:06d>_<end:06d>.mp4` anywhere under the video root (flat or per class)."""

from __future__ import annotations

import os
from pathlib import Path

from cache.errors import DatasetError
from pipeline.datasets.core import (CLASSNAMES_DIR, VIDEO_EXTENSIONS, DatasetArgs, DatasetSpec, LabelOnce, VideoItem,
                                    abs_path, builtin_classnames, csv_records, find_file, find_video_root, norm_name,
                                    read_splits, read_text, register_dataset, resolve_classes)
from pipeline.datasets.lists import read_video_list, spec_from_lists

__all__ = ["load_k400"]


def _k400_name(label: str) -> str:
    """Official CSV label -> class name as in kinetics_400_labels.csv: the shipped spelling when the
    label matches a shipped name loosely (a mirror's `passing American football in game` ->
    `passing American football (in game)`), else the label as written."""
    shipped = {norm_name(c): c for c in builtin_classnames("k400")}
    return shipped.get(norm_name(label)) or " ".join(label.split())


def _read_k400_csv(path, what: str, *, need_label: bool = True):
    """Rows of an official Kinetics CSV as (line, label or None, file stem)."""
    header = None
    rows = []
    for n, row in csv_records(read_text(path, what)):
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


def _dir_id(path: str) -> tuple[int, int] | None:
    """The real directory a path leads to (symlinks followed), as (device, inode); None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _index_videos(video_root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """One walk of the video root: file name -> path and stem -> path (flat or per-class layout).

    Symlinked folders are followed (a video root assembled from links to other disks), and each
    real folder is read once: a link back to a folder already on the walk (``loop -> ..``) or a
    second link to the same folder is skipped, so a loop cannot make the walk endless."""
    by_name: dict[str, str] = {}
    by_stem: dict[str, str] = {}
    seen = {_dir_id(str(video_root))}
    for dirpath, dirnames, filenames in os.walk(video_root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            key = _dir_id(os.path.join(dirpath, d))
            if key is not None and key not in seen:
                seen.add(key)
                keep.append(d)
        dirnames[:] = keep
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
    once = LabelOnce()
    for n, label, stem in rows:
        idx = to_label(label)
        if idx is None:
            raise DatasetError(f"{what} {path} line {n}: label {label!r} is not one of the classes")
        found = by_name.get(stem + ".mp4") or by_stem.get(stem) or os.path.join(video_root, stem + ".mp4")
        first = once.clash(stem, idx, n)
        if first is not None:
            raise DatasetError(f"{what} {path} line {n}: video {stem!r} is listed again with label {label!r}, but "
                               f"line {first[1]} gives it another label; a video has one label: fix one line")
        items.append(VideoItem(abs_path(found), idx))
    return items


def load_k400(args: DatasetArgs) -> DatasetSpec:
    video_root, classes = args.video_root, args.classes
    train_list, val_list, test_list = args.train_list, args.val_list, args.test_list
    root = args.root("k400")
    search = [root, root / "annotations"] if root is not None else []

    def find(names):
        return find_file(search, names)

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
    vroot = find_video_root("k400", video_root, root, ["videos"], "the folder holding the videos")

    if str(train).lower().endswith(".txt"):  # `path label` lists: only the lists given (not the official CSVs)
        return spec_from_lists("k400", vroot, train, val_list, test_list, classes, default_classes="k400",
                        check_folders=True)

    if classes is not None:
        names, cls_src = resolve_classes(classes, None)
        lookup = {norm_name(c): i for i, c in enumerate(names)}
        to_label = lambda lab: lookup.get(norm_name(lab))  # noqa: E731
    else:
        rows = csv_rows["train"] = _read_k400_csv(train, "train list")[0]
        raw = sorted({lab for _, lab, _ in rows})  # official ids: sorted raw labels
        names = [_k400_name(lab) for lab in raw]
        shipped = builtin_classnames("k400")
        if set(names) == set(shipped):
            names = shipped  # the full 400: official ids even if the CSV spells them differently
            cls_src = str(CLASSNAMES_DIR / "k400.txt")
        else:
            cls_src = abs_path(train)
        lookup = {norm_name(c): i for i, c in enumerate(names)}
        to_label = lambda lab: lookup.get(norm_name(lab))  # noqa: E731

    index = _index_videos(vroot)

    def read(split, lst):
        if str(lst).lower().endswith(".txt"):
            return read_video_list(lst, vroot, len(names), split=split, classes=names)
        rows = csv_rows.get(split) or _read_k400_csv(lst, f"{split} list")[0]
        return _k400_items(lst, f"{split} list", rows, str(vroot), index, to_label)

    splits, sources = read_splits({"train": train, "val": val, "test": test}, read, cls_src)
    return DatasetSpec("k400", list(names), splits, abs_path(vroot), sources)


register_dataset("k400", load_k400, help="Kinetics-400: the official CSVs, videos <youtube_id>_<start>_<end>.mp4",
                 layout="""
  DATA_ROOT/train.csv, validate.csv   the official annotation CSVs (label,youtube_id,time_start,time_end,split),
                                      also found under DATA_ROOT/annotations/; test.csv is used when it has labels
  DATA_ROOT/videos/                   the clips, flat or in class folders, named <youtube_id>_<start:06d>_<end:06d>.mp4
                                      (any of .mp4 .mkv .webm .avi ...)
  The CSVs and clips come with the Kinetics release (DeepMind) and the CVDF mirror's k400 download
  (github.com/cvdfoundation/kinetics-dataset), which keeps these names.""")
