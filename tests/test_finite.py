"""Nothing lost, nothing invented: NaN/inf never becomes a cached feature or a trained weight.

Stage one refuses a checkpoint with a non-finite weight (one line naming the parameter) and a model
that makes NaN of a plain frame or of its text, before any cache exists; a video whose features
come out NaN/inf, or beyond what fp16 holds, fails with its reason (the --max-failed policy then
decides the exit status). The fp16 and int8 writers refuse non-finite done rows. Numeric options
are finite, and a step that leaves a weight non-finite stops the run like a non-finite loss.
Real tiny open_clip models saved as checkpoints, real videos, real Zarr stores.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.errors import CacheError, ConfigError
from cache.quant import dequantize_int8, quantize_int8
from cache.source import ArraySpec
from cache.store import DONE, FAILED, PENDING, create_store, open_store
from conftest import cli_in_process, demo_args, extract_in_process
from stages.runs import finished_metrics

EXTRACT = ("--text", "none", "--layers", "last1", "--shard-size", "4", "--workers", "0")


def _checkpoint(tmp_path: Path, name: str, edit) -> Path:
    """The tiny model's weights (seed 0) with ``edit(state_dict)`` applied, saved as a checkpoint."""
    from stages.backbone import load_clip

    sd = {k: v.clone() for k, v in load_clip("tiny", seed=0).state_dict().items()}
    edit(sd)
    path = tmp_path / f"{name}.pt"
    torch.save(sd, path)
    return path


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.building")]


# ----------------------------------------------------------------------------- stage one: a broken model
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_a_nan_weight_stops_extraction_before_anything_is_cached(demo_small, tmp_path, capsys, dtype):
    def nan_weight(sd):
        sd["visual.transformer.resblocks.1.mlp.c_fc.weight"][3, 5] = float("nan")

    ckpt = _checkpoint(tmp_path, "nan", nan_weight)
    out = tmp_path / "cache"
    code, _, err = cli_in_process(capsys, *demo_args(demo_small, out, "--pretrained", ckpt, "--dtype", dtype,
                                                     *EXTRACT))
    line = _one_error_line(err)
    assert code == 2, err
    assert "visual.transformer.resblocks.1.mlp.c_fc.weight" in line and "NaN/inf (1 of" in line, line
    _nothing_left(out)


@pytest.mark.parametrize("case,expect", [
    # finite weights that overflow inside the vision tower: NaN for a plain grey frame
    ("vision", "NaN/inf features (frame_emb, cls) for a plain grey frame"),
    # finite weights whose text embeddings overflow: the text sets are computed inside the new store
    ("text", "NaN/inf text embeddings for text set 'clip_single'"),
])
def test_a_model_that_makes_nan_stops_extraction_before_anything_is_cached(demo_small, tmp_path, capsys, case,
                                                                           expect):
    def overflow(sd):
        sd["visual.conv1.weight" if case == "vision" else "token_embedding.weight"] *= 1e30

    ckpt = _checkpoint(tmp_path, case, overflow)
    out = tmp_path / "cache"
    args = [*EXTRACT[2:], "--text", "clip_single"] if case == "text" else EXTRACT
    code, _, err = cli_in_process(capsys, *demo_args(demo_small, out, "--pretrained", ckpt, *args))
    line = _one_error_line(err)
    assert code == 2 and expect in line, err
    _nothing_left(out)


def _peaks(store, split: str) -> np.ndarray:
    """Per video: the largest |frame_emb| (what the final projection makes)."""
    return np.abs(store.read(split, "frame_emb")).reshape(store.num_videos(split), -1).max(axis=1)


