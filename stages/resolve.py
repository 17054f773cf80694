"""How every caller resolves a stage's options, said once: defaults < recipe < experiment file <
--set < flags given, plus (stage two) the cache's test protocol for the evaluation options none
of those set.

Each stage applies the rule in its own module, beside its config class (the stages never import
one another): ``stages.extract.resolve_extract``, ``stages.train.resolve_train``,
``stages.finetune.resolve_finetune``. The CLI parses, calls one of them and calls the stage;
compare-init and the demo call the same, so a command line, an experiment file and a Python call
resolve to one config (and one run id). This module holds the parts they share: the result, the
experiment file's split into a command's own options and the rest, the file's layer, where each
value came from, and which cache a run reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.errors import ConfigError

__all__ = ["Resolved", "experiment_options", "file_layer", "value_sources", "world_size", "find_cache"]


@dataclass
class Resolved:
    """A stage's resolved options, and what to say about them."""
    cfg: Any                                        # ExtractCfg | TrainCfg | FinetuneCfg
    head: dict = field(default_factory=dict)        # head options (stages two and three)
    augment: dict = field(default_factory=dict)     # AugmentCfg values (stage three)
    sources: dict = field(default_factory=dict)     # {"train" | "head": {key: where its value came from}}
    lines: list[str] = field(default_factory=list)  # the resolution, as printed (by the main rank)
    notes: list[str] = field(default_factory=list)  # warnings for stderr (every rank)
    source: Any = None                              # stage two: what train_head reads (a path or an open export)


def world_size() -> int:
    """Processes of this job (torchrun's WORLD_SIZE): the recipe's accumulation counts on it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def experiment_options(config: str | Path | None, params: dict, given: set[str], own: dict,
                       flag_fields: dict) -> tuple[dict, dict, dict]:
    """Split an experiment file against a command's parameters.

    ``params``: the command's parameter values (given or default); ``given``: the names given on
    the command line (a flag given equal to its default counts: it still wins over the file);
    ``own``: {option: type} the file may set at top level (a flag given wins); ``flag_fields``:
    {flag option: config field} (the file may name either). Returns (the command's options, the
    file's other keys, {field: value} of the flags given that set a config field).
    """
    from stages.config import coerce_option, load_experiment

    where = f"config file {config}"
    file = load_experiment(config) if config is not None else {}
    if "head.name" in file and "head" in own:
        file["head"] = file.pop("head.name")
    opts = {}
    for name, kind in own.items():
        if name in file and name not in given:
            try:
                value = coerce_option("str" if kind == "path" else kind, name, file.pop(name))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            opts[name] = Path(value) if kind == "path" else value
        else:
            file.pop(name, None)
            opts[name] = params[name]
    rest = {flag_fields.get(k, k): v for k, v in file.items()}
    flags = {f: params[name] for name, f in flag_fields.items() if name in given}
    return opts, rest, flags


def file_layer(file_over: dict, base: dict, explicit: dict) -> dict:
    """The experiment file's values that change ``base`` (defaults and recipe), so the recipe's
    'overridden by you' line names only those; its lr stays whenever a global batch is given, so
    the linear lr rule never rescales an lr the file sets."""
    out = {k: v for k, v in file_over.items() if base.get(k) != v}
    if "lr" in file_over and ("global_batch" in out or "global_batch" in explicit):
        out["lr"] = file_over["lr"]
    return out


def value_sources(recipe: tuple[dict, dict], protocol: tuple[dict, dict], file: tuple[dict, dict],
                  you: tuple[dict, dict]) -> dict:
    """Where each option's value came from, for those not at their default: {"train": {key: "recipe" |
    "cache protocol" | "file" | "you"}, "head": {...}}; each argument is (stage options, head
    options) of that layer; later layers win, as in the resolution (`runs compare` prints them)."""
    layers = (("recipe", recipe), ("cache protocol", protocol), ("file", file), ("you", you))
    return {section: {k: name for name, pair in layers for k in pair[i]} for i, section in enumerate(("train", "head"))}


def find_cache(cache: str | Path | None, dataset: str, cache_root: str | Path | None) -> tuple[Path, str]:
    """The cache a run reads: ``cache`` when given, else the last one extracted for ``dataset``
    under ``cache_root`` (default: the artifacts' caches). Returns (path, the line that says which
    was picked, "" when given)."""
    from cache.paths import default_cache_root, latest_cache

    if cache is not None:
        return Path(cache), ""
    root = cache_root or default_cache_root()
    found = latest_cache(root, dataset)
    if found is None:
        raise ConfigError(f"no cache given and none extracted yet for dataset '{dataset}' under {root}: run "
                          f"`pipeline extract --dataset {dataset} --data-root DIR` first, or pass --cache PATH")
    return found, f"cache: {found} (the last one extracted for dataset '{dataset}'; --cache PATH picks another)"
