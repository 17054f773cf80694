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


def reference_rows(backbone: str = "ViT-B-16", classes: int | None = None, frames: int | None = None) -> list[dict]:
    """One row per registered paper configuration (plus each head's defaults when it has none).

    Each row keeps the reference's options (prompt, preset, widths, and its frames and classes
    unless ``frames`` / ``classes`` are given) and takes the backbone's dims from ``backbone``.
    The paper's figure is shown only where that is still the paper's own setting. A
    configuration the backbone cannot hold (e.g. more decoder layers than blocks) has count None
    and the reason in ``note``.
    """
    from cache.errors import ConfigError

    dims = backbone_dims(backbone, 400 if classes is None else classes, 8 if frames is None else frames)
    asked_dims = {k: v for k, v in dims.items()
                  if not (k == "num_classes" and classes is None) and not (k == "frames" and frames is None)}
    rows = []
    for name in list_heads():
        entry = get_head_entry(name)
        fields = {f.name for f in dataclasses.fields(entry.cfg_cls)}
        base = {k: v for k, v in dims.items() if k in fields}
        refs = entry.references or ()
        configs = [("default", base, None, base)] if not refs else []
        for ref in refs:
            paper = {**base, **{k: v for k, v in ref.overrides.items() if k in fields}}
            asked = {**paper, **{k: v for k, v in asked_dims.items() if k in fields}}
            configs.append((ref.label, asked, ref.expected, paper))
        for label, cfg, expected, paper in configs:
            row = {"head": name, "label": label, "count": None, "note": "",
                   "expected": expected if cfg == paper else None}
            try:
                row["count"] = count_trainable(name, cfg)
            except ConfigError as exc:
                row["note"] = str(exc)
            rows.append(row)
    return rows
