"""Something-Something v2: a horizontal flip swaps the labels of the left/right classes.

The pairs are read from the class names (cache/flips.py), checked here on the shipped SSv2 list.
A tiny SSv2-like dataset (the demo's real h264 videos under four class names, two of them
mirrors) is extracted with a view bank (`--train-aug`): stage two must read the mirror label for
exactly the views that were flipped (Zarr, the batch loader and WebDataset alike), and stage three
for exactly the clips its augmentation mirrored (told apart by their pixels). A dataset whose
flips swap nothing reads its labels as before, and stage three's augmentation gives the same
pixels as torchvision's own flip did.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.flips import flip_label, flip_labels, mirror_name, mirror_pairs, swap_table
from cache.meta import DatasetMeta
from conftest import extracted_store
from pipeline.datasets import builtin_classnames, get_dataset, load_dataset, register_dataset
from pipeline.datasets.lists import spec_from_lists
from stages.data.batch import LabelSwap, view_label
from stages.data.zarr_split import CacheSplit, HeadInputs, select_videos
from stages.heads import DataKeys
from stages.video import VIEW_PARAM_COLUMNS

K = 4
MIRROR_CLASSES = ["Pushing something from left to right", "Pushing something from right to left",
                  "Holding something", "Turning the camera left while filming something"]
FLIP = VIEW_PARAM_COLUMNS.index("flip")


def _load_mirror(args):
    return spec_from_lists("mirror-test", args.video_root, args.train_list, args.val_list, None, args.classes)


register_dataset("mirror-test", _load_mirror, help="test: demo videos under SSv2-like class names",
                 default_root=False, flip_swaps=True)


# ----------------------------------------------------------------------------- the pairs
def test_the_pairs_of_the_real_ssv2_list_are_the_papers():
    names = builtin_classnames("ssv2")
    assert len(names) == 174
    assert mirror_pairs(names) == [(86, 87), (93, 94), (166, 167)]  # SPEC section 7, 0-based
    assert names[86] == "Pulling something from left to right" and names[87] == "Pulling something from right to left"
    assert names[166] == "Turning the camera left while filming something"
    # 'right' as another word ("pulling it right out") has no mirror class: it pairs with nothing
    assert any("right out" in n for n in names)
    table = swap_table(names)
    assert [i for i, j in enumerate(table) if i != j] == [86, 87, 93, 94, 166, 167]
    assert all(table[table[i]] == i for i in range(len(names)))
    for other in ("k400", "ucf101", "hmdb51"):
        assert mirror_pairs(builtin_classnames(other)) == []


def test_the_rule_reads_names_not_positions():
    assert mirror_name("Left hand moves right") == "Right hand moves left"
    assert mirror_name("bright leftover") == "bright leftover"  # whole words only
    shuffled = ["b from right to left", "x", "b from left to right", "Left turn", "right turn", "Right turn"]
    assert mirror_pairs(shuffled) == [(0, 2), (3, 5)]  # case kept: 'right turn' is no mirror of 'Left turn'
    # the sense of a rotation mirrors too, in any of its spellings; 'counter-clockwise' is one word
    assert mirror_name("a rotating clockwise") == "a rotating counter-clockwise"
    assert mirror_name("a rotating counter-clockwise") == "a rotating clockwise"
    assert mirror_name("Clockwise turn to the left") == "Counter-clockwise turn to the right"
    spun = ["b anticlockwise", "a clockwise", "c counterclockwise", "b clockwise", "a counter-clockwise", "c clockwise"]
    assert mirror_pairs(spun) == [(0, 3), (1, 4), (2, 5)]
    assert mirror_pairs(["d clockwise", "d clockwise spin"]) == []
    assert flip_label(0, True, swap_table(shuffled)) == 2 and flip_label(0, False, swap_table(shuffled)) == 0
    assert flip_label(1, True, swap_table(shuffled)) == 1 and flip_label(3, True, None) == 3
    np.testing.assert_array_equal(flip_labels([0, 2, 1, 0], [True, True, True, False], swap_table(shuffled)),
                                  [2, 0, 1, 0])


def test_datasets_register_whether_flips_swap_labels():
    assert get_dataset("ssv2").flip_swaps
    assert get_dataset("demo").flip_swaps  # its rotations mirror (tests/test_demo_data.py)
    assert not any(get_dataset(n).flip_swaps for n in ("k400", "ucf101", "hmdb51", "custom"))


def test_view_label_keeps_a_mirror_outside_the_class_selection():
    swap = LabelSwap((1, 0, 2), 0)
    assert view_label(0, True, swap) == 1 and view_label(0, False, swap) == 0
    assert view_label(0, True, swap, {0: 5, 1: 6}) == 6
    assert view_label(0, True, swap, {0: 5}) == 5  # class 1 not selected: no class to swap to
    assert view_label(0, True, None, {0: 5}) == 5


def test_a_cache_made_before_the_flag_swaps_for_ssv2_and_demo_only():
    old = {"name": "ssv2", "classes": MIRROR_CLASSES}
    assert DatasetMeta.from_dict(old).swap_table() == (1, 0, 2, 3)
    assert DatasetMeta.from_dict({**old, "name": "custom"}).swap_table() is None
    assert DatasetMeta.from_dict({**old, "name": "demo"}).swap_table() == (1, 0, 2, 3)  # registered since
    assert DatasetMeta.from_dict({**old, "flip_swaps": False}).swap_table() is None
    assert DatasetMeta(name="x", classes=MIRROR_CLASSES, flip_swaps=True).swap_table() == (1, 0, 2, 3)
    assert "flip_swaps" not in DatasetMeta(name="x", classes=MIRROR_CLASSES).to_dict()  # other caches unchanged


# ----------------------------------------------------------------------------- stage two
@pytest.fixture(scope="module")
def mirror_spec(demo_small, tmp_path_factory):
    classes = tmp_path_factory.mktemp("mirror") / "classes.txt"
    classes.write_text("\n".join(MIRROR_CLASSES) + "\n")
    spec = load_dataset("mirror-test", video_root=demo_small.video_root, train_list=demo_small.train_list,
                        val_list=demo_small.val_list, classes=classes)
    assert spec.flip_swaps and spec.classes == MIRROR_CLASSES
    return spec


def _bank(spec, out):
    return extracted_store(spec, out, frames=4, train_aug=K, layers="none", text="none", shard_size=5)


@pytest.fixture(scope="module")
def mirror_bank(mirror_spec, tmp_path_factory):
    return _bank(mirror_spec, tmp_path_factory.mktemp("mbank") / "cache")


def _drawn(ds, store, idx, epoch):
    """(view drawn, label) of each training item of ``ds`` in ``epoch``, the view told by its embedding."""
    views = store.read("train", "frame_emb", idx)  # (N, K, T, E)
    ds.set_epoch(epoch, seed=0)
    out = []
    for i, item in enumerate(ds if isinstance(ds, CacheSplit) else ds.ordered()):
        match = [k for k in range(K) if np.array_equal(item["frame_emb"].numpy(), views[i, k])]
        assert len(match) == 1
        out.append((match[0], int(item["label"])))
    return out


def test_flipped_views_of_mirrored_classes_read_the_mirror_label(mirror_bank, tmp_path):
    from cache.wds import export_wds
    from stages.data.loader import train_loader
    from stages.data.wds_split import open_wds_source

    st = mirror_bank
    assert st.meta["dataset"]["flip_swaps"] is True and st.info.dataset.swap_table() == (1, 0, 2, 3)
    idx = select_videos(st, "train")
    labels = st.labels("train")[idx]
    flips = st.read("train", "view_params", idx)[..., FLIP] > 0.5  # (N, K)
    mirrored = np.isin(labels, [0, 1])
    assert flips[mirrored].any() and (~flips[mirrored]).any() and flips[~mirrored].any()
    inputs = HeadInputs(st, DataKeys(frame_emb=True), "train")
    ds = CacheSplit(st, inputs, idx, train=True)
    lazy = CacheSplit(st, inputs, idx, train=True, preload=False)
    export_wds(st, tmp_path, name="m", shard_bytes="40KB")
    src = open_wds_source(str(tmp_path / "m-header.json"), shuffle=0)
    streamed = src.split_dataset(HeadInputs(src, DataKeys(frame_emb=True), "train"), idx, train=True)
    swapped = kept_flipped = 0
    for epoch in range(6):
        drawn = _drawn(ds, st, idx, epoch)
        for i, (view, label) in enumerate(drawn):
            flipped = bool(flips[i, view])
            want = {0: 1, 1: 0}.get(int(labels[i]), int(labels[i])) if flipped else int(labels[i])
            assert label == want, (epoch, i, view)
            swapped += label != labels[i]
            kept_flipped += flipped and not mirrored[i]
        assert _drawn(streamed, st, idx, epoch) == drawn  # WebDataset: the same view, the same label
        lazy.set_epoch(epoch, seed=0)
        plan = [list(range(s, min(s + 5, len(idx)))) for s in range(0, len(idx), 5)]
        got = torch.cat([b["label"] for b in train_loader(lazy, plan, "cpu", masked=False)])
        assert got.tolist() == [label for _, label in drawn]  # the batch loader reads the drawn view's label
    assert swapped > 0 and kept_flipped > 0
    # evaluation: every view, the video's own label
    ev = CacheSplit(st, inputs, idx, train=False)
    assert [int(ev[i]["label"]) for i in range(len(idx))] == labels.tolist()


def test_stage_two_says_so(mirror_bank, demo_small, tmp_path):
    from stages.train import resolve_train

    lines = resolve_train("tap", "quick", cache=str(mirror_bank.path)).lines
    assert any("flipped view of a mirror class trains with its mirror's label (classes 0/1)" in x for x in lines)
    plain = extracted_store(demo_small.root, tmp_path / "plain", frames=4, layers="none", text="none")
    assert not any("flipped view" in x for x in resolve_train("tap", "quick", cache=str(plain.path)).lines)


def test_a_dataset_whose_flips_swap_nothing_reads_its_labels_as_before(demo_small, tmp_path):
    spec = load_dataset("custom", video_root=demo_small.video_root, train_list=demo_small.train_list,
                        val_list=demo_small.val_list, classes=demo_small.root / "classes.txt")
    assert not spec.flip_swaps
    st = _bank(spec, tmp_path / "plain")
    assert "flip_swaps" not in st.meta["dataset"] and st.info.dataset.swap_table() is None
    # the demo swaps, but these four classes have no mirror among them ('moving right' without 'left')
    demo = DatasetMeta(name="demo", classes=spec.classes, flip_swaps=True)
    assert get_dataset("demo").flip_swaps and demo.swap_table() is None
    idx = select_videos(st, "train")
    ds = CacheSplit(st, HeadInputs(st, DataKeys(frame_emb=True), "train"), idx, train=True)
    assert ds.view_labels is None
    flips = st.read("train", "view_params", idx)[..., FLIP] > 0.5
    assert flips.any()
    for epoch in range(3):
        assert [label for _, label in _drawn(ds, st, idx, epoch)] == st.labels("train")[idx].tolist()


# ----------------------------------------------------------------------------- stage three
def test_stage_three_swaps_the_label_of_each_mirrored_clip(mirror_spec):
    from stages.augment import AugmentCfg
    from stages.finetune import VideoClips
    from stages.video import SamplingCfg

    items = mirror_spec.splits["train"]
    table = swap_table(mirror_spec.classes)
    samp = SamplingCfg(4, "segment", 8, 1, 1)

    def clips(p):
        aug = AugmentCfg(flip=p, jitter=0.0, grayscale=0.0, scale_min=0.5)
        return VideoClips(items, samp, 32, train=True, seed=7, aug=aug, swaps=table)

    half, always, never = clips(0.5), clips(1.0), clips(0.0)
    seen = set()
    for epoch in range(3):
        for ds in (half, always, never):
            ds.set_epoch(epoch)
        for i, item in enumerate(items):
            h, a, n = half[i], always[i], never[i]
            assert torch.equal(a["video"], n["video"].flip(-1))
            assert int(a["label"]) == table[item.label] and int(n["label"]) == item.label
            if torch.equal(a["video"], n["video"]):
                continue  # a crop that is its own mirror (the demo's flat regions): the pixels cannot tell
            # the flip draws one number where torchvision's did: the other draws are the same at any p,
            # so the p = 0.5 clip is the p = 1 clip when it was mirrored and the p = 0 clip when not
            flipped = torch.equal(h["video"], a["video"])
            assert flipped != torch.equal(h["video"], n["video"])
            assert int(h["label"]) == flip_label(item.label, flipped, table)
            seen.add((item.label in (0, 1), flipped))
    assert seen == {(True, True), (True, False), (False, True), (False, False)}
    plain = VideoClips(items, samp, 32, train=True, seed=7, aug=AugmentCfg(flip=1.0, jitter=0.0, grayscale=0.0))
    assert [int(plain[i]["label"]) for i in range(len(items))] == [it.label for it in items]  # no swap table


@pytest.mark.parametrize("recipe", ["quick", "text4vis", "actionclip"])
def test_stage_three_augmentation_is_the_pixels_torchvisions_flip_gave(recipe):
    """The flip moved out of torchvision's RandomHorizontalFlip draws the same number at the same place:
    every augmented clip is byte for byte what the former pipeline made."""
    from torchvision.transforms import v2

    from stages.augment import AugmentCfg, HorizontalFlip, augment_clip, augment_clip_flip, build_train_transform
    from stages.recipes import stage_three_recipe

    cfg = AugmentCfg(**(stage_three_recipe(recipe, "paper").augment if recipe != "quick" else {}))
    new = build_train_transform(32, cfg)
    old = v2.Compose([v2.RandomHorizontalFlip(t.p) if isinstance(t, HorizontalFlip) else t for t in new.transforms])
    assert sum(isinstance(t, HorizontalFlip) for t in new.transforms) == 1
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, size=(4, 40, 52, 3), dtype=np.uint8)
    flips = set()
    for seed in range(12):
        got, flipped = augment_clip_flip(clip, new, [seed, 0, seed, 1])
        assert torch.equal(got, augment_clip(clip, old, [seed, 0, seed, 1])), seed
        flips.add(flipped)
    assert flips == {True, False}


def test_stage_three_takes_the_swaps_from_the_dataset(mirror_spec, demo_small):
    from stages.finetune import DistContext, FinetuneCfg, Finetuner

    cfg = FinetuneCfg(paradigm="text4vis", model="tiny", frames=4, epochs=1, batch_size=4, workers=0)
    lines: list[str] = []
    tuner = Finetuner(mirror_spec, cfg, {"layers": "1", "pos_rows": "8"}, dist_ctx=DistContext(),
                      log=lambda *a: lines.append(" ".join(map(str, a))))
    assert tuner.train_data.swaps == (1, 0, 2, 3) and tuner.eval_data.swaps is None
    assert any("mirror class's label" in ln and "0/1" in ln for ln in lines), lines
    plain = load_dataset("demo", data_root=demo_small.root)
    lines.clear()
    tuner = Finetuner(plain, cfg, {"layers": "1", "pos_rows": "8"}, dist_ctx=DistContext(),
                      log=lambda *a: lines.append(" ".join(map(str, a))))
    assert tuner.train_data.swaps is None and not any("mirror" in ln for ln in lines)


def test_stage_three_tests_ssv2_with_the_paradigms_ssv2_protocol(mirror_spec, tmp_path):
    """`finetune --dataset ssv2` under the paper recipe: Text4Vis evaluates with its SSv2 protocol
    (4 x 3 views of frames resized to 240 x 320), pixel for pixel the views stage one caches with
    that resize; other datasets, and ActionCLIP (no SSv2 protocol), keep the short-side rule."""
    from cache.errors import ConfigError
    from stages.finetune import DistContext, FinetuneCfg, Finetuner, resolve_finetune

    r = resolve_finetune("text4vis", "paper", dataset="ssv2")
    assert (r.cfg.resize_to, r.cfg.views, r.cfg.sampling) == ("240x320", "4x3", "segment-start")
    assert any("frames resized to 240 x 320 (protocol text4vis-ssv2)" in ln for ln in r.lines), r.lines
    for paradigm, dataset in (("text4vis", "k400"), ("text4vis", ""), ("actionclip", "ssv2")):
        assert resolve_finetune(paradigm, "paper", dataset=dataset).cfg.resize_to == ""
    assert resolve_finetune("text4vis", "quick", dataset="ssv2").cfg.resize_to == ""
    with pytest.raises(ConfigError, match="HxW"):
        resolve_finetune("text4vis", "paper", dataset="ssv2", sets=["resize_to=240"])

    st = extracted_store(mirror_spec, tmp_path / "cache", frames=4, sampling="segment-start", views="2x3",
                         resize_to="40x48", store_frames=True, layers="none", text="none")
    head = {"layers": "1", "pos_rows": "8"}
    cfg = FinetuneCfg(paradigm="text4vis", model="tiny", frames=4, sampling="segment-start", views="2x3",
                      resize_to="40x48", epochs=0, batch_size=4, workers=0)
    clips = Finetuner(mirror_spec, cfg, head, dist_ctx=DistContext(), log=lambda *a: None).eval_data
    short = Finetuner(mirror_spec, FinetuneCfg(**{**cfg.__dict__, "resize_to": ""}), head, dist_ctx=DistContext(),
                      log=lambda *a: None).eval_data
    assert [it.path for it in clips.items] == [path for path, _ in st.items("val")]
    for i in range(2):
        item = clips[i]
        assert item["valid"] and item["video"].shape == (6, 4, 3, 32, 32)
        np.testing.assert_array_equal(item["video"].permute(0, 1, 3, 4, 2).numpy(), st.read("val", "frames", i))
        assert not torch.equal(item["video"], short[i]["video"])  # the short-side rule gives other pixels


def test_online_fresh_views_that_flip_read_the_mirror_label(mirror_bank):
    """train --online: a fresh mirrored view of a left/right class trains with its mirror's label
    (the cache records the dataset's swaps), any other view or class keeps its own."""
    from stages.data.online import OnlineSplit
    from stages.data.zarr_split import check_cache_for_head
    from stages.train import build_head
    from stages.video import AugViewCfg

    st = mirror_bank
    head = build_head("tap", st, {})
    inputs = check_cache_for_head(st, head.data_keys(), "tap", ["train"])["train"]
    idx = select_videos(st, "train")
    ds = OnlineSplit(st, inputs, idx, AugViewCfg())
    stored = st.labels("train")[idx]
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch, 0)
        for i in range(len(ds)):
            _, flipped = ds.view(i)
            want = flip_label(int(stored[i]), flipped, (1, 0, 2, 3))
            assert int(ds[i]["label"]) == want
            seen.add((int(stored[i]) in (0, 1), flipped))
    assert seen == {(True, True), (True, False), (False, True), (False, False)}  # the test can tell them apart
