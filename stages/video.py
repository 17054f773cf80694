"""Video decoding (decord, PyAV fallback, frame folders), frame sampling and CLIP-style views.

Frames are always addressed by decode index (0..n-1 in decoding order), never by timestamp,
so variable frame rates and broken timestamps cannot shift the sample. A file decord cannot
open or read (seen: AV1, VP9 webm without a duration, an mp4 with one corrupt packet) is
decoded again with PyAV, skipping packets that fail; a file neither can read raises
VideoDecodeError with both reasons, and the caller records it. Nothing is ever substituted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cache.errors import ConfigError, VideoDecodeError

__all__ = [
    "SamplingCfg",
    "parse_views",
    "clip_indices",
    "decode_clips",
    "resize_short_side",
    "spatial_crops",
    "make_views",
    "normalize",
]


@dataclass(frozen=True)
class SamplingCfg:
    """How frames are taken from a video: ``mode`` "segment" (TSN) or "dense" (stride)."""

    frames: int = 8
    mode: str = "segment"
    stride: int = 8          # dense only
    clips: int = 1           # C temporal clips
    crops: int = 1           # S spatial crops (1 = centre, 3 = left/centre/right)

    @property
    def views(self) -> int:
        return self.clips * self.crops


def parse_views(text: str) -> tuple[int, int]:
    """'4x3' -> (4 clips, 3 crops)."""
    try:
        clips, crops = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"views must look like CxS (e.g. 1x1, 4x3), got '{text}'") from None
    if clips < 1 or crops not in (1, 3):
        raise ConfigError(f"views {text}: need at least 1 clip and 1 or 3 crops")
    return clips, crops


def clip_indices(num_frames: int, cfg: SamplingCfg, rng: np.random.Generator | None = None) -> list[list[int]]:
    """Frame indices per temporal clip. ``rng`` given: random TSN offsets (training)."""
    if num_frames < 1:
        raise VideoDecodeError("video has no frames")
    T = cfg.frames
    out = []
    for c in range(cfg.clips):
        if cfg.mode == "segment":
            seg = num_frames / T
            if rng is not None:
                offs = rng.random(T)
            else:
                offs = np.full(T, (c + 0.5) / cfg.clips)
            idx = [min(int(seg * t + seg * o), num_frames - 1) for t, o in zip(range(T), offs)]
        elif cfg.mode == "dense":
            span = (T - 1) * cfg.stride + 1
            room = max(num_frames - span, 0)
            start = int(rng.integers(0, room + 1)) if rng is not None else int(room * (c + 0.5) / cfg.clips)
            idx = [min(start + t * cfg.stride, num_frames - 1) for t in range(T)]
        else:
            raise ConfigError(f"unknown sampling mode '{cfg.mode}' (segment or dense)")
        out.append(idx)
    return out


# ----------------------------------------------------------------------------- decoding
def _decode_decord(path: str, pick: Callable[[int], list[list[int]]]) -> list[np.ndarray]:
    import decord

    vr = decord.VideoReader(path, num_threads=1)
    n = len(vr)
    clips = pick(n)
    flat = sorted({i for clip in clips for i in clip})
    frames = vr.get_batch(flat).asnumpy()  # (F, H, W, 3) uint8
    if frames.shape[0] != len(flat):
        raise VideoDecodeError(f"decord returned {frames.shape[0]} of {len(flat)} frames")
    pos = {i: k for k, i in enumerate(flat)}
    return [frames[[pos[i] for i in clip]] for clip in clips]


def _pyav_frames(path: str):
    """Every decodable frame of the first video stream, in decode order; corrupt packets are
    skipped (one bad packet must not lose the rest of the video)."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise VideoDecodeError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except (av.error.InvalidDataError, av.error.ValueError):
                continue
            yield from frames


