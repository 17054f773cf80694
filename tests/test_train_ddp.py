"""Stage two under torchrun (DDP on CPU with gloo): two ranks follow one process.

With the same global batch, a 2-rank run computes the loss of the same batches as a 1-process
run (the global batches do not divide by 2 here, so padding is exercised), so the loss curves
and the final weights agree up to float summation order; evaluation split across ranks and
gathered gives the metrics of the whole set. Heads with dropout run with it off, since each
rank draws masks for its own slice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cache.wds import export_wds
from conftest import ROOT, extracted_store, torchrun
from stages.train import TrainCfg, train_head

RUNS = {  # name -> (train options, head options)
    "tap": ({"head": "tap", "epochs": 3, "batch_size": 5, "lr": 5e-2}, {}),
    "text4vis": ({"head": "text4vis", "epochs": 3, "batch_size": 5, "lr": 1e-2}, {"layers": "1", "pos_rows": "8"}),
    "actionclip": ({"head": "actionclip", "epochs": 3, "batch_size": 5, "lr": 1e-2},
                   {"layers": "1", "pos_rows": "8"}),
    "evl": ({"head": "evl", "epochs": 2, "batch_size": 5, "lr": 1e-3},
            {"num_layers": "1", "dropout": "0", "cls_dropout": "0"}),
    "side4video": ({"head": "side4video", "epochs": 2, "batch_size": 6, "lr": 1e-3},
                   {"preset": "custom", "num_blocks": "2", "side_width": "32"}),
    "lda": ({"head": "lda"}, {}),
    "zero_shot": ({"head": "text4vis", "epochs": 0}, {"temporal": "tap"}),
}


@pytest.fixture(scope="module")
def ddp_job(demo_small, tmp_path_factory):
    """One 2-rank torchrun job running every run of RUNS plus the streaming ones, and a WDS export."""
    tmp = tmp_path_factory.mktemp("ddp")
    store = extracted_store(demo_small.root, tmp / "cache", layers="all", patch=True, store_frames=True,
                            text="clip_single,clip_actionclip", shard_size=4)
    export_wds(store, tmp / "wds", name="d", shard_bytes="2KB")  # several train shards per rank
    export_wds(store, tmp / "wds1", name="d", shard_bytes="1GB")  # one train shard: rank 1 gets none
    runs = [{"name": n, "train": t, "head": h} for n, (t, h) in RUNS.items()]
    runs += [
        {"name": "wds_tap", "train": {**RUNS["tap"][0], "epochs": 4}, "wds": str(tmp / "wds" / "d-header.json")},
        {"name": "wds_lda", "train": {"head": "lda"}, "wds": str(tmp / "wds" / "d-header.json")},
        {"name": "wds_one_shard", "train": RUNS["tap"][0], "wds": str(tmp / "wds1" / "d-header.json")},
        {"name": "wds_one_shard_resampled", "train": RUNS["tap"][0], "wds": str(tmp / "wds1" / "d-header.json"),
         "wds_resample": True},
    ]
    job = tmp / "job.json"
    job.write_text(json.dumps({"cache": str(store.path), "out": str(tmp / "runs"), "runs": runs}))
    proc = torchrun(ROOT / "tests" / "_ddp_worker.py", job)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return store, tmp / "runs", tmp


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["tap", "text4vis", "actionclip", "evl"])
def test_two_ranks_follow_one_process(ddp_job, tmp_path, name):
    store, runs, _ = ddp_job
    train, head = RUNS[name]
    one = train_head(store, TrainCfg(**train), head, run_dir=tmp_path / "one", progress=False)
    two = _metrics(runs / name)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["train_videos"] == one["train_videos"] == 12 and two["final"]["n"] == one["final"]["n"] == 8
    losses1 = [h["train_loss"] for h in one["history"]]
    losses2 = [h["train_loss"] for h in two["history"]]
    assert losses2 == pytest.approx(losses1, rel=1e-4), name
    assert losses1[-1] < losses1[0], "the comparison is empty if nothing was learned"
    w1 = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["head"]
    w2 = torch.load(runs / name / "last.pt", weights_only=True)["head"]
    assert w1.keys() == w2.keys()
    for key in w1:
        a, b = w1[key], w2[key]
        # attention's key bias gets an exactly-zero gradient (softmax ignores a shift shared by
        # all keys): Adam turns its float noise into arbitrary steps with no effect on outputs
        if key.endswith("k_proj.bias"):
            continue
        if key.endswith("in_proj_bias"):
            E = a.shape[0] // 3
            a, b = torch.cat([a[:E], a[2 * E:]]), torch.cat([b[:E], b[2 * E:]])
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=f"{name}: {key}")
    assert abs(two["final"]["top1"] - one["final"]["top1"]) <= 100 / 8 + 1e-9  # at most one video flips


def test_closed_form_and_eval_only_runs_give_the_whole_set_metrics(ddp_job, tmp_path):
    store, runs, _ = ddp_job
    for name in ("lda", "zero_shot"):
        train, head = RUNS[name]
        one = train_head(store, TrainCfg(**train), head, run_dir=tmp_path / name, progress=False)
        assert _metrics(runs / name)["final"] == one["final"], name  # eval split by rank, then gathered
    # rank 0 alone wrote the run folder, with nothing left half-written
    names = sorted(p.name for p in (runs / "tap").iterdir())
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == 1  # one TensorBoard writer: rank 0's
    assert [n for n in names if n not in events] == ["best.pt", "config.json", "config.yaml", "confusion.csv",
                                                     "confusion.png", "curves.png", "last.pt", "metrics.json",
                                                     "per_class.csv", "predictions.csv", "status.json"]
    preds = (runs / "tap" / "predictions.csv").read_text().splitlines()
    assert len(preds) == 1 + 8  # every eval video once, written by rank 0 from the whole set
    assert json.loads((runs / "tap" / "status.json").read_text())["state"] == "finished"


def test_batchnorm_head_trains_on_two_cpu_ranks(ddp_job):
    # Side4Video's BatchNorm3d: SyncBatchNorm on GPUs; on CPU (no SyncBatchNorm) each rank
    # normalises its own slice, so the run trains but does not follow one process exactly
    _, runs, _ = ddp_job
    m = _metrics(runs / "side4video")
    losses = [h["train_loss"] for h in m["history"]]
    assert m["world_size"] == 2 and len(losses) == 2 and all(0 < x < 10 for x in losses) and m["final"]["n"] == 8


def test_streaming_from_shards_on_two_ranks(ddp_job):
    store, runs, tmp = ddp_job
    # a closed-form head sees every video whatever the rank; evaluation gathers every rank's share
    ref = train_head(store, TrainCfg(head="lda"), run_dir=tmp / "ref_lda", progress=False)
    assert _metrics(runs / "wds_lda")["final"] == ref["final"]
    # SGD from shards: each rank streams its own shards, an epoch is a fixed number of global batches
    m = _metrics(runs / "wds_tap")
    losses = [h["train_loss"] for h in m["history"]]
    assert m["world_size"] == 2 and len(losses) == 4 and losses[-1] < losses[0] and m["final"]["n"] == 8
    # one shard cannot feed two ranks: a clear error on every rank (no hang), unless shards are resampled
    err = (runs / "wds_one_shard.err").read_text()
    assert "rank 1 streams 0 training videos" in err and "--wds-resample" in err
    assert not (runs / "wds_one_shard").exists()  # refused before anything was written
    assert _metrics(runs / "wds_one_shard_resampled")["final"]["n"] == 8


def test_cli_under_torchrun_reports_once(ddp_job, tmp_path):
    store, runs, _ = ddp_job
    train, _ = RUNS["tap"]
    sets = [x for k, v in train.items() if k != "head" for x in ("--set", f"{k}={v}")]
    proc = torchrun("-m", "pipeline.cli", "train", "--head", "tap", "--cache", store.path, *sets,
                     "--run-dir", tmp_path / "run", "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tap: top1") == 1  # rank 0 reports
    assert _metrics(tmp_path / "run")["history"] == _metrics(runs / "tap")["history"]


def test_a_run_stopped_on_one_process_resumes_on_two_ranks(ddp_job, tmp_path, monkeypatch):
    import stages.train as T

    store, runs, _ = ddp_job
    train, _ = RUNS["tap"]
    saves = []

    def crash_after_first_checkpoint(obj, path):
        if saves:
            raise KeyboardInterrupt("stopped after epoch 1")
        saves.append(path)
        real_save(obj, path)

    real_save = T.save_checkpoint
    monkeypatch.setattr(T, "save_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_head(store, TrainCfg(**train), run_dir=tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    sets = [x for k, v in train.items() if k != "head" for x in ("--set", f"{k}={v}")]
    proc = torchrun("-m", "pipeline.cli", "train", "--head", "tap", "--cache", store.path, *sets,
                     "--run-dir", tmp_path / "run", "--resume", "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from epoch 1" in proc.stdout
    got, ref = _metrics(tmp_path / "run"), _metrics(runs / "tap")  # ref: 2 ranks, uninterrupted
    assert [h["train_loss"] for h in got["history"]] == pytest.approx([h["train_loss"] for h in ref["history"]],
                                                                       rel=1e-4)
    assert abs(got["final"]["top1"] - ref["final"]["top1"]) <= 100 / 8 + 1e-9 and got["world_size"] == 2
