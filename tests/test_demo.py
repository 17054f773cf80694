"""The README's main command, reduced: the whole demo end to end (slow: run with -m slow)."""

import json

import pytest


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path, capsys):
    from pipeline.demo_run import DEMO_HEADS, run_demo
    from stages.backbone import load_clip

    summary = run_demo(root=tmp_path / "art", data=tmp_path / "data", quick=True, seeds=(0,))
    out = capsys.readouterr().out
    assert "clipcache demo" in out and "zero-shot" in out
    assert set(summary["heads"]) == set(DEMO_HEADS)
    for head, res in summary["heads"].items():
        assert 0 <= res["top1"] <= 100
    saved = json.loads((tmp_path / "art" / "summary.json").read_text())
    assert saved["cache"] == summary["cache"]
    assert (tmp_path / "art" / "compare-init" / "summary.md").exists()
    # the demo CLIP is an ordinary open_clip checkpoint, loaded by the user-facing path
    model = load_clip("demo", str(tmp_path / "art" / "demo_clip.pt"))
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    # a second run reuses everything
    again = run_demo(root=tmp_path / "art", data=tmp_path / "data", quick=True, seeds=(0,))
    assert again["extract_reused"] is True
