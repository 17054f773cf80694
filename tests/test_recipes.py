"""The papers' recipes and test protocols as presets (stages/recipes.py, SPEC section 7).

The published values are written out here again, from SPEC section 7, and compared with what the
optimisers built for each preset actually hold (parameter groups, lr per group, weight decay on
which tensors, betas), not with the preset tables themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import pytest
import torch

from cache.errors import ConfigError
from conftest import demo_args, run_cli
from stages.heads import create_head
from stages.recipes import (accumulation_steps, get_protocol, resolve_protocol, resolve_recipe, stage_three_recipe,
                            stage_two_recipe)
from stages.train import TrainCfg, build_optimizer, train_head

# SPEC section 7, per head: lr, weight decay (on every parameter), betas, epochs, warm-up, label smoothing, batch
PUBLISHED_TWO = {
    "evl": (4e-4, 0.05, (0.9, 0.999), 53, 0.0, 0.0, 256),
    "side4video": (1e-3, 0.15, (0.9, 0.999), 30, 4.0, 0.1, 256),
    "text4vis": (5e-5, 0.2, (0.9, 0.999), 30, 5.0, 0.0, 256),    # Text4Vis's head part
    "actionclip": (5e-5, 0.2, (0.9, 0.98), 50, 5.0, 0.0, 128),    # ActionCLIP's prompt part
}


def _train_cfg(head: str, recipe: str, explicit: dict | None = None) -> TrainCfg:
    defaults = {f.name: getattr(TrainCfg(), f.name) for f in dataclasses.fields(TrainCfg)}
    values, _ = resolve_recipe(stage_two_recipe(head, recipe), explicit or {}, defaults)
    return TrainCfg(**{**values, "head": head, "recipe": recipe})


def _group_of(opt) -> dict[int, dict]:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("head", sorted(PUBLISHED_TWO))
def test_stage_two_paper_optimiser_has_the_published_groups(head):
    lr, wd, betas, epochs, warmup, smoothing, batch = PUBLISHED_TWO[head]
    cfg = _train_cfg(head, "paper")
    module = create_head(head, tiny=True)
    opt = build_optimizer(module, cfg)
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = _group_of(opt)
    assert set(groups) == {id(p) for p in trainable}  # every trainable tensor, nothing else
    assert any(p.dim() < 2 for p in trainable)  # the head has biases / norms for "all parameters" to mean something
    for p in trainable:  # weight decay on every parameter, biases and norms included
        g = groups[id(p)]
        assert g["weight_decay"] == pytest.approx(wd) and g["lr"] == pytest.approx(lr) and g["betas"] == betas
    assert (cfg.epochs, cfg.warmup_epochs, cfg.label_smoothing, cfg.global_batch) == (epochs, warmup, smoothing, batch)
    assert cfg.batch_size * accumulation_steps(cfg.batch_size, cfg.global_batch) == batch  # 32 x 8 or 32 x 4


@pytest.mark.parametrize("head", ["tap", "evl"])
def test_quick_recipe_is_the_generic_one_without_decay_on_biases(head):
    cfg = _train_cfg(head, "quick")
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.warmup_epochs, cfg.global_batch) == (1e-3, 32, 10, 1.0, 0)
    module = create_head(head, tiny=True)
    groups = _group_of(build_optimizer(module, cfg))
    for p in module.parameters():
        assert groups[id(p)]["weight_decay"] == (0.05 if p.dim() >= 2 else 0.0)
    # heads without a published recipe: `paper` is quick
    assert dataclasses.replace(_train_cfg("tap", "paper"), recipe="quick") == _train_cfg("tap", "quick")


def test_lr_scaling_rule_and_accumulation_steps():
    evl = stage_two_recipe("evl")
    values, lines = resolve_recipe(evl, {"global_batch": 64}, {})
    assert values["lr"] == pytest.approx(4e-4 * 64 / 256) and any("scaled linearly" in ln for ln in lines)
    values, lines = resolve_recipe(evl, {"global_batch": 64, "lr": 3e-4}, {})
    assert values["lr"] == 3e-4 and not any("scaled linearly" in ln for ln in lines)  # an explicit lr stays
    values, _ = resolve_recipe(evl, {"batch_size": 8}, {})  # a smaller step: same global batch, same lr
    assert (values["lr"], values["global_batch"]) == (4e-4, 256)
    values, _ = resolve_recipe(stage_three_recipe("actionclip"), {"global_batch": 32}, {})
    assert values["lr"] == pytest.approx(5e-5 * 32 / 128) and values["backbone_ratio"] == 0.1
    assert accumulation_steps(32, 256, 1) == 8 and accumulation_steps(32, 256, 8) == 1
    assert accumulation_steps(48, 256, 1) == 6 and accumulation_steps(4, 0, 2) == 1


def test_side4video_defaults_to_the_released_base_network():
    b16 = {"width": 768, "num_patches": 196, "depth": 12, "image_size": 224, "patch_size": 16, "frames": 8,
           "num_classes": 400}
    head = create_head("side4video", **b16)
    assert (head.cfg.num_blocks, head.cfg.side_width) == (12, 320) and head.num_trainable() == 21_185_232


# ----------------------------------------------------------------------------- stage three
def _tuner(demo_small, paradigm: str, recipe: str, **over):
    from pipeline.datasets import load_dataset
    from stages.augment import AugmentCfg
    from stages.finetune import DistContext, FinetuneCfg, Finetuner

    rec = stage_three_recipe(paradigm, recipe)
    base = dataclasses.asdict(FinetuneCfg(paradigm=paradigm, model="tiny", frames=4, workers=0))
    values, _ = resolve_recipe(rec, over, base)
    spec = load_dataset("demo", data_root=demo_small.root)
    return Finetuner(spec, FinetuneCfg(**values), {**rec.head, "layers": "1", "pos_rows": "8"},
                     AugmentCfg(**rec.augment), dist_ctx=DistContext(), log=lambda *a: None)


@pytest.mark.parametrize("paradigm", ["text4vis", "actionclip"])
def test_stage_three_paper_optimiser_has_the_published_groups(demo_small, paradigm):
    tuner = _tuner(demo_small, paradigm, "paper")
    clip, head = tuner.model.clip, tuner.model.head
    groups = _group_of(tuner.opt)
    beta2 = 0.98 if paradigm == "actionclip" else 0.999
    expect = {id(p): 5e-6 for p in clip.visual.parameters()}
    expect.update({id(p): 5e-5 for p in head.parameters() if p.requires_grad})
    if paradigm == "actionclip":  # both towers at 5e-6, and CLIP's logit scale trains
        expect.update({id(p): 5e-6 for n, p in clip.named_parameters() if not n.startswith("visual.")})
        assert clip.logit_scale.requires_grad
    else:
        assert not clip.logit_scale.requires_grad
    trainable = {id(p) for p in tuner.model.parameters() if p.requires_grad}
    assert set(groups) == set(expect) == trainable
    for pid, lr in expect.items():
        g = groups[pid]
        assert g["initial_lr"] == pytest.approx(lr) and g["weight_decay"] == 0.2 and g["betas"] == (0.9, beta2)
    assert tuner.epochs == (50 if paradigm == "actionclip" else 30) and tuner.cfg.warmup_epochs == 5
    assert tuner.global_batch == (128 if paradigm == "actionclip" else 256)
    assert tuner.accum == tuner.global_batch // 32
    quick = _tuner(demo_small, paradigm, "quick")  # the generic one: no decay on gains and biases
    assert any(g["weight_decay"] == 0.0 for g in quick.opt.param_groups) and quick.global_batch == 32


def test_actionclip_logit_scale_trains_in_stage_three(demo_small):
    tuner = _tuner(demo_small, "actionclip", "paper", batch_size=4, global_batch=4, warmup_epochs=0.0, lr=1e-3)
    before = tuner.model.clip.logit_scale.detach().clone()
    batch = next(iter(tuner.train_batches(0)))
    assert tuner.step(batch) > 0
    assert tuner.model.clip.logit_scale.grad is not None and not torch.equal(tuner.model.clip.logit_scale, before)


def _split(batch: dict, parts: list[slice]) -> list[dict]:
    return [{k: v[s] for k, v in batch.items()} for s in parts]


def test_stage_three_accumulation_equals_one_big_batch(demo_small):
    big = _tuner(demo_small, "text4vis", "quick", batch_size=4, warmup_epochs=0.0, lr=1e-3)
    acc = _tuner(demo_small, "text4vis", "quick", batch_size=4, warmup_epochs=0.0, lr=1e-3)
    batch = next(iter(big.train_batches(0)))
    assert batch["video"].shape[0] == 4
    torch.manual_seed(0)
    loss_big = big.step(batch)
    torch.manual_seed(0)
    loss_acc = acc.step(_split(batch, [slice(0, 1), slice(1, 4)]))  # uneven micro-batches on purpose
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    # the same gradient (Adam's first step turns float noise of exactly-zero gradients, e.g. attention
    # key biases, into +-lr, so gradients are the honest comparison of the two updates)
    pairs = [(n, p.grad, q.grad) for (n, p), q in zip(big.model.named_parameters(), acc.model.parameters())
             if p.grad is not None]
    assert len(pairs) > 10 and all(q is not None for _, _, q in pairs)
    scale = max(g.abs().max().item() for _, g, _ in pairs)
    assert scale > 1e-3
    for name, g_big, g_acc in pairs:
        torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-6 * scale, msg=name)
    one = _tuner(demo_small, "text4vis", "quick", batch_size=4, warmup_epochs=0.0, lr=1e-3)
    torch.manual_seed(0)
    one.step(_split(batch, [slice(0, 1)])[0])  # one micro-batch alone is another gradient: the test can fail
    assert any((p.grad - q.grad).abs().max() > 1e-3 * scale
               for p, q in zip(big.model.parameters(), one.model.parameters()) if p.grad is not None)


# ----------------------------------------------------------------------------- stage two on a real cache
@pytest.fixture(scope="module")
def proto_cache(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipes") / "cache"
    run_cli(*demo_args(demo_small, out, "--layers", "none", "--text", "clip_single", "--protocol", "text4vis",
                       "--views", "1x1"), check=True)
    from cache.store import open_store

    return open_store(out)


def test_stage_two_accumulation_equals_one_big_batch(proto_cache, tmp_path):
    common = dict(head="tap", epochs=2, lr=5e-2, warmup_epochs=0.0, weight_decay=0.05, decay_all=True, seed=1,
                  eval_average="scores")
    runs = {"big": dict(batch_size=6), "accum": dict(batch_size=2, global_batch=6),
            "small": dict(batch_size=2)}
    state, res = {}, {}
    for name, opts in runs.items():
        res[name] = train_head(proto_cache, TrainCfg(**common, **opts), run_dir=tmp_path / name, progress=False,
                               log=lambda *a: None)
        state[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["head"]
    for key, value in state["big"].items():
        torch.testing.assert_close(state["accum"][key], value, rtol=1e-5, atol=1e-6)
    assert [h["train_loss"] for h in res["accum"]["history"]] == \
        pytest.approx([h["train_loss"] for h in res["big"]["history"]], rel=1e-5)
    diff = max((state["small"][k] - v).abs().max().item() for k, v in state["big"].items())
    assert diff > 1e-3  # three steps of 2 are not one step of 6: the test can tell them apart


def test_a_contrastive_head_steps_on_its_whole_global_batch(proto_cache, tmp_path):
    """ActionCLIP's loss contrasts the videos of a batch: the paper recipe contrasts all 128 at once
    (no accumulation), the others keep 32 per step; accumulating a contrast is said out loud."""
    from stages.recipes import stage_two_recipe

    act = stage_two_recipe("actionclip").values
    assert act["batch_size"] == act["global_batch"] == 128
    assert stage_two_recipe("evl").values["batch_size"] == 32 and stage_two_recipe("evl").values["global_batch"] == 256
    lines: list[str] = []
    cfg = TrainCfg(head="actionclip", epochs=1, batch_size=2, global_batch=6, text_set="clip_single")
    train_head(proto_cache, cfg, {"layers": 1, "pos_rows": 8}, run_dir=tmp_path / "a", progress=False,
               log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("each contrast spans 2 videos, not 6" in ln for ln in lines), lines
    lines.clear()
    train_head(proto_cache, TrainCfg(head="tap", epochs=1, batch_size=2, global_batch=6), run_dir=tmp_path / "t",
               progress=False, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert not any("contrast" in ln for ln in lines)


def test_protocol_is_recorded_and_sets_the_evaluation_rule(proto_cache, tmp_path):
    proto = proto_cache.meta["protocol"]
    assert proto["name"] == "text4vis" and proto["eval_average"] == "embeddings" and proto["overridden"] == ["views"]
    assert proto_cache.meta["resize_short_side"] == round(32 * 256 / 224)  # tiny CLIP: 32 px crops of a 37 px side
    assert proto_cache.meta["content"]["resize_short_side"] == 37  # part of the key
    cfg = proto_cache.meta["config"]
    assert (cfg["frames"], cfg["sampling"], cfg["views"], cfg["protocol"]) == (8, "segment-start", "1x1", "text4vis")
    # the cached frames are the 37-px-short-side resize, then the centre crop (not a 32-px resize)
    from stages.backbone import load_clip
    from stages.video import SamplingCfg, decode_clips, make_views, normalize

    path = proto_cache.items("val")[0][0]
    clips, _ = decode_clips(path, SamplingCfg(8, "segment-start"))
    clip = load_clip("tiny", None, seed=0).eval()
    pp = clip.visual.preprocess_cfg
    with torch.no_grad():
        embs = {r: clip.encode_image(normalize(torch.from_numpy(make_views(clips, 32, 1, r)[0]), pp["mean"],
                                                pp["std"])) for r in (37, 32)}
    cached = torch.from_numpy(proto_cache.read("val", "frame_emb")[0, 0]).float()
    assert (cached - embs[37]).abs().max() < 5e-3 < (cached - embs[32]).abs().max()
    # stage two evaluates a text4vis head by the protocol's rule (embeddings averaged over views)
    proc = run_cli("train", "--head", "text4vis", "--cache", proto_cache.path, "--recipe", "quick", "--set",
                   "epochs=1", "--set", "layers=1", "--set", "pos_rows=8", "--run-dir", tmp_path / "r",
                   "--no-progress", check=True)
    assert "eval_average=embeddings" in proc.stdout and "recipe quick for text4vis" in proc.stdout
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert saved["eval_average"] == "embeddings" and saved["recipe"] == "quick" and saved["lr"] == 1e-3


def test_train_epochs_flag_wins_over_set_and_recipe_and_version_prints(proto_cache, tmp_path):
    proc = run_cli("train", "--head", "tap", "--cache", proto_cache.path, "--epochs", "2", "--set", "epochs=5",
                   "--run-dir", tmp_path / "r", "--no-progress", check=True)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert saved["epochs"] == 2 and saved["recipe"] == "paper"
    assert len(json.loads((tmp_path / "r" / "metrics.json").read_text())["history"]) == 2
    bad = run_cli("train", "--head", "tap", "--cache", proto_cache.path, "--epochs", "-1", "--run-dir", tmp_path / "x")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: epochs must be an integer >= 0, got -1"]
    assert not (tmp_path / "x").exists()
    version = run_cli("--version", check=True)
    assert version.stdout.startswith("clipcache ") and len(version.stdout.splitlines()) == 1


def test_demo_recipe_is_what_make_demo_trains(proto_cache, tmp_path):
    """`make train DATASET=demo` (`--recipe demo`) resolves to the TrainCfg and head options that
    `make demo` trains each head with, so the two share run folders and figures."""
    from dataclasses import asdict

    from pipeline.demo_run import DEMO_HEADS
    from stages.recipes import stage_two_recipe

    rec = stage_two_recipe("text4vis", "demo")
    assert rec.head == DEMO_HEADS["text4vis"]["head"] == {"temporal": "ttrans", "layers": 2, "pos_rows": 16}
    assert (rec.values["batch_size"], rec.values["global_batch"], rec.values["threads"]) == (16, 0, 1)
    proc = run_cli("train", "--head", "text4vis", "--cache", proto_cache.path, "--recipe", "demo", "--epochs", "1",
                   "--set", "text_set=clip_single", "--run-dir", tmp_path / "r", "--no-progress", check=True)
    assert "recipe demo for text4vis" in proc.stdout
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    want = asdict(TrainCfg(head="text4vis", recipe="demo", **{**rec.values, "epochs": 1, "text_set": "clip_single"}))
    assert saved["train"] == {**want, "eval_average": saved["train"]["eval_average"]}  # the cache's protocol rule
    assert {k: saved["head"][k] for k in rec.head} == rec.head
    with pytest.raises(ConfigError, match="recipe 'demo' is for stage two"):
        stage_three_recipe("text4vis", "demo")


# SPEC section 7's test protocols: frames, sampling, stride (dense), views, resize ratio, view averaging
PUBLISHED_PROTOCOLS = {
    "evl": (8, "dense", 16, "3x1", 1.0, "scores"),
    "side4video": (8, "segment-start", None, "4x3", 256 / 224, "scores"),  # 12 views: its model zoo's 8x3x4
    "text4vis": (8, "segment-start", None, "4x3", 256 / 224, "embeddings"),
    "actionclip": (8, "segment", None, "1x1", 256 / 224, "scores"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PROTOCOLS))
def test_protocol_presets_resolve_to_the_documented_settings(name):
    frames, sampling, stride, views, ratio, average = PUBLISHED_PROTOCOLS[name]
    defaults = {"frames": 8, "sampling": "segment", "stride": 8, "views": "1x1", "resize_ratio": 1.0}
    values, record, lines = resolve_protocol(name, {}, defaults)
    assert (values["frames"], values["sampling"], values["views"]) == (frames, sampling, views)
    assert values["resize_ratio"] == pytest.approx(ratio) and record["eval_average"] == average
    if stride:
        assert values["stride"] == stride
    assert record["template_average"] == ("score" if name == "actionclip" else "")
    assert record["overridden"] == [] and lines[0].startswith(f"protocol {name}")
    values, record, _ = resolve_protocol(name, {"frames": 16}, defaults)  # explicit flags win
    assert values["frames"] == 16 and record["overridden"] == ["frames"]
    assert get_protocol(name).paper


def test_stage_three_augmentation_per_paradigm():
    from torchvision.transforms import v2

    from stages.augment import AugmentCfg, MultiScaleCrop, build_train_transform

    t4v = build_train_transform(224, AugmentCfg(**stage_three_recipe("text4vis").augment)).transforms
    ac = build_train_transform(224, AugmentCfg(**stage_three_recipe("actionclip").augment)).transforms
    kinds = lambda ops: [type(o).__name__ for o in ops]  # noqa: E731
    assert kinds(t4v) == ["Resize", "RandomResizedCrop", "RandomHorizontalFlip", "RandomGrayscale"]  # no jitter
    assert t4v[0].size == [256] and t4v[3].p == 0.2
    assert kinds(ac) == ["Resize", "MultiScaleCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale",
                         "RandAugment"]
    jitter = ac[3].transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2),
                                                                                   (-0.1, 0.1))
    assert (ac[5].num_ops, ac[5].magnitude) == (2, 9) and isinstance(ac[3], v2.RandomApply)
    # multi-scale crop: sides from {1, .875, .75, .66} x the short side, at most one step apart, on the grid
    crop = MultiScaleCrop(224, [1, 0.875, 0.75, 0.66], 1)
    sides = [int(256 * s) for s in (1, 0.875, 0.75, 0.66)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(400):
        top, left, h, w = crop.params(256, 341)
        assert h in sides and w in sides and abs(sides.index(h) - sides.index(w)) <= 1
        assert top in {g * (256 - h) // 4 for g in range(5)} and left in {g * (341 - w) // 4 for g in range(5)}
        seen.add((h, w))
    assert len(seen) == 10  # 4 equal pairs + 6 one step apart, all drawn
    clip = torch.randint(0, 256, (3, 3, 256, 341), dtype=torch.uint8)
    assert crop(clip).shape == (3, 3, 224, 224)


# ----------------------------------------------------------------------------- bad names
def _cli_error(capsys, *args) -> str:
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        with contextlib.redirect_stdout(io.StringIO()):
            main([str(a) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_unknown_recipe_or_protocol_is_one_line_exit_2_nothing_written(demo_small, tmp_path, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    err = _cli_error(capsys, "train", "--head", "evl", "--cache", cache, "--recipe", "fancy", "--run-dir", run)
    assert "unknown recipe 'fancy'" in err and "paper, quick" in err
    err = _cli_error(capsys, "finetune", "--paradigm", "actionclip", "--dataset", "demo", "--data-root",
                     demo_small.root, "--model", "tiny", "--recipe", "fancy", "--run-dir", run)
    assert "unknown recipe 'fancy'" in err
    err = _cli_error(capsys, *demo_args(demo_small, cache, "--protocol", "mvit"))
    # the protocols the heads register (a test module may register one more), each listed
    assert "unknown protocol 'mvit'" in err and all(f" {n}" in err for n in ("evl", "text4vis", "side4video",
                                                                              "actionclip"))
    assert "global_batch must be" in _cli_error(capsys, "train", "--head", "tap", "--cache", cache,
                                                "--global-batch", "-4", "--run-dir", run)
    assert not cache.exists() and not run.exists() and list(tmp_path.iterdir()) == []
    assert math.isclose(get_protocol("text4vis").resize_ratio * 224, 256)


def test_for_head_takes_the_papers_test_protocol_by_default(demo_small):
    """`extract --for-head H`: H's paper protocol unless --protocol says otherwise; heads that test
    on the same views share it, heads that do not are refused with the way out."""
    import types

    from cache.meta import ProtocolRecord
    from stages.recipes import protocol_eval_overrides, protocol_for_heads

    assert protocol_for_heads(["evl"]) == "evl" and protocol_for_heads(["tap", "lda"]) == ""
    assert protocol_for_heads(["tap", "side4video", "text4vis"]) == "side4video"
    with pytest.raises(ConfigError, match="extract once per head, or pass --protocol"):
        protocol_for_heads(["evl", "side4video"])
    base = ["extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "small", "--layers", "last1",
            "--dry-run"]
    out = run_cli(*base, "--for-head", "side4video", check=True).stdout
    assert "the paper's test protocol side4video" in out and "protocol side4video: 8 frames, segment-start" in out
    plain = run_cli(*base, "--for-head", "side4video", "--protocol", "none", check=True).stdout
    assert "protocol" not in plain
    # a text4vis head on a cache cut for side4video (the same views) averages as Text4Vis does
    meta = types.SimpleNamespace(protocol=ProtocolRecord(name="side4video", eval_average="scores"))
    assert protocol_eval_overrides(meta, "text4vis")[0] == {"eval_average": "embeddings"}
    assert protocol_eval_overrides(meta, "side4video")[0] == {"eval_average": "scores"}
    moved = types.SimpleNamespace(protocol=ProtocolRecord(name="side4video", eval_average="scores",
                                                          overridden=["views"]))
    assert protocol_eval_overrides(moved, "text4vis")[0] == {"eval_average": "scores"}


@pytest.mark.parametrize("paradigm", ["text4vis", "actionclip"])
def test_stage_three_paper_recipe_tests_with_the_paradigms_protocol(paradigm):
    """--recipe paper evaluates fine-tuning on the views the paper tests with (the protocol its head
    registers: Text4Vis 4 clips x 3 crops at segment starts); views given by the user win."""
    proto = get_protocol(paradigm)
    rec = stage_three_recipe(paradigm, "paper")
    assert (rec.values["views"], rec.values["sampling"]) == (proto.views, proto.sampling)
    assert f"{proto.sampling} sampling" in rec.source
    values, _ = resolve_recipe(rec, {"views": "1x1"}, {})
    assert values["views"] == "1x1"
    quick = stage_three_recipe(paradigm, "quick")
    assert "views" not in quick.values and "sampling" not in quick.values


def test_stage_three_accumulated_contrast_spans_the_global_batch(demo_small):
    """ActionCLIP's contrast under accumulation: micro-batches of 1 and 3 give the loss and the
    gradient of one contrast over all 4 videos (embeddings cached, second forward), not the sum of
    two small contrasts."""
    kw = dict(batch_size=4, warmup_epochs=0.0, train_logit_scale=True)
    big = _tuner(demo_small, "actionclip", "quick", **kw)
    acc = _tuner(demo_small, "actionclip", "quick", **kw)
    batch = next(iter(big.train_batches(0)))
    assert batch["video"].shape[0] == 4
    torch.manual_seed(0)
    loss_big = big.step(batch)
    torch.manual_seed(0)
    loss_acc = acc.step(_split(batch, [slice(0, 1), slice(1, 4)]))
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    pairs = [(n, p.grad, q.grad) for (n, p), q in zip(big.model.named_parameters(), acc.model.parameters())
             if p.grad is not None]
    names = {n for n, _, _ in pairs}
    assert "clip.logit_scale" in names and any(n.startswith("clip.visual.") for n in names)
    assert any(n.startswith("clip.transformer.") for n in names)  # the text tower trains too
    scale = max(g.abs().max().item() for _, g, _ in pairs)
    assert scale > 1e-4
    for name, g_big, g_acc in pairs:
        assert g_acc is not None, name
        torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-5 * scale, msg=name)
    # the former rule (a contrast per micro-batch, weighted by its share) is another loss: the test can fail
    from stages.paradigms.actionclip import ActionCLIP

    old = _tuner(demo_small, "actionclip", "quick", **kw)
    old.model.contrast_keys = ()  # this instance falls back to one contrast per micro-batch
    torch.manual_seed(0)
    loss_micro = old.step(_split(batch, [slice(0, 1), slice(1, 4)]))
    assert isinstance(old.model, ActionCLIP) and abs(loss_micro - loss_big) > 1e-3
