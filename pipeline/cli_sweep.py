"""`pipeline sweep`: many `pipeline train` runs on one cache, in parallel, one table at the end
(the machinery is in pipeline/sweep.py)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Optional

import typer

from cache.errors import ConfigError, RunFailedError


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected integers separated by commas, got {text!r}") from None


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def sweep(
    head: str = typer.Option("", help="Head(s) to train, comma-separated: evl,side4video."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the last extracted cache of --dataset)."),
    dataset: str = typer.Option("demo", help="Dataset whose last cache is used when --cache is not given."),
    cache_root: Optional[Path] = typer.Option(None, help="Where keyed caches are (default artifacts/caches)."),
    set_: list[str] = typer.Option([], "--set", help="key=v1,v2,...: sweep a training or head option over these "
                                                     "values (one value: fixed for every run; a JSON list for values "
                                                     "with commas). Repeatable: the grid is every combination."),
    seeds: Optional[str] = typer.Option(None, help="Seeds, comma-separated: each setting runs once per seed "
                                                   "(default: the --grid file's seeds, else 0)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Experiment file (YAML) of lists: head, seeds and "
                                                             "option keys, each a value or a list (--set wins)."),
    recipe: str = typer.Option("paper", help="Recipe of every run (paper | quick | demo), as for `pipeline train`."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment file every run starts from, as for "
                                                                 "`pipeline train --config`."),
    epochs: Optional[int] = typer.Option(None, help="Epochs of every run (default: the recipe's)."),
    sample: int = typer.Option(0, help="Draw this many settings (head x values) at random from the grid (0: all)."),
    sample_seed: int = typer.Option(0, help="Seed of --sample's draw."),
    jobs: int = typer.Option(0, help="Runs at once (0: one per GPU, else one per CPU core; the cores are split "
                                     "evenly between them)."),
    out: Optional[Path] = typer.Option(None, help="Sweep folder (default: artifacts/sweeps/<cache>-<settings hash>)."),
    print_commands: bool = typer.Option(False, "--print-commands", help="Print one `pipeline train` command per "
                                        "run (for a scheduler: a Slurm array, ...) and run nothing; afterwards "
                                        "`--gather` prints the table."),
    gather_only: bool = typer.Option(False, "--gather", help="Train nothing: the table of the runs that finished."),
):
    """Train many runs on one cache (settings x heads x seeds) in parallel; mean +- std per setting."""
    import yaml
    from rich.console import Console

    from cache.paths import default_cache_root, latest_cache
    from pipeline import sweep as sw

    file = {}
    if grid is not None:
        try:
            file = yaml.safe_load(grid.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"--grid {grid}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--grid {grid}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(file, dict):
            raise ConfigError(f"--grid {grid}: expected a mapping of keys to values or lists")
    from_file = file.pop("head", None) or file.pop("heads", None) or []
    heads = [h.strip() for h in head.split(",") if h.strip()] if head else \
        [str(h) for h in (from_file if isinstance(from_file, list) else [from_file])]
    file.pop("heads", None)
    in_file = file.pop("seeds", None)
    if seeds is not None:  # given: wins over the file, as every flag does
        seed_list = _ints(seeds, "--seeds")
    elif in_file is not None:
        listed = in_file if isinstance(in_file, list) else [in_file]
        seed_list = _ints(",".join(map(str, listed)), f"--grid {grid} seeds")
    else:
        seed_list = [0]
    values = sw.parse_grid(set_, file)

    from stages.heads import get_head_entry
    from stages.train import split_overrides

    for h in heads:  # an unknown head or option: one line now, not one failed run per setting
        get_head_entry(h)
        split_overrides({k: v[0] for k, v in values.items()}, h, "--set", ("seeds", "grid"))

    if cache is None:
        root = cache_root or default_cache_root()
        cache = latest_cache(root, dataset)
        if cache is None:
            raise ConfigError(f"no cache given and none extracted yet for dataset '{dataset}' under {root}: run "
                              f"`pipeline extract --dataset {dataset} --data-root DIR` first, or pass --cache PATH")
    if not Path(cache).is_dir():
        raise ConfigError(f"cache {cache} does not exist (or is not a folder): pass --cache PATH of an extracted cache")
    base = ["--cache", str(Path(cache).resolve()), "--recipe", recipe]
    config_digest = ""
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"--config {config}: no such file")
        base += ["--config", str(config.resolve())]
        config_digest = hashlib.sha256(config.read_bytes()).hexdigest()
    if epochs is not None:
        base += ["--epochs", str(epochs)]
    out_dir = (out or sw.sweep_dir(Path(cache).name, heads, values, seed_list, base, config_digest)).resolve()
    runs = sw.plan_sweep(heads, values, seed_list, base, out_dir, sample, sample_seed)

    if print_commands:
        for run in runs:
            typer.echo(sw.command_line(run))
        typer.echo(f"# {len(runs)} runs; afterwards: the same `pipeline sweep` command with --gather --out {out_dir}",
                   err=True)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    failed, not_started = {}, 0
    if not gather_only:
        gpus = _gpus()
        n = jobs or sw.default_jobs(gpus)
        typer.echo(f"sweep {out_dir}: {len(runs)} runs ({len(runs) // len(seed_list)} settings x {len(seed_list)} "
                   f"seeds), {min(n, len(runs))} at once" + (f" on {gpus} GPU(s)" if gpus else " on CPU"))
        status = sw.run_commands(runs, min(n, len(runs)), sw.program(), out_dir / "logs", log=typer.echo, gpus=gpus)
        failed = {k: v for k, v in status.items() if v["rc"] not in (0, None)}
        not_started = sum(v["rc"] is None for v in status.values())
    rows = sw.gather(runs)
    keys, summary = sw.summarise(runs, rows)
    title = f"sweep on {Path(cache).name}: recipe {recipe}, seeds {','.join(map(str, seed_list))}"
    files = sw.write_tables(out_dir, rows, keys, summary, title)
    Console(width=None if sys.stdout.isatty() else 200).print(sw.sweep_table(keys, summary, title))
    typer.echo(f"tables: {files['summary_md']}, {files['summary_csv']}, {files['results']}")
    missing = [r["run_dir"] for r in rows if r["state"] != "done"]
    if failed:
        for name, st in failed.items():
            typer.echo(f"  failed {name}: {st['error']}  (log {st['log'] or '-'})", err=True)
        raise RunFailedError(f"{len(failed)} of {len(runs)} runs failed (their logs above)"
                             + (f", {not_started} not started" if not_started else "")
                             + "; rerun the same command to retry them (finished runs are reused)")
    other = [r["run_dir"] for r in rows if r["state"] == "other settings"]
    if other:
        typer.echo(f"{len(other)} run folder(s) hold a run with other settings, left out of the table: {other[0]}"
                   + (" ..." if len(other) > 1 else ""), err=True)
    if gather_only and len(missing) > len(other):
        typer.echo(f"{len(missing) - len(other)} of {len(runs)} runs not finished yet", err=True)
