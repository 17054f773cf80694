#!/usr/bin/env python
"""Stage two under torchrun on CPU (gloo): 2 DDP ranks vs 1 process, side by side.

    python bench/bench_ddp.py            # about 3 minutes on a 2-core box
    python bench/bench_ddp.py --quick    # about 1 minute

One cache (the built-in "demo" backbone, random init, all blocks with patch tokens) is made
once in --workdir and reused. Each head then trains from it through the real CLI, three ways,
interleaved (repeat 1 of every way, then repeat 2, ...; the best repeat is kept):

  1 proc x 1 thread   `pipeline train`, OMP_NUM_THREADS=1  (the work one rank does alone)
  1 proc x N threads  `pipeline train`, OMP_NUM_THREADS=N  (one process on every core)
  N ranks x 1 thread  `torchrun --nproc_per_node N -m pipeline.cli train`, OMP_NUM_THREADS=1

with the same global batch, epochs and seed. Timed: the run's own "seconds" in metrics.json
(cache read, training, evaluation; not the interpreter or torchrun start-up). Printed per head:
seconds per epoch, speed-up of the N ranks over 1 proc x 1 thread (N is ideal) and over
1 proc x N threads, and how far the DDP run's final training loss is from the 1-process one
(the runs follow each other up to float summation order, so this should be ~1e-6).

On a CPU box the ranks share the cores with each other and with anything else running, so read
this as the overhead of the DDP path (gather of the head outputs, gradient all-reduce, split
evaluation), not as a GPU scaling figure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, base_parser, console as make_console, demo_world, extract_cache  # noqa: E402
from bench.common import load_line, make_table, name_list, now  # noqa: E402

HEADS = {  # head -> --set options (demo backbone: E = 64, width 128, 4 blocks)
    "tap": ["lr=1e-2"],
    "text4vis": ["lr=1e-3", "layers=2", "pos_rows=16"],
    "evl": ["lr=1e-3", "num_layers=2", "dropout=0", "cls_dropout=0"],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cache(workdir: Path, per_class: int) -> Path:
    from cache.store import open_store

    ds = demo_world(workdir / f"data-{per_class}", num_classes=8, train_per_class=per_class, val_per_class=4,
                    frames=8, size=64, seed=11)
    plan, _ = extract_cache(ds, out=workdir / f"cache-{per_class}", model="demo", layers="all", patch=True,
                            text="clip_single")
    return open_store(plan.path).path


def train_once(cache: Path, head: str, sets: list[str], run_dir: Path, ranks: int, threads: int) -> dict:
    args = ["-m", "pipeline.cli", "train", "--head", head, "--cache", str(cache), "--run-dir", str(run_dir),
            "--no-progress", *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    if ranks > 1:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(ranks),
               "--master_port", str(_port()), *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    ap = base_parser(__doc__, "bench_ddp", quick="fewer videos, epochs and repeats", repeats=True)
    ap.add_argument("--ranks", type=int, default=os.cpu_count() or 2, help="DDP ranks = threads of the 1-process run")
    ap.add_argument("--heads", default=",".join(HEADS))
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    per_class, epochs, repeats = (8, 2, 1) if args.quick else (24, 3, 2)
    repeats = args.repeats or repeats
    n = max(2, args.ranks)
    console = make_console(150)
    t0 = now()
    cache = make_cache(workdir, per_class)
    console.print(f"cache {cache} ({8 * per_class} train / 32 val videos, demo backbone, all blocks + patch tokens), "
                  f"made or reused in {now() - t0:.1f}s; {load_line()}")
    ways = {"1 proc x 1 thread": (1, 1), f"1 proc x {n} threads": (1, n), f"{n} ranks x 1 thread": (n, 1)}
    best: dict[tuple[str, str], float] = {}
    losses: dict[tuple[str, str], float] = {}
    for rep in range(repeats):
        for head in name_list(args.heads):
            sets = [f"epochs={epochs}", "batch_size=16", *HEADS[head]]
            for way, (ranks, threads) in ways.items():
                m = train_once(cache, head, sets, workdir / "runs" / f"{head}-{ranks}x{threads}-{rep}", ranks, threads)
                key = (head, way)
                best[key] = min(best.get(key, float("inf")), m["seconds"] / epochs)
                losses[key] = m["history"][-1]["train_loss"]
    table = make_table("", ("head", *[f"s/epoch {w}" for w in ways], f"{n} ranks vs 1x1 (ideal {n})",
                            f"{n} ranks vs 1x{n}", "final loss |DDP - 1 proc| rel"))
    for head in name_list(args.heads):
        s = [best[(head, w)] for w in ways]
        one, many, ddp = s
        ref = losses[(head, "1 proc x 1 thread")]
        table.add_row(head, *[f"{x:.2f}" for x in s], f"{one / ddp:.2f}x", f"{many / ddp:.2f}x",
                      f"{abs(losses[(head, list(ways)[2])] - ref) / max(abs(ref), 1e-12):.1e}")
    console.print(table)
    console.print(f"best of {repeats} interleaved repeat(s); {epochs} epochs, global batch 16; "
                  f"{load_line(t0=t0)}")


if __name__ == "__main__":
    main()
