"""A finished run keeps per-class results, the confusion matrix, per-video predictions and best.pt."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from cache.store import open_store
from conftest import demo_args, run_cli
from stages.checkpoint import load_checkpoint
from stages.run_outputs import best_epoch, is_new_best
from stages.train import TrainCfg, train_head


@pytest.fixture(scope="module")
def cache(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "cache"
    run_cli(*demo_args(demo_small, out, "--text", "clip_single"), check=True)
    return open_store(out)


def _csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_best_epoch_keeps_the_earlier_of_a_tie():
    h = [{"epoch": 1, "val": {"top1": 50.0}}, {"epoch": 2, "val": {"top1": 62.5}}, {"epoch": 3, "train_loss": 1.0},
         {"epoch": 4, "val": {"top1": 62.5}}, {"epoch": 5, "val": {"top1": 40.0}}]
    assert best_epoch(h) == 2
    assert [is_new_best(h[:n]) for n in range(1, 6)] == [True, True, False, False, False]
    assert best_epoch([{"epoch": 1, "train_loss": None, "val_top1": 30.0}]) == 1 and best_epoch([]) is None


def test_a_run_folder_holds_per_class_confusion_predictions_and_best(cache, tmp_path):
    run = tmp_path / "run"
    res = train_head(cache, TrainCfg(head="tap", epochs=5, batch_size=4, lr=0.05, seed=1), run_dir=run,
                     progress=False)
    names = cache.class_names()
    labels = cache.labels("val")
    per_class = _csv(run / "per_class.csv")
    assert [int(r["class"]) for r in per_class] == list(range(len(names)))
    assert [r["name"] for r in per_class] == names
    assert [int(r["count"]) for r in per_class] == [int((labels == k).sum()) for k in range(len(names))]
    correct = sum(int(r["correct"]) for r in per_class)
    assert 100 * correct / len(labels) == pytest.approx(res["final"]["top1"], abs=1e-6)
    mean_class = sum(float(r["top1"]) for r in per_class) / len(per_class)
    assert mean_class == pytest.approx(res["final"]["mean_class"], abs=0.01)

    confusion = list(csv.reader(io.StringIO((run / "confusion.csv").read_text())))
    assert confusion[0][1:] == names and [r[0] for r in confusion[1:]] == names
    matrix = [[int(x) for x in r[1:]] for r in confusion[1:]]
    assert sum(matrix[k][k] for k in range(len(names))) == correct
    assert [sum(r) for r in matrix] == [int(r["count"]) for r in per_class]
    assert (run / "confusion.png").stat().st_size > 2000

    preds = _csv(run / "predictions.csv")
    items = cache.items("val")
    assert [int(p["video"]) for p in preds] == list(range(len(items)))
    assert [p["path"] for p in preds] == [p for p, _ in items]
    assert [int(p["label"]) for p in preds] == labels.tolist()
    assert sum(int(p["correct"]) for p in preds) == correct
    for p in preds:
        scores = [float(p[f"top{j}_score"]) for j in range(1, 5)]
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4  # 4 classes: all of them
        assert p["correct"] == str(int(p["top1"] == p["label"])) and p["top1_name"] == names[int(p["top1"])]

    # best.pt: the epoch of the highest val top-1 (the earlier of a tie), its weights as they were then
    history = res["history"]
    best = load_checkpoint(run / "best.pt")
    want = best_epoch(history)
    assert best["epoch"] == want and load_checkpoint(run / "last.pt")["epoch"] == 5
    tops = [h["val"]["top1"] for h in history]
    assert tops[want - 1] == max(tops) and max(tops[: want - 1], default=-1) < max(tops)
    from stages.evaluate import evaluate_run

    shutil_run = tmp_path / "best-as-last"
    shutil_run.mkdir()
    (shutil_run / "last.pt").write_bytes((run / "best.pt").read_bytes())
    assert evaluate_run(shutil_run)["top1"] == pytest.approx(max(tops), abs=1e-6)
    # no temporary file is left behind
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_a_class_subset_keeps_the_cache_class_ids_and_a_fitted_head_has_best(cache, tmp_path):
    cfg = TrainCfg(head="tap", epochs=1, batch_size=4, train_classes="1,3")
    train_head(cache, cfg, run_dir=tmp_path / "sub", progress=False)
    rows = _csv(tmp_path / "sub" / "per_class.csv")
    names = cache.class_names()
    assert [(int(r["class"]), r["name"]) for r in rows] == [(1, names[1]), (3, names[3])]
    preds = _csv(tmp_path / "sub" / "predictions.csv")
    assert {p["label"] for p in preds} <= {"1", "3"} and {p["top1"] for p in preds} <= {"1", "3"}
    assert "top3" not in preds[0]  # k = min(5, classes evaluated)
    res = train_head(cache, TrainCfg(head="lda", epochs=1), run_dir=tmp_path / "lda", progress=False)
    a, b = load_checkpoint(tmp_path / "lda" / "best.pt"), load_checkpoint(tmp_path / "lda" / "last.pt")
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])
    assert len(_csv(tmp_path / "lda" / "predictions.csv")) == res["eval_videos"]


def test_the_cli_run_lists_its_files_and_force_starts_clean(cache, tmp_path):
    run = tmp_path / "cli"
    args = ["train", "--head", "tap", "--cache", cache.path, "--set", "epochs=2", "--set", "batch_size=4",
            "--run-dir", run, "--no-progress"]
    run_cli(*args, check=True)
    for name in ("best.pt", "per_class.csv", "confusion.csv", "confusion.png", "predictions.csv"):
        assert (run / name).exists(), name
    show = run_cli("runs", "show", run, check=True).stdout
    assert "best.pt" in show and "predictions.csv" in show
    # `pipeline evaluate` of a split on the run's own cache writes the same files for it (here val: the same)
    proc = run_cli("evaluate", "--run", run, "--split", "val", check=True)
    assert str(run / "eval-val") in proc.stdout
    for name in ("per_class.csv", "confusion.csv", "predictions.csv"):
        assert (run / "eval-val" / name).read_text() == (run / name).read_text(), name
    assert (run / "eval-val" / "confusion.png").exists()
    # --force starts over: the old run's outputs go before the new run starts (this one fails at its first step)
    proc = run_cli(*args, "--set", "lr=1e38", "--force")
    assert proc.returncode != 0 and "lower the learning rate" in proc.stderr
    for name in ("best.pt", "last.pt", "per_class.csv", "confusion.csv", "confusion.png", "predictions.csv"):
        assert not (run / name).exists(), name
