"""The dataset types: what stage one reads, named on the floor every stage can import.

A dataset, whatever layout it came from (pipeline/datasets/ reads the layouts), is one
`DatasetSpec`: the class names (line i is class i), ordered lists of `VideoItem` per split and the
files it was built from. Plain data, no torch: the cache records it and stage one walks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DatasetSpec", "VideoItem"]


@dataclass(frozen=True)
class VideoItem:
    path: str  # absolute path to a video file, or to a frame folder
    label: int
    num_frames: int | None = None  # set for frame folders (`dir <num_frames> <label>` lines)


@dataclass
class DatasetSpec:
    name: str
    classes: list[str]
    splits: dict[str, list[VideoItem]]  # keys among "train", "val", "test"; order = list order
    video_root: str
    sources: dict[str, str]  # what files it was built from (paths), for the cache metadata / key
    # the load_dataset arguments it was built with (absolute paths): what rebuilds it exactly
    args: dict = field(default_factory=dict)
    # a horizontal flip turns a clip of one class into one of its mirror class (cache/flips.py):
    # registered with the layout (Something-Something v2, the demo world), recorded in the cache metadata
    flip_swaps: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)
