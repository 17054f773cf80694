"""The papers' train pipelines in the view bank (`extract --train-aug K --aug-recipe paper`).

Each head registers its official train augmentation (SPEC section 7) as data
(``register_head(..., train_aug=TrainPipeline(...))``); the view bank draws every parameter of it
from its seeded numpy generator, records them per view and applies them with
torchvision.transforms.v2.functional. Checked here: many draws stay in each paper's ranges; the
RandAugment op table is torchvision's; RandAugment is shared by every frame where the paper
shares it and drawn per frame where it does not; real extractions from generated videos hold
views that their recorded parameters reproduce exactly; the light bank and old caches read as
before; the recipe is chosen, printed and refused as the CLI says.
"""

from __future__ import annotations

import hashlib
import math
import shlex
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cache.errors import ConfigError
from cache.meta import LIGHT_VIEW_PARAM_COLUMNS, ViewBank
from conftest import cli_in_process, extracted_store
from stages.heads.facts import SCALE_256, TrainPipeline
from stages.heads.registry import (DataKeys, Head, get_head_entry, list_heads, paper_train_pipeline, register_head,
                                   train_pipeline_for)
from stages.video import (RA_OPS, VIEW_PARAM_COLUMNS, AugViewCfg, Decoded, SamplingCfg, apply_view_params,
                          augmented_views, decode_video, draw_view_params, view_param_columns)

SIZE, T = 32, 4
PAPER_HEADS = ("actionclip", "evl", "side4video", "text4vis")


def _draws(head: str, n: int, height: int = 48, width: int = 64, frames: int = T) -> tuple[np.ndarray, dict]:
    """n views' parameter rows of ``head``'s pipeline for a (height, width) clip, as the bank lays
    them out (frame count and indices left out), and the column positions by name."""
    cfg = train_pipeline_for(head)
    rows = []
    for seed in range(n):
        drawn = draw_view_params(np.random.default_rng(seed), height, width, frames, SIZE, cfg)
        rows.append([*drawn[:7], 0, *drawn[7:]])
    names = view_param_columns(cfg, frames)[:-1]
    return np.asarray(rows, dtype=np.float64), {c: i for i, c in enumerate(names)}


def _rate_ok(hits: np.ndarray, p: float) -> bool:
    n = len(hits)
    return abs(hits.mean() - p) <= 4.5 * math.sqrt(p * (1 - p) / n)


def _magnitude(op: int, bin_: int, height: int, width: int) -> float:
    _name, mags, _signed = RA_OPS[op]
    return 0.0 if mags is None else float(mags(31, height, width)[bin_])


def _check_ra(rows, col, slots: list[str], magnitude: int, height: int, width: int) -> None:
    ops = np.concatenate([rows[:, col[f"ra_op_{s}"]] for s in slots])
    assert set(ops.astype(int)) == set(range(len(RA_OPS)))  # every op of the table gets drawn
    for s in slots:
        for op, mag in zip(rows[:, col[f"ra_op_{s}"]].astype(int), rows[:, col[f"ra_mag_{s}"]]):
            assert abs(abs(mag) - _magnitude(op, magnitude, height, width)) < 1e-6, (RA_OPS[op][0], mag)
            if not RA_OPS[op][2]:
                assert mag >= 0  # unsigned ops keep their sign
    signed = [m for s in slots for op, m in zip(rows[:, col[f"ra_op_{s}"]].astype(int), rows[:, col[f"ra_mag_{s}"]])
              if RA_OPS[op][2]]
    assert _rate_ok(np.asarray(signed) < 0, 0.5)  # torchvision: a sign flip with probability 0.5


# ----------------------------------------------------------------------------- what each head registers
def test_each_shipped_head_registers_its_papers_pipeline_or_none():
    shipped = [h for h in list_heads() if get_head_entry(h).head_cls.__module__.startswith("stages.heads.")]
    assert {"tap", "linear_probe", "lda", *PAPER_HEADS} <= set(shipped)
    for head in shipped:
        assert (paper_train_pipeline(head) is not None) == (head in PAPER_HEADS), head
    evl = paper_train_pipeline("evl")
    assert (evl.clip, evl.flip, evl.ra_ops, evl.ra_magnitude, evl.ra_per_frame, evl.area, evl.resize_ratio,
            evl.interpolation, evl.grayscale, evl.jitter) == ("dense", 0.0, 4, 7, False, (0.08, 1.0), 0.0,
                                                             "bilinear", 0.0, 0.0)
    for head in ("side4video", "text4vis"):
        p = paper_train_pipeline(head)
        assert (p.clip, p.resize_ratio, p.crop, p.area, p.flip, p.grayscale, p.jitter, p.ra_ops) == (
            "segment", SCALE_256, "random_resized", (0.08, 1.0), 0.5, 0.2, 0.0, 0)
    assert paper_train_pipeline("side4video").key() == paper_train_pipeline("text4vis").key()  # one pipeline
    ac = paper_train_pipeline("actionclip")
    assert (ac.crop, ac.ms_scales, ac.flip, ac.jitter, ac.brightness, ac.contrast, ac.saturation, ac.hue,
            ac.grayscale, ac.ra_ops, ac.ra_magnitude, ac.ra_per_frame) == (
        "multiscale", (1.0, 0.875, 0.75, 0.66), 0.5, 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 2, 9, True)


