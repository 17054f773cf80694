"""The `pipeline` command. It parses, validates and calls one stage function per command.

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
from typing import Annotated, Optional

import typer

from cache.errors import CacheError, ConfigError, PipelineError
from pipeline.cli_runs import runs_app
from pipeline.cli_sweep import sweep
from pipeline.datasets import list_datasets

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="clipcache: cache frozen CLIP features of videos once, train heads from the cache many times.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect feature caches.")


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


def _echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


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


# ----------------------------------------------------------------------------- shared options
# The options of every command that reads a dataset's videos (extract, finetune), declared once.
DatasetName = Annotated[str, typer.Option(help=" | ".join(list_datasets()))]
DataRoot = Annotated[Optional[Path], typer.Option(help="Dataset folder (official layout or demo folder).")]
VideoRoot = Annotated[Optional[Path], typer.Option(help="Folder the list paths are relative to.")]
TrainList = Annotated[Optional[Path], typer.Option(
    help="Train list: 'path label' lines (videos), or 'folder num_frames label' lines (frame folders).")]
ValList = Annotated[Optional[Path], typer.Option(help="Val list.")]
TestList = Annotated[Optional[Path], typer.Option(help="Test list.")]
ClassesFile = Annotated[Optional[Path], typer.Option(help="Class names: one per line, or CSV id,name.")]
SplitId = Annotated[int, typer.Option(help="Official split number (UCF-101, HMDB-51).")]
Pretrained = Annotated[str, typer.Option(help="open_clip pretrained tag or a local checkpoint path; auto: openai "
                                              "for an open_clip model that has it, a random init for the built-in "
                                              "tiny / small / demo; none: a random init.")]
Model = Annotated[str, typer.Option(help="open_clip model name (ViT-B-16, ViT-L-14, ...), or the built-in tiny / "
                                         "small / demo.")]
InitSeed = Annotated[int, typer.Option(help="Seed of the random init when no --pretrained is given.")]
Activation = Annotated[str, typer.Option(
    help="MLP activation the weights were trained with: auto (from the tag, the checkpoint or the model name; "
         "a checkpoint that cannot say is refused) | gelu | quick_gelu (OpenAI-trained weights).")]
Frames = Annotated[int, typer.Option(help="Frames per clip (T).")]
PerStepBatch = Annotated[Optional[int], typer.Option(
    help="Videos per step and process (the global batch is reached by gradient accumulation).")]
GlobalBatch = Annotated[Optional[int], typer.Option(
    help="Videos per optimiser step (default: the recipe's); the recipe's lr is scaled linearly unless lr is set.")]


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
    sampling: Optional[str] = typer.Option(None, help="segment (TSN) | segment-start | dense; default segment, or the "
                                                    "protocol's."),
    stride: Optional[int] = typer.Option(None, help="Frame stride for dense sampling (default 8, or the protocol's)."),
    layers: str = typer.Option("last4", help="Blocks to tap: lastK | all | none | 8,10,12 (1-based)."),
    patch: bool = typer.Option(False, "--patch/--no-patch", help="Also store patch tokens of the tapped blocks."),
    store_frames: bool = typer.Option(False, "--frames-uint8/--no-frames-uint8",
                                      help="Also store the preprocessed uint8 input frames."),
    views: Optional[str] = typer.Option(None, help="CxS views (temporal clips x spatial crops) for val/test "
                                                   "(default 1x1, or the protocol's)."),
    train_views: str = typer.Option("1x1", help="CxS views for the train split."),
    protocol: str = typer.Option("", help="A paper's test protocol: evl | text4vis | side4video | actionclip "
                                          "(frames, sampling, views, resize, view averaging); flags override it. "
                                          "Default: the --for-head heads' own; none: one centre view."),
    resize_ratio: Optional[float] = typer.Option(None, help="Short side = input size x this before cropping "
                                                            "(1: EVL/CLIP; 1.142857: scale 256 for 224)."),
    train_aug: Optional[int] = typer.Option(None, help="View bank: K augmented views per train video (random "
                                                      "clip, random resized crop, flip), drawn once, seeded."),
    aug_seed: int = typer.Option(0, help="Seed of the view bank (with each video's split and index)."),
    aug_area: float = typer.Option(0.4, help="Smallest area fraction of the view bank's random resized crop."),
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
    from stages.extract import ExtractCfg, add_head_needs, describe_plan, plan_extraction, run_extraction
    from stages.recipes import protocol_for_heads, resolve_protocol

    if not 0 <= max_failed <= 1:
        raise ConfigError(f"--max-failed must be a fraction in [0, 1], got {max_failed}")
    rank_world = _parse_shard(shard) if shard else None  # None: torchrun's RANK/WORLD_SIZE, or 0/1
    heads = [h.strip() for h in for_head.split(",") if h.strip()]
    if not protocol and heads:  # the papers' test views by default
        protocol = protocol_for_heads(heads)
        if protocol and _main_rank():
            typer.echo(f"--for-head {','.join(heads)}: the paper's test protocol {protocol} (--protocol none: one "
                       "centre view)")
    protocol = "" if protocol == "none" else protocol
    given = {"frames": frames, "sampling": sampling, "stride": stride, "views": views, "resize_ratio": resize_ratio}
    sample, _record, proto_lines = resolve_protocol(protocol, {k: v for k, v in given.items() if v is not None},
                                                    {k: getattr(ExtractCfg(), k) for k in given})
    spec = load_dataset(dataset, data_root=data_root, video_root=video_root, train_list=train_list,
                        val_list=val_list, test_list=test_list, classes=classes, split_id=split_id)
    from stages.backbone import resolve_pretrained

    pretrained, why = resolve_pretrained(model, pretrained)
    if why and pretrained and _main_rank():  # a default chose real weights: say which
        typer.echo(why)
    cfg = ExtractCfg(model=model, pretrained=pretrained, init_seed=init_seed, layers=layers, patch=patch,
                     store_frames=store_frames, train_views=train_views, dtype=dtype, text=text,
                     batch_frames=batch_frames, workers=workers, shard_size=shard_size, device=device,
                     protocol=protocol, activation=activation, hash_sources=hash_sources,
                     train_aug=train_aug, aug_seed=aug_seed, aug_area=aug_area, **sample)
    for line in proto_lines if _main_rank() else ():
        typer.echo(line)
    if heads:
        cfg = add_head_needs(cfg, heads, len(spec.classes), view_bank=not no_view_bank)
        bank = "" if cfg.train_aug is None else f", view bank --train-aug {cfg.train_aug}" + (
            "" if train_aug is not None else " (the heads' measured default; --no-view-bank: plain train views)")
        typer.echo(f"for {', '.join(heads)}: layers {cfg.layers}, patch tokens {'yes' if cfg.patch else 'no'}, "
                   f"uint8 frames {'yes' if cfg.store_frames else 'no'}{bank}")
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
    _report_extraction(res, max_failed)


def _report_extraction(res, max_failed: float = 1.0) -> None:
    if res.reused:
        _check_failures(res.summary, max_failed)
        return
    fps = res.frames / res.seconds if res.seconds else 0.0
    typer.echo(f"cache {res.path}: {res.videos} videos encoded, {res.failed} failed, "
               f"{res.frames} frames in {res.seconds:.1f}s ({fps:.0f} frames/s, "
               f"encoder busy {100 * res.encoder_busy:.0f}% of the encode phase)")
    if res.waiting_hint():
        typer.echo(res.waiting_hint())
    for split, fails in res.summary.get("failures", {}).items():
        for f in fails:
            typer.echo(f"  failed [{split}] {f['path']}: {f['reason']}")
    if not res.summary.get("complete", False):
        typer.echo("cache not complete yet (other shard ranges pending); run the remaining ranks, or rerun without --shard")
    _check_failures(res.summary, max_failed)


def _check_failures(summary: dict, max_failed: float) -> None:
    """After the summary: exit 1 when every video (or more than --max-failed of them) failed."""
    from cache.errors import RunFailedError
    from stages.extract import failure_verdict

    verdict = failure_verdict(summary, max_failed)
    if verdict:
        raise RunFailedError(f"extraction failed: {verdict}")


# ----------------------------------------------------------------------------- cache ls/info/verify
@cache_app.command("ls")
def cache_ls(root: Optional[Path] = typer.Argument(None, help="Cache root (default: artifacts/caches).")):
    """List the caches under a root."""
    from rich.console import Console
    from rich.table import Table

    from cache.files import human_bytes
    from cache.paths import default_cache_root
    from cache.store import list_stores

    if root is not None and not root.is_dir():
        raise CacheError(f"cache root {root} " + ("is not a folder" if root.exists() else "does not exist"))
    damaged: list[tuple[Path, str]] = []
    stores = list_stores(root or default_cache_root(), damaged)
    table = Table("cache", "dataset", "model", "layers", "dtype", "done", "failed", "pending", "size")
    rows = []
    for st in stores:
        try:
            meta = st.info
            done = failed = pending = 0
            for s in st.splits:
                c = st.counts(s)
                done, failed, pending = done + c["done"], failed + c["failed"], pending + c["pending"]
            rows.append((st.path.name, [meta.dataset.name, meta.backbone.arch, str(meta.layers), meta.dtype,
                                        str(done), str(failed), str(pending), human_bytes(st.size_bytes())]))
        except CacheError as exc:  # it opened, but its metadata or status arrays do not read
            damaged.append((st.path, str(exc)))
    for path, _why in damaged:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        rows.append((path.name, ["DAMAGED", "-", "-", "-", "-", "-", "-", human_bytes(size)]))
    for name, cells in sorted(rows):
        table.add_row(name, *cells)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: whole cache names, not 80 columns
    for path, why in sorted(damaged):
        typer.echo(f"damaged {path.name}: {why}")
    if not rows:
        typer.echo(f"no caches under {root or default_cache_root()}")


@cache_app.command("info")
def cache_info(path: Path = typer.Argument(..., help="Cache folder."),
               as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON.")):
    """Size, videos done/failed/pending, layers, dtype and how the cache was made."""
    from cache.meta import extract_command
    from cache.files import human_bytes
    from cache.store import open_store

    st = open_store(path)
    meta = st.info
    if as_json:
        typer.echo(json.dumps({"meta": st.meta, "summary": st.summary()}, indent=1))
        return
    cfg = meta.config
    typer.echo(f"cache     {st.path}")
    typer.echo(f"key       {st.key}")
    typer.echo(f"size      {human_bytes(st.size_bytes())}")
    typer.echo(f"dataset   {meta.dataset.name} ({meta.dims.num_classes} classes)")
    typer.echo(f"model     {meta.backbone.arch}  weights {meta.backbone.weights}")
    typer.echo(f"layers    {meta.layers}  patch tokens: {'yes' if cfg.patch else 'no'}  "
               f"frames: {'yes' if cfg.store_frames else 'no'}  dtype {meta.dtype}")
    views = ", ".join(f"{s} {v.clips}x{v.crops}" for s, v in meta.views.items())
    typer.echo(f"sampling  {cfg.frames} frames, {cfg.sampling}  views {views}")
    typer.echo(f"text      {', '.join(st.text_names()) or 'none'}")
    for s in st.splits:
        c = st.counts(s)
        typer.echo(f"{s:<9} {st.num_videos(s)} videos: done {c['done']}, failed {c['failed']}, pending {c['pending']}")
        for f in st.failures(s):
            typer.echo(f"          failed {f['path']}: {f['reason']}")
        records = st.video_records(s)
        if records:
            per = {}
            for r in records:
                per[r["decoder"]] = per.get(r["decoder"], 0) + 1
            typer.echo(f"          decoded by {', '.join(f'{k} {v}' for k, v in sorted(per.items()))}")
            paths = st.items(s)
            for r in records:
                if r["warnings"]:
                    typer.echo(f"          warning {paths[r['index']][0]}: {'; '.join(r['warnings'])}")
    typer.echo(f"made by   {extract_command(meta, out=str(st.path))}")


@cache_app.command("verify")
def cache_verify(path: Path = typer.Argument(..., help="Cache folder.")):
    """Check a cache: the files it was built with and every committed shard against their checksums, labels
    against the manifest, status against the shard records, done videos hold finite data, failures have reasons."""
    from cache.store import open_store

    st = open_store(path)
    problems = st.verify()
    for s in st.splits:
        c = st.counts(s)
        typer.echo(f"{s}: done {c['done']}, failed {c['failed']}, pending {c['pending']}")
    if problems:
        for p in problems[:50]:
            typer.echo(f"problem: {p}")
        if len(problems) > 50:
            typer.echo(f"problem: ... and {len(problems) - 50} more")
        raise CacheError(f"cache {path} failed verification: {len(problems)} problem(s); "
                         f"repair it with `pipeline cache repair {path}`")
    typer.echo("ok: status and data agree, no NaN/inf in done videos"
               + (", every file matches its checksum" if st.has_checksums else
                  " (made before checksums: files not checked)"))


@cache_app.command("repair")
def cache_repair(path: Path = typer.Argument(..., help="Cache folder."),
                 progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")):
    """Repair (and finish) a cache in place: rebuild its damaged files, redo its damaged or pending shards (and those
    with done videos holding NaN/inf: every check `cache verify` makes) with the extraction recorded in its
    metadata, then verify it."""
    import dataclasses

    from cache.meta import extract_command
    from cache.store import open_store
    from stages.extract import ExtractCfg, plan_extraction, run_extraction

    st = open_store(path)
    problems = st.verify()  # what `cache verify` checks, NaN/inf in done videos included
    if not problems and st.is_complete():
        typer.echo(f"ok: cache {path} is complete and verified, nothing to repair")
        return
    meta = st.info
    spec = _dataset_from_cache(st)
    known = {f.name for f in dataclasses.fields(ExtractCfg)}
    cfg = ExtractCfg(**{k: v for k, v in meta.config.to_dict().items() if k in known})
    plan = plan_extraction(spec, cfg, out=st.path) if spec is not None else None
    if plan is None or plan.key != st.key:
        raise CacheError(f"cannot rebuild the request of cache {path} from its metadata "
                         f"({'manifest damaged' if spec is None else 'the videos or lists changed'}); "
                         f"rerun the command that made it: {extract_command(meta, out=str(path))}")
    _report_extraction(run_extraction(plan, shard=(0, 1), progress=progress, finite=True))
    typer.echo(f"ok: cache {path} repaired and verified")


def _dataset_from_cache(st):
    """The DatasetSpec a cache was extracted from, rebuilt from its manifest and metadata (None
    when the manifest is unreadable)."""
    from pipeline.datasets import DatasetSpec, VideoItem

    try:
        manifest = st.manifest
    except CacheError:
        return None
    ds = st.info.dataset
    counts = manifest.get("num_frames", {})
    splits = {}
    for split in st.splits:
        frames = counts.get(split) or [None] * len(manifest["splits"][split])
        splits[split] = [VideoItem(p, int(lab), n) for (p, lab), n in zip(manifest["splits"][split], frames)]
    return DatasetSpec(ds.name, list(ds.classes), splits, ds.video_root, dict(ds.sources))


# ----------------------------------------------------------------------------- stage two
def _resolve_cache(cache: Optional[Path], dataset: str, cache_root: Optional[Path]) -> Path:
    from cache.paths import default_cache_root, latest_cache

    if cache is not None:
        return cache
    found = latest_cache(cache_root or default_cache_root(), dataset)
    if found is None:
        raise ConfigError(f"no cache given and none extracted yet for dataset '{dataset}' under "
                          f"{cache_root or default_cache_root()}: run `pipeline extract --dataset {dataset} "
                          "--data-root DIR` first, or pass --cache PATH")
    typer.echo(f"cache: {found} (the last one extracted for dataset '{dataset}'; --cache PATH picks another)")
    return found


# Options of `train` and `finetune` an experiment file may hold at top level (the others: --set's keys),
# with their types; those that set a config field are written under the field's name in config.yaml.
TRAIN_FILE_OPTIONS = {"head": "str", "cache": "path", "dataset": "str", "cache_root": "path", "run_dir": "path",
                      "recipe": "str", "wds": "str", "wds_header": "str", "wds_eval": "str", "wds_shuffle": "int",
                      "wds_resample": "bool", "allow_partial": "bool", "head_module": "path"}
TRAIN_FLAG_FIELDS = {"shots": "shots", "fraction": "fraction", "train_classes": "train_classes",
                     "test_classes": "test_classes", "init": "classifier_init", "batch": "batch_size",
                     "global_batch": "global_batch", "epochs": "epochs"}
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", help="Experiment file (YAML): the keys of --set, and this command's options, at top level or under "
                     "sections (see configs/). Precedence: recipe < this file < --set < flags given here. A run "
                     "folder's config.yaml runs that run again.")]


def _given(ctx: typer.Context, name: str) -> bool:
    """Was option ``name`` given on the command line (or by its environment variable)? A flag given
    equal to its default counts: it still overrides the experiment file and --set."""
    source = ctx.get_parameter_source(name)  # typer's own copy of click's ParameterSource: compared by name
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _experiment_file(ctx: typer.Context, config: Optional[Path], own: dict, flag_fields: dict):
    """The command's options, the experiment file's other keys and the flags given that set a config field.

    own: {option: type} the file may set (a flag given on the command line wins); flag_fields:
    {flag option: config field} (the file may name either). Returns (options, file keys, {field: flag value}).
    """
    from stages.config import coerce_option, load_experiment

    where = f"config file {config}"
    file = load_experiment(config) if config is not None else {}
    if "head.name" in file and "head" in own:
        file["head"] = file.pop("head.name")
    opts = {}
    for name, kind in own.items():
        if name in file and not _given(ctx, name):
            try:
                value = coerce_option("str" if kind == "path" else kind, name, file.pop(name))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            opts[name] = Path(value) if kind == "path" else value
        else:
            file.pop(name, None)
            opts[name] = ctx.params[name]
    rest = {flag_fields.get(k, k): v for k, v in file.items()}
    flags = {field: ctx.params[name] for name, field in flag_fields.items() if _given(ctx, name)}
    return opts, rest, flags


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
):
    """Stage two: train a head from a cache and evaluate it."""
    from stages.train import split_overrides, train_head

    o, file_keys, flags = _experiment_file(ctx, config, TRAIN_FILE_OPTIONS, TRAIN_FLAG_FIELDS)
    if o["head_module"] is not None:
        from stages.head_check import load_head_module

        load_head_module(o["head_module"])
    head = o["head"]
    if not head:
        raise ConfigError("no head given: pass --head NAME (see `pipeline heads`), or head: NAME in the --config file")
    file_train, file_head = split_overrides(file_keys, head, f"config file {config}",
                                            [*TRAIN_FILE_OPTIONS, *TRAIN_FLAG_FIELDS])
    set_train, set_head = split_overrides(set_, head)
    train_over = {**file_train, **set_train, **flags}  # recipe < file < --set < flags given
    cfg, head_over, rec = _train_recipe(head, o["recipe"], {**set_train, **flags}, {**file_head, **set_head},
                                        file_train)
    path = _wds_source(o["wds"], o["wds_header"], o["wds_eval"], o["wds_shuffle"], o["wds_resample"], cfg,
                       o["cache"]) if o["wds"] else _resolve_cache(o["cache"], o["dataset"], o["cache_root"])
    cfg, head_over, by_protocol = _protocol_eval(path, cfg, head_over, train_over)
    sources = _value_sources(rec, by_protocol, file_train, file_head, {**set_train, **flags}, set_head)
    res = train_head(path, cfg, head_over, run_dir=o["run_dir"], resume=resume, progress=progress,
                     allow_partial=o["allow_partial"], force=force, sources=sources)
    if res.get("rank", 0):  # under torchrun, rank 0 reports
        return
    fin = res["final"]
    typer.echo(f"{head}: top1 {fin['top1']:.1f}%  top5 {fin['top5']:.1f}%  mean-class {fin['mean_class']:.1f}%  "
               f"({res['train_videos']} train / {res['eval_videos']} eval videos, "
               f"{res['trainable_params']:,} trainable params, {res['seconds']:.1f}s)")
    typer.echo(f"run folder: {res['run_dir']}")


def _main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _file_over(file_over: dict, base: dict, explicit: dict) -> dict:
    """The experiment file's values that change ``base`` (defaults and recipe), so the recipe's
    'overridden by you' line names only those; its lr stays whenever a global batch is given, so
    the linear lr rule never rescales an lr the file sets."""
    out = {k: v for k, v in file_over.items() if base.get(k) != v}
    if "lr" in file_over and ("global_batch" in out or "global_batch" in explicit):
        out["lr"] = file_over["lr"]
    return out


def _train_recipe(head: str, recipe: str, train_over: dict, head_over: dict, file_over: dict | None = None):
    """TrainCfg from the head's preset (stages/recipes.py), then the experiment file's values
    (``file_over``), then --set and the flags given (``train_over``); printed."""
    import dataclasses as dc
    import os

    import torch

    from stages.recipes import resolve_recipe, stage_two_recipe
    from stages.train import TrainCfg

    explicit = dict(train_over)
    device = str({**(file_over or {}), **explicit}.get("device", "auto"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    rec = stage_two_recipe(head, recipe, cuda=cuda)
    defaults = {f.name: getattr(TrainCfg(), f.name) for f in dc.fields(TrainCfg)}
    explicit = {**_file_over(file_over or {}, {**defaults, **rec.values}, explicit), **explicit}
    values, lines = resolve_recipe(rec, explicit, defaults, world=int(os.environ.get("WORLD_SIZE", "1")))
    values.update(head=head, recipe=recipe)
    cfg = TrainCfg(**values)
    cfg.validate()
    if _main_rank():
        for line in lines:
            typer.echo(line)
    return cfg, {**rec.head, **head_over}, rec


def _value_sources(rec, by_protocol: dict, file_train: dict, file_head: dict, you_train: dict,
                   you_head: dict) -> dict:
    """Where each option's value came from, for those not at their default: {"train": {key: "recipe" |
    "cache protocol" | "file" | "you"}, "head": {...}}; later sources win, as in the resolution
    (`runs compare` prints them beside each value)."""
    def section(*layers: tuple[str, dict]) -> dict:
        return {k: name for name, keys in layers for k in keys}

    return {"train": section(("recipe", rec.values), ("cache protocol", by_protocol["train"]), ("file", file_train),
                             ("you", you_train)),
            "head": section(("recipe", rec.head), ("cache protocol", by_protocol["head"]), ("file", file_head),
                            ("you", you_head))}


def _protocol_eval(path, cfg, head_over: dict, train_over: dict):
    """A cache extracted with --protocol evaluates by that paper's view-averaging rule unless told otherwise."""
    import dataclasses as dc

    from stages.recipes import protocol_eval_overrides
    from stages.data.open import is_wds

    if not isinstance(path, Path) or is_wds(path):
        return cfg, head_over, {"train": {}, "head": {}}
    from stages.data.open import open_source

    meta = open_source(path).info
    train_p, head_p = protocol_eval_overrides(meta, cfg.head)
    train_p = {k: v for k, v in train_p.items() if k not in train_over}
    head_p = {k: v for k, v in head_p.items() if k not in head_over}
    if (train_p or head_p) and _main_rank():
        typer.echo(f"protocol {meta.protocol.name} of the cache: evaluate with "
                   + ", ".join(f"{k}={v}" for k, v in {**train_p, **head_p}.items()))
    return dc.replace(cfg, **train_p), {**head_over, **head_p}, {"train": train_p, "head": head_p}


