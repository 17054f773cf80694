"""A head's paper facts live with the head: registered from this test module (one file), its paper
recipe, test protocol, view bank and published results are what stage two, stage one and
`pipeline runs` find. And the paper-figure lookup: the paper's top-1 beside a run whose setting
matches a published one, nothing beside a run whose setting does not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from cache.errors import ConfigError
from cache.store import open_store
from conftest import cli_in_process
from frame_mean_head import TINY, FrameMeanCfg, FrameMeanHead
from stages.heads import get_head_entry, register_head
from stages.heads.facts import PaperRecipe, Protocol, PublishedResult

NAME = "test_paper_head"
RECIPE = PaperRecipe("Test paper (demo, tiny): AdamW lr 2e-3, weight decay 0.1 on all parameters, 7 epochs, "
                     "2 warm-up, batch 64",
                     {"epochs": 7, "global_batch": 64, "lr": 2e-3, "weight_decay": 0.1, "decay_all": True,
                      "beta1": 0.9, "beta2": 0.99, "warmup_epochs": 2.0, "label_smoothing": 0.05}, 64,
                     cuda={"amp": "bf16"}, note="a test head's paper")
PROTOCOL = Protocol(NAME, 6, "segment-start", 8, "2x3", 1.0, "embeddings", paper="6 frames, 2 clips x 3 crops")
# the setting the demo cache below is made in (the tiny CLIP, random weights, 8 segment frames, 1x1 views)
SEEN = PublishedResult(dataset="demo", backbone="clipcache-tiny", frames=8, views="1x1", top1=61.5, top5=90.4,
                       source="Test paper, Table 2", pretrained="")


@register_head(NAME, FrameMeanCfg, tiny=TINY, paper_recipe=RECIPE, protocol=PROTOCOL, view_bank=3,
               published=(SEEN, dataclasses.replace(SEEN, frames=16, top1=70.0, source="Test paper, Table 3")))
class PaperHead(FrameMeanHead):
    """Frame mean -> linear: the facts in its decorator are all the pipeline learns about its paper."""


def test_stage_two_finds_the_paper_recipe_registered_here():
    from stages.recipes import resolve_recipe, stage_two_recipe

    rec = stage_two_recipe(NAME, "paper")
    assert rec.name == "paper" and rec.source == RECIPE.source and rec.note == "a test head's paper"
    assert rec.values == {"batch_size": 32, **RECIPE.values} and rec.ref_batch == 64
    assert stage_two_recipe(NAME, "paper", cuda=True).values["amp"] == "bf16"
    assert "amp" not in rec.values
    values, lines = resolve_recipe(rec, {"global_batch": 128}, {})
    assert values["lr"] == pytest.approx(4e-3) and "lr scaled linearly" in "\n".join(lines)
    assert stage_two_recipe(NAME, "quick").values["lr"] == 1e-3  # quick stays the generic preset


def test_stage_one_finds_the_protocol_registered_here():
    from stages.recipes import PROTOCOLS, get_protocol, protocol_for_heads, resolve_protocol

    assert get_protocol(NAME) is PROTOCOL and NAME in PROTOCOLS
    assert protocol_for_heads([NAME, "tap"]) == NAME
    with pytest.raises(ConfigError, match=f"{NAME}: 6 frames segment-start, 2x3 views"):
        protocol_for_heads([NAME, "evl"])  # other frames than EVL's: one cache cannot hold both
    values, record, _ = resolve_protocol(NAME, {}, {})
    assert values == {"frames": 6, "sampling": "segment-start", "stride": 8, "views": "2x3", "resize_ratio": 1.0}
    assert record["name"] == NAME and record["eval_average"] == "embeddings" and record["overridden"] == []


def test_the_view_bank_default_is_the_heads_own():
    from stages.heads.needs import VIEW_BANK_DEFAULTS, recommended_train_aug, recommended_view_bank

    assert recommended_train_aug(NAME) == 3 and recommended_view_bank(["side4video", NAME]) == 3
    assert recommended_train_aug("no_such_head") is None
    assert NAME not in VIEW_BANK_DEFAULTS  # the shipped heads' mapping


def test_the_shipped_heads_register_their_papers_facts_in_their_own_files():
    for name in ("evl", "side4video", "text4vis", "actionclip"):
        entry = get_head_entry(name)
        assert entry.paper_recipe is not None and entry.protocol is not None and entry.protocol.name == name
        assert entry.head_cls.__module__ == f"stages.heads.{name}"
    assert get_head_entry("side4video").view_bank is None and get_head_entry("evl").view_bank is None
    assert get_head_entry("tap").paper_recipe is None and get_head_entry("tap").protocol is None


# ----------------------------------------------------------------------------- the paper's figure
def _table():
    from pipeline.runs_table import published_table

    return published_table([get_head_entry(NAME)])


def test_the_lookup_table_is_built_from_the_registered_results():
    table = _table()
    assert [r["top1"] for r in table["results"][NAME]] == [61.5, 70.0]
    assert table["results"][NAME][0]["source"] == "Test paper, Table 2" and table["openai_weights"] == {}


def test_openai_weights_match_by_tag_or_by_the_checkpoint_files_digest():
    from open_clip.pretrained import get_pretrained_cfg

    from pipeline.runs_table import published_table, setting_matches

    @dataclass
    class Entry:  # a head entry's two fields published_table reads
        name: str
        published: tuple

    result = PublishedResult(dataset="k400", backbone="ViT-B-16", frames=8, views="3x1", top1=1.0, source="t",
                             sampling="dense", stride=16)
    table = published_table([Entry("evl", (result,))])
    digest = get_pretrained_cfg("ViT-B-16", "openai")["url"].split("/")[-2]
    assert table["openai_weights"] == {"ViT-B-16": f"sha256:{digest}"}
    r = {**table["results"]["evl"][0], "head": "evl"}
    setting = {"stage": "train", "head": "evl", "dataset": "k400", "backbone": "ViT-B-16", "pretrained": "openai",
               "weights": "tag:openai", "frames": 8, "sampling": "dense", "stride": 16, "views": "3x1",
               "eval_split": "val", "shots": 0, "whole": True}
    weights = table["openai_weights"]
    assert setting_matches(r, setting, weights)
    local = {**setting, "pretrained": "/models/ViT-B-16.pt", "weights": f"sha256:{digest}"}
    assert setting_matches(r, local, weights) and setting_matches(r, {**local, "backbone": "ViT-B-16-quickgelu"}, weights)
    for other in ({"weights": "sha256:" + "0" * 64}, {"backbone": "ViT-B-32"}, {"stride": 8}, {"views": "4x3"},
                  {"sampling": "segment"}, {"frames": 16}, {"dataset": "ssv2"}, {"shots": 4}, {"whole": False},
                  {"eval_split": "train"}, {"stage": "finetune"}):
        assert not setting_matches(r, {**local, **other}, weights), other
    assert not setting_matches(r, {**setting, "pretrained": "laion2b_s34b_b88k", "weights": "tag:laion2b_s34b_b88k"},
                               weights)


@pytest.fixture(scope="module")
def runs(demo_small, tmp_path_factory):
    """demo_small through the tiny CLIP (this process), and two runs of the head above: all classes,
    and a 1-shot run (not the published setting)."""
    from pipeline.datasets import load_dataset
    from stages.extract import ExtractCfg, plan_extraction, run_extraction
    from stages.train import TrainCfg, train_head

    base = tmp_path_factory.mktemp("facts")
    threads = torch.get_num_threads()
    try:
        plan = plan_extraction(load_dataset("demo", data_root=demo_small.root),
                               ExtractCfg(model="tiny", workers=0, text="clip_single"), out=base / "cache")
        run_extraction(plan, shard=(0, 1), progress=False, log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(threads)
    store = open_store(base / "cache")
    for name, shots in (("whole", 0), ("oneshot", 1)):
        train_head(store, TrainCfg(head=NAME, epochs=1, batch_size=4, shots=shots), run_dir=base / "runs" / name,
                   progress=False, log=lambda *a, **k: None)
    return base / "runs"


def test_the_papers_top1_beside_a_matching_run_and_nothing_beside_others(runs, monkeypatch, capsys):
    import pipeline.runs_table as runs_table
    from stages.runs import read_run

    whole, oneshot = read_run(runs / "whole"), read_run(runs / "oneshot")
    table = _table()
    setting = runs_table.run_setting(whole)
    assert {k: setting[k] for k in ("dataset", "backbone", "frames", "sampling", "views", "shots")} == \
        {"dataset": "demo", "backbone": "clipcache-tiny", "frames": 8, "sampling": "segment", "views": "1x1", "shots": 0}
    paper = runs_table.paper_result(whole, table)
    assert paper is not None and paper["top1"] == 61.5 and paper["source"] == "Test paper, Table 2"
    assert runs_table.paper_result(oneshot, table) is None  # trained on 1 video per class: not the paper's setting
    other = {**table, "results": {NAME: [r for r in table["results"][NAME] if r["frames"] == 16]}}
    assert runs_table.paper_result(whole, other) is None  # the paper's 16 frames, the cache's 8
    assert runs_table.paper_result(whole) is None  # the shipped table holds no result of a test head

    # `runs ls` and `runs show` print it from the lookup they are given
    monkeypatch.setattr(runs_table, "published_results", lambda: table)
    code, out, _ = cli_in_process(capsys, "runs", "ls", "--root", runs, "--format", "csv")
    assert code == 0
    import csv
    import io

    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(out))}
    assert rows["whole"]["paper_top1"] == "61.5" and rows["oneshot"]["paper_top1"] == ""
    code, out, _ = cli_in_process(capsys, "runs", "show", "whole", "--root", runs)
    assert code == 0 and "paper     top1 61.5%  top5 90.4%  (Test paper, Table 2: demo, clipcache-tiny" in out
    code, out, _ = cli_in_process(capsys, "runs", "show", "oneshot", "--root", runs)
    assert code == 0 and "paper " not in out


# ----------------------------------------------------------------------------- the shipped figures
SHIPPED = ("evl", "side4video", "text4vis", "actionclip")


def _evl_b16_8(**changes) -> dict:
    """A run's setting (``run_setting``'s form) as EVL's ViT-B/16 8-frame row was measured in, changed."""
    setting = {"stage": "train", "head": "evl", "dataset": "k400", "backbone": "ViT-B-16", "pretrained": "openai",
               "weights": "tag:openai", "frames": 8, "sampling": "dense", "stride": 16, "views": "3x1",
               "eval_split": "val", "shots": 0, "whole": True}
    return {**setting, **changes}


