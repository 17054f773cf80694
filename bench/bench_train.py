#!/usr/bin/env python
"""Stage two vs the reference repositories: a head trained from the cache vs the same head fed
by the frozen backbone run online on decoded frames, epoch for epoch, same data, same machine.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py            # ViT-B/16, ~7 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py --quick    # "demo" backbone, ~1.5 min

Heads at their paper configurations for the benched backbone:

  full   open_clip ViT-B-16 (random init, seed 0: nothing downloaded), 224 px, 8 frames;
         EVL 4 decoder layers with temporal cross attention (TCA); Side4Video "light"
         (6 blocks x 192, interval taps 2, 4, ..., 12); Text4Vis T-Trans (6 layers, E=512).
  quick  the built-in "demo" architecture (64 px, 4 blocks x 128, E=64), 8 frames;
         EVL 3 layers + TCA; Side4Video 2 blocks x 32 (the light preset's ratios: half the
         depth, a quarter of the width); Text4Vis T-Trans (6 layers, E=64).

What is measured:

1. Data: the synthetic demo dataset (4 classes, a few train videos each, 16 frames), and ONE
   cache made by ``plan_extraction`` + ``run_extraction`` (train split only): all layers,
   patch tokens, uint8 input frames, the clip_single text set, fp16.
2. Per head, subprocesses of this script (so that peak RSS is per mode), one after the other,
   each building the head with the same seed and the same optimizer as ``train_head``
   (``build_optimizer``: fused AdamW, its decay groups; warmup + cosine LambdaLR; cross-entropy;
   batch size B):
   - cache:    stage two's loader exactly as ``train_head`` drives it: the split from
               ``split_dataset``, per epoch ``set_epoch`` + ``epoch_plan`` (the config's shuffle)
               -> ``stages.data.loader.train_loader`` (the config's workers and preload, ``auto``:
               the head's arrays held in RAM in their stored dtype when they fit) -> batches
               converted by ``device_batch`` on the head's device -> forward / backward / AdamW
               step: the loop of ``_fit_sgd`` without evaluation and checkpointing (the
               checkpoint's cost is shown separately). One warm-up epoch, then timed epochs
               (median). The table says which preload ran.
   - streamed: (default with --quick) the same with ``preload=off``: every batch read from the
               shard files (stored dtype, runs of rows). Without it, table 1 estimates it as the
               cache epoch + one loader read of every video (table 3).
   - online:   the reference repositories' way: a DataLoader over the videos whose __getitem__
               decodes (``decode_clips`` with the cache's own deterministic TSN sampling, so the
               inputs are the cached ones), ``make_views`` (resize + centre crop) and
               ``normalize``; the main process runs ``FrozenCLIP`` (inference mode, taps = the
               head's blocks) on the B*T frames, builds the batch the head expects (frame_emb
               (B,T,E), cls (B,T,L,D), patch (B,T,L,P,D), frames (B,T,3,H,W)), then the same
               head step. One warm-up step, then one timed epoch. The last online batch is then
               compared with the cache's arrays for the same videos (a check of "same data").
   DataLoader workers = 0 in every mode, and ONE torch thread in every timed subprocess
   (--threads): on a shared 2-core machine two OpenMP threads lose whole seconds to each
   other's descheduling, which made 2-thread epochs vary 8x from one to the next.
3. FLOPs (``torch.utils.flop_counter.FlopCounterMode``: matmul / conv / attention): the backbone
   forward the online mode runs, counted on one frame (with nn.MultiheadAttention's fused
   inference fast path off, which the counter cannot see) and multiplied by B*T, and the head's
   forward + backward on one real cache batch of B videos. Ceiling = (backbone + head) / head;
   measured ratio = online epoch / cache epoch; closeness = measured / ceiling.
4. Peak memory: VmHWM of each subprocess (process lifetime: imports, model or cache load,
   training; not ru_maxrss, which a subprocess inherits from its parent's RSS at fork), and the
   peak during the timed loop alone (VmHWM reset through /proc/self/clear_refs after setup).
5. Cache read rate, per head, of exactly the arrays that head reads: stage two's loader
   (preload off, batches of B in the stored dtype, only the head's layers, no conversion);
   ``FeatureStore.read`` per video (fp16 -> float32 included; and without the cast), with one
   slice, and only the head's layers, vs ``open(f, 'rb').read()`` of every file under the same
   array folders. "cold": each file's pages dropped first with posix_fadvise(DONTNEED) (the
   VM's disk may still be cached by the host); "warm": read again right after. Rates are
   on-disk bytes per second (all stored layers; "head's layers" counts only those).

The machine may be shared: the load average at start and end is printed, and CPU seconds are
shown next to wall seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_parser, console as make_console, cpu_self as cpu_seconds, demo_world,  # noqa: E402
                          extract_cache, human, load_avg, make_table, name_list, now)
from bench.memprobe import reset_peak_rss, vm_status  # noqa: E402

MB = 1 << 20


def cache_split(store, run: "HeadRun", keys, idx):
    """The training split as train_head makes it (``split_dataset``: a CacheSplit, nothing read)."""
    from stages.data.zarr_split import check_cache_for_head
    from stages.data.open import split_dataset

    inputs = check_cache_for_head(store, keys, run.name, ["train"])
    return split_dataset(store, inputs["train"], idx, train=True)


def loader_epoch(data, cfg, epoch: int, batch: int, device, preload: str):
    """One epoch of stage two's loader, as train_head's _epoch_batches makes it (one process)."""
    from stages.data.loader import epoch_plan, train_loader

    data.set_epoch(epoch, cfg.seed)
    plan = epoch_plan(len(data), batch, 1, 0, cfg.seed, epoch, cfg.shuffle)
    return train_loader(data, plan, device, cfg.workers, preload)


# ----------------------------------------------------------------------------- settings
@dataclass
class HeadRun:
    name: str           # registry name
    label: str          # what the table calls it
    overrides: dict     # head cfg overrides on top of the cache's dims
    alt: dict = field(default_factory=dict)  # a variant whose FLOP ceiling is shown too (not timed)


@dataclass
class Settings:
    model: str
    classes: int
    per_class: int
    video_frames: int   # frames in each generated video
    video_size: int     # generated frame height (width = 4/3)
    frames: int         # T sampled per video
    batch: int          # B videos per step
    heads: list[HeadRun]
    cache_min_s: float = 20.0   # timed cache epochs: at least min_epochs, up to max_epochs, until this long
    min_epochs: int = 1
    max_epochs: int = 3
    streamed: bool = False      # also run the per-video Zarr ("streamed") cache mode
    threads: int = 1            # torch intra-op threads in every timed subprocess
    device: str = "cpu"         # where the heads (and the online backbone) run


def settings(quick: bool) -> Settings:
    if quick:
        return Settings("demo", 4, 4, 16, 96, 8, 4, [
            HeadRun("evl", "EVL 3 layers + TCA", {"num_layers": 3, "use_tca": True}, {"use_tca": False}),
            HeadRun("side4video", "Side4Video 2x32", {"preset": "custom", "num_blocks": 2, "side_width": 32}),
            HeadRun("text4vis", "Text4Vis T-Trans", {"temporal": "ttrans"}),
        ], cache_min_s=3.0, min_epochs=3, max_epochs=5, streamed=True)
    return Settings("ViT-B-16", 4, 2, 16, 240, 8, 4, [
        HeadRun("evl", "EVL 4 layers + TCA", {"num_layers": 4, "use_tca": True}, {"use_tca": False}),
        HeadRun("side4video", "Side4Video light 6x192", {"preset": "light"}),
        HeadRun("text4vis", "Text4Vis T-Trans", {"temporal": "ttrans"}),
    ])


# ----------------------------------------------------------------------------- small helpers
def mbps(x: float) -> str:
    x /= MB
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def secs(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def ratio(x: float) -> str:
    return f"{x:.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    from stages.data.batch import collate_items  # the online DataLoader's collate

    return collate_items(items)


# ----------------------------------------------------------------------------- the head, as train_head builds it
def make_head(store, run: HeadRun, seed: int = 0):
    """Build, fill frozen weights / classifier, exactly like train_head (same seed -> same init)."""
    from stages.classifiers import classifier_matrix
    from stages.train import TrainCfg, build_head, cached_backbone_weights, classifier_options

    cfg = TrainCfg(head=run.name, seed=seed)
    K = store.info.dims.num_classes
    torch.manual_seed(cfg.seed)
    head = build_head(run.name, store, dict(run.overrides), num_classes=K)
    keys = head.data_keys()
    if head.supports("set_backbone_weights") and keys.backbone_weights:
        head.set_backbone_weights(cached_backbone_weights(store, keys))
    if head.has_classifier:
        head.set_classifier(classifier_matrix(cfg.classifier_init, store, head, None, **classifier_options(cfg)))
    return head, cfg


def make_optimizer(head, cfg, steps_per_epoch: int, epochs: int):
    """train_head's optimizer (build_optimizer: fused AdamW where it exists) + warmup/cosine LambdaLR."""
    from stages.runs import lr_factor
    from stages.train import build_optimizer

    opt = build_optimizer(head, cfg)
    total = steps_per_epoch * epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    return opt, sched


