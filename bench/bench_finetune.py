#!/usr/bin/env python
"""Stage three: what end-to-end fine-tuning costs per step, and what gradient checkpointing buys.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_finetune.py                 # "demo" CLIP, ~1-2 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_finetune.py --model ViT-B-16 --batch 4 --steps 3   # GPU

Modes, each in its own subprocess (so that peak memory is per mode), same data, same seed:

  actionclip          ``Finetuner.step`` of stage three: decode + augment (DataLoader), visual and text
                      encoders + Transf prompt forward, global KL loss, backward, AdamW
  actionclip + ckpt   the same with open_clip's gradient checkpointing (both encoders)
  text4vis            ``Finetuner.step``: visual encoder + T-Trans, frozen text classifier, CE
  text4vis + ckpt     the same with gradient checkpointing
  text4vis from cache stage two: the same T-Trans head (same options, same classifier) trained from a
                      stage-one cache of the same videos (CacheSplit -> DataLoader -> head step with
                      AdamW, as ``train_head``'s loop does it)

Per mode: one warm-up step, then ``--steps`` timed steps (median). "data" is the time the loop
waits for the DataLoader, "compute" the rest of the step. Because separate processes on a shared
machine see different background load, the checkpointing time ratio is also measured in the
base mode's process by alternating steps with checkpointing on and off on one fixed batch. Memory: on CPU the peak resident set
during the timed steps above the resident set at their start (VmHWM reset through
/proc/self/clear_refs), and the bytes of the tensors autograd saves for backward in one step
(counted with saved_tensors_hooks, parameters excluded: the activation memory that
checkpointing trades for recomputation); on GPU torch.cuda.max_memory_allocated over the steps.
Random-init weights (nothing is downloaded); the numbers are per step and do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REPO, base_parser, console as make_console, demo_world, extract_cache, human,  # noqa: E402
                          load_avg, make_table, name_list, now, secs)
from bench.memprobe import reset_peak_rss, vm_status  # noqa: E402

MODES = {
    "actionclip": ("actionclip", False),
    "actionclip+ckpt": ("actionclip", True),
    "text4vis": ("text4vis", False),
    "text4vis+ckpt": ("text4vis", True),
    "text4vis-cache": ("cache", False),
}
LABELS = {
    "actionclip": "ActionCLIP fine-tune",
    "actionclip+ckpt": "ActionCLIP fine-tune + grad ckpt",
    "text4vis": "Text4Vis fine-tune",
    "text4vis+ckpt": "Text4Vis fine-tune + grad ckpt",
    "text4vis-cache": "Text4Vis T-Trans from cache (stage two)",
}


# ----------------------------------------------------------------------------- memory probes
def release_free_memory() -> None:
    """Hand freed heap back to the OS, so that the resident set is the live set."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SavedTensors:
    """Bytes of distinct non-parameter storages autograd saves for backward (pack hook)."""

    def __init__(self, params):
        import torch

        self.torch = torch
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}

    def __enter__(self):
        def pack(t):
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self.params:
                self.seen[ptr] = st.nbytes()
            return t

        self.ctx = self.torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())


