"""Heads trained from the cache. Every module in this package registers itself on import."""

import importlib
import pkgutil

from stages.heads.needs import DIM_FIELDS, DataKeys, resolve_layers  # noqa: F401
from stages.heads.registry import (  # noqa: F401
    Head,
    PaperRecipe,
    Protocol,
    PublishedResult,
    Reference,
    create_head,
    get_head_entry,
    list_heads,
    make_cfg,
    example_batch,
    find_protocol,
    list_protocols,
    register_head,
)

_SKIP = {"registry", "common", "counts", "facts", "needs", "closed_form"}  # shared parts, not heads
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _SKIP and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