class Timers(dict):
    """Accumulated wall seconds per phase; CPU seconds (process_time) under "cpu:<phase>"."""

    def add(self, key: str, dt: float) -> None:
        self[key] = self.get(key, 0.0) + dt

    @contextlib.contextmanager
    def span(self, key: str):
        t0, c0 = now(), time.process_time()
        try:
            yield
        finally:
            self.add(key, now() - t0)
            self.add("cpu:" + key, time.process_time() - c0)


def head_step(head, batch, opt, sched, cfg, tm: Timers) -> float:
    """One step of _fit_sgd on CPU (AMP off, GradScaler disabled, no grad clip)."""
    labels = batch["label"]
    with tm.span("head fwd"):
        out = head(batch)
        loss = head.loss(out, labels, cfg.label_smoothing)
    with tm.span("head bwd"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with tm.span("optimizer"):
        opt.step()
        sched.step()
        value = loss.item()
    return value


# ----------------------------------------------------------------------------- online data (reference-repo style)
class DecodedVideos(torch.utils.data.Dataset):
    """Video -> normalised (T, 3, S, S) float frames, decoded on every access (as the reference
    repositories' dataloaders do). Times its phases (workers = 0: same process)."""

    def __init__(self, items, sampling, size: int, mean, std, tm: Timers):
        self.items, self.sampling, self.size, self.mean, self.std, self.tm = items, sampling, size, mean, std, tm

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from stages.video import decode_clips, make_views, normalize

        path, label = self.items[i]
        with self.tm.span("decode"):
            clips, _ = decode_clips(path, self.sampling)
        with self.tm.span("resize+crop"):
            views = make_views(clips, self.size, self.sampling.crops)  # (1, T, S, S, 3) uint8
        with self.tm.span("normalize"):
            x = normalize(torch.from_numpy(views[0]), self.mean, self.std)  # (T, 3, S, S)
        return {"video": x, "label": torch.tensor(label, dtype=torch.int64), "index": torch.tensor(i)}


class OnlineBackbone:
    """FrozenCLIP with exactly the taps a head reads; turns decoded frames into the head's batch."""

    def __init__(self, store, head, model_name: str, seed: int, device: str = "cpu"):
        from stages.backbone import BackboneInfo, FrozenCLIP, load_clip, model_config
        from stages.heads import resolve_layers

        info = BackboneInfo.from_config(model_config(model_name))
        keys = head.data_keys()
        self.keys = keys
        self.cls_layers = resolve_layers(keys.cls_layers, info.depth)
        self.patch_layers = resolve_layers(keys.patch_layers, info.depth)
        layers = tuple(sorted(set(self.cls_layers) | set(self.patch_layers)))
        model = load_clip(model_name, None, device="cpu", seed=seed)
        self.frozen = FrozenCLIP(model, layers, bool(self.patch_layers), info, device=device)
        self.device = device
        del model  # only the vision tower stays referenced
        self.cls_pos = [layers.index(x) for x in self.cls_layers]
        self.patch_pos = [layers.index(x) for x in self.patch_layers]
        self.info = info

    def batch(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = raw["video"].to(self.device, non_blocking=True)  # (B, T, 3, S, S)
        B, T = x.shape[:2]
        with torch.no_grad():
            out = self.frozen(x.flatten(0, 1))
        # clone(): FrozenCLIP runs in inference mode; its tensors cannot be saved for backward.
        batch = {"label": raw["label"].to(self.device)}
        if self.keys.frame_emb:
            batch["frame_emb"] = out["frame_emb"].reshape(B, T, -1).clone()
        if self.cls_layers:
            batch["cls"] = out["cls"][:, self.cls_pos].reshape(B, T, len(self.cls_pos), -1).clone()
        if self.patch_layers:
            p = out["patch"][:, self.patch_pos]
            batch["patch"] = p.reshape(B, T, *p.shape[1:]).clone()
        if self.keys.frames:
            batch["frames"] = x
        return batch


# ----------------------------------------------------------------------------- child: one mode of one head
def child(spec: dict) -> dict:
    from cache.store import open_store
    from stages.data.zarr_split import select_videos
    from stages.data.loader import make_source
    from stages.video import SamplingCfg

    mode, run = spec["mode"], HeadRun(**spec["head"])
    device = spec.get("device", "cpu")
    B = spec["batch"]
    torch.set_num_threads(spec["threads"])
    rss_imports = vm_status("VmRSS")
    t_setup = now()
    store = open_store(spec["cache"])
    head, cfg = make_head(store, run)
    head.to(device)
    keys = head.data_keys()
    idx = select_videos(store, "train")
    n = len(idx)
    steps = math.ceil(n / B)
    epochs = 1 + (spec["max_epochs"] if mode != "online" else 1)
    opt, sched = make_optimizer(head, cfg, steps, epochs)
    tm = Timers()
    preload_opt = "off" if mode == "streamed" else cfg.preload
    if mode in ("cache", "streamed"):
        data = cache_split(store, run, keys, idx)
        # train_head builds this reader in its first epoch (a preload reads here); the loader keeps it on data
        source = make_source(data, preload_opt)
        in_memory = sorted(source.memory or {})
        preload = f"{preload_opt}: " + (f"in RAM, {human(source.nbytes())} stored" if in_memory else "shard files")
        backbone = None
    else:
        backbone = OnlineBackbone(store, head, spec["model"], seed=store.info.config.init_seed, device=device)
        items = [store.items("train")[i] for i in idx]
        samp = SamplingCfg(store.info.dims.frames, "segment", 8, 1, 1)  # the cache's own sampling
        data = DecodedVideos(items, samp, backbone.info.image_size, backbone.frozen.mean, backbone.frozen.std, tm)
        in_memory = []
        preload = "-"
    setup_s = now() - t_setup
    rss_setup = vm_status("VmRSS")
    # VmHWM, not ru_maxrss: a subprocess's ru_maxrss starts at its parent's RSS at fork time
    # (Linux keeps it across execve), VmHWM belongs to the new address space.
    peak_setup = vm_status("VmHWM")  # imports + model / cache load so far
    peak_reset = reset_peak_rss()

    def epoch(e: int, max_steps: int | None, timers: Timers) -> tuple[float, float, list[float], dict | None]:
        torch.manual_seed(cfg.seed * 1000 + e)
        if backbone is None:  # train_head's data path: stored bytes -> device_batch on the head's device
            loader = loader_epoch(data, cfg, e, B, device, preload_opt)
        else:
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + e)
            loader = torch.utils.data.DataLoader(data, batch_size=B, shuffle=True, generator=gen,
                                                 collate_fn=collate, num_workers=0, drop_last=False)
        head.train()
        losses, last = [], None
        c0, t0 = cpu_seconds(), now()
        it = iter(loader)
        for _ in range(steps if max_steps is None else max_steps):
            with timers.span("data (loader)"):
                raw = next(it)
            if backbone is not None:
                index = raw.pop("index")
                with timers.span("backbone"):
                    batch = backbone.batch(raw)
                last = {"index": index, "batch": batch}
            else:
                raw.pop("valid", None)  # padding flags (none with one process): _fit_sgd pops them too
                batch = raw
            losses.append(head_step(head, batch, opt, sched, cfg, timers))
        return now() - t0, cpu_seconds() - c0, losses, last

    warm = Timers()
    if mode == "online":
        w_s, _, _, _ = epoch(0, 1, warm)  # one warm-up step
    else:
        w_s, _, _, _ = epoch(0, None, warm)  # one warm-up epoch
    times, cpus, all_losses, last = [], [], [], None
    tm.clear()
    target = 0.0 if mode == "online" else spec["cache_min_s"]
    e = 1
    while True:
        ep_tm = Timers()
        wall, cpu, losses, last = epoch(e, None, ep_tm)
        for k, v in ep_tm.items():
            tm.add(k, v)
        times.append(wall)
        cpus.append(cpu)
        all_losses.append(float(np.mean(losses)))
        e += 1
        if mode == "online" or len(times) >= spec["max_epochs"] or (
                sum(times) >= target and len(times) >= spec["min_epochs"]):
            break
    peak_loop = vm_status("VmHWM") if peak_reset else None
    res = {"mode": mode, "head": run.name, "videos": n, "steps_per_epoch": steps, "setup_s": setup_s,
           "warmup_s": w_s, "epoch_s": times, "epoch_cpu_s": cpus, "losses": all_losses,
           "timers_per_epoch": {k: v / len(times) for k, v in tm.items()}, "rss_setup": rss_setup,
           "peak_loop": peak_loop, "in_memory": in_memory,
           "preload": preload, "rss_imports": rss_imports, "trainable": head.num_trainable(),
           "threads": torch.get_num_threads()}
    # Process-lifetime peak: VmHWM before the reset (setup) and after it (the loop).
    res["peak_process"] = max(peak_setup, vm_status("VmHWM"))

    if mode == "cache":
        res["checkpoint"] = checkpoint_cost(head, opt, sched, Path(spec["scratch"]))
    if mode == "online" and last is not None:
        res["same_data"] = compare_with_cache(store, last, head, idx)
    return res


def checkpoint_cost(head, opt, sched, folder: Path) -> dict:
    """What _fit_sgd writes after every epoch (head + optimizer + scheduler, atomic)."""
    from stages.checkpoint import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{os.getpid()}.pt"
    t0 = now()
    save_checkpoint({"head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": 1, "history": [], "config": {}}, path)
    dt = now() - t0
    size = path.stat().st_size
    path.unlink()
    return {"seconds": dt, "bytes": size}


def compare_with_cache(store, last: dict, head, idx) -> dict:
    """Relative max error of the last online batch against the cache for the same videos."""
    from stages.heads import resolve_layers

    depth = store.info.dims.depth
    cached = list(store.info.layers)
    keys = head.data_keys()
    rows = [int(idx[i]) for i in last["index"].tolist()]
    out = {}
    for name, tensor in last["batch"].items():
        if name in ("label", "frames"):
            continue
        errs = []
        for b, row in enumerate(rows):
            ref = store.read("train", name, row)[0]  # (T, ...) of view 0
            if name == "cls":
                ref = ref[:, [cached.index(x) for x in resolve_layers(keys.cls_layers, depth)]]
            elif name == "patch":
                ref = ref[:, [cached.index(x) for x in resolve_layers(keys.patch_layers, depth)]]
            got = tensor[b].float().cpu().numpy()
            errs.append(float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)))
        out[name] = max(errs)
    if "frames" in last["batch"]:
        mean = torch.tensor(store.info.preprocess.mean).view(3, 1, 1)
        std = torch.tensor(store.info.preprocess.std).view(3, 1, 1)
        diffs = []
        for b, row in enumerate(rows):
            u8 = torch.from_numpy(store.read("train", "frames", row)[0])  # (T, S, S, 3)
            ref = (u8.movedim(-1, -3).float() / 255.0 - mean) / std
            diffs.append(float((last["batch"]["frames"][b].cpu() - ref).abs().max()))
        out["frames"] = max(diffs)
    return out


