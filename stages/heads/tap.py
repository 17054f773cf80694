"""TAP: temporal average pooling of frame embeddings, then a linear classifier.

The vision-only baseline of the frozen-CLIP video papers (e.g. the "TAP + linear" rows that
Text4Vis and EVL compare against): mean over the T frame embeddings (B, T, E) -> (B, E), optional
dropout, ``nn.Linear(E, K)``. Trainable count with ViT-B/16 (E=512) and 400 classes:
512 * 400 + 400 = 205,200. Nothing here differs from the usual formulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stages.heads.common import frame_mean
from stages.heads.registry import DataKeys, Head, Reference, register_head

__all__ = ["TapCfg", "TapHead"]


@dataclass
class TapCfg:
    num_classes: int = 400
    embed_dim: int = 512
    frames: int = 8
    dropout: float = 0.0  # on the pooled embedding, before the classifier


@register_head(
    "tap",
    TapCfg,
    tiny={"num_classes": 5, "embed_dim": 32, "frames": 4},
    references=(
        Reference(
            "TAP + linear, ViT-B/16, 8 frames, K400",
            {"embed_dim": 512, "frames": 8, "num_classes": 400},
            512 * 400 + 400,
            "arithmetic: one nn.Linear(512, 400) with bias",
        ),
    ),
)
class TapHead(Head):
    """Mean over frames, dropout, linear layer."""

    def __init__(self, cfg: TapCfg):
        super().__init__(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def data_keys(self) -> DataKeys:
        return DataKeys(frame_emb=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        video = frame_mean(batch["frame_emb"])  # (B, T, E) -> (B, E)
        return {"logits": self.fc(self.dropout(video)), "video_emb": video}
