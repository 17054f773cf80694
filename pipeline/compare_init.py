"""The Text4Vis classifier-initialisation ablation (arXiv:2207.01297, Table 4) as one call.

One cache, one head with a classifier matrix W; one training per (initialisation, seed, shot
count, frozen/tuned W). Everything lands in one folder so the ablation is self-contained:

    <out>/runs/<init>-s<seed>-k<shots>-<frozen|tuned>/   each run (stage two's run folder)
    <out>/results.csv      one row per run
    <out>/summary.csv/.md  mean and spread (sample std over seeds, n) per init x shots x W
    <out>/table.csv/.md    the same top-1 as the paper prints it: rows = init, columns = shots
                           (1 / 2 / ... / all), one block per W (frozen, tuned)
    <out>/curves.png       val top-1 vs epoch per init, mean over seeds (convergence speed)
    <out>/correlation_<init>.png   inter-class cosine correlation of each initial W

The default folder is ``artifacts/compare-init/<cache name>-<hash>``. The hash covers what
changes the result of a single run (cache key, resolved head and training options) and not
the grid (inits, seeds, shots, frozen), so widening the grid later reuses the runs already
there. A run is reused when its ``metrics.json`` exists and its ``config.json`` matches the
settings asked for; a run with a checkpoint but no metrics (killed) resumes; a run whose
settings differ (an explicit ``out_dir`` reused with other options) is trained again.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from cache.errors import ConfigError
from cache.files import atomic_write_text
from cache.paths import artifacts_root
from cache.store import FeatureStore, open_store
from stages.classifiers import CLASSIFIER_INITS, classifier_matrix
from stages.data.zarr_split import select_videos
from stages.heads import get_head_entry, list_heads
from stages.runs import finished_metrics
from stages.train import TrainCfg, build_head, classifier_options, parse_class_spec, resolve_train, train_head

__all__ = ["compare_init", "classifier_heads", "correlation_matrix", "paper_table", "summary_table", "run_name"]

METRICS = ("top1", "top5", "mean_class")
_GRID_TRAIN_KEYS = {"head": "--head", "classifier_init": "--inits", "seed": "--seeds", "shots": "--shots"}


def _w_label(frozen: bool) -> str:
    return "frozen" if frozen else "tuned"


def run_name(init: str, seed: int, shots: int, frozen: bool) -> str:
    return f"{init}-s{seed}-k{shots}-{_w_label(frozen)}"


def classifier_heads() -> list[str]:
    """Registered heads that classify with a matrix W (and so take a classifier init)."""
    return [n for n in list_heads() if get_head_entry(n).head_cls.has_classifier]


def correlation_matrix(w) -> np.ndarray:
    """Inter-class cosine correlation of W: (K, E) -> (K, K). Templates (K, M, E) are averaged
    after normalisation, as the evaluation does."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 3:
        w = (w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)).mean(1)  # (K, M, E) -> (K, E)
    w = w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    return w @ w.T


def _train_classes(store: FeatureStore, cfg: TrainCfg) -> list[int] | None:
    """The classes a run trains on (the trainer's rule: --test-classes alone means the rest)."""
    K_all = store.info.dims.num_classes
    train_classes = parse_class_spec(cfg.train_classes, K_all)
    test_classes = parse_class_spec(cfg.test_classes, K_all)
    if test_classes is not None and train_classes is None:
        train_classes = [c for c in range(K_all) if c not in test_classes]
    return train_classes


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _unique(values, what: str) -> list:
    out = list(dict.fromkeys(values))
    if not out:
        raise ConfigError(f"compare-init needs at least one {what}")
    return out


