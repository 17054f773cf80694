"""Stage one: decode every video once, run the frozen backbone, write the feature cache.

Pipeline: DataLoader workers decode + sample + crop (uint8) in parallel with the encoder; the
main process batches frames across videos through the frozen model; finished shards go to a
writer thread, so disk writes stay off the critical path. Each shard is written whole by this
process (data, failures, then status), which is what makes SIGKILL-and-rerun and several
processes (``--shard i/n``) safe.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache.datasets import DatasetSpec
from cache.errors import CacheError, ConfigError, ModelError, RunFailedError, decode_failure_reason
from cache.files import human_bytes
from cache.meta import (BackboneMeta, CacheMeta, DatasetMeta, Dims, ExtractRecord, Preprocess, ProtocolRecord,
                        ViewBank, ViewCount, key_content)
from cache.paths import default_cache_root, keyed_root, latest_cache, mark_latest
from cache.quant import FP16_MAX, finite_rows
from cache.source import ArraySpec
from cache.store import (
    DONE,
    FAILED,
    FeatureStore,
    create_store,
    open_store,
    repair_static,
)
from stages.backbone import (BackboneInfo, FrozenCLIP, clip_identity, load_clip, model_config, parse_layers,
                             resolve_model_name, resolve_pretrained, weights_id)
from stages.dist import check_device
from stages.recipes import protocol_for_heads, protocol_record, resize_side, resolve_protocol
from stages.resolve import Resolved
from stages.text import TEXT_SETS, compute_text_sets
from stages.video import (AugViewCfg, SamplingCfg, augmented_views, decode_video, layout_key, make_views, normalize,
                          parse_frame_size, parse_views, validate_sampling, view_param_columns, view_rngs)

__all__ = ["ExtractCfg", "ExtractPlan", "resolve_extract", "add_head_needs", "paper_pipeline", "plan_extraction",
           "run_extraction", "default_cache_root", "latest_cache"]

# Bump when decoding/sampling/cropping changes what lands in a cache (part of the cache key).
# 2: frame-exact decoding (decord's random access only where exact; rotation; best stream).
PREPROCESS_VERSION = 2


@dataclass
class ExtractCfg:
    model: str = "tiny"
    pretrained: str = ""
    init_seed: int = 0               # weights when no `pretrained` (random-init models)
    activation: str = "auto"         # auto (what the weights say) | gelu | quick_gelu (a file that cannot say)
    frames: int = 8
    sampling: str = "segment"        # segment (TSN) | segment-start (Text4Vis/Side4Video test) | dense
    stride: int = 8                  # dense sampling stride
    layers: str = "last4"            # lastK | all | none | 8,10,12
    patch: bool = False              # store patch tokens of the tapped layers (large)
    store_frames: bool = False       # store the preprocessed uint8 input frames
    views: str = "1x1"               # CxS for val/test splits
    train_views: str = "1x1"         # CxS for the train split
    train_aug: int | None = None     # view bank: K augmented views per train video (None: the fixed views above)
    aug_seed: int = 0                # seed of the view bank's draws (with the split and video index)
    aug_area: float = 0.4            # smallest area fraction of the view bank's random resized crop (largest 1)
    aug_recipe: str = "light"        # what the view bank draws: light (crop aug_area-1, flip) | paper (aug_heads')
    aug_heads: str = ""              # comma list of the heads whose paper train pipeline the bank draws (--for-head)
    dtype: str = "fp16"              # fp16 | int8 (per-token, for cls/patch)
    text: str = "all"                # comma list of TEXT_SETS, all, or none
    batch_frames: int = 128          # frames per encoder call
    workers: int = -1                # decode workers; -1 = auto
    shard_size: int = 0              # videos per shard; 0 = auto (about 64 MB of the largest array)
    device: str = "auto"
    resize_ratio: float = 1.0        # short side = round(input size x ratio) before the crops (256/224: "scale 256")
    protocol: str = ""               # a paper's test protocol these settings came from (stages/recipes.py)
    hash_sources: bool = False       # also record each source video's sha256 (not only size + mtime)
    resize_to: str = ""              # HxW: frames resized to exactly H x W before the crops (SSv2's 256x320), not by the short side

    def validate(self) -> None:
        """Every numeric option range-checked: one ConfigError naming the flag (nothing written yet)."""
        validate_sampling(self.frames, self.sampling, self.stride, self.views, flags=True)
        checks = (
            ("--batch-frames", self.batch_frames >= 1, "at least 1"),
            ("--workers", self.workers >= -1, "0 or more (-1: auto)"),
            ("--shard-size", self.shard_size >= 0, "0 or more (0: auto)"),
            ("--init-seed", self.init_seed >= 0, "0 or more"),
        )
        for flag, ok, need in checks:
            if not ok:
                raise ConfigError(f"{flag} must be {need}, got {getattr(self, flag[2:].replace('-', '_'))}")
        check_device(self.device)

    def aug_views(self):
        """What the view bank draws: AugViewCfg (light) or the heads' paper TrainPipeline."""
        if self.aug_recipe == "paper":
            return paper_pipeline(self.aug_heads)[1]
        return AugViewCfg(area=(float(self.aug_area), 1.0))

    def text_sets(self) -> list[str]:
        if self.text == "all":
            return list(TEXT_SETS)
        if self.text in ("", "none"):
            return []
        names = [t.strip() for t in self.text.split(",") if t.strip()]
        bad = [n for n in names if n not in TEXT_SETS]
        if bad:
            raise ConfigError(f"unknown text set(s) {bad}; available: {', '.join(TEXT_SETS)}")
        return names


@dataclass
class ExtractPlan:
    """Everything resolved before any work: where the cache goes and what it will hold."""

    cfg: ExtractCfg
    dataset: DatasetSpec
    arch: str
    info: BackboneInfo
    layers: tuple[int, ...]
    key: str
    path: Path
    meta: CacheMeta
    split_arrays: dict[str, list[ArraySpec]]
    shard_size: int
    bytes_per_video: dict[str, int] = field(default_factory=dict)
    cache_root: Path | None = None  # where the latest-cache marker goes (the keyed cache's root, or --cache-root)

    def total_bytes(self) -> int:
        return sum(self.bytes_per_video[s] * len(self.dataset.splits[s]) for s in self.split_arrays)


