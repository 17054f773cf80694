"""The built-in synthetic ``demo`` dataset: a small seeded world of coloured shapes that move.

Every class is ``(colour, shape, action)``, named in plain words ("red triangle moving right").
Classes are drawn from the world's grid so that some share appearance and differ only by
motion ("red triangle moving right" / "red triangle rotating clockwise") and others share the
motion and differ by appearance ("red triangle growing" / "blue square growing"): a model
needs both a frame encoder and temporal modelling to separate them all.

The generator writes real h264 mp4 files (PyAV, libx264, yuv420p), list files in the
``relative/path.mp4 <label>`` form, a class file, and a JSONL file with one caption per
frame ("a small red triangle on the left") for pretraining a small CLIP on single frames;
:func:`render_frame_with_caption` renders random captioned stills without any encoding.

Layout of ``out_dir``::

    videos/train/<class_slug>/<class_slug>_0003.mp4
    videos/val/<class_slug>/...
    train.txt  val.txt          lines "train/<class_slug>/<class_slug>_0003.mp4 <label>"
    classes.txt                 line i = name of class i
    captions.jsonl              {"path", "split", "label", "class_name", "captions": [...]}
    demo.json                   manifest, written last: the cfg and the classes

Everything is a pure function of the cfg: every video has its own random generator seeded
from ``(seed, split, class, index)``, so output does not depend on generation order, and the
same seed gives byte-identical list files and identical decoded frames. Files are written to a
temporary name and renamed, so an interrupted run never leaves a half file that looks
finished; running again with the same cfg keeps the finished videos and makes the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cache.errors import ConfigError, DatasetError
from cache.files import atomic_write_text, read_json

__all__ = [
    "DemoCfg",
    "DemoDataset",
    "World",
    "WORLDS",
    "generate_demo",
    "select_classes",
    "parse_class_name",
    "frame_dims",
    "render_frame_with_caption",
    "render_class_clip",
]

GENERATOR_VERSION = 2  # bump when the pictures for a given cfg change
MANIFEST = "demo.json"
PARTIAL_MANIFEST = "demo.partial.json"
_SPLITS = {"train": 0, "val": 1}

# --------------------------------------------------------------------------------------------
# The world's vocabulary
# --------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 185, 60),
    "blue": (45, 85, 230),
    "yellow": (235, 215, 40),
    "purple": (155, 60, 210),
    "cyan": (40, 205, 215),
    "orange": (245, 140, 30),
}

SHAPES = ("circle", "square", "triangle", "star", "cross")
MOVES = ("moving left", "moving right", "moving up", "moving down")
ROTATIONS = ("rotating clockwise", "rotating counter-clockwise")
SCALINGS = ("growing", "shrinking")
ACTIONS = MOVES + ROTATIONS + SCALINGS + ("bouncing",)
# a rotating circle looks exactly like a still one
_ROTATION_INVISIBLE = {"circle"}

# the radius (in units of frame height) under which a caption calls the object "small"
_SMALL_BELOW = 0.145


@dataclass(frozen=True)
class World:
    """What a world may contain; ``rich`` adds textures, noise, distractors and sizes."""

    name: str
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    actions: tuple[str, ...]
    textured: bool  # textured backgrounds + per-frame noise
    distractors: int  # at most this many neutral-coloured distractor objects
    two_sizes: bool  # objects come small or large (else one size, with jitter)

    def compatible(self, shape: str, action: str) -> bool:
        return not (action in ROTATIONS and shape in _ROTATION_INVISIBLE)

    def grid(self) -> list[tuple[str, str, str]]:
        """Every (colour, shape, action) class this world can show."""
        return [
            (c, s, a)
            for c in self.colours
            for s in self.shapes
            for a in self.actions
            if self.compatible(s, a)
        ]


WORLDS: dict[str, World] = {
    "basic": World(
        name="basic",
        colours=("red", "green", "blue", "yellow"),
        shapes=("circle", "square", "triangle"),
        actions=MOVES + ROTATIONS + SCALINGS,
        textured=False,
        distractors=0,
        two_sizes=False,
    ),
    "rich": World(
        name="rich",
        colours=tuple(COLOURS),
        shapes=SHAPES,
        actions=ACTIONS,
        textured=True,
        distractors=2,
        two_sizes=True,
    ),
}


# --------------------------------------------------------------------------------------------
# Public config / result
# --------------------------------------------------------------------------------------------


@dataclass
class DemoCfg:
    num_classes: int = 12  # chosen from the world's (colour, shape, action) grid, seeded
    train_per_class: int = 12
    val_per_class: int = 4
    frames: int = 16  # frames per video
    size: int = 96  # frame height; width = size * 4 // 3 (both rounded down to even)
    fps: int = 8
    seed: int = 0
    world: str = "basic"  # "basic": few shapes/colours, plain background; "rich": the lot
    # explicit class names ("red triangle moving right", ...) instead of a seeded choice;
    # num_classes is then ignored
    classes: tuple[str, ...] | None = None

    def validate(self) -> None:
        if self.world not in WORLDS:
            raise ConfigError(f"demo world must be one of {sorted(WORLDS)}, got {self.world!r}")
        for name, low in (
            ("num_classes", 2),
            ("train_per_class", 1),
            ("val_per_class", 1),
            ("frames", 2),
            ("size", 32),
            ("fps", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"demo {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"demo seed must be a non-negative integer, got {self.seed!r}")
        if self.classes is not None:
            names = list(self.classes)
            if len(names) < 2:
                raise ConfigError("demo classes: give at least 2 class names")
            if len(set(names)) != len(names):
                raise ConfigError("demo classes: class names must be distinct")
            for n in names:
                parse_class_name(n, self.world)
        else:
            n_max = len(WORLDS[self.world].grid())
            if self.num_classes > n_max:
                raise ConfigError(
                    f"demo num_classes={self.num_classes} but the {self.world!r} world has only "
                    f"{n_max} classes"
                )

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if d["classes"] is not None:
            d["classes"] = list(d["classes"])
        return d


@dataclass
class DemoDataset:
    root: Path  # out_dir
    video_root: Path  # where the mp4s are (out_dir / "videos")
    train_list: Path  # lines "relative/path.mp4 <label>" (relative to video_root)
    val_list: Path
    classes_file: Path  # one class name per line, line i = class i
    captions_file: Path  # JSONL: path, split, label, class_name, captions (one per frame)
    classes: list[str]


def frame_dims(size: int) -> tuple[int, int]:
    """(height, width) of demo frames for a given ``size``: 4:3, both even (x264 needs it)."""
    h = int(size) - int(size) % 2
    w = h * 4 // 3
    return h, w - w % 2


def parse_class_name(name: str, world: str = "rich") -> tuple[str, str, str]:
    """``"red triangle moving right"`` -> ``("red", "triangle", "moving right")``."""
    w = WORLDS[world]
    parts = name.strip().split(" ", 2)
    if len(parts) != 3:
        raise ConfigError(f"demo class {name!r}: expected '<colour> <shape> <action>'")
    colour, shape, action = parts
    if colour not in w.colours:
        raise ConfigError(f"demo class {name!r}: colour must be one of {list(w.colours)}")
    if shape not in w.shapes:
        raise ConfigError(f"demo class {name!r}: shape must be one of {list(w.shapes)}")
    if action not in w.actions:
        raise ConfigError(f"demo class {name!r}: action must be one of {list(w.actions)}")
    if not w.compatible(shape, action):
        raise ConfigError(f"demo class {name!r}: a {shape} cannot visibly be {action}")
    return colour, shape, action


def _class_name(colour: str, shape: str, action: str) -> str:
    return f"{colour} {shape} {action}"


def _slug(name: str) -> str:
    return name.replace("-", "").replace(" ", "_")


def select_classes(cfg: DemoCfg) -> list[str]:
    """The cfg's class names, in label order.

    Seeded choice: take about sqrt(n) actions and enough (colour, shape) appearances to fill
    n cells of the appearance x action grid, filling it so each appearance and each action is
    used about equally often: most classes then share their appearance with another class
    (told apart only by motion) and their action with another (told apart only by look).
    """
    if cfg.classes is not None:
        return [" ".join(parse_class_name(n, cfg.world)) for n in cfg.classes]
    world = WORLDS[cfg.world]
    n = cfg.num_classes
    rng = np.random.default_rng([cfg.seed, 7919])
    appearances = [(c, s) for c in world.colours for s in world.shapes]
    n_act = min(len(world.actions), max(2, math.ceil(math.sqrt(n))))
    n_app = min(len(appearances), math.ceil(n / n_act))
    while True:
        acts = [world.actions[i] for i in rng.permutation(len(world.actions))[:n_act]]
        apps = [appearances[i] for i in rng.permutation(len(appearances))[:n_app]]
        cells = [(a, m) for a in apps for m in acts if world.compatible(a[1], m)]
        if len(cells) >= n:
            break
        if n_app < len(appearances):
            n_app += 1
        elif n_act < len(world.actions):
            n_act += 1
        else:  # cannot happen after validate(); guard anyway
            raise ConfigError(f"demo: cannot choose {n} classes from the {world.name!r} world")
    chosen: list[tuple[tuple[str, str], str]] = []
    row = {a: 0 for a in apps}
    col = {m: 0 for m in acts}
    remaining = list(cells)
    for _ in range(n):
        load = np.array([row[a] + col[m] for a, m in remaining], dtype=float)
        load += rng.random(len(remaining)) * 0.5  # random tie-break
        a, m = remaining.pop(int(np.argmin(load)))
        row[a] += 1
        col[m] += 1
        chosen.append((a, m))
    return sorted(_class_name(a[0], a[1], m) for a, m in chosen)


# --------------------------------------------------------------------------------------------
# Geometry and rendering (numpy, anti-aliased via a 1-pixel signed-distance ramp)
# --------------------------------------------------------------------------------------------


def _convex(points: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Half-planes (unit normals N (k, 2), offsets h (k,)) of a convex polygon, outward."""
    p = np.asarray(points, dtype=np.float64)
    centre = p.mean(axis=0)
    normals, offsets = [], []
    for i in range(len(p)):
        a, b = p[i], p[(i + 1) % len(p)]
        e = b - a
        nrm = np.array([e[1], -e[0]]) / np.hypot(*e)
        if nrm @ (centre - a) > 0:
            nrm = -nrm
        normals.append(nrm)
        offsets.append(nrm @ a)
    return np.array(normals, dtype=np.float32), np.array(offsets, dtype=np.float32)