def compare_init(cache_path, *, head: str = "text4vis", inits=CLASSIFIER_INITS, seeds=(0, 1, 2), shots=(1, 2, 0),
                 frozen=(True, False), epochs: int | None = None, head_overrides: dict | None = None,
                 train_overrides: dict | None = None, recipe: str | None = None, file: dict | None = None,
                 where: str = "config file", out_dir=None, corr_classes: int = 20, progress: bool = False,
                 jobs: int = 1,
                 log=print) -> dict:
    """Train ``head`` once per (init, seed, shots, frozen) on one cache; write tables and plots.

    ``shots`` 0 = all training videos; ``frozen`` True keeps W as initialised, False trains it
    (the head's ``trainable_classifier`` option). The other options resolve as `pipeline train`'s
    (stages.train.resolve_train): TrainCfg's defaults < the head's ``recipe`` (None: none) <
    ``file`` (an experiment file's keys, named ``where`` in an error; the grid's own keys in it
    are left to the grid) < ``train_overrides`` / ``head_overrides`` (--set) < ``epochs``; then
    the cache's test protocol. Returns {"out_dir", "results", "summary", "correlation", "files", ...}.
    """
    store = cache_path if isinstance(cache_path, FeatureStore) else open_store(cache_path)
    head_overrides = dict(head_overrides or {})
    train_overrides = dict(train_overrides or {})

    # ---- validate everything before the first training
    entry = get_head_entry(head)  # unknown head -> ConfigError listing them
    if not entry.head_cls.has_classifier:
        raise ConfigError(f"head '{head}' has no classifier matrix W to initialise; "
                          f"compare-init works with: {', '.join(classifier_heads())}")
    inits = _unique(inits, "classifier init")
    bad = [i for i in inits if i not in CLASSIFIER_INITS]
    if bad:
        raise ConfigError(f"unknown classifier init {', '.join(repr(b) for b in bad)}; "
                          f"choose from {', '.join(CLASSIFIER_INITS)}")
    seeds = [int(s) for s in _unique(seeds, "seed")]
    shots = [int(k) for k in _unique(shots, "shot count")]
    if any(k < 0 for k in shots):
        raise ConfigError(f"shots must be >= 0 (0 = all training videos), got {shots}")
    frozen = [bool(f) for f in _unique(frozen, "frozen/tuned setting")]
    if int(jobs) < 1:
        raise ConfigError(f"jobs must be >= 1 (1: in this process), got {jobs}")
    if corr_classes < 0:
        raise ConfigError(f"corr_classes must be >= 0 (0 = no correlation maps), got {corr_classes}")
    for key, flag in _GRID_TRAIN_KEYS.items():
        if key in train_overrides:
            raise ConfigError(f"'{key}' is set by compare-init itself: use {flag} instead of --set {key}=...")
    if "trainable_classifier" in head_overrides:
        raise ConfigError("'trainable_classifier' is set by compare-init itself: use --frozen frozen|tuned|both")
    train_fields = {f.name for f in dataclasses.fields(TrainCfg)}
    unknown = sorted(set(train_overrides) - train_fields)
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(train_fields))}")
    grid = {*_GRID_TRAIN_KEYS, "trainable_classifier"}  # a run's config.yaml holds them: the grid sets them
    file = {k: v for k, v in (file or {}).items() if k.split(".")[-1] not in grid}
    sets = {**{f"train.{k}": v for k, v in train_overrides.items()},
            **{f"head.{k}": v for k, v in head_overrides.items()}}
    resolved = resolve_train(head, recipe, file=file, sets=sets, cache=store, where=where,
                             flags=None if epochs is None else {"epochs": int(epochs)})
    base, head_overrides = resolved.cfg, resolved.head
    for line in resolved.lines:
        log(line)
    if base.epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {base.epochs}")

    cfg_fields = {f.name for f in dataclasses.fields(entry.cfg_cls)}
    if False in frozen and "trainable_classifier" not in cfg_fields:
        raise ConfigError(f"head '{head}' keeps its classifier frozen (no trainable_classifier option): "
                          f"use --frozen frozen")
    train_classes = _train_classes(store, base)
    K = len(train_classes) if train_classes is not None else store.info.dims.num_classes
    heads_by_w = {}
    for fz in frozen:
        over = dict(head_overrides)
        if "trainable_classifier" in cfg_fields:
            over["trainable_classifier"] = not fz
        heads_by_w[fz] = build_head(head, store, over, num_classes=K)
        if heads_by_w[fz].num_trainable() == 0:
            hint = " or --frozen tuned" if "trainable_classifier" in cfg_fields else ""
            raise ConfigError(f"head '{head}' has no trainable parameters with a frozen W and these options "
                              f"(a parameter-free temporal module?): pick one with parameters{hint}")
    for k in shots:  # too many shots: the trainer's DatasetError, before any run starts
        select_videos(store, base.train_split, shots=k, fraction=base.fraction, classes=train_classes, seed=seeds[0])

    # ---- the output folder
    head_cfg = {fz: _jsonable({"name": head, **dataclasses.asdict(h.cfg)}) for fz, h in heads_by_w.items()}
    run_settings = {"cache_key": store.key, "head": {k: v for k, v in next(iter(head_cfg.values())).items()
                                                     if k != "trainable_classifier"},
                    "train": {k: v for k, v in dataclasses.asdict(base).items() if k not in _GRID_TRAIN_KEYS}}
    digest = hashlib.sha256(json.dumps(run_settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    if out_dir is None:
        out_dir = artifacts_root() / "compare-init" / f"{store.path.name}-{digest}"
    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)

    # ---- the runs
    grid = [(i, fz, k, s) for i in inits for fz in frozen for k in shots for s in seeds]
    rows, histories = [], {}
    plans = []  # (n, grid point, cfg, name, run_dir, state, finished result or None, head options)
    for n, (init, fz, k, seed) in enumerate(grid, 1):
        cfg = dataclasses.replace(base, classifier_init=init, seed=seed, shots=k)
        name = run_name(init, seed, k, fz)
        run_dir = out_dir / "runs" / name
        expected = {"train": _jsonable(dataclasses.asdict(cfg)), "head": head_cfg[fz], "cache_key": store.key}
        res, state = _finished_run(run_dir, expected)
        over = dict(head_overrides)
        if "trainable_classifier" in cfg_fields:
            over["trainable_classifier"] = not fz
        if res is None and state == "changed":  # drop the old results first: a kill mid-run must not leave them
            log(f"[{n}/{len(grid)}] {name}: the run folder holds other settings; training again")
            for stale in ("metrics.json", "last.pt"):
                (run_dir / stale).unlink(missing_ok=True)
        plans.append((n, (init, fz, k, seed), cfg, name, run_dir, state, res, over))
    todo = [p for p in plans if p[6] is None]
    if jobs > 1 and len(todo) > 1:  # the runs in parallel processes, each on its share of the cores
        done = _train_in_pool(store.path, todo, jobs, resolved.sources, log, len(grid))
    else:
        done = {}
        for n, point, cfg, name, run_dir, state, _, over in todo:
            done[name] = train_head(store, cfg, over, run_dir=run_dir, resume=state == "resume", progress=progress,
                                    log=log, sources=resolved.sources)
    for n, (init, fz, k, seed), cfg, name, run_dir, state, res, over in plans:
        res = res if res is not None else done[name]
        fin = res["final"]
        log(f"[{n}/{len(grid)}] {name}: top1 {fin['top1']:.1f}%  top5 {fin['top5']:.1f}%  "
            f"mean-class {fin['mean_class']:.1f}%  " + ("(reused)" if state == "done" else f"({res['seconds']:.1f}s)"))
        rows.append({"init": init, "seed": seed, "shots": k, "classifier": _w_label(fz),
                     **{m: float(fin[m]) for m in METRICS}, "train_videos": res["train_videos"],
                     "eval_videos": res["eval_videos"], "trainable_params": res["trainable_params"],
                     "epochs": cfg.epochs, "seconds": round(float(res["seconds"]), 3),
                     "reused": state == "done", "run_dir": str(Path("runs") / name)})
        histories[(init, fz, k, seed)] = res["history"]

    summary = _summarise(rows, inits, shots, frozen)

    # ---- the initial W of each init, and its inter-class correlation
    corr_shots = 0 if 0 in shots else max(shots)
    corr = {}
    if corr_classes:
        cfg0 = dataclasses.replace(base, seed=seeds[0], shots=corr_shots)
        train_idx = select_videos(store, cfg0.train_split, shots=corr_shots, fraction=cfg0.fraction,
                                  classes=train_classes, seed=cfg0.seed)
        names_all = store.class_names()
        class_ids = train_classes if train_classes is not None else list(range(len(names_all)))
        pick = np.unique(np.linspace(0, K - 1, min(corr_classes, K)).round().astype(int))
        for init in inits:
            w = classifier_matrix(init, store, heads_by_w[frozen[0]], train_classes, train_idx,
                                  **classifier_options(cfg0)).numpy()
            c = correlation_matrix(w)
            off = c[~np.eye(K, dtype=bool)]
            corr[init] = {"matrix": c[np.ix_(pick, pick)], "classes": [names_all[class_ids[i]] for i in pick],
                          "mean_abs_offdiag": float(np.abs(off).mean()) if off.size else 0.0,
                          "run": run_name(init, seeds[0], corr_shots, frozen[0])}

    # ---- files
    files = {"results": out_dir / "results.csv", "summary_csv": out_dir / "summary.csv",
             "summary_md": out_dir / "summary.md", "table_csv": out_dir / "table.csv",
             "table_md": out_dir / "table.md", "curves": out_dir / "curves.png"}
    atomic_write_text(files["results"], _csv(rows))
    atomic_write_text(files["summary_csv"], _csv(summary))
    info = {"cache": str(store.path), "head": head, "epochs": base.epochs, "seeds": seeds,
            "head_overrides": head_overrides, "train_overrides": train_overrides}
    atomic_write_text(files["summary_md"], _summary_md(summary, corr, info))
    table = paper_table(summary)
    atomic_write_text(files["table_csv"], _csv(table["rows"]))
    atomic_write_text(files["table_md"], _table_md(table, info))
    _plot_curves(histories, inits, shots, frozen, seeds, files["curves"], head)
    for init, c in corr.items():
        files[f"correlation_{init}"] = out_dir / f"correlation_{init}.png"
        _plot_correlation(c, init, files[f"correlation_{init}"])
    return {"out_dir": out_dir, "results": rows, "summary": summary, "correlation": corr,
            "files": {k: Path(v) for k, v in files.items()}, "head": head, "epochs": base.epochs,
            "cache": str(store.path), "seeds": seeds}


def _train_one(cache: str, cfg, over: dict, run_dir: str, resume: bool, sources: dict, threads: int) -> dict:
    """One run of the grid in a worker process (``jobs`` > 1), on ``threads`` torch threads unless
    the config pins its own."""
    import torch

    if not cfg.threads:
        torch.set_num_threads(threads)
    return train_head(cache, cfg, over, run_dir=run_dir, resume=resume, progress=False, log=lambda *a, **k: None,
                      sources=sources)


def _train_in_pool(cache: Path, todo: list, jobs: int, sources: dict, log, total: int) -> dict:
    """The grid's unfinished runs in ``jobs`` processes (spawned: no torch state forked); each
    gets cores // jobs threads. A stop (Ctrl-C reaches the workers too) cancels what has not started;
    a rerun resumes the rest, as it would in one process."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    log(f"compare-init: {len(todo)} runs in {jobs} processes ({threads} thread(s) each)")
    out = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_one, str(cache), cfg, over, str(run_dir), state == "resume", sources,
                               threads): name for n, point, cfg, name, run_dir, state, _, over in todo}
        try:
            for fut in as_completed(futures):
                out[futures[fut]] = fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return out


def _finished_run(run_dir: Path, expected: dict) -> tuple[dict | None, str]:
    """(metrics, state): state is done (reuse), resume (same settings, not finished), changed, new."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        return None, "new"
    try:
        have = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None, "changed"
    same = all(have.get(k) == v for k, v in expected.items())
    if not same:
        return None, "changed"
    done = finished_metrics(run_dir)  # a stopped run's metrics.json (no "final") resumes instead
    if done is not None:
        return done, "done"
    return None, "resume"


# ----------------------------------------------------------------------------- tables
def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else
                             ("" if isinstance(v, float) else v)) for k, v in r.items()})
    return buf.getvalue()


