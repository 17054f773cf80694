"""The generic list format (mmaction2 / EVL / Text4Vis), shared by every layout that takes lists.

A line is `relative/path.mp4 <label>` or, for a folder of frames, `dir <num_frames> <label>`.
The label is the last field and, in the frame-folder form, the frame count the one before it,
so a video path may contain spaces (Kinetics class folders such as `air drumming/x.mp4`).
`demo` and `custom` read only such lists; the built-in layouts read them when a `.txt` list is
given explicitly.
"""

from __future__ import annotations

import os

from cache.errors import DatasetError
from pipeline.datasets.core import (VIDEO_EXTENSIONS, DatasetSpec, LabelOnce, VideoItem, abs_path, as_int, norm_name,
                                    read_splits, read_text, resolve_classes, text_lines)

__all__ = ["read_video_list", "spec_from_lists"]


def read_video_list(path, video_root, num_classes, *, split: str | None = None, classes=None) -> list[VideoItem]:
    """Read an mmaction2-style list: `path label` or `dir num_frames label` per line.

    `split` only names the list in messages ("train list ..."). With `classes` (built-in
    datasets only), a video inside a folder named like a class must carry that class's label;
    this catches the 1-based official UCF-101 lists passed where 0-based labels are expected.
    """
    what = f"{split} list" if split else "video list"
    text = read_text(path, what)
    if num_classes <= 0:
        raise DatasetError(f"{what} {path}: there are no classes to label videos with")
    root = abs_path(video_root) if video_root is not None else os.path.dirname(abs_path(path))
    folder_class = _folder_class_map(classes) if classes else {}
    items: list[VideoItem] = []
    once = LabelOnce()  # full path -> (label, line): one video, one label
    for n, line in text_lines(text):
        where = f"{what} {path} line {n}"
        fields = line.split()
        if len(fields) < 2:
            raise DatasetError(f"{where}: expected `path label` or `dir num_frames label`, got one field {line!r}")
        head, label_tok = line.rsplit(None, 1)
        label = as_int(label_tok)
        if label is None:
            raise DatasetError(f"{where}: label {label_tok!r} is not an integer")
        num_frames = None
        rel = head
        if len(fields) >= 3 and as_int(fields[-2]) is not None:
            rel, frames_tok = head.rsplit(None, 1)
            num_frames = int(frames_tok)
            if len(rel.split()) > 1 and as_int(rel.split()[-1]) is not None:
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
        first = once.clash(full, label, n)
        if first is not None:
            raise DatasetError(f"{where}: {rel!r} is listed again with label {label}, but line {first[1]} gives it "
                               f"label {first[0]}; a video has one label: remove or fix one of the two lines")
        items.append(VideoItem(full, label, num_frames))
    if not items:
        raise DatasetError(f"{what} {path}: no videos listed (the file is empty or holds only blank and comment lines)")
    return items


def _folder_class_map(classes) -> dict[str, int]:
    out: dict[str, int] = {}
    clash: set[str] = set()
    for i, c in enumerate(classes):
        k = norm_name(c)
        if k in out:
            clash.add(k)
        out[k] = i
    return {k: v for k, v in out.items() if k and k not in clash}


def _check_folder(where: str, rel: str, label: int, classes, folder_class: dict[str, int]) -> None:
    folder = os.path.basename(os.path.dirname(rel.replace("\\", "/")))
    idx = folder_class.get(norm_name(folder))
    if idx is not None and idx != label:
        raise DatasetError(
            f"{where}: label {label} is class {classes[label]!r} but the video is in folder {folder!r}, "
            f"which is class {idx} (labels shifted? official UCF-101 lists are 1-based: give data_root instead)"
        )


def spec_from_lists(name, video_root, train, val, test, classes, *, default_classes=None, check_folders=False) -> DatasetSpec:
    """A dataset read from `path label` lists alone. ``classes`` resolves as in
    `resolve_classes` (falling back to the shipped ``default_classes``); ``check_folders`` checks
    that a video in a folder named like a class carries that class's label."""
    resolved = resolve_classes(classes, default_classes)
    if resolved is None:
        raise DatasetError(f"{name} needs a class file (classes=...)")
    names, cls_src = resolved
    splits, sources = read_splits(
        {"train": train, "val": val, "test": test},
        lambda split, lst: read_video_list(lst, video_root, len(names), split=split,
                                           classes=names if check_folders else None),
        cls_src)
    return DatasetSpec(name, names, splits, abs_path(video_root), sources)

