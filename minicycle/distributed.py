"""Data parallelism over torch.distributed, for `torchrun --nproc_per_node N train.py ...`.

Every rank holds the full CycleGAN, takes its share of each global batch of the (seeded, shared)
epoch plan, and averages its gradients with the others before each optimizer step, so the ranks'
weights stay identical. We all-reduce the gradients ourselves instead of wrapping the nets in
DistributedDataParallel: one CycleGAN iteration runs each generator three times and each
discriminator three times before a backward, and freezes D's parameters during G's backward, which
DDP's per-forward bookkeeping does not allow without unused-parameter searches. One flattened
all-reduce per optimizer step is what DDP would send, minus the overlap with backward.
"""

import functools
import itertools
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  see below
import torch.nn as nn

# torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is imported (torch._dynamo,
# which the first optimizer imports, imports it). Imported once the group exists, those defaults keep the group,
# and gloo's worker threads, alive into interpreter shutdown, where a worker freeing a collective's tensors ends in
# "terminate called without an active exception", SIGABRT after a clean run. Imported here, before any group
# exists, the defaults are None and `Dist.close` really ends the group.


class RanksDisagree(RuntimeError):
    """The ranks hold different weights, so data parallel training went wrong; a one-line message."""


class CollectiveFailed(RuntimeError):
    """A collective failed, most often because another rank stopped on its own error; a one-line message."""


def collective(fn):
    """`fn` talks to the other ranks: its RuntimeError (gloo's 'Connection closed by peer' when another rank
    has left) becomes CollectiveFailed, which train.py reports in one line."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            raise CollectiveFailed(f"{fn.__name__} with the other ranks failed ({lines[0]}); if another rank "
                                   f"stopped with an error, that error is the cause") from e
    return wrapped


class Dist:
    """Rank and world size from torchrun's environment; a single process is rank 0 of 1."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks on this machine

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, message: str) -> None:
        """print, on rank 0 only."""
        if self.main:
            print(message)

    def setup(self, device: torch.device) -> torch.device:
        """Join the process group (nccl on GPUs, gloo on CPU); on GPUs each rank takes cuda:LOCAL_RANK."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        return device

    def close(self) -> None:
        """Leave the process group; its last reference goes with it, so its threads are joined here, while
        the interpreter still runs, not during interpreter shutdown."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    @collective
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @collective
    def average(self, values: list[float], device: torch.device) -> list[float]:
        """Mean of `values` over ranks (NaN anywhere gives NaN everywhere, so all ranks stop together)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    @collective
    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @collective
    def broadcast_nets(self, nets: list[nn.Module]) -> None:
        """Overwrite every rank's parameters and buffers with rank 0's, as DistributedDataParallel does
        when it wraps a model, so the ranks start identical however the weights were made or loaded."""
        if not self.enabled:
            return
        tensors = [t for net in nets for t in itertools.chain(net.parameters(), net.buffers())]
        with torch.no_grad():
            # One flat broadcast per dtype (BatchNorm counts batches in int64), in the same order on every rank.
            for dtype in dict.fromkeys(t.dtype for t in tensors):
                group = [t for t in tensors if t.dtype == dtype]
                flat = torch.cat([t.reshape(-1) for t in group])
                dist.broadcast(flat, src=0)
                for t, part in zip(group, flat.split([t.numel() for t in group])):
                    t.copy_(part.view_as(t))

    @collective
    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


@collective
def average_gradients(nets: list[nn.Module], world: int) -> None:
    """All-reduce the gradients of `nets` as one flat buffer and divide by the world size."""
    if world <= 1:
        return
    grads = [p.grad for net in nets for p in net.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def rank_batches(plan: list, start: int, batch_size: int, dist: Dist) -> tuple[list[list], list[int]]:
    """This rank's share of each global batch of the epoch's `plan` from key `start` on, and how many of the
    plan's keys each global batch consumes. A global batch is batch_size keys per rank; rank r takes every
    world-th key from the r-th. A short last batch is filled from the plan's start (as DistributedSampler
    pads) so that every rank steps together; it still consumes only the keys that were left."""
    keys, world = plan[start:], dist.world
    size = batch_size * world
    batches, consumed = [], []
    for i in range(0, len(keys), size):
        chunk = keys[i:i + size]
        consumed.append(len(chunk))
        if world > 1 and len(chunk) < size:
            chunk = chunk + (plan * size)[:size - len(chunk)]
        batches.append(chunk[dist.rank::world] if world > 1 else chunk)
    return batches, consumed


def average_losses(dist: Dist, losses: dict[str, float], stop: bool, device: torch.device) -> tuple[dict, bool]:
    """The losses averaged over ranks, and whether any rank asked to stop: one all-reduce, so that every
    rank logs the same numbers and all stop at the same iteration."""
    *values, stops = dist.average([*losses.values(), float(stop)], device)
    return dict(zip(losses, values)), bool(stops)


def check_same_weights(dist: Dist, nets: dict[str, nn.Module], where: Path) -> None:
    """Raise RanksDisagree unless every rank holds the same weights (compared by a cheap checksum per net: the
    float64 sum of its parameters)."""
    prints = dist.gather([float(sum(p.detach().double().sum() for p in net.parameters())) for net in nets.values()])
    differ = [k for i, k in enumerate(nets) if len({p[i] for p in prints}) > 1]
    if differ:
        raise RanksDisagree(f"the ranks hold different {', '.join(differ)} weights; refusing to save a "
                            f"diverged run (the last saved checkpoint in {where} is intact)")
