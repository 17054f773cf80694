"""What a finished stage-two run keeps beside its metrics: per-class results, predictions, best.pt.

Written by rank 0 into the run folder, each file atomically (a temporary file renamed into
place), after the final evaluation of `pipeline train` on its eval split (val by default;
``--set eval_split=test`` makes them the test split's):

    per_class.csv     class, name, count, correct, top1 (percent) per evaluated class
    confusion.csv     counts: one row per true class, one column per predicted class (names)
    confusion.png     the same, each row normalised to 1, with the class names
    predictions.csv   per video: its index in the split, path, label (and name), whether the top
                      class is right, then the top-k classes, names and scores (k = min(5, K))
    best.pt           the checkpoint of the evaluated epoch with the highest val top-1 (a tie keeps
                      the earlier epoch), in last.pt's format

`pipeline evaluate --run RUN --split test` (on the run's own cache) writes the same three files
for that split into RUN/eval-test/.

The scores are those the evaluation ranks by: softmax probabilities averaged over the views, or
the cosine scores of the averaged embedding (``eval_average=embeddings``, a swapped classifier).
Class indices are those of the cache's class list (a run on a class subset keeps the originals);
names come from the cache metadata.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from cache.files import atomic_write_text
from cache.store import FeatureStore
from stages.runs import OUTPUT_FILES  # what a finished run keeps beside last.pt (re-exported)

__all__ = ["OUTPUT_FILES", "data_record", "is_new_best", "save_best", "best_epoch", "eval_outputs", "write_scores",
           "plot_confusion"]

TOP_K = 5


def data_record(store, split: str) -> dict:
    """What a paper table says of a run's data (metrics.json "data"): backbone, frames, evaluated views."""
    info = store.info
    views = info.views.get(split)
    return {"backbone": info.backbone.arch, "frames": int(info.dims.frames),
            "views": [int(views.clips), int(views.crops)] if views else None}


def _top1(entry: dict) -> float | None:
    val = entry.get("val") or {}
    v = val.get("top1", entry.get("val_top1"))
    return None if v is None else float(v)


def best_epoch(history: list[dict]) -> int | None:
    """The epoch of the highest val top-1 in ``history``; a tie keeps the earlier epoch."""
    best, epoch = None, None
    for h in history:
        v = _top1(h)
        if v is not None and (best is None or v > best):
            best, epoch = v, int(h["epoch"])
    return epoch


def is_new_best(history: list[dict]) -> bool:
    """Is the last entry of ``history`` (just evaluated) the best so far, strictly above every earlier one?"""
    return bool(history) and _top1(history[-1]) is not None and best_epoch(history) == int(history[-1]["epoch"])


def save_best(state: dict, run_dir: Path) -> None:
    """Write ``state`` (a checkpoint in last.pt's format) as run_dir/best.pt, atomically. The loop
    calls it before it writes last.pt: a kill in between redoes that epoch, and best.pt again."""
    from stages.checkpoint import save_checkpoint

    save_checkpoint(state, Path(run_dir) / "best.pt")


def eval_outputs(scores: np.ndarray, labels: np.ndarray, class_ids: list[int], names: list[str],
                 videos: list[int], paths: list[str]) -> dict[str, str]:
    """The csv files' text from an evaluation's (N, K) scores and (N,) labels (0..K-1 in the
    evaluated classes' order); ``class_ids`` / ``names``: each evaluated class's cache index and name."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    K = scores.shape[1]
    pred = scores.argmax(1)
    conf = np.zeros((K, K), dtype=np.int64)
    np.add.at(conf, (labels, pred), 1)

    def text(rows: list[list]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue()

    per_class = [["class", "name", "count", "correct", "top1"]]
    for k in range(K):
        n, right = int(conf[k].sum()), int(conf[k, k])
        per_class.append([class_ids[k], names[k], n, right, f"{100 * right / n:.2f}" if n else ""])
    confusion = [["true \\ predicted", *names]] + [[names[k], *conf[k].tolist()] for k in range(K)]
    k = min(TOP_K, K)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    head = ["video", "path", "label", "label_name", "correct"]
    for j in range(1, k + 1):
        head += [f"top{j}", f"top{j}_name", f"top{j}_score"]
    preds = [head]
    for i in range(len(labels)):
        row = [videos[i], paths[i], class_ids[labels[i]], names[labels[i]], int(pred[i] == labels[i])]
        for c in order[i]:
            row += [class_ids[c], names[c], f"{scores[i, c]:.6g}"]
        preds.append(row)
    return {"per_class.csv": text(per_class), "confusion.csv": text(confusion), "predictions.csv": text(preds),
            "_matrix": conf}


def plot_confusion(conf: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """confusion.png: rows normalised to 1, class names on both axes (left out past 60 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = conf.shape[0]
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=np.float64), where=rows > 0)
    side = min(max(4.0, 0.32 * K + 2.0), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if K <= 60:
        ax.set_xticks(range(K), names, rotation=90, fontsize=7)
        ax.set_yticks(range(K), names, fontsize=7)
        if K <= 20:
            for i in range(K):
                for j in range(K):
                    if conf[i, j]:
                        ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=6,
                                color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def write_scores(out_dir: Path, scores: np.ndarray, labels: np.ndarray, *, store, split: str, indices: np.ndarray,
                 classes: list[int] | None, title: str = "") -> None:
    """per_class.csv, confusion.csv / .png and predictions.csv of an evaluation's scores, into ``out_dir``."""
    all_names = store.class_names()
    class_ids = list(classes) if classes is not None else list(range(scores.shape[1]))
    names = [all_names[c] if c < len(all_names) else str(c) for c in class_ids]
    videos = [int(i) for i in np.sort(np.asarray(indices))] if len(indices) == len(labels) else list(range(len(labels)))
    items = store.items(split) if isinstance(store, FeatureStore) else []
    paths = [items[v][0] if v < len(items) else "" for v in videos]
    out = eval_outputs(scores, labels, class_ids, names, videos, paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("per_class.csv", "confusion.csv", "predictions.csv"):
        atomic_write_text(out_dir / name, out[name])
    plot_confusion(out["_matrix"], names, out_dir / "confusion.png", title or f"{out_dir.name} ({split})")
