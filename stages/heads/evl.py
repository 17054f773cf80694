"""EVL: a temporal transformer decoder over the token maps of a frozen CLIP ViT.

Lin et al., "Frozen CLIP Models are Efficient Video Learners", ECCV 2022.

A learned query token is refined by M decoder layers; decoder layer i cross-attends to the
tokens (CLS + patches, all T frames at once) of backbone block N-M+i. Before each decoder
layer the frame tokens get three optional temporal additions: a depthwise temporal Conv1d
(k=3), a temporal position embedding (T x D, zero init) and temporal cross attention (TCA):
attention maps between the patches of adjacent frames (t -> t-1 and t -> t+1), computed
from the frozen block's own q/k per backbone head and averaged over heads, turn learned
relative-position weights ((2S-1)^2 x D per direction, zero init, S = sqrt(P)) into a
D-vector per patch. Output: LN -> dropout -> linear on the query.

Faithful: the layer structure, the decoder layer (q/k/v/out projections with bias, three
LayerNorms, MLP x4 with QuickGELU and dropout 0.5), the inits of the decoder layer (xavier,
zero attention biases, tiny MLP biases), the zero inits of the position embedding and TCA,
and the trainable counts. All four paper configurations match exactly (ViT-B/16, K=400):
7,408,528 / 28,704,400 / 28,778,128 / 33,183,376. Per layer that is decoder 7,089,408 +
conv 3,072 + position T*768 (+ TCA 1,119,744); once: query 768 + LN 1,536 + fc 307,600.

Different:
- The frozen q/k are recomputed from the cached input of each tapped block (the output of
  the block before it) with that block's frozen ln_1 and the q/k rows of its in_proj, so the
  cache holds one more layer when TCA is on; the backbone needs at least M+1 blocks then.
  EVL takes q/k from the running backbone; the values are the same up to cache precision.
  The extra layer's CLS token is read (cls and patch share one L axis) but not used.
- Those frozen weights are non-trainable persistent buffers filled by stage two through
  ``set_backbone_weights``. Until then they are a deterministic stand-in (LayerNorm identity,
  in_proj ~ N(0, 1/D) from a fixed seed per layer) so the head runs standalone (tests).
  Only the q/k rows (2D x D) of in_proj are kept.
- The query starts at N(0, 0.02) (the init EVL defines but never calls; its query starts at
  zero, where LayerNorm's gradient is 1/sqrt(eps) times larger).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cache.errors import CacheMismatchError, ConfigError
from stages.heads.common import QuickGELU
from stages.heads.facts import PaperRecipe, Protocol, PublishedResult, TrainPipeline
from stages.heads.registry import DataKeys, Head, Reference, register_head

__all__ = ["BACKBONE_WEIGHT_KEYS", "EVLCfg", "FrozenQK", "TemporalCrossAttention", "DecoderLayer", "EVLHead"]

# open_clip names inside visual.transformer.resblocks[j] that TCA needs.
BACKBONE_WEIGHT_KEYS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias")


@dataclass
class EVLCfg:
    num_classes: int = 400     # K
    width: int = 768           # D, backbone token width (the decoder runs at this width)
    frames: int = 8            # T
    num_patches: int = 196     # P; a square S*S when use_tca
    depth: int = 12            # N backbone blocks; only checked against num_layers
    backbone_heads: int = 12   # heads of the frozen ViT (TCA maps are per head, then averaged)
    num_layers: int = 4        # M decoder layers over the last M blocks
    decoder_heads: int = 0     # 0: width // 64
    mlp_ratio: float = 4.0
    dropout: float = 0.5       # inside the decoder MLP
    cls_dropout: float = 0.5   # before the classifier
    use_temporal_conv: bool = True
    use_temporal_pos: bool = True
    use_tca: bool = True


class FrozenQK(nn.Module):
    """A frozen block's ln_1 and the q/k rows of its in_proj, as buffers (checkpointed)."""

    def __init__(self, width: int, heads: int, seed: int):
        super().__init__()
        self.heads, self.seed = heads, seed
        self.register_buffer("ln_weight", torch.empty(width), persistent=True)
        self.register_buffer("ln_bias", torch.empty(width), persistent=True)
        self.register_buffer("qk_weight", torch.empty(2 * width, width), persistent=True)
        self.register_buffer("qk_bias", torch.empty(2 * width), persistent=True)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Deterministic stand-in until the real backbone weights are set."""
        if self.qk_weight.is_meta:
            return
        width = self.ln_weight.numel()
        g = torch.Generator().manual_seed(self.seed)
        self.ln_weight.fill_(1.0)
        self.ln_bias.zero_()
        self.qk_weight.copy_(torch.randn(2 * width, width, generator=g) / math.sqrt(width))
        self.qk_bias.zero_()

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor], where: str) -> None:
        missing = [k for k in BACKBONE_WEIGHT_KEYS if k not in weights]
        if missing:
            raise ConfigError(f"backbone weights for block {where} lack {missing}; need {list(BACKBONE_WEIGHT_KEYS)}")
        width = self.ln_weight.numel()
        rows = 2 * width  # in_proj is (3D, D) = [q; k; v]; TCA needs q and k only
        w, b = weights["attn.in_proj_weight"], weights["attn.in_proj_bias"]
        if w.shape[1:] != (width,) or w.shape[0] < rows or b.shape[0] < rows:
            raise ConfigError(f"block {where}: in_proj of shape {tuple(w.shape)} does not fit width {width}")
        if weights["ln_1.weight"].shape != (width,):
            shape = tuple(weights["ln_1.weight"].shape)
            raise ConfigError(f"block {where}: ln_1 of shape {shape}, expected ({width},)")
        self.ln_weight.copy_(weights["ln_1.weight"])
        self.ln_bias.copy_(weights["ln_1.bias"])
        self.qk_weight.copy_(w[:rows])
        self.qk_bias.copy_(b[:rows])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., N, D) block input -> q, k (..., N, H, D/H), as the block's attention sees them."""
        x = F.layer_norm(x, x.shape[-1:], self.ln_weight.to(x.dtype), self.ln_bias.to(x.dtype))
        qk = F.linear(x, self.qk_weight.to(x.dtype), self.qk_bias.to(x.dtype))
        q, k = qk.chunk(2, dim=-1)
        head_dim = q.shape[-1] // self.heads
        return q.unflatten(-1, (self.heads, head_dim)), k.unflatten(-1, (self.heads, head_dim))  # (..., N, H, D/H)


