"""Run folders as records: a status file, TensorBoard events, and reading a folder back.

Every run folder (stage two and stage three) holds config.json, last.pt, metrics.json and
curves.png; this module adds what a table of many runs needs:

    status.json        {"state": running | finished | failed | interrupted, "pid", "host",
                        "started", "updated", "epoch", "epochs", "reason"?}
    events.out.tfevents.*   TensorBoard scalars per epoch (train/loss, train/lr, val/top1,
                        val/top5, val/mean_class) and the resolved config as text

A run whose status says "running" but whose process is gone (killed, machine rebooted) reads
back as "stopped": it can be resumed with --resume. Folders written before status.json
existed are read from what they hold (metrics.json: finished; a checkpoint only: stopped).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from cache.errors import ConfigError
from cache.store import atomic_write_text

__all__ = ["RunLog", "RunRecord", "read_run", "list_runs", "default_runs_root", "entry_metrics", "RUN_STATES"]

RUN_STATES = ("running", "finished", "failed", "interrupted", "stopped", "corrupt")


def entry_metrics(entry: dict) -> dict:
    """The validation metrics of one history entry ({"val": {...}}, or flat "val_top1" keys)."""
    if entry.get("val"):
        return dict(entry["val"])
    return {k[4:]: v for k, v in entry.items() if k.startswith("val_")}


def default_runs_root() -> Path:
    """Where run folders go by default: $CLIPCACHE_ROOT/runs (artifacts/runs)."""
    return Path(os.environ.get("CLIPCACHE_ROOT", "artifacts")) / "runs"


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

    def epoch(self, entry: dict) -> None:
        """One history entry: {"epoch", "train_loss", "lr"?, "val"?: {top1, top5, mean_class}}."""
        if not self.enabled:
            return
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

    def finish(self) -> None:
        if self.enabled:
            self._write(state="finished")
            self._close()

    def fail(self, exc: BaseException) -> None:
        if not self.enabled or not self._status:
            return
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
    status = _read_json(path / "status.json", "status.json", problems) or {}
    state = status.get("state")
    if metrics is not None and not problems:
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
