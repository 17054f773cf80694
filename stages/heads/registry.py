"""Head registry: one file per head registers itself; nothing else needs editing.

A head is an ``nn.Module`` subclass of :class:`Head` with a config dataclass. Stage two fills
the config fields named in :data:`DIM_FIELDS` from the cache (backbone width, frames, ...),
applies the user's overrides, checks the cache holds what ``data_keys()`` asks for, and calls
``forward(batch) -> {"logits": (B, K), ...}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from cache.errors import ConfigError
from stages.config import closest, coerce_option
from stages.heads.facts import PaperRecipe, Protocol, PublishedResult, TrainPipeline
from stages.heads.needs import DIM_FIELDS, DataKeys, note_view_bank, resolve_layers  # what a head reads (re-exported)
from stages.video import AugViewCfg

__all__ = [
    "DIM_FIELDS",
    "DataKeys",
    "Head",
    "HeadEntry",
    "PaperRecipe",
    "Protocol",
    "PublishedResult",
    "Reference",
    "TrainPipeline",
    "AUG_RECIPES",
    "train_pipeline_for",
    "paper_train_pipeline",
    "register_head",
    "create_head",
    "get_head_entry",
    "list_heads",
    "list_protocols",
    "find_protocol",
    "make_cfg",
    "example_batch",
    "resolve_layers",
    "head_data_keys",
]

class Head(nn.Module):
    """Base class of every head.

    Subclasses set ``cfg_cls`` through :func:`register_head`, build their modules from
    ``self.cfg`` and implement ``data_keys`` and ``forward``. Heads with a classifier
    matrix W (classes x E) set ``has_classifier = True`` and implement ``set_classifier``.

    Optional capabilities (:data:`Head.CAPABILITIES`) are methods declared here with a default;
    a head has one when it overrides the method, and ``supports(name)`` says so, on the class
    or an instance. Stage two asks ``supports`` instead of probing attributes.
    """

    name: str = ""
    has_classifier: bool = False
    uses_sklearn: bool = False  # fitted in closed form (LDA, logistic probe), not by SGD
    # the loss couples the videos of a batch (a contrast between them): gradient accumulation over
    # micro-batches changes what is optimised, so a recipe steps on the whole global batch at once
    batch_loss: bool = False
    CAPABILITIES = ("video_embedding", "logits_from_embedding", "set_backbone_weights")

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg

    def data_keys(self) -> DataKeys:  # pragma: no cover - every head overrides
        raise NotImplementedError

    def loss(self, out: dict[str, torch.Tensor], labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy on ``out['logits']``; heads with another objective override."""
        return F.cross_entropy(out["logits"].float(), labels, label_smoothing=label_smoothing)

    def set_classifier(self, weight: torch.Tensor) -> None:
        """Install the classifier matrix W (K, E), or (K, M, E) for per-template heads."""
        raise ConfigError(f"head '{self.name}' has no classifier matrix to initialise")

    def classifier_shape(self) -> tuple[int, ...]:
        """Shape ``set_classifier`` expects; (K, E) unless a head says otherwise."""
        return (self.cfg.num_classes, self.cfg.embed_dim)

    def fit(self, batch: dict[str, torch.Tensor]) -> None:
        """Closed-form heads (``uses_sklearn``) fit on the whole training set at once."""
        raise ConfigError(f"head '{self.name}' is trained by gradient, not fitted")

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ----------------------------------------------------------------- optional capabilities
    @classmethod
    def supports(cls, capability: str) -> bool:
        """Whether this head overrides the optional method ``capability`` (one of CAPABILITIES)."""
        if capability not in Head.CAPABILITIES:
            raise ValueError(f"unknown head capability '{capability}'; one of {', '.join(Head.CAPABILITIES)}")
        return getattr(cls, capability) is not getattr(Head, capability)

    def video_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, E) video embedding before the classifier: what multi-view evaluation averages
        (``eval_average=embeddings``) and what a swapped text classifier scores (zero-shot)."""
        raise ConfigError(f"head '{self.name}' has no video embedding: it cannot average embeddings or swap classes")

    def logits_from_embedding(self, video: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, K) from ``video_embedding``'s output. Default: cosine similarity with
        the classifier matrix (templates averaged for a (K, M, E) one)."""
        if not self.has_classifier:
            raise ConfigError(f"head '{self.name}' has no classifier to score a video embedding with")
        w = self.classifier
        w = w.mean(1) if w.dim() == 3 else w
        return F.normalize(video, dim=-1) @ F.normalize(w, dim=-1).T

    def set_backbone_weights(self, weights: dict[int, dict[str, torch.Tensor]]) -> None:
        """Install frozen backbone parameters (block -> name -> tensor) that ``data_keys().backbone_weights``
        names, read from the cache's aux arrays (EVL's temporal cross attention)."""
        raise ConfigError(f"head '{self.name}' takes no backbone weights")


