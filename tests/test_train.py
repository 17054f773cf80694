"""Stage two from a real cache: every head via the CLI, resume after SIGKILL, user errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from cache.errors import ConfigError
from cache.store import open_store
from conftest import demo_args, kill_mid_run, popen_cli, run_cli, stopped_after_first_checkpoint
from stages.classifiers import classifier_matrix, text_classifier
from stages.data.zarr_split import select_videos
from stages.train import TrainCfg, build_head, train_head

TINY_HEAD_SETS = {
    "tap": [],
    "lda": [],
    "linear_probe": [],
    "text4vis": ["layers=1", "pos_rows=8"],
    "actionclip": ["layers=1", "pos_rows=8"],
    "evl": ["num_layers=1"],
    "side4video": ["preset=custom", "num_blocks=2", "side_width=32"],
}


@pytest.fixture(scope="module")
def full_cache(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "cache"
    run_cli(*demo_args(demo_small, out, "--layers", "all", "--patch", "--frames-uint8", "--text",
                       "clip_single,clip_actionclip,minilm"), check=True)
    return open_store(out)


@pytest.mark.parametrize("head", sorted(TINY_HEAD_SETS))
def test_every_head_trains_from_the_cli(full_cache, tmp_path, head):
    sets = [x for s in TINY_HEAD_SETS[head] + ["epochs=2", "batch_size=4"] for x in ("--set", s)]
    proc = run_cli("train", "--head", head, "--cache", full_cache.path, *sets, "--run-dir", tmp_path / "run",
                   "--no-progress", check=True)
    assert f"{head}: top1" in proc.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_videos"] == 8 and 0 <= metrics["final"]["top1"] <= 100
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "config.json").exists()
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["cache_key"] == full_cache.key and cfg["head"]["name"] == head


def test_sigkill_and_resume_match_an_uninterrupted_run(full_cache, tmp_path):
    sets = ["--set", "epochs=12", "--set", "batch_size=2", "--set", "preset=custom", "--set", "num_blocks=2",
            "--set", "side_width=32", "--set", "seed=3"]
    ref = tmp_path / "ref"
    run_cli("train", "--head", "side4video", "--cache", full_cache.path, *sets, "--run-dir", ref, "--no-progress",
            check=True)
    run = tmp_path / "run"
    args = ["train", "--head", "side4video", "--cache", full_cache.path, *sets, "--run-dir", run, "--no-progress"]
    # killed once its first checkpoint is on disk; a run that finished before the kill landed is
    # started over from a clean folder (a bounded number of times)
    kill_mid_run(lambda: popen_cli(*args), lambda: (run / "last.pt").exists(),
                 lambda: torch.load(run / "last.pt", weights_only=True)["epoch"] < 12,
                 lambda: shutil.rmtree(run, ignore_errors=True))
    epoch_at_kill = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert epoch_at_kill < 12
    proc = run_cli(*args, "--resume", check=True)
    assert f"from epoch {epoch_at_kill}" in proc.stdout
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert a["final"] == b["final"]


@pytest.mark.parametrize("case", ["head", "set_key", "set_type", "layers", "shots", "init", "batch", "lr",
                                  "negative_shots", "reversed_range", "test_classes", "text_dims", "average"])
def test_bad_input_is_one_line_exit_2(full_cache, demo_small, tmp_path, case):
    cache = full_cache.path
    args = ["train", "--head", "tap", "--cache", cache, "--no-progress", "--run-dir", tmp_path / "r"]
    if case == "head":
        args[2] = "transformer9000"
    elif case == "set_key":
        args += ["--set", "head.depthh=3"]
    elif case == "set_type":
        args += ["--set", "epochs=many"]
    elif case == "layers":
        small = tmp_path / "small"
        run_cli(*demo_args(demo_small, small, "--layers", "2", "--text", "none"), check=True)
        args = ["train", "--head", "evl", "--cache", small, "--set", "num_layers=1", "--no-progress"]
    elif case == "shots":
        args += ["--shots", "50"]
    elif case == "init":
        args = ["train", "--head", "text4vis", "--cache", cache, "--init", "magic", "--no-progress"]
    elif case == "batch":
        args += ["--set", "batch_size=0"]
    elif case == "lr":
        args += ["--set", "lr=-1"]
    elif case == "negative_shots":
        args += ["--shots", "-1"]
    elif case == "reversed_range":
        args += ["--train-classes", "3-1"]
    elif case == "test_classes":
        args += ["--train-classes", "0-1", "--test-classes", "2-3"]
    elif case == "text_dims":  # fails after the run folder was made: it must be removed again
        args[2] = "text4vis"
        args += ["--set", "layers=1", "--set", "pos_rows=8", "--set", "text_set=minilm"]
    elif case == "average":
        args += ["--set", "eval_average=median"]
    proc = run_cli(*args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    expect = {"head": "transformer9000", "set_key": "depthh", "set_type": "many", "layers": "pipeline extract",
              "shots": "--shots 50", "init": "magic", "batch": "batch_size", "lr": "lr must be",
              "negative_shots": "shots must be", "reversed_range": "1-3", "test_classes": "text classifier",
              "text_dims": "text set 'minilm' is 384-d", "average": "eval_average"}[case]
    assert expect in lines[0]
    assert not (tmp_path / "r").exists()  # a refused run leaves no folder


def test_shots_fraction_and_class_subsets(full_cache):
    idx = select_videos(full_cache, "train", shots=2, seed=0)
    labels = full_cache.labels("train")[idx]
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (select_videos(full_cache, "train", shots=2, seed=0) == idx).all()
    assert len(select_videos(full_cache, "train", fraction=0.5, seed=1)) == 6
    sub = select_videos(full_cache, "val", classes=[1, 3])
    assert set(full_cache.labels("val")[sub].tolist()) == {1, 3}


def test_a_k_shot_run_repeats_its_list_to_the_full_train_length_under_the_paper_recipe(full_cache, tmp_path):
    """Text4Vis's few-shot epochs: 1 shot x 4 classes = 4 videos, repeated 3 times to the 12 of the
    full train set, so an epoch makes as many updates as a full-data epoch; quick runs them once."""
    steps = {}
    for name, extra in (("paper", {"recipe": "paper"}), ("quick", {"recipe": "quick"}),
                        ("on", {"recipe": "quick", "repeat_shots": "on"})):
        lines: list[str] = []
        cfg = TrainCfg(head="tap", epochs=1, batch_size=2, shots=1, warmup_epochs=0.0, **extra)
        res = train_head(full_cache, cfg, run_dir=tmp_path / name, progress=False,
                         log=lambda *a: lines.append(" ".join(map(str, a))))
        state = torch.load(tmp_path / name / "last.pt", weights_only=True)
        steps[name] = int(state["scheduler"]["last_epoch"])
        assert res["train_videos"] == 4  # the distinct videos
        assert any("4 videos repeated 3 times per epoch" in ln for ln in lines) == (name != "quick")
    assert steps == {"paper": 6, "quick": 2, "on": 6}
    with pytest.raises(ConfigError, match="option 'repeat_shots' must be one of auto, on, off"):
        TrainCfg(repeat_shots="twice").validate()


def test_every_evaluated_epoch_leaves_metrics_and_curves_and_a_stopped_run_is_not_taken_as_finished(
        full_cache, tmp_path, monkeypatch):
    """metrics.json ("final" null) and curves.png after each evaluated epoch: a run stopped after
    epoch 1 shows that epoch in `runs`; the same call then resumes it (not reused) and finishes."""
    import stages.train as T
    from stages.runs import finished_metrics, read_run

    save = T.save_checkpoint

    def save_then_stop(state, path):
        save(state, path)
        raise KeyboardInterrupt  # Ctrl-C right after epoch 1's checkpoint

    monkeypatch.setattr(T, "save_checkpoint", save_then_stop)
    cfg = TrainCfg(head="tap", epochs=3, batch_size=4, recipe="quick")
    with pytest.raises(KeyboardInterrupt):
        train_head(full_cache, cfg, run_dir=tmp_path / "r", progress=False, log=lambda *a: None)
    rec = read_run(tmp_path / "r")
    assert rec.state == "interrupted" and rec.epochs_done == 1 and rec.last("top1") is not None
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["final"] is None
    assert finished_metrics(tmp_path / "r") is None
    assert (tmp_path / "r" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(T, "save_checkpoint", save)
    lines: list[str] = []
    res = train_head(full_cache, cfg, run_dir=tmp_path / "r", progress=False, log=lambda *a: lines.append(str(a[0])))
    assert any("resuming" in ln for ln in lines) and len(res["history"]) == 3
    assert read_run(tmp_path / "r").state == "finished" and finished_metrics(tmp_path / "r")["final"] == res["final"]


def test_a_finished_run_is_reused_whatever_path_names_its_cache(full_cache, tmp_path, monkeypatch):
    """`make demo` names the cache relative, `train --dataset demo` absolute: the same run, reused."""
    import os

    cfg = TrainCfg(head="tap", epochs=1, batch_size=4)
    first = train_head(full_cache.path, cfg, run_dir=tmp_path / "r", progress=False, log=lambda *a: None)
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    again = train_head(os.path.relpath(full_cache.path, tmp_path), cfg, run_dir=tmp_path / "r", progress=False,
                       log=lambda *a: lines.append(str(a[0])))
    assert any("already holds this finished run" in ln for ln in lines), lines
    assert again["final"] == first["final"]


def test_progress_is_one_labelled_bar_per_run_and_plain_lines_when_not_a_terminal(full_cache, tmp_path):
    """No carriage-return redraws in a log: `train` through a pipe prints its bar as whole lines,
    labelled, ending at the run's total steps (3 epochs x 3 steps), not one 1/1 bar per epoch."""
    import io

    from stages.progress import progress_bar

    out = io.StringIO()
    bar = progress_bar(total=500, desc="extract demo", unit="video", stream=out)
    for _ in range(500):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.splitlines()[-1].startswith("extract demo: 100%") and "500/500" in text
    assert len(text.splitlines()) <= 3  # the first draw and the last, not one per update
    proc = run_cli("train", "--head", "tap", "--cache", full_cache.path, "--recipe", "quick", "--epochs", "3",
                   "--set", "batch_size=4", "--run-dir", tmp_path / "p", check=True)
    assert "\r" not in proc.stderr
    bars = [ln for ln in proc.stderr.splitlines() if ln.startswith("train tap:")]
    assert bars and "9/9" in bars[-1] and "epoch 3/3" in bars[-1]


