"""Shared fixtures: a small generated demo dataset (real h264 files) and CLI runners."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory):
    """4 classes x (3 train + 2 val) videos of 8 frames, 48 px high."""
    from pipeline.demo_data import DemoCfg, generate_demo

    out = tmp_path_factory.mktemp("demo_small")
    return generate_demo(out, DemoCfg(num_classes=4, train_per_class=3, val_per_class=2, frames=8, size=48, seed=3),
                         progress=False)


def extract_in_process(data, out: Path, *, shard: tuple[int, int] = (0, 1), run: dict | None = None, **cfg):
    """Extract a tiny cache into ``out`` in this process (a CLI process costs seconds of imports per
    call): ``run_extraction`` of ``ExtractCfg(model="tiny", workers=0, **cfg)``, quiet, restoring the
    torch thread count it changes. ``data``: a DatasetSpec, or the root of a generated demo dataset
    (``demo_small.root``), read as the "demo" dataset. ``run``: more arguments of run_extraction
    (``refresh``, ``retry_failed``, ...). Returns its result."""
    import torch

    from cache.datasets import DatasetSpec
    from pipeline.datasets import load_dataset
    from stages.extract import ExtractCfg, plan_extraction, run_extraction

    spec = data if isinstance(data, DatasetSpec) else load_dataset("demo", data_root=data)
    threads = torch.get_num_threads()
    try:
        plan = plan_extraction(spec, ExtractCfg(**{"model": "tiny", "workers": 0, **cfg}), out=out)
        return run_extraction(plan, shard=shard, progress=False, log=lambda *a, **k: None, **(run or {}))
    finally:
        torch.set_num_threads(threads)


def extracted_store(data, out: Path, **kw):
    """``extract_in_process`` (same arguments), then the cache opened: a FeatureStore."""
    from cache.store import open_store

    extract_in_process(data, out, **kw)
    return open_store(out)


def run_cli(*args: str, check: bool = False, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `pipeline ...` in a fresh process (exit codes, stderr, signals are all real)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def cli_in_process(capsys, *args) -> tuple[int, str, str]:
    """`pipeline ...` through its real entry point, in this process (exit status, stdout, stderr)."""
    import torch

    from pipeline.cli import main

    threads = torch.get_num_threads()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def popen_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120,
              poll: float = 0.002) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; True when it was killed that way, False when
    it ended first (or ``timeout`` passed, when it is killed anyway). Output is drained so a
    full pipe never stalls the run."""
    deadline = time.time() + timeout
    fired = False
    while time.time() < deadline and proc.poll() is None:
        if ready():
            fired = True
            break
        time.sleep(poll)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    _, proc.stderr_text = proc.communicate()
    return fired and proc.returncode == -signal.SIGKILL


def stopped_after_first_checkpoint(monkeypatch, train) -> None:
    """Run ``train()`` (a stage-two run) as if Ctrl-C came right after its first epoch checkpoint
    was written: the KeyboardInterrupt is raised, the checkpoint is on disk."""
    import stages.train as T

    real_save, saves = T.save_checkpoint, []

    def stop_after_first_checkpoint(obj, path):
        if saves:
            raise KeyboardInterrupt("stopped")
        saves.append(path)
        real_save(obj, path)

    monkeypatch.setattr(T, "save_checkpoint", stop_after_first_checkpoint)
    try:
        with pytest.raises(KeyboardInterrupt):
            train()
    finally:
        monkeypatch.undo()


