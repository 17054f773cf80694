"""Stage two: train (or fit) one head from a cache, evaluate, write a run folder.

Run folder: config.json (resolved), last.pt (atomic, every epoch; `resume` continues from it),
metrics.json (history + final), curves.png. Deterministic on CPU for a given seed: the
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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from cache.errors import CacheMismatchError, ConfigError, DatasetError, TrainingError
from cache.store import PENDING, FeatureStore, atomic_write_text, open_store
from stages.cache_data import CacheSplit, check_cache_for_head, select_videos
from stages.loader import PRELOADS, SHUFFLES, epoch_plan, eval_loader, train_loader
from stages.checkpoint import load_checkpoint, save_checkpoint
from stages.config import coerce_option
from stages.dist import DistContext, dist_device, rank_batches
from stages.runs import (AMP_CHOICES, RunLog, autocast, autocast_dtype, default_runs_root, existing_run, lr_factor,
                         param_groups, plot_curves, remove_unstarted)
from stages.heads import DIM_FIELDS, Head, get_head_entry, make_cfg
from stages.heads.common import validate_choice
from stages.recipes import accumulation_steps

__all__ = ["TrainCfg", "parse_class_spec", "split_overrides", "build_head", "build_optimizer", "classifier_matrix",
           "train_head", "evaluate_head", "evaluate_run", "accuracy_metrics", "text_classifier", "CLASSIFIER_INITS"]

CLASSIFIER_INITS = ("clip_text", "random_normal", "orthogonal", "lda", "minilm")
EVAL_AVERAGES = ("scores", "embeddings")


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
    recipe: str = ""                  # the preset these values came from (stages/recipes.py); a record only

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
        )
        for name, ok, need in checks:
            if not ok:
                raise ConfigError(f"{name} must be {need}, got {getattr(self, name)!r}")
        validate_choice("eval_average", self.eval_average, EVAL_AVERAGES)
        validate_choice("classifier_init", self.classifier_init, CLASSIFIER_INITS)
        validate_choice("amp", self.amp, AMP_CHOICES)
        validate_choice("shuffle", self.shuffle, SHUFFLES)
        validate_choice("preload", self.preload, PRELOADS)


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


def split_overrides(pairs: list[str]) -> tuple[dict, dict]:
    """--set key=value pairs -> (TrainCfg overrides, head overrides). 'head.x' always goes to the head."""
    train_fields = {f.name: f for f in dataclasses.fields(TrainCfg)}
    train, head = {}, {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key.startswith("head."):
            head[key[5:]] = value
        elif key in train_fields:
            train[key] = coerce_option(train_fields[key], key, value)
        else:
            head[key] = value
    return train, head


# ----------------------------------------------------------------------------- head + classifier
def build_head(name: str, store: FeatureStore, overrides: dict, num_classes: int | None = None) -> Head:
    """Create a head with its dims filled from the cache metadata, then the user's overrides."""
    entry = get_head_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.cfg_cls)}
    dims = dict(store.meta["dims"])
    if num_classes is not None:
        dims["num_classes"] = num_classes
    values = {k: v for k, v in dims.items() if k in fields and k in DIM_FIELDS}
    if "num_templates" in fields and "clip_actionclip" in store.text_names():
        values["num_templates"] = int(store.text("clip_actionclip").shape[1])
    values.update(overrides)
    return entry.head_cls(make_cfg(name, values))


def _frame_mean_features(store: FeatureStore, split: str, idx: np.ndarray) -> np.ndarray:
    x = store.read(split, "frame_emb", idx)  # (n, V, T, E)
    return x.mean(axis=(1, 2))


