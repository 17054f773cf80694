"""Behaviour of the frame-embedding heads (tap, linear_probe, lda, text4vis, actionclip) and
their shared blocks, beyond the contract every head passes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression

from cache.errors import ConfigError, DatasetError
from stages.heads import create_head, get_head_entry
from stages.heads.closed_form import fit_lda, lda_classifier
from stages.heads.common import TemporalConv1D, TemporalTransformer, cosine_logits

E, K, T = 16, 4, 6


def _clustered(n_per_class, k=K, e=E, t=T, spread=3.0, noise=1.0, seed=0):
    """Frame embeddings (N, T, E) of k well separated classes, labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(k, e, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per_class)
    frames = centres[labels][:, None, :] + noise * torch.randn(len(labels), t, e, generator=g)
    return frames, labels


def _accuracy(logits, labels):
    return (logits.argmax(1) == labels).float().mean().item()


# ---------------------------------------------------------------- common blocks


@pytest.mark.parametrize("init", ["shift", "smooth", "identity"])
def test_conv1d_init_reproduces_a_constant_clip_away_from_the_ends(init):
    conv = TemporalConv1D(8, init=init, residual=False)
    x = torch.randn(2, 1, 8).expand(2, 5, 8)  # constant over time
    y = conv(x)
    assert torch.allclose(y[:, 1:-1], x[:, 1:-1], atol=1e-6)
    if init == "smooth":
        assert torch.allclose(y[:, 0], 0.75 * x[:, 0], atol=1e-6)


def test_conv1d_shift_init_moves_quarters_of_the_channels_in_time():
    conv = TemporalConv1D(8, init="shift", residual=False)
    x = torch.randn(1, 5, 8)
    y = conv(x)
    q = 2
    assert torch.allclose(y[:, 1:, :q], x[:, :-1, :q])  # reads frame t-1
    assert torch.allclose(y[:, :, q:-q], x[:, :, q:-q])  # reads frame t
    assert torch.allclose(y[:, :-1, -q:], x[:, 1:, -q:])  # reads frame t+1
    assert torch.all(y[:, 0, :q] == 0) and torch.all(y[:, -1, -q:] == 0)  # zero padding
    res = TemporalConv1D(8, init="shift", residual=True)
    assert torch.allclose(res(x), x + y)


def test_temporal_transformer_residual_and_position_table():
    tt = TemporalTransformer(E, layers=2, pos_rows=10)
    for name, p in tt.blocks.named_parameters():  # zero every residual branch's output
        if "out_proj" in name or name.endswith("2.weight") or name.endswith("2.bias"):
            torch.nn.init.zeros_(p)
    x = torch.randn(3, T, E)
    pos = tt.position.weight[:T]
    assert torch.allclose(tt.forward_frames(x), 2 * x + pos, atol=1e-6)  # x + blocks(x + pos)
    assert torch.allclose(tt(x), (2 * x + pos).mean(1), atol=1e-6)
    with pytest.raises(ConfigError, match="pos_rows"):
        tt(torch.randn(1, 11, E))


def test_temporal_transformer_sees_frame_order():
    torch.manual_seed(0)
    tt = TemporalTransformer(E, layers=1, pos_rows=T)
    x = torch.randn(2, T, E)
    flipped = x.flip(1)
    assert not torch.allclose(tt(x), tt(flipped), atol=1e-4)
    assert torch.allclose(x.mean(1), flipped.mean(1), atol=1e-6)  # TAP does not


def test_cosine_logits_ignore_norms():
    v, w = torch.randn(3, E), torch.randn(K, E)
    a = cosine_logits(v, w, 10.0)
    b = cosine_logits(5 * v, w * (torch.rand(K, 1) + 0.1), 10.0)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(cosine_logits(w[:1], w, 7.0)[0, 0], torch.tensor(7.0))


# ---------------------------------------------------------------- tap


def test_tap_is_a_linear_layer_on_the_frame_mean():
    head = create_head("tap", tiny=True)
    cfg = head.cfg
    assert head.num_trainable() == cfg.embed_dim * cfg.num_classes + cfg.num_classes
    x = torch.randn(3, cfg.frames, cfg.embed_dim)
    out = head({"frame_emb": x})
    assert torch.allclose(out["logits"], head.fc(x.mean(1)), atol=1e-6)
    assert torch.allclose(head({"frame_emb": x.flip(1)})["logits"], out["logits"], atol=1e-5)


# ---------------------------------------------------------------- closed-form heads


