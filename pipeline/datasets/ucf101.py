"""UCF-101: `classInd.txt`, `trainlist0N.txt`, `testlist0N.txt` (1-based labels); the testlist is
split "val", as the mmaction2 / Text4Vis UCF lists call it."""

from __future__ import annotations

import os

from cache.errors import DatasetError
from pipeline.datasets.core import (DatasetArgs, DatasetSpec, VideoItem, abs_path, as_int, find_video_root,
                                    first_existing, norm_name, read_splits, read_text, register_dataset,
                                    resolve_classes, text_lines)
from pipeline.datasets.lists import read_video_list

__all__ = ["load_ucf101"]


def _read_class_ind(path) -> list[str]:
    text = read_text(path, "ucf101 class index")
    names: dict[int, tuple[str, int]] = {}
    for n, line in text_lines(text, comments=False):
        fields = line.split()
        where = f"ucf101 class index {path} line {n}"
        if len(fields) != 2 or as_int(fields[0]) is None:
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
    text = read_text(path, what)
    folder = {norm_name(c): i for i, c in enumerate(names)}
    items = []
    for n, line in text_lines(text):
        where = f"{what} {path} line {n}"
        fields = line.split()
        if len(fields) > 2:
            raise DatasetError(f"{where}: expected `Class/video.avi [label]`, got {len(fields)} fields")
        rel = fields[0]
        cls = rel.replace("\\", "/").split("/")[0] if "/" in rel.replace("\\", "/") else ""
        from_folder = folder.get(norm_name(cls))
        if len(fields) == 2:
            lab = as_int(fields[1])
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


def load_ucf101(args: DatasetArgs) -> DatasetSpec:
    video_root, classes, split_id = args.video_root, args.classes, args.split_id
    train_list = args.train_list
    root = args.root("ucf101")
    ann = None
    if root is not None:
        ann = first_existing([root / "ucfTrainTestlist" / "classInd.txt", root / "classInd.txt"])
        ann = ann.parent if ann is not None else None
    if train_list is None and ann is None:
        where = f" in {root} or {root / 'ucfTrainTestlist'}" if root is not None else ""
        raise DatasetError(f"ucf101 needs classInd.txt and trainlist0{split_id}.txt{where} (give data_root), or train_list")
    vroot = find_video_root("ucf101", video_root, root, ["UCF-101"], "the UCF-101 folder")

    if classes is not None:
        names, cls_src = resolve_classes(classes, None)
    elif ann is not None:
        cls_src = abs_path(ann / "classInd.txt")
        names = _read_class_ind(cls_src)
    else:
        names, cls_src = resolve_classes(None, "ucf101")

    given = args.lists()
    lists = dict(given)
    official = {"train": f"trainlist0{split_id}.txt", "val": f"testlist0{split_id}.txt"}
    for split, name in official.items():
        if lists[split] is None and ann is not None and (split == "train" or (ann / name).exists()):
            lists[split] = ann / name

    def read(split, lst):
        if given[split] is not None:
            return read_video_list(lst, vroot, len(names), split=split, classes=names)
        return _read_ucf_split(lst, f"ucf101 {split} list", str(vroot), names)

    splits, sources = read_splits(lists, read, cls_src)
    return DatasetSpec("ucf101", names, splits, abs_path(vroot), sources)


register_dataset("ucf101", load_ucf101, split_ids=(1, 2, 3),
                 help="UCF-101: classInd.txt, trainlist0N.txt, testlist0N.txt",
                 layout="""
  DATA_ROOT/ucfTrainTestlist/classInd.txt, trainlist01.txt, testlist01.txt (02, 03)   the official split lists
  DATA_ROOT/UCF-101/<ClassName>/v_<ClassName>_gXX_cYY.avi                            the videos
  Both are UCF's own archives (UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip, from the CRCV site).""")