@dataclass(frozen=True)
class Reference:
    """A paper configuration and its published trainable-parameter count (ViT-B/16, 400 classes)."""

    label: str
    overrides: dict
    expected: int | None = None
    source: str = ""


@dataclass
class HeadEntry:
    """A registered head and its paper's facts (stages/heads/facts.py): the recipe ``--recipe paper``
    trains it with, the test protocol ``extract --for-head`` caches for it, its official train
    pipeline (what the view bank and online training draw under ``--aug-recipe paper``; None: the
    paper has none), the view bank (K augmented train views) it was measured best with (None: the
    plain cache), and the results its paper publishes."""

    name: str
    head_cls: type
    cfg_cls: type
    tiny: dict = field(default_factory=dict)
    references: tuple[Reference, ...] = ()
    paper_recipe: PaperRecipe | None = None
    protocol: Protocol | None = None
    view_bank: int | None = None
    published: tuple[PublishedResult, ...] = ()
    train_aug: TrainPipeline | None = None


_REGISTRY: dict[str, HeadEntry] = {}


def register_head(name: str, cfg_cls: type, tiny: dict | None = None,
                  references: tuple[Reference, ...] = (), *, paper_recipe: PaperRecipe | None = None,
                  protocol: Protocol | None = None, view_bank: int | None = None,
                  published: tuple[PublishedResult, ...] = (),
                  train_aug: TrainPipeline | None = None) -> Callable[[type], type]:
    """Class decorator: ``@register_head("evl", EVLCfg, tiny={...}, paper_recipe=..., protocol=...)``.

    A protocol is named as its head (``--protocol evl``)."""
    if protocol is not None and protocol.name != name:
        raise RuntimeError(f"head '{name}' registers a protocol named '{protocol.name}': name it as the head")

    def wrap(head_cls: type) -> type:
        if name in _REGISTRY:
            raise RuntimeError(f"head '{name}' registered twice")
        head_cls.name = name
        head_cls.cfg_cls = cfg_cls
        _REGISTRY[name] = HeadEntry(name, head_cls, cfg_cls, dict(tiny or {}), tuple(references), paper_recipe,
                                    protocol, view_bank, tuple(published), train_aug)
        note_view_bank(name, view_bank, shipped=head_cls.__module__.startswith("stages.heads."))
        return head_cls

    return wrap


AUG_RECIPES = ("paper", "light")


def paper_train_pipeline(name: str) -> TrainPipeline | None:
    """Head ``name``'s official train pipeline (``register_head(..., train_aug=)``), None when its
    paper has none (tap, linear_probe, lda)."""
    return get_head_entry(name).train_aug


def train_pipeline_for(head: str, recipe: str = "paper"):
    """What ``stages.video.augmented_views`` draws for ``head`` under ``recipe``: "paper" -> its
    TrainPipeline (a ConfigError when its paper has none), "light" -> AugViewCfg() (the view
    bank's crop 0.4-1 and flip). An unknown recipe or head: a ConfigError, one line."""
    if recipe not in AUG_RECIPES:
        raise ConfigError(f"--aug-recipe must be one of {', '.join(AUG_RECIPES)}, got '{recipe}'")
    pipeline = paper_train_pipeline(head)
    if recipe == "light":
        return AugViewCfg()
    if pipeline is None:
        raise ConfigError(f"head '{head}' has no paper train pipeline (its paper publishes none): use "
                          "--aug-recipe light")
    return pipeline


