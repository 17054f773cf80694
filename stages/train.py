"""Stage two: train (or fit) one head from a cache, evaluate, write a run folder.

Run folder: config.json (resolved), last.pt (atomic, every epoch; `resume` continues from it),
best.pt (the best val top-1 epoch's), metrics.json (history + final), curves.png, and the final
evaluation's per-class results and predictions (stages/run_outputs.py). Deterministic on CPU for a given seed: the
shuffle order and the RNG state of each epoch derive from (seed, epoch), so a run killed
after epoch k and resumed ends with the metrics of an uninterrupted run.

Batch: ``global_batch`` videos per optimiser step, reached by gradient accumulation over
micro-batches of ``batch_size`` per process (stages/recipes.py has the papers' recipes); with
``global_batch`` 0 the batch size is the global batch of one step, as below.

Under torchrun (one process per GPU; gloo on CPU) training is data parallel (DDP): the batch
size is the *global* batch; every rank walks the same seeded sequence of global batches and
takes its slice (stages.dist.rank_batches, padding masked out); the head's outputs are
all-gathered (this rank's slice keeps its gradient) so that every rank computes the loss of the
whole global batch, which the backward pass scales by the world size: DDP's gradient average is
then the gradient of the one-process loss, and a run on n processes follows a run on one up to
float summation order (tests/test_train_ddp.py). BatchNorm (Side4Video) becomes SyncBatchNorm
on GPUs. Evaluation splits the videos across ranks and gathers every score, so the metrics are
those of the whole set on every rank. Rank 0 writes the run folder; the others wait for it.
From WebDataset shards each rank streams its own shards and an epoch is a fixed number of
global batches (the shortest stream wraps around), the usual multi-node recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from cache.errors import ConfigError, DatasetError, TrainingError
from cache.store import PENDING, FeatureStore
from stages.checkpoint import load_checkpoint, save_checkpoint
from stages.classifiers import CLASSIFIER_INITS, classifier_matrix, text_classifier
from stages.config import OptionSet, parse_set, split_options, validate_choice
from stages.data.batch import collate_items, label_swap
from stages.data.batch import to_device as _to  # the loop's short name for it
from stages.data.loader import PRELOADS, SHUFFLES, epoch_plan, train_loader
from stages.data.online import ONLINE_AUGS, OnlineSplit, check_online_reachable, online_aug_cfg
from stages.data.open import is_wds, open_source, split_dataset
from stages.data.zarr_split import check_cache_for_head, select_videos
from stages.dist import DistContext, dist_device
from stages.evaluate import EVAL_AVERAGES, evaluate_head
from stages.heads.facts import TrainPipeline
from stages.heads.needs import DIM_FIELDS
from stages.heads.registry import Head, get_head_entry, make_cfg
from stages.recipes import accumulation_steps, protocol_eval_overrides, resolve_recipe, stage_two_recipe
from stages.resolve import Resolved, file_layer, find_cache, value_sources, world_size
from stages.run_outputs import data_record, is_new_best, save_best, write_scores
from stages.runs import (ADDED_LATER, AMP_CHOICES, RunLog, autocast, autocast_dtype, check_finite_weights,
                         default_runs_root, lr_factor, make_run_dir, param_groups, remove_unstarted, settle_run,
                         write_experiment)

__all__ = ["TrainCfg", "parse_class_spec", "split_overrides", "resolve_train", "build_head", "build_optimizer",
           "classifier_options", "train_head", "cached_backbone_weights"]


@dataclass
class TrainCfg:
    head: str = "tap"
    epochs: int = 10
    batch_size: int = 32              # per step (per process when global_batch > 0, else the global batch)
    global_batch: int = 0             # videos per optimiser step, by gradient accumulation; 0 = batch_size
    lr: float = 1e-3
    weight_decay: float = 0.05
    decay_all: bool = False           # weight decay on every parameter (biases, norms), as the papers' recipes
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0            # max grad norm; 0 = off
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"                 # auto (bf16 on GPUs that have it, else fp16; off on CPU) | none | bf16 | fp16
    train_split: str = "train"
    eval_split: str = "val"
    shots: int = 0                    # K videos per class (0 = all)
    repeat_shots: str = "auto"        # K-shot: repeat the list to the full train set's length, as Text4Vis
                                      # does: on | off | auto (on under --recipe paper)
    fraction: float = 1.0             # label fraction
    train_classes: str = ""           # e.g. "0-5,8": train on these classes only
    test_classes: str = ""            # evaluate on these (zero-shot by swapping the text classifier)
    classifier_init: str = "clip_text"  # for heads with a classifier matrix: see CLASSIFIER_INITS
    text_set: str = ""                # cache text set for clip_text (default: the head's choice)
    lda_per_class: int = 60           # videos per class for the LDA initialisation
    eval_average: str = "scores"      # multi-view test: average "scores" or "embeddings" (Text4Vis)
    eval_every: int = 1
    workers: int = 0
    shuffle: str = "full"             # epoch order: "full" permutation | "block" (runs of videos: sequential reads)
    preload: str = "auto"             # hold the arrays read in RAM (stored dtype): auto (when they fit) | on | off
    # Zarr caches: check a shard file's recorded crc32 whenever a read meets a new version of it (its
    # size/mtime/ctime/inode changed since the start-of-run check), so a same-length rewrite during the
    # run is an error at its next read, not silently other data (off: only `pipeline cache verify` finds
    # it). Cost: one fstat per shard file a batch reads (within the noise of a loader epoch), plus one
    # crc32 pass over a file that changed (bench/bench_verify_reads.py)
    verify_reads: bool = False
    recipe: str = ""                  # the preset these values came from (stages/recipes.py); a record only
    threads: int = 0                  # torch intra-op threads for the run (0: as set); 1 pins the float order
    # stream the train split from the raw videos the cache was extracted from, through its frozen backbone
    # (stages/data/online.py): fresh views every epoch; evaluation stays on the cache
    online: bool = False
    online_aug: str = "paper"         # online views: paper (the head's train pipeline) | light (today's view-bank
                                      # draw) | none (the cache's own views: the control, trains as the cache)

    def validate(self) -> None:
        """One clear ConfigError for a value no run can use (before anything is written)."""
        checks = (
            ("epochs", self.epochs >= 0, "an integer >= 0"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("global_batch", self.global_batch >= 0, "an integer >= 0 (0 = the per-step batch)"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("lr", self.lr >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)"),
            ("shots", self.shots >= 0, "an integer >= 0 (0 = all videos)"),
            ("fraction", 0 < self.fraction <= 1, "in (0, 1]"),
            ("lda_per_class", self.lda_per_class >= 1, "an integer >= 1"),
            ("eval_every", self.eval_every >= 1, "an integer >= 1"),
            ("workers", self.workers >= 0, "an integer >= 0"),
            ("seed", self.seed >= 0, "an integer >= 0"),
            ("threads", self.threads >= 0, "an integer >= 0 (0 = torch's setting)"),
        )
        for name, ok, need in checks:
            if not ok:
                raise ConfigError(f"{name} must be {need}, got {getattr(self, name)!r}")
        validate_choice("eval_average", self.eval_average, EVAL_AVERAGES)
        validate_choice("classifier_init", self.classifier_init, CLASSIFIER_INITS)
        validate_choice("amp", self.amp, AMP_CHOICES)
        validate_choice("shuffle", self.shuffle, SHUFFLES)
        validate_choice("preload", self.preload, PRELOADS)
        validate_choice("repeat_shots", self.repeat_shots, ("auto", "on", "off"))
        validate_choice("online_aug", self.online_aug, ONLINE_AUGS)

    @property
    def repeats_shots(self) -> bool:
        """Does a K-shot run repeat its list each epoch (``repeat_shots``, auto = the paper recipe)?"""
        return self.repeat_shots == "on" or (self.repeat_shots == "auto" and self.recipe == "paper")


def parse_class_spec(spec: str, num_classes: int) -> list[int] | None:
    """'0-5,8' -> [0, 1, 2, 3, 4, 5, 8]; '' -> None (all)."""
    if not spec:
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                if a > b:
                    raise ConfigError(f"bad class range '{part}' in '{spec}': write it low-high, e.g. {b}-{a}")
                out.update(range(a, b + 1))
            elif part:
                out.add(int(part))
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError(f"bad class list '{spec}': use e.g. 0-5,8") from None
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"classes {bad} out of range [0, {num_classes})")
    return sorted(out)


def split_overrides(pairs, head: str = "", where: str = "--set", options=()) -> tuple[dict, dict]:
    """--set key=value pairs (or an experiment file's {key: value}) -> (TrainCfg overrides, head
    overrides), typed by the one rule of stages/config.py: 'train.x' and 'head.x' name the set, a
    bare key is a training option when TrainCfg has it, else a head option (of ``head``, when given:
    an unknown key is refused here; without it the head's make_cfg types and checks them). ``where``
    and ``options`` (the command's own options) go into the message of a bad key."""
    values = dict(pairs) if isinstance(pairs, dict) else parse_set(pairs)
    sets = [OptionSet("train", TrainCfg, "training options", exclude=("head", "recipe"))]
    if head:
        sets.append(OptionSet("head", get_head_entry(head).cfg_cls, f"head '{head}' options"))
        out = split_options(values, sets, where, options)
        return out["train"], out["head"]
    fields = sets[0].fields()
    untyped = {k: v for k, v in values.items() if k.startswith("head.") or (k not in fields and "." not in k)}
    typed = split_options({k: v for k, v in values.items() if k not in untyped}, sets, where, options)
    return typed["train"], {k.removeprefix("head."): v for k, v in untyped.items()}


def resolve_train(head: str, recipe: str | None = "paper", *, file: dict | None = None, sets=(),
                  flags: dict | None = None, cache=None, dataset: str = "demo", cache_root=None,
                  wds: dict | None = None, where: str = "config file", options=()) -> Resolved:
    """Stage two's options, resolved as stages/resolve.py says, and the source it reads.

    TrainCfg's defaults < the head's preset ``recipe`` (None: no preset, the defaults alone) <
    ``file`` (an experiment file's keys, as ``split_overrides`` takes them; ``where`` and
    ``options`` name them in an error) < ``sets`` (--set pairs, or {key: value}) < ``flags``
    ({TrainCfg field: value} given explicitly); then a Zarr cache's test protocol sets the
    evaluation options none of them set. The source: ``wds`` ({"spec", "header", "eval_spec",
    "shuffle", "resample"}: a WebDataset export, opened with the resolved splits), else ``cache``
    (a location or an open source), else the last cache extracted for ``dataset``.
    """
    file_train, file_head = split_overrides(file or {}, head, where, options)
    set_train, set_head = split_overrides(sets, head)
    you = {**set_train, **(flags or {})}
    defaults = {f.name: getattr(TrainCfg(), f.name) for f in dataclasses.fields(TrainCfg)}
    if recipe:
        device = str({**file_train, **you}.get("device", "auto"))
        rec = stage_two_recipe(head, recipe, cuda=device.startswith("cuda") or (device == "auto"
                                                                                and torch.cuda.is_available()))
        explicit = {**file_layer(file_train, {**defaults, **rec.values}, you), **you}
        values, lines = resolve_recipe(rec, explicit, defaults, world=world_size())
        preset = (rec.values, rec.head)
    else:
        values, lines, preset = {**defaults, **file_train, **you}, [], ({}, {})
    values.update(head=head, recipe=recipe or "")
    cfg = TrainCfg(**values)
    cfg.validate()
    head_over = {**preset[1], **file_head, **set_head}
    out = Resolved(cfg, head_over, lines=lines)
    if wds:
        if cache is not None:
            raise ConfigError("give either --cache (a Zarr cache) or --wds (WebDataset shards), not both")
        if wds.get("shuffle", 1000) < 0:
            raise ConfigError(f"--wds-shuffle must be >= 0, got {wds['shuffle']}")
        from stages.data.wds_split import open_wds_source

        out.source = open_wds_source(**wds, train_split=cfg.train_split, eval_split=cfg.eval_split)
        out.notes += [out.source.note] if out.source.note else []  # a version 1 export: its members unchecked
    elif isinstance(cache, (str, os.PathLike)) or cache is None:
        out.source, line = find_cache(cache, dataset, cache_root)
        out.lines += [line] if line else []
    else:
        out.source = cache
    name, *protocol = _cache_protocol(out.source, cfg.head, {**file_train, **you}, head_over)
    if any(protocol):
        out.lines.append(f"protocol {name} of the cache: evaluate with "
                         + ", ".join(f"{k}={v}" for k, v in {**protocol[0], **protocol[1]}.items()))
        out.cfg = dataclasses.replace(cfg, **protocol[0])
        out.head = {**head_over, **protocol[1]}
    out.lines += _flip_swap_lines(out.source, cfg.train_split)
    out.sources = value_sources(preset, protocol, (file_train, file_head), (you, set_head))
    return out


def _flip_swap_lines(source, split: str) -> list[str]:
    """What stage two says when a view bank's flipped views train with their mirror class's label
    (Something-Something v2's left/right classes, the demo's rotations, cache/flips.py); nothing for any other cache."""
    meta = source.info if hasattr(source, "info") else open_source(source).info
    swap = label_swap(meta, split)
    if swap is None:
        return []
    pairs = ", ".join(f"{i}/{j}" for i, j in enumerate(swap.table) if i < j)
    return [f"view bank: a flipped view of a mirror class trains with its mirror's label (classes {pairs})"]


def _cache_protocol(source, head: str, train_given: dict, head_given: dict) -> tuple[str, dict, dict]:
    """(protocol name, TrainCfg values, head values) a Zarr cache's test protocol implies for
    evaluation, less those given; an export's protocol is not applied."""
    if not isinstance(source, (str, os.PathLike, FeatureStore)) or \
            isinstance(source, (str, os.PathLike)) and is_wds(source):
        return "", {}, {}
    meta = open_source(source).info
    train_p, head_p = protocol_eval_overrides(meta, head)
    return (meta.protocol.name if meta.protocol else "", {k: v for k, v in train_p.items() if k not in train_given},
            {k: v for k, v in head_p.items() if k not in head_given})


# ----------------------------------------------------------------------------- head + classifier
def build_head(name: str, store: FeatureStore, overrides: dict, num_classes: int | None = None) -> Head:
    """Create a head with its dims filled from the cache metadata, then the user's overrides."""
    entry = get_head_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.cfg_cls)}
    dims = store.info.dims.to_dict()
    if num_classes is not None:
        dims["num_classes"] = num_classes
    values = {k: v for k, v in dims.items() if k in fields and k in DIM_FIELDS}
    if "num_templates" in fields and "clip_actionclip" in store.text_names():
        values["num_templates"] = int(store.text("clip_actionclip").shape[1])
    values.update(overrides)
    return entry.head_cls(make_cfg(name, values))


