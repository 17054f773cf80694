"""The papers' training recipes (stages two and three) and test protocols (stage one) as named presets.

SPEC section 7 lists what the official code and configs of EVL, Side4Video, Text4Vis and
ActionCLIP train and test with. Here each is a preset:

- ``--recipe paper`` (the default of ``pipeline train`` and ``pipeline finetune``): the published
  optimiser, weight-decay set, schedule, warm-up, label smoothing and *global* batch of the head
  or paradigm. Heads without a published recipe of their own say what ``paper`` means for them
  (the ``note`` of their registered ``PaperRecipe``).
- ``--recipe quick``: the generic small-data recipe the project used before (stage two: lr 1e-3,
  batch 32, 10 epochs, 1 warm-up epoch; stage three: the former stage-three defaults with 10
  epochs and 1 warm-up epoch). It has no fixed global batch: the per-step batch is the global
  batch, as before.

Batch and learning rate. ``batch_size`` is what one process computes per step; ``global_batch``
the number of videos per optimiser step. A global batch larger than ``batch_size x world size``
is reached by gradient accumulation, ceil(global / (per-step x world)) micro-steps per optimiser
step (``accumulation_steps``). When the user changes the global batch of a recipe and does not
give a learning rate, the learning rate follows the linear scaling rule, lr x new / reference
(Goyal et al. 2017), and the printed recipe says so; an explicit lr is never rescaled.

Explicit options (flags, ``--set``) override every preset value; the resolved values are printed
and saved in the run's config.json (``TrainCfg`` / ``FinetuneCfg`` hold them, ``recipe`` the name).

Test protocols (``pipeline extract --protocol NAME``): frames, sampling, val/test views, the
resize rule and the paper's rule for averaging over views, recorded in the cache metadata
(``CacheMeta.protocol``); stage two evaluates with that averaging rule unless told otherwise.

A head's facts live in the head's own file: its paper recipe and test protocol are registered
with it (``register_head(..., paper_recipe=..., protocol=...)``, stages/heads/facts.py), and this
module reads them from the registry; adding a head with a paper recipe touches that file alone.
The quick and demo presets and stage three's paradigm recipes are here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cache.errors import ConfigError
from cache.meta import CacheMeta
from stages.heads.facts import SCALE_256, PaperRecipe, Protocol

__all__ = ["RECIPES", "DEMO_HEADS", "PROTOCOLS", "protocol_for_heads", "Recipe", "Protocol", "stage_two_recipe", "stage_three_recipe",
           "resolve_recipe", "accumulation_steps", "effective_global_batch", "get_protocol", "resolve_protocol",
           "protocol_record", "protocol_eval_overrides", "resize_side", "describe_recipe", "paper_recipe"]

RECIPES = ("paper", "quick", "demo")


def __getattr__(name: str):
    if name == "PROTOCOLS":  # the registered heads' protocols (reading them imports the heads)
        from stages.heads.registry import list_protocols

        return tuple(list_protocols())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _entry(head: str):
    """The registry entry of ``head``; None for a name no head has (a paradigm's)."""
    from stages.heads.registry import get_head_entry

    try:
        return get_head_entry(head)
    except ConfigError:
        return None


@dataclass(frozen=True)
class Recipe:
    name: str                       # paper | quick
    target: str                     # the head (stage two) or paradigm (stage three) it is for
    source: str                     # what it reproduces, one line
    values: dict                    # TrainCfg / FinetuneCfg values
    ref_batch: int                  # global batch the lr is tuned for (the linear-scaling reference)
    head: dict = field(default_factory=dict)     # head options
    augment: dict = field(default_factory=dict)  # AugmentCfg values (stage three)
    note: str = ""


# ----------------------------------------------------------------------------- stage two
_QUICK_TWO = {"epochs": 10, "batch_size": 32, "global_batch": 0, "lr": 1e-3, "weight_decay": 0.05,
              "decay_all": False, "beta1": 0.9, "beta2": 0.999, "warmup_epochs": 1.0, "label_smoothing": 0.0}
_PER_STEP = 32  # default per-step batch of the paper recipes (memory); the global batch comes by accumulation

# `demo`: the settings `make demo` trains every head with on the demo world (the demo CLIP: 64 px,
# 4 blocks of width 128, E = 64; 144 train videos): the quick recipe at batch 16 for 30 epochs, heads
# sized for that backbone, on one torch thread so the float order (and the table) follows no machine.
_DEMO_TWO: dict[str, tuple[dict, dict]] = {
    "tap": ({"lr": 3e-3}, {}),
    "linear_probe": ({"epochs": 1}, {}),  # fitted in closed form: one pass
    "lda": ({"epochs": 1}, {}),
    "text4vis": ({}, {"temporal": "ttrans", "layers": 2, "pos_rows": 16}),
    "evl": ({}, {"num_layers": 3}),
    "side4video": ({}, {"preset": "custom", "num_blocks": 4, "side_width": 64}),
    "actionclip": ({}, {"prompt": "transf", "layers": 2, "pos_rows": 16}),
}
_DEMO_BASE = {**_QUICK_TWO, "epochs": 30, "batch_size": 16, "threads": 1}
DEMO_HEADS = tuple(_DEMO_TWO)

_NO_PAPER = "no published recipe for this head: `paper` means the quick recipe"


def stage_two_recipe(head: str, name: str = "paper", cuda: bool = False) -> Recipe:
    """The preset ``name`` for stage-two head ``head`` (``cuda``: EVL's fp16 applies on a GPU).

    A head whose loss contrasts the videos of a batch (``Head.batch_loss``: ActionCLIP) steps on
    the whole global batch at once: accumulating micro-batches of 32 would contrast 32 videos
    where the paper contrasts 128 (cheap on cached features)."""
    _check_name(name)
    paper = paper_recipe(head) if name == "paper" else None
    if paper is not None:
        values = {"batch_size": paper.values["global_batch"] if _batch_loss(head) else _PER_STEP, **paper.values}
        if cuda:
            values.update(paper.cuda)
        return Recipe("paper", head, paper.source, values, paper.ref_batch, dict(paper.head), note=paper.note)
    if name == "demo":
        values, head_opts = _DEMO_TWO.get(head, ({}, {}))
        return Recipe("demo", head, "demo: the demo world's settings (quick at batch 16, 30 epochs, one thread"
                      + (", heads sized for the demo CLIP)" if head_opts else ")"), {**_DEMO_BASE, **values}, 16,
                      dict(head_opts), note="" if head in _DEMO_TWO else "no demo settings for this head: quick's")
    note = _NO_PAPER if name == "paper" else ""
    return Recipe(name, head, "quick: generic small-data recipe (lr 1e-3, batch 32, 10 epochs, 1 warm-up)",
                  dict(_QUICK_TWO), 32, note=note)


def paper_recipe(head: str) -> PaperRecipe | None:
    """The stage-two recipe head ``head`` registers from its paper (None: it has none)."""
    entry = _entry(head)
    return entry.paper_recipe if entry is not None else None


def _batch_loss(head: str) -> bool:
    entry = _entry(head)  # not a registered head (a paradigm name): no such property
    return bool(entry.head_cls.batch_loss) if entry is not None else False


# ----------------------------------------------------------------------------- stage three
_QUICK_THREE = {"epochs": 10, "warmup_epochs": 1.0, "batch_size": 32, "global_batch": 0, "lr": 5e-5,
                "backbone_ratio": 0.1, "weight_decay": 0.2, "decay_all": False, "beta1": 0.9, "beta2": 0.98,
                "label_smoothing": 0.0, "train_logit_scale": False}

_AUG_TEXT4VIS = {"resize_ratio": SCALE_256, "crop": "random_resized", "scale_min": 0.08, "scale_max": 1.0,
                 "flip": 0.5, "jitter": 0.0, "grayscale": 0.2, "randaugment": False}
_AUG_ACTIONCLIP = {"resize_ratio": SCALE_256, "crop": "multiscale", "ms_scales": "1,0.875,0.75,0.66",
                   "flip": 0.5, "jitter": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1,
                   "grayscale": 0.2, "randaugment": True, "ra_ops": 2, "ra_magnitude": 9}

_PAPER_THREE = {
    "text4vis": ("Text4Vis end to end: AdamW, head lr 5e-5, backbone 5e-6, weight decay 0.2 on all parameters, "
                 "betas (0.9, 0.999), 30 epochs, 5 warm-up, batch 32 x 8 = 256; scale 256, random resized crop, "
                 "flip, grayscale (no colour jitter)",
                 {"epochs": 30, "warmup_epochs": 5.0, "global_batch": 256, "lr": 5e-5, "backbone_ratio": 0.1,
                  "weight_decay": 0.2, "decay_all": True, "beta1": 0.9, "beta2": 0.999, "label_smoothing": 0.0,
                  "train_logit_scale": False}, 256, {}, _AUG_TEXT4VIS),
    "actionclip": ("ActionCLIP end to end: AdamW betas (0.9, 0.98), weight decay 0.2 on all parameters, lr 5e-6 "
                   "both towers, 5e-5 prompt, 50 epochs, 5 warm-up, trainable logit scale, batch 128; multi-scale "
                   "crop (1-0.66), flip, colour jitter (0.4, 0.4, 0.2, 0.1), grayscale, RandAugment N2 M9",
                   {"epochs": 50, "warmup_epochs": 5.0, "global_batch": 128, "lr": 5e-5, "backbone_ratio": 0.1,
                    "weight_decay": 0.2, "decay_all": True, "beta1": 0.9, "beta2": 0.98, "label_smoothing": 0.0,
                    "train_logit_scale": True}, 128, {"template_average": "score"}, _AUG_ACTIONCLIP),
}


def stage_three_recipe(paradigm: str, name: str = "paper", dataset: str = "") -> Recipe:
    """The preset ``name`` for stage-three paradigm ``paradigm`` (text4vis | actionclip); under
    ``paper``, tested with the protocol the paradigm's head registers for ``dataset`` (e.g.
    text4vis-ssv2's 240 x 320 frames) where it registers one, else its own."""
    _check_name(name)
    if name == "demo":
        raise ConfigError("recipe 'demo' is for stage two (`pipeline train`); fine-tune with paper or quick")
    if name == "paper" and paradigm in _PAPER_THREE:
        source, values, ref, head_opts, aug = _PAPER_THREE[paradigm]
        test, described = _paper_test_views(paradigm, dataset)
        return Recipe("paper", paradigm, source + described, {"batch_size": _PER_STEP, **values, **test}, ref,
                      dict(head_opts), dict(aug))
    return Recipe(name, paradigm, "quick: the generic fine-tuning defaults (head lr 5e-5, encoders 5e-6, weight "
                                  "decay 0.2 on weights, betas (0.9, 0.98), batch 32, 10 epochs, 1 warm-up; generic "
                                  "augmentation)", dict(_QUICK_THREE), 32,
                  note="" if name == "quick" else "no published recipe: `paper` is the quick recipe")


def _paper_test_views(paradigm: str, dataset: str = "") -> tuple[dict, str]:
    """The FinetuneCfg evaluation values of the test protocol the paradigm's head registers (its
    sampling and CxS views; the test scale is the recipe's ``resize_ratio``, or the protocol's fixed
    frame size, as SSv2's) and how the recipe's line says them; for ``dataset`` the protocol named
    PARADIGM-DATASET where there is one. Training keeps random TSN offsets: segment and
    segment-start draw the same."""
    p = _protocol_on(paradigm, dataset)
    if p is None:
        return {}, ""
    values = {"sampling": p.sampling, "views": p.views}
    if p.sampling == "dense":
        values["stride"] = p.stride
    if p.resize_to:
        values["resize_to"] = p.resize_to
    clips, crops = (int(x) for x in p.views.split("x"))
    scale = f", frames resized to {p.resize_to.replace('x', ' x ')}" if p.resize_to else ""
    return values, (f"; tested as the paper: {clips} clip(s) x {crops} crop(s), {p.sampling} sampling{scale} "
                    f"(protocol {p.name})")


def _check_name(name: str) -> None:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}'; choose one of {', '.join(RECIPES)}")


