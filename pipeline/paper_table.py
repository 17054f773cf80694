"""`pipeline runs ls --format md|latex`: the compact table a paper prints, seeds folded.

One row per setting: head, the options that differ from its recipe (seed aside), backbone,
frames x views (frames x clips x crops of the evaluated split), trainable parameters, top-1 and
top-5 of the final evaluation. Finished runs that differ only in their seed are one row,
mean +- std (sample standard deviation) over the n runs, "(n)" after it; a single run prints its
value. Run folders are named by paths relative to the working directory (or to the runs root when
they lie outside it): in the md table's last column, in a comment after each LaTeX row.
Reads run folders and cache metadata only: no torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pipeline.runs_table import changed_options, value_text
from stages.runs import RunRecord

__all__ = ["PAPER_FORMATS", "PAPER_COLUMNS", "paper_rows", "render_paper", "data_of"]

PAPER_FORMATS = ("md", "latex")
PAPER_COLUMNS = ("head", "setting", "backbone", "frames x views", "params", "top-1", "top-5")


def data_of(rec: RunRecord) -> dict:
    """{"backbone", "frames", "views"} of a run: from its metrics.json ("data", written since runs
    record it), else from its cache's metadata (empty when the cache is gone)."""
    data = (rec.metrics or {}).get("data")
    if isinstance(data, dict):
        return data
    meta = None
    try:
        path = Path(rec.cache)
        if path.is_dir():
            from cache.store import open_store

            meta = open_store(path).info
        elif path.suffix == ".json" and path.is_file():
            from cache.meta import CacheMeta

            meta = CacheMeta.from_dict(json.loads(path.read_text())["meta"])
    except Exception:  # noqa: BLE001 - a moved, damaged or foreign cache: the columns stay empty
        meta = None
    if meta is None:
        return {}
    split = (rec.config.get("train") or {}).get("eval_split", "val")
    views = meta.views.get(split)
    return {"backbone": meta.backbone.arch, "frames": meta.dims.frames,
            "views": [views.clips, views.crops] if views else None}


def _params(rec: RunRecord) -> int | None:
    n = (rec.metrics or {}).get("trainable_params")
    if isinstance(n, dict):
        n = sum(n.values())
    return int(n) if isinstance(n, (int, float)) else None


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _where(path: Path, root: Path) -> str:
    here = Path.cwd().resolve()
    path = path.resolve()
    try:
        return str(path.relative_to(here))
    except ValueError:
        try:
            return str(path.relative_to(root.resolve()))
        except ValueError:
            return path.name


def _stat(values: list[float]) -> tuple[float, float | None, int]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std, n


def paper_rows(runs: list[RunRecord], root: Path) -> tuple[list[dict], int]:
    """(rows, runs left out): finished runs grouped by everything but the seed, in order of first appearance."""
    groups: dict[tuple, dict] = {}
    left_out = 0
    for rec in runs:
        if rec.state != "finished" or rec.last("top1") is None:
            left_out += 1
            continue
        opts = {k: v for k, v in changed_options(rec).items() if k != "seed"}
        recipe = (rec.config.get("train") or rec.config.get("finetune") or {}).get("recipe", "")
        setting = " ".join(f"{k}={value_text(v)}" for k, v in sorted(opts.items()))
        if recipe and recipe != "paper":
            setting = f"recipe {recipe}" + (f": {setting}" if setting else "")
        data = data_of(rec)
        views = data.get("views")
        fv = f"{data['frames']}x{views[0]}x{views[1]}" if data.get("frames") and views else "-"
        key = (rec.head, rec.cache_key or rec.cache, rec.source, setting, data.get("backbone", ""), fv)
        g = groups.setdefault(key, {"head": rec.head, "setting": setting or "-", "backbone": data.get("backbone") or "-",
                                    "frames x views": fv, "params": _count(_params(rec)), "top1": [], "top5": [],
                                    "runs": []})
        g["top1"].append(float(rec.last("top1")))
        top5 = rec.last("top5")
        if top5 is not None:
            g["top5"].append(float(top5))
        g["runs"].append(_where(rec.path, root))
    return list(groups.values()), left_out


def _cell(values: list[float], latex: bool) -> str:
    if not values:
        return "-"
    mean, std, n = _stat(values)
    if std is None:
        return f"{mean:.1f}"
    pm = " $\\pm$ " if latex else " ± "
    return f"{mean:.1f}{pm}{std:.1f} ({n})"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in text)


def render_paper(rows: list[dict], fmt: str) -> str:
    """The rows as a markdown table (with a runs column) or a LaTeX tabular (booktabs)."""
    if fmt == "md":
        head = [*PAPER_COLUMNS, "runs"]
        lines = ["| " + " | ".join(head) + " |", "|" + "".join("---|" if i < 4 else "--:|" for i in range(len(head)))]
        for r in rows:
            cells = [r["head"], r["setting"], r["backbone"], r["frames x views"], r["params"], _cell(r["top1"], False),
                     _cell(r["top5"], False), ", ".join(r["runs"])]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)
    lines = [r"\begin{tabular}{llllrrr}", r"\toprule",
             r"head & setting & backbone & frames $\times$ views & params & top-1 & top-5 \\", r"\midrule"]
    for r in rows:
        cells = [_tex(r["head"]), _tex(r["setting"]), _tex(r["backbone"]),
                 r["frames x views"].replace("x", r"$\times$"), _tex(r["params"]),
                 _cell(r["top1"], True), _cell(r["top5"], True)]
        lines.append(" & ".join(cells) + r" \\ % " + ", ".join(r["runs"]))
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)
