"""A cache shard damaged after stage two's start-of-run check (issues 10 and 20): every read of the
stage-two path (the loader's direct reads, zarr's, preload, worker processes, WebDataset shards,
training and evaluation) fails in one CacheError line that names the array, the shard file and the
fix, never a traceback or silent values: a deleted shard file of a done shard is not read as fill
values (NaN, or an accuracy computed from them); the run folder is not marked complete, and after
`cache repair` the same command resumes. ``verify_reads=on`` also catches a same-length rewrite.

The damage is real (a truncated, deleted or rewritten shard file of a real extracted cache). To put
it between the check and the read, the tests damage the file from a tiny hook: right after
FeatureStore.require_sound has passed, or right after the first epoch's checkpoint is written.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import stages.train as T
from cache.errors import CacheError
from cache.store import FeatureStore, open_store
from conftest import cli_in_process, extracted_store
from stages.data.loader import CacheLoader, WdsLoader, ZarrBatches, epoch_plan
from stages.data.zarr_split import CacheSplit, HeadInputs, select_videos
from stages.heads import DataKeys
from stages.runs import finished_metrics

KEYS = DataKeys(frame_emb=True, cls_layers=(-1,), patch_layers=(-1,))
SHARD = 1  # the damaged shard of train/patch: rows 2 and 3
EVL = ["--set", "epochs=3", "--set", "batch_size=4", "--set", "num_layers=1", "--set", "seed=1",
       "--set", "warmup_epochs=0", "--recipe", "quick", "--no-progress"]


@pytest.fixture(scope="module")
def clean(demo_small, tmp_path_factory):
    """A sound extracted cache (patch tokens of every layer, shards of 2 videos)."""
    st = extracted_store(demo_small.root, tmp_path_factory.mktemp("reads") / "cache", text="none", layers="all",
                         patch=True, shard_size=2)
    assert st.is_complete() and st.verify() == []
    return st


@pytest.fixture
def cache(clean, tmp_path) -> Path:
    dest = tmp_path / "cache"
    shutil.copytree(clean.path, dest)
    return dest


def _shard_file(path: Path, shard: int = SHARD, split: str = "train", array: str = "patch") -> Path:
    return open_store(path)._shard_file(split, array, shard)


def _truncate(file: Path, how: str = "half") -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if how == "half" else data[:-7])


def _damage(file: Path, how: str) -> None:
    """'truncate' (half the file), 'delete', or 'rewrite': the same length, other bytes in its first chunk."""
    if how == "delete":
        file.unlink()
    elif how == "rewrite":
        data = bytearray(file.read_bytes())
        data[:64] = bytes(b ^ 0x55 for b in data[:64])  # inside the data, before the index: the index stays sound
        file.write_bytes(bytes(data))
    else:
        _truncate(file)


def _assert_one_line(text: str, path: Path, split: str = "train", array: str = "patch", shard: int = SHARD) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    rel = str(_shard_file(path, shard, split, array).relative_to(path))
    assert rel in text and f"'{split}/{array}'" in text, text
    assert f"pipeline cache verify {path}" in text and f"pipeline cache repair {path}" in text, text


# ----------------------------------------------------------------------------- the readers
@pytest.mark.parametrize("how", ["half", "tail"])
def test_both_readers_name_a_truncated_shard(clean, cache, how):
    st = open_store(cache)
    a, b = st.shard_range("train", SHARD)
    st.read_rows("train", "patch", [a, b - 1])  # sound: its index is parsed and kept
    _truncate(_shard_file(cache), how)
    for read in (st.read_rows, st.read):  # straight from the file (the loader), and through zarr
        with pytest.raises(CacheError) as err:
            read("train", "patch", [a, b - 1])
        _assert_one_line(str(err.value), cache)
    # the other shards still read as they were written
    assert np.array_equal(st.read_rows("train", "patch", [0, 1, 4]), clean.read_rows("train", "patch", [0, 1, 4]))


def test_both_readers_refuse_a_deleted_shard_of_a_done_shard(clean, cache):
    """Zarr (and the direct reader, as it was) read a missing shard file as fill values: NaN rows
    that a loss or an accuracy was then computed from. The store's status says the shard was
    written: its absence is damage, named."""
    st = open_store(cache)
    a, b = st.shard_range("train", SHARD)
    st.read_rows("train", "patch", [a, b - 1])  # sound (and the shard's expectations are taken)
    _shard_file(cache).unlink()
    for read in (st.read_rows, st.read):
        with pytest.raises(CacheError, match="missing") as err:
            read("train", "patch", [a, b - 1])
        _assert_one_line(str(err.value), cache)
    # a fresh reader (its first read after the deletion) refuses it too, through both readers
    for read in (open_store(cache).read_rows, open_store(cache).read):
        with pytest.raises(CacheError, match="missing"):
            read("train", "patch", [a])
    assert np.array_equal(st.read_rows("train", "patch", [0, 1, 4]), clean.read_rows("train", "patch", [0, 1, 4]))


def test_a_cache_without_records_refuses_a_deleted_shard_too(cache):
    """A cache made before shard records: the status array alone says the shard was written."""
    import zarr

    root = zarr.open_group(str(cache), mode="r+")
    meta = dict(root.attrs["clipcache"])
    meta["integrity"] = 0
    root.attrs["clipcache"] = meta
    st = open_store(cache)
    assert not st.has_checksums
    _shard_file(cache).unlink()
    a, b = st.shard_range("train", SHARD)
    for read in (st.read_rows, st.read):
        with pytest.raises(CacheError, match="missing") as err:
            read("train", "patch", [a, b - 1])
        _assert_one_line(str(err.value), cache)
    problems = [p for p in open_store(cache).verify() if p.array == "patch"]
    assert problems == [f"train/patch shard {SHARD}: marked done but no data written"], problems


def test_a_rewritten_index_entry_past_the_end_is_named(cache):
    """The index itself intact-looking (crc32c recomputed) but pointing past the end of the file."""
    import google_crc32c

    file = _shard_file(cache)
    data = bytearray(file.read_bytes())
    st = open_store(cache)
    index_bytes = 16 * int(np.prod(st._raw("train/patch").grid))  # (offset, size) per chunk, then a crc32c
    start = len(data) - 4 - index_bytes
    index = np.frombuffer(bytes(data[start:start + index_bytes]), dtype="<u8").reshape(-1, 2).copy()
    index[0, 0] = len(data)  # the first chunk now "starts" at the end of the file
    data[start:start + index_bytes] = index.tobytes()
    data[-4:] = google_crc32c.value(bytes(data[start:start + index_bytes])).to_bytes(4, "little")
    file.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="past the end") as err:
        st.read_rows("train", "patch", list(range(*st.shard_range("train", SHARD))))
    _assert_one_line(str(err.value), cache)


def _split(path: Path) -> CacheSplit:
    st = open_store(path)
    return CacheSplit(st, HeadInputs(st, KEYS, "train"), select_videos(st, "train"), train=True, preload=False)


@pytest.mark.parametrize("how", ["truncate", "delete"])
@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_turns_a_shard_damaged_mid_run_into_one_line(cache, workers, how):
    data = _split(cache)
    source = ZarrBatches(data, preload="off")  # reads happen per batch (in the workers when > 0)
    plan = epoch_plan(len(data), 4, 1, 0, 0, 0, "full")
    assert len(list(CacheLoader(source, plan, "cpu", workers=workers))) == len(plan)  # sound: every batch
    _damage(_shard_file(cache), how)
    with pytest.raises(CacheError) as err:
        list(CacheLoader(source, plan, "cpu", workers=workers))
    _assert_one_line(str(err.value), cache)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_preload_of_a_damaged_shard_is_one_line(cache, how):
    data = _split(cache)
    _damage(_shard_file(cache), how)
    with pytest.raises(CacheError) as err:
        ZarrBatches(data, preload="on")
    _assert_one_line(str(err.value), cache)


def test_verify_reads_catches_a_same_length_rewrite_at_its_next_read(cache):
    """Size and index unchanged, other bytes: only the recorded crc32 tells. Off, the reader returns
    the rewritten values (what `pipeline cache verify` finds later); on, the next read refuses them."""
    rows = list(range(*open_store(cache).shard_range("train", SHARD)))
    off, on = open_store(cache), open_store(cache)
    on.verify_reads = True
    assert on.require_sound({"train": ["patch"]}) == {"train": 0}  # checksums once: the reads then pay no crc32
    first = off.read_rows("train", "patch", rows)
    assert np.array_equal(on.read_rows("train", "patch", rows), first)
    _damage(_shard_file(cache), "rewrite")
    assert not np.array_equal(off.read_rows("train", "patch", rows), first)  # silently other data
    for read in (on.read_rows, on.read):
        with pytest.raises(CacheError, match="crc32") as err:
            read("train", "patch", rows)
        _assert_one_line(str(err.value), cache)


# ----------------------------------------------------------------------------- the command
def _train_args(path: Path, run: Path, *extra: str) -> list:
    return ["train", "--head", "evl", "--cache", path, "--run-dir", run, *EVL, *extra]


def test_train_refuses_a_shard_damaged_before_the_run(cache, tmp_path, capsys):
    _truncate(_shard_file(cache))
    run = tmp_path / "run"
    code, _, err = cli_in_process(capsys, *_train_args(cache, run))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "fails verification" in lines[0], err
    assert str(_shard_file(cache).relative_to(cache)) in lines[0]
    assert not run.exists()


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_train_on_a_shard_damaged_after_the_check_is_one_line(cache, tmp_path, capsys, monkeypatch, how):
    """Damage between require_sound and the first read (preloaded in this process, workers 0)."""
    check = FeatureStore.require_sound

    def check_then_damage(self, *a, **k):
        got = check(self, *a, **k)
        _damage(_shard_file(cache), how)
        return got

    monkeypatch.setattr(FeatureStore, "require_sound", check_then_damage)
    run = tmp_path / "run"
    code, out, err = cli_in_process(capsys, *_train_args(cache, run))
    assert code == 2, (code, err)
    assert err.startswith("error: cache "), err
    _assert_one_line(err, cache)
    assert not run.exists()  # nothing to resume: the folder this run made is gone


def test_a_shard_damaged_mid_run_in_a_worker_then_repaired_resumes(cache, tmp_path, capsys, monkeypatch):
    """Workers 2, no preload: the epoch after the first checkpoint reads the damaged shard in a worker
    process. One line, exit 2, the run folder keeps its checkpoint but is not complete; `cache
    verify` names the file, `cache repair` redoes it, and the same command resumes and finishes."""
    save = T.save_checkpoint
    saved = []

    def save_then_damage(state, file, *a, **k):
        save(state, file, *a, **k)
        saved.append(state.get("epoch"))
        if len(saved) == 1:
            _truncate(_shard_file(cache))

    monkeypatch.setattr(T, "save_checkpoint", save_then_damage)
    run = tmp_path / "run"
    args = _train_args(cache, run, "--set", "workers=2", "--set", "preload=off")
    code, out, err = cli_in_process(capsys, *args)
    assert code == 2, (code, err)
    _assert_one_line(err, cache)
    assert saved == [1] and (run / "last.pt").exists() and finished_metrics(run) is None  # epoch 1 only, unfinished
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    monkeypatch.setattr(T, "save_checkpoint", save)

    code, out, err = cli_in_process(capsys, "cache", "verify", cache)
    assert code == 2 and str(_shard_file(cache).relative_to(cache)) in out, out
    code, out, err = cli_in_process(capsys, "cache", "repair", cache, "--no-progress")
    assert code == 0, err
    code, out, err = cli_in_process(capsys, *args)
    assert code == 0, err
    assert "from epoch 1" in out, out
    assert json.loads((run / "metrics.json").read_text())["history"][-1]["epoch"] == 3


def _damage_after_first_epoch(monkeypatch, file: Path, how: str) -> list:
    """Damage ``file`` right after the run's first checkpoint: the next epoch's reads meet it."""
    save = T.save_checkpoint
    saved = []

    def save_then_damage(state, path, *a, **k):
        save(state, path, *a, **k)
        saved.append(state.get("epoch"))
        if len(saved) == 1:
            _damage(file, how)

    monkeypatch.setattr(T, "save_checkpoint", save_then_damage)
    return saved


def _assert_failed_run(code: int, err: str, run: Path, cache: Path, split: str, array: str, shard: int) -> None:
    """Exit 2, one `error:` line naming the file, the run failed, no metrics (no accuracy claimed)."""
    assert code == 2, (code, err)
    assert err.startswith("error: cache ") and len(err.strip().splitlines()) == 1, err
    _assert_one_line(err, cache, split, array, shard)
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    assert finished_metrics(run) is None


@pytest.mark.parametrize("split,array,shard,workers", [
    ("val", "patch", 0, 0),        # issue 20: the evaluation's read (was: exit 0, an accuracy from fill values)
    ("train", "patch", SHARD, 0),  # was: "the loss is nan ... lower the learning rate", no file named
    ("train", "patch", SHARD, 2),  # read in a worker process
])
def test_a_shard_deleted_mid_run_while_streaming_stops_the_run(cache, tmp_path, capsys, monkeypatch, split, array,
                                                                shard, workers):
    """Arrays that do not fit in RAM (as on K400): auto preload is off, for training and evaluation
    alike, and every epoch reads the files."""
    import stages.data.loader as L

    monkeypatch.setattr(L, "PRELOAD_LIMIT", 0)
    file = _shard_file(cache, shard, split, array)
    saved = _damage_after_first_epoch(monkeypatch, file, "delete")
    run = tmp_path / "run"
    code, out, err = cli_in_process(capsys, *_train_args(cache, run, "--set", f"workers={workers}"))
    assert saved == [1] and "top1" not in out, out
    _assert_failed_run(code, err, run, cache, split, array, shard)
    assert "missing" in err, err


def test_evaluate_on_a_shard_deleted_after_the_check_is_one_line(cache, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    code, _, err = cli_in_process(capsys, *_train_args(cache, run))
    assert code == 0, err
    check = FeatureStore.require_sound

    def check_then_delete(self, *a, **k):
        got = check(self, *a, **k)
        _shard_file(cache, 0, "val", "patch").unlink()
        return got

    monkeypatch.setattr(FeatureStore, "require_sound", check_then_delete)
    code, out, err = cli_in_process(capsys, "evaluate", "--run", run)
    assert code == 2 and "top1" not in out, (code, out, err)
    assert err.startswith("error: cache ") and len(err.strip().splitlines()) == 1, err
    _assert_one_line(err, cache, "val", "patch", 0)


def test_verify_reads_on_stops_a_run_whose_shard_is_rewritten_mid_run(cache, tmp_path, capsys, monkeypatch):
    """A same-length rewrite after the first epoch: with verify_reads=on the next epoch's read (in a
    worker process) refuses it; the run fails, naming the file."""
    saved = _damage_after_first_epoch(monkeypatch, _shard_file(cache), "rewrite")
    run = tmp_path / "run"
    code, out, err = cli_in_process(capsys, *_train_args(cache, run, "--set", "preload=off", "--set", "workers=2",
                                                         "--set", "verify_reads=on"))
    assert saved == [1]
    _assert_failed_run(code, err, run, cache, "train", "patch", SHARD)
    assert "crc32" in err, err


# ----------------------------------------------------------------------------- WebDataset shards
def _export(path: Path, out: Path) -> Path:
    from cache.wds import export_wds

    export_wds(open_store(path), out, name="x", shard_bytes="60KB")
    return out / "x-header.json"


@pytest.mark.parametrize("how", ["truncate", "delete"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_webdataset_shard_is_one_line_in_workers_too(cache, tmp_path, workers, how):
    from stages.data.wds_split import open_wds_source

    header = _export(cache, tmp_path / "wds")
    src = open_wds_source(str(header), shuffle=0)
    data = src.split_dataset(HeadInputs(src, KEYS, "train"), select_videos(src, "train"), train=True)
    assert len(list(WdsLoader(data, 3, "cpu", workers=workers))) > 1
    tar = Path(data.urls[1])
    if how == "delete":
        tar.unlink()
    else:
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(CacheError) as err:
        list(WdsLoader(data, 3, "cpu", workers=workers))
    text = str(err.value)
    assert "\n" not in text and tar.name in text, text
    assert ("truncated or damaged" if how == "truncate" else "No such file") in text, text
    # the closed-form heads' one pass (WdsCache.read, through the same opener) names it too
    with pytest.raises(CacheError, match=tar.name):
        src.read("train", "frame_emb")


def test_train_from_webdataset_with_a_shard_deleted_mid_run_stops_the_run(cache, tmp_path, capsys, monkeypatch):
    header = _export(cache, tmp_path / "wds")
    tar = sorted((tmp_path / "wds").glob("x-train-*.tar"))[1]
    saved = _damage_after_first_epoch(monkeypatch, tar, "delete")
    run = tmp_path / "run"
    code, out, err = cli_in_process(capsys, "train", "--head", "evl", "--wds", header, "--run-dir", run, *EVL,
                                    "--set", "workers=2")
    assert saved == [1] and code == 2 and "top1" not in out, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: WebDataset shard") and tar.name in lines[0], err
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    assert finished_metrics(run) is None
    code, _, err = cli_in_process(capsys, "train", "--head", "evl", "--wds", header, "--run-dir", tmp_path / "r2",
                                  *EVL, "--set", "verify_reads=on")
    assert code == 2 and "verify_reads" in err and len(err.strip().splitlines()) == 1, err


def _as_version_1(header: Path) -> None:
    """Rewrite an export's header as format version 1 wrote it: no member checksums or sizes."""
    doc = json.loads(header.read_text())
    doc["version"] = 1
    for key in ("checksum", "extra_members"):
        del doc[key]
    for info in doc["splits"].values():
        del info["member_bytes"], info["json_max_bytes"]
        for entry in info["shards"]:
            del entry["crc32c"]
    header.write_text(json.dumps(doc, indent=1))