# ----------------------------------------------------------------------------- resolution
def effective_global_batch(batch_size: int, global_batch: int, world: int = 1) -> int:
    """Videos per optimiser step: ``global_batch``, or (0) the per-step batch as the global batch."""
    return global_batch if global_batch > 0 else batch_size


def accumulation_steps(batch_size: int, global_batch: int, world: int = 1) -> int:
    """Micro-steps per optimiser step: ceil(global / (per-step x world)); 1 without a global batch."""
    if global_batch <= 0:
        return 1
    return max(1, math.ceil(global_batch / (batch_size * max(1, world))))


def resolve_recipe(recipe: Recipe, explicit: dict, defaults: dict, world: int = 1) -> tuple[dict, list[str]]:
    """Preset values, then the user's explicit ones; the linear lr rule when the global batch changed.

    ``defaults``: the config class's own defaults for keys the recipe does not set. Returns the
    values for the config and the lines that describe the resolved recipe.
    """
    values = {**defaults, **recipe.values, **explicit}
    lines = [f"recipe {recipe.name} for {recipe.target}: {recipe.source}"]
    if recipe.note:
        lines.append(f"  ({recipe.note})")
    G = int(values.get("global_batch", 0))
    if "global_batch" in explicit and G > 0 and G != recipe.ref_batch and "lr" not in explicit:
        old = recipe.values["lr"]
        values["lr"] = old * G / recipe.ref_batch
        lines.append(f"  global batch {G} instead of the recipe's {recipe.ref_batch}: lr scaled linearly, "
                     f"{old:g} x {G}/{recipe.ref_batch} = {values['lr']:g}")
    elif "global_batch" in explicit and "lr" in explicit:
        lines.append(f"  global batch {G} with the lr given ({values['lr']:g}): not rescaled")
    b = int(values["batch_size"])
    a = accumulation_steps(b, G, world)
    if G > 0:
        lines.append(f"  global batch {G} = {b} per step x {world} process(es) x {a} accumulation step(s)"
                     + ("" if a * b * world == G else f" (the last micro-step of each global batch is smaller)"))
    else:
        lines.append(f"  batch {b} per optimiser step (no accumulation)")
    keys = [k for k in ("epochs", "lr", "backbone_ratio", "weight_decay", "decay_all", "beta1", "beta2",
                        "warmup_epochs", "label_smoothing", "train_logit_scale", "amp") if k in values]
    lines.append("  " + ", ".join(f"{k} {values[k]:g}" if isinstance(values[k], float) else f"{k} {values[k]}"
                                  for k in keys))
    if explicit:
        lines.append("  overridden by you: " + ", ".join(f"{k}={v}" for k, v in sorted(explicit.items())))
    return values, lines


