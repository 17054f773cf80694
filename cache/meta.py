"""The cache's metadata as types: the seam between stage one, which records it, and the
stages that read it.

A cache's zarr.json (attrs["clipcache"]) and a WebDataset export's header ("meta") hold
``CacheMeta.to_dict()``; ``CacheMeta.from_dict`` reads it back as nested dataclasses (dims,
the extraction request, dataset, backbone identity, views, view bank, protocol, preprocessing,
the store's layout). Caches written before a field existed still open: a missing optional field
reads as its default and ``to_dict`` leaves it out again, and keys this version does not know are
kept in ``extra``, so ``from_dict`` -> ``to_dict`` gives back exactly the dict it was given.

The cache key is a digest of ``KeyContent``: what decides the bytes of a cache (dataset lists,
weights, layers, sampling, views, dtype, ...), never how fast or where it was made.

``extract_command(meta)`` turns the metadata back into the command that makes the cache again,
shared by `cache info` ("made by"), the hints stage two prints when a cache lacks what a head
needs, and `cache repair`: it names the data paths the cache was built from, so it runs as printed.
No torch here.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shlex
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Sequence

from cache.datasets import DatasetSpec
from cache.errors import CacheError
from cache.flips import SWAPPING_BEFORE_RECORDED, label_swaps

__all__ = [
    "FORMAT_VERSION",
    "SCHEMA_VERSION",
    "StoreMeta",
    "SplitMeta",
    "CacheMeta",
    "KeyContent",
    "SamplingRecord",
    "ExtractRecord",
    "DatasetMeta",
    "BackboneMeta",
    "Dims",
    "ViewCount",
    "ViewBank",
    "LIGHT_VIEW_PARAM_COLUMNS",
    "ProtocolRecord",
    "Preprocess",
    "key_content",
    "extract_command",
]

FORMAT_VERSION = 1   # the store's layout (cache/store.py); part of the cache key
SCHEMA_VERSION = 1   # this metadata schema; a cache that records a newer one is refused, not misread


# ----------------------------------------------------------------------------- records
def _hints(cls) -> dict[str, Any]:
    hints = cls.__dict__.get("_hints_cache")
    if hints is None:
        hints = typing.get_type_hints(cls)
        setattr(cls, "_hints_cache", hints)
    return hints


def _record_type(tp) -> type | None:
    """The Record class of an annotation ``R``, ``R | None`` (else None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if isinstance(tp, type) and issubclass(tp, Record) else None


def _load(tp, value, where: str):
    rec = _record_type(tp)
    if rec is not None and value is not None:
        return rec.from_dict(value, where)
    if typing.get_origin(tp) is dict and value is not None:
        inner = _record_type(typing.get_args(tp)[1])
        if inner is not None:
            if not isinstance(value, dict):
                raise CacheError(f"cache metadata: '{where}' is not a mapping")
            return {k: inner.from_dict(v, f"{where}.{k}") for k, v in value.items()}
    return copy.deepcopy(value)


def _dump(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _optional(default=None, factory=None):
    """A field that a record built in code leaves out while it holds its default: metadata made
    without it stays what it was before the field existed."""
    if factory is not None:
        return field(default_factory=factory, metadata={"omit_default": True})
    return field(default=default, metadata={"omit_default": True})


@dataclass(kw_only=True)
class Record:
    """A part of the metadata: typed fields, plus ``extra`` (keys this version does not know).

    ``from_dict`` remembers which optional fields were absent; ``to_dict`` leaves those out
    while they still hold their default, so an old cache's metadata round-trips unchanged. A
    record built in code leaves out only the fields declared with ``_optional``."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    _absent: frozenset | None = field(default=None, init=False, repr=False, compare=False)  # None: built in code

    @classmethod
    def _own_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.name not in ("extra", "_absent")]

    @classmethod
    def from_dict(cls, d: dict, where: str = ""):
        if not isinstance(d, dict):
            raise CacheError(f"cache metadata: '{where or cls.__name__}' is not a mapping")
        hints = _hints(cls)
        values, absent = {}, set()
        for f in cls._own_fields():
            name = f"{where}.{f.name}" if where else f.name
            if f.name in d:
                values[f.name] = _load(hints[f.name], d[f.name], name)
            elif f.default is MISSING and f.default_factory is MISSING:
                raise CacheError(f"cache metadata lacks '{name}' (not made by `pipeline extract`, or damaged)")
            else:
                absent.add(f.name)
        own = {f.name for f in cls._own_fields()}
        obj = cls(**values, extra={k: copy.deepcopy(v) for k, v in d.items() if k not in own})
        obj._absent = frozenset(absent)
        return obj

    def to_dict(self) -> dict:
        out = {}
        for f in self._own_fields():
            value = getattr(self, f.name)
            if self._absent is None:
                skip = f.metadata.get("omit_default", False) and value == _default(f)
            else:
                skip = f.name in self._absent and value == _default(f)
            if skip:
                continue
            out[f.name] = _dump(value)
        out.update(copy.deepcopy(self.extra))
        return out


@dataclass(kw_only=True)
class SplitMeta(Record):
    num_videos: int
    arrays: list[dict]               # ArraySpec.to_json() of each per-video array (cache/source.py)


@dataclass(kw_only=True)
class StoreMeta(Record):
    """What the store itself needs: its key and layout (``_build`` adds the layout at creation).
    Any store opens with this much; the stages read the full ``CacheMeta``."""

    key: str
    format_version: int = _optional(FORMAT_VERSION)
    shard_size: int = _optional(0)
    splits: dict[str, SplitMeta] = _optional(factory=dict)
    integrity: int = _optional(0)    # 1: the store keeps checksums and shard records
    int8_outliers: int = 4           # per token, of int8 arrays (cache/quant.py)


@dataclass(kw_only=True)
class SamplingRecord(Record):
    frames: int
    mode: str                        # segment | dense
    stride: int | None               # dense only


@dataclass(kw_only=True)
class KeyContent(Record):
    """Everything that decides what a cache holds, and nothing else: its digest is the cache key."""

    format: int
    preprocess: int                  # stages/extract.py PREPROCESS_VERSION (decoding, sampling, crops)
    dataset: str
    classes: str                     # digest of the class names
    lists: dict[str, str]            # per split, digest of [path under video_root, label, num_frames]
    model: str
    weights: str
    clip: dict[str, str] = field(default_factory=dict)  # activation, resize, interpolation
    layers: list[int]
    patch: bool
    frames_stored: bool
    sampling: SamplingRecord
    views: dict[str, list[int]]      # per split [clips, crops]
    image_size: int
    dtype: str
    text: list[str]
    resize_short_side: int | None = _optional()   # only when not the input size
    view_bank: dict | None = _optional()          # only with --train-aug
    dense_starts: str | None = _optional()        # "spread": dense test clips from the first to the last start
    view_order: str | None = _optional()          # "crop-major": several clips and crops, crops outermost
    resize_to: list[int] | None = _optional()     # [H, W]: frames resized to H x W before the crops (SSv2 tests)

    def key(self) -> str:
        return _digest(self.to_dict())[:16]


@dataclass(kw_only=True)
class ExtractRecord(Record):
    """The extraction request as recorded: the fields of stages.extract.ExtractCfg (a test keeps
    the two equal), with its defaults, which is what a cache made before a field existed used."""

    model: str = "tiny"
    pretrained: str = ""
    init_seed: int = 0
    activation: str = "auto"
    frames: int = 8
    sampling: str = "segment"
    stride: int = 8
    layers: str = "last4"
    patch: bool = False
    store_frames: bool = False
    views: str = "1x1"
    train_views: str = "1x1"
    train_aug: int | None = None
    aug_seed: int = 0
    aug_area: float = 0.4
    aug_recipe: str = "light"
    aug_heads: str = ""
    dtype: str = "fp16"
    text: str = "all"
    batch_frames: int = 128
    workers: int = -1
    shard_size: int = 0
    device: str = "auto"
    resize_ratio: float = 1.0
    protocol: str = ""
    hash_sources: bool = False
    resize_to: str = ""


@dataclass(kw_only=True)
class DatasetMeta(Record):
    name: str = ""
    video_root: str = ""
    sources: dict[str, str] = field(default_factory=dict)   # files it was built from
    args: dict[str, Any] = field(default_factory=dict)      # load_dataset arguments (absolute paths)
    classes: list[str] = field(default_factory=list)
    flip_swaps: bool = _optional(False)   # flips swap the mirror class pairs' labels (cache/flips.py)

    def swap_table(self) -> tuple[int, ...] | None:
        """The label of a mirrored clip of each class (cache/flips.py ``swap_table``), or None when
        this dataset's flips change no label. A cache made before the flag was recorded swaps when
        its dataset is one whose registration swaps (``SWAPPING_BEFORE_RECORDED``)."""
        old = self._absent is not None and "flip_swaps" in self._absent and self.name in SWAPPING_BEFORE_RECORDED
        return label_swaps(self.classes, self.flip_swaps or old)


@dataclass(kw_only=True)
class BackboneMeta(Record):
    """Which CLIP made the features: architecture, weights and how images were fed to it."""

    arch: str = ""
    pretrained: str = ""
    weights: str = ""                # weights id: the checkpoint's digest or random-init:seed=N
    embed_dim: int = 0
    width: int = 0
    depth: int = 0
    backbone_heads: int = 0
    image_size: int = 0
    patch_size: int = 0
    num_patches: int = 0
    activation: str = ""             # gelu | quick_gelu ("" in caches made before it was recorded)
    activation_from: str = ""
    resize: str = ""
    interpolation: str = ""


@dataclass(kw_only=True)
class Dims(Record):
    """The sizes stage two builds heads with (stages.heads.DIM_FIELDS)."""

    num_classes: int
    embed_dim: int
    width: int
    frames: int
    num_patches: int
    depth: int
    backbone_heads: int
    image_size: int
    patch_size: int


@dataclass(kw_only=True)
class ViewCount(Record):
    clips: int
    crops: int


@dataclass(kw_only=True)
class ViewBank(Record):
    """K augmented views per video of one split, drawn at extraction (--train-aug): the light
    recipe (crop ``area`` / ``ratio``, ``flip``) or a head's paper train pipeline (``recipe``
    "paper": ``pipeline`` its drawn values, ``heads`` the heads it is of, ``description`` one line).
    ``param_columns``: the names of view_params' columns, the last one ``index_0..T-1`` standing
    for the T frame indices (``column_names``); empty in caches made before it was recorded."""

    views: int
    seed: int
    area: list[float]
    ratio: list[float]
    flip: float
    split: str = "train"
    param_columns: list[str] = field(default_factory=list)
    recipe: str = _optional("light")
    pipeline: dict = _optional(factory=dict)
    heads: list[str] = _optional(factory=list)
    description: str = _optional("")

    def column_names(self, frames: int) -> list[str]:
        """One name per column of view_params (P = len): the recorded names with the frame indices
        spelled ``index_0`` ... ``index_{T-1}``; a cache that recorded none: the light layout
        (LIGHT_VIEW_PARAM_COLUMNS, then the T indices), which every such cache has."""
        names = list(self.param_columns) or [*LIGHT_VIEW_PARAM_COLUMNS, f"index_0..{frames - 1}"]
        if names and names[-1].startswith("index_0.."):
            names = names[:-1] + [f"index_{t}" for t in range(frames)]
        return names

    def column(self, name: str, frames: int) -> int:
        """The position of column ``name`` in view_params; a CacheError naming the columns when absent."""
        names = self.column_names(frames)
        if name not in names:
            raise CacheError(f"the view bank records no column '{name}' (it has {', '.join(names)})")
        return names.index(name)

    def describe(self) -> str:
        """One line: what the bank draws."""
        if self.recipe == "paper":
            return f"paper train pipeline of {', '.join(self.heads)}: {self.description}"
        return (f"light: random clip, random resized crop area {self.area[0]:g}-{self.area[1]:g} bicubic, "
                f"flip p {self.flip:g}")


# view_params' first columns as every view bank records them (stages.video.VIEW_PARAM_COLUMNS): what a
# cache made before the names were recorded holds, followed by the T frame indices
LIGHT_VIEW_PARAM_COLUMNS = ("flip", "crop_y", "crop_x", "crop_h", "crop_w", "frame_h", "frame_w", "num_frames")


@dataclass(kw_only=True)
class ProtocolRecord(Record):
    """A paper's test protocol the cache was extracted for (stages/recipes.py)."""

    name: str
    eval_average: str                # scores | embeddings
    template_average: str = ""
    paper: str = ""
    differs: str = ""
    overridden: list[str] = field(default_factory=list)


# CLIP's pixel normalisation: what a model whose preprocess_cfg does not say its own is fed
# (stages/backbone.py), and so the pixel stats of a cache that records no ``Preprocess``.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(kw_only=True)
class Preprocess(Record):
    mean: list[float]
    std: list[float]
    image_size: int


@dataclass(kw_only=True)
class CacheMeta(StoreMeta):
    """The whole metadata of a cache (``FeatureStore.info``, ``WdsCache.info``)."""

    content: KeyContent | None = None
    config: ExtractRecord = field(default_factory=ExtractRecord)
    dataset: DatasetMeta = field(default_factory=DatasetMeta)
    backbone: BackboneMeta = field(default_factory=BackboneMeta)
    dims: Dims
    layers: list[int]
    views: dict[str, ViewCount] = field(default_factory=dict)
    view_bank: ViewBank | None = _optional()
    dtype: str = "fp16"
    text_sets: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    resize_short_side: int | None = None
    resize_to: list[int] | None = _optional()       # [H, W]: frames resized to exactly H x W, not by the short side
    protocol: ProtocolRecord | None = None
    preprocess: Preprocess | None = _optional()   # set when the model is loaded (its pixel mean and std)
    schema: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "CacheMeta":
        if isinstance(d, dict) and isinstance(d.get("schema"), int) and d["schema"] > SCHEMA_VERSION:
            raise CacheError(f"the cache was made by a newer clipcache (metadata schema {d['schema']}, this "
                             f"version reads up to {SCHEMA_VERSION}): upgrade clipcache to read it")
        return super().from_dict(d, where)


# ----------------------------------------------------------------------------- the cache key
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def key_content(dataset: DatasetSpec, *, preprocess_version: int, model: str, weights: str, clip: dict,
                layers: Sequence[int], patch: bool, frames_stored: bool, frames: int, sampling: str, stride: int,
                views: dict[str, tuple[int, int]], image_size: int, dtype: str, text_sets: Sequence[str],
                resize_short_side: int | None = None, view_bank: dict | None = None,
                layout: dict | None = None, resize_to: Sequence[int] | None = None) -> KeyContent:
    """What decides a cache's bytes, from a dataset and the resolved request. Paths under the
    dataset's video root are recorded relative to it (a moved dataset keeps its key); ``clip`` is
    the backbone identity (where its activation was learnt from is left out); ``resize_short_side``,
    ``view_bank`` and ``resize_to`` only when used, so caches without them keep the keys they always had; ``layout``
    (stages.video.layout_key) only where the view-layout rules changed what a cache holds."""
    root = str(dataset.video_root)

    def rel(p: str) -> str:
        return os.path.relpath(p, root) if root and p.startswith(root) else p

    return KeyContent(
        format=FORMAT_VERSION, preprocess=preprocess_version, dataset=dataset.name,
        classes=_digest(list(dataset.classes)),
        lists={s: _digest([[rel(it.path), it.label, it.num_frames] for it in items])
               for s, items in dataset.splits.items()},
        model=model, weights=weights, clip={k: v for k, v in clip.items() if k != "activation_from"},
        layers=list(layers), patch=patch, frames_stored=frames_stored,
        sampling=SamplingRecord(frames=frames, mode=sampling, stride=stride if sampling == "dense" else None),
        views={s: list(v) for s, v in views.items()}, image_size=image_size, dtype=dtype,
        text=sorted(text_sets), resize_short_side=resize_short_side, view_bank=view_bank or None,
        resize_to=list(resize_to) if resize_to else None, **(layout or {}),
    )


# ----------------------------------------------------------------------------- the command that makes it
# extract options that say how fast or where, not what: left out of the rebuilding command
_RUNTIME_ONLY = {"batch_frames", "workers", "device"}
# boolean options whose flag is not --<name>
_BOOL_FLAGS = {"patch": "--patch", "store_frames": "--frames-uint8"}
_DATA_FLAGS = ("data_root", "video_root", "train_list", "val_list", "test_list", "classes", "split_id")


def extract_command(meta: CacheMeta | dict, *, layers: list[int] | None = None, patch: bool | None = None,
                    frames_uint8: bool | None = None, out: str | None = None) -> str:
    """`pipeline extract ...` that rebuilds the cache of ``meta`` (its data paths included),
    optionally with more ``layers``, patch tokens or uint8 frames (what a head needs)."""
    meta = meta.to_dict() if isinstance(meta, CacheMeta) else meta
    cfg = dict(meta.get("config") or {})
    if layers is not None:
        cfg["layers"] = ",".join(map(str, sorted(set(layers)))) or "none"
    if patch is not None:
        cfg["patch"] = patch
    if frames_uint8 is not None:
        cfg["store_frames"] = frames_uint8
    dataset = meta.get("dataset") or {}
    parts = ["pipeline", "extract", "--dataset", str(dataset.get("name", "custom"))]
    args = dict(dataset.get("args") or {})
    if not args and dataset.get("video_root"):  # caches made before the arguments were recorded
        args = {"video_root": dataset["video_root"],
                **{f"{s}_list": p for s, p in (dataset.get("sources") or {}).items() if s in ("train", "val", "test")}}
        if (dataset.get("sources") or {}).get("classes"):
            args["classes"] = dataset["sources"]["classes"]
    for key in _DATA_FLAGS:
        if args.get(key) not in (None, ""):
            parts += [f"--{key.replace('_', '-')}", str(args[key])]
    for key, value in cfg.items():
        if key in _RUNTIME_ONLY or value in ("", None):
            continue
        if key in ("aug_seed", "aug_area", "aug_recipe", "aug_heads") and cfg.get("train_aug") is None:
            continue  # no view bank: its seed, area and recipe say nothing
        if key == "aug_recipe" and value == "light" or key == "aug_area" and cfg.get("aug_recipe") == "paper":
            continue  # light: the default, as before --aug-recipe; paper: the pipeline's own crop
        if isinstance(value, bool):
            if value:
                parts.append(_BOOL_FLAGS.get(key, f"--{key.replace('_', '-')}"))
            continue
        if key == "shard_size" and value == 0:
            continue
        parts += [f"--{key.replace('_', '-')}", str(value)]
    if out:
        parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)
