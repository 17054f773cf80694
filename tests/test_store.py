"""The Zarr store on disk: creation, shard writes, status, failures, int8, verify."""

import numpy as np
import pytest

from cache.errors import CacheError, CacheMismatchError
from cache.quant import dequantize_int8, quantize_int8
from cache.source import ArraySpec
from cache.store import DONE, FAILED, PENDING, create_store, open_store


def _make(tmp_path, dtype="float16", n=5, shard=2, key="k1"):
    meta = {"key": key, "int8_outliers": 4}
    arrays = [ArraySpec("frame_emb", (1, 3, 8), "float16"), ArraySpec("cls", (1, 3, 2, 16), dtype)]
    return create_store(tmp_path / "c", meta, {"train": {"items": [(f"v{i}.mp4", i % 2) for i in range(n)],
                                                         "arrays": arrays}}, shard)


def _shard_data(store, shard, seed=0):
    a, b = store.shard_range("train", shard)
    rng = np.random.default_rng(seed + shard)
    return {name: rng.normal(size=(b - a, *spec.shape)).astype(np.float32) for name, spec in store.specs("train").items()}


def test_create_is_atomic_and_preallocated(tmp_path):
    st = _make(tmp_path)
    assert st.num_shards("train") == 3 and st.shard_range("train", 2) == (4, 5)
    assert (st.status("train") == PENDING).all()
    assert st.labels("train").tolist() == [0, 1, 0, 1, 0]
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]
    # unwritten rows read as NaN: data never says "done" by itself
    assert np.isnan(st.read("train", "frame_emb", 0)).all()


def test_reopen_same_key_and_refuse_other_key(tmp_path):
    _make(tmp_path)
    again = _make(tmp_path)
    assert again.key == "k1"
    with pytest.raises(CacheMismatchError):
        _make(tmp_path, key="k2")


def test_write_shard_roundtrip_status_and_failures(tmp_path):
    st = _make(tmp_path)
    data = _shard_data(st, 1)
    status = np.array([DONE, FAILED], np.int8)
    st.write_shard("train", 1, data, status, [{"index": 3, "path": "v3.mp4", "reason": "corrupt"}])
    st = open_store(st.path)
    np.testing.assert_allclose(st.read("train", "cls", 2), data["cls"][0], rtol=1e-3, atol=1e-3)
    assert st.status("train").tolist() == [PENDING, PENDING, DONE, FAILED, PENDING]
    assert st.pending_shards("train") == [0, 2]
    assert st.failures("train") == [{"index": 3, "path": "v3.mp4", "reason": "corrupt"}]
    assert st.counts("train") == {"done": 1, "failed": 1, "pending": 3}


def test_int8_halves_size_with_small_error(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 768)).astype(np.float32)
    x[:, [5, 300]] *= 40  # CLIP-like outlier channels
    parts = quantize_int8(x)
    y = dequantize_int8(parts)
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert rel < 0.01
    nbytes = sum(v.nbytes for v in parts.values())
    assert nbytes < 0.55 * x.astype(np.float16).nbytes
    # without outlier handling the same data loses much more
    plain = dequantize_int8(quantize_int8(x, outliers=0))
    assert np.linalg.norm(plain - x) / np.linalg.norm(x) > 2 * rel


def test_int8_store_roundtrip(tmp_path):
    st = _make(tmp_path, dtype="int8")
    for shard in range(3):
        data = _shard_data(st, shard)
        a, b = st.shard_range("train", shard)
        st.write_shard("train", shard, data, np.full(b - a, DONE, np.int8), [])
        got = st.read("train", "cls", slice(a, b))
        assert np.linalg.norm(got - data["cls"]) / np.linalg.norm(data["cls"]) < 0.02
    assert st.is_complete() and st.verify() == []


def test_verify_finds_done_rows_without_data(tmp_path):
    st = _make(tmp_path)
    data = _shard_data(st, 0)
    st.write_shard("train", 0, data, np.array([DONE, DONE], np.int8), [])
    assert st.verify() == []
    # corrupt: mark a never-written row done behind the store's back (no record commits it)
    st.root["train/status"][4:5] = np.array([DONE], np.int8)
    problems = st.verify()
    assert [(p.split, p.shard) for p in problems] == [("train", 2)] and "record" in problems[0]
    # a row turned failed: the status chunk no longer matches the status its record committed
    st.root["train/status"][0:1] = np.array([FAILED], np.int8)
    assert any(p.shard == 0 and "does not match" in p for p in st.verify())


def test_not_a_store(tmp_path):
    with pytest.raises(CacheError):
        open_store(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CacheError):
        open_store(tmp_path / "plain")


def test_output_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError):
        create_store(blocker / "c", {"key": "k"}, {"train": {"items": [("a", 0)], "arrays": []}}, 1)


def test_read_rows_in_any_order_and_layer_subsets(tmp_path):
    st = _make(tmp_path, n=7, shard=3)
    full = {}
    for shard in range(st.num_shards("train")):
        a, b = st.shard_range("train", shard)
        data = _shard_data(st, shard)
        st.write_shard("train", shard, data, np.full(b - a, DONE, np.int8), [])
        full.setdefault("cls", []).append(data["cls"].astype(np.float16))
    cls = np.concatenate(full["cls"]).astype(np.float32)
    rows = np.array([5, 1, 2, 3, 6, 0])
    np.testing.assert_array_equal(st.read("train", "cls", rows), cls[rows])
    np.testing.assert_array_equal(st.read("train", "cls", rows, layers=[1]), cls[rows][:, :, :, [1]])
    np.testing.assert_array_equal(st.read("train", "cls", 4, layers=[1, 0]), cls[4][:, :, [1, 0]])
    assert st.read("train", "cls", np.array([], dtype=int)).shape == (0, 1, 3, 2, 16)
