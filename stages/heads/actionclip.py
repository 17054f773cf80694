"""ActionCLIP: video-text matching over cached frame embeddings, with a post-network prompt.

Wang, Xing, Liu, "ActionCLIP: A New Paradigm for Video Action Recognition" (arXiv:2109.08472).
A post-network visual prompt turns the T frame embeddings into one video embedding; training
matches it against the text embedding of its label (one random template of the M per class)
with a symmetric KL loss; testing compares it with every class's text.

Prompts (cfg ``prompt``) and their trainable counts at E=512, 8 frames (all reproduced exactly):

- ``meanp``: mean over frames, 0.
- ``conv1d``: depthwise temporal conv k=3, no bias, shift-initialised (1/4 of the channels read
  frame t-1, 1/2 frame t, 1/4 frame t+1; ``conv_init="smooth"`` starts every channel as the
  kernel (1/4, 1/2, 1/4) instead), residual, mean: 3*512 + 77*512 = 40,960.
- ``lstm``: one LSTM layer (hidden E), residual, mean: 2,101,248 + 39,424 = 2,140,672.
- ``transf``: 6 CLIP blocks + a 77-row frame position table, residual, mean:
  6 * 3,152,384 + 39,424 = 18,953,728.
- ``transf_cls``: a class token, a (T+1)-row position table, 6 post-norm encoder layers (ReLU,
  MLP x4, dropout ``cls_dropout``), a final LayerNorm, output at the class token:
  18,914,304 + 1,024 + 512 + 9 * 512 + 39,424 = 18,959,872.

Where the 39,424 comes from: the reference allocates a 77 x E frame position table (77 is CLIP's
text context length) for every prompt but MeanP, yet only ``transf`` uses it. Here the table is
used by all four: ``transf`` as in the reference (init N(0, 0.02)); ``conv1d``, ``lstm`` and
``transf_cls`` add it to the frames the prompt reads, initialised to zero, so at initialisation
each computes exactly the reference function, the published counts hold, and no parameter is
left without a gradient (an unused parameter breaks DDP without find_unused_parameters).

Other differences from the reference code, on purpose:

- Conv1D convolves along time. The reference reshapes (B, T, E) to (B, E, T) with ``view``,
  which interleaves frames and channels instead of transposing them.
- Ground truth: the row-normalised "same label" matrix, as the paper describes; the reference
  uses softmax(10 * same), which puts ~e^-10 of mass on each other-label entry. The loss is
  ``kl_div(log_softmax(sim), gt, reduction="batchmean")`` for video->text and text->video,
  averaged; that is KL(gt || softmax(sim)), the direction ``nn.KLDivLoss`` computes (the reverse
  is infinite wherever gt is 0). ``label_smoothing`` mixes gt with the uniform distribution.
- Logit scale: a cfg float, 100 by default. ActionCLIP multiplies by CLIP's learned
  ``logit_scale.exp()`` in training, which is 100 for the pretrained CLIP checkpoints (CLIP
  clamps it at 100), and by a hard-coded 100 at test; stage two has no CLIP model to learn it.
- Test-time template average (``template_average``): by default the M normalised text
  embeddings of a class are averaged and renormalised, then logits = scale * cos(video, class).
  That is CLIP's prompt ensembling (in embedding space): one (K, E) matrix like every other
  text-classifier head, computed without a softmax per template. The reference averages
  *scores* instead (softmax over classes per template, then the mean over templates);
  ``template_average="score"`` does that and returns the log of the averaged probabilities.
- The random template is a training augmentation: in eval mode ``loss`` uses the averaged class
  embedding instead, so a validation loss is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cache.errors import ConfigError
from stages.heads.common import (
    FramePosition,
    TemporalConv1D,
    TemporalTransformer,
    cosine_logits,
    default_heads,
    track_loaded,
    validate_choice,
)
from stages.heads.facts import SCALE_256, PaperRecipe, Protocol, PublishedResult, TrainPipeline
from stages.heads.registry import DataKeys, Head, Reference, register_head

__all__ = ["ActionClipCfg", "ClsTokenAggregator", "VisualPrompt", "ActionClipHead", "video_text_kl_loss"]

PROMPTS = ("meanp", "conv1d", "lstm", "transf", "transf_cls")
TEMPLATE_AVERAGES = ("embedding", "score")
_B16 = {"embed_dim": 512, "frames": 8, "num_classes": 400}
_SRC = "ActionCLIP (arXiv:2109.08472)"

# Kinetics-400 top-1 / top-5 of the official repository's README.md "Kinetics-400" table (the same as
# MODEL_ZOO.md; the paper's Table 6), end to end (stage three, the actionclip paradigm, from OpenAI's
# CLIP), the Transf prompt. "single-crop": one view (its test config takes one clip of segment centres,
# random_shift off): views 1x1, sampling segment. Left out: the HMDB-51 and UCF-101 tables (ViT-B/16,
# 32 frames, 76.2 and 97.1): those runs start from a Kinetics-400 model, not OpenAI's weights.
_ZOO = ("ActionCLIP (arXiv:2109.08472, Table 6): sallymmx/ActionCLIP README.md, Pretrained Models, "
        "Kinetics-400 table")


def _k400(backbone: str, frames: int, top1: float, top5: float) -> PublishedResult:
    return PublishedResult(dataset="k400", backbone=backbone, frames=frames, views="1x1", top1=top1, top5=top5,
                           sampling="segment", stage="finetune", source=_ZOO)


@dataclass
class ActionClipCfg:
    num_classes: int = 400
    embed_dim: int = 512
    frames: int = 8
    prompt: str = "transf"  # "meanp" | "conv1d" | "lstm" | "transf" | "transf_cls"
    layers: int = 6  # transformer depth of transf / transf_cls
    heads: int = 0  # attention heads; 0 = embed_dim / 64
    pos_rows: int = 77  # frame position table rows (CLIP's text context length)
    num_templates: int = 16  # text templates per class (M)
    logit_scale: float = 100.0  # CLIP's pretrained logit_scale.exp(); train and test
    template_average: str = "embedding"  # "embedding" | "score" (the reference's test rule)
    conv_init: str = "shift"  # conv1d init: "shift" (reference) | "smooth" | "identity"
    cls_dropout: float = 0.1  # dropout inside the transf_cls encoder layers (torch default)
    seed: int = -1  # random template choice: -1 = the global torch RNG, else a seeded generator


def video_text_kl_loss(video: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: float,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """ActionCLIP's matching loss over (video i, text of sample j) pairs, text given per sample.

    KL(gt || softmax(scale * sim)) video->text and text->video, batchmean, averaged; gt is the
    row-normalised same-label matrix. ``ActionClipHead.loss`` computes it; in stage three the
    text comes from a trainable text encoder rather than this head's fixed table.
    """
    sim = cosine_logits(video.float(), text.float(), scale)  # (B videos, B texts)
    same = (labels[:, None] == labels[None, :]).float()  # symmetric
    target = same / same.sum(dim=1, keepdim=True)  # row-normalised; the same for both directions
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / video.shape[0]
    v2t = F.kl_div(F.log_softmax(sim, dim=1), target, reduction="batchmean")
    t2v = F.kl_div(F.log_softmax(sim.t(), dim=1), target, reduction="batchmean")
    return 0.5 * (v2t + t2v)


class ClsTokenAggregator(nn.Module):
    """Transf_cls: prepend a class token, add a (T+1)-row position table, encode, read the token.

    Post-norm encoder layers with ReLU and an MLP of 4E (torch's ``nn.TransformerEncoderLayer``,
    what the reference builds; its 2048-wide MLP is 4E at E=512), then a final LayerNorm.
    """

    def __init__(self, width: int, frames: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.frames = frames
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, frames + 1, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout,
                                           activation="relu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        std = 0.02
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
        for mod in self.encoder.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.MultiheadAttention):
                nn.init.xavier_uniform_(mod.in_proj_weight)  # each layer its own draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        if T != self.frames:
            raise ConfigError(f"transf_cls was built for {self.frames} frames, got {T}; set frames={T}")
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1+T, E)
        x = x + self.pos_embed.to(x.dtype)
        return self.encoder(x)[:, 0]  # (B, 1+T, E) -> (B, E)


class VisualPrompt(nn.Module):
    """Frame embeddings (B, T, E) -> video embedding (B, E) by one of the ActionCLIP prompts."""

    def __init__(self, cfg: ActionClipCfg):
        super().__init__()
        self.kind = validate_choice("prompt", cfg.prompt, PROMPTS)
        E = cfg.embed_dim
        heads = default_heads(E, cfg.heads)
        if self.kind != "meanp" and cfg.frames > cfg.pos_rows:
            raise ConfigError(f"frames={cfg.frames} exceeds the frame position table (pos_rows={cfg.pos_rows})")
        if self.kind == "transf":
            self.transformer = TemporalTransformer(E, layers=cfg.layers, heads=heads, pos_rows=cfg.pos_rows)
        elif self.kind != "meanp":
            self.position = FramePosition(cfg.pos_rows, E, std=0.0)  # zero: reference function at init
        if self.kind == "conv1d":
            self.conv = TemporalConv1D(E, init=cfg.conv_init, residual=False)
        elif self.kind == "lstm":
            self.lstm = nn.LSTM(E, E, num_layers=1, batch_first=True)
        elif self.kind == "transf_cls":
            self.aggregator = ClsTokenAggregator(E, cfg.frames, cfg.layers, heads, cfg.cls_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "meanp":
            return x.mean(dim=1)
        if self.kind == "transf":
            return self.transformer(x)
        h = self.position(x)
        if self.kind == "conv1d":
            return (x + self.conv(h)).mean(dim=1)
        if self.kind == "lstm":
            return (x + self.lstm(h)[0]).mean(dim=1)
        return self.aggregator(h)


def _ref(label: str, prompt: str, expected: int) -> Reference:
    return Reference(f"ActionCLIP {label}, ViT-B/16, 8 frames, K400", {"prompt": prompt, **_B16}, expected, _SRC)


@register_head(
    "actionclip",
    ActionClipCfg,
    tiny={"num_classes": 5, "embed_dim": 32, "frames": 4, "prompt": "transf", "layers": 2,
          "pos_rows": 8, "num_templates": 3},
    references=(
        _ref("Transf", "transf", 18_953_728),
        _ref("Transf_cls", "transf_cls", 18_959_872),
        _ref("LSTM", "lstm", 2_140_672),
        _ref("Conv1D", "conv1d", 40_960),
        Reference("ActionCLIP MeanP, ViT-B/16, 8 frames, K400", {"prompt": "meanp", **_B16}, 0,
                  "ActionCLIP (arXiv:2109.08472); no parameters by construction"),
    ),
    paper_recipe=PaperRecipe(
        "ActionCLIP prompt values (its stage-three recipe's visual-prompt part): AdamW lr 5e-5, betas "
        "(0.9, 0.98), weight decay 0.2 on all parameters, 50 epochs, 5 warm-up, batch 128; test: "
        "per-template softmax, then mean",
        {"epochs": 50, "global_batch": 128, "lr": 5e-5, "weight_decay": 0.2, "decay_all": True,
         "beta1": 0.9, "beta2": 0.98, "warmup_epochs": 5.0, "label_smoothing": 0.0}, 128,
        head={"template_average": "score"},
        note="ActionCLIP publishes no recipe over frozen features: `paper` is the visual prompt's values "
             "of its end-to-end recipe"),
    protocol=Protocol(
        "actionclip", 8, "segment", 8, "1x1", SCALE_256, "scores", template_average="score",
        paper="8 frames, one view, scale 256 then crop 224; per-template softmax over the 16 "
              "templates, then the mean",
        differs="segment t gives frame int((t + 1/2) n / 8) (TSN); ActionCLIP's code takes "
                "int(t n / 8 + (n / 8 - 1) / 2), at most one frame earlier"),
    # its K400 config (SPEC section 7; its HMDB/UCF configs set RandAugment N 0); scale 256 first as the
    # project's stage-three ActionCLIP recipe (stages/recipes.py)
    train_aug=TrainPipeline(
        "ActionCLIP's official K400 train code: random TSN offsets, RandAugment N2 M9 drawn per frame, "
        "multi-scale crop (1, .875, .75, .66), flip p 0.5, colour jitter p 0.8 (0.4, 0.4, 0.2, 0.1), "
        "grayscale p 0.2",
        clip="segment", resize_ratio=SCALE_256, crop="multiscale", ms_scales=(1.0, 0.875, 0.75, 0.66),
        ms_max_distort=1, interpolation="bilinear", flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4,
        saturation=0.2, hue=0.1, grayscale=0.2, ra_ops=2, ra_magnitude=9, ra_per_frame=True, ra_before_crop=True),
    published=(
        _k400("ViT-B-32", 8, 78.36, 94.25),
        _k400("ViT-B-16", 8, 81.09, 95.49),
        _k400("ViT-B-16", 16, 81.68, 95.87),
        _k400("ViT-B-16", 32, 82.32, 96.20),
    ),
)
class ActionClipHead(Head):
    """Visual prompt + symmetric-KL video-text matching against M frozen templates per class."""

    has_classifier = True
    batch_loss = True  # its KL targets are the same-label matrix of the batch

    def __init__(self, cfg: ActionClipCfg):
        super().__init__(cfg)
        validate_choice("template_average", cfg.template_average, TEMPLATE_AVERAGES)
        if cfg.num_templates < 1:
            raise ConfigError(f"num_templates must be at least 1, got {cfg.num_templates}")
        self.prompt = VisualPrompt(cfg)
        self.register_buffer("text", torch.zeros(cfg.num_classes, cfg.num_templates, cfg.embed_dim))
        self.classifier_ready = False
        track_loaded(self, "classifier_ready", "text")
        self._generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed >= 0 else None

    def data_keys(self) -> DataKeys:
        return DataKeys(frame_emb=True)

    def classifier_shape(self) -> tuple[int, ...]:
        return (self.cfg.num_classes, self.cfg.num_templates, self.cfg.embed_dim)

    def set_classifier(self, text: torch.Tensor) -> None:
        """Install the class text embeddings (K, M, E), one per template; kept frozen."""
        text = torch.as_tensor(text)
        if text.dim() == 2 and self.cfg.num_templates == 1:
            text = text.unsqueeze(1)  # (K, E) -> (K, 1, E)
        if tuple(text.shape) != self.classifier_shape():
            raise ConfigError(
                f"actionclip text must be (classes, templates, E) = {self.classifier_shape()}, "
                f"got {tuple(text.shape)}; set num_templates to the cache's template count"
            )
        with torch.no_grad():
            self.text.copy_(text.to(self.text))
        self.classifier_ready = True

    def class_embedding(self) -> torch.Tensor:
        """(K, M, E) -> (K, E): mean of the normalised templates, renormalised."""
        return F.normalize(F.normalize(self.text, dim=-1).mean(dim=1), dim=-1)

    def _check_ready(self) -> None:
        if not self.classifier_ready:
            raise ConfigError("actionclip needs the class text embeddings: call set_classifier(text) first")

    def video_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, E) frame embeddings -> (B, E) through the visual prompt, before normalisation."""
        return self.prompt(batch["frame_emb"].float())

    def logits_from_embedding(self, video: torch.Tensor) -> torch.Tensor:
        """(B, E) (e.g. averaged over views) -> (B, K) by the head's template-averaging rule."""
        self._check_ready()
        scale = self.cfg.logit_scale
        if self.cfg.template_average == "embedding":
            return cosine_logits(video, self.class_embedding(), scale)
        K, M, E = self.text.shape
        per_template = cosine_logits(video, self.text.reshape(K * M, E), scale)  # (B, K*M)
        per_template = per_template.reshape(-1, K, M).softmax(dim=1)  # over classes, per template
        return per_template.mean(dim=2).clamp_min(1e-30).log()  # (B, K)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check_ready()
        video = self.video_embedding(batch)
        return {"logits": self.logits_from_embedding(video), "video_emb": video}

    # the template draws continue across a resume: the generator state travels in the state dict
    def get_extra_state(self) -> dict:
        return {"template_rng": self._generator.get_state()} if self._generator is not None else {}

    def set_extra_state(self, state: dict) -> None:
        if self._generator is not None and state.get("template_rng") is not None:
            self._generator.set_state(state["template_rng"])

    def _draw_templates(self, n: int, device: torch.device) -> torch.Tensor:
        M = self.cfg.num_templates
        if self._generator is None:
            return torch.randint(M, (n,), device=device)
        return torch.randint(M, (n,), generator=self._generator).to(device)

    def loss(self, out: dict[str, torch.Tensor], labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Symmetric KL between softmax(scale * video-text similarity) and the same-label matrix.

        ``out["text_emb"]`` (B, E), when given, is each sample's text from a trainable text encoder
        (stage three) in place of this head's frozen table; ``out["logit_scale"]`` a learned scale in
        place of the cfg's."""
        video = out["video_emb"].float()
        B = video.shape[0]
        if "text_emb" in out:
            text = out["text_emb"]
        elif self.training:
            self._check_ready()
            text = self.text[labels, self._draw_templates(B, labels.device)]  # (B, E), one template each
        else:
            self._check_ready()
            text = self.class_embedding()[labels]  # (B, E)
        scale = out["logit_scale"].float() if "logit_scale" in out else self.cfg.logit_scale
        return video_text_kl_loss(video, text, labels, scale, label_smoothing)