def _polar(radius: float, deg: float) -> tuple[float, float]:
    # y grows downwards (image coordinates); -90 degrees is straight up
    return radius * math.cos(math.radians(deg)), radius * math.sin(math.radians(deg))


def _build_shapes() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    s = 0.85
    t = 0.34
    shapes = {
        "square": [_convex([(-s, -s), (s, -s), (s, s), (-s, s)])],
        "triangle": [_convex([_polar(1.05, -90), _polar(1.05, 30), _polar(1.05, 150)])],
        "cross": [
            _convex([(-1.0, -t), (1.0, -t), (1.0, t), (-1.0, t)]),
            _convex([(-t, -1.0), (t, -1.0), (t, 1.0), (-t, 1.0)]),
        ],
    }
    star = []
    for k in range(5):  # union of 5 convex kites: centre, inner, tip, inner
        tip = -90 + 72 * k
        star.append(
            _convex([(0.0, 0.0), _polar(0.47, tip - 36), _polar(1.15, tip), _polar(0.47, tip + 36)])
        )
    shapes["star"] = star
    return shapes


_POLYS = _build_shapes()
# farthest extent of each shape from its centre, in units of its radius (any rotation)
_EXTENT = {"circle": 1.0, "square": 0.85 * math.sqrt(2), "triangle": 1.05, "cross": 1.06, "star": 1.15}