@pytest.mark.parametrize("name", ["linear_probe", "lda"])
def test_closed_form_heads_classify_held_out_clusters(name):
    train_x, train_y = _clustered(20, seed=0)
    test_x, test_y = _clustered(20, seed=0)
    test_x = test_x + torch.randn(test_x.shape, generator=torch.Generator().manual_seed(9))  # new noise
    head = create_head(name, num_classes=K, embed_dim=E, frames=T)
    head.fit({"frame_emb": train_x, "label": train_y})
    assert head.num_trainable() == 0
    acc = _accuracy(head({"frame_emb": test_x})["logits"], test_y)
    assert acc > 0.9, f"{name}: held-out accuracy {acc:.2f}"


@pytest.mark.parametrize("name", ["linear_probe", "lda"])
def test_closed_form_state_dict_round_trip_and_unfitted_error(name):
    x, y = _clustered(6)
    head = create_head(name, num_classes=K, embed_dim=E, frames=T)
    with pytest.raises(ConfigError, match="fit"):
        head({"frame_emb": x})
    head.fit({"frame_emb": x, "label": y})
    other = create_head(name, num_classes=K, embed_dim=E, frames=T)
    other.load_state_dict(head.state_dict())
    assert torch.equal(other({"frame_emb": x})["logits"], head({"frame_emb": x})["logits"])


def test_linear_probe_matches_sklearn_probabilities():
    x, y = _clustered(10, spread=0.7, noise=1.5)
    head = create_head("linear_probe", num_classes=K, embed_dim=E, frames=T, c=0.5)
    head.fit({"frame_emb": x, "label": y})
    ref = LogisticRegression(C=0.5, max_iter=1000, random_state=0).fit(x.mean(1).double().numpy(), y.numpy())
    probs = head({"frame_emb": x})["logits"].softmax(1).double().numpy()
    assert np.allclose(probs, ref.predict_proba(x.mean(1).double().numpy()), atol=1e-4)


def test_linear_probe_binary_and_absent_classes():
    x, y = _clustered(8, k=2)
    head = create_head("linear_probe", num_classes=3, embed_dim=E, frames=T)
    head.fit({"frame_emb": x, "label": y})  # class 2 has no video
    logits = head({"frame_emb": x})["logits"]
    ref = LogisticRegression(C=head.cfg.c, max_iter=1000, random_state=0).fit(x.mean(1).double().numpy(), y.numpy())
    probs = logits.softmax(1).double().numpy()
    assert np.allclose(probs[:, :2], ref.predict_proba(x.mean(1).double().numpy()), atol=1e-4)
    assert np.all(probs[:, 2] < 1e-6) and torch.isfinite(logits).all()


def test_lda_pooled_without_shrinkage_has_the_posteriors_of_sklearn_svd():
    x, y = _clustered(200, spread=0.5)  # N >> E: full-rank covariance
    feats = x.mean(1).double().numpy()
    w, b = fit_lda(feats, y.numpy(), K, method="pooled", shrinkage="none")
    ours = torch.from_numpy(feats @ w.T + b).softmax(1).numpy()
    ref = LinearDiscriminantAnalysis(solver="svd").fit(feats, y.numpy()).predict_proba(feats)
    assert np.allclose(ours, ref, atol=1e-6)


def test_lda_sklearn_method_is_sklearn():
    x, y = _clustered(15, spread=0.6)
    feats, labels = x.mean(1).double().numpy(), y.numpy()
    w, b = fit_lda(feats, labels, K, method="sklearn", solver="lsqr", shrinkage="auto")
    ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(feats, labels)
    assert np.allclose(feats @ w.T + b, ref.decision_function(feats), atol=1e-8)


