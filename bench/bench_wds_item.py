"""Per-sample cost of turning a WebDataset sample into a head's input: select, then convert
(what stages/data/wds_split.py does) vs convert the whole stored array, then select (what it did);
and what the member checksums (crc32c, header format 2) cost on export and on read.

ViT-B/16 shapes (8 frames, 197 tokens of 768 for cls/patch). The selection is one training
view and the head's layers. Prints ms per sample and the ratio, measured side by side.

Checksum table: the same samples written as one shard by the exporter's shard writer (tar
write + fsync) and read back by the readers' path (iter_tar_samples with the header's checks,
then select and convert), once as shipped and once with the crc32c replaced by a no-op (the
same code otherwise), alternately. Process CPU time, so that other jobs on a shared box and
the time spent waiting for the disk do not count; the shard is read from the page cache just
after it is written. Both make the ratios upper bounds of what a real export or epoch sees.

    .venv/bin/python bench/bench_wds_item.py [--repeats 20] [--workdir DIR]
"""

from __future__ import annotations

import io
import json
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import google_crc32c
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, best_of, console, make_table  # noqa: E402

import cache.wds as wds  # noqa: E402
from cache.quant import QUANT_SUFFIXES, dequantize_int8, quantize_int8  # noqa: E402
from cache.wds import ShardCheck, iter_tar_samples, npy_bytes, sample_array  # noqa: E402

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


def _export_shard(folder: Path, samples: list[list[tuple[str, bytes]]]) -> dict:
    """The samples as one shard, by the exporter's writer; the header's word on it."""
    for f in folder.iterdir():
        f.unlink()
    series = wds.ShardSeries(folder, "b-train", 1 << 40)
    for i, members in enumerate(samples):
        series.add(i, members)
    series.close()
    return {"file": folder / series.shards[0]["file"], "crc32c": series.shards[0]["crc32c"],
            "member_bytes": series.member_bytes, "json_max": series.json_max}


def _read_shard(shard: dict, name: str, dtype: str, layers: list[int]) -> int:
    """Every member read and checked as a reader does, then each sample's head input made."""
    check = ShardCheck(str(shard["file"]), shard["member_bytes"], shard["json_max"], shard["crc32c"])
    n = 0
    with open(shard["file"], "rb") as fh:
        for sample in iter_tar_samples(fh, None, check):
            _select_then_convert(sample, name, dtype, layers)
            n += 1
    return n


def _checksum_table(repeats: int, workdir: Path | None, quick: bool, rng: np.random.Generator):
    table = make_table("member checksums (crc32c): CPU ms per sample, one shard written then read (median of runs, "
                       "interleaved)", ("case", "MB", "export ms", "+crc32c ms", "export ratio", "read ms",
                                        "+crc32c ms", "read ratio", "crc32c GB/s", "zlib crc32 GB/s"))
    folder = Path(tempfile.mkdtemp(prefix="bench-wds-crc-", dir=workdir))
    real = wds.member_crc
    try:
        for label, name, dtype, shape, layers in CASES:
            one = _sample(name, dtype, shape, rng)
            size = sum(len(v) for v in one.values())
            count = max(2, (16 if quick else 64) * 10**6 // size)
            meta = lambda i: [(f"train_{i:08d}.json", json.dumps({"split": "train", "index": i}).encode())]  # noqa: E731
            samples = [meta(i) + [(f"train_{i:08d}.{k}", v) for k, v in one.items()] for i in range(count)]
            times: dict[tuple[str, bool], list[float]] = {(w, c): [] for w in ("export", "read") for c in (0, 1)}
            for r in range(repeats + 1):  # interleaved, so both variants see the same load; the first is warm-up
                for crc in (False, True):
                    wds.member_crc = real if crc else (lambda data: 0)
                    t = time.process_time()
                    shard = _export_shard(folder, samples)
                    times["export", crc].append(time.process_time() - t)
                    t = time.process_time()
                    assert _read_shard(shard, name, dtype, layers) == count
                    times["read", crc].append(time.process_time() - t)
            ms = {k: 1000 * statistics.median(v[1:]) / count for k, v in times.items()}
            blob = b"".join(one.values())
            gbs = {f: len(blob) / best_of(lambda: f(blob), repeats, warmup=1).median / 1e9
                   for f in (google_crc32c.value, zlib.crc32)}
            table.add_row(label, f"{size / 1e6:.1f}", f"{ms['export', False]:.2f}", f"{ms['export', True]:.2f}",
                          f"{ms['export', True] / ms['export', False]:.2f}x", f"{ms['read', False]:.2f}",
                          f"{ms['read', True]:.2f}", f"{ms['read', True] / ms['read', False]:.2f}x",
                          f"{gbs[google_crc32c.value]:.2f}", f"{gbs[zlib.crc32]:.2f}")
    finally:
        wds.member_crc = real
        shutil.rmtree(folder, ignore_errors=True)
    return table


def main() -> None:
    ap = base_parser(__doc__, quick="5 repeats instead of --repeats, 16 MB shards instead of 64 MB")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--workdir", default="", help="where the checksum table's shard is written (default: the "
                                                  "system's temporary folder)")
    ap.add_argument("--only", choices=("convert", "checksum"), default=None, help="print just one of the tables")
    args = ap.parse_args()
    repeats = 5 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    if args.only != "convert":
        console(170).print(_checksum_table(min(repeats, 5), Path(args.workdir) if args.workdir else None,
                                           args.quick, rng))
    if args.only == "checksum":
        return
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
