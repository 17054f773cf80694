"""Text4Vis: a temporal module over frame embeddings, then a cosine classifier W (K, E).

Wu, Sun, Ouyang, "Revisiting Classifier: Transferring Vision-Language Models for Video
Recognition", AAAI 2023 (arXiv:2207.01297). The paper's point is the classifier: W is
initialised from class text embeddings (or, in its Table 4 ablation, random normal, random
orthogonal, LDA coef_, a text-only encoder) and kept frozen; logits are
``scale * normalise(video) @ normalise(W).T``. Stage two installs W with ``set_classifier``.

Temporal modules (cfg ``temporal``):

- ``"tap"``: mean over frames (no parameters; with a frozen W the head has nothing to train
  and is a pure evaluation of W).
- ``"ttrans"``: :class:`~stages.heads.common.TemporalTransformer`, the paper's "T-Trans" (the
  same 6-layer module as ActionCLIP's "Transf": 77-row frame position table, residual, mean).
  By arithmetic 18,953,728 parameters at E=512; the paper publishes no count.
- ``"t1d"``: depthwise temporal conv (k=3, shift init, residual), then mean; 3E parameters.

Logit scale: ``logit_scale`` in training, ``test_logit_scale`` in eval mode, both 100 by
default. Text4Vis multiplies by CLIP's learned ``logit_scale.exp()`` in training, which is 100
for the pretrained CLIP checkpoints (CLIP clamps it at 100), and by a hard-coded 100 at test.
The scale does not change the arg-max, only softmax scores (multi-view score averaging, loss).

Multi-view evaluation: Text4Vis averages the video embeddings (before normalisation) of the
views, normalises, then classifies; :meth:`Text4VisHead.video_embedding` and
:meth:`Text4VisHead.logits_from_embedding` split ``forward`` at that point.
Different from the paper: the backbone is frozen here (stage two); stage three trains it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cache.errors import ConfigError
from stages.heads.common import (
    TemporalConv1D,
    TemporalTransformer,
    cosine_logits,
    track_loaded,
    validate_choice,
)
from stages.heads.facts import CROPS_TSN, SCALE_256, PaperRecipe, Protocol, PublishedResult, TrainPipeline
from stages.heads.registry import DataKeys, Head, Reference, register_head

__all__ = ["Text4VisCfg", "Text4VisHead"]

TEMPORAL = ("tap", "ttrans", "t1d")
_B16 = {"embed_dim": 512, "frames": 8, "num_classes": 400}

# Kinetics-400 top-1 of the official repository's Model Zoo (README.md, "Kinetics-400" table), end to
# end (stage three, the text4vis paradigm: the visual encoder trains from OpenAI's CLIP). Its "#Frame"
# is frames x spatial crops x temporal clips: "8x3x4" is 8 frames, views 4x3; "32x3x1" is views 1x3.
# The test sampling is its test code's (segment-start). No top-5 given. Its "ViT-L/14*" is the plain
# ViT-L/14 (the star marks the model used for zero-shot). Left out: the ActivityNet, UCF-101 and
# HMDB-51 tables: those runs start from a Kinetics-400 model, not OpenAI's weights (and ActivityNet is
# not in the project's dataset registry).
_ZOO = "Text4Vis (arXiv:2207.01297): whwu95/Text4Vis README.md, Model Zoo, Kinetics-400 table"


def _k400(backbone: str, frames: int, views: str, top1: float) -> PublishedResult:
    return PublishedResult(dataset="k400", backbone=backbone, frames=frames, views=views, top1=top1,
                           sampling="segment-start", stage="finetune", source=_ZOO)


@dataclass
class Text4VisCfg:
    num_classes: int = 400
    embed_dim: int = 512
    frames: int = 8
    temporal: str = "ttrans"  # "tap" | "ttrans" | "t1d"
    layers: int = 6  # T-Trans depth
    heads: int = 0  # T-Trans attention heads; 0 = embed_dim / 64
    pos_rows: int = 77  # T-Trans frame position table rows (CLIP's context length)
    trainable_classifier: bool = False  # W frozen (Text4Vis default) or trained
    logit_scale: float = 100.0  # training (CLIP's logit_scale.exp())
    test_logit_scale: float = 100.0  # eval mode (Text4Vis test)


@register_head(
    "text4vis",
    Text4VisCfg,
    tiny={"num_classes": 5, "embed_dim": 32, "frames": 4, "temporal": "ttrans", "layers": 2, "pos_rows": 8},
    references=(
        Reference("Text4Vis T-Trans, frozen W, ViT-B/16, 8 frames, K400", {"temporal": "ttrans", **_B16}, None,
                  "Text4Vis (arXiv:2207.01297); no published count (ActionCLIP's 18,953,728 Transf module)"),
        Reference("Text4Vis TAP, frozen W, ViT-B/16, 8 frames, K400", {"temporal": "tap", **_B16}, None,
                  "Text4Vis (arXiv:2207.01297); no published count (no parameters by construction)"),
        Reference("Text4Vis T1D, frozen W, ViT-B/16, 8 frames, K400", {"temporal": "t1d", **_B16}, None,
                  "Text4Vis (arXiv:2207.01297); no published count"),
    ),
    paper_recipe=PaperRecipe(
        "Text4Vis head values (its stage-three recipe's temporal-module part): AdamW lr 5e-5, weight "
        "decay 0.2 on all parameters, betas (0.9, 0.999), 30 epochs, 5 warm-up, batch 256",
        {"epochs": 30, "global_batch": 256, "lr": 5e-5, "weight_decay": 0.2, "decay_all": True,
         "beta1": 0.9, "beta2": 0.999, "warmup_epochs": 5.0, "label_smoothing": 0.0}, 256,
        note="Text4Vis publishes no recipe for a head over frozen features: `paper` is the temporal "
             "module's values of its end-to-end recipe"),
    protocol=Protocol(
        "text4vis", 8, "segment-start", 8, "4x3", SCALE_256, "embeddings",
        paper="4 clips x 3 crops (the test code Side4Video inherits: the same frames and views), "
              "video embeddings averaged over views then normalised, scale 256 then crop 224",
        differs=CROPS_TSN),
    train_aug=TrainPipeline(
        "Text4Vis's official train code: random TSN offsets, scale 256 (for 224), random resized crop "
        "0.08-1, flip p 0.5, grayscale p 0.2, no colour jitter",
        clip="segment", resize_ratio=SCALE_256, crop="random_resized", area=(0.08, 1.0), interpolation="bilinear",
        flip=0.5, grayscale=0.2),
    protocols=(
        Protocol(
            "text4vis-ssv2", 8, "segment-start", 8, "4x3", 1.0, "embeddings", resize_to="240x320",
            paper="Something-Something v2: frames resized to 240 x 320 (H x W), then its test crops of 224; "
                  "its test code changes only the scale for SSv2",
            differs="Its SSv2 test setting gives only the 240 x 320 scale: frames, sampling and views are Text4Vis's "
                    "K400 protocol's (8 frames, 4 clips x 3 crops, segment starts). Frames resized bicubic "
                    "(antialiased); its code resizes PIL images bilinearly"),
    ),
    published=(
        _k400("ViT-B-32", 8, "4x3", 80.0),
        _k400("ViT-B-32", 16, "4x3", 80.5),
        _k400("ViT-B-16", 8, "4x3", 82.9),
        _k400("ViT-B-16", 16, "4x3", 83.6),
        _k400("ViT-L-14", 8, "4x3", 86.4),
        _k400("ViT-L-14-336", 8, "4x3", 87.1),
        _k400("ViT-L-14-336", 32, "1x3", 87.8),
    ),
)
class Text4VisHead(Head):
    """Temporal module, then cosine similarity to a frozen (or trainable) classifier W."""

    has_classifier = True

    def __init__(self, cfg: Text4VisCfg):
        super().__init__(cfg)
        validate_choice("temporal", cfg.temporal, TEMPORAL)
        E = cfg.embed_dim
        if cfg.temporal == "ttrans":
            if cfg.frames > cfg.pos_rows:
                raise ConfigError(f"frames={cfg.frames} exceeds the frame position table (pos_rows={cfg.pos_rows})")
            self.temporal = TemporalTransformer(E, layers=cfg.layers, heads=cfg.heads, pos_rows=cfg.pos_rows)
        elif cfg.temporal == "t1d":
            self.temporal = TemporalConv1D(E, init="shift", residual=True)
        else:
            self.temporal = None
        weight = torch.zeros(cfg.num_classes, E)
        if cfg.trainable_classifier:
            self.classifier = nn.Parameter(weight)
        else:
            self.register_buffer("classifier", weight)
        self.classifier_ready = False
        track_loaded(self, "classifier_ready", "classifier")

    def data_keys(self) -> DataKeys:
        return DataKeys(frame_emb=True)

    def set_classifier(self, weight: torch.Tensor) -> None:
        """Copy W (K, E) into the head (in place: an optimizer built earlier keeps working)."""
        weight = torch.as_tensor(weight)
        if tuple(weight.shape) != tuple(self.classifier.shape):
            raise ConfigError(f"text4vis classifier must be {tuple(self.classifier.shape)}, got {tuple(weight.shape)}")
        with torch.no_grad():
            self.classifier.copy_(weight.to(self.classifier))
        self.classifier_ready = True

    def video_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, E) frame embeddings -> (B, E) video embedding, before normalisation."""
        x = batch["frame_emb"].float()
        if self.temporal is None:
            return x.mean(dim=1)  # TAP
        if isinstance(self.temporal, TemporalTransformer):
            return self.temporal(x)  # residual transformer, then mean
        return self.temporal(x).mean(dim=1)  # T1D: (B, T, E) -> (B, T, E) -> (B, E)

    def logits_from_embedding(self, video_emb: torch.Tensor) -> torch.Tensor:
        """(B, E) (e.g. averaged over views) -> (B, K) with the train or test scale."""
        if not self.classifier_ready:
            raise ConfigError("text4vis needs its classifier W: call set_classifier(W) first")
        scale = self.cfg.logit_scale if self.training else self.cfg.test_logit_scale
        return cosine_logits(video_emb, self.classifier, scale)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        video = self.video_embedding(batch)
        return {"logits": self.logits_from_embedding(video), "video_emb": video}