def _shipped_top1(setting: dict) -> list[float]:
    """The top-1 of every shipped result (pipeline/option_defaults.json) whose setting is ``setting``."""
    from pipeline.runs_table import published_results, setting_matches

    table = published_results()
    return [r["top1"] for r in table["results"].get(setting["head"], [])
            if setting_matches({**r, "head": setting["head"]}, setting, table["openai_weights"])]


def test_a_shipped_figure_is_found_for_its_setting_and_not_for_another():
    assert _shipped_top1(_evl_b16_8()) == [82.9]
    assert _shipped_top1(_evl_b16_8(frames=16)) == []  # EVL's 16-frame row was tested at 1 clip x 3 crops
    assert _shipped_top1(_evl_b16_8(frames=16, views="1x3")) == [83.6]
    assert _shipped_top1(_evl_b16_8(frames=32, stride=8, views="1x3")) == [84.2]
    assert _shipped_top1(_evl_b16_8(backbone="ViT-L-14-quickgelu")) == [86.3]
    for other in ({"stride": 8}, {"sampling": "segment"}, {"views": "1x1"}, {"backbone": "ViT-B-32"},
                  {"dataset": "ssv2"}, {"pretrained": "laion2b_s34b_b88k", "weights": "tag:laion2b_s34b_b88k"},
                  {"stage": "finetune"}):
        assert _shipped_top1(_evl_b16_8(**other)) == [], other
    # the 336px row is left out: no file says its test views
    assert _shipped_top1(_evl_b16_8(backbone="ViT-L-14-336", frames=32, stride=8, views="1x3")) == []
    side = _evl_b16_8(head="side4video", sampling="segment-start", stride=8, views="4x3")
    assert _shipped_top1(side) == [83.6] and _shipped_top1({**side, "views": "1x1"}) == []
    # Text4Vis and ActionCLIP published end-to-end results: stage three's, never a head over frozen features
    t4v = {**side, "head": "text4vis"}
    assert _shipped_top1(t4v) == [] and _shipped_top1({**t4v, "stage": "finetune"}) == [82.9]


