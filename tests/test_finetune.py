"""Stage three: end-to-end fine-tuning from raw video (Text4Vis, ActionCLIP) on generated videos, tiny CLIP, CPU."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.errors import ConfigError
from conftest import kill_mid_run, popen_cli, run_cli, torchrun
from stages.runs import finished_metrics

# Small but real: 4 frames, 1-layer temporal module / prompt, global batch 4 (3 steps an epoch), no warmup.
COMMON = ["--model", "tiny", "--frames", "4", "--no-progress", "--recipe", "quick", "--set", "batch_size=4",
          "--set", "layers=1", "--set", "pos_rows=8", "--set", "warmup_epochs=0", "--set", "workers=0"]


def _ft_args(ds, paradigm, run_dir, epochs, *extra):
    return ["finetune", "--paradigm", paradigm, "--dataset", "demo", "--data-root", str(ds.root), "--epochs",
            str(epochs), *COMMON, "--run-dir", str(run_dir), *extra]


def _metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def _cli_in_process(*args) -> str:
    """`pipeline ...` through the CLI's own entry point, in this process (no interpreter start-up)."""
    from pipeline.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in args])
    return out.getvalue()


@pytest.fixture(scope="module")
def text4vis_run(demo_small, tmp_path_factory):
    run = tmp_path_factory.mktemp("ft") / "t4v"
    return run, _cli_in_process(*_ft_args(demo_small, "text4vis", run, 2, "--set", "lr=5e-4"))


@pytest.fixture(scope="module")
def actionclip_run(demo_small, tmp_path_factory):
    run = tmp_path_factory.mktemp("ft") / "ac"
    return run, _cli_in_process(*_ft_args(demo_small, "actionclip", run, 2, "--set", "lr=1e-4", "--views", "2x3"))


# ----------------------------------------------------------------------------- augmentation
def test_augmentation_draws_one_set_of_params_per_clip():
    from stages.augment import AugmentCfg, augment_clip, build_train_transform

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    clip = np.repeat(frame[None], 6, axis=0)  # (T, H, W, 3), every frame the same
    for randaugment in (False, True):
        t = build_train_transform(32, AugmentCfg(randaugment=randaugment, grayscale=0.5, flip=0.5))
        outs = []
        for seed in range(12):
            out = augment_clip(clip, t, [seed])
            assert out.shape == (6, 3, 32, 32) and out.dtype == torch.uint8
            assert all(torch.equal(out[0], out[k]) for k in range(1, 6)), "frames of one clip augmented differently"
            assert torch.equal(out, augment_clip(clip, t, [seed])), "same seed, different augmentation"
            outs.append(out[0])
        assert len({o.numpy().tobytes() for o in outs}) > 6, "augmentation does not vary across seeds"
    before = torch.random.get_rng_state()
    augment_clip(clip, t, [1])
    assert torch.equal(before, torch.random.get_rng_state()), "augmentation consumed the global torch RNG"


def test_training_samples_are_random_evaluation_is_fixed(demo_small):
    from pipeline.datasets import load_dataset
    from stages.finetune import VideoClips
    from stages.video import SamplingCfg

    spec = load_dataset("demo", data_root=demo_small.root)
    train = VideoClips(spec.splits["train"], SamplingCfg(4), 32, train=True, seed=0, num_templates=16)
    a = train[0]
    assert a["valid"] and a["video"].shape == (4, 3, 32, 32)
    assert torch.equal(a["video"], train[0]["video"])  # a function of (seed, epoch, video): worker-independent
    train.set_epoch(1)
    assert not torch.equal(a["video"], train[0]["video"])
    val = VideoClips(spec.splits["val"], SamplingCfg(4, clips=2, crops=3), 32, train=False)
    v = val[0]
    assert v["video"].shape == (6, 4, 3, 32, 32) and torch.equal(v["video"], val[0]["video"])
    pad = val[-1]
    assert not pad["valid"] and pad["video"].shape == v["video"].shape


def test_rank_batches_cover_each_global_batch_once():
    from stages.finetune import rank_batches

    one = rank_batches(10, 4, 1, 0, seed=3, epoch=2, shuffle=True)
    two = [rank_batches(10, 4, 2, r, seed=3, epoch=2, shuffle=True) for r in range(2)]
    three = [rank_batches(10, 4, 3, r, seed=3, epoch=2, shuffle=True) for r in range(3)]
    for parts in (two, three):
        for b, full in enumerate(one):
            assert [i for p in parts for i in p[b] if i >= 0] == full


# ----------------------------------------------------------------------------- loss
def test_kl_loss_is_the_actionclip_heads_rule():
    from stages.finetune import video_text_kl_loss
    from stages.heads import create_head

    head = create_head("actionclip", tiny=True).eval()
    g = torch.Generator().manual_seed(0)
    head.set_classifier(torch.randn(5, 3, 32, generator=g))
    labels = torch.tensor([0, 1, 1, 3, 0, 4])
    video = torch.randn(6, 32, generator=g)
    ref = head.loss({"video_emb": video}, labels, label_smoothing=0.1)
    ours = video_text_kl_loss(video, head.class_embedding()[labels], labels, head.cfg.logit_scale, 0.1)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("paradigm", ["text4vis", "actionclip"])
