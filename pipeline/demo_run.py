"""`make demo`: the whole method on the built-in synthetic world, on CPU, in minutes.

Steps (each reused when its output already exists, so a second run takes seconds):
  1. generate the demo world (real h264 videos, lists, class names, per-frame captions);
  2. pretrain the small demo CLIP on the world's frames and captions (an ordinary open_clip
     checkpoint, loaded through the same --pretrained PATH code a user's checkpoint takes);
  3. extract the cache once (all blocks, patch tokens, uint8 frames, every text set);
  4. train heads from the cache (tap, linear_probe, lda, text4vis, evl, side4video, actionclip);
  5. zero-shot: the text classifier with no training, and train-on-half / test-on-the-other-half;
  6. `compare-init`: the Text4Vis classifier-initialisation ablation in few-shot splits;
and ends with one summary table and the paths of the plots.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__":  # `make demo`: before torch loads (DEMO_HEADS below imports it); see PRETRAIN_THREADS
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer

from cache.errors import PipelineError, RunFailedError

__all__ = ["run_demo", "DEMO_HEADS"]

def _demo_heads() -> dict[str, dict]:
    """Per head: the epochs, lr and head options of the `demo` recipe (stages/recipes.py), the
    settings `make demo` and `make train DATASET=demo` train with."""
    from stages.recipes import DEMO_HEADS as names, stage_two_recipe

    return {n: {"epochs": r.values["epochs"], "lr": r.values["lr"], "head": dict(r.head)}
            for n in names for r in [stage_two_recipe(n, "demo")]}


DEMO_HEADS: dict[str, dict] = _demo_heads()
# 250 steps of 64 captioned frames: 3.2 min on a quiet 2-core box (PRETRAIN_THREADS; 4.5 on one thread,
# 400 x 128 took 9.9), what keeps `make demo` with the install under 15 minutes there
PRETRAIN_STEPS = 250
PRETRAIN_BATCH = 64
# The pretraining runs on 2 torch threads, every other step on 1. A fixed count keeps the float
# summation order, and with it the demo CLIP, the cache and the table, the same on any core count
# and under any load (measured: the same bits with the 2 threads confined to one core, under a
# competing busy process, and alone; tests/test_pretrain_demo.py). On a quiet 2-core box 2 threads
# are about 1.4x faster than 1. OMP_WAIT_POLICY=PASSIVE (set by `python -m pipeline.demo_run`
# before torch loads): a waiting thread sleeps instead of spinning, so a busy box costs about what
# one thread would (42 s against 40 for 30 steps beside a busy process; spinning threads took 64).
PRETRAIN_THREADS = 2


def _say(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.CYAN, err=False)


def _paths(root: Path | None) -> dict[str, Path]:
    """Where the demo's parts go under the artifacts root: its CLIP, summary and ablation under
    demo/, the cache and the runs where every command looks for them (caches/, runs/), so
    `pipeline train --dataset demo` and `pipeline runs ls` find what `make demo` made."""
    from cache.paths import artifacts_root

    root = Path(root) if root is not None else artifacts_root()
    return {"root": root, "demo": root / "demo", "clip": root / "demo" / "demo_clip.pt", "caches": root / "caches",
            "runs": root / "runs"}


def run_demo(root: Path | None = None, data: Path = Path("data/demo"), quick: bool = False,
             pretrain_steps: int = PRETRAIN_STEPS, seeds: tuple[int, ...] = (0, 1, 2), until: str = "") -> dict:
    """Run every step (``until="extract"``: the world, the demo CLIP and the cache only, what
    `make extract DATASET=demo` runs); ``quick`` shrinks everything for the slow end-to-end test.
    ``root``: the artifacts root ($CLIPCACHE_ROOT, artifacts)."""
    import torch

    t_all = time.perf_counter()
    paths = _paths(root)
    paths["demo"].mkdir(parents=True, exist_ok=True)
    # A fixed torch thread count for every step (1; the pretraining PRETRAIN_THREADS): the float
    # summation order, and from it every cached feature and the table, is then the same on any
    # machine and under any load (timing the thread count, as the pretraining once did, made the
    # table follow the load). The heads run one thread per process, two processes side by side.
    threads0 = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec, demo_cfg, pre, cache, ext = _prepare(paths, data, quick, pretrain_steps)
        if until == "extract":
            _say(f"cache {cache} (latest for dataset demo): `make train DATASET=demo HEAD=evl` trains one head "
                 "from it with the demo's settings")
            return {"cache": str(cache), "extract_reused": ext.reused, "pretrain": pre}
        return _run_demo(paths, spec, pre, cache, ext, quick, seeds, t_all)
    finally:
        torch.set_num_threads(threads0)


def _prepare(paths: dict[str, Path], data: Path, quick: bool, pretrain_steps: int):
    """Steps 1-3: the world, the demo CLIP (pretrained once), the cache every demo head reads."""
    from pipeline.datasets import load_dataset
    from pipeline.demo_data import DemoCfg, generate_demo, render_frame_with_caption
    from stages.extract import ExtractCfg, plan_extraction, run_extraction
    from stages.pretrain_demo import PretrainCfg, pretrain_demo_clip

    demo_cfg = DemoCfg(num_classes=12, train_per_class=12, val_per_class=6, frames=16, world="rich", seed=0)
    if quick:
        demo_cfg = DemoCfg(num_classes=4, train_per_class=3, val_per_class=2, frames=8, size=64, world="rich", seed=0)
    _say(f"[1/6] demo world -> {data}")
    ds = generate_demo(data, demo_cfg, progress=not quick)

    ckpt = paths["clip"]
    # a step budget, not a time budget: the same demo CLIP (and the same table) on any machine
    pre_cfg = PretrainCfg(model="demo", minutes=0, max_steps=20 if quick else pretrain_steps,
                          batch_size=32 if quick else PRETRAIN_BATCH)
    _say(f"[2/6] demo CLIP -> {ckpt} (contrastive pretraining on the world's frames and captions"
         + ("; done once, then reused)" if ckpt.exists() else f": {pre_cfg.max_steps} steps, once, about 3 "
            "minutes on a quiet 2-core box, more under load; every later demo command reuses it)"))

    def render(rng):
        """A still and its caption; half the captions shortened so the text tower learns the
        words, not one fixed word order (measured: colour x shape zero-shot 30% -> 87%)."""
        img, cap = render_frame_with_caption(rng, size=pre_cfg.image_size, world=demo_cfg.world)
        if rng.random() < 0.5:
            words = cap.split()  # "a large red circle at the top left [on a striped background]"
            size, colour, shape = words[1], words[2], words[3]
            where = " ".join(words[4:]).split(" on a ")[0]
            cap = (f"a {colour} {shape}", f"{colour} {shape}", f"a {size} {colour} {shape}",
                   f"a {colour} {shape} {where}")[int(rng.integers(4))]
        return img, cap

    from pipeline.demo_data import WORLDS

    world = WORLDS[demo_cfg.world]
    prompts = {"colour x shape": [f"a {c} {s}" for c in world.colours for s in world.shapes]}
    pre = pretrain_demo_clip(ckpt, render, prompts, pre_cfg, progress=not quick, log=_say,
                             data_tag=f"demo world={demo_cfg.world} captions=varied",
                             threads=PRETRAIN_THREADS)

    _say("[3/6] extract the cache once (every block, patch tokens, frames, every text set: what each demo head reads)")
    spec = load_dataset("demo", data_root=ds.root)
    ecfg = ExtractCfg(model="demo", pretrained=str(ckpt), frames=8, layers="all", patch=True, store_frames=True,
                      views="1x1", text="all")
    plan = plan_extraction(spec, ecfg, cache_root=paths["caches"])
    ext = run_extraction(plan, progress=not quick, log=_say)  # the latest cache of dataset demo in its root
    return spec, demo_cfg, pre, plan.path, ext


def _run_demo(paths: dict[str, Path], spec, pre: dict, cache: Path, ext, quick: bool,
              seeds: tuple[int, ...], t_all: float) -> dict:
    from rich.console import Console
    from rich.table import Table

    from pipeline.compare_init import compare_init
    from pipeline.sweep import Stopped, SweepRun, program, run_commands
    from stages.runs import finished_metrics
    from stages.train import resolve_train, train_head

    def run(head: str, recipe: str | None, head_options: dict | None = None, log=print, **flags) -> dict:
        """One head trained as `pipeline train` resolves it (``flags``: TrainCfg values given)."""
        r = resolve_train(head, recipe, sets={f"head.{k}": v for k, v in (head_options or {}).items()}, flags=flags,
                          cache=cache)
        return train_head(r.source, r.cfg, r.head, runs_root=paths["runs"], progress=False, log=log, reuse=True,
                          sources=r.sources)

    root = paths["demo"]
    # Steps 4 and 5-6 side by side: the heads as `pipeline train --recipe demo` processes (the very
    # command `make train DATASET=demo HEAD=...` runs, so it finds these runs finished) while this
    # process runs the zero-shot rows and compare-init, then takes the heads not yet started from
    # the same work list. Each side runs on one thread: the table is what a sequential run gives,
    # in about half the time on two cores. The longest heads go first (Side4Video and EVL take
    # about as long as steps 5-6 together); the short ones fill in at the end.
    _say("[4/6] train heads from the cache (recipe demo: what `make train DATASET=demo HEAD=...` runs), "
         "in processes beside steps 5-6")
    longest_first = sorted(DEMO_HEADS, key=lambda n: {"side4video": 0, "evl": 1}.get(n, 2))
    runs = [SweepRun(name, name, {}, 0, ["train", "--cache", str(cache), "--head", name, "--recipe", "demo",
                                         "--no-progress", *(["--epochs", "2"] if quick else [])], None)
            for name in longest_first]
    work = list(runs)  # taken from by both sides
    status: dict = {}
    stop = threading.Event()
    child_env = {"CLIPCACHE_ROOT": str(paths["root"].resolve())}

    def heads() -> None:
        try:
            status.update(run_commands(work, 1, program(), root / "logs", log=lambda m: _say("      " + m),
                                       env=child_env, stop=stop, shared=True))
        except Stopped:
            pass

    worker = threading.Thread(target=heads, name="demo-heads", daemon=True)
    worker.start()
    try:
        _say("[5/6] zero-shot with the demo CLIP's text classifier")
        K = len(spec.classes)
        zs = run("text4vis", None, {"temporal": "tap"}, epochs=0, seed=0)
        half = ",".join(str(c) for c in range(K // 2))
        other = ",".join(str(c) for c in range(K // 2, K))
        zs_split = run("text4vis", None, DEMO_HEADS["text4vis"]["head"], epochs=2 if quick else 20, batch_size=16,
                       seed=0, train_classes=half, test_classes=other)

        _say("[6/6] compare-init: classifier initialisations in few-shot")
        ci = compare_init(cache, head="text4vis", seeds=seeds if not quick else (0,), shots=(1, 2, 0),
                          frozen=(True,), epochs=2 if quick else 20,
                          head_overrides={"temporal": "ttrans", "layers": 1, "pos_rows": 16},
                          out_dir=root / "compare-init", progress=False, log=_say)
        mine = run_commands(work, 1, program(), root / "logs", log=lambda m: _say("      " + m), env=child_env,
                            shared=True)
        while worker.is_alive():
            worker.join(0.5)
    finally:
        stop.set()  # a stop (or a failure) here: the head processes stop too, each at a checkpoint
        worker.join()
    status.update(mine)

    rows = []
    for run in sorted(runs, key=lambda r: list(DEMO_HEADS).index(r.name)):  # the table in DEMO_HEADS' order
        st = status.get(run.name, {})
        res = finished_metrics(run.run_dir) if run.run_dir is not None else None
        if res is None:
            raise RunFailedError(f"demo head {run.name} failed: {st.get('error', 'not run')} (log {st.get('log')})")
        fin = res["final"]
        rows.append((run.name, fin["top1"], fin["top5"], fin["mean_class"], res["trainable_params"], res["seconds"],
                     str(run.run_dir)))

    table = Table(title=f"clipcache demo: {K} classes, {len(spec.splits['train'])} train / "
                        f"{len(spec.splits['val'])} val videos (chance {100 / K:.1f}%)")
    for col in ("result", "top-1 %", "top-5 %", "mean-class %", "trainable", "seconds"):
        table.add_column(col)
    for name, t1, t5, mc, n, sec, _ in rows:
        table.add_row(f"head {name}", f"{t1:.1f}", f"{t5:.1f}", f"{mc:.1f}", f"{n:,}", f"{sec:.1f}")
    table.add_row("zero-shot, all classes (no training)", f"{zs['final']['top1']:.1f}", f"{zs['final']['top5']:.1f}",
                  f"{zs['final']['mean_class']:.1f}", "0", "")
    table.add_row(f"zero-shot on classes {K // 2}-{K - 1} (trained on 0-{K // 2 - 1})",
                  f"{zs_split['final']['top1']:.1f}", f"{zs_split['final']['top5']:.1f}",
                  f"{zs_split['final']['mean_class']:.1f}", f"{zs_split['trainable_params']:,}", "")
    console = Console(width=120)
    console.print(table)
    summary = {"pretrain": pre, "cache": str(cache), "extract_reused": ext.reused,
               "heads": {r[0]: {"top1": r[1], "top5": r[2], "mean_class": r[3], "run_dir": r[6]} for r in rows},
               "zero_shot": zs["final"], "zero_shot_split": zs_split["final"], "compare_init": ci.get("files", {}),
               "seconds": time.perf_counter() - t_all}
    (root / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    console.print(f"plots: {paths['runs']}/*/curves.png, " + ", ".join(str(v) for v in ci.get("files", {}).values()))
    console.print(f"summary: {root / 'summary.json'}  ({summary['seconds']:.0f}s)")
    return summary


def main() -> None:
    """`make demo`: every step is reused on a rerun, so Ctrl-C / SIGTERM end it like the `pipeline`
    command does (one line, exit 130 / 143) and the same command resumes."""
    from pipeline import signals

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.demo_run", description="make demo / make extract "
                                     "DATASET=demo: the demo world, its CLIP, its cache (and with all steps, every head)")
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="folder of the demo world's videos")
    parser.add_argument("--extract", action="store_true", help="stop after the cache (make extract DATASET=demo)")
    parser.add_argument("--quick", action="store_true", help="a reduced world and schedule (the slow tests)")
    args = parser.parse_args()
    previous = signals.install()
    try:
        run_demo(data=args.data, quick=args.quick, until="extract" if args.extract else "")
        signals.check()
    except signals.Interrupted as exc:
        typer.echo(signals.LINE, err=True)
        sys.exit(exc.exit_code)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    finally:
        signals.restore(previous, exiting=True)


if __name__ == "__main__":
    main()
