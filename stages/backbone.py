"""The frozen open_clip backbone: loading by name + pretrained tag or local checkpoint, and taps.

Taps per frame: the final embedding (after ln_post and proj), and the CLS and patch tokens of
chosen residual blocks (the blocks' outputs, before any final norm). Blocks are numbered
1..N as users count them ("--layers 8,10,12", "last4", "all").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cache.errors import ConfigError, ModelError

__all__ = [
    "BUILTIN_MODELS",
    "BackboneInfo",
    "FrozenCLIP",
    "resolve_model_name",
    "model_config",
    "parse_layers",
    "load_clip",
    "weights_id",
]

_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Short names for the architectures the project ships (built in-process, never downloaded).
BUILTIN_MODELS = {"tiny": "clipcache-tiny", "small": "clipcache-small", "demo": "clipcache-demo"}


def _register_configs() -> None:
    import open_clip

    if "clipcache-tiny" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def resolve_model_name(name: str) -> str:
    _register_configs()
    import open_clip

    arch = BUILTIN_MODELS.get(name, name)
    if arch not in open_clip.list_models():
        known = ", ".join(sorted(BUILTIN_MODELS)) + ", ViT-B-32, ViT-B-16, ViT-L-14, ..."
        raise ModelError(f"unknown model '{name}' (open_clip knows {len(open_clip.list_models())} names: {known})")
    return arch


def model_config(name: str) -> dict:
    """The open_clip JSON config of an architecture, without building it."""
    import open_clip

    return open_clip.get_model_config(resolve_model_name(name))


@dataclass(frozen=True)
class BackboneInfo:
    """Dims of a vision tower, the names stage two uses (see stages.heads.DIM_FIELDS)."""

    embed_dim: int
    width: int
    depth: int
    backbone_heads: int
    image_size: int
    patch_size: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, cfg: dict) -> "BackboneInfo":
        v = cfg["vision_cfg"]
        if not isinstance(v.get("layers"), int) or "patch_size" not in v:
            raise ModelError("only ViT vision towers can be tapped (this config has no ViT blocks)")
        image = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
        width = v["width"]
        return cls(cfg["embed_dim"], width, v["layers"], width // v.get("head_width", 64), image, v["patch_size"])


def parse_layers(spec: str, depth: int) -> tuple[int, ...]:
    """'last4' | 'all' | 'none' | '8,10,12' -> sorted 1-based block numbers."""
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return ()
    if spec == "all":
        return tuple(range(1, depth + 1))
    if spec.startswith("last"):
        try:
            k = int(spec[4:])
        except ValueError:
            raise ConfigError(f"bad --layers '{spec}': use lastK, all, none or a list like 8,10,12") from None
        if k < 1:
            raise ConfigError(f"bad --layers '{spec}': K must be at least 1")
        k = min(k, depth)  # a backbone shallower than K gives all its blocks
        return tuple(range(depth - k + 1, depth + 1))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"bad --layers '{spec}': use lastK, all, none or a list like 8,10,12") from None
    bad = [x for x in layers if not 1 <= x <= depth]
    if bad:
        raise ConfigError(f"--layers {spec}: blocks {bad} do not exist (the backbone has blocks 1..{depth})")
    return tuple(layers)


def weights_id(pretrained: str | None, seed: int) -> str:
    """What identifies the weights in a cache key: a file's sha256, a tag, or the init seed."""
    if not pretrained:
        return f"random-init:seed={seed}"
    if os.path.isfile(pretrained):
        h = hashlib.sha256()
        with open(pretrained, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        return f"sha256:{h.hexdigest()}"
    return f"tag:{pretrained}"


def load_clip(name: str, pretrained: str | None = None, device: str = "cpu", seed: int = 0) -> nn.Module:
    """Build an open_clip model; ``pretrained`` is a tag (downloaded by open_clip) or a file path.

    With no ``pretrained`` the weights are a seeded random init (tests, the tiny model).
    """
    import open_clip

    arch = resolve_model_name(name)
    if pretrained and not os.path.isfile(pretrained):
        looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_path:
            raise ModelError(f"checkpoint not found: {pretrained}")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tags and pretrained not in tags:
            raise ModelError(f"'{pretrained}' is neither a file nor a pretrained tag of {arch} (tags: {', '.join(tags)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with _quiet_open_clip():
                model = open_clip.create_model(arch, pretrained=pretrained or None, device=device,
                                               pretrained_text=False)
        except (RuntimeError, KeyError, OSError, ValueError) as exc:
            msg = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
            raise ModelError(f"could not load {arch} weights '{pretrained}': {msg}") from None
    model.eval().requires_grad_(False)
    return model


@contextlib.contextmanager
def _quiet_open_clip():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class FrozenCLIP(nn.Module):
    """The vision tower, frozen, returning the taps stage one stores."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...], want_patch: bool, info: BackboneInfo,
                 device: str = "cpu", amp: str = "auto"):
        super().__init__()
        self.visual = model.visual.to(device).eval().requires_grad_(False)
        self.layers = tuple(sorted(layers))
        self.want_patch = want_patch and bool(self.layers)
        self.info = info
        self.device = torch.device(device)
        pp = getattr(self.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else (
                "fp16" if self.device.type == "cuda" else "none")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 3, H, W) normalised -> frame_emb (B, E), cls (B, L, D), patch (B, L, P, D)."""
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            if not self.layers:
                return {"frame_emb": self.visual(x).float()}
            out = self.visual.forward_intermediates(
                x, indices=[i - 1 for i in self.layers], output_fmt="NLC", output_extra_tokens=True)
        res = {"frame_emb": out["image_features"].float()}
        res["cls"] = torch.stack([t[:, 0] for t in out["image_intermediates_prefix"]], dim=1).float()  # (B, L, D)
        if self.want_patch:
            res["patch"] = torch.stack(out["image_intermediates"], dim=1).float()  # (B, L, P, D)
        return res

    def block_weights(self, block: int) -> dict[str, torch.Tensor]:
        """Frozen tensors of block ``block`` (1-based) that heads recompute attention with."""
        blk = self.visual.transformer.resblocks[block - 1]
        return {
            "ln_1.weight": blk.ln_1.weight, "ln_1.bias": blk.ln_1.bias,
            "attn.in_proj_weight": blk.attn.in_proj_weight, "attn.in_proj_bias": blk.attn.in_proj_bias,
        }
