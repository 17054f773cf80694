"""The view bank (`extract --train-aug K`): real extraction from a generated demo world.

Each of the K train views is recomputed here from the decoded frames and its recorded
parameters (frame indices, crop box, flip) and compared with the cached uint8 frames; stage two
(Zarr and WebDataset alike) must draw each view equally often; a cache made without the bank is
what it always was.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cache.errors import ConfigError
from conftest import demo_args, extracted_store, run_cli
from stages.data.zarr_split import CacheSplit, HeadInputs, select_videos
from stages.heads import DataKeys
from stages.video import VIEW_PARAM_COLUMNS, SamplingCfg, decode_clips, decode_video, make_views

K = 3
P0 = len(VIEW_PARAM_COLUMNS)  # the frame indices follow these columns
COL = {name: i for i, name in enumerate(VIEW_PARAM_COLUMNS)}


def _extract(spec, out, shard=(0, 1), **cfg):
    return extracted_store(spec, out, shard=shard, **{"text": "none", "store_frames": True, **cfg})


@pytest.fixture(scope="module")
def spec(demo_small):
    from pipeline.datasets import load_dataset

    return load_dataset("demo", data_root=demo_small.root)


@pytest.fixture(scope="module")
def bank(spec, tmp_path_factory):
    """K = 3 augmented views of 4 TSN frames (the videos have 8: the offsets are random)."""
    return _extract(spec, tmp_path_factory.mktemp("bank") / "cache", frames=4, train_aug=K, shard_size=5)


@pytest.fixture(scope="module")
def plain(spec, tmp_path_factory):
    return _extract(spec, tmp_path_factory.mktemp("plain") / "cache", frames=4, shard_size=5)


def _frame_count(path: str) -> int:
    import av

    with av.open(path) as c:
        return sum(1 for _ in c.decode(video=0))


def _recompute(frames: np.ndarray, row: np.ndarray, size: int) -> np.ndarray:
    """One view from the video's decoded frames (n, H, W, 3) and its parameter row, written from
    the column layout: frames by index, the box, bicubic resize to size x size, mirror."""
    idx = row[P0:].astype(int)
    y, x, h, w = (int(row[COL[c]]) for c in ("crop_y", "crop_x", "crop_h", "crop_w"))
    clip = torch.from_numpy(np.ascontiguousarray(frames[idx][:, y:y + h, x:x + w])).permute(0, 3, 1, 2).float()
    out = F.interpolate(clip, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    out = out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (T, size, size, 3)
    return out[:, :, ::-1] if row[COL["flip"]] == 1 else out


def _check_views(store, sampling: str, frames: int, stride: int = 0) -> list[np.ndarray]:
    size = int(store.meta["dims"]["image_size"])
    params = store.read("train", "view_params")          # (N, K, P)
    cached = store.read("train", "frames")               # (N, K, T, S, S, 3) uint8
    assert params.shape == (len(store.items("train")), K, P0 + frames) and params.dtype == np.float32
    rows = []
    for i, (path, _) in enumerate(store.items("train")):
        n = _frame_count(path)
        every = decode_video(path, SamplingCfg(frames=n)).clips[0]  # all n frames, upright, as extraction reads them
        for k in range(K):
            row = params[i, k]
            idx = row[P0:].astype(int)
            assert (row[COL["frame_h"]], row[COL["frame_w"]], row[COL["num_frames"]]) == (*every.shape[1:3], n)
            if sampling == "segment":  # one random frame in each of T equal segments
                seg = n / frames
                assert all(math.floor(seg * t) <= j < seg * (t + 1) for t, j in enumerate(idx)), idx
            else:  # T frames `stride` apart from a random start
                assert np.all(np.diff(idx) == stride) and 0 <= idx[0] <= n - ((frames - 1) * stride + 1), idx
            y, x, h, w = (int(row[COL[c]]) for c in ("crop_y", "crop_x", "crop_h", "crop_w"))
            H, W = every.shape[1:3]
            assert 0 <= y and y + h <= H and 0 <= x and x + w <= W
            assert 0.4 * 0.9 <= h * w / (H * W) <= 1 and 0.75 * 0.9 <= w / h <= 4 / 3 * 1.1  # rounding to pixels
            np.testing.assert_array_equal(cached[i, k], _recompute(every, row, size), err_msg=f"video {i} view {k}")
            # and the parameters tell the views apart: another view's parameters give other frames
            for j in range(K):
                if j != k and not np.array_equal(params[i, j], row):
                    assert not np.array_equal(cached[i, j], _recompute(every, row, size))
            rows.append(row)
    return rows


def test_each_view_is_what_its_parameters_say(bank):
    rows = np.stack(_check_views(bank, "segment", 4))
    # the draws really vary: both flips, many boxes, many frame choices
    assert set(rows[:, COL["flip"]]) == {0.0, 1.0}
    assert len({tuple(r[1:5]) for r in rows}) > len(rows) // 2
    assert len({tuple(r[P0:]) for r in rows}) > 4
    assert bank.meta["view_bank"]["views"] == K and bank.meta["content"]["view_bank"]["seed"] == 0
    assert bank.verify() == []


def test_dense_bank_draws_random_clip_starts(spec, tmp_path):
    st = _extract(spec, tmp_path / "dense", frames=3, sampling="dense", stride=2, train_aug=K)
    rows = np.stack(_check_views(st, "dense", 3, stride=2))
    assert len(set(rows[:, P0])) > 1  # several starts


def test_embeddings_belong_to_their_view(bank):
    from stages.backbone import load_clip
    from stages.video import normalize

    model = load_clip("tiny", seed=0)
    mean, std = bank.meta["preprocess"]["mean"], bank.meta["preprocess"]["std"]
    frames = bank.read("train", "frames", slice(0, 4))        # (4, K, T, S, S, 3)
    x = normalize(torch.from_numpy(frames.reshape(-1, *frames.shape[3:])), mean, std)  # (4*K*T, 3, S, S)
    with torch.no_grad():
        emb = model.encode_image(x).numpy().reshape(*frames.shape[:3], -1)  # (4, K, T, E)
    np.testing.assert_allclose(bank.read("train", "frame_emb", slice(0, 4)), emb, rtol=2e-3, atol=2e-3)


def test_bank_is_a_function_of_seed_and_video_not_of_sharding(spec, bank, tmp_path):
    """Two processes (--shard 0/2, 1/2) with another shard size draw the same views; another seed others."""
    out = tmp_path / "again"
    for rank in (0, 1):
        st = _extract(spec, out, shard=(rank, 2), frames=4, train_aug=K, shard_size=3)
    assert st.is_complete() and st.key == bank.key
    for name in ("view_params", "frames"):
        np.testing.assert_array_equal(st.read("train", name), bank.read("train", name))
    from stages.extract import ExtractCfg, plan_extraction

    other = plan_extraction(spec, ExtractCfg(model="tiny", text="none", store_frames=True, frames=4, train_aug=K,
                                             aug_seed=1), out=tmp_path / "x")
    assert other.key != bank.key


def test_plain_cache_is_unchanged(spec, plain, bank, tmp_path):
    """Without --train-aug: no view bank in the key, metadata or arrays, the bank's options change
    nothing, and the train split holds today's computation (segment centres, centre crop)."""
    from stages.extract import ExtractCfg, plan_extraction

    assert "view_bank" not in plain.meta["content"] and "view_bank" not in plain.meta
    assert "view_params" not in plain.specs("train") and plain.specs("train")["frames"].shape[0] == 1
    same = _extract(spec, tmp_path / "same", frames=4, shard_size=5, aug_seed=9, aug_area=0.2)
    assert same.key == plain.key
    for split in plain.splits:  # byte for byte, every chunk file
        files = sorted(p.relative_to(plain.path) for p in (plain.path / split).rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(same.path) for p in (same.path / split).rglob("*") if p.is_file())
        for f in files:
            assert (plain.path / f).read_bytes() == (same.path / f).read_bytes(), f
    for i, (path, _) in enumerate(plain.items("train")):
        clips, _ = decode_clips(path, SamplingCfg(frames=4))
        np.testing.assert_array_equal(plain.read("train", "frames", i), make_views(clips, 32, 1))
    # the bank leaves the other splits alone
    for name in plain.specs("val"):
        np.testing.assert_array_equal(bank.read("val", name), plain.read("val", name))
    assert bank.key != plain.key
    # K = 1 with the bank on is one random view, keyed apart
    one = plan_extraction(spec, ExtractCfg(model="tiny", text="none", store_frames=True, frames=4, train_aug=1),
                          out=tmp_path / "one")
    assert one.key not in (plain.key, bank.key) and one.split_arrays["train"][0].shape[0] == 1


