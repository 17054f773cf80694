"""`pipeline runs ls | show | compare`: every experiment on a cache in one table.

A row per run folder (stages.runs.read_run): the head, the options that differ from that
head's defaults (so dozens of runs of one head read as what was varied), the cache and data
source, epochs, best and last top-1 / top-5 / mean-class, the paper's top-1 where the run's
setting is one a paper published (``paper_result``), time and status. Output as a rich table on a
terminal, or csv / json / md for papers and scripts.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
from dataclasses import asdict
from pathlib import Path

from cache.errors import ConfigError
from stages.runs import RunRecord, list_runs, read_run

__all__ = ["RUN_COLUMNS", "SORT_KEYS", "changed_options", "value_source", "value_text", "run_row", "select_runs", "render", "resolve_run",
           "compare_rows", "check_plot_path", "plot_curves", "cell_text", "FORMATS", "published_table",
           "published_results", "run_setting", "setting_matches", "paper_result"]

RUN_COLUMNS = ("run", "head", "options", "cache", "source", "epochs", "best_top1", "last_top1", "paper_top1",
               "last_top5", "last_mean_class", "seconds", "status")
SORT_KEYS = ("run", "head", "best_top1", "last_top1", "seconds", "status", "started")
FORMATS = ("table", "csv", "json", "md")
# settings that say where or how fast a run ran, not what it is
_NOT_OPTIONS = {"head", "device", "workers", "eval_batch_size", "paradigm", "recipe"}


# Every stage's and head's option defaults, as JSON: `runs ...` reads them here, since the classes
# that define them live in modules that import torch (seconds). tests/test_runs.py checks this file
# against the classes; `python -m pipeline.runs_table` writes it again after a default changes.
DEFAULTS_FILE = Path(__file__).with_name("option_defaults.json")


def live_option_defaults() -> dict:
    """{"train": TrainCfg's defaults, "finetune": FinetuneCfg's, "heads": {head: its options' defaults},
    "recipes": {"train" | "finetune": {head or paradigm: {recipe: {"values", "head"}}}},
    "published": the papers' results the heads register (``published_table``)}, from the classes,
    presets and registry themselves (imports torch), as JSON values."""
    from stages.finetune import PARADIGMS, FinetuneCfg
    from stages.heads import DIM_FIELDS, get_head_entry, list_heads
    from stages.recipes import RECIPES, stage_three_recipe, stage_two_recipe
    from stages.train import TrainCfg

    # the heads this package ships (a head a user or a test registers in its own module is not in the file)
    shipped = [n for n in list_heads() if get_head_entry(n).head_cls.__module__.startswith("stages.heads.")]
    heads = {name: {k: v for k, v in asdict(get_head_entry(name).cfg_cls()).items() if k not in DIM_FIELDS}
             for name in shipped}
    recipes = {"train": {h: {n: {"values": (r := stage_two_recipe(h, n)).values, "head": r.head} for n in RECIPES}
                         for h in shipped},
               "finetune": {p: {n: {"values": (r := stage_three_recipe(p, n)).values, "head": r.head}
                                for n in RECIPES if n != "demo"} for p in PARADIGMS}}
    return json.loads(json.dumps({"train": asdict(TrainCfg()), "finetune": asdict(FinetuneCfg()), "heads": heads,
                                  "recipes": recipes,
                                  "published": published_table([get_head_entry(n) for n in shipped])}))


@functools.lru_cache(maxsize=1)
def _option_defaults() -> dict:
    try:
        return json.loads(DEFAULTS_FILE.read_text())
    except (OSError, ValueError):  # not shipped: ask the classes
        return live_option_defaults()


# ----------------------------------------------------------------------------- the papers' figures
def published_table(entries) -> dict:
    """The lookup ``paper_result`` reads, from registry entries (stages.heads.HeadEntry): {"results":
    {head: [PublishedResult as a dict, ...]}, "openai_weights": {arch: "sha256:..." of OpenAI's
    checkpoint, as open_clip's download address names it}} (imports open_clip)."""
    results = {e.name: [asdict(r) for r in e.published] for e in entries if e.published}
    archs = sorted({r["backbone"] for rs in results.values() for r in rs if r["pretrained"] == "openai"})
    if archs:
        from open_clip.pretrained import get_pretrained_cfg
    weights = {}
    for arch in archs:
        url = (get_pretrained_cfg(arch, "openai") or {}).get("url", "")
        digest = url.rstrip("/").split("/")[-2] if url.count("/") > 1 else ""
        if len(digest) == 64:  # OpenAI's address holds the file's sha256 (its loader checks it)
            weights[arch] = f"sha256:{digest}"
    return {"results": results, "openai_weights": weights}


def published_results() -> dict:
    """The shipped lookup of the papers' results (pipeline/option_defaults.json, "published")."""
    return _option_defaults().get("published") or {"results": {}, "openai_weights": {}}


@functools.lru_cache(maxsize=64)
def _cache_info(path: str):
    """A cache's metadata (CacheMeta) read without torch: a Zarr folder, or a WebDataset export's
    header; None when it is gone or unreadable."""
    from cache.errors import PipelineError
    from cache.meta import CacheMeta

    p = Path(path)
    try:
        if p.is_file():  # a WebDataset header: the exported cache's metadata is in it
            return CacheMeta.from_dict(json.loads(p.read_text())["meta"])
        from cache.store import open_store

        return open_store(p).info
    except (PipelineError, OSError, ValueError, KeyError, TypeError):
        return None


def run_setting(rec: RunRecord) -> dict | None:
    """What a run was trained and tested on, in the terms of the papers' results: stage, head (stage
    three: the paradigm), dataset, backbone (arch, pretrained tag, weights id), test frames, sampling
    (and dense stride), test views, shots, and whether it trained on the whole train set of every
    class. Stage two reads the run's config.json and its cache's metadata; stage three its config.json.
    None when it cannot be told (a run without config, a cache that is gone)."""
    if not rec.config:
        return None
    if rec.stage == "finetune":
        ft = rec.config.get("finetune") or {}
        bb = rec.config.get("backbone") or {}
        return {"stage": "finetune", "head": ft.get("paradigm", ""),
                "dataset": (rec.config.get("dataset") or {}).get("name", ""),
                "backbone": bb.get("arch") or ft.get("model", ""), "pretrained": bb.get("pretrained", ""),
                "weights": bb.get("weights", ""), "frames": ft.get("frames"), "sampling": ft.get("sampling"),
                "stride": ft.get("stride"), "views": ft.get("views"), "eval_split": ft.get("eval_split", "val"),
                "shots": 0, "whole": True}
    train = rec.config.get("train") or {}
    info = _cache_info(rec.cache) if rec.cache else None
    if info is None:
        return None
    split = train.get("eval_split", "val")
    view = info.views.get(split)
    return {"stage": "train", "head": rec.head, "dataset": info.dataset.name, "backbone": info.backbone.arch,
            "pretrained": info.backbone.pretrained, "weights": info.backbone.weights, "frames": info.dims.frames,
            "sampling": info.config.sampling, "stride": info.config.stride,
            "views": f"{view.clips}x{view.crops}" if view is not None else "", "eval_split": split,
            "shots": int(train.get("shots") or 0),
            "whole": float(train.get("fraction", 1.0)) == 1.0 and not train.get("train_classes")
            and not train.get("test_classes")}


def _arch(name: str) -> str:
    return name[:-len("-quickgelu")] if name.endswith("-quickgelu") else name  # the same model, its activation named


def setting_matches(result: dict, setting: dict, openai_weights: dict | None = None) -> bool:
    """Whether a run's ``setting`` (``run_setting``) is the one a published ``result`` was measured in:
    the same stage, head, dataset, backbone (arch, with OpenAI's weights by tag or by the checkpoint
    file's sha256 where the paper used them), test frames, sampling (and stride when dense), test
    views and shots, tested on val or test after training on every class's whole train set."""
    s = setting
    if (s["stage"], s["head"], s["dataset"]) != (result["stage"], result["head"], result["dataset"]):
        return False
    if _arch(str(s["backbone"])) != _arch(result["backbone"]):
        return False
    if result["pretrained"] == "openai":
        known = (openai_weights or {}).get(result["backbone"])
        if s["pretrained"] != "openai" and not (known and s["weights"] == known):
            return False
    elif s["pretrained"] != result["pretrained"]:
        return False
    if (s["frames"], s["sampling"], s["views"]) != (result["frames"], result["sampling"], result["views"]):
        return False
    if result["sampling"] == "dense" and s["stride"] != result["stride"]:
        return False
    return s["shots"] == result["shots"] and s["whole"] and s["eval_split"] in ("val", "test")


def paper_result(rec: RunRecord, table: dict | None = None) -> dict | None:
    """The published result (a dict of PublishedResult's fields, with "head") whose setting is the
    run's (``setting_matches``); None when no paper published one. ``table``: ``published_table``'s
    form (default: the shipped one). The cache is read only for a head with published results."""
    table = published_results() if table is None else table
    if not rec.config:
        return None
    head = (rec.config.get("finetune") or {}).get("paradigm", "") if rec.stage == "finetune" else rec.head
    candidates = [{**r, "head": head} for r in (table.get("results") or {}).get(head, [])]
    candidates = [r for r in candidates if r["stage"] == rec.stage]
    if not candidates:
        return None
    setting = run_setting(rec)
    if setting is None:
        return None
    return next((r for r in candidates if setting_matches(r, setting, table.get("openai_weights"))), None)


def _defaults(rec: RunRecord, recipe: bool = True) -> tuple[dict, dict]:
    """(stage options, head options) as the run's recipe resolves them before anything given (a
    head this version no longer has: no head defaults, so all its options show); ``recipe`` False:
    the classes' own defaults."""
    defaults = _option_defaults()
    kind = "finetune" if rec.stage == "finetune" else "train"
    section = rec.config.get(kind) or {}
    stage = defaults[kind]
    head_name = section.get("paradigm", "") if kind == "finetune" else rec.head
    heads = defaults["heads"].get(head_name, {})
    preset = defaults.get("recipes", {}).get(kind, {}).get(head_name, {}).get(section.get("recipe", "")) \
        if recipe else None
    if preset:
        return {**stage, **preset["values"]}, {**heads, **preset["head"]}
    return stage, heads


def changed_options(rec: RunRecord, recipe: bool = True) -> dict[str, object]:
    """Options of the run that differ from what its recipe resolves to (the head's and stage's
    defaults under the run's recipe; ``recipe`` False: the classes' own defaults); dims from the
    cache excluded."""
    if not rec.config:
        return {}
    stage_defaults, head_defaults = _defaults(rec, recipe)
    section = rec.config.get("finetune" if rec.stage == "finetune" else "train") or {}
    out: dict[str, object] = {}
    for k, v in section.items():
        if k not in _NOT_OPTIONS and k in stage_defaults and stage_defaults[k] != v:
            out[k] = v
    for k, v in (rec.config.get("head") or {}).items():
        if k == "name" or k not in head_defaults:
            continue
        if head_defaults[k] != v and not (isinstance(v, list) and list(head_defaults[k] or []) == v):
            out[f"head.{k}"] = v
    return out


def value_text(v) -> str:
    """An option's value as given: numbers in %g (lr 0.0004, not 0.0), lists comma-joined."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(value_text(x) for x in v)
    return str(v)


def _fmt_opts(opts: dict, recipe: str = "") -> str:
    text = " ".join(f"{k}={value_text(v)}" for k, v in sorted(opts.items()))
    name = f"recipe {recipe}" if recipe and recipe != "paper" else ""
    return (f"{name}: {text}" if name and text else name or text) or "(recipe values)"


def run_row(rec: RunRecord) -> dict:
    total = rec.epochs_total
    return {
        "run": rec.name,
        "head": rec.head if rec.config else "?",
        "options": _fmt_opts(changed_options(rec), (rec.config.get("train") or rec.config.get("finetune") or {})
                             .get("recipe", "") if rec.config else ""),
        "cache": Path(rec.cache).name if rec.cache else "",
        "source": rec.source,
        "epochs": f"{rec.epochs_done}/{total}" if total is not None else str(rec.epochs_done),
        "best_top1": rec.best("top1"),
        "last_top1": rec.last("top1"),
        "paper_top1": (paper := paper_result(rec)) and paper["top1"],
        "paper_source": paper and paper["source"],
        "last_top5": rec.last("top5"),
        "last_mean_class": rec.last("mean_class"),
        "seconds": round(rec.seconds, 1) if rec.seconds is not None else None,
        "status": rec.state + (f" ({rec.problems[0]})" if rec.problems else "")
        + (f": {rec.status['reason']}" if rec.state == "failed" and rec.status.get("reason") else ""),
        "path": str(rec.path),
    }


def select_runs(root: Path, cache: Path | None = None, head: str = "", status: str = "",
                sort: str = "started", reverse: bool = False) -> list[RunRecord]:
    """The runs under ``root``, filtered by cache (a cache folder: its key), head and status."""
    if not root.is_dir():
        raise ConfigError(f"no runs folder {root} (train a head first, or pass --root)")
    runs = list_runs(root)
    if cache is not None:
        from cache.store import open_store

        key = open_store(cache).key
        runs = [r for r in runs if r.cache_key == key]
    if head:
        runs = [r for r in runs if r.head == head]
    if status:
        runs = [r for r in runs if r.state == status]
    if sort not in SORT_KEYS:
        raise ConfigError(f"--sort must be one of {', '.join(SORT_KEYS)}, got '{sort}'")

    def key_of(r: RunRecord):
        if sort == "started":
            return float(r.status.get("started") or r.path.stat().st_mtime)
        if sort in ("best_top1", "last_top1"):
            v = r.best("top1") if sort == "best_top1" else r.last("top1")
            return -1.0 if v is None else v
        if sort == "seconds":
            return r.seconds or 0.0
        return str(run_row(r)[sort]) if sort != "status" else r.state

    return sorted(runs, key=key_of, reverse=reverse)


def cell_text(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def render(rows: list[dict], fmt: str, columns: tuple[str, ...] = RUN_COLUMNS) -> str:
    """Rows as csv, json or a markdown table (the terminal table is drawn by the CLI with rich)."""
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
        return buf.getvalue().rstrip("\n")
    if fmt == "md":
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell_text(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
        return "\n".join(lines)
    raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")


def resolve_run(name: str, root: Path) -> RunRecord:
    """A run by folder path, by name under ``root``, or by a unique prefix of its name."""
    path = Path(name)
    if path.is_dir():
        return read_run(path)
    if (root / name).is_dir():
        return read_run(root / name)
    matches = sorted(p for p in root.glob(f"{name}*") if p.is_dir()) if root.is_dir() else []
    if len(matches) == 1:
        return read_run(matches[0])
    if len(matches) > 1:
        raise ConfigError(f"run '{name}' is ambiguous under {root}: " + ", ".join(p.name for p in matches[:6]))
    raise ConfigError(f"no run '{name}' under {root} (see `pipeline runs ls`)")


def _option_value(rec: RunRecord, key: str):
    kind = "finetune" if rec.stage == "finetune" else "train"
    if key.startswith("head."):
        return (rec.config.get("head") or {}).get(key[5:])
    return (rec.config.get(kind) or {}).get(key)


def value_source(rec: RunRecord, key: str) -> str:
    """Where a run's option value came from: what the run recorded (recipe, cache protocol, file,
    you), else what can be told from its value (default, recipe, or set when it is neither)."""
    sources = rec.config.get("sources") or {}
    section, name = ("head", key[5:]) if key.startswith("head.") else ("train", key)
    if name in sources.get(section, {}):
        return sources[section][name]
    if sources:  # a run that records its sources: a key it does not name is at its default
        return "default"
    classes = changed_options(rec, recipe=False)
    return "set" if key in changed_options(rec) else ("recipe" if key in classes else "default")


def compare_rows(runs: list[RunRecord]) -> tuple[list[str], list[dict]]:
    """Side by side: the recipe, then one row per option that differs from its recipe in any of the
    runs, each value as given with its source (default / recipe / cache protocol / file / you);
    then the results (a run without metrics says so)."""
    opts = [changed_options(r) for r in runs]
    keys = sorted({k for o in opts for k in o})
    rows = [{"field": "head", **{r.name: r.head for r in runs}},
            {"field": "recipe", **{r.name: (r.config.get("train") or r.config.get("finetune") or {}).get("recipe")
                                   or "-" for r in runs}}]
    rows += [{"field": k, **{r.name: f"{value_text(_option_value(r, k))} ({value_source(r, k)})" for r in runs}}
             for k in keys]
    for label, fn in (("cache", lambda r: Path(r.cache).name), ("epochs done", lambda r: run_row(r)["epochs"]),
                      ("best top1", lambda r: r.best("top1")), ("last top1", lambda r: r.last("top1")),
                      ("last top5", lambda r: r.last("top5")), ("last mean-class", lambda r: r.last("mean_class")),
                      ("seconds", lambda r: r.seconds),
                      ("status", lambda r: r.state + ("" if r.history else " (no metrics)"))):
        rows.append({"field": label, **{r.name: fn(r) for r in runs}})
    return ["field", *[r.name for r in runs]], rows


def check_plot_path(path: Path) -> None:
    """Refuse a plot path that cannot become a file, before anything is drawn or printed."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder: give the plot's file name, e.g. --out {path / 'compare.png'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {path}: {parent} is a file, not a folder; give another --out")
            break


def plot_curves(runs: list[RunRecord], path: Path) -> Path:
    """Train loss and val top-1 per epoch of every run, one figure (written whole, or not at all)."""
    import errno

    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in runs:
        loss = [(h["epoch"], h["train_loss"]) for h in r.history if h.get("train_loss") is not None]
        if loss:
            ax[0].plot(*zip(*loss), marker="o", label=r.name)
        acc = r.val_series("top1")
        if acc:
            ax[1].plot(*zip(*acc), marker="o", label=r.name)
        else:  # in the legend all the same, so no run leaves the plot without a word
            ax[1].plot([], [], " ", label=f"{r.name} (no val metrics: {r.state})")
    ax[0].set(title="train loss", xlabel="epoch")
    ax[1].set(title="val top-1 (%)", xlabel="epoch")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=90)
        tmp.replace(path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the CLI's "disk full" line
        raise ConfigError(f"cannot write the plot {path}: {exc.strerror or exc}; give another --out") from None
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):  # gone already once renamed; a failed write leaves nothing behind
            tmp.unlink(missing_ok=True)
    return path


if __name__ == "__main__":  # write DEFAULTS_FILE from the classes
    DEFAULTS_FILE.write_text(json.dumps(live_option_defaults(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {DEFAULTS_FILE}")