def describe_recipe(recipe: Recipe) -> str:
    return f"{recipe.name} ({recipe.target}): {recipe.source}"


# ----------------------------------------------------------------------------- test protocols
def _protocol(name: str) -> Protocol | None:
    from stages.heads.registry import find_protocol

    return find_protocol(name)


def _protocol_on(head: str, dataset: str = "") -> Protocol | None:
    """The protocol ``head`` registers for ``dataset`` (named HEAD-DATASET, e.g. side4video-ssv2),
    else its own, else None."""
    return (_protocol(f"{head}-{dataset}") if dataset else None) or _protocol(head)


def protocol_for_heads(heads: list[str], dataset: str = "") -> str:
    """The test protocol a cache for ``heads`` (``extract --for-head``) gets by default: the papers'
    own, when the heads that have one test on the same frames and views (Text4Vis and Side4Video
    share theirs); "" when none has one. On a ``dataset`` for which a paper tests otherwise (a
    protocol registered as HEAD-DATASET, e.g. side4video-ssv2) that one. Heads whose papers test on
    different frames cannot share one cache's val views: one ConfigError naming them and the way out."""
    own = {h: p for h in dict.fromkeys(heads)
           if (p := _protocol_on(h, dataset)) is not None}
    named = list(own)
    groups: dict[tuple, list[str]] = {}
    for h in named:
        groups.setdefault(tuple(getattr(own[h], k) for k in _PROTO_KEYS), []).append(h)
    if len(groups) > 1:
        text = "; ".join(f"{', '.join(hs)}: {_describe_views(own[hs[0]])}" for hs in groups.values())
        raise ConfigError(f"--for-head {','.join(heads)}: these papers test on different frames ({text}), which one "
                          "cache cannot hold: extract once per head, or pass --protocol NAME (or --protocol none: "
                          "one centre view) for all of them")
    return own[named[0]].name if named else ""


