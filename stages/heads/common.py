"""Building blocks shared by the frame-embedding heads (Text4Vis, ActionCLIP, TAP, probes).

Not a head: the registry's auto-import skips this module by name.

- :class:`TemporalTransformer`: the post-network temporal transformer used as ActionCLIP's
  "Transf" prompt and Text4Vis's "T-Trans" video head (Wang et al. 2021, arXiv:2109.08472;
  Wu et al. 2023, arXiv:2207.01297). CLIP-style pre-norm residual attention blocks of width E,
  E/64 heads, MLP x4 with QuickGELU, a learned frame position table, a residual connection from
  the input frames to the output frames, then the mean over frames. Faithful points that fix the
  parameter count: the position table has 77 rows (CLIP's text context length, which is where
  both reference implementations take its size from), not T rows, and there is no final
  LayerNorm. The LayerNorm epsilon is 1e-12, as in both references (CLIP itself uses 1e-5).
- :class:`TemporalConv1D`: depthwise temporal convolution (ActionCLIP "Conv1D", Text4Vis "T1D"),
  kernel 3, no bias, shift-initialised, residual.
- :func:`cosine_logits`: ``scale * normalise(video) @ normalise(W).T``.
- :class:`ClosedFormHead`: base of the scikit-learn heads (LDA, logistic probe): ``fit`` on the
  whole training set, weights kept as state_dict buffers, no trainable parameter.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cache.errors import ConfigError
from stages.config import validate_choice  # the heads' options are checked by the one rule
from stages.heads.registry import DataKeys, Head

__all__ = [
    "QuickGELU",
    "ResidualAttentionBlock",
    "FramePosition",
    "TemporalTransformer",
    "TemporalConv1D",
    "cosine_logits",
    "default_heads",
    "init_linear_normal",
    "frame_mean",
    "track_loaded",
    "validate_choice",
    "ClosedFormHead",
]

LN_EPS = 1e-12  # the TF-style LayerNorm epsilon of the ActionCLIP / Text4Vis temporal modules


def default_heads(width: int, heads: int = 0) -> int:
    """Attention heads: the cfg value, or width / 64 as CLIP sizes its heads (at least one)."""
    heads = heads or max(1, width // 64)
    if width % heads:
        raise ConfigError(f"embedding width {width} is not divisible by {heads} attention heads")
    return heads


def init_linear_normal(module: nn.Module, std: float = 0.02) -> None:
    """Linear weights ~ N(0, std), biases zero (the init both reference temporal modules use)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def frame_mean(frame_emb: torch.Tensor) -> torch.Tensor:
    """(B, T, E) -> (B, E) temporal average pooling, in float32 whatever the cache dtype."""
    return frame_emb.float().mean(dim=1)


