"""Online training (``train --online``): the train split streamed from the raw videos a cache was
extracted from, through the frozen backbone it records, as the batch dicts the cache's loader gives.

What the cache records decides everything but the augmentation: the same videos and labels (the
split's manifest), the same sampling, input size and short-side resize, the same model and
weights (checked against the recorded weights id), taps, patch tokens and uint8 frames; the
features are passed through the cache's storage dtype (fp16, or int8's quantisation) and converted
by ``stages.data.loader.device_batch``, so a batch has the keys, shapes, dtypes and conversions
of the cache's. Videos are decoded in DataLoader workers (``workers``), the backbone runs in the
main process under ``torch.inference_mode``.

The view each video gets (``ONLINE_AUGS``):

- ``none``: the cache's own views, decoded and cropped exactly as extraction did (fixed views, or
  the view bank's draws from ``view_rngs``): the control, which trains as the plain cache does;
- ``light``: a fresh ``augmented_views`` draw with ``AugViewCfg()`` (the view bank's light draw);
- ``paper``: a fresh draw with the head's official train pipeline
  (``stages.heads.registry.train_pipeline_for(head, "paper")``: RandAugment, crops, flip, jitter,
  grayscale as its paper; the clip drawn with the cache's sampling, as the view bank does).

Fresh draws come from a seed of (run seed, epoch, video index, copy) alone, so the number of
workers and a resume do not change them. A mirrored view of a dataset whose flips swap labels
(Something-Something v2's left/right classes, recorded in the cache) trains with its mirror class's
label, as the view bank's flipped views do (``stages.data.batch.view_label``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache.errors import ConfigError, DatasetError, ModelError, VideoDecodeError
from cache.meta import ViewBank
from cache.quant import quantize_int8
from cache.store import FeatureStore
from stages.backbone import BackboneInfo, FrozenCLIP, load_clip, model_config, weights_id
from stages.data.batch import LabelSwap, collate_items, epoch_seed, pixel_stats, view_label, view_pick
from stages.data.loader import device_batch
from stages.data.zarr_split import HeadInputs
from stages.heads.facts import TrainPipeline
from stages.video import AugViewCfg, SamplingCfg, augmented_views, decode_video, make_views, normalize, view_rngs

__all__ = ["ONLINE_AUGS", "online_aug_cfg", "bank_aug", "check_online_reachable", "OnlineSplit",
           "OnlineLoader"]

ONLINE_AUGS = ("paper", "light", "none")
_SALT = 0x6F6E6C  # "onl": the fresh draws' stream, apart from the view bank's


def online_aug_cfg(aug: str, head: str):
    """What ``augmented_views`` draws with for ``--online-aug`` (None for ``none``): light's AugViewCfg,
    or under paper the head's TrainPipeline (stages.heads.registry.train_pipeline_for)."""
    if aug not in ONLINE_AUGS:
        raise ConfigError(f"online_aug must be one of {', '.join(ONLINE_AUGS)}, got {aug!r}")
    if aug == "none":
        return None
    if aug == "light":
        return AugViewCfg()
    from stages.heads.registry import train_pipeline_for

    try:
        return train_pipeline_for(head, "paper")
    except ConfigError:
        raise ConfigError(f"--online-aug paper draws the head's official train pipeline, and head '{head}' has "
                          "none (its paper publishes none): use --online-aug light (the view bank's light draw) "
                          "or none (the cache's own views)") from None


def bank_aug(bank: ViewBank):
    """What a cache's view bank drew its views with: its paper TrainPipeline, or the light AugViewCfg."""
    if bank.recipe == "paper" and bank.pipeline:
        return TrainPipeline(source="", **{k: tuple(v) if isinstance(v, list) else v for k, v in bank.pipeline.items()})
    return AugViewCfg(area=tuple(bank.area), ratio=tuple(bank.ratio), flip=bank.flip)


def _split_paths(store: FeatureStore, split: str, indices: np.ndarray) -> tuple[list[str], list[int | None]]:
    items = store.items(split)
    frames = (store.manifest.get("num_frames") or {}).get(split)
    paths = [items[int(i)][0] for i in indices]
    counts = [frames[int(i)] if frames else None for i in indices]
    return paths, counts


