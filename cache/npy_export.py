"""A cache's features as plain .npy files: one array per tap and split, memory-mappable, and an index.

`pipeline cache export PATH --format npy` writes (default OUT: <cache>-npy beside the cache)::

    OUT/index.json                  what is where: the cache key, dataset, model, class names,
                                    tapped blocks; per split the exported videos (index in the
                                    split's list, path, label) and every array's file, shape, dtype
    OUT/<split>/label.npy           (N,) int64, the class of each exported video
    OUT/<split>/frame_emb.npy       (N, V, T, E) float16: the final (projected) frame embeddings
    OUT/<split>/cls.block<b>.npy    (N, V, T, D) float16: the CLS token after block b (1-based)
    OUT/<split>/patch.block<b>.npy  (N, V, T, P, D) float16: patch tokens after block b
    OUT/<split>/frames.npy          (N, V, T, H, W, 3) uint8 preprocessed input frames
    OUT/text/<set>.npy              (K, E) or (K, M, E) float32 class text embeddings

N counts the split's done videos (failed ones are left out; an unfinished cache only with
``partial``), in list order; V views (clips x crops), T frames. int8 arrays are dequantised to
float16, what `FeatureStore.read(..., dtype=np.float16)` returns. ``np.load(file, mmap_mode="r")``
maps an array without reading it. The export is built in a temporary folder beside OUT and
renamed into place whole: OUT holds a complete export or none (a re-export of the same cache
replaces it; anything else at OUT is refused).

``NpyExport`` reads an export back (the numpy half of the Python API, clipcache/__init__.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cache.errors import CacheError, CacheMismatchError, ConfigError
from cache.source import DONE, FAILED, PENDING
from cache.store import FeatureStore, atomic_write_text

__all__ = ["NPY_FORMAT", "NPY_VERSION", "array_names", "read_array", "export_npy", "NpyExport", "open_npy_export"]

NPY_FORMAT = "clipcache-npy"
NPY_VERSION = 1
INDEX = "index.json"
_STEP_BYTES = 256 << 20  # videos read per step: about this many bytes (bounded memory whatever the split's size)


def array_names(store, split: str) -> list[str]:
    """The export's array names of one split of a cache: frame_emb, cls.block<b>, patch.block<b>, frames."""
    layers = list(store.info.layers)
    out = []
    for name, spec in store.specs(split).items():
        if name in ("cls", "patch"):
            out += [f"{name}.block{b}" for b in layers[: spec.shape[2]]]
        else:
            out.append(name)
    return out


def _parse(store, split: str, name: str) -> tuple[str, int | None]:
    """An export array name -> (cache array, position on its layer axis or None)."""
    base, _, block = name.partition(".block")
    spec = store.specs(split).get(base)
    if spec is None or (block and base not in ("cls", "patch")) or (base in ("cls", "patch") and not block):
        raise CacheMismatchError(f"cache {store.path} has no array '{name}' in split '{split}' "
                                 f"(it has {', '.join(array_names(store, split))})")
    if not block:
        return base, None
    layers = list(store.info.layers)
    if not block.isdigit() or int(block) not in layers:
        raise CacheMismatchError(f"cache {store.path} has no block {block} (tapped blocks: "
                                 f"{', '.join(map(str, layers))})")
    return base, layers.index(int(block))


def read_array(store, split: str, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of export array ``name`` read from the cache, as the export stores them."""
    base, pos = _parse(store, split, name)
    if pos is None:
        data = store.read(split, base, rows, dtype=np.float16)
    else:
        data = store.read(split, base, rows, dtype=np.float16, layers=[pos])[:, :, :, 0]
    return data if data.dtype == np.uint8 else data.astype(np.float16, copy=False)


def _row_shape(store, split: str, name: str) -> tuple[tuple[int, ...], str]:
    base, pos = _parse(store, split, name)
    spec = store.specs(split)[base]
    shape = list(spec.shape)
    if pos is not None:
        del shape[2]
    return tuple(shape), "uint8" if spec.dtype == "uint8" else "float16"


def _check_out(out: Path, key: str) -> bool:
    """Whether ``out`` holds an npy export of this cache (replaced); nothing else may be there."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the export")
    index = out / INDEX
    if index.is_file():
        try:
            got = json.loads(index.read_text())
        except (OSError, ValueError):
            got = None
        if isinstance(got, dict) and got.get("format") == NPY_FORMAT and got.get("key") == key:
            return True
        raise ConfigError(f"{out} holds another export (not of this cache); nothing was changed: choose another --out")
    if any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no npy export of this cache; nothing was changed: "
                          "choose another --out")
    return True


