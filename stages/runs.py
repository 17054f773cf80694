"""Run folders as records: a status file, TensorBoard events, and reading a folder back.

Every run folder (stage two and stage three) holds config.json, last.pt, metrics.json and
curves.png. This module is the bookkeeping both stages share, beside each other rather than one on
the other: where run folders go (``default_runs_root``), what a folder already holding a run
means (``existing_run``, ``check_resumable``, ``remove_unstarted``), the optimiser parts
(``param_groups``, ``lr_factor``), mixed precision (``autocast_dtype``, ``autocast``) and the curves
(``plot_curves``), and the resolved config as an experiment file that runs it again
(``experiment_record``, ``write_experiment``: config.yaml); checkpoints themselves are
stages/checkpoint.py. It also adds what a table of many runs needs:

    status.json        {"state": running | finished | failed | interrupted, "pid", "host",
                        "started", "updated", "epoch", "epochs", "reason"?}
    events.out.tfevents.*   TensorBoard scalars per epoch (train/loss, train/lr, val/top1,
                        val/top5, val/mean_class) and the resolved config as text

A run whose status says "running" but whose process is gone (killed, machine rebooted) reads
back as "stopped": it can be resumed with --resume. Folders written before status.json
existed are read from what they hold (metrics.json: finished; a checkpoint only: stopped).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.errors import ConfigError, TrainingError
from cache.files import atomic_write_text
from cache.paths import artifacts_root
from stages.config import validate_choice

__all__ = ["RunLog", "RunRecord", "read_run", "list_runs", "default_runs_root", "entry_metrics", "RUN_STATES",
           "RESUME_FREE", "check_resumable", "existing_run", "finished_metrics", "remove_unstarted", "AMP_CHOICES", "autocast_dtype",
           "autocast", "lr_factor", "param_groups", "plot_curves", "settle_run", "make_run_dir", "check_finite_weights",
           "step_overflow_stops", "experiment_record", "write_experiment", "OUTPUT_FILES"]

# What a finished run keeps beside last.pt and metrics.json (stages/run_outputs.py writes them)
OUTPUT_FILES = ("best.pt", "per_class.csv", "confusion.csv", "confusion.png", "predictions.csv")

RUN_STATES = ("running", "finished", "failed", "interrupted", "stopped", "corrupt")


def entry_metrics(entry: dict) -> dict:
    """The validation metrics of one history entry ({"val": {...}}, or flat "val_top1" keys)."""
    if entry.get("val"):
        return dict(entry["val"])
    return {k[4:]: v for k, v in entry.items() if k.startswith("val_")}


def default_runs_root() -> Path:
    """Where run folders go by default: $CLIPCACHE_ROOT/runs (artifacts/runs)."""
    return artifacts_root() / "runs"


# --------------------------------------------------------------------------- a run folder's fate
# a resumed run may change these ("recipe" only names the preset the values came from: the values are compared)
RESUME_FREE = {"device", "workers", "eval_batch_size", "eval_every", "cache", "recipe", "preload", "sources",
               "verify_reads"}
# options added after runs were written: a checkpoint without one was made with its default
ADDED_LATER = {"shuffle": "full", "threads": 0, "repeat_shots": "auto", "online": False, "online_aug": "paper"}


def check_resumable(old: dict, new: dict, path: Path, fix: str = "use another --run-dir or drop --resume") -> None:
    """Refuse to resume a checkpoint written with other options (RESUME_FREE aside), one line."""
    diff = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if section in RESUME_FREE:  # e.g. "sources": where the values came from, not what they are
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{section}.{k}" for k in sorted(set(a) | set(b))
                     if k not in RESUME_FREE and a.get(k, ADDED_LATER.get(k)) != b.get(k, ADDED_LATER.get(k))]
        elif section not in RESUME_FREE and a != b:
            diff.append(section)
    if diff:
        raise ConfigError(f"{path} was written by a run with other options ({', '.join(diff)}); {fix}")


def finished_metrics(run_dir: str | Path) -> dict | None:
    """A run folder's metrics.json when it is a finished run's (it holds "final"), else None: a
    running or stopped run writes one after every evaluated epoch too, with "final" null."""
    try:
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("final") is not None else None


def _identity(resolved: dict) -> dict:
    """A resolved config less what does not make the run another: where its values came from, and
    the cache's path (its key says what it holds: `make demo` names it relative, `train --dataset`
    absolute)."""
    return {k: v for k, v in resolved.items() if k not in ("sources", "cache")}


def existing_run(run_dir: Path, resolved: dict, resume: bool, force: bool,
                 sections: tuple[str, ...] | None = None) -> tuple[str, str]:
    """What to do with what ``run_dir`` already holds: ("fresh" | "resume" | "reuse" | "error", message).

    Rerunning the same command continues an unfinished run of the same settings from its last
    checkpoint (so an interrupted run resumes) and reuses a finished one (its results are kept,
    not silently retrained); a run of other settings is never overwritten without ``force``;
    ``resume`` with nothing to resume is refused. ``resolved`` as written to config.json;
    ``sections``: only these sections of it must match to resume (stage three: the process
    count and paths may change), all of them when None.
    """
    ckpt, metrics, config = run_dir / "last.pt", run_dir / "metrics.json", run_dir / "config.json"
    if force:
        if resume:
            return "error", "--resume continues a run and --force starts it again: give one of them"
        return "fresh", ""
    if not (ckpt.exists() or metrics.exists()):
        if resume:
            return "error", f"--resume: no checkpoint in {run_dir} to continue from; drop --resume to start the run"
        return "fresh", ""
    try:
        old = json.loads(config.read_text())
    except (OSError, ValueError):
        return "error", (f"run folder {run_dir} holds a run whose config.json is missing or unreadable; "
                         "use another --run-dir, or --force to replace it")
    new = json.loads(json.dumps(resolved))
    if finished_metrics(run_dir) is not None and _identity(old) == _identity(new):
        return "reuse", ""
    if sections is not None:
        old, new = {k: old.get(k) for k in sections}, {k: new[k] for k in sections}
    check_resumable(old, new, ckpt if ckpt.exists() else metrics,
                    "drop --resume or use another --run-dir" if resume else
                    "use another --run-dir, or --force to replace it")
    return ("resume", "") if ckpt.exists() else ("fresh", "")


def settle_run(run_dir: Path, resolved: dict, resume: bool, force: bool, ctx, log,
               sections: tuple[str, ...] | None = None) -> tuple[str, dict | None]:
    """``existing_run`` for every rank of a job: rank 0 decides before anyone writes and the
    others follow (``ctx``: a stages.dist.DistContext). Returns ("fresh" | "resume", None), or
    ("reuse", the finished run's metrics.json) after saying so; a refusal is one ConfigError on
    every rank."""
    decision = ("fresh", "")
    if ctx.main:
        try:
            decision = existing_run(run_dir, resolved, resume, force, sections)
        except ConfigError as exc:
            decision = ("error", str(exc))
    action, message = ctx.all_objects(decision)[0]
    if action == "error":
        raise ConfigError(message)
    if action == "reuse":
        log(f"run folder {run_dir} already holds this finished run: its results are reused "
            "(--force trains it again)")
        # where the folder is now: metrics.json records where it was written (it may have been moved since)
        return action, {**json.loads((run_dir / "metrics.json").read_text()), "run_dir": str(run_dir)}
    return action, None


def make_run_dir(run_dir: Path) -> None:
    """Create the run folder (its parents too), or say in one line why it cannot be one: a file in
    the way, a read-only disk, no permission (a full disk stays the CLI's "disk full" line)."""
    run_dir = Path(run_dir)
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == run_dir else f"lies under {blocker}, a file"
        raise ConfigError(f"run folder {run_dir} {where}, not a folder: pass another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ConfigError(f"cannot create the run folder {run_dir}: {exc.strerror or exc}; pass a --run-dir on a "
                          "writable disk") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(run_dir).f_flag & os.ST_RDONLY else "permission denied"
        raise ConfigError(f"cannot write in the run folder {run_dir} ({why}): pass a --run-dir on a writable disk")


def remove_unstarted(run_dir: Path) -> None:
    """A run folder this call created and that holds nothing to resume or keep (no checkpoint,
    no metrics) is removed when the run fails, so a refused run leaves no folder behind."""
    if not any((run_dir / name).exists() for name in ("last.pt", "metrics.json")):
        shutil.rmtree(run_dir, ignore_errors=True)


# --------------------------------------------------------------------------- optimiser and precision
AMP_CHOICES = ("auto", "none", "bf16", "fp16")


def autocast_dtype(cfg, device):
    """Autocast dtype of ``cfg.amp`` on ``device``: "auto" is off on CPU, bf16 on GPUs that support
    it, fp16 (with a GradScaler in the trainers) on older ones; None means no autocast."""
    import torch

    validate_choice("amp", cfg.amp, AMP_CHOICES)
    if cfg.amp == "none" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def autocast(device, dtype):
    """torch.autocast on ``device`` with ``dtype``; nothing when ``dtype`` is None."""
    if dtype is None:
        yield
    else:
        import torch

        with torch.autocast(device.type, dtype=dtype):
            yield


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The lr schedule of both stages, per optimiser step: linear warmup over ``warmup`` steps,
    then cosine from 1 to 0 over the rest of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@contextlib.contextmanager
def step_overflow_stops(where: str):
    """Around an optimiser step: torch's unfused AdamW raises a RuntimeError ("value cannot be
    converted to type float without overflow") when lr / (1 - beta1**step) or lr * weight_decay
    leaves float32; that is a learning rate too large, said as a TrainingError like any other."""
    try:
        yield
    except RuntimeError as exc:
        if "without overflow" not in str(exc):
            raise
        raise TrainingError(f"training stopped: the optimiser step at {where} overflows float32 (the learning rate "
                            "is too large for AdamW's update); lower the learning rate (--set lr=...)") from None


def check_finite_weights(named: list, where: str) -> None:
    """After an optimiser step: a TrainingError naming the first trainable weight that holds NaN/inf
    (a step too large for the weights, e.g. --set lr=1e38), as a non-finite loss stops the run.
    One fused norm over every tensor and one sync per step (stages two and three alike); a norm
    that overflows on finite weights is checked exactly before anything is said."""
    import torch

    if not named:
        return
    norms = torch._foreach_norm([p.detach() for _, p in named])
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return
    for name, p in named:
        if not bool(torch.isfinite(p.detach()).all()):
            raise TrainingError(f"training stopped: weight '{name}' holds NaN/inf after the optimiser step at {where}; "
                                "lower the learning rate (--set lr=...) or clip gradients (--set grad_clip=...)")


def _no_decay_by_dim(name: str, p) -> bool:
    return p.dim() < 2


def param_groups(named: list, lr: float | None, weight_decay: float, decay_all: bool, name: str = "params",
                 no_decay=_no_decay_by_dim, keep_empty: bool = False) -> list[dict]:
    """AdamW parameter groups of the trainable tensors of ``named`` ((name, tensor) pairs): decay on
    every one (``decay_all``: the papers' recipes, biases and norms included), or a decay group and
    a no-decay group for those ``no_decay(name, tensor)`` picks (default: tensors of dim < 2).
    ``lr`` None leaves the optimiser's own lr to the groups; empty groups are left out unless
    ``keep_empty`` (stage two's optimiser state always holds both groups)."""
    trainable = [(n, p) for n, p in named if p.requires_grad]
    extra = {} if lr is None else {"lr": lr}
    if decay_all:
        return [{"params": [p for _, p in trainable], **extra, "weight_decay": weight_decay, "name": name}] \
            if trainable or keep_empty else []
    decay = [p for n, p in trainable if not no_decay(n, p)]
    rest = [p for n, p in trainable if no_decay(n, p)]
    out = []
    if decay or keep_empty:
        out.append({"params": decay, **extra, "weight_decay": weight_decay, "name": name})
    if rest or keep_empty:
        out.append({"params": rest, **extra, "weight_decay": 0.0, "name": f"{name}.no_decay"})
    return out


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """curves.png of a run: train loss and val top-1 per epoch, written atomically. Drawn on a bare
    Agg canvas with fixed margins (pyplot's figure manager and tight_layout took 0.7 s a plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.88, wspace=0.22)
    losses = [h.get("train_loss") for h in history]
    if any(v is not None for v in losses):
        ax[0].plot(epochs, [v if v is not None else float("nan") for v in losses], marker="o")
    ax[0].set(title=f"{title}: train loss", xlabel="epoch")
    acc = [(h["epoch"], (h.get("val") or {}).get("top1", h.get("val_top1"))) for h in history]
    acc = [(e, a) for e, a in acc if a is not None]
    if acc:
        ax[1].plot(*zip(*acc), marker="o", color="tab:green")
    ax[1].set(title=f"{title}: val top-1 (%)", xlabel="epoch")
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


# curves.png of a running run is redrawn at most this often (and at every end: finished, stopped,
# failed); metrics.json follows every evaluated epoch. Drawing it after each epoch cost a 20-epoch
# compare-init run most of its time.
CURVES_EVERY_S = 30.0


class RunLog:
    """The live record of one run: status.json and TensorBoard events, written by rank 0 only.

    Use ``start`` once the run folder and config.json exist, ``epoch`` after each epoch, and
    ``finish`` / ``fail`` at the end. ``enabled=False`` (other ranks) makes every call a no-op.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._status: dict = {}
        self._writer = None
        self._plotted_at: float | None = None
        self._unplotted: tuple[list[dict], str] | None = None  # evaluated epochs curves.png lacks

    # ----------------------------------------------------------------- status
    def _write(self, **changes) -> None:
        self._status.update(changes, updated=time.time())
        if self.run_dir.is_dir():  # a refused run may have removed its folder already
            atomic_write_text(self.run_dir / "status.json", json.dumps(self._status, indent=1))

    def start(self, resolved: dict, epochs: int | None = None, start_epoch: int = 0) -> None:
        if not self.enabled:
            return
        self._status = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.time(), "epoch": start_epoch, "epochs": epochs}
        self._write()
        writer = self._tb()
        if writer is not None:
            writer.add_text("config", "```\n" + json.dumps(resolved, indent=1, default=str) + "\n```", start_epoch)
            writer.flush()

    def epoch(self, entry: dict, history: list[dict] | None = None, title: str = "") -> None:
        """One history entry: {"epoch", "train_loss", "lr"?, "val"?: {top1, top5, mean_class}}.
        ``history`` (the run's so far, ``entry`` last): after an evaluated epoch, metrics.json (with
        "final" null until the run finishes) shows the run so far, and curves.png too (redrawn at
        most every CURVES_EVERY_S, and when the run stops or fails), so a stopped run keeps what
        it evaluated."""
        if not self.enabled:
            return
        if history and "val" in entry:
            atomic_write_text(self.run_dir / "metrics.json",
                              json.dumps({"history": history, "final": None, "run_dir": str(self.run_dir)}, indent=1))
            self._unplotted = (list(history), title or self.run_dir.name)
            if self._plotted_at is None or time.monotonic() - self._plotted_at >= CURVES_EVERY_S:
                self._plot_unplotted()
        step = int(entry["epoch"])
        writer = self._tb()
        if writer is not None:
            if entry.get("train_loss") is not None:
                writer.add_scalar("train/loss", float(entry["train_loss"]), step)
            if entry.get("lr") is not None:
                writer.add_scalar("train/lr", float(entry["lr"]), step)
            for k, v in entry_metrics(entry).items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"val/{k}", float(v), step)
            writer.flush()
        self._write(epoch=step)

    def begin(self, resolved: dict, fresh: bool, epochs: int | None = None, start_epoch: int = 0) -> None:
        """Open the run folder for this run: a fresh run first drops an old run's files (--force),
        then config.json (it always describes last.pt) and status.json / TensorBoard start."""
        if not self.enabled:
            return
        make_run_dir(self.run_dir)
        for stale in ("last.pt", "metrics.json", "curves.png", *OUTPUT_FILES) if fresh else ():
            (self.run_dir / stale).unlink(missing_ok=True)  # --force: the old run goes before the new one starts
        atomic_write_text(self.run_dir / "config.json", json.dumps(resolved, indent=1))
        self.start(resolved, epochs=epochs, start_epoch=start_epoch)

    def complete(self, result: dict, title: str) -> None:
        """Close the run folder of a finished run: metrics.json, curves.png, status "finished"."""
        if not self.enabled:
            return
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(result, indent=1))
        plot_curves(result["history"], self.run_dir / "curves.png", title)
        self._plotted_at, self._unplotted = time.monotonic(), None
        self.finish()

    def finish(self) -> None:
        if self.enabled:
            self._write(state="finished")
            self._close()

    def _plot_unplotted(self) -> None:
        if self._unplotted is not None and self.run_dir.is_dir():
            history, title = self._unplotted
            plot_curves(history, self.run_dir / "curves.png", title)
            self._plotted_at, self._unplotted = time.monotonic(), None

    def fail(self, exc: BaseException) -> None:
        if not self.enabled or not self._status:
            return
        with contextlib.suppress(Exception):  # the evaluated epochs since the last drawing; never masks exc
            self._plot_unplotted()
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit, pipeline.signals.Interrupted
            self._write(state="interrupted", reason="interrupted (rerun with --resume to continue)")
        else:
            text = str(exc).splitlines()[0][:300] if str(exc) else ""
            self._write(state="failed", reason=f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__)
        self._close()

    # ----------------------------------------------------------------- TensorBoard
    def _tb(self):
        if self._writer is None and self.run_dir.is_dir():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the run goes on without events
                return None
            self._writer = SummaryWriter(log_dir=str(self.run_dir), flush_secs=30)
        return self._writer

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --------------------------------------------------------------------------- reading runs back
@dataclass
class RunRecord:
    """What a run folder says about itself (config, metrics, status), read without torch."""

    path: Path
    config: dict
    metrics: dict | None
    status: dict
    state: str
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stage(self) -> str:
        return "finetune" if "finetune" in self.config else "train"

    @property
    def head(self) -> str:
        if self.stage == "finetune":
            return f"finetune-{self.config['finetune'].get('paradigm', '?')}"
        return str((self.config.get("head") or {}).get("name") or (self.config.get("train") or {}).get("head", "?"))

    @property
    def history(self) -> list[dict]:
        return list((self.metrics or {}).get("history") or [])

    def val_series(self, key: str = "top1") -> list[tuple[int, float]]:
        out = []
        for h in self.history:
            v = entry_metrics(h).get(key)
            if v is not None:
                out.append((int(h["epoch"]), float(v)))
        return out

    def best(self, key: str = "top1") -> float | None:
        series = self.val_series(key)
        return max(v for _, v in series) if series else None

    def last(self, key: str = "top1") -> float | None:
        final = (self.metrics or {}).get("final") or {}
        if key in final:
            return float(final[key])
        series = self.val_series(key)
        return series[-1][1] if series else None

    @property
    def epochs_done(self) -> int:
        if self.metrics:
            return max((int(h.get("epoch", 0)) for h in self.history), default=0)
        return int(self.status.get("epoch") or 0)

    @property
    def epochs_total(self) -> int | None:
        section = self.config.get("finetune") or self.config.get("train") or {}
        total = section.get("epochs", self.status.get("epochs"))
        return int(total) if total is not None else None

    @property
    def seconds(self) -> float | None:
        if self.metrics and self.metrics.get("seconds") is not None:
            return float(self.metrics["seconds"])
        if self.status.get("started"):
            return float(self.status.get("updated", time.time())) - float(self.status["started"])
        return None

    @property
    def cache(self) -> str:
        return str(self.config.get("cache") or (self.config.get("data") or {}).get("name") or "")

    @property
    def cache_key(self) -> str:
        return str(self.config.get("cache_key") or "")

    @property
    def source(self) -> str:
        return str(self.config.get("source") or ("raw video" if self.stage == "finetune" else ""))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _read_json(path: Path, what: str, problems: list[str]) -> dict | None:
    # not cache/files.py read_json: a run's listing says why a file did not read (unreadable, not
    # an object), where read_json only answers None
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{what} unreadable ({exc.__class__.__name__})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{what} is not a JSON object")
        return None
    return data


