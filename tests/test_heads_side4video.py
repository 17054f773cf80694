"""Side4Video head: paper counts, [CLS] shift, layer placement, what the output depends on."""

import pytest
import torch

from cache.errors import CacheMismatchError, ConfigError
from stages.heads import create_head, example_batch, get_head_entry, resolve_layers
from stages.heads.side4video import shift_cls, side_taps

B16 = {"width": 768, "num_patches": 196, "depth": 12, "image_size": 224, "patch_size": 16,
       "frames": 8, "num_classes": 400}


def _tiny(**overrides):
    torch.manual_seed(0)
    return create_head("side4video", tiny=True, **overrides)


def _block_outputs(head, batch):
    """Outputs of every side block, (B, d, T, h, w) each, captured by forward hooks."""
    outs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone())) for blk in head.blocks]
    try:
        with torch.no_grad():
            head(batch)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _changed_frames(a, b):
    """Frames (axis 2 of (B, d, T, h, w)) where two side streams differ."""
    diff = (a - b).abs().amax(dim=(0, 1, 3, 4))  # (T,)
    return {t for t, v in enumerate(diff.tolist()) if v > 1e-6}


def test_reference_counts_exact():
    refs = get_head_entry("side4video").references
    assert {r.expected for r in refs} == {4_574_032, 21_185_232}
    for ref in refs:
        head = create_head("side4video", **ref.overrides)
        assert head.num_trainable() == ref.expected, ref.label


def test_presets_fill_blocks_and_width():
    light = create_head("side4video", preset="light", **B16)
    base = create_head("side4video", preset="base", **B16)
    assert (light.cfg.num_blocks, light.cfg.side_width, light.cfg.side_heads) == (6, 192, 3)
    assert (base.cfg.num_blocks, base.cfg.side_width, base.cfg.side_heads) == (12, 320, 5)
    assert len(base.blocks) == 12 and base.fc.in_features == 320
    # An explicit size beats the preset's.
    assert create_head("side4video", preset="light", side_width=128, **B16).fc.in_features == 128
    assert light.num_trainable() < base.num_trainable()


def test_count_scales_with_classes_only_in_the_classifier():
    a = create_head("side4video", preset="light", **B16)
    b = create_head("side4video", preset="light", **{**B16, "num_classes": 174})
    assert a.num_trainable() - b.num_trainable() == (400 - 174) * (192 + 1)


def test_shift_cls_halves_come_from_neighbours_and_ends_are_zero():
    B, T, d = 2, 5, 6
    cls = torch.arange(B * T * d, dtype=torch.float32).reshape(B, T, d) + 1.0
    out = shift_cls(cls)
    half = d // 2
    assert out.shape == cls.shape
    assert torch.equal(out[:, :-1, :half], cls[:, 1:, :half])  # from t+1
    assert torch.equal(out[:, 1:, half:], cls[:, :-1, half:])  # from t-1
    assert (out[:, -1, :half] == 0).all() and (out[:, 0, half:] == 0).all()


@pytest.mark.parametrize("t, expected", [(0, {1}), (1, {0, 2}), (3, {2})])
def test_cls_of_frame_t_reaches_only_adjacent_frames(t, expected):
    head = _tiny().eval()
    batch = example_batch(head, batch_size=2)
    before = _block_outputs(head, batch)[0]
    batch["cls"] = batch["cls"].clone()
    batch["cls"][:, t, 0] += 3.0 * torch.randn_like(batch["cls"][:, t, 0])  # first block's frozen CLS
    after = _block_outputs(head, batch)[0]
    assert _changed_frames(before, after) == expected


def test_patch_of_frame_t_spreads_by_the_temporal_conv():
    head = _tiny().eval()
    batch = example_batch(head, batch_size=2)
    before = _block_outputs(head, batch)[0]
    batch["patch"] = batch["patch"].clone()
    batch["patch"][:, 2, 0] += torch.randn_like(batch["patch"][:, 2, 0])  # LN ignores constants
    after = _block_outputs(head, batch)[0]
    assert _changed_frames(before, after) == {1, 2, 3}  # kernel 3 in time, nothing further


def test_placement_interval_and_top():
    assert side_taps(12, 6, "interval") == (2, 4, 6, 8, 10, 12)
    assert side_taps(12, 4, "interval") == (3, 6, 9, 12)
    assert side_taps(12, 6, "top") == (7, 8, 9, 10, 11, 12)
    assert side_taps(12, 12, "interval") == side_taps(12, 12, "top") == tuple(range(1, 13))
    for placement, taps in (("interval", (2, 4, 6, 8, 10, 12)), ("top", (7, 8, 9, 10, 11, 12))):
        head = create_head("side4video", preset="light", placement=placement, **B16)
        keys = head.data_keys()
        assert keys.cls_layers == keys.patch_layers == taps and keys.frames
        assert resolve_layers(keys.cls_layers, 12) == taps


def test_side_block_i_reads_layer_slot_i():
    head = _tiny().eval()
    batch = example_batch(head, batch_size=2)
    before = _block_outputs(head, batch)
    batch["patch"] = batch["patch"].clone()
    batch["patch"][:, :, 1] += torch.randn_like(batch["patch"][:, :, 1])  # second tapped layer
    after = _block_outputs(head, batch)
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


@pytest.mark.parametrize("key", ["frames", "cls", "patch"])
def test_logits_depend_on_pixels_and_frozen_features(key):
    head = _tiny().eval()
    batch = example_batch(head, batch_size=3)
    with torch.no_grad():
        ref = head(batch)["logits"]
        batch[key] = batch[key] + torch.randn_like(batch[key])
        moved = head(batch)["logits"]
    assert not torch.allclose(ref, moved, atol=1e-5)


def test_eval_samples_are_independent_and_train_mode_small_batches_work():
    head = _tiny()
    batch = example_batch(head, batch_size=3)
    head.train()
    for bs in (1, 2):
        out = head({k: v[:bs] for k, v in batch.items()})["logits"]
        assert out.shape == (bs, 5) and torch.isfinite(out).all()
    assert head.out_bn.num_batches_tracked.item() == 2
    head.eval()
    with torch.no_grad():
        full = head(batch)["logits"]
        one = head({k: v[1:2] for k, v in batch.items()})["logits"]
    assert torch.allclose(full[1:2], one, atol=1e-5)


def test_drop_path_is_random_in_training_only():
    head = _tiny(drop_path=0.5)
    batch = example_batch(head, batch_size=4)
    head.train()
    torch.manual_seed(1)
    a = head(batch)["logits"]
    torch.manual_seed(2)
    b = head(batch)["logits"]
    assert not torch.allclose(a, b)
    head.eval()
    with torch.no_grad():
        assert torch.equal(head(batch)["logits"], head(batch)["logits"])


@pytest.mark.parametrize("overrides, words", [
    ({"num_patches": 9}, "patches"),
    ({"placement": "middle"}, "placement"),
    ({"num_blocks": 3}, "depth"),
    ({"preset": "huge"}, "preset"),
    ({"side_heads": 3}, "divisible"),
    ({"num_blocks": 0}, "custom"),
])
def test_bad_config_is_a_config_error(overrides, words):
    with pytest.raises(ConfigError, match=words):
        _tiny(**overrides)


def test_cache_with_wrong_layers_is_refused():
    head = _tiny().eval()
    batch = example_batch(head, batch_size=2)
    batch["patch"] = batch["patch"][:, :, :1]
    with pytest.raises(CacheMismatchError, match="layers"):
        head(batch)
