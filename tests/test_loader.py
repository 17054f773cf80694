"""Stage two's loader (stages/data/loader.py): stored bytes read by row runs, converted on the device.

The reference everywhere is the old path, kept reachable: CacheSplit / WdsSplit items (float32
per video, FeatureStore.read + view_tensor) stacked by a torch DataLoader. The new loader must
yield exactly those tensors, batch by batch, for fp16 and int8 caches, Zarr and WebDataset,
every kind of array (frame_emb, cls and patch layers, uint8 frames, a view bank).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import stages.evaluate
import stages.train as T
from cache.quant import dequantize_int8, quantize_int8
from cache.source import ArraySpec
from cache.store import DONE, create_store, open_store
from cache.wds import export_wds
from conftest import extracted_store
from stages.data.loader import (CacheLoader, WdsLoader, ZarrBatches, block_order, dequantize_int8_torch, epoch_plan,
                           eval_loader, train_loader)
from stages.data.wds_split import open_wds_source
from stages.data.zarr_split import CacheSplit, HeadInputs, select_videos
from stages.dist import rank_batches
from stages.heads import DataKeys

# every array kind, layers out of order (positions are picked, not a range)
KEYS = DataKeys(frame_emb=True, cls_layers=(-1, 1), patch_layers=(2, -1), frames=True)


def _extract(spec, out, **cfg):
    return extracted_store(spec, out, **{"text": "none", "layers": "all", "patch": True, "store_frames": True,
                                         "shard_size": 4, **cfg})


@pytest.fixture(scope="module")
def spec(demo_small):
    from pipeline.datasets import load_dataset

    return load_dataset("demo", data_root=demo_small.root)


@pytest.fixture(scope="module")
def fp16_bank(spec, tmp_path_factory):
    """fp16, a view bank of 2 train views, 2 eval views: the drawn view matters."""
    return _extract(spec, tmp_path_factory.mktemp("ld16") / "cache", train_aug=2, views="2x1")


@pytest.fixture(scope="module")
def int8_cache(spec, tmp_path_factory):
    return _extract(spec, tmp_path_factory.mktemp("ld8") / "cache", dtype="int8")


def _old_batches(data, plan, masked=True):
    """The old path: per-video float32 items, stacked by a DataLoader (train.py before the loader)."""
    ds = T._Masked(data) if masked else data
    return list(DataLoader(ds, batch_sampler=plan, collate_fn=T.collate_items))


def _same(got: dict, want: dict, what=""):
    assert got.keys() == want.keys(), what
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (what, k)
        assert torch.equal(got[k], want[k]), (what, k)


@pytest.mark.parametrize("which", ["fp16_bank", "int8_cache"])
def test_zarr_batches_equal_the_old_path(which, request):
    st = request.getfixturevalue(which)
    for split, train in (("train", True), ("val", False)):
        idx = select_videos(st, split)
        inputs = HeadInputs(st, KEYS, split)
        ref = CacheSplit(st, inputs, idx, train=train, label_map={0: 3, 1: 2, 2: 1, 3: 0})
        new = CacheSplit(st, inputs, idx, train=train, label_map={0: 3, 1: 2, 2: 1, 3: 0}, preload=False)
        assert ref.views == (2 if which == "fp16_bank" else 1)
        sources = {p: ZarrBatches(new, p) for p in ("off", "on")}  # one reader (and worker pool) for all epochs
        for epoch in ((0, 3) if train else (0,)):
            for ds in (ref, new):
                ds.set_epoch(epoch, seed=5)
            # two ranks' share of batches of 5: padding (-1) included
            plan = epoch_plan(len(idx), 5, 2, 1, 5, epoch, "full") if train else \
                [list(range(i, min(i + 4, len(idx)))) for i in range(0, len(idx), 4)]
            assert not train or any(-1 in b for b in plan)
            want = _old_batches(ref, plan, masked=train)
            for preload, workers in (("off", 0), ("on", 0), ("off", 2)):
                got = list(CacheLoader(sources[preload], plan, "cpu", workers=workers, masked=train,
                                       seed=new.epoch_seed))
                assert len(got) == len(want)
                for g, w in zip(got, want):
                    _same(g, w, (which, split, epoch, preload, workers))
    if which == "fp16_bank":  # the drawn views differ between epochs: the pick is really exercised
        tr = CacheSplit(st, HeadInputs(st, KEYS, "train"), select_videos(st, "train"), train=True)
        drawn = set()
        for e in range(8):
            tr.set_epoch(e, 5)
            drawn.add(tr[0]["frame_emb"].numpy().tobytes())
        assert len(drawn) == 2


@pytest.mark.parametrize("which", ["fp16_bank", "int8_cache"])
def test_wds_batches_equal_the_old_path(which, request, tmp_path):
    st = request.getfixturevalue(which)
    export_wds(st, tmp_path, name="x", shard_bytes="60KB")
    src = open_wds_source(str(tmp_path / "x-header.json"), shuffle=4)
    for split, train in (("train", True), ("val", False)):
        idx = select_videos(src, split)
        data = src.split_dataset(HeadInputs(src, KEYS, split), idx, train=train)
        assert len(data.urls) > 1
        data.set_epoch(2, seed=1)
        for workers in (0, 2):
            want = list(DataLoader(data, batch_size=3, collate_fn=T.collate_items, num_workers=workers))
            got = list(WdsLoader(data, 3, "cpu", workers=workers))
            assert len(got) == len(want) > 1
            for g, w in zip(got, want):
                _same(g, w, (which, split, workers))
        # and the streamed batches are the Zarr cache's items (same videos, views, values)
        zarr_items = CacheSplit(st, HeadInputs(st, KEYS, split), idx, train=train)
        zarr_items.set_epoch(2, seed=1)
        by_label_emb = {zarr_items[i]["frame_emb"].numpy().tobytes(): i for i in range(len(idx))}
        for batch in WdsLoader(data, 3, "cpu"):
            for b in range(len(batch["label"])):
                i = by_label_emb[batch["frame_emb"][b].numpy().tobytes()]
                for k, v in zarr_items[i].items():
                    assert torch.equal(batch[k][b], v), (which, split, k)


def test_read_rows_reads_stored_bytes_in_any_order(tmp_path):
    """read_rows (straight from the shard files) == zarr's values, stored dtype, unwritten rows = fill."""
    arrays = [ArraySpec("patch", (2, 3, 4, 5, 16), "int8", layer_axis=2), ArraySpec("cls", (2, 3, 4, 16), "float16"),
              ArraySpec("p16", (2, 3, 4, 5, 16), "float16", layer_axis=2), ArraySpec("frames", (2, 3, 6, 6, 3), "uint8")]
    st = create_store(tmp_path / "c", {"key": "k", "int8_outliers": 4},
                      {"train": {"items": [(f"v{i}", i % 3) for i in range(11)], "arrays": arrays}}, 4)
    rng = np.random.default_rng(0)
    for shard in (0, 2):  # shard 1 (rows 4-7) never written
        a, b = st.shard_range("train", shard)
        data = {n: (rng.integers(0, 255, (b - a, *s.shape)).astype(np.uint8) if s.dtype == "uint8"
                    else rng.standard_normal((b - a, *s.shape)).astype(np.float32)) for n, s in st.specs("train").items()}
        st.write_shard("train", shard, data, np.full(b - a, DONE, np.int8), [])
    st = open_store(st.path)
    rows = np.array([9, 0, 2, 2, 1, 10, 5, 3])
    for name in ("patch", "cls", "p16", "frames"):
        for layers in ((None, [3, 1], [0, 1, 2]) if name != "frames" else (None,)):
            got = st.read_rows("train", name, rows, layers)
            if name == "patch":
                assert {k: v.dtype for k, v in got.items()} == {"q": np.int8, "scale": np.float16,
                                                                "oidx": np.int16, "oval": np.float16}
                raw = {p: st._array(f"train/patch/{p}").oindex[(rows, slice(None), slice(None), layers or slice(None))]
                       for p in got}
                for p in got:
                    np.testing.assert_array_equal(got[p], raw[p])
                got = dequantize_int8(got)
            else:
                assert got.dtype == st.specs("train")[name].dtype
            want = st.read("train", name, rows, dtype=np.float32 if name != "frames" else None, layers=layers)
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert np.isnan(st.read_rows("train", "p16", [5])).all()
    assert all(st._raw(k).direct for k in ("train/patch/q", "train/cls", "train/frames"))