class TemporalCrossAttention(nn.Module):
    """Patch-to-patch attention between adjacent frames, read out through relative-position weights."""

    def __init__(self, width: int, side: int):
        super().__init__()
        offsets = (2 * side - 1) ** 2
        self.w_prev = nn.Parameter(torch.zeros(offsets, width))  # frame t looking at t-1
        self.w_next = nn.Parameter(torch.zeros(offsets, width))  # frame t looking at t+1
        pos = torch.arange(side * side)
        row, col = pos // side, pos % side
        d_row = row[:, None] - row[None, :] + side - 1  # (P, P) query row - key row, shifted >= 0
        d_col = col[:, None] - col[None, :] + side - 1
        self.register_buffer("rel_index", d_row * (2 * side - 1) + d_col, persistent=False)

    def _direction(self, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # q, k: (B, T', P, H, Dh); attention over key patches per head, then the head mean.
        logits = torch.einsum("btqhc,btkhc->bthqk", q * q.shape[-1] ** -0.5, k)  # (B, T', H, P, P)
        attn = logits.softmax(dim=-1).mean(dim=2)  # (B, T', P, P)
        return torch.einsum("btqk,qkd->btqd", attn, w[self.rel_index])  # (B, T', P, D)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q, k (B, T, P, H, Dh) -> (B, T, P, D); the first/last frame lack a previous/next one."""
        B, T, P = q.shape[:3]
        if T < 2:
            return q.new_zeros(B, T, P, self.w_prev.shape[1])
        prev = self._direction(q[:, 1:], k[:, :-1], self.w_prev)  # (B, T-1, P, D) for t = 1..T-1
        nxt = self._direction(q[:, :-1], k[:, 1:], self.w_next)  # (B, T-1, P, D) for t = 0..T-2
        return F.pad(prev, (0, 0, 0, 0, 1, 0)) + F.pad(nxt, (0, 0, 0, 0, 0, 1))  # (B, T, P, D)


class DecoderLayer(nn.Module):
    """CLIP-style residual block whose attention is query -> frame tokens (cross attention)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)
        hidden = round(mlp_ratio * width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), QuickGELU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        for lin in (self.mlp[0], self.mlp[3]):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.normal_(lin.bias, std=1e-6)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x (B, 1, D) query; tokens (B, T*(1+P), D) -> (B, 1, D)."""
        kv = self.norm_kv(tokens)
        q = self.q_proj(self.norm_q(x)).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, 1, Dh)
        k = self.k_proj(kv).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, T*(1+P), Dh)
        v = self.v_proj(kv).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, T*(1+P), Dh)
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, 1, D)
        x = x + self.out_proj(mixed)
        return x + self.mlp(self.norm_mlp(x))


