"""EVL head: paper counts, what each temporal part adds, zero inits, TCA maths, frozen q/k."""

import pytest
import torch

from cache.errors import CacheMismatchError, ConfigError
from stages.heads import create_head, example_batch, get_head_entry, resolve_layers
from stages.heads.evl import BACKBONE_WEIGHT_KEYS, TemporalCrossAttention

PAPER = {  # (decoder layers, frames, TCA) -> trainable parameters, ViT-B/16, 400 classes
    (1, 8, False): 7_408_528,
    (4, 8, False): 28_704_400,
    (4, 32, False): 28_778_128,
    (4, 8, True): 33_183_376,
}
B16 = {"width": 768, "num_patches": 196, "backbone_heads": 12, "num_classes": 400, "depth": 12}
# Two decoder layers (the tiny preset has one) on a 4-block backbone, so layer alignment is exercised.
TWO = {"num_layers": 2, "depth": 4}


def _meta(**overrides):
    with torch.device("meta"):
        return create_head("evl", **overrides)


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return create_head("evl", tiny=True, **{**TWO, **overrides}).eval()


def _logits(head, batch):
    with torch.no_grad():
        return head(batch)["logits"]


def _permute_frames(batch, perm):
    return {k: (v[:, perm] if k in ("cls", "patch") else v) for k, v in batch.items()}


def _randomise(tensor, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=g))


def test_paper_counts_exact():
    refs = get_head_entry("evl").references
    got = {(r.overrides["num_layers"], r.overrides["frames"], r.overrides["use_tca"]): r.expected for r in refs}
    assert got == PAPER
    for ref in refs:
        assert _meta(**ref.overrides).num_trainable() == ref.expected, ref.label


def test_decoder_layer_is_a_clip_block_with_cross_attention():
    D = 768
    head = _meta(**B16, num_layers=1)
    attn = 4 * (D * D + D)  # q, k, v, out projections with bias
    mlp = (D * 4 * D + 4 * D) + (4 * D * D + D)
    norms = 3 * 2 * D  # query, frame tokens, before the MLP
    assert sum(p.numel() for p in head.layers[0].decoder.parameters()) == attn + mlp + norms
    # Counted once: the query, the output LayerNorm and the classifier.
    once = head.query.numel() + sum(p.numel() for m in (head.norm, head.fc) for p in m.parameters())
    assert once == D + 2 * D + D * 400 + 400


@pytest.mark.parametrize("option,module,per_layer", [
    ("use_temporal_conv", "conv", 768 * 3 + 768),  # depthwise k=3 with bias
    ("use_temporal_pos", "pos", 8 * 768),  # T x D
    ("use_tca", "tca", 2 * 27 * 27 * 768),  # two directions x (2*14-1)^2 offsets x D
])
def test_each_switch_removes_exactly_its_parameters(option, module, per_layer):
    on = _meta(**B16, num_layers=4, frames=8)
    off = _meta(**B16, num_layers=4, frames=8, **{option: False})
    assert on.num_trainable() - off.num_trainable() == 4 * per_layer
    names_on, names_off = dict(on.named_parameters()), dict(off.named_parameters())
    removed = set(names_on) - set(names_off)
    assert set(names_off) < set(names_on)
    assert removed and all(f".{module}" in name for name in removed)
    assert sum(names_on[n].numel() for n in removed) == 4 * per_layer


def test_data_keys_and_frozen_buffers_follow_tca():
    with_tca, without = _meta(**B16), _meta(**B16, use_tca=False)
    keys = with_tca.data_keys()
    assert keys.cls_layers == keys.patch_layers == (-5, -4, -3, -2, -1)
    assert resolve_layers(keys.patch_layers, 12) == (8, 9, 10, 11, 12)  # input of block 9, outputs of 9..12
    assert keys.backbone_weights == BACKBONE_WEIGHT_KEYS
    assert without.data_keys().cls_layers == (-4, -3, -2, -1) and without.data_keys().backbone_weights == ()
    # The frozen ln_1 / q,k rows are checkpointed buffers, never trainable parameters.
    state = with_tca.state_dict()
    for i in range(4):
        assert state[f"layers.{i}.qk.qk_weight"].shape == (2 * 768, 768)
        assert f"layers.{i}.qk.ln_weight" in state and f"layers.{i}.tca.rel_index" not in state
    assert not any(".qk." in n for n, _ in with_tca.named_parameters())
    assert not any(".qk." in n for n in without.state_dict())


def test_config_errors():
    with pytest.raises(ConfigError, match="square"):
        create_head("evl", tiny=True, num_patches=15)
    create_head("evl", tiny=True, num_patches=15, use_tca=False)  # the decoder alone takes any P
    with pytest.raises(ConfigError, match="needs 5 blocks"):
        _meta(**{**B16, "depth": 4})
    _meta(**{**B16, "depth": 4}, use_tca=False)
    with pytest.raises(ConfigError):
        create_head("evl", tiny=True, backbone_heads=3)  # 64 not divisible by 3


