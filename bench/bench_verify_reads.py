"""What `--set verify_reads=on` costs a stage-two epoch: the loader's epoch with it off and on.

verify_reads (stages/train.py) checks a shard file's recorded crc32 whenever a read meets a new
version of it (first read in a process, or its size / mtime / ctime / inode changed): one crc32
pass over the whole file, then one fstat per read (which the reader makes anyway). The start-of-run
check (``FeatureStore.require_sound``, which every `train` makes) records the versions it found
sound, so in a run the first epoch pays nothing either, unless a file changed; a worker process
forked before it read anything inherits them.

Timed here, on a ViT-B/16-shaped synthetic cache (bench/bench_read.py's ``build_cache``, fp16),
per head-shaped read: two epochs of the loader (stages/data/loader.py, workers 0, preload off, batch 8,
stored dtype: no head compute, so the ratio is an upper bound of a training epoch's) on a freshly
opened store (the first epoch also parses the shard indexes and touches the batch buffers), best
of ``--reps`` (the three stores opened first, untimed; then their first epochs, then their second
ones, in an order that rotates per repeat); each epoch against the same epoch with it off:

* off: verify_reads off (what `train` does by default);
* on, after the check: verify_reads on, ``require_sound`` run first (untimed): what `train` does;
* on, unchecked: verify_reads on without the start-of-run check: every shard file is crc32-checked
  at its first read (the worst case: a process that never saw the check, or every file rewritten
  since), in the first epoch; the second pays one fstat per read.

The EVL-last-block read takes one of the 4 stored blocks of cls and patch: its crc32 passes read 4x
the bytes the epoch reads, which is where a first-read check costs most.

    PYTHONPATH=. .venv/bin/python bench/bench_verify_reads.py            # 64 videos
    PYTHONPATH=. .venv/bin/python bench/bench_verify_reads.py --quick    # 24 videos, 2 reps
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import base_parser, console, make_table  # noqa: E402

HEADS = {  # head-shaped reads -> DataKeys fields
    "T-Trans (frame_emb)": {"frame_emb": True},
    "EVL (cls + patch, 4 blocks)": {"cls_layers": (-4, -3, -2, -1), "patch_layers": (-4, -3, -2, -1)},
    "EVL (cls + patch, last block)": {"cls_layers": (-1,), "patch_layers": (-1,)},
}
MODES = {"off": (False, False), "on, after the check": (True, True), "on, unchecked": (True, False)}


def main() -> None:
    ap = base_parser(__doc__, quick="24 videos, 2 reps", root="artifacts/bench-verify-reads", reps=3,
                     keep="keep the cache (default: removed at the end)")
    ap.add_argument("--videos", type=int, default=None, help="videos in the cache (default 64; 24 with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.reps = 2
    args.videos = args.videos or (24 if args.quick else 64)

    from bench_read import build_cache
    from cache.store import open_store
    from stages.data.zarr_split import CacheSplit, HeadInputs, select_videos
    from stages.heads import DataKeys
    from stages.data.loader import CacheLoader, ZarrBatches, epoch_plan

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = build_cache(root / "vitb16-float16", args.videos, "float16").path
    print(f"cache written ({args.videos} videos, {time.perf_counter() - t0:.0f}s)", flush=True)
    n = args.videos
    plan = epoch_plan(n, 8, 1, 0, 0, 1, "full")

    def source(keys: DataKeys, verify: bool, check: bool) -> ZarrBatches:
        st = open_store(path)
        st.verify_reads = verify
        inputs = HeadInputs(st, keys, "train")
        if check:
            st.require_sound({"train": inputs.array_names()})
        return ZarrBatches(CacheSplit(st, inputs, select_videos(st, "train"), train=True, preload=False), "off")

    def epoch(src: ZarrBatches) -> float:
        t = time.perf_counter()
        for _ in CacheLoader(src, plan, "cpu", workers=0, raw=True):
            pass
        return time.perf_counter() - t

    rows = []
    for head, fields in HEADS.items():
        keys = DataKeys(**fields)
        best = {m: [float("inf"), float("inf")] for m in MODES}
        nbytes = source(keys, False, False).nbytes()
        epoch(source(keys, False, False))  # warm the page cache
        for rep in range(args.reps):
            # every store opened (and checked) first, untimed; then each epoch of each, in an order that
            # rotates per repeat, so that neither the checks' reads nor a place in the order favour one
            srcs = {m: source(keys, verify, check) for m, (verify, check) in MODES.items()}
            order = list(MODES)[rep % len(MODES):] + list(MODES)[:rep % len(MODES)]
            for k in range(2):
                for m in order:
                    best[m][k] = min(best[m][k], epoch(srcs[m]))
        for m in MODES:
            (a, b), (a0, b0) = best[m], best["off"]
            rows.append((head, m, nbytes / a / 1e6, a, a / a0, b, b / b0))
    load = os.getloadavg()
    table = make_table(f"bench_verify_reads.py: ViT-B/16-shaped fp16 cache, {n} videos, loader epoch (workers 0, "
                       f"preload off, batch 8), best of {args.reps}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                       f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
                       ("read", "verify_reads", "epoch 1 MB/s", "epoch 1 s", "x off", "epoch 2 s", "x off "),
                       [(head, m, f"{mbs:,.0f}", f"{a:.3f}", f"{ra:.2f}", f"{b:.3f}", f"{rb:.2f}")
                        for head, m, mbs, a, ra, b, rb in rows], left=("verify_reads",))
    console(150).print(table)
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
