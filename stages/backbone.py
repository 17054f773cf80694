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
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cache.errors import ConfigError, ModelError
from cache.meta import CLIP_MEAN, CLIP_STD  # CLIP's pixel normalisation (a model's, unless it says its own)

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_KEY",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "resolve_pretrained",
    "BackboneInfo",
    "FrozenCLIP",
    "resolve_model_name",
    "model_config",
    "parse_layers",
    "load_clip",
    "weights_id",
    "resolve_activation",
    "checkpoint_activation",
    "model_activation",
    "clip_identity",
    "CLIP_MEAN",
    "CLIP_STD",
    "pixel_stats",
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


# ----------------------------------------------------------------------------- activation
# The MLP activation a CLIP's weights were trained with. OpenAI's CLIP (and MetaCLIP, DFN, ...)
# uses QuickGELU, x * sigmoid(1.702 x); open_clip builds nn.GELU unless the config says
# quick_gelu, even for pretrained='openai' (it only warns). The same weights through the other
# activation compute something else (SPEC section 8), so the activation is resolved from what
# the weights say, and a disagreement is an error.
ACTIVATIONS = ("gelu", "quick_gelu")
ACTIVATION_CHOICES = ("auto", *ACTIVATIONS)
# The entry naming the activation in the checkpoints this project writes (pretrain-demo,
# finetune-export): a string beside the tensors, dropped before the weights are loaded.
ACTIVATION_KEY = "clipcache_activation"
# Entries only OpenAI's checkpoints carry: the TorchScript archive's state dict, and dicts saved from it.
_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")
# What stages.video does to every frame before the encoder (recorded with the cache, not a choice):
# the short side resized to the input size, then square crops of the input size (1 crop: the
# centre; 3: both ends and the centre of the long side); bicubic interpolation with antialiasing.
RESIZE_RULE = "short_side_then_square_crop"
INTERPOLATION = "bicubic_antialias"


def pixel_stats(visual) -> tuple[tuple, tuple]:
    """(mean, std) a vision tower's pixels are normalised with: its preprocess_cfg's, else CLIP's."""
    pp = getattr(visual, "preprocess_cfg", {}) or {}
    return tuple(pp.get("mean", CLIP_MEAN)), tuple(pp.get("std", CLIP_STD))