def test_lda_few_shot_singletons_and_fewer_samples_than_dims():
    e = 64
    x, y = _clustered(3, e=e, spread=1.0)  # N = 12 < E = 64
    keep = torch.cat([torch.arange(0, 9), torch.tensor([9])])  # class 3 keeps one video
    head = create_head("lda", num_classes=K, embed_dim=e, frames=T)
    head.fit({"frame_emb": x[keep], "label": y[keep]})
    logits = head({"frame_emb": x})["logits"]
    assert torch.isfinite(logits).all()
    assert _accuracy(logits, y) > 0.9
    one_shot = torch.arange(K) * 3  # one video per class: nearest class mean
    w, b = fit_lda(x[one_shot].mean(1).numpy(), y[one_shot].numpy(), K)
    means = x[one_shot].mean(1).double().numpy()
    feats = x.mean(1).double().numpy()
    nearest = ((feats[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal((feats @ w.T + b).argmax(1), nearest)
    with pytest.raises(ConfigError, match="pooled"):
        fit_lda(x[one_shot].mean(1).numpy(), y[one_shot].numpy(), K, method="sklearn")


def test_lda_classifier_sampling_and_errors():
    x, y = _clustered(30, spread=1.0)
    feats, labels = x.mean(1).numpy(), y.numpy()
    a = lda_classifier(feats, labels, K, max_per_class=10, seed=0)
    assert a.shape == (K, E) and a.dtype == np.float32
    assert np.array_equal(a, lda_classifier(feats, labels, K, max_per_class=10, seed=0))
    assert not np.allclose(a, lda_classifier(feats, labels, K, max_per_class=10, seed=1))
    # no subsampling needed -> the seed does not matter
    assert np.array_equal(lda_classifier(feats, labels, K, max_per_class=30, seed=0),
                          lda_classifier(feats, labels, K, max_per_class=30, seed=5))
    with pytest.raises(DatasetError, match="no training video"):
        lda_classifier(feats[labels != 2], labels[labels != 2], K)


def test_lda_coef_initialises_a_text4vis_classifier():
    x, y = _clustered(20, spread=1.0)
    head = create_head("text4vis", num_classes=K, embed_dim=E, frames=T, temporal="tap")
    head.set_classifier(torch.from_numpy(lda_classifier(x.mean(1).numpy(), y.numpy(), K)))
    head.eval()
    assert _accuracy(head({"frame_emb": x})["logits"], y) > 0.9


# ---------------------------------------------------------------- text4vis


def _train_step(head, batch, steps=1):
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        head.loss(head(batch), batch["label"]).backward()
        opt.step()


@pytest.mark.parametrize("trainable", [False, True])
def test_text4vis_frozen_w_stays_and_trainable_w_moves(trainable):
    torch.manual_seed(0)
    head = create_head("text4vis", tiny=True, trainable_classifier=trainable)
    opt_before = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-2)
    W = torch.randn(head.cfg.num_classes, head.cfg.embed_dim)
    head.set_classifier(W)  # in place, after the optimizer was built
    batch = {"frame_emb": torch.randn(6, head.cfg.frames, head.cfg.embed_dim), "label": torch.arange(6) % 5}
    opt_before.zero_grad()
    head.loss(head(batch), batch["label"]).backward()
    opt_before.step()
    assert "classifier" in head.state_dict()
    assert any(p is head.classifier for p in head.parameters()) == trainable
    assert torch.equal(head.classifier, W) != trainable


def test_text4vis_tap_logits_scales_and_split_api():
    head = create_head("text4vis", tiny=True, temporal="tap", logit_scale=30.0, test_logit_scale=100.0)
    assert head.num_trainable() == 0
    W = torch.randn(head.cfg.num_classes, head.cfg.embed_dim)
    head.set_classifier(W)
    x = torch.randn(3, head.cfg.frames, head.cfg.embed_dim)
    cos = F.normalize(x.mean(1), dim=-1) @ F.normalize(W, dim=-1).t()
    head.train()
    assert torch.allclose(head({"frame_emb": x})["logits"], 30.0 * cos, atol=1e-5)
    head.eval()
    out = head({"frame_emb": x})
    assert torch.allclose(out["logits"], 100.0 * cos, atol=1e-4)
    assert torch.allclose(head.logits_from_embedding(head.video_embedding({"frame_emb": x})), out["logits"])
    # multi-view: average the views' embeddings, then classify
    views = [x, x + 0.1 * torch.randn_like(x)]
    avg = torch.stack([head.video_embedding({"frame_emb": v}) for v in views]).mean(0)
    expected = 100.0 * F.normalize(avg, dim=-1) @ F.normalize(W, dim=-1).t()
    assert torch.allclose(head.logits_from_embedding(avg), expected, atol=1e-4)


def test_multi_view_embedding_average_is_raw_then_normalised_as_text4vis_tests():
    """evaluate's embedding rule (Text4Vis's test code): mean of the views' raw video embeddings,
    normalised once. Views of different norms make it differ from averaging normalised views."""
    from stages.evaluate import view_scores

    head = create_head("text4vis", tiny=True, temporal="ttrans").eval()
    W = torch.randn(head.cfg.num_classes, head.cfg.embed_dim)
    head.set_classifier(W)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, head.cfg.frames, head.cfg.embed_dim, generator=g)  # (B, V, T, E)
    x = x * torch.tensor([0.2, 1.0, 6.0])[None, :, None, None]  # views of very different norms
    with torch.no_grad():
        emb = torch.stack([head.video_embedding({"frame_emb": x[:, v]}) for v in range(3)])  # (V, B, E)
        got = view_scores(head, {"frame_emb": x}, embeddings=True)
        other = torch.randn(7, head.cfg.embed_dim)
        swapped = view_scores(head, {"frame_emb": x}, embeddings=True, classifier=other)
    official = 100.0 * F.normalize(emb.mean(0), dim=-1) @ F.normalize(W, dim=-1).t()
    per_view_normalised = 100.0 * F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1) @ F.normalize(W, dim=-1).t()
    assert torch.allclose(got, official, atol=1e-4)
    assert not torch.allclose(got, per_view_normalised, atol=1e-2)
    assert torch.allclose(swapped, F.normalize(emb.mean(0), dim=-1) @ F.normalize(other, dim=-1).t(), atol=1e-5)
    # the score rule: softmax per view, then the mean
    with torch.no_grad():
        scores = view_scores(head, {"frame_emb": x}, embeddings=False)
        want = torch.stack([head({"frame_emb": x[:, v]})["logits"].softmax(-1) for v in range(3)]).mean(0)
    assert torch.allclose(scores, want, atol=1e-6)


