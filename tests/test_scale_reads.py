"""At K400 scale (bench/bench_scale.py): `cache verify`'s data check and `cache export` read each
shard's rows from the shard files (cache/rows.py), not through zarr, whose whole-shard read cost
~0.5 ms a video (about two minutes of a 260,000-video verify on 2 cores); what they find and
write is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cache.source import ArraySpec
from cache.store import DONE, FAILED, create_store, open_store
from cache.wds import export_wds, iter_tar_samples, load_npy
from conftest import plant_non_finite

N, SHARD = 10, 4


def _store(tmp_path, dtype: str):
    """10 videos in shards of 4: video 5 failed, video 6 done but holding NaN in frame_emb, video 9
    done but holding NaN in cls (fp16, or int8 whose NaN scale dequantises to NaN)."""
    arrays = [ArraySpec("frame_emb", (1, 2, 8), "float16"), ArraySpec("cls", (1, 2, 2, 16), dtype)]
    st = create_store(tmp_path / "c", {"key": f"scale-{dtype}", "int8_outliers": 4},
                      {"train": {"items": [(f"v{i}.mp4", i % 3) for i in range(N)], "arrays": arrays}}, SHARD)
    rng = np.random.default_rng(0)
    for shard in range(st.num_shards("train")):
        a, b = st.shard_range("train", shard)
        data = {name: rng.standard_normal((b - a, *spec.shape)).astype(np.float32)
                for name, spec in st.specs("train").items()}
        status = np.full(b - a, DONE, np.int8)
        failures = []
        for i in range(a, b):
            if i == 5:
                status[i - a] = FAILED
                data["frame_emb"][i - a] = data["cls"][i - a] = np.nan
                failures.append({"index": i, "path": f"v{i}.mp4", "reason": "decode error"})
        st.write_shard("train", shard, data, status, failures)
    # NaN / inf in done rows, as a version from before the writers refused them could leave them
    plant_non_finite(st.path, "train", 1, rows=[6], arrays=["frame_emb"], at=(0, 1, 3))
    if dtype == "float16":
        plant_non_finite(st.path, "train", 2, rows=[9], value=np.inf, arrays=["cls"], at=(0, 0, 1, 7))
    else:  # a NaN scale dequantises the token to NaN
        plant_non_finite(st.path, "train", 2, rows=[9], arrays=["cls/scale"], at=(0, 0, 1))
    return open_store(st.path)


@pytest.fixture
def zarr_reads(monkeypatch):
    """The array paths read through zarr (``Array.__getitem__``) while the test runs."""
    seen: list[str] = []
    real = zarr.Array.__getitem__

    def spy(self, selection):
        seen.append(self.path)
        return real(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    return seen


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_verify_names_non_finite_done_rows_reading_the_shard_files(tmp_path, dtype, zarr_reads):
    st = _store(tmp_path, dtype)
    assert st.verify(finite=False) == []  # checksums are sound: only the data check sees them
    zarr_reads.clear()
    problems = st.verify()
    assert sorted(problems) == ["train/cls[9]: marked done but holds NaN/inf (missing or corrupt data)",
                                "train/frame_emb[6]: marked done but holds NaN/inf (missing or corrupt data)"]
    assert {(p.array, p.shard) for p in problems} == {("cls", 2), ("frame_emb", 1)}
    per_video = [p for p in zarr_reads if p.split("/")[1] in ("frame_emb", "cls")]
    assert per_video == [], per_video  # zarr read only the status and labels


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_export_writes_the_stored_rows_reading_the_shard_files(tmp_path, dtype, zarr_reads):
    st = _store(tmp_path, dtype)
    zarr_reads.clear()
    export_wds(st, tmp_path / "wds", name="s")
    assert [p for p in zarr_reads if p.split("/")[1] in ("frame_emb", "cls")] == []
    samples = []
    for f in sorted((tmp_path / "wds").glob("s-train-*.tar")):
        with open(f, "rb") as fh:
            samples += list(iter_tar_samples(fh))
    done = [i for i in range(N) if i != 5]
    assert [s["__key__"] for s in samples] == [f"train_{i:08d}" for i in done]
    want_emb = st.read_rows("train", "frame_emb", done)
    want_cls = st.read_rows("train", "cls", done)
    for j, sample in enumerate(samples):
        np.testing.assert_array_equal(load_npy(sample["frame_emb.npy"]), want_emb[j])  # NaN where stored
        if dtype == "int8":
            for part in ("q", "scale", "oidx", "oval"):
                np.testing.assert_array_equal(load_npy(sample[f"cls.{part}.npy"]), want_cls[part][j])
        else:
            np.testing.assert_array_equal(load_npy(sample["cls.npy"]), want_cls[j])
