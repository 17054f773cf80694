"""Heads from a user's own file: load it (it registers its heads), and check them against the contract.

``load_head_module(path)`` imports a .py file under a module name of its own; the file calls
``stages.heads.register_head`` as the heads shipped here do (docs/train.md has a complete one),
and its heads then train like any other (`pipeline train --head-module mymod.py --head myhead`).
A file that is not there, that raises while importing, or that registers no head is one
ConfigError line.

``check_head(name)`` runs the contract tests/test_heads_contract.py holds every shipped head to,
on the head built with its tiny preset (``register_head(..., tiny={...})``, else its defaults):
it builds; a batch of 3 (``example_batch``) gives logits of shape (3, num_classes); they are
finite; and, for a head trained by gradient, one backward pass of its loss gives every
trainable parameter a finite gradient. `pipeline heads --check mymod.py` prints one line per check.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from pathlib import Path

from cache.errors import ConfigError

__all__ = ["load_head_module", "check_head", "CHECKS"]

CHECKS = ("builds", "output shape", "finite output", "gradients")
_LOADED: dict[Path, list[str]] = {}


def load_head_module(path: str | Path, flag: str = "--head-module") -> list[str]:
    """Import the user's head file ``path``; returns the names of the heads it registered (a file
    loaded before in this process: the same names, not imported twice)."""
    from stages.heads import list_heads

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: " + ("is a folder, not a .py file" if path.is_dir() else "no such file"))
    if path.suffix != ".py":
        raise ConfigError(f"{flag} {path}: not a Python file (.py)")
    real = path.resolve()
    if real in _LOADED:
        return list(_LOADED[real])
    before = set(list_heads())
    name = f"clipcache_user_heads.{real.stem}_{hashlib.sha256(str(real).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, real)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    if str(real.parent) not in sys.path:  # as `python mymod.py` would: the file's own folder imports
        sys.path.append(str(real.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if not isinstance(exc, Exception):
            raise
        where = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == real]
        line = f" at line {where[-1].lineno}" if where else (f" at line {exc.lineno}" if isinstance(exc, SyntaxError)
                                                            and exc.lineno else "")
        text = " ".join(str(exc).split())[:200]
        raise ConfigError(f"{flag} {path} raised {exc.__class__.__name__}{line} while importing"
                          + (f": {text}" if text else "")) from None
    new = sorted(set(list_heads()) - before)
    if not new:
        raise ConfigError(f"{flag} {path} registers no head: decorate a Head subclass with "
                          "@register_head(\"name\", ItsCfg) (from stages.heads import register_head; docs/train.md)")
    _LOADED[real] = new
    return list(new)


def _prepare(head) -> None:
    """A classifier for a head with a classifier matrix, a fit for a closed-form head (as stage two does)."""
    import torch

    from stages.heads import example_batch

    if head.has_classifier:
        g = torch.Generator().manual_seed(1)
        head.set_classifier(torch.randn(*head.classifier_shape(), generator=g))
    if head.uses_sklearn:
        head.fit(example_batch(head, batch_size=8 * head.cfg.num_classes))


def _error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:160]
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def check_head(name: str) -> list[tuple[str, bool, str]]:
    """The contract checks of registered head ``name``: [(check, passed, detail)]; a check that
    cannot run because an earlier one failed is left out."""
    import torch

    from stages.heads import create_head, example_batch

    out: list[tuple[str, bool, str]] = []
    torch.manual_seed(0)
    try:
        head = create_head(name, tiny=True)
        _prepare(head)
        n = head.num_trainable()
        out.append(("builds", True, f"{type(head).__name__}, {n:,} trainable parameters"))
    except Exception as exc:
        return [("builds", False, _error(exc))]
    K = getattr(head.cfg, "num_classes", None)
    try:
        head.eval()
        with torch.no_grad():
            logits = head(example_batch(head, batch_size=3))["logits"]
    except Exception as exc:
        return out + [("output shape", False, f"forward on a batch of 3 raised {_error(exc)}")]
    shape = tuple(logits.shape)
    ok = shape == (3, K)
    out.append(("output shape", ok, f"logits {shape}" + ("" if ok else f", expected (3, {K}) (batch, num_classes)")))
    finite = bool(torch.isfinite(logits).all())
    out.append(("finite output", finite, "no NaN/inf" if finite else "the logits hold NaN/inf"))
    if not ok:  # a loss over logits of another shape says nothing about the gradients
        return out
    if head.uses_sklearn:
        out.append(("gradients", True, "fitted in closed form, not trained by gradient: nothing to check"))
        return out
    params = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    if not params:
        return out + [("gradients", False, "no trainable parameter (a head trained by gradient needs some)")]
    try:
        head.train()
        head.zero_grad(set_to_none=True)
        batch = example_batch(head, batch_size=6)
        head.loss(head(batch), batch["label"]).backward()
    except Exception as exc:
        return out + [("gradients", False, f"the loss's backward raised {_error(exc)}")]
    missing = [n for n, p in params if p.grad is None]
    bad = [n for n, p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    if missing or bad:
        parts = ([f"no gradient for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing
                 else []) + ([f"NaN/inf gradient for {', '.join(bad[:5])}"] if bad else [])
        out.append(("gradients", False, "; ".join(parts) + " (freeze it with requires_grad_(False), or use it)"))
    else:
        out.append(("gradients", True, f"all {len(params)} trainable tensors get a finite gradient"))
    return out
