"""What bounds stage two's loader on a CPU box: the same cached bytes read several ways, side by side.

    python bench/bench_read.py --quick --keep --root artifacts/bench-read   # builds the caches
    python bench/bench_read_bound.py artifacts/bench-read/fp16 --head EVL

Rows, per repeat, measured one after the other on the same files (warm page cache):
- `cat`-like: each file read into one 128 KB buffer that stays in the CPU cache (what `cat > /dev/null`
  measures: no byte is ever written to DRAM);
- the loader (stages/data/loader.py, stored dtype, workers 0): batches of 8 videos written into a
  batch-sized buffer, as a batch must be to be handed to a head or copied to a GPU; with preload
  off (read from the files) and on (copied out of the arrays held in RAM);
- `preadv` of each whole file into one large buffer (the plain way to land the bytes in RAM):
  into one buffer allocated once and already touched (reused), and into a buffer freshly
  allocated per file (the kernel's copy then also takes the page faults and zeroing of first
  touch);
- `preadv` in 128 KB pieces: straight into the large reused buffer, and through a 128 KB
  staging buffer that stays in the CPU cache, copied on with memcpy (a read cat-like, then a copy);
- memcpy of a batch-sized array (the box's DRAM copy bandwidth, the ceiling of any path whose
  output is a batch in memory).

Then the preloaded path's gather alone (batches of 8 videos copied out of the arrays the loader
holds in RAM into one reused batch buffer, the epoch's shuffled order), four ways: one torch
``copy_`` per video (the loader's way), ``torch.index_select(out=)``, one ``np.copyto`` per
video, ``np.take(out=)``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import base_parser, console, make_table  # noqa: E402


def _best_rates(paths: dict, nbytes: int, reps: int) -> dict[str, float]:
    """MB/s of each path moving ``nbytes``, best of ``reps`` after one warm-up call each (page cache,
    buffers touched); the paths take turns, so a change in the box's load hits them alike."""
    for fn in paths.values():
        fn()
    best = {k: 0.0 for k in paths}
    for _ in range(reps):
        for name, fn in paths.items():
            t = time.perf_counter()
            fn()
            best[name] = max(best[name], nbytes / (time.perf_counter() - t) / 1e6)
    return best


