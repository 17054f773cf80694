"""Test videos whose frames say which frame they are.

Each frame is a 4 x 6 grid of 16 px cells, black or white, large enough to survive any lossy
codec at its default quality:

    row 0: cell 0 always white (orientation mark), cells 1-5 the stream id (5 bits)
    rows 1-3: the frame index, 17 bits, cell (3, 5) always black (second orientation mark)

`read_code(frame)` returns (stream_id, index), or raises ValueError for a frame that is not
upright (wrong shape or marks) or not a coded frame at all, so a test cannot mistake a
rotated, blended or substituted frame for a right one.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

CELL = 16
ROWS, COLS = 4, 6
HEIGHT, WIDTH = ROWS * CELL, COLS * CELL   # 64 x 96: not square, so a missed rotation changes the shape
_INDEX_CELLS = [(r, c) for r in range(1, ROWS) for c in range(COLS) if (r, c) != (ROWS - 1, COLS - 1)]
_STREAM_CELLS = [(0, c) for c in range(1, COLS)]


def draw(index: int, stream_id: int = 0) -> np.ndarray:
    """The (64, 96, 3) uint8 RGB frame that carries ``index`` and ``stream_id``."""
    bits = np.zeros((ROWS, COLS), bool)
    bits[0, 0] = True
    for k, (r, c) in enumerate(_STREAM_CELLS):
        bits[r, c] = bool(stream_id >> k & 1)
    for k, (r, c) in enumerate(_INDEX_CELLS):
        bits[r, c] = bool(index >> k & 1)
    img = np.kron(bits.astype(np.uint8) * 255, np.ones((CELL, CELL), np.uint8))
    return np.repeat(img[:, :, None], 3, axis=2)


def read_code(frame: np.ndarray) -> tuple[int, int]:
    """(stream_id, index) of a decoded upright frame (of the drawn size or an integer multiple
    of it); ValueError if it is not one."""
    h, w = frame.shape[:2]
    k = h // HEIGHT
    if k < 1 or (h, w) != (HEIGHT * k, WIDTH * k):
        raise ValueError(f"frame shape {(h, w)}, expected a multiple of {(HEIGHT, WIDTH)} (not upright?)")
    luma = frame.astype(np.float32).mean(axis=2)
    q = CELL * k // 4
    cells = luma.reshape(ROWS, CELL * k, COLS, CELL * k)[:, q:-q, :, q:-q].mean(axis=(1, 3))
    if np.any(np.abs(cells - 127.5) < 60):
        raise ValueError(f"ambiguous cell values {cells.round().tolist()}")
    bits = cells > 127.5
    if not bits[0, 0] or bits[ROWS - 1, COLS - 1]:
        raise ValueError("orientation marks are wrong (frame rotated or flipped)")
    stream = sum(int(bits[r, c]) << k for k, (r, c) in enumerate(_STREAM_CELLS))
    index = sum(int(bits[r, c]) << k for k, (r, c) in enumerate(_INDEX_CELLS))
    return stream, index


def indices(frames) -> list[int]:
    """Frame indices of a clip (T, H, W, 3), checking every frame is from stream 0."""
    out = []
    for f in frames:
        stream, index = read_code(f)
        if stream != 0:
            raise ValueError(f"frame from stream {stream}, expected 0")
        out.append(index)
    return out


# codec -> (PyAV encoder, encoder options); every encoder at a small GOP so random access has to seek
CODECS = {
    "h264": ("libx264", {"bf": "3", "g": "12", "preset": "veryfast"}),       # B-frames on
    "hevc": ("libx265", {"g": "12", "x265-params": "log-level=error:bframes=3"}),
    "vp8": ("libvpx", {"g": "12"}),
    "vp9": ("libvpx-vp9", {"g": "12", "deadline": "realtime", "cpu-used": "8"}),
    "av1": ("libsvtav1", {"g": "12", "preset": "8", "crf": "10"}),
    "mpeg4": ("mpeg4", {"g": "12", "bf": "2", "qscale": "3"}),
}
# containers each codec is written into (as PyAV's muxers allow them)
CONTAINERS = {
    "h264": ["mp4", "mkv", "avi", "mov"],
    "hevc": ["mp4", "mkv", "mov"],
    "vp8": ["webm", "mkv"],
    "vp9": ["webm", "mp4", "mkv"],
    "av1": ["mp4", "webm", "mkv"],
    "mpeg4": ["avi", "mp4", "mkv", "mov"],
}
_FORMATS = {"mkv": "matroska", "webm": "webm", "mp4": "mp4", "mov": "mov", "avi": "avi"}


def write_video(path: str | Path, codec: str = "h264", n: int = 30, rate: int = 10,
                streams: tuple[tuple[int, int, int], ...] | None = None, rotation: int | None = None,
                options: dict | None = None, codec_options: dict | None = None) -> Path:
    """Write ``n`` coded frames with ``codec`` into ``path`` (its suffix names the container).

    ``streams``: several video streams as (stream_id, width scale, bitrate kbit/s); frame
    contents of stream k are drawn with stream_id k (scaled up by the integer width scale).
    ``options``: muxer options (e.g. movflags=faststart); ``codec_options`` replace the
    encoder's defaults from CODECS.
    ``rotation``: a display matrix rotating the picture counterclockwise by that many degrees
    (a multiple of 90); the stored picture is turned the other way, so that frames shown as
    the matrix says are upright, as a phone's sideways-stored video is.
    """
    path = Path(path)
    name, opts = CODECS[codec]
    opts = codec_options if codec_options is not None else opts
    fmt = _FORMATS[path.suffix.lstrip(".")]
    specs = streams or ((0, 1, 0),)
    k = round((rotation or 0) / 90) % 4
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        outs = []
        for sid, scale, kbps in specs:
            s = c.add_stream(name, rate=Fraction(rate), options=dict(opts))
            w, h = (WIDTH * scale, HEIGHT * scale)
            if k % 2:
                w, h = h, w
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            if kbps:
                s.bit_rate = kbps * 1000
            if rotation is not None:
                s.set_display_rotation(rotation)
            outs.append((s, sid, scale))
        for i in range(n):
            for s, sid, scale in outs:
                img = draw(i, sid)
                if scale > 1:
                    img = np.kron(img, np.ones((scale, scale, 1), np.uint8))
                if k:
                    img = np.ascontiguousarray(np.rot90(img, -k))
                for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
        for s, _, _ in outs:
            for p in s.encode():
                c.mux(p)
    return path
