"""Frame-exact decoding on every codec and container, read back from the index drawn into
each frame (tests/framecode.py): whatever reader decodes a file, the frames are the sampled
indices, upright, from FFmpeg's best video stream."""

from __future__ import annotations

import av
import decord
import numpy as np
import pytest

import framecode as fc
from cache.errors import VideoDecodeError
from stages.video import Decoded, SamplingCfg, clip_indices, decode_clips, decode_video

N = 30
GRID = [(codec, cont) for codec, conts in fc.CONTAINERS.items() for cont in conts]
# Sampling modes x view layouts; (cfg, rng seed or None)
MODES = [
    (SamplingCfg(frames=8), None),                                   # segment, test (centre)
    (SamplingCfg(frames=8, clips=3), None),                          # segment, 3 temporal views
    (SamplingCfg(frames=8), 0),                                      # segment, random offsets
    (SamplingCfg(frames=6, clips=2), 7),
    (SamplingCfg(frames=4, mode="dense", stride=3, clips=2), None),  # dense, skipping frames
    (SamplingCfg(frames=5, mode="dense", stride=2), 3),              # dense, random start
    (SamplingCfg(frames=8, mode="dense", stride=1), None),           # dense, consecutive
]
# Which reader each file gets, from the measurements in stages/video.py: decord's random access
# only where frames follow their keyframe in display order and the container has timestamps.
DECORD = {("h264", "mp4"), ("h264", "mkv"), ("h264", "mov"), ("vp8", "webm"), ("vp8", "mkv"),
          ("vp9", "webm"), ("vp9", "mp4"), ("vp9", "mkv")}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codecs")
    made = {}

    def get(codec, cont, **kw):
        key = (codec, cont, repr(sorted(kw.items())))
        if key not in made:
            made[key] = fc.write_video(folder / f"{codec}-{len(made)}.{cont}", codec, n=kw.pop("n", N), **kw)
        return str(made[key])

    return get


def _rng(seed):
    return None if seed is None else np.random.default_rng(seed)


@pytest.mark.parametrize("codec,cont", GRID, ids=[f"{a}-{b}" for a, b in GRID])
def test_every_codec_and_container_decodes_the_sampled_indices(videos, codec, cont):
    path = videos(codec, cont)
    for cfg, seed in MODES:
        out = decode_video(path, cfg, rng=_rng(seed))
        assert isinstance(out, Decoded) and out.warnings == ()
        assert out.decoder == ("decord" if (codec, cont) in DECORD else "pyav"), (codec, cont)
        want = clip_indices(N, cfg, _rng(seed))
        assert [fc.indices(clip) for clip in out.clips] == want, (cfg, seed, out.decoder)
        assert all(c.dtype == np.uint8 and c.shape == (cfg.frames, fc.HEIGHT, fc.WIDTH, 3) for c in out.clips)


def test_rng_advances_once_per_video(videos):
    """A reader that retries draws the same sample: the generator moves on as for one draw."""
    path = videos("hevc", "mp4")   # PyAV
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    decode_video(path, SamplingCfg(frames=8), rng=a)
    clip_indices(N, SamplingCfg(frames=8), b)
    assert a.random() == b.random()


@pytest.mark.parametrize("codec,cont", [("hevc", "mp4"), ("mpeg4", "mp4"), ("h264", "avi")])
def test_decord_random_access_is_wrong_where_pyav_is_used(videos, codec, cont):
    """Why those files go to PyAV: decord's get_batch returns other frames than asked
    (x265's open GOPs, MPEG-4 B-frames after an I-frame, AVI without timestamps)."""
    path = videos(codec, cont)
    asked = [2, 7, 12, 17, 22, 27]
    got = fc.indices(decord.VideoReader(path, num_threads=1).get_batch(asked).asnumpy())
    assert got != asked
    assert decode_video(path, SamplingCfg(frames=6)).decoder == "pyav"


