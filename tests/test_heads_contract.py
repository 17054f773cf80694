"""One contract over every registered head, each with its tiny config (timm's backward test idea)."""

import pytest
import torch

from stages.heads import create_head, example_batch, list_heads

HEADS = list_heads()


def _prepare(head):
    """Give classifier heads a classifier and closed-form heads their fit, as stage two would."""
    if head.has_classifier:
        g = torch.Generator().manual_seed(1)
        head.set_classifier(torch.randn(head.cfg.num_classes, *head.classifier_shape()[1:], generator=g))
    if head.uses_sklearn:
        head.fit(example_batch(head, batch_size=8 * head.cfg.num_classes))


def test_registry_not_empty():
    assert {"tap", "lda", "text4vis", "evl", "side4video", "actionclip"} <= set(HEADS)


@pytest.mark.parametrize("name", HEADS)
def test_output_shape_and_finite(name):
    torch.manual_seed(0)
    head = create_head(name, tiny=True)
    _prepare(head)
    head.eval()
    batch = example_batch(head, batch_size=3)
    out = head(batch)
    assert out["logits"].shape == (3, head.cfg.num_classes)
    assert torch.isfinite(out["logits"]).all()


@pytest.mark.parametrize("name", [n for n in HEADS])
def test_every_trainable_parameter_gets_a_gradient_and_loss_falls(name):
    torch.manual_seed(0)
    head = create_head(name, tiny=True)
    _prepare(head)
    if head.uses_sklearn:
        pytest.skip("closed-form head: fitted, not trained by gradient")
    params = [p for p in head.parameters() if p.requires_grad]
    assert params, "a trainable head must have trainable parameters"
    head.train()
    batch = example_batch(head, batch_size=6)
    loss0 = head.loss(head(batch), batch["label"])
    loss0.backward()
    missing = [n for n, p in head.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"no (finite) gradient for {missing}"
    # Zero-initialised gates (EVL, side adapters) may leave some grads exactly zero at step 0;
    # what must hold is that training on a fixed batch lowers the loss.
    head.eval()  # dropout off so the comparison is deterministic
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    with torch.no_grad():
        start = head.loss(head(batch), batch["label"]).item()
    for _ in range(15):
        opt.zero_grad()
        loss = head.loss(head(batch), batch["label"])
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = head.loss(head(batch), batch["label"]).item()
    assert end < start - 1e-3, f"loss did not fall: {start:.4f} -> {end:.4f}"


def test_reference_rows_match_every_paper_figure_and_follow_the_backbone():
    """`pipeline heads`: every paper count is met at its own setting; another backbone or frame
    count changes the counts (and hides the paper column); what a backbone cannot hold says why."""
    from stages.heads.counts import reference_rows

    rows = reference_rows()
    papers = [r for r in rows if r["expected"] is not None]
    assert len(papers) >= 12 and all(r["count"] == r["expected"] for r in papers), papers
    tiny = reference_rows("tiny", classes=12, frames=16)
    assert [(r["head"], r["label"]) for r in tiny] == [(r["head"], r["label"]) for r in rows]
    assert all(r["expected"] is None for r in tiny)
    by = {(r["head"], r["label"]): r for r in tiny}
    tap = next(r for r in tiny if r["head"] == "tap")
    assert tap["count"] == 12 * 32 + 12  # a linear layer on the tiny model's 32-d embedding
    assert any(r["count"] is None and "blocks" in r["note"] for r in by.values())
    frames32 = reference_rows(frames=32)
    evl = [r for r in frames32 if r["head"] == "evl"]
    assert all(r["count"] is not None for r in evl)
    assert sum(r["expected"] is not None for r in evl) == 1  # only the paper's 32-frame row keeps its figure