def classifier_options(cfg: TrainCfg) -> dict:
    """The arguments of ``stages.classifiers.classifier_matrix`` that a training config sets."""
    return {"seed": cfg.seed, "text_set": cfg.text_set, "train_split": cfg.train_split,
            "lda_per_class": cfg.lda_per_class}


# ----------------------------------------------------------------------------- training
def _run_id(cfg: TrainCfg, head: Head, store: FeatureStore, partial: str = "") -> str:
    """Hash of the resolved settings (an option set to its default names the same run) and the
    data: the cache key and the source, so training from a subset of shards never lands in the
    folder of a run on the whole Zarr cache (``partial``: which videos of an unfinished cache)."""
    train = {k: v for k, v in asdict(cfg).items() if k != "recipe"}  # the same values name the same run
    train = {k: v for k, v in train.items() if k not in ("preload", "verify_reads")
             and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    if not cfg.online:  # the augmentation of a run from the cache is the cache's
        train.pop("online_aug", None)
    if cfg.shots:  # what repeat_shots does, not how it was said (auto follows the recipe, which is not hashed)
        train["repeat_shots"] = cfg.repeats_shots
    else:
        train.pop("repeat_shots", None)
    data = {"train": train, "head": asdict(head.cfg), "cache": store.key, "source": store.source_id}
    if partial:
        data["partial"] = partial
    blob = json.dumps(data, sort_keys=True, default=str)
    return f"{cfg.head}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _repeat_shots(store, cfg: TrainCfg, train_classes, shot_idx: np.ndarray, log) -> np.ndarray:
    """Text4Vis's few-shot epochs: the K-shot list repeated (whole copies) to the length of the
    full train selection, so a K-shot run makes as many updates per epoch as a full-data run."""
    if not isinstance(store, FeatureStore):
        raise ConfigError("repeat_shots repeats a K-shot list within an epoch, which a WebDataset stream cannot: "
                          "train from the Zarr cache, or --set repeat_shots=off")
    full = len(select_videos(store, cfg.train_split, fraction=cfg.fraction, classes=train_classes, seed=cfg.seed))
    copies = max(1, full // len(shot_idx))
    if copies > 1:
        log(f"{cfg.shots}-shot: {len(shot_idx)} videos repeated {copies} times per epoch ({copies * len(shot_idx)} "
            f"samples, as the {full} of the full train set; repeat_shots=off: once)")
    return np.tile(shot_idx, copies)


def train_head(cache: str | Path | FeatureStore, cfg: TrainCfg, head_overrides: dict | None = None,
               run_dir: str | Path | None = None, runs_root: str | Path | None = None, resume: bool = False,
               progress: bool = True, log=print, init_weight: torch.Tensor | None = None,
               reuse: bool = True, force: bool = False, allow_partial: bool = False,
               sources: dict | None = None) -> dict:
    """Train (or fit) ``cfg.head`` on a cache and evaluate it; returns the metrics dict.

    What the run folder already holds decides the rest (``existing_run``): an unfinished run of
    the same settings continues from its last checkpoint, a finished one is returned as is
    (``reuse``, always on: kept for callers that pass it), another run is refused unless
    ``force`` (which starts over); ``resume`` insists on a checkpoint. ``sources``: where the
    options' values came from ({"train"|"head": {key: "recipe" | "file" | "you" | ...}}, the CLI's
    resolution), recorded in config.json for `runs compare`; not part of the run's identity.
    A Zarr cache must be finished and sound in what the run reads (checked once, before any run
    folder exists); ``allow_partial``: train on the done videos of an unfinished one.
    Under torchrun every rank calls this (module docstring); rank 0 writes the run folder.
    """
    cfg.validate()
    if not cfg.online and cfg.online_aug != TrainCfg.online_aug:  # says nothing without --online: one record
        cfg = dataclasses.replace(cfg, online_aug=TrainCfg.online_aug)
    store = open_source(cache)  # a Zarr FeatureStore or a WebDataset export (stages/data/open.py)
    ctx = DistContext.from_env()
    device = dist_device(cfg.device, ctx)
    ctx.start(device)
    threads0 = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        amp_dtype = autocast_dtype(cfg, device)
        return _train_head(store, cfg, dict(head_overrides or {}), run_dir, runs_root, resume, progress and ctx.main,
                           log if ctx.main else (lambda *a, **k: None), init_weight, force, ctx, device, amp_dtype,
                           allow_partial, sources)
    finally:
        torch.set_num_threads(threads0)
        ctx.stop()


def _write_eval_outputs(run_dir: Path, head, data, device, *, store, split: str, indices: np.ndarray,
                       classes: list[int] | None, average: str = "scores", classifier=None, amp_dtype=None,
                       title: str = "") -> dict:
    """Evaluate ``head`` on ``data`` (the selected videos ``indices`` of ``split``, in that order)
    once more, on this process alone, and write per_class.csv, confusion.csv / .png and
    predictions.csv into ``run_dir``. ``classes``: the cache's class of each label (None: all).
    Returns the metrics of this pass."""
    kept: dict = {}
    metrics = evaluate_head(head, data, device, average=average, classifier=classifier, amp_dtype=amp_dtype,
                            keep=kept)
    write_scores(run_dir, kept["scores"].numpy(), kept["labels"].numpy(), store=store, split=split, indices=indices,
                 classes=classes, title=title)
    return metrics


def _train_head(store, cfg: TrainCfg, head_overrides: dict, run_dir, runs_root, resume: bool, progress: bool, log,
                init_weight, force: bool, ctx: DistContext, device: torch.device, amp_dtype,
                allow_partial: bool = False, sources: dict | None = None) -> dict:
    K_all = store.info.dims.num_classes
    train_classes = parse_class_spec(cfg.train_classes, K_all)
    test_classes = parse_class_spec(cfg.test_classes, K_all)
    if test_classes is not None and train_classes is None:
        train_classes = [c for c in range(K_all) if c not in test_classes]
    K = len(train_classes) if train_classes is not None else K_all
    torch.manual_seed(cfg.seed)  # the head's initial weights depend on the seed alone
    head = build_head(cfg.head, store, head_overrides, num_classes=K)
    if test_classes is not None and not head.has_classifier:
        raise ConfigError(f"--test-classes needs a head with a text classifier; '{cfg.head}' has none")
    keys = head.data_keys()
    inputs = check_cache_for_head(store, keys, cfg.head, [cfg.train_split, cfg.eval_split])
    partial = ""
    if cfg.verify_reads and not isinstance(store, FeatureStore):
        raise ConfigError("verify_reads=on checks the shard files of a Zarr cache against their recorded "
                          "checksums; a WebDataset export records none per shard: drop it, or train from the cache")
    if isinstance(store, FeatureStore):
        store.verify_reads = cfg.verify_reads
        reads = {cfg.eval_split: inputs[cfg.eval_split].array_names()}
        reads[cfg.train_split] = inputs[cfg.train_split].array_names() + (["frame_emb"] * (
            head.has_classifier and cfg.classifier_init == "lda" and init_weight is None))
        if any(store.require_sound(reads, allow_partial, log).values()):  # unfinished: name which videos
            partial = hashlib.sha256(b"".join((store.status(s) == PENDING).tobytes() for s in sorted(reads))).hexdigest()
    train_idx = select_videos(store, cfg.train_split, shots=cfg.shots, fraction=cfg.fraction,
                              classes=train_classes, seed=cfg.seed)
    shot_idx = train_idx  # the distinct videos (a classifier init fits on these)
    if cfg.shots and cfg.repeats_shots and cfg.epochs and not head.uses_sklearn:
        train_idx = _repeat_shots(store, cfg, train_classes, train_idx, log)
    eval_classes = test_classes if test_classes is not None else train_classes
    eval_idx = select_videos(store, cfg.eval_split, classes=eval_classes, seed=cfg.seed)
    train_map = {c: i for i, c in enumerate(train_classes)} if train_classes is not None else None
    eval_map = {c: i for i, c in enumerate(eval_classes)} if eval_classes is not None else None

    if cfg.online:
        train_data = _online_split(store, cfg, head, inputs[cfg.train_split], train_idx, train_map, log)
    else:
        train_data = split_dataset(store, inputs[cfg.train_split], train_idx, train=True, label_map=train_map)
    eval_data = split_dataset(store, inputs[cfg.eval_split], eval_idx, train=False, label_map=eval_map)
    if ctx.enabled and isinstance(train_data, IterableDataset) and cfg.epochs > 0 and not head.uses_sklearn:
        # every rank must fill its slice of each global batch; checked by all ranks together before
        # anything is written or DDP exists, so every rank stops with the same line
        per, counts = -(-cfg.batch_size // ctx.world), ctx.all_objects(len(train_data))
        if min(counts) < per:
            raise DatasetError(f"rank {counts.index(min(counts))} streams {min(counts)} training videos from its "
                               f"shards, fewer than its {per} per batch: export smaller shards, use fewer ranks, "
                               "or pass --wds-resample")

    run_dir = Path(run_dir) if run_dir else Path(runs_root or default_runs_root()) \
        / _run_id(cfg, head, store, partial)
    created = ctx.main and not run_dir.exists()  # rank 0 makes (and may remove) the run folder
    if ctx.main:
        make_run_dir(run_dir)
    runlog = RunLog(run_dir, enabled=ctx.main)  # status.json + TensorBoard events
    try:
        resolved = {"train": asdict(cfg), "head": {"name": cfg.head, **asdict(head.cfg)}, "cache": str(store.path),
                    "cache_key": store.key, "source": store.source_id, "train_videos": int(len(shot_idx)),
                    "eval_videos": int(len(eval_idx))}
        if sources:
            resolved["sources"] = sources
        action, reused = settle_run(run_dir, resolved, resume, force, ctx, log)  # rank 0 decides, before anyone writes
        if action == "reuse":
            return reused
        resume = action == "resume"
        runlog.begin(resolved, fresh=action == "fresh", epochs=cfg.epochs)
        if ctx.main:
            write_experiment(run_dir, resolved)  # config.yaml: `pipeline train --config` runs it again

        if head.supports("set_backbone_weights") and keys.backbone_weights:
            head.set_backbone_weights(cached_backbone_weights(store, keys))
        if head.has_classifier:
            w = init_weight if init_weight is not None else classifier_matrix(cfg.classifier_init, store, head,
                                                                              train_classes, shot_idx,
                                                                              **classifier_options(cfg))
            head.set_classifier(w)
        head.to(device)
        eval_classifier = None
        if test_classes is not None:
            eval_classifier = text_classifier(store, head, cfg.text_set, test_classes).to(device)

        history: list[dict] = []
        t0 = time.perf_counter()
        if head.uses_sklearn:
            full = collate_items(_all_items(train_data))
            head.fit(full)
            metrics = evaluate_head(head, eval_data, device, average="scores", amp_dtype=amp_dtype, dist_ctx=ctx)
            history.append({"epoch": 1, "train_loss": None, **{f"val_{k}": v for k, v in metrics.items()}})
            if ctx.main:
                state = {"head": head.state_dict(), "config": resolved, "epoch": 1}
                save_best(state, run_dir)  # fitted once: its one evaluation is its best
                save_checkpoint(state, run_dir / "last.pt")
        elif cfg.epochs == 0:  # evaluation only: zero-shot with the installed classifier
            metrics = evaluate_head(head, eval_data, device, average=cfg.eval_average, classifier=eval_classifier,
                                    amp_dtype=amp_dtype, dist_ctx=ctx)
            history.append({"epoch": 0, "train_loss": None, "val": metrics})
        else:
            metrics, history = _fit_sgd(head, train_data, eval_data, cfg, device, amp_dtype, run_dir, resolved,
                                        resume, progress, log, eval_classifier, ctx, len(train_idx), runlog)
        if head.uses_sklearn or cfg.epochs == 0:
            runlog.epoch(history[-1])
        if ctx.main:  # per_class.csv, confusion.csv/.png, predictions.csv (stages/run_outputs.py)
            _write_eval_outputs(run_dir, head, eval_data, device, store=store, split=cfg.eval_split, indices=eval_idx,
                               classes=eval_classes, average="scores" if head.uses_sklearn else cfg.eval_average,
                               classifier=eval_classifier, amp_dtype=amp_dtype, title=f"{cfg.head} ({cfg.eval_split})")
        result = {"head": cfg.head, "final": metrics, "history": history, "train_videos": int(len(shot_idx)),
                  "eval_videos": int(len(eval_idx)), "trainable_params": head.num_trainable(),
                  "seconds": time.perf_counter() - t0, "world_size": ctx.world, "rank": ctx.rank,
                  "run_dir": str(run_dir), "data": data_record(store, cfg.eval_split)}
        runlog.complete(result, cfg.head)  # rank 0 only
        ctx.barrier()
        return result
    except BaseException as exc:
        runlog.fail(exc)
        if created:
            remove_unstarted(run_dir)
        raise


def _online_split(store, cfg: TrainCfg, head: Head, inputs, train_idx: np.ndarray, train_map, log) -> OnlineSplit:
    """The train split streamed from the cache's raw videos (``--online``), checked before any run folder exists."""
    if not isinstance(store, FeatureStore):
        raise ConfigError("--online decodes the videos a Zarr cache records; a WebDataset export records no "
                          "videos: train from the cache")
    if head.uses_sklearn or cfg.epochs == 0:
        raise ConfigError(f"--online streams fresh views into gradient steps; head '{cfg.head}' "
                          f"{'is fitted once in closed form' if head.uses_sklearn else 'trains no epochs'}: drop --online")
    aug = online_aug_cfg(cfg.online_aug, cfg.head)
    check_online_reachable(store, cfg.train_split, train_idx)
    meta = store.info
    log(f"online: '{cfg.train_split}' streamed from {len(np.unique(train_idx))} raw videos, decoded each epoch "
        f"({cfg.workers or 'no'} worker{'s' if cfg.workers != 1 else ''}), through the frozen {meta.backbone.arch} "
        f"({meta.config.pretrained or 'random init'}), stored as {meta.dtype}; views: {cfg.online_aug}"
        + (" (the cache's own: the control)" if aug is None else f" (fresh per epoch: {_describe_aug(aug)})")
        + f"; '{cfg.eval_split}' evaluated from the cache")
    return OnlineSplit(store, inputs, train_idx, aug, label_map=train_map)


def _describe_aug(aug) -> str:
    if isinstance(aug, TrainPipeline):
        return aug.describe()
    return f"random clip, random resized crop area {aug.area[0]:g}-{aug.area[1]:g} bicubic, flip p {aug.flip:g}"


def _all_items(data) -> list[dict]:
    """Every training item in index order (closed-form heads fit on the whole set at once)."""
    if isinstance(data, IterableDataset):
        return list(data.ordered())
    return [data[i] for i in range(len(data))]


def cached_backbone_weights(store: FeatureStore, keys) -> dict[int, dict[str, torch.Tensor]]:
    """The frozen backbone blocks a head reads (``keys.backbone_weights``), from the cache's aux arrays."""
    from stages.heads.needs import resolve_layers

    depth = store.info.dims.depth
    out: dict[int, dict[str, torch.Tensor]] = {}
    blocks = set(resolve_layers(keys.cls_layers, depth)) | set(resolve_layers(keys.patch_layers, depth))
    names = set(store.aux_names())
    for block in sorted(blocks):
        got = {n: torch.from_numpy(store.aux(f"block{block}.{n}")) for n in keys.backbone_weights
               if f"block{block}.{n}" in names}
        if got:
            out[block] = got
    return out


class _Masked(Dataset):
    """A map-style split indexed by ``rank_batches`` entries: -1 (padding) repeats the first
    video and is flagged ``valid = False``, so the global loss leaves it out."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.data[max(i, 0)]
        item["valid"] = torch.tensor(i >= 0)
        return item


def _epoch_batches(data, cfg: TrainCfg, ctx: DistContext, epoch: int, steps: int, device: torch.device):
    """This rank's batches of one epoch (``data.set_epoch`` already called)."""
    if not isinstance(data, IterableDataset):
        batches = epoch_plan(len(data), cfg.batch_size, ctx.world, ctx.rank, cfg.seed, epoch, cfg.shuffle)
        return train_loader(data, batches, device, cfg.workers, cfg.preload)
    # a stream shuffles itself (a buffer seeded by set_epoch)
    if not ctx.enabled:
        return train_loader(data, None, device, cfg.workers, batch_size=cfg.batch_size)
    per = -(-cfg.batch_size // ctx.world)
    loader = train_loader(data, None, device, cfg.workers, batch_size=per, drop_last=True)
    return _wrap_around(loader, steps, per, ctx.rank)


def _wrap_around(loader, steps: int, per: int, rank: int):
    """Exactly ``steps`` batches from a rank's stream, restarting it when it runs out: ranks of a
    DDP job must take the same number of steps, and shards rarely split evenly across ranks."""
    done = 0
    while done < steps:
        before = done
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return
        if done == before:
            raise DatasetError(f"rank {rank} streams fewer than {per} training videos from its shards: "
                               "export smaller shards, use fewer ranks, or pass --wds-resample")


def _global_batch(out: dict[str, torch.Tensor], labels: torch.Tensor, valid: torch.Tensor | None, ctx: DistContext):
    """The head's outputs and labels of the whole global batch, padding removed; this rank's
    slice keeps its graph, so the loss of the gathered batch back-propagates into it."""
    B = labels.shape[0]
    keep = torch.ones(B, dtype=torch.uint8, device=labels.device) if valid is None else valid.to(torch.uint8)
    keep = ctx.all_cat(keep).bool()
    gathered = {k: ctx.all_cat_with_grad(v)[keep] for k, v in out.items()
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B}
    return gathered, ctx.all_cat(labels)[keep]


def build_optimizer(head: nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
    """AdamW over the head's trainable parameters: decay on all of them (``decay_all``, the papers'
    recipes) or on weights of dim >= 2 only; betas (beta1, beta2); lr ``cfg.lr``."""
    groups = param_groups(list(head.named_parameters()), None, cfg.weight_decay, cfg.decay_all, "head", keep_empty=True)
    try:  # the fused kernel: 3.2x faster steps for T-Trans on CPU (bench_train.py)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _accumulation_groups(data, cfg: TrainCfg, ctx: DistContext, epoch: int, steps: int, device: torch.device,
                         accum: int):
    """This rank's micro-batches of ``cfg.batch_size``, grouped per optimiser step of ``cfg.global_batch``
    videos: the same seeded global batches as a run with batch_size = global_batch, each rank's
    slice cut into micro-batches (every rank gets the same number, padding masked out)."""
    if not isinstance(data, IterableDataset):
        sizes, micro = [], []
        for part in epoch_plan(len(data), cfg.global_batch, ctx.world, ctx.rank, cfg.seed, epoch, cfg.shuffle):
            chunks = [part[i:i + cfg.batch_size] for i in range(0, len(part), cfg.batch_size)]
            sizes.append(len(chunks))
            micro += chunks
        loader = iter(train_loader(data, micro, device, cfg.workers, cfg.preload))
        for k in sizes:
            yield [next(loader) for _ in range(k)]
        return
    loader = train_loader(data, None, device, cfg.workers, batch_size=cfg.batch_size, drop_last=ctx.enabled)
    if ctx.enabled:
        loader = _wrap_around(loader, steps * accum, cfg.batch_size, ctx.rank)
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []
    if group:
        yield group


def _train_step(model, head, group: list[dict], cfg: TrainCfg, ctx: DistContext, device, amp_dtype, opt, sched,
                scaler, params, named, accumulate: bool, epoch: int, step: int) -> float:
    """One optimiser step on one global batch, given as micro-batches (a whole batch is a group of one).

    Every micro-batch's loss is that of the whole world's share of it: the head's outputs are gathered
    (this rank's slice keeps its graph) and the backward pass scales the loss by the world size, so
    DDP's gradient average is the gradient of the one-process loss. ``accumulate`` (global_batch >
    batch_size x ranks): each micro-batch's mean loss is weighted by its size and the summed gradients
    are divided by the global batch's size, so the update equals one step on the whole batch for
    per-sample losses (cross-entropy) up to float summation order; BatchNorm statistics and
    ActionCLIP's in-batch contrast see one micro-batch at a time. Otherwise the mean loss of the one
    batch back-propagates as it is. Returns the global batch's mean loss; a non-finite one (the same
    on every rank) stops the run before the update."""
    opt.zero_grad(set_to_none=True)
    total, n_total = 0.0, 0
    for j, batch in enumerate(group):
        batch = _to(batch, device)
        labels = batch["label"]
        valid = batch.pop("valid", None)
        sync = contextlib.nullcontext() if not ctx.enabled or j == len(group) - 1 else model.no_sync()
        with sync:
            with autocast(device, amp_dtype):
                out = model(batch)
                if ctx.enabled:  # every rank: the loss of the whole global (micro-)batch
                    out, labels = _global_batch(out, labels, valid, ctx)
                n = int(labels.shape[0])
                loss = head.loss(out, labels, cfg.label_smoothing) if n else None
                if loss is not None and accumulate:
                    loss = loss * n  # the micro-batch's sum; the gradients are divided by the total below
            if loss is None:  # padding only, on every rank: nothing to add
                continue
            scaler.scale(loss * ctx.world if ctx.enabled else loss).backward()  # DDP averages over ranks
        total += float(loss.item())
        n_total += n
    if accumulate:
        for p in params:
            if p.grad is not None:
                p.grad.div_(max(n_total, 1))
    value = total / max(n_total, 1) if accumulate else total
    if not math.isfinite(value):  # the global batch's loss: every rank stops here
        raise TrainingError(_loss_stop(value, epoch, step))
    _optimizer_step(opt, scaler, sched, cfg, params)
    check_finite_weights(named, f"epoch {epoch + 1}, step {step}")
    return value


def _optimizer_step(opt, scaler, sched, cfg: TrainCfg, params) -> None:
    if cfg.grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()


def _loss_stop(loss: float, epoch: int, step: int) -> str:
    return (f"training stopped: the loss is {loss} at epoch {epoch + 1}, step {step}; check the cache "
            "(`pipeline cache verify`) or lower the learning rate (--set lr=...)")


def _fit_sgd(head, train_data, eval_data, cfg, device, amp_dtype, run_dir, resolved, resume, progress, log,
             eval_classifier, ctx: DistContext, n_train: int, runlog: RunLog | None = None):
    from stages.progress import progress_bar

    named = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ConfigError(f"head '{cfg.head}' has nothing to train with these options")
    model = head
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":  # batch statistics over the global batch (CPU has no SyncBatchNorm)
            head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
        model = DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None,
                                        forward_sync_buffers=False)
    opt = build_optimizer(head, cfg)
    accum = accumulation_steps(cfg.batch_size, cfg.global_batch, ctx.world)
    step_cfg = dataclasses.replace(cfg, batch_size=cfg.global_batch or cfg.batch_size)  # batches of one step
    steps_per_epoch = max(1, math.ceil(n_train / step_cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    if accum > 1 and head.batch_loss:
        log(f"head '{cfg.head}' contrasts the videos of a batch: with batch_size {cfg.batch_size} and global_batch "
            f"{cfg.global_batch} each contrast spans {cfg.batch_size} videos, not {cfg.global_batch} "
            f"(--set batch_size={cfg.global_batch} gives one contrast over the global batch)")
    if step_cfg.batch_size > n_train and cfg.recipe == "paper":
        log(f"{n_train} training videos, fewer than the global batch {step_cfg.batch_size}: one optimiser step an "
            "epoch (--recipe quick suits small data)")
    start_epoch, history = 0, []
    ckpt_path = run_dir / "last.pt"
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        head.load_state_dict(ckpt["head"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        log(f"resuming {run_dir} from epoch {start_epoch}")
    metrics = next((h["val"] for h in reversed(history) if "val" in h), {})  # eval_every > 1: not every epoch
    # one bar for the whole run, with its ETA (steps of every epoch; a resumed run starts part-way)
    bar = progress_bar(total=total, initial=start_epoch * steps_per_epoch, desc=f"train {cfg.head}", unit="step",
                       enabled=progress)
    try:
        metrics, history = _epochs(model, head, opt, sched, scaler, params, named, train_data, eval_data, cfg,
                                   step_cfg, ctx, device, amp_dtype, accum, steps_per_epoch, start_epoch, history,
                                   metrics, eval_classifier, runlog, resolved, ckpt_path, bar, log, progress)
    finally:
        bar.close()
    if not metrics:
        raise DatasetError("no evaluation ran")
    return metrics, history


def _epochs(model, head, opt, sched, scaler, params, named, train_data, eval_data, cfg, step_cfg, ctx, device,
            amp_dtype, accum, steps_per_epoch, start_epoch, history, metrics, eval_classifier, runlog, resolved,
            ckpt_path, bar, log, progress):
    """The epochs of ``_fit_sgd`` from ``start_epoch``: train, evaluate, record, checkpoint."""
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: same stream whether resumed or not
        train_data.set_epoch(epoch, cfg.seed)
        if accum == 1:  # each batch is one optimiser step: a group of one micro-batch
            groups = ([b] for b in _epoch_batches(train_data, step_cfg, ctx, epoch, steps_per_epoch, device))
        else:
            groups = _accumulation_groups(train_data, cfg, ctx, epoch, steps_per_epoch, device, accum)
        model.train()
        losses = []
        for group in groups:
            losses.append(_train_step(model, head, group, cfg, ctx, device, amp_dtype, opt, sched, scaler, params,
                                      named, accum > 1, epoch, len(losses) + 1))
            bar.update(1)
            bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs}, loss {losses[-1]:.3f}", refresh=False)
        ctx.sync_buffers(head)
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0]}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            metrics = evaluate_head(head, eval_data, device, average=cfg.eval_average, classifier=eval_classifier,
                                    amp_dtype=amp_dtype, dist_ctx=ctx)
            entry["val"] = metrics
        history.append(entry)
        if runlog is not None:
            runlog.epoch(entry, history, cfg.head)
        if progress:
            bar.clear()
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {entry['train_loss']:.4f}"
                + (f", val top1 {metrics['top1']:.1f}%" if "val" in entry else ""))
            bar.refresh()
        if ctx.main:
            state = {"head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch + 1, "history": history, "config": resolved}
            if is_new_best(history):  # before last.pt: a kill in between redoes this epoch, best.pt again
                save_best(state, ckpt_path.parent)
            save_checkpoint(state, ckpt_path)
        ctx.barrier()
    return metrics, history