def _act_of(quick_gelu) -> str:
    return "quick_gelu" if quick_gelu else "gelu"


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive (the format of OpenAI's released CLIP .pt files), not a torch.save zip."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _torch_load(path: str, mmap: bool = False):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:
        if mmap:  # mmap needs the zip format; a legacy file is read whole
            return _torch_load(path, mmap=False)
        raise


def _unwrap(obj) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ModelError("the checkpoint holds no state dict")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _checkpoint_error(path: str, exc: Exception) -> ModelError:
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
        # torch's own message goes on to advise weights_only=False: the very thing refused here
        from stages.checkpoint import refused_global

        return ModelError(f"checkpoint {path} was refused, not loaded: it holds more than tensors "
                          f"({refused_global(str(exc))}), and unpickling that could run code; give a .safetensors "
                          "file or a plain state dict (torch.save(model.state_dict(), path)) instead")
    msg = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
    return ModelError(f"could not read checkpoint {path}: {msg}")


def checkpoint_activation(path: str | os.PathLike) -> tuple[str | None, str]:
    """(activation or None, what the file is), from a checkpoint file's own records, without its weights.

    A TorchScript archive or a state dict with OpenAI's extra entries is OpenAI's format: QuickGELU.
    A dict with ACTIVATION_KEY names its activation. Anything else does not say (None).
    """
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                meta, keys = f.metadata() or {}, set(f.keys())
            named = meta.get(ACTIVATION_KEY)
        elif _is_torchscript(path):
            return "quick_gelu", "an OpenAI TorchScript checkpoint"
        else:
            sd = _unwrap(_torch_load(path, mmap=True))
            keys, named = set(sd), sd.get(ACTIVATION_KEY)
    except ModelError as exc:
        raise ModelError(f"could not read checkpoint {path}: {exc}") from None
    except Exception as exc:  # corrupt, truncated, not a checkpoint: the user's file, one line
        raise _checkpoint_error(path, exc) from None
    if named is not None:
        if named not in ACTIVATIONS:
            raise ModelError(f"checkpoint {path}: {ACTIVATION_KEY} is {named!r}, not one of {', '.join(ACTIVATIONS)}")
        return str(named), "the checkpoint's own record"
    if all(k in keys for k in _OPENAI_KEYS):
        return "quick_gelu", "an OpenAI-format state dict"
    return None, "a state dict"


def resolve_activation(name: str, pretrained: str | None = None, activation: str = "auto") -> tuple[str, str]:
    """(activation, how it is known) for the weights of ``name`` + ``pretrained``.

    What can speak: the weights (an open_clip tag's registry entry, ``quick_gelu`` in its
    pretrained cfg; a file's own record, see ``checkpoint_activation``), the architecture's config
    when it names one (``-quickgelu`` names; the built-in tiny and demo), and ``activation``
    unless "auto". Any two that disagree are a ModelError. A checkpoint file that no one speaks
    for is refused; a random init takes ``activation``, else the config's (GELU by default).
    """
    import open_clip

    if activation not in ACTIVATION_CHOICES:
        raise ConfigError(f"--activation must be one of {', '.join(ACTIVATION_CHOICES)}, got '{activation}'")
    arch = resolve_model_name(name)
    cfg = open_clip.get_model_config(arch) or {}
    claims: list[tuple[str, str, str]] = []  # (activation, source, how to change it)
    if "quick_gelu" in cfg:
        other = arch[: -len("-quickgelu")] if arch.endswith("-quickgelu") else f"{arch}-quickgelu"
        claims.append((_act_of(cfg["quick_gelu"]), f"the model config {arch}",
                       f"use --model {other}" if other in open_clip.list_models() else "use another --model"))
    if activation != "auto":
        claims.append((activation, f"--activation {activation}", "use --activation auto"))
    weights = None  # (activation, which weights, how it is known)
    if pretrained and os.path.isfile(pretrained):
        act, what = checkpoint_activation(pretrained)
        if act is not None:
            weights = (act, pretrained, what)
        elif not claims:
            raise ModelError(
                f"cannot tell which activation the weights in {pretrained} were trained with ({what}, neither "
                "OpenAI's format nor a clipcache checkpoint): name it with --activation quick_gelu (OpenAI-trained "
                "weights) or --activation gelu, or a -quickgelu model name")
    elif pretrained:
        pcfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if pcfg:
            weights = (_act_of(pcfg.get("quick_gelu", False)), f"{arch} '{pretrained}'", "open_clip's registry entry")
    if weights is not None:
        for act, source, fix in claims:
            if act != weights[0]:
                raise ModelError(f"{source} builds {act}, but the weights {weights[1]} were trained with "
                                 f"{weights[0]} ({weights[2]}): {fix}")
        return weights[0], f"{weights[2]} of {weights[1]}"
    if len({c[0] for c in claims}) > 1:
        (a1, s1, _), (a2, s2, fix) = claims[0], claims[1]
        raise ModelError(f"{s1} builds {a1}, but {s2} asks for {a2}: {fix}")
    if claims:
        return claims[0][0], claims[0][1]
    return _act_of(cfg.get("quick_gelu", False)), "open_clip's default for a random init"


def model_activation(model: nn.Module) -> str | None:
    """The activation the built model's transformer MLPs use ('gelu', 'quick_gelu'; None if neither)."""
    from open_clip.transformer import QuickGELU

    kinds = set()
    for m in model.modules():
        if isinstance(m, QuickGELU):
            kinds.add("quick_gelu")
        elif isinstance(m, nn.GELU):
            kinds.add("gelu" if m.approximate == "none" else f"gelu_{m.approximate}")
    return "+".join(sorted(kinds)) or None


def clip_identity(name: str, pretrained: str | None = None, activation: str = "auto") -> dict:
    """What the cache's frame computation is, beyond the weights: the activation the model is
    built with (and how it is known), the resize rule and the interpolation of stages.video."""
    act, source = resolve_activation(name, pretrained or None, activation)
    return {"activation": act, "activation_from": source, "resize": RESIZE_RULE, "interpolation": INTERPOLATION}


def _read_state_dict(path: str) -> dict:
    """The tensors of a checkpoint file, without this project's record or OpenAI's extra entries."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        elif _is_torchscript(path):
            sd = dict(torch.jit.load(path, map_location="cpu").state_dict())
        else:
            sd = dict(_unwrap(_torch_load(path)))
    except ModelError as exc:
        raise ModelError(f"could not read checkpoint {path}: {exc}") from None
    except Exception as exc:
        raise _checkpoint_error(path, exc) from None
    for k in (ACTIVATION_KEY, *_OPENAI_KEYS):
        sd.pop(k, None)
    return sd


def _load_state(model: nn.Module, sd: dict) -> None:
    """open_clip's checkpoint conversions (other layouts, position-embedding size), then a strict load."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    model.load_state_dict(sd, strict=True)


DEFAULT_MODEL = "ViT-B-16"  # the papers' backbone: the default of extract and finetune (with its OpenAI weights)


def resolve_pretrained(name: str, pretrained: str) -> tuple[str, str]:
    """(weights to load, a line saying why) for the command line's ``--pretrained``: "auto" (its
    default) is OpenAI's weights for an open_clip model that has them and a seeded random init for
    the built-in models; "none" is a random init; anything else is a tag or a path, as given."""
    if pretrained == "none":
        return "", "weights: a seeded random init (--pretrained none)"
    if pretrained != "auto":
        return pretrained, ""
    if name in BUILTIN_MODELS:
        return "", f"weights: a seeded random init (built-in model '{name}'; --pretrained PATH loads a checkpoint)"
    import open_clip

    arch = resolve_model_name(name)
    if "openai" in open_clip.list_pretrained_tags_by_model(arch):
        return "openai", f"weights: openai (the default for {arch}; --pretrained TAG|PATH for others, none: random)"
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise ModelError(f"{arch} has no default weights: pass --pretrained TAG or PATH"
                     + (f" (its tags: {', '.join(tags)})" if tags else "") + ", or --pretrained none for a random init")


def _tag_files(arch: str, tag: str) -> tuple[str, list[str], str, str]:
    """(hub repo, its candidate file names, the direct url or "", the activation) of open_clip's
    registry entry for ``arch`` + ``tag``."""
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(arch, tag) or {}
    hub = cfg.get("hf_hub", "")
    repo, name = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)  # 'org/model/' or 'org/model/file'
    name = name or oc_pretrained.HF_WEIGHTS_NAME
    names = [*oc_pretrained._get_safe_alternatives(name), name] if name.endswith(".bin") else [name]
    return repo, names, cfg.get("url", ""), _act_of(cfg.get("quick_gelu", False))


