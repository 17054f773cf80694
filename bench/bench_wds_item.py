"""Per-sample cost of turning a WebDataset sample into a head's input: select, then convert
(what stages/wds_data.py does) vs convert the whole stored array, then select (what it did).

ViT-B/16 shapes (8 frames, 197 tokens of 768 for cls/patch). The selection is one training
view and the head's layers. Prints ms per sample and the ratio, measured side by side.

    .venv/bin/python bench/bench_wds_item.py [--repeats 20]
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, best_of, console, make_table  # noqa: E402

from cache.quant import QUANT_SUFFIXES, dequantize_int8, quantize_int8  # noqa: E402
from cache.wds import npy_bytes, sample_array  # noqa: E402

CASES = [
    # name, member, stored dtype, shape (V, T, L, ...), the head's layer positions
    ("cls, 3 views x 12 layers -> 1 view, last 4", "cls", "float16", (3, 8, 12, 768), [8, 9, 10, 11]),
    ("patch, 1 view x 4 layers -> last 1", "patch", "float16", (1, 8, 4, 196, 768), [3]),
    ("patch int8, 1 view x 4 layers -> last 1", "patch", "int8", (1, 8, 4, 196, 768), [3]),
    ("patch, 1 view x 4 layers -> all 4", "patch", "float16", (1, 8, 4, 196, 768), [0, 1, 2, 3]),
]


def _sample(name: str, dtype: str, shape: tuple, rng: np.random.Generator) -> dict:
    x = rng.standard_normal(shape, dtype=np.float32)
    if dtype == "int8":
        parts = quantize_int8(x)
        return {f"{name}.{s}.npy": npy_bytes(parts[s]) for s in QUANT_SUFFIXES}
    return {f"{name}.npy": npy_bytes(x.astype(dtype))}


def _convert_then_select(sample: dict, name: str, dtype: str, layers: list[int]) -> np.ndarray:
    """The former order: decode and convert the whole array, then pick the view and layers."""
    load = lambda b: np.load(io.BytesIO(b), allow_pickle=False)  # noqa: E731
    if dtype == "int8":
        arr = dequantize_int8({s: load(sample[f"{name}.{s}.npy"]) for s in QUANT_SUFFIXES})
    else:
        arr = load(sample[f"{name}.npy"]).astype(np.float32)
    return np.ascontiguousarray(arr[:, :, layers][0:1])


def _select_then_convert(sample: dict, name: str, dtype: str, layers: list[int]) -> np.ndarray:
    return np.ascontiguousarray(sample_array(sample, name, dtype, np.float32, (slice(0, 1), slice(None), layers)))


def _ms(fn, repeats: int) -> float:
    return 1000 * best_of(fn, repeats, warmup=1).median


def main() -> None:
    ap = base_parser(__doc__, quick="5 repeats instead of --repeats")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    repeats = 5 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    table = make_table("WebDataset sample -> head input (median of runs, one process)",
                       ("case", "stored MB", "convert, select ms", "select, convert ms", "speed-up"))
    for label, name, dtype, shape, layers in CASES:
        sample = _sample(name, dtype, shape, rng)
        a = _convert_then_select(sample, name, dtype, layers)
        b = _select_then_convert(sample, name, dtype, layers)
        assert np.array_equal(a, b), label  # the same input either way
        old = _ms(lambda: _convert_then_select(sample, name, dtype, layers), repeats)
        new = _ms(lambda: _select_then_convert(sample, name, dtype, layers), repeats)
        size = sum(len(v) for v in sample.values()) / 1e6
        table.add_row(label, f"{size:.1f}", f"{old:.2f}", f"{new:.2f}", f"{old / new:.1f}x")
    console(130).print(table)


if __name__ == "__main__":
    main()
