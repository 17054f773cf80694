"""Stage three: end-to-end fine-tuning from raw video (Text4Vis, ActionCLIP).

For the paradigms whose backbone must train, so that no cache can stand in for it: ``text4vis``
(Wu et al., arXiv:2207.01297) and ``actionclip`` (Wang et al., arXiv:2109.08472). Each is an object
in stages/paradigms/ (open_clip's task objects are the pattern) that owns the model assembly (what
trains beside the visual tower), the loss (the head's own) and the evaluation rule; this module is
the loop around them: data, optimiser, steps, evaluation, the run folder.

The temporal module / visual prompt *is* the stage-two head (``create_head``), fed by frame
embeddings the trainable encoder computes on the fly, so a head's definition lives in one place.

Optimiser: AdamW, the head at ``lr`` and the encoders at ``lr * backbone_ratio``, linear warmup
then cosine per step (``stages.runs.lr_factor``, as stage two). The values come from a recipe
(stages/recipes.py; ``pipeline finetune --recipe paper`` is each paper's, SPEC section 7:
Text4Vis 5e-5 / 5e-6, decay 0.2 on all parameters, betas (0.9, 0.999), 30 epochs, batch 256;
ActionCLIP 5e-5 / 5e-6, decay 0.2 on all parameters, betas (0.9, 0.98), 50 epochs, batch 128,
CLIP's ``logit_scale`` trainable and scaling the training loss, clamped at 100). The dataclass
defaults below are the ``quick`` values (no decay on gains and biases, frozen logit scale with
the head's fixed 100) but for the epochs (-1: the paradigm's 30 or 50) and 5 warm-up epochs.
``global_batch`` > ``batch_size`` x ranks is reached by gradient
accumulation (``Finetuner.step`` takes a list of micro-batches).

Data: decode (stages.video, decord then PyAV) in DataLoader workers, random TSN offsets and the
clip-level augmentation of stages.augment in training, stage one's fixed sampling and CxS views
in evaluation. Every random draw of a sample (frame offsets, crop, colour, template) comes from
a seed of (run seed, epoch, video), so the data do not depend on workers or ranks.

Distributed (torchrun, one process per GPU, gloo on CPU): the batch size is the *global*
batch; each global batch (a seeded permutation) is cut into equal per-rank slices, padded with
masked-out entries when it does not divide. ActionCLIP's contrastive loss sees the whole global
batch: video and text embeddings are all-gathered (the local slice keeps its gradient) and every
rank computes the same global loss; the backward pass scales it by the world size so that DDP's
gradient average equals the gradient of the global loss (a value every rank uses whole, the trained
logit scale, has its gradient divided by the world size: ``paradigms.base.replicated``). Under
gradient accumulation the contrast still spans the whole global batch: the micro-batches' embeddings
are cached, the loss is taken over all of them, and each micro-batch is run again to back-propagate
its share (``Finetuner._global_contrast``). With the same global batch a run on n
processes computes the same losses as a run on one (checked in tests/test_finetune.py).

Run folder (as stage two): config.json, last.pt (atomic, every epoch; ``resume`` continues from
it), metrics.json, curves.png. ``export_finetuned`` writes the fine-tuned CLIP as an ordinary
open_clip state dict, which ``pipeline extract --pretrained PATH`` loads like any checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cache.errors import ConfigError, DatasetError, ModelError, TrainingError, decode_failure_reason
from cache.flips import flip_label, label_swaps
from stages.augment import AugmentCfg, augment_clip_flip, build_train_transform, eval_resize, eval_views
from stages.backbone import (ACTIVATION_CHOICES, ACTIVATION_KEY, BackboneInfo, load_clip, model_activation,
                             model_config, pixel_stats, resolve_activation, resolve_model_name, resolve_pretrained,
                             weights_id)
from stages.checkpoint import load_checkpoint, save_checkpoint
from stages.config import OptionSet, parse_set, split_options, validate_choice
from stages.dist import DistContext, dist_device, rank_batches
from stages.evaluate import evaluate_head
from stages.heads.actionclip import video_text_kl_loss  # re-exported: the loss ActionCLIP fine-tuning uses
from stages.heads.registry import get_head_entry, make_cfg
from stages.paradigms import Paradigm, get_paradigm, list_paradigms
from stages.recipes import accumulation_steps, resolve_recipe, stage_three_recipe
from stages.resolve import Resolved, file_layer, world_size
from stages.runs import (AMP_CHOICES, RunLog, autocast, autocast_dtype, check_finite_weights, default_runs_root,
                         lr_factor, param_groups, settle_run, step_overflow_stops, write_experiment)
from stages.video import SamplingCfg, decode_clips, parse_frame_size, parse_views, validate_sampling

__all__ = [
    "PARADIGMS",
    "FinetuneCfg",
    "split_finetune_overrides",
    "resolve_finetune",
    "video_text_kl_loss",
    "DistContext",
    "VideoClips",
    "Finetuner",
    "finetune",
    "load_finetuned",
    "export_finetuned",
]

PARADIGMS = list_paradigms()  # ("text4vis", "actionclip"): stages/paradigms/
CKPT_FORMAT = "clipcache-finetune/1"


@dataclass
class FinetuneCfg:
    paradigm: str = "text4vis"        # text4vis | actionclip
    model: str = "ViT-B-16"           # open_clip name, or tiny / small / demo (built in)
    pretrained: str = ""              # open_clip tag or a checkpoint path ("" = seeded random init)
    init_seed: int = 0                # the random init when no pretrained weights are given
    activation: str = "auto"          # auto (what the weights say) | gelu | quick_gelu (a file that cannot say)
    frames: int = 8                   # T
    sampling: str = "segment"         # segment (TSN: random offsets in training) | dense
    stride: int = 8                   # dense sampling stride
    views: str = "1x1"                # CxS evaluation views (as stage one)
    resize_to: str = ""               # HxW: evaluation frames resized to exactly H x W before the crops
    #                                   (SSv2's protocols: the paper recipe on ssv2); "" = short side to the test scale
    epochs: int = -1                  # -1: paradigm default (Text4Vis 30, ActionCLIP 50); 0: evaluate only
    warmup_epochs: float = 5.0
    batch_size: int = 32              # per step: the global batch split over DDP ranks, or (global_batch > 0) per process
    global_batch: int = 0             # videos per optimiser step, by gradient accumulation; 0 = batch_size
    lr: float = 5e-5                  # temporal module / visual prompt
    backbone_ratio: float = 0.1       # encoders train at lr * backbone_ratio (5e-6)
    weight_decay: float = 0.2
    decay_all: bool = False           # decay on every parameter (biases, norms), as the papers' recipes
    train_logit_scale: bool = False   # ActionCLIP: CLIP's logit_scale trains (encoder lr) and scales the loss
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    label_smoothing: float = 0.0
    grad_clip: float = 0.0            # max grad norm; 0 = off
    grad_checkpointing: bool = False  # recompute the encoders' blocks in backward
    amp: str = "auto"                 # auto (bf16 on GPU, off on CPU) | none | bf16 | fp16
    device: str = "auto"
    workers: int = -1                 # decode workers per process; -1 = auto
    seed: int = 0
    train_split: str = "train"
    eval_split: str = "val"
    eval_every: int = 1
    eval_average: str = ""            # multi-view: scores | embeddings; "" = Text4Vis embeddings, ActionCLIP scores
    eval_batch_size: int = 0          # videos per evaluation batch (0 = batch_size)
    recipe: str = ""                  # the preset these values came from (stages/recipes.py); a record only

    def resolved_epochs(self) -> int:
        return get_paradigm(self.paradigm).default_epochs if self.epochs < 0 else self.epochs

    def validate(self) -> None:
        paradigm = get_paradigm(self.paradigm)  # an unknown paradigm is refused here
        validate_sampling(self.frames, self.sampling, self.stride, self.views)
        parse_frame_size(self.resize_to)  # a malformed HxW: one line
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.global_batch < 0:
            raise ConfigError(f"global_batch must be >= 0 (0 = batch_size), got {self.global_batch}")
        paradigm.validate(self)  # what this paradigm cannot use (e.g. train_logit_scale for text4vis)
        validate_choice("amp", self.amp, AMP_CHOICES)
        validate_choice("activation", self.activation, ACTIVATION_CHOICES)
        if self.eval_average not in ("", "scores", "embeddings"):
            raise ConfigError(f"eval_average must be scores or embeddings, got '{self.eval_average}'")
        if self.lr <= 0 or self.backbone_ratio < 0 or self.weight_decay < 0:
            raise ConfigError("lr must be positive, backbone_ratio and weight_decay non-negative")
        if self.eval_every < 1:
            raise ConfigError("eval_every must be at least 1")
        checks = (
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("eps", self.eps > 0, "> 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)"),
            ("workers", self.workers >= -1, "0 or more (-1: auto)"),
            ("eval_batch_size", self.eval_batch_size >= 0, "0 or more (0 = batch_size)"),
            ("seed", self.seed >= 0, "an integer >= 0"),
            ("init_seed", self.init_seed >= 0, "an integer >= 0"),
        )
        for name, ok, need in checks:
            if not ok:
                raise ConfigError(f"{name} must be {need}, got {getattr(self, name)!r}")


def split_finetune_overrides(pairs, paradigm: str, where: str = "--set", options=()) -> tuple[dict, dict, dict]:
    """--set key=value pairs (or an experiment file's {key: value}) -> (FinetuneCfg, AugmentCfg,
    head) overrides, typed by the one rule of stages/config.py.

    ``aug.x`` goes to the augmentation, ``head.x`` to the head, ``finetune.x`` to fine-tuning; a
    bare key is a fine-tuning option when FinetuneCfg has it, else a head option.
    """
    get_paradigm(paradigm)  # an unknown paradigm is refused here
    values = dict(pairs) if isinstance(pairs, dict) else parse_set(pairs)
    sets = [OptionSet("finetune", FinetuneCfg, "fine-tuning options", exclude=("paradigm", "recipe")),
            OptionSet("head", get_head_entry(paradigm).cfg_cls, f"head '{paradigm}' options"),
            OptionSet("aug", AugmentCfg, "augmentation options", bare=False)]
    out = split_options(values, sets, where, options)
    make_cfg(paradigm, out["head"])  # the head's options build a head, before any work
    return out["finetune"], out["aug"], out["head"]


def resolve_finetune(paradigm: str, recipe: str = "paper", *, file: dict | None = None, sets=(),
                     flags: dict | None = None, where: str = "config file", options=(), dataset: str = "") -> Resolved:
    """Stage three's options, resolved as stages/resolve.py says: FinetuneCfg's defaults < the
    paradigm's preset ``recipe`` < ``file`` (an experiment file's keys) < ``sets`` (--set pairs or
    {key: value}) < ``flags`` ({FinetuneCfg field: value} given explicitly); the same layers for
    the head options and the augmentation. ``pretrained`` 'auto' (unless set) picks the weights.
    ``dataset``: the paper recipe tests with the paradigm's protocol for it where one is registered
    (text4vis on ssv2: 240 x 320 frames)."""
    file_ft, file_aug, file_head = split_finetune_overrides(file or {}, paradigm, where, options)
    set_ft, set_aug, set_head = split_finetune_overrides(sets, paradigm)
    you = {**set_ft, **{k: v for k, v in (flags or {}).items() if v is not None}}
    rec = stage_three_recipe(paradigm, recipe, dataset)
    defaults = asdict(FinetuneCfg(paradigm=paradigm))
    explicit = {**file_layer(file_ft, {**defaults, **rec.values}, you), **you}  # file < --set < flags
    values, lines = resolve_recipe(rec, explicit, defaults, world=world_size())
    cfg = FinetuneCfg(**{**values, "recipe": recipe})
    weights, why = resolve_pretrained(cfg.model, cfg.pretrained if "pretrained" in {**file_ft, **explicit} else "auto")
    cfg = replace(cfg, pretrained=weights)
    if why and weights:
        lines.append(f"  {why}")
    aug = {**rec.augment, **file_aug, **set_aug}
    lines.append("  augmentation: " + (", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in aug.items()) or "generic (AugmentCfg defaults)"))
    cfg.validate()
    return Resolved(cfg, {**rec.head, **file_head, **set_head}, aug, lines=lines)


# ----------------------------------------------------------------------------- data
class VideoClips(Dataset):
    """Videos as uint8 clips; item -1 is padding.

    Training: {"video": (T, 3, S, S)} with random TSN offsets and clip-level augmentation,
    "template": the random text template of the sample. Evaluation: {"video": (V, T, 3, S, S)},
    stage one's views cut from the short side resized to ``resize`` (the test scale, default S), or
    from frames resized to exactly ``frame_size`` (H, W) (SSv2's protocols).
    Both: "label", "index", "valid" (False: padding or undecodable), "error".
    """

    def __init__(self, items: list, sampling: SamplingCfg, size: int, train: bool, seed: int = 0,
                 aug: AugmentCfg | None = None, num_templates: int = 0, resize: int | None = None,
                 swaps: tuple[int, ...] | None = None, frame_size: tuple[int, int] | None = None):
        self.items, self.sampling, self.size, self.train = list(items), sampling, size, train
        self.swaps = swaps  # the label of a mirrored clip per class (cache/flips.py), for a dataset whose flips swap labels
        self.resize = resize or size  # evaluation: the short side before the crops (the test scale)
        self.frame_size = frame_size  # evaluation: or every frame to exactly H x W first (SSv2)
        self.seed, self.num_templates, self.epoch = seed, num_templates, 0
        self.transform = build_train_transform(size, aug) if train else None

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shape(self) -> tuple[int, ...]:
        T, S = self.sampling.frames, self.size
        return (T, 3, S, S) if self.train else (self.sampling.views, T, 3, S, S)

    def _empty(self, index: int, label: int, error: str) -> dict:
        return {"video": torch.zeros(self._shape(), dtype=torch.uint8), "label": torch.tensor(label),
                "index": torch.tensor(index), "valid": torch.tensor(False), "template": torch.tensor(0),
                "error": error}

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            return self._empty(-1, 0, "")
        item = self.items[i]
        template, label = 0, item.label
        try:
            if self.train:
                rng = np.random.default_rng([self.seed, self.epoch, i])
                clips, _ = decode_clips(item.path, self.sampling, item.num_frames, rng=rng)
                video, flipped = augment_clip_flip(clips[0], self.transform, [self.seed, self.epoch, i, 1])  # (T, 3, S, S)
                label = flip_label(item.label, flipped, self.swaps)
                if self.num_templates:
                    template = int(rng.integers(self.num_templates))
            else:
                clips, _ = decode_clips(item.path, self.sampling, item.num_frames)
                video = eval_views(clips, self.size, self.sampling.crops, self.resize,
                                   self.frame_size)  # (V, T, 3, S, S)
        except Exception as exc:  # a video that does not decode (or crashes its decoder) must not stop the run
            return self._empty(i, item.label, decode_failure_reason(exc))
        return {"video": video, "label": torch.tensor(label), "index": torch.tensor(i),
                "valid": torch.tensor(True), "template": torch.tensor(template), "error": ""}


def collate_clips(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) if isinstance(items[0][k], torch.Tensor)
            else [it[k] for it in items] for k in items[0]}


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _normalize_chw(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(..., 3, S, S) uint8 -> float normalised with the model's mean/std."""
    return (x.float().div_(255.0) - mean) / std


class Finetuner:
    """Everything a stage-three run holds: model, optimiser, schedule, data; one step at a time."""

    def __init__(self, spec, cfg: FinetuneCfg, head_overrides: dict | None = None, aug: AugmentCfg | None = None,
                 dist_ctx: DistContext | None = None, log=print):
        import open_clip

        cfg.validate()
        self.spec, self.cfg, self.log = spec, cfg, log
        self.aug = aug or AugmentCfg()
        self.aug.validate()
        self.dist = dist_ctx or DistContext.from_env()
        for split in (cfg.train_split, cfg.eval_split):
            if split not in spec.splits or not spec.splits[split]:
                raise DatasetError(f"dataset '{spec.name}' has no '{split}' videos (splits: {', '.join(spec.splits)})")
        self.device = dist_device(cfg.device, self.dist)
        self.dist.start(self.device)
        self.amp_dtype = autocast_dtype(cfg, self.device)

        self.arch = resolve_model_name(cfg.model)
        self.info = BackboneInfo.from_config(model_config(cfg.model))
        clip = load_clip(cfg.model, cfg.pretrained or None, device="cpu", seed=cfg.init_seed, activation=cfg.activation)
        if not cfg.pretrained:
            log(f"no pretrained weights given: {self.arch} starts from a seeded random init (seed {cfg.init_seed})")
        mean, std = pixel_stats(clip.visual)
        self.mean = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(3, 1, 1)
        self.tokenizer = open_clip.get_tokenizer(self.arch)
        classes = list(spec.classes)
        K = len(classes)

        paradigm = get_paradigm(cfg.paradigm)
        values = {"num_classes": K, "embed_dim": self.info.embed_dim, "frames": cfg.frames, **paradigm.head_values()}
        values.update(head_overrides or {})
        torch.manual_seed(cfg.seed)  # the head's initial weights depend on the seed alone
        head = get_head_entry(cfg.paradigm).head_cls(make_cfg(cfg.paradigm, values))

        model = paradigm(clip, head)
        model.assemble(cfg, self.tokenizer, classes, self.device)  # what trains, what the loss needs
        if cfg.grad_checkpointing:
            clip.set_grad_checkpointing(True)
        self.model: Paradigm = model.to(self.device)
        self.model.train()
        self.trainable = {"visual": sum(p.numel() for p in clip.visual.parameters() if p.requires_grad),
                          "text": sum(p.numel() for n, p in clip.named_parameters()
                                      if p.requires_grad and not n.startswith("visual.")),
                          "head": head.num_trainable()}
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.ddp = self.model

        # Optimiser: encoders at lr * backbone_ratio, the head at lr; decay on every parameter
        # (decay_all, the papers' recipes) or none on gains and biases.
        parts = [("visual", list(clip.visual.named_parameters()), cfg.lr * cfg.backbone_ratio),
                 ("head", list(head.named_parameters()), cfg.lr),
                 *self.model.trained_parts(cfg)]  # e.g. ActionCLIP's text tower and logit scale
        groups = []
        for name, named, lr in parts:
            groups += param_groups(named, lr, cfg.weight_decay, cfg.decay_all, name)
        self.opt = torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.named_trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

        self.sampling_train = SamplingCfg(cfg.frames, cfg.sampling, cfg.stride, 1, 1)
        clips_n, crops_n = parse_views(cfg.views)
        self.sampling_eval = SamplingCfg(cfg.frames, cfg.sampling, cfg.stride, clips_n, crops_n)
        size = self.info.image_size
        swaps = label_swaps(spec.classes, getattr(spec, "flip_swaps", False))
        if swaps is not None and self.aug.flip > 0:
            pairs = ", ".join(f"{i}/{j}" for i, j in enumerate(swaps) if i < j)
            log(f"flipped clips train with their mirror class's label ({spec.name}: the mirror classes {pairs})")
        self.train_data = VideoClips(spec.splits[cfg.train_split], self.sampling_train, size, train=True,
                                     seed=cfg.seed, aug=self.aug, num_templates=paradigm.train_templates, swaps=swaps)
        self.eval_data = VideoClips(spec.splits[cfg.eval_split], self.sampling_eval, size, train=False, seed=cfg.seed,
                                    resize=eval_resize(size, self.aug),  # the paradigm's test scale, then crops
                                    frame_size=parse_frame_size(cfg.resize_to))  # or H x W (SSv2)
        self.epochs = cfg.resolved_epochs()
        self.global_batch = cfg.global_batch or cfg.batch_size  # videos per optimiser step
        self.accum = accumulation_steps(cfg.batch_size, cfg.global_batch, self.dist.world)
        if paradigm.contrast_keys and self.accum > 1:
            log(f"{cfg.paradigm} contrasts each global batch of {self.global_batch} videos at once, as its paper: "
                f"{self.accum} micro-batches of {cfg.batch_size} per process, their embeddings cached (a second "
                "forward per micro-batch)")
        self.steps_per_epoch = max(1, math.ceil(len(self.train_data) / self.global_batch))
        total = self.steps_per_epoch * max(self.epochs, 1)
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, total, warmup))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        auto_workers = max(1, min(8, (os.cpu_count() or 2) // (2 * self.dist.local_world)))
        self.workers = cfg.workers if cfg.workers >= 0 else auto_workers
        self.failures: dict[int, dict] = {}

    # ------------------------------------------------------------------ data
    def loader(self, data: VideoClips, epoch: int, shuffle: bool, batch_size: int) -> DataLoader:
        data.set_epoch(epoch)
        batches = rank_batches(len(data), batch_size, self.dist.world, self.dist.rank, self.cfg.seed, epoch, shuffle)
        return DataLoader(data, batch_sampler=batches, collate_fn=collate_clips, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.workers else None)

    def _record_failures(self, batch: dict) -> None:
        for idx, err in zip(batch["index"].tolist(), batch["error"]):
            if err and idx >= 0:
                self.failures[idx] = {"path": self.train_data.items[idx].path, "reason": err}

    # ------------------------------------------------------------------ one step
    def step(self, batch: dict | list[dict]) -> float | None:
        """Forward, backward and AdamW on one global batch (this rank's slice of it), given whole or
        as micro-batches (gradient accumulation); returns the global batch's loss. Each micro-batch's
        loss is the paradigm's (``Paradigm.loss``: its share of the global batch's), scaled by the
        world size in the backward pass so that DDP's gradient average is the global loss's gradient."""
        cfg = self.cfg
        group = batch if isinstance(batch, list) else [batch]
        for b in group:
            self._record_failures(b)
        counts = self.dist.all_sum(torch.stack([b["valid"].to(torch.float32).sum() for b in group]).to(self.device))
        counts = [int(c) for c in counts.tolist()]
        n_valid = sum(counts)
        if n_valid == 0:  # nothing decodable in this global batch: skip it everywhere
            self.sched.step()
            return None
        last = max(j for j, c in enumerate(counts) if c)
        self.opt.zero_grad(set_to_none=True)
        todo = [(j, self._inputs(b)) for j, b in enumerate(group) if counts[j]]
        if self.model.contrast_keys and len(todo) > 1:
            value = self._global_contrast(todo, n_valid)
        else:
            value = 0.0
            for j, (valid, video, labels, text) in todo:
                with self._sync(j < last):
                    with autocast(self.device, self.amp_dtype):
                        out = self.ddp(_normalize_chw(video, self.mean, self.std), text)
                    loss, part = self.model.loss(out, labels, valid, counts[j], n_valid, cfg.label_smoothing,
                                                 self.dist)
                    value += part  # this micro-batch's part of the global batch's loss
                    self.scaler.scale(loss * self.dist.world).backward()
        step = self.sched.last_epoch + 1  # this optimiser step, counted over the whole run
        if not math.isfinite(value):  # the global batch's loss, the same on every rank: all stop here
            raise TrainingError(f"fine-tuning stopped: the loss is {value} at optimiser step {step}; lower the "
                                "learning rate (--set lr=...)")
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], cfg.grad_clip)
        with step_overflow_stops(f"step {step}"):
            self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        check_finite_weights(self.named_trainable, f"step {step}")
        return value

    def _inputs(self, b: dict) -> tuple:
        """A micro-batch on the device: valid mask, uint8 video (B, T, 3, S, S), labels, text inputs."""
        valid = b["valid"].to(self.device, torch.float32)
        video = b["video"].to(self.device, non_blocking=True)
        labels = b["label"].to(self.device)
        return valid, video, labels, self.model.text_inputs(labels, b["template"].to(self.device))  # e.g. tokens

    def _sync(self, skip: bool):
        """DDP's gradient all-reduce off for all but the last micro-batch of a global batch."""
        return self.ddp.no_sync() if self.dist.enabled and skip else contextlib.nullcontext()

    def _global_contrast(self, todo: list, n_valid: int) -> float:
        """One contrast over the whole accumulated global batch (ActionCLIP's paper contrasts 128
        videos; memory holds 32 per step) at the memory of one micro-batch, by caching embeddings:
        (1) every micro-batch forward without a graph, keeping the contrasted outputs and the RNG
        state; (2) the loss over all of them at once (gathered over ranks as before), back-propagated
        to those outputs only; (3) every micro-batch forward again from the same RNG state, with
        a graph, back-propagating the outputs' gradients (a second forward: about 1.3x the compute of
        a step). The gradient is the one-big-batch gradient (tests/test_recipes.py checks it)."""
        keys = self.model.contrast_keys
        cached, states = [], []
        with torch.no_grad():
            for _, (valid, video, labels, text) in todo:
                states.append(_rng_state(self.device))
                with autocast(self.device, self.amp_dtype):
                    out = self.model(_normalize_chw(video, self.mean, self.std), text)
                cached.append({k: v.detach().float() for k, v in out.items()})
        whole = {k: torch.cat([c[k] for c in cached]).requires_grad_(True) for k in keys}
        if "logit_scale" in cached[0]:  # one value, the same in every micro-batch
            whole["logit_scale"] = cached[0]["logit_scale"].clone().requires_grad_(True)
        valid = torch.cat([t[1][0] for t in todo])
        labels = torch.cat([t[1][2] for t in todo])
        loss, value = self.model.loss(whole, labels, valid, n_valid, n_valid, self.cfg.label_smoothing, self.dist)
        loss.backward()  # to the cached outputs (float32, unscaled)
        rows = np.cumsum([0] + [c[keys[0]].shape[0] for c in cached])
        for n, (_, (valid, video, labels, text)) in enumerate(todo):
            with self._sync(n < len(todo) - 1):
                _set_rng_state(self.device, states[n])
                with autocast(self.device, self.amp_dtype):
                    out = self.ddp(_normalize_chw(video, self.mean, self.std), text)
                surrogate = sum((out[k].float() * whole[k].grad[rows[n]:rows[n + 1]]).sum() for k in keys)
                if "logit_scale" in whole and n == len(todo) - 1:  # its gradient once, with the last one
                    surrogate = surrogate + (out["logit_scale"].float() * whole["logit_scale"].grad).sum()
                self.scaler.scale(surrogate * self.dist.world).backward()
        return value

    def train_batches(self, epoch: int):
        """This rank's training batches of one epoch: one per optimiser step, or (accumulation) a
        list of micro-batches of ``batch_size`` per optimiser step of ``global_batch`` videos, cut
        from the same seeded global batches."""
        if self.accum == 1:
            yield from self.loader(self.train_data, epoch, shuffle=True, batch_size=self.global_batch)
            return
        self.train_data.set_epoch(epoch)
        sizes, micro = [], []
        for part in rank_batches(len(self.train_data), self.global_batch, self.dist.world, self.dist.rank,
                                 self.cfg.seed, epoch, shuffle=True):
            chunks = [part[i:i + self.cfg.batch_size] for i in range(0, len(part), self.cfg.batch_size)]
            sizes.append(len(chunks))
            micro += chunks
        loader = iter(DataLoader(self.train_data, batch_sampler=micro, collate_fn=collate_clips,
                                 num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                 prefetch_factor=4 if self.workers else None))
        for k in sizes:
            yield [next(loader) for _ in range(k)]

    def train_epoch(self, epoch: int, progress: bool = False, bar=None) -> dict:
        """One epoch; ``bar``: the run's progress bar (stages/progress.py), advanced a step at a time."""
        torch.manual_seed(self.cfg.seed * 1000 + epoch)  # dropout etc.: the same stream resumed or not
        self.model.train()
        losses = []
        for batch in self.train_batches(epoch):
            value = self.step(batch)
            if bar is not None:
                bar.update(1)
            if value is not None:
                losses.append(value)
                if bar is not None:
                    bar.set_postfix_str(f"epoch {epoch + 1}/{self.epochs}, loss {value:.3f}", refresh=False)
        return {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else None,
                "first_loss": losses[0] if losses else None, "steps": len(losses),
                "lr": self.sched.get_last_lr()[0]}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_embeddings(self) -> tuple[list[dict], list[dict]]:
        """Frame embeddings of this rank's evaluation videos, every view: [{"frame_emb": (V, T, E),
        "label"}], and the undecodable videos of all ranks."""
        self.model.eval()
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        per_video: list[dict] = []
        failed: list[dict] = []
        for batch in self.loader(self.eval_data, 0, shuffle=False, batch_size=bs):
            x = batch["video"].to(self.device, non_blocking=True)  # (B, V, T, 3, S, S)
            B, V = x.shape[:2]
            with autocast(self.device, self.amp_dtype):
                emb = self.model.encode_frames(_normalize_chw(x.flatten(0, 1), self.mean, self.std))  # (B*V, T, E)
            emb = emb.float().view(B, V, *emb.shape[1:]).cpu()  # (B, V, T, E)
            for j, index in enumerate(batch["index"].tolist()):
                if batch["valid"][j]:  # held in fp16, as a cache holds them (heads compute in float32)
                    per_video.append({"frame_emb": emb[j].half(), "label": batch["label"][j]})
                elif index >= 0:
                    failed.append({"path": self.eval_data.items[index].path, "reason": batch["error"][j]})
        return per_video, sorted((f for part in self.dist.all_objects(failed) for f in part), key=lambda f: f["path"])

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 / top-5 / mean-class with the shared evaluate_head (stages/evaluate.py) on fine-tuned frame embeddings."""
        self.model.eval()
        data, failed = self.eval_embeddings()
        if not sum(self.dist.all_objects(len(data))):
            raise DatasetError(f"no '{self.cfg.eval_split}' video could be decoded")
        self.model.prepare_eval(self.tokenizer, list(self.spec.classes), self.device)  # e.g. the text classifier
        average = self.cfg.eval_average or self.model.eval_average
        metrics = evaluate_head(self.model.head, data, self.device, batch_size=64, average=average, amp_dtype=self.amp_dtype,
                                dist_ctx=self.dist, split=False)  # each rank scores its own videos
        self.model.train()
        metrics["failed"] = len(failed)
        self.eval_failures = failed
        return metrics

    # ------------------------------------------------------------------ state
    def state(self, epoch: int, history: list, resolved: dict) -> dict:
        return {"format": CKPT_FORMAT, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
                "history": history, "config": resolved}

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])


# ----------------------------------------------------------------------------- the run
def _resolved(spec, cfg: FinetuneCfg, aug: AugmentCfg, tuner: Finetuner | None, head_overrides: dict) -> dict:
    section = asdict(cfg)
    if get_paradigm(cfg.paradigm).contrast_keys and cfg.global_batch > cfg.batch_size:
        section["contrast"] = "global batch"  # accumulated micro-batches are contrasted as one (since 2026-12-07)
    return {
        "stage": "finetune",
        "finetune": section,
        "augment": asdict(aug),
        "head": {"name": cfg.paradigm, **(asdict(tuner.model.head.cfg) if tuner else head_overrides)},
        "backbone": {"arch": resolve_model_name(cfg.model), "pretrained": cfg.pretrained,
                     "weights": weights_id(cfg.pretrained, cfg.init_seed),
                     "activation": resolve_activation(cfg.model, cfg.pretrained or None, cfg.activation)[0]},
        "dataset": {"name": spec.name, "classes": list(spec.classes), "video_root": str(spec.video_root),
                    "sources": dict(getattr(spec, "sources", {})),
                    "videos": {s: len(v) for s, v in spec.splits.items()}},
    }


def _run_id(spec, cfg: FinetuneCfg, aug: AugmentCfg, head_overrides: dict) -> str:
    ident = _resolved(spec, cfg, aug, None, head_overrides)
    ident["finetune"] = {k: v for k, v in ident["finetune"].items()
                         if k not in ("device", "workers", "eval_batch_size")}
    ident["lists"] = {s: [(it.path, it.label) for it in items] for s, items in spec.splits.items()}
    blob = json.dumps(ident, sort_keys=True, default=str)
    return f"finetune-{cfg.paradigm}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def finetune(spec, cfg: FinetuneCfg, head_overrides: dict | None = None, aug: AugmentCfg | None = None,
             run_dir: str | Path | None = None, runs_root: str | Path | None = None, resume: bool = False,
             progress: bool = True, log=print, force: bool = False) -> dict:
    """Fine-tune ``cfg.paradigm`` end to end on ``spec`` (a DatasetSpec), evaluate, write the run folder.

    A run folder that already holds a run: as stage two (``stages.runs.existing_run``), rerunning the
    same command continues an unfinished run and reuses a finished one; ``force`` starts over.

    Under torchrun every rank calls this; rank 0 writes the folder, the others wait for it.
    """
    aug = aug or AugmentCfg()
    head_overrides = dict(head_overrides or {})
    dist_ctx = DistContext.from_env()
    t0 = time.perf_counter()
    if run_dir is None:
        root = Path(runs_root) if runs_root else default_runs_root()
        run_dir = root / _run_id(spec, cfg, aug, head_overrides)
    run_dir = Path(run_dir)
    say = log if dist_ctx.main else (lambda *a, **k: None)
    runlog = RunLog(run_dir, enabled=dist_ctx.main)  # status.json + TensorBoard events
    try:
        tuner = Finetuner(spec, cfg, head_overrides, aug, dist_ctx, log=say)
        resolved = _resolved(spec, cfg, aug, tuner, head_overrides)
        resolved["world_size"] = dist_ctx.world
        ckpt_path = run_dir / "last.pt"
        start_epoch, history = 0, []
        # What the run folder holds decides (rank 0, before anyone writes): an unfinished run of
        # these settings continues, a finished one is reused, anything else needs --force.
        action, reused = settle_run(run_dir, resolved, resume, force, dist_ctx, say,
                                    sections=("finetune", "head", "augment"))
        if action == "reuse":
            return {**reused, "rank": dist_ctx.rank}
        if action == "resume":
            ckpt = load_checkpoint(ckpt_path, map_location=tuner.device)
            if ckpt.get("format") != CKPT_FORMAT:
                raise ConfigError(f"{ckpt_path} is not a stage-three checkpoint")
            tuner.load_state(ckpt)
            start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
            say(f"resuming {run_dir} from epoch {start_epoch}")
        # after the resume check: config.json always describes last.pt (rank 0 only)
        runlog.begin(resolved, fresh=action == "fresh", epochs=tuner.epochs, start_epoch=start_epoch)
        if dist_ctx.main:  # config.yaml: the head options as given (they name the run); `pipeline finetune --config` reruns it
            write_experiment(run_dir, resolved, head_options=head_overrides, dataset_args=getattr(spec, "args", None))
        E = tuner.epochs
        metrics = next((h["val"] for h in reversed(history) if "val" in h), {})
        if E == 0:
            metrics = tuner.evaluate()
            history.append({"epoch": 0, "train_loss": None, "val": metrics})
        from stages.progress import progress_bar

        bar = progress_bar(total=tuner.steps_per_epoch * E, initial=tuner.steps_per_epoch * start_epoch,
                           desc=f"finetune {cfg.paradigm}", unit="step", enabled=progress and dist_ctx.main)
        for epoch in range(start_epoch, E):
            entry = tuner.train_epoch(epoch, progress, bar)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == E:
                metrics = tuner.evaluate()
                entry["val"] = metrics
            history.append(entry)
            runlog.epoch(entry, history, f"finetune {cfg.paradigm}")
            bar.clear()
            # one line per epoch (fine-tuning epochs are long), with the loss of the epoch's first step
            first = f" (first step {entry['first_loss']:.6f})" if entry["first_loss"] is not None else ""
            loss = f"{entry['train_loss']:.4f}" if entry["train_loss"] is not None else "n/a"
            val = f", val top1 {metrics['top1']:.1f}%" if "val" in entry else ""
            say(f"epoch {epoch + 1}/{E}: loss {loss}{first}{val}")
            if dist_ctx.main:
                save_checkpoint(tuner.state(epoch + 1, history, resolved), ckpt_path)
            dist_ctx.barrier()
        bar.close()
        train_failed = [f for part in dist_ctx.all_objects(tuner.failures) for f in part.values()]
        result = {"paradigm": cfg.paradigm, "final": metrics, "history": history,
                  "first_step_loss": next((h["first_loss"] for h in history if h.get("first_loss") is not None), None),
                  "train_videos": len(tuner.train_data), "eval_videos": len(tuner.eval_data),
                  "failures": {"train": sorted(train_failed, key=lambda f: f["path"]),
                               "eval": getattr(tuner, "eval_failures", [])},
                  "trainable_params": tuner.trainable, "world_size": dist_ctx.world, "rank": dist_ctx.rank, "epochs": E,
                  "seconds": time.perf_counter() - t0, "run_dir": str(run_dir)}
        runlog.complete(result, f"finetune {cfg.paradigm}")  # rank 0 only
        dist_ctx.barrier()
        return result
    except BaseException as exc:
        runlog.fail(exc)
        raise
    finally:
        dist_ctx.stop()


# ----------------------------------------------------------------------------- using a fine-tuned run
def _read_run(run_dir: str | Path) -> dict:
    ckpt_path = Path(run_dir) / "last.pt"
    if not ckpt_path.exists():
        raise ConfigError(f"no stage-three checkpoint in {run_dir} (expected {ckpt_path.name})")
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ConfigError(f"{ckpt_path} is not a stage-three (finetune) checkpoint")
    return ckpt


def load_finetuned(run_dir: str | Path) -> tuple[nn.Module, nn.Module, dict]:
    """(open_clip model, stage-two head, resolved config) of a fine-tuned run, on CPU, eval mode."""
    ckpt = _read_run(run_dir)
    resolved = ckpt["config"]
    ft = resolved["finetune"]
    # the architecture the run trained: the activation its weights were resolved to (runs from before
    # the activation was recorded: the model's default)
    act = resolved.get("backbone", {}).get("activation", "auto")
    clip = load_clip(ft["model"], None, device="cpu", seed=ft["init_seed"], activation=act)
    head_cfg = {k: v for k, v in resolved["head"].items() if k != "name"}
    head = get_head_entry(resolved["head"]["name"]).head_cls(make_cfg(resolved["head"]["name"], head_cfg))
    model = get_paradigm(ft["paradigm"])(clip, head)  # the state dict's layout: clip.*, head.*
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:160]
        raise ModelError(f"checkpoint in {run_dir} does not fit {ft['model']}: {first}") from None
    return clip.eval(), head.eval(), resolved


def export_finetuned(run_dir: str | Path, out: str | Path) -> Path:
    """Write the fine-tuned CLIP as a plain open_clip state dict (``--pretrained`` of stage one), with
    its activation recorded (ACTIVATION_KEY) so that stage one builds the architecture it trained."""
    clip, _head, _resolved_cfg = load_finetuned(run_dir)
    out = Path(out)
    if out.suffix not in (".pt", ".pth", ".bin"):
        raise ConfigError(f"--out must end in .pt, .pth or .bin (a torch state dict), got '{out.name}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
             for k, v in clip.state_dict().items()}
    state[ACTIVATION_KEY] = model_activation(clip)  # what the fine-tuned weights ran with
    save_checkpoint(state, out)
    return out