def cached_weights(arch: str, tag: str) -> str | None:
    """The local file of open_clip tag ``tag``'s weights when a download already put it there."""
    from huggingface_hub import try_to_load_from_cache

    repo, names, _, _ = _tag_files(arch, tag)
    for name in names if repo else ():
        path = try_to_load_from_cache(repo, name)
        if isinstance(path, str):
            return path
    return None


def weights_to_fetch(arch: str, tag: str) -> str:
    """What a user without a network fetches for tag ``tag`` and how to pass it (one sentence)."""
    repo, names, url, act = _tag_files(arch, tag)
    if url:  # OpenAI's own TorchScript file: it says which activation it needs
        src, file = url, url.rsplit("/", 1)[-1]
    else:
        src, file = f"https://huggingface.co/{repo}/resolve/main/{names[-1]}", names[-1]
    return (f"download {src} on a machine with a network, then pass --pretrained /path/to/{file} "
            f"--activation {act}")


def fetch_weights(arch: str, tag: str) -> str:
    """The local file of tag ``tag``'s weights: from the download cache, else downloaded once.
    Without a network (or with HF_HUB_OFFLINE set) one ModelError naming the file to fetch, and no
    retry chatter from the hub client."""
    path = cached_weights(arch, tag)
    if path is not None:
        return path
    from open_clip import pretrained as oc_pretrained

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set"
    if not offline:
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.CRITICAL)
        try:
            with _quiet_open_clip(logging.CRITICAL):
                path = oc_pretrained.download_pretrained(oc_pretrained.get_pretrained_cfg(arch, tag))
            if path:
                return path
            why = "open_clip found no file for it"
        except Exception as exc:  # no network, DNS, a proxy, a hub error: all end the same way
            why = " ".join(str(exc).split())[:160] or exc.__class__.__name__
        finally:
            hub_log.setLevel(level)
    raise ModelError(f"the '{tag}' weights of {arch} are not on this machine and cannot be downloaded ({why}): "
                     + weights_to_fetch(arch, tag))


