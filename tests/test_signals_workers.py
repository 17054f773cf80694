"""SIGINT / SIGTERM while stage two's loader runs worker processes (`--set workers=2`, issue 10).

The command stops with exit 130 / 143 and exactly the one line, every loader worker is gone
once it has exited, no shared-memory segment of its processes is left under /dev/shm, and rerunning
the same command resumes from the last checkpoint to the result of an uninterrupted run. The
signal goes once a checkpoint of this run is on disk and both workers are alive (a few batches
have been read by them). A worker must also end when told to (Process.terminate: the signal
handler a fork inherits ignored SIGTERM, and the interpreter's exit then waited for such a worker
forever) and when its parent is killed outright; workers killed under a run (the out-of-memory
killer) end it in one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from stages.runs import finished_metrics
from test_signals import ENV, LINE, _handles_sigterm, _train_args, reference, train_reference  # noqa: F401 - fixtures

WORKERS = ["--set", "workers=2", "--set", "preload=off"]  # the workers read the shard files themselves


def _session(sid: int) -> dict[int, str]:
    """Live (not zombie) processes of session ``sid`` (the command and its children): pid -> start time."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            out[int(p)] = fields[19]
    return out


def _alive(pids: dict[int, str]) -> list[int]:
    left = []
    for pid, start in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and fields[19] == start:  # the same process (not a reused pid), not a zombie
            left.append(pid)
    return left


def _shm_of(pids) -> list[str]:
    """/dev/shm entries named after one of ``pids`` (torch names its segments torch_<pid>_...)."""
    return sorted(n for n in os.listdir("/dev/shm") if any(f"_{pid}_" in n for pid in pids))


def _stop_after_a_checkpoint(args, run: Path, sig: int, group: bool, delay: float):
    """Run `pipeline args`; ``delay`` seconds after it has written a checkpoint with its two loader
    workers up (the next epoch's batches being read), send ``sig``."""
    before = (run / "last.pt").stat().st_mtime_ns if (run / "last.pt").exists() else 0
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=str(ROOT), start_new_session=True)
    seen: dict[int, str] = {}
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < 300:
        procs = _session(proc.pid)
        seen.update(procs)
        fresh = (run / "last.pt").exists() and (run / "last.pt").stat().st_mtime_ns != before
        if fresh and len(procs) >= 3 and _handles_sigterm(proc.pid):  # the command and two workers
            break
        time.sleep(0.01)
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < delay:
        seen.update(_session(proc.pid))
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before the signal:\n{proc.communicate()[1][-3000:]}"
    seen.update(_session(proc.pid))
    if group:
        os.killpg(proc.pid, sig)  # a terminal's Ctrl-C reaches the workers too
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc, out, err, seen


@pytest.mark.parametrize("sig, group, delay", [pytest.param(signal.SIGINT, True, 0.3, id="SIGINT-to-the-group"),
                                              pytest.param(signal.SIGTERM, False, 0.0, id="SIGTERM",
                                                           marks=pytest.mark.slow)])
def test_a_stop_with_loader_workers_leaves_nothing_and_the_rerun_resumes(reference, train_reference, tmp_path,
                                                                         sig, group, delay):
    metrics, _ = train_reference  # an uninterrupted run without workers: the loader's values are the same
    run = tmp_path / "run"
    args = _train_args(reference[0].path, run) + WORKERS
    proc, _, err, seen = _stop_after_a_checkpoint(args, run, sig, group, delay)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert [ln for ln in err.splitlines() if ln.strip()] == [LINE], err[-3000:]
    assert len(seen) >= 3, seen  # the workers existed
    deadline = time.monotonic() + 10
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive(seen) == [], "loader worker(s) outlived the command"
    assert _session(proc.pid) == {}
    assert _shm_of(seen) == []
    epoch = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert epoch >= 1 and finished_metrics(run) is None
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"

    rerun = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                           env=ENV, cwd=str(ROOT), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"from epoch {epoch}" in rerun.stdout, rerun.stdout
    got = json.loads((run / "metrics.json").read_text())
    assert [h["train_loss"] for h in got["history"]] == [h["train_loss"] for h in metrics["history"]]
    assert got["final"] == metrics["final"]


_POOL = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline import signals
signals.install()  # as the CLI does: the workers are forked with its handler in place
from cache.store import open_store
from stages.data.zarr_split import CacheSplit, HeadInputs, select_videos
from stages.heads import DataKeys
from stages.data.loader import CacheLoader, ZarrBatches
st = open_store(sys.argv[2])
data = CacheSplit(st, HeadInputs(st, DataKeys(patch_layers=(-1,)), "train"), select_videos(st, "train"),
                  train=True, preload=False)
src = ZarrBatches(data, preload="off")
assert len(list(CacheLoader(src, [[0, 1], [2, 3]], "cpu", workers=2))) == 2
procs = src._pool.procs
print(procs[0].pid, procs[1].pid, flush=True)
procs[0].terminate()
procs[0].join(5)
print("terminated" if procs[0].exitcode == -15 else f"still-running:{procs[0].exitcode}", flush=True)
os._exit(0)  # as if killed: no finaliser, no atexit; the other worker is orphaned
"""


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def test_a_loader_worker_ends_on_terminate_and_when_its_parent_dies(reference):
    # the workers inherit the pipes: read the lines and the exit status, never wait for EOF (a worker
    # that lives on would hold it back)
    proc = subprocess.Popen([sys.executable, "-c", _POOL, str(ROOT), str(reference[0].path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV)
    first = proc.stdout.readline().split()
    workers = {pid: _start_time(pid) for pid in map(int, first)}
    workers = {pid: start for pid, start in workers.items() if start is not None}  # those still in /proc
    try:
        said = proc.stdout.readline().strip()
        assert proc.wait(timeout=120) == 0 and len(first) == 2 and said == "terminated", (first, said)
        deadline = time.monotonic() + 10  # the orphan notices its parent is gone within a second or so
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(workers) == [], "a loader worker lived on after its parent was killed"
    finally:
        for pid in _alive(workers):  # what a failure leaves is ended here, by pid
            os.kill(pid, signal.SIGKILL)
        proc.stdout.close()


def test_loader_workers_killed_under_the_run_are_one_line(reference):
    """The kernel's out-of-memory killer takes the workers (SIGKILL): the batch never comes; the run
    ends in one line (RunFailedError, exit 1) that says what happened, not a RuntimeError traceback."""
    from cache.errors import RunFailedError
    from cache.store import open_store
    from stages.data.zarr_split import CacheSplit, HeadInputs, select_videos
    from stages.heads import DataKeys
    from stages.data.loader import CacheLoader, ZarrBatches

    st = open_store(reference[0].path)
    data = CacheSplit(st, HeadInputs(st, DataKeys(frame_emb=True), "train"), select_videos(st, "train"), train=True,
                      preload=False)
    src = ZarrBatches(data, preload="off")
    plan = [[0, 1], [2, 3], [4, 5]]
    assert len(list(CacheLoader(src, plan, "cpu", workers=2))) == 3
    for p in src._pool.procs:
        p.kill()
        p.join()
    with pytest.raises(RunFailedError, match="killed by SIGKILL") as err:
        list(CacheLoader(src, plan, "cpu", workers=2))
    assert "\n" not in str(err.value) and "--set workers=N" in str(err.value)
