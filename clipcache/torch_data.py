"""The torch half of clipcache's API (imported only by ``Features.dataset``)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["FeatureDataset"]


class FeatureDataset(Dataset):
    """Item i: (float32 tensor, label) of one array, or ({name: tensor}, label) of several
    (uint8 frames stay uint8). ``read(name, i)`` returns row i of array ``name`` as numpy."""

    def __init__(self, read, names: list[str], labels: np.ndarray, single: bool):
        self.read, self.names, self.single = read, list(names), single
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of a dataset of {len(self)} videos")
        i = i % len(self)
        out = {}
        for name in self.names:
            row = torch.from_numpy(np.array(self.read(name, i)))
            out[name] = row if row.dtype == torch.uint8 else row.float()
        return (out[self.names[0]] if self.single else out), self.labels[i]