class EVLLayer(nn.Module):
    """Temporal additions to one block's frame tokens, then one decoder layer."""

    def __init__(self, cfg: EVLCfg, heads: int, index: int):
        super().__init__()
        D = cfg.width
        self.conv = nn.Conv1d(D, D, kernel_size=3, padding=1, groups=D) if cfg.use_temporal_conv else None
        self.pos = nn.Parameter(torch.zeros(cfg.frames, D)) if cfg.use_temporal_pos else None
        if cfg.use_tca:
            self.qk = FrozenQK(D, cfg.backbone_heads, seed=1000 + index)
            self.tca = TemporalCrossAttention(D, math.isqrt(cfg.num_patches))
        else:
            self.qk = self.tca = None
        self.decoder = DecoderLayer(D, heads, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, block_input: torch.Tensor | None) -> torch.Tensor:
        """x (B, 1, D); tokens (B, T, 1+P, D) block output; block_input (B, T, P, D) patches or None."""
        B, T, N, D = tokens.shape
        feats = tokens
        if self.conv is not None:
            seq = tokens.permute(0, 2, 3, 1).reshape(B * N, D, T)  # (B*(1+P), D, T)
            feats = feats + self.conv(seq).reshape(B, N, D, T).permute(0, 3, 1, 2)  # (B, T, 1+P, D)
        if self.pos is not None:
            feats = feats + self.pos.view(1, T, 1, D)
        if self.tca is not None:
            q, k = self.qk(block_input)  # (B, T, P, H, Dh) each
            feats = feats + F.pad(self.tca(q, k), (0, 0, 1, 0))  # (B, T, 1+P, D), zero at CLS
        return self.decoder(x, feats.flatten(1, 2))  # tokens (B, T*(1+P), D)


def _paper(label: str, layers: int, frames: int, tca: bool, expected: int) -> Reference:
    dims = {"width": 768, "num_patches": 196, "backbone_heads": 12, "num_classes": 400, "depth": 12}
    return Reference(label, {**dims, "num_layers": layers, "frames": frames, "use_tca": tca}, expected,
                     "Lin et al. ECCV 2022 (EVL), ViT-B/16, K400")


# Kinetics-400 top-1 / top-5 of the official repository's "Kinetics-400 Main Results" table (4 decoder
# layers, the head's default), over OpenAI's CLIP. The table gives frames x stride (dense sampling)
# but no views; each row's views are those of its eval script in the same repository: the 8-frame
# ones 3 temporal x 1 spatial ("3x1"), the 16- and 32-frame ones 1 temporal x 3 spatial ("1x3"; one
# clip at the middle start, crops at 0, 1/2 and 1 of the free room, as stages/video.py takes them).
# Left out: ViT-L/14 (336px) 32 x 8 (87.7 / 97.8): the repository has no eval script for it, so its
# test views are unknown.
_ZOO = ("EVL (Lin et al., ECCV 2022): OpenGVLab/efficient-video-recognition README.md, Kinetics-400 Main "
        "Results table; views from its scripts/eval_k400_*.sh")


