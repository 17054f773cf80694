"""Cache integrity end to end, on real Zarr stores from a real tiny extraction.

Each file a cache is made of (a data shard, the label chunk, a status chunk, a text array, an
array's zarr.json) deleted, truncated or with bytes flipped: `verify` names it, `train` refuses
before repair, `extract` repairs it to equal an uninterrupted run. A process killed at each step
of write_shard (CLIPCACHE_FAULT) resumes to the same cache, and no shard counts as done before
its status chunk. A replaced source video is refused by name, and `--refresh` redoes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cache.errors import CacheError, TrainingError
from cache.store import DONE, FAULT_ENV, FAULT_EXIT, PENDING, open_store
from conftest import cli_in_process, demo_args, extract_in_process, plant_non_finite, run_cli

EXTRACT = dict(model="tiny", layers="all", shard_size=2, text="clip_single", workers=0)
CLI_EXTRACT = ("--layers", "all", "--shard-size", "2", "--text", "clip_single", "--workers", "0")


def _extract(ds_root, out, **kw):
    """run_extraction in this process (a CLI process costs seconds of imports per call)."""
    return extract_in_process(ds_root, out, run=kw, **EXTRACT)


def _train(cache, run_dir, **kw):
    from stages.train import TrainCfg, train_head

    return train_head(cache, TrainCfg(head="tap", epochs=1, batch_size=4), run_dir=run_dir, progress=False,
                      log=lambda *a, **k: None, **kw)


def assert_same_cache(a, b):
    """Same arrays, labels, status and text embeddings (what a rerun from scratch would hold)."""
    assert a.key == b.key and a.splits == b.splits
    for split in a.splits:
        np.testing.assert_array_equal(a.status(split), b.status(split))
        np.testing.assert_array_equal(a.labels(split), b.labels(split))
        for name in a.specs(split):
            np.testing.assert_allclose(a.read(split, name), b.read(split, name), rtol=2e-3, atol=2e-3,
                                       err_msg=f"{split}/{name}")
    assert a.text_names() == b.text_names()
    for t in a.text_names():
        np.testing.assert_allclose(a.text(t), b.text(t), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity-ref") / "cache"
    _extract(demo_small.root, out)
    st = open_store(out)
    assert st.is_complete() and st.verify() == []
    return st


def _copy(reference, tmp_path) -> Path:
    dest = tmp_path / "cache"
    shutil.copytree(reference.path, dest)
    return dest


def _damage(file: Path, how: str) -> None:
    if how == "delete":
        file.unlink()
    elif how == "truncate":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:  # flip: invert a few bytes in the middle
        data = bytearray(file.read_bytes())
        mid = len(data) // 2
        for i in range(mid, min(mid + 3, len(data))):
            data[i] ^= 0xFF
        file.write_bytes(bytes(data))


TARGETS = {
    "data chunk": "train/frame_emb/c/1/0/0/0",
    "label chunk": "val/label/c/0",
    "status chunk": "train/status/c/2",
    "text array": "text/clip_single/c/0/0",
    "array metadata": "train/cls/zarr.json",
}


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_damage_is_named_refused_and_repaired(reference, demo_small, tmp_path, target, how):
    path = _copy(reference, tmp_path)
    rel = TARGETS[target]
    _damage(path / rel, how)
    problems = open_store(path).verify()
    assert problems, f"{how} {rel} went unnoticed"
    assert any(rel in p for p in problems), problems
    assert len([p for p in problems if rel in p]) == 1, problems  # one line for one damaged file
    # train refuses, in one CacheError, before any run folder exists
    run_dir = tmp_path / "run"
    with pytest.raises(CacheError) as err:
        _train(path, run_dir)
    assert "\n" not in str(err.value) and ("repair" in str(err.value) or "unfinished" in str(err.value))
    assert not run_dir.exists()
    # extract (the same request) repairs exactly the damage, and the cache equals the clean one
    res = _extract(demo_small.root, path)
    assert not res.reused
    if target in ("data chunk", "status chunk"):  # one shard redone, not the cache
        assert res.videos == 2
    else:  # a file the store was built with: put back, no video redone
        assert res.videos == 0
    repaired = open_store(path)
    assert repaired.verify() == []
    assert_same_cache(repaired, reference)
    _train(path, run_dir)  # and now it trains




def test_cli_verify_train_repair(reference, tmp_path, capsys):
    path = _copy(reference, tmp_path)
    (path / TARGETS["data chunk"]).unlink()
    _damage(path / "val/label/c/0", "flip")
    code, out, err = cli_in_process(capsys, "cache", "verify", path)
    assert code == 2 and "Traceback" not in err
    problems = [ln for ln in out.splitlines() if ln.startswith("problem:")]
    assert len(problems) == 2 and "train/frame_emb/c/1/0/0/0: missing" in problems[1], out
    assert "val/label/c/0: corrupt" in problems[0] or "val/label/c/0: size" in problems[0]
    assert "cache repair" in err
    run_dir = tmp_path / "run"
    code, out, err = cli_in_process(capsys, "train", "--head", "tap", "--cache", path, "--run-dir", run_dir, "--no-progress")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "fails verification" in lines[0], err
    assert not run_dir.exists()
    code, out, err = cli_in_process(capsys, "cache", "repair", path, "--no-progress")
    assert code == 0, err
    assert "restored 1 file(s): val/label/c/0" in out and "repaired and verified" in out
    assert_same_cache(open_store(path), reference)
    code, out, _ = cli_in_process(capsys, "cache", "verify", path)
    assert code == 0 and "every file matches its checksum" in out


def test_root_metadata_damage_says_reextract(reference, tmp_path):
    path = _copy(reference, tmp_path)
    _damage(path / "zarr.json", "truncate")
    with pytest.raises(CacheError, match="cannot be repaired in place; remove .* and extract again"):
        open_store(path)


def test_a_damaged_cache_gives_no_traceback_in_info(reference, tmp_path):
    path = _copy(reference, tmp_path)
    _damage(path / "train/status/c/0", "truncate")
    _damage(path / "train/failures/shard-000001.json", "truncate")
    st = open_store(path)
    assert st.counts("train") == {"done": 10, "failed": 0, "pending": 2}  # unreadable status: pending, redone
    assert st.failures("train") == []
    kinds = sorted(p.shard for p in st.verify())
    assert kinds == [0, 1]


def test_unfinished_cache_is_refused_unless_allow_partial(reference, tmp_path):
    path = _copy(reference, tmp_path)
    open_store(path).reset_shards("train", [3])
    with pytest.raises(CacheError, match="unfinished .*2 of 12 in 'train' pending.*--allow-partial"):
        _train(path, tmp_path / "run")
    said = []
    from stages.train import TrainCfg, train_head

    res = train_head(path, TrainCfg(head="tap", epochs=1, batch_size=4), runs_root=tmp_path / "runs",
                     progress=False, log=said.append, allow_partial=True)
    assert res["train_videos"] == 10 and any(s.startswith("WARNING") and "unfinished" in s for s in said)
    full = _train(reference.path, None, runs_root=tmp_path / "runs")
    assert Path(full["run_dir"]).name != Path(res["run_dir"]).name  # a partial run never takes a full run's folder


def test_non_finite_loss_stops_training_and_leaves_no_run(reference, tmp_path):
    path = _copy(reference, tmp_path)
    st = open_store(path)
    plant_non_finite(path, "train", 0)  # sound checksums, NaN features (written by an older version)
    assert st.verify(finite=False) == [] and st.verify()  # only the data check sees NaN
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="loss is nan"):
        _train(path, run_dir)
    assert not run_dir.exists()


def test_repair_redoes_done_videos_holding_nan_and_verify_then_passes(reference, tmp_path):
    """A cache an older version left with NaN in done videos (checksums sound): `verify` names the
    rows, `cache repair` checks what verify checks and redoes those shards, and verify passes."""
    path = _copy(reference, tmp_path)
    plant_non_finite(path, "train", 1, rows=[3])
    plant_non_finite(path, "val", 0, rows=[0], value=float("inf"))
    code = run_cli("cache", "verify", path)
    assert code.returncode == 2 and "train/frame_emb[3]: marked done but holds NaN/inf" in code.stdout, code.stdout
    assert "val/frame_emb[0]" in code.stdout
    repaired = run_cli("cache", "repair", path, "--no-progress")
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert "nothing to repair" not in repaired.stdout and "repaired and verified" in repaired.stdout
    for redo in ("redoing 1 shard(s) of 'train' (1)", "redoing 1 shard(s) of 'val' (0)"):
        assert redo in repaired.stdout, repaired.stdout
    assert "ok" in run_cli("cache", "verify", path, check=True).stdout
    assert_same_cache(open_store(path), reference)


# the default run kills before the status chunk (record written: the case the record must not
# count as a commit) and after the data (nothing but data written); the others run with -m slow
FAULTS = ["after_data", "before_status", pytest.param("after_failures", marks=pytest.mark.slow),
          pytest.param("after_status", marks=pytest.mark.slow)]


@pytest.mark.parametrize("fault", FAULTS)
def test_killed_at_each_step_of_write_shard_resumes_to_the_same_cache(reference, demo_small, tmp_path, fault):
    out = tmp_path / "cache"
    killed = run_cli(*demo_args(demo_small, out, *CLI_EXTRACT), env={FAULT_ENV: f"{fault}:3"})
    assert killed.returncode == FAULT_EXIT, killed.stderr[-2000:]
    st = open_store(out)
    st_train = st.status("train")
    # shards 0 and 1 of train were committed; shard 2 was killed at `fault`: done only once its
    # status chunk exists (after_status), otherwise pending and redone by the rerun
    assert (st_train[:4] == DONE).all()
    third_done = (st_train[4:6] == DONE).all()
    assert third_done == (fault == "after_status") and (st_train[4:6] == PENDING).all() != third_done
    assert (st_train[6:] == PENDING).all() and (st.status("val") == PENDING).all()
    for shard in range(st.num_shards("train")):
        if (out / "train/status/c" / str(shard)).exists():
            assert st.record("train", shard) is not None  # the record always precedes the commit
    _extract(demo_small.root, out)
    st = open_store(out)
    assert st.is_complete() and st.verify() == []
    assert_same_cache(st, reference)


def test_replaced_source_is_refused_by_name_and_refresh_redoes_it(reference, demo_small, tmp_path):
    from stages.extract import SourcesChangedError

    root = tmp_path / "demo"
    shutil.copytree(demo_small.root, root)
    out = tmp_path / "cache"
    _extract(root, out)
    items = open_store(out).items("train")
    victim, donor = Path(items[2][0]), Path(items[7][0])
    assert victim.read_bytes() != donor.read_bytes()
    shutil.copyfile(donor, victim)  # the same path, another video
    with pytest.raises(SourcesChangedError) as err:
        _extract(root, out)
    lines = str(err.value).splitlines()
    assert "--refresh" in lines[0] and len(lines) == 2 and str(victim) in lines[1]
    res = _extract(root, out, refresh=True)
    assert res.videos == 2  # the shard that holds it, nothing else
    st = open_store(out)
    assert st.verify() == []
    np.testing.assert_allclose(st.read("train", "cls", 2), reference.read("train", "cls", 7), rtol=2e-3, atol=2e-3)
    assert _extract(root, out).reused  # and now it is current


def test_a_missing_video_added_later_is_named_and_retry_failed_takes_it(demo_small, tmp_path):
    from pipeline.datasets import load_dataset
    from stages.extract import SourcesChangedError

    videos = tmp_path / "videos"
    videos.mkdir()
    good = [ln.split() for ln in demo_small.val_list.read_text().splitlines()[:3]]
    for rel, _ in good:
        shutil.copyfile(Path(demo_small.video_root) / rel, videos / Path(rel).name)
    (tmp_path / "list.txt").write_text("".join(f"{Path(rel).name} {lab}\n" for rel, lab in good))
    late = videos / Path(good[1][0]).name
    late.rename(tmp_path / "later.mp4")  # missing at extraction time

    def extract(**kw):
        ds = load_dataset("custom", video_root=videos, train_list=tmp_path / "list.txt",
                          classes=demo_small.classes_file)
        return extract_in_process(ds, tmp_path / "cache", run=kw, layers="all", shard_size=2, text="none")

    extract()
    assert open_store(tmp_path / "cache").status("train").tolist() == [DONE, 2, DONE]
    assert extract().reused
    (tmp_path / "later.mp4").rename(late)
    with pytest.raises(SourcesChangedError, match="was missing when extracted, exists now"):
        extract()
    res = extract(retry_failed=True)
    assert res.videos == 2 and res.failed == 0  # the failed video's shard, nothing else
    st = open_store(tmp_path / "cache")
    assert st.status("train").tolist() == [DONE, DONE, DONE] and st.verify() == []