def test_training_loss_falls_on_a_fixed_batch(demo_small, paradigm):
    from pipeline.datasets import load_dataset
    from stages.finetune import DistContext, FinetuneCfg, Finetuner

    spec = load_dataset("demo", data_root=demo_small.root)
    cfg = FinetuneCfg(paradigm=paradigm, model="tiny", frames=4, epochs=100, batch_size=6, warmup_epochs=0,
                      lr=1e-3, backbone_ratio=0.3, workers=0)
    tuner = Finetuner(spec, cfg, {"layers": "1", "pos_rows": "8"}, dist_ctx=DistContext(), log=lambda *a: None)
    assert tuner.trainable["visual"] > 0 and tuner.trainable["head"] > 0
    assert (tuner.trainable["text"] > 0) == (paradigm == "actionclip")
    batch = next(iter(tuner.loader(tuner.train_data, 0, shuffle=True, batch_size=6)))
    frozen_text = {n: p.clone() for n, p in tuner.model.clip.named_parameters() if not n.startswith("visual.")}
    visual_before = tuner.model.clip.visual.conv1.weight.clone()
    losses = [tuner.step(batch) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert not torch.equal(visual_before, tuner.model.clip.visual.conv1.weight)  # the backbone trains
    text_changed = any(not torch.equal(p, frozen_text[n]) for n, p in tuner.model.clip.named_parameters()
                       if n in frozen_text)
    assert text_changed == (paradigm == "actionclip")
    lrs = {g["name"]: g["lr"] for g in tuner.opt.param_groups}
    assert lrs["visual"] == pytest.approx(0.3 * lrs["head"])


def test_grad_checkpointing_and_bf16_autocast_train_the_same_model(demo_small):
    from pipeline.datasets import load_dataset
    from stages.finetune import DistContext, FinetuneCfg, Finetuner

    spec = load_dataset("demo", data_root=demo_small.root)
    runs = {}
    for name, extra in (("plain", {}), ("ckpt", {"grad_checkpointing": True}), ("bf16", {"amp": "bf16"})):
        cfg = FinetuneCfg(paradigm="actionclip", model="tiny", frames=4, epochs=1, batch_size=4, warmup_epochs=0,
                          workers=0, **extra)
        tuner = Finetuner(spec, cfg, {"layers": "1", "pos_rows": "8"}, dist_ctx=DistContext(), log=lambda *a: None)
        batch = next(iter(tuner.loader(tuner.train_data, 0, shuffle=True, batch_size=4)))
        runs[name] = (tuner.step(batch), tuner.model.clip.visual.conv1.weight.detach().clone())
    assert runs["ckpt"][0] == pytest.approx(runs["plain"][0], rel=1e-5)
    torch.testing.assert_close(runs["ckpt"][1], runs["plain"][1])
    assert runs["bf16"][0] == pytest.approx(runs["plain"][0], rel=0.1)  # bf16 forward: close, not equal


# ----------------------------------------------------------------------------- end to end from the CLI
@pytest.mark.parametrize("which", ["text4vis", "actionclip"])
def test_both_paradigms_run_end_to_end_from_the_cli(request, which):
    run, stdout = request.getfixturevalue(f"{which}_run")
    assert f"finetune {which}: top1" in stdout and "first step" in stdout
    m = _metrics(run)
    assert m["eval_videos"] == 8 and m["final"]["n"] == 8 and 0 <= m["final"]["top1"] <= 100
    views = json.loads((run / "config.json").read_text())["finetune"]["views"]
    assert views == ("2x3" if which == "actionclip" else "1x1")
    assert all("val" in h and h["train_loss"] > 0 for h in m["history"]) and m["first_step_loss"] > 0
    assert (run / "curves.png").stat().st_size > 1000 and (run / "config.json").exists()
    from stages.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "last.pt")  # data only: weights_only=True, the config as JSON
    assert ckpt["epoch"] == len(m["history"]) and ckpt["config"]["head"]["name"] == which
    from stages.evaluate import evaluate_run  # stage two's re-evaluation names what to do instead

    with pytest.raises(ConfigError, match="not a stage-two run.*finetune-export"):
        evaluate_run(run)