def _drawn_views(ds, store, idx, epochs) -> np.ndarray:
    """(epochs, videos) index of the cached view each training sample was."""
    views = store.read("train", "frame_emb", idx)  # (N, K, T, E)
    out = np.zeros((len(epochs), len(idx)), dtype=int)
    for e, epoch in enumerate(epochs):
        ds.set_epoch(epoch, seed=0)
        items = ds if isinstance(ds, CacheSplit) else ds.ordered()
        for i, item in enumerate(items):
            match = [k for k in range(K) if np.array_equal(item["frame_emb"].numpy(), views[i, k])]
            assert len(match) == 1
            out[e, i] = match[0]
    return out


def test_stage_two_draws_each_view_equally_often(bank, tmp_path):
    from scipy.stats import chisquare

    from cache.wds import export_wds
    from stages.data.wds_split import open_wds_source

    idx = select_videos(bank, "train")
    inputs = HeadInputs(bank, DataKeys(frame_emb=True), "train")
    ds = CacheSplit(bank, inputs, idx, train=True)
    E = 300
    drawn = _drawn_views(ds, bank, idx, range(E))
    counts = np.stack([(drawn == k).sum(axis=0) for k in range(K)])  # (K, videos)
    assert chisquare(counts.sum(axis=1)).pvalue > 1e-3
    sd = math.sqrt(E * (1 / K) * (1 - 1 / K))
    assert np.all(np.abs(counts - E / K) < 4.5 * sd), counts  # every video, every view
    # one draw per video per epoch, not one per epoch for all videos, nor the same every epoch
    assert len({tuple(r) for r in drawn}) > E // 2 and (drawn != drawn[0]).any(axis=0).all()
    # the WebDataset path draws the same view for the same (epoch, video)
    export_wds(bank, tmp_path, name="bank", shard_bytes="40KB")
    src = open_wds_source(str(tmp_path / "bank-header.json"), shuffle=4)
    np.testing.assert_array_equal(src.read("train", "view_params"), bank.read("train", "view_params"))
    streamed = src.split_dataset(HeadInputs(src, DataKeys(frame_emb=True), "train"), idx, train=True)
    np.testing.assert_array_equal(_drawn_views(streamed, bank, idx, range(20)), drawn[:20])
    # evaluation of the train split sees every view
    assert CacheSplit(bank, inputs, idx, train=False)[0]["frame_emb"].shape[0] == K


