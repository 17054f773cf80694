"""`pipeline cache ...`: the commands over feature caches (list, inspect, verify, repair, export,
finalize), and the report of an extraction that `extract` and `cache repair` print.

`cache ls`, `info` and `verify` import no torch (they read JSON, Zarr metadata and numpy arrays):
they answer at once (pipeline/cli.py's _TORCH_FREE).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from cache.errors import CacheError, ConfigError

cache_app = typer.Typer(no_args_is_help=True, help="Inspect feature caches.")


# ----------------------------------------------------------------------------- an extraction's report
def report_extraction(res, max_failed: float = 1.0) -> None:
    """What a run of stage one did (``res``: stages.extract.ExtractResult); exit 1 by --max-failed."""
    if res.reused:
        check_failures(res.summary, max_failed)
        return
    fps = res.frames / res.seconds if res.seconds else 0.0
    typer.echo(f"cache {res.path}: {res.videos} videos encoded, {res.failed} failed, "
               f"{res.frames} frames in {res.seconds:.1f}s ({fps:.0f} frames/s, "
               f"encoder busy {100 * res.encoder_busy:.0f}% of the encode phase)")
    if res.waiting_hint():
        typer.echo(res.waiting_hint())
    for split, fails in res.summary.get("failures", {}).items():
        for f in fails:
            typer.echo(f"  failed [{split}] {f['path']}: {f['reason']}")
    if not res.summary.get("complete", False):
        typer.echo("cache not complete yet (other shard ranges pending); run the remaining ranks, or rerun without --shard")
    check_failures(res.summary, max_failed)


def check_failures(summary: dict, max_failed: float) -> None:
    """After the summary: exit 1 when every video (or more than --max-failed of them) failed."""
    from cache.errors import RunFailedError
    from stages.extract import failure_verdict

    verdict = failure_verdict(summary, max_failed)
    if verdict:
        raise RunFailedError(f"extraction failed: {verdict}")


# ----------------------------------------------------------------------------- cache ls/info/verify
@cache_app.command("ls")
def cache_ls(root: Optional[Path] = typer.Argument(None, help="Cache root (default: artifacts/caches).")):
    """List the caches under a root."""
    from rich.console import Console
    from rich.table import Table

    from cache.files import human_bytes
    from cache.paths import default_cache_root
    from cache.store import list_stores

    if root is not None and not root.is_dir():
        raise CacheError(f"cache root {root} " + ("is not a folder" if root.exists() else "does not exist"))
    damaged: list[tuple[Path, str]] = []
    stores = list_stores(root or default_cache_root(), damaged)
    table = Table("cache", "dataset", "model", "layers", "dtype", "done", "failed", "pending", "size")
    rows = []
    for st in stores:
        try:
            meta = st.info
            done = failed = pending = 0
            for s in st.splits:
                c = st.counts(s)
                done, failed, pending = done + c["done"], failed + c["failed"], pending + c["pending"]
            rows.append((st.path.name, [meta.dataset.name, meta.backbone.arch, str(meta.layers), meta.dtype,
                                        str(done), str(failed), str(pending), human_bytes(st.size_bytes())]))
        except CacheError as exc:  # it opened, but its metadata or status arrays do not read
            damaged.append((st.path, str(exc)))
    for path, _why in damaged:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        rows.append((path.name, ["DAMAGED", "-", "-", "-", "-", "-", "-", human_bytes(size)]))
    for name, cells in sorted(rows):
        table.add_row(name, *cells)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: whole cache names, not 80 columns
    for path, why in sorted(damaged):
        typer.echo(f"damaged {path.name}: {why}")
    if not rows:
        typer.echo(f"no caches under {root or default_cache_root()}")


@cache_app.command("info")
def cache_info(path: Path = typer.Argument(..., help="Cache folder."),
               as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON.")):
    """Size, videos done/failed/pending, layers, dtype and how the cache was made."""
    from cache.meta import extract_command
    from cache.files import human_bytes
    from cache.store import open_store

    st = open_store(path)
    meta = st.info
    if as_json:
        typer.echo(json.dumps({"meta": st.meta, "summary": st.summary()}, indent=1))
        return
    cfg = meta.config
    typer.echo(f"cache     {st.path}")
    typer.echo(f"key       {st.key}")
    typer.echo(f"size      {human_bytes(st.size_bytes())}")
    typer.echo(f"dataset   {meta.dataset.name} ({meta.dims.num_classes} classes)")
    typer.echo(f"model     {meta.backbone.arch}  weights {meta.backbone.weights}")
    typer.echo(f"layers    {meta.layers}  patch tokens: {'yes' if cfg.patch else 'no'}  "
               f"frames: {'yes' if cfg.store_frames else 'no'}  dtype {meta.dtype}")
    views = ", ".join(f"{s} {v.clips}x{v.crops}" for s, v in meta.views.items())
    typer.echo(f"sampling  {cfg.frames} frames, {cfg.sampling}  views {views}")
    if meta.view_bank is not None:
        bank = meta.view_bank
        typer.echo(f"view bank {bank.split}: {bank.views} view(s) per video, seed {bank.seed}; {bank.describe()}")
    if meta.resize_to:
        typer.echo(f"resize    frames to {meta.resize_to[0]}x{meta.resize_to[1]} (H x W) before the crops")
    if meta.protocol:
        typer.echo(f"protocol  {meta.protocol.name}: {meta.protocol.paper}")
    swaps = meta.dataset.swap_table()
    if swaps is not None:
        pairs = ", ".join(f"{i}/{j}" for i, j in enumerate(swaps) if i < j)
        typer.echo(f"flips     swap the labels of the mirror classes {pairs} (flipped training views)")
    typer.echo(f"text      {', '.join(st.text_names()) or 'none'}")
    for s in st.splits:
        c = st.counts(s)
        typer.echo(f"{s:<9} {st.num_videos(s)} videos: done {c['done']}, failed {c['failed']}, pending {c['pending']}")
        for f in st.failures(s):
            typer.echo(f"          failed {f['path']}: {f['reason']}")
        records = st.video_records(s)
        if records:
            per = {}
            for r in records:
                per[r["decoder"]] = per.get(r["decoder"], 0) + 1
            typer.echo(f"          decoded by {', '.join(f'{k} {v}' for k, v in sorted(per.items()))}")
            paths = st.items(s)
            for r in records:
                if r["warnings"]:
                    typer.echo(f"          warning {paths[r['index']][0]}: {'; '.join(r['warnings'])}")
    typer.echo(f"made by   {extract_command(meta, out=str(st.path))}")


@cache_app.command("verify")
def cache_verify(path: Path = typer.Argument(..., help="Cache folder.")):
    """Check a cache: the files it was built with and every committed shard against their checksums, labels
    against the manifest, status against the shard records, done videos hold finite data, failures have reasons."""
    from cache.store import open_store

    st = open_store(path)
    problems = st.verify()
    for s in st.splits:
        c = st.counts(s)
        typer.echo(f"{s}: done {c['done']}, failed {c['failed']}, pending {c['pending']}")
    if problems:
        for p in problems[:50]:
            typer.echo(f"problem: {p}")
        if len(problems) > 50:
            typer.echo(f"problem: ... and {len(problems) - 50} more")
        raise CacheError(f"cache {path} failed verification: {len(problems)} problem(s); "
                         f"repair it with `pipeline cache repair {path}`")
    typer.echo("ok: status and data agree, no NaN/inf in done videos"
               + (", every file matches its checksum" if st.has_checksums else
                  " (made before checksums: files not checked)"))


@cache_app.command("repair")
def cache_repair(path: Path = typer.Argument(..., help="Cache folder."),
                 progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")):
    """Repair (and finish) a cache in place: rebuild its damaged files, redo its damaged or pending shards (and those
    with done videos holding NaN/inf: every check `cache verify` makes) with the extraction recorded in its
    metadata, then verify it."""
    import dataclasses

    from cache.meta import extract_command
    from cache.store import open_store
    from stages.extract import ExtractCfg, plan_extraction, run_extraction

    st = open_store(path)
    problems = st.verify()  # what `cache verify` checks, NaN/inf in done videos included
    if not problems and st.is_complete():
        typer.echo(f"ok: cache {path} is complete and verified, nothing to repair")
        return
    meta = st.info
    spec = _dataset_from_cache(st)
    known = {f.name for f in dataclasses.fields(ExtractCfg)}
    cfg = ExtractCfg(**{k: v for k, v in meta.config.to_dict().items() if k in known})
    plan = plan_extraction(spec, cfg, out=st.path) if spec is not None else None
    if plan is None or plan.key != st.key:
        raise CacheError(f"cannot rebuild the request of cache {path} from its metadata "
                         f"({'manifest damaged' if spec is None else 'the videos or lists changed'}); "
                         f"rerun the command that made it: {extract_command(meta, out=str(path))}")
    report_extraction(run_extraction(plan, shard=(0, 1), progress=progress, finite=True))
    typer.echo(f"ok: cache {path} repaired and verified")


def _dataset_from_cache(st):
    """The DatasetSpec a cache was extracted from, rebuilt from its manifest and metadata (None
    when the manifest is unreadable)."""
    from pipeline.datasets import DatasetSpec, VideoItem

    try:
        manifest = st.manifest
    except CacheError:
        return None
    ds = st.info.dataset
    counts = manifest.get("num_frames", {})
    splits = {}
    for split in st.splits:
        frames = counts.get(split) or [None] * len(manifest["splits"][split])
        splits[split] = [VideoItem(p, int(lab), n) for (p, lab), n in zip(manifest["splits"][split], frames)]
    return DatasetSpec(ds.name, list(ds.classes), splits, ds.video_root, dict(ds.sources))


# ----------------------------------------------------------------------------- scale out: export, finalize
@cache_app.command("export")
def cache_export(
    path: Path = typer.Argument(..., help="Cache folder."),
    format_: str = typer.Option("wds", "--format", help="Export format: wds (WebDataset tar shards) | npy (one "
                                "memory-mappable .npy per tap and split, and index.json)."),
    out: Optional[Path] = typer.Option(None, help="Folder for the export (default: <cache>-wds or <cache>-npy next "
                                                  "to the cache)."),
    shard_bytes: str = typer.Option("1GB", help="Shard size limit: 1GB, 500MB, 64MiB or bytes."),
    name: str = typer.Option("", help="Shard name prefix NAME (default: the cache folder's name)."),
    split: list[str] = typer.Option([], "--split", help="Export only this split (repeatable; default: all)."),
    partial: bool = typer.Option(False, "--partial", help="Export the done videos of an incomplete cache."),
    array: list[str] = typer.Option([], "--array", help="npy: export only this cache array (frame_emb, cls, patch, "
                                                        "frames; repeatable; default: all)."),
):
    """Export the done videos as WebDataset shards NAME-<split>-000000.tar plus NAME-header.json, or as .npy files."""
    from cache.files import human_bytes
    from cache.store import open_store
    from cache.wds import export_wds

    if format_ not in ("wds", "npy"):
        raise ConfigError(f"--format must be wds (WebDataset shards) or npy (numpy arrays), got '{format_}'")
    if format_ == "npy":
        from pipeline.export_npy import export_npy_command

        return export_npy_command(path, out, split, array, partial)
    if array:
        raise ConfigError("--array picks the arrays of an npy export (--format npy); a WebDataset export holds them all")
    st = open_store(path)
    dest = out or st.path.parent / f"{st.path.name}-wds"
    res = export_wds(st, dest, name=name or None, shard_bytes=shard_bytes, splits=split or None, partial=partial,
                     log=typer.echo)
    for s, info in res["splits"].items():
        c = info["counts"]
        typer.echo(f"{s}: {info['samples']} videos in {len(info['shards'])} shard(s)"
                   + (f" ({c['failed']} failed, {c['pending']} pending: not exported)" if c["failed"] or c["pending"]
                      else ""))
    typer.echo(f"export {dest}: {human_bytes(res['bytes'])} (cache {human_bytes(st.size_bytes())}) "
               f"in {res['seconds']:.1f}s")
    typer.echo(f"header {dest / (res['name'] + '-header.json')}")


@cache_app.command("finalize")
def cache_finalize(path: Path = typer.Argument(..., help="Cache folder written by several ranks or nodes.")):
    """After a multi-node extraction: check every video is done or failed, write summary.json."""
    from cache.files import human_bytes
    from cache.paths import keyed_root, mark_latest
    from cache.store import open_store

    st = open_store(path)
    pending = {s: st.pending_shards(s) for s in st.splits}
    if any(pending.values()):
        parts = []
        for s, shards in pending.items():
            for k in shards:
                a, b = st.shard_range(s, k)
                parts.append(f"{s} shard {k} (videos {a}-{b - 1})")
        n = sum(st.counts(s)["pending"] for s in st.splits)
        raise CacheError(f"cache {path} is not complete: {n} pending video(s) in {len(parts)} shard(s): "
                         f"{', '.join(parts[:20])}{' ...' if len(parts) > 20 else ''}; rerun the rank(s) that own "
                         "them with the same command and their --shard i/n")
    summary = st.write_summary()
    for s in st.splits:
        c = summary["splits"][s]
        typer.echo(f"{s}: done {c['done']}, failed {c['failed']}, pending 0")
        for f in summary["failures"][s]:
            typer.echo(f"  failed [{s}] {f['path']}: {f['reason']}")
    mark_latest(st.path, st.info.dataset.name, keyed_root(st.path, st.key))
    typer.echo(f"cache {st.path} complete ({human_bytes(summary['bytes'])}); summary {st.path / 'summary.json'}")
