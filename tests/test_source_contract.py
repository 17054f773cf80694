"""One contract, every cache back-end (cache/source.py CacheSource): a real Zarr cache and its
WebDataset export, opened through stages/data/open.py, must give the same metadata, labels,
status, specs and array values, each checked against what was extracted (the dataset's lists,
the videos that could not be decoded, the bytes in the Zarr chunks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.errors import CacheError
from cache.meta import CacheMeta
from cache.quant import QUANT_SUFFIXES, dequantize_int8
from cache.source import DONE, FAILED, ArraySpec, CacheSource
from cache.store import FeatureStore
from cache.wds import WdsCache, export_wds
from conftest import extract_in_process
from stages.data.open import is_wds, open_source, split_dataset
from stages.data.wds_split import WdsSource, WdsSplit
from stages.data.zarr_split import CacheSplit, HeadInputs, select_videos
from stages.heads import DataKeys

BACKENDS = ("zarr", "wds")
BAD = {"truncated.mp4", "missing.mp4"}  # train videos that cannot be decoded: FAILED everywhere


@pytest.fixture(scope="module", params=["fp16", "int8"])
def made(request, demo_small, tmp_path_factory):
    """A cache with every array kind, 2 views per video and two undecodable train videos, extracted
    for real, and its WebDataset export (several shards per split)."""
    from pipeline.datasets import load_dataset

    tmp = tmp_path_factory.mktemp(f"contract_{request.param}")
    root = Path(demo_small.video_root)
    lines = demo_small.train_list.read_text().splitlines()
    good = (root / lines[0].split()[0]).read_bytes()
    (tmp / "truncated.mp4").write_bytes(good[: len(good) // 3])
    lines[1:1] = [f"{tmp}/truncated.mp4 1", f"{tmp}/missing.mp4 2"]
    (tmp / "train.txt").write_text("\n".join(lines) + "\n")
    spec = load_dataset("custom", video_root=root, train_list=tmp / "train.txt", val_list=demo_small.val_list,
                        classes=demo_small.classes_file)
    extract_in_process(spec, tmp / "cache", layers="all", patch=True, store_frames=True, views="2x1", train_views="2x1",
                       text="clip_single", shard_size=3, dtype=request.param)
    export_wds(FeatureStore(tmp / "cache"), tmp / "wds", name="c", shard_bytes="60KB")
    return {"spec": spec, "zarr": tmp / "cache", "wds": tmp / "wds" / "c-header.json", "dtype": request.param}


@pytest.fixture(params=BACKENDS)
def source(request, made) -> CacheSource:
    return open_source(made[request.param])


def _stored(made) -> dict:
    """The metadata as written into the cache's zarr.json."""
    return json.loads((made["zarr"] / "zarr.json").read_text())["attributes"]["clipcache"]


def _raw(made, split: str, name: str) -> np.ndarray:
    """Every video's array straight from the Zarr chunks (int8 dequantised the one way it is)."""
    import zarr

    root = zarr.open_group(str(made["zarr"]), mode="r")
    spec = next(ArraySpec.from_json(d) for d in _stored(made)["splits"][split]["arrays"] if d["name"] == name)
    if spec.dtype == "int8":
        return dequantize_int8({s: root[f"{split}/{name}/{s}"][:] for s in QUANT_SUFFIXES})
    data = root[f"{split}/{name}"][:]
    return data if spec.dtype == "uint8" else data.astype(np.float32)


def test_backend_declares_and_implements_the_contract(source):
    assert CacheSource in type(source).__mro__
    members = ("key", "splits", "source_id", "specs", "num_videos", "labels", "status", "failures", "read",
               "text_names", "text", "aux_names", "aux")
    not_implemented = [m for m in members if getattr(type(source), m) is CacheSource.__dict__[m]]
    assert not not_implemented, f"{type(source).__name__} leaves {not_implemented} to the protocol's stub"


def test_metadata(source, made):
    stored = _stored(made)
    assert source.meta == stored
    assert source.info == CacheMeta.from_dict(stored) and source.info.to_dict() == stored
    assert source.key == source.info.key == source.info.content.key()  # the key recomputes from its content
    assert source.splits == ["train", "val"]
    assert source.info.dims.depth == 2 and source.info.layers == [1, 2] and source.info.dtype == made["dtype"]
    assert source.info.views["train"].clips == 2 and source.info.config.store_frames
    assert source.class_names() == list(made["spec"].classes) == source.info.dataset.classes