def _project(w: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Map text-only embeddings (K, d) to the video embedding size E with a seeded matrix with
    orthonormal rows or columns: when d <= E it is an exact isometry (all inner products, hence
    the inter-class correlation structure, are kept); when d > E it is a Johnson-Lindenstrauss
    style projection that keeps them approximately."""
    d = w.shape[1]
    if d == dim:
        return w
    g = np.random.default_rng(seed).standard_normal((max(d, dim), max(d, dim)))
    q, _ = np.linalg.qr(g)
    proj = q[:d, :dim] if d <= dim else q[:d, :dim] * math.sqrt(d / dim)
    return w @ proj


def _text_set(store, head: Head, text_set: str = "") -> torch.Tensor:
    """A cache text set (K, E) or (K, M, E) for a head's classifier: ``text_set``, or the head's
    default (per template for a 3-D classifier); its width must be the head's embedding's."""
    shape = head.classifier_shape()
    name = text_set or ("clip_actionclip" if len(shape) == 3 else "clip_single")
    w = torch.from_numpy(store.text(name))
    if w.shape[-1] != shape[-1]:
        raise ConfigError(f"text set '{name}' is {w.shape[-1]}-d but the head's classifier is {shape[-1]}-d: "
                          "use a text set of the backbone's own text encoder (MiniLM: --init minilm)")
    return w


def classifier_matrix(init: str, store: FeatureStore, head: Head, classes: list[int] | None, cfg: TrainCfg,
                      train_idx: np.ndarray | None = None) -> torch.Tensor:
    """The classifier matrix W for ``head`` under one initialisation (Text4Vis Table 4)."""
    shape = head.classifier_shape()
    K, E = shape[0], shape[-1]
    g = torch.Generator().manual_seed(cfg.seed + 17)
    sel = classes if classes is not None else list(range(int(store.meta["dims"]["num_classes"])))
    if init == "clip_text":
        w = _text_set(store, head, cfg.text_set)[sel]
    elif init == "random_normal":
        w = torch.randn(*shape, generator=g)
    elif init == "orthogonal":
        q, _ = torch.linalg.qr(torch.randn(max(K, E), max(K, E), generator=g))
        w = q[:K, :E].contiguous()
        if len(shape) == 3:
            w = w.unsqueeze(1).expand(shape).contiguous()
    elif init == "lda":
        from stages.heads.lda import lda_classifier

        if train_idx is None:
            raise ConfigError("the LDA initialisation needs training videos")
        feats = _frame_mean_features(store, cfg.train_split, train_idx)
        labels = store.labels(cfg.train_split)[train_idx]
        remap = {c: i for i, c in enumerate(sel)}
        y = np.array([remap[int(v)] for v in labels])
        w = torch.from_numpy(np.asarray(lda_classifier(feats, y, len(sel), max_per_class=cfg.lda_per_class,
                                                       seed=cfg.seed), dtype=np.float64))
        # LDA's rows share one large direction (the global mean times the precision matrix):
        # harmless for dot-product scores, but a cosine classifier would see only the small
        # remainder (every pair of rows at cosine ~1). Removing the shared row mean adds the
        # same x.c to every class score, so LDA's decisions are unchanged.
        w = (w - w.mean(0, keepdim=True)).float()
    elif init == "minilm":
        w = torch.from_numpy(_project(store.text("minilm")[sel], E, cfg.seed).astype(np.float32))
    else:
        raise ConfigError(f"unknown classifier init '{init}'; choose from {', '.join(CLASSIFIER_INITS)}")
    if len(shape) == 3 and w.dim() == 2:
        w = w.unsqueeze(1).expand(K, shape[1], E).contiguous()
    if tuple(w.shape) != tuple(shape):
        raise ConfigError(f"classifier '{init}' has shape {tuple(w.shape)}, the head needs {tuple(shape)}")
    return w.float()


def text_classifier(store, head: Head, text_set: str = "", classes: list[int] | None = None) -> torch.Tensor:
    """Class text embeddings (K', E) that a head's video embedding is scored against on classes
    it was not trained on (zero-shot, cross-dataset): ``text_set``, or the head's default
    (per-template for a 3-D classifier), templates averaged after normalising. Any number of
    classes: unlike ``classifier_matrix``, not tied to the head's training classes."""
    w = _text_set(store, head, text_set)
    if classes is not None:
        w = w[classes]
    return F.normalize(w, dim=-1).mean(1) if w.dim() == 3 else w


# ----------------------------------------------------------------------------- metrics
def accuracy_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 and mean-class accuracy (percent)."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    correct1 = top[:, 0] == labels
    correct5 = (top == labels[:, None]).any(dim=1)
    per_class = [correct1[labels == c].float().mean().item() for c in labels.unique()]
    return {"top1": 100 * correct1.float().mean().item(), "top5": 100 * correct5.float().mean().item(),
            "mean_class": 100 * float(np.mean(per_class)), "n": int(len(labels))}


def collate_items(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a list of per-video tensor dicts into one batch dict (the collate of stage two)."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_head(head: Head, data: CacheSplit, device: torch.device, batch_size: int = 64,
                  average: str = "scores", classifier: torch.Tensor | None = None,
                  amp_dtype=None, dist_ctx: DistContext | None = None, split: bool = True) -> dict[str, float]:
    """Multi-view evaluation: run each view, average scores (or embeddings, Text4Vis style).

    ``classifier`` (K', E) given: logits come from cosine similarity of the head's video
    embedding with it (zero-shot on other classes, cross-dataset evaluation). Under torchrun
    (``dist_ctx`` with several ranks) each rank scores every world-th video and the scores are
    gathered: every rank returns the metrics of the whole set (``split=False``: each rank's
    ``data`` is already its own share).
    """
    head.eval()
    ctx = dist_ctx or DistContext()
    use_emb = classifier is not None or average == "embeddings"
    if use_emb and not hasattr(head, "video_embedding"):
        raise ConfigError(f"head '{head.name}' has no video embedding: it cannot average embeddings or swap classes")
    if ctx.enabled and split:
        data = data.rank_subset(ctx.rank, ctx.world) if isinstance(data, IterableDataset) else \
            Subset(data, range(ctx.rank, len(data), ctx.world))
    loader = eval_loader(data, batch_size, device)  # stored bytes, converted on the device (stages/loader.py)
    all_scores, all_labels = [], []
    for batch in loader:
        batch = _to(batch, device)
        labels = batch.pop("label")
        V = next(iter(batch.values())).shape[1]
        per_view = []
        for v in range(V):
            view = {k: t[:, v] for k, t in batch.items()}
            with autocast(device, amp_dtype):
                per_view.append(head.video_embedding(view).float() if use_emb else head(view)["logits"].float())
        stacked = torch.stack(per_view)  # (V, B, K) or (V, B, E)
        if use_emb:
            emb = F.normalize(stacked, dim=-1).mean(0)
            if classifier is None:
                scores = head.logits_from_embedding(emb) if hasattr(head, "logits_from_embedding") else \
                    F.normalize(emb, dim=-1) @ F.normalize(_head_w(head), dim=-1).T
            else:
                scores = F.normalize(emb, dim=-1) @ F.normalize(classifier.to(emb), dim=-1).T
        else:
            scores = stacked.softmax(-1).mean(0)
        all_scores.append(scores.float().cpu())
        all_labels.append(labels.cpu())
    parts = ctx.all_objects((all_scores, all_labels))  # [(scores, labels)] of every rank
    scores = [x for p in parts for x in p[0]]
    labels = [x for p in parts for x in p[1]]
    if not scores:
        raise DatasetError("no videos to evaluate")
    return accuracy_metrics(torch.cat(scores), torch.cat(labels))


def _head_w(head: Head) -> torch.Tensor:
    w = head.classifier
    return w.mean(1) if w.dim() == 3 else w


# ----------------------------------------------------------------------------- training
def _run_id(cfg: TrainCfg, head: Head, store: FeatureStore, partial: str = "") -> str:
    """Hash of the resolved settings (an option set to its default names the same run) and the
    data: the cache key and the source, so training from a subset of shards never lands in the
    folder of a run on the whole Zarr cache (``partial``: which videos of an unfinished cache)."""
    train = {k: v for k, v in asdict(cfg).items() if k != "recipe"}  # the same values name the same run
    train = {k: v for k, v in train.items() if k != "preload" and not (k == "shuffle" and v == "full")}
    data = {"train": train, "head": asdict(head.cfg), "cache": store.key, "source": store.source_id}
    if partial:
        data["partial"] = partial
    blob = json.dumps(data, sort_keys=True, default=str)
    return f"{cfg.head}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def train_head(cache: str | Path | FeatureStore, cfg: TrainCfg, head_overrides: dict | None = None,
               run_dir: str | Path | None = None, runs_root: str | Path | None = None, resume: bool = False,
               progress: bool = True, log=print, init_weight: torch.Tensor | None = None,
               reuse: bool = True, force: bool = False, allow_partial: bool = False) -> dict:
    """Train (or fit) ``cfg.head`` on a cache and evaluate it; returns the metrics dict.

    What the run folder already holds decides the rest (``existing_run``): an unfinished run of
    the same settings continues from its last checkpoint, a finished one is returned as is
    (``reuse``, always on: kept for callers that pass it), another run is refused unless
    ``force`` (which starts over); ``resume`` insists on a checkpoint.
    A Zarr cache must be finished and sound in what the run reads (checked once, before any run
    folder exists); ``allow_partial``: train on the done videos of an unfinished one.
    Under torchrun every rank calls this (module docstring); rank 0 writes the run folder.
    """
    cfg.validate()
    store = open_store(cache) if isinstance(cache, (str, Path)) else cache  # FeatureStore or stages.wds_data.WdsSource
    ctx = DistContext.from_env()
    device = dist_device(cfg.device, ctx)
    ctx.start(device)
    try:
        amp_dtype = autocast_dtype(cfg, device)
        return _train_head(store, cfg, dict(head_overrides or {}), run_dir, runs_root, resume, progress and ctx.main,
                           log if ctx.main else (lambda *a, **k: None), init_weight, force, ctx, device, amp_dtype,
                           allow_partial)
    finally:
        ctx.stop()


def _train_head(store, cfg: TrainCfg, head_overrides: dict, run_dir, runs_root, resume: bool, progress: bool, log,
                init_weight, force: bool, ctx: DistContext, device: torch.device, amp_dtype,
                allow_partial: bool = False) -> dict:
    K_all = int(store.meta["dims"]["num_classes"])
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
    if isinstance(store, FeatureStore):
        reads = {cfg.eval_split: inputs[cfg.eval_split].array_names()}
        reads[cfg.train_split] = inputs[cfg.train_split].array_names() + (["frame_emb"] * (
            head.has_classifier and cfg.classifier_init == "lda" and init_weight is None))
        if any(store.require_sound(reads, allow_partial, log).values()):  # unfinished: name which videos
            partial = hashlib.sha256(b"".join((store.status(s) == PENDING).tobytes() for s in sorted(reads))).hexdigest()
    train_idx = select_videos(store, cfg.train_split, shots=cfg.shots, fraction=cfg.fraction,
                              classes=train_classes, seed=cfg.seed)
    eval_classes = test_classes if test_classes is not None else train_classes
    eval_idx = select_videos(store, cfg.eval_split, classes=eval_classes, seed=cfg.seed)
    train_map = {c: i for i, c in enumerate(train_classes)} if train_classes is not None else None
    eval_map = {c: i for i, c in enumerate(eval_classes)} if eval_classes is not None else None

    train_data = _split_data(store, inputs[cfg.train_split], train_idx, train=True, label_map=train_map)
    eval_data = _split_data(store, inputs[cfg.eval_split], eval_idx, train=False, label_map=eval_map)
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
        run_dir.mkdir(parents=True, exist_ok=True)
    runlog = RunLog(run_dir, enabled=ctx.main)  # status.json + TensorBoard events
    try:
        resolved = {"train": asdict(cfg), "head": {"name": cfg.head, **asdict(head.cfg)}, "cache": str(store.path),
                    "cache_key": store.key, "source": store.source_id, "train_videos": int(len(train_idx)),
                    "eval_videos": int(len(eval_idx))}
        decision = ("fresh", "")
        if ctx.main:
            try:
                decision = existing_run(run_dir, resolved, resume, force)
            except ConfigError as exc:
                decision = ("error", str(exc))
        action, message = ctx.all_objects(decision)[0]  # rank 0 decides, before anyone writes
        if action == "error":
            raise ConfigError(message)
        if action == "reuse":
            log(f"run folder {run_dir} already holds this finished run: its results are reused "
                "(--force trains it again)")
            return json.loads((run_dir / "metrics.json").read_text())
        resume = action == "resume"
        if ctx.main:
            for stale in ("last.pt", "metrics.json", "curves.png") if action == "fresh" else ():
                (run_dir / stale).unlink(missing_ok=True)  # --force: the old run goes before the new one starts
            atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=1))
            runlog.start(resolved, epochs=cfg.epochs)

        if getattr(head, "set_backbone_weights", None) and keys.backbone_weights:
            head.set_backbone_weights(cached_backbone_weights(store, keys))
        if head.has_classifier:
            w = init_weight if init_weight is not None else classifier_matrix(cfg.classifier_init, store, head,
                                                                              train_classes, cfg, train_idx)
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
                save_checkpoint({"head": head.state_dict(), "config": resolved, "epoch": 1}, run_dir / "last.pt")
        elif cfg.epochs == 0:  # evaluation only: zero-shot with the installed classifier
            metrics = evaluate_head(head, eval_data, device, average=cfg.eval_average, classifier=eval_classifier,
                                    amp_dtype=amp_dtype, dist_ctx=ctx)
            history.append({"epoch": 0, "train_loss": None, "val": metrics})
        else:
            metrics, history = _fit_sgd(head, train_data, eval_data, cfg, device, amp_dtype, run_dir, resolved,
                                        resume, progress, log, eval_classifier, ctx, len(train_idx), runlog)
        if head.uses_sklearn or cfg.epochs == 0:
            runlog.epoch(history[-1])
        result = {"head": cfg.head, "final": metrics, "history": history, "train_videos": int(len(train_idx)),
                  "eval_videos": int(len(eval_idx)), "trainable_params": head.num_trainable(),
                  "seconds": time.perf_counter() - t0, "world_size": ctx.world, "rank": ctx.rank,
                  "run_dir": str(run_dir)}
        if ctx.main:
            atomic_write_text(run_dir / "metrics.json", json.dumps(result, indent=1))
            plot_curves(history, run_dir / "curves.png", cfg.head)
            runlog.finish()
        ctx.barrier()
        return result
    except BaseException as exc:
        runlog.fail(exc)
        if created:
            remove_unstarted(run_dir)
        raise


