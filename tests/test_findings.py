"""The README's demo findings, asserted with stated margins on a small generated world.

`make demo` takes minutes; this is the same method at a size `make test` can afford (about a
minute on one core): a world of 8 classes, four looks (colour x shape) each shown growing and
shrinking, so a class is told apart from its twin only by motion; 3 train / 4 val videos per
class; a tiny CLIP pretrained by the project (stages.pretrain_demo) on the world's captioned
stills, so its text means something (colour and shape words; motion words it never saw); a
cache of every block with patch tokens and frames; every head trained from it.

What the README says and this file asserts (chance: 12.5% over 8 classes):

- every head beats chance: a head that reads the look alone can reach 50% (it cannot tell a
  growing shape from the same shape shrinking: the mean of the frames is the same);
- the heads that see patch tokens over time beat TAP (the mean of frame embeddings + linear)
  on these motion classes: asserted for EVL. Side4Video's lead over TAP did NOT hold at this
  size (measured -9 to +16 points over 4 worlds, i.e. within a few val videos of TAP), so it is
  only held to beating chance here; the README's Side4Video figure comes from the full demo;
- zero-shot (the text classifier, no training) beats chance, on all classes and on classes the
  head was not trained on;
- the CLIP-text classifier initialisation beats random normal and orthogonal ones at one shot
  (W frozen, mean over 3 seeds).

Margins were fixed after measuring worlds / pretraining seeds 0-3 (SEED: env
CLIPCACHE_FINDINGS_SEED; the test runs seed 0). Top-1 % measured (seeds 0 and 3 with this file's
settings; seeds 1 and 2 with 80 pretraining steps, EVL re-run at lr 2e-2 on their caches):

    seed  tap   lp    lda   t4v   aclip evl   s4v   zs    zs-unseen  1-shot clip_text / random / orth
    0     53.1  56.2  56.2  46.9  53.1  90.6  53.1  37.5  56.2       37.5 / 15.6 / 13.5
    1     59.4  50.0  56.2  53.1  50.0  81.2  50.0  31.2  50.0       32.3 /  8.3 /  8.3
    2     46.9  59.4  43.8  50.0  46.9  75.0  62.5  43.8  62.5       38.5 /  4.2 /  8.3
    3     46.9  50.0  59.4  50.0  53.1  87.5  53.1  50.0  43.8       50.0 / 16.7 / 12.5

(1-shot figures are means over init seeds 0-2.) Each assertion below keeps room on every row.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

SEED = int(os.environ.get("CLIPCACHE_FINDINGS_SEED", "0"))  # world and pretraining seed
LOOKS = ("red circle", "green square", "blue triangle", "yellow square")
MOTIONS = ("growing", "shrinking")
CLASSES = tuple(f"{look} {m}" for look in LOOKS for m in MOTIONS)
K = len(CLASSES)
CHANCE = 100.0 / K

# Explicit training options (not the defaults, so a changed default recipe does not move them).
_SGD = {"batch_size": 8, "warmup_epochs": 1.0, "weight_decay": 0.05, "label_smoothing": 0.0, "seed": 0}
HEADS: dict[str, tuple[dict, dict]] = {
    "tap": ({"epochs": 20, "lr": 1e-2}, {}),
    "linear_probe": ({}, {}),
    "lda": ({}, {}),
    "text4vis": ({"epochs": 20, "lr": 3e-3}, {"temporal": "ttrans", "layers": 1, "pos_rows": 8}),
    "actionclip": ({"epochs": 20, "lr": 3e-3}, {"prompt": "transf", "layers": 1, "pos_rows": 8}),
    "evl": ({"epochs": 40, "lr": 2e-2}, {"num_layers": 1}),
    "side4video": ({"epochs": 20, "lr": 1e-2}, {"preset": "custom", "num_blocks": 2, "side_width": 32}),
}
INIT_SEEDS = (0, 1, 2)


def _render_still(rng):
    """A still of the world and its caption; half the captions cut to "a <colour> <shape>"."""
    from pipeline.demo_data import render_frame_with_caption

    img, cap = render_frame_with_caption(rng, size=48, world="basic")
    if rng.random() < 0.5:
        words = cap.split()  # "a large red circle at the top left"
        cap = f"a {words[2]} {words[3]}"
    return img, cap


PRETRAIN_STEPS = 120


def build_findings(root: Path, seed: int = SEED, steps: int = PRETRAIN_STEPS) -> dict:
    """Generate the world, pretrain the tiny CLIP, extract, train every head; return the top-1s."""
    from pipeline.compare_init import compare_init
    from pipeline.datasets import load_dataset
    from pipeline.demo_data import DemoCfg, generate_demo
    from stages.extract import ExtractCfg, plan_extraction, run_extraction
    from stages.pretrain_demo import PretrainCfg, pretrain_demo_clip
    from stages.train import TrainCfg, train_head

    threads = torch.get_num_threads()
    try:
        ds = generate_demo(root / "data", DemoCfg(classes=CLASSES, train_per_class=3, val_per_class=4, frames=8,
                                                  size=48, world="basic", seed=seed), progress=False)
        ckpt = root / "clip.pt"
        pretrain_demo_clip(ckpt, _render_still, None,
                           PretrainCfg(model="tiny", image_size=32, minutes=0, max_steps=steps, batch_size=32, lr=3e-3,
                                       warmup_steps=10, pool_size=1024, fresh_per_step=16, amp="none", seed=seed),
                           progress=False, log=lambda *a: None, threads=1)
        plan = plan_extraction(load_dataset("demo", data_root=ds.root),
                               ExtractCfg(model="tiny", pretrained=str(ckpt), frames=8, layers="all", patch=True,
                                          store_frames=True, text="clip_single,clip_actionclip", workers=0),
                               out=root / "cache")
        run_extraction(plan, shard=(0, 1), progress=False, log=lambda *a, **k: None)
        torch.set_num_threads(1)
        cache = root / "cache"
        quiet = {"progress": False, "log": lambda *a, **k: None}
        top1 = {}
        for name, (train, head) in HEADS.items():
            cfg = TrainCfg(head=name, **_SGD, **train, eval_every=max(1, train.get("epochs", 1)))
            top1[name] = train_head(cache, cfg, head, run_dir=root / "runs" / name, **quiet)["final"]["top1"]
        zs = train_head(cache, TrainCfg(head="text4vis", epochs=0), {"temporal": "tap"}, run_dir=root / "runs" / "zs",
                        **quiet)
        top1["zero_shot"] = zs["final"]["top1"]
        # trained on the first two looks (4 classes), tested on the other two's 4 classes
        split = TrainCfg(head="text4vis", **_SGD, epochs=10, lr=3e-3, eval_every=10, train_classes="0-3",
                         test_classes="4-7")
        top1["zero_shot_unseen"] = train_head(cache, split, HEADS["text4vis"][1], run_dir=root / "runs" / "zs_split",
                                              **quiet)["final"]["top1"]
        ci = compare_init(cache, head="text4vis", inits=("clip_text", "random_normal", "orthogonal"),
                          seeds=INIT_SEEDS, shots=(1,), frozen=(True,), epochs=10,
                          head_overrides={"temporal": "ttrans", "layers": 1, "pos_rows": 8},
                          train_overrides={"batch_size": 8, "lr": 1e-3, "warmup_epochs": 1.0, "weight_decay": 0.05},
                          out_dir=root / "compare-init", corr_classes=0, log=lambda *a: None)
        for init in ("clip_text", "random_normal", "orthogonal"):
            top1[f"init_{init}_1shot"] = [r["top1"] for r in ci["results"] if r["init"] == init]
        return top1
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    return build_findings(tmp_path_factory.mktemp("findings"))


@pytest.mark.parametrize("head", sorted(HEADS) + ["zero_shot"])
def test_every_head_beats_chance(findings, head):
    # margin: 2 x chance (25%); the lowest measured was 31.2% (zero-shot) and 43.8% (a head)
    assert findings[head] >= 2 * CHANCE, (head, findings[head], findings)


def test_patch_token_heads_beat_tap(findings):
    # margin: EVL >= TAP + 15 points (measured +22 to +41)
    assert findings["evl"] >= findings["tap"] + 15, findings


def test_zero_shot_beats_chance_on_all_and_on_unseen_classes(findings):
    # all 8 classes: >= 2 x chance (12.5%; measured >= 31.2); the 4 classes the head was not
    # trained on: >= their chance (25%) + 10 points (measured >= 43.8)
    assert findings["zero_shot"] >= 2 * CHANCE, findings
    assert findings["zero_shot_unseen"] >= 100 / 4 + 10, findings


def test_clip_text_init_beats_random_ones_at_one_shot(findings):
    # mean over init seeds 0-2, W frozen, 1 video per class: clip_text >= random normal + 15 and
    # >= orthogonal + 15 points (measured +22 to +37)
    text = np.mean(findings["init_clip_text_1shot"])
    for other in ("random_normal", "orthogonal"):
        assert text >= np.mean(findings[f"init_{other}_1shot"]) + 15, findings
