"""`pipeline sweep` throughput: runs per hour with --jobs 1 and --jobs 2, side by side in one run.

The same grid (one head, two learning rates, three seeds) on one cache, once per jobs value,
each in its own sweep folder so nothing is reused between them (a second pass over each folder
measures what a repeated sweep costs: every run reused). Printed as a table with the load
average; ratios are what to compare (the box is shared).

    python bench/bench_sweep.py            # demo-world cache (12 classes x 12 videos), head evl, 10 epochs
    python bench/bench_sweep.py --quick    # 4 classes, tiny model, 3 epochs
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REPO, base_parser, demo_world, extract_cache, load_avg, load_line, make_table, console,
                          now, results_header)


def main() -> None:
    ap = base_parser(__doc__, "bench_sweep", quick="4 classes, tiny model, 3 epochs")
    ap.add_argument("--head", default="evl")
    ap.add_argument("--jobs", default="1,2", help="jobs values to compare")
    ap.add_argument("--set", action="append", default=None,
                    help="fixed head/training options (default for evl: num_layers=1, as the tiny model's 2 blocks allow)")
    args = ap.parse_args()
    start = load_avg()
    work = Path(args.workdir)
    cfg = dict(num_classes=4, train_per_class=3, val_per_class=2, frames=8, size=48, seed=3) if args.quick else \
        dict(num_classes=12, train_per_class=12, val_per_class=6, frames=8, size=64, seed=0)
    spec = demo_world(work / "data", **cfg)
    plan, _ = extract_cache(spec, out=work / "cache", model="tiny", frames=8, layers="all", patch=True,
                            text="clip_single")
    epochs = 3 if args.quick else 10
    rows = []
    for jobs in [int(j) for j in args.jobs.split(",")]:
        out = work / f"sweep-jobs{jobs}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "pipeline.entry", "sweep", "--cache", str(plan.path), "--head", args.head,
               "--set", "lr=3e-4,1e-3", "--set", "batch_size=16", "--seeds", "0,1,2", "--epochs", str(epochs),
               "--recipe", "quick", "--jobs", str(jobs), "--out", str(out)]
        for kv in args.set if args.set is not None else (["num_layers=1"] if args.head == "evl" else []):
            cmd += ["--set", kv]
        for label in ("fresh", "repeated (all reused)"):
            t0 = now()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
            wall = now() - t0
            if proc.returncode:
                raise SystemExit(f"sweep failed ({proc.returncode}): {proc.stderr[-2000:]}")
            rows.append((str(jobs), label, "6", f"{wall:.1f}", f"{6 * 3600 / wall:.0f}"))
    table = make_table(f"pipeline sweep: head {args.head}, 2 lr x 3 seeds, {epochs} epochs, "
                       f"tiny-model cache of {len(spec.splits['train'])} train videos",
                       ["jobs", "pass", "runs", "wall s", "runs / hour"], rows)
    console().print(table)
    print(load_line(start))
    print(results_header(sys.argv, start))


if __name__ == "__main__":
    main()
