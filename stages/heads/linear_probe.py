"""Logistic-regression linear probe on frame-averaged embeddings (scikit-learn).

The CLIP paper's linear-probe protocol (Radford et al. 2021, arXiv:2103.00020): an L-BFGS
multinomial logistic regression on frozen features, here the mean of the T frame embeddings of a
video. ``c`` is scikit-learn's inverse L2 strength C; its default 0.316 is the value CLIP's README
uses in its probe example (the paper sweeps C on a validation split; sweep ``c`` the same way).

Faithful: the estimator and its decision function. Different from training a head by gradient:
``fit`` sees the whole training set at once and the result is stored as (K, E) / (K,) buffers, so
the head has no trainable parameter and predicts with a matrix product (no scikit-learn at test).
Classes with no training video get a logit that is never the maximum (see ``full_class_weights``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from cache.errors import ConfigError
from stages.heads.closed_form import full_class_weights
from stages.heads.common import ClosedFormHead
from stages.heads.registry import register_head

__all__ = ["LinearProbeCfg", "LinearProbeHead"]


@dataclass
class LinearProbeCfg:
    num_classes: int = 400
    embed_dim: int = 512
    frames: int = 8
    c: float = 0.316  # inverse L2 regularisation strength (scikit-learn's C)
    max_iter: int = 1000
    normalize: bool = False  # L2-normalise the frame-averaged embedding before the probe
    seed: int = 0


@register_head(
    "linear_probe",
    LinearProbeCfg,
    tiny={"num_classes": 5, "embed_dim": 32, "frames": 4, "max_iter": 200},
)
class LinearProbeHead(ClosedFormHead):
    """Multinomial logistic regression (L-BFGS) fitted with ``fit``; logits = x W^T + b."""

    def _solve(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        if cfg.c <= 0:
            raise ConfigError(f"option 'c' must be positive, got {cfg.c}")
        from sklearn.exceptions import ConvergenceWarning  # here: sklearn takes ~1 s to import
        from sklearn.linear_model import LogisticRegression

        probe = LogisticRegression(C=cfg.c, max_iter=cfg.max_iter, random_state=cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(x, y)
        self.converged = bool(np.max(probe.n_iter_) < cfg.max_iter)
        if not self.converged:
            warnings.warn(f"linear_probe: L-BFGS stopped at max_iter={cfg.max_iter} before converging; "
                          "raise max_iter or lower c", RuntimeWarning, stacklevel=2)
        return full_class_weights(probe.coef_, probe.intercept_, probe.classes_, cfg.num_classes)