def _describe_views(p: Protocol) -> str:
    sampling = f"dense {p.frames}x{p.stride}" if p.sampling == "dense" else f"{p.frames} frames {p.sampling}"
    return f"{sampling}, {p.views} views"


def get_protocol(name: str) -> Protocol:
    """The test protocol ``name`` (each is registered by the head it is named after)."""
    p = _protocol(name)
    if p is None:
        from stages.heads.registry import list_protocols

        raise ConfigError(f"unknown protocol '{name}'; choose one of {', '.join(list_protocols())}")
    return p


_PROTO_KEYS = ("frames", "sampling", "stride", "views", "resize_ratio", "resize_to")


def resolve_protocol(name: str, explicit: dict, defaults: dict) -> tuple[dict, dict | None, list[str]]:
    """Extraction settings: the protocol's (when ``name``), then the user's explicit flags.

    Returns (ExtractCfg values for frames, sampling, stride, views, resize_ratio, and resize_to where set), the metadata
    record of the protocol (None without one) and lines describing it.
    """
    if not name:
        return {**{k: defaults[k] for k in _PROTO_KEYS if defaults.get(k, "") != ""}, **explicit}, None, []
    p = get_protocol(name)
    values = {k: getattr(p, k) for k in _PROTO_KEYS if getattr(p, k) != ""}  # resize_to only where a protocol sets it
    values.update(explicit)
    over = {k: v for k, v in explicit.items() if v != getattr(p, k)}
    record = protocol_record(name, values)
    short = "short side = input size" if values["resize_ratio"] == 1.0 else \
        f"short side = {values['resize_ratio']:.4g} x input size (256 for 224)"
    if values.get("resize_to"):
        short = f"frames resized to {values['resize_to']} (H x W)"
    lines = [f"protocol {p.name}: {values['frames']} frames, {values['sampling']} sampling"
             + (f" (stride {values['stride']})" if values["sampling"] == "dense" else "")
             + f", {values['views']} views, {short}, then centre/3-crop; eval averages "
             + ("per-template softmax, then " if p.template_average else "")
             + ("softmax scores" if p.eval_average == "scores" else "embeddings (then normalised)"),
             f"  paper: {p.paper}"]
    if p.differs:
        lines.append(f"  differs: {p.differs}")
    if over:
        lines.append("  overridden by you: " + ", ".join(f"{k}={v}" for k, v in sorted(over.items())))
    return values, record, lines


