"""Shared fixtures: a small generated demo dataset (real h264 files) and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def run_cli(*args: str, check: bool = False, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `pipeline ...` in a fresh process (exit codes, stderr, signals are all real)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def popen_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))


def demo_args(ds, out, *extra: str) -> list[str]:
    return ["extract", "--dataset", "demo", "--data-root", str(ds.root), "--model", "tiny", "--out", str(out),
            "--no-progress", *extra]


def pytest_configure(config):
    # Tiny models on a shared 2-core machine: one intra-op thread is much faster than many.
    import torch

    torch.set_num_threads(1)
