"""Stage one end to end on generated videos and the tiny open_clip model (the issue's must-holds)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.store import DONE, FAILED, FAULT_ENV, open_store
from conftest import committed, demo_args, extract_in_process, popen_cli, run_cli


def _assert_same_features(a, b, splits=None, rows=None):
    for split in splits or a.splits:
        for name in a.specs(split):
            x, y = a.read(split, name), b.read(split, name)
            if rows is not None:
                x, y = x[rows[0]], y[rows[1]]
            np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-3, err_msg=f"{split}/{name}")


@pytest.fixture(scope="module")
def reference(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "cache"
    run_cli(*demo_args(demo_small, out, "--layers", "all", "--patch", "--shard-size", "2", "--text",
                       "clip_single,clip_actionclip"), check=True)
    return open_store(out)


def test_reference_cache_is_complete_and_sound(reference, demo_small):
    st = reference
    assert st.is_complete() and st.verify() == []
    assert st.counts("train") == {"done": 12, "failed": 0, "pending": 0}
    assert st.read("train", "frame_emb").shape == (12, 1, 8, 32)
    assert st.read("val", "patch").shape == (8, 1, 8, 2, 16, 64)
    assert st.text("clip_single").shape == (4, 32) and st.text("clip_actionclip").shape == (4, 16, 32)
    assert st.meta["config"]["layers"] == "all" and st.meta["dims"]["num_classes"] == 4
    # features belong to their own video: all distinct rows
    emb = st.read("train", "frame_emb")[:, 0, 0]
    assert len({tuple(np.round(r, 3)) for r in emb}) == 12


def test_taps_equal_the_model_run_directly(reference, demo_small):
    """The cache holds exactly what open_clip computes on the same preprocessed frames."""
    from stages.backbone import load_clip
    from stages.video import SamplingCfg, decode_clips, make_views, normalize

    st = reference
    model = load_clip("tiny", seed=0)
    path, label = st.items("val")[3]
    clips, _ = decode_clips(path, SamplingCfg(frames=8))
    views = make_views(clips, 32, 1)  # (1, 8, 32, 32, 3)
    x = normalize(torch.from_numpy(views[0]), st.meta["preprocess"]["mean"], st.meta["preprocess"]["std"])
    with torch.no_grad():
        emb = model.encode_image(x).numpy()
        out = model.visual.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", output_extra_tokens=True)
    np.testing.assert_allclose(st.read("val", "frame_emb", 3)[0], emb, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(st.read("val", "cls", 3)[0, :, 1], out["image_intermediates_prefix"][1][:, 0].numpy(),
                               rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(st.read("val", "patch", 3)[0, :, 0], out["image_intermediates"][0].numpy(),
                               rtol=2e-3, atol=2e-3)
    assert label == st.labels("val")[3]


def test_same_request_reuses_and_a_changed_option_makes_a_new_cache(demo_small, tmp_path):
    root = tmp_path / "caches"
    first = run_cli("extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "tiny",
                    "--cache-root", root, "--no-progress", "--text", "none", check=True)
    again = run_cli("extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "tiny",
                    "--cache-root", root, "--no-progress", "--text", "none", check=True)
    assert "reusing cache" in again.stdout and "encoded" not in again.stdout
    assert "encoded" in first.stdout
    run_cli("extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "tiny",
            "--cache-root", root, "--no-progress", "--text", "none", "--frames", "4", check=True)
    caches = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert len(caches) == 2


def test_sigkill_then_rerun_finishes_without_redoing_done_shards(demo_small, reference, tmp_path):
    out = tmp_path / "cache"
    args = demo_args(demo_small, out, "--layers", "all", "--patch", "--shard-size", "2", "--batch-frames", "8",
                     "--workers", "0", "--text", "clip_single,clip_actionclip")
    # a real SIGKILL (sent by the run to itself through the store's fault hook) in the middle of
    # the third shard: its data written, its status not. A poller cannot land a kill between
    # shards that commit within milliseconds of each other on a loaded machine.
    killed = run_cli(*args, env={FAULT_ENV: "after_data:3:sigkill"})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    before = committed(out)
    n_before = sum(map(len, before.values()))
    assert n_before == 2 and not open_store(out).is_complete()
    st = open_store(out)
    for split, shards in before.items():  # what the status calls done really is there
        for k in shards:
            assert (st.status(split)[slice(*st.shard_range(split, k))] == DONE).all()
    # the status chunk of each committed shard (chunks of the status array are shards)
    done_files = {out / split / "status" / "c" / str(k): None for split, shards in before.items() for k in shards}
    done_files = {p: p.stat().st_mtime_ns for p in done_files}
    rerun = run_cli(*args, check=True)
    assert "resuming" in rerun.stdout and f"{n_before} shard(s) already done" in rerun.stdout, rerun.stdout
    st = open_store(out)
    assert st.is_complete()
    for s in st.splits:
        assert set(np.unique(st.status(s))) <= {DONE, FAILED}
    # shards done before the kill were not rewritten
    assert all(p.stat().st_mtime_ns == t for p, t in done_files.items())
    _assert_same_features(st, reference)


def test_bad_videos_fail_with_reasons_and_good_ones_are_right(demo_small, reference, tmp_path):
    root = Path(demo_small.video_root)
    bad = tmp_path / "bad"
    bad.mkdir()
    good_lines = demo_small.val_list.read_text().splitlines()[:4]
    sample = root / good_lines[0].split()[0]
    data = sample.read_bytes()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "notes.mp4").write_text("not a video\n" * 100)
    lst = tmp_path / "mixed.txt"
    lines = [good_lines[0], f"{bad}/truncated.mp4 0", good_lines[1], f"{bad}/empty.mp4 1",
             f"{bad}/notes.mp4 2", f"{bad}/missing.mp4 3", good_lines[2], good_lines[3]]
    lst.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    proc = run_cli("extract", "--dataset", "custom", "--video-root", root, "--train-list", lst,
                   "--classes", demo_small.classes_file, "--model", "tiny", "--layers", "all", "--patch",
                   "--out", out, "--no-progress", "--text", "none", "--shard-size", "3", check=True)
    st = open_store(out)
    status = st.status("train")
    assert status.tolist() == [DONE, FAILED, DONE, FAILED, FAILED, FAILED, DONE, DONE]
    reasons = {Path(f["path"]).name: f["reason"] for f in st.failures("train")}
    assert set(reasons) == {"truncated.mp4", "empty.mp4", "notes.mp4", "missing.mp4"}
    assert "not found" in reasons["missing.mp4"] and "empty" in reasons["empty.mp4"]
    assert "failed" in proc.stdout and "missing.mp4" in proc.stdout
    # the good ones equal the reference cache's val videos 0..3, never substituted
    for row, ref_row in zip([0, 2, 6, 7], [0, 1, 2, 3]):
        for name in ("frame_emb", "cls", "patch"):
            np.testing.assert_allclose(st.read("train", name, row), reference.read("val", name, ref_row),
                                       rtol=2e-3, atol=2e-3)
    assert st.verify() == []


@pytest.mark.parametrize("case", ["malformed", "label", "dataset", "model", "unwritable", "layers"])
def test_user_errors_are_one_line_exit_2_and_leave_nothing(demo_small, tmp_path, case):
    out = tmp_path / "out" / "cache"
    base = ["extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "tiny", "--out", out,
            "--no-progress", "--text", "none"]
    if case in ("malformed", "label"):
        lst = tmp_path / "list.txt"
        first = demo_small.train_list.read_text().splitlines()[0].split()[0]
        lst.write_text(f"{first} 0\n{first}\n" if case == "malformed" else f"{first} 0\n{first} 99\n")
        base = ["extract", "--dataset", "custom", "--video-root", demo_small.video_root, "--train-list", lst,
                "--classes", demo_small.classes_file, "--model", "tiny", "--out", out, "--no-progress"]
    elif case == "dataset":
        base[2] = "kinetics9000"
    elif case == "model":
        base[6] = "ViT-Q-99"
    elif case == "unwritable":
        blocker = tmp_path / "out"
        blocker.write_text("a file where a folder should be")
    elif case == "layers":
        base += ["--layers", "5,7"]
    proc = run_cli(*base)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    expect = {"malformed": "line 2", "label": "99", "dataset": "kinetics9000", "model": "ViT-Q-99",
              "unwritable": "not writable", "layers": "5"}[case]
    assert expect in lines[0]
    assert not out.exists()
    if (tmp_path / "out").is_dir():
        assert not any((tmp_path / "out").iterdir())


def test_two_processes_with_disjoint_shards_equal_one(demo_small, reference, tmp_path):
    out = tmp_path / "cache"
    args = demo_args(demo_small, out, "--layers", "all", "--patch", "--shard-size", "2", "--text",
                     "clip_single,clip_actionclip", "--workers", "0")
    procs = [popen_cli(*args, "--shard", f"{i}/2") for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    st = open_store(out)
    assert st.is_complete() and st.verify() == []
    _assert_same_features(st, reference)
    assert (out / "summary.json").exists()


def test_dry_run_prints_size_and_writes_nothing(demo_small, tmp_path):
    out = tmp_path / "cache"
    proc = run_cli(*demo_args(demo_small, out, "--patch", "--layers", "all", "--dry-run"), check=True)
    assert "total" in proc.stdout and "free" in proc.stdout and "12 videos" in proc.stdout
    assert not out.exists()


def test_int8_cache_is_smaller_and_close(demo_small, reference, tmp_path):
    out = tmp_path / "cache"
    run_cli(*demo_args(demo_small, out, "--layers", "all", "--patch", "--shard-size", "2", "--dtype", "int8",
                       "--text", "clip_single,clip_actionclip"), check=True)
    st = open_store(out)
    x, y = st.read("val", "patch"), reference.read("val", "patch")
    assert np.linalg.norm(x - y) / np.linalg.norm(y) < 0.02
    np.testing.assert_allclose(st.read("val", "frame_emb"), reference.read("val", "frame_emb"), rtol=2e-3, atol=2e-3)


def test_checkpoint_path_round_trips_exactly(demo_small, tmp_path):
    """A checkpoint saved from the same architecture loads through --pretrained PATH unchanged."""
    from stages.backbone import load_clip

    model = load_clip("tiny", seed=7)
    ckpt = tmp_path / "tiny-seed7.pt"
    torch.save(model.state_dict(), ckpt)
    loaded = load_clip("tiny", str(ckpt), seed=0)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    run_cli(*demo_args(demo_small, out_a, "--pretrained", ckpt, "--text", "none"), check=True)
    run_cli(*demo_args(demo_small, out_b, "--init-seed", "7", "--text", "none"), check=True)
    a, b = open_store(out_a), open_store(out_b)
    assert a.key != b.key  # different weight identities (file hash vs seed) key different caches
    np.testing.assert_array_equal(a.read("val", "frame_emb"), b.read("val", "frame_emb"))


def test_cache_cli_ls_info_verify(reference, tmp_path):
    info = run_cli("cache", "info", reference.path, check=True).stdout
    assert "done 12, failed 0, pending 0" in info and "layers    [1, 2]" in info
    ls = run_cli("cache", "ls", reference.path.parent, check=True).stdout
    assert reference.path.name in ls  # whole, though piped (rich cut names at 80 columns)
    missing = run_cli("cache", "ls", tmp_path / "nowhere")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "ok" in run_cli("cache", "verify", reference.path, check=True).stdout
    broken = tmp_path / "broken"
    shutil.copytree(reference.path, broken)
    shutil.rmtree(broken / "val" / "cls" / "c")  # data gone, status still says done
    proc = run_cli("cache", "verify", broken)
    assert proc.returncode == 2 and "failed verification" in proc.stderr


def test_encoder_utilisation_is_measured_and_a_waiting_gpu_is_named(demo_small, tmp_path):
    import dataclasses

    res = extract_in_process(demo_small.root, tmp_path / "cache", workers=1, text="none")
    assert res.videos == 20 and res.device == "cpu" and res.workers == 1
    assert 0 < res.encoder_seconds < res.encode_seconds < res.seconds and 0 < res.encoder_busy < 1
    assert res.waiting_hint() == ""  # on CPU decoding and encoding share the cores: no advice
    gpu = dataclasses.replace(res, device="cuda:0", videos=1000, encode_seconds=10.0, encoder_seconds=4.0, workers=3)
    hint = gpu.waiting_hint()
    assert "busy 40%" in hint and "3 decode worker(s)" in hint and "--workers" in hint
    assert dataclasses.replace(gpu, encoder_seconds=9.0).waiting_hint() == ""


def test_cache_records_the_decoder_and_warnings_of_each_video(demo_small, tmp_path):
    """A video with one corrupt packet is done, and the cache says which reader decoded each
    video and what it warned of; `cache info` shows both."""
    import av

    import framecode as fc

    src = fc.write_video(tmp_path / "src.mp4", "h264", n=50)
    with av.open(str(src)) as c:
        pos, size = [(p.pos, p.size) for p in c.demux(video=0) if p.size][25]
    data = bytearray(src.read_bytes())
    data[pos + size // 4:pos + size] = np.random.default_rng(0).integers(0, 256, size - size // 4, np.uint8).tobytes()
    bad = tmp_path / "one_bad_packet.mp4"
    bad.write_bytes(bytes(data))
    root = Path(demo_small.video_root)
    good = demo_small.val_list.read_text().splitlines()[:2]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([good[0], f"{bad} 1", good[1]]) + "\n")
    out = tmp_path / "cache"
    run_cli("extract", "--dataset", "custom", "--video-root", root, "--train-list", lst,
            "--classes", demo_small.classes_file, "--model", "tiny", "--out", out, "--no-progress",
            "--text", "none", "--shard-size", "2", check=True)
    st = open_store(out)
    assert st.status("train").tolist() == [DONE, DONE, DONE]
    recs = {r["index"]: r for r in st.video_records("train")}
    assert sorted(recs) == [0, 1, 2]
    assert recs[1]["decoder"] == "pyav" and any("corrupt packet" in w for w in recs[1]["warnings"])
    assert recs[0]["decoder"] in ("decord", "pyav") and recs[0]["warnings"] == []
    # the records live in each shard's commit record (checksummed, written before the status chunk)
    assert sorted(p.name for p in (out / "train" / "records").iterdir()) == ["shard-000000.json", "shard-000001.json"]
    assert not st.verify()
    info = run_cli("cache", "info", out, check=True).stdout
    assert "decoded by" in info and "pyav" in info
    assert f"warning {bad}" in info and "corrupt packet" in info
