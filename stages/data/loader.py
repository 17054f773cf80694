"""Stage two's data path: stored bytes to the device, converted there.

The old path (CacheSplit + DataLoader) converted every video to float32 on the CPU, copied it to
make it contiguous, stacked the batch, pickled it through the worker queue and pinned it: 4-5%
of what the page cache delivers (issue 13). This one moves the bytes as they are stored:

* a batch is read as runs of rows, one read per array (``FeatureStore.read_rows``: straight from
  the shard files, one ``preadv`` per run of consecutive chunks), in the stored dtype: fp16,
  uint8 frames, or int8's parts q / scale / oidx / oval (cache/quant.py);
* into a ring of reusable buffers: shared memory that worker processes fill (only a slot number
  crosses the queue, never the bytes), pinned (page-locked) when the target is a GPU, so the
  host-to-device copy is asynchronous; ``prefetch`` batches per worker are read ahead;
* ``device_batch`` then does everything else on the device, after the copy: view pick, int8
  dequantisation (a torch version of cache/quant.dequantize_int8), fp16 -> float32, uint8 frame
  normalisation. The values equal the old path's exactly (same float32 operations);
* ``preload``: the selected arrays, in their stored dtype, held in RAM when they fit
  (``auto``: at most PRELOAD_FRACTION of the memory available and PRELOAD_LIMIT bytes);
* ``shuffle="block"``: an epoch order that shuffles blocks of consecutive videos, then videos
  within a window of blocks, so that a batch reads a few long runs instead of B scattered rows.

WebDataset shards (stages/data/wds_split.WdsSplit) get the same treatment: samples decoded to
stored-dtype tensors, stacked in the worker into shared memory, converted by ``device_batch``.
"""

from __future__ import annotations

import math
import os
import queue
import signal
import traceback
import weakref
from typing import Iterator

import numpy as np
import torch

from cache.errors import PipelineError, RunFailedError
from cache.meta import CLIP_MEAN, CLIP_STD
from stages.data.batch import collate_items, view_pick
from stages.data.zarr_split import CacheSplit

__all__ = ["PRELOAD_FRACTION", "PRELOAD_LIMIT", "SHUFFLES", "PRELOADS", "device_batch", "dequantize_int8_torch",
           "epoch_plan", "block_order", "ZarrBatches", "CacheLoader", "WdsLoader", "train_loader", "eval_loader",
           "make_source"]

PRELOAD_FRACTION = 0.3   # auto preload: the selected arrays take at most this share of MemAvailable
PRELOAD_LIMIT = 16 << 30  # ... and at most this many bytes
SHUFFLES = ("full", "block")
PRELOADS = ("auto", "on", "off")
QUANT = ("q", "scale", "oidx", "oval")


# ----------------------------------------------------------------------------- on the device
def dequantize_int8_torch(q: torch.Tensor, scale: torch.Tensor, oidx: torch.Tensor, oval: torch.Tensor) -> torch.Tensor:
    """cache/quant.dequantize_int8 in torch (float32), on whatever device the parts are on."""
    out = q.float() * scale.float().unsqueeze(-1)
    if oidx.shape[-1]:
        out.scatter_(-1, oidx.long(), oval.float())
    return out


def _names(batch: dict[str, torch.Tensor]) -> list[str]:
    out = []
    for k in batch:
        name, _, part = k.partition(".")
        if k in ("label", "valid", "view") or (part and part != "q"):
            continue
        out.append(name)
    return out