def main() -> None:
    ap = base_parser(__doc__, quick=None, reps=3)
    ap.add_argument("cache", help="a cache bench_read.py built (--keep)")
    ap.add_argument("--head", default="EVL", choices=["EVL", "Side4Video"])
    args = ap.parse_args()

    import torch

    import bench_read as B
    from cache.store import open_store
    from stages.data.zarr_split import CacheSplit, HeadInputs
    from stages.heads import DataKeys
    from stages.data.loader import CacheLoader, ZarrBatches, epoch_plan

    torch.set_num_threads(1)
    st = open_store(args.cache)
    n = st.num_videos("train")
    keys = DataKeys(**B.HEADS[args.head])
    inputs = HeadInputs(st, keys, "train")
    split = CacheSplit(st, inputs, np.arange(n), train=True, preload=False)
    src = ZarrBatches(split, preload="off")
    src_on = ZarrBatches(split, preload="on")
    plan = epoch_plan(n, 8, 1, 0, 0, 1, "full")
    files = B.array_files(st, inputs.array_names())
    nbytes = sum(f.stat().st_size for f in files)
    batch_bytes = nbytes * 8 // n
    big = bytearray(max(f.stat().st_size for f in files))
    small = bytearray(131072)
    a, b = np.ones(batch_bytes // 8), np.empty(batch_bytes // 8)
    piece = 131072

    def cat_like():
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(small):
                    pass

    def loader():
        for _ in CacheLoader(src, plan, "cpu", workers=0, raw=True):
            pass

    def loader_on():
        for _ in CacheLoader(src_on, plan, "cpu", workers=0, raw=True):
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

    def preadv_fresh():
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                size, off = os.fstat(fd).st_size, 0
                view = memoryview(np.empty(size, np.uint8))  # large: a fresh mmap, untouched pages
                while off < size:
                    off += os.preadv(fd, [view[off:size]], off)
            finally:
                os.close(fd)

    def preadv_pieces():
        view = memoryview(big)
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                size, off = os.fstat(fd).st_size, 0
                while off < size:
                    off += os.preadv(fd, [view[off:min(size, off + piece)]], off)
            finally:
                os.close(fd)

    stage = np.empty(piece, np.uint8)
    big_np = np.frombuffer(big, np.uint8)

    def preadv_staged():
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                size, off = os.fstat(fd).st_size, 0
                while off < size:
                    got = os.preadv(fd, [stage], off)
                    np.copyto(big_np[off:off + got], stage[:got])
                    off += got
            finally:
                os.close(fd)

    def memcpy():
        for _ in range(max(1, nbytes // batch_bytes)):
            np.copyto(b, a)

    paths = {"cat-like (128 KB buffer)": cat_like, "loader, batches of 8 (stored dtype), preload off": loader,
             "loader, batches of 8 (stored dtype), preload on": loader_on,
             "preadv, whole file into one reused (touched) buffer": preadv_whole,
             "preadv, whole file into a fresh buffer per file": preadv_fresh,
             "preadv, 128 KB pieces into the reused buffer": preadv_pieces,
             "preadv, 128 KB pieces via a cached staging buffer + memcpy": preadv_staged,
             "memcpy of a batch (DRAM bandwidth)": memcpy}
    best = _best_rates(paths, nbytes, args.reps)
    load = os.getloadavg()
    table = make_table(f"bench_read_bound.py: {args.head}'s arrays of {args.cache} ({nbytes / 1e6:.0f} MB, {n} videos), "
                       f"best of {args.reps}; load {load[0]:.1f}", ("path", "MB/s", "% of cat-like"),
                       [(name, f"{v:,.0f}", f"{100 * v / best['cat-like (128 KB buffer)']:.0f}")
                        for name, v in best.items()])
    console(140).print(table)

    # the preloaded path's gather alone: out of the arrays in RAM into one reused batch buffer
    mem = src_on.memory
    slot = {k: torch.empty((8, *t.shape[1:]), dtype=t.dtype) for k, t in mem.items()}
    mem_np = {k: t.numpy() for k, t in mem.items()}
    slot_np = {k: t.numpy() for k, t in slot.items()}
    moved = sum(t[0].nbytes for t in mem.values()) * sum(len(b) for b in plan)

    def per_video_copy():
        for batch in plan:
            for k, t in mem.items():
                for j, p in enumerate(batch):
                    slot[k][j].copy_(t[p])

    def index_select():
        for batch in plan:
            idx = torch.tensor(batch)
            for k, t in mem.items():
                torch.index_select(t, 0, idx, out=slot[k][:len(batch)])

    def np_copyto():
        for batch in plan:
            for k, t in mem_np.items():
                for j, p in enumerate(batch):
                    np.copyto(slot_np[k][j], t[p])

    def np_take():
        for batch in plan:
            for k, t in mem_np.items():
                np.take(t, batch, axis=0, out=slot_np[k][:len(batch)])

    gathers = {"torch copy_ per video (the loader's way)": per_video_copy, "torch.index_select(out=)": index_select,
               "np.copyto per video": np_copyto, "np.take(out=)": np_take}
    gbest = _best_rates(gathers, moved, args.reps)
    table = make_table(f"the preloaded path's gather alone: batches of 8 out of RAM ({moved / 1e6:.0f} MB an epoch), "
                       f"best of {args.reps}; load {os.getloadavg()[0]:.1f}", ("gather", "MB/s", "% of memcpy"),
                       [(name, f"{v:,.0f}", f"{100 * v / best['memcpy of a batch (DRAM bandwidth)']:.0f}")
                        for name, v in gbest.items()])
    console(140).print(table)


if __name__ == "__main__":
    main()