def export_npy(store: FeatureStore, out: str | Path, splits: list[str] | None = None, arrays: list[str] | None = None,
               partial: bool = False, log: Callable[[str], object] | None = None) -> dict:
    """Write the done videos of ``splits`` (default all) as .npy files under ``out``; returns the
    index (plus "seconds" and "bytes"). ``arrays``: cache arrays to export (frame_emb, cls, patch,
    frames; default all of them)."""
    t0 = time.perf_counter()
    out = Path(out)
    splits = list(splits or store.splits)
    for split in splits:
        if split not in store.splits:
            raise CacheMismatchError(f"cache {store.path} has no split '{split}' (has {', '.join(store.splits)})")
        pending = store.counts(split)["pending"]
        if pending and not partial:
            raise CacheError(f"cache {store.path} is not complete ({pending} pending video(s) in '{split}'): "
                             "finish the extraction, or pass --partial to export only the done videos")
    have = sorted({n for s in splits for n in store.specs(s)})
    for name in arrays or ():
        if name not in have:
            raise ConfigError(f"--array {name}: the cache holds {', '.join(have)}")
    replace = _check_out(out, store.key)
    store.require_sound({s: [n for n in store.specs(s) if not arrays or n in arrays] for s in splits},
                        allow_partial=partial)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create export folder {out.parent}: {exc.strerror}") from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    info = store.info
    index = {"format": NPY_FORMAT, "version": NPY_VERSION, "key": store.key, "source": str(store.path),
             "dataset": info.dataset.name, "model": info.backbone.arch, "weights": info.backbone.weights,
             "classes": store.class_names(), "layers": list(info.layers), "splits": {}, "text": {}}
    total = 0
    try:
        for split in splits:
            (tmp / split).mkdir(parents=True)
            status = store.status(split)
            rows = np.flatnonzero(status == DONE)
            labels = store.labels(split)[rows].astype(np.int64)
            np.save(tmp / split / "label.npy", labels)
            items = store.items(split)
            entry = {"videos": int(len(rows)), "index": rows.tolist(), "path": [items[i][0] for i in rows],
                     "label": labels.tolist(), "failed": int((status == FAILED).sum()),
                     "pending": int((status == PENDING).sum()), "arrays": {}}
            names = [n for n in array_names(store, split) if not arrays or n.partition(".block")[0] in arrays]
            for name in names:
                shape, dtype = _row_shape(store, split, name)
                rel = f"{split}/{name}.npy"
                arr = np.lib.format.open_memmap(tmp / rel, mode="w+", dtype=dtype, shape=(len(rows), *shape))
                step = max(1, min(1024, _STEP_BYTES // max(1, int(np.prod(shape)) * 4)))
                for a in range(0, len(rows), step):
                    arr[a:a + step] = read_array(store, split, name, rows[a:a + step])
                arr.flush()
                del arr
                total += (tmp / rel).stat().st_size
                entry["arrays"][name] = {"file": rel, "shape": [len(rows), *shape], "dtype": dtype}
                if log:
                    log(f"{split}: {name} {tuple([len(rows), *shape])} {dtype}")
            index["splits"][split] = entry
        if store.text_names():
            (tmp / "text").mkdir()
        for name in store.text_names():
            data = np.asarray(store.text(name), dtype=np.float32)
            np.save(tmp / "text" / f"{name}.npy", data)
            index["text"][name] = {"file": f"text/{name}.npy", "shape": list(data.shape), "dtype": "float32"}
        atomic_write_text(tmp / INDEX, json.dumps(index, indent=1))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if replace and out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**index, "seconds": time.perf_counter() - t0, "bytes": total}


class NpyExport:
    """An npy export read back: ``arrays(split)``, ``features(split, name)`` (memory-mapped),
    ``labels(split)``, ``videos(split)``, ``class_names()``, ``text(name)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            index = json.loads((self.path / INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(f"{self.path} is not an npy export ({INDEX} unreadable: {exc.__class__.__name__})") from None
        if not isinstance(index, dict) or index.get("format") != NPY_FORMAT:
            raise CacheError(f"{self.path / INDEX} is not the index of an npy export")
        self.index = index

    @property
    def key(self) -> str:
        return self.index["key"]

    @property
    def splits(self) -> list[str]:
        return list(self.index["splits"])

    def _split(self, split: str) -> dict:
        if split not in self.index["splits"]:
            raise CacheMismatchError(f"export {self.path} has no split '{split}' (has {', '.join(self.splits)})")
        return self.index["splits"][split]

    def class_names(self) -> list[str]:
        return list(self.index["classes"])

    def arrays(self, split: str) -> list[str]:
        return list(self._split(split)["arrays"])

    def features(self, split: str, name: str, mmap: bool = True) -> np.ndarray:
        entry = self._split(split)["arrays"].get(name)
        if entry is None:
            raise CacheMismatchError(f"export {self.path} has no array '{name}' in split '{split}' "
                                     f"(it has {', '.join(self.arrays(split))})")
        return np.load(self.path / entry["file"], mmap_mode="r" if mmap else None)

    def labels(self, split: str) -> np.ndarray:
        self._split(split)
        return np.load(self.path / split / "label.npy")

    def videos(self, split: str) -> list[tuple[int, str]]:
        entry = self._split(split)
        return list(zip(entry["index"], entry["path"]))

    def text_names(self) -> list[str]:
        return list(self.index["text"])

    def text(self, name: str) -> np.ndarray:
        if name not in self.index["text"]:
            raise CacheMismatchError(f"export {self.path} has no text set '{name}'")
        return np.load(self.path / self.index["text"][name]["file"])


def open_npy_export(path: str | Path) -> NpyExport:
    return NpyExport(path)
