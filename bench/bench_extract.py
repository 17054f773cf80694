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

The pipelined runs report where their encode phase went themselves (``ExtractResult``'s
timings, public fields of stages/extract.py): the encoder's seconds and CPU seconds, the main
thread waiting for the next decoded video (worker start-up included), preparing a batch (gather
the uint8 frames, normalise), copying the outputs into the shard buffers, waiting for the writer,
the writer thread's seconds, and the CPU seconds of the process and of its decode workers. CPU
seconds per frame are the numbers to trust on a shared machine: they measure the work whatever
share of the cores the run got ("cores got" = CPU s / wall s). Nothing in the extractor is
patched or wrapped.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_parser, console as make_console, cpu_self, fmt_rate as fps, int_list,  # noqa: E402
                          load_avg, make_table, name_list, now, quiet, repeat_until, torch_threads)
from cache.datasets import DatasetSpec  # noqa: E402
from cache.files import human_bytes as human  # noqa: E402
from cache.source import ArraySpec  # noqa: E402
from cache.store import open_store  # noqa: E402
from pipeline.datasets import load_dataset  # noqa: E402
from pipeline.demo_data import DemoCfg, generate_demo  # noqa: E402
from stages.backbone import BackboneInfo, FrozenCLIP, load_clip, model_config, parse_layers  # noqa: E402
from stages.extract import ExtractCfg, plan_extraction, run_extraction  # noqa: E402
from stages.video import SamplingCfg, decode_clips, make_views, normalize  # noqa: E402

console = make_console(160)



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
    normalize_s: float = 0.0       # pipelined: preparing batches (gather uint8 frames, normalise)
    output_s: float = 0.0          # pipelined: encoder outputs into the shard buffers
    write_wait_s: float = 0.0      # pipelined: main thread waiting for the writer thread
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

    def one_pass() -> int:
        for b in batches:
            model.frozen(b)
        return x.shape[0]

    c0 = cpu_self()
    frames, secs = repeat_until(one_pass, min_s, model.device)
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
        if model.device.startswith("cuda"):
            torch.cuda.synchronize()
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


def pipelined(ds: DatasetSpec, cfg: ExtractCfg, out: Path, label: str, keep: bool) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    plan = plan_extraction(ds, cfg, out=out)
    with torch_threads(0):  # the extractor sets the thread count on CPU; the next path gets ours back
        res = run_extraction(plan, progress=False, log=quiet)
    predicted = sum(plan.bytes_per_video[s] * len(ds.splits[s]) for s in plan.split_arrays)
    disk = open_store(out).size_bytes()
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return Run(label, res.frames, res.encode_seconds, encoder_s=res.encoder_seconds,
               encoder_cpu_s=res.encoder_cpu_seconds, whole_s=res.seconds, loader_wait_s=res.loader_wait_seconds,
               normalize_s=res.prepare_seconds, output_s=res.output_seconds, write_wait_s=res.write_wait_seconds,
               writer_s=res.writer_seconds, cpu_main_s=res.cpu_seconds, cpu_workers_s=res.worker_cpu_seconds,
               disk_bytes=disk, predicted_bytes=predicted, failed=res.failed)