def resize_side(size: int, ratio: float) -> int:
    """The short side before cropping ``size``: 224 x 256/224 = 256."""
    return int(round(size * ratio))


def protocol_record(name: str, cfg: dict) -> dict | None:
    """What a cache's metadata says about its protocol (None without one): the paper's view-averaging
    rule, the paper's protocol as published, what differs here, and which settings the user overrode."""
    if not name:
        return None
    p = get_protocol(name)
    over = sorted(k for k in _PROTO_KEYS if k in cfg and cfg[k] != getattr(p, k))
    return {"name": p.name, "eval_average": p.eval_average, "template_average": p.template_average,
            "paper": p.paper, "differs": p.differs, "overridden": over}


def protocol_eval_overrides(meta: CacheMeta | None, head: str) -> tuple[dict, dict]:
    """(TrainCfg, head) values a cache's protocol implies for evaluation: its view-averaging rule and,
    for ActionCLIP, the per-template softmax."""
    proto = meta.protocol if meta is not None else None
    if not proto:
        return {}, {}
    from stages.heads.registry import get_head_entry

    own = _protocol(head)
    cached = _protocol(proto.name)
    if own is not None and cached is not None and not proto.overridden and \
            all(getattr(own, k) == getattr(cached, k) for k in _PROTO_KEYS):
        eval_average, template_average = own.eval_average, own.template_average  # its own paper's rule, same views
    else:
        eval_average, template_average = proto.eval_average, proto.template_average
    can_average_embeddings = get_head_entry(head).head_cls.supports("video_embedding")
    train = {"eval_average": eval_average} if eval_average == "scores" or can_average_embeddings else {}
    head_opts = {"template_average": template_average} if head == "actionclip" and template_average else {}
    return train, head_opts
