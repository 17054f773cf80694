"""`pipeline runs ls --format md|latex`: the compact paper table, seeds folded into mean +- std."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from cache.store import open_store
from conftest import demo_args, run_cli
from stages.train import TrainCfg, train_head


@pytest.fixture(scope="module")
def runs(demo_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    cache = root / "cache"
    run_cli(*demo_args(demo_small, cache, "--text", "none"), check=True)
    st = open_store(cache)
    out = {}
    for name, head, over in (("s0", "tap", {"seed": 0}), ("s1", "tap", {"seed": 1}), ("s2", "tap", {"seed": 2}),
                             ("lr", "tap", {"lr": 0.01}), ("lp", "linear_probe", {})):
        cfg = TrainCfg(head=head, epochs=2, batch_size=4, lr=over.get("lr", 1e-3), seed=over.get("seed", 0))
        out[name] = train_head(st, cfg, runs_root=root / "runs", progress=False)
    # a run from before metrics.json said what data it saw: the cache's metadata says it
    lp = json.loads((root / "runs" / out["lp"]["run_dir"].split("/")[-1] / "metrics.json").read_text())
    del lp["data"]
    (root / "runs" / out["lp"]["run_dir"].split("/")[-1] / "metrics.json").write_text(json.dumps(lp))
    # an unfinished run: left out
    broken = root / "runs" / "tap-unfinished"
    shutil.copytree(out["lr"]["run_dir"], broken)
    (broken / "metrics.json").write_text(json.dumps({**out["lr"], "final": None}))
    (broken / "status.json").write_text(json.dumps({"state": "failed", "reason": "x"}))
    return root, out, st


def test_md_folds_seeds_into_mean_and_std(runs):
    root, out, st = runs
    proc = run_cli("runs", "ls", "--root", root / "runs", "--format", "md", "--sort", "run")
    assert proc.returncode == 0, proc.stderr
    assert "1 unfinished run(s) left out" in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "| head | setting | backbone | frames x views | params | top-1 | top-5 | runs |"
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert len(rows) == 3
    by = {(r[0], r[1]): r for r in rows}
    seeds = by[("tap", "batch_size=4 epochs=2")]
    tops = [out[k]["final"]["top1"] for k in ("s0", "s1", "s2")]
    top5 = [out[k]["final"]["top5"] for k in ("s0", "s1", "s2")]
    assert seeds[5] == f"{statistics.mean(tops):.1f} ± {statistics.stdev(tops):.1f} (3)"
    assert seeds[6] == f"{statistics.mean(top5):.1f} ± {statistics.stdev(top5):.1f} (3)"
    assert seeds[2] == st.info.backbone.arch and seeds[3] == f"{st.info.dims.frames}x1x1"
    n = out["s0"]["trainable_params"]
    assert n == st.info.dims.embed_dim * 4 + 4 and seeds[4] == (str(n) if n < 1000 else f"{n / 1e3:.1f}K")
    names = sorted(out[k]["run_dir"].split("/")[-1] for k in ("s0", "s1", "s2"))
    assert sorted(seeds[7].split(", ")) == names  # relative to the runs root (it lies outside the working dir)
    single = by[("tap", "batch_size=4 epochs=2 lr=0.01")]
    assert single[5] == f"{out['lr']['final']['top1']:.1f}" and "(" not in single[5]
    lp = next(r for r in rows if r[0] == "linear_probe")
    assert lp[2] == st.info.backbone.arch and lp[3] == f"{st.info.dims.frames}x1x1"  # from the cache's metadata
    assert "/tmp" not in proc.stdout


def test_latex_is_a_booktabs_tabular_with_escaped_text(runs):
    root, out, _ = runs
    proc = run_cli("runs", "ls", "--root", root / "runs", "--format", "latex")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == r"\begin{tabular}{llllrrr}" and lines[-1] == r"\end{tabular}" and r"\midrule" in lines
    body = [ln for ln in lines if ln.startswith(("tap", "linear"))]
    assert len(body) == 3 and all(ln.count(" & ") == 6 and r"\\ % " in ln for ln in body)
    assert any(ln.startswith(r"linear\_probe & ") for ln in body)
    assert any(r"$\pm$" in ln and "(3)" in ln for ln in body) and r"$\times$" in proc.stdout
    assert "batch\\_size=4" in proc.stdout