def list_heads() -> list[str]:
    return sorted(_REGISTRY)


def list_protocols() -> list[str]:
    """The test protocols the registered heads bring (each named as its head)."""
    return sorted(n for n, e in _REGISTRY.items() if e.protocol is not None)


def find_protocol(name: str) -> Protocol | None:
    """The test protocol named ``name`` (a head's), None when no head registers one by that name."""
    entry = _REGISTRY.get(name)
    return entry.protocol if entry is not None else None


def get_head_entry(name: str) -> HeadEntry:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown head '{name}'; available: {', '.join(list_heads())}")
    return _REGISTRY[name]


def make_cfg(name: str, overrides: dict | None = None, tiny: bool = False) -> Any:
    """Build a head's config: defaults, then the tiny preset (tests), then overrides."""
    entry = get_head_entry(name)
    fields = {f.name: f for f in dataclasses.fields(entry.cfg_cls)}
    values: dict[str, Any] = {}
    if tiny:
        values.update(entry.tiny)
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"head '{name}' has no option '{key}'{closest(key, fields)}; "
                              f"valid: {', '.join(sorted(fields))}")
        values[key] = coerce_option(fields[key], key, value)  # the one rule of stages/config.py
    return entry.cfg_cls(**values)


def create_head(name: str, tiny: bool = False, **overrides: Any) -> Head:
    """Create a registered head; unknown options are an error listing the valid ones."""
    entry = get_head_entry(name)
    return entry.head_cls(make_cfg(name, overrides, tiny=tiny))


def example_batch(head: Head, batch_size: int = 4, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A random batch shaped as stage two would feed ``head`` (tests, benchmarks, shape checks).

    Shapes: frame_emb (B, T, E); cls (B, T, L, D); patch (B, T, L, P, D);
    frames (B, T, 3, H, W) normalised floats; label (B,).
    """
    cfg, keys = head.cfg, head.data_keys()
    g = generator or torch.Generator().manual_seed(0)
    B, T = batch_size, getattr(cfg, "frames", 8)
    batch: dict[str, torch.Tensor] = {"label": torch.randint(0, cfg.num_classes, (B,), generator=g)}
    if keys.frame_emb:
        batch["frame_emb"] = torch.randn(B, T, cfg.embed_dim, generator=g)
    if keys.cls_layers:
        batch["cls"] = torch.randn(B, T, len(keys.cls_layers), cfg.width, generator=g)
    if keys.patch_layers:
        batch["patch"] = torch.randn(B, T, len(keys.patch_layers), cfg.num_patches, cfg.width, generator=g)
    if keys.frames:
        batch["frames"] = torch.randn(B, T, 3, cfg.image_size, cfg.image_size, generator=g)
    return batch


def head_data_keys(name: str, dims: dict, overrides: dict | None = None) -> DataKeys:
    """What head ``name`` (its defaults plus ``overrides``) reads from a cache of backbone
    ``dims`` (the DIM_FIELDS of a cache's metadata), with absolute block numbers: what stage
    one must extract for it (`pipeline extract --for-head`). A head the backbone cannot hold
    is a ConfigError that says so."""
    entry = get_head_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.cfg_cls)}
    values = {k: v for k, v in dims.items() if k in fields and k in DIM_FIELDS}
    values.update(overrides or {})
    try:
        keys = entry.head_cls(make_cfg(name, values)).data_keys()
    except ConfigError as exc:
        raise ConfigError(f"head '{name}' does not fit this backbone ({dims.get('depth')} blocks, width "
                          f"{dims.get('width')}): {exc}; pick a deeper --model (make: MODEL=...)") from None
    depth = int(dims["depth"])
    return dataclasses.replace(keys, cls_layers=resolve_layers(keys.cls_layers, depth),
                               patch_layers=resolve_layers(keys.patch_layers, depth))