@pytest.mark.parametrize("temporal", ["ttrans", "t1d"])
def test_text4vis_temporal_modules_train(temporal):
    torch.manual_seed(0)
    head = create_head("text4vis", tiny=True, temporal=temporal)
    head.set_classifier(torch.randn(5, head.cfg.embed_dim))
    x, y = _clustered(4, k=5, e=head.cfg.embed_dim, t=head.cfg.frames, spread=0.3)
    batch = {"frame_emb": x, "label": y}
    head.eval()
    with torch.no_grad():
        start = head.loss(head(batch), y).item()
    _train_step(head, batch, steps=20)
    with torch.no_grad():
        assert head.loss(head(batch), y).item() < start
    expected = {"ttrans": None, "t1d": 3 * head.cfg.embed_dim}[temporal]
    if expected is not None:
        assert head.num_trainable() == expected


def test_text4vis_classifier_errors_and_checkpoint_restores_readiness():
    head = create_head("text4vis", tiny=True)
    x = torch.randn(2, head.cfg.frames, head.cfg.embed_dim)
    with pytest.raises(ConfigError, match="set_classifier"):
        head({"frame_emb": x})
    with pytest.raises(ConfigError):
        head.set_classifier(torch.randn(3, head.cfg.embed_dim))
    head.set_classifier(torch.randn(head.cfg.num_classes, head.cfg.embed_dim))
    restored = create_head("text4vis", tiny=True)
    restored.load_state_dict(head.state_dict())
    head.eval(), restored.eval()
    assert torch.allclose(restored({"frame_emb": x})["logits"], head({"frame_emb": x})["logits"])
    with pytest.raises(ConfigError, match="temporal"):
        create_head("text4vis", tiny=True, temporal="lstm")


# ---------------------------------------------------------------- actionclip


def _actionclip(prompt="transf", **kw):
    torch.manual_seed(0)
    head = create_head("actionclip", tiny=True, prompt=prompt, **kw)
    g = torch.Generator().manual_seed(1)
    head.set_classifier(torch.randn(*head.classifier_shape(), generator=g))
    return head


@pytest.mark.parametrize("prompt", ["meanp", "conv1d", "lstm", "transf", "transf_cls"])
def test_actionclip_prompts_shapes_gradients_and_counts(prompt):
    head = _actionclip(prompt)
    cfg = head.cfg
    Ed, R, L = cfg.embed_dim, cfg.pos_rows, cfg.layers
    block = 12 * Ed * Ed + 13 * Ed  # CLIP residual attention block (and torch's encoder layer at MLP x4)
    expected = {
        "meanp": 0,
        "conv1d": 3 * Ed + R * Ed,
        "lstm": 8 * Ed * Ed + 8 * Ed + R * Ed,
        "transf": L * block + R * Ed,
        "transf_cls": L * block + 2 * Ed + Ed + (cfg.frames + 1) * Ed + R * Ed,
    }[prompt]
    assert head.num_trainable() == expected
    head.train()
    batch = {"frame_emb": torch.randn(6, cfg.frames, Ed), "label": torch.tensor([0, 1, 2, 0, 3, 4])}
    out = head(batch)
    assert out["logits"].shape == (6, cfg.num_classes) and out["video_emb"].shape == (6, Ed)
    if expected:
        head.loss(out, batch["label"]).backward()
        missing = [n for n, p in head.named_parameters() if p.grad is None]
        assert not missing, f"parameters without gradient: {missing}"


