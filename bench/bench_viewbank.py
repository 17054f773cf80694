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

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_parser, demo_clip, demo_world, dir_bytes, extract_cache, int_list,  # noqa: E402
                          load_avg, mean_spread, md_table, name_list, now, quiet, results_header)

HEADS = {  # sized as pipeline/demo_run.py's DEMO_HEADS
    "evl": {"num_layers": 3},
    "side4video": {"preset": "custom", "num_blocks": 4, "side_width": 64},
}


def main() -> None:
    ap = base_parser(__doc__, quick="a smoke run (minutes)", root="artifacts/bench-viewbank")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--train", type=int, default=4, help="train videos per class")
    ap.add_argument("--val", type=int, default=4, help="val videos per class")
    ap.add_argument("--pretrain-steps", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ks", default="0,1,2,4", help="train views per video; 0 = the plain cache (no view bank)")
    ap.add_argument("--heads", default="evl,side4video")
    args = ap.parse_args()
    if args.quick:
        args.classes, args.train, args.val, args.pretrain_steps, args.epochs, args.seeds = 4, 3, 2, 20, 2, "0"

    import torch

    from stages.train import TrainCfg, train_head

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    t0, load0 = now(), load_avg()
    spec = demo_world(root / "world", num_classes=args.classes, train_per_class=args.train, val_per_class=args.val,
                      frames=16, world="rich", seed=0)
    ckpt = demo_clip(root / "demo_clip.pt", args.pretrain_steps, tag="bench_viewbank")
    print(f"world and demo CLIP ready ({now() - t0:.0f}s)", flush=True)

    torch.set_num_threads(1)  # tiny heads on a shared 2-core box: one thread is the faster
    seeds = int_list(args.seeds)
    rows = []
    for k in int_list(args.ks):
        te = now()
        plan, _ = extract_cache(spec, cache_root=root / "caches", model="demo", pretrained=str(ckpt), frames=8,
                                layers="all", patch=True, store_frames=True, text="none", train_aug=k or None)
        train_bytes = dir_bytes(plan.path / "train")
        print(f"K={k or 'plain'}: cache {plan.path.name}, train split {train_bytes / 2**20:.1f} MiB "
              f"({now() - te:.0f}s)", flush=True)
        for head in name_list(args.heads):
            accs = []
            for seed in seeds:
                tcfg = TrainCfg(head=head, epochs=args.epochs, lr=1e-3, batch_size=16, warmup_epochs=1, seed=seed)
                res = train_head(plan.path, tcfg, HEADS[head], runs_root=root / "runs", progress=False, log=quiet,
                                 reuse=True)
                accs.append(res["final"]["top1"])
                print(f"  {head:<10} seed {seed}: top-1 {accs[-1]:.1f}  ({res['seconds']:.0f}s)", flush=True)
            mean, std = mean_spread(accs)
            rows.append({"k": k, "head": head, "top1": accs, "mean": mean, "std": std, "train_bytes": train_bytes})
    header = results_header(start_load=load0)
    out = {"header": header, "load_avg": load_avg(), "args": vars(args), "rows": rows,
           "videos": {s: len(v) for s, v in spec.splits.items()}, "seconds": now() - t0}
    (root / "viewbank.json").write_text(json.dumps(out, indent=1))
    print(f"\n{header}; {out['seconds'] / 60:.0f} min")
    print(md_table(("head", "train views", "top-1 % per seed", "mean +- std", "train split bytes"),
                   [(r["head"], "1 (plain: centre crop, segment centres)" if r["k"] == 0 else f"{r['k']} (view bank)",
                     " / ".join(f"{a:.1f}" for a in r["top1"]), f"{r['mean']:.1f} +- {r['std']:.1f}",
                     f"{r['train_bytes']:,}") for r in rows]))


if __name__ == "__main__":
    main()