def _k400(backbone: str, frames: int, stride: int, views: str, top1: float, top5: float) -> PublishedResult:
    return PublishedResult(dataset="k400", backbone=backbone, frames=frames, views=views, top1=top1, top5=top5,
                           sampling="dense", stride=stride, source=_ZOO)


@register_head(
    "evl",
    EVLCfg,
    # One decoder layer keeps it usable on the 2-block test backbone (TCA needs M+1 blocks).
    tiny={"num_classes": 5, "width": 64, "frames": 4, "num_patches": 16, "depth": 2, "backbone_heads": 4,
          "num_layers": 1, "decoder_heads": 2},
    references=(
        _paper("1 layer, 8 frames, no TCA", 1, 8, False, 7_408_528),
        _paper("4 layers, 8 frames, no TCA", 4, 8, False, 28_704_400),
        _paper("4 layers, 32 frames, no TCA", 4, 32, False, 28_778_128),
        _paper("4 layers, 8 frames, TCA", 4, 8, True, 33_183_376),
    ),
    paper_recipe=PaperRecipe(
        "EVL (K400, ViT-B/16, 8 frames): AdamW lr 4e-4, weight decay 0.05 on all parameters, cosine, "
        "no warm-up, 50k steps at batch 256 (~53 epochs), fp16 on GPU",
        {"epochs": 53, "global_batch": 256, "lr": 4e-4, "weight_decay": 0.05, "decay_all": True,
         "beta1": 0.9, "beta2": 0.999, "warmup_epochs": 0.0, "label_smoothing": 0.0}, 256, cuda={"amp": "fp16"}),
    protocol=Protocol(
        "evl", 8, "dense", 16, "3x1", 1.0, "scores",
        paper="dense 8 x 16, 3 temporal x 1 spatial views (clip starts at 0, 1/2, 1 of the slack, "
              "round(slack / 2 * c)), softmax averaged, short side 224",
        differs="the short side is resized bicubic (antialiased) on uint8 frames; EVL's code resizes "
                "the normalised frames bilinearly, the long side rounded down"),
    # view bank: none (bench/bench_viewbank.py: the plain cache's mean was highest, within the spread)
    train_aug=TrainPipeline(
        "EVL's official train code: a random dense clip, RandAugment m7 n4 with the same ops for every "
        "frame (its rand-m7-n4-mstd0.5-inc1 here as torchvision's op table at bin 7), then a random resized "
        "crop 0.08-1 bilinear of the whole frame; no flip (its --no_mirror is parsed, never used)",
        clip="dense", crop="random_resized", area=(0.08, 1.0), interpolation="bilinear", flip=0.0,
        ra_ops=4, ra_magnitude=7, ra_per_frame=False, ra_before_crop=True),
    published=(
        _k400("ViT-B-16", 8, 16, "3x1", 82.9, 95.7),
        _k400("ViT-B-16", 16, 16, "1x3", 83.6, 96.3),
        _k400("ViT-B-16", 32, 8, "1x3", 84.2, 96.6),
        _k400("ViT-L-14", 8, 16, "3x1", 86.3, 97.2),
        _k400("ViT-L-14", 16, 16, "1x3", 87.0, 97.6),
        _k400("ViT-L-14", 32, 8, "1x3", 87.3, 97.7),
    ),
)
class EVLHead(Head):
    def __init__(self, cfg: EVLCfg):
        super().__init__(cfg)
        D, M = cfg.width, cfg.num_layers
        heads = cfg.decoder_heads or max(1, D // 64)
        if M < 1 or cfg.frames < 1:
            raise ConfigError(f"evl needs num_layers >= 1 and frames >= 1, got {M} and {cfg.frames}")
        if D % heads:
            raise ConfigError(f"evl: width {D} is not divisible by decoder_heads {heads}")
        if M + cfg.use_tca > cfg.depth:
            need = f"{M + 1} blocks (M layers + the input of the first, for TCA)" if cfg.use_tca else f"{M} blocks"
            raise ConfigError(f"evl with num_layers={M} needs {need}; the backbone has {cfg.depth}")
        if cfg.use_tca:
            if D % cfg.backbone_heads:
                raise ConfigError(f"evl: width {D} is not divisible by backbone_heads {cfg.backbone_heads}")
            if math.isqrt(cfg.num_patches) ** 2 != cfg.num_patches:
                raise ConfigError(f"evl TCA needs a square patch grid, got num_patches={cfg.num_patches}; "
                                  "set use_tca=false")
        self.query = nn.Parameter(torch.randn(D) * 0.02)
        self.layers = nn.ModuleList(EVLLayer(cfg, heads, i) for i in range(M))
        self.norm = nn.LayerNorm(D)
        self.drop = nn.Dropout(cfg.cls_dropout)
        self.fc = nn.Linear(D, cfg.num_classes)

    def _layers(self) -> tuple[int, ...]:
        first = self.cfg.num_layers + (1 if self.cfg.use_tca else 0)
        return tuple(range(-first, 0))

    def data_keys(self) -> DataKeys:
        layers = self._layers()
        return DataKeys(cls_layers=layers, patch_layers=layers,
                        backbone_weights=BACKBONE_WEIGHT_KEYS if self.cfg.use_tca else ())

    def set_backbone_weights(self, weights: dict[int, dict[str, torch.Tensor]]) -> None:
        """Install the frozen ln_1 / in_proj of blocks -M..-1 (keys: relative or 1-based block numbers).

        Extra blocks (e.g. -M-1, whose output is only TCA input) are ignored; a no-op without TCA.
        """
        if not self.cfg.use_tca:
            return
        M, N = self.cfg.num_layers, self.cfg.depth
        for i, layer in enumerate(self.layers):
            rel = i - M  # decoder layer i reads block N-M+i, i.e. relative -M+i
            entry = weights.get(rel, weights.get(N + 1 + rel))
            if entry is None:
                raise ConfigError(f"evl: no backbone weights for block {rel}; got blocks {sorted(weights)}")
            layer.qk.load(entry, str(rel))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cls, patch = batch["cls"], batch["patch"]  # (B, T, L, D), (B, T, L, P, D)
        B, T, L, P, D = patch.shape
        cfg, dtype = self.cfg, self.query.dtype
        if L != len(self._layers()) or cls.shape[2] != L or D != cfg.width:
            raise CacheMismatchError(f"evl expects {len(self._layers())} layers of width {cfg.width}; got cls "
                              f"{tuple(cls.shape)}, patch {tuple(patch.shape)}")
        if cfg.use_temporal_pos and T != cfg.frames:
            raise CacheMismatchError(f"evl was built for frames={cfg.frames} but the batch has {T}")
        if cfg.use_tca and P != cfg.num_patches:
            raise CacheMismatchError(f"evl was built for num_patches={cfg.num_patches} but the batch has {P}")
        offset = 1 if cfg.use_tca else 0  # with TCA, L index 0 is the input of the first tapped block
        x = self.query.view(1, 1, D).expand(B, 1, D)
        for i, layer in enumerate(self.layers):
            j = i + offset
            tokens = torch.cat([cls[:, :, j, None].to(dtype), patch[:, :, j].to(dtype)], dim=2)  # (B, T, 1+P, D)
            block_input = patch[:, :, j - 1].to(dtype) if cfg.use_tca else None  # (B, T, P, D)
            x = layer(x, tokens, block_input)
        logits = self.fc(self.drop(self.norm(x[:, 0])))  # (B, K)
        return {"logits": logits}
