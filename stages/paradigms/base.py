"""A stage-three paradigm as an object: the whole open_clip model plus the stage-two head of the
paradigm's name, which parts of it train, the loss and the evaluation rule.

The pattern is open_clip's task objects (``CLIPTask``, ``SigLipTask`` in open_clip/task.py): the
module that wraps the model also owns how a batch becomes a loss, so the training loop
(stages/finetune.py) holds no branch per paradigm. A paradigm's state dict is its model's
(``clip.*``, ``head.*``): a run's checkpoint does not depend on this class.
"""

from __future__ import annotations

import torch
from torch import nn

from cache.errors import ConfigError
from stages.dist import DistContext

__all__ = ["Paradigm", "register_paradigm", "get_paradigm", "list_paradigms", "gather_outputs", "replicated"]

_PARADIGMS: dict[str, type["Paradigm"]] = {}


class Paradigm(nn.Module):
    """CLIP (its visual tower trains) plus a stage-two head that turns frame embeddings into a video
    embedding / logits. Subclasses say what else trains, the loss and how evaluation classifies."""

    name = ""
    default_epochs = 0        # the paper's epochs (FinetuneCfg.epochs = -1)
    eval_average = "scores"   # multi-view evaluation: "scores" | "embeddings" (FinetuneCfg.eval_average = "")
    train_templates = 0       # text templates drawn per training sample (0: none)
    contrast_keys: tuple[str, ...] = ()  # outputs the loss contrasts across the batch (ActionCLIP: video and text
    #                                      embeddings): under accumulation one contrast spans the global batch

    def __init__(self, clip: nn.Module, head: nn.Module):
        super().__init__()
        self.clip, self.head = clip, head

    # ------------------------------------------------------------------ assembly
    @classmethod
    def validate(cls, cfg) -> None:
        """Refuse FinetuneCfg values this paradigm cannot use (before anything is built)."""

    @classmethod
    def head_values(cls) -> dict:
        """Head options the paradigm sets, under the user's own."""
        return {}

    def assemble(self, cfg, tokenizer, classes: list[str], device: torch.device) -> None:
        """Mark what trains beside the visual tower and the head; install what the loss needs.
        Called once on CPU, before the model moves to ``device``."""
        self.clip.visual.requires_grad_(True)

    def trained_parts(self, cfg) -> list[tuple[str, list, float]]:
        """What trains beyond the visual tower and the head: (optimiser group name, named
        parameters, lr) for each part (e.g. the text tower); the loop builds the groups."""
        return []

    # ------------------------------------------------------------------ training
    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) normalised -> (B, T, E) frame embeddings."""
        B, T = video.shape[:2]
        return self.clip.encode_image(video.flatten(0, 1)).view(B, T, -1)  # (B*T, 3, S, S) -> (B*T, E) -> (B, T, E)

    def text_inputs(self, labels: torch.Tensor, templates: torch.Tensor) -> torch.Tensor | None:
        """What ``forward`` reads beside the video for these samples (None: nothing)."""
        return None

    def forward(self, video: torch.Tensor, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, out: dict[str, torch.Tensor], labels: torch.Tensor, valid: torch.Tensor, count: int,
             n_valid: int, label_smoothing: float, dist: DistContext) -> tuple[torch.Tensor, float]:
        """(this rank's loss of one micro-batch to back-propagate, before the world-size scaling; its
        share of the global batch's loss, the same on every rank). ``count``: the valid videos of this
        micro-batch over all ranks, ``n_valid``: those of the whole global batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation
    def prepare_eval(self, tokenizer, classes: list[str], device: torch.device) -> None:
        """Install the classifier evaluation uses (run before every evaluation)."""


def register_paradigm(cls: type[Paradigm]) -> type[Paradigm]:
    _PARADIGMS[cls.name] = cls
    return cls


def get_paradigm(name: str) -> type[Paradigm]:
    try:
        return _PARADIGMS[name]
    except KeyError:
        raise ConfigError(f"unknown paradigm '{name}'; choose one of {', '.join(_PARADIGMS)}") from None


def list_paradigms() -> tuple[str, ...]:
    return tuple(_PARADIGMS)


def gather_outputs(out: dict[str, torch.Tensor], keys, labels: torch.Tensor, valid: torch.Tensor,
                   dist: DistContext) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``out[keys]`` (float) and the labels of the whole world's micro-batch, padding removed; this
    rank's slice keeps its graph, so a loss over the gathered batch back-propagates into it."""
    keep = dist.all_cat(valid).bool()
    gathered = {k: dist.all_cat_with_grad(out[k].float())[keep] for k in keys}
    return gathered, dist.all_cat(labels)[keep]


def replicated(x: torch.Tensor, dist: DistContext) -> torch.Tensor:
    """``x`` as it enters a loss every rank computes whole (e.g. a trained logit scale): the same
    value, its gradient divided by the world size, so that the backward pass's world-size scaling and
    DDP's average give the global loss's gradient once rather than ``world`` times."""
    if not dist.enabled or dist.world == 1:
        return x
    share = x / dist.world
    return share + (x - share).detach()
