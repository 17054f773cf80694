"""`pipeline runs ls | show | compare`, TensorBoard events, status, and hints that run as printed."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import signal
import time
from pathlib import Path

import pytest

from cache.store import open_store
from conftest import demo_args, popen_cli, run_cli
from stages.runs import finished_metrics


@pytest.fixture(scope="module")
def cache(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cache"
    run_cli(*demo_args(demo_small, out, "--text", "clip_single"), check=True)
    return open_store(out)


def _train(cache, root, head, *sets, check=True):
    args = [x for s in ("epochs=2", "batch_size=4", *sets) for x in ("--set", s)]
    return run_cli("train", "--head", head, "--cache", cache.path, *args, "--no-progress", check=check,
                   env={"CLIPCACHE_ROOT": str(root)})


def _runs(root, *args):
    return run_cli("runs", *args, env={"CLIPCACHE_ROOT": str(root)})


def _wait_for(cond, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def runs_root(cache, tmp_path_factory):
    """Three heads finished, one failed (resumed from a damaged checkpoint)."""
    root = tmp_path_factory.mktemp("art")
    for head, sets in (("tap", ()), ("text4vis", ("layers=1", "pos_rows=8")), ("linear_probe", ())):
        _train(cache, root, head, *sets)
    # a tap run with other options, whose checkpoint is then damaged: resuming it fails mid-run
    _train(cache, root, "tap", "lr=0.01", "epochs=3")
    broken = next(p for p in (root / "runs").iterdir() if json.loads((p / "config.json").read_text())["train"]["lr"] == 0.01)
    (broken / "metrics.json").unlink()
    (broken / "last.pt").write_bytes(b"not a checkpoint")
    proc = run_cli("train", "--head", "tap", "--cache", cache.path, "--set", "epochs=3", "--set", "batch_size=4",
                   "--set", "lr=0.01", "--resume", "--no-progress", env={"CLIPCACHE_ROOT": str(root)})
    assert proc.returncode != 0
    return root


def _rows(root, *args):
    proc = _runs(root, "ls", "--format", "csv", *args)
    assert proc.returncode == 0, proc.stderr
    return list(csv.DictReader(io.StringIO(proc.stdout)))


def test_runs_ls_shows_every_run_with_its_state_options_and_metrics(runs_root, cache):
    rows = _rows(runs_root)
    by_head = {}
    for r in rows:
        by_head.setdefault(r["head"], []).append(r)
    assert sorted(by_head) == ["linear_probe", "tap", "text4vis"]
    states = sorted(r["status"].split(":")[0] for r in rows)
    assert states == ["failed", "finished", "finished", "finished"]
    failed = next(r for r in rows if r["status"].startswith("failed"))
    assert failed["head"] == "tap" and "lr=0.01" in failed["options"]
    for r in rows:
        assert r["cache"] == cache.path.name and r["source"] == "zarr"
        if r["status"] == "finished":
            metrics = json.loads((Path(r["path"]) / "metrics.json").read_text())
            assert float(r["last_top1"]) == pytest.approx(metrics["final"]["top1"], abs=0.05)
            assert r["epochs"] == ("1/2" if r["head"] == "linear_probe" else "2/2")
    text4vis = by_head["text4vis"][0]
    assert "head.layers=1" in text4vis["options"] and "epochs=2" in text4vis["options"]
    # filters and formats
    assert {r["head"] for r in _rows(runs_root, "--head", "tap")} == {"tap"}
    assert len(_rows(runs_root, "--status", "failed")) == 1
    assert len(_rows(runs_root, "--cache", str(cache.path))) == 4
    md = _runs(runs_root, "ls", "--format", "md").stdout.splitlines()  # compact: finished runs (tests/test_paper_table.py)
    assert md[0].startswith("| head | setting |") and len(md) == 2 + 3
    data = json.loads(_runs(runs_root, "ls", "--format", "json", "--sort", "last_top1", "--reverse").stdout)
    tops = [d["last_top1"] if d["last_top1"] is not None else -1 for d in data]
    assert tops == sorted(tops, reverse=True)


def test_every_run_writes_tensorboard_events_and_a_status(runs_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in (runs_root / "runs").iterdir():
        status = json.loads((run / "status.json").read_text())
        events = list(run.glob("events.out.tfevents.*"))
        assert events, f"no TensorBoard events in {run}"
        if status["state"] != "finished":
            continue
        acc = EventAccumulator(str(run))
        acc.Reload()
        metrics = json.loads((run / "metrics.json").read_text())
        top1 = [e.value for e in acc.Scalars("val/top1")]
        assert top1[-1] == pytest.approx(metrics["final"]["top1"], rel=1e-5)
        if metrics["history"][-1].get("train_loss") is not None:
            loss = [e.value for e in acc.Scalars("train/loss")]
            assert loss == pytest.approx([h["train_loss"] for h in metrics["history"]], rel=1e-5)
            assert len(acc.Scalars("train/lr")) == len(metrics["history"])
        assert "config" in "".join(acc.Tags()["tensors"]) or acc.Tags().get("tensors")


def test_a_run_still_writing_is_running_then_stopped_when_killed(cache, tmp_path):
    root = tmp_path / "runs"
    live = root / "live-tap"
    proc = popen_cli("train", "--head", "tap", "--cache", cache.path, "--set", "epochs=100000", "--set", "batch_size=4",
                     "--run-dir", live, "--no-progress")
    try:
        def mid_run():
            try:
                return json.loads((live / "status.json").read_text()).get("epoch", 0) >= 1
            except (OSError, ValueError):
                return False

        assert _wait_for(mid_run), "the run never finished an epoch"
        rows = _rows(tmp_path, "--root", str(root))
        assert [(r["run"], r["status"]) for r in rows] == [("live-tap", "running")]
        assert rows[0]["epochs"].endswith("/100000")
        # its evaluated epochs are on disk already (metrics.json, "final" null): the table shows them
        assert rows[0]["best_top1"] != "" and (live / "curves.png").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rows = _rows(tmp_path, "--root", str(root))
    assert rows[0]["status"] == "stopped"


def test_runs_show_and_compare(runs_root, tmp_path):
    rows = _rows(runs_root, "--status", "finished")
    names = [r["run"] for r in rows]
    show = _runs(runs_root, "show", names[0][:-3])  # a unique prefix is enough
    assert show.returncode == 0, show.stderr
    assert f"run       {runs_root / 'runs' / names[0]}" in show.stdout and "top1" in show.stdout
    assert "tensorboard --logdir" in show.stdout
    plot = tmp_path / "cmp.png"
    cmp = _runs(runs_root, "compare", *names[:3], "--out", str(plot), "--format", "csv")
    assert cmp.returncode == 0, cmp.stderr
    table = list(csv.DictReader(io.StringIO(cmp.stdout)))
    assert [r["field"] for r in table][0] == "head"
    assert {r["field"] for r in table} >= {"last top1", "status", "epochs done", "recipe"}
    assert [r["field"] for r in table].count("epochs") <= 1  # the option once, the progress as "epochs done"
    assert plot.stat().st_size > 5000


def test_runs_compare_prints_values_as_given_with_their_source_and_marks_runs_without_metrics(runs_root, tmp_path):
    """lr 0.01 is `0.01 (you)`, the recipe's 0.001 is `0.001 (recipe)` (it printed 0.0); a run
    with no metrics says so in the table and in the plot's legend; `runs ls` lists only what
    differs from the run's resolved recipe."""
    rows = _rows(runs_root, "--head", "tap")
    failed = next(r for r in rows if r["status"].startswith("failed"))
    done = next(r for r in rows if r["status"] == "finished")
    assert "lr=0.01" in failed["options"] and "lr=" not in done["options"]
    assert "weight_decay" not in done["options"] and "recipe" not in done["options"]  # the recipe's own values
    cmp = _runs(runs_root, "compare", done["run"], failed["run"], "--out", str(tmp_path / "c.png"), "--format", "csv")
    assert cmp.returncode == 0, cmp.stderr
    table = {r["field"]: r for r in csv.DictReader(io.StringIO(cmp.stdout))}
    assert table["lr"][done["run"]] == "0.001 (recipe)" and table["lr"][failed["run"]] == "0.01 (you)"
    assert table["epochs"][failed["run"]] == "3 (you)"
    assert table["status"][failed["run"]] == "failed (no metrics)" and table["status"][done["run"]] == "finished"
    from pipeline.runs_table import value_text

    assert [value_text(v) for v in (0.0004, 0.15, 1e-05, True, [1, 2])] == ["0.0004", "0.15", "1e-05", "true", "1,2"]