# ----------------------------------------------------------------------------- child: one mode
def child(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    paradigm, ckpt = MODES[args.child]
    rss_imports = vm_status("VmRSS")
    t_setup = time.perf_counter()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    head_over = {"layers": str(args.layers)}
    if paradigm == "cache":
        from torch.utils.data import DataLoader

        from cache.store import open_store
        from stages.data.zarr_split import CacheSplit, check_cache_for_head, select_videos
        from stages.runs import lr_factor, param_groups
        from stages.classifiers import classifier_matrix
        from stages.data.batch import collate_items
        from stages.train import TrainCfg, build_head

        store = open_store(args.cache)
        cfg = TrainCfg(head="text4vis", batch_size=args.batch, lr=5e-5, weight_decay=0.2, seed=0)
        torch.manual_seed(0)
        head = build_head("text4vis", store, {"temporal": "ttrans", **head_over})
        inputs = check_cache_for_head(store, head.data_keys(), "text4vis", ["train"])
        idx = select_videos(store, "train", seed=0)
        head.set_classifier(classifier_matrix("clip_text", store, head, None, seed=cfg.seed))
        head.to(device).train()
        data = CacheSplit(store, inputs["train"], idx, train=True)
        opt = torch.optim.AdamW(param_groups(list(head.named_parameters()), None, cfg.weight_decay, False,
                                             keep_empty=True), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 1000, 0))
        trainable = head.num_trainable()

        def batches():
            epoch = 0
            while True:
                data.set_epoch(epoch, 0)
                gen = torch.Generator().manual_seed(epoch)
                yield from DataLoader(data, batch_size=args.batch, shuffle=True, generator=gen, collate_fn=collate_items,
                                      num_workers=args.workers, drop_last=True)
                epoch += 1

        def step(batch):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = head(batch)
            loss = head.loss(out, batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return loss.item()

        all_params = list(head.parameters())
    else:
        from pipeline.datasets import load_dataset
        from stages.finetune import DistContext, FinetuneCfg, Finetuner

        spec = load_dataset("demo", data_root=args.data)
        cfg = FinetuneCfg(paradigm=paradigm, model=args.model, frames=args.frames, epochs=1000,
                          batch_size=args.batch, warmup_epochs=0, grad_checkpointing=ckpt, workers=args.workers,
                          device=str(device), amp=args.amp)
        over = dict(head_over, temporal="ttrans") if paradigm == "text4vis" else dict(head_over, prompt="transf")
        tuner = Finetuner(spec, cfg, over, dist_ctx=DistContext(), log=lambda *a: None)
        trainable = sum(tuner.trainable.values())

        def batches():
            epoch = 0
            while True:
                yield from tuner.loader(tuner.train_data, epoch, shuffle=True, batch_size=args.batch)
                epoch += 1

        step = tuner.step
        all_params = list(tuner.model.parameters())

    it = batches()
    setup_s = time.perf_counter() - t_setup
    step(next(it))  # warm-up (allocator, kernels)
    with SavedTensors(all_params) as saved:
        step(next(it))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    release_free_memory()
    rss0 = vm_status("VmRSS")
    reset_ok = reset_peak_rss()
    step_s, data_s, losses = [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        losses.append(step(batch))
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        step_s.append(t2 - t0)
        data_s.append(t1 - t0)
    paired = None
    if paradigm != "cache" and not ckpt:
        # Checkpointing on vs off, interleaved step by step on one fixed batch in this one process, so
        # that other load on a shared machine hits both alike (separate processes cannot promise that).
        fixed = next(it)
        paired = {"off": [], "on": []}
        for i in range(args.steps):
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                tuner.model.clip.set_grad_checkpointing(on)
                t0 = time.perf_counter()
                step(fixed)
                if cuda:
                    torch.cuda.synchronize()
                paired["on" if on else "off"].append(time.perf_counter() - t0)
        tuner.model.clip.set_grad_checkpointing(False)
    res = {"mode": args.child, "paired": paired, "step_s": step_s, "data_s": data_s, "losses": losses, "trainable": trainable,
           "saved_bytes": saved.nbytes, "rss_imports": rss_imports, "rss_loop_start": rss0,
           "peak_loop_extra": (vm_status("VmHWM") - rss0) if reset_ok else None, "vmhwm": vm_status("VmHWM"),
           "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None, "setup_s": setup_s,
           "device": torch.cuda.get_device_name() if cuda else f"CPU ({args.threads} torch thread(s))",
           "loss_finite": bool(np.all(np.isfinite(losses)))}
    Path(args.json).write_text(json.dumps(res))


# ----------------------------------------------------------------------------- parent
def main() -> None:
    ap = base_parser(__doc__, quick="2 timed steps per mode", threads=False)
    ap.add_argument("--model", default="demo", help="open_clip model (default: the built-in 'demo', 64 px, 4x128)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="videos per step")
    ap.add_argument("--layers", type=int, default=6, help="T-Trans / Transf depth (the paper's 6)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    ap.add_argument("--workers", type=int, default=0, help="decode workers (0: in the training process)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per mode (1: on a shared 2-core machine two threads lost seconds to "
                         "each other's descheduling, bench_train.py saw the same)")
    ap.add_argument("--device", default="auto", help="auto | cpu")
    ap.add_argument("--amp", default="auto", help="auto | none | bf16 | fp16 (stage three on GPU)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    ap.add_argument("--json", default="", help="also write the raw results here")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    if args.quick:
        args.steps = 2
    console = make_console(160)
    t_all = now()
    load0 = load_avg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="bench_finetune-"))
    try:
        per_class = max(2, -(-args.batch * 2 // 4))  # two global batches per epoch
        spec = demo_world(scratch / "data", num_classes=4, train_per_class=per_class, val_per_class=1, frames=16,
                          size=96, seed=0)
        modes = name_list(args.modes)
        cache = scratch / "cache"
        if "text4vis-cache" in modes:
            extract_cache(spec, out=cache, model=args.model, frames=args.frames, layers="none", text="clip_single",
                          workers=0)
        results = {}
        for mode in modes:
            out = scratch / f"{mode}.json"
            cmd = [sys.executable, __file__, "--child", mode, "--json", str(out), "--data", str(scratch / "data"),
                   "--cache", str(cache), "--model", args.model, "--frames", str(args.frames), "--batch",
                   str(args.batch), "--layers", str(args.layers), "--steps", str(args.steps), "--workers",
                   str(args.workers), "--threads", str(args.threads), "--device", args.device, "--amp", args.amp]
            # fixed mmap threshold: large blocks go back to the OS when freed, so RSS follows the live set
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), env=env)
            if proc.returncode != 0:
                console.print(f"[red]{mode} failed[/red]\n{proc.stderr[-3000:]}")
                continue
            results[mode] = json.loads(out.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    any_res = next(iter(results.values()))
    gpu = any_res["cuda_peak"] is not None
    title = (f"Stage three per step: {args.model}, {args.batch} videos x {args.frames} frames, "
             f"prompt / T-Trans {args.layers} layers, {any_res['device']}, decode workers {args.workers}")
    peak_name = "GPU peak allocated" if gpu else "peak RSS above start"
    table = make_table(title, ("mode", "trainable", "step (median)", "step (min)", "data wait", "compute (min)",
                               "videos/s", "saved for backward", peak_name, "RSS at start"))
    med = {m: statistics.median(r["step_s"]) for m, r in results.items()}
    # compute = step minus the wait for data; the minimum over steps is the least disturbed by other
    # processes on a shared machine, so the ratios below use it
    comp = {m: min(s - d for s, d in zip(r["step_s"], r["data_s"])) for m, r in results.items()}
    mem = {m: (r["cuda_peak"] if gpu else r["peak_loop_extra"]) for m, r in results.items()}
    for mode, r in results.items():
        table.add_row(LABELS[mode], f"{r['trainable']:,}", secs(med[mode]), secs(min(r["step_s"])),
                      secs(statistics.median(r["data_s"])), secs(comp[mode]), f"{args.batch / med[mode]:.1f}",
                      human(r["saved_bytes"]), human(mem[mode]), human(r["rss_loop_start"]))
    console.print(table)

    ratios = make_table("Ratios (a / b)", ("a", "b", "step (median)", "compute (min)", "interleaved, same batch",
                                           "saved for backward", peak_name), left=("b",))
    paired_ratio = {}
    for a, b in (("actionclip+ckpt", "actionclip"), ("text4vis+ckpt", "text4vis"), ("text4vis", "text4vis-cache")):
        if a in results and b in results:
            peak = f"{mem[a] / mem[b]:.2f}x" if mem[a] and mem[b] else "-"
            pr = (results[b].get("paired") or {}) if a.endswith("+ckpt") else {}
            if pr:
                paired_ratio[a] = statistics.median(pr["on"]) / statistics.median(pr["off"])
            ratios.add_row(LABELS[a], LABELS[b], f"{med[a] / med[b]:.2f}x", f"{comp[a] / max(comp[b], 1e-9):.2f}x",
                           f"{paired_ratio[a]:.2f}x" if a in paired_ratio else "-",
                           f"{results[a]['saved_bytes'] / max(results[b]['saved_bytes'], 1):.2f}x", peak)
    console.print(ratios)
    if "text4vis" in results and "text4vis-cache" in results:
        console.print(f"Text4Vis: fine-tuning end to end costs {med['text4vis'] / med['text4vis-cache']:.0f}x the step "
                      f"time (median) of training the same T-Trans head from the cache "
                      f"({results['text4vis']['trainable']:,} vs {results['text4vis-cache']['trainable']:,} "
                      f"trainable parameters).", highlight=False)
    if "actionclip" in results and "actionclip+ckpt" in results:
        a, b = results["actionclip"], results["actionclip+ckpt"]
        kept = b["saved_bytes"] / max(a["saved_bytes"], 1)
        console.print(f"ActionCLIP: gradient checkpointing keeps {kept:.2f}x of the activations saved for backward "
                      f"and takes {paired_ratio.get('actionclip+ckpt', float('nan')):.2f}x the step time "
                      "(median, interleaved with steps without it in one process, on one batch).", highlight=False)
    console.print(f"{args.steps} timed steps per mode after 2 untimed (warm-up, saved-tensor count); losses finite: "
                  f"{all(r['loss_finite'] for r in results.values())}; load average {load0:.2f} at start, "
                  f"{load_avg()[0]:.2f} at end; total {now() - t_all:.0f}s.", highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
