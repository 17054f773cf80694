"""Where caches live: the artifacts root, the default cache root, the keyed cache name's root,
and the marker of the cache last completed per dataset."""

from __future__ import annotations

import os
from pathlib import Path

from cache.files import atomic_write_text

__all__ = ["artifacts_root", "default_cache_root", "latest_cache", "mark_latest", "keyed_root"]


def artifacts_root() -> Path:
    """The one folder every default location is under: $CLIPCACHE_ROOT (artifacts)."""
    return Path(os.environ.get("CLIPCACHE_ROOT", "artifacts"))


def default_cache_root() -> Path:
    """Where keyed caches go, for every command: $CLIPCACHE_ROOT/caches (artifacts/caches)."""
    return artifacts_root() / "caches"


def latest_cache(cache_root: Path, dataset: str) -> Path | None:
    """The cache last completed for ``dataset`` under ``cache_root`` (None if none or gone)."""
    marker = Path(cache_root) / f".latest-{dataset}"
    if marker.exists():
        path = Path(marker.read_text().strip())
        if path.exists():
            return path
    return None


def mark_latest(store_path: Path, dataset: str, cache_root: Path | None) -> None:
    """Record ``store_path`` as the latest complete cache of ``dataset`` in the cache root's own
    folder, where ``latest_cache`` reads it (best effort). ``cache_root``: the root a keyed cache was
    made under, or the one --cache-root names; None (a cache at an --out path of its own, no
    --cache-root) records nothing, so nothing is left beside the user's folder."""
    if cache_root is None:
        return
    try:
        Path(cache_root).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cache_root) / f".latest-{dataset}", str(Path(store_path).resolve()))
    except OSError:
        pass


def keyed_root(path: Path, key: str) -> Path | None:
    """The cache root a cache was made under when its folder is the keyed name extract gives it
    (``<dataset>-<model>-<key[:10]>``), else None (a folder the user named with --out)."""
    path = Path(path)
    return path.parent if path.name.endswith(f"-{key[:10]}") else None