# ----------------------------------------------------------------------------- streaming sources
# A source other than a Zarr FeatureStore (stages/wds_data.WdsSource: WebDataset shards) builds its
# own dataset per split: an IterableDataset that shuffles itself through a buffer, seeded by
# set_epoch. Everything else in this file treats it as a store (meta, labels, status, text, aux).
def _split_data(store, inputs, indices, train: bool, label_map):
    make = getattr(store, "split_dataset", None)
    if make is not None:
        return make(inputs, indices, train=train, label_map=label_map)
    return CacheSplit(store, inputs, indices, train=train, label_map=label_map, preload=False)


def _all_items(data) -> list[dict]:
    """Every training item in index order (closed-form heads fit on the whole set at once)."""
    if isinstance(data, IterableDataset):
        return list(data.ordered())
    return [data[i] for i in range(len(data))]


def cached_backbone_weights(store: FeatureStore, keys) -> dict[int, dict[str, torch.Tensor]]:
    """The frozen backbone blocks a head reads (``keys.backbone_weights``), from the cache's aux arrays."""
    from stages.heads import resolve_layers

    depth = int(store.meta["dims"]["depth"])
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


def _accumulate(model, head, group: list[dict], cfg: TrainCfg, ctx: DistContext, device, amp_dtype, scaler,
                params) -> float:
    """Backward of one global batch given as micro-batches: each micro-batch's mean loss (over the
    whole world's share of it) weighted by its size, the gradients divided by the global batch's
    size, so the update equals one step on the whole batch for per-sample losses (cross-entropy)
    up to float summation order. BatchNorm statistics and ActionCLIP's in-batch contrast see one
    micro-batch at a time. Returns the global batch's mean loss."""
    total, n_total = 0.0, 0
    for j, batch in enumerate(group):
        batch = _to(batch, device)
        labels = batch["label"]
        valid = batch.pop("valid", None)
        sync = contextlib.nullcontext() if not ctx.enabled or j == len(group) - 1 else model.no_sync()
        with sync:
            with autocast(device, amp_dtype):
                out = model(batch)
                if ctx.enabled:
                    out, labels = _global_batch(out, labels, valid, ctx)
                n = int(labels.shape[0])
                loss = head.loss(out, labels, cfg.label_smoothing) * n if n else None
            if loss is None:  # padding only, on every rank: nothing to add
                continue
            scaler.scale(loss * ctx.world if ctx.enabled else loss).backward()
        total += float(loss.item())
        n_total += n
    for p in params:
        if p.grad is not None:
            p.grad.div_(max(n_total, 1))
    return total / max(n_total, 1)


