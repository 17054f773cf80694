"""The synthetic demo dataset: real decodable videos, sound lists, reproducible, really moving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import decord
import numpy as np
import pytest

from cache.errors import ConfigError, DatasetError
from cache.flips import mirror_name, mirror_pairs
from pipeline import demo_data
from pipeline.datasets import get_dataset
from pipeline.demo_data import (
    ACTIONS,
    COLOURS,
    SHAPES,
    DemoCfg,
    frame_dims,
    generate_demo,
    parse_class_name,
    render_class_clip,
    render_frame_with_caption,
    select_classes,
)

SMALL = DemoCfg(num_classes=4, train_per_class=2, val_per_class=1, frames=8, size=64, seed=1)
MOTION_CLASSES = (
    "red triangle moving right",
    "blue square moving down",
    "green square growing",
    "yellow triangle rotating clockwise",
)


def _pyav_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _decord_frames(path: Path) -> np.ndarray:
    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy()


def _read_list(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.read_text().splitlines():
        rel, label = line.split(" ")  # exactly one space
        rows.append((rel, int(label)))
    return rows


def _mp4s(ds) -> list[Path]:
    return sorted(ds.video_root.rglob("*.mp4"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("demo") / "d", SMALL, progress=False)


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    cfg = DemoCfg(classes=MOTION_CLASSES, train_per_class=2, val_per_class=1, frames=8, size=96)
    return generate_demo(tmp_path_factory.mktemp("motion") / "d", cfg, progress=False)


def test_videos_decode_with_pyav_and_decord(small):
    h, w = frame_dims(SMALL.size)
    assert (h, w) == (64, 84)
    files = _mp4s(small)
    assert len(files) == SMALL.num_classes * (SMALL.train_per_class + SMALL.val_per_class)
    for f in files:
        a = _pyav_frames(f)
        b = _decord_frames(f)
        assert a.shape == b.shape == (SMALL.frames, h, w, 3)
        assert a.dtype == b.dtype == np.uint8
        with av.open(str(f)) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "h264"
            assert s.codec_context.pix_fmt == "yuv420p"
            assert s.average_rate == SMALL.fps
    # colours survive the encoding: some pixel of each video is close to a class colour
    for rel, label in _read_list(small.train_list)[:: SMALL.train_per_class]:
        colour = parse_class_name(small.classes[label], SMALL.world)[0]
        frame = _pyav_frames(small.video_root / rel)[0].astype(int)
        dist = np.abs(frame - np.array(COLOURS[colour])).sum(-1)
        assert dist.min() < 60, (rel, colour, dist.min())


def test_lists_and_class_file(small):
    assert small.classes_file.read_text().splitlines() == small.classes
    assert len(small.classes) == SMALL.num_classes == len(set(small.classes))
    for list_path, per in ((small.train_list, SMALL.train_per_class), (small.val_list, SMALL.val_per_class)):
        rows = _read_list(list_path)
        assert len(rows) == per * SMALL.num_classes
        for rel, label in rows:
            assert 0 <= label < len(small.classes)
            assert (small.video_root / rel).is_file()
            assert not Path(rel).is_absolute()
        labels = [label for _, label in rows]
        assert sorted(set(labels)) == list(range(SMALL.num_classes))
    manifest = json.loads((small.root / "demo.json").read_text())
    assert manifest["cfg"]["seed"] == SMALL.seed and manifest["classes"] == small.classes
    assert not (small.root / "demo.partial.json").exists()
    assert not list(small.root.rglob("*.tmp"))


def test_class_grid_mixes_appearance_and_motion():
    for world in ("basic", "rich"):
        for seed in range(3):
            names = select_classes(DemoCfg(seed=seed, world=world))
            assert len(names) == 12 == len(set(names))
            parsed = [parse_class_name(n, world) for n in names]
            # some classes differ only by motion, some only by appearance
            assert any(a[:2] == b[:2] and a[2] != b[2] for a in parsed for b in parsed)
            assert any(a[2] == b[2] and a[:2] != b[:2] for a in parsed for b in parsed)
    assert select_classes(DemoCfg(seed=0)) == select_classes(DemoCfg(seed=0))
    assert select_classes(DemoCfg(seed=0)) != select_classes(DemoCfg(seed=1))


def test_encoding_gives_the_same_bits_every_time(tmp_path):
    """The same frames must encode to the same file however often, with decoding in between
    (with x264's SIMD paths this failed within the first rounds)."""
    classes = select_classes(SMALL)
    clips = [render_class_clip(classes[i % len(classes)], frames=SMALL.frames, size=SMALL.size,
                               world=SMALL.world, rng=np.random.default_rng(i))[0] for i in range(12)]
    first = []
    for i, clip in enumerate(clips):
        demo_data._encode_mp4(clip, tmp_path / f"{i}.mp4", SMALL.fps)
        first.append((tmp_path / f"{i}.mp4").read_bytes())
    for _ in range(30):
        for i, clip in enumerate(clips):
            _pyav_frames(tmp_path / f"{i}.mp4")  # decoding leaves its memory behind for the encoder
            demo_data._encode_mp4(clip, tmp_path / f"{i}.mp4", SMALL.fps)
            assert (tmp_path / f"{i}.mp4").read_bytes() == first[i], f"video {i} encoded differently"


def test_reproducible_and_seed_dependent(small, tmp_path):
    again = generate_demo(tmp_path / "again", SMALL, progress=False)
    for name in ("train.txt", "val.txt", "classes.txt", "captions.jsonl"):
        assert (again.root / name).read_bytes() == (small.root / name).read_bytes()
    rel = _read_list(small.train_list)[0][0]
    assert np.array_equal(_pyav_frames(again.video_root / rel), _pyav_frames(small.video_root / rel))
    assert np.array_equal(_decord_frames(again.video_root / rel), _decord_frames(small.video_root / rel))

    other_cfg = DemoCfg(**{**SMALL.__dict__, "seed": 2})
    other = generate_demo(tmp_path / "other", other_cfg, progress=False)
    rel2 = _read_list(other.train_list)[0][0]
    assert not np.array_equal(_pyav_frames(other.video_root / rel2), _pyav_frames(small.video_root / rel))
    # the same class under another seed is another video too
    fixed = DemoCfg(classes=MOTION_CLASSES[:2], train_per_class=1, val_per_class=1, frames=4, size=48)
    a = generate_demo(tmp_path / "fa", fixed, progress=False)
    b = generate_demo(tmp_path / "fb", DemoCfg(**{**fixed.__dict__, "seed": 5}), progress=False)
    assert a.train_list.read_bytes() == b.train_list.read_bytes()
    rel3 = _read_list(a.train_list)[0][0]
    assert not np.array_equal(_pyav_frames(a.video_root / rel3), _pyav_frames(b.video_root / rel3))


def test_captions(small):
    records = [json.loads(line) for line in small.captions_file.read_text().splitlines()]
    listed = _read_list(small.train_list) + _read_list(small.val_list)
    assert sorted((r["path"], r["label"]) for r in records) == sorted(listed)
    for r in records:
        colour, shape, _ = parse_class_name(r["class_name"], SMALL.world)
        assert r["class_name"] == small.classes[r["label"]]
        assert r["split"] in ("train", "val") and r["path"].startswith(r["split"] + "/")
        assert len(r["captions"]) == SMALL.frames
        for c in r["captions"]:
            assert c.startswith(("a small ", "a large ")) and f"{colour} {shape}" in c
            assert any(p in c for p in ("left", "right", "top", "bottom", "centre"))


def _object_stats(frames: np.ndarray):
    """Per frame: centroid (x, y), area and 3-fold orientation of the saturated object."""
    f = frames.astype(np.int16)
    mask = (f.max(-1) - f.min(-1)) > 70  # the coloured object; backgrounds are near-grey
    out = []
    for m in mask:
        ys, xs = np.nonzero(m)
        assert len(xs) > 5
        cx, cy = xs.mean(), ys.mean()
        orient = np.angle(np.exp(3j * np.arctan2(ys - cy, xs - cx)).sum())  # y down
        out.append((cx, cy, len(xs), orient))
    return np.array(out)


def _by_class(ds, name):
    label = ds.classes.index(name)
    return [ds.video_root / rel for rel, lab in _read_list(ds.train_list) if lab == label]


def test_motion_classes_really_move(motion):
    h, w = frame_dims(96)
    for path in _by_class(motion, "red triangle moving right"):
        s = _object_stats(_pyav_frames(path))
        assert s[-1, 0] - s[0, 0] > 0.25 * w
        assert np.all(np.diff(s[:, 0]) > 0)
        assert abs(s[-1, 1] - s[0, 1]) < 2
    for path in _by_class(motion, "blue square moving down"):
        s = _object_stats(_decord_frames(path))
        assert s[-1, 1] - s[0, 1] > 0.25 * h and np.all(np.diff(s[:, 1]) > 0)
    for path in _by_class(motion, "green square growing"):
        s = _object_stats(_pyav_frames(path))
        assert s[-1, 2] > 2 * s[0, 2] and np.all(np.diff(s[:, 2]) >= 0)
        assert np.hypot(*(s[-1, :2] - s[0, :2])) < 2
    for path in _by_class(motion, "yellow triangle rotating clockwise"):
        s = _object_stats(_pyav_frames(path))
        step = np.angle(np.exp(1j * np.diff(s[:, 3])))  # 3 x the rotation per frame
        assert np.all(step > 0), step  # clockwise on screen = growing angle with y down
        assert np.hypot(*(s[-1, :2] - s[0, :2])) < 2


def _rotation_steps(frames, k):
    """Per-frame change of a k-fold symmetric object's angle (radians x k; > 0 = clockwise on screen)."""
    f = frames.astype(np.int16)
    angles = []
    for m in (f.max(-1) - f.min(-1)) > 90:
        ys, xs = np.nonzero(m)
        angles.append(np.angle(np.exp(1j * k * np.arctan2(ys - ys.mean(), xs - xs.mean())).sum()))
    return np.angle(np.exp(1j * np.diff(angles)))


def test_rotation_directions_in_memory():
    for name, sign in (("red star rotating clockwise", 1), ("blue cross rotating counter-clockwise", -1)):
        frames, captions = render_class_clip(name, frames=6, size=96, world="rich",
                                             rng=np.random.default_rng(0))
        assert frames.shape == (6, 96, 128, 3) and len(captions) == 6
        step = _rotation_steps(frames, 5 if "star" in name else 4)  # rotational symmetry order
        assert np.all(sign * step > 0), step


def test_a_mirrored_clip_shows_the_class_the_flip_rule_names():
    """The demo registers flip_swaps: a horizontally flipped clip of a rotation (or a left/right move)
    is a clip of its mirror class, the one cache/flips.py names, and a flip keeps the other classes."""
    assert get_dataset("demo").flip_swaps
    for name in ("red star rotating clockwise", "blue cross rotating counter-clockwise"):
        frames, _ = render_class_clip(name, frames=6, size=96, world="rich", rng=np.random.default_rng(1))
        mirrored = np.ascontiguousarray(frames[:, :, ::-1])
        other = mirror_name(name)
        assert other != name and other in ("red star rotating counter-clockwise", "blue cross rotating clockwise")
        sign = 1 if other.endswith(" clockwise") and "counter" not in other else -1
        step = _rotation_steps(mirrored, 5 if "star" in name else 4)
        assert np.all(sign * step > 0), (name, step)
    frames, _ = render_class_clip("red square moving right", frames=6, size=96, world="rich",
                                  rng=np.random.default_rng(2))
    assert mirror_name("red square moving right") == "red square moving left"
    xs = [np.nonzero(((f.astype(np.int16).max(-1) - f.astype(np.int16).min(-1)) > 90))[1].mean()
          for f in frames[:, :, ::-1]]
    assert np.all(np.diff(xs) < 0)  # mirrored, it moves left
    for kept in ("red square growing", "red square shrinking", "red square moving up", "red square bouncing"):
        assert mirror_name(kept) == kept
    classes = [f"red square {a}" for a in ACTIONS]
    pairs = {(classes[i], classes[j]) for i, j in mirror_pairs(classes)}
    assert pairs == {("red square moving left", "red square moving right"),
                     ("red square rotating clockwise", "red square rotating counter-clockwise")}


def test_rerun_reuses_and_resumes(small, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in _mp4s(small)}
    manifest_before = (small.root / "demo.json").stat().st_mtime_ns
    again = generate_demo(small.root, SMALL, progress=False)
    assert again == small
    assert {p: p.stat().st_mtime_ns for p in _mp4s(small)} == before
    assert (small.root / "demo.json").stat().st_mtime_ns == manifest_before

    # a damaged copy (one video lost) is repaired without redoing the others
    root = tmp_path / "copy"
    shutil.copytree(small.root, root)
    files = sorted(root.rglob("*.mp4"))
    original = _pyav_frames(files[0])
    files[0].unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in files[1:]}
    generate_demo(root, SMALL, progress=False)
    assert {p: p.stat().st_mtime_ns for p in files[1:]} == mtimes
    assert np.array_equal(_pyav_frames(files[0]), original)


