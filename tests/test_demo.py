"""The README's main command, reduced: the whole demo end to end (slow: run with -m slow)."""

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path, capsys):
    from pipeline.demo_run import DEMO_HEADS, run_demo
    from stages.backbone import load_clip

    summary = run_demo(root=tmp_path / "art", data=tmp_path / "data", quick=True, seeds=(0,))
    out = capsys.readouterr().out
    assert "clipcache demo" in out and "zero-shot" in out
    assert set(summary["heads"]) == set(DEMO_HEADS)
    for head, res in summary["heads"].items():
        assert 0 <= res["top1"] <= 100
    saved = json.loads((tmp_path / "art" / "demo" / "summary.json").read_text())
    assert saved["cache"] == summary["cache"]
    assert (tmp_path / "art" / "demo" / "compare-init" / "summary.md").exists()
    # the cache and the runs are where every command looks: the CLI finds them by dataset
    from cache.paths import latest_cache

    assert latest_cache(tmp_path / "art" / "caches", "demo").resolve() == Path(summary["cache"]).resolve()
    assert all(Path(h["run_dir"]).parent == tmp_path / "art" / "runs" for h in summary["heads"].values())
    # the demo CLIP is an ordinary open_clip checkpoint, loaded by the user-facing path
    model = load_clip("demo", str(tmp_path / "art" / "demo" / "demo_clip.pt"))
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    # a second run reuses everything
    again = run_demo(root=tmp_path / "art", data=tmp_path / "data", quick=True, seeds=(0,))
    assert again["extract_reused"] is True


def test_ctrl_c_stops_the_demo_with_the_one_line(tmp_path):
    """`make demo` interrupted while it generates its world: exit 130 and the one line, no traceback
    (it printed a KeyboardInterrupt traceback); each step is reused, so rerunning resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.demo_run", "--quick"], cwd=str(tmp_path),
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    while proc.poll() is None and not (tmp_path / "data" / "demo").exists() and time.perf_counter() - t0 < 300:
        time.sleep(0.01)
    assert proc.poll() is None, "the demo ended before the signal"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip().splitlines() == ["interrupted: rerun the same command to resume"], err[-2000:]
