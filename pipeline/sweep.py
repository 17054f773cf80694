"""`pipeline sweep`: many stage-two runs on one cache (a grid or a random sample over settings,
heads and seeds), run as parallel `pipeline train` processes, folded into one mean +- std table.

Why processes running the user's own command rather than threads or an in-process loop:
- each run is exactly what `pipeline train` with those flags gives (the same precedence, the
  same run folder, the same identity), so a run a sweep made is reused by a later `train` and
  the other way round, and `--print-commands` hands a scheduler the very commands a local sweep runs;
- a run that fails (a bad value, a crash, out of memory) fails alone, with its own log;
- N processes with 1/N of the cores each use a multi-core box fully where one head's small
  steps do not (torch's threads stall on a busy box), and one process per GPU uses every GPU.

A sweep's folder (``artifacts/sweeps/<cache>-<digest of its fixed settings>``, or ``--out``)
holds runs/<name>/ (the run folders), logs/<name>.log, results.csv (one row per run),
summary.csv and summary.md (one row per setting, seeds folded into mean +- std). Rerunning
the same sweep reuses every finished run (`train` returns it as is) and resumes a stopped one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cache.errors import ConfigError

__all__ = ["SweepRun", "Slot", "parse_grid", "plan_sweep", "run_commands", "gather", "summarise", "mean_std",
           "sweep_table_md", "sweep_table", "write_tables", "default_jobs", "METRICS", "Stopped"]

METRICS = ("top1", "top5", "mean_class")
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass
class SweepRun:
    """One run of a sweep: a head, the swept values, a seed; ``argv`` is its `pipeline train` command
    (without the program name)."""

    name: str
    head: str
    values: dict[str, str]
    seed: int
    argv: list[str]
    run_dir: Path | None

    @property
    def setting(self) -> tuple:
        return (self.head, tuple(sorted(self.values.items())))


@dataclass
class Slot:
    """What one process of the pool gets: its environment (threads, the GPU it may see)."""

    env: dict[str, str] = field(default_factory=dict)


def _split_values(text: str, what: str) -> list[str]:
    """``a,b,c`` -> [a, b, c]; a JSON list (``["0-5,8", "0-3"]``) for values that hold commas."""
    text = text.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{what}: {text!r} is not a JSON list ({exc})") from None
        if not isinstance(values, list):
            raise ConfigError(f"{what}: {text!r} is not a JSON list")
        out = [json.dumps(v) if isinstance(v, (dict, list)) else _text(v) for v in values]
    else:
        out = [v.strip() for v in text.split(",")]
    if not out or any(v == "" for v in out):
        raise ConfigError(f"{what}: empty value in {text!r} (values are separated by commas)")
    if len(set(out)) != len(out):
        raise ConfigError(f"{what}: a value is given twice in {text!r}")
    return out


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def parse_grid(sets: list[str], grid_file: dict | None = None) -> dict[str, list[str]]:
    """``--set key=v1,v2`` pairs (and an experiment file's {key: value or list}) -> {key: [values]}.
    A key given once with one value is fixed; with several it is swept. --set wins over the file."""
    grid: dict[str, list[str]] = {}
    for key, value in (grid_file or {}).items():
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ConfigError(f"grid file: '{key}' has an empty list")
        grid[str(key)] = [json.dumps(v) if isinstance(v, (dict, list)) else _text(v) for v in values]
    for pair in sets:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value or key=v1,v2,...")
        grid[key] = _split_values(value, f"--set {key}")
    for key in ("head", "seed", "run_dir", "cache"):
        if key in grid:
            raise ConfigError(f"'{key}' is set by the sweep itself: use --head / --seeds, not --set {key}=...")
    return grid


def _name(head: str, values: dict[str, str], seed: int) -> str:
    parts = [head] + [f"{k}={v}" for k, v in values.items()] + [f"seed{seed}"]
    name = _SAFE.sub("_", "-".join(parts))
    if len(name) > 120:  # long values: keep it readable and unique
        digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]
        name = f"{name[:100]}-{digest}"
    return name


def plan_sweep(heads: list[str], grid: dict[str, list[str]], seeds: list[int], base_argv: list[str], out_dir: Path,
               sample: int = 0, sample_seed: int = 0) -> list[SweepRun]:
    """Every (head, swept values, seed) as a `pipeline train` command; ``sample`` > 0 draws that many
    settings (head x values) at random (``sample_seed``), each with every seed."""
    if not heads:
        raise ConfigError("no head given: pass --head NAME[,NAME...] (see `pipeline heads`)")
    if len(set(heads)) != len(heads):
        raise ConfigError(f"--head: a head is given twice in {','.join(heads)}")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: a seed is given twice in {seeds}")
    fixed = [f"{k}={v[0]}" for k, v in grid.items() if len(v) == 1]  # the same for every run: not in the names
    keys = [k for k, v in grid.items() if len(v) > 1]
    settings = [(h, dict(zip(keys, combo))) for h in heads for combo in itertools.product(*(grid[k] for k in keys))]
    if sample < 0:
        raise ConfigError(f"--sample must be >= 0 (0: the whole grid), got {sample}")
    if sample and sample < len(settings):
        settings = sorted(random.Random(sample_seed).sample(settings, sample), key=settings.index)
    runs = []
    for head, values in settings:
        for seed in seeds:
            name = _name(head, values, seed)
            run_dir = out_dir / "runs" / name
            argv = ["train", "--head", head, *base_argv, "--set", f"seed={seed}"]
            for k, v in [kv.split("=", 1) for kv in fixed] + list(values.items()):
                argv += ["--set", f"{k}={v}"]
            argv += ["--run-dir", str(run_dir), "--no-progress"]
            runs.append(SweepRun(name, head, values, seed, argv, run_dir))
    return runs


def default_jobs(gpus: int) -> int:
    """One process per GPU; on CPU one per core (each on one thread)."""
    return gpus if gpus else max(1, os.cpu_count() or 1)


def slots(jobs: int, gpus: int) -> list[Slot]:
    """Environments for ``jobs`` processes: the cores split evenly (OMP_NUM_THREADS, which sets
    torch's intra-op threads without entering the run's identity), GPUs dealt round-robin."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    out = []
    for i in range(jobs):
        env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(threads)}
        if gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(g) for g in range(gpus)]
            env["CUDA_VISIBLE_DEVICES"] = ids[i % len(ids)]
        out.append(Slot(env))
    return out


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _named_run_dir(log: Path) -> Path | None:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("run folder: ")]
    return Path(lines[-1].removeprefix("run folder: ").strip()) if lines else None


