"""A minimal head for tests that register one of their own: frame embeddings averaged over time,
then one linear layer. A test subclasses it under ``register_head(NAME, FrameMeanCfg, ...)`` with
whatever facts (recipe, protocol, view bank, published results) it needs to exercise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stages.heads import DataKeys, Head


@dataclass
class FrameMeanCfg:
    num_classes: int = 400
    embed_dim: int = 512


TINY = {"num_classes": 4, "embed_dim": 32}


class FrameMeanHead(Head):
    """Frame mean -> linear."""

    def __init__(self, cfg: FrameMeanCfg):
        super().__init__(cfg)
        self.fc = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def data_keys(self) -> DataKeys:
        return DataKeys(frame_emb=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(batch["frame_emb"].float().mean(dim=1))}  # (B, T, E) -> (B, K)
