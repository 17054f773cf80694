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

    # a folder holding another run (a scheduler wrote other settings there) is not counted as this one
    config_path = Path(results[0]["run_dir"]) / "config.json"
    config = json.loads(config_path.read_text())
    config["train"]["lr"] = 0.5
    config_path.write_text(json.dumps(config))
    gathered = run_cli(*args, "--gather", env=env)
    assert gathered.returncode == 0 and "1 run folder(s) hold a run with other settings" in gathered.stderr
    states = [r["state"] for r in _read_csv(tmp_path / "sw" / "results.csv")]
    assert states == ["other settings", "done", "done", "done"]


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


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, read from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # two runs of 60 epochs, stopped and resumed: minutes on a loaded 2-core box
def test_ctrl_c_stops_every_run_with_a_checkpoint_and_a_rerun_resumes_them(cache, tmp_path):
    """SIGINT to a sweep: its `train` children get it too, checkpoint and exit; the sweep says so
    in one line and exits 130 with no process left behind; the same command then resumes every
    stopped run from its checkpoint and finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "sw"
    args = ["sweep", "--cache", str(cache), "--head", "tap", "--set", "batch_size=2", "--seeds", "0,1",
            "--epochs", "60", "--jobs", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPCACHE_ROOT": str(tmp_path / "root")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    deadline, kids = time.time() + 240, []
    while time.time() < deadline and proc.poll() is None:  # both runs started, one has a checkpoint
        kids = _children(proc.pid)
        if len(kids) == 2 and list(out.glob("runs/*/last.pt")):
            break
        time.sleep(0.05)
    assert proc.poll() is None and len(kids) == 2, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-2000:]
    assert len(stderr.strip().splitlines()) == 1 and "interrupted" in stderr, stderr
    assert not any(_alive(pid) for pid in kids), "a run outlived the sweep"
    stopped = [json.loads(p.read_text()) for p in out.glob("runs/*/metrics.json")]
    assert stopped and all(m.get("final") is None for m in stopped)  # no run claims to have finished

    again = run_cli(*args, env={"CLIPCACHE_ROOT": str(tmp_path / "root")})
    assert again.returncode == 0, again.stderr[-2000:]
    logs = " ".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "resuming" in logs and "from epoch" in logs
    rows = _read_csv(out / "results.csv")
    assert len(rows) == 2 and {r["state"] for r in rows} == {"done"}
    for r in rows:
        history = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["history"]
        assert len(history) == 60


def test_seeds_come_from_the_flag_else_the_grid_file_else_zero(cache, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("head: tap\nseeds: [3, 4]\nlr: [1e-3]\n")
    base = ["sweep", "--cache", cache, "--grid", grid, "--print-commands", "--out", tmp_path / "sw"]

    def seeds(*extra) -> list[int]:
        proc = run_cli(*base, *extra, env={"CLIPCACHE_ROOT": str(tmp_path / "root")})
        assert proc.returncode == 0, proc.stderr[-2000:]
        argvs = [shlex.split(ln) for ln in proc.stdout.splitlines() if ln.startswith("pipeline train")]
        return [int(x.split("=", 1)[1]) for a in argvs for x in a if x.startswith("seed=")]

    assert seeds() == [3, 4]                   # the file's
    assert seeds("--seeds", "0") == [0]        # a flag given wins, even the default's value
    assert seeds("--seeds", "1,2") == [1, 2]
    grid.write_text("head: tap\nlr: [1e-3]\n")
    assert seeds() == [0]


def test_two_callers_sharing_one_work_list_start_each_run_once(tmp_path):
    """`make demo`'s heads: a thread and the main thread take runs from one list (run_commands
    shared=True); every run starts exactly once and each caller reports the runs it ran."""
    import sys
    import threading

    from pipeline.sweep import SweepRun, run_commands

    record = tmp_path / "started"
    program = [sys.executable, "-c", "import sys, time; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); "
               "time.sleep(0.2)"]
    names = [f"r{i}" for i in range(7)]
    work = [SweepRun(n, "tap", {}, 0, [str(record), n], None) for n in names]
    got: dict = {}
    other = threading.Thread(target=lambda: got.update(thread=run_commands(work, 1, program, tmp_path / "a",
                                                                           log=lambda m: None, shared=True)))
    other.start()
    mine = run_commands(work, 1, program, tmp_path / "b", log=lambda m: None, shared=True)
    other.join()
    assert work == []
    assert sorted(record.read_text().split()) == names  # each once
    assert set(mine) | set(got["thread"]) == set(names) and not set(mine) & set(got["thread"])
    assert mine and got["thread"]  # both took a share
    assert all(r["rc"] == 0 for r in [*mine.values(), *got["thread"].values()])
