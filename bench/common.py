"""What every bench script needs, written once: the repository on sys.path, common flags, torch
thread settings, CPU and wall clocks, best-of-repeats timing, the demo world / demo CLIP / caches
the benches build, rich tables, the load average, and RESULTS.md rows.

Benches import the project through its public names only (no ``module._private``, no patching
of module internals); what a bench needs to see of a stage, the stage reports itself (e.g.
``stages.extract.ExtractResult``'s phase timings).

    from bench.common import REPO, base_parser, demo_world, extract_cache, ...

Importing this module sets ``HF_HUB_OFFLINE=1`` (benches never download) and is cheap: torch
and the project's modules are imported inside the helpers that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["REPO", "now", "quiet", "cpu_self", "cpu_children", "torch_threads", "sync", "int_list", "name_list",
           "base_parser", "Best", "best_of", "repeat_until", "load_avg", "load_line", "stamp", "console",
           "make_table", "md_table", "results_header", "mean_spread", "fmt_rate", "secs", "human",
           "demo_world", "demo_clip", "extract_cache", "dir_bytes"]

now = time.perf_counter


def quiet(*_a, **_k) -> None:
    """A ``log=`` callback that prints nothing."""


# ----------------------------------------------------------------------------- clocks and threads
def cpu_self() -> float:
    """CPU seconds of this process (all its threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children() -> float:
    """CPU seconds of this process's finished (joined) children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` for the block, restored after (0: leave as is)."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU) so a wall clock measures it."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- flags
def int_list(text: str, default: Sequence[int] = ()) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; '' -> ``default``."""
    return [int(x) for x in text.split(",") if x.strip()] if text else list(default)


def name_list(text: str, default: Sequence[str] = ()) -> list[str]:
    """'evl, side4video' -> ['evl', 'side4video']; '' -> ``default``."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else list(default)


def base_parser(doc: str | None, workdir: str = "", *, quick: str | None = "smaller sizes, fewer repeats",
                device: str | None = None, threads: bool = False, repeats: bool = False, root: str = "",
                reps: int = 0, keep: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser with the flags the benches share: --quick (help ``quick``; None: no such
    flag), --workdir (default
    ``artifacts/<workdir>``; omitted when ``workdir`` is ''), and on request --device (default
    ``device``), --threads (torch threads, 0 = the bench's default), --repeats (0 = default),
    --root (default ``root``: the bench's folder, relative to the working directory), --reps
    (default ``reps``: repeats, best kept) and --keep (``keep``: what it keeps).
    The description is the docstring's first paragraph; the whole docstring is the epilog."""
    first = (doc or "").strip().split("\n\n")[0]
    ap = argparse.ArgumentParser(description=first, epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if quick is not None:
        ap.add_argument("--quick", action="store_true", help=quick)
    if workdir:
        ap.add_argument("--workdir", default=str(REPO / "artifacts" / workdir),
                        help="data, caches and runs (reused between runs)")
    if root:
        ap.add_argument("--root", default=root, help="data and caches (default: %(default)s)")
    if device is not None:
        ap.add_argument("--device", default=device, help="cpu | cuda | auto")
    if threads:
        ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the bench's default)")
    if repeats:
        ap.add_argument("--repeats", type=int, default=0, help="repeats per measurement, best kept (0: default)")
    if reps:
        ap.add_argument("--reps", type=int, default=reps, help="repeats per measurement, best kept (default: %(default)s)")
    if keep:
        ap.add_argument("--keep", action="store_true", help=keep)
    return ap


# ----------------------------------------------------------------------------- timing
@dataclass
class Best:
    """The best (shortest) of several timed calls, with every time and the last result."""

    seconds: float
    times: list[float]
    result: object = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def best_of(fn: Callable[[], object], repeats: int = 3, warmup: int = 0, device: str = "cpu") -> Best:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (synchronising
    ``device`` after each call); the shortest wall time is kept."""
    for _ in range(warmup):
        fn()
        sync(device)
    times, result = [], None
    for _ in range(max(1, repeats)):
        t = now()
        result = fn()
        sync(device)
        times.append(now() - t)
    return Best(min(times), times, result)


def repeat_until(fn: Callable[[], int], min_s: float, device: str = "cpu") -> tuple[int, float]:
    """Call ``fn`` (which returns a count of work items) until ``min_s`` seconds have gone by, at
    least once; returns (items, seconds), so a fast path is not timed over a few milliseconds."""
    items, t0 = 0, now()
    while True:
        items += fn()
        sync(device)
        if now() - t0 >= min_s:
            return items, now() - t0


# ----------------------------------------------------------------------------- the machine
def load_avg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux
        return (float("nan"),) * 3


def load_line(start: tuple[float, float, float] | None = None, t0: float | None = None) -> str:
    """'load average 1.23 / 1.10 / 0.98 (at start 0.70); bench wall 42s' (parts as given)."""
    a = load_avg()
    text = f"load average {a[0]:.2f} / {a[1]:.2f} / {a[2]:.2f}"
    if start is not None:
        text += f" (at start {start[0]:.2f})"
    if t0 is not None:
        text += f"; bench wall {now() - t0:.0f}s"
    return text


def stamp() -> str:
    """UTC date and time, to the minute, for RESULTS.md."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------- printing
def console(width: int = 160):
    from rich.console import Console

    return Console(width=width, highlight=False)


def make_table(title: str, columns: Iterable[str], rows: Iterable[Sequence] = (), left: Iterable[str] = ()):
    """A rich Table: ``columns`` right-aligned except those named in ``left`` (and the first)."""
    from rich.table import Table

    columns = list(columns)
    left = set(left) | {columns[0]}
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in left else "right")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    return table


def md_table(columns: Sequence[str], rows: Iterable[Sequence]) -> str:
    """The markdown table RESULTS.md quotes."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def results_header(argv: Sequence[str] | None = None, start_load: tuple | None = None) -> str:
    """'command: python bench/x.py --quick; 2026-11-30 11:02 UTC; load average ...' for RESULTS.md."""
    argv = list(sys.argv if argv is None else argv)
    cmd = " ".join([os.path.relpath(os.path.abspath(argv[0]), REPO), *argv[1:]]) if argv else ""
    return f"command: `python {cmd}`; {stamp()}; {load_line(start_load)}; {os.cpu_count()} cores"


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_rate(count: float, seconds: float) -> str:
    """Items per second: thousands separated at 100 and over, one decimal below."""
    r = count / max(seconds, 1e-9)
    return f"{r:,.0f}" if r >= 100 else f"{r:.1f}"


def secs(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def human(n) -> str:
    """Bytes as the project prints them; '-' for None."""
    from cache.files import human_bytes

    return "-" if n is None else human_bytes(n)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- data the benches build
def demo_world(folder: Path, *, train_only: bool = False, **cfg):
    """The synthetic demo world (real h264 videos; ``DemoCfg(**cfg)``) made in ``folder`` (reused
    when already there), loaded as a DatasetSpec; ``train_only``: just its train split."""
    from dataclasses import replace

    from pipeline.datasets import load_dataset
    from pipeline.demo_data import DemoCfg, generate_demo

    ds = generate_demo(Path(folder), DemoCfg(**cfg), progress=False)
    spec = load_dataset("demo", data_root=ds.root)
    return replace(spec, splits={"train": spec.splits["train"]}) if train_only else spec


def demo_clip(path: Path, steps: int, world: str = "rich", tag: str = "bench") -> Path:
    """The small demo CLIP pretrained for ``steps`` steps on the demo world's frames and captions
    (what `make demo` does; reused when ``path`` holds it)."""
    from pipeline.demo_data import render_frame_with_caption
    from stages.pretrain_demo import PretrainCfg, pretrain_demo_clip

    pre = PretrainCfg(model="demo", minutes=0, max_steps=steps, batch_size=128)
    pretrain_demo_clip(Path(path), lambda rng: render_frame_with_caption(rng, size=pre.image_size, world=world),
                       None, pre, progress=False, log=quiet, data_tag=f"demo world={world} ({tag})", threads="auto")
    return Path(path)


def extract_cache(dataset, *, out: Path | None = None, cache_root: Path | None = None, shard=(0, 1),
                  keep_threads: bool = True, **cfg):
    """Stage one through its public API: ``plan_extraction(dataset, ExtractCfg(**cfg))`` +
    ``run_extraction`` (reused when the cache is already complete). Returns (plan, result).
    ``keep_threads``: restore torch's thread count after (the extractor sets it on CPU)."""
    from stages.extract import ExtractCfg, plan_extraction, run_extraction

    plan = plan_extraction(dataset, ExtractCfg(**cfg), out=out, cache_root=cache_root)
    with torch_threads(0) if keep_threads else contextlib.nullcontext():
        result = run_extraction(plan, shard=shard, progress=False, log=quiet)
    return plan, result