def _coverage(shape: str, cx: float, cy: float, r: float, theta: float, xs, ys) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape on the pixel centres (xs (w,), ys (h,))."""
    dx = xs[None, :] - cx
    dy = ys[:, None] - cy
    if shape == "circle":
        d = np.sqrt(dx * dx + dy * dy) - r
    else:
        c, s = math.cos(theta), math.sin(theta)
        qx = (c * dx + s * dy) / r  # rotate by -theta into the shape's frame
        qy = (-s * dx + c * dy) / r
        d = None
        for normals, offsets in _POLYS[shape]:
            dp = qx[..., None] * normals[:, 0] + qy[..., None] * normals[:, 1] - offsets
            dp = dp.max(axis=-1)
            d = dp if d is None else np.minimum(d, dp)
        d = d * r
    return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)


@dataclass
class _Track:
    """One object over T frames."""

    shape: str
    rgb: np.ndarray  # (3,) float32
    cx: np.ndarray  # (T,) pixel coordinates of the centre
    cy: np.ndarray
    r: np.ndarray  # (T,) radius in pixels
    theta: np.ndarray  # (T,) radians, increasing = clockwise on screen


@dataclass
class _Plan:
    """Everything needed to render one clip; cheap to make (no pixels but the background)."""

    height: int
    width: int
    background: np.ndarray  # (H, W, 3) float32
    bg_kind: str
    noise_sigma: float
    noise_seed: int
    tracks: list[_Track]  # drawn in order: distractors first, the class object last
    captions: list[str]


def _draw(img: np.ndarray, tr: _Track, t: int) -> None:
    h, w = img.shape[:2]
    cx, cy, r = float(tr.cx[t]), float(tr.cy[t]), float(tr.r[t])
    e = r * _EXTENT[tr.shape] + 2.0
    x0, x1 = max(0, int(cx - e)), min(w, int(math.ceil(cx + e)) + 1)
    y0, y1 = max(0, int(cy - e)), min(h, int(math.ceil(cy + e)) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5
    a = _coverage(tr.shape, cx, cy, r, float(tr.theta[t]), xs, ys)[..., None]
    region = img[y0:y1, x0:x1]
    region *= 1.0 - a
    region += a * tr.rgb


def _render(plan: _Plan) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a plan."""
    T = len(plan.captions)
    out = np.empty((T, plan.height, plan.width, 3), dtype=np.uint8)
    noise_rng = np.random.default_rng(plan.noise_seed)
    for t in range(T):
        img = plan.background.copy()
        for tr in plan.tracks:
            _draw(img, tr, t)
        if plan.noise_sigma > 0:
            img += noise_rng.normal(0.0, plan.noise_sigma, img.shape).astype(np.float32)
        np.clip(np.rint(img), 0, 255, out=img)
        out[t] = img.astype(np.uint8)
    return out


