"""Device memory for translation (infer.py): what a batch needs, estimated before it runs, and what a CUDA
device has for it. A batch needs the peak of its tensors (forward_bytes), the weights, and MARGIN: 10% of the
tensors and 1 GiB for what no tensor shows (cuDNN's workspaces, the autotuners' timing buffers, the caching
allocator's rounding), an allowance, not measured on a GPU (README.md gives the numbers).
"""

import functools
import itertools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MARGIN = (0.10, 2**30)


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storage alive at once while it is on, and their peak: a storage counts from the op
    that makes it until it is freed (views and in-place results share their input's)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # id of each storage made under it and still alive -> its bytes
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(s := t.untyped_storage()) not in self.live:
                self.live[id(s)] = s.nbytes()
                self.now += s.nbytes()
                weakref.finalize(s, self._free, id(s))  # torch keeps this object as long as the storage
        self.peak = max(self.peak, self.now)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)


@functools.cache
def forward_bytes(net: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Peak bytes of the tensors one no_grad forward of `net` holds at once on an input of `shape`, the input and
    output included, the weights not. On the meta device it takes milliseconds at any size: meta tensors have
    sizes, but no memory and no arithmetic."""
    with torch.no_grad(), LiveBytes() as live:
        net(torch.empty(shape, device=next(net.parameters()).device))
    return live.peak


def batch_bytes(net: torch.nn.Module, shadow: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Device memory that running `net` on a batch of `shape` needs: its tensors' peak (forward_bytes of `shadow`,
    the same layers on the meta device), the weights, MARGIN."""
    weights = sum(t.nbytes for t in itertools.chain(net.parameters(), net.buffers()))
    return weights + round(forward_bytes(shadow, shape) * (1 + MARGIN[0])) + MARGIN[1]


def available_bytes(device: torch.device) -> int | None:
    """What a CUDA device has for this process: its free memory, and what torch's caching allocator holds (the
    weights, and blocks that earlier batches freed, which it reuses); None elsewhere (nothing is checked)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