@dataclass
class _AugHeadCfg:
    num_classes: int = 4
    embed_dim: int = 32


OWN = TrainPipeline("a test head's paper: always flipped and gray", flip=1.0, grayscale=1.0, area=(0.5, 1.0))


@register_head("test_aug_head", _AugHeadCfg, train_aug=OWN)
class _AugHead(Head):
    """A head registered in this file: its pipeline is all the view bank learns of its paper."""

    def data_keys(self) -> DataKeys:
        return DataKeys(frame_emb=True)

    def forward(self, batch):
        return {"logits": batch["frame_emb"].float().mean(dim=1)[:, :4]}


def test_a_head_registered_elsewhere_brings_its_pipeline():
    from stages.extract import paper_pipeline

    assert train_pipeline_for("test_aug_head") is OWN
    assert paper_pipeline("tap,test_aug_head") == (["test_aug_head"], OWN)
    rows, col = _draws("test_aug_head", 50)
    assert rows[:, col["flip"]].all() and rows[:, col["grayscale"]].all()
    views, _ = augmented_views(Decoded(clips=[_still_clip()], decoder="t", warnings=[], indices=[list(range(T))],
                                       num_frames=T), SIZE, OWN, np.random.default_rng(0))
    assert (views[..., 0] == views[..., 1]).all() and (views[..., 1] == views[..., 2]).all()  # gray


def test_train_pipeline_for_is_the_lookup_of_online_training():
    assert train_pipeline_for("evl") is paper_train_pipeline("evl")
    assert train_pipeline_for("evl", "light") == AugViewCfg() == train_pipeline_for("tap", "light")
    for head, recipe, words in (("evl", "strong", "--aug-recipe must be one of paper, light"),
                                ("tap", "paper", "head 'tap' has no paper train pipeline"),
                                ("nope", "paper", "unknown head 'nope'")):
        with pytest.raises(ConfigError, match=words) as err:
            train_pipeline_for(head, recipe)
        assert "\n" not in str(err.value)


def test_randaugment_table_and_ops_are_torchvisions():
    from torchvision.transforms import v2

    space = v2.RandAugment._AUGMENTATION_SPACE
    assert [name for name, _, _ in RA_OPS] == list(space)
    for name, mags, signed in RA_OPS:
        ref, ref_signed = space[name]
        assert signed == ref_signed
        if mags is None:
            assert ref(31, 40, 60) is None
        else:
            assert torch.equal(mags(31, 40, 60), ref(31, 40, 60)), name
    # each op applied from a recorded row (box = the whole frame, so the crop is the identity)
    # equals torchvision's RandAugment applying that op at that magnitude
    frames = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    ra = v2.RandAugment()
    for magnitude in (7, 9):
        cfg = TrainPipeline("one op", ra_ops=1, ra_magnitude=magnitude, area=(1.0, 1.0), ratio=(1.0, 1.0))
        for op, (name, _, signed) in enumerate(RA_OPS):
            for sign in (1, -1) if signed else (1,):
                mag = sign * _magnitude(op, magnitude, SIZE, SIZE)
                row = [0, 0, 0, SIZE, SIZE, SIZE, SIZE, 2, 0, 0, op, mag]
                ours = apply_view_params(frames, np.asarray(row, dtype=np.float32), cfg, SIZE)
                video = torch.from_numpy(frames).permute(0, 3, 1, 2)
                ref = ra._apply_image_or_video_transform(video, name, float(np.float32(mag)),
                                                         interpolation=ra.interpolation, fill=ra._fill)
                np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy(), err_msg=name)


