"""The `pipeline` command. Each command parses, calls its stage's resolve (stages/resolve.py: defaults
< recipe < experiment file < --set < flags, plus the cache's protocol) and calls the stage function.
The `cache` commands are in cli_cache.py, `runs` in cli_runs.py, shared options in cli_options.py.

Every error a user can cause is a PipelineError: one line on stderr, exit status 2.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m pipeline.cli`: handle SIGINT/SIGTERM before the imports below
    from pipeline import signals as _signals

    _signals.install()
    _signals.hold()  # a stop during the imports below is raised by main(), as one line

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from cache.errors import ConfigError, PipelineError
from pipeline.cli_cache import cache_app, report_extraction
from pipeline.cli_options import (COMPARE_FILE_OPTIONS, FINETUNE_FILE_OPTIONS, FINETUNE_FLAG_FIELDS, TRAIN_FILE_OPTIONS,
                                  TRAIN_FLAG_FIELDS, Activation, ClassesFile, ConfigFile, DataRoot, DatasetName, Frames,
                                  GlobalBatch, InitSeed, Model, PerStepBatch, Pretrained, SplitId, TestList, TrainList,
                                  ValList, VideoRoot, echo_err, experiment_file, say)
from pipeline.cli_runs import runs_app
from pipeline.cli_sweep import sweep

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="clipcache: cache frozen CLIP features of videos once, train heads from the cache many times.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"clipcache {version('clipcache')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("clipcache (not installed: run from a source checkout)")
        raise typer.Exit()


@app.callback()
def _app_options(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")) -> None:
    """clipcache: cache frozen CLIP features of videos once, train heads from the cache many times."""
app.add_typer(cache_app, name="cache")
app.add_typer(runs_app, name="runs")
app.command()(sweep)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/2), got '{text}'") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return i, n


# ----------------------------------------------------------------------------- demo data
@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(Path("data/demo"), help="Folder to write the demo videos, lists and class file into."),
    seed: int = typer.Option(0, help="Seed of the synthetic world."),
    classes: int = typer.Option(12, help="Number of action classes."),
    train_per_class: int = typer.Option(12, help="Training videos per class."),
    val_per_class: int = typer.Option(4, help="Validation videos per class."),
    frames: int = typer.Option(16, help="Frames per video."),
    world: str = typer.Option("basic", help="basic | rich"),
):
    """Write the built-in synthetic demo dataset (real h264 mp4 files)."""
    from pipeline.demo_data import DemoCfg, generate_demo

    ds = generate_demo(out, DemoCfg(num_classes=classes, train_per_class=train_per_class,
                                    val_per_class=val_per_class, frames=frames, seed=seed, world=world))
    typer.echo(f"demo data in {ds.root}: {len(ds.classes)} classes; lists {ds.train_list.name}, {ds.val_list.name}")


# ----------------------------------------------------------------------------- extract
@app.command()
def extract(
    dataset: DatasetName = "demo",
    data_root: DataRoot = None,
    video_root: VideoRoot = None,
    train_list: TrainList = None,
    val_list: ValList = None,
    test_list: TestList = None,
    classes: ClassesFile = None,
    split_id: SplitId = 1,
    model: Model = "ViT-B-16",
    pretrained: Pretrained = "auto",
    init_seed: InitSeed = 0,
    activation: Activation = "auto",
    frames: Optional[int] = typer.Option(None, help="Frames per clip (T); default 8, or the protocol's."),
    sampling: Optional[str] = typer.Option(None, help="segment (TSN) | segment-start | segment-interior | dense; "
                                                    "default segment, or the "
                                                    "protocol's."),
    stride: Optional[int] = typer.Option(None, help="Frame stride for dense sampling (default 8, or the protocol's)."),
    layers: str = typer.Option("last4", help="Blocks to tap: lastK | all | none | 8,10,12 (1-based)."),
    patch: bool = typer.Option(False, "--patch/--no-patch", help="Also store patch tokens of the tapped blocks."),
    store_frames: bool = typer.Option(False, "--frames-uint8/--no-frames-uint8",
                                      help="Also store the preprocessed uint8 input frames."),
    views: Optional[str] = typer.Option(None, help="CxS views (temporal clips x spatial crops) for val/test "
                                                   "(default 1x1, or the protocol's)."),
    train_views: str = typer.Option("1x1", help="CxS views for the train split."),
    protocol: str = typer.Option("", help="A paper's test protocol: evl | text4vis | side4video | actionclip, "
                                          "or side4video-ssv2 | text4vis-ssv2 (Something-Something v2) "
                                          "(frames, sampling, views, resize, view averaging); flags override it. "
                                          "Default: the --for-head heads' own; none: one centre view."),
    resize_ratio: Optional[float] = typer.Option(None, help="Short side = input size x this before cropping "
                                                            "(1: EVL/CLIP; 1.142857: scale 256 for 224)."),
    resize_to: Optional[str] = typer.Option(None, help="HxW: resize frames to exactly H x W before cropping, "
                                                       "whatever their aspect ratio (SSv2 tests: 256x320)."),
    train_aug: Optional[int] = typer.Option(None, help="View bank: K augmented views per train video (random "
                                                      "clip, random resized crop, flip), drawn once, seeded."),
    aug_seed: int = typer.Option(0, help="Seed of the view bank (with each video's split and index)."),
    aug_area: float = typer.Option(0.4, help="Smallest area fraction of the view bank's random resized crop."),
    aug_recipe: Optional[str] = typer.Option(None, help="What the view bank draws: paper (the --for-head head's "
                                                       "official train pipeline) | light (random resized crop "
                                                       "--aug-area-1 and flip). Default: paper when --for-head names "
                                                       "a head with one, else light."),
    aug_heads: str = typer.Option("", help="The heads whose paper train pipeline the view bank draws (default: "
                                           "--for-head's); implies --aug-recipe paper."),
    no_view_bank: bool = typer.Option(False, "--no-view-bank", help="With --for-head: keep the plain train views, "
                                                                    "not the heads' measured view bank."),
    dtype: str = typer.Option("fp16", help="fp16 | int8 (per-token int8 for CLS/patch tokens)."),
    text: str = typer.Option("all", help="Text sets to store: all | none | comma list of clip_single, "
                                         "clip_text4vis, clip_actionclip, clip_classname, minilm."),
    batch_frames: int = typer.Option(128, help="Frames per encoder call."),
    workers: int = typer.Option(-1, help="Decode workers (-1: auto)."),
    shard_size: int = typer.Option(0, help="Videos per shard (0: auto)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    out: Optional[Path] = typer.Option(None, help="Cache folder (default: a keyed folder under the cache root)."),
    cache_root: Optional[Path] = typer.Option(None, help="Where keyed caches go (default artifacts/caches, "
                                                          "or $CLIPCACHE_ROOT/caches)."),
    shard: str = typer.Option("", help="Process i of n: take the i-th of n disjoint shard ranges "
                                       "(default: RANK/WORLD_SIZE under torchrun, else 0/1)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be extracted and its size, then stop."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    for_head: str = typer.Option("", help="Comma list of heads (e.g. evl,side4video): add the blocks, patch "
                                          "tokens and uint8 frames they read with their default options."),
    refresh: bool = typer.Option(False, "--refresh", help="Redo the shards whose source videos changed (or "
                                                          "appeared) since they were extracted."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Redo the shards that hold failed videos."),
    hash_sources: bool = typer.Option(False, "--hash-sources", help="Also record each source video's sha256: a "
                                                                    "touched or copied file with the same content "
                                                                    "is then not taken as changed."),
    max_failed: float = typer.Option(1.0, help="Exit 1 when more than this fraction of the videos failed "
                                               "(a run where every video failed always exits 1)."),
):
    """Stage one: decode videos, run the frozen CLIP once, write the feature cache."""
    from pipeline.datasets import load_dataset
    from stages.extract import describe_plan, plan_extraction, resolve_extract, run_extraction

    if not 0 <= max_failed <= 1:
        raise ConfigError(f"--max-failed must be a fraction in [0, 1], got {max_failed}")
    rank_world = _parse_shard(shard) if shard else None  # None: torchrun's RANK/WORLD_SIZE, or 0/1
    spec = load_dataset(dataset, data_root=data_root, video_root=video_root, train_list=train_list,
                        val_list=val_list, test_list=test_list, classes=classes, split_id=split_id)
    flags = dict(model=model, pretrained=pretrained, init_seed=init_seed, layers=layers, patch=patch,
                 store_frames=store_frames, train_views=train_views, dtype=dtype, text=text, batch_frames=batch_frames,
                 workers=workers, shard_size=shard_size, device=device, activation=activation,
                 hash_sources=hash_sources, train_aug=train_aug, aug_seed=aug_seed, aug_area=aug_area,
                 aug_recipe=aug_recipe, aug_heads=aug_heads, frames=frames,
                 sampling=sampling, stride=stride, views=views, resize_ratio=resize_ratio, resize_to=resize_to)
    r = resolve_extract(flags, protocol=protocol, heads=[h.strip() for h in for_head.split(",") if h.strip()],
                        num_classes=len(spec.classes), view_bank=not no_view_bank, dataset=spec.name)
    cfg = r.cfg
    say(r.lines)
    plan = plan_extraction(spec, cfg, out=out, cache_root=cache_root)
    if dry_run:
        for line in describe_plan(plan):
            typer.echo(line)
        if cfg.pretrained and not Path(cfg.pretrained).is_file():
            from stages.backbone import cached_weights, resolve_model_name, weights_to_fetch

            arch = resolve_model_name(cfg.model)
            where = cached_weights(arch, cfg.pretrained)
            typer.echo(f"weights  '{cfg.pretrained}' of {arch}: " + (f"in the download cache ({where})" if where else
                       "not downloaded yet: the run downloads them (a network is needed; without one, "
                       + weights_to_fetch(arch, cfg.pretrained) + ")"))
        return
    res = run_extraction(plan, shard=rank_world, progress=progress, refresh=refresh, retry_failed=retry_failed)
    report_extraction(res, max_failed)


# ----------------------------------------------------------------------------- stage two
@app.command()
def train(
    ctx: typer.Context,
    head: Optional[str] = typer.Option(None, help="Head name (see `pipeline heads`); or head: in --config."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the last extracted cache of --dataset)."),
    dataset: str = typer.Option("demo", help="Dataset whose last cache is used when --cache is not given."),
    cache_root: Optional[Path] = typer.Option(None, help="Where keyed caches are (default artifacts/caches)."),
    config: ConfigFile = None,
    set_: list[str] = typer.Option([], "--set", help="Override: key=value (training option or head option; "
                                                     "head.key=value forces a head option). Repeatable."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: the recipe's; 0: evaluate only)."),
    shots: int = typer.Option(0, help="K training videos per class (0: all)."),
    fraction: float = typer.Option(1.0, help="Fraction of the training videos."),
    train_classes: str = typer.Option("", help="Train on these classes only, e.g. 0-5,8."),
    test_classes: str = typer.Option("", help="Evaluate on these classes (zero-shot via the text classifier)."),
    init: str = typer.Option("", help="Classifier init: clip_text | random_normal | orthogonal | lda | minilm."),
    run_dir: Optional[Path] = typer.Option(None, help="Run folder (default: artifacts/runs/<head>-<config hash>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in a run folder that already holds a run."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    wds: str = typer.Option("", help="Train from WebDataset shards instead: the export's NAME-header.json, or a "
                                     "train shard pattern DIR/NAME-train-{000000..000003}.tar (path or URL)."),
    wds_header: str = typer.Option("", help="Header of the --wds shards (default: NAME-header.json beside them)."),
    wds_eval: str = typer.Option("", help="Eval shard pattern (default: the header's eval-split shards)."),
    wds_shuffle: int = typer.Option(1000, help="Shuffle buffer in samples when training from shards (0: off)."),
    wds_resample: bool = typer.Option(False, "--wds-resample/--no-wds-resample",
                                      help="Draw shards with replacement (multi-node streaming)."),
    recipe: str = typer.Option("paper", help="paper (the head's published recipe, docs/recipes.md) | quick "
                                             "(small data: lr 1e-3, batch 32, 10 epochs). Options override it."),
    batch: PerStepBatch = None,
    global_batch: GlobalBatch = None,
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Train on the done videos of an unfinished cache (said loudly)."),
    head_module: Optional[Path] = typer.Option(None, "--head-module", help="A .py file of your own that registers "
                                               "heads (register_head); --head then names one of them."),
    online: bool = typer.Option(False, "--online", help="Stream the train split from the raw videos the cache was "
                                "extracted from, through its frozen backbone, fresh views every epoch (evaluation "
                                "stays on the cache)."),
    online_aug: str = typer.Option("paper", help="--online views: paper (the head's official train pipeline) | light "
                                   "(today's view-bank draw) | none (the cache's own views: trains as the cache)."),
):
    """Stage two: train a head from a cache and evaluate it."""
    from stages.train import resolve_train, train_head

    o, file_keys, flags = experiment_file(ctx, config, TRAIN_FILE_OPTIONS, TRAIN_FLAG_FIELDS)
    if o["head_module"] is not None:
        from stages.head_check import load_head_module

        load_head_module(o["head_module"])
    head = o["head"]
    if not head:
        raise ConfigError("no head given: pass --head NAME (see `pipeline heads`), or head: NAME in the --config file")
    wds = {"spec": o["wds"], "header": o["wds_header"] or None, "eval_spec": o["wds_eval"] or None,
           "shuffle": o["wds_shuffle"], "resample": o["wds_resample"]} if o["wds"] else None
    r = resolve_train(head, o["recipe"], file=file_keys, sets=set_, flags=flags, cache=o["cache"], dataset=o["dataset"],
                      cache_root=o["cache_root"], wds=wds, where=f"config file {config}",
                      options=[*TRAIN_FILE_OPTIONS, *TRAIN_FLAG_FIELDS])
    for note in r.notes:
        echo_err(note)
    say(r.lines)
    res = train_head(r.source, r.cfg, r.head, run_dir=o["run_dir"], resume=resume, progress=progress,
                     allow_partial=o["allow_partial"], force=force, sources=r.sources)
    if res.get("rank", 0):  # under torchrun, rank 0 reports
        return
    fin = res["final"]
    typer.echo(f"{head}: top1 {fin['top1']:.1f}%  top5 {fin['top5']:.1f}%  mean-class {fin['mean_class']:.1f}%  "
               f"({res['train_videos']} train / {res['eval_videos']} eval videos, "
               f"{res['trainable_params']:,} trainable params, {res['seconds']:.1f}s)")
    typer.echo(f"run folder: {res['run_dir']}")


@app.command("compare-init")
def compare_init_cmd(
    ctx: typer.Context,
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the last extracted cache of --dataset)."),
    dataset: str = typer.Option("demo", help="Dataset whose last cache is used when --cache is not given."),
    cache_root: Optional[Path] = typer.Option(None, help="Where keyed caches are (default artifacts/caches)."),
    head: str = typer.Option("text4vis", help="A head with a classifier matrix W (text4vis, actionclip)."),
    inits: str = typer.Option("", help="Comma list of classifier inits (default all: clip_text, random_normal, "
                                       "orthogonal, lda, minilm)."),
    seeds: str = typer.Option("0,1,2", help="Comma list of seeds."),
    shots: str = typer.Option("1,2,0", help="Comma list of K training videos per class (0: all): the table's columns."),
    frozen: str = typer.Option("both", help="both | frozen | tuned: keep W as initialised, train it, or both."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per run (default: the recipe's, or the training default)."),
    config: ConfigFile = None,
    set_: list[str] = typer.Option([], "--set", help="Override: key=value (training option or head option; "
                                                     "head.key=value forces a head option). Repeatable."),
    recipe: str = typer.Option("", help="paper | quick | demo: the head's stage-two recipe, as `pipeline train` "
                                        "resolves it (docs/recipes.md). Default: none, the training defaults (quick's "
                                        "values). Options override it."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: artifacts/compare-init/<cache>-<hash>)."),
    corr_classes: int = typer.Option(20, help="Classes shown in the W correlation maps (0: no maps)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    jobs: int = typer.Option(1, help="Runs at once, each in its own process on cores / jobs threads (1: in this "
                                     "process). The results equal a one-process grid's."),
):
    """Text4Vis classifier-init ablation: train per init x seed x shots x frozen/tuned W, tabulate, plot."""
    from rich.console import Console

    from pipeline.compare_init import compare_init, summary_table
    from stages.classifiers import CLASSIFIER_INITS
    from stages.resolve import find_cache
    from stages.train import split_overrides

    def int_list(text: str, flag: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{flag} expects a comma list of integers, got '{text}'") from None
        if not values:
            raise ConfigError(f"{flag} is empty")
        if min(values) < 0:
            raise ConfigError(f"{flag} must hold integers >= 0, got {min(values)}")
        return values

    o, file_keys, flags = experiment_file(ctx, config, COMPARE_FILE_OPTIONS, {"epochs": "epochs"})
    if epochs is not None and epochs < 0:
        raise ConfigError(f"--epochs must be 0 or more, got {epochs}")
    if corr_classes < 0:
        raise ConfigError(f"--corr-classes must be 0 or more (0: no maps), got {corr_classes}")
    modes = {"both": (True, False), "frozen": (True,), "tuned": (False,)}
    if o["frozen"] not in modes:
        raise ConfigError(f"--frozen must be one of {', '.join(modes)}, got '{o['frozen']}'")
    init_list = [x.strip() for x in o["inits"].split(",") if x.strip()] or list(CLASSIFIER_INITS)
    train_over, head_over = split_overrides(set_, o["head"])
    path, line = find_cache(o["cache"], o["dataset"], o["cache_root"])
    say([line] if line else [])
    res = compare_init(path, head=o["head"], inits=init_list, seeds=int_list(o["seeds"], "--seeds"),
                       shots=int_list(o["shots"], "--shots"), frozen=modes[o["frozen"]], epochs=flags.get("epochs"),
                       head_overrides=head_over, train_overrides=train_over, recipe=o["recipe"] or None,
                       file=file_keys, where=f"config file {config}", out_dir=out, corr_classes=corr_classes,
                       progress=progress, log=typer.echo, jobs=jobs)
    console = Console(width=120)
    for table in summary_table(res):
        console.print(table)
    for label, file in res["files"].items():
        typer.echo(f"{label:<28} {file}")


@app.command()
def evaluate(
    run: Path = typer.Option(..., help="Run folder of a trained head."),
    cache: Optional[Path] = typer.Option(None, help="Evaluate on this cache instead (cross-dataset zero-shot: "
                                                    "the text classifier is swapped for its class names)."),
    split: str = typer.Option("val", help="Split to evaluate."),
    text_set: str = typer.Option("", help="Text set of the other cache to classify with."),
    average: str = typer.Option("", help="Multi-view: average scores or embeddings (default: the run's own rule, "
                                         "as it was evaluated in training)."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Evaluate on the done videos of an unfinished cache (said loudly)."),
    head_module: Optional[Path] = typer.Option(None, "--head-module", help="The .py file that registers the run's "
                                               "head, for a head of your own (as given to train)."),
):
    """Evaluate a trained run on its cache or on another dataset's cache."""
    from stages.evaluate import evaluate_run

    if head_module is not None:
        from stages.head_check import load_head_module

        load_head_module(head_module)

    outputs = run / f"eval-{split}" if cache is None else None  # on its own cache: per-class results, predictions
    res = evaluate_run(run, cache, split=split, text_set=text_set, eval_average=average, allow_partial=allow_partial,
                       outputs=outputs)
    typer.echo(f"{res['cache']} [{split}]: top1 {res['top1']:.1f}%  top5 {res['top5']:.1f}%  "
               f"mean-class {res['mean_class']:.1f}%  ({res['n']} videos, {res['average']} averaged over views"
               + (", classifier swapped to this cache's classes)" if res["swapped_classifier"] else ")"))
    if outputs is not None:
        typer.echo(f"per_class.csv, confusion.csv/.png, predictions.csv in {outputs}")


