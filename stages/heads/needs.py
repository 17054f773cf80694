"""What a head needs from a cache, as facts that import no head: the config fields stage two
fills from the cache (``DIM_FIELDS``), what a head reads (``DataKeys``, block numbers resolved
by ``resolve_layers``), and the view bank each head's cache is extracted with by default.

A leaf (it imports no stage module), so that stage one (``extract --for-head``) and stage two's
data wing (stages/data/) name these facts without standing on the heads or on each other.
``registry.head_data_keys`` asks a head itself what it reads from a cache of given dims.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache.errors import ConfigError

__all__ = ["DIM_FIELDS", "DataKeys", "resolve_layers", "VIEW_BANK_DEFAULTS", "note_view_bank", "recommended_train_aug",
           "recommended_view_bank"]

# Config fields a head may declare that stage two fills from the cache metadata.
#   num_classes K, embed_dim E (final embedding), width D (backbone token width),
#   frames T, num_patches P, depth N (backbone blocks), backbone_heads (D / 64 for ViT),
#   image_size, patch_size.
DIM_FIELDS = (
    "num_classes",
    "embed_dim",
    "width",
    "frames",
    "num_patches",
    "depth",
    "backbone_heads",
    "image_size",
    "patch_size",
)


@dataclass(frozen=True)
class DataKeys:
    """What a head reads from the cache.

    Layers are backbone block numbers, 1-based (1..N), or negative counted from the end
    (-1 is the last block), so a head can ask for "the last M" without knowing N.
    ``backbone_weights`` names frozen backbone parameters (per tapped block) a head needs,
    e.g. ("ln_1", "in_proj") for EVL's temporal cross attention.
    """

    frame_emb: bool = False
    cls_layers: tuple[int, ...] = ()
    patch_layers: tuple[int, ...] = ()
    frames: bool = False
    backbone_weights: tuple[str, ...] = ()


def resolve_layers(layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Turn relative (negative) block numbers into absolute 1-based ones."""
    out = []
    for layer in layers:
        absolute = depth + 1 + layer if layer < 0 else layer
        if not 1 <= absolute <= depth:
            raise ConfigError(f"layer {layer} does not exist in a backbone of {depth} blocks")
        out.append(absolute)
    return tuple(out)


# `extract --train-aug K` per head: each head registers its own (``register_head(..., view_bank=K)``:
# the smallest K whose top-1 reaches the head's online run with fresh paper views, measured with
# bench/bench_cache_vs_online.py; docs/viewbank.md), and the registry notes it here, so this leaf
# answers without importing a head. Heads without one: no view bank (the plain cache reached the
# online runs of EVL, Side4Video and Text4Vis on the demo world, so no shipped head has one). Applied by `extract
# --for-head` (and so `make extract` / `make train`) unless the user sets --train-aug,
# --train-views or --no-view-bank. VIEW_BANK_DEFAULTS: the heads this package ships.
VIEW_BANK_DEFAULTS: dict[str, int] = {}
_VIEW_BANKS: dict[str, int] = {}


def note_view_bank(head: str, k: int | None, shipped: bool) -> None:
    """Called by ``register_head``: ``head``'s measured view bank (None: the plain cache)."""
    for table in (_VIEW_BANKS, VIEW_BANK_DEFAULTS) if shipped else (_VIEW_BANKS,):
        table.pop(head, None)
        if k:
            table[head] = int(k)


def recommended_train_aug(head: str) -> int | None:
    """The view bank (K augmented train views) measured best for ``head`` (its registered
    ``view_bank``); None: the plain cache, or not a registered head."""
    return _VIEW_BANKS.get(head)


def recommended_view_bank(heads: list[str]) -> int | None:
    """The view bank of a cache made for several heads: the largest K any of them registers; None
    when none of them has one."""
    ks = [k for k in (recommended_train_aug(h) for h in heads) if k]
    return max(ks) if ks else None
