"""`pipeline cache export --format npy` and the Python API (clipcache): the store's arrays, round-tripped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cache.source import DONE
from cache.store import open_store
from conftest import ROOT, demo_args, run_cli


@pytest.fixture(scope="module")
def caches(demo_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("npy")
    full, small = root / "full", root / "int8"
    run_cli(*demo_args(demo_small, full, "--layers", "last2", "--patch", "--frames-uint8", "--text", "clip_single"),
            check=True)
    run_cli(*demo_args(demo_small, small, "--layers", "all", "--dtype", "int8", "--text", "none"), check=True)
    return {"full": open_store(full), "int8": open_store(small)}


def _export(store, out, *extra):
    return run_cli("cache", "export", store.path, "--format", "npy", "--out", out, *extra)


@pytest.mark.parametrize("which", ["full", "int8"])
def test_every_array_round_trips_against_the_store(caches, tmp_path, which):
    st = caches[which]
    out = tmp_path / "npy"
    proc = _export(st, out)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["key"] == st.key and index["classes"] == st.class_names() and index["layers"] == st.info.layers
    for split in st.splits:
        entry = index["splits"][split]
        rows = np.flatnonzero(st.status(split) == DONE)
        assert entry["index"] == rows.tolist() and entry["path"] == [st.items(split)[i][0] for i in rows]
        assert np.array_equal(np.load(out / split / "label.npy"), st.labels(split)[rows])
        names = set(entry["arrays"])
        want = {"frame_emb"} | {f"cls.block{b}" for b in st.info.layers}
        if which == "full":
            want |= {f"patch.block{b}" for b in st.info.layers} | {"frames"}
        assert names == want
        for name, a in entry["arrays"].items():
            arr = np.load(out / a["file"], mmap_mode="r")
            assert isinstance(arr, np.memmap) and list(arr.shape) == a["shape"] and str(arr.dtype) == a["dtype"]
            base, _, block = name.partition(".block")
            if block:
                pos = st.info.layers.index(int(block))
                ref = st.read(split, base, rows, dtype=np.float16)[:, :, :, pos]
            else:
                ref = st.read(split, base, rows, dtype=np.float16)
            assert arr.dtype == (np.uint8 if base == "frames" else np.float16)
            assert np.array_equal(np.asarray(arr), ref.astype(arr.dtype)), (split, name)
    if which == "full":
        assert np.array_equal(np.load(out / "text" / "clip_single.npy"), st.text("clip_single"))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_the_api_reads_a_cache_and_its_export_alike_without_torch(caches, tmp_path):
    st = caches["full"]
    out = tmp_path / "npy"
    assert _export(st, out, "--array", "frame_emb", "--array", "cls").returncode == 0
    assert "patch.block" not in json.dumps(json.loads((out / "index.json").read_text())["splits"])
    script = f"""
import sys, numpy as np, clipcache
a, b = clipcache.open({str(st.path)!r}), clipcache.open({str(out)!r})
assert a.key == b.key and a.splits == b.splits and a.class_names() == b.class_names()
for split in a.splits:
    assert b.arrays(split) == [n for n in a.arrays(split) if not n.startswith(("patch", "frames"))]
    for name in b.arrays(split):
        assert np.array_equal(a.features(split, name), b.features(split, name)), name
    assert np.array_equal(a.labels(split), b.labels(split)) and a.videos(split) == b.videos(split)
assert isinstance(b.features("val", "frame_emb"), np.memmap)
print("torch" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"  # numpy only: torch is not imported

    import torch
    from torch.utils.data import DataLoader, Dataset

    import clipcache

    for feats in (clipcache.open(st.path), clipcache.open(out)):
        ds = feats.dataset("train", "cls.block" + str(st.info.layers[-1]))
        assert isinstance(ds, Dataset) and len(ds) == len(feats.labels("train"))
        x, y = ds[3]
        assert x.dtype == torch.float32 and x.shape == feats.features("train", "frame_emb").shape[1:3] + (
            st.info.dims.width,)
        assert int(y) == int(feats.labels("train")[3])
        xb, yb = next(iter(DataLoader(ds, batch_size=5)))
        assert xb.shape[0] == 5 and torch.equal(yb, torch.from_numpy(feats.labels("train")[:5]))
        both, _ = feats.dataset("val", ["frame_emb", "cls.block" + str(st.info.layers[0])])[0]
        assert set(both) == {"frame_emb", "cls.block" + str(st.info.layers[0])}
        assert torch.equal(both["frame_emb"], torch.from_numpy(feats.features("val", "frame_emb")[0].astype(np.float32)))


def test_a_re_export_replaces_its_own_and_refuses_anything_else(caches, tmp_path):
    st = caches["int8"]
    out = tmp_path / "npy"
    assert _export(st, out).returncode == 0
    assert _export(st, out, "--split", "val").returncode == 0  # the same cache's export: replaced
    assert list(json.loads((out / "index.json").read_text())["splits"]) == ["val"] and not (out / "train").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for args, words in (((other,), "not empty"), ((tmp_path / "x", "--array", "patch"), "--array patch"),
                        ((tmp_path / "y", "--split", "test"), "no split 'test'")):
        proc = _export(st, *args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    foreign = run_cli("cache", "export", caches["full"].path, "--format", "npy", "--out", out)
    assert foreign.returncode == 2 and "another export" in foreign.stderr
