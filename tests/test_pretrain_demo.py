"""The demo's own CLIP: contrastive pretraining on captioned synthetic frames (stages.pretrain_demo)."""

from __future__ import annotations

import json

import pytest
import torch

from cache.errors import ConfigError
from stages.backbone import load_clip
from stages.pretrain_demo import PretrainCfg, _ThreadChooser, caption_labels, pretrain_demo_clip


def _world():
    from pipeline.demo_data import WORLDS

    return WORLDS["basic"]


def _render(size: int):
    from pipeline.demo_data import render_frame_with_caption

    return lambda rng: render_frame_with_caption(rng, size, "basic")


def _groups():
    w = _world()
    return {
        "colour x shape": [f"a {c} {s}" for c in w.colours for s in w.shapes],
        "colour": [f"a {c} shape" for c in w.colours],
    }


TINY = PretrainCfg(model="tiny", image_size=32, minutes=0, max_steps=60, batch_size=32, lr=2e-3, warmup_steps=5,
                   pool_size=256, fresh_per_step=8, eval_frames=128, amp="none")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "tiny-clip.pt"
    lines: list[str] = []
    meta = pretrain_demo_clip(out, _render(32), _groups(), TINY, progress=False, log=lines.append,
                              data_tag="basic@32")
    return out, meta, lines


def test_loss_falls_and_json_has_accuracies(tiny_run):
    out, meta, lines = tiny_run
    assert meta["steps"] == 60 and meta["samples"] == 60 * 32
    curve = [loss for _, loss in meta["loss_curve"]]
    assert meta["final_loss"] < meta["first_loss"] - 0.5, curve
    assert curve[-1] < curve[0]
    on_disk = json.loads(out.with_name(out.name + ".json").read_text())
    assert on_disk == meta
    assert on_disk["cfg"] == {**TINY.__dict__}
    zs = on_disk["zero_shot"]
    assert set(zs) == {"colour x shape", "colour"}
    assert zs["colour x shape"]["classes"] == 12 and zs["colour x shape"]["chance"] == pytest.approx(1 / 12)
    assert zs["colour"]["classes"] == 4
    for group in zs.values():
        assert 0.0 <= group["accuracy"] <= 1.0
        assert group["frames"] + group["unlabelled"] == TINY.eval_frames
        assert group["frames"] > 0.9 * TINY.eval_frames  # every basic-world caption names a colour and a shape
    assert any(line.startswith("zero-shot colour x shape:") for line in lines)
    assert on_disk["steps_per_s"] > 0 and on_disk["seconds"]["train"] > 0


def test_checkpoint_round_trips_through_load_clip(tiny_run):
    out, meta, _ = tiny_run
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved.pop("clipcache_activation") == "gelu"  # the architecture it trained, beside the tensors
    model = load_clip("tiny", str(out))  # the normal --pretrained PATH code
    loaded = model.state_dict()
    assert set(loaded) == set(saved)
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    # trained, not the random init
    init = load_clip("tiny", None, seed=TINY.seed).state_dict()
    assert not torch.equal(init["visual.conv1.weight"], loaded["visual.conv1.weight"])
    assert meta["logit_scale"] == pytest.approx(float(loaded["logit_scale"].exp()), rel=1e-6)
    assert not list(out.parent.glob(".*.tmp"))


def test_same_cfg_reuses_without_training(tiny_run):
    out, meta, _ = tiny_run
    meta_path = out.with_name(out.name + ".json")
    before = (out.stat().st_mtime_ns, meta_path.stat().st_mtime_ns)

    def no_render(rng):
        raise AssertionError("reuse must not render or train")

    lines: list[str] = []
    again = pretrain_demo_clip(out, no_render, _groups(), TINY, progress=False, log=lines.append, data_tag="basic@32")
    assert again == meta
    assert (out.stat().st_mtime_ns, meta_path.stat().st_mtime_ns) == before
    assert any("reused" in line for line in lines)


def test_new_eval_groups_reevaluate_without_retraining(tiny_run, tmp_path):
    out, meta, _ = tiny_run
    copy = tmp_path / out.name
    copy.write_bytes(out.read_bytes())
    copy.with_name(copy.name + ".json").write_text(out.with_name(out.name + ".json").read_text())
    mtime = copy.stat().st_mtime_ns
    shapes = {"shape": [f"a {s}" for s in _world().shapes]}
    again = pretrain_demo_clip(copy, _render(32), shapes, TINY, progress=False, log=lambda s: None,
                               data_tag="basic@32")
    assert copy.stat().st_mtime_ns == mtime
    assert again["steps"] == meta["steps"] and again["weights_sha256"] == meta["weights_sha256"]
    assert set(again["zero_shot"]) == {"shape"} and again["zero_shot"]["shape"]["classes"] == 3


