"""torchrun for stages two and three: the process group, a few collectives, global batches.

Every rank of a torchrun job builds the same model from the same seed and walks the same
sequence of *global* batches (a seeded permutation of the training set cut every
``batch_size`` videos); ``rank_batches`` gives each rank its equal slice of every global batch,
padded with -1 entries (masked out) when the batch does not divide by the world size. A loss
computed on the all-gathered global batch (``DistContext.all_cat_with_grad``) and scaled by
the world size makes DDP's gradient average equal to the gradient of the one-process loss.
"""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["DistContext", "rank_batches", "rank_slices", "dist_device", "check_device"]


class DistContext:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and the few collectives used here."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self.started = False

    @classmethod
    def from_env(cls) -> "DistContext":
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")),
                   int(env.get("LOCAL_WORLD_SIZE", str(world))))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        """Make ``device`` this process's current GPU (pinning threads, NCCL and autocast queries
        use the current one, cuda:0 otherwise), then join the process group under torchrun."""
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started = True

    def stop(self) -> None:
        import torch.distributed as dist

        if self.started and dist.is_initialized():
            dist.destroy_process_group()
            self.started = False

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            x = x.clone()
            dist.all_reduce(x)
        return x

    def all_cat(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors of all ranks in rank order (no gradient)."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.detach().contiguous())
        return torch.cat(parts)

    def all_cat_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """As ``all_cat``, with this rank's slice still attached to its graph."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[self.rank] = x
        return torch.cat(parts)

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers everywhere (BatchNorm statistics drift apart on CPU ranks, where there
        is no SyncBatchNorm): evaluation and checkpoints then use one model."""
        if self.enabled:
            import torch.distributed as dist

            for buf in module.buffers():
                dist.broadcast(buf, 0)

    def all_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def rank_batches(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int,
                 shuffle: bool) -> list[list[int]]:
    """This rank's slice of every global batch; -1 marks padding (masked out)."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(n) if shuffle else np.arange(n)
    return rank_slices(order, batch_size, world, rank)


def rank_slices(order, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """``order`` cut into global batches of ``batch_size``, each padded with -1 to a multiple of
    ``world`` and split evenly: this rank's share of each."""
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [int(i) for i in order[start:start + batch_size]]
        per = -(-len(chunk) // world)
        chunk += [-1] * (per * world - len(chunk))
        out.append(chunk[rank * per:(rank + 1) * per])
    return out


def check_device(name: str) -> None:
    """One ConfigError for a device this machine does not have (or a misspelt one), before any work."""
    import re

    from cache.errors import ConfigError

    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name in ("auto", "cpu"):
        return
    if m is None:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{name}'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but torch sees no CUDA GPU on this machine "
                          f"(torch {torch.__version__}); use device cpu (or auto) instead")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def dist_device(name: str, dist_ctx: DistContext) -> torch.device:
    """The device of this process: "auto" is CUDA when present; under torchrun, cuda:LOCAL_RANK."""
    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dist_ctx.enabled and dev.index is None:
        dev = torch.device("cuda", dist_ctx.local_rank)
    return dev