# ----------------------------------------------------------------------------- the drawn ranges
def test_evl_draws_within_its_papers_ranges():
    rows, col = _draws("evl", 600)
    assert not rows[:, col["flip"]].any()  # never a flip
    assert not rows[:, col["resize_h"]].any()  # the crop is cut from the decoded frame
    h, w = rows[:, col["crop_h"]], rows[:, col["crop_w"]]
    area = h * w / (48 * 64)
    assert area.min() >= 0.08 * 0.8 and area.max() <= 1 and area.min() < 0.15 and area.max() > 0.85
    assert (w / h).min() >= 0.75 * 0.85 and (w / h).max() <= 4 / 3 * 1.15
    assert all(f"ra_op_{i}" in col for i in range(4)) and "ra_op_4" not in col and "ra_op_0_f0" not in col
    _check_ra(rows, col, ["0", "1", "2", "3"], 7, 48, 64)  # on the whole frame, before the crop


@pytest.mark.parametrize("head", ["side4video", "text4vis"])
def test_tsn_heads_draw_within_their_papers_ranges(head):
    rows, col = _draws(head, 2000)
    side = round(SIZE * 256 / 224)
    assert set(rows[:, col["resize_h"]]) == {side} and set(rows[:, col["resize_w"]]) == {round(64 * side / 48)}
    H, W = side, round(64 * side / 48)
    h, w = rows[:, col["crop_h"]], rows[:, col["crop_w"]]
    assert (rows[:, col["crop_y"]] + h <= H).all() and (rows[:, col["crop_x"]] + w <= W).all()
    area = h * w / (H * W)
    assert area.min() >= 0.08 * 0.8 and area.max() <= 1 and area.min() < 0.15
    assert _rate_ok(rows[:, col["flip"]] == 1, 0.5) and _rate_ok(rows[:, col["grayscale"]] == 1, 0.2)
    assert "jitter" not in col and not any(c.startswith("ra_") for c in col)  # no colour jitter, no RandAugment


def test_actionclip_draws_within_its_papers_ranges():
    rows, col = _draws("actionclip", 1500)
    H, W = rows[0, col["resize_h"]], rows[0, col["resize_w"]]
    sides = {SIZE if abs(int(min(H, W) * s) - SIZE) < 3 else int(min(H, W) * s) for s in (1, 0.875, 0.75, 0.66)}
    order = sorted(sides, reverse=True)
    h, w = rows[:, col["crop_h"]].astype(int), rows[:, col["crop_w"]].astype(int)
    assert set(h) <= sides and set(w) <= sides and len(set(h)) == len(sides)
    assert all(abs(order.index(a) - order.index(b)) <= 1 for a, b in zip(h, w))  # at most one step apart
    for y, x, ch, cw in zip(rows[:, col["crop_y"]], rows[:, col["crop_x"]], h, w):  # one of the 13 positions
        assert y in {(H - ch) // 4 * g for g in range(5)} and x in {(W - cw) // 4 * g for g in range(5)}
    assert _rate_ok(rows[:, col["flip"]] == 1, 0.5) and _rate_ok(rows[:, col["grayscale"]] == 1, 0.2)
    assert _rate_ok(rows[:, col["jitter"]] == 1, 0.8)
    for name, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                         ("hue", -0.1, 0.1)):
        v = rows[:, col[name]]
        assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6 and v.max() - v.min() > 0.8 * (hi - lo), name
    orders = rows[:, [col[f"jitter_order_{i}"] for i in range(4)]].astype(int)
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len({tuple(o) for o in orders}) == 24
    slots = [f"{i}_f{t}" for t in range(T) for i in range(2)]  # N2 per frame
    assert "ra_op_2_f0" not in col and f"ra_op_1_f{T - 1}" in col
    _check_ra(rows, col, slots, 9, H, W)
    per_frame = rows[:, [col[f"ra_op_0_f{t}"] for t in range(T)]]
    assert (per_frame != per_frame[:, :1]).any(axis=1).mean() > 0.5  # frames draw their own ops


# ----------------------------------------------------------------------------- shared or per frame
def _still_clip(frames: int = T) -> np.ndarray:
    """A clip of identical frames: a generated demo frame repeated."""
    from pipeline.demo_data import render_frame_with_caption

    img, _ = render_frame_with_caption(np.random.default_rng(5), size=48)
    img = np.asarray(img, dtype=np.uint8)[..., :3]
    return np.repeat(img[None], frames, axis=0)