def add_head_needs(cfg: ExtractCfg, heads: list[str], num_classes: int, view_bank: bool = True) -> ExtractCfg:
    """``cfg`` widened to hold what each head in ``heads`` reads with its default options:
    their blocks added to --layers, patch tokens and uint8 frames switched on where needed; and
    the heads' measured view bank (each head registers its own, ``register_head(..., view_bank=K)``)
    unless ``cfg`` sets its own --train-aug or --train-views, or ``view_bank`` is off."""
    from dataclasses import replace

    from stages.heads.needs import recommended_view_bank
    from stages.heads.registry import head_data_keys

    info = BackboneInfo.from_config(model_config(cfg.model))
    dims = {"num_classes": num_classes, "embed_dim": info.embed_dim, "width": info.width, "frames": cfg.frames,
            "num_patches": info.num_patches, "depth": info.depth, "backbone_heads": info.backbone_heads,
            "image_size": info.image_size, "patch_size": info.patch_size}
    layers, patch, frames = set(parse_layers(cfg.layers, info.depth)), cfg.patch, cfg.store_frames
    for name in heads:
        keys = head_data_keys(name, dims)
        layers |= set(keys.cls_layers) | set(keys.patch_layers)
        patch = patch or bool(keys.patch_layers)
        frames = frames or keys.frames
    train_aug = cfg.train_aug
    if train_aug is None and view_bank and cfg.train_views == "1x1":
        train_aug = recommended_view_bank(heads)
    return replace(cfg, layers=",".join(map(str, sorted(layers))) or "none", patch=patch, store_frames=frames,
                   train_aug=train_aug)


def resolve_extract(flags: dict | None = None, *, protocol: str = "", heads=(), num_classes: int = 0,
                    view_bank: bool = True, dataset: str = "") -> Resolved:
    """Stage one's options, resolved as stages/resolve.py says: ExtractCfg's defaults < the test
    ``protocol`` (""  with ``heads``: their papers' own; "none": none) < ``flags`` (ExtractCfg values
    given; a sampling option None is not given; ``dataset``: a paper's protocol for that dataset,
    e.g. side4video-ssv2, wins over its head's); then what ``heads`` read with their default
    options (``add_head_needs``; ``num_classes``: the dataset's) and the view bank's recipe
    (``aug_recipe`` in ``flags``; None: paper for heads with a train pipeline, else light).
    ``pretrained`` 'auto' picks the weights (stages.backbone.resolve_pretrained)."""
    flags, heads, lines = dict(flags or {}), list(heads), []
    asked_recipe = flags.pop("aug_recipe", None)  # None: paper for heads with a train pipeline, else light
    aug_heads = flags.pop("aug_heads", None) or ""  # the heads whose pipeline the bank draws (default: ``heads``)
    if not protocol and heads:  # the papers' test views by default
        protocol = protocol_for_heads(heads, dataset)
        if protocol:
            lines.append(f"--for-head {','.join(heads)}: the paper's test protocol {protocol} (--protocol none: one "
                         "centre view)")
    protocol = "" if protocol == "none" else protocol
    keys = ("frames", "sampling", "stride", "views", "resize_ratio", "resize_to")
    given = {k: flags.pop(k) for k in keys if k in flags}
    sample, _record, proto_lines = resolve_protocol(protocol, {k: v for k, v in given.items() if v is not None},
                                                    {k: getattr(ExtractCfg(), k) for k in keys})
    cfg = ExtractCfg(**{**flags, **sample, "protocol": protocol})
    pretrained, why = resolve_pretrained(cfg.model, cfg.pretrained)
    cfg = replace(cfg, pretrained=pretrained)
    if why and pretrained:  # a default chose real weights: say which
        lines.append(why)
    lines += proto_lines
    if heads:
        cfg = add_head_needs(cfg, heads, num_classes, view_bank=view_bank)
        bank = "" if cfg.train_aug is None else f", view bank --train-aug {cfg.train_aug}" + (
            "" if flags.get("train_aug") is not None else " (the heads' measured default; --no-view-bank: plain "
                                                          "train views)")
        lines.append(f"for {', '.join(heads)}: layers {cfg.layers}, patch tokens {'yes' if cfg.patch else 'no'}, "
                     f"uint8 frames {'yes' if cfg.store_frames else 'no'}{bank}")
    aug_for = [h.strip() for h in aug_heads.split(",") if h.strip()] or heads
    cfg, recipe_lines = _resolve_aug_recipe(cfg, asked_recipe, aug_for, named=bool(aug_heads))
    lines += recipe_lines
    return Resolved(cfg, lines=lines)


def _resolve_aug_recipe(cfg: ExtractCfg, asked: str | None, heads: list[str],
                        named: bool = False) -> tuple[ExtractCfg, list[str]]:
    """The view bank's recipe: ``asked`` (--aug-recipe) when given, else "paper" when a view bank
    is drawn for ``heads`` (--aug-heads, else --for-head) with a paper train pipeline (all the
    same one), "light" otherwise. Heads whose pipelines differ under the default: light, said in
    a line; asked for paper: the ConfigError of ``paper_pipeline``. ``named``: --aug-heads given
    (it says paper)."""
    from stages.heads.registry import AUG_RECIPES, paper_train_pipeline

    if asked is not None and asked not in AUG_RECIPES:
        raise ConfigError(f"--aug-recipe must be one of {', '.join(AUG_RECIPES)}, got '{asked}'")
    if cfg.train_aug is None:
        if asked is not None or named:
            raise ConfigError(f"{'--aug-recipe' if asked is not None else '--aug-heads'} says what the view bank "
                              "draws, and there is none: add --train-aug K")
        return replace(cfg, aug_recipe="light", aug_heads=""), []
    with_pipeline = [h for h in heads if paper_train_pipeline(h) is not None]
    if asked is None and named:
        asked = "paper"
    if asked == "light" or (asked is None and not with_pipeline):
        return replace(cfg, aug_recipe="light", aug_heads=""), []
    if asked is None:
        pipes = {repr(paper_train_pipeline(h).key()) for h in with_pipeline}
        if len(pipes) > 1:
            return replace(cfg, aug_recipe="light", aug_heads=""), [
                f"view bank: the light recipe ({', '.join(with_pipeline)} train with different paper pipelines; "
                "--aug-recipe paper needs one: extract a cache per head)"]
    cfg = replace(cfg, aug_recipe="paper", aug_heads=",".join(with_pipeline or heads))
    names, pipeline = paper_pipeline(cfg.aug_heads)
    if cfg.aug_area != ExtractCfg().aug_area:
        raise ConfigError("--aug-area sets the light recipe's crop; the paper recipe draws its head's own "
                          "(pass --aug-recipe light to set it)")
    lines = [f"view bank: the paper train pipeline of {', '.join(names)}: {pipeline.describe()} "
             "(--aug-recipe light: crop 0.4-1 and flip)"]
    if (pipeline.clip == "dense") != (cfg.sampling == "dense"):  # the clips follow the cache's --sampling
        paper = "a random dense clip" if pipeline.clip == "dense" else "random TSN offsets"
        ours = "dense clips" if cfg.sampling == "dense" else "TSN offsets"
        lines.append(f"view bank: the paper draws {paper}; this cache samples --sampling {cfg.sampling}, so the "
                     f"bank's clips are random {ours}")
    return cfg, lines