def _last_error(log: Path) -> str:
    """The line a failed `pipeline train` ended with (its `error: ...`), else the log's last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(empty log)"])[-1]


class Stopped(Exception):
    """``run_commands`` was asked to stop (its caller's thread was interrupted)."""


def run_commands(runs: list[SweepRun], jobs: int, program: list[str], log_dir: Path, log=print,
                 gpus: int = 0, env: dict | None = None, stop=None, shared: bool = False) -> dict[str, dict]:
    """Run each command in a pool of ``jobs`` processes; {name: {"rc", "seconds", "log", "error"}}.

    A run that ends with exit 2 (a usage or config error: every run would repeat it) stops the
    sweep from starting more. A stop (Ctrl-C / SIGTERM, raised here as pipeline.signals'
    ``Interrupted``) is passed on to the running children, which checkpoint and exit; the
    sweep then waits for them, so rerunning it resumes every run. ``stop``: a threading.Event
    that does the same when this runs in a thread of its own (signals reach the main thread only).
    ``env``: added to every child's environment. A run without a ``run_dir`` gets the folder its
    `pipeline train` named (its "run folder: ..." line). ``shared``: ``runs`` is a work list that
    other threads calling this too take runs from (each run starts once, in whichever caller has a
    free slot first; the result holds the runs this caller ran).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = slots(jobs, gpus)
    free = list(range(len(pool)))
    total = len(runs)
    todo = runs if shared else list(runs)
    running: dict[int, tuple[subprocess.Popen, SweepRun, float, object]] = {}
    out: dict[str, dict] = {}
    before: dict[str, float | None] = {}
    stop_starting = False
    try:
        while todo or running:
            while todo and free and not stop_starting:
                try:
                    run = todo.pop(0)  # atomic: another caller sharing the list may have emptied it
                except IndexError:
                    break
                slot = free.pop(0)
                path = log_dir / f"{run.name}.log"
                fh = open(path, "w")
                child_env = {**os.environ, **pool[slot].env, **(env or {})}
                before[run.name] = _mtime(run.run_dir / "metrics.json") if run.run_dir else None
                proc = subprocess.Popen([*program, *run.argv], stdout=fh, stderr=subprocess.STDOUT, env=child_env)
                running[slot] = (proc, run, time.perf_counter(), fh)
            if not running:
                break
            time.sleep(0.2)
            if stop is not None and stop.is_set():
                raise Stopped()
            for slot, (proc, run, t0, fh) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                fh.close()
                del running[slot]
                free.append(slot)
                path = log_dir / f"{run.name}.log"
                if run.run_dir is None and rc == 0:
                    run.run_dir = _named_run_dir(path)
                seconds = time.perf_counter() - t0
                reused = rc == 0 and before[run.name] is not None and \
                    _mtime(run.run_dir / "metrics.json") == before[run.name]
                out[run.name] = {"rc": rc, "seconds": seconds, "log": str(path), "reused": reused,
                                 "error": _last_error(path) if rc else ""}
                done = f"[{len(out)}/{total}] " if not shared else ""
                state = ("reused (finished before)" if reused else f"ok ({seconds:.1f}s)") if rc == 0 else \
                    f"FAILED (exit {rc}): {out[run.name]['error']}"
                log(f"{done}{run.name}: {state}")
                if rc == 2 and not stop_starting:
                    stop_starting = True
                    log(f"a usage/config error: starting no more runs ({len(todo)} not started)")
        for run in todo if not shared else ():  # shared: another caller may still start them
            out[run.name] = {"rc": None, "seconds": 0.0, "log": "", "reused": False, "error": "not started"}
        return out
    finally:
        for proc, run, _, fh in running.values():  # a stop (or a crash here): the children stop too
            if proc.poll() is None:
                proc.send_signal(2)  # SIGINT: `pipeline train` checkpoints and exits 130
        for proc, run, _, fh in running.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            fh.close()


def gather(runs: list[SweepRun]) -> list[dict]:
    """One row per run from its run folder (finished runs only carry metrics)."""
    from stages.runs import finished_metrics

    rows = []
    for run in runs:
        m = finished_metrics(run.run_dir)
        state = "done" if m else "missing"
        if m and not _is_this_run(run):  # e.g. --gather over folders a scheduler filled with other settings
            m, state = None, "other settings"
        row = {"head": run.head, **run.values, "seed": run.seed, "state": state}
        if m:
            row.update({k: float(m["final"][k]) for k in METRICS if k in m["final"]})
            row.update({"trainable_params": m.get("trainable_params"), "seconds": round(float(m.get("seconds", 0)), 2),
                        "epochs": len(m.get("history") or [])})
        row["run_dir"] = str(run.run_dir)
        rows.append(row)
    return rows


def _same(given: str, recorded) -> bool:
    try:
        return float(given) == float(recorded)
    except (TypeError, ValueError):
        return str(given).lower() == str(recorded).lower()


def _is_this_run(run: SweepRun) -> bool:
    """Whether the run folder's config.json is this run's: its head, seed and swept values (a value
    compared as a number where both read as one: "3e-4" is 0.0003)."""
    try:
        config = json.loads((Path(run.run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    train, head = config.get("train") or {}, config.get("head") or {}
    if head.get("name") != run.head or train.get("seed") != run.seed:
        return False
    for key, value in run.values.items():
        section = train if key in train else head
        if key in section and not _same(value, section[key]):
            return False
    return True


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    if not n:
        return float("nan"), float("nan")
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std


def summarise(runs: list[SweepRun], rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Seeds folded: one row per (head, swept values) in grid order; (swept keys, rows)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.values))
    order = list(dict.fromkeys(r.setting for r in runs))
    by_setting: dict[tuple, list[dict]] = {s: [] for s in order}
    for run, row in zip(runs, rows):
        by_setting[run.setting].append(row)
    out = []
    for (head, values), group in by_setting.items():
        done = [r for r in group if r["state"] == "done"]
        entry = {"head": head, **dict(values), "seeds": len(done), "of": len(group)}
        for m in METRICS:
            entry[f"{m}_mean"], entry[f"{m}_std"] = mean_std([r[m] for r in done if m in r])
        entry["seconds_mean"] = mean_std([r["seconds"] for r in done])[0]
        entry["trainable_params"] = done[0].get("trainable_params") if done else None
        out.append(entry)
    return keys, out


def _pm(mean: float, std: float) -> str:
    return "-" if mean != mean else f"{mean:.1f} +- {std:.1f}"


def sweep_table_md(keys: list[str], summary: list[dict], title: str) -> str:
    """The summary as a markdown table: head, the swept values, top-1 / top-5 / mean-class mean +- std."""
    cols = ["head", *keys, "seeds", "top-1 %", "top-5 %", "mean-class %", "trainable", "s / run"]
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for e in summary:
        cells = [e["head"], *(str(e.get(k, "")) for k in keys), f"{e['seeds']}/{e['of']}",
                 *(_pm(e[f"{m}_mean"], e[f"{m}_std"]) for m in METRICS),
                 f"{e['trainable_params']:,}" if e["trainable_params"] is not None else "-",
                 "-" if e["seconds_mean"] != e["seconds_mean"] else f"{e['seconds_mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_table(keys: list[str], summary: list[dict], title: str):
    """The summary as a rich Table (what the terminal shows; summary.md holds the same cells)."""
    from rich.table import Table

    lines = sweep_table_md(keys, summary, title).splitlines()
    table = Table(*[c.strip() for c in lines[2].strip("|").split("|")], title=title)
    for line in lines[4:]:
        table.add_row(*[c.strip() for c in line.strip("|").split("|")])
    return table


def _csv(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_tables(out_dir: Path, rows: list[dict], keys: list[str], summary: list[dict], title: str) -> dict[str, Path]:
    from cache.files import atomic_write_text

    files = {"results": out_dir / "results.csv", "summary_csv": out_dir / "summary.csv",
             "summary_md": out_dir / "summary.md"}
    atomic_write_text(files["results"], _csv(rows))
    atomic_write_text(files["summary_csv"], _csv(summary))
    atomic_write_text(files["summary_md"], sweep_table_md(keys, summary, title))
    return files


def sweep_dir(cache_name: str, heads: list[str], grid: dict, seeds: list[int], base_argv: list[str],
              config_digest: str = "") -> Path:
    """The default folder of a sweep: one per cache and settings, so rerunning it finds its runs
    (``config_digest``: of the --config file's contents, so an edited file is another sweep)."""
    from cache.paths import artifacts_root

    spec = {"heads": heads, "grid": grid, "seeds": seeds, "base": base_argv}
    if config_digest:
        spec["config"] = config_digest
    spec = json.dumps(spec, sort_keys=True)
    return artifacts_root() / "sweeps" / f"{_SAFE.sub('_', cache_name)}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def program() -> list[str]:
    """How to start `pipeline` from here: this interpreter running the console script's entry point
    (the same code whether or not the script is on PATH)."""
    return [sys.executable, "-m", "pipeline.entry"]


def command_line(run: SweepRun) -> str:
    return shlex.join(["pipeline", *run.argv])
