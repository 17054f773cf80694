"""Something-Something v2: the official JSON files; a class is its template with the brackets
removed, a video is `<id>.webm` in the video root."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cache.errors import DatasetError
from pipeline.datasets.core import (DatasetArgs, DatasetSpec, VideoItem, abs_path, as_int, find_file, find_video_root,
                                    norm_name, read_splits, read_text, register_dataset, resolve_classes)
from pipeline.datasets.lists import read_video_list, spec_from_lists

__all__ = ["load_ssv2", "ssv2_class"]


def ssv2_class(template: str) -> str:
    """The class name of a template: the template with its brackets removed."""
    return " ".join(template.replace("[", "").replace("]", "").split())


def _json_array_with_lines(path, what):
    """Parse a JSON array and keep the line each element starts on, for messages."""
    text = read_text(path, what)
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
    text = read_text(path, "ssv2 labels")
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
        i = as_int(str(cid).strip())
        if i is None:
            raise DatasetError(f"ssv2 labels {path} line {line_of(name)}: id {cid!r} of {name!r} is not an integer")
        if i in by_id:
            raise DatasetError(f"ssv2 labels {path} line {line_of(name)}: id {i} used by {by_id[i]!r} and {name!r}")
        by_id[i] = ssv2_class(name)
    k = len(by_id)
    if set(by_id) != set(range(k)):
        bad = min(set(by_id) - set(range(k)))
        raise DatasetError(f"ssv2 labels {path} line {line_of(next(n for n, c in data.items() if int(c) == bad))}: "
                           f"id {bad} out of range; ids must be 0..{k - 1}")
    return [by_id[i] for i in range(k)]


def _ssv2_items(path, what, video_root: Path, names) -> list[VideoItem]:
    exact = {c: i for i, c in enumerate(names)}
    loose = {norm_name(c): i for i, c in enumerate(names)}
    items = []
    entries = _json_array_with_lines(path, what)
    for line, e in entries:
        where = f"{what} {path} line {line}"
        if not isinstance(e, dict) or "id" not in e:
            raise DatasetError(f"{where}: expected an object with an \"id\"")
        if "template" not in e:
            raise DatasetError(f"{where}: video {e['id']} has no \"template\" (the test file carries no labels)")
        cls = ssv2_class(str(e["template"]))
        label = exact.get(cls, loose.get(norm_name(cls)))
        if label is None:
            raise DatasetError(f"{where}: template {e['template']!r} (class {cls!r}) is not in the labels")
        items.append(VideoItem(abs_path(video_root / f"{e['id']}.webm"), label))
    if not items:
        raise DatasetError(f"{what} {path}: no videos listed")
    return items


def load_ssv2(args: DatasetArgs) -> DatasetSpec:
    video_root, classes = args.video_root, args.classes
    train_list, val_list, test_list = args.train_list, args.val_list, args.test_list
    root = args.root("ssv2")
    search = [root, root / "labels", root / "annotations"] if root is not None else []

    def find(names):
        return find_file(search, names)

    train = train_list if train_list is not None else find(["something-something-v2-train.json", "train.json"])
    val = val_list if val_list is not None else find(["something-something-v2-validation.json", "validation.json"])
    if train is None:
        raise DatasetError(
            "ssv2 needs something-something-v2-train.json in data_root (or its labels/ folder), or train_list"
        )
    vroot = find_video_root("ssv2", video_root, root, ["20bn-something-something-v2", "videos"],
                        "the folder of <id>.webm files")
    if str(train).lower().endswith(".txt"):  # `path label` lists: only the lists given (not the official JSON)
        return spec_from_lists("ssv2", vroot, train, val_list, test_list, classes, default_classes="ssv2",
                        check_folders=False)

    if classes is not None and str(classes).lower().endswith(".json"):
        names, cls_src = _read_ssv2_labels(classes), abs_path(classes)
    elif classes is not None:
        names, cls_src = resolve_classes(classes, None)
    else:
        lab = find(["something-something-v2-labels.json", "labels.json"])
        if lab is not None:
            names, cls_src = _read_ssv2_labels(lab), abs_path(lab)
        else:
            names, cls_src = resolve_classes(None, "ssv2")

    def read(split, lst):
        if str(lst).lower().endswith(".txt"):
            return read_video_list(lst, vroot, len(names), split=split)
        return _ssv2_items(lst, f"{split} list", vroot, names)

    splits, sources = read_splits({"train": train, "val": val, "test": test_list}, read, cls_src)
    return DatasetSpec("ssv2", names, splits, abs_path(vroot), sources)


register_dataset("ssv2", load_ssv2, help="Something-Something v2: the official JSON files, videos <id>.webm",
                 flip_swaps=True, layout="""
  DATA_ROOT/labels/something-something-v2-train.json, -validation.json, -labels.json
                                      the official label files (also found in DATA_ROOT or DATA_ROOT/annotations/)
  DATA_ROOT/20bn-something-something-v2/<id>.webm   the videos (or DATA_ROOT/videos/)
  Both come from the official Something-Something v2 download (Qualcomm, formerly 20BN), after accepting its licence.""")