def best(runs: list[Run]) -> Run:
    return max(runs, key=lambda r: r.rate)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = base_parser(__doc__, "bench", quick="smaller data, fewer repeats, no ViT-B-32 (< 1 min)",
                     device="cpu", repeats=True)
    ap.add_argument("--threads", default="",
                    help="comma list of torch.set_num_threads values for the main process, each run side by "
                         "side (default: all cores, then 1)")
    ap.add_argument("--models", default="", help="comma list overriding the model set, e.g. tiny,demo")
    ap.add_argument("--workers", default="", help="comma list of decode worker counts (default 0,1,2)")
    ap.add_argument("--no-diag", action="store_true", help="skip the ablations")
    ap.add_argument("--keep", action="store_true", help="keep the bench caches")
    ap.add_argument("--batch", type=int, default=0, help="frames per encoder call for every model (0: per model)")
    ap.add_argument("--videos", type=int, default=-1, help="videos per model (-1: per model; 0: every video)")
    ap.add_argument("--world", default="", help="demo world CLASSES,TRAIN,VAL videos per class (default 8,6,2)")
    ap.add_argument("--json", default="", help="also write the throughput rows to this JSON file")
    args = ap.parse_args()

    S = settings(args.quick)
    if args.models:
        known = {m.model: m for m in S.models}
        S.models = [known.get(n, ModelRun(n, 16, 8, 1)) for n in name_list(args.models)]
    S.workers = int_list(args.workers, S.workers)
    S.threads = int_list(args.threads, S.threads)
    for m in S.models:
        m.repeats = args.repeats or m.repeats
        m.batch = args.batch or m.batch
        m.videos = m.videos if args.videos < 0 else (args.videos or None)
    if args.world:
        c, tr, va = int_list(args.world)
        S.demo = DemoCfg(num_classes=c, train_per_class=tr, val_per_class=va, frames=16, size=96)
    torch.set_num_threads(S.threads[0])
    cores = os.cpu_count() or 1
    work = Path(args.workdir)
    t_all = now()
    load0 = load_avg()

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
                        cfg = ExtractCfg(model=mr.model, frames=S.frames, layers=S.layers, text="none",
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
                r = pipelined(ds, ExtractCfg(**base, batch_frames=small), caches / f"{mr.model}-b{small}",
                              f"w={wbest}, batch {small}", args.keep)
                diag.append((mr.model, th, r, f"pipelined, batch {small} instead of {mr.batch}"))
                pmodel = Model(mr.model, layers, info, True, args.device)
                r = bare(pmodel, views, mr.batch, S.bare_min_s)
                r.path = "bare encoder, patch taps"
                diag.append((mr.model, th, r, "bare encoder also returning the patch tokens"))
                del pmodel
                for dt in ("fp16", "int8"):
                    r = pipelined(ds, ExtractCfg(**base, batch_frames=mr.batch, patch=True, dtype=dt),
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

    t1 = make_table("Throughput, best of repeats (frames/s of the timed phase; see the bench's docstring)",
                       ("model", "threads", "path", "frames", "seconds", "frames/s", "x naive", "% of bare",
                "% of best bare", "encoder busy", "CPU ms/frame", "cores got", "f/s incl. model build", "failed"),
                       left=("model", "path"))
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
    t2 = make_table("Where the seconds and the CPU go (best run; wall seconds are the main thread's unless noted)",
                       ("model", "threads", "path", "wall s", "encoder s", "encoder slowdown", "loader wait s",
                "prepare s", "outputs s", "write wait s", "other main s", "writer s (thread)", "CPU ms/f encoder", "CPU ms/f main other",
                "CPU ms/f workers", "cores got"),
                       left=("model", "path"))
    for (m, th, path), r in R.items():
        bb = bare_of(m, th)
        same = r.frames / bb.rate
        other = r.seconds - r.encoder_s - r.loader_wait_s - r.normalize_s - r.output_s - r.write_wait_s
        pipe = path.startswith("pipelined")
        isbare = path == "bare encoder"
        ms = lambda v: f"{1000 * v / r.frames:.2f}"  # noqa: E731
        t2.add_row(m, str(th), path, f"{r.seconds:.2f}", f"{r.encoder_s:.2f}",
                   f"{r.encoder_s / same:.2f}x" if not isbare else "1",
                   f"{r.loader_wait_s:.2f}" if pipe else "-", f"{r.normalize_s:.2f}" if not isbare else "-",
                   f"{r.output_s:.2f}" if pipe else "-", f"{r.write_wait_s:.2f}" if pipe else "-",
                   f"{other:.2f}" if not isbare else "-", f"{r.writer_s:.2f}" if pipe else "-",
                   ms(r.encoder_cpu_s), ms(r.cpu_main_s - r.encoder_cpu_s), ms(r.cpu_workers_s) if pipe else "-",
                   f"{(r.cpu_main_s + r.cpu_workers_s) / r.seconds:.2f}")
        if path == f"pipelined w={S.workers[-1]}":
            t2.add_section()
    console.print(t2)
    console.print("  encoder slowdown = encoder seconds in this run / bare-encoder seconds for as many frames at the "
                  "same thread count (>1: the encoder got less out of the CPU than alone);\n"
                  "  loader wait = main thread blocked on the next decoded video (worker start-up included); "
                  "prepare = gather uint8 frames + normalise (naive: normalise); outputs = encoder outputs to fp16 "
                  "numpy into the shard buffers;\n  write wait = main thread waiting for the writer thread; other main = "
                  "the rest of the wall (naive: decode, copies). CPU ms/f = CPU milliseconds per frame: encoder = process CPU while the "
                  "encoder ran;\n  main other = the rest of the main process (decode when w=0, normalize, unpickling "
                  "the workers' arrays, writer thread, ...); workers = the decode worker processes.")

    # ------------------------------------------------------------------ table 3: CPU budget
    t3 = make_table(f"CPU budget on {cores} cores: can decode hide behind the encoder?",
                       ("model", "threads", "decode CPU ms/video", "decode f/s per core", "bare f/s", "bare cores used",
                "ceiling f/s", "ceiling % of bare", "best pipelined f/s", "% of bare", "% of ceiling"),
                       left=("model",))
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
        t4 = make_table(f"Ablations on '{S.diag_model}' at the thread count / worker count of its best pipelined run",
                           ("model", "threads", "run", "frames/s", "% of bare (same threads)", "encoder busy",
                    "encoder s", "loader wait s", "writer s (thread)", "cores got", "what"),
                           left=("model", "run", "what"))
        for m, th, r, what in diag:
            pipe = not r.path.startswith("bare")
            busy = (r.cpu_main_s + r.cpu_workers_s) / r.seconds
            t4.add_row(m, str(th), r.path, fps(r.frames, r.seconds), f"{100 * r.rate / bare_of(m, th).rate:.0f}%",
                       f"{100 * r.encoder_s / r.seconds:.0f}%", f"{r.encoder_s:.2f}",
                       f"{r.loader_wait_s:.2f}" if pipe else "-", f"{r.writer_s:.2f}" if pipe else "-",
                       f"{busy:.2f}", what)
        console.print(t4)

    # ------------------------------------------------------------------ table 5/6: bytes
    t5 = make_table(f"Bytes per video ({S.frames} frames, 1 view), per tapped layer, from shapes (ArraySpec.nbytes)",
                       ("model", "tokens/frame", "D", "frame_emb fp16", "cls/layer fp16", "cls/layer int8",
                "patch/layer fp16", "patch/layer int8", "int8/fp16", "video: last4 cls+patch fp16",
                "video: last4 cls+patch int8"),
                       left=("model",))
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

    t6 = make_table("Measured on disk (store.size_bytes(), whole store folder) vs predicted from shapes",
                       ("model", "cache", "videos", "predicted data", "on disk", "on disk / predicted", "on disk per video"),
                       left=("model", "cache"))
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
    if args.json:
        import json

        rows = [{"model": m, "threads": th, "path": path, "frames": r.frames, "seconds": r.seconds,
                 "fps": r.rate, "pct_of_bare": 100 * r.rate / bare_of(m, th).rate, "encoder_busy": r.encoder_s / r.seconds,
                 "device": args.device} for (m, th, path), r in R.items()]
        Path(args.json).write_text(json.dumps({"rows": rows, "load": [load0[0], load_avg()[0]]}, indent=1))
    console.print(f"load average at start {load0[0]:.2f}, at end {load_avg()[0]:.2f}; "
                  f"bench wall {now() - t_all:.0f}s")
    if not args.keep:
        shutil.rmtree(caches, ignore_errors=True)


if __name__ == "__main__":
    main()