def test_features_beyond_fp16_fail_their_videos_with_a_reason(demo_small, tmp_path, capsys):
    """The final projection scaled so that some videos' embeddings exceed fp16's 65504 and the
    others stay below: exactly those videos fail, saying why, and the rest are cached as done."""
    ref = tmp_path / "ref"
    code, _, err = cli_in_process(capsys, *demo_args(demo_small, ref, *EXTRACT))
    assert code == 0, err
    peaks = {s: _peaks(open_store(ref), s) for s in ("train", "val")}
    allp = np.sort(np.concatenate(list(peaks.values())))
    gap = int(np.argmax(np.diff(allp)))  # split at the widest gap between two videos' peaks
    assert np.diff(allp)[gap] / allp[gap] > 4 * 2.0 ** -11  # wider than fp16's rounding of the peaks read back
    scale = 65504.0 / ((allp[gap] + allp[gap + 1]) / 2)
    ckpt = _checkpoint(tmp_path, "big", lambda sd: sd["visual.proj"].mul_(scale))
    out = tmp_path / "cache"
    code, stdout, err = cli_in_process(capsys, *demo_args(demo_small, out, "--pretrained", ckpt, *EXTRACT))
    assert code == 0, err  # some videos failed: within the default --max-failed 1.0
    st = open_store(out)
    n_failed = 0
    for split, p in peaks.items():
        over = p * scale > 65504
        np.testing.assert_array_equal(st.status(split), np.where(over, FAILED, DONE))
        reasons = {f["index"]: f["reason"] for f in st.failures(split)}
        assert sorted(reasons) == np.flatnonzero(over).tolist()
        for reason in reasons.values():
            assert reason.startswith("features overflow fp16 in frame_emb (|x| up to ") and "65504" in reason, reason
        n_failed += int(over.sum())
    assert 0 < n_failed < sum(len(p) for p in peaks.values()) and f", {n_failed} failed," in stdout
    assert st.verify() == []  # nothing non-finite marked done
    # the same run with --max-failed 0: the failures now fail the run (exit 1, one line), the cache is reused
    code, _, err = cli_in_process(capsys, *demo_args(demo_small, out, "--pretrained", ckpt, *EXTRACT,
                                                     "--max-failed", "0"))
    assert code == 1 and "--max-failed 0" in _one_error_line(err), err


