"""Stage two's read path against the page cache: how close the loader gets to a warm `cat`.

A ViT-B/16-shaped cache is written synthetically (random arrays of the right shapes through
FeatureStore's writer, no ViT run): 8 frames, the last 4 of 12 blocks, CLS + patch tokens (196 x
768), 512-d frame embeddings and uint8 224 x 224 frames; once fp16, once int8 (cls and patch
quantised; frames uint8, frame_emb fp16 in both). Then, side by side in one run, per cache and
per head-shaped read (EVL: cls + patch of the last 4 blocks; Side4Video: uint8 frames + cls +
patch; T-Trans: frame embeddings):

* warm sequential read of the store files those arrays live in (`cat` of the chunk files);
* `FeatureStore.read` per video, fp16 and fp32 (the read the old path made);
* the old loader: CacheSplit + torch DataLoader, batch 8, workers 0 / 1 / 2 (its default rule:
  arrays under 2 GiB as float32 held in RAM, the rest read per video), one pass each (it is slow);
* the new loader (stages/data/loader.py): workers 0 / 1 / 2, preload on / off, block shuffle; its
  stored-dtype batches (what a GPU would receive: `--device cuda` adds the host->device copy and
  the on-device conversion), plus one row with the conversion to float32 on the CPU.

MB/s counts the stored bytes of the arrays read (per video x videos / seconds), best of
``--reps``; % is of the warm sequential read of the same arrays' files in the same run. The
page cache cannot be dropped here (/proc/sys/vm/drop_caches is read-only), so every figure is a
warm read.

    PYTHONPATH=. .venv/bin/python bench/bench_read.py                 # 64 videos, the table in RESULTS.md
    PYTHONPATH=. .venv/bin/python bench/bench_read.py --quick         # 24 videos, fewer settings
    PYTHONPATH=. .venv/bin/python bench/bench_read.py --device cuda --quick
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, console as make_console, make_table  # noqa: E402

T, L, D, P, E, H = 8, 4, 768, 196, 512, 224
DEPTH = 12
LAYERS = list(range(DEPTH - L + 1, DEPTH + 1))  # cached blocks 9..12 (1-based)
HEADS = {  # head -> DataKeys fields
    "EVL": {"cls_layers": (-4, -3, -2, -1), "patch_layers": (-4, -3, -2, -1)},
    "Side4Video": {"cls_layers": (-4, -3, -2, -1), "patch_layers": (-4, -3, -2, -1), "frames": True},
    "T-Trans": {"frame_emb": True},
}


def build_cache(path: Path, videos: int, dtype: str, shard: int = 16):
    """A ViT-B/16-shaped cache of random values (the same random shard repeated: bytes, not content, matter)."""
    from cache.source import ArraySpec
    from cache.store import DONE, create_store

    if path.exists():  # a complete one of the same size (--keep) is reused
        from cache.store import open_store

        try:
            old = open_store(path)
            if old.num_videos("train") == videos and old.is_complete():
                return old
        except Exception:  # noqa: BLE001 - anything else is rebuilt
            pass
        shutil.rmtree(path)
    arrays = [ArraySpec("frame_emb", (1, T, E), "float16"), ArraySpec("cls", (1, T, L, D), dtype),
              ArraySpec("patch", (1, T, L, P, D), dtype, layer_axis=2), ArraySpec("frames", (1, T, H, H, 3), "uint8")]
    dims = {"num_classes": 10, "embed_dim": E, "width": D, "frames": T, "num_patches": P, "depth": DEPTH,
            "backbone_heads": 12, "image_size": H, "patch_size": 16}
    meta = {"key": f"bench-{dtype}", "int8_outliers": 4, "layers": LAYERS, "dims": dims,
            "dtype": "int8" if dtype == "int8" else "fp16",
            "preprocess": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711], "image_size": H},
            "config": {}}
    st = create_store(path, meta, {"train": {"items": [(f"v{i}.mp4", i % 10) for i in range(videos)],
                                             "arrays": arrays}}, shard)
    rng = np.random.default_rng(0)
    data = {"frame_emb": rng.standard_normal((shard, 1, T, E), dtype=np.float32),
            "cls": rng.standard_normal((shard, 1, T, L, D), dtype=np.float32),
            "patch": rng.standard_normal((shard, 1, T, L, P, D), dtype=np.float32),
            "frames": rng.integers(0, 255, (shard, 1, T, H, H, 3), dtype=np.uint8)}
    for s in range(st.num_shards("train")):
        a, b = st.shard_range("train", s)
        st.write_shard("train", s, {k: v[: b - a] for k, v in data.items()}, np.full(b - a, DONE, np.int8), [])
    return st


def array_files(st, names: list[str]) -> list[Path]:
    out = []
    for name in names:
        out += [f for f in (st.path / "train" / name).rglob("*") if f.is_file() and "/c/" in str(f)]
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = base_parser(__doc__, quick="24 videos, 2 reps, fewer loader settings", root="artifacts/bench-read", reps=3,
                     keep="keep the caches (default: removed at the end)")
    ap.add_argument("--videos", type=int, default=None, help="videos per cache (default 64; 24 with --quick)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.quick:
        args.reps = 2
    args.videos = args.videos or (24 if args.quick else 64)

    import torch
    from torch.utils.data import DataLoader

    from stages.data.zarr_split import CacheSplit, HeadInputs, select_videos
    from stages.heads import DataKeys
    from stages.data.loader import CacheLoader, ZarrBatches, epoch_plan
    from stages.data.batch import collate_items

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no GPU here")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stores = {dt: build_cache(root / f"vitb16-{dt}", args.videos, dt) for dt in ("float16", "int8")}
    print(f"caches written ({args.videos} videos each, {time.perf_counter() - t0:.0f}s)", flush=True)
    n = args.videos
    rows: list[tuple] = []  # (cache, head, path, MB/s, videos/s, % of cat)

    def best(fn, reps: int = 0) -> float:
        return min(timed(fn) for _ in range(reps or args.reps))

    for dt, st in stores.items():
        idx = select_videos(st, "train")
        for head, fields in HEADS.items():
            keys = DataKeys(**fields)
            inputs = HeadInputs(st, keys, "train")
            names = inputs.array_names()
            files = array_files(st, names)
            file_bytes = sum(f.stat().st_size for f in files)
            new = CacheSplit(st, inputs, idx, train=True, preload=False)
            per_video = ZarrBatches(new, preload="off").row_bytes()
            total = per_video * n
            cat = best(lambda: subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True))
            cat_mbs = file_bytes / cat / 1e6

            def add(path: str, seconds: float, nbytes: int = total):
                mbs = nbytes / seconds / 1e6
                rows.append((dt, head, path, mbs, n / seconds, 100 * mbs / cat_mbs))
                print(f"  {dt:7} {head:10} {path:58} {mbs:9,.0f} MB/s {n / seconds:8,.1f} videos/s", flush=True)

            rows.append((dt, head, "warm sequential read of its files (cat)", cat_mbs, n / cat, 100.0))
            print(f"  {dt:7} {head:10} cat {cat_mbs:,.0f} MB/s", flush=True)
            for want in ("float16", "float32"):
                def per_video_read(want=want):
                    for i in idx:
                        for name in names:
                            st.read("train", name, int(i), dtype=np.dtype(want), layers=inputs.layer_pos(name))
                add(f"FeatureStore.read per video, {'fp16' if want == 'float16' else 'fp32'}", best(per_video_read))
            for workers in ((0, 2) if args.quick else (0, 1, 2)):
                old = CacheSplit(st, inputs, idx, train=True)  # the old default: small arrays in RAM as float32

                def old_loader(workers=workers, old=old):
                    for batch in DataLoader(old, batch_size=8, shuffle=True, collate_fn=collate_items,
                                            num_workers=workers, pin_memory=device.type == "cuda"):
                        {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    sync()
                add(f"old loader (CacheSplit + DataLoader), workers {workers}", best(old_loader, 1))
            sources = {"off": ZarrBatches(new, preload="off")}
            settings = [(0, "off", "full"), (2, "off", "full"), (0, "off", "block"), (0, "on", "full")]
            if not args.quick:
                settings = [(0, "off", "full"), (1, "off", "full"), (2, "off", "full"), (2, "off", "block"),
                            (0, "on", "full"), (2, "on", "full")]
            for workers, preload, shuffle in settings:
                if preload == "on" and "on" not in sources:
                    sources["on"] = ZarrBatches(new, preload="on")
                plan = epoch_plan(n, 8, 1, 0, 0, 1, shuffle)

                def new_loader(workers=workers, preload=preload, plan=plan):
                    loader = CacheLoader(sources[preload], plan, device, workers=workers,
                                         raw=device.type == "cpu")
                    for _ in loader:
                        pass
                    sync()
                what = "stored dtype" if device.type == "cpu" else "to the GPU, converted there"
                add(f"new loader, workers {workers}, preload {preload}, {shuffle} shuffle ({what})", best(new_loader))
            plan = epoch_plan(n, 8, 1, 0, 0, 1, "full")
            add("new loader, workers 2, preload off, + float32 on the CPU",
                best(lambda: [None for _ in CacheLoader(sources["off"], plan, "cpu", workers=2)]))
            del sources
    load = os.getloadavg()
    table = make_table(f"bench_read.py: ViT-B/16-shaped cache, {n} videos, batch 8, device {args.device}, "
                       f"best of {args.reps}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                       f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
                       ("cache", "head", "path", "MB/s", "videos/s", "% of cat"),
                       [("fp16" if dt == "float16" else "int8", head, path,
                         f"{mbs:,.0f}" if mbs >= 10 else f"{mbs:.2f}", f"{vps:,.1f}", f"{pct:.0f}")
                        for dt, head, path, mbs, vps, pct in rows], left=("head", "path"))
    console = make_console(150)
    console.print(table)
    ratio = {}
    for head in HEADS:
        best_new = {dt: max(r[4] for r in rows if r[0] == dt and r[1] == head and r[2].startswith("new loader")
                            and "float32 on the CPU" not in r[2]) for dt in stores}
        ratio[head] = best_new["int8"] / best_new["float16"]
    console.print("int8 / fp16 videos/s (best new-loader setting each): "
                  + ", ".join(f"{h} {r:.2f}x" for h, r in ratio.items()))
    console.print("Note: warm reads only. This box cannot drop the page cache (/proc/sys/vm/drop_caches is "
                  "read-only) and a file larger than RAM (24 GB) is not cheap to write here, so there is no cold row.")
    if not args.keep:
        for st in stores.values():
            shutil.rmtree(st.path, ignore_errors=True)


if __name__ == "__main__":
    main()
