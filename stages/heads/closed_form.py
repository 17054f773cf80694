"""Closed-form fits on frame-averaged embeddings, shared by the closed-form heads (lda.py,
linear_probe.py) and stage two's LDA classifier initialisation (stages/classifiers.py).

``fit_lda`` is linear discriminant analysis by one of two ways to get the shared covariance
(``METHODS``; stages/heads/lda.py's docstring says what each is and how they compare);
``lda_classifier`` is Text4Vis's LDA initialisation (the ``coef_`` of up to 60 training videos
per class); ``full_class_weights`` spreads scikit-learn's weights over the fitted classes to all
K classes. Nothing here is a head: it imports no head, so a classifier initialisation uses it
without standing on the heads.
"""

from __future__ import annotations

import numpy as np

from cache.errors import ConfigError, DatasetError
from stages.config import validate_choice

__all__ = ["ABSENT_CLASS_LOGIT", "full_class_weights", "METHODS", "SOLVERS", "parse_shrinkage", "fit_lda",
           "lda_classifier"]

# Logit given to a class that had no training sample in a closed-form fit: finite (no NaN in a
# softmax or a loss) but far below any fitted class, so it is never predicted.
ABSENT_CLASS_LOGIT = -1.0e4


def full_class_weights(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray,
                       num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Scikit-learn ``coef_``/``intercept_`` over the fitted ``classes_`` -> (K, E), (K,).

    Binary estimators keep one row w (the log-odds of classes_[1]); it becomes the two rows
    -w/2, +w/2 (and the same for the intercept), whose softmax is exactly sigmoid(w.x + b).
    Classes absent from the fit get a zero row and :data:`ABSENT_CLASS_LOGIT` as intercept.
    """
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes).astype(np.int64)
    if coef.shape[0] == 1 and len(classes) == 2:
        coef = np.concatenate([-coef / 2, coef / 2])  # (1, E) -> (2, E)
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    full_w = np.zeros((num_classes, coef.shape[1]), dtype=np.float64)
    full_b = np.full((num_classes,), ABSENT_CLASS_LOGIT, dtype=np.float64)
    full_w[classes] = coef
    full_b[classes] = intercept
    return full_w, full_b


METHODS = ("pooled", "sklearn")
SOLVERS = ("lsqr", "svd", "eigen")


def parse_shrinkage(value: str) -> str | float | None:
    low = str(value).strip().lower()
    if low == "auto":
        return "auto"
    if low in ("none", ""):
        return None
    try:
        alpha = float(low)
    except ValueError:
        raise ConfigError(f"option 'shrinkage' must be 'auto', 'none' or a number in [0, 1]; got '{value}'") from None
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"option 'shrinkage' must lie in [0, 1]; got {alpha}")
    return alpha


def _pooled_lda(x: np.ndarray, y: np.ndarray, shrinkage: str | float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LDA weights over the classes present in ``y``: (C, E), (C,), classes (C,)."""
    classes, index, counts = np.unique(y, return_inverse=True, return_counts=True)
    means = np.zeros((len(classes), x.shape[1]))
    np.add.at(means, index, x)
    means /= counts[:, None]
    priors = counts / counts.sum()
    from sklearn.covariance import ledoit_wolf, shrunk_covariance  # here: sklearn takes ~1 s to import

    shared = counts[index] > 1  # rows whose class has a second video
    residual = (x - means[index])[shared]  # (N', E)
    dof = residual.shape[0] - int(np.sum(counts > 1))
    if dof <= 0:
        cov = np.eye(x.shape[1])  # no within-class information: nearest class mean
    else:
        if shrinkage == "auto":
            cov = ledoit_wolf(residual, assume_centered=True)[0]
        else:
            cov = residual.T @ residual / residual.shape[0]
            if shrinkage is not None:
                cov = shrunk_covariance(cov, shrinkage=shrinkage)
        cov *= residual.shape[0] / x.shape[0]  # per residual row -> per video, scikit-learn's scale
    coef = np.linalg.lstsq(cov, means.T, rcond=None)[0].T  # S^-1 mu_k, singular S allowed
    intercept = -0.5 * np.sum(means * coef, axis=1) + np.log(priors)
    return coef, intercept, classes


def fit_lda(x: np.ndarray, y: np.ndarray, num_classes: int, method: str = "pooled",
            solver: str = "lsqr", shrinkage: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Fit LDA on (N, E) features and (N,) labels; return (K, E) weights and (K,) biases.

    Classes without a sample get a zero row and a logit that is never the maximum.
    """
    validate_choice("method", method, METHODS)
    alpha = parse_shrinkage(shrinkage)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    if len(np.unique(y)) < 2:
        raise ConfigError("LDA needs samples of at least two classes")
    if method == "pooled":
        coef, intercept, classes = _pooled_lda(x, y, alpha)
        return full_class_weights(coef, intercept, classes, num_classes)
    validate_choice("solver", solver, SOLVERS)
    if len(y) <= len(np.unique(y)):
        raise ConfigError(
            f"scikit-learn's LDA needs more samples ({len(y)}) than classes ({len(np.unique(y))}); "
            "use method=pooled"
        )
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    model = LinearDiscriminantAnalysis(solver=solver, shrinkage=None if solver == "svd" else alpha)
    model.fit(x, y)
    return full_class_weights(model.coef_, model.intercept_, model.classes_, num_classes)


def lda_classifier(features: np.ndarray, labels: np.ndarray, num_classes: int, max_per_class: int = 60,
                   seed: int = 0, normalize: bool = True, method: str = "pooled",
                   shrinkage: str = "auto") -> np.ndarray:
    """LDA ``coef_`` (K, E) from up to ``max_per_class`` videos per class, for a classifier init.

    ``features`` are video embeddings (N, E), e.g. frame means; they are L2-normalised first
    when ``normalize``. The videos kept per class are drawn without replacement by a numpy
    generator seeded with ``seed``, so the same call gives the same matrix.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"features must be (N, E) with one label each; got {x.shape} and {y.shape}")
    if max_per_class < 1:
        raise ConfigError(f"max_per_class must be at least 1, got {max_per_class}")
    missing = sorted(set(range(num_classes)) - set(y.tolist()))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DatasetError(f"LDA classifier: {len(missing)} classes have no training video ({shown})")
    rng = np.random.default_rng(seed)
    keep = []
    for k in range(num_classes):
        idx = np.flatnonzero(y == k)
        if len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, size=max_per_class, replace=False))
        keep.append(idx)
    keep = np.concatenate(keep)
    x, y = x[keep], y[keep]
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    coef, _ = fit_lda(x, y, num_classes, method=method, shrinkage=shrinkage)
    return coef.astype(np.float32)