def test_evl_randaugment_is_the_same_for_every_frame_and_actionclips_is_not():
    clip = _still_clip()
    decoded = Decoded(clips=[clip] * 6, decoder="test", warnings=[], indices=[list(range(T))] * 6, num_frames=T)
    for seed in range(5):
        views, params = augmented_views(decoded, SIZE, train_pipeline_for("evl"), np.random.default_rng(seed))
        assert (views == views[:, :1]).all()  # T identical frames stay T identical frames
        assert params[:, 10:18].any()  # with ops drawn
    views, params = augmented_views(decoded, SIZE, train_pipeline_for("actionclip"), np.random.default_rng(0))
    differs = [(v != v[:1]).any() for v in views]
    assert sum(differs) >= 4, differs  # per-frame RandAugment tells the frames apart
    views, _ = augmented_views(decoded, SIZE, train_pipeline_for("side4video"), np.random.default_rng(0))
    assert (views == views[:, :1]).all()  # no per-frame op at all


# ----------------------------------------------------------------------------- real extractions
@pytest.fixture(scope="module")
def spec(demo_small):
    from pipeline.datasets import load_dataset

    return load_dataset("demo", data_root=demo_small.root)


def _paper_bank(spec, out, head: str, **cfg):
    sampling = {"sampling": "dense", "stride": 2} if head == "evl" else {}
    return extracted_store(spec, out, **{"text": "none", "store_frames": True, "frames": T, "train_aug": 2,
                                         "aug_recipe": "paper", "aug_heads": head, **sampling, **cfg})


def _all_frames(path: str) -> np.ndarray:
    import av

    with av.open(path) as c:
        n = sum(1 for _ in c.decode(video=0))
    return decode_video(path, SamplingCfg(frames=n)).clips[0]


@pytest.mark.parametrize("head", ["evl", "side4video", "actionclip"])
def test_recorded_parameters_reproduce_every_cached_view(spec, tmp_path, head):
    store = _paper_bank(spec, tmp_path / "cache", head)
    bank = store.info.view_bank
    cfg = train_pipeline_for(head)
    assert (bank.recipe, bank.heads, bank.pipeline) == ("paper", [head], cfg.key())
    assert store.meta["content"]["view_bank"]["recipe"] == "paper"
    names = bank.column_names(T)
    assert names[:8] == list(VIEW_PARAM_COLUMNS) and names[-T:] == [f"index_{t}" for t in range(T)]
    params, cached = store.read("train", "view_params"), store.read("train", "frames")
    assert params.shape[-1] == len(names) and bank.column("flip", T) == 0
    for i, (path, _) in enumerate(store.items("train")):
        every = _all_frames(path)
        for k in range(params.shape[1]):
            row = params[i, k]
            idx = row[-T:].astype(int)
            assert row[bank.column("num_frames", T)] == len(every)
            np.testing.assert_array_equal(apply_view_params(every[idx], row, cfg, SIZE), cached[i, k],
                                          err_msg=f"{head} video {i} view {k}")
    if head == "evl":
        assert not params[..., 0].any()
        idx = params[..., -T:]
        assert (np.diff(idx, axis=-1) == 2).all()  # a random dense clip of the cache's stride
    assert store.verify() == []


def test_light_bank_is_what_it_always_was(spec, tmp_path):
    """--aug-recipe light is the bank made before recipes existed: the same key (pinned from the
    main branch before this change), the same parameters, and its metadata names no recipe."""
    light = extracted_store(spec, tmp_path / "light", text="none", store_frames=True, frames=T, train_aug=2,
                            aug_recipe="light")
    assert light.key == "2ce9a36e829b5d5d"
    params = light.read("train", "view_params")
    assert params.shape[-1] == 8 + T
    assert hashlib.sha256(params.tobytes()).hexdigest()[:16] == "f2e227c8dbb5f320"
    assert hashlib.sha256(light.read("train", "frames").tobytes()).hexdigest()[:16] == "1d995e3732a837d4"
    assert "recipe" not in light.meta["view_bank"] and "recipe" not in light.meta["content"]["view_bank"]
    assert light.meta["config"]["aug_recipe"] == "light" and light.meta["config"]["aug_heads"] == ""
    assert light.info.view_bank.recipe == "light"
    paper = _paper_bank(spec, tmp_path / "paper", "side4video", frames=T)
    assert paper.key != light.key


def test_a_cache_made_before_the_names_reads_as_before():
    old = ViewBank.from_dict({"views": 2, "seed": 0, "area": [0.4, 1.0], "ratio": [0.75, 1.3333], "flip": 0.5,
                              "split": "train"})
    assert old.recipe == "light" and old.param_columns == []
    assert old.column_names(3) == [*LIGHT_VIEW_PARAM_COLUMNS, "index_0", "index_1", "index_2"]
    assert old.column("flip", 3) == 0 and old.column("index_0", 3) == 8
    with pytest.raises(Exception, match="no column 'grayscale'"):
        old.column("grayscale", 3)
    assert tuple(LIGHT_VIEW_PARAM_COLUMNS) == VIEW_PARAM_COLUMNS
    assert view_param_columns(AugViewCfg(), 3) == [*VIEW_PARAM_COLUMNS, "index_0..2"]  # what light records


