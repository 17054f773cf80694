"""Dataset definitions: which videos, with which labels, in which splits.

Every layout is one module of this package that registers itself (`register_dataset`); they
are all imported here, so `load_dataset(name, ...)` and `--dataset` know every one of them.
A layout defined elsewhere (a test, a user's plugin) registers the same way and is then loaded
by name like the built-ins. The types a layout builds (`DatasetSpec`, `VideoItem`) live in
cache/datasets.py, where stage one can name them.

Built-in layouts: generic `path label` lists (`custom`, and `demo`: what `pipeline demo-data`
writes), `k400` (official CSVs), `ucf101` (classInd / trainlist / testlist), `hmdb51`
(`<class>_test_split<N>.txt`) and `ssv2` (official JSON). Each built-in also reads `.txt` lists
given explicitly.
"""

import importlib
import pkgutil

from pipeline.datasets.core import (  # noqa: F401
    BUILTIN_CLASSES,
    CLASSNAMES_DIR,
    VIDEO_EXTENSIONS,
    DatasetArgs,
    DatasetEntry,
    DatasetSpec,
    VideoItem,
    builtin_classnames,
    get_dataset,
    list_datasets,
    load_dataset,
    read_class_file,
    register_dataset,
)
from pipeline.datasets.lists import read_video_list, spec_from_lists  # noqa: F401

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

from pipeline.datasets.ssv2 import ssv2_class  # noqa: E402

# The built-in layouts (a layout registered later is in list_datasets(), not here).
DATASETS = tuple(list_datasets())
_ssv2_class = ssv2_class  # the name the tests knew it by

__all__ = [
    "DATASETS",
    "DatasetArgs",
    "DatasetEntry",
    "DatasetSpec",
    "VideoItem",
    "builtin_classnames",
    "get_dataset",
    "list_datasets",
    "load_dataset",
    "read_class_file",
    "read_video_list",
    "register_dataset",
    "spec_from_lists",
]
