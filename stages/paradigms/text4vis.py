"""Text4Vis end to end (Wu et al., arXiv:2207.01297): the CLIP visual encoder and the temporal
module of the stage-two ``text4vis`` head train; the classifier W is the frozen matrix of class
text embeddings, computed once with the CLIP text tower from the class names and the template
"a video of a person {}."; cross-entropy on ``scale * cos(video, W)`` (the head's logits). The
test averages the views' video embeddings before classifying, as the paper does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cache.errors import ConfigError
from stages.dist import DistContext
from stages.paradigms.base import Paradigm, register_paradigm
from stages.text import TEMPLATE_SETS, clip_text_embeddings

__all__ = ["TEXT4VIS_TEMPLATE", "Text4Vis"]

TEXT4VIS_TEMPLATE = TEMPLATE_SETS["single"][0]  # "a video of a person {}."


@register_paradigm
class Text4Vis(Paradigm):
    """Visual tower + temporal module against a frozen text classifier W (K, E)."""

    name = "text4vis"
    default_epochs = 30
    eval_average = "embeddings"

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.train_logit_scale:
            raise ConfigError("train_logit_scale applies to actionclip only (Text4Vis keeps a fixed scale)")

    def assemble(self, cfg, tokenizer, classes: list[str], device: torch.device) -> None:
        super().assemble(cfg, tokenizer, classes, device)
        # W: the frozen text tower's embeddings of "a video of a person {class}.", once.
        w = clip_text_embeddings(self.clip, tokenizer, classes, [TEXT4VIS_TEMPLATE])[:, 0]  # (K, 1, E) -> (K, E)
        self.head.set_classifier(torch.from_numpy(w))

    def forward(self, video: torch.Tensor, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.head({"frame_emb": self.encode_frames(video)})  # logits (B, K), video_emb (B, E)

    def loss(self, out: dict[str, torch.Tensor], labels: torch.Tensor, valid: torch.Tensor, count: int,
             n_valid: int, label_smoothing: float, dist: DistContext) -> tuple[torch.Tensor, float]:
        """The head's cross-entropy per sample, summed over this rank's valid videos and divided by
        the global batch's valid count: accumulated micro-batches add up to the whole batch's mean
        (and its gradient), and the ranks' slices need no gathering (the loss is per sample)."""
        per = F.cross_entropy(out["logits"].float(), labels, reduction="none", label_smoothing=label_smoothing)
        local = (per * valid).sum()
        return local / n_valid, float(dist.all_sum(local.detach()).item()) / n_valid
