"""Contrastive pretraining of a small open_clip model on a synthetic captioned world (the demo).

No weights can be downloaded on the project's machines, so the demo makes its own CLIP: an
ordinary open_clip architecture (by default the built-in ``demo`` one, 7.8M parameters), trained
from a seeded random init with the usual symmetric InfoNCE loss (learnable logit scale, open_clip's
``ClipLoss``), AdamW and a cosine schedule with linear warmup, on still frames and their captions.
The result is a plain ``state_dict`` (plus the ``ACTIVATION_KEY`` entry naming the MLP activation it
trained with) that ``stages.backbone.load_clip(name, PATH)`` (the normal ``--pretrained PATH`` code)
loads like any other checkpoint.

This stage knows nothing about the world it learns: the caller passes

* ``render(rng) -> (image, caption)``: one random still (``(H, W, 3)`` uint8 RGB, any size; it is
  resized so that its short side is the model's input size, then cropped square: a random crop
  for training, the centre crop for evaluation, as stage one does) and its caption, for example
  ``pipeline.demo_data.render_frame_with_caption``;
* ``eval_prompts``: zero-shot evaluation groups, ``{name: prompts}``, measured on frames that
  training never saw (a separate random stream). Two forms:

  - a list of prompts, e.g. ``["a red circle", "a red square", ...]``: the ground truth of a
    frame is read from its caption. The distinguishing words of a prompt are its words that not
    every prompt of the group has ("a" is dropped from "a red circle", leaving {red, circle});
    a frame belongs to the prompt whose distinguishing words all occur in its caption; when
    several do, the one with most such words wins; frames that match none, or tie, are left out
    (their number is reported);
  - ``(prompts, render_class)`` with ``render_class(rng, k) -> image`` drawing a frame of class
    ``k``: for classes a caption does not name, e.g. the demo's video classes
    ("red triangle moving right", whose motion a still cannot show).

  Accuracy is top-1 over the group's prompts (chance = 1 / number of prompts).

Training data is made on the fly, seeded: a pool of ``pool_size`` rendered frames is drawn from
at each step and ``fresh_per_step`` of its entries are replaced by new renders, so rendering
costs a bounded share of the step however slow the renderer is.

The checkpoint is written atomically (temporary file + ``os.replace``) with a sidecar
``<out>.json``: the cfg, steps, losses, zero-shot accuracies, timings and the weights' sha256.
Asking again with the same cfg (and ``data_tag``) returns that JSON without training; if only the
evaluation groups differ, the saved weights are re-evaluated and the JSON rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from cache.errors import ConfigError
from cache.files import atomic_write_text, read_json
from stages.backbone import ACTIVATION_KEY, load_clip, model_activation, pixel_stats, resolve_model_name
from stages.runs import param_groups

__all__ = ["PretrainCfg", "pretrain_demo_clip", "zero_shot_eval", "caption_labels", "FORMAT"]

FORMAT = "clipcache-pretrain-demo/1"

Render = Callable[[np.random.Generator], "tuple[np.ndarray, str]"]
RenderClass = Callable[[np.random.Generator, int], np.ndarray]
EvalGroups = dict[str, Union[Sequence[str], "tuple[Sequence[str], RenderClass]"]]


@dataclass
class PretrainCfg:
    model: str = "demo"        # built-in open_clip architecture name (stages.backbone) or any open_clip name
    minutes: float = 4.0       # wall-clock budget of training (0 = no time limit) ...
    max_steps: int = 0         # ... or a step budget (0 = time only); whichever ends first
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50     # at most 10% of the budget (steps or time)
    seed: int = 0
    image_size: int = 64       # the model's input size: frames are resized to it (short side) and cropped
    amp: str = "auto"          # "bf16" | "none" | "auto" (bf16 where the CPU/GPU runs it natively)
    pool_size: int = 4096      # rendered frames kept to draw batches from (at most max_steps * batch_size)
    fresh_per_step: int = 32   # pool entries replaced by new renders at each step
    eval_frames: int = 2048    # held-out frames per zero-shot evaluation group

    def validate(self) -> None:
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"pretrain {name} must be an integer >= {low}, got {v!r}")

        for name, low in (("max_steps", 0), ("batch_size", 2), ("warmup_steps", 0), ("seed", 0),
                          ("image_size", 8), ("pool_size", 2), ("fresh_per_step", 0), ("eval_frames", 1)):
            integer(name, low)
        for name in ("minutes", "lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"pretrain {name} must be a finite number >= 0, got {v!r}")
        if self.minutes <= 0 and self.max_steps <= 0:
            raise ConfigError("pretrain needs a budget: minutes > 0 or max_steps > 0")
        if self.lr <= 0:
            raise ConfigError(f"pretrain lr must be > 0, got {self.lr!r}")
        if self.amp not in ("auto", "bf16", "none"):
            raise ConfigError(f"pretrain amp must be auto, bf16 or none, got {self.amp!r}")
        if self.pool_size < self.batch_size:
            raise ConfigError(f"pretrain pool_size ({self.pool_size}) must be at least batch_size ({self.batch_size})")


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def _resize_short(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> short side ``size`` (bicubic, antialiased, as stage one resizes)."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ConfigError(f"render must return (H, W, 3) uint8 images, got {img.dtype} {img.shape}")
    H, W = img.shape[:2]
    if min(H, W) == size:
        return np.ascontiguousarray(img)
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _crop(img: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """A square ``size`` crop: random offset along the long side (rng), else the centre."""
    H, W = img.shape[:2]
    if rng is None:
        y, x = (H - size) // 2, (W - size) // 2
    else:
        y, x = int(rng.integers(H - size + 1)), int(rng.integers(W - size + 1))
    return img[y:y + size, x:x + size]


class _Normalise:
    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, S, S) float normalised."""
        x = torch.from_numpy(frames).to(self.mean.device).permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std