def test_zero_shot_class_split_swaps_the_text_classifier(full_cache, tmp_path):
    cfg = TrainCfg(head="text4vis", epochs=1, batch_size=4, train_classes="0,1", test_classes="2,3")
    res = train_head(full_cache, cfg, {"layers": 1, "pos_rows": 8}, run_dir=tmp_path / "zs", progress=False)
    assert res["eval_videos"] == 4 and res["train_videos"] == 6
    assert res["final"]["n"] == 4
    # any number of test classes, and the per-template head too (its video embedding is scored
    # against the other classes' averaged template embeddings)
    for head in ("text4vis", "actionclip"):
        cfg = TrainCfg(head=head, epochs=1, batch_size=4, train_classes="0-2", test_classes="2-3")
        res = train_head(full_cache, cfg, {"layers": 1, "pos_rows": 8}, run_dir=tmp_path / head, progress=False)
        assert res["train_videos"] == 9 and res["final"]["n"] == 4 and 0 <= res["final"]["top1"] <= 100, head
    res = train_head(full_cache, TrainCfg(head="actionclip", epochs=1, batch_size=4, eval_average="embeddings"),
                     {"layers": 1, "pos_rows": 8}, run_dir=tmp_path / "emb", progress=False)
    assert res["final"]["n"] == 8