def test_interrupted_run_is_not_finished_then_completes(tmp_path, monkeypatch):
    root = tmp_path / "d"
    calls = {"n": 0}
    real = demo_data._encode_mp4

    def flaky(frames, path, fps):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real(frames, path, fps)

    monkeypatch.setattr(demo_data, "_encode_mp4", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(root, SMALL, progress=False)
    assert not (root / "demo.json").exists() and not (root / "train.txt").exists()
    done = sorted(root.rglob("*.mp4"))
    assert len(done) == 4 and not list(root.rglob("*.tmp"))
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    monkeypatch.setattr(demo_data, "_encode_mp4", real)
    ds = generate_demo(root, SMALL, progress=False)
    assert (root / "demo.json").exists() and len(_mp4s(ds)) == 12
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes

    # another cfg in the same folder replaces the old output entirely
    ds2 = generate_demo(root, DemoCfg(**{**SMALL.__dict__, "seed": 3, "val_per_class": 2}), progress=False)
    listed = {ds2.video_root / rel for rel, _ in _read_list(ds2.train_list) + _read_list(ds2.val_list)}
    assert set(_mp4s(ds2)) == listed and len(listed) == 16


def test_render_frame_with_caption():
    rng = np.random.default_rng(0)
    for world in ("rich", "basic"):
        for _ in range(10):
            img, cap = render_frame_with_caption(rng, 64, world=world)
            assert img.shape == (64, 84, 3) and img.dtype == np.uint8
            words = cap.split(" ")
            assert words[0] == "a" and words[1] in ("small", "large")
            assert words[2] in COLOURS and words[3] in SHAPES
    a = render_frame_with_caption(np.random.default_rng(7), 96)
    b = render_frame_with_caption(np.random.default_rng(7), 96)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[0].shape == (96, 128, 3)


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="world"):
        generate_demo(tmp_path / "x", DemoCfg(world="fancy"), progress=False)
    with pytest.raises(ConfigError, match="num_classes"):
        generate_demo(tmp_path / "x", DemoCfg(num_classes=10_000), progress=False)
    with pytest.raises(ConfigError, match="circle"):
        generate_demo(tmp_path / "x", DemoCfg(classes=("red circle rotating clockwise", "red square growing")),
                      progress=False)
    with pytest.raises(ConfigError, match="colour"):
        parse_class_name("pink square growing", "basic")
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "foreign"
    (foreign / "videos").mkdir(parents=True)
    (foreign / "videos" / "mine.mp4").write_bytes(b"x")
    with pytest.raises(DatasetError):
        generate_demo(foreign, SMALL, progress=False)
    assert (foreign / "videos" / "mine.mp4").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(DatasetError, match="cannot create the demo folder"):
        generate_demo(a_file, SMALL, progress=False)
    assert a_file.read_text() == "not a folder"
