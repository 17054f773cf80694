"""Bad input and failed runs: one line on stderr naming the problem and the fix, the exit status a
shell can act on (2: the request, 1: the run failed), and nothing left behind.

Most cases call the CLI's entry point in this process (no interpreter start-up per case); the
exit status is the SystemExit code `pipeline` would exit with.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cache.store import open_store
from conftest import ROOT, demo_args, run_cli

EXTRACT = ["--model", "tiny", "--no-progress", "--text", "none", "--layers", "last1"]


def _fail(capsys, *args, code: int = 2, with_stdout: bool = False):
    """Run `pipeline args` in-process; assert the exit status and exactly one stderr line; return it
    (and what went to stdout)."""
    from pipeline.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert exc.value.code == code, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return (lines[0], captured.out) if with_stdout else lines[0]


def _ok(capsys, *args) -> str:
    from pipeline.cli import main

    capsys.readouterr()
    main([str(a) for a in args])
    return capsys.readouterr().out


def _extract(ds, out, *extra):
    return ["extract", "--dataset", "demo", "--data-root", ds.root, "--out", out, *EXTRACT, *extra]


def _nothing_in(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# ----------------------------------------------------------------------------- stage one
@pytest.mark.parametrize("flag,value,expect", [
    ("--stride", "0", "--stride must be at least 1"),
    ("--batch-frames", "0", "--batch-frames must be at least 1"),
    ("--shard-size", "-1", "--shard-size must be 0 or more"),
    ("--workers", "-5", "--workers must be 0 or more (-1: auto)"),
    ("--frames", "0", "--frames must be at least 1"),
    ("--init-seed", "-1", "--init-seed must be 0 or more"),
    ("--max-failed", "1.5", "--max-failed must be a fraction in [0, 1]"),
    ("--device", "tpu", "device must be auto, cpu, cuda or cuda:N"),
])
def test_extract_numbers_and_device_are_checked_before_anything_is_written(demo_small, tmp_path, capsys, flag, value,
                                                                           expect):
    out = tmp_path / "out" / "cache"
    line = _fail(capsys, *_extract(demo_small, out, "--sampling", "dense", flag, value))
    assert expect in line
    assert _nothing_in(tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line_for_every_stage(demo_small, tmp_path, capsys, device):
    out = tmp_path / "out"
    assert "no CUDA GPU" in _fail(capsys, *_extract(demo_small, out / "cache", "--device", device))
    ft = ["finetune", "--paradigm", "text4vis", "--dataset", "demo", "--data-root", demo_small.root, "--model", "tiny",
          "--frames", "2", "--epochs", "0", "--no-progress", "--run-dir", out / "ft", "--set", f"device={device}"]
    assert "no CUDA GPU" in _fail(capsys, *ft)
    assert _nothing_in(out)


def test_same_path_twice_with_other_labels_names_both_lines(demo_small, tmp_path, capsys):
    first, second = (ln.split()[0] for ln in demo_small.train_list.read_text().splitlines()[:2])
    lst = tmp_path / "train.txt"
    lst.write_text(f"{first} 0\n{second} 1\n# a comment\n{first} 0\n{first} 2\n")  # the same label again is fine
    out = tmp_path / "out" / "cache"
    line = _fail(capsys, "extract", "--dataset", "custom", "--video-root", demo_small.video_root, "--train-list", lst,
                 "--classes", demo_small.classes_file, "--out", out, *EXTRACT)
    assert "line 5" in line and "line 1" in line and "label 2" in line and "label 0" in line
    assert _nothing_in(tmp_path / "out")


def _broken_list(ds, tmp_path, n_bad: int, n_good: int) -> Path:
    """A custom train list: ``n_bad`` files that are not videos, then ``n_good`` real ones."""
    lines = []
    for i in range(n_bad):
        bad = tmp_path / f"broken{i}.mp4"
        bad.write_bytes(b"not a video at all" * (i + 1))
        lines.append(f"{bad} 0")
    lines += ds.train_list.read_text().splitlines()[:n_good]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst


@pytest.mark.parametrize("case", ["all_failed", "over_max_failed"])
def test_a_run_whose_videos_failed_exits_1_after_its_summary(demo_small, tmp_path, capsys, case):
    n_good = 0 if case == "all_failed" else 3
    lst = _broken_list(demo_small, tmp_path, 2, n_good)
    out = tmp_path / "cache"
    args = ["extract", "--dataset", "custom", "--video-root", demo_small.video_root, "--train-list", lst, "--classes",
            demo_small.classes_file, "--out", out, *EXTRACT, "--workers", "0"]
    if case != "all_failed":
        args += ["--max-failed", "0.3"]  # 2 of 5 failed: 40% (the default, 1.0, lets it pass: test_extract.py)
    line, out_text = _fail(capsys, *args, code=1, with_stdout=True)
    assert ("every video failed (2)" if case == "all_failed" else "2 of 5 videos failed (40.0%") in line
    assert "2 failed" in out_text and out_text.count("  failed [train]") == 2  # the summary came first, on stdout
    # the cache keeps the failures with their reasons (the run's record); asking again says the same
    assert open_store(out).counts("train")["failed"] == 2
    line, out_text = _fail(capsys, *args, code=1, with_stdout=True)
    assert "reusing cache" in out_text


def _unshare_ok() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                           capture_output=True)
    return probe.returncode == 0


FULL_DISK = r"""
set -u
M=$(mktemp -d)
mount -t tmpfs -o size=$SIZE tmpfs "$M"
"$PY" -m pipeline.cli "$@" --out "$M/cache" > "$OUT/first.out" 2> "$OUT/first.err"
echo $? > "$OUT/first.rc"
ls -A "$M" > "$OUT/first.ls"
if [ -d "$M/cache" ]; then cp -r "$M/cache" "$OUT/after_first"; fi
mount -o remount,size=4m "$M"
[ "$RERUN" = 1 ] && "$PY" -m pipeline.cli "$@" --out "$M/cache" > "$OUT/second.out" 2> "$OUT/second.err"
echo $? > "$OUT/second.rc"
if [ -d "$M/cache" ]; then cp -r "$M/cache" "$OUT/cache"; fi
umount "$M"
"""


def _on_small_disk(size: str, args: list, out: Path, rerun: bool = True) -> dict:
    """Run `pipeline args --out <cache on a tmpfs of SIZE>`, then (``rerun``) the same on the disk grown to 4m."""
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PY": sys.executable, "SIZE": size, "OUT": str(out),
           "RERUN": "1" if rerun else "0"}
    subprocess.run(["unshare", "-m", "bash", "-c", FULL_DISK, "full_disk", *map(str, args)], env=env, timeout=600,
                   check=True, cwd=str(ROOT))
    read = lambda name: (out / name).read_text() if (out / name).exists() else ""  # noqa: E731
    return {k: read(k) for k in ("first.rc", "first.err", "first.out", "first.ls", "second.rc", "second.err",
                                 "second.out")}


DISK_ARGS = ["--model", "tiny", "--no-progress", "--text", "clip_single", "--shard-size", "2", "--workers", "1"]
needs_mounts = pytest.mark.skipif(not _unshare_ok(), reason="needs a private mount namespace (unshare -m) to make "
                                                            "a small disk")


@needs_mounts
def test_too_little_disk_is_refused_before_anything_is_written(demo_small, tmp_path):
    # 20 videos x 2.5 KB estimated (the --dry-run figure): a 40k disk cannot hold it
    args = ["extract", "--dataset", "demo", "--data-root", demo_small.root, *DISK_ARGS]
    r = _on_small_disk("40k", args, tmp_path / "small", rerun=False)
    assert r["first.rc"].strip() == "1", r["first.err"]
    err = [ln for ln in r["first.err"].splitlines() if ln.strip()]
    assert len(err) == 1 and "not enough disk space" in err[0] and "needed" in err[0], r["first.err"]
    assert r["first.ls"].strip() == ""  # no cache folder, no lock or building folder


@pytest.mark.slow
@needs_mounts
def test_a_full_disk_mid_run_is_one_line_exit_1_and_the_rerun_resumes(demo_small, tmp_path):
    # the estimate fits in 300k, the files do not (4 KiB blocks, metadata): the disk fills mid-run
    args = ["extract", "--dataset", "demo", "--data-root", demo_small.root, *DISK_ARGS]
    r = _on_small_disk("300k", args, tmp_path / "mid")
    assert r["first.rc"].strip() == "1", r["first.err"]
    err = [ln for ln in r["first.err"].splitlines() if ln.strip()]
    assert len(err) == 1 and "disk full" in err[0] and "rerun the same command" in err[0], r["first.err"]
    after = open_store(tmp_path / "mid" / "after_first")
    done_at_failure = sum(after.counts(s)["done"] for s in after.splits)
    assert not after.is_complete()
    assert r["second.rc"].strip() == "0", r["second.err"]  # the disk grew to 4m: the same command resumes
    if done_at_failure:
        assert "already done" in r["second.out"]
    ref = tmp_path / "ref"
    run_cli(*args, "--out", ref, check=True)
    a, b = open_store(tmp_path / "mid" / "cache"), open_store(ref)
    assert a.is_complete() and a.key == b.key
    for split in a.splits:
        for name in a.specs(split):
            assert (a.read(split, name) == b.read(split, name)).all(), (split, name)


# ----------------------------------------------------------------------------- stage two
@pytest.fixture(scope="module")
def cache(demo_small, tmp_path_factory):
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("bad_input") / "cache"
    main([str(a) for a in demo_args(demo_small, out, "--text", "clip_single", "--layers", "last1")])
    return out


TRAIN = ["--head", "tap", "--no-progress", "--set", "epochs=2", "--set", "batch_size=4"]


@pytest.mark.parametrize("case,expect", [
    ("seed", "seed must be an integer >= 0"),
    ("device", "device must be auto, cpu, cuda or cuda:N"),
    ("resume", "no checkpoint in"),
    ("resume_force", "give one of them"),
])
def test_train_refusals_leave_no_run_folder(cache, tmp_path, capsys, case, expect):
    args = ["train", "--cache", cache, *TRAIN, "--run-dir", tmp_path / "run"]
    args += {"seed": ["--set", "seed=-1"], "device": ["--set", "device=gpu"], "resume": ["--resume"],
             "resume_force": ["--resume", "--force"]}[case]
    assert expect in _fail(capsys, *args)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_is_reused_continued_or_refused_never_silently_overwritten(cache, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--cache", cache, *TRAIN, "--run-dir", run]
    first = _ok(capsys, *args)
    metrics = (run / "metrics.json").read_text()
    stamp = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    # the same command again: the finished run is reused, nothing rewritten
    again = _ok(capsys, *args)
    assert "reused" in again and first.splitlines()[-2] == again.splitlines()[-2]
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamp
    # other settings into the same folder: refused, the folder as it was
    line = _fail(capsys, "train", "--cache", cache, *TRAIN, "--set", "lr=0.01", "--run-dir", run)
    assert "other options (train.lr)" in line and "--force" in line
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamp
    # --force starts over: a new run of the new settings
    _ok(capsys, "train", "--cache", cache, *TRAIN, "--set", "lr=0.01", "--run-dir", run, "--force")
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 0.01
    assert (run / "metrics.json").read_text() != metrics


def test_a_truncated_webdataset_shard_is_one_line(cache, tmp_path, capsys):
    wds = tmp_path / "wds"
    _ok(capsys, "cache", "export", cache, "--out", wds, "--shard-bytes", "4000")
    shards = sorted(wds.glob("*-train-*.tar"))
    assert len(shards) > 1
    with open(shards[1], "r+b") as fh:  # cut inside the first sample's arrays
        fh.truncate(1500)
    header = next(wds.glob("*-header.json"))
    line = _fail(capsys, "train", "--wds", header, *TRAIN, "--run-dir", tmp_path / "run")
    assert shards[1].name in line and "truncated or damaged" in line
    assert not (tmp_path / "run").exists()
    extra = next(wds.glob("*-extra.tar"))
    with open(extra, "r+b") as fh:
        fh.truncate(extra.stat().st_size // 3)
    line = _fail(capsys, "train", "--wds", header, *TRAIN, "--run-dir", tmp_path / "run")
    assert extra.name in line and "truncated or damaged" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,expect", [
    (["--epochs", "-1"], "--epochs must be 0 or more"),
    (["--seeds", "0,-2"], "--seeds must hold integers >= 0"),
    (["--shots", "-1"], "--shots must hold integers >= 0"),
    (["--corr-classes", "-3"], "--corr-classes must be 0 or more"),
])
def test_compare_init_numbers_are_checked(cache, tmp_path, capsys, args, expect):
    assert expect in _fail(capsys, "compare-init", "--cache", cache, "--out", tmp_path / "out", "--no-progress", *args)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- nothing from disk is unpickled
class _RunsCode:
    """Unpickling this creates ``marker`` (open(path, "w")): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(ckpt: Path, marker: Path, base: dict) -> None:
    torch.save({**base, "extra": _RunsCode(marker)}, ckpt)
    assert not marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(cache, demo_small, tmp_path, capsys):
    marker = tmp_path / "ran_code"
    # stage two: a real run, its checkpoint swapped for one carrying the payload
    run = tmp_path / "run"
    args = ["train", "--cache", cache, *TRAIN, "--run-dir", run]
    _ok(capsys, *args)
    good = torch.load(run / "last.pt", weights_only=True)
    _plant(run / "last.pt", marker, good)
    (run / "metrics.json").unlink()  # unfinished: `--resume` must load the checkpoint
    for cmd in (args + ["--resume"], ["evaluate", "--run", run]):
        line = _fail(capsys, *cmd)
        assert "last.pt" in line and "not loaded" in line, line
        assert not marker.exists(), cmd
    # stage three: an evaluation-only run gives the folder its config; then a planted last.pt
    ft_run = tmp_path / "ft"
    ft = ["finetune", "--paradigm", "text4vis", "--dataset", "demo", "--data-root", demo_small.root, "--model", "tiny",
          "--frames", "2", "--epochs", "0", "--no-progress", "--set", "workers=0", "--set", "layers=1", "--set",
          "pos_rows=8", "--run-dir", ft_run]
    _ok(capsys, *ft)
    (ft_run / "metrics.json").unlink()
    _plant(ft_run / "last.pt", marker, {"format": "clipcache-finetune/1", "epoch": 0, "history": "[]"})
    for cmd in (ft + ["--resume"], ["finetune-export", "--run", ft_run, "--out", tmp_path / "x.pt"]):
        line = _fail(capsys, *cmd)
        assert "last.pt" in line and "not loaded" in line, line
        assert not marker.exists(), cmd
    assert not (tmp_path / "x.pt").exists()