def test_changed_cfg_or_damaged_checkpoint_retrains(tmp_path):
    cfg = PretrainCfg(**{**TINY.__dict__, "max_steps": 3, "warmup_steps": 1, "eval_frames": 16})
    out = tmp_path / "m.pt"
    first = pretrain_demo_clip(out, _render(32), None, cfg, progress=False, log=lambda s: None)
    assert first["steps"] == 3 and first["zero_shot"] == {}
    # the pool holds no more than a step budget draws (3 x 32), then 8 fresh frames a step
    assert first["frames_rendered"] == 3 * 32 + 2 * 8
    other = PretrainCfg(**{**cfg.__dict__, "max_steps": 4})
    assert pretrain_demo_clip(out, _render(32), None, other, progress=False, log=lambda s: None)["steps"] == 4
    out.write_bytes(out.read_bytes()[:-10])  # truncated: the sha256 no longer matches
    lines: list[str] = []
    pretrain_demo_clip(out, _render(32), None, other, progress=False, log=lines.append)
    assert not any("reused" in line for line in lines)
    load_clip("tiny", str(out))
    # a pinned thread count is part of what a model is: pinned runs reuse only their own
    pinned: list[str] = []
    pretrain_demo_clip(out, _render(32), None, other, progress=False, log=pinned.append, threads=1)
    assert not any("reused" in line for line in pinned)
    again: list[str] = []
    pretrain_demo_clip(out, _render(32), None, other, progress=False, log=again.append, threads=1)
    assert any("reused" in line for line in again)


def test_caption_labels():
    prompts = ["a red circle", "a red square", "a blue circle"]
    caps = ["a small red circle on the left", "a large blue circle at the top", "a large green circle", "a red square"]
    assert caption_labels(prompts, caps).tolist() == [0, 2, -1, 1]
    # the most specific prompt wins; equally specific matches are left out
    where = ["on the left", "at the top", "at the top left"]
    assert caption_labels(where, ["a red circle at the top left", "a red circle on the left"]).tolist() == [2, 0]
    assert caption_labels(["red", "circle"], ["a red circle"]).tolist() == [-1]
    with pytest.raises(ConfigError):
        caption_labels(["a red circle", "a red circle"], caps)


def test_thread_choice_follows_the_step_times():
    """threads="auto": keep the faster count; when other jobs slow the multi-thread steps, re-time."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        lines: list[str] = []
        chooser = _ThreadChooser(2, lines.append)
        cost = {2: 0.3, 1: 0.5}
        for step in range(7):  # step 0 is never timed; 1..6 alternate 2 and 1 threads
            chooser.before(step)
            chooser.after(step, cost[torch.get_num_threads()])
        assert torch.get_num_threads() == 2 and len(lines) == 1
        cost = {2: 3.0, 1: 0.6}  # the machine got busy: two threads now stall each other
        for step in range(7, 20):
            chooser.before(step)
            chooser.after(step, cost[torch.get_num_threads()])
        assert torch.get_num_threads() == 1
        assert any("timing threads again" in line for line in lines)
    finally:
        torch.set_num_threads(old)


def test_bad_cfg_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="budget"):
        pretrain_demo_clip(tmp_path / "x.pt", _render(32), None, PretrainCfg(model="tiny", image_size=32, minutes=0))
    with pytest.raises(ConfigError, match="input size"):
        pretrain_demo_clip(tmp_path / "x.pt", _render(32), None,
                           PretrainCfg(model="tiny", image_size=64, max_steps=1, minutes=0), log=lambda s: None)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_demo_clip_learns_colour_and_shape_words(tmp_path):
    """The shipped demo architecture, 250 steps of batch 64 (1.5-3 min on one thread): zero-shot
    colour x shape accuracy on held-out frames clearly above chance (1/12)."""
    cfg = PretrainCfg(model="demo", image_size=64, minutes=0, max_steps=250, batch_size=64, warmup_steps=25,
                      pool_size=2048, eval_frames=512)
    meta = pretrain_demo_clip(tmp_path / "demo.pt", _render(64), _groups(), cfg, progress=False, log=lambda s: None)
    acc = meta["zero_shot"]["colour x shape"]["accuracy"]
    assert acc > 3 * (1 / 12), meta["zero_shot"]
    assert meta["zero_shot"]["colour"]["accuracy"] > 0.6
    assert meta["final_loss"] < meta["first_loss"] - 1.0


_PINNED_CHILD = """
import hashlib, os, sys
from pathlib import Path
if sys.argv[2] == "one-core":
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
from pipeline.demo_data import render_frame_with_caption
from pipeline.demo_run import PRETRAIN_BATCH, PRETRAIN_THREADS
from stages.pretrain_demo import PretrainCfg, pretrain_demo_clip
cfg = PretrainCfg(model="demo", minutes=0, max_steps=3, batch_size=PRETRAIN_BATCH, warmup_steps=1, eval_frames=16)
meta = pretrain_demo_clip(Path(sys.argv[1]), lambda rng: render_frame_with_caption(rng, cfg.image_size, "rich"),
                          None, cfg, progress=False, log=lambda s: None, threads=PRETRAIN_THREADS)
import torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
state = state.get("state_dict", state)
digest = hashlib.sha256()
for name in sorted(k for k, v in state.items() if torch.is_tensor(v)):
    digest.update(name.encode() + state[name].contiguous().numpy().tobytes())
print(meta["threads"], digest.hexdigest())  # the file's own sha256 also hashes its temporary name
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity") or len(__import__("os").sched_getaffinity(0)) < 2,
                    reason="needs two cores to confine one run to one of them")
def test_demo_pretraining_threads_give_the_same_weights_on_one_core_or_two(tmp_path):
    """`make demo` pretrains on a fixed 2 threads (with OMP_WAIT_POLICY=PASSIVE): the demo model's
    weights, and so the table, must not depend on how many cores those threads get."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    got = {}
    for cores in ("all", "one-core"):
        out = subprocess.run([sys.executable, "-c", _PINNED_CHILD, str(tmp_path / f"{cores}.pt"), cores], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        got[cores] = out.stdout.split()[-2:]
    assert got["all"][0] == "2", got
    assert got["all"] == got["one-core"]
