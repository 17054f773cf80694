"""compare-init: the Text4Vis classifier-init ablation on a real (tiny) cache, in-process and via the CLI."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch

from cache.errors import ConfigError
from cache.store import open_store
from conftest import demo_args, run_cli
from pipeline.compare_init import compare_init, run_name
from stages.classifiers import classifier_matrix
from stages.data.zarr_split import select_videos
from stages.train import build_head

HEAD = {"layers": 1, "pos_rows": 8}
GRID = dict(head="text4vis", inits=("clip_text", "orthogonal"), seeds=(0, 1), shots=(0, 1), frozen=(True, False),
            epochs=2, head_overrides=HEAD, corr_classes=20)


@pytest.fixture(scope="module")
def cache(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("ci_cache") / "cache"
    run_cli(*demo_args(demo_small, out), check=True)
    return out


@pytest.fixture(scope="module")
def ablation(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ci_out") / "ablation"
    lines: list[str] = []
    res = compare_init(cache, out_dir=out, log=lines.append, **GRID)
    return res, out, lines


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_row_per_run_and_summary_is_mean_and_std_over_seeds(ablation):
    res, out, lines = ablation
    rows = _read_csv(out / "results.csv")
    assert len(rows) == 2 * 2 * 2 * 2 == len(lines)
    keys = {(r["init"], r["seed"], r["shots"], r["classifier"]) for r in rows}
    assert len(keys) == 16
    for r in rows:
        assert (out / r["run_dir"] / "metrics.json").exists()
        assert r["run_dir"] == f"runs/{run_name(r['init'], int(r['seed']), int(r['shots']), r['classifier'] == 'frozen')}"
        assert int(r["train_videos"]) == (12 if r["shots"] == "0" else 4)
        assert int(r["eval_videos"]) == 8
    summary = _read_csv(out / "summary.csv")
    assert len(summary) == 8
    for s in summary:
        group = [float(r["top1"]) for r in rows
                 if (r["init"], r["shots"], r["classifier"]) == (s["init"], s["shots"], s["classifier"])]
        assert int(s["n"]) == len(group) == 2
        assert float(s["top1_mean"]) == pytest.approx(np.mean(group), abs=1e-3)
        assert float(s["top1_std"]) == pytest.approx(np.std(group, ddof=1), abs=1e-3)
        for m in ("top5", "mean_class"):
            assert f"{m}_mean" in s and f"{m}_std" in s
    md = (out / "summary.md").read_text()
    assert md.count("| clip_text |") >= 4 and md.count("| orthogonal |") >= 4
    for name in ("curves.png", "correlation_clip_text.png", "correlation_orthogonal.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["files"]) >= {"results", "summary_csv", "summary_md", "curves", "correlation_orthogonal"}


def test_paper_table_has_rows_init_columns_shots_and_a_block_per_w(ablation):
    """table.csv / table.md: Text4Vis's Table 4 shape, each cell the summary's mean ± std over seeds."""
    res, out, _ = ablation
    summary = {(s["init"], int(s["shots"]), s["classifier"]): s for s in _read_csv(out / "summary.csv")}
    table = _read_csv(out / "table.csv")
    assert [(r["W"], r["init"]) for r in table] == [(w, i) for w in ("frozen", "tuned") for i in GRID["inits"]]
    assert list(table[0])[2:6] == ["1_mean", "1_std", "all_mean", "all_std"]  # 1 shot first, all data last
    for r in table:
        for k, label in ((1, "1"), (0, "all")):
            s = summary[(r["init"], k, r["W"])]
            assert float(r[f"{label}_mean"]) == pytest.approx(float(s["top1_mean"]), abs=1e-3)
            assert float(r[f"{label}_std"]) == pytest.approx(float(s["top1_std"]), abs=1e-3)
    md = (out / "table.md").read_text().splitlines()
    assert md.count("| W init | 1 shot | all |") == 2 and "W frozen:" in md and "W tuned:" in md
    frozen_text = md[md.index("W frozen:") + 4]
    s = summary[("clip_text", 1, "frozen")]
    assert frozen_text.startswith("| clip_text | ")
    assert f"{float(s['top1_mean']):.1f} ± {float(s['top1_std']):.1f}" == frozen_text.split(" | ")[1]


def test_orthogonal_w_is_uncorrelated_and_text_w_is_not(ablation, cache):
    res, _, _ = ablation
    ortho, text = res["correlation"]["orthogonal"]["matrix"], res["correlation"]["clip_text"]["matrix"]
    assert ortho.shape == text.shape == (4, 4)
    np.testing.assert_allclose(ortho, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(np.diag(text), 1.0, atol=1e-5)
    assert np.abs(text[~np.eye(4, dtype=bool)]).max() > 0.1
    assert res["correlation"]["clip_text"]["classes"] == open_store(cache).meta["dataset"]["classes"]


def test_frozen_runs_keep_w_as_initialised_and_tuned_runs_move_it(ablation, cache):
    _, out, _ = ablation
    store = open_store(cache)
    head = build_head("text4vis", store, {**HEAD, "trainable_classifier": False}, num_classes=4)
    for init in GRID["inits"]:
        for seed in GRID["seeds"]:
            for k in GRID["shots"]:
                w0 = classifier_matrix(init, store, head, None, select_videos(store, "train", shots=k, seed=seed),
                                       seed=seed)
                frozen = torch.load(out / "runs" / run_name(init, seed, k, True) / "last.pt", weights_only=True)
                tuned = torch.load(out / "runs" / run_name(init, seed, k, False) / "last.pt", weights_only=True)
                assert torch.equal(frozen["head"]["classifier"], w0)
                assert not torch.allclose(tuned["head"]["classifier"], w0)


def test_rerun_reuses_finished_runs_and_a_wider_grid_trains_only_new_ones(ablation, cache, tmp_path):
    res, out, _ = ablation
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*") if p.suffix in (".json", ".pt")}
    lines: list[str] = []
    again = compare_init(cache, out_dir=out, log=lines.append, **GRID)
    assert all(r["reused"] for r in again["results"]) and all("(reused)" in ln for ln in lines)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert [r["top1"] for r in again["results"]] == [r["top1"] for r in res["results"]]

    wider = tmp_path / "wider"
    shutil.copytree(out, wider)
    grid = {**GRID, "inits": ("orthogonal",), "seeds": (0, 1, 2), "shots": (0,), "frozen": (True,)}
    more = compare_init(cache, out_dir=wider, log=lambda *_: None, **grid)
    assert [(r["seed"], r["reused"]) for r in more["results"]] == [(0, True), (1, True), (2, False)]


def test_default_folder_hash_covers_run_settings_not_the_grid(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPCACHE_ROOT", str(tmp_path))
    one = dict(head="text4vis", inits=("orthogonal",), seeds=(0,), shots=(1,), frozen=(True,), corr_classes=0,
               log=lambda *_: None)
    a = compare_init(cache, epochs=1, head_overrides={"layers": 1, "pos_rows": 8}, **one)
    b = compare_init(cache, epochs=1, head_overrides={"layers": "1", "pos_rows": "8"},
                     **{**one, "inits": ("clip_text",)})
    c = compare_init(cache, epochs=2, head_overrides={"layers": 1, "pos_rows": 8}, **one)
    assert a["out_dir"] == b["out_dir"] != c["out_dir"]
    assert a["out_dir"].parent == tmp_path / "compare-init" and a["out_dir"].name.startswith("cache-")
    assert not any(a["out_dir"].glob("correlation_*.png"))


def test_same_out_dir_with_other_settings_trains_again(cache, tmp_path):
    one = dict(head="text4vis", inits=("orthogonal",), seeds=(0,), shots=(1,), frozen=(True,), corr_classes=0,
               head_overrides=HEAD, out_dir=tmp_path / "x", log=lambda *_: None)
    first = compare_init(cache, epochs=1, **one)
    second = compare_init(cache, epochs=2, **one)
    assert not second["results"][0]["reused"] and second["results"][0]["epochs"] == 2
    assert len(first["results"]) == len(second["results"]) == 1
    assert compare_init(cache, epochs=2, **one)["results"][0]["reused"]


@pytest.mark.parametrize("args, message", [
    (["--head", "tap"], "compare-init works with: actionclip, text4vis"),
    (["--shots", "0,4"], "--shots 4: class 0 has only 3 usable videos"),
])
def test_cli_user_errors_are_one_line_exit_2(cache, tmp_path, args, message):
    proc = run_cli("compare-init", "--cache", cache, "--out", tmp_path / "out", "--epochs", "1", "--no-progress", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_unknown_init_or_grid_option_in_overrides_is_a_config_error_before_any_run(cache, tmp_path):
    with pytest.raises(ConfigError, match="unknown classifier init 'bogus'"):
        compare_init(cache, inits=("clip_text", "bogus"), out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="use --seeds"):
        compare_init(cache, train_overrides={"seed": 3}, out_dir=tmp_path / "b")
    assert not any(tmp_path.iterdir())


def test_cli_prints_table_and_files(cache, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("compare-init", "--cache", cache, "--out", out, "--inits", "orthogonal,minilm", "--seeds", "0",
                   "--shots", "1", "--frozen", "frozen", "--epochs", "1", "--set", "layers=1", "--set", "pos_rows=8",
                   "--corr-classes", "3", "--no-progress", check=True)
    assert "orthogonal" in proc.stdout and "minilm" in proc.stdout and "top-1" in proc.stdout
    assert "W frozen: top-1 (%)" in proc.stdout and "1 shot" in proc.stdout and "mean ± std over seeds 0" in proc.stdout
    for name in ("results.csv", "summary.csv", "summary.md", "table.csv", "table.md", "curves.png",
                 "correlation_minilm.png"):
        assert str(out / name) in proc.stdout and (out / name).exists()
    assert len(_read_csv(out / "results.csv")) == 2


def test_cli_resolves_recipe_config_and_set_as_train_does(cache, tmp_path):
    """compare-init's runs resolve as `pipeline train`'s (issue 21 item 5): recipe < --config < --set <
    flags; a run's config.yaml serves as the file, its seed / shots / init left to the grid."""
    import dataclasses
    import json

    from stages.config import load_experiment
    from stages.train import resolve_train

    exp = tmp_path / "exp.yaml"
    exp.write_text("head:\n  name: text4vis\n  layers: 1\n  pos_rows: 8\nrecipe: quick\n"
                   "train:\n  lr: 0.002\n  weight_decay: 0.1\n  seed: 7\n  shots: 3\n  epochs: 3\n")
    out = tmp_path / "out"
    proc = run_cli("compare-init", "--cache", cache, "--config", exp, "--out", out, "--inits", "orthogonal",
                   "--seeds", "0", "--shots", "1", "--frozen", "frozen", "--set", "weight_decay=0.2", "--epochs", "1",
                   "--corr-classes", "0", "--no-progress", check=True)
    assert "recipe quick for text4vis" in proc.stdout
    saved = json.loads((out / "runs" / run_name("orthogonal", 0, 1, True) / "config.json").read_text())
    train = saved["train"]
    assert (train["recipe"], train["lr"], train["weight_decay"], train["epochs"]) == ("quick", 0.002, 0.2, 1)
    assert (train["seed"], train["shots"], train["classifier_init"]) == (0, 1, "orthogonal")  # the grid's
    assert (saved["head"]["layers"], saved["head"]["pos_rows"]) == (1, 8)
    assert saved["sources"]["train"]["lr"] == "file" and saved["sources"]["train"]["weight_decay"] == "you"
    # `pipeline train` with the same file, --set and flag resolves to the same options
    file = {k: v for k, v in load_experiment(exp).items() if k not in ("head.name", "recipe")}
    same = resolve_train("text4vis", "quick", file=file, sets=["weight_decay=0.2"], flags={"epochs": 1}, cache=cache)
    grid = {"seed": 0, "shots": 1, "classifier_init": "orthogonal"}
    assert json.loads(json.dumps({**dataclasses.asdict(same.cfg), **grid})) == train
    # the run's config.yaml as the file runs the same settings again: reused
    again = run_cli("compare-init", "--cache", cache, "--config", out / "runs" / run_name("orthogonal", 0, 1, True)
                    / "config.yaml", "--out", out, "--inits", "orthogonal", "--seeds", "0", "--shots", "1", "--frozen",
                    "frozen", "--corr-classes", "0", "--no-progress", check=True)
    assert "(reused)" in again.stdout


def test_jobs_trains_the_grid_in_processes_with_the_same_results(ablation, cache, tmp_path):
    """--jobs 2: the unfinished runs in two spawned processes (one thread each on this box); every
    run's metrics and loss curve equal the in-process grid's (the fixture ran it on one thread)."""
    import json

    res, out, _ = ablation
    grid = {**GRID, "inits": ("clip_text",), "frozen": (True,)}  # 4 runs of the fixture's grid
    lines: list[str] = []
    par = compare_init(cache, out_dir=tmp_path / "par", log=lines.append, jobs=2, **grid)
    assert any("4 runs in 2 processes" in ln for ln in lines)
    assert not any(r["reused"] for r in par["results"])
    for r in par["results"]:
        name = run_name(r["init"], r["seed"], r["shots"], r["classifier"] == "frozen")
        ours = json.loads((tmp_path / "par" / "runs" / name / "metrics.json").read_text())
        theirs = json.loads((out / "runs" / name / "metrics.json").read_text())
        assert ours["final"] == theirs["final"]
        assert [h["train_loss"] for h in ours["history"]] == [h["train_loss"] for h in theirs["history"]]
