"""The measured view-bank defaults reach the user: `extract --for-head H` adds the head's
`--train-aug` (stages/heads/needs.py VIEW_BANK_DEFAULTS) unless the user chose otherwise, and says
so; the rebuilding command of a cache without a bank names no bank options."""

from __future__ import annotations

import pytest

from conftest import run_cli
from stages.heads.needs import VIEW_BANK_DEFAULTS, recommended_train_aug, recommended_view_bank


def _dry(demo_small, *extra):
    proc = run_cli("extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "small", "--layers",
                   "last1", "--dry-run", *extra)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_for_head_applies_the_measured_view_bank(demo_small):
    K = VIEW_BANK_DEFAULTS["side4video"]
    out = _dry(demo_small, "--for-head", "side4video")
    assert f"view bank --train-aug {K} (the heads' measured default" in out
    assert f"views  train: a bank of {K} augmented view(s) per video" in out  # the plan holds it
    both = _dry(demo_small, "--for-head", "evl,side4video", "--protocol", "none")
    assert f"view bank --train-aug {K}" in both


@pytest.mark.parametrize("extra", [("--for-head", "evl"), ("--for-head", "side4video", "--no-view-bank"),
                                   ("--for-head", "side4video", "--train-views", "2x1"), ()])
def test_no_view_bank_where_none_is_measured_best_or_the_user_says_so(demo_small, extra):
    out = _dry(demo_small, *extra)
    assert "view bank" not in out and "augmented view" not in out


def test_the_users_train_aug_wins(demo_small):
    out = _dry(demo_small, "--for-head", "side4video", "--train-aug", "2")
    assert "view bank --train-aug 2" in out and "measured default" not in out
    assert "a bank of 2 augmented view(s)" in out


def test_recommendation_for_several_heads():
    assert recommended_train_aug("evl") is None and recommended_view_bank(["evl"]) is None
    assert recommended_view_bank(["evl", "side4video"]) == VIEW_BANK_DEFAULTS["side4video"]
    assert recommended_view_bank([]) is None


def test_extract_command_names_bank_options_only_with_a_bank():
    from cache.meta import extract_command

    meta = {"dataset": {"name": "demo", "args": {"data_root": "/d"}},
            "config": {"model": "tiny", "train_aug": None, "aug_seed": 0, "aug_area": 0.4, "frames": 8}}
    plain = extract_command(meta)
    assert "--aug-seed" not in plain and "--aug-area" not in plain and "--train-aug" not in plain
    assert plain == "pipeline extract --dataset demo --data-root /d --model tiny --frames 8"
    meta["config"]["train_aug"] = 2
    assert "--train-aug 2 --aug-seed 0 --aug-area 0.4" in extract_command(meta)
