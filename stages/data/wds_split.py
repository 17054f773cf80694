"""Stage two from WebDataset shards: a streaming dataset that yields what CacheSplit yields.

``open_wds_source`` opens an export (cache/wds.py) from its header, a shard pattern, or both;
the result stands in for a FeatureStore in ``train_head`` (metadata, labels, text and aux arrays
come from the header and its extra tar) and builds a ``WdsSplit`` per split. A WdsSplit streams
its shards (local paths, http(s), ``pipe:`` commands: anything webdataset's gopen opens),
keeps only the selected videos, shuffles through a buffer, and turns each sample into the item
dict of CacheSplit: the same keys, shapes and dtypes, one view per sample in training (the same
view CacheSplit would draw for that video and epoch), every view with a leading V axis in
evaluation. Nothing is unpickled: members are .npy decoded with ``allow_pickle=False``, and
webdataset's decoders (which include pickle) are never used.

Scale out: shards are split across DataLoader workers, and across nodes when torch.distributed
is initialised (rank r of w reads shards r, r+w, ...); ``resample=True`` draws shards with
replacement instead (webdataset's ResampledShards), so every node streams an endless, differently
seeded sequence and an epoch is a fixed number of samples: the usual multi-node recipe when
shards do not divide evenly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import tarfile
import zlib
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from cache.errors import CacheError, CacheMismatchError
from cache.wds import (WdsCache, expand_shards, header_for, iter_tar_samples, load_npy, member_names, sample_array,
                       sample_info)
from stages.data.batch import epoch_seed, label_swap, pixel_stats, view_label, view_pick, view_tensor

__all__ = ["WdsSource", "WdsSplit", "open_wds_source", "node_info"]


def _gopen(url: str):
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def node_info() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def open_wds_source(spec: str, header: str | None = None, eval_spec: str | None = None,
                    train_split: str = "train", eval_split: str = "val", shuffle: int = 1000,
                    resample: bool = False, split_nodes: bool = True) -> "WdsSource":
    """Open an export for training.

    ``spec``: the export's header (``.../NAME-header.json``), or a pattern of ``train_split``
    shards (``.../NAME-train-{000000..000003}.tar``, '::'-joined lists too) whose header is
    ``header`` or, by default, ``NAME-header.json`` next to the first shard. ``eval_spec``: a
    pattern of ``eval_split`` shards (default: all of them, next to the header).
    """
    shards: dict[str, list[str]] = {}
    if spec.endswith(".json"):
        header = header or spec
    else:
        urls = expand_shards(spec)
        if not urls:
            raise CacheMismatchError(f"no shards in '{spec}'")
        header = header or header_for(urls[0])
        shards[train_split] = urls
    if eval_spec:
        shards[eval_split] = expand_shards(eval_spec)
    return WdsSource(header, shards=shards, shuffle=shuffle, resample=resample, split_nodes=split_nodes)


class WdsSource(WdsCache):
    """An export as a stage-two data source: FeatureStore's read API plus ``split_dataset``."""

    def __init__(self, header: str, shards: dict[str, list[str]] | None = None, shuffle: int = 1000,
                 resample: bool = False, split_nodes: bool = True, opener=_gopen):
        super().__init__(header, opener=opener, shards=shards)
        self.shuffle, self.resample, self.split_nodes = shuffle, resample, split_nodes

    def split_dataset(self, inputs, indices: np.ndarray, train: bool, label_map: dict[int, int] | None = None):
        """The streaming counterpart of ``CacheSplit(store, inputs, indices, train, label_map)``."""
        return WdsSplit(self, inputs, indices, train=train, label_map=label_map,
                        shuffle=self.shuffle if train else 0, resample=self.resample and train,
                        split_nodes=self.split_nodes and train)