# ----------------------------------------------------------------------------- the command line
def _dry(capsys, demo_small, *extra):
    return cli_in_process(capsys, "extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "small",
                          "--layers", "last1", "--text", "none", "--dry-run", *extra)


def test_cli_chooses_prints_and_refuses_the_recipe(capsys, demo_small):
    code, out, err = _dry(capsys, demo_small, "--for-head", "side4video", "--train-aug", "2")
    assert code == 0, err
    assert "view bank: the paper train pipeline of side4video" in out
    assert "paper train pipeline of side4video: random TSN offsets" in out and "grayscale p 0.2" in out
    code, out, err = _dry(capsys, demo_small, "--for-head", "side4video", "--train-aug", "2", "--aug-recipe", "light")
    assert code == 0 and "light: random clip, random resized crop area 0.4-1" in out
    assert "paper train pipeline" not in out
    code, out, _ = _dry(capsys, demo_small, "--for-head", "evl", "--train-aug", "2")
    assert code == 0 and "RandAugment n 4 m 7 (the same ops for every frame)" in out and "no flip" in out
    assert "this cache samples" not in out  # EVL's protocol samples dense clips, as its train code
    code, out, _ = _dry(capsys, demo_small, "--for-head", "evl", "--train-aug", "2", "--protocol", "none")
    assert code == 0 and "the paper draws a random dense clip; this cache samples --sampling segment" in out
    code, out, _ = _dry(capsys, demo_small, "--train-aug", "2")
    assert code == 0 and "light: random clip" in out  # no head: light
    # different pipelines by default: light, said; asked for paper: one line, exit 2
    code, out, _ = _dry(capsys, demo_small, "--for-head", "evl,side4video", "--protocol", "none", "--train-aug", "2")
    assert code == 0 and "the light recipe (evl, side4video train with different paper pipelines" in out
    for extra, words in (
            (("--for-head", "evl,side4video", "--protocol", "none", "--train-aug", "2", "--aug-recipe", "paper"),
             "pass --aug-recipe light, or extract a separate cache per head"),
            (("--train-aug", "2", "--aug-recipe", "paper"), "name the head with --for-head"),
            (("--for-head", "side4video", "--aug-recipe", "strong"), "--aug-recipe must be one of paper, light"),
            (("--aug-recipe", "paper"), "add --train-aug K"),
            (("--for-head", "evl", "--train-aug", "2", "--aug-area", "0.2"), "--aug-area sets the light recipe")):
        code, out, err = _dry(capsys, demo_small, *extra)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and words in lines[0], (extra, err)
    code, out, _ = _dry(capsys, demo_small, "--train-aug", "2", "--aug-heads", "tap,text4vis")  # names the heads
    assert code == 0 and "paper train pipeline of text4vis: random TSN offsets" in out
    # same pipeline: side4video and text4vis share a bank
    code, out, _ = _dry(capsys, demo_small, "--for-head", "side4video,text4vis", "--train-aug", "2", "--aug-recipe",
                        "paper")
    assert code == 0 and "paper train pipeline of side4video, text4vis" in out


def test_cache_info_and_the_rebuilding_command_name_the_pipeline(capsys, spec, tmp_path):
    from cache.meta import extract_command

    store = _paper_bank(spec, tmp_path / "cache", "actionclip")
    code, out, err = cli_in_process(capsys, "cache", "info", store.path)
    assert code == 0, err
    assert "view bank train: 2 view(s) per video, seed 0; paper train pipeline of actionclip" in out
    assert "RandAugment n 2 m 9 (per frame)" in out
    cmd = extract_command(store.info)
    assert "--train-aug 2" in cmd and "--aug-recipe paper --aug-heads actionclip" in cmd and "--aug-area" not in cmd
    code, out, err = cli_in_process(capsys, *shlex.split(cmd)[1:], "--dry-run")
    assert code == 0, err
    assert f"(key {store.key})" in out  # the printed command makes this very cache
    light = extracted_store(spec, tmp_path / "light", text="none", frames=T, train_aug=1)
    code, out, _ = cli_in_process(capsys, "cache", "info", light.path)
    assert "seed 0; light: random clip, random resized crop area 0.4-1 bicubic, flip p 0.5" in out
    assert "--aug-recipe" not in extract_command(light.info)