def test_a_stopped_run_resumes_exactly_and_other_options_are_refused(full_cache, tmp_path, monkeypatch):
    # actionclip: its template draws must continue across the resume; eval_every=2: the epoch
    # of the checkpoint did not evaluate
    cfg = TrainCfg(head="actionclip", epochs=3, batch_size=4, lr=1e-2, eval_every=2)
    over = {"layers": 1, "pos_rows": 8}
    ref = train_head(full_cache, cfg, over, run_dir=tmp_path / "ref", progress=False)
    stopped_after_first_checkpoint(
        monkeypatch, lambda: train_head(full_cache, cfg, over, run_dir=tmp_path / "run", progress=False))
    config = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"other options \(train.lr\)"):
        train_head(full_cache, dataclasses.replace(cfg, lr=5e-3), over, run_dir=tmp_path / "run", resume=True,
                   progress=False)
    assert (tmp_path / "run" / "config.json").read_text() == config  # still describes last.pt
    got = train_head(full_cache, cfg, over, run_dir=tmp_path / "run", resume=True, progress=False)
    assert [h["train_loss"] for h in got["history"]] == pytest.approx([h["train_loss"] for h in ref["history"]],
                                                                      rel=1e-6)
    assert got["final"] == ref["final"]


def test_classifier_inits_have_the_right_structure(full_cache):
    head = build_head("text4vis", full_cache, {"layers": 1, "pos_rows": 8})
    K, E = head.classifier_shape()
    orth = classifier_matrix("orthogonal", full_cache, head, None)
    torch.testing.assert_close(orth @ orth.T, torch.eye(K), atol=1e-5, rtol=0)
    text = classifier_matrix("clip_text", full_cache, head, None)
    torch.testing.assert_close(text, torch.from_numpy(full_cache.text("clip_single")))
    mini = classifier_matrix("minilm", full_cache, head, None)
    raw = torch.from_numpy(full_cache.text("minilm"))
    assert mini.shape == (K, E)
    # the projection keeps the inter-class geometry approximately (E = 32 < 384 here)
    gram_raw, gram = raw @ raw.T, mini @ mini.T
    assert torch.corrcoef(torch.stack([gram_raw.flatten(), gram.flatten()]))[0, 1] > 0.8
    idx = select_videos(full_cache, "train")
    lda = classifier_matrix("lda", full_cache, head, None, idx)
    assert lda.shape == (K, E) and torch.isfinite(lda).all()


