"""The cache metadata as types (cache/meta.py): exact round trips, old caches, the cache key."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

import numpy as np
import pytest

from cache.datasets import DatasetSpec, VideoItem
from cache.errors import CacheError
from cache.meta import SCHEMA_VERSION, CacheMeta, ExtractRecord, Preprocess, extract_command, key_content
from cache.source import ArraySpec
from cache.store import create_store, open_store

ROOT = "/data/vids"


def _spec() -> DatasetSpec:
    """A fixed request: paths under the video root (recorded relative) and one outside it."""
    return DatasetSpec("custom", ["clap", "jump", "wave"],
                       {"train": [VideoItem(f"{ROOT}/a{i}.mp4", i % 3) for i in range(5)]
                        + [VideoItem("/elsewhere/frames7", 1, 40)],
                        "val": [VideoItem(f"{ROOT}/v{i}.mp4", i % 3) for i in range(4)]},
                       ROOT, {"train": "/lists/train.txt", "val": "/lists/val.txt"}, {"video_root": ROOT})


# The keys plan_extraction gave these requests before the key moved to cache/meta.py (computed
# with that code, PREPROCESS_VERSION 2): a cache made then must keep its key.
CASES = {
    "default": ({}, "e76e5463aa64e011"),
    "rich": (dict(layers="all", patch=True, store_frames=True, dtype="int8", sampling="dense", stride=2, frames=4,
                  views="2x3", text="clip_single"), "45f6a01b487f2700"),  # re-keyed on purpose: dense
    # test clips now spread from the first to the last start and views are crop-major (was 82fe797b4f8f7e03)
    "viewbank": (dict(train_aug=3, aug_seed=5, aug_area=0.3), "6548f723bff029f0"),
    "resize": (dict(resize_ratio=256 / 224, text="none"), "1f339bb36d72e23d"),
    "protocol": (dict(protocol="text4vis"), "e76e5463aa64e011"),  # a protocol is recorded, not keyed
}
KEYED_WITH_PREPROCESS = 2


def _plan(tmp_path, **cfg):
    from stages.extract import ExtractCfg, plan_extraction

    return plan_extraction(_spec(), ExtractCfg(model="tiny", **cfg), out=tmp_path / "cache")


@pytest.mark.parametrize("case", sorted(CASES))
def test_keys_are_the_keys_caches_had(case, tmp_path):
    from stages.extract import PREPROCESS_VERSION

    cfg, before = CASES[case]
    assert PREPROCESS_VERSION == KEYED_WITH_PREPROCESS, \
        "PREPROCESS_VERSION changed: every cache key changes with it; record the new keys in CASES"
    plan = _plan(tmp_path, **cfg)
    assert plan.key == before
    assert plan.meta.key == before and plan.meta.content.key() == before
    # what is stored recomputes to the stored key
    again = CacheMeta.from_dict(json.loads(json.dumps(plan.meta.to_dict())))
    assert again.content.key() == again.key == before


def test_key_content_direct():
    """The key from explicit inputs (no stage one): what --frames-uint8 / dense / views change."""
    base = dict(preprocess_version=2, model="clipcache-tiny", weights="random-init:seed=0",
                clip={"activation": "gelu", "activation_from": "anything", "resize": "short_side_then_square_crop",
                      "interpolation": "bicubic_antialias"},
                layers=(1, 2), patch=False, frames_stored=False, frames=8, sampling="segment", stride=8,
                views={"train": (1, 1), "val": (1, 1)}, image_size=32, dtype="fp16",
                text_sets=["clip_single", "clip_text4vis", "clip_actionclip", "clip_classname", "minilm"])
    assert key_content(_spec(), **base).key() == CASES["default"][1]
    # where the activation was learnt from is not part of the key; a stride is, only when dense
    assert key_content(_spec(), **{**base, "clip": {**base["clip"], "activation_from": "x"}}).key() \
        == CASES["default"][1]
    assert key_content(_spec(), **{**base, "stride": 2}).key() == CASES["default"][1]
    assert key_content(_spec(), **{**base, "sampling": "dense"}).key() != CASES["default"][1]
    assert "resize_short_side" not in key_content(_spec(), **base).to_dict()
    assert key_content(_spec(), **base, resize_short_side=37).to_dict()["resize_short_side"] == 37
    # a moved dataset (same files under another root) keeps its key; another list does not
    moved = _spec()
    moved.video_root = "/mnt/other"
    moved.splits = {s: [VideoItem(it.path.replace(ROOT, "/mnt/other"), it.label, it.num_frames) for it in items]
                    for s, items in moved.splits.items()}
    assert key_content(moved, **base).key() == CASES["default"][1]
    moved.splits["val"] = moved.splits["val"][:3]
    assert key_content(moved, **base).key() != CASES["default"][1]


def test_plan_metadata_round_trips_and_is_typed(tmp_path):
    plan = _plan(tmp_path, **CASES["viewbank"][0])
    meta = plan.meta
    d = meta.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON
    assert CacheMeta.from_dict(d).to_dict() == d and CacheMeta.from_dict(d) == meta
    assert d["schema"] == SCHEMA_VERSION and "preprocess" not in d  # set when the model is loaded
    assert meta.dims.depth == 2 and meta.dims.num_classes == 3 and meta.layers == [1, 2]
    assert meta.view_bank.views == 3 and meta.view_bank.split == "train" and meta.view_bank.area == [0.3, 1.0]
    assert meta.views["train"].clips == 3 and meta.views["val"].crops == 1
    assert meta.config.train_aug == 3 and meta.dataset.classes == ["clap", "jump", "wave"]
    assert meta.backbone.arch == "clipcache-tiny" and meta.backbone.weights == "random-init:seed=0"
    assert meta.protocol is None and d["protocol"] is None  # written as null, as before
    plain = _plan(tmp_path).meta.to_dict()
    assert "view_bank" not in plain and "view_bank" not in plain["content"]
    meta.preprocess = Preprocess(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], image_size=32)
    assert meta.to_dict()["preprocess"] == {"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}


def test_extract_record_is_extract_cfg():
    """The recorded request has ExtractCfg's fields and defaults: what a cache made before a
    field existed was made with."""
    from stages.extract import ExtractCfg

    assert ExtractRecord().to_dict() == dataclasses.asdict(ExtractCfg())
    cfg = ExtractCfg(frames=4, train_aug=2, protocol="evl")
    assert ExtractRecord.from_dict(dataclasses.asdict(cfg)) == ExtractRecord(frames=4, train_aug=2, protocol="evl")


def _old_meta() -> dict:
    """The metadata of a cache made by the first version (before the recorded load_dataset
    arguments, CLIP identity, resize, view bank, protocol, checksums and schema)."""
    content = {"classes": "dbc5b350eca23e8168c416a741bfdc93df4f58aea74c7cb81a0b0c8dbdb807ec", "dataset": "custom",
               "dtype": "fp16", "format": 1, "frames_stored": False, "image_size": 32, "layers": [1, 2],
               "lists": {"train": "7e6de3677e47b4ee905d59efd60e542fb83e402550fb7f7cd73cfbea926038af",
                         "val": "4ce21ae5edab333a0ba90eb37a5aa3d5f1bdad1bb45e3d77c8e27acba9426565"},
               "model": "clipcache-tiny", "patch": False, "preprocess": 2,
               "sampling": {"frames": 8, "mode": "segment", "stride": None},
               "text": ["clip_single"], "views": {"train": [1, 1], "val": [1, 1]}, "weights": "random-init:seed=0"}
    key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]  # the key rule then
    return {
        "key": key, "content": content,
        "config": {"model": "tiny", "pretrained": "", "init_seed": 0, "frames": 8, "sampling": "segment", "stride": 8,
                   "layers": "last4", "patch": False, "store_frames": False, "views": "1x1", "train_views": "1x1",
                   "dtype": "fp16", "text": "clip_single", "batch_frames": 128, "workers": -1, "shard_size": 0,
                   "device": "auto"},
        "dataset": {"name": "custom", "video_root": ROOT, "sources": {"train": "/lists/train.txt"},
                    "classes": ["clap", "jump", "wave"]},
        "backbone": {"arch": "clipcache-tiny", "pretrained": "", "weights": "random-init:seed=0", "embed_dim": 32,
                     "width": 64, "depth": 2, "backbone_heads": 2, "image_size": 32, "patch_size": 8,
                     "num_patches": 16},
        "dims": {"num_classes": 3, "embed_dim": 32, "width": 64, "frames": 8, "num_patches": 16, "depth": 2,
                 "backbone_heads": 2, "image_size": 32, "patch_size": 8},
        "layers": [1, 2], "views": {"train": {"clips": 1, "crops": 1}, "val": {"clips": 1, "crops": 1}},
        "dtype": "fp16", "int8_outliers": 4, "text_sets": ["clip_single"],
        "versions": {"torch": "2.5.1", "open_clip": "2.29.0", "zarr": "3.0.1", "python": "3.11.9"},
        "preprocess": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                       "image_size": 32},
        "format_version": 1, "shard_size": 4,
        "splits": {"train": {"num_videos": 5, "arrays": [{"name": "frame_emb", "shape": [1, 8, 32],
                                                          "dtype": "float16", "layer_axis": None}]}},
    }


def test_old_metadata_opens_with_defaults_and_round_trips():
    old = _old_meta()
    meta = CacheMeta.from_dict(copy.deepcopy(old))
    assert meta.to_dict() == old  # nothing added, nothing lost
    assert meta.content.key() == meta.key == "1a638c164d768be8"
    assert meta.dataset.args == {} and meta.protocol is None and meta.view_bank is None
    assert meta.resize_short_side is None and meta.integrity == 0 and meta.schema == 1
    assert meta.backbone.activation == "" and meta.content.clip == {}
    assert meta.config.train_aug is None and meta.config.resize_ratio == 1.0 and meta.config.activation == "auto"
    assert meta.splits["train"].num_videos == 5 and meta.preprocess.image_size == 32
    # the command that remakes it prints what the old cache recorded, nothing it did not
    assert extract_command(meta) == extract_command(old)
    assert "--aug-seed" not in extract_command(meta) and "--text clip_single" in extract_command(meta)


def test_unknown_keys_are_kept():
    """Metadata from a newer minor version (same schema): unknown keys survive a round trip."""
    new = _old_meta()
    new["future"] = {"a": 1}
    new["dims"]["num_frames_in_video"] = 300
    new["backbone"]["quant"] = "w8"
    meta = CacheMeta.from_dict(copy.deepcopy(new))
    assert meta.to_dict() == new
    assert meta.extra == {"future": {"a": 1}} and meta.dims.extra == {"num_frames_in_video": 300}


def test_damaged_or_newer_metadata_is_one_clear_error():
    broken = _old_meta()
    del broken["dims"]["depth"]
    with pytest.raises(CacheError, match=r"lacks 'dims\.depth'"):
        CacheMeta.from_dict(broken)
    with pytest.raises(CacheError, match="'views.train' is not a mapping"):
        CacheMeta.from_dict({**_old_meta(), "views": {"train": [1, 1]}})
    with pytest.raises(CacheError, match=r"newer clipcache \(metadata schema 2.*upgrade"):
        CacheMeta.from_dict({**_old_meta(), "schema": SCHEMA_VERSION + 1})


def test_old_cache_on_disk_opens(tmp_path):
    """A store whose zarr.json holds the first version's metadata: it opens, reads typed, and its
    metadata on disk is what it was."""
    old = _old_meta()
    spec = ArraySpec("frame_emb", (1, 8, 32), "float16")
    st = create_store(tmp_path / "old", old, {"train": {"items": [(f"v{i}.mp4", i % 3) for i in range(5)],
                                                        "arrays": [spec]}}, 4)
    stored = json.loads((tmp_path / "old" / "zarr.json").read_text())["attributes"]["clipcache"]
    st = open_store(tmp_path / "old")
    assert st.key == old["key"] and st.info.key == old["key"]
    assert st.info.to_dict() == stored == st.meta
    assert st.info.dims.depth == 2 and st.info.integrity == 1 and st.class_names() == ["clap", "jump", "wave"]
    assert st.specs("train") == {"frame_emb": spec} and st.num_videos("train") == 5
    np.testing.assert_array_equal(st.labels("train"), [0, 1, 2, 0, 1])


def test_store_without_stage_metadata_opens_but_info_says_what_lacks(tmp_path):
    """The store itself needs only its key and layout; the stages' typed view names what is missing."""
    st = create_store(tmp_path / "bare", {"key": "k1"}, {"train": {"items": [("a.mp4", 0)], "arrays": []}}, 1)
    assert st.key == "k1" and st.splits == ["train"] and st.num_videos("train") == 1
    with pytest.raises(CacheError, match=r"bare: cache metadata lacks 'dims'"):
        st.info
