"""Video decoding (decord where exact, PyAV otherwise, frame folders), frame sampling and CLIP-style views.

Frames are always addressed by decode index (0..n-1 in output order), never by timestamp, so
variable frame rates and broken timestamps cannot shift the sample. Each file is probed first
(FFmpeg's best video stream, its packets, display rotation); decord's random access reads it
only where that was measured exact (see _choose), PyAV decodes everything else in order,
applies the display rotation and skips packets the decoder rejects (av.error.FFmpegError),
reporting them as warnings. A file no reader can decode raises VideoDecodeError with the
reasons, and the caller records it. Nothing is ever substituted. Verified with PyAV 12.3,
16.1 and 18.1 (tests/test_codecs.py files).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cache.errors import ConfigError, VideoDecodeError

__all__ = [
    "SamplingCfg",
    "SAMPLING_MODES",
    "SAMPLING_KEYS",
    "parse_views",
    "validate_sampling",
    "clip_indices",
    "layout_key",
    "Decoded",
    "decode_video",
    "decode_clips",
    "resize_short_side",
    "resize_frames",
    "parse_frame_size",
    "spatial_crops",
    "make_views",
    "VIEW_PARAM_COLUMNS",
    "AugViewCfg",
    "draw_resized_crop",
    "resized_crop_view",
    "augmented_views",
    "RA_OPS",
    "view_param_columns",
    "draw_view_params",
    "apply_view_params",
    "view_rngs",
    "normalize",
]


SAMPLING_MODES = ("segment", "segment-start", "segment-interior", "dense")


@dataclass(frozen=True)
class SamplingCfg:
    """How frames are taken from a video: ``mode`` "segment" (TSN, segment centres),
    "segment-start" (Text4Vis / Side4Video's test sampling), "segment-interior" (Side4Video's
    Something-Something v2 test sampling) or "dense" (stride); see clip_indices."""

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


SAMPLING_KEYS = ("frames", "sampling", "stride", "views")


def validate_sampling(frames: int, sampling: str, stride: int, views: str | None = None,
                      flags: bool = False) -> None:
    """The one check of the sampling options (stage one and stage three): frames >= 1, a known
    mode, stride >= 1, CxS views. ``flags``: name them as the CLI flags (--frames)."""
    name = (lambda k: f"--{k}") if flags else (lambda k: k)
    if frames < 1:
        raise ConfigError(f"{name('frames')} must be at least 1, got {frames}")
    if stride < 1:
        raise ConfigError(f"{name('stride')} must be at least 1 (1 = consecutive frames), got {stride}")
    if sampling not in SAMPLING_MODES:
        raise ConfigError(f"{name('sampling')} must be one of {', '.join(SAMPLING_MODES)}, got '{sampling}'")
    if views is not None:
        parse_views(views)


def clip_indices(num_frames: int, cfg: SamplingCfg, rng: np.random.Generator | None = None) -> list[list[int]]:
    """Frame indices per temporal clip. ``rng`` given: random TSN offsets or a random dense start
    (training). Without it, the C test clips of n frames (T per clip, segments of n / T frames):

    - segment: clip c takes each segment at fraction (c + 0.5) / C of it (C = 1: the centres, TSN);
    - segment-start: each segment's start shifted by the clip's offset, the C offsets spread evenly
      from 0 to n / T - 1 frames and truncated, ``int(offset + t * n / T)`` (Text4Vis's and
      Side4Video's test code; C = 1: the segment starts);
    - segment-interior: segments of (n - 1) / T frames; clip c takes frame
      ``round(seg * t) + int(seg / (C + 1) * (c + 1))`` of segment t (round half to even), offsets
      at (c + 1) / (C + 1) of a segment: Side4Video's Something-Something v2 test code (C = 1: the
      segment middles, rounded down);
    - dense: T frames ``stride`` apart from a start; the C starts spread evenly from the first to
      the last possible start, ``round(slack / (C - 1) * c)`` (EVL's test code), one clip: the
      middle start, ``slack // 2``. A video shorter than the span repeats its last frame.
    """
    if num_frames < 1:
        raise VideoDecodeError("video has no frames")
    T, C = cfg.frames, cfg.clips
    out = []
    for c in range(C):
        if cfg.mode in ("segment", "segment-start", "segment-interior"):
            seg = num_frames / T
            if rng is not None:
                offs = rng.random(T)
            elif cfg.mode == "segment-interior":
                step = (num_frames - 1) / T
                shift = int(step / (C + 1) * (c + 1))
                out.append([min(int(np.round(step * t)) + shift, num_frames - 1) for t in range(T)])
                continue
            elif cfg.mode == "segment-start":
                start = int(np.linspace(0, seg - 1, num=C)[c])  # truncated toward 0, as numpy's int cast
                out.append([int(start + seg * t) % num_frames for t in range(T)])
                continue
            else:
                offs = np.full(T, (c + 0.5) / C)
            idx = [min(int(seg * t + seg * o), num_frames - 1) for t, o in zip(range(T), offs)]
        elif cfg.mode == "dense":
            span = (T - 1) * cfg.stride + 1
            room = max(num_frames - span, 0)
            if rng is not None:
                start = int(rng.integers(0, room + 1))
            else:
                start = room // 2 if C == 1 else int(round(room / (C - 1) * c))
            idx = [min(start + t * cfg.stride, num_frames - 1) for t in range(T)]
        else:
            raise ConfigError(f"unknown sampling mode '{cfg.mode}' ({' | '.join(SAMPLING_MODES)})")
        out.append(idx)
    return out


def layout_key(mode: str, views) -> dict:
    """What a cache's key records of the view layout beyond mode and CxS, for the (clips, crops) of
    its fixed-view splits: only where the rules changed what such a cache holds (dense test clips
    spread from the first to the last start; views crop-major), so other caches keep their keys."""
    views = [tuple(v) for v in views]
    key = {}
    if mode == "dense" and any(c > 1 for c, _ in views):
        key["dense_starts"] = "spread"
    if any(c > 1 and s > 1 for c, s in views):
        key["view_order"] = "crop-major"
    return key


# ----------------------------------------------------------------------------- decoding
# Which reader is exact, measured on files with the frame index drawn into every frame
# (tests/test_codecs.py; figures in the module docstring):
# - decord's random access (get_batch) seeks to the keyframe before a frame and counts frames
#   from there. It returns wrong frames when frames that follow a keyframe in decode order are
#   shown before it (open GOPs: x265's default, x264 open_gop, MPEG-4 Part 2 with B-frames),
#   and in AVI (no presentation timestamps to seek by), whatever the codec. On mp4/mov/mkv/webm
#   files without such leading frames it was exact on h264 (B-frames, B-pyramid), HEVC, VP8 and
#   VP9 (alt-ref frames included).
# - decord reading forward (next/skip_frames) was exact on all of those files.
# - decord's FFmpeg (4.1) cannot open AV1, reads no display matrix from Matroska, and takes no
#   stream choice; PyAV decodes everything here, with the rotation in frame.rotation.
_DECORD_CODECS = {"h264", "hevc", "vp8", "vp9", "mpeg4"}
_SEEKABLE_FORMATS = ("mov", "mp4", "matroska", "webm")   # names in FFmpeg's demuxer list


@dataclass(frozen=True)
class Decoded:
    """The sampled clips of one video (C x (T, H, W, 3) uint8, upright), the reader that decoded
    them ("decord" random access, "decord-seq" forward reading, "pyav", "frames" for an image
    folder) and what went wrong without stopping it (skipped corrupt packets, decoder errors)."""

    clips: list[np.ndarray]
    decoder: str
    warnings: tuple[str, ...] = ()
    indices: tuple[tuple[int, ...], ...] = ()   # decode index of every sampled frame, per clip
    num_frames: int = 0                         # frames the indices were drawn from


@dataclass
class _Probe:
    stream: int          # index of FFmpeg's best video stream (av_find_best_stream)
    video_streams: int
    codec: str
    format: str
    width: int
    height: int
    packets: int         # non-empty packets of the best stream
    leading: bool        # a frame after a keyframe in decode order is shown before it
    no_pts: bool
    discard: bool        # packets the demuxer marks to drop (edit lists)
    rotation: int | None  # display rotation of the first decoded frame (None: none decoded)
    damaged: str = ""    # what the demuxer or decoder complained of (a cut or corrupt file)


def _first_line(text: str, limit: int = 240) -> str:
    """The useful part of a decoder message: decord prefixes '[hh:mm:ss] src/file.cc:123: ', and
    PyAV repeats the file's path (the failure row names it already) and puts FFmpeg's error code
    before its words ('[Errno 1094995529] Invalid data ...'), which would crowd out the reason."""
    lines = [ln for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    line = re.sub(r"(\[\d\d:\d\d:\d\d\] \S+:\d+: )+", "", lines[-1] if "Check failed" in text else lines[0])
    line = re.sub(r":\s*'[^']*/[^']*'", "", line)  # ": '/path/to/file.mp4'"
    line = re.sub(r"\[Errno -?\d+\]\s*", "", line)  # PyAV's raw AVERROR code (1094995529): the words follow it
    return line.strip()[:limit]


@contextlib.contextmanager
def _capture_stderr(out: list[str]):
    """Route file descriptor 2 to a temporary file while decord runs (its FFmpeg prints decoder
    errors there): the terminal stays clean and the text becomes part of the reason/warnings."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def _av_logs(out: list[str]):
    """Capture FFmpeg's error messages of PyAV calls (PyAV keeps them silent by default)."""
    import av.logging

    old = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(local=False) as logs:  # decoder threads log too
            yield
    finally:
        av.logging.set_level(old)
        out.extend(f"[{name}] {msg.strip()}" for level, name, msg in logs if level <= av.logging.ERROR)


def _rotation(frame) -> int:
    """Counterclockwise display rotation of a decoded frame, in degrees (0 when none)."""
    rot = getattr(frame, "rotation", None)   # PyAV >= 14
    if rot is not None:
        return int(round(rot))
    try:  # older PyAV: the display matrix side data, 3x3 int32 in 16.16 fixed point
        sd = frame.side_data.get("DISPLAYMATRIX")
    except Exception:
        sd = None
    if sd is None:
        return 0
    m = np.frombuffer(bytes(sd), dtype=np.int32)[:9].astype(np.float64) / 65536.0
    return int(round(-math.degrees(math.atan2(m[1] / math.hypot(m[1], m[4]), m[0] / math.hypot(m[0], m[3])))))


def _upright(frame) -> np.ndarray:
    img = frame.to_ndarray(format="rgb24")
    k = round(_rotation(frame) / 90) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def _best_video(container):
    """FFmpeg's best video stream (av_find_best_stream, PyAV >= 13); older PyAV: the first
    default-disposition video stream that is not a cover picture, else the first such stream."""
    if hasattr(container.streams, "best"):
        return container.streams.best("video")
    cands = [s for s in container.streams.video if not int(getattr(s, "disposition", 0)) & 0x400]  # attached_pic
    default = [s for s in cands if int(getattr(s, "disposition", 0)) & 0x1]
    return (default or cands or [None])[0]


def _probe(path: str) -> _Probe:
    """Read the container's packets (no decoding but the first frame): best stream, packet count,
    whether random access can be trusted, display rotation."""
    import av

    logs: list[str] = []
    try:
        with _av_logs(logs), av.open(path) as container:
            stream = _best_video(container)
            if stream is None:
                raise VideoDecodeError("no video stream")
            probe = _Probe(stream.index, len(container.streams.video), stream.codec_context.name,
                           container.format.name, stream.codec_context.width, stream.codec_context.height,
                           0, False, False, False, None)
            key_pts = end = None
            try:
                for packet in container.demux(stream):
                    if packet.size == 0:
                        continue
                    probe.packets += 1
                    if packet.pts is not None:
                        stop = packet.pts + (packet.duration or 0)
                        end = stop if end is None else max(end, stop)
                    if packet.is_discard:
                        probe.discard = True
                    if packet.pts is None:
                        probe.no_pts = True
                    elif packet.is_keyframe:
                        key_pts = packet.pts if key_pts is None else max(key_pts, packet.pts)
                    elif key_pts is not None and packet.pts < key_pts:
                        probe.leading = True
                    if probe.rotation is None and probe.packets <= 64:
                        try:
                            frames = packet.decode()
                        except av.error.FFmpegError:
                            frames = []
                        if frames:
                            probe.rotation = _rotation(frames[0])
            except av.error.FFmpegError as exc:  # a cut file: the decode pass reads what is there
                probe.damaged = f"file ends early ({_first_line(str(exc)) or exc.__class__.__name__})"
            if not probe.damaged and end is not None:
                probe.damaged = _short_of_header(stream, float(end * stream.time_base))
    except VideoDecodeError:
        raise
    except Exception as exc:
        detail = _first_line(str(exc)) or exc.__class__.__name__
        raise VideoDecodeError(f"cannot open: {detail}") from None
    if probe.packets == 0:
        raise VideoDecodeError("no video packets" + (f" ({logs[0]})" if logs else ""))
    if logs and not probe.damaged:
        probe.damaged = f"FFmpeg reported: {logs[0][:160]}"
    return probe


def _short_of_header(stream, end_s: float) -> str:
    """'' unless the stream's duration in the header is well past its last packet (a cut file)."""
    dur = None
    if stream.duration:
        dur = float(stream.duration * stream.time_base)
    else:  # Matroska: a per-stream DURATION tag, HH:MM:SS.fraction
        tag = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
        m = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", tag.strip()) if tag else None
        if m:
            dur = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    if dur is not None and dur - end_s > max(0.5, 0.05 * dur):
        return f"file ends early: the header says {dur:.2f} s, the packets end at {end_s:.2f} s"
    return ""


def _choose(probe: _Probe) -> str:
    """Reader for this file, from what was measured (see the table above)."""
    if (probe.codec not in _DECORD_CODECS or probe.video_streams != 1 or probe.discard
            or probe.rotation != 0 or probe.damaged):
        # decord cannot choose a stream, ignores Matroska rotation, drops no frames, and on a cut
        # file returned a wrong last frame; PyAV counts the frames that really decode
        return "pyav"
    seekable = any(name in _SEEKABLE_FORMATS for name in probe.format.split(","))
    if seekable and not probe.leading and not probe.no_pts:
        return "decord"
    return "pyav"   # decord reading forward is exact here too, but slower than PyAV (and skip_frames seeks)


class _NotExact(Exception):
    """decord's view of the file disagrees with the probe: read it with PyAV instead."""


def _decode_decord(path: str, probe: _Probe, pick: Callable[[int], list[list[int]]],
                   messages: list[str]) -> list[np.ndarray]:
    import decord

    with _capture_stderr(messages):
        vr = decord.VideoReader(path, num_threads=1)
        n = len(vr)
        if n != probe.packets:
            raise _NotExact(f"decord counts {n} frames, the container holds {probe.packets} packets")
        clips = pick(n)
        flat = sorted({i for clip in clips for i in clip})
        frames = vr.get_batch(flat).asnumpy()  # (F, H, W, 3) uint8
    if frames.shape[:3] != (len(flat), probe.height, probe.width):
        raise _NotExact(f"decord returned frames of shape {frames.shape}, expected "
                        f"{(len(flat), probe.height, probe.width)}")
    pos = {i: k for k, i in enumerate(flat)}
    return [frames[[pos[i] for i in clip]] for clip in clips]


def _pyav_read(path: str, stream_index: int, keep: set[int], logs: list[str]) -> tuple[int, dict[int, np.ndarray], int, str]:
    """Decode every frame of one stream in order, skipping packets the decoder rejects.
    Returns (frames decoded, {index: upright rgb frame} for indices in ``keep``, packets
    skipped, why reading stopped early or '')."""
    import av

    got: dict[int, np.ndarray] = {}
    n = skipped = 0
    stopped = ""
    with _av_logs(logs), av.open(path) as container:
        stream = container.streams[stream_index]
        stream.thread_type = "AUTO"
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as exc:  # the file ends in the middle of a packet
                stopped = _first_line(str(exc)) or exc.__class__.__name__
                break
            try:
                frames = packet.decode()
            except av.error.FFmpegError:  # InvalidDataError and its kin: skip this packet
                skipped += 1
                continue
            for frame in frames:
                if n in keep:
                    got[n] = _upright(frame)
                n += 1
        if stopped:  # drain what the decoder still holds
            with contextlib.suppress(av.error.FFmpegError):
                for frame in stream.codec_context.decode(None):
                    if n in keep:
                        got[n] = _upright(frame)
                    n += 1
    return n, got, skipped, stopped


def _decode_pyav(path: str, probe: _Probe, pick: Callable[[int], list[list[int]]],
                 warnings: list[str]) -> list[np.ndarray]:
    """One pass when every packet gives a frame (sampled from the probe's packet count, only the
    sampled frames held); when some do not (corrupt packets, a cut file), a second pass samples
    from the frames that really decode. Memory stays at the sampled frames either way."""
    logs: list[str] = []
    clips = pick(probe.packets)
    n, got, skipped, stopped = _pyav_read(path, probe.stream, {i for c in clips for i in c}, logs)
    if n == 0:
        raise VideoDecodeError("no decodable frames" + (f" ({logs[0]})" if logs else f" ({stopped})" if stopped else ""))
    if n != probe.packets:
        clips = pick(n)
        n2, got, _, _ = _pyav_read(path, probe.stream, {i for c in clips for i in c}, [])
        if n2 != n:
            raise VideoDecodeError(f"PyAV decoded {n} frames, then {n2} from the same file")
        warnings.append(f"{n} frames decoded from {probe.packets} packets; sampled from the {n} that decoded")
    if skipped:
        warnings.append(f"skipped {skipped} corrupt packet(s) of {probe.packets}")
    if stopped:
        warnings.append(f"file ends early: {stopped}")
    elif probe.damaged:
        warnings.append(probe.damaged)
    if logs:
        warnings.append(f"decoder reported {len(logs)} error(s), first: {logs[0][:160]}")
    missing = {i for c in clips for i in c} - set(got)
    if missing:
        raise VideoDecodeError(f"PyAV did not return sampled frame(s) {sorted(missing)[:5]}")
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


def decode_video(path: str, cfg: SamplingCfg, num_frames: int | None = None,
                 rng: np.random.Generator | None = None) -> Decoded:
    """Decode the C sampled clips of a video, frame-exact whatever the codec and container.

    The container is probed first (FFmpeg's best video stream, packets, rotation); decord reads
    the file where its random access (or forward reading) was measured exact for such a file,
    PyAV otherwise or when decord fails. Frames are upright (display rotation applied).
    Raises VideoDecodeError with the reason when no reader can decode the file.
    """

    state = rng.bit_generator.state if rng is not None else None
    picked: list = [(), 0]  # the indices of the last pick and the frame count they came from

    def pick(n: int) -> list[list[int]]:
        if state is not None:  # a reader that retries draws the same sample, not the next one
            rng.bit_generator.state = state
        clips = clip_indices(n, cfg, rng)
        picked[:] = [tuple(tuple(c) for c in clips), n]
        return clips

    out = _decode_any(path, num_frames, pick)
    return Decoded(out.clips, out.decoder, out.warnings, *picked)


def _decode_any(path: str, num_frames: int | None, pick: Callable[[int], list[list[int]]]) -> Decoded:
    if os.path.isdir(path):
        return Decoded(_decode_folder(path, num_frames, pick), "frames")
    if not os.path.exists(path):
        raise VideoDecodeError("file not found")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError("empty file (0 bytes)")
    probe = _probe(path)
    how = _choose(probe)
    first_reason = ""
    if how != "pyav":
        messages: list[str] = []
        try:
            clips = _decode_decord(path, probe, pick, messages)
            said = "".join(messages).strip()
            if said:  # decord's FFmpeg complained: its frame count and seeks are not to be trusted
                raise _NotExact(said)
            return Decoded(clips, how)
        except Exception as exc:  # decord raises its own and generic errors: PyAV reads it instead
            first_reason = _first_line(str(exc)) or exc.__class__.__name__
    warnings: list[str] = []
    try:
        clips = _decode_pyav(path, probe, pick, warnings)
    except VideoDecodeError as exc:
        raise VideoDecodeError(f"{exc}" + (f" (decord: {first_reason})" if first_reason else "")) from None
    except Exception as exc:
        reason = _first_line(str(exc)) or exc.__class__.__name__
        raise VideoDecodeError(f"undecodable (pyav: {reason}" + (f"; decord: {first_reason})" if first_reason else ")")) from None
    return Decoded(clips, "pyav", tuple(warnings))


def decode_clips(path: str, cfg: SamplingCfg, num_frames: int | None = None,
                 rng: np.random.Generator | None = None) -> tuple[list[np.ndarray], str]:
    """Decode the C sampled clips of a video: list of (T, H, W, 3) uint8, and the reader used."""
    out = decode_video(path, cfg, num_frames, rng)
    return out.clips, out.decoder


# ----------------------------------------------------------------------------- views
def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, h, w, 3) uint8 with min(h, w) == size (bicubic, antialiased)."""
    T, H, W, _ = frames.shape
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    x = frames.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, height, width, 3) uint8, whatever the aspect ratio (bicubic,
    antialiased, as resize_short_side): the fixed test scale of Something-Something v2 (256 x 320)."""
    x = frames.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def parse_frame_size(text: str) -> tuple[int, int] | None:
    """'256x320' -> (256, 320): frames resized to H x W before the crops; '' -> None (the short-side rule)."""
    if not text:
        return None
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--resize-to must look like HxW (e.g. 256x320), got '{text}'") from None
    if h < 1 or w < 1:
        raise ConfigError(f"--resize-to {text}: height and width must be positive")
    return h, w


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