def paper_pipeline(heads: str):
    """(head names, their one TrainPipeline) for ``--aug-recipe paper`` over the comma list
    ``heads``; a ConfigError (one line) when none of them has one or theirs differ."""
    from stages.heads.registry import list_heads, paper_train_pipeline

    names = [h.strip() for h in heads.split(",") if h.strip()]
    pipes = {h: paper_train_pipeline(h) for h in names}
    pipes = {h: p for h, p in pipes.items() if p is not None}
    if not pipes:
        having = [h for h in list_heads() if paper_train_pipeline(h) is not None]
        raise ConfigError("--aug-recipe paper draws a head's paper train pipeline: name the head with --for-head H "
                          "(or --aug-heads H) "
                          f"(one of {', '.join(having)}){f'; {heads} has none' if names else ''}")
    if len({repr(p.key()) for p in pipes.values()}) > 1:
        raise ConfigError(f"--for-head {','.join(names)}: their papers' train pipelines differ, and one view bank "
                          "draws one: pass --aug-recipe light, or extract a separate cache per head")
    return list(pipes), next(iter(pipes.values()))


def plan_extraction(dataset, cfg: ExtractCfg, out: str | Path | None = None,
                    cache_root: str | Path | None = None) -> ExtractPlan:
    """Validate the request and work out the cache key, path and layout (no model weights loaded)."""
    if cfg.dtype not in ("fp16", "int8"):
        raise ConfigError(f"--dtype must be fp16 or int8, got '{cfg.dtype}'")
    cfg.validate()
    if cfg.resize_ratio < 1.0:
        raise ConfigError(f"--resize-ratio must be >= 1 (the short side is never below the crop), got {cfg.resize_ratio}")
    frame_size = parse_frame_size(cfg.resize_to)
    if frame_size is not None and cfg.resize_ratio != 1.0:
        raise ConfigError(f"--resize-to {cfg.resize_to} and --resize-ratio {cfg.resize_ratio:g} both say how to resize: "
                          "give one")
    protocol = protocol_record(cfg.protocol, asdict(cfg))  # an unknown name is refused here
    arch = resolve_model_name(cfg.model)
    info = BackboneInfo.from_config(model_config(cfg.model))
    layers = parse_layers(cfg.layers, info.depth)
    if frame_size is not None and min(frame_size) < info.image_size:
        raise ConfigError(f"--resize-to {cfg.resize_to}: frames of {frame_size[0]}x{frame_size[1]} are smaller than "
                          f"the model's {info.image_size} px input")
    if (cfg.patch and not layers):
        raise ConfigError("--patch needs tapped layers (--layers)")
    text_sets = cfg.text_sets()
    views = {s: parse_views(cfg.train_views if s == "train" else cfg.views) for s in dataset.splits}
    bank = _view_bank(cfg)
    if bank and "train" in views:
        views["train"] = (bank["views"], 1)  # K random clips, one random crop each
    if cfg.pretrained and os.sep in cfg.pretrained and not os.path.isfile(cfg.pretrained):
        raise ConfigError(f"checkpoint not found: {cfg.pretrained}")
    wid = weights_id(cfg.pretrained, cfg.init_seed)
    ident = clip_identity(cfg.model, cfg.pretrained, cfg.activation)  # refuses weights whose activation is unknown

    feat = "int8" if cfg.dtype == "int8" else "float16"
    T, L, D, P, S_img = cfg.frames, len(layers), info.width, info.num_patches, info.image_size
    split_arrays: dict[str, list[ArraySpec]] = {}
    bytes_per_video: dict[str, int] = {}
    for split, (C, S) in views.items():
        V = C * S
        arrays = [ArraySpec("frame_emb", (V, T, info.embed_dim), "float16")]
        if L:
            arrays.append(ArraySpec("cls", (V, T, L, D), feat))
        if cfg.patch:
            arrays.append(ArraySpec("patch", (V, T, L, P, D), feat, layer_axis=2))
        if cfg.store_frames:
            arrays.append(ArraySpec("frames", (V, T, S_img, S_img, 3), "uint8"))
        if bank and split == "train":
            arrays.append(ArraySpec("view_params", (V, len(view_param_columns(cfg.aug_views(), T)) - 1 + T),
                                    "float32"))
        split_arrays[split] = arrays
        bytes_per_video[split] = sum(a.nbytes() for a in arrays)
    if cfg.shard_size > 0:
        shard_size = cfg.shard_size
    else:
        largest = max(max(a.nbytes() for a in arrs) for arrs in split_arrays.values())
        shard_size = int(max(1, min(256, (64 << 20) // max(largest, 1))))

    video_root = str(dataset.video_root)
    content = key_content(dataset, preprocess_version=PREPROCESS_VERSION, model=arch, weights=wid, clip=ident,
                          layers=layers, patch=cfg.patch, frames_stored=cfg.store_frames, frames=T,
                          sampling=cfg.sampling, stride=cfg.stride, views=views, image_size=S_img, dtype=cfg.dtype,
                          text_sets=text_sets, view_bank=bank,
                          resize_short_side=resize_side(S_img, cfg.resize_ratio) if cfg.resize_ratio != 1.0 else None,
                          layout=layout_key(cfg.sampling, [v for s, v in views.items() if not (bank and s == "train")]),
                          resize_to=frame_size)
    key = content.key()
    if out:
        path = Path(out)
    else:
        root = Path(cache_root) if cache_root else default_cache_root()
        path = root / f"{dataset.name}-{cfg.model.replace('/', '_')}-{key[:10]}"
    meta = CacheMeta(
        key=key,
        content=content,
        # resize_to left out while unused: the metadata of every other cache stays as it was
        config=ExtractRecord.from_dict({k: v for k, v in asdict(cfg).items() if k != "resize_to" or v}),
        dataset=DatasetMeta(name=dataset.name, video_root=video_root, sources=dict(getattr(dataset, "sources", {})),
                            args=dict(getattr(dataset, "args", {})), classes=list(dataset.classes),
                            flip_swaps=bool(getattr(dataset, "flip_swaps", False))),
        backbone=BackboneMeta(arch=arch, pretrained=cfg.pretrained, weights=wid, **asdict(info),
                              num_patches=info.num_patches, **ident),
        dims=Dims(num_classes=len(dataset.classes), embed_dim=info.embed_dim, width=info.width, frames=T,
                  num_patches=P, depth=info.depth, backbone_heads=info.backbone_heads, image_size=S_img,
                  patch_size=info.patch_size),
        layers=list(layers),
        views={s: ViewCount(clips=v[0], crops=v[1]) for s, v in views.items()},
        view_bank=ViewBank(**bank, split="train", param_columns=view_param_columns(cfg.aug_views(), T),
                           **({"heads": paper_pipeline(cfg.aug_heads)[0],
                               "description": cfg.aug_views().describe()} if cfg.aug_recipe == "paper" else {}))
        if bank else None,
        dtype=cfg.dtype,
        int8_outliers=4,
        text_sets=text_sets,
        versions=_versions(),
        resize_short_side=resize_side(S_img, cfg.resize_ratio),
        resize_to=list(frame_size) if frame_size else None,
        protocol=ProtocolRecord(**protocol) if protocol else None,
    )
    _check_writable(path.parent)
    marker_root = Path(cache_root) if cache_root else keyed_root(path, key)  # an --out folder of the user's: None
    return ExtractPlan(cfg, dataset, arch, info, layers, key, path, meta, split_arrays, shard_size, bytes_per_video,
                       marker_root)


def _view_bank(cfg: ExtractCfg) -> dict | None:
    """What the view bank draws (part of the cache key), or None when --train-aug is not given."""
    if cfg.train_aug is None:
        return None
    if isinstance(cfg.train_aug, bool) or not isinstance(cfg.train_aug, int) or cfg.train_aug < 1:
        raise ConfigError(f"--train-aug must be a number of views of at least 1, got {cfg.train_aug!r}")
    if cfg.train_views != "1x1":
        raise ConfigError(f"--train-aug draws its own clips and crops; leave --train-views at 1x1 "
                          f"(got {cfg.train_views})")
    if not 0 < cfg.aug_area <= 1:
        raise ConfigError(f"--aug-area must be in (0, 1], got {cfg.aug_area}")
    if cfg.aug_recipe not in ("light", "paper"):
        raise ConfigError(f"--aug-recipe must be one of paper, light, got '{cfg.aug_recipe}'")
    aug = cfg.aug_views()
    bank = {"views": cfg.train_aug, "seed": int(cfg.aug_seed), "area": list(aug.area), "ratio": list(aug.ratio),
            "flip": aug.flip}
    if cfg.aug_recipe == "paper":  # the light bank's key stays what it always was
        bank.update(recipe="paper", pipeline=aug.key())
    return bank


def _check_writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise CacheError(f"output location {folder} is not writable")


def _versions() -> dict:
    import open_clip
    import zarr

    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "zarr": zarr.__version__,
            "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- decoding workers
def source_info(path: str, content_hash: bool = False) -> dict:
    """What identifies the version of a source video: size and mtime_ns (and its sha256 when
    asked); {} when it cannot be read (a missing file). A frame folder: its listing's."""
    try:
        st = os.stat(path)
        if os.path.isdir(path):
            files = sorted(os.scandir(path), key=lambda e: e.name)
            stats = [e.stat() for e in files if e.is_file()]
            info = {"size": sum(x.st_size for x in stats), "mtime_ns": max([st.st_mtime_ns] + [x.st_mtime_ns for x in stats])}
            if content_hash:
                h = hashlib.sha256()
                for e in files:
                    if e.is_file():
                        h.update(e.name.encode() + b"\0" + _file_sha256(e.path).encode())
                info["sha256"] = h.hexdigest()
            return info
        info = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if content_hash:
            info["sha256"] = _file_sha256(path)
        return info
    except OSError:
        return {}


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            h.update(block)
    return h.hexdigest()


class _DecodeJobs(Dataset):
    """Item i -> (split, index, views uint8 (V, T, S, S, 3) | None, failure reason | None, the video's
    record: source size / mtime_ns (sha256), and for a decoded video the decoder and its warnings;
    with "view_params" (V, P) in a view bank's split).

    ``banks[split] = (seed, AugViewCfg or TrainPipeline)``: that split's V views are random clips,
    each augmented as the light recipe (random resized crop, flip) or a head's paper train pipeline
    says, drawn from view_rngs(seed, split, index)."""

    def __init__(self, jobs: list[tuple[str, int, str, int | None]], sampling: dict[str, SamplingCfg], size: int,
                 resize: int | None = None, hash_sources: bool = False,
                 banks: dict[str, tuple[int, object]] | None = None, frame_size: tuple[int, int] | None = None):
        self.jobs, self.sampling, self.size, self.resize = jobs, sampling, size, resize
        self.frame_size = frame_size  # (H, W): fixed-view frames resized to exactly this (SSv2 tests)
        self.hash_sources, self.banks = hash_sources, banks or {}

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        split, index, path, num_frames = self.jobs[i]
        samp = self.sampling[split]
        info = source_info(path, self.hash_sources)  # before decoding: the version that was read
        try:
            if split in self.banks:
                seed, aug = self.banks[split]
                temporal, spatial = view_rngs(seed, split, index)
                out = decode_video(path, samp, num_frames, rng=temporal)
                views, params = augmented_views(out, self.size, aug, spatial)
                info.update(decoder=out.decoder, warnings=list(out.warnings), view_params=params)
                return split, index, views, None, info
            out = decode_video(path, samp, num_frames)
            info.update(decoder=out.decoder, warnings=list(out.warnings))
            return split, index, make_views(out.clips, self.size, samp.crops, self.resize, self.frame_size), None, info
        except Exception as exc:  # the run goes on; a decoder crash on one file must not stop it
            return split, index, None, decode_failure_reason(exc), info


def _first(batch):
    return batch[0]


# ----------------------------------------------------------------------------- shard buffers
class _ShardBuffer:
    def __init__(self, store: FeatureStore, split: str, shard: int):
        self.split, self.shard = split, shard
        self.start, self.stop = store.shard_range(split, shard)
        n = self.stop - self.start
        self.arrays = {}
        for name, spec in store.specs(split).items():
            fill = 0 if spec.dtype == "uint8" else np.nan
            # fp16 in memory: what the store keeps (int8 is quantised from it per token)
            dtype = np.uint8 if spec.dtype == "uint8" else np.float32 if spec.dtype == "float32" else np.float16
            self.arrays[name] = np.full((n, *spec.shape), fill, dtype=dtype)
        self.status = np.zeros(n, dtype=np.int8)
        self.failures: list[dict] = []
        self.videos: list[dict] = []  # per video: index, path, source size / mtime_ns (sha256)
        self.remaining = n

    def put(self, index: int, outputs: dict[str, np.ndarray] | None, reason: str | None, path: str,
            info: dict | None = None) -> None:
        j = index - self.start
        self.videos.append({"index": index, "path": path, **(info or {})})
        if outputs is None:
            self.status[j] = FAILED
            self.failures.append({"index": index, "path": path, "reason": reason})
        else:
            for name, value in outputs.items():
                self.arrays[name][j] = value
            self.status[j] = DONE
        self.remaining -= 1


# ----------------------------------------------------------------------------- the run
@dataclass
class ExtractResult:
    path: Path
    reused: bool
    videos: int = 0
    frames: int = 0
    failed: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0       # wall time of the decode + encode + write phase
    encoder_seconds: float = 0.0      # of which the encoder ran (GPU: synchronised)
    # where the rest of the encode phase went (main thread unless noted; bench/bench_extract.py)
    loader_wait_seconds: float = 0.0  # waiting for the next decoded video (worker start-up included)
    prepare_seconds: float = 0.0      # a batch's uint8 frames gathered, copied to the device, normalised
    output_seconds: float = 0.0       # encoder outputs to fp16 numpy, split per video into shard buffers
    write_wait_seconds: float = 0.0   # waiting for the writer thread (2 shards in flight at most; the end)
    writer_seconds: float = 0.0       # the writer thread's shard writes (int8: quantisation included)
    encoder_cpu_seconds: float = 0.0  # process CPU seconds while the encoder ran (all its threads)
    cpu_seconds: float = 0.0          # process CPU seconds of the encode phase (main, writer, w=0 decode)
    worker_cpu_seconds: float = 0.0   # CPU seconds of the decode worker processes
    device: str = "cpu"
    workers: int = 0
    threads: int = 0                  # torch threads the encoder ran with
    summary: dict = field(default_factory=dict)

    @property
    def encoder_busy(self) -> float:
        """Encoder utilisation: time in the encoder / wall time of the encode phase."""
        return self.encoder_seconds / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def waiting_hint(self) -> str:
        """One line when a GPU encoder sat waiting for decoded videos; '' otherwise. (On CPU the
        decode workers and the encoder share the cores, so a low figure there is not a hint.)"""
        if not self.device.startswith("cuda") or self.videos < 32 or self.encoder_busy >= 0.8:
            return ""
        return (f"the GPU encoder was busy {100 * self.encoder_busy:.0f}% of the time with {self.workers} decode "
                "worker(s): decoding is the bottleneck; give it more --workers (up to one per free core)")


def _device(name: str) -> str:
    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return name


def torchrun_shard() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) when launched by torchrun (or any launcher that sets both), else (0, 1)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world >= 1 and 0 <= rank < world:
            return rank, world
        raise ConfigError(f"RANK={rank} / WORLD_SIZE={world} from the environment: need 0 <= RANK < WORLD_SIZE")
    return 0, 1


def _auto_workers(cuda: bool = False) -> int:
    """Decode workers when --workers is not given. CPU: half the cores (at most 8), the rest
    encode (bench_extract.py). GPU: every core of this rank's share of the node but one (the
    main process feeds the GPU); decoding, not the encoder, is what a GPU waits for."""
    cores = os.cpu_count() or 2
    if cuda:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(1, cores // max(1, local) - 1)
    return max(1, min(8, cores // 2))


def _init_store(plan: ExtractPlan, model, frozen: FrozenCLIP, device: str):
    """What is written into the store folder before it is renamed into place."""
    import open_clip

    def init(folder: Path) -> None:
        st = FeatureStore(folder)
        sets = plan.meta.text_sets
        if sets:
            tok = open_clip.get_tokenizer(plan.arch)
            model.to(device)
            for name, arr in compute_text_sets(sets, model, tok, list(plan.dataset.classes), device).items():
                if not np.isfinite(arr).all():  # the text tower is broken: nothing is cached (a temporary folder)
                    raise ModelError(f"model {plan.arch} ({plan.cfg.pretrained or 'random init'}) gives NaN/inf "
                                     f"text embeddings for text set '{name}': the model is broken; check the "
                                     "checkpoint (--pretrained)")
                st.write_text(name, arr)
        for block in plan.layers:
            for pname, tensor in frozen.block_weights(block).items():
                st.write_aux(f"block{block}.{pname}", tensor.detach().float().cpu().numpy())

    return init


class SourcesChangedError(CacheError):
    """Source videos changed (or appeared) since their shards were extracted."""


MAX_LISTED = 20  # changed sources named one per line in the refusal


def changed_sources(store: FeatureStore, items: dict[str, list], content_hash: bool = False) -> list[tuple]:
    """(split, index, path, why) of every video of a committed shard whose source now differs
    from the version extracted (size or mtime_ns; the sha256 decides when one was recorded),
    or which was missing when extracted and exists now. A source deleted since is not a change
    (a cache outlives its videos)."""
    out = []
    for split in store.splits:
        for rec in store.records(split).values():
            for v in rec.get("videos", []):
                i = v.get("index")
                if not isinstance(i, int) or not 0 <= i < len(items.get(split, [])):
                    continue
                path = items[split][i].path
                if "size" not in v:
                    if os.path.exists(path):
                        out.append((split, i, path, "was missing when extracted, exists now"))
                    continue
                now = source_info(path)
                if not now or (now["size"], now["mtime_ns"]) == (v["size"], v["mtime_ns"]):
                    continue
                if "sha256" in v and source_info(path, True).get("sha256") == v["sha256"]:
                    continue  # touched or copied, same content
                why = f"size {v['size']} -> {now['size']}" if now["size"] != v["size"] else "modified since extracted"
                out.append((split, i, path, why))
    return out


def _shards_to_redo(store: FeatureStore, plan: ExtractPlan, refresh: bool, retry_failed: bool) -> dict[str, set]:
    """Committed shards to redo for changed sources (refused without ``refresh``) and, with
    ``retry_failed``, for failed videos."""
    redo: dict[str, set] = {}
    changed = changed_sources(store, plan.dataset.splits, plan.cfg.hash_sources)
    if retry_failed:  # a failed video is retried whatever its source did
        status = {s: store.status(s) for s in store.splits}
        changed = [c for c in changed if status[c[0]][c[1]] != FAILED]
    if changed and not refresh:
        lines = [f"  {s}[{i}] {p}: {why}" for s, i, p, why in changed[:MAX_LISTED]]
        if len(changed) > MAX_LISTED:
            lines.append(f"  ... and {len(changed) - MAX_LISTED} more")
        raise SourcesChangedError(f"{len(changed)} source video(s) changed since cache {plan.path} was extracted; "
                                  "rerun with --refresh to redo the shards that hold them:\n" + "\n".join(lines))
    for s, i, _, _ in changed:
        redo.setdefault(s, set()).add(i // store.shard_size)
    if retry_failed:
        for s in store.splits:
            st = store.status(s)
            for k in range(store.num_shards(s)):
                if (st[slice(*store.shard_range(s, k))] == FAILED).any():
                    redo.setdefault(s, set()).add(k)
    return redo


def run_extraction(plan: ExtractPlan, shard: tuple[int, int] | None = None, progress: bool = True,
                   log=print, refresh: bool = False, retry_failed: bool = False, finite: bool = False) -> ExtractResult:
    """Run (or resume, or reuse, or repair) the extraction described by ``plan``.

    ``shard=(i, n)``: this process takes the i-th of n shard ranges; None: torchrun's
    (RANK, WORLD_SIZE) when set, else everything. An existing cache is verified first: damaged
    files it was built with are rebuilt, damaged shards redone, then it is verified again.
    Sources changed since extraction are refused unless ``refresh`` (their shards are redone);
    ``retry_failed`` redoes the shards that hold failed videos. ``finite``: the verification also
    reads every done video and redoes the shards of those holding NaN/inf (what `cache verify`
    checks; `cache repair` asks for it, a plain rerun trusts the checksums).
    """
    cfg = plan.cfg
    if shard is None:
        shard = torchrun_shard()
    t_start = time.perf_counter()
    if plan.path.is_dir() and not any(plan.path.iterdir()):
        plan.path.rmdir()  # an empty --out folder made by the user: the cache goes there
    problems, redo = [], {}
    if plan.path.exists():
        store = open_store(plan.path)
        if store.key != plan.key:
            raise CacheError(f"{plan.path} already holds a different cache (key {store.key}); "
                             "choose another --out or remove it")
        problems = store.verify(finite=finite)
        redo = _shards_to_redo(store, plan, refresh, retry_failed)
        if not problems and not redo and store.is_complete():
            log(f"reusing cache {plan.path} (key {plan.key}): complete and verified, nothing to do")
            mark_latest(plan.path, plan.dataset.name, plan.cache_root)
            return ExtractResult(plan.path, reused=True, summary=store.summary())
    check_free_space(plan)
    device = _device(cfg.device)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)
    model = load_clip(cfg.model, cfg.pretrained or None, device="cpu", seed=cfg.init_seed, activation=cfg.activation)
    frozen = FrozenCLIP(model, plan.layers, cfg.patch, plan.info, device=device)
    _probe(frozen, plan)  # a model that makes NaN of a plain frame stops here, before anything is cached
    plan.meta.preprocess = Preprocess(mean=list(frozen.mean), std=list(frozen.std), image_size=plan.info.image_size)
    splits = {s: {"items": [(it.path, it.label) for it in plan.dataset.splits[s]], "arrays": arrs,
                  "num_frames": [it.num_frames for it in plan.dataset.splits[s]]}
              for s, arrs in plan.split_arrays.items()}
    init = _init_store(plan, model, frozen, device)
    store = create_store(plan.path, plan.meta.to_dict(), splits, plan.shard_size, init=init)
    static = [p for p in problems if p.shard is None]
    if static:
        log(f"repairing {plan.path}: " + "; ".join(static[:5]) + (" ..." if len(static) > 5 else ""))
        fixed = repair_static(plan.path, splits, store.shard_size, plan.meta.to_dict(), init)
        log(f"restored {len(fixed)} file(s): {', '.join(fixed[:10])}{' ...' if len(fixed) > 10 else ''}")
        store = open_store(plan.path)
    del model.transformer  # the text tower is no longer needed
    # This process's shards: a fixed contiguous range of the full shard list, so ranges stay
    # disjoint across ranks and across reruns; then only those still pending.
    rank, world = shard
    all_shards = [(s, k) for s in store.splits for k in range(store.num_shards(s))]
    lo, hi = (len(all_shards) * rank) // world, (len(all_shards) * (rank + 1)) // world
    mine = set(all_shards[lo:hi])
    bad: dict[str, set] = {s: set(ks) for s, ks in redo.items()}
    for p in problems:
        if p.shard is not None:
            bad.setdefault(p.split, set()).add(p.shard)
    for s, ks in bad.items():
        ks = sorted(k for k in ks if (s, k) in mine)
        if ks:
            why = [p for p in problems if p.split == s and p.shard in ks]
            log(f"redoing {len(ks)} shard(s) of '{s}' ({', '.join(map(str, ks[:20]))}"
                f"{' ...' if len(ks) > 20 else ''})" + (f": {why[0]}" + (" ..." if len(why) > 1 else "") if why else ""))
            store.reset_shards(s, ks)
    todo = [(s, k) for s in store.splits for k in store.pending_shards(s) if (s, k) in mine]
    done_before = len(mine) - len(todo)
    if done_before:
        log(f"resuming {plan.path}: {done_before} shard(s) already done, {len(todo)} to go")
    items = {s: plan.dataset.splits[s] for s in store.splits}
    jobs = []
    for s, k in todo:
        a, b = store.shard_range(s, k)
        jobs.extend((s, i, items[s][i].path, items[s][i].num_frames) for i in range(a, b))
    sampling = {}
    for s in store.splits:
        v = plan.meta.views[s]
        sampling[s] = SamplingCfg(cfg.frames, cfg.sampling, cfg.stride, v.clips, v.crops)
    bank = plan.meta.view_bank
    banks = {bank.split: (bank.seed, cfg.aug_views())} if bank and bank.split in store.splits else {}
    result = ExtractResult(plan.path, reused=False)
    if jobs:
        encode_jobs(store, plan, frozen, jobs, sampling, items, device, progress, result, log, banks)
    result.seconds = time.perf_counter() - t_start
    if problems or redo:
        left = [p for p in store.verify(finite=finite) if p.shard is None or (p.split, p.shard) in mine]
        if left:
            raise CacheError(f"cache {plan.path} still fails verification after repair: {left[0]}"
                             + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
                             + f"; remove {plan.path} and extract again")
    if store.is_complete():
        result.summary = store.write_summary()
        mark_latest(plan.path, plan.dataset.name, plan.cache_root)
    else:
        result.summary = store.summary()
    return result


def encode_jobs(store, plan, frozen, jobs, sampling, items, device, progress, result, log=print,
                 banks=None) -> None:
    from stages.progress import progress_bar

    cfg = plan.cfg
    workers = cfg.workers if cfg.workers >= 0 else _auto_workers(device.startswith("cuda"))
    result.device, result.workers = device, workers
    where = f"{workers} worker process{'es' if workers > 1 else ''}" if workers else "the main process"
    log(f"encoding {len(jobs)} video(s) on {device} ({cfg.batch_frames} frames per encoder call); decoding in "
        f"{where}: decord where its random access is exact for the file, PyAV otherwise (`cache info` says "
        "which read each video)")
    cpu0, threads0 = (time.process_time(), _children_cpu()), torch.get_num_threads()
    if not device.startswith("cuda"):
        # On CPU the decode workers and the writer share the cores with the encoder; measured on
        # 2 cores (bench/bench_extract.py), an encoder with every core's thread lost 1.6-2x CPU
        # per frame to contention, so leave the workers their cores; and never more threads than
        # this process was given (torch.set_num_threads, OMP_NUM_THREADS): restored at the end.
        torch.set_num_threads(max(1, min(threads0, (os.cpu_count() or 1) - workers)))
    result.threads = torch.get_num_threads()
    resize = resize_side(plan.info.image_size, plan.cfg.resize_ratio)
    loader = DataLoader(_DecodeJobs(jobs, sampling, plan.info.image_size, resize, cfg.hash_sources, banks,
                                    parse_frame_size(plan.cfg.resize_to)),
                        batch_size=1, shuffle=False, num_workers=workers, collate_fn=_first,
                        prefetch_factor=4 if workers else None,
                        persistent_workers=False)
    # a shard's buffer is made when its first video arrives and handed to the writer when its last
    # does; jobs come in shard order, so only the shard being filled (and the ones waiting for
    # the disk) are held in memory, never the whole cache
    buffers: dict[tuple[str, int], _ShardBuffer] = {}
    keeps_frames = {s for s in store.splits if "frames" in store.specs(s)}
    writer = ThreadPoolExecutor(max_workers=1)
    pending_writes: list[Future] = []
    bar = progress_bar(total=len(jobs), desc=f"extract {plan.dataset.name}", unit="video", enabled=progress)
    t0 = time.perf_counter()
    queue: list[tuple[str, int, np.ndarray, dict]] = []
    params: dict[tuple[str, int], np.ndarray] = {}  # view bank parameters of videos waiting in the queue
    queued_frames = 0
    staging = [None] if device.startswith("cuda") else None  # pinned uint8 frames, grown on demand

    def shard_of(split: str, index: int) -> tuple[str, int]:
        return split, index // store.shard_size

    def finish(split: str, index: int, outputs, reason, info=None) -> None:
        key = shard_of(split, index)
        buf = buffers.get(key)
        if buf is None:
            buf = buffers[key] = _ShardBuffer(store, *key)
        buf.put(index, outputs, reason, items[split][index].path, info)
        if reason is not None:
            result.failed += 1
        else:
            result.videos += 1
        bar.update(1)
        if buf.remaining == 0:
            del buffers[key]
            tw = time.perf_counter()
            while len(pending_writes) >= 2:  # bound memory held by shards waiting for the disk
                pending_writes.pop(0).result()
            result.write_wait_seconds += time.perf_counter() - tw
            pending_writes.append(writer.submit(timed_write, buf.split, buf.shard, buf.arrays,
                                                buf.status, buf.failures, sorted(buf.videos, key=lambda v: v["index"])))

    def timed_write(*args) -> None:
        tw = time.perf_counter()
        store.write_shard(*args)
        result.writer_seconds += time.perf_counter() - tw

    def flush() -> None:
        nonlocal queue, queued_frames
        if not queue:
            return
        tp = time.perf_counter()
        parts = [torch.from_numpy(v).reshape(-1, *v.shape[2:]) for _, _, v, _ in queue]  # (F_i, S, S, 3) uint8
        if staging is None:
            x = torch.cat(parts)
        else:  # GPU: gather into page-locked memory so the copy runs by DMA, without a bounce buffer
            n = sum(p.shape[0] for p in parts)
            if staging[0] is None or staging[0].shape[0] < n:
                staging[0] = torch.empty((max(n, cfg.batch_frames), *parts[0].shape[1:]), dtype=torch.uint8,
                                         pin_memory=True)
            x = torch.cat(parts, out=staging[0][:n])  # reused next call: the encoder below syncs first
        x = normalize(x.to(device, non_blocking=True), frozen.mean, frozen.std)  # (F, 3, S, S), uint8 on the bus
        te, ce = time.perf_counter(), time.process_time()
        result.prepare_seconds += te - tp
        outs = frozen(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        to = time.perf_counter()
        result.encoder_seconds += to - te
        result.encoder_cpu_seconds += time.process_time() - ce
        ww = result.write_wait_seconds
        half = {k: v.half() for k, v in outs.items()}  # fp16 is what the shard holds: half the copy
        bad = _non_finite_frames(half)  # NaN/inf from the model, or beyond fp16's range
        reasons = _non_finite_reasons(outs, half, bad) if bad.any() else None
        outs = {k: v.cpu().numpy() for k, v in half.items()}
        pos = 0
        for split, index, views, info in queue:
            V, T = views.shape[:2]
            n = V * T
            vp = params.pop((split, index), None)
            result.frames += n
            if reasons is not None and bad[pos:pos + n].any():  # never cached as done: the video failed, said why
                finish(split, index, None, _video_reason(reasons, pos, n), info)
                pos += n
                continue
            per = {k: v[pos:pos + n].reshape(V, T, *v.shape[1:]) for k, v in outs.items()}  # (V, T, ...)
            if split in keeps_frames:
                per["frames"] = views
            if vp is not None:
                per["view_params"] = vp
            finish(split, index, per, None, info)
            pos += n
        queue, queued_frames = [], 0
        result.output_seconds += time.perf_counter() - to - (result.write_wait_seconds - ww)  # finish() may wait

    def show_rates(refresh: bool = False) -> None:
        """Videos/s and frames/s as they are encoded (frames count once the encoder returned them)."""
        elapsed = max(time.perf_counter() - t0, 1e-9)
        fps = f"{result.frames / elapsed:.0f} f/s" if result.frames else "first encoder batch pending"
        bar.set_postfix_str(f"{(result.videos + result.failed) / elapsed:.1f} v/s, {fps}, failed {result.failed}",
                            refresh=refresh)

    tl = time.perf_counter()
    batches = iter(loader)
    try:
        for split, index, views, reason, info in batches:
            result.loader_wait_seconds += time.perf_counter() - tl
            if info is not None and "view_params" in info:
                params[(split, index)] = info.pop("view_params")
            if views is None:
                finish(split, index, None, reason, info)
            else:
                queue.append((split, index, views, info))
                queued_frames += views.shape[0] * views.shape[1]
                if queued_frames >= cfg.batch_frames:
                    flush()
            show_rates()
            tl = time.perf_counter()
        flush()
        show_rates(refresh=True)
        tw = time.perf_counter()
        for fut in pending_writes:
            fut.result()
        result.write_wait_seconds += time.perf_counter() - tw
        result.encode_seconds = time.perf_counter() - t0
    finally:
        # A stop (Interrupted, an error) lands here too: shut the decode workers down now (the
        # traceback would otherwise keep the iterator and its workers alive), then let the writer
        # finish the shards it was handed; a shard is committed by its status chunk alone, so one
        # cut short is simply pending for the rerun.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del batches
        bar.close()
        writer.shutdown(wait=True)
        torch.set_num_threads(threads0)
        result.cpu_seconds = time.process_time() - cpu0[0]
        result.worker_cpu_seconds = _children_cpu() - cpu0[1]  # the workers were joined above


def _probe(frozen: FrozenCLIP, plan: ExtractPlan) -> None:
    """One plain mid-grey frame through the frozen model: NaN/inf in what it gives means the model
    itself is broken (finite weights that overflow inside), not one video: a ModelError, before
    any cache exists. (Beyond fp16's range but finite is per video: those videos fail.)"""
    S = plan.info.image_size
    x = normalize(torch.full((1, S, S, 3), 128, dtype=torch.uint8).to(frozen.device), frozen.mean, frozen.std)
    outs = frozen(x)
    bad = [k for k, v in outs.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelError(f"model {plan.arch} ({plan.cfg.pretrained or 'random init'}) gives NaN/inf features "
                         f"({', '.join(bad)}) for a plain grey frame: the model is broken (weights that overflow "
                         "inside it); nothing was cached: check the checkpoint (--pretrained)")


def _non_finite_frames(half: dict[str, torch.Tensor]) -> np.ndarray:
    """Per frame (rows of the encoder's outputs, already fp16): True where any output holds
    NaN/inf; fp32 values beyond fp16's range became inf in the cast, so this also finds what fp16
    cannot hold. On a GPU one reduction per output beside the encoder; on CPU by the exponent bits
    (cache.quant.finite_rows: 10x faster than torch's fp16 isfinite there)."""
    bad = None
    for v in half.values():
        if v.is_cuda:
            b = (~torch.isfinite(v).flatten(1).all(dim=1)).cpu().numpy()
        else:
            b = ~finite_rows(v.numpy())
        bad = b if bad is None else bad | b
    return bad


def _non_finite_reasons(outs: dict[str, torch.Tensor], half: dict[str, torch.Tensor], bad: np.ndarray) -> list[str]:
    """Per frame of a batch with non-finite outputs, why ("" for a sound frame): NaN/inf from the
    model itself, else values that fp16 cannot hold. The rare path: costs nothing otherwise."""
    nan_in: list[list[str]] = [[] for _ in bad]
    over_in: list[list[str]] = [[] for _ in bad]
    peak = np.zeros(len(bad))
    for k, v in outs.items():
        src = (~torch.isfinite(v).flatten(1).all(dim=1)).cpu().numpy()
        over = (~torch.isfinite(half[k]).flatten(1).all(dim=1)).cpu().numpy() & ~src
        for i in np.flatnonzero(src):
            nan_in[i].append(k)
        if over.any():
            peak = np.maximum(peak, np.where(over, v.float().abs().flatten(1).amax(dim=1).cpu().numpy(), 0))
            for i in np.flatnonzero(over):
                over_in[i].append(k)
    out = []
    for i in range(len(bad)):
        if nan_in[i]:
            out.append(f"features not finite (NaN/inf) from the model in {', '.join(nan_in[i])}: check the "
                       "checkpoint (--pretrained)")
        elif over_in[i]:
            out.append(f"features overflow fp16 in {', '.join(over_in[i])} (|x| up to {peak[i]:.3g}, fp16 holds "
                       f"{FP16_MAX:g}); the cache holds fp16 (int8 is quantised from fp16) and has no wider "
                       "--dtype: check the checkpoint (--pretrained), its outputs are out of range")
        else:
            out.append("")
    return out


def _video_reason(reasons: list[str], pos: int, n: int) -> str:
    """One video's failure: the first frame's reason and how many of its frames had one."""
    rows = [r for r in reasons[pos:pos + n] if r]
    return rows[0] + (f" ({len(rows)} of {n} frames)" if n > 1 else "")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def free_bytes(path: Path) -> int:
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def pending_bytes(plan: ExtractPlan) -> int:
    """Bytes the extraction still has to write: every video of a new cache, the pending videos of
    a partly done one."""
    if not plan.path.exists():
        return plan.total_bytes()
    store = open_store(plan.path)
    return sum(plan.bytes_per_video[s] * store.counts(s)["pending"] for s in store.splits if s in plan.bytes_per_video)


def check_free_space(plan: ExtractPlan) -> None:
    """Refuse, before anything is written, an extraction the disk cannot hold (the --dry-run estimate)."""
    need, free = pending_bytes(plan), free_bytes(plan.path.parent)
    if need > free:
        raise RunFailedError(f"not enough disk space for {plan.path}: {human_bytes(need)} needed, {human_bytes(free)} "
                             f"free on {plan.path.parent}; free some space or choose another --out / --cache-root")


def failure_verdict(summary: dict, max_failed: float = 1.0) -> str:
    """'' when a run's failures are acceptable, else the one line saying why it failed: every
    video failed, or more than ``max_failed`` (a fraction) of the finished ones."""
    done = sum(c["done"] for c in summary.get("splits", {}).values())
    failed = sum(c["failed"] for c in summary.get("splits", {}).values())
    if not failed:
        return ""
    if not done:
        return f"every video failed ({failed}); see the reasons above (`pipeline cache info` lists them)"
    if failed / (done + failed) > max_failed:
        return (f"{failed} of {done + failed} videos failed ({100 * failed / (done + failed):.1f}%, more than "
                f"--max-failed {max_failed:g}); see the reasons above")
    return ""


def describe_plan(plan: ExtractPlan) -> list[str]:
    """Lines for --dry-run: what will be extracted and what it will take."""
    lines = [f"cache  {plan.path}  (key {plan.key})",
             f"model  {plan.arch}  weights {plan.meta.backbone.weights[:40]}  "
             f"activation {plan.meta.backbone.activation}  "
             f"layers {list(plan.layers) or 'none'}  dtype {plan.cfg.dtype}"]
    for split, arrays in plan.split_arrays.items():
        n = len(plan.dataset.splits[split])
        parts = ", ".join(f"{a.name}{list(a.shape)} {human_bytes(a.nbytes())}" for a in arrays)
        lines.append(f"{split:<6} {n} videos x {human_bytes(plan.bytes_per_video[split])}/video  [{parts}]")
    bank = plan.meta.view_bank
    if bank and bank.split in plan.split_arrays:
        split, K = bank.split, bank.views
        n = len(plan.dataset.splits[split])
        # per video: K views of every array but the parameters, which one plain view does not have
        one = sum(a.nbytes() // K for a in plan.split_arrays[split] if a.name != "view_params")
        bank_bytes = plan.bytes_per_video[split] * n
        lines.append(f"views  {split}: a bank of {K} augmented view(s) per video (seed {bank.seed}, "
                     f"{bank.describe()}): {human_bytes(bank_bytes)}, {human_bytes(bank_bytes - one * n)} more than "
                     "one view")
    total = plan.total_bytes()
    free = free_bytes(plan.path.parent)
    lines.append(f"total  {human_bytes(total)} needed, {human_bytes(free)} free on {plan.path.parent}"
                 + ("" if total < free else "  NOT ENOUGH SPACE"))
    return lines
