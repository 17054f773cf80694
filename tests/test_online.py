"""`train --online` (stages/data/online.py): the train split streamed from the cache's raw videos
through its frozen backbone. The control (--online-aug none) trains exactly as the cache does;
fresh draws change per epoch and repeat for a seed; a resume continues them; unreachable videos
or weights are one line and exit 2."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.errors import ConfigError
from cache.store import open_store
from conftest import cli_in_process, extract_in_process, stopped_after_first_checkpoint
from stages.data.loader import epoch_plan, train_loader
from stages.data.online import OnlineSplit, online_aug_cfg
from stages.data.open import split_dataset
from stages.data.zarr_split import check_cache_for_head, select_videos
from stages.train import TrainCfg, build_head, train_head

TINY = {"evl": {"num_layers": 1}, "side4video": {"preset": "custom", "num_blocks": 2, "side_width": 32}, "tap": {}}


@pytest.fixture(scope="module")
def cache(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("online") / "cache"
    extract_in_process(demo_small.root, out, layers="all", patch=True, store_frames=True, text="none")
    return open_store(out)


def _splits(store, head: str, aug):
    h = build_head(head, store, TINY[head])
    inputs = check_cache_for_head(store, h.data_keys(), head, ["train"])["train"]
    idx = select_videos(store, "train")
    return split_dataset(store, inputs, idx, train=True), OnlineSplit(store, inputs, idx, aug)


@pytest.mark.parametrize("head", ["evl", "side4video"])
def test_the_control_batches_are_the_cache_loaders(cache, head):
    """--online-aug none: the same keys, shapes, dtypes and values as the cache's loader gives
    (patch and cls tokens through fp16; side4video's uint8 frames normalised the same way)."""
    cached, online = _splits(cache, head, None)
    plan = epoch_plan(len(cached), 5, 1, 0, seed=0, epoch=1)
    for data in (cached, online):
        data.set_epoch(1, 0)
    got = list(train_loader(online, plan, "cpu"))
    want = list(train_loader(cached, plan, "cpu"))
    assert len(got) == len(want) == len(plan)
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for k in w:
            assert g[k].shape == w[k].shape and g[k].dtype == w[k].dtype, k
            torch.testing.assert_close(g[k], w[k], rtol=0, atol=1e-3 if g[k].is_floating_point() else 0)
    assert "frames" in got[0] if head == "side4video" else "patch" in got[0]


def test_the_control_redraws_a_paper_view_bank(demo_small, tmp_path):
    """On a view-bank cache (side4video's paper pipeline, 2 views) --online-aug none draws the bank's
    own views again: the batches of the cache's loader, view pick included."""
    extract_in_process(demo_small.root, tmp_path / "bank", layers="all", patch=True, store_frames=True, text="none",
                       train_aug=2, aug_recipe="paper", aug_heads="side4video")
    store = open_store(tmp_path / "bank")
    assert store.info.view_bank.recipe == "paper"
    cached, online = _splits(store, "side4video", None)
    plan = epoch_plan(len(cached), 6, 1, 0, seed=3, epoch=0)
    for data in (cached, online):
        data.set_epoch(0, 3)
    for g, w in zip(train_loader(online, plan, "cpu"), train_loader(cached, plan, "cpu")):
        assert sorted(g) == sorted(w)
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=0, atol=1e-3 if g[k].is_floating_point() else 0)


@pytest.mark.parametrize("head", ["evl", "side4video"])
def test_online_none_trains_as_the_plain_cache(cache, tmp_path, head):
    cfg = TrainCfg(head=head, epochs=2, batch_size=4, lr=1e-3, threads=1)
    ref = train_head(cache, cfg, TINY[head], run_dir=tmp_path / "cache", progress=False)
    lines = []
    got = train_head(cache, dataclasses.replace(cfg, online=True, online_aug="none", workers=1), TINY[head],
                     run_dir=tmp_path / "online", progress=False, log=lines.append)
    assert [h["train_loss"] for h in got["history"]] == pytest.approx([h["train_loss"] for h in ref["history"]],
                                                                      rel=1e-5)
    assert got["final"]["top1"] == ref["final"]["top1"]
    assert got["final"]["top5"] == ref["final"]["top5"]
    assert any(ln.startswith("online: 'train' streamed from 12 raw videos") and "views: none" in ln for ln in lines)


def test_online_enters_the_run_id_and_the_record(cache, tmp_path):
    cfg = TrainCfg(head="tap", epochs=1, batch_size=4, threads=1)
    runs = {}
    for name, c in {"cache": cfg, "light": dataclasses.replace(cfg, online=True, online_aug="light"),
                    "none": dataclasses.replace(cfg, online=True, online_aug="none"),
                    "cache-aug": dataclasses.replace(cfg, online_aug="light")}.items():
        runs[name] = train_head(cache, c, {}, runs_root=tmp_path, progress=False, log=lambda *a: None)["run_dir"]
    assert len({runs["cache"], runs["light"], runs["none"]}) == 3
    assert runs["cache-aug"] == runs["cache"]  # without --online the option says nothing
    rec = json.loads((Path(runs["light"]) / "config.json").read_text())
    assert rec["train"]["online"] is True and rec["train"]["online_aug"] == "light"


