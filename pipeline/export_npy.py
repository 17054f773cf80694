"""`pipeline cache export PATH --format npy`: the command's report (the export is cache/npy_export.py)."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["export_npy_command"]


def export_npy_command(path: Path, out: Path | None, splits: list[str], arrays: list[str], partial: bool) -> None:
    from cache.npy_export import export_npy
    from cache.files import human_bytes
    from cache.store import open_store

    st = open_store(path)
    dest = out or st.path.parent / f"{st.path.name}-npy"
    res = export_npy(st, dest, splits=splits or None, arrays=arrays or None, partial=partial)
    for split, entry in res["splits"].items():
        skipped = [f"{entry[k]} {k}" for k in ("failed", "pending") if entry[k]]
        typer.echo(f"{split}: {entry['videos']} videos, {len(entry['arrays'])} arrays ("
                   + ", ".join(entry["arrays"]) + ")" + (f"; not exported: {', '.join(skipped)}" if skipped else ""))
    typer.echo(f"export {dest}: {human_bytes(res['bytes'])} in {res['seconds']:.1f}s; index {dest / 'index.json'}")
