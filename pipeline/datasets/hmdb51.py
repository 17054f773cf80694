"""HMDB-51: `<class>_test_split<N>.txt` files (1 = train, 2 = test -> split "val", 0 = unused) next to
a folder of videos per class."""

from __future__ import annotations

import re
from pathlib import Path

from cache.errors import DatasetError
from pipeline.datasets.core import (CLASSNAMES_DIR, DatasetArgs, DatasetSpec, VideoItem, abs_path, as_int,
                                    builtin_classnames, find_video_root, norm_name, read_text, register_dataset,
                                    resolve_classes, text_lines)
from pipeline.datasets.lists import spec_from_lists

__all__ = ["load_hmdb51"]


def load_hmdb51(args: DatasetArgs) -> DatasetSpec:
    video_root, classes, split_id = args.video_root, args.classes, args.split_id
    train_list, val_list, test_list = args.train_list, args.val_list, args.test_list
    root = args.root("hmdb51")
    vroot = find_video_root("hmdb51", video_root, root, ["hmdb51_org", "videos"], "the folder of class folders")
    if train_list is not None:
        return spec_from_lists("hmdb51", vroot, train_list, val_list, test_list, classes, default_classes="hmdb51", check_folders=True)
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
        names, cls_src = resolve_classes(classes, None)
        lookup = {norm_name(c): i for i, c in enumerate(names)}
        for cls, f in split_files.items():
            if norm_name(cls) not in lookup:
                raise DatasetError(f"hmdb51 split file {f}: class {cls!r} is not in class file {cls_src}")
        label_of = {cls: lookup[norm_name(cls)] for cls in split_files}
    else:
        folders = sorted(split_files)  # ids: the sorted folder names (`brush_hair`, ...)
        label_of = {cls: i for i, cls in enumerate(folders)}
        # class names as the official list spells them (`brush hair`): the folders use underscores
        spelled = {norm_name(c): c for c in builtin_classnames("hmdb51")}
        names = [spelled.get(norm_name(f)) or " ".join(f.replace("_", " ").split()) for f in folders]
        shipped = builtin_classnames("hmdb51")
        cls_src = str(CLASSNAMES_DIR / "hmdb51.txt") if names == shipped else str(split_files[folders[0]].parent)

    train: list[VideoItem] = []
    val: list[VideoItem] = []
    for cls in sorted(split_files, key=lambda c: label_of[c]):
        f = split_files[cls]
        text = read_text(f, "hmdb51 split file")
        for n, line in text_lines(text, comments=False):
            where = f"hmdb51 split file {f} line {n}"
            fields = line.split()
            if len(fields) != 2:
                raise DatasetError(f"{where}: expected `<video>.avi <0|1|2>`, got {len(fields)} field(s)")
            tag = as_int(fields[1])
            if tag not in (0, 1, 2):
                raise DatasetError(f"{where}: split tag {fields[1]!r} must be 0 (unused), 1 (train) or 2 (test)")
            item = VideoItem(abs_path(Path(vroot) / cls / fields[0]), label_of[cls])
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
    sources.update({f"split/{cls}": abs_path(f) for cls, f in sorted(split_files.items())})
    return DatasetSpec("hmdb51", names, splits, abs_path(vroot), sources)


register_dataset("hmdb51", load_hmdb51, split_ids=(1, 2, 3),
                 help="HMDB-51: <class>_test_split<N>.txt files and a folder per class",
                 layout="""
  DATA_ROOT/testTrainMulti_7030_splits/<class>_test_split1.txt (2, 3)   the official splits (1 train, 2 test, 0 unused)
  DATA_ROOT/hmdb51_org/<class>/<video>.avi                              the videos, a folder per class (or DATA_ROOT/videos/)
  Both are the archives of the HMDB51 page at Brown University (hmdb51_org.rar with one .rar per class,
  test_train_splits.rar).""")