def _summarise(rows: list[dict], inits, shots, frozen) -> list[dict]:
    """Mean and sample std (ddof=1; NaN for one seed) over seeds per init x shots x W."""
    out = []
    for init in inits:
        for fz in frozen:
            for k in shots:
                group = [r for r in rows if r["init"] == init and r["shots"] == k and r["classifier"] == _w_label(fz)]
                row = {"init": init, "shots": k, "classifier": _w_label(fz), "n": len(group)}
                for m in METRICS:
                    v = np.array([r[m] for r in group], dtype=np.float64)
                    row[f"{m}_mean"] = float(v.mean())
                    row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
                out.append(row)
    return out


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def _shots_label(k: int) -> str:
    return "all" if k == 0 else str(k)


def _summary_md(summary: list[dict], corr: dict, info: dict) -> str:
    lines = [f"# Classifier initialisation ablation: {info['head']}", "",
             f"cache `{info['cache']}`, {info['epochs']} epochs, seeds {', '.join(map(str, info['seeds']))}"
             + (f", head options {info['head_overrides']}" if info["head_overrides"] else "")
             + (f", training options {info['train_overrides']}" if info["train_overrides"] else ""), "",
             "Accuracy (%) on the evaluation split: mean ± sample std over seeds (n runs).", "",
             "| init | shots | W | n | top-1 | top-5 | mean-class |", "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['init']} | {_shots_label(r['shots'])} | {r['classifier']} | {r['n']} | "
                     + " | ".join(_fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in METRICS) + " |")
    if corr:
        lines += ["", "Mean |cosine| between the rows of the initial W of different classes "
                      "(the correlation maps; 0 = mutually orthogonal classes):", "",
                  "| init | mean abs off-diagonal | from run |", "|---|---|---|"]
        for init, c in corr.items():
            lines.append(f"| {init} | {c['mean_abs_offdiag']:.3f} | {c['run']} |")
    return "\n".join(lines) + "\n"


