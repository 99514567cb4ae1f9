"""The conv kernels' tiles, and what each needs of the GPU it runs on: the GEMMs of kernels/reflect_conv.py
(forward), conv_dgrad.py and conv_wgrad.py are autotuned over these configs, pruned per launch to those
that fit the device and the problem."""

import torch
import triton

import kernels.device

# triton.jit picks the interpreter at decoration time; so do the config lists, since benchmarking
# more than one config crashes under the interpreter (no active GPU driver).
_INTERPRET = bool(triton.knobs.runtime.interpret)


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=s, num_warps=w) for bm, bn, bk, s, w in shapes]


# (BM, BN, BK, num_stages, num_warps). Every tl.dot dimension is >= 16 so that each config compiles on a
# GPU; BN = 16 serves the 3-channel outputs at either end of the generator. BM >= 64 with 4+ warps lets
# Hopper use warpgroup MMA (wgmma). Per (BM, BN), the pruning keeps the widest BK (then the most stages)
# the device can hold: BK = 32 is for GPUs with less shared memory or with mma.sync (which holds the
# operands in registers), and on an H100 loses to a wider one wherever the channels allow it.
if _INTERPRET:
    GEMM_CONFIGS = _configs([(128, 32, 32, 1, 4)])
    WGRAD_CONFIGS = _configs([(32, 32, 32, 1, 4)])
else:  # forward and dgrad: BM tiles the pixels, BN the output channels, BK the input channels of a tap
    GEMM_CONFIGS = _configs([(64, 64, 256, 3, 4), (64, 64, 128, 3, 4),
                             (64, 128, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 32, 4, 4),
                             (128, 64, 128, 3, 4), (128, 64, 64, 3, 4), (128, 64, 32, 4, 4),
                             (128, 128, 64, 4, 8), (128, 128, 32, 4, 8),
                             (128, 16, 64, 4, 4), (128, 16, 32, 4, 4)])
    # wgrad: BM and BN tile the channels of dy and x, BK runs over the pixels of an output row.
    WGRAD_CONFIGS = _configs([(128, 128, 64, 3, 8), (128, 128, 32, 4, 8), (128, 64, 64, 4, 4), (128, 64, 32, 4, 4),
                              (64, 128, 64, 4, 4), (64, 128, 32, 4, 4),
                              (64, 64, 64, 4, 4), (64, 32, 64, 4, 4), (64, 16, 64, 4, 4)])
TILE = 256  # no config's tile edge (BM, BN, BK) is wider


def cap(n: int, least: int) -> int:
    return max(least, triton.next_power_of_2(n))


# What a config needs of the device (checked against the compiled cubins of every arch by
# tests/test_compile_report.py; numbers in BENCHMARKS.md):
#
#   shared memory = (BM + BN) . BK . itemsize . buffers + 1 KB
#     Triton's software pipeliner keeps `buffers` copies of the A (BM x BK) and B (BK x BN) tiles:
#     num_stages on Hopper, where wgmma reads its operands from shared memory while the next
#     copies land, and num_stages - 1 with mma.sync (sm_80-89, sm_120), which first loads a stage
#     into registers. 1 KB covers the barriers and scratch beside the tiles (sm_90, sm_120).
#   registers (mma.sync only) = (BM . BN . 4 + (BM + BN) . BK . itemsize) / (4 . 32 . num_warps)
#     the fp32 accumulator and one k-step's A and B fragments, per thread. Above 128 of the 255
#     registers a thread may have, the index math spills (every config that spilled on sm_80-sm_120,
#     8-96 bytes, mostly in the dgrad, had 160); wgmma keeps the operands in shared memory.
#   NCHW (channels not contiguous): each element of the K tile is gathered from its own address
#     (2 registers), held until its load lands; beside mma.sync's operands, BK = 64 spills the
#     dgrad (24-360 bytes on sm_86), so mma.sync GPUs take BK <= 32 there.
_RESERVED_SHARED = 1024
_MMA_SYNC_REGISTERS = 128
_MMA_SYNC_GATHER_BK = 32


