"""Scale out of stage one: torchrun ranks, a killed rank rerun alone, `cache finalize`."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch

from cache.errors import ConfigError
from cache.store import DONE, FAULT_ENV, open_store
from conftest import demo_args, extracted_store, n_committed, run_cli, torchrun

OPTS = ("--layers", "all", "--patch", "--shard-size", "2", "--text", "clip_single", "--workers", "0")


@pytest.fixture(scope="module")
def reference(demo_small, tmp_path_factory):
    """The one-process cache (in this process: same code path as `pipeline extract`, no start-up)."""
    return _extract_in_process(demo_small, tmp_path_factory.mktemp("scale_ref") / "cache")


def _extract_in_process(ds, out, shard=(0, 1)):
    return extracted_store(ds.root, out, shard=shard, layers="all", patch=True, shard_size=2, text="clip_single")


def _assert_same_cache(st, ref):
    assert st.key == ref.key
    for split in ref.splits:
        np.testing.assert_array_equal(st.status(split), ref.status(split))
        for name in ref.specs(split):
            np.testing.assert_allclose(st.read(split, name), ref.read(split, name), rtol=1e-3, atol=1e-3,
                                       err_msg=f"{split}/{name}")


def _finalize(path, capsys=None):
    """`pipeline cache finalize PATH`: in a fresh process, or in this one (the CLI's own error path)."""
    if capsys is None:
        proc = run_cli("cache", "finalize", path)
        return proc.returncode, proc.stdout, [ln for ln in proc.stderr.splitlines() if ln.strip()]
    from pipeline.cli import main

    capsys.readouterr()
    try:
        main(["cache", "finalize", str(path)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, [ln for ln in out.err.splitlines() if ln.strip()]


def test_torchrun_ranks_take_their_shards_and_equal_one_process(demo_small, reference, tmp_path):
    out = tmp_path / "cache"
    proc = torchrun("-m", "pipeline.cli", *demo_args(demo_small, out, *OPTS), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 10 shards (6 train + 4 val of 2 videos): rank 0 takes the first 5, rank 1 the last 5, without --shard
    assert proc.stdout.count(": 10 videos encoded, 0 failed") == 2, proc.stdout
    st = open_store(out)
    assert st.is_complete() and st.verify() == [] and (out / "summary.json").exists()
    _assert_same_cache(st, reference)


def test_a_killed_rank_is_rerun_alone_and_finalize_reports_what_is_missing(demo_small, reference, tmp_path,
                                                                          capsys):
    out = tmp_path / "cache"
    _extract_in_process(demo_small, out, shard=(0, 2))  # rank 0 of 2 finished
    code, _, err = _finalize(out, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    # rank 1 owns train shard 5 and val shards 0-3 (contiguous ranges of the shard list)
    assert "train shard 5 (videos 10-11)" in err[0] and "val shard 3 (videos 6-7)" in err[0], err
    assert "train shard 4" not in err[0]
    assert not (out / "summary.json").exists()

    args = demo_args(demo_small, out, *OPTS, "--shard", "1/2")
    before = n_committed(out)
    assert before == 5
    # rank 1 is SIGKILLed (by itself, through the store's fault hook) right after it commits its
    # second shard: its five shards commit within ~0.1 s of each other, too fast for a poller on a
    # loaded machine to land a kill between them (that race failed a fresh-clone CI run)
    killed = run_cli(*args, env={FAULT_ENV: "after_status:2:sigkill"})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    n_rank1 = n_committed(out) - before
    assert n_rank1 == 2 and not open_store(out).is_complete()
    code, _, err = _finalize(out, capsys)
    assert code == 2 and "pending" in err[0]

    rerun = run_cli(*args, check=True)  # the same command, alone
    assert "resuming" in rerun.stdout and f"{n_rank1} shard(s) already done" in rerun.stdout, rerun.stdout
    assert "10 videos" not in rerun.stdout  # only what rank 1 had left
    st = open_store(out)
    assert st.is_complete() and st.verify() == []
    _assert_same_cache(st, reference)
    assert all((st.status(s) == DONE).all() for s in st.splits)

    (out / "summary.json").unlink(missing_ok=True)
    code, stdout, err = _finalize(out)
    assert code == 0, err
    assert "train: done 12, failed 0, pending 0" in stdout and "val: done 8, failed 0, pending 0" in stdout
    assert (out / "summary.json").exists()


def test_torchrun_environment_picks_shard_and_device(monkeypatch):
    import stages.extract as X

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert X.torchrun_shard() == (0, 1) and X._device("cpu") == "cpu"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert X.torchrun_shard() == (3, 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a 2-GPU node (the device check asks)
    assert X._device("auto") == "cuda:1" and X._device("cuda") == "cuda:1" and X._device("cuda:0") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert X._device("auto") == "cpu"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError):
        X.torchrun_shard()