# ----------------------------------------------------------------------------- the writers
def test_quantize_int8_refuses_non_finite_input_with_its_own_error():
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
    back = dequantize_int8(quantize_int8(x))
    assert np.abs(back - x).max() < 0.05
    for bad, expect in ((np.nan, "NaN/inf"), (np.inf, "NaN/inf"), (-np.inf, "NaN/inf"), (1e6, "beyond the 65504")):
        y = x.copy()
        y[1, 2, 3] = bad
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not numpy's "invalid value encountered in cast"
            with pytest.raises(ValueError, match=expect):
                quantize_int8(y)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_writers_refuse_non_finite_done_rows_and_write_failed_rows_quietly(tmp_path, dtype):
    meta = {"key": "k", "dtype": "int8" if dtype == "int8" else "fp16", "int8_outliers": 2}
    splits = {"train": {"items": [(f"v{i}.mp4", 0) for i in range(4)],
                        "arrays": [ArraySpec("cls", (2, 8), dtype)]}}
    st = create_store(tmp_path / "c", meta, splits, shard_size=4)
    rng = np.random.default_rng(1)
    for bad, expect in ((np.nan, r"train/cls\[2\] is marked done but holds NaN/inf"),
                        (7e4, r"train/cls\[2\] is marked done but reaches 7e\+04, beyond the 65504 of fp16")):
        data = rng.standard_normal((4, 2, 8)).astype(np.float32)
        data[2, 1, 4] = bad
        with pytest.raises(CacheError, match=expect):
            st.write_shard("train", 0, {"cls": data}, np.full(4, DONE, np.int8), [])
        assert (st.status("train") == PENDING).all() and st.record("train", 0) is None
        assert not (tmp_path / "c" / "train" / "cls" / "c").exists()  # not a byte of the shard written
    # a failed video's row holds no data (NaN in a shard buffer): written without a numpy warning, read as NaN
    data = rng.standard_normal((4, 2, 8)).astype(np.float16)
    data[1] = np.nan
    status = np.array([DONE, FAILED, DONE, DONE], np.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.write_shard("train", 0, {"cls": data}, status, [{"index": 1, "path": "v1.mp4", "reason": "decode error"}])
    got = st.read("train", "cls")
    assert np.isnan(got[1]).all() and np.isfinite(got[[0, 2, 3]]).all()
    np.testing.assert_allclose(got[[0, 2, 3]], data[[0, 2, 3]].astype(np.float32), atol=0.05)
    assert st.verify() == []


# ----------------------------------------------------------------------------- stage two: finite options and weights
@pytest.fixture(scope="module")
def cache(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("finite") / "cache"
    extract_in_process(demo_small.root, out, layers="last1", text="none", shard_size=4)
    return out


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e400", "1e40"])
def test_numeric_options_must_be_finite(cache, tmp_path, capsys, value):
    run = tmp_path / "run"
    code, _, err = cli_in_process(capsys, "train", "--cache", cache, "--head", "tap", "--no-progress", "--run-dir",
                                  run, "--set", "epochs=1", "--set", f"lr={value}")
    line = _one_error_line(err)
    assert code == 2 and "option 'lr' expects a finite number" in line and value in line, err
    assert value != "1e40" or "float32's range" in line
    assert not run.exists()


def test_an_experiment_file_infinity_is_refused_too(tmp_path):
    """YAML's .inf / .nan arrive as floats, not text: the same rule refuses them."""
    from stages.config import OptionSet, load_experiment, split_options
    from stages.train import TrainCfg

    for text in (".inf", "-.inf", ".nan"):
        exp = tmp_path / "exp.yaml"
        exp.write_text(f"train:\n  lr: {text}\n")
        with pytest.raises(ConfigError, match="option 'train.lr' expects a finite number, got (inf|-inf|nan)"):
            split_options(load_experiment(exp), [OptionSet("train", TrainCfg, "training options")])


def test_a_step_that_makes_a_weight_non_finite_stops_the_run(cache, tmp_path, capsys):
    """lr 1e9 with weight decay: each step multiplies the weights by ~-5e7, finite through epoch 1
    (its checkpoint saved), inf in epoch 2: the run stops there (exit 1, one line naming the
    weight), its status says failed, and no accuracy is reported."""
    run = tmp_path / "run"
    code, out, err = cli_in_process(capsys, "train", "--cache", cache, "--head", "tap", "--no-progress", "--run-dir",
                                    run, "--set", "epochs=2", "--set", "batch_size=4", "--set", "warmup_epochs=0",
                                    "--set", "lr=1e9")
    line = _one_error_line(err)
    assert code == 1, err
    assert "weight 'fc.weight' holds NaN/inf after the optimiser step at epoch 2" in line, line
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "fc.weight" in status["reason"]
    assert finished_metrics(run) is None and "top1" not in out


def test_fine_tuning_stops_on_a_step_too_large_for_float32(demo_small, tmp_path, capsys):
    """Stage three's AdamW step at lr 3e38 (lr / (1 - beta1) leaves float32): one line, exit 1, not
    torch's traceback; the run's status says failed."""
    run = tmp_path / "ft"
    code, _, err = cli_in_process(capsys, "finetune", "--paradigm", "text4vis", "--dataset", "demo", "--data-root",
                                  demo_small.root, "--model", "tiny", "--frames", "2", "--epochs", "1", "--no-progress",
                                  "--set", "workers=0", "--set", "layers=1", "--set", "pos_rows=8", "--set", "lr=3e38",
                                  "--set", "warmup_epochs=0", "--run-dir", run)
    line = _one_error_line(err)
    assert code == 1 and "optimiser step at step 1 overflows float32" in line, err
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