def test_a_damaged_checkpoint_is_one_line(cache, tmp_path, capsys):
    run = tmp_path / "run"
    _ok(capsys, "train", "--cache", cache, *TRAIN, "--run-dir", run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    line = _fail(capsys, "evaluate", "--run", run)
    assert "not a readable checkpoint" in line


# ----------------------------------------------------------------------------- stage three
@pytest.mark.parametrize("case,expect", [
    ("workers", "workers must be 0 or more"),
    ("seed", "seed must be an integer >= 0"),
    ("eps", "eps must be > 0"),
    ("resume", "no checkpoint in"),
])
def test_finetune_refusals_leave_no_run_folder(demo_small, tmp_path, capsys, case, expect):
    args = ["finetune", "--paradigm", "text4vis", "--dataset", "demo", "--data-root", demo_small.root, "--model",
            "tiny", "--frames", "2", "--epochs", "1", "--no-progress", "--run-dir", tmp_path / "run"]
    args += {"workers": ["--set", "workers=-5"], "seed": ["--set", "seed=-1"], "eps": ["--set", "eps=0"],
             "resume": ["--resume"]}[case]
    assert expect in _fail(capsys, *args)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the command line itself
def _usage_fail(capsys, *args) -> str:
    """A usage error: exit 2, the usage line and one error line on stderr, no traceback; returns the error line."""
    from pipeline.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert exc.value.code == 2, captured.err
    assert len(lines) == 2 and lines[0].startswith("Usage: ") and lines[1].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[1]


@pytest.mark.parametrize("args,expect", [
    (["trian"], "No such command 'trian'"),
    (["train", "--bogus"], "No such option: --bogus"),
    (["runs", "show"], "Missing argument"),
    (["heads", "--classes", "many"], "Invalid value for '--classes'"),
    (["--bogus"], "No such option: --bogus"),
])
def test_usage_errors_are_the_usage_line_and_one_error_line(capsys, args, expect):
    line = _usage_fail(capsys, *args)
    assert expect in line and "--help" in line, line


@pytest.mark.parametrize("args", [[], ["cache"]])
def test_a_command_without_its_arguments_prints_the_help(args):
    r = run_cli(*args, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "Commands" in r.stdout
    assert r.stderr.strip() == ""


@pytest.fixture(scope="module")
def two_runs(cache, tmp_path_factory) -> Path:
    """A runs folder holding two finished runs, a and b."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("two_runs")
    for name, lr in (("a", "0.001"), ("b", "0.01")):
        main([str(a) for a in ["train", "--cache", cache, *TRAIN, "--set", f"lr={lr}", "--run-dir", root / name]])
    return root


# each `pipeline ARGS` (one per line of stdin) through the real entry point, in one fresh process; after each,
# the top-level modules imported so far
_MODULES_AFTER = """
import shlex, sys
from pipeline.cli import main
for line in sys.stdin:
    try:
        main(shlex.split(line))
    except SystemExit as exc:
        assert not exc.code, (line, exc.code)
    print("MODULES", " ".join(sorted({m.split('.')[0] for m in sys.modules})))
"""


def test_help_and_listing_commands_import_no_torch(cache, two_runs, tmp_path):
    commands = [["--help"], ["cache", "ls", cache.parent], ["cache", "info", cache], ["cache", "verify", cache],
                ["runs", "ls", "--root", two_runs], ["runs", "ls", "--root", two_runs, "--format", "latex"],
                ["runs", "show", "a", "--root", two_runs],
                ["runs", "compare", "a", "b", "--root", two_runs, "--out", tmp_path / "c.png"]]
    r = subprocess.run([sys.executable, "-c", _MODULES_AFTER], capture_output=True, text=True, timeout=120,
                       cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
                       input="".join(" ".join(shlex.quote(str(a)) for a in args) + "\n" for args in commands))
    assert r.returncode == 0, r.stderr
    after = [set(ln.split()[1:]) for ln in r.stdout.splitlines() if ln.startswith("MODULES")]
    assert len(after) == len(commands), r.stdout
    for args, modules in zip(commands, after):
        assert "typer" in modules and not modules & {"torch", "open_clip", "torchvision"}, (args, modules)


def test_heads_numbers_are_checked(capsys):
    assert "--classes must be at least 1, got -5" in _fail(capsys, "heads", "--classes", "-5")
    assert "--frames must be at least 1, got 0" in _fail(capsys, "heads", "--frames", "0")


def test_a_run_dir_that_cannot_be_a_folder_is_one_line(cache, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    line = _fail(capsys, "train", "--cache", cache, *TRAIN, "--run-dir", file)
    assert str(file) in line and "is a file" in line and "--run-dir" in line
    line = _fail(capsys, "train", "--cache", cache, *TRAIN, "--run-dir", file / "run")
    assert str(file) in line and "a file" in line
    assert file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_runs_compare_out_that_cannot_be_a_file_is_one_line(two_runs, tmp_path, capsys):
    root = two_runs
    folder = tmp_path / "plots"
    (folder / "keep").mkdir(parents=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _fail(capsys, "runs", "compare", "a", "b", "--root", root, "--out", folder)
    assert str(folder) in line and "is a folder" in line
    (tmp_path / "file").write_text("x")
    line = _fail(capsys, "runs", "compare", "a", "b", "--root", root, "--out", tmp_path / "file" / "c.png")
    assert "is a file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["file"])  # no .plots.tmp.png
    assert [p.name for p in folder.iterdir()] == ["keep"] and not any((folder / "keep").iterdir())
    assert (tmp_path / "file").read_text() == "x"
    out = _ok(capsys, "runs", "compare", "a", "b", "--root", root, "--out", folder / "c.png")
    assert (folder / "c.png").stat().st_size > 0 and not list(folder.glob(".*"))


READ_ONLY = r"""
M=$(mktemp -d)
mount -t tmpfs -o ro,size=64k tmpfs "$M"
"$PY" -m pipeline.cli train "$@" --run-dir "$M/run" 2> "$OUT/train.err"; echo $? > "$OUT/train.rc"
"$PY" -m pipeline.cli runs compare a b --root "$ROOT_RUNS" --out "$M/c.png" 2> "$OUT/compare.err"
echo $? > "$OUT/compare.rc"
ls -A "$M" > "$OUT/ls"
umount "$M"
"""


@pytest.mark.slow
@needs_mounts
def test_a_read_only_disk_is_one_line(cache, two_runs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PY": sys.executable, "OUT": str(tmp_path),
           "ROOT_RUNS": str(two_runs)}
    subprocess.run(["unshare", "-m", "bash", "-c", READ_ONLY, "read_only", "--cache", str(cache), *TRAIN],
                   env=env, timeout=300, check=True, cwd=str(ROOT))
    for cmd, where in (("train", "run folder"), ("compare", "plot")):
        err = (tmp_path / f"{cmd}.err").read_text()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert (tmp_path / f"{cmd}.rc").read_text().strip() == "2", err
        assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], err
        assert "Read-only file system" in lines[0] or "read-only" in lines[0]
    assert (tmp_path / "ls").read_text().strip() == ""


# ----------------------------------------------------------------------------- a video root with symlink loops
class _TooLong(BaseException):
    pass


def test_extract_dry_run_ends_through_symlink_loops_in_the_video_root(demo_small, tmp_path, capsys):
    import signal

    root = tmp_path / "k400"
    videos = sorted(demo_small.video_root.rglob("*.mp4"))[:2]
    (root / "videos" / "a").mkdir(parents=True)
    (root / "videos" / "b").mkdir()
    shutil.copy(videos[0], root / "videos" / "a" / "abc_000000_000010.mp4")
    shutil.copy(videos[1], root / "videos" / "b" / "def_000000_000010.mp4")
    (root / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                    "abseiling,abc,0,10,train\nzumba,def,0,10,train\n")
    os.symlink(".", root / "videos" / "self")
    os.symlink("..", root / "videos" / "a" / "up")
    os.symlink("../a", root / "videos" / "b" / "to_a")

    def too_long(signum, frame):
        raise _TooLong()

    old = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(30)  # before the fix the walk went on for minutes (2^40 paths through the loops)
    try:
        out = _ok(capsys, "extract", "--dataset", "k400", "--data-root", root, "--model", "tiny", "--dry-run",
                  "--out", tmp_path / "cache")
    except _TooLong:
        pytest.fail("extract --dry-run still walking the video root after 30 s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "train  2 videos" in out
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- messages that say what happened
def test_a_pretrained_pickle_is_refused_in_words_not_torchs_advice(demo_small, tmp_path, capsys):
    marker, ckpt = tmp_path / "ran_code", tmp_path / "weights.pt"
    _plant(ckpt, marker, {"state_dict": {"w": torch.zeros(1)}})
    line = _fail(capsys, *_extract(demo_small, tmp_path / "cache", "--pretrained", ckpt, "--dry-run"))
    assert str(ckpt) in line and "refused" in line and "could run code" in line, line
    assert "safetensors" in line and "state dict" in line and "weights_only" not in line, line
    assert not marker.exists() and not (tmp_path / "cache").exists()


def test_a_moved_run_folder_reports_where_it_is_now(cache, tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "moved" / "run"
    args = ["train", "--cache", cache, *TRAIN]
    _ok(capsys, *args, "--run-dir", old)
    new.parent.mkdir()
    shutil.move(old, new)
    out = _ok(capsys, *args, "--run-dir", new)
    assert "reused" in out and out.splitlines()[-1] == f"run folder: {new}", out
    shown = json.loads(_ok(capsys, "runs", "show", new, "--json"))
    assert shown["path"] == str(new) and shown["metrics"]["run_dir"] == str(new)
    assert str(old) not in _ok(capsys, "runs", "ls", "--root", new.parent, "--format", "json")


def test_an_undecodable_video_is_described_in_words_not_an_error_number(tmp_path):
    from cache.errors import VideoDecodeError
    from stages.video import SamplingCfg, decode_clips

    bad = tmp_path / "noise.mp4"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(VideoDecodeError) as exc:
        decode_clips(str(bad), SamplingCfg(frames=2))
    assert "Invalid data found when processing input" in str(exc.value)
    assert "Errno" not in str(exc.value) and "1094995529" not in str(exc.value)


def test_cache_ls_lists_a_damaged_cache_as_damaged(cache, tmp_path, capsys):
    root = tmp_path / "caches"
    for name in ("good", "broken", "no_meta"):
        shutil.copytree(cache, root / name)
    (root / "broken" / "zarr.json").write_text("{not json")
    (root / "no_meta" / "zarr.json").unlink()
    out = _ok(capsys, "cache", "ls", root)
    rows = {ln.split("│")[1].strip(): ln for ln in out.splitlines() if ln.startswith("│")}
    assert set(rows) == {"good", "broken", "no_meta"}, out
    assert "DAMAGED" in rows["broken"] and "DAMAGED" in rows["no_meta"] and "DAMAGED" not in rows["good"]
    said = [ln for ln in out.splitlines() if ln.startswith("damaged ")]
    assert len(said) == 2 and "broken" in said[0] and "zarr.json" in said[0] and "no_meta" in said[1], out


def test_extract_leaves_nothing_beside_its_out_folder(cache):
    # the module's cache was made with --out: no lock file, no latest-cache marker beside it
    assert sorted(p.name for p in cache.parent.iterdir()) == ["cache"]


def test_a_keyed_cache_is_the_latest_of_its_cache_root(demo_small, tmp_path, capsys):
    root = tmp_path / "caches"
    _ok(capsys, "extract", "--dataset", "demo", "--data-root", demo_small.root, "--cache-root", root, *EXTRACT)
    made = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert len(made) == 1 and sorted(p.name for p in root.iterdir()) == [".latest-demo", made[0].name]
    out = _ok(capsys, "train", "--cache-root", root, *TRAIN, "--run-dir", tmp_path / "run")
    assert f"cache: {made[0].resolve()}" in out


def test_concurrent_creators_exclude_each_other_and_leave_no_lock(tmp_path):
    import threading
    import time

    from cache.files import creation_lock as _creation_lock

    target, inside, log = tmp_path / "cache", [], []

    def creator(i):
        with _creation_lock(target):
            inside.append(i)
            log.append(len(inside))  # how many hold the lock at once
            time.sleep(0.05)
            inside.remove(i)

    threads = [threading.Thread(target=creator, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert log == [1] * 6
    assert list(tmp_path.iterdir()) == []