@app.command()
def heads(
    backbone: str = typer.Option("ViT-B-16", help="open_clip model name whose dims the heads are built for."),
    classes: Optional[int] = typer.Option(None, help="Number of classes (default: each paper setting's, 400)."),
    frames: Optional[int] = typer.Option(None, help="Frames per clip (default: each paper setting's)."),
    check: Optional[Path] = typer.Option(None, "--check", help="A .py file of your own that registers heads: run "
                                         "the head contract on each (shape, finite, gradients); exit 1 on a failure."),
):
    """Print each head configuration and its trainable parameter count (from the real modules)."""
    from rich.console import Console
    from rich.table import Table

    if check is not None:
        _check_heads(check)
        return
    from stages.heads.counts import reference_rows

    for flag, value in (("--classes", classes), ("--frames", frames)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    table = Table("head", "configuration", "trainable params", "paper", "diff",
                  title=f"built for {backbone}"
                        + (f", {classes} classes" if classes is not None else "")
                        + (f", {frames} frames" if frames is not None else "")
                        + " (paper figures only where that is the paper's setting)")
    for row in reference_rows(backbone, classes, frames):
        exp, count = row["expected"], row["count"]
        if count is None:
            table.add_row(row["head"], row["label"], f"n/a: {row['note']}", "", "")
            continue
        diff = "" if exp is None else (f"{100 * (count - exp) / exp:+.2f}%" if exp else
                                       ("exact" if count == 0 else "differs"))
        table.add_row(row["head"], row["label"], f"{count:,}", "" if exp is None else f"{exp:,}", diff)
    Console(width=140).print(table)


def _check_heads(path: Path) -> None:
    """`heads --check FILE`: one line per contract check of each head the file registers."""
    from stages.head_check import check_head, load_head_module

    failed = total = 0
    for name in load_head_module(path, flag="--check"):
        for what, ok, detail in check_head(name):
            total += 1
            failed += not ok
            typer.echo(f"{'ok  ' if ok else 'FAIL'}  {name}  {what}: {detail}")
    typer.echo(f"{total - failed} of {total} checks passed" + (f", {failed} failed" if failed else ""))
    if failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- stage three
@app.command()
def finetune(
    ctx: typer.Context,
    paradigm: Optional[str] = typer.Option(None, help="text4vis | actionclip (or paradigm: in --config)"),
    dataset: DatasetName = "demo",
    data_root: DataRoot = None,
    video_root: VideoRoot = None,
    train_list: TrainList = None,
    val_list: ValList = None,
    test_list: TestList = None,
    classes: ClassesFile = None,
    split_id: SplitId = 1,
    model: Model = "ViT-B-16",
    pretrained: Pretrained = "auto",
    init_seed: InitSeed = 0,
    activation: Activation = "auto",
    frames: Frames = 8,
    views: str = typer.Option("1x1", help="CxS evaluation views (temporal clips x spatial crops)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: Text4Vis 30, ActionCLIP 50; 0: evaluate only)."),
    config: ConfigFile = None,
    set_: list[str] = typer.Option([], "--set", help="Override: key=value (fine-tuning option such as lr, "
                                                     "backbone_ratio, batch_size, warmup_epochs; head option, or "
                                                     "head.key; aug.key for the augmentation). Repeatable."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing",
                                            help="Recompute the encoder blocks in backward (less memory)."),
    run_dir: Optional[Path] = typer.Option(None, help="Run folder (default: "
                                                      "artifacts/runs/finetune-<paradigm>-<hash>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in a run folder that already holds a run."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    recipe: str = typer.Option("paper", help="paper (the paradigm's published recipe and augmentation, "
                                             "docs/recipes.md) | quick (generic, small data). Options override it."),
    batch: PerStepBatch = None,
    global_batch: GlobalBatch = None,
):
    """Stage three: fine-tune CLIP end to end from raw video (Text4Vis or ActionCLIP). Runs under torchrun too."""
    from pipeline.datasets import load_dataset
    from stages.augment import AugmentCfg
    from stages.finetune import finetune as run_finetune, resolve_finetune

    o, file_keys, flags = experiment_file(ctx, config, FINETUNE_FILE_OPTIONS, FINETUNE_FLAG_FIELDS)
    paradigm = o["paradigm"]
    if not paradigm:
        raise ConfigError("no paradigm given: pass --paradigm text4vis|actionclip, or paradigm: in the --config file")
    if flags.get("epochs") is not None and flags["epochs"] < 0:
        raise ConfigError(f"--epochs must be 0 or more, got {flags['epochs']}")
    r = resolve_finetune(paradigm, o["recipe"], file=file_keys, sets=set_, flags=flags, where=f"config file {config}",
                         options=[*FINETUNE_FILE_OPTIONS, *FINETUNE_FLAG_FIELDS], dataset=o["dataset"])
    cfg = r.cfg
    say(r.lines)
    spec = load_dataset(o["dataset"], data_root=o["data_root"], video_root=o["video_root"],
                        train_list=o["train_list"], val_list=o["val_list"], test_list=o["test_list"],
                        classes=o["classes"], split_id=o["split_id"])
    res = run_finetune(spec, cfg, r.head, AugmentCfg(**r.augment), run_dir=o["run_dir"], resume=resume,
                       progress=progress, log=typer.echo, force=force)
    if res["rank"] != 0:
        return
    fin = res["final"]
    n = sum(res["trainable_params"].values())
    typer.echo(f"finetune {paradigm}: top1 {fin['top1']:.1f}%  top5 {fin['top5']:.1f}%  mean-class "
               f"{fin['mean_class']:.1f}%  ({res['train_videos']} train / {res['eval_videos']} eval videos, "
               f"{n:,} trainable params, {res['world_size']} process(es), {res['seconds']:.1f}s)")
    for split, fails in res["failures"].items():
        for f in fails:
            typer.echo(f"  failed [{split}] {f['path']}: {f['reason']}")
    typer.echo(f"run folder: {res['run_dir']}")


@app.command("finetune-export")
def finetune_export(
    run: Path = typer.Option(..., help="Run folder of `pipeline finetune`."),
    out: Path = typer.Option(..., help="Where to write the open_clip state dict (.pt)."),
):
    """Export a fine-tuned model as an open_clip checkpoint (use it as `pipeline extract --pretrained OUT`)."""
    from stages.finetune import export_finetuned

    path = export_finetuned(run, out)
    config = Path(run) / "config.json"
    model = json.loads(config.read_text())["finetune"]["model"] if config.exists() else "<model>"
    typer.echo(f"wrote {path}; build a cache from it with: pipeline extract --model {model} --pretrained {path} ...")


# ----------------------------------------------------------------------------- entry point
# commands that build a CLIP model: open_clip (and torchvision's operator registrations) is imported
# up front for them, where a signal waits for the import to finish
_CLIP_COMMANDS = {"extract", "finetune", "finetune-export", "repair"}
# commands that never import torch (they read JSON, Zarr metadata and numpy arrays): they answer at once
_TORCH_FREE = {("runs", None), ("cache", "ls"), ("cache", "info"), ("cache", "verify")}


def _command_names(t: typer.Typer) -> set[str]:
    return {c.name or c.callback.__name__.lower().replace("_", "-") for c in t.registered_commands}


def _needs_torch(args: list[str]) -> bool:
    """Does this command line run a command that imports torch? Help, a usage error (no or an unknown
    command, a group without its subcommand) and the commands of _TORCH_FREE do not."""
    if not args or "--help" in args:
        return False
    groups = {g.name: g.typer_instance for g in app.registered_groups}
    cmd = args[0]
    if cmd not in groups:
        return cmd in _command_names(app)
    sub = args[1] if len(args) > 1 else None
    if sub not in _command_names(groups[cmd]):
        return False
    return (cmd, None) not in _TORCH_FREE and (cmd, sub) not in _TORCH_FREE


def _import_heavy(args: list[str]) -> None:
    if not _needs_torch(args):
        return
    import torch  # noqa: F401

    if _CLIP_COMMANDS & set(args[:2]):
        import open_clip  # noqa: F401


def _click_exceptions():
    """The exceptions module of the click typer runs on: typer vendors click as ``typer._click``
    (classes that are not ``click``'s own), older typer used ``click`` itself."""
    import typer.core

    mod = getattr(typer.core, "_click", None) or getattr(typer.core, "click", None)
    if mod is None:
        import click as mod
    return mod.exceptions


def _click_error(exc: Exception) -> int | None:
    """A parse error click raised (an unknown command or option, a missing argument, a bad value):
    say it as the usage line and one error line; returns the exit status (None: not click's)."""
    errors = _click_exceptions()
    if isinstance(exc, (typer.Abort, getattr(errors, "Abort", typer.Abort))):  # EOF at a prompt
        return 130
    if not isinstance(exc, errors.ClickException):
        return None
    no_args = getattr(errors, "NoArgsIsHelpError", None)
    if no_args is not None and isinstance(exc, no_args):  # `pipeline` or `pipeline cache` alone: the help
        text = exc.format_message()  # empty when typer's rich help printed it already
        if text:
            typer.echo(text)
        return 0
    ctx = getattr(exc, "ctx", None)
    hint = ""
    if isinstance(exc, errors.UsageError) and ctx is not None:
        echo_err(ctx.get_usage())
        hint = f" (see `{ctx.command_path} --help`)"
    echo_err("error: " + " ".join(exc.format_message().split()) + hint)
    return exc.exit_code


def main(argv: list[str] | None = None) -> None:
    import errno
    import gc

    from pipeline import signals

    previous = signals.install()
    try:
        signals.let_go()  # the entry point's hold over the module imports (raises a stop made meanwhile)
        with signals.deferred():  # a stop inside torch's C++ initialisation aborted the process (-6)
            _import_heavy(list(sys.argv[1:] if argv is None else argv))
        # what the imports made lives as long as the process: out of the cyclic collector's sight, so a
        # full collection walks the command's own data (240,000 video records), not torch's modules too
        gc.freeze()
        code = app(args=argv, standalone_mode=False)
        signals.check()  # a stop some library swallowed still ends as one
    except signals.Interrupted as exc:
        echo_err(signals.LINE)
        sys.exit(exc.exit_code)
    except PipelineError as exc:
        echo_err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except Exception as exc:
        if signals.received():  # a failure caused by the stop (e.g. a DataLoader worker killed with us)
            echo_err(signals.LINE)
            sys.exit(signals.exit_code())
        status = _click_error(exc)
        if status is not None:
            sys.exit(status)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            echo_err(f"error: disk full{where} ({exc.strerror}): free some space, then rerun the same command "
                      "to resume")
            sys.exit(1)
        raise
    finally:
        signals.restore(previous, exiting=argv is None)  # as the program: no signal turns its status into -2
    if isinstance(code, int) and code:  # typer returns (not raises) Exit codes under standalone_mode=False
        sys.exit(code)


if __name__ == "__main__":
    main()

