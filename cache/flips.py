"""Which labels a horizontal flip changes: the mirror class pairs, read from the class names.

Something-Something v2 has classes that differ only by a direction ("Pushing something from left
to right" / "... from right to left"), the demo world classes that differ only by the sense of a
rotation ("... rotating clockwise" / "... rotating counter-clockwise"): a mirrored clip of one is
a clip of the other, so every
flip in training (the view bank's flipped views, online augmentation, stage three) must swap
the label, as the papers' SSv2 code does (SPEC section 7). Whether a dataset's flips swap labels
is registered with the dataset (``register_dataset(..., flip_swaps=True)``, pipeline/datasets/)
and recorded in the cache metadata (``DatasetMeta.flip_swaps``); the pairs themselves come from
the class names (``mirror_pairs``), never from fixed positions, so a reordered or reduced class
list pairs the right classes.

Plain Python on the lowest floor: stage one, stage two's readers, stage three and online
training all import it. No torch.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

__all__ = ["FLIP_COLUMN", "SWAPPING_BEFORE_RECORDED", "mirror_name", "mirror_pairs", "swap_table", "label_swaps",
           "flip_label", "flip_labels"]

FLIP_COLUMN = "flip"   # the view bank's parameter column that says a view was mirrored (stages.video)

# the built-in datasets whose flips swap labels, for caches made before DatasetMeta recorded it
SWAPPING_BEFORE_RECORDED = ("ssv2", "demo")

# the words a mirror turns into each other; the longer spellings of a rotation's sense come first
# so that 'counter-clockwise' is not read as 'counter-' + 'clockwise'
_UNDO = ("counter-clockwise", "counterclockwise", "anti-clockwise", "anticlockwise")
_WORDS = re.compile(r"\b(left|right|" + "|".join(_UNDO) + r"|clockwise)\b", re.IGNORECASE)


def _others(word: str) -> tuple[str, ...]:
    """The mirror spellings of one word, the first the one ``mirror_name`` writes."""
    low = word.lower()
    if low in ("left", "right"):
        return ("right" if low == "left" else "left",)
    if low == "clockwise":
        return _UNDO
    return ("clockwise",)


def _mirrors(name: str) -> list[str]:
    """Every spelling of ``name`` mirrored, the ``mirror_name`` one first (one per spelling of
    the other sense of rotation: 'clockwise' may mirror to 'counter-clockwise' or 'anticlockwise')."""
    parts = _WORDS.split(name)  # text, word, text, word, ..., text
    out = [""]
    for k, part in enumerate(parts):
        if k % 2 == 0:
            out = [o + part for o in out]
            continue
        spellings = [w.capitalize() if part[0].isupper() else w for w in _others(part)]
        out = [o + w for o in out for w in spellings]
    return out


def mirror_name(name: str) -> str:
    """``name`` as a horizontal mirror shows it: the whole words left and right exchanged, and
    clockwise with counter-clockwise (case kept as written).
    'Pushing something from left to right' -> 'Pushing something from right to left';
    'red square rotating clockwise' -> 'red square rotating counter-clockwise'."""
    return _mirrors(name)[0]


def mirror_pairs(classes: Sequence[str]) -> list[tuple[int, int]]:
    """(i, j), i < j, for each two classes whose names differ only by a mirror (left <-> right,
    clockwise <-> counter-clockwise, counterclockwise, anticlockwise); a name whose mirror is no
    class ('... pulling it right out ...') pairs with nothing."""
    index = {name: i for i, name in enumerate(classes)}
    pairs = []
    for i, name in enumerate(classes):
        j = next((index[m] for m in _mirrors(name) if m in index and index[m] != i), None)
        if j is not None and j > i:
            pairs.append((i, j))
    return pairs


def swap_table(classes: Sequence[str]) -> tuple[int, ...]:
    """The label a flipped clip of each class has: ``table[c]`` is c's mirror class, or c."""
    table = list(range(len(classes)))
    for i, j in mirror_pairs(classes):
        table[i], table[j] = j, i
    return tuple(table)


def label_swaps(classes: Sequence[str], flip_swaps: bool) -> tuple[int, ...] | None:
    """``swap_table(classes)`` for a dataset whose flips swap labels and that has a mirror pair;
    None when no label changes (flips not registered to swap, or no class with its mirror)."""
    if not flip_swaps:
        return None
    table = swap_table(classes)
    return table if table != tuple(range(len(classes))) else None


def flip_label(label: int, flipped: bool, swaps: Sequence[int] | None) -> int:
    """The label of a clip that was mirrored (``flipped``) or not, for a dataset whose flips
    swap labels (``swaps``: its ``swap_table``) or not (``swaps`` None or empty: unchanged)."""
    if not flipped or not swaps:
        return int(label)
    return int(swaps[int(label)])


def flip_labels(labels, flipped, swaps: Sequence[int] | None):
    """``flip_label`` over numpy arrays of labels and flip flags (the same shape): a new array."""
    labels = np.asarray(labels, dtype=np.int64)
    if not swaps:
        return labels.copy()
    return np.where(np.asarray(flipped, dtype=bool), np.asarray(swaps, dtype=np.int64)[labels], labels)