def _optimizer_step(opt, scaler, sched, cfg: TrainCfg, params) -> None:
    if cfg.grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()


def _fit_sgd(head, train_data, eval_data, cfg, device, amp_dtype, run_dir, resolved, resume, progress, log,
             eval_classifier, ctx: DistContext, n_train: int, runlog: RunLog | None = None):
    from tqdm import tqdm

    params = [p for p in head.parameters() if p.requires_grad]
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
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: same stream whether resumed or not
        train_data.set_epoch(epoch, cfg.seed)
        batches = _epoch_batches(train_data, step_cfg, ctx, epoch, steps_per_epoch, device) if accum == 1 else \
            _accumulation_groups(train_data, cfg, ctx, epoch, steps_per_epoch, device, accum)
        model.train()
        losses = []
        bar = tqdm(batches, desc=f"{cfg.head} epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False,
                   total=steps_per_epoch)
        for batch in bar:
            if isinstance(batch, list):  # micro-batches of one optimiser step (gradient accumulation)
                opt.zero_grad(set_to_none=True)
                losses.append(_accumulate(model, head, batch, cfg, ctx, device, amp_dtype, scaler, params))
                _optimizer_step(opt, scaler, sched, cfg, params)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                continue
            batch = _to(batch, device)
            labels = batch["label"]
            valid = batch.pop("valid", None)
            with autocast(device, amp_dtype):
                out = model(batch)
                if ctx.enabled:  # every rank: the loss of the whole global batch
                    out, labels = _global_batch(out, labels, valid, ctx)
                loss = head.loss(out, labels, cfg.label_smoothing)
            if not torch.isfinite(loss.detach()):  # every rank sees the same global loss: all stop here
                raise TrainingError(f"training stopped: the loss is {loss.item()} at epoch {epoch + 1}, step "
                                    f"{len(losses) + 1}; check the cache (`pipeline cache verify`) or lower the "
                                    "learning rate (--set lr=...)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss * ctx.world if ctx.enabled else loss).backward()  # DDP averages over ranks
            _optimizer_step(opt, scaler, sched, cfg, params)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        ctx.sync_buffers(head)
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0]}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            metrics = evaluate_head(head, eval_data, device, average=cfg.eval_average, classifier=eval_classifier,
                                    amp_dtype=amp_dtype, dist_ctx=ctx)
            entry["val"] = metrics
        history.append(entry)
        if runlog is not None:
            runlog.epoch(entry)
        if progress:
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {entry['train_loss']:.4f}"
                + (f", val top1 {metrics['top1']:.1f}%" if "val" in entry else ""))
        if ctx.main:
            save_checkpoint({"head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "scaler": scaler.state_dict(), "epoch": epoch + 1, "history": history,
                          "config": resolved}, ckpt_path)
        ctx.barrier()
    if not metrics:
        raise DatasetError("no evaluation ran")
    return metrics, history