def _decode_pyav(path: str, pick: Callable[[int], list[list[int]]]) -> list[np.ndarray]:
    """Two passes: count the decodable frames, then decode again keeping only the sampled
    ones. Memory stays at the sampled frames, whatever the video's length (one pass holding
    every frame needed 3 MB per 1080p frame: 56 GB for a 10-minute video). Files reach this
    only when decord failed, so the second decode is a cost paid rarely."""
    n = sum(1 for _ in _pyav_frames(path))
    if n == 0:
        raise VideoDecodeError("no decodable frames")
    clips = pick(n)
    wanted = {i for clip in clips for i in clip}
    last = max(wanted)
    got: dict[int, np.ndarray] = {}
    frames = _pyav_frames(path)
    try:
        for i, frame in enumerate(frames):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i == last:
                break
    finally:
        frames.close()
    if len(got) != len(wanted):
        raise VideoDecodeError(f"PyAV's second pass decoded {len(got)} of the {len(wanted)} sampled frames "
                               f"of the {n} its first pass counted")
    return [np.stack([got[i] for i in clip]) for clip in clips]


def _decode_folder(path: str, num_frames: int | None, pick: Callable[[int], list[list[int]]]) -> list[np.ndarray]:
    from PIL import Image

    names = sorted(f for f in os.listdir(path) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    n = len(names) if num_frames is None else min(num_frames, len(names))
    if n == 0:
        raise VideoDecodeError("frame folder holds no images")
    clips = pick(n)
    cache: dict[int, np.ndarray] = {}
    out = []
    for clip in clips:
        for i in clip:
            if i not in cache:
                with Image.open(os.path.join(path, names[i])) as im:
                    cache[i] = np.asarray(im.convert("RGB"))
        out.append(np.stack([cache[i] for i in clip]))
    return out


def decode_clips(path: str, cfg: SamplingCfg, num_frames: int | None = None,
                 rng: np.random.Generator | None = None) -> tuple[list[np.ndarray], str]:
    """Decode the C sampled clips of a video: list of (T, H, W, 3) uint8, and the backend used."""

    def pick(n: int) -> list[list[int]]:
        return clip_indices(n, cfg, rng)

    if os.path.isdir(path):
        return _decode_folder(path, num_frames, pick), "frames"
    if not os.path.exists(path):
        raise VideoDecodeError("file not found")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError("empty file (0 bytes)")
    try:
        return _decode_decord(path, pick), "decord"
    except Exception as first:  # decord raises its own and generic errors
        first_reason = f"{first.__class__.__name__}: {str(first).splitlines()[0][:120] if str(first) else ''}"
    try:
        return _decode_pyav(path, pick), "pyav"
    except Exception as second:
        reason = str(second).splitlines()[0][:160] if str(second) else second.__class__.__name__
        raise VideoDecodeError(f"undecodable (decord: {first_reason}; pyav: {reason})") from None


# ----------------------------------------------------------------------------- views
def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, h, w, 3) uint8 with min(h, w) == size (bicubic, antialiased)."""
    T, H, W, _ = frames.shape
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    x = frames.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def spatial_crops(frames: torch.Tensor, size: int, crops: int) -> list[torch.Tensor]:
    """Square crops of the short-side-resized clip: centre, or left/centre/right (top/centre/bottom)."""
    T, H, W, _ = frames.shape
    if crops == 1:
        starts = [((H - size) // 2, (W - size) // 2)]
    elif W >= H:
        starts = [((H - size) // 2, x) for x in (0, (W - size) // 2, W - size)]
    else:
        starts = [(y, (W - size) // 2) for y in (0, (H - size) // 2, H - size)]
    return [frames[:, y:y + size, x:x + size] for y, x in starts]


def make_views(clips: Sequence[np.ndarray], size: int, crops: int, resize: int | None = None) -> np.ndarray:
    """C clips of (T, H, W, 3) -> (V = C*S, T, size, size, 3) uint8, clip-major. The short side is
    first resized to ``resize`` (default ``size``; e.g. 256 for 224 crops)."""
    views = []
    for clip in clips:
        resized = resize_short_side(torch.from_numpy(np.ascontiguousarray(clip)), resize or size)
        views.extend(v.contiguous() for v in spatial_crops(resized, size, crops))
    return torch.stack(views).numpy()


def normalize(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float normalised with the model's mean/std."""
    x = frames.movedim(-1, -3).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s