class _Pool:
    """Rendered frames (short side resized, not yet cropped) and their captions, refreshed in part."""

    def __init__(self, render: Render, size: int, pool_size: int, rng: np.random.Generator):
        self.render, self.size, self.rng = render, size, rng
        self.render_seconds = 0.0
        self.rendered = 0
        first = self._one()
        self.images = np.empty((pool_size, *first[0].shape), np.uint8)
        self.captions: list[str] = [""] * pool_size
        self.images[0], self.captions[0] = first
        for i in range(1, pool_size):
            self._put(i, self._one())

    def _one(self) -> tuple[np.ndarray, str]:
        t = time.perf_counter()
        img, caption = self.render(self.rng)
        img = _resize_short(np.asarray(img), self.size)
        self.render_seconds += time.perf_counter() - t
        self.rendered += 1
        if not isinstance(caption, str) or not caption.strip():
            raise ConfigError(f"render must return a non-empty caption string, got {caption!r}")
        return img, caption

    def _put(self, i: int, item: tuple[np.ndarray, str]) -> None:
        img, caption = item
        if img.shape != self.images.shape[1:]:
            raise ConfigError(f"render returned frames of different sizes ({img.shape} after {self.images.shape[1:]})")
        self.images[i], self.captions[i] = img, caption

    def refresh(self, n: int) -> None:
        for i in self.rng.choice(len(self.captions), size=min(n, len(self.captions)), replace=False):
            self._put(int(i), self._one())

    def batch(self, n: int) -> tuple[np.ndarray, list[str]]:
        idx = self.rng.choice(len(self.captions), size=n, replace=False)
        frames = np.stack([_crop(self.images[i], self.size, self.rng) for i in idx])
        return frames, [self.captions[i] for i in idx]


class _Tokens:
    """Tokenised captions, memoised (the world's captions repeat)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.memo: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self.memo})
        if new:
            for c, row in zip(new, self.tokenizer(new)):
                self.memo[c] = row
        return torch.stack([self.memo[c] for c in captions])


# --------------------------------------------------------------------------------------------
# Zero-shot evaluation
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def caption_labels(prompts: Sequence[str], captions: Sequence[str]) -> np.ndarray:
    """Ground truth of each caption among ``prompts`` (-1: none, or a tie); see the module doc."""
    sets = [_words(p) for p in prompts]
    common = set.intersection(*sets) if sets else set()
    keys = [s - common for s in sets]
    if len(prompts) < 2 or any(not k for k in keys) or len({frozenset(k) for k in keys}) < len(keys):
        raise ConfigError(f"zero-shot prompts must be at least 2 and tell apart by their words: {list(prompts)[:6]}")
    out = np.full(len(captions), -1, dtype=np.int64)
    for j, caption in enumerate(captions):
        words = _words(caption)
        hits = [(len(k), i) for i, k in enumerate(keys) if k <= words]
        if not hits:
            continue
        hits.sort(reverse=True)
        if len(hits) == 1 or hits[0][0] > hits[1][0]:
            out[j] = hits[0][1]
    return out


def _amp_ctx(amp: str, device: torch.device):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _attention_ctx(device: torch.device):
    """The plain (math) attention kernel on CPU: for these short sequences (65 image tokens,
    32 text tokens) its backward is much cheaper than the CPU flash kernel's (0.57 s against
    0.80 s of CPU time per batch-128 step of the demo model, bf16, measured here)."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _resolve_amp(amp: str, device: torch.device) -> str:
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    try:  # AVX512-BF16 / AMX: bf16 matmuls run natively, 1.7x faster than fp32 here
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"
    except (AttributeError, RuntimeError):
        return "none"