def _background(rng: np.random.Generator, h: int, w: int, textured: bool):
    """(H, W, 3) float32 background, its kind in words, and per-frame noise sigma."""
    grey = rng.uniform(25, 70) if not textured else rng.uniform(30, 100)
    tint = rng.uniform(-8, 8, 3) if not textured else rng.uniform(-15, 15, 3)
    base = np.clip(grey + tint, 0, 255).astype(np.float32)
    if not textured:
        return np.broadcast_to(base, (h, w, 3)).copy(), "plain", 0.0
    kind = ("plain", "gradient", "striped", "checkered", "blotchy")[rng.integers(5)]
    other = np.clip(base + rng.choice([-1, 1]) * rng.uniform(20, 45) + rng.uniform(-10, 10, 3), 0, 255)
    other = other.astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, math.pi)
    proj = xs * math.cos(ang) + ys * math.sin(ang)
    if kind == "plain":
        mix = np.zeros((h, w), np.float32)
    elif kind == "gradient":
        mix = (proj - proj.min()) / max(1e-6, float(proj.max() - proj.min()))
    elif kind == "striped":
        period = rng.uniform(8, 22)
        mix = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period + rng.uniform(0, 2 * math.pi))
    elif kind == "checkered":
        cell = int(rng.integers(8, 20))
        ox, oy = rng.integers(0, cell, 2)
        mix = (((xs + ox) // cell + (ys + oy) // cell) % 2).astype(np.float32)
    else:  # blotchy: bilinear upsampling of a coarse random grid
        gh, gw = 5, 7
        coarse = rng.random((gh, gw)).astype(np.float32)
        fy = ys / max(1, h - 1) * (gh - 1)
        fx = xs / max(1, w - 1) * (gw - 1)
        y0 = np.clip(fy.astype(int), 0, gh - 2)
        x0 = np.clip(fx.astype(int), 0, gw - 2)
        wy, wx = fy - y0, fx - x0
        mix = (
            coarse[y0, x0] * (1 - wy) * (1 - wx)
            + coarse[y0 + 1, x0] * wy * (1 - wx)
            + coarse[y0, x0 + 1] * (1 - wy) * wx
            + coarse[y0 + 1, x0 + 1] * wy * wx
        )
    bg = base * (1 - mix[..., None]) + other * mix[..., None]
    return bg.astype(np.float32), kind, float(rng.uniform(2.0, 6.0))


def _position_words(cx: float, cy: float, h: int, w: int) -> str:
    col = ("left", "centre", "right")[min(2, int(3 * cx / w))]
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / h))]
    if row == "middle" and col == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"at the {row} {col}"


