"""The papers' test protocols frame by frame (stages/recipes.py `--protocol`, stages/video.py).

The clips a protocol samples are read back from the index drawn into every frame of a real
encoded video and compared with the frames the paper's own test code takes, worked out by hand
below; the views are stacked crop by crop, as that code stacks them; and a protocol cache holds
exactly those views.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.errors import ConfigError
from conftest import demo_args, run_cli
from framecode import indices, write_video
from stages.recipes import get_protocol
from stages.video import SamplingCfg, decode_video, layout_key, make_views, parse_views, resize_frames


def _sampling(name: str) -> SamplingCfg:
    p = get_protocol(name)
    clips, crops = parse_views(p.views)
    return SamplingCfg(p.frames, p.sampling, p.stride, clips, crops)


def _dense(start: int) -> list[int]:
    return list(range(start, start + 8 * 16, 16))


# 0-based frame indices of each test clip.
# EVL (150 frames, 8 x stride 16): span 113, slack 37, starts round(37 / 2 * c) = 0, 18 (18.5 rounds
# to even, as Python's round in its code), 37: the first and last possible starts and the middle.
# Side4Video and Text4Vis (100 frames, 8 segments of 12.5): clip offsets int(linspace(0, 11.5, 4)) =
# 0, 3, 7, 11 and frame int(offset + 12.5 t).
_TSN4 = [[int(o + 12.5 * t) for t in range(8)] for o in (0, 3, 7, 11)]
EXPECTED = {
    "evl": (150, [_dense(0), _dense(18), _dense(37)]),
    "side4video": (100, _TSN4),
    "text4vis": (100, _TSN4),
    # one clip at the segment centres, int((t + 1/2) * 10); its `differs` line names ActionCLIP's
    # own rule, one frame earlier here
    "actionclip": (80, [[5, 15, 25, 35, 45, 55, 65, 75]]),
    # Side4Video on SSv2 (100 frames): segments of 99 / 8 = 12.375, clip c adds int(12.375 / 3 * (c + 1))
    # = 4, 8 to round(12.375 t) = 0, 12, 25, 37, 50, 62, 74, 87 (round half to even: 61.875 -> 62)
    "side4video-ssv2": (100, [[4, 16, 29, 41, 54, 66, 78, 91], [8, 20, 33, 45, 58, 70, 82, 95]]),
    "text4vis-ssv2": (100, _TSN4),  # its SSv2 test changes only the scale
}


def test_expected_indices_as_written_out():
    assert _TSN4 == [[0, 12, 25, 37, 50, 62, 75, 87], [3, 15, 28, 40, 53, 65, 78, 90],
                     [7, 19, 32, 44, 57, 69, 82, 94], [11, 23, 36, 48, 61, 73, 86, 98]]
    assert EXPECTED["evl"][1][1] == [18, 34, 50, 66, 82, 98, 114, 130]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_protocol_clips_are_the_papers_frames(tmp_path, name):
    n, want = EXPECTED[name]
    path = write_video(tmp_path / "v.mp4", "h264", n=n)
    out = decode_video(str(path), _sampling(name))
    assert [indices(clip) for clip in out.clips] == want  # read from the pixels, not from the sampler
    assert [list(i) for i in out.indices] == want


def test_evl_clips_span_the_whole_slack_not_its_middle(tmp_path):
    """The former rule put 3 dense clips at 1/6, 1/2, 5/6 of the slack; EVL's starts are 0, 1/2, 1."""
    path = write_video(tmp_path / "v.mp4", "h264", n=150)
    starts = [clip[0] for clip in decode_video(str(path), _sampling("evl")).indices]
    assert starts == [0, 18, 37] and starts != [6, 18, 30]


def test_short_video_repeats_its_last_frame_in_every_dense_clip(tmp_path):
    path = write_video(tmp_path / "short.mp4", "h264", n=100)  # shorter than EVL's span of 113
    out = decode_video(str(path), _sampling("evl"))
    want = [min(16 * t, 99) for t in range(8)]
    assert [indices(clip) for clip in out.clips] == [want] * 3


