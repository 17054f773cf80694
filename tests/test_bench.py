"""bench/: the shared helpers (bench/common.py), the extractor's own phase timings that
bench_extract.py reads instead of wrapping the extractor, the GPU check's CPU dry run (slow) and
bench_scale.py at toy sizes (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402


def test_flag_lists_and_parser():
    assert common.int_list("0, 1,2") == [0, 1, 2]
    assert common.int_list("", (4, 5)) == [4, 5]
    assert common.name_list(" evl, side4video ,") == ["evl", "side4video"]
    ap = common.base_parser("First line.\n\nMore.", "somewhere", device="cpu", threads=True, repeats=True)
    args = ap.parse_args(["--quick", "--device", "cuda", "--threads", "3"])
    assert (args.quick, args.device, args.threads, args.repeats) == (True, "cuda", 3, 0)
    assert args.workdir == str(ROOT / "artifacts" / "somewhere")
    assert ap.description == "First line."


def test_timing_helpers_measure_what_ran():
    calls = []
    best = common.best_of(lambda: calls.append(1) or len(calls), repeats=3, warmup=2)
    assert len(calls) == 5 and len(best.times) == 3 and best.result == 5
    assert best.seconds == min(best.times) <= best.median
    items, secs = common.repeat_until(lambda: 7, 0.02)
    assert items % 7 == 0 and items >= 7 and secs >= 0.02
    before = common.cpu_self()
    np.linalg.svd(np.random.default_rng(0).standard_normal((300, 300)))
    assert common.cpu_self() > before


def test_tables_and_statistics():
    md = common.md_table(("head", "top-1"), [("evl", "50.0"), ("tap", 1)])
    assert md.splitlines() == ["| head | top-1 |", "|---|---|", "| evl | 50.0 |", "| tap | 1 |"]
    assert common.mean_spread([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert common.mean_spread([4.0]) == (4.0, 0.0)
    assert common.fmt_rate(250, 2) == "125" and common.fmt_rate(5, 2) == "2.5"
    t = common.make_table("t", ("a", "b"), [(1, 2)], left=("b",))
    assert [c.justify for c in t.columns] == ["left", "left"] and t.row_count == 1
    head = common.results_header(["bench/bench_x.py", "--quick"], start_load=(1.0, 2.0, 3.0))
    assert head.startswith("command: `python bench/bench_x.py --quick`;") and "(at start 1.00)" in head


def test_extractor_reports_where_its_encode_phase_went(demo_small, tmp_path):
    """What bench_extract.py shows, from the extractor itself: the phases are measured, add up to
    no more than the phase's wall time, and the decode workers' CPU is counted."""
    from dataclasses import replace

    from pipeline.datasets import load_dataset

    spec = load_dataset("demo", data_root=demo_small.root)
    spec = replace(spec, splits={"train": spec.splits["train"][:4]})
    timings = {}
    for workers in (0, 1):
        plan, res = common.extract_cache(spec, out=tmp_path / f"w{workers}", model="tiny", layers="last1",
                                         text="none", workers=workers, batch_frames=16, device="cpu")
        assert res.frames == 4 * 8 and res.failed == 0
        parts = (res.encoder_seconds, res.loader_wait_seconds, res.prepare_seconds, res.output_seconds,
                 res.write_wait_seconds)
        assert all(p >= 0 for p in parts) and res.encoder_seconds > 0 and res.writer_seconds > 0
        assert sum(parts) <= res.encode_seconds + 1e-3
        assert 0 < res.encoder_cpu_seconds <= res.cpu_seconds
        timings[workers] = res
    assert timings[0].worker_cpu_seconds == 0  # decoded in the main process
    assert timings[1].worker_cpu_seconds > 0   # a worker process decoded


def test_extractor_keeps_a_lower_thread_count_it_was_given(demo_small, tmp_path):
    """On CPU the extractor leaves the decode workers their cores but never raises the torch
    thread count above what the process was given (bench_extract's 1-thread rows, OMP_NUM_THREADS),
    and gives the process its thread count back when it is done."""
    import torch

    from pipeline.datasets import load_dataset

    spec = load_dataset("demo", data_root=demo_small.root)
    with common.torch_threads(1):
        _, res = common.extract_cache(spec, out=tmp_path / "c", model="tiny", layers="last1", text="none",
                                      workers=0, device="cpu", keep_threads=False)
        assert res.threads == 1 and torch.get_num_threads() == 1
    if (os.cpu_count() or 1) > 1:  # a decode worker gets one of the cores
        with common.torch_threads(os.cpu_count()):
            _, res = common.extract_cache(spec, out=tmp_path / "d", model="tiny", layers="last1", text="none",
                                          workers=1, device="cpu", keep_threads=False)
            assert res.threads == os.cpu_count() - 1 and torch.get_num_threads() == os.cpu_count()


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path):
    """gpu_check.sh end to end on CPU with tiny sizes: every step runs (or, for a bench script
    not in this checkout, is reported missing), and one table comes out."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(tmp_path),
                           "--python", sys.executable], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "CPU DRY RUN" in out and "| extractor vs bare encoder" in out and "| EVL epoch: cache vs online" in out
    assert (tmp_path / "extract.status").read_text().startswith("ok")
    assert (tmp_path / "train.status").read_text().startswith("ok")
    read = (tmp_path / "read.status").read_text()
    if (ROOT / "bench" / "bench_read.py").exists():
        assert read.startswith("ok"), read
    else:
        assert read.startswith("missing"), read
    rows = json.loads((tmp_path / "extract.json").read_text())["rows"]
    assert {r["path"] for r in rows} >= {"bare encoder", "pipelined w=0", "pipelined w=1"}


@pytest.mark.slow
def test_bench_scale_times_every_whole_cache_command_at_two_sizes(tmp_path, capsys):
    """bench_scale.py end to end at toy sizes: both caches built through the store's writer, the
    run folders through the run log, every operation run (each checks its own output) and timed
    at both sizes, one table; the caches are removed unless --keep."""
    from bench import bench_scale

    bench_scale.main(["--sizes", "120,1200", "--reps", "1", "--root", str(tmp_path / "scale"), "--md"])
    out = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.startswith("| ") and "operation" not in ln]
    assert [ln.split(" | ")[0][2:] for ln in table] == list(bench_scale.operations(bench_scale.World(1, tmp_path)))
    assert all(float(ln.split(" | ")[2]) > 0 for ln in table)  # the large size's wall seconds
    assert "command: `python bench/bench_scale.py --sizes 120,1200" in out
    assert not (tmp_path / "scale").exists()
