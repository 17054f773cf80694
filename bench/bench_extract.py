#!/usr/bin/env python
"""Stage-one throughput: bare encoder vs naive loop vs the pipelined extractor, side by side.

    python bench/bench_extract.py            # 4.5 min on a 2-core box with other jobs on it
    python bench/bench_extract.py --quick    # < 1 min

Models (random init, built in-process, nothing downloaded): "tiny" (32 px, 2 blocks x 64: decode
dominates), "demo" (64 px, 4 blocks x 128: the encoder dominates), and open_clip "ViT-B-32"
(224 px, 12 blocks x 768, few videos; not in --quick). Every path runs at each main-process
torch.set_num_threads value (default: all cores, then 1), interleaved.

Everything runs in one process, on one machine, interleaved (rep 1 of every path, then rep 2,
...), and the best of the repeats is kept, so background noise hits every path alike: read the
ratios, not the absolute numbers.

What is timed (frames = videos x views x frames per view, here 1 view x 8 frames):

bare encoder   ``FrozenCLIP`` (same model, same taps, same batch size as the extractor) over
               every frame of the set, preloaded, preprocessed and normalised in memory; no
               decode, no copies back, no writes. One untimed warm-up batch first; whole passes
               are repeated until a minimum time (2 s, --quick 0.5 s) so fast models are not
               timed over a few milliseconds.
naive loop     one video at a time in the main process: decode_clips -> make_views -> normalize
               -> encoder (batch = that video's frames) -> numpy array in memory (no disk).
pipelined      ``plan_extraction`` + ``run_extraction(progress=False)`` into a fresh cache folder,
               text="none". Timed: the encode phase only, i.e. the call of
               ``stages.extract.encode_jobs`` (DataLoader worker start-up, decode, encoder,
               shard writes, waiting for the writer) -- model build and store creation are
               excluded. The whole run_extraction rate (with model build) is shown too.

The pipelined runs are instrumented from this process by wrapping, never by editing the
extractor: ``encode_jobs`` (phase wall time), the ``DataLoader`` the extractor builds (time the
main thread waits for the next decoded video, worker start-up included), ``normalize`` (uint8 ->
float in the main thread), ``FeatureStore.write_shard`` (writer-thread time), ``FrozenCLIP.forward``
(process CPU seconds while the encoder runs), and getrusage (CPU seconds of the main process and
of the decode workers). CPU seconds per frame are the numbers to trust on a shared machine: they
measure the work whatever share of the cores the run got ("cores got" = CPU s / wall s).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import stages.extract as X  # noqa: E402
from cache.store import ArraySpec, FeatureStore, open_store  # noqa: E402
from cache.store import human_bytes as human  # noqa: E402
from pipeline.datasets import DatasetSpec, load_dataset  # noqa: E402
from pipeline.demo_data import DemoCfg, generate_demo  # noqa: E402
from stages.backbone import BackboneInfo, FrozenCLIP, load_clip, model_config, parse_layers  # noqa: E402
from stages.video import SamplingCfg, decode_clips, make_views, normalize  # noqa: E402

console = Console(width=160)


# ----------------------------------------------------------------------------- settings
@dataclass
class ModelRun:
    model: str              # tiny | demo | any open_clip name (random init, no download)
    batch: int              # frames per encoder call, extractor and bare encoder alike
    videos: int | None      # None = every video of the bench set; else a subset
    repeats: int


@dataclass
class Settings:
    demo: DemoCfg
    models: list[ModelRun]
    workers: list[int]
    threads: list[int]        # torch.set_num_threads of the main process, each one run side by side
    bare_min_s: float = 2.0   # the bare encoder repeats whole passes until this long
    frames: int = 8
    layers: str = "last4"
    diag_model: str = "demo"  # the encoder-bound model the ablations run on


def settings(quick: bool) -> Settings:
    cores = os.cpu_count() or 2
    threads = sorted({1, cores}, reverse=True)
    if quick:
        return Settings(
            demo=DemoCfg(num_classes=4, train_per_class=4, val_per_class=2, frames=16, size=96),
            models=[ModelRun("tiny", 64, None, 2), ModelRun("demo", 64, None, 1)],
            workers=[0, 1, 2], threads=threads, bare_min_s=0.5)
    return Settings(
        demo=DemoCfg(num_classes=8, train_per_class=6, val_per_class=2, frames=16, size=96),
        models=[ModelRun("tiny", 128, None, 3), ModelRun("demo", 128, None, 2),
                ModelRun("ViT-B-32", 16, 6, 1)],
        workers=[0, 1, 2], threads=threads)


# ----------------------------------------------------------------------------- helpers
def now() -> float:
    return time.perf_counter()


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fps(frames: int, seconds: float) -> str:
    r = frames / max(seconds, 1e-9)
    return f"{r:,.0f}" if r >= 100 else f"{r:.1f}"


def subset(ds: DatasetSpec, n: int | None) -> DatasetSpec:
    """The first n videos, split proportions kept (train first)."""
    if n is None:
        return ds
    total = sum(len(v) for v in ds.splits.values())
    splits, left = {}, n
    names = list(ds.splits)
    for i, s in enumerate(names):
        k = left if i == len(names) - 1 else min(left, round(n * len(ds.splits[s]) / total))
        splits[s] = ds.splits[s][:k]
        left -= k
    splits = {s: v for s, v in splits.items() if v}
    return DatasetSpec(ds.name, ds.classes, splits, ds.video_root, dict(ds.sources))


def all_items(ds: DatasetSpec):
    return [it for s in ds.splits for it in ds.splits[s]]


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the three paths
@dataclass
class Run:
    path: str
    frames: int
    seconds: float                 # the timed phase
    encoder_s: float = 0.0
    encoder_cpu_s: float = 0.0     # process CPU seconds while the encoder ran (its threads + anything concurrent)
    whole_s: float = 0.0           # whole run_extraction (model build included)
    loader_wait_s: float = 0.0
    normalize_s: float = 0.0
    writer_s: float = 0.0
    cpu_main_s: float = 0.0
    cpu_workers_s: float = 0.0
    disk_bytes: int = 0
    predicted_bytes: int = 0
    failed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


class Model:
    """One loaded frozen model for the bare encoder and the naive loop (the extractor loads its own)."""

    def __init__(self, name: str, layers: tuple[int, ...], info: BackboneInfo, patch: bool, device: str):
        self.frozen = FrozenCLIP(load_clip(name, None, device="cpu", seed=0), layers, patch, info, device=device)
        self.info, self.device = info, device


def preload(items, samp: SamplingCfg, size: int) -> tuple[list[np.ndarray], float]:
    """Decode + views of every video on one thread (what one DataLoader worker does); CPU seconds."""
    with torch_threads(1):
        c0 = cpu_self()
        views = []
        for it in items:
            clips, _ = decode_clips(it.path, samp, it.num_frames)
            views.append(make_views(clips, size, samp.crops))
        return views, cpu_self() - c0


def bare(model: Model, views: list[np.ndarray], batch: int, min_s: float = 0.0) -> Run:
    """Every frame once, in extractor-sized batches; whole passes are repeated until ``min_s``
    seconds have gone by, so a fast model is not timed over a few milliseconds."""
    x = torch.from_numpy(np.concatenate([v.reshape(-1, *v.shape[2:]) for v in views]))  # (F, S, S, 3)
    x = normalize(x, model.frozen.mean, model.frozen.std).to(model.device)
    batches = [x[i:i + batch] for i in range(0, x.shape[0], batch)]
    model.frozen(batches[0])  # warm-up, untimed
    sync(model.device)
    frames, c0, t0 = 0, cpu_self(), now()
    while True:
        for b in batches:
            model.frozen(b)
            sync(model.device)
            frames += b.shape[0]
        if now() - t0 >= min_s:
            break
    secs = now() - t0
    cpu = cpu_self() - c0
    return Run("bare encoder", frames, secs, encoder_s=secs, encoder_cpu_s=cpu, cpu_main_s=cpu)


def naive(model: Model, items, samp: SamplingCfg) -> Run:
    size, fz = model.info.image_size, model.frozen
    out: dict[str, np.ndarray] = {}
    enc = norm = enc_cpu = 0.0
    frames = 0
    c0 = cpu_self()
    t0 = now()
    for i, it in enumerate(items):
        clips, _ = decode_clips(it.path, samp, it.num_frames)
        views = make_views(clips, size, samp.crops)  # (V, T, S, S, 3)
        V, T = views.shape[:2]
        tn = now()
        x = normalize(torch.from_numpy(views).reshape(-1, *views.shape[2:]).to(model.device), fz.mean, fz.std)
        te, ce = now(), cpu_self()
        res = fz(x)
        sync(model.device)
        enc += now() - te
        enc_cpu += cpu_self() - ce
        norm += te - tn
        for k, v in res.items():
            v = v.cpu().numpy().reshape(V, T, *v.shape[1:])
            if k not in out:
                out[k] = np.empty((len(items), *v.shape), dtype=np.float32)
            out[k][i] = v
        frames += V * T
    secs = now() - t0
    return Run("naive loop", frames, secs, encoder_s=enc, encoder_cpu_s=enc_cpu, normalize_s=norm,
               cpu_main_s=cpu_self() - c0)


@contextlib.contextmanager
def instrument(stats: dict):
    """Wrap the extractor's pieces (module globals / class attribute) for this process only."""
    orig_encode, orig_loader, orig_norm, orig_write = X.encode_jobs, X.DataLoader, X.normalize, FeatureStore.write_shard
    orig_fwd = FrozenCLIP.forward

    def forward(self, x):
        c = cpu_self()
        try:
            return orig_fwd(self, x)
        finally:
            stats["enc_cpu"] += cpu_self() - c

    def encode_jobs(*a, **k):
        c_self, c_kids, t = cpu_self(), cpu_children(), now()
        try:
            return orig_encode(*a, **k)
        finally:
            stats["phase"] += now() - t
            stats["cpu_main"] += cpu_self() - c_self
            stats["cpu_workers"] += cpu_children() - c_kids  # workers are joined by the end of the phase

    class TimedLoader(orig_loader):
        def __iter__(self):
            t = now()
            it = super().__iter__()  # worker start-up counts as waiting
            while True:
                try:
                    item = next(it)
                except StopIteration:
                    stats["loader_wait"] += now() - t
                    return
                stats["loader_wait"] += now() - t
                yield item
                t = now()

    def norm(*a, **k):
        t = now()
        try:
            return orig_norm(*a, **k)
        finally:
            stats["normalize"] += now() - t

    def write_shard(self, *a, **k):
        t = now()
        try:
            return orig_write(self, *a, **k)
        finally:
            stats["writer"] += now() - t

    X.encode_jobs, X.DataLoader, X.normalize, FeatureStore.write_shard = encode_jobs, TimedLoader, norm, write_shard
    FrozenCLIP.forward = forward
    try:
        yield
    finally:
        X.encode_jobs, X.DataLoader, X.normalize, FeatureStore.write_shard = orig_encode, orig_loader, orig_norm, orig_write
        FrozenCLIP.forward = orig_fwd