@torch.no_grad()
def _encode_images(model, frames: np.ndarray, norm: _Normalise, amp: str, device: torch.device,
                   batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(frames), batch):
        with _amp_ctx(amp, device):
            out.append(model.encode_image(norm(frames[i:i + batch])).float())
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def _encode_texts(model, tokens: _Tokens, prompts: Sequence[str], amp: str, device: torch.device) -> torch.Tensor:
    with _amp_ctx(amp, device):
        return F.normalize(model.encode_text(tokens(list(prompts)).to(device)).float(), dim=-1)


def _group_prompts(spec) -> tuple[list[str], RenderClass | None]:
    if isinstance(spec, tuple) and len(spec) == 2 and callable(spec[1]):
        return [str(p) for p in spec[0]], spec[1]
    if isinstance(spec, (list, tuple)) and all(isinstance(p, str) for p in spec):
        return list(spec), None
    raise ConfigError("each zero-shot group is a list of prompts or a (prompts, render_class) pair")


def zero_shot_eval(model, render: Render, eval_prompts: EvalGroups | None, *, arch: str, image_size: int,
                   frames: int = 2048, seed: int = 0, amp: str = "none", device: str | torch.device = "cpu",
                   log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Zero-shot top-1 accuracy of ``model`` per group on held-out frames (see the module doc).

    Frames come from their own random stream (seeded by ``seed``), never from training's.
    Returns ``{group: {"accuracy", "chance", "classes", "frames", "unlabelled"}}``.
    """
    import open_clip

    if not eval_prompts:
        return {}
    device = torch.device(device)
    was_training = model.training
    model.eval()
    norm = _Normalise(*pixel_stats(model.visual), device)
    tokens = _Tokens(open_clip.get_tokenizer(resolve_model_name(arch)))
    results: dict[str, dict] = {}
    shared: tuple[torch.Tensor, list[str]] | None = None
    try:
        for gi, (name, spec) in enumerate(eval_prompts.items()):
            prompts, render_class = _group_prompts(spec)
            if render_class is None:
                if shared is None:  # one set of held-out captioned frames for every caption-labelled group
                    rng = np.random.default_rng([seed, 0xE7A1])
                    imgs, caps = [], []
                    for _ in range(frames):
                        img, cap = render(rng)
                        imgs.append(_crop(_resize_short(np.asarray(img), image_size), image_size, None))
                        caps.append(cap)
                    shared = (_encode_images(model, np.stack(imgs), norm, amp, device), caps)
                feats, caps = shared
                labels = caption_labels(prompts, caps)
                keep = labels >= 0
                feats, labels = feats[torch.from_numpy(keep)], labels[keep]
                unlabelled = int((~keep).sum())
            else:
                if len(prompts) < 2:
                    raise ConfigError(f"zero-shot group {name!r} needs at least 2 prompts")
                rng = np.random.default_rng([seed, 0xE7A2, gi])
                labels = np.arange(frames) % len(prompts)
                imgs = [_crop(_resize_short(np.asarray(render_class(rng, int(k))), image_size), image_size, None)
                        for k in labels]
                feats = _encode_images(model, np.stack(imgs), norm, amp, device)
                unlabelled = 0
            text = _encode_texts(model, tokens, prompts, amp, device)
            if len(labels):
                pred = (feats @ text.T).argmax(dim=1).cpu().numpy()
                acc = float((pred == labels).mean())
            else:
                acc = float("nan")
            results[name] = {"accuracy": acc, "chance": 1.0 / len(prompts), "classes": len(prompts),
                             "frames": int(len(labels)), "unlabelled": unlabelled}
            if log is not None:
                log(f"zero-shot {name}: {100 * acc:.1f}% top-1 over {len(prompts)} prompts "
                    f"(chance {100 / len(prompts):.1f}%, {len(labels)} held-out frames)")
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _no_decay(n: str, p: torch.Tensor) -> bool:
    # open_clip's rule: no decay on gains, biases, embeddings of size 1 and the logit scale
    return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n


class _Schedule:
    """Linear warmup, then cosine to 0 over what is left of the budget.

    Warmup ends after ``warmup_steps`` or 10% of the budget (of the steps, or of the time),
    whichever comes first; the cosine then runs over what is left of the steps or of the time
    (with both budgets, whichever is further along sets the pace).
    """

    def __init__(self, cfg: PretrainCfg):
        self.cfg = cfg
        self.budget_s = cfg.minutes * 60.0
        self.warm_end: tuple[int, float] | None = None  # (step, seconds) when warmup ended
        if cfg.warmup_steps == 0:
            self.warm_end = (0, 0.0)

    def __call__(self, step: int, elapsed: float) -> float:
        cfg = self.cfg
        if self.warm_end is None:
            done = (step + 1) / cfg.warmup_steps
            if cfg.max_steps > 0:
                done = max(done, (step + 1) / max(1.0, 0.1 * cfg.max_steps))
            if self.budget_s > 0:
                done = max(done, elapsed / (0.1 * self.budget_s))
            if done < 1.0:
                return cfg.lr * done
            self.warm_end = (step, elapsed)
        s0, t0 = self.warm_end
        frac = 0.0
        if cfg.max_steps > 0:
            frac = max(frac, (step - s0) / max(1, cfg.max_steps - s0))
        if self.budget_s > 0:
            frac = max(frac, (elapsed - t0) / max(1e-6, self.budget_s - t0))
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


class _ThreadChooser:
    """Picks the intra-op thread count by timing steps, and watches it.

    Steps 1..6 run alternately with ``n`` threads and with 1; the faster is kept (1 unless ``n``
    is clearly faster). While more than one thread is in use, steps that become twice as slow as
    when the choice was made (other jobs now compete for the cores, where several threads stall
    one another) start the timing again.
    """

    TRIALS = 3

    def __init__(self, n: int, log: Callable[[str], None]):
        self.n, self.log = n, log
        self.active = n > 1
        self.trial: dict[int, list[float]] | None = {n: [], 1: []} if self.active else None
        self.order = [n, 1] * self.TRIALS
        self.ref = 0.0
        self.recent: list[float] = []

    def before(self, step: int) -> None:
        if self.active and self.trial is not None and step >= 1:
            torch.set_num_threads(self.order[sum(map(len, self.trial.values()))])

    def after(self, step: int, seconds: float) -> None:
        if not self.active or step < 1:
            return
        if self.trial is not None:
            self.trial[torch.get_num_threads()].append(seconds)
            if sum(map(len, self.trial.values())) == len(self.order):
                med = {k: float(np.median(v)) for k, v in self.trial.items()}
                best = self.n if med[self.n] < 0.8 * med[1] else 1
                torch.set_num_threads(best)
                self.ref, self.recent, self.trial = med[best], [], None
                self.log(f"  threads: {best} ({', '.join(f'{k} thread(s) {t:.2f} s/step' for k, t in med.items())})")
            return
        if torch.get_num_threads() == 1:
            return
        self.recent = (self.recent + [seconds])[-5:]
        if len(self.recent) == 5 and float(np.median(self.recent)) > 2.0 * self.ref:
            self.log(f"  steps slowed from {self.ref:.2f} to {float(np.median(self.recent)):.2f} s: timing threads again")
            self.trial = {self.n: [], 1: []}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _eval_spec(eval_prompts: EvalGroups | None) -> dict[str, list[str]]:
    return {name: _group_prompts(spec)[0] for name, spec in (eval_prompts or {}).items()}


def _fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s" if s >= 60 else f"{s:.1f}s"


def pretrain_demo_clip(out_path: str | os.PathLike, render: Render, eval_prompts: EvalGroups | None = None,
                       cfg: PretrainCfg | None = None, progress: bool = True,
                       log: Callable[[str], None] = print, *, data_tag: str = "", device: str = "cpu",
                       threads: int | str | None = None) -> dict:
    """Train (or reuse) a small CLIP on ``render``'s captioned frames; save it at ``out_path``.

    ``data_tag`` names the data (e.g. "demo world=basic size=64"): it is part of what a saved
    model is reused for, together with the cfg. ``threads`` sets torch's intra-op threads for the
    run; ``"auto"`` times the first steps with 1 thread and with torch's current count and keeps
    the faster (on a machine that other jobs keep busy, 2 threads can be 5x slower than 1).
    Returns the sidecar JSON's content (also written to ``<out_path>.json``).
    """
    cfg = cfg or PretrainCfg()
    cfg.validate()
    out_path = Path(out_path)
    meta_path = out_path.with_name(out_path.name + ".json")
    want = {"format": FORMAT, "cfg": asdict(cfg), "data_tag": data_tag}
    if isinstance(threads, int) and not isinstance(threads, bool):
        # a pinned thread count fixes the float summation order: a model trained under another
        # count (or the timed choice) is a different model, so it is not reused for this one
        want["threads_pinned"] = threads
    dev = torch.device(device)
    old_threads = torch.get_num_threads()
    if threads not in (None, "auto"):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive integer or 'auto', got {threads!r}")
        torch.set_num_threads(threads)
    try:
        # ---- reuse
        meta = read_json(meta_path, dict)
        if (meta is not None and all(meta.get(k) == v for k, v in want.items()) and out_path.is_file()
                and meta.get("weights_sha256") == _sha256(out_path)):
            if meta.get("eval_prompts") == _eval_spec(eval_prompts):
                log(f"pretrained demo CLIP reused: {out_path} ({meta.get('steps')} steps)")
                return meta
            log(f"pretrained demo CLIP reused: {out_path}; evaluating the new zero-shot groups")
            model = load_clip(cfg.model, str(out_path), device=device, seed=cfg.seed)
            t = time.perf_counter()
            meta["zero_shot"] = zero_shot_eval(model, render, eval_prompts, arch=cfg.model, image_size=cfg.image_size,
                                               frames=cfg.eval_frames, seed=cfg.seed, amp=meta.get("amp", "none"),
                                               device=dev, log=log)
            meta["eval_prompts"] = _eval_spec(eval_prompts)
            meta.setdefault("seconds", {})["eval"] = round(time.perf_counter() - t, 2)
            atomic_write_text(meta_path, json.dumps(meta, indent=2, allow_nan=True) + "\n")
            return meta
        return _train(out_path, meta_path, render, eval_prompts, cfg, want, progress, log, dev, threads == "auto")
    finally:
        torch.set_num_threads(old_threads)


def _train(out_path: Path, meta_path: Path, render: Render, eval_prompts: EvalGroups | None, cfg: PretrainCfg,
           want: dict, progress: bool, log: Callable[[str], None], dev: torch.device, auto_threads: bool) -> dict:
    import open_clip

    arch = resolve_model_name(cfg.model)
    model = load_clip(cfg.model, None, device=str(dev), seed=cfg.seed)
    in_size = model.visual.image_size
    in_size = in_size if isinstance(in_size, int) else in_size[0]
    if in_size != cfg.image_size:
        raise ConfigError(f"pretrain image_size {cfg.image_size} does not match {arch}'s input size {in_size}")
    model.train().requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters())
    amp = _resolve_amp(cfg.amp, dev)
    norm = _Normalise(*pixel_stats(model.visual), dev)
    tokens = _Tokens(open_clip.get_tokenizer(arch))
    groups = param_groups(list(model.named_parameters()), None, cfg.weight_decay, False, "clip", no_decay=_no_decay,
                          keep_empty=True)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    budget_s = cfg.minutes * 60.0
    budget = " and ".join(x for x in ((f"{cfg.minutes:g} min" if cfg.minutes > 0 else ""),
                                      (f"{cfg.max_steps} steps" if cfg.max_steps > 0 else "")) if x)
    log(f"pretraining {arch} ({n_params / 1e6:.1f}M parameters) contrastively for {budget}: batch {cfg.batch_size}, "
        f"lr {cfg.lr:g}, {amp if amp != 'none' else 'fp32'}, {torch.get_num_threads()} threads")

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0x7A1])
    t_start = time.perf_counter()
    # a step budget needs no more frames up front than it will ever draw
    pool_size = min(cfg.pool_size, cfg.max_steps * cfg.batch_size) if cfg.max_steps > 0 else cfg.pool_size
    pool = _Pool(render, cfg.image_size, pool_size, rng)
    losses: list[float] = []
    curve: list[list[float]] = []
    schedule = _Schedule(cfg)
    chooser = _ThreadChooser(torch.get_num_threads(), log) if auto_threads and dev.type == "cpu" else None
    step, last_log = 0, time.perf_counter()
    step_seconds = 0.0
    while True:
        elapsed = time.perf_counter() - t_start
        if cfg.max_steps > 0 and step >= cfg.max_steps:
            break
        if budget_s > 0 and elapsed >= budget_s:
            break
        lr = schedule(step, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr
        if chooser is not None:
            chooser.before(step)
        if step > 0 and cfg.fresh_per_step:
            pool.refresh(cfg.fresh_per_step)
        frames, captions = pool.batch(cfg.batch_size)
        ts = time.perf_counter()
        images = norm(frames)
        text = tokens(captions).to(dev)
        with _attention_ctx(dev):
            with _amp_ctx(amp, dev):
                img_f, txt_f, scale = model(images, text)[:3]
            loss = loss_fn(img_f.float(), txt_f.float(), scale.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step_seconds += time.perf_counter() - ts
        if chooser is not None:
            chooser.after(step, time.perf_counter() - ts)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError(f"pretraining diverged at step {step} (loss {value}); lower the lr (now {cfg.lr:g})")
        losses.append(value)
        step += 1
        if step == 1 or step % 10 == 0:
            curve.append([step, round(float(np.mean(losses[-10:])), 4)])
        now = time.perf_counter()
        if progress and now - last_log >= 15.0:
            last_log = now
            el = now - t_start
            left = []
            if budget_s > 0:
                left.append(budget_s - el)
            if cfg.max_steps > 0:
                left.append((cfg.max_steps - step) * el / step)
            log(f"  step {step}: loss {np.mean(losses[-10:]):.3f}, lr {lr:.2e}, {step / el:.2f} steps/s, "
                f"{_fmt_time(el)} elapsed, ~{_fmt_time(max(0.0, min(left)))} left")
    train_s = time.perf_counter() - t_start
    if curve[-1][0] != step:
        curve.append([step, round(float(np.mean(losses[-10:])), 4)])
    final_loss = float(np.mean(losses[-10:]))
    log(f"pretrained {step} steps ({step * cfg.batch_size} samples, {pool.rendered} frames rendered) in "
        f"{_fmt_time(train_s)}: {step / train_s:.2f} steps/s, loss {losses[0]:.3f} -> {final_loss:.3f}, "
        f"rendering {100 * pool.render_seconds / train_s:.0f}% of the time")

    model.eval().requires_grad_(False)
    t_eval = time.perf_counter()
    zs = zero_shot_eval(model, render, eval_prompts, arch=arch, image_size=cfg.image_size, frames=cfg.eval_frames,
                        seed=cfg.seed, amp=amp, device=dev, log=log)
    eval_s = time.perf_counter() - t_eval

    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    state[ACTIVATION_KEY] = model_activation(model)  # so `--pretrained PATH` builds the architecture it trained
    _save_atomic(state, out_path)
    meta = {
        **want,
        "arch": arch,
        "parameters": n_params,
        "checkpoint": out_path.name,
        "weights_sha256": _sha256(out_path),
        "steps": step,
        "samples": step * cfg.batch_size,
        "frames_rendered": pool.rendered,
        "first_loss": losses[0],
        "final_loss": final_loss,
        "loss_curve": curve,
        "logit_scale": float(model.logit_scale.exp()),
        "zero_shot": zs,
        "eval_prompts": _eval_spec(eval_prompts),
        "amp": amp,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "steps_per_s": round(step / train_s, 3),
        "seconds": {"train": round(train_s, 2), "render": round(pool.render_seconds, 2),
                    "step": round(step_seconds, 2), "eval": round(eval_s, 2)},
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2, allow_nan=True) + "\n")
    log(f"saved {out_path} (+ {meta_path.name})")
    return meta