def _caption(colour: str, shape: str, cx: float, cy: float, r: float, h: int, w: int, bg_kind: str) -> str:
    size = "small" if r < _SMALL_BELOW * h else "large"
    text = f"a {size} {colour} {shape} {_position_words(cx, cy, h, w)}"
    if bg_kind != "plain":
        text += f" on a {bg_kind} background"
    return text


def _jitter_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    rgb = np.asarray(COLOURS[colour], dtype=np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
    return np.clip(rgb, 0, 255)


def _base_radius(rng: np.random.Generator, world: World, h: int) -> float:
    if world.two_sizes:
        lo, hi = (0.08, 0.12) if rng.random() < 0.5 else (0.17, 0.22)
    else:
        lo, hi = 0.12, 0.18
    return float(rng.uniform(lo, hi) * h)


def _plan(colour: str, shape: str, action: str, world: World, h: int, w: int, T: int,
          rng: np.random.Generator) -> _Plan:
    """Random trajectory, look and background of one clip of class (colour, shape, action)."""
    background, bg_kind, sigma = _background(rng, h, w, world.textured)
    t = np.arange(T, dtype=np.float64)
    u = t / (T - 1)  # 0 -> 1 over the clip
    ext = _EXTENT[shape]
    theta0 = float(rng.uniform(0, 2 * math.pi)) if shape != "triangle" else float(rng.uniform(-0.3, 0.3))

    r = np.full(T, _base_radius(rng, world, h))
    theta = np.full(T, theta0)
    if action in SCALINGS:
        r_small = float(rng.uniform(0.07, 0.10) * h)
        r_big = min(r_small * float(rng.uniform(1.7, 2.2)), 0.25 * h)
        r = r_small + (r_big - r_small) * (u if action == "growing" else 1 - u)
    margin = float(r.max()) * ext + 1.0  # keeps the object inside the frame at every t

    def place(span: float, travel: float = 0.0) -> float:
        return float(rng.uniform(margin, max(margin, span - margin - travel)))

    if action in ("moving left", "moving right"):
        travel = min(rng.uniform(0.35, 0.55) * w, w - 2 * margin)
        x0 = place(w, travel)
        cx = x0 + travel * u if action == "moving right" else (x0 + travel) - travel * u
        cy = np.full(T, place(h))
    elif action in ("moving up", "moving down"):
        travel = min(rng.uniform(0.35, 0.55) * h, h - 2 * margin)
        y0 = place(h, travel)
        cy = y0 + travel * u if action == "moving down" else (y0 + travel) - travel * u
        cx = np.full(T, place(w))
    elif action == "bouncing":
        amp = min(rng.uniform(0.35, 0.55) * h, h - 2 * margin)
        floor = h - margin - float(rng.uniform(0, max(0.0, h - 2 * margin - amp)))
        bounces = float(rng.uniform(1.5, 2.5))
        phase = float(rng.uniform(0, math.pi))
        cy = floor - amp * np.abs(np.sin(math.pi * bounces * u + phase))
        cx = np.full(T, place(w))
    else:  # rotating / scaling / anything static in position
        cx = np.full(T, place(w))
        cy = np.full(T, place(h))
        if action in ROTATIONS:
            total = math.radians(rng.uniform(100, 170))
            step = min(total / (T - 1), math.radians(25))  # < half the symmetry angle
            sign = 1.0 if action == "rotating clockwise" else -1.0
            theta = theta0 + sign * step * t

    tracks: list[_Track] = []
    for _ in range(int(rng.integers(0, world.distractors + 1)) if world.distractors else 0):
        d_shape = SHAPES[int(rng.integers(len(SHAPES)))]
        d_r = float(rng.uniform(0.06, 0.10) * h)
        d_m = d_r * _EXTENT[d_shape] + 1
        g = rng.uniform(100, 175)
        d_rgb = np.array([g, g, g] if rng.random() < 0.7 else [g * 0.85, g * 0.65, g * 0.45], np.float32)
        vx, vy = rng.uniform(-0.6, 0.6, 2)
        dx = np.clip(rng.uniform(d_m, w - d_m) + vx * t, d_m, w - d_m)
        dy = np.clip(rng.uniform(d_m, h - d_m) + vy * t, d_m, h - d_m)
        tracks.append(_Track(d_shape, d_rgb, dx, dy, np.full(T, d_r), np.full(T, rng.uniform(0, 2 * math.pi))))
    main = _Track(shape, _jitter_colour(rng, colour), np.asarray(cx, float), np.asarray(cy, float), r, theta)
    tracks.append(main)
    captions = [
        _caption(colour, shape, main.cx[i], main.cy[i], main.r[i], h, w, bg_kind) for i in range(T)
    ]
    return _Plan(h, w, background, bg_kind, sigma, int(rng.integers(2**63 - 1)), tracks, captions)


def _video_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], label, index])


