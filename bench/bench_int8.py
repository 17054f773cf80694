#!/usr/bin/env python
"""int8's price in accuracy: the same heads trained on an fp16 cache and on an int8 cache of the
same videos, over several seeds; top-1 mean +- spread per head and dtype, and the difference.

The demo world of `make demo` (pipeline/demo_run.py: 12 classes x 12 train / 6 val videos, the
demo CLIP pretrained on its frames and captions for --pretrain-steps steps), extracted twice with
`make demo`'s settings (all blocks, patch tokens, uint8 frames, every text set) that differ only
in `--dtype fp16` / `--dtype int8` (int8: per-token quantisation of the cls and patch arrays;
frame embeddings and uint8 frames are the same in both). Then EVL, Side4Video and Text4Vis
T-Trans, sized and trained as `make demo` trains them (DEMO_HEADS), with seeds 0, 1, 2 on each
cache. A seed fixes the head's initialisation and the batch order, so the two caches' runs of
one seed differ only by the cache's dtype: the paired difference per seed is printed too.

    python bench/bench_int8.py            # make demo's world and epochs (hours on 2 busy shared cores)
    python bench/bench_int8.py --classes 8 --train 8 --val 6 --epochs 10 --pretrain-steps 100   # RESULTS.md
    python bench/bench_int8.py --quick    # smoke run: 4 classes, 2 epochs, one seed (minutes)

Writes <workdir>/int8.json and prints the markdown table RESULTS.md quotes. Goal (issue 13):
int8 costs at most 0.5 point of top-1.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_parser, console, demo_clip, demo_world, extract_cache, human, int_list,  # noqa: E402
                          load_avg, make_table, md_table, mean_spread, name_list, now, quiet,
                          results_header, torch_threads)

HEADS = {"evl": "EVL", "side4video": "Side4Video", "text4vis": "Text4Vis T-Trans"}
DTYPES = ("fp16", "int8")


def main() -> None:
    ap = base_parser(__doc__, "bench_int8", quick="4 classes, 2 epochs, seed 0: a smoke run")
    ap.add_argument("--heads", default=",".join(HEADS), help="comma list among " + ", ".join(HEADS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=0, help="epochs per run (default: make demo's, 30)")
    ap.add_argument("--pretrain-steps", type=int, default=400, help="demo CLIP pretraining (make demo: 400)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while training (1: shared box)")
    ap.add_argument("--classes", type=int, default=12, help="demo world classes (make demo: 12)")
    ap.add_argument("--train", type=int, default=12, help="train videos per class (make demo: 12)")
    ap.add_argument("--val", type=int, default=6, help="val videos per class (make demo: 6)")
    args = ap.parse_args()

    from cache.meta import extract_command
    from cache.store import open_store
    from pipeline.demo_run import DEMO_HEADS
    from stages.train import TrainCfg, train_head

    world = dict(num_classes=args.classes, train_per_class=args.train, val_per_class=args.val, frames=16,
                 world="rich", seed=0)
    seeds = int_list(args.seeds)
    if args.quick:
        world = dict(num_classes=4, train_per_class=3, val_per_class=2, frames=8, size=64, world="rich", seed=0)
        args.pretrain_steps, seeds = min(args.pretrain_steps, 20), seeds[:1]
    heads = name_list(args.heads)
    root = Path(args.workdir) / ("quick" if args.quick else "full")
    root.mkdir(parents=True, exist_ok=True)
    out = console(150)
    t_all, load0 = now(), load_avg()

    spec = demo_world(root / "world", **world)
    ckpt = demo_clip(root / "demo_clip.pt", args.pretrain_steps, tag="bench_int8")
    out.print(f"demo world {len(spec.classes)} classes, {len(spec.splits['train'])} train / "
              f"{len(spec.splits['val'])} val videos; demo CLIP {args.pretrain_steps} steps ({now() - t_all:.0f}s)")
    caches = {}
    for dt in DTYPES:
        t = now()
        plan, res = extract_cache(spec, cache_root=root / "caches", model="demo", pretrained=str(ckpt), frames=8,
                                  layers="all", patch=True, store_frames=True, views="1x1", text="all", dtype=dt)
        caches[dt] = plan.path
        store = open_store(plan.path)
        out.print(f"{dt}: {plan.path.name}, {human(store.size_bytes())} "
                  f"({'reused' if res.reused else f'extracted in {now() - t:.0f}s'}); `{extract_command(store.meta)}`")

    runs: dict[tuple[str, str], list[float]] = {}
    partial = root / "int8.partial.json"  # every finished run, as it finishes (seed by seed, all heads)
    with torch_threads(args.threads):
        for seed in seeds:
            for head in heads:
                opts = DEMO_HEADS[head]
                epochs = args.epochs or (2 if args.quick else opts.get("epochs", 30))
                for dt in DTYPES:
                    tcfg = TrainCfg(head=head, epochs=epochs, lr=opts.get("lr", 1e-3), batch_size=16,
                                    warmup_epochs=1, seed=seed)
                    res = train_head(caches[dt], tcfg, opts["head"], runs_root=root / "runs", progress=False,
                                     log=quiet, reuse=True)
                    runs.setdefault((head, dt), []).append(res["final"]["top1"])
                    out.print(f"  {head:<11} seed {seed} {dt}: top-1 {res['final']['top1']:.2f}  "
                              f"({res['seconds']:.0f}s, {epochs} epochs)")
                    partial.write_text(json.dumps({f"{h} {d}": v for (h, d), v in runs.items()}, indent=1))

    rows, records = [], []
    for head in heads:
        a, b = runs[(head, "fp16")], runs[(head, "int8")]
        (ma, sa), (mb, sb) = mean_spread(a), mean_spread(b)
        paired = [y - x for x, y in zip(a, b)]
        mp, sp = mean_spread(paired)
        rows.append([HEADS.get(head, head), " / ".join(f"{x:.1f}" for x in a), f"{ma:.2f} +- {sa:.2f}",
                     " / ".join(f"{x:.1f}" for x in b), f"{mb:.2f} +- {sb:.2f}", f"{mb - ma:+.2f}",
                     f"{mp:+.2f} +- {sp:.2f}", "yes" if abs(mb - ma) <= 0.5 else "no"])
        records.append({"head": head, "fp16": a, "int8": b, "diff_mean": mb - ma, "paired": paired})
    cols = ["head", "fp16 top-1 per seed", "fp16 mean +- std", "int8 top-1 per seed", "int8 mean +- std",
            "int8 - fp16 (means)", "paired diff +- std", "within 0.5"]
    out.print(make_table(f"int8 vs fp16 cache, top-1 % on {len(spec.splits['val'])} val videos, seeds {seeds}",
                         cols, rows))
    header = results_header(start_load=load0)
    (root / "int8.json").write_text(json.dumps({"header": header, "seeds": seeds, "world": world,
                                                "pretrain_steps": args.pretrain_steps, "rows": records,
                                                "val_videos": len(spec.splits["val"])}, indent=1))
    print(f"\n{header}; wall {(now() - t_all) / 60:.0f} min\n")
    print(md_table(cols, rows))
    one = 100 / len(spec.splits["val"])
    print(f"\n(one val video = {one:.2f} points of top-1; std over seeds, sample std; paired: int8 - fp16 per seed)")
    if any(statistics.fmean(r["paired"]) < -0.5 for r in records):
        print("int8 costs more than 0.5 point for some head on this run")


if __name__ == "__main__":
    main()
