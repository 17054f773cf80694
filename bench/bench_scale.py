"""Load held at K400 scale: every command that walks a whole cache (or every run folder), timed on a
K400-sized cache against the same at a tenth of the size; each must grow at most linearly.

Two caches are built synthetically through the store's own writer (`plan_extraction` for the
request, key and layout of `pipeline extract --dataset custom --model tiny --layers none --text
none --frames 2`, then `create_store` + `FeatureStore.write_shard` per shard at the extractor's
default shard size): train N videos + val N/12 (K400: 240,000 + 20,000), 400 classes, frame
embeddings (1 view, 2 frames, 32 dims) fp16, 1 video in 200 failed with a reason and 1 in 1,000
decoded with a warning, per-video records (path, size, mtime_ns, decoder) as the extractor keeps
them. The video lists point at files that do not exist: nothing here decodes a video (a resume
scan of a complete cache must not). Run folders are written with the run log train uses
(`stages.runs.RunLog`: config.json, status.json, TensorBoard events, metrics.json, curves.png;
the first run's curves.png is copied to the others, drawing one takes ~0.5 s), N/240 of them
(1,000 at K400 scale), 3 epochs of tiny metrics each.

Then, per operation, small and large interleaved (best of ``--reps``; wall and CPU seconds of
this process), through the real CLI entry point in this process (`pipeline.cli.main`; Python's
and torch's start-up, the same at both sizes, are left out):

* ``extract (resume scan)``: `pipeline extract ... --out CACHE` on the complete cache (verify,
  changed sources, pending shards: "reusing ... nothing to do");
* ``extract --dry-run``;  ``cache info``;  ``cache verify``;  ``cache ls`` (a root holding the cache);
* ``train start-of-run check``: `FeatureStore.require_sound` over what `train --head tap` reads;
* ``train start-up``: `pipeline train --head tap --shots 1 --set epochs=1` into a fresh run
  folder, its wall time less the run's own `seconds` (the epoch + evaluation over every val
  video, metrics.json): what train does before its first step (open, check, select videos, run
  folder) plus closing the run folder (metrics.json, curves.png); CPU is of the whole call;
* ``runs ls``: `pipeline runs ls --root RUNS` (the table);
* ``cache export`` (WebDataset).

Linear means large/small <= ~12 (10x the videos, noise allowed); the verdict uses CPU seconds
(less disturbed by other jobs on a shared box than wall seconds; both are shown).

    PYTHONPATH=. .venv/bin/python bench/bench_scale.py            # 24,000 vs 240,000 (~17 min at load 6 on 2 cores)
    PYTHONPATH=. .venv/bin/python bench/bench_scale.py --quick    # 2,400 vs 24,000 (~2 min)
    ... --root /tmp/scale-k400 --keep                              # build once (6 min), then ~11 min a run
    ... --only "extract,cache info" --gc-off                       # a diagnostic: the collector off
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, console, cpu_self, load_avg, load_line, make_table, md_table, now, \
    results_header  # noqa: E402

CLASSES = 400
VAL_EVERY = 12          # val videos = train videos / 12 (K400: 20,000 of 240,000)
FAIL_EVERY = 200        # one video in 200 failed (broken downloads)
WARN_EVERY = 1000       # one in 1,000 decoded with a warning
RUNS_EVERY = 240        # run folders = train videos / 240 (1,000 at K400 scale)
LINEAR = 12.0           # large / small at 10x the size, noise allowed
EXTRACT = ("--model", "tiny", "--layers", "none", "--text", "none", "--frames", "2", "--device", "cpu")


# ----------------------------------------------------------------------------- the synthetic K400
@dataclass
class World:
    """One size: its lists, cache, cache root, run folders and scratch space."""

    n: int
    root: Path

    @property
    def dataset_args(self) -> list[str]:
        return ["--dataset", "custom", "--video-root", str(self.root / "videos"), "--train-list",
                str(self.root / "train.txt"), "--val-list", str(self.root / "val.txt"), "--classes",
                str(self.root / "classes.txt")]

    @property
    def cache(self) -> Path:
        return self.root / "caches" / "k400-like"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    def extract_args(self) -> list[str]:
        return ["extract", *self.dataset_args, *EXTRACT, "--out", str(self.cache), "--no-progress"]


def n_runs(videos: int) -> int:
    return max(1, videos // RUNS_EVERY)


def write_lists(w: World) -> None:
    """classes.txt, train.txt and val.txt (`class_c/vid.mp4 c` lines) under an empty video root."""
    videos = w.root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    (w.root / "classes.txt").write_text("".join(f"class {c}\n" for c in range(CLASSES)))
    for split, n in (("train", w.n), ("val", w.n // VAL_EVERY)):
        lines = (f"class_{i % CLASSES:03d}/{split}_{i:07d}.mp4 {i % CLASSES}\n" for i in range(n))
        (w.root / f"{split}.txt").write_text("".join(lines))


def build_cache(w: World) -> float:
    """The cache `pipeline extract` would make of the lists, written shard by shard with tiny
    arrays through FeatureStore.write_shard (seconds taken)."""
    from cache.store import DONE, FAILED, create_store
    from pipeline.datasets import load_dataset
    from stages.backbone import load_clip, pixel_stats
    from stages.extract import ExtractCfg, plan_extraction
    from cache.meta import Preprocess

    t0 = now()
    spec = load_dataset("custom", video_root=w.root / "videos", train_list=w.root / "train.txt",
                        val_list=w.root / "val.txt", classes=w.root / "classes.txt")
    plan = plan_extraction(spec, ExtractCfg(model="tiny", layers="none", text="none", frames=2, device="cpu"),
                           out=w.cache)
    mean, std = pixel_stats(load_clip("tiny").visual)
    plan.meta.preprocess = Preprocess(mean=list(mean), std=list(std), image_size=plan.info.image_size)
    splits = {s: {"items": [(it.path, it.label) for it in spec.splits[s]], "arrays": arrs,
                  "num_frames": [it.num_frames for it in spec.splits[s]]} for s, arrs in plan.split_arrays.items()}
    store = create_store(w.cache, plan.meta.to_dict(), splits, plan.shard_size)
    rng = np.random.default_rng(0)
    for split in store.splits:
        items = spec.splits[split]
        shape = store.specs(split)["frame_emb"].shape
        for shard in range(store.num_shards(split)):
            a, b = store.shard_range(split, shard)
            emb = rng.standard_normal((b - a, *shape), dtype=np.float32).astype(np.float16)
            status = np.full(b - a, DONE, np.int8)
            failures, videos = [], []
            for i in range(a, b):
                info = {"index": i, "path": items[i].path, "size": 1_000_000 + i, "mtime_ns": 1_700_000_000 * 10**9 + i}
                if i % FAIL_EVERY == FAIL_EVERY - 1:
                    status[i - a] = FAILED
                    emb[i - a] = np.nan
                    failures.append({"index": i, "path": items[i].path, "reason": "decode error: moov atom not found"})
                else:
                    info.update(decoder="decord", warnings=["3 corrupt packets skipped"] if i % WARN_EVERY == 7 else [])
                videos.append(info)
            store.write_shard(split, shard, {"frame_emb": emb}, status, failures, videos)
    store.write_summary()
    return now() - t0


def build_runs(w: World, count: int) -> float:
    """``count`` finished run folders, written by the run log train uses (seconds taken)."""
    from cache.files import atomic_write_text
    from stages.runs import RunLog
    from stages.train import TrainCfg

    t0 = now()
    w.runs.mkdir(parents=True, exist_ok=True)
    for r in range(count):
        cfg = TrainCfg(head="tap", epochs=3, lr=1e-3 * (1 + r % 7), seed=r % 5, device="cpu", batch_size=32)
        resolved = {"train": cfg.__dict__.copy(), "head": {"name": "tap", "num_classes": CLASSES, "embed_dim": 32,
                                                           "frames": 2, "dropout": 0.1 * (r % 3)},
                    "cache": str(w.cache), "cache_key": "k400-like", "source": "zarr", "train_videos": w.n,
                    "eval_videos": w.n // VAL_EVERY}
        run = w.runs / f"tap-{r:010x}"
        log = RunLog(run)
        log.begin(resolved, fresh=True, epochs=cfg.epochs)
        history = []
        for e in range(cfg.epochs):
            val = {"top1": 10.0 + e + r % 10, "top5": 30.0 + e, "mean_class": 9.0 + e}
            history.append({"epoch": e + 1, "train_loss": 2.0 - 0.1 * e, "lr": cfg.lr, "val": val})
            log.epoch(history[-1])
        result = {"head": "tap", "final": history[-1]["val"], "history": history, "train_videos": w.n,
                  "eval_videos": w.n // VAL_EVERY, "trainable_params": 32 * CLASSES + CLASSES, "seconds": 1.0 + r,
                  "world_size": 1, "rank": 0, "run_dir": str(run)}
        if r == 0:
            log.complete(result, "tap")
        else:  # what complete() does, with the first run's curves.png (drawing one takes ~0.5 s)
            atomic_write_text(run / "metrics.json", json.dumps(result, indent=1))
            shutil.copyfile(w.runs / f"tap-{0:010x}" / "curves.png", run / "curves.png")
            log.finish()
    return now() - t0


# ----------------------------------------------------------------------------- the operations
def cli(*args: str) -> str:
    """`pipeline ARGS` through its entry point, in this process; its stdout (SystemExit != 0 raises)."""
    import torch

    from pipeline.cli import main

    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"pipeline {' '.join(map(str, args))} exited {exc.code}: {err.getvalue()[-2000:]}")
    finally:
        torch.set_num_threads(threads)
    return out.getvalue()


def expect(text: str, *needles: str) -> str:
    for needle in needles:
        if needle not in text:
            raise AssertionError(f"expected {needle!r} in the output:\n{text[-3000:]}")
    return text


def operations(w: World) -> dict[str, Callable[[], dict]]:
    """name -> a call that runs the operation once on ``w`` and returns {"wall": override?}."""
    from cache.store import open_store

    n_val = w.n // VAL_EVERY
    failed = w.n // FAIL_EVERY

    def resume_scan():
        expect(cli(*w.extract_args()), "reusing cache", "nothing to do")

    def dry_run():
        expect(cli(*w.extract_args(), "--dry-run"), f"train  {w.n} videos")

    def info():
        expect(cli("cache", "info", w.cache), f"train     {w.n} videos: done {w.n - failed}, failed {failed}")

    def verify():
        expect(cli("cache", "verify", w.cache), "ok: status and data agree")

    def ls():
        expect(cli("cache", "ls", w.cache.parent), str(w.n - failed + n_val - n_val // FAIL_EVERY))

    def start_check():
        st = open_store(w.cache)
        st.require_sound({"val": ["frame_emb"], "train": ["frame_emb"]})

    def train_startup():
        run = Path(tempfile.mkdtemp(dir=w.scratch, prefix="run-"))
        try:
            expect(cli("train", "--cache", w.cache, "--head", "tap", "--recipe", "quick", "--shots", "1",
                       "--set", "epochs=1", "--set", "device=cpu", "--run-dir", run, "--no-progress"), "tap: top1")
            return {"minus": json.loads((run / "metrics.json").read_text())["seconds"]}
        finally:
            shutil.rmtree(run, ignore_errors=True)

    def runs_ls():
        expect(cli("runs", "ls", "--root", w.runs), f"tap-{n_runs(w.n) - 1:010x}")

    def export():
        out = Path(tempfile.mkdtemp(dir=w.scratch, prefix="wds-"))
        try:
            expect(cli("cache", "export", w.cache, "--out", out), f"train: {w.n - failed} videos")
        finally:
            shutil.rmtree(out, ignore_errors=True)

    return {"extract (resume scan, complete cache)": resume_scan, "extract --dry-run": dry_run, "cache info": info,
            "cache verify": verify, "cache ls": ls, "train start-of-run check (require_sound)": start_check,
            "train start-up (before its first step)": train_startup, "runs ls": runs_ls,
            "cache export (WebDataset)": export}


def timed(fn: Callable[[], dict | None], gc_off: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; a returned {"minus": s} takes s off the wall time.
    ``gc_off``: with Python's cyclic garbage collector off during the call (a diagnostic)."""
    gc.collect()
    if gc_off:
        gc.disable()
    try:
        c, t = cpu_self(), now()
        got = fn() or {}
        wall, cpu = now() - t, cpu_self() - c
    finally:
        gc.enable()
    return wall - got.get("minus", 0.0), cpu