def kill_mid_run(start: Callable[[], subprocess.Popen], ready: Callable[[], bool], mid_run: Callable[[], bool],
                 reset: Callable[[], None], attempts: int = 4, timeout: float = 120) -> int:
    """Start a run, SIGKILL it once ``ready()`` (e.g. a first checkpoint or shard is committed)
    and check with ``mid_run()`` that it was really stopped part-way. A run that got to its end
    before the kill landed (a loaded machine can deschedule the poller) is not a failure of the
    code under test: ``reset()`` puts the folder back to its starting state and it starts over,
    at most ``attempts`` times. Returns the attempt (1-based) that was killed mid-run."""
    outcomes = []
    for attempt in range(1, attempts + 1):
        reset()
        proc = start()
        if kill_when(proc, ready, timeout):
            if mid_run():
                return attempt
            outcomes.append("killed after it had finished")
        else:  # it ended by itself: say how, so a failure here names its cause
            tail = (getattr(proc, "stderr_text", "") or "").strip().splitlines()[-1:]
            outcomes.append(f"ended first with exit {proc.returncode} {tail}")
    raise AssertionError(f"could not kill the run mid-way in {attempts} attempts: {'; '.join(outcomes)}")


def committed(path: Path) -> dict[str, list[int]] | None:
    """The shards the store at ``path`` has committed, per split ({split: [shard, ...]}), read
    through the store's own API (its status array), never by listing chunk files: a writer's
    temporary ``*.partial`` file in a chunk folder is not a committed shard. None while there is
    no store yet (it appears atomically, by a rename, with everything but the shards)."""
    from cache.errors import CacheError
    from cache.store import PENDING, open_store

    if not path.exists():
        return None
    try:
        st = open_store(path)
    except CacheError:
        return None
    out = {}
    for split in st.splits:
        status = st.status(split)
        out[split] = [k for k in range(st.num_shards(split))
                      if (status[slice(*st.shard_range(split, k))] != PENDING).all()]
    return out


def plant_non_finite(path: Path, split: str, shard: int, rows: list[int] | None = None,
                     value: float = float("nan"), arrays: list[str] | None = None, at: tuple = ()) -> None:
    """Put ``value`` into videos ``rows`` (all of the shard when None) of every float array of a
    committed shard (``arrays``: these stored arrays only, e.g. "cls/scale"; ``at``: one element
    of each row), as a version from before the writers refused non-finite data could leave a
    cache: the arrays written through zarr, the shard's record given their new checksums (so only
    the data check of `cache verify` sees it)."""
    import json

    import zarr

    from cache.files import atomic_write_text
    from cache.integrity import file_checksum
    from cache.store import open_store

    st = open_store(path)
    a, b = st.shard_range(split, shard)
    rows = list(range(a, b)) if rows is None else rows
    rec = st.record(split, shard)
    for key, entry in rec["arrays"].items():
        arr = zarr.open_array(str(path / split / key), mode="r+")
        if arr.dtype.kind == "f" and (arrays is None or key in arrays):
            for i in rows:
                arr[(i, *at)] = value
        entry["checksum"] = file_checksum(path / entry["file"])
    atomic_write_text(path / split / "records" / f"shard-{shard:06d}.json", json.dumps(rec, indent=0))


def n_committed(path: Path) -> int:
    done = committed(path)
    return sum(map(len, done.values())) if done else 0


def torchrun(*args, nproc: int = 2, timeout: float = 600, env: dict | None = None,
             attempts: int = 3) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N ARGS`` (a Python file or ``-m module``).

    No port is picked here: ``--standalone`` has torchrun's agent bind its rendezvous store to
    ``localhost:0`` (the kernel picks a free port while the socket is bound, so nobody can take it
    in between) and the ranks join that same store as clients. A test that binds a port, closes
    it and passes its number can lose it to another process before torchrun binds it. Should a
    rank still report an address in use (a gloo pair), the job is started again, at most
    ``attempts`` times."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe) if exe.exists() else shutil.which("torchrun") or "torchrun", "--standalone",
           "--nproc_per_node", str(nproc), *map(str, args)]
    for attempt in range(attempts):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(ROOT))
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            return proc
    return proc


def demo_args(ds, out, *extra: str) -> list[str]:
    return ["extract", "--dataset", "demo", "--data-root", str(ds.root), "--model", "tiny", "--out", str(out),
            "--no-progress", *extra]


def pytest_configure(config):
    # Tiny models on a shared 2-core machine: one intra-op thread is much faster than many.
    import torch

    torch.set_num_threads(1)