@pytest.mark.parametrize("rotation", [90, -90, 180])
@pytest.mark.parametrize("cont", ["mp4", "mkv"])
def test_rotated_video_frames_are_upright(videos, rotation, cont):
    path = videos("h264", cont, rotation=rotation)
    cfg = SamplingCfg(frames=6, clips=2)
    out = decode_video(path, cfg)
    assert [fc.indices(c) for c in out.clips] == clip_indices(N, cfg)
    if cont == "mp4":  # decord applies an mp4 display matrix itself: same orientation, same pixels
        idx = clip_indices(N, cfg)[0]
        ref = decord.VideoReader(path, num_threads=1).get_batch(idx).asnumpy()
        assert fc.indices(ref) == idx
        assert np.abs(ref.astype(int) - out.clips[0].astype(int)).mean() < 2


def test_two_video_streams_use_ffmpegs_best_stream(videos):
    # stream 0 is the default one; stream 1 (twice the size) has the higher bit rate, which
    # decord's FFmpeg 4.1 prefers
    path = videos("h264", "mp4", streams=((0, 1, 0), (1, 2, 0)))
    with av.open(path) as c:
        best = c.streams.best("video").index
    assert best == 0
    assert fc.read_code(decord.VideoReader(path, num_threads=1)[3].asnumpy())[0] == 1  # decord alone: the other
    out = decode_video(path, SamplingCfg(frames=4))
    assert out.decoder == "pyav"
    assert [fc.read_code(f) for f in out.clips[0]] == [(0, i) for i in clip_indices(N, SamplingCfg(frames=4))[0]]


def _corrupt_packet(src: str, dst, k: int) -> None:
    with av.open(src) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    pos, size = packets[k]
    data = bytearray(open(src, "rb").read())
    data[pos + size // 4:pos + size] = np.random.default_rng(0).integers(0, 256, size - size // 4, np.uint8).tobytes()
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("codec,cont", [("h264", "mp4"), ("vp9", "webm"), ("hevc", "mkv")])
def test_one_corrupt_packet_in_50_is_done_with_a_warning(videos, tmp_path, codec, cont, capfd):
    src = videos(codec, cont, n=50)
    bad = tmp_path / f"bad.{cont}"
    _corrupt_packet(src, bad, 25)
    out = decode_video(str(bad), SamplingCfg(frames=8, clips=2))
    assert out.decoder == "pyav" and out.warnings
    assert any("corrupt packet" in w for w in out.warnings), out.warnings
    # frames before the damage are exact, and never from another video or out of order
    n = int(out.warnings[0].split()[0]) if "decoded from" in out.warnings[0] else 50
    for clip, idx in zip(out.clips, clip_indices(n, SamplingCfg(frames=8, clips=2))):
        assert [fc.read_code(f)[1] for f in clip[:3]] == idx[:3]
    assert capfd.readouterr().err == ""  # FFmpeg's complaints went into the warnings, not the terminal
    assert decode_clips(str(bad), SamplingCfg(frames=8))[1] == "pyav"


@pytest.mark.parametrize("cont,keep", [("mkv", 0.6), ("webm", 0.6), ("mp4", 0.8), ("avi", 0.6)])
def test_truncated_file_is_done_with_a_warning_or_failed_with_a_reason(videos, tmp_path, cont, keep):
    codec = "vp9" if cont == "webm" else "h264"
    src = videos(codec, cont, n=50, **({"options": {"movflags": "faststart"}} if cont == "mp4" else {}))
    data = open(src, "rb").read()
    cut = tmp_path / f"cut.{cont}"
    cut.write_bytes(data[:int(len(data) * keep)])
    cfg = SamplingCfg(frames=8)
    try:
        out = decode_video(str(cut), cfg)
    except VideoDecodeError as exc:
        assert str(exc)
        return
    assert out.warnings, "a cut file decoded without a word"
    got = fc.indices(out.clips[0])  # real coded frames of this video, upright
    assert got == sorted(got) and len(set(got)) == len(got) and max(got) < 50


def test_undecodable_reasons_are_one_line(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(VideoDecodeError) as err:
        decode_video(str(bad), SamplingCfg(frames=4))
    assert "\n" not in str(err.value) and str(err.value)