def cosine_logits(video: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, E) x (K, E) -> (B, K): scale times the cosine similarity of each video to each row."""
    return scale * F.normalize(video, dim=-1) @ F.normalize(weight, dim=-1).t()


def track_loaded(module: nn.Module, flag: str, key: str) -> None:
    """Set ``module.<flag>`` when a state_dict holding ``key`` (a direct tensor name) is loaded.

    Heads whose weights come from ``set_classifier`` / ``fit`` refuse to predict before that
    happened; a checkpoint restored with ``load_state_dict`` counts as having happened.
    """

    def hook(mod: nn.Module, incompatible) -> None:
        missing = [k for k in incompatible.missing_keys if k == key or k.endswith("." + key)]
        if not missing:
            setattr(mod, flag, True)

    module.register_load_state_dict_post_hook(hook)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-norm block on (B, T, E): x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, width: int, heads: int, eps: float = LN_EPS):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width),
            QuickGELU(),
            nn.Linear(4 * width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class FramePosition(nn.Module):
    """A learned table of ``rows`` frame positions; adds rows 0..T-1 to a (B, T, E) sequence."""

    def __init__(self, rows: int, width: int, std: float = 0.02):
        super().__init__()
        if rows < 1:
            raise ConfigError(f"the frame position table needs at least one row, got pos_rows={rows}")
        self.weight = nn.Parameter(torch.empty(rows, width))
        if std > 0:
            nn.init.normal_(self.weight, std=std)
        else:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.weight.shape[0]:
            raise ConfigError(
                f"{T} frames but the frame position table has {self.weight.shape[0]} rows; "
                f"set pos_rows to at least {T}"
            )
        return x + self.weight[:T].to(x.dtype)


class TemporalTransformer(nn.Module):
    """Frames (B, T, E) -> video (B, E): position table, ``layers`` blocks, residual, mean.

    With ``layers=6``, E=512 and the default 77-row table this is 18,953,728 parameters,
    ActionCLIP's published "Transf" count.
    """

    def __init__(self, width: int, layers: int = 6, heads: int = 0, pos_rows: int = 77,
                 pos_std: float = 0.02):
        super().__init__()
        self.position = FramePosition(pos_rows, width, std=pos_std)
        heads = default_heads(width, heads)
        self.blocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.blocks.apply(init_linear_normal)

    def forward_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, E) -> (B, T, E), before the mean."""
        return x + self.blocks(self.position(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_frames(x).mean(dim=1)


class TemporalConv1D(nn.Module):
    """Depthwise temporal conv (kernel 3, zero padding, no bias) on (B, T, E), residual.

    ``init="shift"`` (ActionCLIP's Conv1D initialisation): a quarter of the channels read frame
    t-1, half read frame t, the last quarter read frame t+1, i.e. a temporal shift of 1/4, 1/2,
    1/4 of the channels. ``init="smooth"``: every channel starts as the smoothing kernel
    (1/4, 1/2, 1/4). Both reproduce a constant-over-time input away from the clip ends.
    ``init="identity"``: every channel reads frame t only.
    """

    INITS = ("shift", "smooth", "identity")

    def __init__(self, width: int, init: str = "shift", residual: bool = True):
        super().__init__()
        if init not in self.INITS:
            raise ConfigError(f"unknown temporal conv init '{init}'; choose one of {', '.join(self.INITS)}")
        self.residual = residual
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1, groups=width, bias=False)
        with torch.no_grad():
            w = torch.zeros(width, 1, 3)
            if init == "shift":
                q = width // 4
                w[:q, 0, 0] = 1.0  # channels that look one frame back
                w[q:width - q, 0, 1] = 1.0  # channels that stay
                w[width - q:, 0, 2] = 1.0  # channels that look one frame ahead
            elif init == "smooth":
                w[:, 0] = torch.tensor([0.25, 0.5, 0.25])
            else:
                w[:, 0, 1] = 1.0
            self.conv.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, E) -> (B, E, T) -> (B, T, E)
        return x + y if self.residual else y


class ClosedFormHead(Head):
    """Base of the heads fitted in closed form on frame-averaged embeddings (LDA, logistic probe).

    ``fit`` computes (K, E) weights and (K,) biases and stores them as buffers, so they travel in
    the state_dict while the head has no trainable parameter. Subclasses implement ``_solve``.
    The cfg needs ``num_classes``, ``embed_dim`` and ``normalize`` (L2 after the frame mean).
    """

    uses_sklearn = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("coef", torch.zeros(cfg.num_classes, cfg.embed_dim))
        self.register_buffer("intercept", torch.zeros(cfg.num_classes))
        self.fitted = False
        track_loaded(self, "fitted", "coef")

    def data_keys(self) -> DataKeys:
        return DataKeys(frame_emb=True)

    def features(self, frame_emb: torch.Tensor) -> torch.Tensor:
        """(B, T, E) -> (B, E): frame mean, then L2 normalisation when the cfg asks."""
        video = frame_mean(frame_emb)
        return F.normalize(video, dim=-1) if self.cfg.normalize else video

    def _solve(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError  # pragma: no cover

    def fit(self, batch: dict[str, torch.Tensor]) -> None:
        x = self.features(batch["frame_emb"]).detach().cpu().numpy().astype(np.float64)
        y = batch["label"].detach().cpu().numpy().astype(np.int64)
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"{x.shape[0]} embeddings but {y.shape[0]} labels")
        if y.size and (y.min() < 0 or y.max() >= self.cfg.num_classes):
            raise ConfigError(f"labels must lie in 0..{self.cfg.num_classes - 1}; got {y.min()}..{y.max()}")
        if len(np.unique(y)) < 2:
            raise ConfigError(f"head '{self.name}' needs training videos of at least two classes")
        weight, bias = self._solve(x, y)
        self.coef.copy_(torch.from_numpy(weight).to(self.coef))
        self.intercept.copy_(torch.from_numpy(bias).to(self.intercept))
        self.fitted = True

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.fitted:
            raise ConfigError(f"head '{self.name}' must be fitted (fit(batch)) before it predicts")
        video = self.features(batch["frame_emb"])
        return {"logits": video @ self.coef.t() + self.intercept, "video_emb": video}
