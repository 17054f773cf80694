"""Classifier initialisations (Text4Vis Table 4) checked against computations written here.

- LDA: fitted on exactly the videos the shot selection picked, on their L2-normalised frame
  means, with the pooled within-class covariance shrunk by Ledoit-Wolf (scikit-learn's
  estimator), W = S^-1 mu_k, and the rows centred (the shared row mean removed). Each test also
  shows that it tells the right W from one fitted on every training video and from one left
  uncentred, so it fails if the code does either.
- random normal and orthogonal: a function of the run's seed alone (not of the global torch
  RNG); another seed gives another W; orthogonal rows are orthonormal.
- A frozen W after training is still exactly the initial matrix computed here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import extracted_store
from stages.classifiers import classifier_matrix
from stages.data.zarr_split import select_videos
from stages.train import TrainCfg, build_head, train_head

HEAD = {"layers": 1, "pos_rows": 8}


@pytest.fixture(scope="module")
def store(demo_small, tmp_path_factory):
    """demo_small (4 classes x 3 train / 2 val) through the tiny CLIP, extracted in this process."""
    return extracted_store(demo_small.root, tmp_path_factory.mktemp("inits") / "cache", text="clip_single")


def _head(store, trainable: bool = False):
    return build_head("text4vis", store, {**HEAD, "trainable_classifier": trainable})


def _expected_lda(store, rows: np.ndarray, centre: bool = True) -> np.ndarray:
    """The LDA classifier init of the training videos ``rows``, written from its definition."""
    from sklearn.covariance import LedoitWolf

    x = store.read("train", "frame_emb", rows).astype(np.float64).mean(axis=(1, 2))  # (N, E) frame means
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = store.labels("train")[rows]
    classes = np.unique(y)
    assert classes.tolist() == list(range(int(store.meta["dims"]["num_classes"])))
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    count = np.bincount(y, minlength=len(classes))
    with_twin = count[y] > 1  # a class seen once holds no within-class information
    residual = (x - means[y])[with_twin]
    if len(residual) > int((count > 1).sum()):
        cov = LedoitWolf(assume_centered=True).fit(residual).covariance_ * len(residual) / len(x)
        coef = np.linalg.solve(cov, means.T).T
    else:  # one shot: no covariance estimate, S = I (nearest class mean)
        coef = means
    return coef - coef.mean(axis=0) if centre else coef


@pytest.mark.parametrize("shots, seed", [(1, 0), (2, 0), (2, 1)])
def test_lda_init_is_fitted_on_exactly_the_selected_shots_and_centred(store, shots, seed):
    rows = select_videos(store, "train", shots=shots, seed=seed)
    labels = store.labels("train")[rows]
    assert np.bincount(labels).tolist() == [shots] * 4  # K shots of every class, nothing else
    w = classifier_matrix("lda", store, _head(store), None, rows, seed=seed).numpy()
    expected = _expected_lda(store, rows)
    tol = 1e-4 * np.abs(expected).max()  # W is float32, S^-1 makes entries up to ~1e3
    np.testing.assert_allclose(w, expected, rtol=0, atol=tol)
    np.testing.assert_allclose(w.mean(axis=0), 0, atol=tol)  # centred rows
    # the two mistakes this guards against give other matrices, far beyond the tolerance
    every = _expected_lda(store, select_videos(store, "train"))
    assert np.abs(every - expected).max() > 100 * tol
    uncentred = _expected_lda(store, rows, centre=False)
    assert np.abs(uncentred - expected).max() > 100 * tol


@pytest.mark.parametrize("init", ["random_normal", "orthogonal"])
def test_random_and_orthogonal_inits_follow_the_seed(store, init):
    head = _head(store)
    K, E = head.classifier_shape()

    def w(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)  # the global RNG must not matter, only the run's seed
        return classifier_matrix(init, store, head, None, seed=seed)

    a, again, other = w(0, 1), w(0, 2), w(1, 1)
    assert a.shape == (K, E) and torch.isfinite(a).all()
    assert torch.equal(a, again), "same seed, another W"
    assert (a - other).abs().max() > 0.1, "another seed, the same W"
    if init == "orthogonal":
        for m in (a, other):
            torch.testing.assert_close(m @ m.T, torch.eye(K), atol=1e-5, rtol=0)
    else:  # standard normal entries (K * E = 128 draws)
        assert abs(float(a.mean())) < 0.3 and 0.7 < float(a.std()) < 1.3


def _frozen_w(store, tmp_path, name: str, **train) -> torch.Tensor:
    cfg = TrainCfg(head="text4vis", epochs=2, batch_size=4, lr=1e-2, **train)
    res = train_head(store, cfg, HEAD, run_dir=tmp_path / name, progress=False, log=lambda *a, **k: None)
    assert res["history"][-1]["train_loss"] > 0  # it trained
    ckpt = torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=True)
    return ckpt["head"]["classifier"]


def test_frozen_w_after_training_is_the_init_computed_here(store, tmp_path):
    # clip_text: the cache's single-template CLIP text embeddings of the class names
    w = _frozen_w(store, tmp_path, "text", classifier_init="clip_text")
    assert torch.equal(w, torch.from_numpy(store.text("clip_single")).float())
    # LDA on the 2 shots per class the run selected (its seed), centred
    w = _frozen_w(store, tmp_path, "lda", classifier_init="lda", shots=2, seed=1)
    expected = _expected_lda(store, select_videos(store, "train", shots=2, seed=1))
    np.testing.assert_allclose(w.numpy(), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    # random ones: what the seed makes, in a training run as outside it
    for init in ("random_normal", "orthogonal"):
        a = _frozen_w(store, tmp_path, f"{init}-a", classifier_init=init, seed=4)
        b = _frozen_w(store, tmp_path, f"{init}-b", classifier_init=init, seed=4)
        c = _frozen_w(store, tmp_path, f"{init}-c", classifier_init=init, seed=5)
        assert torch.equal(a, b) and (a - c).abs().max() > 0.1, init
        torch.testing.assert_close(a, classifier_matrix(init, store, _head(store), None, seed=4))
        if init == "orthogonal":
            torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
    # a trainable W does move (so the frozen checks above are not vacuous)
    cfg = TrainCfg(head="text4vis", epochs=2, batch_size=4, lr=1e-2, classifier_init="orthogonal", seed=4)
    train_head(store, cfg, {**HEAD, "trainable_classifier": True}, run_dir=tmp_path / "tuned", progress=False,
               log=lambda *a, **k: None)
    tuned = torch.load(tmp_path / "tuned" / "last.pt", map_location="cpu", weights_only=True)["head"]["classifier"]
    assert (tuned - a).abs().max() > 1e-4
