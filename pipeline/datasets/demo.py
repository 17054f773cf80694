"""The demo layout: what `pipeline demo-data` writes (train.txt, val.txt, test.txt, classes.txt and a
videos/ folder), read as generic lists."""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.core import DatasetArgs, DatasetSpec, need_dir, read_text, register_dataset
from pipeline.datasets.lists import spec_from_lists

__all__ = ["load_demo"]


def load_demo(args: DatasetArgs) -> DatasetSpec:
    data_root, video_root, train_list, val_list, test_list, classes = (
        args.data_root, args.video_root, args.train_list, args.val_list, args.test_list, args.classes)
    root = need_dir(data_root if data_root is not None else Path("data") / "demo", "demo data root")
    train = train_list if train_list is not None else root / "train.txt"
    val = val_list if val_list is not None else (root / "val.txt" if (root / "val.txt").exists() else None)
    test = test_list if test_list is not None else (root / "test.txt" if (root / "test.txt").exists() else None)
    cls = classes if classes is not None else root / "classes.txt"
    if video_root is None:
        video_root = root / "videos"
        # lists written relative to data_root (`videos/x.mp4`) rather than to videos/
        first = next((ln.split()[0] for ln in read_text(train, "train list").splitlines()
                      if ln.strip() and not ln.strip().startswith("#")), "")
        if first.replace("\\", "/").startswith("videos/"):
            video_root = root
    return spec_from_lists("demo", need_dir(video_root, "demo video root"), train, val, test, cls)


# flip_swaps: a mirrored clip of "... rotating clockwise" shows "... rotating counter-clockwise"
# (and "moving left" becomes "moving right"), so a flip in training swaps those labels (cache/flips.py)
register_dataset("demo", load_demo, help="the synthetic demo world (`pipeline demo-data`): lists and classes.txt",
                 flip_swaps=True, layout="""
  DATA_ROOT/train.txt, val.txt, classes.txt   `videos/<name>.mp4 label` lists and one class name per line
  DATA_ROOT/videos/                           the demo's h264 videos
  `make extract DATASET=demo` (or `pipeline demo-data --out DATA_ROOT`) writes them.""")
