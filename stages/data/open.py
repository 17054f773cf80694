"""Open what stage two reads: a Zarr cache folder or a WebDataset export, as one declared source.

The one place that tells the back-ends apart (cache/source.py ``CacheSource`` is what both
answer). A folder is a Zarr cache; a WebDataset export is named by its header
(``NAME-header.json``), by shard files or patterns (``NAME-train-{000000..000003}.tar``), or, for
a run's own data, by the source id the run recorded (``wds:...``, whatever the spelling of the
location). Headers and shards may be paths, URLs or ``pipe:`` commands.

``split_dataset`` builds the torch dataset of one split's selected videos: a map-style
``CacheSplit`` over random-access reads, or a streaming ``WdsSplit`` that shuffles through a buffer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cache.source import CacheSource
from cache.store import open_store
from stages.data.wds_split import WdsSource, open_wds_source
from stages.data.zarr_split import CacheSplit

__all__ = ["is_wds", "open_source", "split_dataset"]


def is_wds(location: str | os.PathLike, source_id: str = "") -> bool:
    """Whether ``location`` names a WebDataset export (else a Zarr cache folder)."""
    if source_id.startswith("wds:"):
        return True
    text = str(location)
    if "://" not in text and not text.startswith("pipe:") and Path(text).is_dir():
        return False
    return text.endswith((".json", ".tar")) or "::" in text or text.startswith("pipe:")


def open_source(location: str | os.PathLike | CacheSource, source_id: str = "", *, header: str | None = None,
                eval_shards: str | None = None, train_split: str = "train", eval_split: str = "val",
                shuffle: int = 0, resample: bool = False) -> CacheSource:
    """A cache (a folder) or an export (its header, or shards of ``train_split``; the other options
    apply to exports only: stages/data/wds_split.py ``open_wds_source``). An open source is returned
    as it is. ``source_id``: what a run recorded as its source (``wds:`` for shards)."""
    if not isinstance(location, (str, os.PathLike)):
        return location
    if header or eval_shards or is_wds(location, source_id):
        return open_wds_source(str(location), header=header, eval_spec=eval_shards, train_split=train_split,
                               eval_split=eval_split, shuffle=shuffle, resample=resample)
    return open_store(location)


def split_dataset(source: CacheSource, inputs, indices: np.ndarray, train: bool,
                  label_map: dict[int, int] | None = None):
    """The selected videos ``indices`` of one split (``inputs``: what the head reads, a
    stages.data.zarr_split.HeadInputs) as a torch dataset: streamed from shards for an export opened
    for streaming, else read per video."""
    if isinstance(source, WdsSource):
        return source.split_dataset(inputs, indices, train=train, label_map=label_map)
    return CacheSplit(source, inputs, indices, train=train, label_map=label_map, preload=False)