def _member(tar: Path, suffix: str) -> tarfile.TarInfo:
    with tarfile.open(tar) as t:
        return next(m for m in t.getmembers() if m.name.endswith(suffix))


def _flip(file: Path, offset: int) -> None:
    with open(file, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x01]))


def test_a_damaged_npy_member_of_an_intact_tar_is_one_line(cache, tmp_path):
    """Bytes changed inside a member of a version 1 export (no member checksums; tar has none over
    member data): the .npy header no longer parses; that is the shard's damage, named, not a
    ValueError traceback."""
    from stages.data.wds_split import open_wds_source

    header = _export(cache, tmp_path / "wds")
    _as_version_1(header)
    src = open_wds_source(str(header), shuffle=0)
    data = src.split_dataset(HeadInputs(src, KEYS, "train"), select_videos(src, "train"), train=True)
    tar = Path(data.urls[0])
    blob = bytearray(tar.read_bytes())
    at = blob.index(b"\x93NUMPY")
    blob[at:at + 6] = b"XXXXXX"  # the first member's .npy magic
    tar.write_bytes(bytes(blob))
    for workers in (0, 2):
        with pytest.raises(CacheError) as err:
            list(WdsLoader(data, 3, "cpu", workers=workers))
        text = str(err.value)
        assert "\n" not in text and tar.name in text and "ValueError" in text, text