def test_fresh_draws_change_per_epoch_and_repeat_for_a_seed(cache):
    _, online = _splits(cache, "side4video", online_aug_cfg("light", "side4video"))
    _, again = _splits(cache, "side4video", online_aug_cfg("light", "side4video"))

    def views(data, epoch, seed):
        data.set_epoch(epoch, seed)
        return [data.view(i)[0] for i in range(4)]

    e0, e1 = views(online, 0, 7), views(online, 1, 7)
    assert all(a.shape == (8, 32, 32, 3) and a.dtype == np.uint8 for a in e0)
    assert all(not np.array_equal(a, b) for a, b in zip(e0, e1))  # a fresh view each epoch
    assert all(np.array_equal(a, b) for a, b in zip(e1, views(again, 1, 7)))  # the same for the same seed
    assert not all(np.array_equal(a, b) for a, b in zip(e1, views(again, 1, 8)))
    # ... whatever the order they are asked in (workers, resume): a function of (seed, epoch, video)
    online.set_epoch(1, 7)
    assert np.array_equal(online.view(3)[0], e1[3])


def test_paper_is_the_heads_train_pipeline_or_one_clear_error():
    from stages.heads.registry import train_pipeline_for

    for head in ("evl", "side4video", "text4vis"):
        assert online_aug_cfg("paper", head) == train_pipeline_for(head, "paper")
    with pytest.raises(ConfigError, match="head 'tap' has none.*--online-aug light"):
        online_aug_cfg("paper", "tap")


def test_workers_do_not_change_the_batches(cache):
    _, online = _splits(cache, "tap", online_aug_cfg("light", "tap"))
    online.set_epoch(2, 1)
    plan = epoch_plan(len(online), 6, 1, 0, seed=1, epoch=2)
    one = list(train_loader(online, plan, "cpu", workers=0))
    two = list(train_loader(online, plan, "cpu", workers=2))
    for a, b in zip(one, two):
        assert torch.equal(a["frame_emb"], b["frame_emb"]) and torch.equal(a["label"], b["label"])


def test_a_resumed_online_run_ends_as_an_uninterrupted_one(cache, tmp_path, monkeypatch):
    cfg = TrainCfg(head="evl", epochs=3, batch_size=4, lr=1e-2, threads=1, online=True, online_aug="light")
    ref = train_head(cache, cfg, TINY["evl"], run_dir=tmp_path / "ref", progress=False)
    stopped_after_first_checkpoint(
        monkeypatch, lambda: train_head(cache, cfg, TINY["evl"], run_dir=tmp_path / "run", progress=False))
    got = train_head(cache, cfg, TINY["evl"], run_dir=tmp_path / "run", resume=True, progress=False)
    assert [h["train_loss"] for h in got["history"]] == pytest.approx([h["train_loss"] for h in ref["history"]],
                                                                      rel=1e-6)
    assert got["final"] == ref["final"]


def test_unreachable_videos_or_weights_are_one_line_exit_2(demo_small, tmp_path, capsys):
    from stages.backbone import load_clip

    data = tmp_path / "data"
    shutil.copytree(demo_small.root, data)
    ckpt = tmp_path / "tiny.pt"
    torch.save(load_clip("tiny", seed=0).state_dict(), ckpt)
    out = tmp_path / "cache"
    extract_in_process(data, out, layers="none", text="none", pretrained=str(ckpt), activation="gelu")
    args = ["train", "--head", "tap", "--cache", out, "--online", "--online-aug", "light", "--set", "epochs=1",
            "--run-dir", tmp_path / "run", "--no-progress"]
    data.rename(tmp_path / "moved")
    code, _, err = cli_in_process(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--online" in err and "not where it recorded them" in err and str(data) in err
    assert not (tmp_path / "run").exists()  # nothing half-written
    (tmp_path / "moved").rename(data)
    ckpt.rename(tmp_path / "elsewhere.pt")
    code, _, err = cli_in_process(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "backbone weights" in err and str(ckpt) in err, err
    (tmp_path / "elsewhere.pt").rename(ckpt)
    code, out_, err = cli_in_process(capsys, *args)
    assert code == 0 and "tap: top1" in out_, err


def test_closed_form_heads_and_exports_are_refused(cache, tmp_path):
    with pytest.raises(ConfigError, match="closed form"):
        train_head(cache, TrainCfg(head="lda", online=True, online_aug="none"), {}, run_dir=tmp_path / "r",
                   progress=False)


@pytest.mark.slow
def test_the_cache_vs_online_bench_runs_tiny(tmp_path):
    """bench/bench_cache_vs_online.py --tiny: every row of one head, its table written."""
    from bench.bench_cache_vs_online import main

    assert main(["--tiny", "--workdir", str(tmp_path), "--heads", "tap", "--banks", "1", "--fresh", "light",
                 "--bank-aug", "light"]) == 0
    table = (tmp_path / "tiny" / "table.md").read_text()
    for row in ("online light", "online none (control)", "plain cache", "bank K=1"):
        assert f"| tap | {row}" in table
    records = json.loads((tmp_path / "tiny" / "results.json").read_text())
    control, plain = (next(r for r in records if r["row"].startswith(x)) for x in ("online none", "plain cache"))
    assert control["losses"][0] == pytest.approx(plain["losses"][0], rel=1e-5) and control["top1"] == plain["top1"]
