"""Trainable-parameter counts of every registered head configuration, built from real modules."""

from __future__ import annotations

import dataclasses

import torch

from stages.heads.registry import get_head_entry, list_heads, make_cfg

__all__ = ["backbone_dims", "count_trainable", "reference_rows"]


def backbone_dims(backbone: str, classes: int, frames: int) -> dict:
    from stages.backbone import BackboneInfo, model_config

    info = BackboneInfo.from_config(model_config(backbone))
    return {"num_classes": classes, "embed_dim": info.embed_dim, "width": info.width, "frames": frames,
            "num_patches": info.num_patches, "depth": info.depth, "backbone_heads": info.backbone_heads,
            "image_size": info.image_size, "patch_size": info.patch_size}


def count_trainable(name: str, overrides: dict) -> int:
    entry = get_head_entry(name)
    cfg = make_cfg(name, overrides)
    try:  # the meta device skips allocating weights; some inits need real numbers
        with torch.device("meta"):
            head = entry.head_cls(cfg)
    except (NotImplementedError, RuntimeError):
        head = entry.head_cls(cfg)
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


def reference_rows(backbone: str = "ViT-B-16", classes: int = 400, frames: int = 8) -> list[dict]:
    """One row per registered paper configuration (plus each head's defaults when it has none).

    A reference's own dims (frames, classes) win over the arguments: the paper figure is for
    that setting; rows without an expected figure use the arguments.
    """
    dims = backbone_dims(backbone, classes, frames)
    rows = []
    for name in list_heads():
        entry = get_head_entry(name)
        fields = {f.name for f in dataclasses.fields(entry.cfg_cls)}
        base = {k: v for k, v in dims.items() if k in fields}
        refs = entry.references or ()
        if not refs:
            rows.append({"head": name, "label": "default", "count": count_trainable(name, base), "expected": None})
        for ref in refs:
            over = {**base, **{k: v for k, v in ref.overrides.items() if k in fields}}
            if ref.expected is None:
                over.update({k: v for k, v in base.items() if k in ("num_classes", "frames")})
            rows.append({"head": name, "label": ref.label, "count": count_trainable(name, over),
                         "expected": ref.expected if backbone == "ViT-B-16" else None})
    return rows