# ----------------------------------------------------------------------------- parent: FLOPs
def head_flops(store, run: HeadRun, B: int) -> tuple[int, int, int]:
    """(forward+backward, forward, B) FLOPs of the head on one real cache batch of B videos."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.data.zarr_split import select_videos
    from stages.data.loader import train_loader

    head, cfg = make_head(store, run)
    idx = select_videos(store, "train")[:B]
    data = cache_split(store, run, head.data_keys(), idx)
    data.set_epoch(0, cfg.seed)
    batch = next(iter(train_loader(data, [list(range(len(idx)))], "cpu", 0, "off")))
    batch.pop("valid", None)
    head.train()
    with FlopCounterMode(display=False) as fc:
        out = head(batch)
        head.loss(out, batch["label"]).backward()
    train = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        head(batch)
    return train, fc.get_total_flops(), len(idx)


def count_flops(store, run: HeadRun, model_name: str, B: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    train, fwd, nb = head_flops(store, run, B)
    head, _ = make_head(store, run)
    bb = OnlineBackbone(store, head, model_name, seed=store.info.config.init_seed)
    S = bb.info.image_size
    # In eval / inference mode nn.MultiheadAttention takes a fused fast path that FlopCounterMode
    # has no formula for (its q/k/v/out projections and attention would count as 0 FLOPs):
    # count through the regular path, which computes the same thing.
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as fc:
            bb.frozen(torch.zeros(1, 3, S, S))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    T = store.info.dims.frames
    per_frame = fc.get_total_flops()
    out = {"head_train": train, "head_fwd": fwd, "backbone_frame": per_frame, "backbone_batch": per_frame * nb * T,
           "B": nb, "T": T, "ceiling": (per_frame * nb * T + train) / train}
    if run.alt:
        alt = HeadRun(run.name, run.label, {**run.overrides, **run.alt})
        a_train, _, _ = head_flops(store, alt, B)
        out["alt"] = {"overrides": run.alt, "head_train": a_train, "ceiling": (per_frame * nb * T + a_train) / a_train}
    return out


# ----------------------------------------------------------------------------- parent: read rates
def drop_pages(files: list[Path]) -> bool:
    ok = True
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


def layer_index(pos: list[int]):
    """Cache layer positions -> a basic (stepped) slice when evenly spaced, else the list."""
    if not pos:
        return None
    if len(pos) == 1:
        return slice(pos[0], pos[0] + 1)
    step = pos[1] - pos[0]
    if step > 0 and all(b - a == step for a, b in zip(pos, pos[1:])):
        return slice(pos[0], pos[-1] + 1, step)
    return pos


def read_rates(store, run: HeadRun, B: int) -> dict:
    from stages.data.zarr_split import check_cache_for_head, select_videos
    from stages.heads import resolve_layers
    from stages.data.loader import CacheLoader, epoch_plan, make_source

    head, cfg = make_head(store, run)
    keys = head.data_keys()
    inputs = check_cache_for_head(store, keys, run.name, ["train"])["train"]
    idx = select_videos(store, "train")
    n = len(idx)
    wanted = [k for k, on in (("frame_emb", keys.frame_emb), ("cls", bool(inputs.cls_layers)),
                              ("patch", bool(inputs.patch_layers)), ("frames", keys.frames)) if on]
    files = sorted(f for k in wanted for f in (store.path / "train" / k).rglob("*") if f.is_file())
    nbytes = sum(f.stat().st_size for f in files)
    depth = store.info.dims.depth
    cached = list(store.info.layers)
    layer_sel = {"cls": layer_index([cached.index(x) for x in resolve_layers(keys.cls_layers, depth)]),
                 "patch": layer_index([cached.index(x) for x in resolve_layers(keys.patch_layers, depth)])}

    def plain() -> None:
        for f in files:
            with open(f, "rb") as fh:
                fh.read()

    data = cache_split(store, run, keys, idx)
    source = make_source(data, "off")
    plan = epoch_plan(n, B, 1, 0, cfg.seed, 1, cfg.shuffle)

    def loader() -> None:  # stage two's loader, preload off: stored-dtype batches, no conversion
        for _ in CacheLoader(source, plan, "cpu", workers=0, raw=True):
            pass

    def zarr_per_video() -> None:  # FeatureStore.read(split, name, i), float32
        for i in idx:
            for k in wanted:
                store.read("train", k, int(i))

    def zarr_per_video_fp16() -> None:  # the same without the fp16 -> float32 conversion
        for i in idx:
            for k in wanted:
                store.read("train", k, int(i), dtype=np.float16)

    def zarr_slice() -> None:  # the same rows as one slice (idx is 0..n-1 here)
        for k in wanted:
            store.read("train", k, slice(int(idx[0]), int(idx[-1]) + 1))

    def layer_sliced() -> None:  # per video, only the head's layers (basic stepped slice)
        for i in idx:
            for k in wanted:
                arr = store.root[f"train/{k}"]
                if k in layer_sel and isinstance(layer_sel[k], slice) and arr.ndim == 6:
                    arr[int(i), :, :, layer_sel[k]].astype(np.float32)
                elif k in layer_sel:
                    arr[int(i)][:, :, layer_sel[k]].astype(np.float32)
                else:
                    arr[int(i)] if k == "frames" else arr[int(i)].astype(np.float32)

    used = 0.0
    for k in wanted:
        size = sum(p.stat().st_size for p in (store.path / "train" / k).rglob("*") if p.is_file())
        if k in ("cls", "patch"):
            layers = inputs.cls_layers if k == "cls" else inputs.patch_layers
            size = size * len(layers) / len(cached)
        used += size
    contiguous = bool(np.all(np.diff(idx) == 1))
    out = {"arrays": wanted, "bytes": nbytes, "useful_bytes": used, "files": len(files), "videos": n}
    methods = [("plain", plain), ("loader", loader), ("zarr per video", zarr_per_video),
               ("zarr per video fp16", zarr_per_video_fp16)]
    if contiguous:
        methods.append(("zarr slice", zarr_slice))
    methods.append(("zarr layer-sliced", layer_sliced))
    for label, fn in methods:
        res = {}
        for temp in ("cold", "warm"):
            if temp == "cold":
                res["dropped"] = drop_pages(files)
            t0 = now()
            fn()
            res[temp] = now() - t0
        out[label] = res
    return out


# ----------------------------------------------------------------------------- parent
def run_child(spec: dict, scratch: Path) -> dict:
    spec_path = scratch / f"spec-{spec['head']['name'] if 'head' in spec else 'x'}-{spec['mode']}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec = dict(spec, out=str(out_path))
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec_path.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def main() -> None:
    ap = base_parser(__doc__, "bench_train", quick='the built-in "demo" backbone (about 1-2 minutes)', device="cpu")
    ap.add_argument("--per-class", type=int, default=0, help="train videos per class (4 classes)")
    ap.add_argument("--batch", type=int, default=0, help="videos per step")
    ap.add_argument("--heads", default="", help="comma list among evl,side4video,text4vis")
    ap.add_argument("--streamed", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the per-video Zarr (streamed) cache mode (default: on with --quick, off in full)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in the timed subprocesses (default 1: robust on a shared machine)")
    ap.add_argument("--json", default="", help="also write all figures to this JSON file")
    ap.add_argument("--no-read", action="store_true", help="skip the cache read rates (table 3)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        res = child(spec)
        Path(spec["out"]).write_text(json.dumps(res))
        return

    from cache.store import open_store
    from stages.dist import check_device

    check_device(args.device)
    console = make_console(240)
    S = settings(args.quick)
    S.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device
    if args.per_class:
        S.per_class = args.per_class
    if args.batch:
        S.batch = args.batch
    if args.streamed is not None:
        S.streamed = args.streamed
    if args.threads:
        S.threads = args.threads
    if args.heads:
        keep = name_list(args.heads)
        S.heads = [h for h in S.heads if h.name in keep]
    work = Path(args.workdir) / ("quick" if args.quick else "full")
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    t_all, load0 = now(), load_avg()

    # 1. data + one cache
    data_dir = work / f"demo-{S.classes}x{S.per_class}-{S.video_frames}f-{S.video_size}px"
    t = now()
    ds = demo_world(data_dir, train_only=True, num_classes=S.classes, train_per_class=S.per_class,  # trained on
                    val_per_class=1, frames=S.video_frames, size=S.video_size)
    gen_s = now() - t
    t = now()
    plan, ext = extract_cache(ds, out=work / f"cache-{S.model}", model=S.model, frames=S.frames, layers="all",
                              patch=True, store_frames=True, text="clip_single", device=S.device)
    ext_s = now() - t
    store = open_store(plan.path)
    n_videos = len(ds.splits["train"])
    console.print(f"[bold]clipcache stage-two bench[/] ({'quick' if args.quick else 'full'}): {os.cpu_count()} cores, "
                  f"torch {torch.__version__}, {S.device}. Load average at start "
                  f"{load0[0]:.2f}.", highlight=False)
    console.print(f"data: {n_videos} train videos ({S.classes} classes x {S.per_class}), {S.video_frames} frames "
                  f"{S.video_size}px h264 (made/reused in {gen_s:.1f}s); cache {plan.path.name}: {S.model} random init, "
                  f"{S.frames} frames, layers all ({len(plan.layers)}), patch + uint8 frames + clip_single, fp16, "
                  f"{human(store.size_bytes())} ({'reused' if ext.reused else f'extracted in {ext_s:.1f}s'}). "
                  f"Batch {S.batch} videos, DataLoader workers 0 and torch threads {S.threads} in every timed mode.",
                  highlight=False)

    results: dict[str, dict] = {}
    for run in S.heads:
        t = now()
        fl = count_flops(store, run, S.model, S.batch)
        r = {"flops": fl, "flops_s": now() - t}
        base = {"cache": str(plan.path), "head": run.__dict__, "batch": S.batch, "model": S.model,
                "max_epochs": S.max_epochs, "min_epochs": S.min_epochs, "threads": S.threads, "cache_min_s": S.cache_min_s, "scratch": str(scratch),
                "device": S.device}
        modes = ["cache"] + (["streamed"] if S.streamed else []) + ["online"]
        for mode in modes:
            t = now()
            r[mode] = run_child(dict(base, mode=mode), scratch)
            console.print(f"  {run.label:<24} {mode:<9} epoch {secs(statistics.median(r[mode]['epoch_s']))} "
                          f"(subprocess {now() - t:.0f}s)", highlight=False)
        results[run.name] = r
    for run in S.heads:
        results[run.name]["read"] = {} if args.no_read else read_rates(store, run, S.batch)
    # ------------------------------------------------------------------ table 1
    t1 = make_table(f"Epoch time: head trained from the cache vs the same head on frozen {S.model} run online on "
                    f"decoded frames ({n_videos} videos, B={S.batch}, T={S.frames}, {S.device}, one run)",
                    ["head", "trainable", "cache epoch", "online epoch", "measured ratio", "(CPU-s ratio)",
                     "FLOP ceiling", "closeness", "(CPU-s)", "streamed epoch (ratio)", "peak RSS cache",
                     "peak RSS online", "loader read *", "plain read"])
    for run in S.heads:
        r = results[run.name]
        c = statistics.median(r["cache"]["epoch_s"])
        o = statistics.median(r["online"]["epoch_s"])
        cc = statistics.median(r["cache"]["epoch_cpu_s"])
        oc = statistics.median(r["online"]["epoch_cpu_s"])
        rd = r["read"]
        if "streamed" in r:
            st = statistics.median(r["streamed"]["epoch_s"])
            streamed = f"{secs(st)} ({ratio(o / st)})"
        elif not rd:
            streamed = "-"
        else:  # the in-memory epoch plus one loader read (preload off) of every video (table 3)
            st = c + rd["loader"]["warm"]
            streamed = f"~{secs(st)} ({ratio(o / st)}) est."
        meas = o / c
        ceil = r["flops"]["ceiling"]
        t1.add_row(run.label, f"{r['cache']['trainable']:,}", secs(c), secs(o), ratio(meas), ratio(oc / cc),
                   ratio(ceil), f"{100 * meas / ceil:.0f}%", f"{100 * oc / cc / ceil:.0f}%", streamed,
                   human(r["cache"]["peak_process"]), human(r["online"]["peak_process"]),
                   f"{mbps(rd['useful_bytes'] / rd['loader']['warm'])} MB/s" if rd else "-",
                   f"{mbps(rd['bytes'] / rd['plain']['warm'])} MB/s" if rd else "-")
    console.print(t1)
    console.print("measured ratio = online epoch / cache epoch, wall time (CPU seconds of the process in brackets: "
                  "less sensitive to other load on the machine). cache = stage two's loader as train_head drives it "
                  "(stages.data.loader.train_loader, preload auto, stored dtype converted by device_batch); streamed = "
                  "the same with preload off, every batch read from the shard files (est. = cache epoch + the warm "
                  "loader read time of table 3, where not run). FLOP ceiling "
                  "= (backbone fwd + head fwd+bwd) / head fwd+bwd, per batch; closeness = measured / ceiling. Peak "
                  "RSS = VmHWM of each mode's own process over its life (imports, setup, training). Read rates: warm page "
                  "cache; * the loader (preload off, no conversion) in bytes of the head's layers per second, "
                  "open().read() in on-disk bytes of the arrays the head reads.",
                  highlight=False)

    # ------------------------------------------------------------------ table 2
    t2 = make_table("Where an epoch goes (seconds per epoch; GFLOP/s achieved in the timed epochs)",
                    ("head", "mode", "epoch", "CPU s", "data", "of which decode", "backbone", "head fwd", "head bwd",
                     "AdamW+sched", "other", "backbone GFLOP/s", "head GFLOP/s", "RSS imports", "RSS setup",
                     "peak RSS loop", "setup"), left=("mode",))
    for run in S.heads:
        r = results[run.name]
        fl = r["flops"]
        for mode in ("cache", "streamed", "online"):
            if mode not in r:
                continue
            m = r[mode]
            tp = m["timers_per_epoch"]
            n = m["videos"]
            head_fl = fl["head_train"] / fl["B"] * n
            hb = tp.get("cpu:head fwd", 0) + tp.get("cpu:head bwd", 0)
            bb = tp.get("backbone", 0)
            bbc = tp.get("cpu:backbone", 0)
            ep = statistics.median(m["epoch_s"])
            known = sum(tp.get(k, 0) for k in ("data (loader)", "backbone", "head fwd", "head bwd", "optimizer"))
            t2.add_row(run.label, mode, secs(ep), f"{statistics.median(m['epoch_cpu_s']):.1f}",
                       secs(tp.get("data (loader)", 0)), secs(tp.get("decode", 0)) if mode == "online" else "-",
                       secs(bb) if bb else "-", secs(tp.get("head fwd", 0)), secs(tp.get("head bwd", 0)),
                       secs(tp.get("optimizer", 0)), secs(max(0.0, sum(m["epoch_s"]) / len(m["epoch_s"]) - known)),
                       f"{fl['backbone_frame'] * n * fl['T'] / bbc / 1e9:.1f}" if bbc else "-",
                       f"{head_fl / hb / 1e9:.1f}", human(m["rss_imports"]), human(m["rss_setup"]),
                       human(m["peak_loop"]) if m["peak_loop"] else "-", secs(m["setup_s"]))
    console.print(t2)
    console.print("data = time the loop waits for the DataLoader (workers 0: online = decode + resize/crop + "
                  "normalize + collate; cache = the loader's read or in-RAM copy + device_batch); backbone = FrozenCLIP on the B*T frames "
                  "+ building the head's batch; timers are per-epoch means, 'epoch' the median.", highlight=False)

    # ------------------------------------------------------------------ table 3
    t3 = make_table("Cache read rate, MB/s of on-disk bytes (the arrays each head reads, all videos; cold / warm)",
                    ("head", "arrays", "on disk", "head's layers", "plain read", "loader (preload off)",
                     "Zarr per video", "same, no fp32 cast", "Zarr one slice", "Zarr, head's layers",
                     "ms/video (loader, warm)"), left=("arrays",))
    for run in S.heads if not args.no_read else []:
        rd = results[run.name]["read"]
        b = rd["bytes"]

        def rate(k: str, useful: bool = False) -> str:
            if k not in rd:
                return "not run"
            x = rd["useful_bytes"] if useful else b
            return f"{mbps(x / rd[k]['cold'])} / {mbps(x / rd[k]['warm'])}"

        t3.add_row(run.label, ",".join(rd["arrays"]), human(b), human(rd["useful_bytes"]), rate("plain"),
                   rate("loader", useful=True) + " *", rate("zarr per video"), rate("zarr per video fp16"),
                   rate("zarr slice"), rate("zarr layer-sliced", useful=True) + " *",
                   f"{1000 * rd['loader']['warm'] / rd['videos']:.1f}")
    if not args.no_read:
        console.print(t3)
        console.print("* useful bytes (only the head's layers) per second. loader = stages.data.loader batches of B in "
                      "the stored dtype (what a GPU would receive), no float32 conversion.", highlight=False)

    # ------------------------------------------------------------------ notes
    for run in S.heads:
        r = results[run.name]
        fl = r["flops"]
        line = (f"{run.label}: FLOPs per batch of {fl['B']}: backbone {fl['backbone_batch'] / 1e9:.1f} G "
                f"({fl['backbone_frame'] / 1e9:.2f} G/frame), head fwd+bwd {fl['head_train'] / 1e9:.2f} G "
                f"(fwd {fl['head_fwd'] / 1e9:.2f} G)")
        if "alt" in fl:
            line += (f"; ceiling with {fl['alt']['overrides']}: {ratio(fl['alt']['ceiling'])} "
                     f"(head fwd+bwd {fl['alt']['head_train'] / 1e9:.2f} G)")
        tc, to = r["cache"]["timers_per_epoch"], r["online"]["timers_per_epoch"]
        c_ep, o_ep = statistics.median(r["cache"]["epoch_s"]), statistics.median(r["online"]["epoch_s"])
        line += (f"; ratio without the AdamW+scheduler time: "
                 f"{ratio((o_ep - to.get('optimizer', 0)) / (c_ep - tc.get('optimizer', 0)))}")
        if "checkpoint" in r["cache"]:
            ck = r["cache"]["checkpoint"]
            line += f"; train_head's per-epoch checkpoint: {human(ck['bytes'])} in {secs(ck['seconds'])}"
        if "same_data" in r["online"]:
            sd = r["online"]["same_data"]
            line += "; online batch vs cache, max rel. err: " + ", ".join(f"{k} {v:.1e}" for k, v in sd.items())
        if r["cache"]["in_memory"]:
            line += (f"; the loader holds {','.join(r['cache']['in_memory'])} in RAM "
                     f"({r['cache']['preload']}, setup {secs(r['cache']['setup_s'])})")
        console.print(line, highlight=False)
    dropped = all(results[r.name]["read"].get("plain", {}).get("dropped", False) for r in S.heads)
    cold = "not measured (--no-read)" if args.no_read else \
        f"page cache of the cache files dropped with posix_fadvise(DONTNEED) {'(ok)' if dropped else '(FAILED: cold = warm)'}"
    console.print(f"cold reads: {cold}; timed cache epochs: median of "
                  f"{', '.join(str(len(results[r.name]['cache']['epoch_s'])) for r in S.heads)} after 1 warm-up epoch; "
                  f"online: 1 epoch after 1 warm-up step. Load average at end {load_avg()[0]:.2f}; "
                  f"total {now() - t_all:.0f}s.", highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {"model": S.model, "videos": n_videos, "batch": S.batch,
                                                            "frames": S.frames, "threads": S.threads},
                                               "results": results}, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
