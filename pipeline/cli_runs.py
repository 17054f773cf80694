"""`pipeline runs ...`: the commands over run folders (the logic is in pipeline/runs_table.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from cache.errors import ConfigError

runs_app = typer.Typer(no_args_is_help=True, help="List, show and compare training runs (stages two and three).")

RootOpt = typer.Option(None, "--root", help="Runs folder (default: artifacts/runs, or $CLIPCACHE_ROOT/runs).")


def _root(root: Optional[Path]) -> Path:
    from stages.runs import default_runs_root

    return root or default_runs_root()


def _print_table(columns, rows, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.runs_table import cell_text

    table = Table(*columns, title=title or None)
    for r in rows:
        table.add_row(*(cell_text(r.get(c)) for c in columns))
    Console(width=None if sys.stdout.isatty() else 250).print(table)


@runs_app.command("ls")
def runs_ls(
    root: Optional[Path] = RootOpt,
    cache: Optional[Path] = typer.Option(None, help="Only runs trained on this cache folder."),
    head: str = typer.Option("", help="Only runs of this head (finetune runs: finetune-text4vis, ...)."),
    status: str = typer.Option("", help="Only runs in this state: running | finished | failed | interrupted | "
                                        "stopped | corrupt."),
    sort: str = typer.Option("started", help="Sort by: started | run | head | best_top1 | last_top1 | seconds | status."),
    reverse: bool = typer.Option(False, "--reverse", help="Reverse the order."),
    fmt: str = typer.Option("table", "--format", help="table | csv | json (every column) | md | latex (compact, "
                                                      "for a paper: seeds folded into mean +- std)"),
):
    """One row per run: head, options that differ from its defaults, cache, epochs, accuracy (and the paper's
    top-1 where the run's setting is one a paper published), time, status."""
    from pipeline.paper_table import PAPER_FORMATS, paper_rows, render_paper
    from pipeline.runs_table import FORMATS, RUN_COLUMNS, render, run_row, select_runs
    from stages.runs import RUN_STATES

    if fmt not in FORMATS + PAPER_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(dict.fromkeys(FORMATS + PAPER_FORMATS))}, got '{fmt}'")
    if status and status not in RUN_STATES:
        raise ConfigError(f"--status must be one of {', '.join(RUN_STATES)}, got '{status}'")
    runs = select_runs(_root(root), cache=cache, head=head, status=status, sort=sort, reverse=reverse)
    if fmt in PAPER_FORMATS:
        rows, left_out = paper_rows(runs, _root(root))
        typer.echo(render_paper(rows, fmt))
        if left_out:
            typer.echo(f"{left_out} unfinished run(s) left out (`pipeline runs ls` lists them)", err=True)
        return
    rows = [run_row(r) for r in runs]
    if fmt != "table":
        typer.echo(render(rows, fmt, (*RUN_COLUMNS, "path")))
        return
    if not rows:
        typer.echo(f"no runs under {_root(root)}" + (" matching the filters" if (cache or head or status) else ""))
        return
    _print_table(RUN_COLUMNS, rows)


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., help="Run folder, or its name (or a unique prefix) under --root."),
              root: Optional[Path] = RootOpt,
              as_json: bool = typer.Option(False, "--json", help="Print config, metrics and status as JSON.")):
    """Config, metrics, status and the files of one run; the paper's top-1 where its setting is published."""
    from pipeline.runs_table import changed_options, paper_result, resolve_run, run_row
    from stages.runs import OUTPUT_FILES

    rec = resolve_run(run, _root(root))
    if rec.problems:
        raise ConfigError(f"run {rec.path}: {rec.problems[0]}")
    if as_json:
        typer.echo(json.dumps({"path": str(rec.path), "state": rec.state, "status": rec.status,
                               "config": rec.config, "metrics": rec.metrics}, indent=1))
        return
    row = run_row(rec)
    typer.echo(f"run       {rec.path}")
    typer.echo(f"head      {rec.head}    status {row['status']}    epochs {row['epochs']}")
    typer.echo(f"cache     {rec.cache}" + (f"  (key {rec.cache_key})" if rec.cache_key else ""))
    if rec.source:
        typer.echo(f"source    {rec.source}")
    opts = changed_options(rec)
    typer.echo("options   " + (" ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "(head defaults)"))
    for key in ("top1", "top5", "mean_class"):
        best, last = rec.best(key), rec.last(key)
        if last is not None:
            typer.echo(f"{key:<9} last {last:.1f}%" + (f"  best {best:.1f}%" if best is not None else ""))
    paper = paper_result(rec)  # the paper's figure for this run's setting, where one was published
    if paper is not None:
        typer.echo(f"paper     top1 {paper['top1']:.1f}%" + (f"  top5 {paper['top5']:.1f}%" if paper["top5"] is not None
                                                              else "")
                   + f"  ({paper['source']}: {paper['dataset']}, {paper['backbone']} {paper['pretrained']}, "
                     f"{paper['frames']} frames {paper['sampling']}, {paper['views']} views)")
    for h in rec.history:
        val = (h.get("val") or {}).get("top1")
        loss = h.get("train_loss")
        typer.echo(f"  epoch {h.get('epoch')}: loss {'-' if loss is None else f'{loss:.4f}'}"
                   + ("" if val is None else f"  val top1 {val:.1f}%"))
    for name in ("config.json", "metrics.json", "curves.png", "last.pt", *OUTPUT_FILES):
        if (rec.path / name).exists():
            typer.echo(f"file      {rec.path / name}")
    if any(rec.path.glob("events.out.tfevents.*")):
        typer.echo(f"tensorboard --logdir {rec.path}")


@runs_app.command("compare")
def runs_compare(runs: list[str] = typer.Argument(..., help="Two or more runs (folders or names)."),
                 root: Optional[Path] = RootOpt,
                 out: Optional[Path] = typer.Option(None, help="Plot of their curves (default: "
                                                               "<root>/compare-<names>.png)."),
                 fmt: str = typer.Option("table", "--format", help="table | csv | json | md")):
    """A side-by-side table of the runs' differing options and metrics, and one plot of their curves."""
    from pipeline.runs_table import FORMATS, check_plot_path, compare_rows, plot_curves, render, resolve_run

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if len(runs) < 2:
        raise ConfigError("runs compare needs at least two runs")
    if out is not None:
        check_plot_path(out)  # before the table is printed
    recs = [resolve_run(r, _root(root)) for r in runs]
    bad = [r for r in recs if r.problems]
    if bad:
        raise ConfigError(f"run {bad[0].path}: {bad[0].problems[0]}")
    columns, rows = compare_rows(recs)
    if fmt == "table":
        _print_table(columns, rows)
    else:
        typer.echo(render(rows, fmt, tuple(columns)))
    path = out or _root(root) / ("compare-" + "-".join(r.name.split("-")[-1] for r in recs) + ".png")
    plot_curves(recs, path)
    typer.echo(f"curves: {path}", err=fmt != "table")