def render_class_clip(name: str, *, frames: int = 16, size: int = 96, world: str = "basic",
                      rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[str]]:
    """Render one clip of a class in memory: ((T, H, W, 3) uint8, per-frame captions)."""
    colour, shape, action = parse_class_name(name, world)
    h, w = frame_dims(size)
    plan = _plan(colour, shape, action, WORLDS[world], h, w, frames, rng or np.random.default_rng())
    return _render(plan), plan.captions


def render_frame_with_caption(rng: np.random.Generator, size: int = 96,
                              world: str = "rich") -> tuple[np.ndarray, str]:
    """One random still of the world and its caption, e.g. ``"a large blue square at the top
    left"``; height ``size``, width ``size * 4 // 3`` (even). For contrastive pretraining."""
    wd = WORLDS[world]
    h, w = frame_dims(size)
    colour = wd.colours[int(rng.integers(len(wd.colours)))]
    shape = wd.shapes[int(rng.integers(len(wd.shapes)))]
    # a random action and a random moment of it: positions, sizes, angles like the videos'
    action = wd.actions[int(rng.integers(len(wd.actions)))]
    if not wd.compatible(shape, action):
        action = "growing"
    T = 8
    plan = _plan(colour, shape, action, wd, h, w, T, rng)
    k = int(rng.integers(T))
    for tr in plan.tracks:
        for arr in ("cx", "cy", "r", "theta"):
            setattr(tr, arr, getattr(tr, arr)[k : k + 1])
    plan.captions = plan.captions[k : k + 1]
    return _render(plan)[0], plan.captions[0]