def test_export_builds_a_stage_one_cache_of_the_finetuned_model(text4vis_run, demo_small, tmp_path):
    from cache.store import open_store
    from stages.augment import eval_views
    from stages.backbone import load_clip
    from stages.finetune import load_finetuned
    from stages.video import SamplingCfg, decode_clips

    run, _ = text4vis_run
    exported = tmp_path / "finetuned.pt"
    assert "--pretrained" in _cli_in_process("finetune-export", "--run", run, "--out", exported)
    run_cli("extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "tiny", "--pretrained",
            exported, "--frames", "4", "--layers", "none", "--text", "clip_single", "--out", tmp_path / "cache",
            "--no-progress", check=True)
    store = open_store(tmp_path / "cache")
    cached = torch.from_numpy(store.read("val", "frame_emb"))  # (N, V, T, E)

    clip, _head, _ = load_finetuned(run)
    path = store.items("val")[0][0]
    clips, _ = decode_clips(path, SamplingCfg(4))
    x = eval_views(clips, 32, 1)[0].float().div(255)  # (T, 3, S, S)
    pp = clip.visual.preprocess_cfg
    x = (x - torch.tensor(pp["mean"]).view(3, 1, 1)) / torch.tensor(pp["std"]).view(3, 1, 1)
    with torch.no_grad():
        ours = clip.encode_image(x)
        random_init = load_clip("tiny", None, seed=0).encode_image(x)
    torch.testing.assert_close(cached[0, 0], ours, rtol=5e-3, atol=5e-3)  # the cache is fp16
    moved, fp16_error = (cached[0, 0] - random_init).abs().max(), (cached[0, 0] - ours).abs().max()
    assert moved > 0.05 and moved > 20 * fp16_error, "the cache holds the random init, not the fine-tuned model"


def test_torchrun_two_processes_match_one_process(actionclip_run, demo_small, tmp_path):
    run1, _ = actionclip_run
    run2 = tmp_path / "ddp"
    args = _ft_args(demo_small, "actionclip", run2, 2, "--set", "lr=1e-4", "--views", "2x3")
    proc = torchrun("-m", "pipeline.cli", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _metrics(run1), _metrics(run2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["first_step_loss"] == pytest.approx(one["first_step_loss"], rel=1e-5)
    for a, b in zip(one["history"], two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    assert proc.stdout.count("finetune actionclip: top1") == 1  # rank 0 reports, once


@pytest.mark.slow
def test_torchrun_accumulated_contrast_matches_one_process(actionclip_run, demo_small, tmp_path):
    """2 processes x 2 micro-batches of 1 video: ActionCLIP still contrasts the whole global batch of
    4 (cached embeddings gathered over ranks, the graphs rebuilt per micro-batch under no_sync)."""
    run1, _ = actionclip_run
    run2 = tmp_path / "ddp-accum"
    args = _ft_args(demo_small, "actionclip", run2, 2, "--set", "lr=1e-4", "--views", "2x3", "--set", "batch_size=1",
                    "--set", "global_batch=4")
    proc = torchrun("-m", "pipeline.cli", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "contrasts each global batch of 4 videos at once" in proc.stdout
    one, two = _metrics(run1), _metrics(run2)
    assert two["first_step_loss"] == pytest.approx(one["first_step_loss"], rel=1e-5)
    for a, b in zip(one["history"], two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)


def test_sigkill_and_resume_continue_from_the_last_checkpoint(text4vis_run, demo_small, tmp_path):
    ref_run, _ = text4vis_run
    run = tmp_path / "run"
    args = _ft_args(demo_small, "text4vis", run, 2, "--set", "lr=5e-4")
    ckpt = run / "last.pt"
    # killed once the first epoch's checkpoint is on disk; a run that finished before the kill
    # landed is started over from a clean folder (a bounded number of times)
    kill_mid_run(lambda: popen_cli(*args), ckpt.exists,
                 lambda: finished_metrics(run) is None and torch.load(ckpt, weights_only=True)["epoch"] == 1,
                 lambda: shutil.rmtree(run, ignore_errors=True))
    epoch_at_kill = torch.load(ckpt, weights_only=True)["epoch"]
    assert epoch_at_kill == 1
    assert not list(run.glob(".*tmp*")), "a partial checkpoint was left behind"
    proc = run_cli(*args, "--resume", check=True)
    assert f"from epoch {epoch_at_kill}" in proc.stdout
    a, b = _metrics(ref_run), _metrics(run)
    # the reference ran in this process (1 torch thread): equal up to the float order of 2 threads
    assert [h["train_loss"] for h in b["history"]] == pytest.approx([h["train_loss"] for h in a["history"]], rel=1e-4)
    assert b["history"][0]["first_loss"] == pytest.approx(a["history"][0]["first_loss"], rel=1e-5)


# ----------------------------------------------------------------------------- user errors
def _cli_error(capsys, *args) -> str:
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_is_one_line_and_exit_2(demo_small, tmp_path, capsys):
    base = ["finetune", "--dataset", "demo", "--data-root", demo_small.root, "--model", "tiny"]
    assert "unknown paradigm 'bogus'" in _cli_error(capsys, *base, "--paradigm", "bogus")
    assert "expects float" in _cli_error(capsys, *base, "--paradigm", "text4vis", "--set", "lr=fast")
    assert "unknown option 'nope'" in _cli_error(capsys, *base, "--paradigm", "actionclip", "--set", "nope=1")
    assert "key=value" in _cli_error(capsys, *base, "--paradigm", "actionclip", "--set", "lr")
    bad = tmp_path / "bad_train.txt"
    bad.write_text("a.mp4 0\nb.mp4 zero\n")
    err = _cli_error(capsys, *base, "--paradigm", "text4vis", "--train-list", bad)
    assert "bad_train.txt" in err and "line 2" in err
    assert "no stage-three checkpoint" in _cli_error(capsys, "finetune-export", "--run", tmp_path, "--out",
                                                     tmp_path / "x.pt")
