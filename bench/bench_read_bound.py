"""What bounds stage two's loader on a CPU box: the same cached bytes read three ways, side by side.

    python bench/bench_read.py --quick --keep --root artifacts/bench-read   # builds the caches
    python bench/bench_read_bound.py artifacts/bench-read/fp16 --head EVL

Rows, per repeat, measured one after the other on the same files (warm page cache):
- `cat`-like: each file read into one 128 KB buffer that stays in the CPU cache (what `cat > /dev/null`
  measures: no byte is ever written to DRAM);
- the loader (stages/loader.py, stored dtype, workers 0): batches of 8 videos written into a
  batch-sized buffer, as a batch must be to be handed to a head or copied to a GPU;
- `preadv` of each whole file into one large buffer (the plain way to land the bytes in RAM);
- memcpy of a batch-sized array (the box's DRAM copy bandwidth, the ceiling of any path whose
  output is a batch in memory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache", help="a cache bench_read.py built (--keep)")
    ap.add_argument("--head", default="EVL", choices=["EVL", "Side4Video"])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    import bench_read as B
    from cache.store import open_store
    from stages.cache_data import CacheSplit, HeadInputs
    from stages.heads import DataKeys
    from stages.loader import CacheLoader, ZarrBatches, epoch_plan

    torch.set_num_threads(1)
    st = open_store(args.cache)
    n = st.num_videos("train")
    keys = DataKeys(**B.HEADS[args.head])
    inputs = HeadInputs(st, keys, "train")
    src = ZarrBatches(CacheSplit(st, inputs, np.arange(n), train=True, preload=False), preload="off")
    plan = epoch_plan(n, 8, 1, 0, 0, 1, "full")
    files = B.array_files(st, inputs.array_names())
    nbytes = sum(f.stat().st_size for f in files)
    batch_bytes = nbytes * 8 // n
    big = bytearray(max(f.stat().st_size for f in files))
    small = bytearray(131072)
    a, b = np.ones(batch_bytes // 8), np.empty(batch_bytes // 8)

    def cat_like():
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(small):
                    pass

    def loader():
        for _ in CacheLoader(src, plan, "cpu", workers=0, raw=True):
            pass

    def preadv_whole():
        view = memoryview(big)
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                size, off = os.fstat(fd).st_size, 0
                while off < size:
                    off += os.preadv(fd, [view[off:size]], off)
            finally:
                os.close(fd)

    def memcpy():
        for _ in range(max(1, nbytes // batch_bytes)):
            np.copyto(b, a)

    paths = {"cat-like (128 KB buffer)": cat_like, "loader, batches of 8 (stored dtype)": loader,
             "preadv, whole file into one buffer": preadv_whole, "memcpy of a batch (DRAM bandwidth)": memcpy}
    best = {k: 0.0 for k in paths}
    for fn in paths.values():
        fn()  # warm: page cache, buffers touched
    for _ in range(args.reps):
        for name, fn in paths.items():
            t = time.perf_counter()
            fn()
            best[name] = max(best[name], nbytes / (time.perf_counter() - t) / 1e6)
    load = os.getloadavg()
    table = Table(title=f"bench_read_bound.py: {args.head}'s arrays of {args.cache} ({nbytes / 1e6:.0f} MB, {n} videos), "
                        f"best of {args.reps}; load {load[0]:.1f}")
    table.add_column("path")
    table.add_column("MB/s", justify="right")
    table.add_column("% of cat-like", justify="right")
    for name, v in best.items():
        table.add_row(name, f"{v:,.0f}", f"{100 * v / best['cat-like (128 KB buffer)']:.0f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