def test_torch_dequantisation_is_numpys():
    x = np.random.default_rng(1).standard_normal((3, 5, 64)).astype(np.float32)
    x[..., 7] *= 50
    parts = quantize_int8(x)
    got = dequantize_int8_torch(*(torch.from_numpy(parts[p]) for p in ("q", "scale", "oidx", "oval")))
    assert torch.equal(got, torch.from_numpy(dequantize_int8(parts)))


def test_block_order_keeps_runs_and_is_a_permutation():
    n, B = 200, 8
    order = block_order(n, seed=0, epoch=1, block=B, window=4 * B)
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, block_order(n, 0, 1, B, 4 * B))
    assert not np.array_equal(order, block_order(n, 0, 2, B, 4 * B))
    # each window of 4 blocks draws from exactly 4 blocks of consecutive rows
    for s in range(0, n - 4 * B, 4 * B):
        assert len({int(i) // B for i in order[s:s + 4 * B]}) == 4
    plan = epoch_plan(n, B, 1, 0, 0, 1, "block")
    assert sorted(i for b in plan for i in b) == list(range(n))
    assert epoch_plan(n, B, 1, 0, 0, 1, "full") == rank_batches(n, B, 1, 0, 0, 1, shuffle=True)


def test_training_with_the_new_loader_equals_the_old_path(fp16_bank, tmp_path, monkeypatch):
    """EVL (patch + cls layers, a view bank) for 2 epochs: the new loader against the old
    DataLoader path (put back in train.py for the reference run) gives the same losses and metrics."""
    cfg = T.TrainCfg(head="evl", epochs=2, batch_size=4, lr=1e-3, device="cpu", seed=2, warmup_epochs=0)
    over = {"num_layers": 1}
    new = T.train_head(fp16_bank, cfg, over, run_dir=tmp_path / "new", progress=False, log=lambda *a: None)
    wk = T.train_head(fp16_bank, dataclasses.replace(cfg, workers=2, preload="off"), over, run_dir=tmp_path / "wk",
                      progress=False, log=lambda *a: None)

    def old_eval(data, batch_size, device, workers=0, preload="auto"):
        return DataLoader(data, batch_size=batch_size, collate_fn=T.collate_items)

    def old_train(data, plan, device, workers=0, preload="auto", masked=True, batch_size=0, drop_last=False):
        # CacheSplit items (FeatureStore.read as float32 + view_tensor), stacked by a DataLoader
        return DataLoader(T._Masked(data), batch_sampler=plan, collate_fn=T.collate_items)

    monkeypatch.setattr(T, "train_loader", old_train)
    monkeypatch.setattr(stages.evaluate, "eval_loader", old_eval)
    old = T.train_head(fp16_bank, cfg, over, run_dir=tmp_path / "old", progress=False, log=lambda *a: None)
    for got in (new, wk):
        np.testing.assert_allclose([h["train_loss"] for h in got["history"]],
                                   [h["train_loss"] for h in old["history"]], rtol=1e-5)
        for k in ("top1", "top5", "mean_class"):
            assert got["final"][k] == pytest.approx(old["final"][k], abs=1e-6)


def test_bad_loader_options_are_one_line(fp16_bank, tmp_path):
    from cache.errors import ConfigError

    for key, value in (("shuffle", "blocks"), ("preload", "yes")):
        with pytest.raises(ConfigError, match=key):
            T.train_head(fp16_bank, T.TrainCfg(head="tap", epochs=1, **{key: value}), run_dir=tmp_path / "r",
                         progress=False, log=lambda *a: None)


def test_eval_loader_takes_a_ranks_subset(int8_cache):
    idx = select_videos(int8_cache, "val")
    data = CacheSplit(int8_cache, HeadInputs(int8_cache, KEYS, "val"), idx, train=False, preload=False)
    sub = torch.utils.data.Subset(data, range(1, len(data), 2))
    got = torch.cat([b["label"] for b in eval_loader(sub, 2, "cpu")])
    assert got.tolist() == [int(data.labels[i]) for i in range(1, len(data), 2)]
    assert train_loader(data, [[0, -1]], "cpu").__class__ is CacheLoader


def test_serial_slots_are_reused_across_epochs_and_never_shared_by_live_iterators(int8_cache):
    idx = select_videos(int8_cache, "train")
    data = CacheSplit(int8_cache, HeadInputs(int8_cache, KEYS, "train"), idx, train=True, preload=False)
    src = ZarrBatches(data, "off")
    plan = [[0, 1], [2, 3], [1, 0]]
    # each epoch's first batch kept alive: fresh buffers could not share an address
    firsts = [next(iter(CacheLoader(src, plan, "cpu", raw=True)))["patch.q"] for _ in range(2)]
    assert firsts[0].data_ptr() == firsts[1].data_ptr()  # the second epoch refills the first one's buffer
    alone = [dict(b) for b in CacheLoader(src, plan, "cpu")]
    a, b = iter(CacheLoader(src, plan, "cpu")), iter(CacheLoader(src, plan[::-1], "cpu"))
    got_a, got_b = [], []
    for _ in plan:  # interleaved: each batch converted while the other iterator holds its slot
        got_a.append(next(a))
        got_b.append(next(b))
    for g, w in zip(got_a, alone):
        _same(g, w, "a")
    for g, w in zip(got_b, alone[::-1]):
        _same(g, w, "b")
    wider = list(CacheLoader(src, [[0, 1, 2]], "cpu", raw=True))  # more rows than the kept slots: new ones
    assert wider[0]["patch.q"].shape[0] == 3