def test_views_are_stacked_crop_by_crop():
    """4 clips x 3 crops: view s * 4 + c is crop s of clip c (all clips of the left crop first), the
    order of Side4Video's / Text4Vis's / EVL's test code. Each clip is one grey level, each third
    of the width another, so every view says which clip and which crop it is."""
    C, S, size = 4, 3, 32
    clips = []
    for c in range(C):
        clip = np.zeros((2, size, 3 * size, 3), np.uint8)
        for s in range(S):
            clip[:, :, s * size:(s + 1) * size] = 60 * s + 10 * c + 5
        clips.append(clip)
    views = make_views(clips, size, S)
    assert views.shape == (C * S, 2, size, size, 3)
    got = [int(v[0, size // 2, size // 2, 0]) for v in views]
    assert got == [60 * s + 10 * c + 5 for s in range(S) for c in range(C)]


def test_layout_changes_only_the_keys_of_caches_it_changes():
    assert layout_key("segment", [(1, 1), (1, 1)]) == {}
    assert layout_key("dense", [(1, 1)]) == {}                      # one clip: the same middle start
    assert layout_key("segment", [(1, 3)]) == {}                    # one clip: order unchanged
    assert layout_key("dense", [(3, 1)]) == {"dense_starts": "spread"}
    assert layout_key("segment-start", [(4, 3)]) == {"view_order": "crop-major"}


def test_side4video_protocol_cache_holds_the_papers_views(demo_small, tmp_path):
    """`extract --protocol side4video`: 12 val views per video, stored crop by crop from the
    segment-start clips, scaled to 256/224 of the crop (37 px for the tiny model's 32) first."""
    from cache.store import open_store

    out = tmp_path / "cache"
    proc = run_cli(*demo_args(demo_small, out, "--protocol", "side4video", "--layers", "none", "--text", "none",
                              "--frames-uint8"), check=True)
    assert "protocol side4video: 8 frames, segment-start sampling, 4x3 views" in proc.stdout
    st = open_store(out)
    assert st.meta["views"]["val"] == {"clips": 4, "crops": 3}
    assert st.meta["content"]["view_order"] == "crop-major"
    path = st.items("val")[0][0]
    decoded = decode_video(path, _sampling("side4video"))
    want = make_views(decoded.clips, 32, 3, 37)
    np.testing.assert_array_equal(st.read("val", "frames", 0), want)
    # the demo's 8-frame videos give 4 equal clips: crop-major order puts 4 equal views first
    frames = st.read("val", "frames", 0)
    assert all(np.array_equal(frames[c], frames[0]) for c in range(4)) and not np.array_equal(frames[0], frames[4])


def test_ssv2_protocols_resize_frames_to_a_fixed_size_then_crop():
    """Side4Video tests SSv2 on frames resized to 256 x 320 (H x W), Text4Vis on 240 x 320, whatever
    the video's aspect ratio; the 3 crops of 224 then sit at x 0, 48, 96 (where TSN's
    GroupFullResSample puts them) and mid-height."""
    assert (get_protocol("side4video-ssv2").resize_to, get_protocol("text4vis-ssv2").resize_to) == ("256x320", "240x320")
    assert get_protocol("side4video-ssv2").views == "2x3" and get_protocol("side4video-ssv2").eval_average == "scores"
    assert get_protocol("text4vis-ssv2").eval_average == "embeddings"
    rng = np.random.default_rng(1)
    clips = [rng.integers(0, 256, size=(2, 90, 200, 3), dtype=np.uint8) for _ in range(2)]  # 20:9, not 5:4
    for (h, w) in ((256, 320), (240, 320)):
        views = make_views(clips, 224, 3, frame_size=(h, w))
        assert views.shape == (6, 2, 224, 224, 3)
        y = (h - 224) // 2
        for s, x in enumerate((0, 48, 96)):
            for c in range(2):
                whole = resize_frames(torch.from_numpy(clips[c]), h, w).numpy()
                assert whole.shape == (2, h, w, 3)
                np.testing.assert_array_equal(views[s * 2 + c], whole[:, y:y + 224, x:x + 224])


def test_ssv2_protocol_cache_records_its_resize_and_other_keys_stay(demo_small, tmp_path):
    """`extract --protocol side4video-ssv2`: 2 x 3 val views from 256 x 320 frames; the cache records
    the resize (key, metadata, `cache info`, the rebuilding command); a cache without it keeps its key."""
    from cache.store import open_store
    from stages.extract import ExtractCfg, plan_extraction

    out = tmp_path / "cache"
    proc = run_cli(*demo_args(demo_small, out, "--protocol", "side4video-ssv2", "--layers", "none", "--text", "none",
                              "--frames-uint8"), check=True)
    assert "protocol side4video-ssv2: 8 frames, segment-interior sampling, 2x3 views, frames resized to 256x320" \
        in proc.stdout
    st = open_store(out)
    assert st.meta["resize_to"] == [256, 320] and st.meta["content"]["resize_to"] == [256, 320]
    assert st.meta["views"]["val"] == {"clips": 2, "crops": 3} and st.meta["config"]["resize_to"] == "256x320"
    path = st.items("val")[0][0]
    want = make_views(decode_video(path, _sampling("side4video-ssv2")).clips, 32, 3, frame_size=(256, 320))
    np.testing.assert_array_equal(st.read("val", "frames", 0), want)
    info = run_cli("cache", "info", str(out), check=True).stdout
    assert "resize    frames to 256x320 (H x W) before the crops" in info and "protocol  side4video-ssv2" in info
    assert "--resize-to 256x320" in info and "--protocol side4video-ssv2" in info
    from pipeline.datasets import load_dataset

    spec = load_dataset("demo", data_root=demo_small.root)
    plain = plan_extraction(spec, ExtractCfg(model="tiny", text="none"), out=tmp_path / "p")
    assert "resize_to" not in plain.meta.to_dict() and "resize_to" not in plain.meta.to_dict()["config"]
    assert "resize_to" not in plain.meta.content.to_dict()
    other = plan_extraction(spec, ExtractCfg(model="tiny", text="none", resize_to="40x48"), out=tmp_path / "q")
    assert other.key != plain.key
    for bad, msg in (({"resize_to": "40x48", "resize_ratio": 1.5}, "give one"),
                     ({"resize_to": "16x48"}, "smaller than"), ({"resize_to": "40"}, "HxW")):
        with pytest.raises(ConfigError, match=msg):
            plan_extraction(spec, ExtractCfg(model="tiny", text="none", **bad), out=tmp_path / "r")


def test_for_head_on_ssv2_takes_the_papers_ssv2_protocol():
    """`extract --for-head H --dataset ssv2`: the protocol the paper tests SSv2 with where it
    registers one (HEAD-ssv2), the head's own elsewhere; two SSv2 protocols on other views refuse."""
    from stages.recipes import protocol_for_heads

    assert protocol_for_heads(["side4video"], "ssv2") == "side4video-ssv2"
    assert protocol_for_heads(["text4vis"], "ssv2") == "text4vis-ssv2"
    assert protocol_for_heads(["side4video"], "k400") == "side4video"
    assert protocol_for_heads(["side4video"]) == "side4video"
    assert protocol_for_heads(["evl"], "ssv2") == "evl"  # EVL registers no SSv2 protocol
    with pytest.raises(ConfigError, match="test on different frames"):
        protocol_for_heads(["side4video", "text4vis"], "ssv2")
