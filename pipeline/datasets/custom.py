"""The custom layout: your own `path label` lists (see pipeline.datasets.lists) under a video root,
and a class file."""

from __future__ import annotations

from cache.errors import DatasetError
from pipeline.datasets.core import DatasetArgs, DatasetSpec, need_dir, register_dataset
from pipeline.datasets.lists import spec_from_lists

__all__ = ["load_custom"]


def load_custom(args: DatasetArgs) -> DatasetSpec:
    video_root, train_list, val_list, test_list, classes = (
        args.video_root, args.train_list, args.val_list, args.test_list, args.classes)
    missing = [n for n, v in (("video_root", video_root), ("train_list", train_list), ("classes", classes)) if v is None]
    if missing:
        raise DatasetError(f"custom dataset needs {', '.join(missing)} (val_list and test_list are optional)")
    return spec_from_lists("custom", need_dir(video_root, "custom video root"), train_list, val_list, test_list, classes)


register_dataset("custom", load_custom, default_root=False,
                 help="your own `path label` lists: video_root, train_list, classes (val_list, test_list optional)")