def device_batch(batch: dict[str, torch.Tensor], device: torch.device | str, train: bool,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A batch of stored-dtype tensors -> the tensors a head gets, on ``device``.

    ``batch``: "label" (B,), optional "valid" (B,) bool and "view" (B,) (the drawn view of each
    video in training), and per array NAME (B, V, T, ...) in its stored dtype, or its int8 parts
    NAME.q / NAME.scale / NAME.oidx / NAME.oval. Copies first (non-blocking: pinned sources overlap
    with compute), then on the device: the view (training: the drawn one, no V axis; evaluation:
    every view), dequantisation, float32, and uint8 frames normalised to (.., T, 3, H, W) with the
    model's ``mean`` / ``std`` (3, 1, 1). The values are those of CacheSplit's items, stacked.
    """
    device = torch.device(device)
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out = {"label": moved["label"]}
    if "valid" in moved:
        out["valid"] = moved["valid"]
    view = moved.get("view")
    B = int(moved["label"].shape[0])

    def pick(t: torch.Tensor) -> torch.Tensor:
        if not train:
            return t
        if view is None:
            return t[:, 0]
        return t[torch.arange(B, device=device), view]

    for name in _names(batch):
        if f"{name}.q" in moved:
            x = dequantize_int8_torch(*(pick(moved[f"{name}.{p}"]) for p in QUANT))
        else:
            x = pick(moved[name])
            if name == "frames":
                m = (mean if mean is not None else torch.tensor(CLIP_MEAN).view(3, 1, 1)).to(device)
                s = (std if std is not None else torch.tensor(CLIP_STD).view(3, 1, 1)).to(device)
                x = (x.movedim(-1, -3).float() / 255.0 - m) / s
            else:
                x = x.float()
        if x.data_ptr() == batch.get(name, x.new_empty(0)).data_ptr():
            x = x.clone()  # never hand out the loader's reusable buffer
        out[name] = x
    return out


# ----------------------------------------------------------------------------- epoch order
def block_order(n: int, seed: int, epoch: int, block: int, window: int) -> np.ndarray:
    """A permutation of range(n) that keeps reads sequential: blocks of ``block`` consecutive
    positions in random order, then positions shuffled within each ``window`` of that sequence."""
    rng = np.random.default_rng([seed, epoch, 11])
    block = max(1, int(block))
    blocks = [np.arange(s, min(s + block, n)) for s in range(0, n, block)]
    order = np.concatenate([blocks[i] for i in rng.permutation(len(blocks))]) if blocks else np.arange(0)
    window = max(1, int(window))
    for s in range(0, n, window):
        rng.shuffle(order[s:s + window])
    return order


def epoch_plan(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int, shuffle: str = "full",
               block: int = 0, window: int = 0) -> list[list[int]]:
    """This rank's slice of every global batch of one epoch (-1: padding, masked out).

    ``shuffle="full"``: stages/dist.rank_batches' order (a seeded permutation); ``"block"``:
    ``block_order`` with blocks of ``block`` (default: the batch size) and windows of ``window``
    (default: 4 blocks), sliced across ranks the same way."""
    from stages.dist import rank_batches, rank_slices

    if shuffle == "full":
        return rank_batches(n, batch_size, world, rank, seed, epoch, shuffle=True)
    block = block or batch_size
    return rank_slices(block_order(n, seed, epoch, block, window or 4 * block), batch_size, world, rank)


# ----------------------------------------------------------------------------- reading a Zarr split
def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ZarrBatches:
    """What the loader reads for one CacheSplit: its arrays in the stored dtype, per batch of positions."""

    def __init__(self, data, preload: str | bool = "auto"):
        self.data = data
        self.store, self.inputs, self.train = data.store, data.inputs, data.train
        self.split = self.inputs.split
        self.indices = np.asarray(data.indices, dtype=np.int64)
        self.labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        self.views, self.mean, self.std = data.views, data.mean, data.std
        self.parts: dict[str, tuple[str, str, list | None, tuple, np.dtype]] = {}  # key -> (name, part, layers, shape, dtype)
        for name in self.inputs.array_names():
            layers = self.inputs.layer_pos(name)
            for part, (shape, dtype) in self.store.row_shape(self.split, name, layers).items():
                self.parts[f"{name}.{part}" if part else name] = (name, part, layers, shape, np.dtype(dtype))
        self.memory: dict[str, torch.Tensor] | None = None
        # which shard files were written (sizes, checksums), taken here, before worker processes fork:
        # every read checks against it, so a file lost mid-run is an error, never fill values
        self.store.written_shards(self.split)
        want = {"on": True, "off": False, True: True, False: False}.get(preload)
        if want is None:
            want = self.nbytes() <= min(PRELOAD_LIMIT, PRELOAD_FRACTION * _mem_available())
        if want:
            self.preload()

    def row_bytes(self) -> int:
        return sum(math.prod(shape) * dt.itemsize for _, _, _, shape, dt in self.parts.values())

    def nbytes(self) -> int:
        """Bytes of the selected arrays of the selected videos, as stored."""
        return self.row_bytes() * len(self.indices)

    def preload(self) -> None:
        """Read every selected video's arrays into RAM once (stored dtype, sorted reads)."""
        mem = {k: torch.empty((len(self.indices), *shape), dtype=_torch_dtype(dt))
               for k, (_, _, _, shape, dt) in self.parts.items()}
        step = max(1, (256 << 20) // max(1, self.row_bytes()))
        for s in range(0, len(self.indices), step):
            self._read(self.indices[s:s + step], {k: t[s:s + step] for k, t in mem.items()})
        self.memory = mem

    def _read(self, rows: np.ndarray, dest: dict[str, torch.Tensor]) -> None:
        by_name: dict[str, dict] = {}
        for key, (name, part, layers, _, _) in self.parts.items():
            by_name.setdefault(name, {"layers": layers, "out": {}})["out"][part] = dest[key].numpy()
        for name, d in by_name.items():
            out = d["out"][""] if "" in d["out"] else d["out"]
            self.store.read_rows(self.split, name, rows, d["layers"], out=out)

    def alloc(self, rows: int, shared: bool, pin: bool) -> dict[str, torch.Tensor]:
        """One buffer slot: per key (rows, *shape) in the stored dtype."""
        out = {}
        for key, (_, _, _, shape, dt) in self.parts.items():
            t = torch.empty((rows, *shape), dtype=_torch_dtype(dt), pin_memory=pin and not shared)
            out[key] = t.share_memory_() if shared else t
        return out

    def fill(self, slot: dict[str, torch.Tensor], positions, seed: int, masked: bool) -> dict[str, torch.Tensor]:
        """Read the videos at ``positions`` (-1: padding, the first video, flagged invalid) into
        ``slot``; returns the small per-batch tensors (label, valid, view)."""
        positions = np.asarray(positions, dtype=np.int64)
        pos = np.maximum(positions, 0)
        n = len(pos)
        if self.memory is not None:
            for key, t in self.memory.items():
                dest = slot[key]
                for j, p in enumerate(pos.tolist()):  # one memcpy per video (index_select is slower here)
                    dest[j].copy_(t[p])
        else:
            self._read(self.indices[pos], {k: t[:n] for k, t in slot.items()})
        small = {"label": self.labels[pos]}
        if masked:
            small["valid"] = torch.from_numpy(positions >= 0)
        if self.train and self.views > 1:
            small["view"] = torch.tensor([view_pick(seed, int(p), self.views, True).start for p in pos],
                                         dtype=torch.int64)
        per_view = getattr(self.data, "view_labels", None)
        if self.train and per_view is not None:  # flipped views of mirrored classes (SSv2): the drawn view's label
            views = small["view"].numpy() if "view" in small else np.zeros(n, dtype=np.int64)
            small["label"] = torch.from_numpy(per_view[pos, views])
        return small


def _torch_dtype(dt: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dt)).dtype


# ----------------------------------------------------------------------------- the loader
def _pin_shared(slot: dict[str, torch.Tensor]) -> bool:
    """Page-lock shared-memory buffers in place (cudaHostRegister), so the copy to the GPU is async."""
    try:
        cudart = torch.cuda.cudart()
        for t in slot.values():
            if t.numel():
                if int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) != 0:
                    return False
        return True
    except Exception:  # no CUDA runtime call available: the copy is then synchronous
        return False