def pipelined(ds: DatasetSpec, cfg: X.ExtractCfg, out: Path, label: str, keep: bool) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    plan = X.plan_extraction(ds, cfg, out=out)
    stats = dict.fromkeys(("phase", "loader_wait", "normalize", "writer", "cpu_main", "cpu_workers", "enc_cpu"), 0.0)
    with instrument(stats):
        res = X.run_extraction(plan, progress=False, log=lambda *a, **k: None)
    predicted = sum(plan.bytes_per_video[s] * len(ds.splits[s]) for s in plan.split_arrays)
    disk = open_store(out).size_bytes()
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return Run(label, res.frames, stats["phase"], encoder_s=res.encoder_seconds, encoder_cpu_s=stats["enc_cpu"],
               whole_s=res.seconds,
               loader_wait_s=stats["loader_wait"], normalize_s=stats["normalize"], writer_s=stats["writer"],
               cpu_main_s=stats["cpu_main"], cpu_workers_s=stats["cpu_workers"], disk_bytes=disk,
               predicted_bytes=predicted, failed=res.failed)


def best(runs: list[Run]) -> Run:
    return max(runs, key=lambda r: r.rate)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller data, fewer repeats, no ViT-B-32 (< 1 min)")
    ap.add_argument("--workdir", default=str(REPO / "artifacts" / "bench"), help="demo data + bench caches")
    ap.add_argument("--threads", default="",
                    help="comma list of torch.set_num_threads values for the main process, each run side by "
                         "side (default: all cores, then 1)")
    ap.add_argument("--models", default="", help="comma list overriding the model set, e.g. tiny,demo")
    ap.add_argument("--workers", default="", help="comma list of decode worker counts (default 0,1,2)")
    ap.add_argument("--repeats", type=int, default=0, help="override repeats per model (best is kept)")
    ap.add_argument("--no-diag", action="store_true", help="skip the ablations")
    ap.add_argument("--device", default="cpu", help="cpu (the target of this bench) or cuda")
    ap.add_argument("--keep", action="store_true", help="keep the bench caches")
    args = ap.parse_args()

    S = settings(args.quick)
    if args.models:
        known = {m.model: m for m in S.models}
        S.models = [known.get(n, ModelRun(n, 16, 8, 1)) for n in args.models.split(",") if n]
    if args.workers:
        S.workers = [int(w) for w in args.workers.split(",")]
    if args.threads:
        S.threads = [int(t) for t in args.threads.split(",")]
    if args.repeats:
        for m in S.models:
            m.repeats = args.repeats
    torch.set_num_threads(S.threads[0])
    cores = os.cpu_count() or 1
    work = Path(args.workdir)
    t_all = now()
    load0 = os.getloadavg()

    # 1. data
    d = S.demo
    data_dir = work / f"demo-{d.num_classes}c-{d.train_per_class}+{d.val_per_class}-{d.frames}f-{d.size}px"
    t = now()
    generate_demo(data_dir, d, progress=False)
    full = load_dataset("demo", data_root=data_dir)
    gen_s = now() - t
    caches = work / "caches"
    caches.mkdir(parents=True, exist_ok=True)
    samp = SamplingCfg(S.frames, "segment", 8, 1, 1)

    console.print(f"[bold]clipcache stage-one bench[/] ({'quick' if args.quick else 'full'}): {cores} cores, "
                  f"torch {torch.__version__}, device {args.device}. Main process torch.set_num_threads in "
                  f"{S.threads} (every path is run at each, interleaved); DataLoader decode workers run "
                  f"with 1 torch thread each (torch's default in workers).")
    console.print(f"data: {data_dir} ({sum(len(v) for v in full.splits.values())} videos, {d.frames} frames "
                  f"{d.size}px h264, made/reused in {gen_s:.1f}s); {S.frames} frames x 1 view sampled per video; "
                  f"layers {S.layers}, no patch tokens, fp16 in the throughput runs. "
                  f"Load average at start {load0[0]:.2f}.")

    R: dict[tuple[str, int, str], Run] = {}         # (model, threads, path) -> best run
    info_of: dict[str, tuple[BackboneInfo, tuple[int, ...], int]] = {}
    budget: dict[str, dict] = {}
    diag: list[tuple[str, int, Run, str]] = []

    for mr in S.models:
        ds = subset(full, mr.videos)
        items = all_items(ds)
        info = BackboneInfo.from_config(model_config(mr.model))
        layers = parse_layers(S.layers, info.depth)
        t = now()
        model = Model(mr.model, layers, info, False, args.device)
        nparams = sum(p.numel() for p in model.frozen.visual.parameters())
        info_of[mr.model] = (info, layers, nparams)
        console.print(f"model [bold]{mr.model}[/]: random init (seed 0), {info.image_size}px, patch {info.patch_size}, "
                      f"{info.depth} blocks x {info.width}, embed {info.embed_dim}, {nparams / 1e6:.2f}M vision "
                      f"params, taps {list(layers)}; {len(items)} videos; batch {mr.batch} frames; "
                      f"repeats {mr.repeats}; built in {now() - t:.1f}s", highlight=False)
        views, decode_cpu = preload(items, samp, info.image_size)
        budget[mr.model] = {"decode_cpu_s": decode_cpu, "videos": len(items)}
        runs: dict[tuple[int, str], list[Run]] = {}
        for rep in range(mr.repeats):
            for th in S.threads:
                with torch_threads(th):
                    runs.setdefault((th, "bare encoder"), []).append(bare(model, views, mr.batch, S.bare_min_s))
                    runs.setdefault((th, "naive loop"), []).append(naive(model, items, samp))
                    for w in S.workers:
                        cfg = X.ExtractCfg(model=mr.model, frames=S.frames, layers=S.layers, text="none",
                                           batch_frames=mr.batch, workers=w, device=args.device)
                        label = f"pipelined w={w}"
                        runs.setdefault((th, label), []).append(
                            pipelined(ds, cfg, caches / f"{mr.model}-t{th}-w{w}", label, args.keep))
        for (th, path), rs in runs.items():
            R[(mr.model, th, path)] = best(rs)

        # ablations on the encoder-bound model, at the thread count of its best pipelined run
        if mr.model == S.diag_model and not args.no_diag:
            pipe = [(k, r) for k, r in R.items() if k[0] == mr.model and k[2].startswith("pipelined")]
            (_, th, label), _r = max(pipe, key=lambda kr: kr[1].rate)
            wbest = int(label.split("=")[1])
            base = dict(model=mr.model, frames=S.frames, layers=S.layers, text="none", device=args.device,
                        workers=wbest)
            small = max(8, mr.batch // 4)
            with torch_threads(th):
                r = bare(model, views, small, S.bare_min_s)
                diag.append((mr.model, th, r, f"bare encoder, batch {small} instead of {mr.batch}"))
                r = pipelined(ds, X.ExtractCfg(**base, batch_frames=small), caches / f"{mr.model}-b{small}",
                              f"w={wbest}, batch {small}", args.keep)
                diag.append((mr.model, th, r, f"pipelined, batch {small} instead of {mr.batch}"))
                pmodel = Model(mr.model, layers, info, True, args.device)
                r = bare(pmodel, views, mr.batch, S.bare_min_s)
                r.path = "bare encoder, patch taps"
                diag.append((mr.model, th, r, "bare encoder also returning the patch tokens"))
                del pmodel
                for dt in ("fp16", "int8"):
                    r = pipelined(ds, X.ExtractCfg(**base, batch_frames=mr.batch, patch=True, dtype=dt),
                                  caches / f"{mr.model}-patch-{dt}", f"w={wbest}, patch {dt}", True)
                    r.extra["dtype"] = dt
                    diag.append((mr.model, th, r, f"+ patch tokens of {len(layers)} layers, {dt}"
                                 + (" (quantised in the writer thread)" if dt == "int8" else "")))
        del model

    # ------------------------------------------------------------------ table 1: throughput
    def bare_of(m: str, th: int) -> Run:
        return R[(m, th, "bare encoder")]

    def best_bare(m: str) -> Run:
        return max((bare_of(m, th) for th in S.threads), key=lambda r: r.rate)

    t1 = Table(title="Throughput, best of repeats (frames/s of the timed phase; see the bench's docstring)")
    for col in ("model", "threads", "path", "frames", "seconds", "frames/s", "x naive", "% of bare",
                "% of best bare", "encoder busy", "CPU ms/frame", "cores got", "f/s incl. model build", "failed"):
        t1.add_column(col, justify="left" if col in ("model", "path") else "right")
    for m in info_of:
        for th in S.threads:
            nv, bb, top = R[(m, th, "naive loop")].rate, bare_of(m, th).rate, best_bare(m).rate
            for (mm, tt, path), r in R.items():
                if (mm, tt) != (m, th):
                    continue
                t1.add_row(m, str(th), path, str(r.frames), f"{r.seconds:.2f}", fps(r.frames, r.seconds),
                           f"{r.rate / nv:.2f}", f"{100 * r.rate / bb:.0f}%", f"{100 * r.rate / top:.0f}%",
                           f"{100 * r.encoder_s / r.seconds:.0f}%",
                           f"{1000 * (r.cpu_main_s + r.cpu_workers_s) / r.frames:.2f}",
                           f"{(r.cpu_main_s + r.cpu_workers_s) / r.seconds:.2f}",
                           fps(r.frames, r.whole_s) if r.whole_s else "",
                           str(r.failed) if path.startswith("pipelined") else "")
            t1.add_section()
    console.print(t1)
    console.print("  % of bare: against the bare encoder at the same thread count; % of best bare: against the "
                  "fastest bare encoder of any thread count.\n  encoder busy = encoder seconds / wall seconds "
                  "(pipelined: ExtractResult.encoder_seconds / encode-phase wall).\n  CPU ms/frame = CPU seconds "
                  "of this process (+ its decode workers) per frame: the work, whatever share of the box we got; "
                  f"cores got = CPU s / wall s (of {cores}; well below {cores} means other load on the box).\n"
                  "  bare encoder frames > the set's: whole passes repeated up to the minimum time.")

    # ------------------------------------------------------------------ table 2: breakdown
    t2 = Table(title="Where the seconds and the CPU go (best run; wall seconds are the main thread's unless noted)")
    for col in ("model", "threads", "path", "wall s", "encoder s", "encoder slowdown", "loader wait s",
                "normalize s", "other main s", "writer s (thread)", "CPU ms/f encoder", "CPU ms/f main other",
                "CPU ms/f workers", "cores got"):
        t2.add_column(col, justify="left" if col in ("model", "path") else "right")
    for (m, th, path), r in R.items():
        bb = bare_of(m, th)
        same = r.frames / bb.rate
        other = r.seconds - r.encoder_s - r.loader_wait_s - r.normalize_s
        pipe = path.startswith("pipelined")
        isbare = path == "bare encoder"
        ms = lambda v: f"{1000 * v / r.frames:.2f}"  # noqa: E731
        t2.add_row(m, str(th), path, f"{r.seconds:.2f}", f"{r.encoder_s:.2f}",
                   f"{r.encoder_s / same:.2f}x" if not isbare else "1",
                   f"{r.loader_wait_s:.2f}" if pipe else "-", f"{r.normalize_s:.2f}" if not isbare else "-",
                   f"{other:.2f}" if not isbare else "-", f"{r.writer_s:.2f}" if pipe else "-",
                   ms(r.encoder_cpu_s), ms(r.cpu_main_s - r.encoder_cpu_s), ms(r.cpu_workers_s) if pipe else "-",
                   f"{(r.cpu_main_s + r.cpu_workers_s) / r.seconds:.2f}")
        if path == f"pipelined w={S.workers[-1]}":
            t2.add_section()
    console.print(t2)
    console.print("  encoder slowdown = encoder seconds in this run / bare-encoder seconds for as many frames at the "
                  "same thread count (>1: the encoder got less out of the CPU than alone);\n"
                  "  loader wait = main thread blocked on the next decoded video (worker start-up included); "
                  "other main = wall - encoder - loader wait - normalize\n  (cat, copies to numpy, shard buffers, "
                  "waiting on shard writes). CPU ms/f = CPU milliseconds per frame: encoder = process CPU while the "
                  "encoder ran;\n  main other = the rest of the main process (decode when w=0, normalize, unpickling "
                  "the workers' arrays, writer thread, ...); workers = the decode worker processes.")

    # ------------------------------------------------------------------ table 3: CPU budget
    t3 = Table(title=f"CPU budget on {cores} cores: can decode hide behind the encoder?")
    for col in ("model", "threads", "decode CPU ms/video", "decode f/s per core", "bare f/s", "bare cores used",
                "ceiling f/s", "ceiling % of bare", "best pipelined f/s", "% of bare", "% of ceiling"):
        t3.add_column(col, justify="left" if col == "model" else "right")
    for m, b in budget.items():
        for th in S.threads:
            bb = bare_of(m, th)
            frames = bb.frames
            bare_s = frames / bb.rate
            bare_cpu = bb.cpu_main_s * frames / bb.frames
            dec = b["decode_cpu_s"] * frames / (b["videos"] * S.frames)
            ceil = frames / max(bare_s, (bare_cpu + dec) / cores)
            pipe = max((r for k, r in R.items() if k[0] == m and k[1] == th and k[2].startswith("pipelined")),
                       key=lambda r: r.rate)
            t3.add_row(m, str(th), f"{1000 * b['decode_cpu_s'] / b['videos']:.1f}",
                       fps(b["videos"] * S.frames, b["decode_cpu_s"]), f"{bb.rate:,.1f}",
                       f"{bb.cpu_main_s / bb.seconds:.2f}", f"{ceil:,.1f}", f"{100 * ceil / bb.rate:.0f}%",
                       f"{pipe.rate:,.1f} ({pipe.path.split()[-1]})", f"{100 * pipe.rate / bb.rate:.0f}%",
                       f"{100 * pipe.rate / ceil:.0f}%")
        t3.add_section()
    console.print(t3)
    console.print("  decode = decode_clips + make_views on 1 thread (what one worker does), CPU seconds; "
                  "bare cores used = bare-encoder CPU s / wall s;\n  ceiling = frames / max(bare s, "
                  f"(bare CPU s + decode CPU s) / {cores} cores): the best a pipeline can do with decode and "
                  "encoder sharing these cores.")

    # ------------------------------------------------------------------ table 4: ablations
    if diag:
        t4 = Table(title=f"Ablations on '{S.diag_model}' at the thread count / worker count of its best pipelined run")
        for col in ("model", "threads", "run", "frames/s", "% of bare (same threads)", "encoder busy",
                    "encoder s", "loader wait s", "writer s (thread)", "cores got", "what"):
            t4.add_column(col, justify="left" if col in ("model", "run", "what") else "right")
        for m, th, r, what in diag:
            pipe = not r.path.startswith("bare")
            busy = (r.cpu_main_s + r.cpu_workers_s) / r.seconds
            t4.add_row(m, str(th), r.path, fps(r.frames, r.seconds), f"{100 * r.rate / bare_of(m, th).rate:.0f}%",
                       f"{100 * r.encoder_s / r.seconds:.0f}%", f"{r.encoder_s:.2f}",
                       f"{r.loader_wait_s:.2f}" if pipe else "-", f"{r.writer_s:.2f}" if pipe else "-",
                       f"{busy:.2f}", what)
        console.print(t4)

    # ------------------------------------------------------------------ table 5/6: bytes
    t5 = Table(title=f"Bytes per video ({S.frames} frames, 1 view), per tapped layer, from shapes (ArraySpec.nbytes)")
    for col in ("model", "tokens/frame", "D", "frame_emb fp16", "cls/layer fp16", "cls/layer int8",
                "patch/layer fp16", "patch/layer int8", "int8/fp16", "video: last4 cls+patch fp16",
                "video: last4 cls+patch int8"):
        t5.add_column(col, justify="left" if col == "model" else "right")
    targets = [(m, info_of[m][0]) for m in info_of]
    targets.append(("ViT-B-16 (reference)", BackboneInfo.from_config(model_config("ViT-B-16"))))
    T = S.frames
    for name, inf in targets:
        P, D, E = inf.num_patches, inf.width, inf.embed_dim
        L4 = len(parse_layers("last4", inf.depth))
        fe = ArraySpec("frame_emb", (1, T, E), "float16").nbytes()
        c16, c8 = (ArraySpec("cls", (1, T, 1, D), dt).nbytes() for dt in ("float16", "int8"))
        p16, p8 = (ArraySpec("patch", (1, T, 1, P, D), dt, layer_axis=2).nbytes() for dt in ("float16", "int8"))
        t5.add_row(name, f"1+{P}", str(D), human(fe), human(c16), human(c8), human(p16), human(p8),
                   f"{p8 / p16:.3f}", human(fe + L4 * (c16 + p16)) + f" (L={L4})", human(fe + L4 * (c8 + p8)))
    console.print(t5)

    t6 = Table(title="Measured on disk (store.size_bytes(), whole store folder) vs predicted from shapes")
    for col in ("model", "cache", "videos", "predicted data", "on disk", "on disk / predicted", "on disk per video"):
        t6.add_column(col, justify="left" if col in ("model", "cache") else "right")
    for m in info_of:
        r = next(v for k, v in R.items() if k[0] == m and k[2].startswith("pipelined"))
        n = budget[m]["videos"]
        t6.add_row(m, "frame_emb + cls last4, fp16", str(n), human(r.predicted_bytes), human(r.disk_bytes),
                   f"{r.disk_bytes / r.predicted_bytes:.2f}", human(r.disk_bytes / n))
    for m, _th, r, _ in diag:
        if "dtype" in r.extra:
            n = budget[m]["videos"]
            t6.add_row(m, f"frame_emb + cls + patch last4, {r.extra['dtype']}", str(n), human(r.predicted_bytes),
                       human(r.disk_bytes), f"{r.disk_bytes / r.predicted_bytes:.2f}", human(r.disk_bytes / n))
    console.print(t6)
    console.print("  on disk also holds metadata, manifest, labels, status, failure files and the tapped blocks' "
                  "aux weights (ln_1, in_proj: these dominate the small caches).")
    # what the writer thread spends per ViT-B-16 video on the patch tokens of 4 layers
    from cache.quant import quantize_int8
    ref = BackboneInfo.from_config(model_config("ViT-B-16"))
    a = np.random.default_rng(0).standard_normal((1, S.frames, 4, ref.num_patches, ref.width), dtype=np.float32)
    with torch_threads(1):
        t = now()
        a.astype(np.float16)
        t16 = now() - t
        t = now()
        quantize_int8(a)
        t8 = now() - t
    console.print(f"  writer-thread CPU per ViT-B-16 video (patch tokens, 4 layers, {S.frames} frames, "
                  f"{human(a.nbytes)} fp32), measured here: cast to fp16 {1000 * t16:.0f} ms, "
                  f"quantize_int8 {1000 * t8:.0f} ms.")
    console.print(f"load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
                  f"bench wall {now() - t_all:.0f}s")
    if not args.keep:
        shutil.rmtree(caches, ignore_errors=True)


if __name__ == "__main__":
    main()
