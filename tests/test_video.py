"""Sampling, views and decoding (decord first, PyAV fallback) on real encoded files."""

import av
import numpy as np
import pytest
import torch

from cache.errors import ConfigError, VideoDecodeError
from stages.video import SamplingCfg, clip_indices, decode_clips, make_views, normalize, parse_views


def _write(path, codec="libx264", n=24, w=64, h=48, fmt=None):
    """A bar sliding right by 2 px a frame: frame i's bar starts at x = 2i."""
    c = av.open(str(path), "w", format=fmt)
    s = c.add_stream(codec, rate=8)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for i in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, 2 * i:2 * i + 6] = 255
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def _bar_x(frame):
    cols = frame.mean(axis=(0, 2))
    return int(np.argmax(cols > 128))


def test_segment_sampling_centres_and_clips():
    assert clip_indices(80, SamplingCfg(frames=8)) == [[5, 15, 25, 35, 45, 55, 65, 75]]
    two = clip_indices(80, SamplingCfg(frames=8, clips=2))
    assert two[0] == [2, 12, 22, 32, 42, 52, 62, 72] and two[1] == [7, 17, 27, 37, 47, 57, 67, 77]
    short = clip_indices(3, SamplingCfg(frames=8))[0]
    assert len(short) == 8 and max(short) <= 2 and short == sorted(short)


def test_dense_sampling_stride_and_clamp():
    idx = clip_indices(100, SamplingCfg(frames=4, mode="dense", stride=8))[0]
    assert np.diff(idx).tolist() == [8, 8, 8]
    assert clip_indices(10, SamplingCfg(frames=4, mode="dense", stride=8))[0] == [0, 8, 9, 9]


def test_random_offsets_stay_in_segments():
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = clip_indices(80, SamplingCfg(frames=8), rng)[0]
        assert all(10 * t <= i < 10 * (t + 1) for t, i in enumerate(idx))


def test_parse_views():
    assert parse_views("4x3") == (4, 3)
    for bad in ("4", "4x2", "0x1", "axb"):
        with pytest.raises(ConfigError):
            parse_views(bad)


def test_decord_reads_h264_in_decode_order(tmp_path):
    path = _write(tmp_path / "v.mp4")
    clips, backend = decode_clips(str(path), SamplingCfg(frames=4))
    assert backend == "decord"
    xs = [_bar_x(f) for f in clips[0]]
    # frames 3, 9, 15, 21 (segment centres of 24) -> bar at 2*i (h264 may blur the edge by a pixel)
    assert all(abs(x - 2 * i) <= 1 for x, i in zip(xs, [3, 9, 15, 21])), xs


def test_pyav_fallback_for_av1(tmp_path):
    path = _write(tmp_path / "v_av1.mp4", codec="libsvtav1")
    clips, backend = decode_clips(str(path), SamplingCfg(frames=4))
    assert backend == "pyav"
    xs = [_bar_x(f) for f in clips[0]]
    assert all(abs(x - 2 * i) <= 2 for x, i in zip(xs, [3, 9, 15, 21])), xs


def test_pyav_fallback_holds_only_the_sampled_frames(tmp_path):
    """The PyAV path counts the packets first and then keeps just the sampled frames, so a long
    video that decord cannot read does not fill the memory; the frames equal a plain full decode."""
    import gc

    from stages import video

    path = str(_write(tmp_path / "long_av1.mp4", codec="libsvtav1", n=60))
    live_at_pick = []

    def pick(n):
        gc.collect()
        live_at_pick.append(sum(type(o) is av.VideoFrame for o in gc.get_objects()))
        return clip_indices(n, SamplingCfg(frames=4, clips=2))

    warnings = []
    clips = video._decode_pyav(path, video._probe(path), pick, warnings)
    assert warnings == []
    assert live_at_pick == [0]  # nothing decoded is held when the sample is chosen
    with av.open(path) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    want = clip_indices(len(every), SamplingCfg(frames=4, clips=2))
    assert [c.shape for c in clips] == [(4, 48, 64, 3)] * 2
    for clip, idx in zip(clips, want):
        assert all(np.array_equal(f, every[i]) for f, i in zip(clip, idx))


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated"])
def test_undecodable_files_raise_with_a_reason(tmp_path, kind):
    path = tmp_path / "bad.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "truncated":
        good = _write(tmp_path / "good.mp4").read_bytes()
        path.write_bytes(good[: len(good) // 3])
    with pytest.raises(VideoDecodeError) as err:
        decode_clips(str(path), SamplingCfg(frames=4))
    assert str(err.value)


def test_views_shapes_and_crops():
    clip = np.zeros((4, 60, 120, 3), np.uint8)
    clip[:, :, :40] = 50
    clip[:, :, 80:] = 200
    views = make_views([clip, clip], size=30, crops=3)
    assert views.shape == (6, 4, 30, 30, 3) and views.dtype == np.uint8
    # crop-major: views 0, 1 are the left crop of clips 0, 1; then the centre crops, then the right ones
    left, centre, right = views[0, 0, 15, 15, 0], views[2, 0, 15, 15, 0], views[4, 0, 15, 15, 0]
    assert left < 60 and right > 190 and abs(int(centre)) < 5
    x = normalize(torch.from_numpy(views), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (6, 4, 3, 30, 30) and x.min() >= -1 and x.max() <= 1