@pytest.mark.parametrize("case", ["unknown", "corrupt_metrics", "empty_root", "bad_format"])
def test_bad_input_is_one_line_and_exit_2(runs_root, tmp_path, case):
    if case == "unknown":
        proc = _runs(runs_root, "show", "no-such-run")
    elif case == "corrupt_metrics":
        run = next(p for p in (runs_root / "runs").iterdir() if finished_metrics(p) is not None)
        copy = tmp_path / run.name
        copy.mkdir()
        for f in ("config.json", "status.json"):
            (copy / f).write_bytes((run / f).read_bytes())
        (copy / "metrics.json").write_text('{"final": {"top1": 1')
        proc = _runs(runs_root, "show", str(copy))
    elif case == "empty_root":
        proc = run_cli("runs", "ls", "--root", str(tmp_path / "nothing"))
    else:
        proc = _runs(runs_root, "ls", "--format", "xml")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr


def test_the_extraction_hint_runs_as_printed_and_then_the_head_trains(demo_small, tmp_path):
    """A cache without patch tokens: train evl says which command adds them; that command, run as
    printed (data paths included), makes a cache that evl trains on."""
    root = tmp_path / "art"
    env = {"CLIPCACHE_ROOT": str(root)}
    run_cli("extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "tiny", "--text", "none",
            "--no-progress", check=True, env=env)
    sets = ["--set", "num_layers=1", "--set", "epochs=1", "--set", "batch_size=4"]
    proc = run_cli("train", "--head", "evl", "--dataset", "demo", *sets, "--no-progress", env=env)
    assert proc.returncode == 2
    assert "cache: " in proc.stdout  # it says which cache it picked
    hint = proc.stderr.split("extract them with: ", 1)[1].strip()
    assert "--data-root" in hint and "--patch" in hint
    argv = shlex.split(hint)
    assert argv[:2] == ["pipeline", "extract"]
    run_cli(*argv[1:], "--no-progress", check=True, env=env)
    ok = run_cli("train", "--head", "evl", "--dataset", "demo", *sets, "--no-progress", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "evl: top1" in ok.stdout


def test_cache_info_prints_a_command_that_rebuilds_the_cache_exactly(cache, tmp_path):
    info = run_cli("cache", "info", cache.path, check=True).stdout
    line = next(ln for ln in info.splitlines() if ln.startswith("made by"))
    argv = shlex.split(line.split("made by", 1)[1])
    assert "--data-root" in argv
    out = tmp_path / "again"
    argv[argv.index("--out") + 1] = str(out)
    run_cli(*argv[1:], "--no-progress", check=True)
    again = open_store(out)
    assert again.key == cache.key
    import numpy as np

    np.testing.assert_array_equal(again.read("val", "frame_emb"), cache.read("val", "frame_emb"))


def test_for_head_adds_what_the_head_reads(demo_small, tmp_path):
    proc = run_cli("extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "small", "--layers",
                   "last1", "--for-head", "evl,side4video", "--protocol", "none", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "patch tokens yes" in proc.stdout and "uint8 frames yes" in proc.stdout
    too_shallow = run_cli("extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "tiny",
                          "--for-head", "evl", "--dry-run")
    assert too_shallow.returncode == 2 and "deeper --model" in too_shallow.stderr
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_make_extract_then_make_train_evl_with_the_defaults(tmp_path):
    """`make extract DATASET=demo && make train HEAD=evl`: the demo CLIP's cache fits EVL, and train
    finds it by dataset with the demo's settings (a reduced world: DEMO_ARGS=--quick)."""
    import subprocess
    import sys

    from conftest import ROOT

    venv = Path(sys.executable).parent.parent
    common = ["make", "-s", "-C", str(ROOT), f"VENV={venv}", "-o", f"{venv}/.installed", "DATASET=demo",
              f"DATA_ROOT={tmp_path / 'demo'}", "DEMO_ARGS=--quick", "TRAIN_ARGS=--no-progress"]
    env = {**os.environ, "CLIPCACHE_ROOT": str(tmp_path / "art"), "PYTHONPATH": str(ROOT)}
    for target in (["extract"], ["train", "HEAD=evl", "SET=epochs=1"]):
        proc = subprocess.run(common + target, capture_output=True, text=True, env=env, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "evl: top1" in proc.stdout and "recipe demo for evl" in proc.stdout


def test_the_shipped_option_defaults_are_the_classes_own():
    """`runs ...` reads the stages' and heads' defaults from pipeline/option_defaults.json (no torch):
    it must say what the classes say (after changing a default: python -m pipeline.runs_table)."""
    from pipeline.runs_table import DEFAULTS_FILE, live_option_defaults

    assert json.loads(DEFAULTS_FILE.read_text()) == live_option_defaults(), (
        f"{DEFAULTS_FILE.name} is out of date: run `python -m pipeline.runs_table` to write it again")


def test_curves_are_redrawn_at_most_every_interval_and_when_a_run_stops(tmp_path, monkeypatch):
    """metrics.json follows every evaluated epoch; curves.png the first one, then at most every
    CURVES_EVERY_S, and the epochs it lacks are drawn when the run stops (a 20-epoch run drew it
    20 times, most of a short run's time)."""
    import stages.runs as R

    monkeypatch.setattr(R, "CURVES_EVERY_S", 3600.0)
    log = R.RunLog(tmp_path / "r")
    log.begin({"head": "tap"}, fresh=True, epochs=3)
    history: list[dict] = []
    for ep in (1, 2):
        history.append({"epoch": ep, "train_loss": 1.0 / ep, "val": {"top1": 10.0 * ep}})
        log.epoch(history[-1], history, "tap")
        if ep == 1:
            first = (tmp_path / "r" / "curves.png").read_bytes()
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["history"][-1]["epoch"] == 2
    assert (tmp_path / "r" / "curves.png").read_bytes() == first  # epoch 2 not drawn yet
    log.fail(KeyboardInterrupt())
    stopped = (tmp_path / "r" / "curves.png").read_bytes()
    assert stopped[:4] == b"\x89PNG" and stopped != first  # drawn with epoch 2 on the stop
    assert json.loads((tmp_path / "r" / "status.json").read_text())["state"] == "interrupted"