def test_a_stage_three_run_finds_its_paradigms_figure():
    """Stage three's setting comes from the run's config.json alone: its paradigm is the head the
    figures are registered on."""
    from pathlib import Path

    from pipeline.runs_table import paper_result
    from stages.runs import RunRecord

    def run(paradigm: str, **finetune) -> RunRecord:
        ft = {"paradigm": paradigm, "model": "ViT-B-16", "frames": 8, "sampling": "segment", "stride": 8,
              "views": "1x1", "eval_split": "val", **finetune}
        config = {"stage": "finetune", "finetune": ft, "dataset": {"name": "k400"},
                  "backbone": {"arch": ft["model"], "pretrained": "openai", "weights": "tag:openai"}}
        return RunRecord(Path(paradigm), config, None, {}, "done")

    paper = paper_result(run("actionclip"))
    assert paper is not None and (paper["top1"], paper["top5"]) == (81.09, 95.49)
    assert "sallymmx/ActionCLIP README.md" in paper["source"]
    assert paper_result(run("actionclip", frames=32))["top1"] == 82.32
    assert paper_result(run("actionclip", views="4x3")) is None
    assert paper_result(run("text4vis")) is None  # Text4Vis tested 4 clips x 3 crops, segment-start
    t4v = paper_result(run("text4vis", sampling="segment-start", views="4x3", model="ViT-B-32", frames=16))
    assert t4v is not None and t4v["top1"] == 80.5 and t4v["top5"] is None


def test_the_shipped_results_say_settings_the_pipeline_can_run():
    from open_clip.pretrained import list_pretrained_tags_by_model

    from pipeline.datasets.core import list_datasets
    from pipeline.runs_table import published_results
    from stages.finetune import PARADIGMS
    from stages.video import SAMPLING_MODES, parse_views

    table = published_results()
    assert sorted(table["results"]) == sorted(SHIPPED)
    for head in SHIPPED:
        for r in get_head_entry(head).published:
            assert r.stage in ("train", "finetune") and r.sampling in SAMPLING_MODES, r
            assert r.dataset in list_datasets() and r.shots == 0 and r.source, r
            parse_views(r.views)
            assert r.sampling != "dense" or r.stride >= 1, r
            assert r.stage == "train" or head in PARADIGMS, r  # stage three's lookup is by paradigm
            assert r.pretrained == "openai" and "openai" in list_pretrained_tags_by_model(r.backbone), r
            assert r.backbone in table["openai_weights"], r
        rows = [(r.stage, r.dataset, r.backbone, r.frames, r.sampling, r.stride, r.views)
                for r in get_head_entry(head).published]
        assert len(set(rows)) == len(rows), head  # one figure per setting