def _worker(source: ZarrBatches, slots, tasks, results, parent: int) -> None:
    # the main process decides when the pool stops (pipeline/signals.py): a terminal's Ctrl-C, sent to
    # the whole process group, is ignored here; SIGTERM gets its default action back, so that
    # Process.terminate() (_Pool._stop, multiprocessing's exit handler for daemon children) ends a
    # worker: the handler inherited by the fork ignored it, and the interpreter's exit then waited
    # for the worker forever
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the main process is gone (killed): nobody will send the stop
                return
            continue
        if task is None:
            return
        gen, k, slot_no, positions, seed, masked = task
        try:
            small = source.fill(slots[slot_no], positions, seed, masked)
            results.put((gen, k, slot_no, len(positions), {n: t.numpy() for n, t in small.items()}, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the main process, raised there
            try:
                import pickle

                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError("".join(traceback.format_exception(exc))[-2000:])
            results.put((gen, k, slot_no, 0, None, exc))


def _ended(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit status {code}"


class _Pool:
    """Worker processes and their shared-memory slots, kept for the whole run (forking per epoch
    costs seconds on a loaded box); a ``gen`` number per iteration tells late results of an
    abandoned iteration apart, and their slots go back to the free list."""

    def __init__(self, source: ZarrBatches, workers: int, prefetch: int, rows: int, cuda: bool):
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        self.key = (workers, prefetch, rows, cuda)
        self.depth = workers * prefetch
        self.slots = [source.alloc(rows, shared=True, pin=False) for _ in range(self.depth)]
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.procs: list = []
        # registered before the first worker starts: a stop (SIGINT) that lands while they start
        # still ends every worker already forked
        self._finalizer = weakref.finalize(self, _Pool._stop, self.procs, self.tasks, self.results)
        try:
            for _ in range(workers):
                p = ctx.Process(target=_worker, args=(source, self.slots, self.tasks, self.results, os.getpid()),
                                daemon=True)
                self.procs.append(p)
                p.start()
        except BaseException:
            self._finalizer()
            raise
        # page-locked only after the fork: registered memory may be marked not to be inherited
        self.pinned = cuda and all(_pin_shared(s) for s in self.slots)
        self.free = list(range(self.depth))
        self.busy = 0  # slots handed to workers and not yet returned
        self.gen = 0
        self.events: dict[int, object] = {}

    def get(self):
        while True:
            try:
                got = self.results.get(timeout=5)
            except queue.Empty:
                dead = [p for p in self.procs if p.pid is not None and not p.is_alive()]
                if dead:
                    how = ", ".join(f"{p.pid} ({_ended(p.exitcode)})" for p in dead)
                    raise RunFailedError(f"loader worker(s) {how} died (out of memory?): rerun with fewer workers "
                                         "(--set workers=N) to resume") from None
                continue
            self.busy -= 1
            if got[0] != self.gen:  # a result of an abandoned iteration
                self.free.append(got[2])
                continue
            return got

    def drain(self) -> None:
        """Wait for the slots an abandoned iteration still has at the workers."""
        while self.busy:
            got = self.get_any()
            self.free.append(got[2])

    def get_any(self):
        got = self.results.get(timeout=60)
        self.busy -= 1
        return got

    @staticmethod
    def _stop(procs, tasks, results) -> None:
        """Ask every worker to stop, wait a little, then end the ones still there (SIGTERM, SIGKILL)."""
        for _ in procs:
            try:
                tasks.put(None)
            except (OSError, ValueError):
                pass
        for p in procs:
            if p.pid is None:  # never started
                continue
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
        for q in (tasks, results):
            q.close()
            q.cancel_join_thread()

    def close(self) -> None:
        self._finalizer()
        if self.pinned:
            torch.cuda.synchronize()
            for s in self.slots:
                for t in s.values():
                    if t.numel():
                        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class CacheLoader:
    """Batches of a Zarr split for a plan (lists of positions), as ``device_batch`` dicts on ``device``.

    ``workers`` > 0: that many forked processes fill shared-memory slots, ``prefetch`` batches
    ahead each; 0: read in this process into reusable (pinned, for a GPU) slots.
    ``raw=True``: yield the stored-dtype batches themselves (device_batch's input; valid until
    the next batch is asked for: they live in the reusable slots), for a consumer that converts
    inside its own first op, and for bench/bench_read.py.
    """

    def __init__(self, source: ZarrBatches, plan: list[list[int]], device, workers: int = 0, prefetch: int = 2,
                 masked: bool = False, seed: int = 0, raw: bool = False):
        self.raw = raw
        self.source, self.plan, self.device = source, [list(b) for b in plan], torch.device(device)
        self.workers, self.prefetch, self.masked, self.seed = int(workers), max(1, int(prefetch)), masked, seed

    def __len__(self) -> int:
        return len(self.plan)

    def _convert(self, slot, n: int, small: dict) -> dict[str, torch.Tensor]:
        batch = {k: t[:n] for k, t in slot.items()}
        batch.update(small)
        if self.raw:
            return batch
        return device_batch(batch, self.device, self.source.train, self.source.mean, self.source.std)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # a torch DataLoader draws its workers' base seed from the global generator when an epoch
        # starts; drawing it too keeps every later random number (dropout...) of a run as it was
        torch.empty((), dtype=torch.int64).random_()
        if not self.plan:
            return
        rows = max(len(b) for b in self.plan)
        cuda = self.device.type == "cuda"
        if self.workers == 0:
            yield from self._serial(rows, cuda)
        else:
            yield from self._parallel(rows, cuda)

    def _serial(self, rows: int, cuda: bool):
        # The slots are kept on the source and reused epoch after epoch (and evaluation after
        # evaluation): fresh ones cost a page fault and the kernel's zeroing per 4 KB on first
        # touch, a fixed cost per epoch of about one batch (bench_read_bound.py, 4-batch epochs of
        # EVL patch tokens: 26-39% -> 38-76% of a cat-like read). An iteration that finds them
        # taken (another live iterator over the same source) gets its own.
        depth = 2 if cuda else 1
        kept = getattr(self.source, "_serial_slots", None)
        if kept is None or kept["busy"] or kept["rows"] < rows or kept["cuda"] != cuda:
            kept = {"rows": rows, "cuda": cuda, "busy": False, "events": [None] * depth,
                    "slots": [self.source.alloc(rows, shared=False, pin=cuda) for _ in range(depth)]}
            if getattr(self.source, "_serial_slots", None) is None or not self.source._serial_slots["busy"]:
                self.source._serial_slots = kept
        slots, events = kept["slots"], kept["events"]
        kept["busy"] = True
        try:
            for k, positions in enumerate(self.plan):
                i = k % depth
                if events[i] is not None:
                    events[i].synchronize()  # the copy out of this slot is done: it may be refilled
                small = self.source.fill(slots[i], positions, self.seed, self.masked)
                out = self._convert(slots[i], len(positions), small)
                if cuda:
                    events[i] = torch.cuda.Event()
                    events[i].record()
                yield out
        finally:
            kept["busy"] = False

    def _parallel(self, rows: int, cuda: bool):
        pool = getattr(self.source, "_pool", None)
        if pool is None or pool.key[0] != self.workers or pool.key[1] != self.prefetch or pool.key[2] < rows \
                or pool.key[3] != cuda:
            if pool is not None:
                pool.close()
            pool = self.source._pool = _Pool(self.source, self.workers, self.prefetch, rows, cuda)
        pool.drain()
        pool.gen += 1
        staging = [self.source.alloc(rows, shared=False, pin=True) for _ in range(2)] \
            if cuda and not pool.pinned else None
        ready: dict = {}
        try:
            yield from self._stream(pool, staging, cuda, ready)
        finally:  # finished or abandoned: slots read ahead go back to the pool
            pool.free += [slot_no for slot_no, _, _ in ready.values()]
            ready.clear()

    def _stream(self, pool: "_Pool", staging, cuda: bool, ready: dict):
        events = pool.events
        sent, k_next = 0, 0
        while k_next < len(self.plan):
            while pool.free and sent < len(self.plan):
                slot_no = pool.free.pop(0)
                if slot_no in events:
                    events.pop(slot_no).synchronize()
                pool.tasks.put((pool.gen, sent, slot_no, self.plan[sent], self.seed, self.masked))
                pool.busy += 1
                sent += 1
            while k_next not in ready:
                _, k, slot_no, n, small, exc = pool.get()
                if exc is not None:
                    pool.free.append(slot_no)
                    raise exc
                ready[k] = (slot_no, n, small)
            slot_no, n, small = ready.pop(k_next)
            small = {name: torch.from_numpy(a) for name, a in small.items()}
            slot = pool.slots[slot_no]
            ev_key = slot_no
            if staging is not None:
                j = k_next % 2
                if ("stage", j) in events:
                    events.pop(("stage", j)).synchronize()
                for key, t in slot.items():
                    staging[j][key][:n].copy_(t[:n])
                slot, ev_key = staging[j], ("stage", j)
            out = self._convert(slot, n, small)
            if cuda:
                ev = torch.cuda.Event()
                ev.record()
                events[ev_key] = ev
            pool.free.append(slot_no)
            k_next += 1
            yield out


# ----------------------------------------------------------------------------- WebDataset
def _stack_shared(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack items into one batch; in a worker process straight into shared memory (one copy)."""
    in_worker = torch.utils.data.get_worker_info() is not None
    out = {}
    for k in items[0]:
        first = items[0][k]
        shape = (len(items), *first.shape)
        if in_worker:
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * first.element_size())
            buf = torch.empty(0, dtype=first.dtype).set_(storage).view(shape)
        else:
            buf = torch.empty(shape, dtype=first.dtype)
        torch.stack([it[k] for it in items], out=buf)
        out[k] = buf
    return out


class WdsLoader:
    """A WdsSplit's batches (stored-dtype items stacked in the workers) converted by ``device_batch``."""

    def __init__(self, data, batch_size: int, device, workers: int = 0, drop_last: bool = False, prefetch: int = 2):
        from torch.utils.data import DataLoader

        self.data, self.device = data, torch.device(device)
        raw = data.raw_view()
        kw = {"prefetch_factor": prefetch} if workers else {}
        self.loader = DataLoader(raw, batch_size=batch_size, collate_fn=_stack_shared, num_workers=workers,
                                 drop_last=drop_last, pin_memory=self.device.type == "cuda", **kw)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        try:
            for batch in self.loader:
                yield device_batch(batch, self.device, self.data.train, self.data.mean, self.data.std)
        except PipelineError as exc:  # a damaged shard, found in a worker: still the one line it was there
            raise _worker_error(exc) from None


def _worker_error(exc: PipelineError) -> PipelineError:
    """A PipelineError raised in a DataLoader worker comes back as the same class with the worker's
    whole traceback as its message ("Caught CacheError in DataLoader worker process 0. Original
    Traceback ..."); the original message is its last line, after the class name."""
    text = str(exc)
    if "\n" not in text:
        return exc
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return type(exc)(last[len(prefix):]) if last.startswith(prefix) else exc


# ----------------------------------------------------------------------------- entry points (stages/train.py)
def make_source(data, preload: str = "auto") -> ZarrBatches:
    """The reader of a CacheSplit, kept on it (preloaded arrays are read once per run, not per epoch)."""
    src = getattr(data, "_loader_source", None)
    if src is None or src[0] != preload:
        src = (preload, ZarrBatches(data, preload))
        data._loader_source = src
    return src[1]


def train_loader(data, plan: list[list[int]] | None, device, workers: int = 0, preload: str = "auto",
                 masked: bool = True, batch_size: int = 0, drop_last: bool = False):
    """One epoch's batches (``data.set_epoch`` already called): a CacheSplit read by ``plan``
    (lists of positions, -1 padding), an OnlineSplit decoded and encoded by it, or a WdsSplit
    streamed ``batch_size`` at a time."""
    from torch.utils.data import IterableDataset

    if isinstance(data, IterableDataset):
        return WdsLoader(data, batch_size, device, workers, drop_last=drop_last)
    if not isinstance(data, CacheSplit):  # a split that makes its own batches (stages/data/online.py)
        return data.loader(plan, device, workers)
    return CacheLoader(make_source(data, preload), plan, device, workers=workers, masked=masked,
                       seed=data.epoch_seed)


def eval_loader(data, batch_size: int, device, workers: int = 0, preload: str = "auto"):
    """Evaluation batches in order: a CacheSplit (or a torch Subset of one: a rank's share) or a WdsSplit."""
    from torch.utils.data import IterableDataset, Subset

    if isinstance(data, IterableDataset):
        return WdsLoader(data, batch_size, device, workers)
    positions = list(range(len(data)))
    if isinstance(data, Subset):
        positions, data = [int(i) for i in data.indices], data.dataset
    if not isinstance(data, CacheSplit):  # items already in memory (stage three's embeddings): batched as they are
        from torch.utils.data import DataLoader

        return DataLoader(Subset(data, positions), batch_size=batch_size, collate_fn=collate_items)
    plan = [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]
    return CacheLoader(make_source(data, preload), plan, device, workers=workers, masked=False,
                       seed=data.epoch_seed)
