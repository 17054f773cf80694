"""`pipeline sweep`: a grid of `pipeline train` runs on one cache, in parallel processes, folded
into one mean +- std table; reused when repeated; commands for a scheduler; errors in one line."""

from __future__ import annotations

import csv
import json
import shlex
import statistics
from pathlib import Path

import pytest

from cache.errors import ConfigError
from conftest import demo_args, run_cli
from pipeline.sweep import parse_grid, plan_sweep, summarise


@pytest.fixture(scope="module")
def cache(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "cache"
    run_cli(*demo_args(demo_small, out, "--text", "clip_single"), check=True)
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_the_grid_is_every_combination_and_fixed_values_stay_out_of_the_names(tmp_path):
    grid = parse_grid(["lr=3e-4,1e-3", "batch_size=4", "label_smoothing=0,0.1"])
    assert grid == {"lr": ["3e-4", "1e-3"], "batch_size": ["4"], "label_smoothing": ["0", "0.1"]}
    runs = plan_sweep(["tap", "evl"], grid, [0, 1, 2], ["--cache", "C"], tmp_path)
    assert len(runs) == 2 * 2 * 2 * 3
    assert len({r.name for r in runs}) == len(runs) and len({r.run_dir for r in runs}) == len(runs)
    first = runs[0]
    assert first.values == {"lr": "3e-4", "label_smoothing": "0"} and "batch_size" not in first.name
    argv = first.argv
    assert argv[:3] == ["train", "--head", "tap"] and "batch_size=4" in argv and "seed=0" in argv
    assert argv[argv.index("--run-dir") + 1] == str(tmp_path / "runs" / first.name)
    # a JSON list carries values with commas; a sample draws settings, each with every seed
    assert parse_grid(['train_classes=["0-1,3","2"]'])["train_classes"] == ["0-1,3", "2"]
    sampled = plan_sweep(["tap"], {"lr": ["1", "2", "3", "4"]}, [0, 1], [], tmp_path, sample=2, sample_seed=5)
    assert len(sampled) == 4 and len({r.setting for r in sampled}) == 2
    assert sampled == plan_sweep(["tap"], {"lr": ["1", "2", "3", "4"]}, [0, 1], [], tmp_path, sample=2, sample_seed=5)


@pytest.mark.parametrize("sets,heads,seeds,message", [
    (["lr=1e-3,1e-3"], ["tap"], [0], "given twice"),
    (["lr="], ["tap"], [0], "empty value"),
    (["seed=1,2"], ["tap"], [0], "--seeds"),
    (["lr=1"], ["tap", "tap"], [0], "given twice"),
    (["lr=1"], ["tap"], [0, 0], "given twice"),
    (["lr=1"], [], [0], "no head"),
])
def test_a_bad_grid_is_refused_before_anything_runs(tmp_path, sets, heads, seeds, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(heads, parse_grid(sets), seeds, [], tmp_path)


def test_mean_and_std_fold_the_seeds_of_one_setting(tmp_path):
    runs = plan_sweep(["tap"], {"lr": ["1", "2"]}, [0, 1, 2], [], tmp_path)
    rows = [{"state": "done", "top1": t, "top5": 100.0, "mean_class": t, "seconds": 1.0, "trainable_params": 7}
            for t in (10.0, 20.0, 60.0, 50.0, 50.0, 50.0)]
    rows[5] = {"state": "missing"}
    keys, summary = summarise(runs, rows)
    assert keys == ["lr"]
    assert summary[0]["top1_mean"] == pytest.approx(30.0) and summary[0]["top1_std"] == pytest.approx(
        statistics.stdev([10, 20, 60]))
    assert (summary[1]["seeds"], summary[1]["of"]) == (2, 3) and summary[1]["top1_std"] == 0.0


def test_sweep_runs_in_parallel_gives_the_table_and_reuses_its_runs(cache, tmp_path):
    env = {"CLIPCACHE_ROOT": str(tmp_path / "root")}
    args = ["sweep", "--cache", cache, "--head", "tap", "--set", "lr=3e-4,1e-3", "--set", "batch_size=4",
            "--seeds", "0,1", "--epochs", "1", "--jobs", "2", "--out", tmp_path / "sw"]
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 runs (2 settings x 2 seeds), 2 at once" in proc.stdout
    results = _read_csv(tmp_path / "sw" / "results.csv")
    assert len(results) == 4 and {r["state"] for r in results} == {"done"}
    for r in results:  # each row is what its own run folder says
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert float(r["top1"]) == pytest.approx(metrics["final"]["top1"])
        config = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        assert config["train"]["seed"] == int(r["seed"]) and config["train"]["lr"] == float(r["lr"])
        assert config["train"]["batch_size"] == 4 and config["train"]["epochs"] == 1
    summary = _read_csv(tmp_path / "sw" / "summary.csv")
    assert [s["lr"] for s in summary] == ["3e-4", "1e-3"]
    for s in summary:
        top1 = [float(r["top1"]) for r in results if r["lr"] == s["lr"]]
        assert float(s["top1_mean"]) == pytest.approx(statistics.mean(top1))
        assert float(s["top1_std"]) == pytest.approx(statistics.stdev(top1))
    assert "| tap | 3e-4 | 2/2 |" in (tmp_path / "sw" / "summary.md").read_text()

    again = run_cli(*args, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("reused (finished before)") == 4
    assert _read_csv(tmp_path / "sw" / "results.csv") == results

    # for a scheduler: the very commands, one per run; --gather reads what they made
    printed = run_cli(*args, "--print-commands", env=env)
    lines = [ln for ln in printed.stdout.splitlines() if ln.startswith("pipeline train")]
    assert len(lines) == 4 and all("--run-dir" in ln for ln in lines)
    argv = shlex.split(lines[0])
    assert argv[argv.index("--run-dir") + 1] == results[0]["run_dir"]
    gathered = run_cli(*args, "--gather", env=env)
    assert gathered.returncode == 0 and "reused" not in gathered.stdout
    assert _read_csv(tmp_path / "sw" / "results.csv") == results


def test_a_bad_option_is_one_line_before_any_run_and_a_failing_run_fails_the_sweep(cache, tmp_path):
    env = {"CLIPCACHE_ROOT": str(tmp_path / "root")}
    bad = run_cli("sweep", "--cache", cache, "--head", "tap", "--set", "no_such_option=1,2", env=env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no_such_option" in bad.stderr
    assert not (tmp_path / "root" / "sweeps").exists()
    missing = run_cli("sweep", "--cache", tmp_path / "nope", "--head", "tap", env=env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    # the second value is refused by `train` itself: that run fails, the sweep says so and exits 1
    proc = run_cli("sweep", "--cache", cache, "--head", "tap", "--set", "epochs=1,-3", "--set", "batch_size=4",
                   "--jobs", "1", "--out", tmp_path / "sw", env=env)
    assert proc.returncode == 1
    assert "FAILED (exit 2)" in proc.stdout and "1 of 2 runs failed" in proc.stderr
    rows = _read_csv(tmp_path / "sw" / "results.csv")
    assert [r["state"] for r in rows] == ["done", "missing"]