def read_run(run_dir: str | Path) -> RunRecord:
    """Read a run folder; a folder without config.json is not a run (ConfigError)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"no run folder {path}")
    problems: list[str] = []
    config = _read_json(path / "config.json", "config.json", problems)
    if config is None:
        raise ConfigError(f"{path} is not a run folder" + (f": {problems[0]}" if problems else " (no config.json)"))
    metrics = _read_json(path / "metrics.json", "metrics.json", problems)
    if isinstance(metrics, dict) and "run_dir" in metrics:
        metrics["run_dir"] = str(path)  # the folder as found now, not where it was written (moved, renamed)
    status = _read_json(path / "status.json", "status.json", problems) or {}
    state = status.get("state")
    if isinstance(metrics, dict) and metrics.get("final") is not None and not problems:
        state = "finished"
    elif problems and (path / "metrics.json").exists():
        state = "corrupt"
    elif state == "running":
        same_host = status.get("host") in (None, socket.gethostname())
        if same_host and not _pid_alive(int(status.get("pid", -1))):
            state = "stopped"
    elif state not in RUN_STATES:
        state = "stopped" if (path / "last.pt").exists() else "unknown"
    return RunRecord(path, config, metrics, status, state, problems)


def list_runs(root: str | Path) -> list[RunRecord]:
    """Every run folder directly under ``root`` (folders without config.json are skipped)."""
    root = Path(root)
    out = []
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.is_dir() and not child.name.startswith(".") and (child / "config.json").exists():
            try:
                out.append(read_run(child))
            except ConfigError as exc:  # shown as corrupt, not hidden
                out.append(RunRecord(child, {}, None, {}, "corrupt", [str(exc)]))
    return out


# --------------------------------------------------------------------------- the resolved experiment record
def experiment_record(resolved: dict, head_options: dict | None = None, dataset_args: dict | None = None) -> dict:
    """A run's resolved config (config.json's dict) as an experiment file that runs it again:
    the command's options at top level, each option set as a section. Head dims that come from
    the cache (num_classes, widths, ...) are left out, so the file also fits another cache.
    ``head_options``: the head options to record (stage three: those given, which name its run);
    ``dataset_args``: stage three's dataset options (DatasetSpec.args)."""
    from stages.heads.needs import DIM_FIELDS

    if resolved.get("stage") == "finetune":
        ft = dict(resolved["finetune"])
        ft.pop("contrast", None)  # a record of what the code does, not an option
        out: dict[str, Any] = {"paradigm": ft.pop("paradigm"), "recipe": ft.pop("recipe", "")}
        ds = resolved.get("dataset", {})
        out["dataset"] = ds.get("name", "")
        out.update({k: v for k, v in (dataset_args or {}).items()})
        out["finetune"] = ft
        out["aug"] = dict(resolved.get("augment", {}))
        head = dict(head_options if head_options is not None else
                    {k: v for k, v in resolved["head"].items() if k != "name"})
        if head:
            out["head"] = head
        return out
    train = dict(resolved["train"])
    head = {k: v for k, v in resolved["head"].items() if k not in DIM_FIELDS and k != "num_templates"}
    source = str(resolved.get("source", ""))
    out = {"head": {"name": train.pop("head"), **{k: v for k, v in head.items() if k != "name"}},
           ("wds" if source.startswith("wds:") else "cache"): _absolute(resolved["cache"]),
           "recipe": train.pop("recipe", ""), "train": train}
    return out


def _absolute(path: str) -> str:
    if "://" in path or path.startswith("pipe:"):
        return path
    return str(Path(path).resolve())


def write_experiment(run_dir: str | Path, resolved: dict, head_options: dict | None = None,
                     dataset_args: dict | None = None) -> Path:
    """Write ``run_dir/config.yaml`` (``experiment_record``), atomically."""
    import yaml

    run_dir = Path(run_dir)
    record = experiment_record(resolved, head_options, dataset_args)
    stage = "finetune" if "paradigm" in record else "train"
    text = (f"# clipcache experiment: the resolved config of run {run_dir.name}.\n"
            f"# Run it again (same run id): pipeline {stage} --config {run_dir / 'config.yaml'}\n"
            + yaml.safe_dump(record, sort_keys=False, default_flow_style=False))
    atomic_write_text(run_dir / "config.yaml", text)
    return run_dir / "config.yaml"