def test_a_flipped_byte_in_a_member_stops_training_from_shards(clean, tmp_path, capsys):
    """One bit of one fp16 value changed inside a member: still a valid .npy of the right shape,
    so only the member's checksum in the header tells; training stops with one line naming the
    shard, the member and the fix, and leaves no run folder."""
    header = _export(clean.path, tmp_path / "wds")
    shard = tmp_path / "wds" / "x-train-000000.tar"
    member = _member(shard, ".frame_emb.npy")
    _flip(shard, member.offset_data + member.size - 1)
    run = tmp_path / "run"
    code, out, err = cli_in_process(capsys, "train", "--head", "lda", "--wds", header, "--run-dir", run,
                                    "--no-progress")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err)
    assert shard.name in lines[0] and member.name in lines[0] and "crc32c" in lines[0], lines
    assert "pipeline cache export" in lines[0] and not run.exists()


@pytest.mark.parametrize("version", [2, 1])
def test_a_member_larger_than_the_header_says_is_refused_unread(clean, tmp_path, version):
    """A shard whose first frame_emb member is 256 MB (a hole on disk, zeros when read): both
    readers refuse it from its tar header, in one line naming it, without reading it into memory
    (a version 1 header bounds the size by the array spec)."""
    from stages.data.wds_split import open_wds_source

    header = _export(clean.path, tmp_path / "wds")
    if version == 1:
        _as_version_1(header)
    shard = tmp_path / "wds" / "x-train-000000.tar"
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    target = next(m for m, _ in members if m.name.endswith(".frame_emb.npy"))
    big = 256 << 20
    with open(shard, "wb") as fh:
        for m, data in members:
            if m is target:
                m.size = big
                fh.write(m.tobuf(tarfile.USTAR_FORMAT))
                fh.seek(big, 1)  # a multiple of 512: the next member header follows the hole
            else:
                fh.write(m.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512))
        fh.write(b"\0" * 1024)
    src = open_wds_source(str(header), shuffle=0)
    data = src.split_dataset(HeadInputs(src, KEYS, "train"), select_videos(src, "train"), train=False)
    tracemalloc.start()
    try:
        for read in (lambda: list(data.ordered()), lambda: src.read("train", "frame_emb")):
            with pytest.raises(CacheError) as err:
                read()
            text = str(err.value)
            assert "\n" not in text and shard.name in text and target.name in text, text
            assert f"is {big} bytes" in text and "not read" in text and "pipeline cache export" in text, text
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB allocated"


def test_a_version_1_export_is_read_with_a_note_that_it_is_unchecked(clean, tmp_path, capsys):
    header = _export(clean.path, tmp_path / "wds")
    _as_version_1(header)
    code, out, err = cli_in_process(capsys, "train", "--head", "lda", "--wds", header, "--run-dir", tmp_path / "run",
                                    "--no-progress")
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "no member checksums" in notes[0] and str(header) in notes[0], err
    assert "pipeline cache export" in notes[0]