def test_cross_dataset_evaluation_swaps_in_the_other_class_names(full_cache, tmp_path):
    from pipeline.demo_data import DemoCfg, generate_demo

    other = generate_demo(tmp_path / "other", DemoCfg(num_classes=3, train_per_class=1, val_per_class=2, frames=8,
                                                      size=48, seed=11), progress=False)
    other_cache = tmp_path / "other_cache"
    run_cli("extract", "--dataset", "demo", "--data-root", other.root, "--model", "tiny", "--out", other_cache,
            "--layers", "all", "--text", "clip_single", "--no-progress", check=True)
    run = tmp_path / "run"
    train_head(full_cache, TrainCfg(head="text4vis", epochs=1, batch_size=4), {"layers": 1, "pos_rows": 8},
               run_dir=run, progress=False)
    proc = run_cli("evaluate", "--run", run, "--cache", other_cache, check=True)
    assert "classifier swapped" in proc.stdout and "(6 videos" in proc.stdout
    same = run_cli("evaluate", "--run", run, check=True)
    assert "(8 videos, scores averaged over views)" in same.stdout  # the run's own rule (TrainCfg default)
    # a cache from other backbone weights is refused
    foreign = tmp_path / "foreign"
    run_cli("extract", "--dataset", "demo", "--data-root", other.root, "--model", "tiny", "--init-seed", "5",
            "--out", foreign, "--text", "clip_single", "--no-progress", check=True)
    bad = run_cli("evaluate", "--run", run, "--cache", foreign)
    assert bad.returncode == 2 and "other backbone weights" in bad.stderr
    # a text set only means something on another dataset's classes, and must match the embedding
    for args, expect in ((["--text-set", "clip_single"], "only when evaluating on another"),
                         (["--average", "median"], "option 'average' must be one of scores, embeddings")):
        bad = run_cli("evaluate", "--run", run, *args)
        assert bad.returncode == 2 and expect in bad.stderr and "Traceback" not in bad.stderr
    head = build_head("text4vis", full_cache, {"layers": 1, "pos_rows": 8})
    with pytest.raises(ConfigError, match="384-d"):
        text_classifier(full_cache, head, "minilm")