def test_batch_mismatch_is_a_clear_error():
    head = _tiny()
    batch = example_batch(head, batch_size=2)
    with pytest.raises(CacheMismatchError, match="frames"):
        head(_permute_frames(batch, [0, 1, 2]))  # 3 frames for a 4-frame head
    with pytest.raises(CacheMismatchError, match="layers"):
        head({"cls": batch["cls"][:, :, 1:], "patch": batch["patch"][:, :, 1:]})  # the TCA input layer missing


def test_zero_init_tca_and_pos_leave_the_initial_output_unchanged():
    off = _tiny(use_tca=False, use_temporal_pos=False)
    on = _tiny(use_tca=True, use_temporal_pos=True)
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(".pos" in k or ".tca." in k or ".qk." in k for k in missing)
    batch = example_batch(on, batch_size=3)  # L = 3: TCA input, then the outputs of blocks -2, -1
    sliced = {"cls": batch["cls"][:, :, 1:], "patch": batch["patch"][:, :, 1:]}
    torch.testing.assert_close(_logits(on, batch), _logits(off, sliced))
    # Not vacuous: once trained away from zero, each part does change the output.
    for param in (on.layers[0].tca.w_prev, on.layers[1].pos):
        before = _logits(on, batch)
        _randomise(param, seed=7)
        assert not torch.allclose(before, _logits(on, batch), atol=1e-4)


def test_tca_input_layer_only_matters_through_tca():
    head = _tiny()
    batch = example_batch(head, batch_size=2)
    changed = dict(batch, patch=batch["patch"].clone(), cls=batch["cls"].clone())
    changed["patch"][:, :, 0] += 3.0 * torch.randn_like(changed["patch"][:, :, 0])
    changed["cls"][:, :, 0] += 3.0
    torch.testing.assert_close(_logits(head, batch), _logits(head, changed))  # TCA weights still zero
    _randomise(head.layers[0].tca.w_next, seed=3)
    assert not torch.allclose(_logits(head, batch), _logits(head, changed), atol=1e-4)
    # The last layer of the batch feeds the last decoder layer directly.
    last = dict(batch, cls=batch["cls"].clone())
    last["cls"][:, :, -1] += 1.0
    assert not torch.allclose(_logits(head, batch), _logits(head, last), atol=1e-4)


def test_tca_adds_to_patches_only_never_to_cls():
    head = _tiny(use_temporal_conv=False, use_temporal_pos=False)
    batch = example_batch(head, batch_size=2)
    seen = []
    hook = head.layers[1].decoder.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    _logits(head, batch)
    _randomise(head.layers[1].tca.w_prev, seed=2)
    _randomise(head.layers[1].tca.w_next, seed=3)
    _logits(head, batch)
    hook.remove()
    delta = (seen[1] - seen[0]).unflatten(1, (4, 17))  # (B, T*(1+P), D) -> (B, T, 1+P, D)
    assert delta[:, :, 0].abs().max() == 0  # CLS tokens untouched
    assert (delta[:, :, 1:].abs().amax(dim=(0, 3)) > 0).all()  # every patch of every frame moved


def test_frame_order_matters_only_through_the_temporal_parts():
    perm = [2, 0, 3, 1]
    plain = _tiny(use_temporal_conv=False, use_temporal_pos=False, use_tca=False)
    batch = example_batch(plain, batch_size=3)
    # Without temporal parts the decoder attends to a set of tokens: frame order is invisible.
    torch.testing.assert_close(_logits(plain, batch), _logits(plain, _permute_frames(batch, perm)))
    conv = _tiny(use_temporal_pos=False, use_tca=False)
    assert not torch.allclose(_logits(conv, batch), _logits(conv, _permute_frames(batch, perm)), atol=1e-4)
    pos = _tiny(use_temporal_conv=False, use_tca=False)
    torch.testing.assert_close(_logits(pos, batch), _logits(pos, _permute_frames(batch, perm)))  # zero init
    _randomise(pos.layers[0].pos, seed=1)
    assert not torch.allclose(_logits(pos, batch), _logits(pos, _permute_frames(batch, perm)), atol=1e-4)
    tca = _tiny(use_temporal_conv=False, use_temporal_pos=False)
    batch = example_batch(tca, batch_size=3)
    torch.testing.assert_close(_logits(tca, batch), _logits(tca, _permute_frames(batch, perm)))  # zero init
    for layer in tca.layers:
        _randomise(layer.tca.w_prev, seed=4)
        _randomise(layer.tca.w_next, seed=5)
    assert not torch.allclose(_logits(tca, batch), _logits(tca, _permute_frames(batch, perm)), atol=1e-4)