def check_online_reachable(store: FeatureStore, split: str, indices: np.ndarray) -> None:
    """One clear error when the videos or the weights the cache was extracted from are not there
    (a moved data root, a removed checkpoint): before any run folder exists."""
    paths, _ = _split_paths(store, split, np.unique(indices))
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        root = store.info.dataset.video_root or os.path.dirname(missing[0])
        raise DatasetError(f"--online: {len(missing)} of the {len(paths)} '{split}' videos the cache was extracted "
                           f"from are not where it recorded them (first: {missing[0]}; data root {root}): put them "
                           "back there, or train from the cache without --online")
    cfg = store.info.config
    pre = cfg.pretrained
    if pre and (os.sep in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors"))) and not os.path.isfile(pre):
        raise ModelError(f"--online: the backbone weights the cache was extracted with, {pre}, are not there "
                         f"(from {os.getcwd()}): run from the folder the cache was extracted in, or restore the file")
    if pre and os.path.isfile(pre):
        got, want = weights_id(pre, cfg.init_seed), store.info.backbone.weights
        if want and got != want:
            raise ModelError(f"--online: {pre} is not the checkpoint the cache was extracted with ({got[:19]}... "
                             f"vs {want[:19]}...): restore that file, or train from the cache without --online")


class OnlineSplit(Dataset):
    """The selected train videos of a cache, decoded per epoch: item i -> {"frames": (T, S, S, 3)
    uint8, "label", "valid"} (the view of epoch ``set_epoch``); ``loader`` turns a plan of
    positions into the cache loader's batch dicts through the frozen backbone."""

    def __init__(self, store: FeatureStore, inputs: HeadInputs, indices: np.ndarray, aug: AugViewCfg | None,
                 label_map: dict[int, int] | None = None):
        meta = store.info
        self.store, self.inputs, self.aug = store, inputs, aug
        self.split = split = inputs.split
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = store.labels(split)[self.indices].astype(np.int64)  # as stored: a flip may swap them first
        self.label_map = label_map
        table = meta.dataset.swap_table()  # SSv2: the mirror class of each class; None: flips keep labels
        self.swap = None if table is None else LabelSwap(tuple(table), 0)
        self.paths, self.num_frames = _split_paths(store, split, self.indices)
        seen: dict[int, int] = {}
        self.copies = []  # a video repeated in the selection (K-shot repeats): the how-manieth copy
        for i in self.indices.tolist():
            self.copies.append(seen.get(i, 0))
            seen[i] = seen.get(i, 0) + 1
        cfg = meta.config
        self.size = meta.dims.image_size
        self.resize = meta.resize_short_side or self.size
        v = meta.views.get(split)
        clips, crops = (v.clips, v.crops) if v else (1, 1)
        self.fixed = SamplingCfg(cfg.frames, cfg.sampling, cfg.stride, clips, crops)
        self.fresh = SamplingCfg(cfg.frames, cfg.sampling, cfg.stride, 1, 1)
        bank = meta.view_bank if meta.view_bank is not None and meta.view_bank.split == split else None
        self.bank = None if bank is None else (bank.seed, bank_aug(bank), bank.views)
        self.views = bank.views if bank is not None else clips * crops  # the cache's views of a video
        self.epoch, self.seed, self.epoch_seed = 0, 0, 0
        self.mean, self.std = pixel_stats(meta)
        self._frozen: FrozenCLIP | None = None

    def set_epoch(self, epoch: int, seed: int) -> None:
        self.epoch, self.seed, self.epoch_seed = int(epoch), int(seed), epoch_seed(epoch, seed)

    def __len__(self) -> int:
        return len(self.indices)

    def view(self, i: int) -> tuple[np.ndarray, bool]:
        """Position i's view of this epoch, (T, S, S, 3) uint8, and whether it was mirrored."""
        path, nf, index = self.paths[i], self.num_frames[i], int(self.indices[i])
        try:
            if self.aug is not None:  # a fresh draw of (seed, epoch, video, copy)
                temporal, spatial = (np.random.default_rng(s) for s in np.random.SeedSequence(
                    [self.seed, self.epoch, index, self.copies[i], _SALT]).spawn(2))
                views, params = augmented_views(decode_video(path, self.fresh, nf, rng=temporal), self.size,
                                                self.aug, spatial)
                return views[0], bool(params[0][0])
            pick = view_pick(self.epoch_seed, i, self.views, True)  # the cache loader's draw among its views
            if self.bank is not None:  # the cache's own view bank, drawn again
                seed, aug, k = self.bank
                temporal, spatial = view_rngs(seed, self.split, index)
                samp = SamplingCfg(self.fixed.frames, self.fixed.mode, self.fixed.stride, k, 1)
                views, params = augmented_views(decode_video(path, samp, nf, rng=temporal), self.size, aug, spatial)
                return views[pick][0], bool(params[pick][0][0])
            views = make_views(decode_video(path, self.fixed, nf).clips, self.size, self.fixed.crops, self.resize)
            return views[pick][0], False
        except VideoDecodeError as exc:  # never another video in its place
            raise DatasetError(f"--online: {path} could not be decoded ({exc}); the cache holds it, so train "
                               "from the cache without --online, or restore the file") from None

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        frames, flipped = self.view(max(i, 0))  # -1: a rank's padding (the first video), masked out
        label = view_label(int(self.labels[max(i, 0)]), flipped, self.swap, self.label_map)
        return {"frames": torch.from_numpy(np.ascontiguousarray(frames)), "label": torch.tensor(label),
                "valid": torch.tensor(i >= 0)}

    # ----------------------------------------------------------------- the backbone side
    def frozen(self, device: torch.device) -> FrozenCLIP:
        """The cache's backbone (same model, weights, activation, taps), frozen, on ``device``."""
        if self._frozen is None or self._frozen.device != device:
            cfg, meta = self.store.info.config, self.store.info
            model = load_clip(cfg.model, cfg.pretrained or None, device="cpu", seed=cfg.init_seed,
                              activation=cfg.activation)
            del model.transformer  # the text tower is not needed
            info = BackboneInfo.from_config(model_config(cfg.model))
            self._frozen = FrozenCLIP(model, tuple(meta.layers), bool(cfg.patch), info, device=str(device))
        return self._frozen

    def stored_batch(self, frames: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """uint8 views (B, T, S, S, 3) -> the head's arrays as the cache stores them, (B, 1, T, ...):
        fp16 (or int8 parts) of the backbone's outputs, the uint8 frames themselves."""
        frozen = self.frozen(device)
        B, T = frames.shape[:2]
        specs = self.store.specs(self.split)
        x = normalize(frames.reshape(B * T, *frames.shape[2:]).to(device), frozen.mean, frozen.std)  # (B*T, 3, S, S)
        outs = frozen(x)
        out: dict[str, torch.Tensor] = {}
        for name in self.inputs.array_names():
            if name == "frames":
                out[name] = frames.unsqueeze(1)  # (B, 1, T, S, S, 3)
                continue
            v = outs[name].half()  # what the shard holds (int8 is quantised from these fp16 values)
            pos = self.inputs.layer_pos(name)
            if pos is not None:
                v = v[:, pos]  # (B*T, L_head, ...)
            v = v.reshape(B, 1, T, *v.shape[1:])  # (B, V=1, T, ...)
            if specs[name].dtype == "int8":
                outliers = self.store.row_shape(self.split, name, pos)["oidx"][0][-1]
                for part, arr in quantize_int8(v.cpu().numpy(), outliers=outliers).items():
                    out[f"{name}.{part}"] = torch.from_numpy(arr)
            else:
                out[name] = v.to(torch.float16 if specs[name].dtype == "float16" else torch.float32)
        return out

    def loader(self, plan: list[list[int]], device, workers: int = 0) -> "OnlineLoader":
        return OnlineLoader(self, plan, device, workers)


class OnlineLoader:
    """One epoch of an OnlineSplit for a plan (lists of positions, -1 padding): decode in
    ``workers`` processes, backbone here, ``device_batch`` for the rest, as the cache's loader."""

    def __init__(self, data: OnlineSplit, plan: list[list[int]], device, workers: int = 0):
        self.data, self.plan, self.device, self.workers = data, [list(b) for b in plan], torch.device(device), workers

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        # the cache's loader draws one number of the global generator as an epoch starts (a DataLoader's
        # base seed): drawn here too, so dropout & co. follow the same stream as a run from the cache
        torch.empty((), dtype=torch.int64).random_()
        if not self.plan:
            return
        loader = DataLoader(self.data, batch_sampler=self.plan, num_workers=self.workers, collate_fn=collate_items,
                            generator=torch.Generator().manual_seed(0),
                            prefetch_factor=2 if self.workers else None)
        try:
            for items in loader:
                with torch.inference_mode():
                    stored = self.data.stored_batch(items["frames"], self.device)
                stored.update(label=items["label"], valid=items["valid"])
                batch = device_batch(stored, self.device, True, self.data.mean, self.data.std)
                yield {k: v.clone() for k, v in batch.items()}  # plain tensors (inference ones refuse autograd)
        except DatasetError as exc:  # from a worker: its one line, not the worker's traceback
            raise DatasetError(str(exc).strip().splitlines()[-1].split(": ", 1)[-1]) if "\n" in str(exc) else exc
