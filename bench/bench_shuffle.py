"""Block-shuffled epochs (`--set shuffle=block`, stages/data/loader.py) against the full shuffle: EVL's
top-1 on the demo world over several seeds, same cache, same everything else.

Block shuffle reads runs of consecutive videos (blocks of the batch size, shuffled, then videos
shuffled within windows of 4 blocks), so that a batch is a few sequential reads instead of B
scattered ones. The risk is in the order: a list sorted by class gives batches of fewer classes.
The demo world's train list is sorted by class, the worst case for it.

    PYTHONPATH=. .venv/bin/python bench/bench_shuffle.py            # the table in bench/RESULTS.md
    PYTHONPATH=. .venv/bin/python bench/bench_shuffle.py --quick    # a smoke run
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, md_table  # noqa: E402  (sets HF_HUB_OFFLINE=1)


def main() -> None:
    ap = base_parser(__doc__, quick="a smoke run", root="artifacts/bench-shuffle")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--train", type=int, default=16, help="train videos per class")
    ap.add_argument("--val", type=int, default=4, help="val videos per class")
    ap.add_argument("--pretrain-steps", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    if args.quick:
        args.classes, args.train, args.val, args.pretrain_steps, args.epochs, args.seeds = 4, 6, 2, 10, 2, "0"

    import torch

    from pipeline.datasets import load_dataset
    from pipeline.demo_data import DemoCfg, generate_demo, render_frame_with_caption
    from stages.extract import ExtractCfg, plan_extraction, run_extraction
    from stages.pretrain_demo import PretrainCfg, pretrain_demo_clip
    from stages.train import TrainCfg, train_head

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    quiet = lambda *a, **k: None  # noqa: E731
    t0 = time.perf_counter()
    ds = generate_demo(root / "world", DemoCfg(num_classes=args.classes, train_per_class=args.train,
                                               val_per_class=args.val, frames=16, world="rich", seed=0),
                       progress=False)
    spec = load_dataset("demo", data_root=ds.root)
    ckpt = root / "demo_clip.pt"
    pre = PretrainCfg(model="demo", minutes=0, max_steps=args.pretrain_steps, batch_size=128)
    if not ckpt.exists():
        pretrain_demo_clip(ckpt, lambda rng: render_frame_with_caption(rng, size=pre.image_size, world="rich"),
                           None, pre, progress=False, log=quiet, data_tag="demo world=rich (bench_shuffle)",
                           threads="auto")
    cfg = ExtractCfg(model="demo", pretrained=str(ckpt), frames=8, layers="all", patch=True, text="none")
    plan = plan_extraction(spec, cfg, cache_root=root / "caches")
    threads = torch.get_num_threads()
    run_extraction(plan, progress=False, log=quiet)
    torch.set_num_threads(threads)
    print(f"world, demo CLIP and cache ready ({time.perf_counter() - t0:.0f}s)", flush=True)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for shuffle in ("full", "block"):
        accs = []
        for seed in seeds:
            tcfg = TrainCfg(head="evl", epochs=args.epochs, lr=1e-3, batch_size=args.batch, warmup_epochs=1,
                            seed=seed, shuffle=shuffle)
            res = train_head(plan.path, tcfg, {"num_layers": 3}, runs_root=root / "runs", progress=False, log=quiet)
            accs.append(res["final"]["top1"])
            print(f"  evl {shuffle:<5} seed {seed}: top-1 {accs[-1]:.1f}  ({res['seconds']:.0f}s)", flush=True)
        rows.append({"shuffle": shuffle, "top1": accs, "mean": statistics.mean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    load = os.getloadavg()
    out = {"date": date.today().isoformat(), "load_avg": load, "args": vars(args), "rows": rows,
           "videos": {s: len(v) for s, v in spec.splits.items()}, "seconds": time.perf_counter() - t0}
    (root / "shuffle.json").write_text(json.dumps(out, indent=1))
    print(f"\n{date.today().isoformat()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, "
          f"{out['seconds'] / 60:.0f} min, videos {out['videos']}")
    print(md_table(("head", "shuffle", "top-1 % per seed", "mean +- std"),
                   [("evl", r["shuffle"], " / ".join(f"{a:.1f}" for a in r["top1"]), f"{r['mean']:.1f} +- {r['std']:.1f}")
                    for r in rows]))


if __name__ == "__main__":
    main()
