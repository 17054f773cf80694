"""What the cache costs: heads trained from the cache against the same heads trained online (the
papers' regime: raw video decoded every epoch, a fresh augmented view, the frozen backbone run
without gradients), side by side on the demo world with the pretrained demo CLIP.

Rows per head (same recipe, epochs and seeds; evaluation always on the plain cache's val split):

- online paper: ``train --online --online-aug paper`` (a fresh view each epoch drawn with the head's
  official train pipeline; light, the view bank's light draw, for a head without one: the row says so);
- online none: ``--online-aug none``, the cache's own views decoded again: the control, which must
  match the plain cache (same losses and top-1 to float noise);
- plain cache: one fixed view per video, extracted once;
- bank K: ``extract --train-aug K --aug-recipe paper --aug-heads H`` (K views per video drawn at
  extraction with the head's train pipeline; the loader draws one per epoch), for each K of --banks.

Columns: top-1 mean +- sample std over seeds, each seed's top-1, wall per epoch (the run's training
and evaluation wall / epochs), total wall of the row (its seeds), the bytes of the train split of
the cache the row reads (online: the raw videos it decodes) and the extraction wall of that cache.

Caches hold every array the demo's heads read (all layers, patch tokens, uint8 frames), or only frame
embeddings when every --heads head reads nothing else (text4vis, actionclip, tap: "-slim" caches).
Data: the demo world and the demo CLIP copied from --data / --clip (``make demo``'s, read-only) into
the work folder; caches and runs are written there and reused. ``--tiny``: a generated 4-class world
and the tiny random-init model, 2 epochs, one seed (a smoke run of the whole bench in a minute).

    OMP_NUM_THREADS=1 nice python bench/bench_cache_vs_online.py            # the full table
    python bench/bench_cache_vs_online.py --heads evl --seeds 0 --epochs 5  # a subset
    python bench/bench_cache_vs_online.py --tiny                            # smoke run
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root first

from bench.common import (REPO, base_parser, console, dir_bytes, human, int_list, load_avg, load_line, make_table,
                          md_table, mean_spread, name_list, now, quiet, results_header)

HEADS = ("evl", "side4video", "text4vis")
FRAME_EMB_HEADS = {"text4vis", "actionclip", "tap"}  # heads that read frame embeddings only: slim caches
ROWS = ("online-paper", "online-none", "cache", "bank")
TINY_HEADS = {"evl": {"num_layers": 1}, "side4video": {"preset": "custom", "num_blocks": 2, "side_width": 32},
              "text4vis": {"temporal": "ttrans", "layers": 1, "pos_rows": 8}, "actionclip": {"layers": 1, "pos_rows": 8}}


def parse_args(argv=None):
    ap = base_parser(__doc__, "bench_cache_vs_online", quick=None)
    ap.add_argument("--data", default=str(REPO / "data" / "demo"), help="make demo's world (copied, never written; "
                    "default: %(default)s)")
    ap.add_argument("--clip", default=str(REPO / "artifacts" / "demo" / "demo_clip.pt"),
                    help="make demo's demo CLIP (copied with its .json; default: %(default)s)")
    ap.add_argument("--heads", default=",".join(HEADS), help="heads (default: %(default)s)")
    ap.add_argument("--rows", default=",".join(ROWS), help="rows (default: %(default)s)")
    ap.add_argument("--banks", default="1,4,16", help="view bank sizes K (default: %(default)s)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=0, help="epochs (0: the recipe's)")
    ap.add_argument("--recipe", default="demo", help="stage two recipe (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=1, help="online decode workers (default: %(default)s)")
    ap.add_argument("--fresh", default="paper", help="the online row's augmentation: paper | light")
    ap.add_argument("--bank-aug", default="paper", help="the view bank's draws: paper (each head's train pipeline, "
                    "extract --aug-recipe paper --aug-heads H) | light (default: %(default)s)")
    ap.add_argument("--tiny", action="store_true", help="a generated tiny world and model, 2 epochs, 1 seed (smoke)")
    ap.add_argument("--md", default="", help="also write the markdown table here (default: WORKDIR/table.md)")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- data and caches
def prepare(args, work: Path) -> tuple:
    """(DatasetSpec, extraction settings): the demo world and CLIP copied into ``work``."""
    from pipeline.datasets import load_dataset

    if args.tiny:
        from pipeline.demo_data import DemoCfg, generate_demo

        ds = generate_demo(work / "data" / "demo", DemoCfg(num_classes=4, train_per_class=3, val_per_class=2, frames=8,
                                                           size=48, seed=3), progress=False)
        return load_dataset("demo", data_root=ds.root), {"model": "tiny", "layers": "all", "patch": True,
                                                          "store_frames": True, "text": "clip_single,clip_text4vis", "workers": 0}
    src_data, src_clip = Path(args.data), Path(args.clip)
    for src in (src_data, src_clip):
        if not src.exists():
            sys.exit(f"error: {src} does not exist: run `make demo` first (or pass --data / --clip)")
    data, clip = work / "data" / "demo", work / "demo_clip.pt"
    if not data.exists():
        shutil.copytree(src_data, data)
    if not clip.exists():
        for src in (src_clip, src_clip.with_name(src_clip.name + ".json")):
            if src.exists():
                shutil.copy2(src, work / src.name.replace(src_clip.name, "demo_clip.pt"))
    ecfg = {"model": "demo", "pretrained": str(clip.resolve()), "frames": 8, "layers": "all", "patch": True,
            "store_frames": True, "text": "all"}
    if set(name_list(args.heads)) <= FRAME_EMB_HEADS:  # what these heads read: frame embeddings (and text)
        ecfg.update(layers="none", patch=False, store_frames=False)
    return load_dataset("demo", data_root=data), ecfg


def cache_for(spec, ecfg: dict, work: Path, bank: int | None, bank_aug: str, head: str) -> tuple[Path, float]:
    """The cache (plain, or a view bank of ``bank`` views drawn with ``bank_aug``: paper = ``head``'s
    train pipeline, a bank per head) in ``work``, extracted unless there; its extraction wall."""
    from bench.common import extract_cache

    name = "cache-plain" if bank is None else f"cache-bank{bank}-{bank_aug}" + (f"-{head}" if bank_aug == "paper" else "")
    out = work / (name + ("-slim" if ecfg["layers"] == "none" else ""))
    cfg = dict(ecfg)
    if bank is not None:
        cfg.update(train_aug=bank, aug_recipe=bank_aug)
        if bank_aug == "paper":
            cfg["aug_heads"] = head
    timing = out.with_suffix(".json")
    if out.exists() and timing.exists():
        return out, json.loads(timing.read_text())["seconds"]
    t = now()
    extract_cache(spec, out=out, **cfg)
    seconds = now() - t
    timing.write_text(json.dumps({"seconds": seconds}))
    return out, seconds


# ----------------------------------------------------------------------------- runs
def run_one(cache: Path, head: str, seed: int, args, online: str, work: Path, label: str) -> dict:
    """One training run; {top1, seconds, epochs, losses}."""
    from stages.train import resolve_train, train_head

    flags = {"seed": seed, "workers": args.workers if online else 0}
    if args.epochs:
        flags["epochs"] = args.epochs
    if online:
        flags.update(online=True, online_aug=online)
    r = resolve_train(head, args.recipe, flags=flags, cache=str(cache), sets=_tiny_sets(head) if args.tiny else ())
    run_dir = work / "runs" / f"{label}-{head}-s{seed}"
    t = now()
    res = train_head(r.source, r.cfg, r.head, run_dir=run_dir, force=True, progress=False, log=quiet)
    wall = now() - t
    return {"top1": res["final"]["top1"], "seconds": wall, "epochs": r.cfg.epochs,
            "losses": [h.get("train_loss") for h in res["history"]]}


def _tiny_sets(head: str) -> dict:
    return {f"head.{k}": v for k, v in TINY_HEADS.get(head, {}).items()}


def fresh_aug(args, head: str) -> tuple[str, str]:
    """(the online row's --online-aug, a note when the head has no paper pipeline)."""
    from cache.errors import ConfigError
    from stages.data.online import online_aug_cfg

    if args.fresh != "paper":
        return args.fresh, ""
    try:
        online_aug_cfg("paper", head)
        return "paper", ""
    except ConfigError:
        return "light", "no paper pipeline for this head: light"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    work = Path(args.workdir) / ("tiny" if args.tiny else "demo")
    work.mkdir(parents=True, exist_ok=True)
    heads, rows = name_list(args.heads), name_list(args.rows)
    seeds = int_list(args.seeds)[:1] if args.tiny else int_list(args.seeds)
    if args.tiny and not args.epochs:
        args.epochs = 2
    banks = int_list(args.banks) if "bank" in rows else []
    bad = [r for r in rows if r not in ROWS]
    if bad:
        sys.exit(f"unknown rows {bad}: choose from {', '.join(ROWS)}")
    start_load, t_all = load_avg(), now()
    torch.set_num_threads(1)
    spec, ecfg = prepare(args, work)
    caches: dict = {}  # extracted when a row first needs it (rows print as they finish)
    video_bytes = sum(Path(it.path).stat().st_size for it in spec.splits["train"])
    bank_note = args.bank_aug
    plan = []  # (row label, cache key, online aug or "", note)
    for row in rows:
        if row == "online-paper":
            plan.append(("online {aug}", "cache", "fresh", ""))
        elif row == "online-none":
            plan.append(("online none (control)", "cache", "none", ""))
        elif row == "cache":
            plan.append(("plain cache", "cache", "", ""))
        else:
            plan += [(f"bank K={k} ({bank_note})", f"bank{k}", "", "") for k in banks]
    table_rows, records = [], []
    for head in heads:
        for label, key, online, _ in plan:
            note = ""
            if online == "fresh":
                online, note = fresh_aug(args, head)
                label = label.format(aug=online)
            if key.startswith("bank") and args.bank_aug == "paper":
                key = f"{key}-{head}"  # a paper bank draws one head's pipeline
            if key not in caches:
                caches[key] = cache_for(spec, ecfg, work, int(key[4:].split("-")[0]) if key.startswith("bank") else None,
                                        args.bank_aug, head)
            cache, extract_s = caches[key]
            runs = [run_one(cache, head, s, args, online, work, label.split(" ")[0] + (online or key)) for s in seeds]
            top = [r["top1"] for r in runs]
            m, sd = mean_spread(top)
            total = sum(r["seconds"] for r in runs)
            per_epoch = total / max(1, sum(r["epochs"] for r in runs))
            nbytes = video_bytes if online else dir_bytes(Path(cache) / "train")
            row = [head, label + (f" [{note}]" if note else ""), f"{m:.1f} +- {sd:.1f}", " / ".join(f"{x:.1f}" for x in top),
                   f"{per_epoch:.2f} s", f"{total:.0f} s", human(nbytes) + (" (videos)" if online else ""),
                   "-" if online else f"{extract_s:.0f} s"]
            table_rows.append(row)
            records.append({"head": head, "row": label, "note": note, "top1": top, "seconds": [r["seconds"] for r in runs],
                            "losses": [r["losses"] for r in runs], "bytes": nbytes, "extract_s": extract_s})
            console().print(" | ".join(row))
    columns = ["head", "row", "top-1 mean +- std", "per seed", "wall / epoch", "total wall", "train bytes", "extract"]
    epochs = records[0]["losses"] and len(records[0]["losses"][0]) if records else 0
    title = (f"Cache vs online, {'tiny world, tiny model' if args.tiny else 'demo world, demo CLIP'}: recipe "
             f"{args.recipe}, {epochs} epochs, seeds {','.join(map(str, seeds))}, online workers {args.workers}")
    console().print(make_table(title, columns, table_rows, left=["row", "per seed"]))
    tail = load_line(start_load, t_all)
    console().print(tail)
    md = "\n".join([f"### {title}", "", results_header(argv=[sys.argv[0], *(argv or sys.argv[1:])], start_load=start_load),
                    "", md_table(columns, table_rows), "", tail, ""])
    md_path = Path(args.md) if args.md else work / "table.md"
    md_path.write_text(md)
    (work / "results.json").write_text(json.dumps(records, indent=1))
    console().print(f"markdown: {md_path}; per-run records: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
