"""Run checkpoints that hold data only: loading one never runs code.

A run folder may come from elsewhere (a colleague, a download), so ``last.pt`` is loaded with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts, nothing that
unpickles into an arbitrary object. Whatever else a checkpoint carries (the resolved config, the
epoch history) is written as a JSON string, so it stays plain data whatever types it held. A file
that needs more than that (a pickled object, a checkpoint of another program) is refused in one
line, without being run.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from cache.errors import ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "refused_global", "JSON_FIELDS"]

JSON_FIELDS = ("config", "history")  # stored as JSON strings, returned as Python objects


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` atomically (a temporary file renamed into place): JSON_FIELDS as JSON text."""
    path = Path(path)
    data = {k: json.dumps(v, sort_keys=True) if k in JSON_FIELDS else v for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a run checkpoint as data only; a file that is not one is a one-line ConfigError."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        if "weights only load failed" in first.lower() or "weights_only" in str(exc):
            why = refused_global(str(exc))
            raise ConfigError(f"{path} needs more than tensors, numbers and strings to load ({why}); it was not "
                              "loaded, since unpickling it could run code: use a checkpoint written by this "
                              "program's own run") from None
        raise ConfigError(f"{path} is not a readable checkpoint ({first}); remove it or rerun the run") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise ConfigError(f"{path} is not a readable checkpoint (truncated or damaged: {first}); remove it or "
                          "rerun the run") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path} is not a run checkpoint of this program (it holds a {type(ckpt).__name__})")
    for key in JSON_FIELDS:
        if isinstance(ckpt.get(key), str):
            try:
                ckpt[key] = json.loads(ckpt[key])
            except ValueError:
                raise ConfigError(f"{path}: its '{key}' record is not valid JSON; the checkpoint is damaged") from None
    return ckpt


def refused_global(message: str) -> str:
    """What torch's weights-only unpickler refused, by name only: the rest of torch's message advises
    loading the file with weights_only=False (or allow-listing the global), which is what must not happen."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if found:
        return f"a pickled {found.group(1)}"
    found = re.search(r"Unsupported (operand|class)[: ]+(\S+)", message)
    if found:
        return f"unsupported pickle {found.group(1)} {found.group(2)}"
    return "an object torch's weights-only loader does not allow"
