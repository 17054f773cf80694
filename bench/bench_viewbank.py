"""The view bank (`extract --train-aug K`) measured: EVL and Side4Video trained on the demo world
with K = 1, 2, 4 augmented train views, and on the plain cache (one fixed centre view), over
several seeds; top-1 mean and spread, and the bytes of the train split on disk.

Everything is small on purpose (the project's box is 2 shared cores): a demo world of
``--classes`` x (``--train`` + ``--val``) videos, a demo CLIP pretrained for ``--pretrain-steps``
steps, the heads sized as in `make demo` but trained for ``--epochs`` epochs. The val split is
the same in every cache (fixed centre views). Writes ``<root>/viewbank.json`` and prints the
markdown table that README.md quotes.

    PYTHONPATH=. .venv/bin/python bench/bench_viewbank.py            # the README's table
    PYTHONPATH=. .venv/bin/python bench/bench_viewbank.py --quick    # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HEADS = {  # sized as pipeline/demo_run.py's DEMO_HEADS
    "evl": {"num_layers": 3},
    "side4video": {"preset": "custom", "num_blocks": 4, "side_width": 64},
}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="artifacts/bench-viewbank")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--train", type=int, default=4, help="train videos per class")
    ap.add_argument("--val", type=int, default=4, help="val videos per class")
    ap.add_argument("--pretrain-steps", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ks", default="0,1,2,4", help="train views per video; 0 = the plain cache (no view bank)")
    ap.add_argument("--heads", default="evl,side4video")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.classes, args.train, args.val, args.pretrain_steps, args.epochs, args.seeds = 4, 3, 2, 20, 2, "0"

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
    pretrain_demo_clip(ckpt, lambda rng: render_frame_with_caption(rng, size=pre.image_size, world="rich"),
                       None, pre, progress=False, log=quiet, data_tag="demo world=rich (bench_viewbank)",
                       threads="auto")
    print(f"world and demo CLIP ready ({time.perf_counter() - t0:.0f}s)", flush=True)

    torch.set_num_threads(1)  # tiny heads on a shared 2-core box: one thread is the faster
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        cfg = ExtractCfg(model="demo", pretrained=str(ckpt), frames=8, layers="all", patch=True, store_frames=True,
                         text="none", train_aug=k or None)
        plan = plan_extraction(spec, cfg, cache_root=root / "caches")
        te = time.perf_counter()
        threads = torch.get_num_threads()
        run_extraction(plan, progress=False, log=quiet)
        torch.set_num_threads(threads)
        train_bytes = dir_bytes(plan.path / "train")
        print(f"K={k or 'plain'}: cache {plan.path.name}, train split {train_bytes / 2**20:.1f} MiB "
              f"({time.perf_counter() - te:.0f}s)", flush=True)
        for head in args.heads.split(","):
            accs = []
            for seed in seeds:
                tcfg = TrainCfg(head=head, epochs=args.epochs, lr=1e-3, batch_size=16, warmup_epochs=1, seed=seed)
                res = train_head(plan.path, tcfg, HEADS[head], runs_root=root / "runs", progress=False, log=quiet,
                                 reuse=True)
                accs.append(res["final"]["top1"])
                print(f"  {head:<10} seed {seed}: top-1 {accs[-1]:.1f}  ({res['seconds']:.0f}s)", flush=True)
            rows.append({"k": k, "head": head, "top1": accs, "mean": statistics.mean(accs),
                         "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "train_bytes": train_bytes})
    load = os.getloadavg()
    out = {"date": date.today().isoformat(), "load_avg": load, "args": vars(args), "rows": rows,
           "videos": {s: len(v) for s, v in spec.splits.items()}, "seconds": time.perf_counter() - t0}
    (root / "viewbank.json").write_text(json.dumps(out, indent=1))
    print(f"\n{date.today().isoformat()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, "
          f"{out['seconds'] / 60:.0f} min")
    print("| head | train views | top-1 % per seed | mean +- std | train split bytes |")
    print("|---|---|---|---|---|")
    for r in rows:
        views = "1 (plain: centre crop, segment centres)" if r["k"] == 0 else f"{r['k']} (view bank)"
        print(f"| {r['head']} | {views} | {' / '.join(f'{a:.1f}' for a in r['top1'])} | "
              f"{r['mean']:.1f} +- {r['std']:.1f} | {r['train_bytes']:,} |")


if __name__ == "__main__":
    main()