def make_views(clips: Sequence[np.ndarray], size: int, crops: int, resize: int | None = None,
               frame_size: tuple[int, int] | None = None) -> np.ndarray:
    """C clips of (T, H, W, 3) -> (V = S*C, T, size, size, 3) uint8, crop-major: view s * C + c is
    crop s of clip c, the order EVL's, Text4Vis's and Side4Video's test code stack their views in
    (every clip of the first crop, then of the next). The short side is first resized to ``resize``
    (default ``size``; e.g. 256 for 224 crops), or, with ``frame_size`` (H, W), the frames to
    exactly H x W (Something-Something v2's 256 x 320)."""
    per_clip = []
    for clip in clips:
        frames = torch.from_numpy(np.ascontiguousarray(clip))
        if frame_size is not None:
            if min(frame_size) < size:
                raise ConfigError(f"frames resized to {frame_size[0]}x{frame_size[1]} are smaller than the "
                                  f"{size} px crop")
            resized = resize_frames(frames, *frame_size)
        else:
            resized = resize_short_side(frames, resize or size)
        per_clip.append([v.contiguous() for v in spatial_crops(resized, size, crops)])
    return torch.stack([views[s] for s in range(crops) for views in per_clip]).numpy()


def normalize(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float normalised with the model's mean/std."""
    x = frames.movedim(-1, -3).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------- augmented views (view bank)
# Columns of one recorded augmented view (a row of <split>/view_params, float32; every value is
# an integer, exact in float32): the mirror flag, the crop box in pixels of the upright decoded
# frame, that frame's size, the video's frame count and the T decode indices of the clip.
VIEW_PARAM_COLUMNS = ("flip", "crop_y", "crop_x", "crop_h", "crop_w", "frame_h", "frame_w", "num_frames")


@dataclass(frozen=True)
class AugViewCfg:
    """Random resized crop (area fraction and aspect ratio ranges, one box for every frame of a
    clip) and a horizontal flip with probability ``flip``; drawn once per view at extraction."""

    area: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5


def draw_resized_crop(rng: np.random.Generator, height: int, width: int, area: tuple[float, float],
                      ratio: tuple[float, float], tries: int = 10) -> tuple[int, int, int, int]:
    """A crop box (y, x, h, w) of an (height, width) frame covering an area fraction drawn
    uniformly from ``area``, its aspect ratio w/h log-uniformly from ``ratio``. After ``tries``
    boxes that do not fit: the largest centred box whose ratio lies in the range."""
    total = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        target = total * rng.uniform(area[0], area[1])
        r = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target * r)))
        h = int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return y, x, h, w
    r = width / height
    if r < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif r > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_view(clip: np.ndarray, box: tuple[int, int, int, int], flip: bool, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8: the box (y, x, h, w) of every frame,
    resized to size x size (bicubic, antialiased, as resize_short_side) and mirrored if ``flip``."""
    y, x, h, w = box
    crop = torch.from_numpy(np.ascontiguousarray(clip[:, y:y + h, x:x + w])).permute(0, 3, 1, 2).float()  # (T, 3, h, w)
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # (T, size, size, 3)
    if flip:
        out = out.flip(2)
    return out.contiguous().numpy()


def augmented_views(decoded: Decoded, size: int, cfg, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The K clips of ``decoded`` (K random clips, see clip_indices with an rng) as K augmented
    views: (K, T, size, size, 3) uint8, and their parameters (K, P) float32 laid out as
    ``view_param_columns(cfg, T)``: VIEW_PARAM_COLUMNS, the pipeline's own columns, then the T
    frame indices. ``cfg``: an AugViewCfg (the light bank: crop and flip, 8 + T columns, the draws
    and bytes it always made) or a paper pipeline (stages.heads.facts.TrainPipeline, its head's
    ``train_pipeline_for``): every parameter drawn from ``rng``, recorded, and applied from the
    recorded row (``apply_view_params``), so a row reproduces its view exactly."""
    views, params = [], []
    for clip, idx in zip(decoded.clips, decoded.indices):
        H, W = clip.shape[1:3]
        if isinstance(cfg, AugViewCfg):
            box = draw_resized_crop(rng, H, W, cfg.area, cfg.ratio)
            flip = bool(rng.random() < cfg.flip)
            views.append(resized_crop_view(clip, box, flip, size))
            params.append([float(flip), *box, H, W, decoded.num_frames, *idx])
            continue
        drawn = draw_view_params(rng, H, W, len(idx), size, cfg)
        row = np.asarray([*drawn[:7], decoded.num_frames, *drawn[7:], *idx], dtype=np.float32)
        views.append(apply_view_params(clip, row, cfg, size))
        params.append(row)
    return np.stack(views), np.asarray(params, dtype=np.float32)


def view_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The two generators of one video's view bank (its clips, then its crops and flips): a
    function of (cache seed, split, index) alone, so reruns, resumes and any number of workers
    or ranks draw the same views."""
    temporal, spatial = np.random.SeedSequence([int(seed), zlib.crc32(split.encode()), int(index)]).spawn(2)
    return np.random.default_rng(temporal), np.random.default_rng(spatial)


# ----------------------------------------------------------------------------- paper train pipelines
# torchvision's RandAugment op table (transforms.v2.RandAugment, 31 magnitude bins): name, the
# magnitudes over the bins for a (height, width) image, whether a sign is drawn. Op ids are the
# positions here (recorded in view_params); tests/test_train_aug.py checks it against torchvision's.
RA_OPS: tuple[tuple[str, Callable | None, bool], ...] = (
    ("Identity", None, False),
    ("ShearX", lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    ("ShearY", lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    ("TranslateX", lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n), True),
    ("TranslateY", lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n), True),
    ("Rotate", lambda n, h, w: torch.linspace(0.0, 30.0, n), True),
    ("Brightness", lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    ("Color", lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    ("Contrast", lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    ("Sharpness", lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    ("Posterize", lambda n, h, w: 8 - (torch.arange(n) / ((n - 1) / 4)).round().int(), False),
    ("Solarize", lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    ("AutoContrast", None, False),
    ("Equalize", None, False),
)
RA_BINS = 31
_MS_GRID = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3))


def view_param_columns(cfg, frames: int) -> list[str]:
    """The column names of a view bank's ``view_params`` as its metadata records them: the
    VIEW_PARAM_COLUMNS, a paper pipeline's own columns, then ``index_0..T-1`` (one name for the
    T frame indices). Light (AugViewCfg): the 8 + T columns it always had. A paper pipeline adds
    ``resize_h, resize_w`` (the frame the crop box is in; 0: the decoded frame), with colour jitter
    ``jitter`` (applied 1/0), its four factors and ``jitter_order_0..3``, with grayscale its flag,
    and RandAugment ``ra_op_i, ra_mag_i`` (op id in RA_OPS, signed magnitude) per op, per frame
    ``ra_op_i_fT`` when drawn per frame. crop_* is then the box in the resized frame."""
    return [*VIEW_PARAM_COLUMNS, *_paper_columns(cfg, frames), f"index_0..{frames - 1}"]


def _paper_columns(cfg, frames: int) -> list[str]:
    if isinstance(cfg, AugViewCfg):
        return []
    cols = ["resize_h", "resize_w"]
    if cfg.jitter:
        cols += ["jitter", "brightness", "contrast", "saturation", "hue", *(f"jitter_order_{i}" for i in range(4))]
    if cfg.grayscale:
        cols.append("grayscale")
    if cfg.ra_ops:
        groups = [f"_f{t}" for t in range(frames)] if cfg.ra_per_frame else [""]
        cols += [f"ra_{kind}_{i}{g}" for g in groups for i in range(cfg.ra_ops) for kind in ("op", "mag")]
    return cols


def _resized_size(height: int, width: int, side: int) -> tuple[int, int]:
    scale = side / min(height, width)
    return max(side, round(height * scale)), max(side, round(width * scale))


def _draw_ra(rng: np.random.Generator, cfg, height: int, width: int, groups: int) -> list[float]:
    out = []
    for _ in range(groups * cfg.ra_ops):
        op = int(rng.integers(len(RA_OPS)))
        _name, mags, signed = RA_OPS[op]
        mag = 0.0 if mags is None else float(mags(RA_BINS, height, width)[cfg.ra_magnitude])
        if signed and rng.random() <= 0.5:
            mag = -mag
        out += [op, mag]
    return out


def draw_view_params(rng: np.random.Generator, height: int, width: int, frames: int, size: int, cfg) -> list[float]:
    """One view's random parameters under paper pipeline ``cfg`` for a decoded (height, width)
    clip of ``frames`` frames, drawn from ``rng`` in the pipeline's order: [flip, crop_y, crop_x,
    crop_h, crop_w, frame_h, frame_w, then the pipeline's own columns (``view_param_columns``
    without num_frames and the indices, which are the caller's)]."""
    rh = rw = 0
    H, W = height, width
    if cfg.resize_ratio:
        rh, rw = H, W = _resized_size(height, width, int(round(size * cfg.resize_ratio)))
    groups = frames if cfg.ra_per_frame else 1
    ra = _draw_ra(rng, cfg, H, W, groups) if cfg.ra_ops and cfg.ra_before_crop else []
    if cfg.crop == "multiscale":
        base = min(H, W)
        sides = [max(1, int(base * s)) for s in cfg.ms_scales]
        sides = [size if abs(x - size) < 3 else x for x in sides]  # TSN snaps a side within 3 px of the input
        pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides)
                 if abs(i - j) <= cfg.ms_max_distort and w <= W and h <= H] or [(min(W, H), min(W, H))]
        cw, ch = pairs[int(rng.integers(len(pairs)))]
        gx, gy = _MS_GRID[int(rng.integers(len(_MS_GRID)))]
        box = ((H - ch) // 4 * gy, (W - cw) // 4 * gx, ch, cw)
    else:
        box = draw_resized_crop(rng, H, W, tuple(cfg.area), tuple(cfg.ratio))
    flip = bool(cfg.flip and rng.random() < cfg.flip)
    row = [float(flip), *box, height, width, rh, rw]
    if cfg.jitter:
        apply = bool(rng.random() < cfg.jitter)
        b, c, s = (float(rng.uniform(max(0.0, 1 - v), 1 + v)) for v in (cfg.brightness, cfg.contrast, cfg.saturation))
        hue = float(rng.uniform(-cfg.hue, cfg.hue))
        row += [float(apply), b, c, s, hue, *(float(i) for i in rng.permutation(4))]
    if cfg.grayscale:
        row.append(float(rng.random() < cfg.grayscale))
    if cfg.ra_ops and not cfg.ra_before_crop:
        ra = _draw_ra(rng, cfg, size, size, groups)
    return row + ra


def _interp(name: str):
    from torchvision.transforms.v2 import InterpolationMode

    modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
    if name not in modes:
        raise ConfigError(f"train pipeline interpolation must be one of {', '.join(modes)}, got '{name}'")
    return modes[name]


def _ra_apply(x: torch.Tensor, op: int, mag: float) -> torch.Tensor:
    """One RandAugment op on uint8 (..., 3, H, W), as torchvision.transforms.v2.RandAugment applies
    it (nearest interpolation, fill 0)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    name, near = RA_OPS[op][0], InterpolationMode.NEAREST
    if name == "Identity":
        return x
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(mag))
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, interpolation=near, fill=None, center=[0, 0],
                         shear=[shear, 0.0] if name == "ShearX" else [0.0, shear])
    if name in ("TranslateX", "TranslateY"):
        return TF.affine(x, angle=0.0, translate=[int(mag), 0] if name == "TranslateX" else [0, int(mag)],
                         scale=1.0, interpolation=near, shear=[0.0, 0.0], fill=None)
    if name == "Rotate":
        return TF.rotate(x, angle=mag, interpolation=near, fill=None)
    if name == "Posterize":
        return TF.posterize(x, bits=int(mag))
    if name == "Solarize":
        return TF.solarize(x, threshold=255.0 * mag)
    if name == "AutoContrast":
        return TF.autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    adjust = {"Brightness": TF.adjust_brightness, "Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast,
              "Sharpness": TF.adjust_sharpness}[name]
    return adjust(x, 1.0 + mag)


def _ra_row(x: torch.Tensor, cfg, values: np.ndarray) -> torch.Tensor:
    n = cfg.ra_ops
    pairs = values.reshape(-1, n, 2)  # (groups, ops, [op, magnitude])
    if not cfg.ra_per_frame:
        for op, mag in pairs[0]:
            x = _ra_apply(x, int(op), float(mag))
        return x
    frames = []
    for t, ops in enumerate(pairs):
        f = x[t:t + 1]
        for op, mag in ops:
            f = _ra_apply(f, int(op), float(mag))
        frames.append(f)
    return torch.cat(frames)


def apply_view_params(clip: np.ndarray, row: np.ndarray, cfg, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 decoded clip -> (T, size, size, 3) uint8: the view a recorded
    ``view_params`` row (laid out as ``view_param_columns(cfg, T)``) says, under paper pipeline
    ``cfg``, with torchvision.transforms.v2.functional. Re-applied to the decoded frames of the
    row's indices it gives the stored view exactly."""
    from torchvision.transforms.v2 import functional as TF

    T = clip.shape[0]
    names = view_param_columns(cfg, T)[:-1]
    col = {n: i for i, n in enumerate(names)}
    v = np.asarray(row, dtype=np.float32)
    interp = _interp(cfg.interpolation)
    x = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    rh, rw = int(v[col["resize_h"]]), int(v[col["resize_w"]])
    if rh:
        x = TF.resize(x, [rh, rw], interpolation=interp, antialias=True)
    ra = v[len(names) - 2 * cfg.ra_ops * (T if cfg.ra_per_frame else 1):len(names)] if cfg.ra_ops else None
    if ra is not None and cfg.ra_before_crop:
        x = _ra_row(x, cfg, ra)
    y, x0, h, w = (int(v[col[k]]) for k in ("crop_y", "crop_x", "crop_h", "crop_w"))
    x = TF.resized_crop(x, y, x0, h, w, [size, size], interpolation=interp, antialias=True)
    if v[col["flip"]]:
        x = TF.horizontal_flip(x)
    if cfg.jitter and v[col["jitter"]]:
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        factors = [float(v[col[k]]) for k in ("brightness", "contrast", "saturation", "hue")]
        for i in range(4):
            fn = int(v[col[f"jitter_order_{i}"]])
            x = adjust[fn](x, factors[fn])
    if cfg.grayscale and v[col["grayscale"]]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if ra is not None and not cfg.ra_before_crop:
        x = _ra_row(x, cfg, ra)
    return x.permute(0, 2, 3, 1).contiguous().numpy()