def test_labels_status_counts_failures(source, made):
    for split, items in made["spec"].splits.items():
        assert source.num_videos(split) == len(items)
        labels = source.labels(split)
        assert labels.dtype == np.int64 and labels.tolist() == [it.label for it in items]
        bad = [i for i, it in enumerate(items) if Path(it.path).name in BAD]
        status = source.status(split)
        assert status.dtype == np.int8
        assert np.flatnonzero(status == FAILED).tolist() == bad
        assert (np.delete(status, bad) == DONE).all()
        assert source.counts(split) == {"done": len(items) - len(bad), "failed": len(bad), "pending": 0}
        fails = source.failures(split)
        assert sorted(f["index"] for f in fails) == bad and all(f["reason"] for f in fails)
    assert len(source.failures("train")) == 2


def test_specs(source, made):
    T, D, E, L, P, S = 8, 64, 32, 2, 16, 32
    feat = made["dtype"] if made["dtype"] == "int8" else "float16"
    for split in source.splits:
        specs = source.specs(split)
        assert specs == {d["name"]: ArraySpec.from_json(d) for d in _stored(made)["splits"][split]["arrays"]}
        assert {n: (s.shape, s.dtype) for n, s in specs.items()} == {
            "frame_emb": ((2, T, E), "float16"), "cls": ((2, T, L, D), feat), "patch": ((2, T, L, P, D), feat),
            "frames": ((2, T, S, S, 3), "uint8")}
        assert source.has(split, "patch") and not source.has(split, "view_params")


def test_array_values(source, made):
    for split in source.splits:
        done = np.flatnonzero(source.status(split) == DONE)
        for name, spec in source.specs(split).items():
            raw = _raw(made, split, name)
            got = source.read(split, name, done)
            assert got.dtype == (np.uint8 if spec.dtype == "uint8" else np.float32)
            assert got.shape == (len(done), *spec.shape)
            np.testing.assert_array_equal(got, raw[done])
            assert np.isfinite(got).all() and got.any()
        # one video; rows out of order with one twice: the same rows
        i = int(done[-1])
        np.testing.assert_array_equal(source.read(split, "cls", i), _raw(made, split, "cls")[i])
        rows = done[[2, 0, 2, 1]]
        np.testing.assert_array_equal(source.read(split, "frame_emb", rows), _raw(made, split, "frame_emb")[rows])


def test_text_and_aux(source, made):
    ref = FeatureStore(made["zarr"])
    assert source.text_names() == ["clip_single"]
    text = source.text("clip_single")
    assert text.dtype == np.float32 and text.shape == (len(made["spec"].classes), 32)
    np.testing.assert_array_equal(text, ref.text("clip_single"))
    assert source.aux_names() == ref.aux_names() and source.aux_names()
    for name in source.aux_names():
        np.testing.assert_array_equal(source.aux(name), ref.aux(name))


def test_split_dataset_gives_the_same_eval_items(made):
    """What stage two reads, through stages/data/open.py: the same items from either back-end."""
    keys = DataKeys(frame_emb=True, cls_layers=(1,), patch_layers=(-1,), frames=True)
    got = {}
    for backend in BACKENDS:
        src = open_source(made[backend])
        idx = select_videos(src, "val")
        data = split_dataset(src, HeadInputs(src, keys, "val"), idx, train=False)
        assert isinstance(data, WdsSplit if backend == "wds" else CacheSplit)
        items = list(data.ordered()) if backend == "wds" else [data[i] for i in range(len(data))]
        got[backend] = items
    assert len(got["zarr"]) == len(got["wds"]) == 8
    for a, b in zip(got["zarr"], got["wds"]):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(torch.as_tensor(a[k]), torch.as_tensor(b[k]), rtol=0, atol=0)


def test_open_source_decides_in_one_place(made, tmp_path):
    assert type(open_source(made["zarr"])) is FeatureStore and not is_wds(made["zarr"])
    wds = open_source(made["wds"])
    assert isinstance(wds, WdsSource) and isinstance(wds, WdsCache) and is_wds(str(made["wds"]))
    # a run trained from shards recorded its source id: that decides, whatever the spelling
    assert isinstance(open_source(f"file:{made['wds']}", source_id=wds.source_id), WdsSource)
    # a pattern of train shards: only those are read, the header is found beside them
    first = sorted(made["wds"].parent.glob("c-train-*.tar"))[0]
    narrowed = open_source(str(first))
    assert isinstance(narrowed, WdsSource) and narrowed.shard_urls("train") == [str(first)]
    assert narrowed.counts("train")["done"] < FeatureStore(made["zarr"]).counts("train")["done"]
    opened = FeatureStore(made["zarr"])
    assert open_source(opened) is opened
    with pytest.raises(CacheError, match="no cache at"):
        open_source(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="not a clipcache store"):
        open_source(tmp_path / "empty")