@app.command("compare-init")
def compare_init_cmd(
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the last extracted cache of --dataset)."),
    dataset: str = typer.Option("demo", help="Dataset whose last cache is used when --cache is not given."),
    cache_root: Optional[Path] = typer.Option(None, help="Where keyed caches are (default artifacts/caches)."),
    head: str = typer.Option("text4vis", help="A head with a classifier matrix W (text4vis, actionclip)."),
    inits: str = typer.Option("", help="Comma list of classifier inits (default all: clip_text, random_normal, "
                                       "orthogonal, lda, minilm)."),
    seeds: str = typer.Option("0,1,2", help="Comma list of seeds."),
    shots: str = typer.Option("1,2,0", help="Comma list of K training videos per class (0: all): the table's columns."),
    frozen: str = typer.Option("both", help="both | frozen | tuned: keep W as initialised, train it, or both."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per run (default: the training default)."),
    set_: list[str] = typer.Option([], "--set", help="Override: key=value (training option or head option; "
                                                     "head.key=value forces a head option). Repeatable."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: artifacts/compare-init/<cache>-<hash>)."),
    corr_classes: int = typer.Option(20, help="Classes shown in the W correlation maps (0: no maps)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Text4Vis classifier-init ablation: train per init x seed x shots x frozen/tuned W, tabulate, plot."""
    from rich.console import Console

    from pipeline.compare_init import compare_init, summary_table
    from stages.classifiers import CLASSIFIER_INITS
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

    if epochs is not None and epochs < 0:
        raise ConfigError(f"--epochs must be 0 or more, got {epochs}")
    if corr_classes < 0:
        raise ConfigError(f"--corr-classes must be 0 or more (0: no maps), got {corr_classes}")
    modes = {"both": (True, False), "frozen": (True,), "tuned": (False,)}
    if frozen not in modes:
        raise ConfigError(f"--frozen must be one of {', '.join(modes)}, got '{frozen}'")
    init_list = [x.strip() for x in inits.split(",") if x.strip()] or list(CLASSIFIER_INITS)
    train_over, head_over = split_overrides(set_, head)
    path = _resolve_cache(cache, dataset, cache_root)
    res = compare_init(path, head=head, inits=init_list, seeds=int_list(seeds, "--seeds"),
                       shots=int_list(shots, "--shots"), frozen=modes[frozen], epochs=epochs, head_overrides=head_over,
                       train_overrides=train_over, out_dir=out, corr_classes=corr_classes, progress=progress,
                       log=typer.echo)
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
    average: str = typer.Option("scores", help="Multi-view: average scores or embeddings."),
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
               f"mean-class {res['mean_class']:.1f}%  ({res['n']} videos"
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
FINETUNE_FILE_OPTIONS = {"paradigm": "str", "dataset": "str", "data_root": "path", "video_root": "path",
                         "train_list": "path", "val_list": "path", "test_list": "path", "classes": "path",
                         "split_id": "int", "run_dir": "path", "recipe": "str"}
FINETUNE_FLAG_FIELDS = {"model": "model", "pretrained": "pretrained", "init_seed": "init_seed",
                        "activation": "activation", "frames": "frames", "views": "views", "epochs": "epochs",
                        "grad_checkpointing": "grad_checkpointing", "batch": "batch_size",
                        "global_batch": "global_batch"}


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
    import dataclasses as dc
    import os

    from pipeline.datasets import load_dataset
    from stages.augment import AugmentCfg
    from stages.finetune import FinetuneCfg, finetune as run_finetune, split_finetune_overrides
    from stages.recipes import resolve_recipe, stage_three_recipe

    o, file_keys, flags = _experiment_file(ctx, config, FINETUNE_FILE_OPTIONS, FINETUNE_FLAG_FIELDS)
    paradigm = o["paradigm"]
    if not paradigm:
        raise ConfigError("no paradigm given: pass --paradigm text4vis|actionclip, or paradigm: in the --config file")
    if flags.get("epochs") is not None and flags["epochs"] < 0:
        raise ConfigError(f"--epochs must be 0 or more, got {flags['epochs']}")
    file_ft, file_aug, file_head = split_finetune_overrides(file_keys, paradigm, f"config file {config}",
                                                            [*FINETUNE_FILE_OPTIONS, *FINETUNE_FLAG_FIELDS])
    set_ft, set_aug, set_head = split_finetune_overrides(set_, paradigm)
    ft_over = {**set_ft, **{k: v for k, v in flags.items() if v is not None}}
    rec = stage_three_recipe(paradigm, o["recipe"])
    defaults = dc.asdict(FinetuneCfg(paradigm=paradigm))
    ft_over = {**_file_over(file_ft, {**defaults, **rec.values}, ft_over), **ft_over}  # file < --set < flags
    values, lines = resolve_recipe(rec, ft_over, defaults, world=int(os.environ.get("WORLD_SIZE", "1")))
    cfg = FinetuneCfg(**{**values, "recipe": o["recipe"]})
    from stages.backbone import resolve_pretrained

    weights, why = resolve_pretrained(cfg.model, cfg.pretrained if "pretrained" in {**file_ft, **ft_over} else "auto")
    cfg = dc.replace(cfg, pretrained=weights)
    if why and weights:
        lines.append(f"  {why}")
    aug_over = {**rec.augment, **file_aug, **set_aug}
    head_over = {**rec.head, **file_head, **set_head}
    lines.append("  augmentation: " + (", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in aug_over.items()) or "generic (AugmentCfg defaults)"))
    if _main_rank():
        for line in lines:
            typer.echo(line)
    cfg.validate()
    spec = load_dataset(o["dataset"], data_root=o["data_root"], video_root=o["video_root"],
                        train_list=o["train_list"], val_list=o["val_list"], test_list=o["test_list"],
                        classes=o["classes"], split_id=o["split_id"])
    res = run_finetune(spec, cfg, head_over, AugmentCfg(**aug_over), run_dir=o["run_dir"], resume=resume,
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


# ----------------------------------------------------------------------------- scale out: export, finalize
@cache_app.command("export")
def cache_export(
    path: Path = typer.Argument(..., help="Cache folder."),
    format_: str = typer.Option("wds", "--format", help="Export format: wds (WebDataset tar shards) | npy (one "
                                "memory-mappable .npy per tap and split, and index.json)."),
    out: Optional[Path] = typer.Option(None, help="Folder for the export (default: <cache>-wds or <cache>-npy next "
                                                  "to the cache)."),
    shard_bytes: str = typer.Option("1GB", help="Shard size limit: 1GB, 500MB, 64MiB or bytes."),
    name: str = typer.Option("", help="Shard name prefix NAME (default: the cache folder's name)."),
    split: list[str] = typer.Option([], "--split", help="Export only this split (repeatable; default: all)."),
    partial: bool = typer.Option(False, "--partial", help="Export the done videos of an incomplete cache."),
    array: list[str] = typer.Option([], "--array", help="npy: export only this cache array (frame_emb, cls, patch, "
                                                        "frames; repeatable; default: all)."),
):
    """Export the done videos as WebDataset shards NAME-<split>-000000.tar plus NAME-header.json, or as .npy files."""
    from cache.files import human_bytes
    from cache.store import open_store
    from cache.wds import export_wds

    if format_ not in ("wds", "npy"):
        raise ConfigError(f"--format must be wds (WebDataset shards) or npy (numpy arrays), got '{format_}'")
    if format_ == "npy":
        from pipeline.export_npy import export_npy_command

        return export_npy_command(path, out, split, array, partial)
    if array:
        raise ConfigError("--array picks the arrays of an npy export (--format npy); a WebDataset export holds them all")
    st = open_store(path)
    dest = out or st.path.parent / f"{st.path.name}-wds"
    res = export_wds(st, dest, name=name or None, shard_bytes=shard_bytes, splits=split or None, partial=partial,
                     log=typer.echo)
    for s, info in res["splits"].items():
        c = info["counts"]
        typer.echo(f"{s}: {info['samples']} videos in {len(info['shards'])} shard(s)"
                   + (f" ({c['failed']} failed, {c['pending']} pending: not exported)" if c["failed"] or c["pending"]
                      else ""))
    typer.echo(f"export {dest}: {human_bytes(res['bytes'])} (cache {human_bytes(st.size_bytes())}) "
               f"in {res['seconds']:.1f}s")
    typer.echo(f"header {dest / (res['name'] + '-header.json')}")


@cache_app.command("finalize")
def cache_finalize(path: Path = typer.Argument(..., help="Cache folder written by several ranks or nodes.")):
    """After a multi-node extraction: check every video is done or failed, write summary.json."""
    from cache.files import human_bytes
    from cache.paths import keyed_root, mark_latest
    from cache.store import open_store

    st = open_store(path)
    pending = {s: st.pending_shards(s) for s in st.splits}
    if any(pending.values()):
        parts = []
        for s, shards in pending.items():
            for k in shards:
                a, b = st.shard_range(s, k)
                parts.append(f"{s} shard {k} (videos {a}-{b - 1})")
        n = sum(st.counts(s)["pending"] for s in st.splits)
        raise CacheError(f"cache {path} is not complete: {n} pending video(s) in {len(parts)} shard(s): "
                         f"{', '.join(parts[:20])}{' ...' if len(parts) > 20 else ''}; rerun the rank(s) that own "
                         "them with the same command and their --shard i/n")
    summary = st.write_summary()
    for s in st.splits:
        c = summary["splits"][s]
        typer.echo(f"{s}: done {c['done']}, failed {c['failed']}, pending 0")
        for f in summary["failures"][s]:
            typer.echo(f"  failed [{s}] {f['path']}: {f['reason']}")
    mark_latest(st.path, st.info.dataset.name, keyed_root(st.path, st.key))
    typer.echo(f"cache {st.path} complete ({human_bytes(summary['bytes'])}); summary {st.path / 'summary.json'}")


def _wds_source(wds: str, header: str, eval_shards: str, shuffle: int, resample: bool, cfg, cache: Optional[Path]):
    """`train --wds`: the export as train_head's data source (stages/data/wds_split.py)."""
    from stages.data.wds_split import open_wds_source

    if cache is not None:
        raise ConfigError("give either --cache (a Zarr cache) or --wds (WebDataset shards), not both")
    if shuffle < 0:
        raise ConfigError(f"--wds-shuffle must be >= 0, got {shuffle}")
    src = open_wds_source(wds, header=header or None, eval_spec=eval_shards or None, train_split=cfg.train_split,
                          eval_split=cfg.eval_split, shuffle=shuffle, resample=resample)
    if src.note:
        typer.echo(src.note, err=True)  # a version 1 export: read, but its members are unchecked
    return src


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
        _echo_err(ctx.get_usage())
        hint = f" (see `{ctx.command_path} --help`)"
    _echo_err("error: " + " ".join(exc.format_message().split()) + hint)
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
        _echo_err(signals.LINE)
        sys.exit(exc.exit_code)
    except PipelineError as exc:
        _echo_err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except Exception as exc:
        if signals.received():  # a failure caused by the stop (e.g. a DataLoader worker killed with us)
            _echo_err(signals.LINE)
            sys.exit(signals.exit_code())
        status = _click_error(exc)
        if status is not None:
            sys.exit(status)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            _echo_err(f"error: disk full{where} ({exc.strerror}): free some space, then rerun the same command "
                      "to resume")
            sys.exit(1)
        raise
    finally:
        signals.restore(previous, exiting=argv is None)  # as the program: no signal turns its status into -2
    if isinstance(code, int) and code:  # typer returns (not raises) Exit codes under standalone_mode=False
        sys.exit(code)


if __name__ == "__main__":
    main()