def _shot_order(shots) -> list[int]:
    """Shot counts as the paper's columns: 1, 2, ... then all (0) last."""
    return sorted(set(shots), key=lambda k: (k == 0, k))


def paper_table(summary: list[dict], metric: str = "top1") -> dict:
    """``metric`` as Text4Vis prints its Table 4: one row per init, one column per shot count
    (1 / 2 / ... / all), one block per W setting (frozen, tuned). Returns {"columns", "blocks",
    "rows"}: ``blocks`` maps a W label to {init: {shots: (mean, std, n)}}, ``rows`` is the flat
    csv form (one row per W x init, a mean and a std column per shot count)."""
    shots = _shot_order(r["shots"] for r in summary)
    blocks: dict[str, dict[str, dict[int, tuple[float, float, int]]]] = {}
    for r in summary:
        cell = (r[f"{metric}_mean"], r[f"{metric}_std"], r["n"])
        blocks.setdefault(r["classifier"], {}).setdefault(r["init"], {})[r["shots"]] = cell
    rows = []
    for w, inits in blocks.items():
        for init, cells in inits.items():
            row: dict = {"W": w, "init": init}
            for k in shots:
                mean, std, n = cells.get(k, (float("nan"), float("nan"), 0))
                row[f"{_shots_label(k)}_mean"], row[f"{_shots_label(k)}_std"] = mean, std
            row["n"] = min(c[2] for c in cells.values())
            rows.append(row)
    return {"metric": metric, "columns": shots, "blocks": blocks, "rows": rows}