def test_tca_matches_a_loop_over_patches():
    torch.manual_seed(0)
    side, width, B, T, H, Dh = 3, 5, 2, 3, 2, 4
    tca = TemporalCrossAttention(width, side)
    _randomise(tca.w_prev, 1)
    _randomise(tca.w_next, 2)
    q, k = torch.randn(B, T, side * side, H, Dh), torch.randn(B, T, side * side, H, Dh)
    expected = torch.zeros(B, T, side * side, width)
    for b in range(B):
        for t in range(T):
            for other, w in ((t - 1, tca.w_prev), (t + 1, tca.w_next)):
                if not 0 <= other < T:
                    continue
                for p in range(side * side):
                    logits = torch.einsum("hc,khc->hk", q[b, t, p], k[b, other]) / Dh ** 0.5
                    attn = logits.softmax(-1).mean(0)  # mean over backbone heads
                    for j in range(side * side):
                        dr, dc = p // side - j // side, p % side - j % side
                        expected[b, t, p] += attn[j] * w[(dr + side - 1) * (2 * side - 1) + dc + side - 1]
    with torch.no_grad():
        torch.testing.assert_close(tca(q, k), expected)


def test_backbone_weights_from_open_clip_reproduce_its_attention():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32)
    blocks = vit.transformer.resblocks
    weights = {rel: {k: v for k, v in blocks[4 + rel].state_dict().items() if k in BACKBONE_WEIGHT_KEYS}
               for rel in (-2, -1)}
    assert all(set(w) == set(BACKBONE_WEIGHT_KEYS) for w in weights.values())  # open_clip's own names
    head = _tiny()
    head.set_backbone_weights(weights)
    x = torch.randn(3, 17, 64)  # (B*T, 1+P, D) input tokens of the last block
    q, k = head.layers[1].qk(x)  # (B*T, 1+P, H, Dh)
    ours = torch.einsum("nqhc,nkhc->nhqk", q / 16 ** 0.5, k).softmax(-1)
    normed = blocks[3].ln_1(x)
    _, theirs = blocks[3].attn(normed, normed, normed, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    # Installed weights reach the TCA maps once its projections are non-zero.
    for layer in head.layers:
        _randomise(layer.tca.w_prev, seed=9)
    fresh = _tiny()
    for layer in fresh.layers:
        _randomise(layer.tca.w_prev, seed=9)
    batch = example_batch(head, batch_size=2)
    assert not torch.allclose(_logits(head, batch), _logits(fresh, batch), atol=1e-5)
    # Absolute block numbers work too; a checkpoint carries the frozen weights.
    other = _tiny()
    other.set_backbone_weights({3: weights[-2], 4: weights[-1]})
    qk_buffers = [n for n in head.state_dict() if ".qk." in n]
    assert len(qk_buffers) == 8
    for name in qk_buffers:
        torch.testing.assert_close(other.state_dict()[name], head.state_dict()[name])
    restored = _tiny(seed=5)
    restored.load_state_dict(head.state_dict())
    torch.testing.assert_close(_logits(restored, batch), _logits(head, batch))
    with pytest.raises(ConfigError, match="no backbone weights for block -2"):
        _tiny().set_backbone_weights({-1: weights[-1]})
    with pytest.raises(ConfigError, match="lack"):
        _tiny().set_backbone_weights({-2: weights[-2], -1: {"ln_1.weight": torch.ones(64)}})


def test_stand_in_backbone_weights_are_deterministic():
    a, b = _tiny(seed=1), _tiny(seed=2)
    for name, buf in a.state_dict().items():
        if ".qk." in name:
            torch.testing.assert_close(buf, b.state_dict()[name])
    ln = a.layers[0].qk
    assert torch.equal(ln.ln_weight, torch.ones(64)) and torch.equal(ln.ln_bias, torch.zeros(64))
    assert not torch.equal(a.layers[0].qk.qk_weight, a.layers[1].qk.qk_weight)


def test_two_layer_head_trains_every_part():
    head = _tiny().train()
    batch = example_batch(head, batch_size=4)
    head.loss(head(batch), batch["label"]).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The zero-initialised TCA and position weights still get a signal on the first step.
    for layer in head.layers:
        assert layer.tca.w_prev.grad.abs().sum() > 0 and layer.tca.w_next.grad.abs().sum() > 0
        assert layer.pos.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in head.buffers())


def test_fp16_cache_inputs_and_autocast():
    head = _tiny()
    for layer in head.layers:
        _randomise(layer.tca.w_prev, seed=6)
    batch = example_batch(head, batch_size=2)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in batch.items()}  # the cache stores fp16
    torch.testing.assert_close(_logits(head, half), _logits(head, batch), atol=5e-3, rtol=5e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(half)["logits"]
    assert out.shape == (2, 5) and torch.isfinite(out).all()