def test_actionclip_conv1d_at_init_is_the_reference_shift_along_time():
    head = _actionclip("conv1d")
    x = torch.randn(2, head.cfg.frames, head.cfg.embed_dim)
    q = head.cfg.embed_dim // 4
    shifted = torch.zeros_like(x)
    shifted[:, 1:, :q] = x[:, :-1, :q]
    shifted[:, :, q:-q] = x[:, :, q:-q]
    shifted[:, :-1, -q:] = x[:, 1:, -q:]
    assert torch.allclose(head.prompt(x), (x + shifted).mean(1), atol=1e-6)


def test_actionclip_loss_is_clip_contrastive_loss_for_distinct_labels():
    head = _actionclip("meanp", num_templates=1)
    B = 5
    labels = torch.randperm(B)
    video = torch.randn(B, head.cfg.embed_dim)
    text = head.text[labels, 0]
    sim = 100.0 * F.normalize(video, dim=-1) @ F.normalize(text, dim=-1).t()
    clip_loss = 0.5 * (F.cross_entropy(sim, torch.arange(B)) + F.cross_entropy(sim.t(), torch.arange(B)))
    head.train()
    assert torch.allclose(head.loss({"video_emb": video}, labels), clip_loss, atol=1e-5)


def test_actionclip_loss_is_zero_with_a_zero_gradient_at_its_minimum():
    head = _actionclip("meanp")
    head.eval()  # deterministic: the class embedding, not a random template
    video = torch.randn(1, head.cfg.embed_dim).repeat(4, 1).requires_grad_(True)
    labels = torch.full((4,), 2)  # every pair shares the label: gt is uniform
    loss = head.loss({"video_emb": video}, labels)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert video.grad.abs().max().item() < 1e-5
    # a batch that disagrees with its labels costs more than one that agrees
    emb = head.class_embedding()
    labels = torch.tensor([0, 1, 2, 3])
    good = head.loss({"video_emb": emb[labels]}, labels)
    bad = head.loss({"video_emb": emb[labels.flip(0)]}, labels)
    assert good.item() < bad.item()


def test_actionclip_random_templates_are_seeded_and_off_in_eval():
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    video = torch.randn(6, 32)

    def losses(head, n=6):
        return [head.loss({"video_emb": video}, labels).item() for _ in range(n)]

    a, b = _actionclip("meanp", seed=3), _actionclip("meanp", seed=3)
    a.train(), b.train()
    la, lb = losses(a), losses(b)
    assert la == lb
    assert len(set(round(v, 6) for v in la)) > 1  # the template changes between steps
    a.eval()
    assert len(set(round(v, 6) for v in losses(a))) == 1


def test_actionclip_template_averages():
    head = _actionclip("meanp")
    head.eval()
    x = torch.randn(3, head.cfg.frames, head.cfg.embed_dim)
    text = head.text
    v = F.normalize(x.mean(1), dim=-1)
    mean_text = F.normalize(F.normalize(text, dim=-1).mean(1), dim=-1)
    assert torch.allclose(head({"frame_emb": x})["logits"], 100.0 * v @ mean_text.t(), atol=1e-4)
    head.text[:, 0] *= 7.0  # template norms do not matter: each is normalised first
    assert torch.allclose(head({"frame_emb": x})["logits"], 100.0 * v @ mean_text.t(), atol=1e-4)

    score = _actionclip("meanp", template_average="score")
    per_template = torch.einsum("be,kme->bkm", v, F.normalize(score.text, dim=-1)) * 100.0
    probs = per_template.softmax(dim=1).mean(dim=2)
    out = score({"frame_emb": x})["logits"]
    assert torch.allclose(out.exp(), probs, atol=1e-5)
    single = [_actionclip("meanp", num_templates=1, template_average=m) for m in ("embedding", "score")]
    a, b = (h({"frame_emb": x})["logits"] for h in single)
    assert torch.allclose(b, a.log_softmax(1), atol=1e-4)


def test_actionclip_classifier_shape_and_frame_checks():
    head = create_head("actionclip", tiny=True)
    assert head.classifier_shape() == (5, 3, 32)
    with pytest.raises(ConfigError, match="num_templates"):
        head.set_classifier(torch.randn(5, 4, 32))
    with pytest.raises(ConfigError, match="set_classifier"):
        head({"frame_emb": torch.randn(2, 4, 32)})
    one = create_head("actionclip", tiny=True, num_templates=1)
    one.set_classifier(torch.randn(5, 32))  # (K, E) accepted when M = 1
    cls = _actionclip("transf_cls")
    with pytest.raises(ConfigError, match="frames"):
        cls({"frame_emb": torch.randn(2, 3, 32)})


def test_registered_reference_counts():
    for name in ("tap", "actionclip"):
        for ref in get_head_entry(name).references:
            if ref.expected is not None:
                assert create_head(name, **ref.overrides).num_trainable() == ref.expected, ref.label
