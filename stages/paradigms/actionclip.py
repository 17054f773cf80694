"""ActionCLIP end to end (Wang et al., arXiv:2109.08472): the visual encoder, the text encoder and
the visual prompt of the stage-two ``actionclip`` head train; every training sample is matched with
the text of its label under one of the 16 templates (drawn per sample by the data), with the head's
symmetric KL loss between softmax(scale * video-text similarity) and the row-normalised same-label
matrix, over the whole global batch (accumulated micro-batches included: stages/finetune.py); the
scale is CLIP's ``logit_scale`` when it trains (clamped at 100, as CLIP does), else the head's. The
test averages the 16 templates of every class through the fine-tuned text encoder (the head's
evaluation rule) and the views' scores.
"""

from __future__ import annotations

import torch
from torch import nn

from cache.errors import ConfigError
from stages.dist import DistContext
from stages.paradigms.base import Paradigm, gather_outputs, register_paradigm, replicated
from stages.text import TEMPLATE_SETS, clip_text_embeddings

__all__ = ["ActionCLIP", "text_param_names"]

TEMPLATES = TEMPLATE_SETS["actionclip"]
CONTRASTED = ("video_emb", "text_emb")  # the outputs the loss matches across the batch


def text_param_names(clip: nn.Module) -> list[str]:
    """CLIP's text tower: every parameter outside the visual tower but the logit scale / bias."""
    return [n for n, _ in clip.named_parameters()
            if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias")]


@register_paradigm
class ActionCLIP(Paradigm):
    """Visual tower + visual prompt and text tower, matched video to text by the head's KL loss."""

    name = "actionclip"
    default_epochs = 50
    eval_average = "scores"
    train_templates = len(TEMPLATES)
    contrast_keys = CONTRASTED

    def __init__(self, clip: nn.Module, head: nn.Module):
        super().__init__(clip, head)
        self.tokens: torch.Tensor | None = None  # (K, M, ctx): not a buffer, not in the checkpoint

    @classmethod
    def head_values(cls) -> dict:
        return {"num_templates": len(TEMPLATES)}

    def assemble(self, cfg, tokenizer, classes: list[str], device: torch.device) -> None:
        super().assemble(cfg, tokenizer, classes, device)
        if self.head.cfg.num_templates != len(TEMPLATES):
            raise ConfigError(f"actionclip fine-tuning uses the {len(TEMPLATES)} ActionCLIP templates; "
                              f"num_templates must be {len(TEMPLATES)}")
        prompts = [t.format(c) for c in classes for t in TEMPLATES]
        self.tokens = tokenizer(prompts).view(len(classes), len(TEMPLATES), -1).to(device)  # (K, M, ctx)
        names = set(text_param_names(self.clip))
        for n, p in self.clip.named_parameters():
            if n in names:
                p.requires_grad_(True)
        self.clip.logit_scale.requires_grad_(bool(cfg.train_logit_scale))

    def trained_parts(self, cfg) -> list[tuple[str, list, float]]:
        lr = cfg.lr * cfg.backbone_ratio  # the encoders' lr
        names = set(text_param_names(self.clip))
        parts = [("text", [(n, p) for n, p in self.clip.named_parameters() if n in names], lr)]
        if cfg.train_logit_scale:  # CLIP's own parameter, at the encoders' lr (ActionCLIP trains it with the model)
            parts.append(("logit_scale", [("logit_scale", self.clip.logit_scale)], lr))
        return parts

    def text_inputs(self, labels: torch.Tensor, templates: torch.Tensor) -> torch.Tensor | None:
        return self.tokens[labels, templates]  # (B, ctx): each sample's label under its drawn template

    def forward(self, video: torch.Tensor, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = {"video_emb": self.head.video_embedding({"frame_emb": self.encode_frames(video)})}  # (B, E)
        if text is not None:
            out["text_emb"] = self.clip.encode_text(text)  # (B, E)
            if self.clip.logit_scale.requires_grad:  # trainable (ActionCLIP): clamped at 100 as CLIP does
                out["logit_scale"] = self.clip.logit_scale.exp().clamp(max=100.0)
        return out

    def loss(self, out: dict[str, torch.Tensor], labels: torch.Tensor, valid: torch.Tensor, count: int,
             n_valid: int, label_smoothing: float, dist: DistContext) -> tuple[torch.Tensor, float]:
        """The head's loss on the gathered batch (its in-batch negatives span every rank), weighted by
        the batch's share of the global batch. Under accumulation the loop passes the whole global
        batch's embeddings at once (``contrast_keys``), so one contrast spans all of it, as the paper's."""
        gathered, labels_g = gather_outputs(out, CONTRASTED, labels, valid, dist)
        if "logit_scale" in out:  # the same on every rank: its gradient counted once
            gathered["logit_scale"] = replicated(out["logit_scale"], dist)
        loss = self.head.loss(gathered, labels_g, label_smoothing)
        share = count / n_valid  # 1.0 without accumulation
        if share != 1.0:
            loss = loss * share
        return loss, float(loss.item())

    def prepare_eval(self, tokenizer, classes: list[str], device: torch.device) -> None:
        # the 16 templates of every class through the (fine-tuned) text encoder
        text = clip_text_embeddings(self.clip, tokenizer, classes, TEMPLATES, device=str(device))  # (K, M, E)
        self.head.set_classifier(torch.from_numpy(text))