class WdsSplit(IterableDataset):
    """Selected videos of one split, streamed from shards, as CacheSplit's item dicts."""

    def __init__(self, source: WdsCache, inputs, indices: np.ndarray, train: bool,
                 label_map: dict[int, int] | None = None, shuffle: int = 1000, resample: bool = False,
                 split_nodes: bool = True):
        super().__init__()
        self.source, self.inputs, self.train = source, inputs, train
        self.split = inputs.split
        self.indices = np.asarray(indices)
        self.pos = {int(v): i for i, v in enumerate(self.indices)}  # video index -> position (view draw)
        self.label_map = label_map
        self.shuffle, self.resample, self.split_nodes = int(shuffle), bool(resample), bool(split_nodes)
        specs = source.specs(self.split)
        self.wanted = wanted = inputs.array_names()
        self.stored = {n: specs[n].dtype for n in wanted}
        self.members = {"json"} | {m for n in wanted for m in member_names(n, specs[n].dtype)}
        # flipped views of mirrored classes (SSv2's left/right) swap labels: read each sample's view parameters
        self.swap = label_swap(source.info, self.split) if train else None
        if self.swap is not None:
            self.members |= set(member_names("view_params", specs["view_params"].dtype))
        self.mean, self.std = pixel_stats(source.info)
        self.views = specs[wanted[0]].shape[0] if wanted else 1
        self.epoch_seed = 0
        # only shards holding a selected video, in index order
        entries = source.shard_entries(self.split)
        sel = np.sort(self.indices)
        self.urls: list[str] = []
        self.counts: dict[str, int] = {}
        for url, e in entries.items():
            n = int(np.searchsorted(sel, e["last"], side="right") - np.searchsorted(sel, e["first"], side="left"))
            if n:
                self.urls.append(url)
                self.counts[url] = n
        if sum(self.counts.values()) != len(self.indices):
            raise CacheMismatchError(f"export {source.path}: {len(self.indices) - sum(self.counts.values())} "
                                     f"selected '{self.split}' video(s) are in none of the shards given")

    # ----------------------------------------------------------------- CacheSplit API
    def set_epoch(self, epoch: int, seed: int) -> None:
        self.epoch_seed = epoch_seed(epoch, seed)

    def _node(self) -> tuple[int, int]:
        return node_info() if self.split_nodes else (0, 1)

    def _node_urls(self) -> list[str]:
        rank, world = self._node()
        return self.urls[rank::world]

    def __len__(self) -> int:
        """Samples this node yields per epoch (all of them on one node)."""
        rank, world = self._node()
        if self.resample:
            return math.ceil(len(self.indices) / world)
        return sum(self.counts[u] for u in self._node_urls())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = self._node()
        worker, workers = _worker_info()
        rng = random.Random(f"{self.epoch_seed}-{rank}-{worker}")
        if self.resample:
            from webdataset import ResampledShards

            shards = ResampledShards(self.urls, seed=self.epoch_seed, deterministic=True,
                                     worker_seed=lambda: rank * 1000 + worker)
            limit = math.ceil(len(self) / workers)
            samples = self._samples(u["url"] for u in shards)
        else:
            urls = self._node_urls()
            if self.shuffle > 0:
                # one shard order for every worker (worker 0's, as with no workers), each then takes its
                # share: every shard read once an epoch (an order per worker read some twice, others never)
                urls = list(urls)
                (rng if worker == 0 else random.Random(f"{self.epoch_seed}-{rank}-0")).shuffle(urls)
            samples = self._samples(urls[worker::workers])
            limit = None
        if self.shuffle > 0:
            samples = _shuffled(samples, self.shuffle, rng)
        for n, sample in enumerate(samples):
            if limit is not None and n >= limit:
                break
            yield self._item(sample)

    def rank_subset(self, rank: int, world: int) -> "WdsSplit":
        """A copy that streams only shards rank, rank + world, ... (evaluation split across ranks:
        each shard is read by one rank; the scores are gathered, so the split need not be even)."""
        other = copy.copy(self)
        other.urls = self.urls[rank::world]
        return other

    def raw_view(self) -> "WdsSplit":
        """A copy whose items hold the arrays as stored (stages/data/loader.py converts them on the
        device): the drawn view (training) or every view, the head's layers, fp16 / uint8 as is
        and int8 as its parts NAME.q, NAME.scale, NAME.oidx, NAME.oval; same order, same videos."""
        other = copy.copy(self)
        other.raw = True
        return other

    def ordered(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every selected video once, in index order (closed-form heads fit on the whole set)."""
        for sample in self._samples(self.urls):
            yield self._item(sample)

    # ----------------------------------------------------------------- internals
    def _samples(self, urls) -> Iterator[dict[str, Any]]:
        """The selected samples of ``urls``, shard by shard. A shard must hold, whole, the samples
        its header entry counts: tar stops quietly at a cut-off header, so a truncated shard
        would otherwise just be shorter (a silently smaller training set); a damaged one is one
        CacheError naming it, never a traceback. Each member read is checked against the header
        (cache/wds.py ShardCheck): its size before it is read, its crc32c after."""
        for url in urls:
            try:
                stream = self.source.opener(url)
            except OSError as exc:
                raise CacheError(f"WebDataset shard {url} cannot be read ({exc.strerror or exc}): copy it again, or "
                                 "re-export the cache (pipeline cache export)") from None
            try:
                yield from self._shard_samples(url, stream)
            except BaseException:
                with contextlib.suppress(Exception):  # stopped early or failed: the stream's own status is moot
                    stream.close()
                raise
            try:
                stream.close()  # a pipe: command's exit status is checked here
            except OSError as exc:
                raise _damaged(url, f"{exc.__class__.__name__}: {str(exc)[:120]}") from None

    def _shard_samples(self, url: str, stream) -> Iterator[dict[str, Any]]:
        members = self.members
        entries = self.source.shard_entries(self.split)
        expected = entries[url]["samples"] if url in entries else None
        seen = 0
        samples = iter_tar_samples(stream, members.__contains__, self.source.shard_check(self.split, url), url)
        while True:
            try:
                sample = next(samples)
                info = sample_info(sample)
            except StopIteration:
                break
            except (tarfile.TarError, EOFError, ValueError, KeyError, zlib.error, OSError) as exc:
                raise _damaged(url, f"{exc.__class__.__name__}: {str(exc)[:120]}") from None
            seen += 1
            missing = sorted(members - set(sample))
            if missing:
                raise _damaged(url, f"sample {sample.get('__key__')} lacks {', '.join(missing[:3])}")
            if info["split"] != self.split:
                raise CacheMismatchError(f"{url}: sample of split '{info['split']}' "
                                         f"in shards given for '{self.split}'")
            if info["index"] in self.pos:
                sample["__info__"] = info
                yield sample
        if expected is not None and seen != expected:
            raise _damaged(url, f"{seen} of its {expected} samples could be read")

    def _item(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        try:
            return self._decode(sample)
        except ValueError as exc:  # a member that is not the .npy it was (bytes changed inside an intact tar)
            raise _damaged(sample.get("__url__", "?"), f"sample {sample.get('__key__')}: {exc.__class__.__name__}: "
                           f"{str(exc)[:120]}") from None

    def _decode(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        info = sample["__info__"]
        pick = view_pick(self.epoch_seed, self.pos[info["index"]], self.views, self.train)
        flipped = False
        if self.swap is not None:
            flipped = bool(load_npy(sample["view_params.npy"])[pick.start or 0, self.swap.column] > 0.5)
        label = view_label(int(info["label"]), flipped, self.swap, self.label_map)
        item: dict[str, torch.Tensor] = {"label": torch.tensor(label, dtype=torch.int64)}
        if getattr(self, "raw", False):
            for name in self.wanted:
                layers = self.inputs.layer_pos(name)
                index = (pick,) if layers is None else (pick, slice(None), layers)
                for part, arr in sample_parts(sample, name, self.stored[name], index).items():
                    item[f"{name}.{part}" if part else name] = torch.from_numpy(arr)
            return item
        for name in self.wanted:
            # select the view and the head's layers (axis 2 of (V, T, L, ...)) first; only they are converted
            layers = self.inputs.layer_pos(name)
            index = (pick,) if layers is None else (pick, slice(None), layers)
            arr = sample_array(sample, name, self.stored[name], np.float32, index)
            item[name] = view_tensor(name, arr, slice(None), self.train, self.mean, self.std)
        return item


def sample_parts(sample: dict[str, Any], name: str, dtype_stored: str, index: tuple = ()) -> dict[str, np.ndarray]:
    """One array of a sample as stored, ``index`` applied: {"": array} (fp16, uint8) or int8's
    parts {q, scale, oidx, oval}; writable copies of just the selection."""
    from cache.quant import QUANT_SUFFIXES
    from cache.wds import load_npy

    if dtype_stored == "int8":
        return {s: np.array(load_npy(sample[f"{name}.{s}.npy"])[index]) for s in QUANT_SUFFIXES}
    return {"": np.array(load_npy(sample[f"{name}.npy"])[index])}


def _damaged(url: str, what: str) -> CacheError:
    return CacheError(f"WebDataset shard {url} is truncated or damaged ({what}): copy it again, or re-export "
                      "the cache (pipeline cache export)")


def _shuffled(samples, bufsize: int, rng: random.Random):
    """Shuffle through a buffer of ``bufsize`` samples (webdataset's shuffle, with our seeded rng)."""
    buf: list = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        j = rng.randrange(len(buf))
        buf[j], s = s, buf[j]
        yield s
    rng.shuffle(buf)
    yield from buf
