"""A head's registered view-bank default reaches the user: `extract --for-head H` adds H's
`--train-aug K` (``register_head(..., view_bank=K)``, noted in stages/heads/needs.py) unless the user
chose otherwise, and says so; the rebuilding command of a cache without a bank names no bank
options. No shipped head registers one (bench/bench_cache_vs_online.py: the plain cache reached
the online runs with fresh paper views), so the mechanism is exercised with a head registered here.
"""

from __future__ import annotations

import pytest

from conftest import cli_in_process
from frame_mean_head import TINY, FrameMeanCfg, FrameMeanHead
from stages.heads import register_head
from stages.heads.needs import VIEW_BANK_DEFAULTS, recommended_train_aug, recommended_view_bank

BANKED = "test_banked_head"
K = 2


@register_head(BANKED, FrameMeanCfg, tiny=TINY, view_bank=K)
class BankedHead(FrameMeanHead):
    """Frame mean -> linear, with a registered view-bank default of K views."""


def _dry(capsys, demo_small, *extra):
    code, out, err = cli_in_process(capsys, "extract", "--dataset", "demo", "--data-root", demo_small.root, "--model",
                                    "small", "--layers", "last1", "--text", "none", "--dry-run", *extra)
    assert code == 0, err
    return out


def test_for_head_applies_the_registered_view_bank(capsys, demo_small):
    out = _dry(capsys, demo_small, "--for-head", BANKED)
    assert f"view bank --train-aug {K} (the heads' measured default" in out
    assert f"views  train: a bank of {K} augmented view(s) per video" in out  # the plan holds it
    both = _dry(capsys, demo_small, "--for-head", f"evl,{BANKED}", "--protocol", "none")
    assert f"view bank --train-aug {K}" in both


@pytest.mark.parametrize("extra", [("--for-head", "evl"), ("--for-head", "side4video"), ("--for-head", "text4vis"),
                                   ("--for-head", BANKED, "--no-view-bank"),
                                   ("--for-head", BANKED, "--train-views", "2x1"), ()])
def test_no_view_bank_where_none_is_registered_or_the_user_says_so(capsys, demo_small, extra):
    out = _dry(capsys, demo_small, *extra)
    assert "view bank" not in out and "augmented view" not in out


def test_the_users_train_aug_wins(capsys, demo_small):
    out = _dry(capsys, demo_small, "--for-head", BANKED, "--train-aug", "3")
    assert "view bank --train-aug 3" in out and "measured default" not in out
    assert "a bank of 3 augmented view(s)" in out


def test_recommendation_for_several_heads():
    for shipped in ("evl", "side4video", "text4vis", "actionclip"):
        assert recommended_train_aug(shipped) is None and shipped not in VIEW_BANK_DEFAULTS
    assert recommended_train_aug(BANKED) == K and BANKED not in VIEW_BANK_DEFAULTS  # a test head: not shipped
    assert recommended_view_bank(["evl", BANKED]) == K
    assert recommended_view_bank(["evl", "side4video"]) is None and recommended_view_bank([]) is None


def test_extract_command_names_bank_options_only_with_a_bank():
    from cache.meta import extract_command

    meta = {"dataset": {"name": "demo", "args": {"data_root": "/d"}},
            "config": {"model": "tiny", "train_aug": None, "aug_seed": 0, "aug_area": 0.4, "frames": 8}}
    plain = extract_command(meta)
    assert "--aug-seed" not in plain and "--aug-area" not in plain and "--train-aug" not in plain
    assert plain == "pipeline extract --dataset demo --data-root /d --model tiny --frames 8"
    meta["config"]["train_aug"] = 2
    assert "--train-aug 2 --aug-seed 0 --aug-area 0.4" in extract_command(meta)
