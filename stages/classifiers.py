"""Classifier initialisations: the matrix W (K, E) a classifier head starts from (Text4Vis Table 4).

Each initialisation is a function of its explicit arguments (the cache, the head, the classes,
the seed and, for LDA, the training videos), not of a training config, so stage two, compare-init
and the benchmarks build the same W from the same values:

- ``clip_text``: the cache's class text embeddings (a text set of the backbone's own text tower);
- ``random_normal`` / ``orthogonal``: seeded by ``seed`` alone, never by the global torch RNG;
- ``lda``: linear discriminant analysis on the frame-mean embeddings of the training videos
  ``train_idx`` (stages/heads/closed_form.py), rows centred;
- ``minilm``: MiniLM sentence embeddings of the class names, projected to E by a seeded
  orthonormal map (``_project``).

``text_classifier`` gives the class text embeddings a head's video embedding is scored against
on classes it was not trained on (zero-shot, cross-dataset evaluation).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cache.errors import ConfigError
from cache.store import FeatureStore
from stages.heads.registry import Head

__all__ = ["CLASSIFIER_INITS", "classifier_matrix", "text_classifier"]

CLASSIFIER_INITS = ("clip_text", "random_normal", "orthogonal", "lda", "minilm")


def _frame_mean_features(store: FeatureStore, split: str, idx: np.ndarray) -> np.ndarray:
    x = store.read(split, "frame_emb", idx)  # (n, V, T, E)
    return x.mean(axis=(1, 2))


def _project(w: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Map text-only embeddings (K, d) to the video embedding size E with a seeded matrix with
    orthonormal rows or columns: when d <= E it is an exact isometry (all inner products, hence
    the inter-class correlation structure, are kept); when d > E it is a Johnson-Lindenstrauss
    style projection that keeps them approximately."""
    d = w.shape[1]
    if d == dim:
        return w
    g = np.random.default_rng(seed).standard_normal((max(d, dim), max(d, dim)))
    q, _ = np.linalg.qr(g)
    proj = q[:d, :dim] if d <= dim else q[:d, :dim] * math.sqrt(d / dim)
    return w @ proj


def _text_set(store, head: Head, text_set: str = "") -> torch.Tensor:
    """A cache text set (K, E) or (K, M, E) for a head's classifier: ``text_set``, or the head's
    default (per template for a 3-D classifier); its width must be the head's embedding's."""
    shape = head.classifier_shape()
    name = text_set or ("clip_actionclip" if len(shape) == 3 else "clip_single")
    w = torch.from_numpy(store.text(name))
    if w.shape[-1] != shape[-1]:
        raise ConfigError(f"text set '{name}' is {w.shape[-1]}-d but the head's classifier is {shape[-1]}-d: "
                          "use a text set of the backbone's own text encoder (MiniLM: --init minilm)")
    return w


def classifier_matrix(init: str, store: FeatureStore, head: Head, classes: list[int] | None,
                      train_idx: np.ndarray | None = None, *, seed: int = 0, text_set: str = "",
                      train_split: str = "train", lda_per_class: int = 60) -> torch.Tensor:
    """The classifier matrix W for ``head`` under one initialisation (Text4Vis Table 4).

    ``classes``: the cache's class ids the head is trained on (None: all); ``train_idx``: the
    training videos of ``train_split`` LDA fits on; ``seed``: the random and projected inits and
    LDA's subsampling of ``lda_per_class`` videos per class; ``text_set``: clip_text's text set
    (default: the head's choice)."""
    shape = head.classifier_shape()
    K, E = shape[0], shape[-1]
    g = torch.Generator().manual_seed(seed + 17)
    sel = classes if classes is not None else list(range(store.info.dims.num_classes))
    if init == "clip_text":
        w = _text_set(store, head, text_set)[sel]
    elif init == "random_normal":
        w = torch.randn(*shape, generator=g)
    elif init == "orthogonal":
        q, _ = torch.linalg.qr(torch.randn(max(K, E), max(K, E), generator=g))
        w = q[:K, :E].contiguous()
        if len(shape) == 3:
            w = w.unsqueeze(1).expand(shape).contiguous()
    elif init == "lda":
        from stages.heads.closed_form import lda_classifier

        if train_idx is None:
            raise ConfigError("the LDA initialisation needs training videos")
        feats = _frame_mean_features(store, train_split, train_idx)
        labels = store.labels(train_split)[train_idx]
        remap = {c: i for i, c in enumerate(sel)}
        y = np.array([remap[int(v)] for v in labels])
        w = torch.from_numpy(np.asarray(lda_classifier(feats, y, len(sel), max_per_class=lda_per_class,
                                                       seed=seed), dtype=np.float64))
        # LDA's rows share one large direction (the global mean times the precision matrix):
        # harmless for dot-product scores, but a cosine classifier would see only the small
        # remainder (every pair of rows at cosine ~1). Removing the shared row mean adds the
        # same x.c to every class score, so LDA's decisions are unchanged.
        w = (w - w.mean(0, keepdim=True)).float()
    elif init == "minilm":
        w = torch.from_numpy(_project(store.text("minilm")[sel], E, seed).astype(np.float32))
    else:
        raise ConfigError(f"unknown classifier init '{init}'; choose from {', '.join(CLASSIFIER_INITS)}")
    if len(shape) == 3 and w.dim() == 2:
        w = w.unsqueeze(1).expand(K, shape[1], E).contiguous()
    if tuple(w.shape) != tuple(shape):
        raise ConfigError(f"classifier '{init}' has shape {tuple(w.shape)}, the head needs {tuple(shape)}")
    return w.float()


def text_classifier(store, head: Head, text_set: str = "", classes: list[int] | None = None) -> torch.Tensor:
    """Class text embeddings (K', E) that a head's video embedding is scored against on classes
    it was not trained on (zero-shot, cross-dataset): ``text_set``, or the head's default
    (per-template for a 3-D classifier), templates averaged after normalising. Any number of
    classes: unlike ``classifier_matrix``, not tied to the head's training classes."""
    w = _text_set(store, head, text_set)
    if classes is not None:
        w = w[classes]
    return F.normalize(w, dim=-1).mean(1) if w.dim() == 3 else w