def _open_source(path: str | Path, source: str = ""):
    """A Zarr cache folder, or a WebDataset export's header (NAME-header.json: a path, a URL or a
    ``pipe:`` command; ``source`` says so for a run's own data, whatever the spelling)."""
    if source.startswith("wds:") or str(path).endswith(".json"):
        from stages.wds_data import WdsSource

        return WdsSource(str(path), shuffle=0)
    return open_store(path)


def evaluate_run(run_dir: str | Path, cache: str | Path | None = None, split: str = "val",
                 text_set: str = "", eval_average: str = "scores", allow_partial: bool = False) -> dict:
    """Evaluate a trained run, on its own cache or on another one (cross-dataset zero-shot).

    A cache is a Zarr folder or a WebDataset export's header: a run trained from shards is
    re-evaluated from its shards. On another dataset's cache the head's classifier is swapped for that cache's class text
    embeddings (cosine similarity with the head's video embedding), so the other cache must
    come from the same backbone weights and sampling.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "last.pt"
    if not ckpt_path.exists():
        raise ConfigError(f"no checkpoint in run folder {run_dir}")
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or "head" not in ckpt or "cache" not in ckpt.get("config", {}):
        raise ConfigError(f"{run_dir} is not a stage-two run (a stage-three run keeps its evaluation in "
                          "metrics.json; `pipeline finetune-export` turns its backbone into a checkpoint to extract with)")
    validate_choice("average", eval_average, EVAL_AVERAGES)
    resolved = ckpt["config"]
    own = _open_source(resolved["cache"], resolved.get("source", ""))
    target = _open_source(cache) if cache else own
    head_cfg = {k: v for k, v in resolved["head"].items() if k != "name"}
    name = resolved["head"]["name"]
    head = get_head_entry(name).head_cls(make_cfg(name, head_cfg))
    head.load_state_dict(ckpt["head"])
    swap = target.key != own.key
    if swap:
        same = (target.meta["backbone"]["weights"] == own.meta["backbone"]["weights"]
                and target.meta["backbone"]["arch"] == own.meta["backbone"]["arch"])
        if not same:
            raise CacheMismatchError(f"cache {target.path} was made with other backbone weights "
                                     f"({target.meta['backbone']['weights'][:24]}...) than the run's cache")
        if not head.has_classifier:
            raise ConfigError(f"head '{name}' has no text classifier: it cannot be evaluated on other classes")
    elif text_set:
        raise ConfigError("a text set applies only when evaluating on another dataset's cache (--cache); "
                          "on its own cache a run keeps the classifier it was trained with")
    inputs = check_cache_for_head(target, head.data_keys(), name, [split])
    if isinstance(target, FeatureStore):
        target.require_sound({split: inputs[split].array_names()}, allow_partial, log=print)
    idx = select_videos(target, split)
    data = _split_data(target, inputs[split], idx, train=False, label_map=None)
    classifier = None
    if swap:
        classifier = text_classifier(target, head, text_set or resolved["train"].get("text_set", ""))
    metrics = evaluate_head(head, data, torch.device("cpu"), average=eval_average, classifier=classifier)
    return {"run": str(run_dir), "cache": str(target.path), "split": split, "swapped_classifier": swap, **metrics}
