"""Which labels a horizontal flip changes: the left/right class pairs, read from the class names.

Something-Something v2 has classes that differ only by a direction ("Pushing something from left
to right" / "... from right to left"): a mirrored clip of one is a clip of the other, so every
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

__all__ = ["FLIP_COLUMN", "SWAPPING_BEFORE_RECORDED", "mirror_name", "mirror_pairs", "swap_table", "flip_label", "flip_labels"]

FLIP_COLUMN = "flip"   # the view bank's parameter column that says a view was mirrored (stages.video)

# the built-in datasets whose flips swap labels, for caches made before DatasetMeta recorded it
SWAPPING_BEFORE_RECORDED = ("ssv2",)

_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_OTHER = {"left": "right", "right": "left"}


def mirror_name(name: str) -> str:
    """``name`` with the whole words left and right exchanged (case kept as written):
    'Pushing something from left to right' -> 'Pushing something from right to left'."""

    def swap(m: re.Match) -> str:
        word = m.group(0)
        other = _OTHER[word.lower()]
        return other.capitalize() if word[0].isupper() else other

    return _SIDE.sub(swap, name)


def mirror_pairs(classes: Sequence[str]) -> list[tuple[int, int]]:
    """(i, j), i < j, for each two classes whose names differ only by left <-> right; a name
    whose mirror is no class ('... pulling it right out ...') pairs with nothing."""
    index = {name: i for i, name in enumerate(classes)}
    pairs = []
    for i, name in enumerate(classes):
        j = index.get(mirror_name(name))
        if j is not None and j > i:
            pairs.append((i, j))
    return pairs


def swap_table(classes: Sequence[str]) -> tuple[int, ...]:
    """The label a flipped clip of each class has: ``table[c]`` is c's mirror class, or c."""
    table = list(range(len(classes)))
    for i, j in mirror_pairs(classes):
        table[i], table[j] = j, i
    return tuple(table)


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