def test_bad_train_aug_is_one_line_and_writes_nothing(demo_small, spec, tmp_path):
    out = tmp_path / "cache"
    proc = run_cli(*demo_args(demo_small, out, "--train-aug", "0"))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--train-aug" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not any(tmp_path.iterdir())
    from stages.extract import ExtractCfg, plan_extraction

    for bad in ({"train_aug": -1}, {"train_aug": 0}, {"train_aug": 1.5}, {"train_aug": True},
                {"train_aug": 2, "train_views": "2x1"}, {"train_aug": 2, "aug_area": 0}):
        with pytest.raises(ConfigError, match="--train-aug|--aug-area"):
            plan_extraction(spec, ExtractCfg(model="tiny", **bad), out=out)
    assert not out.exists()


def test_dry_run_prints_the_cost_of_the_bank(demo_small, tmp_path):
    out = tmp_path / "cache"
    proc = run_cli(*demo_args(demo_small, out, "--train-aug", "4", "--frames-uint8", "--text", "none", "--dry-run"),
                   check=True)
    lines = proc.stdout.splitlines()
    train = next(ln for ln in lines if ln.startswith("train"))
    bank = next(ln for ln in lines if ln.startswith("views"))
    assert "frames[4, 8, 32, 32, 3]" in train and "view_params[4, 16]" in train
    assert "bank of 4 augmented view(s)" in bank and "more than one view" in bank
    assert not out.exists()


def test_refusal_hint_keeps_the_bank_or_recommends_the_heads(plain, bank):
    from stages.data.zarr_split import extraction_hint
    from stages.heads.needs import recommended_train_aug

    need = DataKeys(patch_layers=(-1,), frames=True)  # neither cache has patch tokens
    assert f"--train-aug {K} --aug-seed 0 --aug-area 0.4" in extraction_hint(bank, need, "evl")
    assert "--train-aug" not in extraction_hint(plain, need, "evl") and recommended_train_aug("evl") is None
    assert recommended_train_aug("side4video") is None  # no shipped head has a bank default
    assert "--train-aug" not in extraction_hint(plain, need, "side4video")