def main(argv: list[str] | None = None) -> int:
    ap = base_parser(__doc__, quick="2,400 vs 24,000 videos (and 10 vs 100 run folders)", reps=2,
                     keep="keep the built caches and run folders (for --root reuse)")
    ap.add_argument("--sizes", default="", help="small,large train videos (default 24000,240000; --quick 2400,24000)")
    ap.add_argument("--only", default="", help="comma list of operation name prefixes to time (default: all)")
    ap.add_argument("--root", default="", help="where the caches are built (default: a fresh /tmp/scale-* folder)")
    ap.add_argument("--md", action="store_true", help="also print the table as markdown (RESULTS.md)")
    ap.add_argument("--gc-off", action="store_true", help="diagnostic: time with Python's cyclic garbage collector "
                                                          "off (what the code costs without the collector's passes "
                                                          "over a heap 10x larger)")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in (args.sizes or ("2400,24000" if args.quick else "24000,240000")).split(",")]
    reps = max(1, args.reps)
    start_load, t_start = load_avg(), now()
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="scale-", dir="/tmp"))
    con = console()
    worlds = []
    try:
        for n in sizes:
            w = World(n, root / f"n{n}")
            write_lists(w)
            w.scratch.mkdir(parents=True, exist_ok=True)
            if not (w.cache / "summary.json").exists():
                secs = build_cache(w)
                con.print(f"built {w.cache}: {n:,} + {n // VAL_EVERY:,} videos in {secs:.1f}s")
            if not w.runs.is_dir():
                secs = build_runs(w, n_runs(n))
                con.print(f"built {n_runs(n):,} run folders in {secs:.1f}s")
            worlds.append(w)
        ops = [operations(w) for w in worlds]
        ops[0]["extract --dry-run"]()  # untimed: the CLI's imports (torch, open_clip) are paid once, here
        names = [k for k in ops[0] if not args.only or any(k.startswith(p) for p in args.only.split(","))]
        rows = []
        for name in names:
            best = [(float("inf"), 0.0)] * len(worlds)
            for _ in range(reps):
                for i, op in enumerate(ops):
                    got = timed(op[name], args.gc_off)
                    if got[0] < best[i][0]:
                        best[i] = got
            (ws, cs), (wl, cl) = best[0], best[-1]
            ratio_cpu, ratio_wall = cl / max(cs, 1e-9), wl / max(ws, 1e-9)
            verdict = "linear" if ratio_cpu <= LINEAR else "FASTER THAN LINEAR"
            rows.append((name, f"{ws:.2f}", f"{wl:.2f}", f"{ratio_wall:.1f}", f"{cs:.2f}", f"{cl:.2f}",
                         f"{ratio_cpu:.1f}", verdict))
            con.print(f"  {name}: wall {ws:.2f} -> {wl:.2f} s, CPU {cs:.2f} -> {cl:.2f} s ({ratio_cpu:.1f}x)")
        small, large = f"{sizes[0]:,}", f"{sizes[-1]:,}"
        cols = ("operation", f"wall s @{small}", f"wall s @{large}", "wall x", f"CPU s @{small}", f"CPU s @{large}",
                "CPU x", "growth")
        gc_note = " (--gc-off)" if args.gc_off else ""
        con.print(make_table(f"bench_scale.py{gc_note}: {small} vs {large} train videos (+1/12 val), "
                             f"{n_runs(sizes[0]):,} vs {n_runs(sizes[-1]):,} run folders, best of {reps}",
                             cols, rows))
        con.print(load_line(start_load, t_start))
        if args.md:
            print(results_header(None if argv is None else ["bench/bench_scale.py", *argv], start_load))
            print(md_table(cols, rows))
        return 0 if all(r[-1] == "linear" for r in rows) else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
