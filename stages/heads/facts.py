"""What a head's paper says, registered beside the head (timm's ``default_cfgs`` pattern).

A head file passes these to :func:`stages.heads.registry.register_head`: its paper's stage-two
recipe (:class:`PaperRecipe`), its test protocol (:class:`Protocol`), its official train
pipeline (:class:`TrainPipeline`, what `extract --train-aug K --aug-recipe paper` draws), its
view-bank default and its published results (:class:`PublishedResult`). stages/recipes.py holds the machinery that
reads them (``stage_two_recipe``, ``get_protocol``, ``protocol_for_heads``, ...); pipeline/ reads
the published results from pipeline/option_defaults.json, generated from the registry, so
``pipeline runs`` needs no torch. Plain data: no torch, no other stage module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SCALE_256", "CROPS_TSN", "PaperRecipe", "Protocol", "TrainPipeline", "PublishedResult"]

SCALE_256 = 256 / 224  # "scale 256, crop 224": the short side at 256/224 of the input size

# where the project's 3 crops sit against the TSN test code Side4Video and Text4Vis share
CROPS_TSN = ("the 3 crops sit at 0, 1/2 and 1 of the free room along the long side; their code takes 0, 4 and 2 "
             "quarters of it (rounded down) across the width (left, right, centre): a few pixels apart on a "
             "landscape video, while on a portrait one theirs are the centre crop three times")


@dataclass(frozen=True)
class PaperRecipe:
    """A head's published stage-two recipe: TrainCfg values at the paper's global batch.

    ``cuda``: values that apply on a GPU only (EVL's fp16); ``note``: what `paper` means for a
    head whose paper publishes no recipe over frozen features."""

    source: str                                  # what it reproduces, one line
    values: dict                                 # TrainCfg values (without the per-step batch)
    ref_batch: int                               # global batch the lr is tuned for (linear-scaling reference)
    head: dict = field(default_factory=dict)     # head options
    cuda: dict = field(default_factory=dict)     # TrainCfg values on a GPU
    note: str = ""


@dataclass(frozen=True)
class Protocol:
    """A paper's test protocol (``pipeline extract --protocol NAME``), named as its head."""

    name: str
    frames: int
    sampling: str                   # segment | segment-start | dense
    stride: int                     # dense stride
    views: str                      # CxS of the val/test splits
    resize_ratio: float             # short side = round(input size x ratio), then crop the input size
    eval_average: str               # stage two's multi-view rule: scores (softmax averaged) | embeddings
    template_average: str = ""      # ActionCLIP: "score" = per-template softmax, then mean
    paper: str = ""                 # the paper's protocol, as published
    differs: str = ""               # what the project does differently, and why


@dataclass(frozen=True)
class TrainPipeline:
    """A paper's official train augmentation of one clip, as data (SPEC section 7), drawn once per
    view by the view bank (stages.video.augmented_views, `extract --train-aug K --aug-recipe paper`)
    and by online training. Every random parameter is drawn from the view bank's numpy generator
    and recorded per view; the ops run in this order:

    1. the short side scaled to round(input size x ``resize_ratio``) (0: the decoded frame as is);
    2. RandAugment before the crop when ``ra_before_crop`` (on the whole frame, as EVL and
       ActionCLIP apply it): ``ra_ops`` ops of torchvision's RandAugment table at magnitude bin
       ``ra_magnitude`` of 31 (0-30), each op and its sign drawn once per clip
       (``ra_per_frame`` False: the same ops for every frame) or once per frame;
    3. the crop, resized to the input size with ``interpolation``: ``random_resized`` (area
       fraction uniform in ``area``, aspect ratio log-uniform in ``ratio``) or ``multiscale`` (TSN's:
       sides = the short side x one of ``ms_scales`` each, at most ``ms_max_distort`` steps apart,
       at one of 13 fixed positions); one box for every frame of the clip;
    4. a horizontal flip with probability ``flip`` (per clip);
    5. colour jitter with probability ``jitter`` (factors in [1 - b, 1 + b] for brightness,
       contrast and saturation, hue in [-h, h], the four in a random order; per clip);
    6. grayscale with probability ``grayscale`` (per clip);
    7. RandAugment after the crop when not ``ra_before_crop``.

    ``clip``: the temporal draw the paper makes ("dense": a random dense clip; "segment": random
    TSN offsets); the view bank draws it with the cache's own sampling, which the head's test
    protocol sets to the same family."""

    source: str                                   # what it reproduces, one line
    clip: str = "segment"                         # segment (random TSN offsets) | dense (a random dense clip)
    resize_ratio: float = 0.0                     # short side = round(input size x ratio) first; 0 = no resize
    crop: str = "random_resized"                  # random_resized | multiscale
    area: tuple[float, float] = (0.08, 1.0)       # random resized crop: area fraction range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)   # and aspect ratio range
    ms_scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)  # multi-scale crop: side fractions
    ms_max_distort: int = 1
    interpolation: str = "bilinear"               # bilinear | bicubic (resize and crop)
    flip: float = 0.0
    jitter: float = 0.0                           # probability of colour jitter
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale: float = 0.0
    ra_ops: int = 0                               # RandAugment ops (0: none)
    ra_magnitude: int = 0                         # RandAugment magnitude bin (0-30)
    ra_per_frame: bool = False                    # RandAugment ops drawn per frame, not per clip
    ra_before_crop: bool = True                   # RandAugment on the whole frame before the crop

    def key(self) -> dict:
        """What decides the drawn views (the cache key's part): every field but ``source``."""
        from dataclasses import asdict

        out = asdict(self)
        out.pop("source")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def describe(self) -> str:
        """One line: what the pipeline draws."""
        parts = [f"{'random dense clip' if self.clip == 'dense' else 'random TSN offsets'}"]
        if self.resize_ratio:
            parts.append(f"short side x {self.resize_ratio:.4g}")
        if self.ra_ops and self.ra_before_crop:
            parts.append(self._ra())
        if self.crop == "multiscale":
            parts.append(f"multi-scale crop ({', '.join(f'{s:g}' for s in self.ms_scales)}) {self.interpolation}")
        else:
            parts.append(f"random resized crop {self.area[0]:g}-{self.area[1]:g} {self.interpolation}")
        parts.append(f"flip p {self.flip:g}" if self.flip else "no flip")
        if self.jitter:
            parts.append(f"colour jitter p {self.jitter:g} ({self.brightness:g}, {self.contrast:g}, "
                         f"{self.saturation:g}, {self.hue:g})")
        if self.grayscale:
            parts.append(f"grayscale p {self.grayscale:g}")
        if self.ra_ops and not self.ra_before_crop:
            parts.append(self._ra())
        return ", ".join(parts)

    def _ra(self) -> str:
        return (f"RandAugment n {self.ra_ops} m {self.ra_magnitude} "
                f"({'per frame' if self.ra_per_frame else 'the same ops for every frame'})")


