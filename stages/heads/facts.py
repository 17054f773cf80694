"""What a head's paper says, registered beside the head (timm's ``default_cfgs`` pattern).

A head file passes these to :func:`stages.heads.registry.register_head`: its paper's stage-two
recipe (:class:`PaperRecipe`), its test protocol (:class:`Protocol`), its view-bank default and
its published results (:class:`PublishedResult`). stages/recipes.py holds the machinery that
reads them (``stage_two_recipe``, ``get_protocol``, ``protocol_for_heads``, ...); pipeline/ reads
the published results from pipeline/option_defaults.json, generated from the registry, so
``pipeline runs`` needs no torch. Plain data: no torch, no other stage module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SCALE_256", "CROPS_TSN", "PaperRecipe", "Protocol", "PublishedResult"]

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
    """A paper's test protocol (``pipeline extract --protocol NAME``), named as its head, or
    ``HEAD-DATASET`` for a dataset its paper tests otherwise (``side4video-ssv2``)."""

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
    resize_to: str = ""             # HxW: frames resized to exactly H x W before the crops (SSv2), not by the short side


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