def _shots_header(k: int) -> str:
    return "all" if k == 0 else f"{k} shot" + ("s" if k > 1 else "")


def _table_md(table: dict, info: dict) -> str:
    cols = table["columns"]
    lines = [f"# {info['head']}: classifier initialisation, top-1 (%)", "",
             f"Mean ± sample std over seeds {', '.join(map(str, info['seeds']))}; cache `{info['cache']}`, "
             f"{info['epochs']} epochs. Rows: the initialisation of W; columns: training videos per class."]
    for w, inits in table["blocks"].items():
        lines += ["", f"W {w}:", "", "| W init | " + " | ".join(_shots_header(k) for k in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for init, cells in inits.items():
            lines.append(f"| {init} | " + " | ".join(_fmt(*cells[k][:2]) if k in cells else "" for k in cols) + " |")
    return "\n".join(lines) + "\n"


def summary_table(result: dict) -> list:
    """The top-1 table as the paper prints it, as rich Tables (one per W setting): rows = init,
    columns = shot counts, mean ± std over seeds, the best of each column in bold. A caption
    line (head, epochs, seeds) comes first."""
    from rich.table import Table

    table = paper_table(result["summary"])
    cols = table["columns"]
    out: list = [f"{result['head']} classifier initialisation, {result['epochs']} epochs, mean ± std over seeds "
                 f"{','.join(map(str, result['seeds']))}"]
    for w, inits in table["blocks"].items():
        best = {k: max((c[k][0] for c in inits.values() if k in c), default=None) for k in cols}
        t = Table("W init", *(_shots_header(k) for k in cols), title=f"W {w}: top-1 (%)")
        for init, cells in inits.items():
            row = []
            for k in cols:
                text = _fmt(*cells[k][:2]) if k in cells else ""
                row.append(f"[bold]{text}[/bold]" if k in cells and len(inits) > 1 and cells[k][0] == best[k] else text)
            t.add_row(init, *row)
        out.append(t)
    return out


# ----------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _val_curve(history: list[dict]) -> dict[int, float]:
    return {h["epoch"]: h["val"]["top1"] for h in history if h.get("val")}


def _plot_curves(histories: dict, inits, shots, frozen, seeds, path: Path, head: str) -> None:
    """Val top-1 vs epoch, one line per init (mean over seeds, band = ±1 std); rows = W frozen/tuned,
    columns = shot counts."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    nrows, ncols = len(frozen), len(shots)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols + 1.6, 3.3 * nrows), squeeze=False)
    for r, fz in enumerate(frozen):
        for c, k in enumerate(shots):
            ax = axes[r, c]
            for init in inits:
                curves = [_val_curve(histories[(init, fz, k, s)]) for s in seeds]
                epochs = sorted(set.intersection(*(set(cv) for cv in curves)))
                if not epochs:
                    continue
                v = np.array([[cv[e] for e in epochs] for cv in curves])  # (seeds, epochs)
                mean = v.mean(0)
                line, = ax.plot(epochs, mean, marker="o", ms=3, label=init)
                if len(seeds) > 1:
                    std = v.std(0, ddof=1)
                    ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
            ax.set(title=f"{'all data' if k == 0 else f'{k}-shot'}, {_w_label(fz)} W", xlabel="epoch",
                   ylabel="val top-1 (%)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="W init", title_fontsize=8)
    fig.suptitle(f"{head}: convergence per classifier init (mean ± std over {len(seeds)} seed(s))", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (4.4 * ncols + 1.6), 1))
    _save(fig, path)
    plt.close(fig)


def _plot_correlation(c: dict, init: str, path: Path) -> None:
    plt = _pyplot()
    m, names = c["matrix"], [n if len(n) <= 22 else n[:21] + "…" for n in c["classes"]]
    n = len(names)
    size = max(4.0, 0.32 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="coolwarm")
    font = max(5, min(9, int(200 / max(n, 1))))
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_title(f"W init '{init}': inter-class cosine ({n} classes)\nmean |off-diag| over all classes "
                 f"{c['mean_abs_offdiag']:.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