@dataclass(frozen=True)
class PublishedResult:
    """One accuracy a paper publishes for its head, with the setting it was measured in.

    ``pipeline runs`` prints ``top1`` beside a run whose setting is this one (pipeline/runs_table.py
    ``paper_result`` says the rule): the same stage (``train``: a head over the frozen backbone;
    ``finetune``: end to end), head, dataset, backbone with OpenAI's weights, frames, sampling
    (and dense stride), test views and shots (0: the full train set). Only figures a table states
    (the official repository's model zoo or the paper's), ``source`` naming it: never a figure read
    off a plot or recomputed. A table row whose setting these fields cannot say (views no file
    states, a sampling the project has no mode for, a start from other weights) is left out."""

    dataset: str                    # the dataset registry's name: k400 | ucf101 | hmdb51 | ssv2
    backbone: str                   # open_clip model name, e.g. ViT-B-16
    frames: int
    views: str                      # CxS test views, e.g. 3x1, 4x3
    top1: float                     # %
    source: str                     # the paper and its table
    top5: float | None = None       # % where the paper gives it
    sampling: str = "segment"       # segment | segment-start | dense (the test frames)
    stride: int = 0                 # dense sampling only
    stage: str = "train"            # train | finetune
    shots: int = 0                  # K-shot results: K; 0 = the full train set
    pretrained: str = "openai"      # the backbone's weights
