"""WebDataset export (cache/wds.py) and stage two streaming from shards (stages/data/wds_split.py)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import cache.wds as _wds_module
from cache.quant import QUANT_SUFFIXES
from cache.store import DONE, FAILED
from cache.wds import WdsCache, export_wds, iter_tar_samples, load_npy, parse_bytes
from conftest import extracted_store, run_cli
from stages.data.wds_split import WdsSplit, open_wds_source
from stages.data.zarr_split import CacheSplit, HeadInputs, select_videos
from stages.evaluate import evaluate_run
from stages.heads import DataKeys
from stages.train import TrainCfg, train_head


@pytest.fixture(scope="module")
def mixed_cache(demo_small, tmp_path_factory):
    """fp16, every array kind (cls, patch, uint8 frames), 2 views per video, two bad train videos."""
    from pipeline.datasets import load_dataset

    tmp = tmp_path_factory.mktemp("wds_mixed")
    root = Path(demo_small.video_root)
    lines = demo_small.train_list.read_text().splitlines()
    good = (root / lines[0].split()[0]).read_bytes()
    (tmp / "truncated.mp4").write_bytes(good[: len(good) // 3])
    lines[2:2] = [f"{tmp}/truncated.mp4 1", f"{tmp}/missing.mp4 2"]
    lst = tmp / "train.txt"
    lst.write_text("\n".join(lines) + "\n")
    spec = load_dataset("custom", video_root=root, train_list=lst, val_list=demo_small.val_list,
                        classes=demo_small.classes_file)
    return extracted_store(spec, tmp / "cache", layers="all", patch=True, store_frames=True, views="2x1",
                           train_views="2x1", text="clip_single", shard_size=3)


@pytest.fixture(scope="module")
def int8_cache(demo_small, tmp_path_factory):
    from pipeline.datasets import load_dataset

    spec = load_dataset("demo", data_root=demo_small.root)
    return extracted_store(spec, tmp_path_factory.mktemp("wds_int8") / "cache", layers="all", patch=True,
                           dtype="int8", text="none", shard_size=4)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """6 classes x (8 train + 6 val): enough eval videos for accuracy to mean something; frame_emb only."""
    from pipeline.datasets import load_dataset
    from pipeline.demo_data import DemoCfg, generate_demo

    tmp = tmp_path_factory.mktemp("wds_medium")
    ds = generate_demo(tmp / "data", DemoCfg(num_classes=6, train_per_class=8, val_per_class=6, frames=8, size=48,
                                             seed=5), progress=False)
    st = extracted_store(load_dataset("demo", data_root=ds.root), tmp / "cache", layers="none",
                         text="clip_single", shard_size=8)
    export_wds(st, tmp / "wds", name="med", shard_bytes="24KB")
    return st, tmp / "wds"


def _all_samples(folder: Path, name: str, split: str):
    for shard in sorted(folder.glob(f"{name}-{split}-*.tar")):
        with open(shard, "rb") as fh:
            yield from iter_tar_samples(fh)


def test_parse_bytes():
    assert parse_bytes("1GB") == 10**9 and parse_bytes("64MiB") == 64 << 20 and parse_bytes("4096") == 4096
    assert parse_bytes("1.5kb") == 1500
    for bad in ("", "GB", "1XB", "-3MB", "1i"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_export_round_trips_every_done_video(mixed_cache, tmp_path):
    st = mixed_cache
    assert st.status("train").tolist().count(FAILED) == 2
    limit = 120_000
    header = export_wds(st, tmp_path, name="mix", shard_bytes=limit)
    assert json.loads((tmp_path / "mix-header.json").read_text())["key"] == st.key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    for split in st.splits:
        info = header["splits"][split]
        done = np.flatnonzero(st.status(split) == DONE)
        assert info["samples"] == len(done) and len(info["shards"]) > 1
        for entry in info["shards"]:
            size = (tmp_path / entry["file"]).stat().st_size
            assert size == entry["bytes"] and (size <= limit or entry["samples"] == 1), entry
        seen = []
        for sample in _all_samples(tmp_path, "mix", split):
            key = sample["__key__"]
            assert "." not in key and key.startswith(f"{split}_")
            meta = json.loads(sample["json"])
            i = meta["index"]
            seen.append(i)
            assert meta["label"] == st.labels(split)[i] and meta["path"] == st.items(split)[i][0]
            assert set(sample) - {"__key__", "json"} == {f"{n}.npy" for n in st.specs(split)}
            for name, spec in st.specs(split).items():
                got = load_npy(sample[f"{name}.npy"])
                raw = st.root[f"{split}/{name}"][i]  # as stored: fp16 (uint8 frames), bit for bit
                assert got.dtype == raw.dtype == np.dtype(spec.dtype) and got.shape == spec.shape
                np.testing.assert_array_equal(got, raw)
        assert seen == done.tolist()  # every done video once, in list order; failed ones absent
    # the small arrays travel in the extra tar, the metadata in the header
    wc = WdsCache(str(tmp_path / "mix-header.json"))
    assert wc.meta == st.meta and wc.key == st.key and wc.text_names() == st.text_names() == ["clip_single"]
    np.testing.assert_array_equal(wc.text("clip_single"), st.text("clip_single"))
    assert wc.aux_names() == st.aux_names()
    for name in st.aux_names():
        np.testing.assert_array_equal(wc.aux(name), st.aux(name))
    for split in st.splits:
        np.testing.assert_array_equal(wc.labels(split), st.labels(split))
        np.testing.assert_array_equal(wc.status(split), st.status(split))
        assert wc.failures(split) == st.failures(split)
    done = np.flatnonzero(st.status("train") == DONE)
    np.testing.assert_array_equal(wc.read("train", "cls", done), st.read("train", "cls", done))
    twice = done[[2, 0, 2, 1]]  # out of order, one video twice
    np.testing.assert_array_equal(wc.read("train", "cls", twice), st.read("train", "cls", twice))
    # exporting again over a finished export: the old header goes first, so a killed re-export
    # never leaves a header describing shards that are being replaced
    real_add = _wds_module._add

    def killed_while_writing(tar, member, data):
        raise KeyboardInterrupt("killed")

    _wds_module._add = killed_while_writing
    try:
        with pytest.raises(KeyboardInterrupt):
            export_wds(st, tmp_path, name="mix", shard_bytes=limit // 2)
    finally:
        _wds_module._add = real_add
    assert not (tmp_path / "mix-header.json").exists()
    again = export_wds(st, tmp_path, name="mix", shard_bytes=limit)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in header.items() if k != "seconds"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    with tarfile.open(tmp_path / "mix-extra.tar") as tar:
        assert all(m.name.endswith(".npy") for m in tar.getmembers())


def test_export_is_readable_by_webdataset_and_never_needs_pickle(mixed_cache, tmp_path):
    from webdataset.tariterators import tarfile_samples

    export_wds(mixed_cache, tmp_path, name="mix", shard_bytes="1MB")
    urls = [{"url": str(p)} for p in sorted(tmp_path.glob("mix-val-*.tar"))]
    samples = list(tarfile_samples(urls))
    assert len(samples) == 8
    for s in samples:
        for k, v in s.items():
            if k.endswith(".npy"):
                assert load_npy(v).dtype != object  # allow_pickle=False would refuse an object array


def test_int8_export_keeps_the_quantised_parts(int8_cache, tmp_path):
    st = int8_cache
    export_wds(st, tmp_path, name="q8", shard_bytes="1GB")
    wc = WdsCache(str(tmp_path / "q8-header.json"))
    for split in st.splits:
        for sample in _all_samples(tmp_path, "q8", split):
            i = json.loads(sample["json"])["index"]
            for name in ("cls", "patch"):
                for part in QUANT_SUFFIXES:
                    got, raw = load_npy(sample[f"{name}.{part}.npy"]), st.root[f"{split}/{name}/{part}"][i]
                    assert got.dtype == raw.dtype
                    np.testing.assert_array_equal(got, raw)
        for name in st.specs(split):
            np.testing.assert_array_equal(wc.read(split, name), st.read(split, name))
    assert len(list(tmp_path.glob("q8-train-*.tar"))) == 1  # 1 GB default-size shards: one per split here


def test_streamed_items_equal_cache_split_items(mixed_cache, tmp_path, monkeypatch):
    st = mixed_cache
    export_wds(st, tmp_path, name="mix", shard_bytes="100KB")
    src = open_wds_source(str(tmp_path / "mix-header.json"), shuffle=4)
    keys = DataKeys(frame_emb=True, cls_layers=(1,), patch_layers=(-1,), frames=True)
    for split, train in (("train", True), ("val", False)):
        idx = select_videos(st, split)
        assert np.array_equal(idx, select_videos(src, split))
        ref = CacheSplit(st, HeadInputs(st, keys, split), idx, train=train, label_map={0: 3, 1: 2, 2: 1, 3: 0})
        got = src.split_dataset(HeadInputs(src, keys, split), idx, train=train, label_map={0: 3, 1: 2, 2: 1, 3: 0})
        assert isinstance(got, WdsSplit) and len(got) == len(ref)
        for ds in (ref, got):
            ds.set_epoch(3, seed=1)  # the random view per training sample matches CacheSplit's
        ordered = list(got.ordered())
        for i, item in enumerate(ordered):
            want = ref[i]
            assert item.keys() == want.keys()
            for k in want:
                assert item[k].dtype == want[k].dtype and item[k].shape == want[k].shape, (split, k)
                assert torch.equal(item[k], want[k]), (split, k)
        # streaming order: shuffled in training (a buffer), in order for evaluation; same items either way
        streamed = list(got)
        sig = lambda it: (int(it["label"]), it["frame_emb"].numpy().tobytes())  # noqa: E731
        assert sorted(map(sig, streamed)) == sorted(map(sig, ordered))
        if not train:
            assert list(map(sig, streamed)) == list(map(sig, ordered))
    # a DataLoader with workers: shards are split between them, every video once in every epoch (the
    # shard order is shuffled per epoch: one order for all workers, or some shards are read twice, some never)
    idx = select_videos(st, "train")
    ds = src.split_dataset(HeadInputs(src, DataKeys(frame_emb=True), "train"), idx, train=True)
    every = sorted(it["frame_emb"].numpy().tobytes() for it in ds.ordered())
    assert len(every) == len(set(every)) == len(idx)
    for epoch in range(4):
        ds.set_epoch(epoch, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        assert sorted(it["frame_emb"].numpy().tobytes() for it in loader) == every, epoch
    # nodes: rank r of 2 reads shards r, r+2, ...; together every selected video exactly once
    import stages.data.wds_split as wd

    parts = []
    for rank in range(2):
        monkeypatch.setattr(wd, "node_info", lambda r=rank: (r, 2))
        part = [it["frame_emb"].numpy().tobytes() for it in ds]
        assert len(part) == len(ds)
        parts += part
    assert len(parts) == len(set(parts)) == len(idx)
    # resampled: an epoch is a fixed number of samples drawn from shards with replacement
    monkeypatch.setattr(wd, "node_info", lambda: (0, 1))
    res = WdsSplit(src, HeadInputs(src, DataKeys(frame_emb=True), "train"), idx, train=True, resample=True)
    assert len(list(res)) == len(idx)


def test_streamed_int8_items_equal_cache_split_items(int8_cache, tmp_path):
    """int8 parts are selected (layers, in any order) before dequantisation: still the same
    tensors as the Zarr cache gives."""
    st = int8_cache
    export_wds(st, tmp_path, name="q", shard_bytes="100KB")
    src = open_wds_source(str(tmp_path / "q-header.json"))
    keys = DataKeys(cls_layers=(-1, 1), patch_layers=(1, -1))
    for split, train in (("train", True), ("val", False)):
        idx = select_videos(st, split)
        ref = CacheSplit(st, HeadInputs(st, keys, split), idx, train=train)
        got = src.split_dataset(HeadInputs(src, keys, split), idx, train=train)
        for ds in (ref, got):
            ds.set_epoch(1, seed=0)
        ordered = list(got.ordered())
        assert len(ordered) == len(ref) > 0
        for i, item in enumerate(ordered):
            for k, want in ref[i].items():
                assert item[k].shape == want.shape and torch.equal(item[k], want), (split, k)


def test_a_subset_of_shards_narrows_the_selection(medium):
    st, folder = medium
    header = json.loads((folder / "med-header.json").read_text())
    shards = header["splits"]["train"]["shards"]
    assert len(shards) >= 3
    src = open_wds_source(str(folder / "med-train-{000000..000001}.tar"))
    assert src.path.name == "med-header.json"
    idx = select_videos(src, "train")
    assert len(idx) == shards[0]["samples"] + shards[1]["samples"]
    assert idx.min() == shards[0]["first"] and idx.max() == shards[1]["last"]


def test_training_from_shards_equals_training_from_zarr(medium, tmp_path):
    st, folder = medium
    header = str(folder / "med-header.json")

    def both(**sets):
        cfg = TrainCfg(**sets)
        # force: each call replaces the previous run of other settings in these folders
        a = train_head(st, cfg, run_dir=tmp_path / "zarr", progress=False, force=True)
        b = train_head(open_wds_source(header, shuffle=16), cfg, run_dir=tmp_path / "wds", progress=False, force=True)
        assert a["train_videos"] == b["train_videos"] == 48 and a["eval_videos"] == b["eval_videos"] == 36
        return a, b

    # closed-form heads see the same data in the same order: the same model, exactly
    for head in ("lda", "linear_probe"):
        a, b = both(head=head)
        assert a["final"] == b["final"], head
    # one full batch per epoch: the shuffle order cannot matter beyond float summation order
    a, b = both(head="tap", epochs=6, batch_size=64, lr=1e-2)
    assert a["final"] == b["final"]
    np.testing.assert_allclose([h["train_loss"] for h in a["history"]], [h["train_loss"] for h in b["history"]],
                               rtol=1e-5)
    # minibatches: another shuffle order, so equal within noise (36 eval videos: one is 2.8 points)
    za, wa = [], []
    for seed in range(3):
        a, b = both(head="tap", epochs=40, batch_size=8, lr=5e-2, seed=seed)
        za.append(a["final"]["top1"])
        wa.append(b["final"]["top1"])
        la, lb = a["history"][-1]["train_loss"], b["history"][-1]["train_loss"]
        assert abs(la - lb) < 0.03 * la, (seed, la, lb)
    assert abs(np.mean(za) - np.mean(wa)) <= 6.0, (za, wa)
    assert max(abs(x - y) for x, y in zip(za, wa)) <= 12.0, (za, wa)


def test_cli_export_then_train_from_a_shard_pattern(medium, int8_cache, tmp_path, capsys):
    st, _ = medium
    out = tmp_path / "shards"
    proc = run_cli("cache", "export", st.path, "--format", "wds", "--out", out, "--name", "m", "--shard-bytes",
                   "30KB", check=True)
    assert "train: 48 videos in" in proc.stdout and "val: 36 videos in" in proc.stdout
    header = json.loads((out / "m-header.json").read_text())
    n = len(header["splits"]["train"]["shards"])
    pattern = f"{out}/m-train-{{000000..{n - 1:06d}}}.tar"
    proc = run_cli("train", "--head", "lda", "--wds", pattern, "--run-dir", tmp_path / "run", "--no-progress",
                   check=True)
    ref = train_head(st, TrainCfg(head="lda"), run_dir=tmp_path / "ref", progress=False)
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert got["final"] == ref["final"] and got["train_videos"] == 48 and "lda: top1" in proc.stdout
    # a run trained from shards is re-evaluated from its shards
    again = evaluate_run(tmp_path / "run")
    assert {k: again[k] for k in got["final"]} == got["final"] and again["cache"].endswith("m-header.json")
    # ... also when the shards came through a pipe: command, and a subset of shards is its own run
    piped = f"pipe:cat {out}/m-train-{{000000..{n - 2:06d}}}.tar"
    sub = train_head(open_wds_source(piped, header=f"pipe:cat {out}/m-header.json"), TrainCfg(head="lda"),
                     runs_root=tmp_path / "runs", progress=False)
    assert 0 < sub["train_videos"] < 48
    assert Path(sub["run_dir"]).parent == tmp_path / "runs"
    whole = train_head(st, TrainCfg(head="lda"), runs_root=tmp_path / "runs", progress=False)
    assert whole["run_dir"] != sub["run_dir"]  # the same settings on other data: another run folder
    again = evaluate_run(sub["run_dir"])
    assert {k: again[k] for k in sub["final"]} == sub["final"]
    # user errors: one line, exit 2 (in this process: the CLI's error path, without interpreter start-ups)
    from pipeline.cli import main

    for args, expect in ((["cache", "export", st.path, "--format", "zip"], "--format"),
                         (["train", "--head", "tap", "--wds", f"{tmp_path}/nope/m-train-000000.tar"], "m-header.json"),
                         (["train", "--head", "tap", "--wds", pattern, "--cache", st.path], "not both")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], lines
    # the default destination and name sit next to the cache
    proc = run_cli("cache", "export", int8_cache.path, check=True)
    dest = int8_cache.path.parent / f"{int8_cache.path.name}-wds"
    assert (dest / f"{int8_cache.path.name}-header.json").exists() and str(dest) in proc.stdout


# ----------------------------------------------------------------------------- nothing lost, nothing invented
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_never_touches_files_it_did_not_write(medium, tmp_path, capsys):
    """Files named like the export's shards that no header of this cache lists are the user's: the
    export is refused (one line, exit 2) and they stay byte for byte; the export's own files (its
    header lists them) are replaced and, when a re-export needs fewer, deleted."""
    from conftest import cli_in_process

    st, _ = medium
    out = tmp_path / "out"
    out.mkdir()
    user = {"m-train-000000.tar": b"the user's own tar", "m-train-000042.tar": b"another", "notes.txt": b"keep"}
    for name, data in user.items():
        (out / name).write_bytes(data)

    def export(size: str = "30KB"):
        code, _, err = cli_in_process(capsys, "cache", "export", st.path, "--out", out, "--name", "m",
                                      "--shard-bytes", size)
        return code, [ln for ln in err.splitlines() if ln.strip()]

    code, lines = export()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "m-train-000000.tar" in lines[0] and "another --out" in lines[0], lines
    assert _files(out) == user  # nothing overwritten, deleted or added
    for name in ("m-train-000000.tar", "m-train-000042.tar"):
        (out / name).unlink()
    code, lines = export()
    assert code == 0, lines
    header = json.loads((out / "m-header.json").read_text())
    assert len(header["splits"]["train"]["shards"]) > 2
    # a user's file beside an export of this cache: refused before the export's header is touched
    (out / "m-val-000099.tar").write_bytes(b"mine")
    before = _files(out)
    code, lines = export()
    assert code == 2 and len(lines) == 1 and "m-val-000099.tar" in lines[0], lines
    assert _files(out) == before
    (out / "m-val-000099.tar").unlink()
    # fewer, larger shards: the export's own surplus shards go, the user's note stays
    code, lines = export("1MB")
    assert code == 0, lines
    header = json.loads((out / "m-header.json").read_text())
    listed = {header["extra"]} | {s["file"] for info in header["splits"].values() for s in info["shards"]}
    assert set(_files(out)) == listed | {"m-header.json", "notes.txt"}


@pytest.mark.parametrize("damage", ["truncated", "not json"])
def test_export_over_a_damaged_header_is_one_line_and_deletes_nothing(medium, tmp_path, capsys, damage):
    from conftest import cli_in_process

    st, _ = medium
    out = tmp_path / "out"
    export_wds(st, out, name="m", shard_bytes="30KB")
    header = out / "m-header.json"
    text = header.read_bytes()
    header.write_bytes(text[: len(text) // 2] if damage == "truncated" else b"\x89PNG\r\n\x1a\n")
    before = _files(out)
    code, _, err = cli_in_process(capsys, "cache", "export", st.path, "--out", out, "--name", "m",
                                  "--shard-bytes", "30KB")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(header) in lines[0] and "damaged" in lines[0] and "another --out" in lines[0], lines
    assert _files(out) == before


def test_a_flipped_byte_in_the_extra_tar_is_named(medium, tmp_path):
    """Text embeddings and labels travel in the extra tar: a changed byte there is refused on open."""
    from cache.errors import CacheError

    st, _ = medium
    export_wds(st, tmp_path, name="m", shard_bytes="1MB")
    extra = tmp_path / "m-extra.tar"
    with tarfile.open(extra) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("text/"))
    with open(extra, "r+b") as fh:
        fh.seek(member.offset_data + member.size - 1)
        byte = fh.read(1)[0]
        fh.seek(-1, 1)
        fh.write(bytes([byte ^ 0x01]))
    with pytest.raises(CacheError) as err:
        WdsCache(str(tmp_path / "m-header.json"))
    text = str(err.value)
    assert "m-extra.tar" in text and member.name in text and "crc32c" in text and "pipeline cache export" in text
