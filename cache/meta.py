"""What a cache's metadata says about how it was made, as a command that makes it again.

One function, ``extract_command(meta)``, shared by `cache info` ("made by"), the hints that
stage two prints when a cache lacks what a head needs, and `cache repair`: the printed
command names the data paths the cache was built from, so it runs as printed.
"""

from __future__ import annotations

import shlex

__all__ = ["extract_command"]

# extract options that say how fast or where, not what: left out of the rebuilding command
_RUNTIME_ONLY = {"batch_frames", "workers", "device"}
# boolean options whose flag is not --<name>
_BOOL_FLAGS = {"patch": "--patch", "store_frames": "--frames-uint8"}
_DATA_FLAGS = ("data_root", "video_root", "train_list", "val_list", "test_list", "classes", "split_id")


def extract_command(meta: dict, *, layers: list[int] | None = None, patch: bool | None = None,
                    frames_uint8: bool | None = None, out: str | None = None) -> str:
    """`pipeline extract ...` that rebuilds the cache of ``meta`` (its data paths included),
    optionally with more ``layers``, patch tokens or uint8 frames (what a head needs)."""
    cfg = dict(meta.get("config") or {})
    if layers is not None:
        cfg["layers"] = ",".join(map(str, sorted(set(layers)))) or "none"
    if patch is not None:
        cfg["patch"] = patch
    if frames_uint8 is not None:
        cfg["store_frames"] = frames_uint8
    dataset = meta.get("dataset") or {}
    parts = ["pipeline", "extract", "--dataset", str(dataset.get("name", "custom"))]
    args = dict(dataset.get("args") or {})
    if not args and dataset.get("video_root"):  # caches made before the arguments were recorded
        args = {"video_root": dataset["video_root"],
                **{f"{s}_list": p for s, p in (dataset.get("sources") or {}).items() if s in ("train", "val", "test")}}
        if (dataset.get("sources") or {}).get("classes"):
            args["classes"] = dataset["sources"]["classes"]
    for key in _DATA_FLAGS:
        if args.get(key) not in (None, ""):
            parts += [f"--{key.replace('_', '-')}", str(args[key])]
    for key, value in cfg.items():
        if key in _RUNTIME_ONLY or value in ("", None):
            continue
        if key in ("aug_seed", "aug_area") and cfg.get("train_aug") is None:  # no view bank: its seed and area say nothing
            continue
        if isinstance(value, bool):
            if value:
                parts.append(_BOOL_FLAGS.get(key, f"--{key.replace('_', '-')}"))
            continue
        if key == "shard_size" and value == 0:
            continue
        parts += [f"--{key.replace('_', '-')}", str(value)]
    if out:
        parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)