# --------------------------------------------------------------------------------------------
# Encoding and files
# --------------------------------------------------------------------------------------------


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _encode_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """h264 (libx264, yuv420p, crf 17) mp4 of (T, H, W, 3) uint8 RGB frames, atomically."""
    import av

    T, h, w, _ = frames.shape
    tmp = _tmp_path(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = w, h
            stream.pix_fmt = "yuv420p"
            # One thread and x264's plain C code paths. Its SIMD paths read memory that was never
            # written, so the same frames now and then gave other bits once other decoding had
            # run in the process (a CI failure; 4 of 12 small test videos changed at least once
            # in 150 encodes). The C paths never did in 1,800 encodes, and they give the same
            # bits on any CPU. Cost: about 0.25 ms per frame at 128x96.
            stream.options = {"crf": "17", "preset": "veryfast", "threads": "1",
                              "x264-params": "asm=0"}
            stream.codec_context.thread_count = 1  # PyAV's own default (auto) must not override it
            tb = Fraction(1, fps)
            for i in range(T):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
                vf.pts = i
                vf.time_base = tb
                for packet in stream.encode(vf):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class _Item:
    split: str
    label: int
    index: int
    rel: str  # relative to video_root


def _items(cfg: DemoCfg, classes: list[str]) -> list[_Item]:
    items = []
    for split, per in (("train", cfg.train_per_class), ("val", cfg.val_per_class)):
        for label, name in enumerate(classes):
            slug = _slug(name)
            for i in range(per):
                items.append(_Item(split, label, i, f"{split}/{slug}/{slug}_{i:04d}.mp4"))
    return items


def _dataset(root: Path, classes: list[str]) -> DemoDataset:
    return DemoDataset(
        root=root,
        video_root=root / "videos",
        train_list=root / "train.txt",
        val_list=root / "val.txt",
        classes_file=root / "classes.txt",
        captions_file=root / "captions.jsonl",
        classes=list(classes),
    )


def _manifest_body(cfg: DemoCfg, classes: list[str]) -> dict:
    return {"generator": "clipcache demo", "version": GENERATOR_VERSION, "cfg": cfg.to_json(),
            "classes": classes}


def _same(manifest: dict | None, cfg: DemoCfg) -> bool:
    return (
        isinstance(manifest, dict)
        and manifest.get("version") == GENERATOR_VERSION
        and manifest.get("cfg") == cfg.to_json()
    )


def _finished(ds: DemoDataset, items: Iterable[_Item]) -> bool:
    files = (ds.train_list, ds.val_list, ds.classes_file, ds.captions_file)
    return all(p.is_file() for p in files) and all((ds.video_root / it.rel).is_file() for it in items)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from stages.progress import progress_bar

    return progress_bar(total=total, desc="demo videos", unit="video")


def generate_demo(out_dir: str | Path, cfg: DemoCfg | None = None, progress: bool = True) -> DemoDataset:
    """Generate (or reuse) the synthetic demo dataset in ``out_dir``; see the module doc."""
    cfg = cfg or DemoCfg()
    cfg.validate()
    root = Path(out_dir)
    classes = select_classes(cfg)
    ds = _dataset(root, classes)
    items = _items(cfg, classes)

    manifest_path = root / MANIFEST
    partial_path = root / PARTIAL_MANIFEST
    done = read_json(manifest_path)
    if _same(done, cfg) and _finished(ds, items):
        return ds

    # Same cfg (finished but damaged, or interrupted): finished videos are kept, since each
    # was renamed into place only when complete. Anything else of ours is removed first.
    same_cfg = _same(done, cfg) or _same(read_json(partial_path), cfg)
    ours = manifest_path.exists() or partial_path.exists()
    if manifest_path.exists():
        manifest_path.unlink()
    if not same_cfg:
        if ds.video_root.exists() and any(ds.video_root.iterdir()) and not ours:
            raise DatasetError(
                f"{root} already holds a videos/ folder that the demo generator did not make; "
                "choose another output folder"
            )
        if ds.video_root.exists():
            shutil.rmtree(ds.video_root)
        for p in (ds.train_list, ds.val_list, ds.classes_file, ds.captions_file):
            if p.exists():
                p.unlink()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission
        raise DatasetError(f"cannot create the demo folder {root}: {exc.strerror}") from None
    atomic_write_text(partial_path, json.dumps(_manifest_body(cfg, classes), indent=2) + "\n")

    world = WORLDS[cfg.world]
    h, w = frame_dims(cfg.size)
    records = []
    bar = _progress(len(items), progress)
    try:
        for it in items:
            colour, shape, action = parse_class_name(classes[it.label], cfg.world)
            rng = _video_rng(cfg.seed, it.split, it.label, it.index)
            plan = _plan(colour, shape, action, world, h, w, cfg.frames, rng)
            path = ds.video_root / it.rel
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                for stale in path.parent.glob(f".{path.name}.*.tmp"):
                    stale.unlink()
                _encode_mp4(_render(plan), path, cfg.fps)
            records.append({"path": it.rel, "split": it.split, "label": it.label,
                            "class_name": classes[it.label], "captions": plan.captions})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    for split, list_path in (("train", ds.train_list), ("val", ds.val_list)):
        lines = [f"{it.rel} {it.label}\n" for it in items if it.split == split]
        atomic_write_text(list_path, "".join(lines))
    atomic_write_text(ds.classes_file, "".join(f"{c}\n" for c in classes))
    atomic_write_text(ds.captions_file, "".join(json.dumps(r) + "\n" for r in records))
    # the manifest last: its presence (with a matching cfg) means "finished"
    atomic_write_text(manifest_path, json.dumps(_manifest_body(cfg, classes), indent=2) + "\n")
    partial_path.unlink(missing_ok=True)
    return ds
