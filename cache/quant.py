"""Per-token int8 quantisation with a few outlier channels kept in fp16 (numpy only).

Each token vector x (last axis, D channels) is stored as:
  q      int8  (..., D)   round(x / scale), the outlier channels zeroed
  scale  fp16  (...)      absmax of the non-outlier channels / 127
  oidx   int16 (..., k)   indices of the k channels of largest |x|
  oval   fp16  (..., k)   their values
CLIP ViT activations have a handful of channels that are orders of magnitude larger than the
rest; taking them out per token keeps the int8 grid fine for everything else. Choosing them
per token (not one global set) keeps every video independent of every other, so shards written
by different processes, or redone after a crash, quantise identically. Size per token:
D + 2 + 4k bytes, about half of fp16 (2D) for D = 768 and k = 4.
"""

from __future__ import annotations

import numpy as np

__all__ = ["QUANT_SUFFIXES", "FP16_MAX", "finite_rows", "quantize_int8", "dequantize_int8"]

QUANT_SUFFIXES = ("q", "scale", "oidx", "oval")
FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def finite_rows(x: np.ndarray) -> np.ndarray:
    """(n,) bool: row i of ``x`` (n, ...) holds no NaN/inf. fp16 by its exponent bits (no float
    conversion: 37 ms for 64 MB, a third of the crc32 every shard write pays already)."""
    x = np.asarray(x)
    if x.dtype == np.float16:
        bits = np.ascontiguousarray(x).view(np.uint16).reshape(len(x), -1)
        return ((bits & 0x7C00) != 0x7C00).all(axis=1)
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def quantize_int8(x: np.ndarray, outliers: int = 4) -> dict[str, np.ndarray]:
    """Token vectors ``x`` (..., D) as int8 parts; refuses (ValueError) NaN/inf, and values beyond
    fp16's range (the outliers and scales are fp16): what they would store is not the input."""
    x = np.asarray(x, dtype=np.float32)
    peak = float(np.abs(x).max()) if x.size else 0.0  # NaN when any value is NaN, inf when any is inf
    if not np.isfinite(peak):
        n = int((~np.isfinite(x)).sum())
        raise ValueError(f"quantize_int8: the input holds NaN/inf ({n} of {x.size} values); int8 cannot store them")
    if peak > FP16_MAX:
        raise ValueError(f"quantize_int8: the input reaches {peak:.3g}, beyond the {FP16_MAX:g} its fp16 outliers "
                         "and scales hold")
    D = x.shape[-1]
    k = min(outliers, D)
    flat = x.reshape(-1, D)  # (n_tokens, D)
    if k > 0:
        oidx = np.argpartition(-np.abs(flat), k - 1, axis=1)[:, :k]  # (n, k)
        oidx.sort(axis=1)
        oval = np.take_along_axis(flat, oidx, axis=1)
        rest = flat.copy()
        np.put_along_axis(rest, oidx, 0.0, axis=1)
    else:
        oidx = np.zeros((flat.shape[0], 0), dtype=np.int64)
        oval = np.zeros((flat.shape[0], 0), dtype=np.float32)
        rest = flat
    absmax = np.abs(rest).max(axis=1)
    scale = (absmax / 127.0).astype(np.float16)
    safe = np.where(scale.astype(np.float32) > 0, scale.astype(np.float32), 1.0)
    q = np.clip(np.rint(rest / safe[:, None]), -127, 127).astype(np.int8)
    lead = x.shape[:-1]
    return {
        "q": q.reshape(*lead, D),
        "scale": scale.reshape(lead),
        "oidx": oidx.astype(np.int16).reshape(*lead, k),
        "oval": oval.astype(np.float16).reshape(*lead, k),
    }


def dequantize_int8(parts: dict[str, np.ndarray], dtype=np.float32) -> np.ndarray:
    q, scale = parts["q"], parts["scale"]
    out = q.astype(np.float32) * scale.astype(np.float32)[..., None]
    if parts["oidx"].shape[-1]:
        np.put_along_axis(out, parts["oidx"].astype(np.int64), parts["oval"].astype(np.float32), axis=-1)
    return out.astype(dtype, copy=False)