def load_clip(name: str, pretrained: str | None = None, device: str = "cpu", seed: int = 0,
              activation: str = "auto") -> nn.Module:
    """Build an open_clip model; ``pretrained`` is a tag (downloaded by open_clip) or a file path.

    The model is built with the activation its weights were trained with (``resolve_activation``:
    QuickGELU for OpenAI's); ``activation`` names it when the weights cannot say. With no
    ``pretrained`` the weights are a seeded random init (tests, the tiny model).
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
    act, source = resolve_activation(name, pretrained or None, activation)
    is_file = bool(pretrained) and os.path.isfile(pretrained)
    if pretrained and not is_file:
        fetch_weights(arch, pretrained)  # in the download cache now (open_clip finds it there), or one clear line
    state = _read_state_dict(pretrained) if is_file else None
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(seed)
        try:
            with _quiet_open_clip():
                model = open_clip.create_model(arch, pretrained=(pretrained or None) if not is_file else None,
                                               device="cpu", pretrained_text=False,
                                               force_quick_gelu=act == "quick_gelu")
                if state is not None:
                    _load_state(model, state)
        except (RuntimeError, KeyError, OSError, ValueError) as exc:
            msg = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
            raise ModelError(f"could not load {arch} weights '{pretrained}': {msg}") from None
    for w in caught:
        if "quickgelu" in str(w.message).lower().replace("_", ""):  # open_clip's mismatch warning: never silenced
            raise ModelError(f"{arch} '{pretrained}': open_clip reports an activation mismatch ({w.message})")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    built = model_activation(model)
    if built is not None and built != act:
        raise ModelError(f"{arch} was built with {built}, but its weights need {act} ({source}); "
                         "this architecture cannot run them as trained")
    _refuse_non_finite(model, arch, pretrained)
    model.to(device).eval().requires_grad_(False)
    return model


def _refuse_non_finite(model: nn.Module, arch: str, pretrained: str | None) -> None:
    """One ModelError naming the first parameter holding NaN/inf: such weights make NaN features
    for every input, and nothing built on them can be trusted. (Buffers are not weights: the
    text tower's attention mask holds -inf by design.)"""
    named = [(n, t) for n, t in model.named_parameters() if t.is_floating_point()]
    # a sum is finite exactly when every term is, but for a finite sum that overflows: one
    # reduction per tensor (no mask the size of the model), the exact test only where a sum is not
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for _, t in named]) if named else torch.zeros(0)
    for i in torch.nonzero(~torch.isfinite(sums)).flatten().tolist():
        name, t = named[i]
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            what = f"checkpoint {pretrained}" if pretrained else f"{arch}'s weights"
            raise ModelError(f"{what}: parameter '{name}' holds NaN/inf ({bad} of {t.numel()} values); the model "
                             "is broken and nothing was computed with it: use another checkpoint")


@contextlib.contextmanager
def _quiet_open_clip(at: int = logging.ERROR):
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(at)
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
        self.mean, self.std = pixel_stats(self.visual)
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