def shared_bytes(config: triton.Config, itemsize: int, gpu: kernels.device.Device) -> int:
    bm, bn, bk, stages = config.kwargs["BM"], config.kwargs["BN"], config.kwargs["BK"], config.num_stages
    buffers = stages if gpu.wgmma else max(stages - 1, 1)
    return (bm + bn) * bk * itemsize * buffers + _RESERVED_SHARED


def _fits(config: triton.Config, itemsize: int, gpu: kernels.device.Device | None) -> bool:
    """Whether the device can launch the config without spilling its operands (None: the interpreter)."""
    if gpu is None:
        return True
    bm, bn, bk = config.kwargs["BM"], config.kwargs["BN"], config.kwargs["BK"]
    registers = (bm * bn * 4 + (bm + bn) * bk * itemsize) // (4 * 32 * config.num_warps)
    return shared_bytes(config, itemsize, gpu) <= gpu.shared_bytes and (gpu.wgmma or registers <= _MMA_SYNC_REGISTERS)


def _widest(configs: list[triton.Config], allowed, itemsize: int, gpu) -> list[triton.Config]:
    """Per tile (BM, BN), of the configs allowed by the problem that fit the device, the one with
    the widest BK, then the most stages. If none fits, the last config (the smallest: it fits every
    GPU in kernels.device.KNOWN, 64 KB of shared memory and up)."""
    best: dict[tuple[int, int], triton.Config] = {}
    for c in configs:
        if not allowed(c) or not _fits(c, itemsize, gpu):
            continue
        tile, rank = (c.kwargs["BM"], c.kwargs["BN"]), (c.kwargs["BK"], c.num_stages)
        if tile not in best or rank > (best[tile].kwargs["BK"], best[tile].num_stages):
            best[tile] = c
    return list(best.values()) or configs[-1:]


def _gpu(device: torch.device) -> kernels.device.Device:
    """What the GPU the kernels run on offers them (the compile report stands in any arch here)."""
    return kernels.device.of(device)


def _device_of(t: torch.Tensor) -> kernels.device.Device | None:
    return None if _INTERPRET else _gpu(t.device)


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: two waves of SMs, or a few under the interpreter."""
    if _INTERPRET:
        return 16
    return 2 * _gpu(device).sms


def prune_gemm(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Forward and dgrad: per tile (BM, BN), the widest channel slice BK that fits the device and the
    problem (the A operand's CA channels); tiles wider than the problem (e.g. BN = 128 for N = 3 output
    channels) dropped."""
    a, gpu = named_args["a"], _device_of(named_args["a"])
    n_cap, k_cap = cap(named_args["N"], 16), cap(named_args["CA"], 16)
    if named_args["sa_c"] != 1:  # channels not contiguous (NCHW): the K tile is a gather, an address per element
        k_cap = min(k_cap, 64 if gpu is None or gpu.wgmma else _MMA_SYNC_GATHER_BK)

    def allowed(c: triton.Config) -> bool:
        return c.kwargs["BN"] <= n_cap and c.kwargs["BK"] <= k_cap

    return _widest(configs, allowed, a.element_size(), gpu)


def prune_wgrad(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Per tile: the widest pixel slice BK that fits the device; tiles wider than the channels dropped.
    (Not a row's width, which the autotuner's key leaves out: a BK past it is masked.)"""
    x = named_args["x"]
    m, n = named_args["OC"], named_args["C"]
    if kwargs.get("X_IS_A"):
        m, n = n, m
    m_cap, n_cap = cap(m, 64), cap(n, 16)

    def allowed(c: triton.Config) -> bool:
        return c.kwargs["BM"] <= m_cap and c.kwargs["BN"] <= n_cap

    return _widest(configs, allowed, x.element_size(), _device_of(x))
