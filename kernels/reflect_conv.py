"""Reflection-padded stride-1 convolution in Triton, forward and backward.

    y = conv2d(reflect_pad(x, P), w) + b        x: (N, C, H, W), w: (OC, C, KH, KW)
    OH = H + 2P - KH + 1,  OW = W + 2P - KW + 1

Every pass is an implicit GEMM with an fp32 accumulator; the padded tensor is never built.
Rows of the GEMM are pixels, the reduction runs over (kh, kw, channel block):

    forward  y[p, oc]  = sum over kh, kw, c  of  x[n, refl(oh+kh-P), refl(ow+kw-P), c] . w[oc, c, kh, kw]
    dgrad    g[q, c]   = sum over kh, kw, oc of dy[n, qh-kh, qw-kw, oc] . w[oc, c, kh, kw]   (0 outside dy)
    wgrad    dw[oc, c] = sum over pixels p   of dy[p, oc] . x[refl(p + (kh, kw) - P), c]     (per kh, kw)

with reflection as index math, ih = |oh + kh - P|, ih = (H - 1) - |(H - 1) - ih| (stride 1, P <= H - 1).

Layout. The kernels are stride-generic, and fast when channels are innermost (channels_last
activations and weights, as `model.to(memory_format=torch.channels_last)` makes them): the
channel axis is the GEMM's reduction axis in the forward and dgrad, so a tile row is BK
contiguous channels, copied 16 bytes at a time by cp.async (LDGSTS) in a software pipeline of
num_stages. The K loop is one flat loop over (tap, channel slice) so that the pipeline runs
across taps, and the configs take the widest channel slice BK that fits in shared memory, so
that a tap is one step (256 channels in bf16, 128 in fp32): the reflected pixel offsets are
then computed once per (kh, kw). NCHW inputs work through their strides, with narrower loads.

Reading order:
    configs and pruning    the tiles, and what each needs of the device
    jit helpers            _reflect, _dot
    the GEMM kernels       _conv_kernel (forward and dgrad), _wgrad_kernel, _dbias_kernel, _sum_splits_kernel
    small-channel packing  3-channel operands as 16-byte pixel windows (_pack_kernel and its host side)
    dgrad border fold      the mirror images' gradient added back (_fold_kernel and its host side)
    host code              the launches and the four passes: _conv_fwd, _conv_dgrad, _conv_wgrad, _conv_dbias
    custom op, public      minicycle::reflect_conv2d(_backward), reflect_conv2d

Names: ws is always an fp32 workspace (the fold's border strip, or split-K partials); *_strides
are strides in elements, in (n, c, h, w) order (a weight's: (oc, c, kh, kw)); a trailing p means
padded (xp, dyp: a packed, padded copy of x, dy; hp, wp, HP, WP: a padded height and width; kwp,
cp: KW and C padded for the windows); w_packed is a re-packed weight.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels.device
from kernels.runtime import use_triton

# triton.jit picks the interpreter at decoration time; so do the autotune config lists, since
# benchmarking more than one config crashes under the interpreter (no active GPU driver).
_INTERPRET = bool(triton.knobs.runtime.interpret)

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- configs and pruning


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


# (BM, BN, BK, num_stages, num_warps). Every tl.dot dimension is >= 16 so that each config
# compiles on a GPU; BN = 16 serves the 3-channel outputs at either end of the generator.
# BM >= 64 with 4+ warps lets Hopper use warpgroup MMA (wgmma). Per (BM, BN), the pruning keeps
# the widest BK (then the most stages) that the device can hold: the BK = 32 rows are for GPUs
# with less shared memory or with mma.sync (which holds the operands in registers), and on an
# H100 lose to a wider one wherever the channels allow it.
if _INTERPRET:
    _GEMM_CONFIGS = _configs([(128, 32, 32, 1, 4)])
    _WGRAD_CONFIGS = _configs([(32, 32, 32, 1, 4)])
else:
    _GEMM_CONFIGS = _configs(
        [
            (64, 64, 256, 3, 4),
            (64, 64, 128, 3, 4),
            (64, 128, 128, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 128, 32, 4, 4),
            (128, 64, 128, 3, 4),
            (128, 64, 64, 3, 4),
            (128, 64, 32, 4, 4),
            (128, 128, 64, 4, 8),
            (128, 128, 32, 4, 8),
            (128, 16, 64, 4, 4),
            (128, 16, 32, 4, 4),
        ]
    )
    # wgrad: BM tiles OC, BN tiles C, BK runs over the pixels of an output row.
    _WGRAD_CONFIGS = _configs(
        [
            (128, 128, 64, 3, 8),
            (128, 128, 32, 4, 8),
            (128, 64, 64, 4, 4),
            (128, 64, 32, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 64, 4, 4),
            (64, 32, 64, 4, 4),
            (64, 16, 64, 4, 4),
        ]
    )


def _cap(n: int, least: int) -> int:
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


def _shared_bytes(config: triton.Config, itemsize: int, gpu: kernels.device.Device) -> int:
    bm, bn, bk, stages = config.kwargs["BM"], config.kwargs["BN"], config.kwargs["BK"], config.num_stages
    buffers = stages if gpu.wgmma else max(stages - 1, 1)
    return (bm + bn) * bk * itemsize * buffers + _RESERVED_SHARED


def _registers(config: triton.Config, itemsize: int) -> int:
    bm, bn, bk = config.kwargs["BM"], config.kwargs["BN"], config.kwargs["BK"]
    return (bm * bn * 4 + (bm + bn) * bk * itemsize) // (4 * 32 * config.num_warps)


def _fits(config: triton.Config, itemsize: int, gpu: kernels.device.Device | None) -> bool:
    """Whether the device can launch the config without spilling its operands (None: the interpreter)."""
    if gpu is None:
        return True
    if _shared_bytes(config, itemsize, gpu) > gpu.shared_bytes:
        return False
    return gpu.wgmma or _registers(config, itemsize) <= _MMA_SYNC_REGISTERS


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


def _prune_conv(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Per tile (BM, BN): the widest channel slice BK that fits the device and the problem; tiles
    wider than the problem (e.g. BN = 128 for 3 output channels) dropped."""
    x, gpu = named_args["x"], _device_of(named_args["x"])
    n_cap, k_cap = _cap(named_args["OC"], 16), _cap(named_args["C"], 16)
    if named_args["sxc"] != 1:  # channels not contiguous (NCHW): the K tile is a gather, an address per element
        k_cap = min(k_cap, 64 if gpu is None or gpu.wgmma else _MMA_SYNC_GATHER_BK)

    def allowed(c: triton.Config) -> bool:
        return c.kwargs["BN"] <= n_cap and c.kwargs["BK"] <= k_cap

    return _widest(configs, allowed, x.element_size(), gpu)


def _prune_wgrad(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Per tile: the widest pixel slice BK that fits the device; tiles wider than the problem dropped."""
    x = named_args["x"]
    m, n = named_args["OC"], named_args["C"]
    if kwargs.get("X_IS_A"):
        m, n = n, m
    m_cap, n_cap, k_cap = _cap(m, 64), _cap(n, 16), _cap(named_args["OW"], 16)

    def allowed(c: triton.Config) -> bool:
        return c.kwargs["BM"] <= m_cap and c.kwargs["BN"] <= n_cap and c.kwargs["BK"] <= k_cap

    return _widest(configs, allowed, x.element_size(), _device_of(x))


_MAX_SPLIT = 64
_TILE = 256  # no config's tile edge (BM, BN, BK) is wider
_DBIAS_BLOCK_C = 16
_DBIAS_BLOCK_P = 128
_SUM_BLOCK = 1024
_PACK_BLOCK = 1024


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _reflect(i, n):
    """Reflect an index in [-(n-1), 2(n-1)] into [0, n-1] (edge pixel not repeated)."""
    i = tl.abs(i)
    return (n - 1) - tl.abs((n - 1) - i)


@triton.jit
def _index(i, INT64: tl.constexpr):
    """i as int64 when INT64 (a launch whose offsets can pass int32), else as it is (int32)."""
    if INT64:
        i = tl.cast(i, tl.int64)
    return i


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc += a @ b. DOT_FP32 upcasts the operands (the interpreter's bf16 dot is wrong)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)


# ----------------------------------------------------------------------------- the GEMM kernels
#
# forward: _conv_kernel with REFLECT, padding P. dgrad: the same kernel run on dy with zero
# padding KH - 1, the weight's OC and C axes swapped (a (C, KH, KW, OC) copy of w, so OC is
# contiguous) and its taps flipped (negative strides): that gives the gradient g on the padded
# grid, (H + 2P) x (W + 2P), which FOLD writes back into dx (see the dgrad border fold below).
# wgrad reduces over all N.OH.OW pixels, so the reduction is split across programs (split-K by
# output rows); each split writes an fp32 partial tile into ws, and _sum_splits_kernel sums the
# partials in a fixed order (deterministic, no atomics). dbias uses the same two-stage scheme.


# The autotuner caches its pick per key: the channel strides in it keep NCHW and channels_last
# picks apart (their pruned config sets differ), where one process runs both layouts.
@triton.autotune(configs=_GEMM_CONFIGS, key=["N", "C", "H", "W", "OC", "OH", "OW", "KH", "KW", "sxc"],
                 prune_configs_by={"early_config_prune": _prune_conv})
@triton.heuristics({"EVEN_K": lambda a: a["C"] % a["BK"] == 0})
@triton.jit
def _conv_kernel(
    x, w, b, y, ws,
    N, C, H, W, OC, OH, OW, PH, PW, FP,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr, REFLECT: tl.constexpr, FOLD: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_ALIGN: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, INT64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """out[p, oc] = sum over (kh, kw, c) of x[n, pad(oh+kh-PH), pad(ow+kw-PW), c] . w[oc, c, kh, kw] (+ b[oc]).

    pad reflects (REFLECT) or reads zeros outside x. X_ALIGN divides x's pixel strides (the JIT
    only knows multiples of 16), so 16-byte copies are provably aligned. FOLD: (oh, ow) runs over the padded grid of
    a forward conv with padding FP; interior positions go to y[n, oh-FP, ow-FP], the border
    strip to ws[n, _strip_index, oc] in fp32 (for _fold_kernel). INT64: the index math in int64
    (the program ids, the channel offsets, and so every index and offset derived from them).
    Grid: (M tiles, OC tiles).
    """
    OHW = _index(OH, INT64) * OW
    M = N * OHW
    rm = _index(tl.program_id(0), INT64) * BM + tl.arange(0, BM)
    rn = _index(tl.program_id(1), INT64) * BN + tl.arange(0, BN)
    # Wrap the row and column tails around so the loads need no masks; the store masks them.
    m = rm % M
    oc = rn % OC
    n = m // OHW
    oh = (m % OHW) // OW
    ow = m % OW
    x_n = n * sxn
    w_oc = oc * swo
    rk = _index(tl.arange(0, BK), INT64)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # One flat loop over K = (tap, channel block), so the software pipeline runs across taps.
    # A step's pixel offsets depend only on its tap: with BK >= C (the configs take the widest
    # channel slice that fits in shared memory) there is one step per tap, so they are computed
    # once per (kh, kw). (An if around them would skip the recompute for wider C, but Triton 3.6
    # then stops pipelining the loads.)
    num_cb = tl.cdiv(C, BK)
    kh, kw, cb = 0, 0, 0
    for _ in range(KH * KW * num_cb):
        ih = oh + (kh - PH)
        iw = ow + (kw - PW)
        c = cb * BK + rk
        c_ok = (c < C) | EVEN_K  # EVEN_K: no channel tail, no mask
        if REFLECT:
            ih = _reflect(ih, H)
            iw = _reflect(iw, W)
            a_mask = c_ok[None, :]
        else:
            a_mask = ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
        a_row = tl.multiple_of(x_n + ih * sxh + iw * sxw, X_ALIGN)
        a = tl.load(x + (a_row[:, None] + c[None, :] * sxc), mask=a_mask, other=0.0)
        wt = tl.load(w + ((w_oc + kh * swh + kw * sww)[None, :] + c[:, None] * swc), mask=c_ok[:, None], other=0.0)
        acc = _dot(a, wt, acc, PRECISION, DOT_FP32)
        # the next (tap, channel block)
        cb += 1
        if cb == num_cb:
            cb = 0
            kw += 1
            if kw == KW:
                kw = 0
                kh += 1

    if HAS_BIAS:
        acc += tl.load(b + oc).to(tl.float32)[None, :]
    ok = (rm < M)[:, None] & (rn < OC)[None, :]
    if FOLD:
        H0 = OH - 2 * FP  # the forward input's size: dx is H0 x W0
        W0 = OW - 2 * FP
        inside = (oh >= FP) & (oh < H0 + FP) & (ow >= FP) & (ow < W0 + FP)
        y_off = n * syn + (oh - FP) * syh + (ow - FP) * syw
        tl.store(y + (y_off[:, None] + oc[None, :] * syc), acc.to(y.dtype.element_ty), mask=ok & inside[:, None])
        strip = OHW - _index(H0, INT64) * W0
        s = n * strip + _strip_index(oh, ow, H0, W0, FP)
        tl.store(ws + (s[:, None] * OC + oc[None, :]), acc, mask=ok & ~inside[:, None])
    else:
        y_off = n * syn + oh * syh + ow * syw
        tl.store(y + (y_off[:, None] + oc[None, :] * syc), acc.to(y.dtype.element_ty), mask=ok)


@triton.autotune(configs=_WGRAD_CONFIGS,
                 key=["N", "C", "H", "W", "OC", "OH", "OW", "KH", "KW", "ROWS_PER_SPLIT", "sxc", "sdc"],
                 prune_configs_by={"early_config_prune": _prune_wgrad})
@triton.heuristics({"EVEN_K": lambda a: a["OW"] % a["BK"] == 0})
@triton.jit
def _wgrad_kernel(
    x, dy, ws,
    N, C, H, W, OC, OH, OW, P, ROWS_PER_SPLIT,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    swo, swc, swh, sww,
    KH: tl.constexpr, KW: tl.constexpr, X_IS_A: tl.constexpr, X_ALIGN: tl.constexpr, DY_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, INT64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """ws[s] (laid out as dw, strides sw*) = sum over split s's pixels p of dy[p, oc] . x[refl(p + (kh, kw) - P), c].

    The GEMM's rows are dy's channels (A = dy^T, B = x), or x's channels when X_IS_A (A = x^T,
    B = dy: for few output channels, so the 64-row MMA tile is not mostly padding). X_ALIGN and
    DY_ALIGN divide the pixel strides, and INT64 widens the index math, as in _conv_kernel.
    Grid: (row tiles x column tiles, KH.KW, splits). Split s covers output rows (n, oh) in
    [s . ROWS_PER_SPLIT, (s + 1) . ROWS_PER_SPLIT), a row BK pixels at a time, so a step's
    reflected input row is one scalar and only its columns are reflected per pixel.
    """
    if X_IS_A:
        MC, NC = C, OC
    else:
        MC, NC = OC, C
    num_n = tl.cdiv(NC, BN)
    tile = _index(tl.program_id(0), INT64)
    rm = (tile // num_n) * BM + tl.arange(0, BM)
    rn = (tile % num_n) * BN + tl.arange(0, BN)
    kh = tl.program_id(1) // KW
    kw = tl.program_id(1) % KW
    s = _index(tl.program_id(2), INT64)
    cm = rm % MC
    cn = rn % NC
    rk = _index(tl.arange(0, BK), INT64)

    # Steps walk the split's output rows (n, oh), BK pixels of a row at a time.
    row0 = s * ROWS_PER_SPLIT
    rows = tl.minimum(ROWS_PER_SPLIT, _index(N, INT64) * OH - row0)
    num_ob = tl.cdiv(OW, BK)
    n = row0 // OH
    oh = row0 - n * OH
    ob = -1
    ih = _reflect(oh + kh - P, H)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(rows * num_ob):
        ob += 1
        if ob == num_ob:  # the next output row
            ob = 0
            oh += 1
            if oh == OH:
                oh -= OH  # (not = 0: oh may be int64)
                n += 1
            ih = _reflect(oh + kh - P, H)
        ow = ob * BK + rk
        ow_ok = (ow < OW) | EVEN_K  # EVEN_K: rows of whole BK-pixel blocks, no mask
        iw = _reflect(tl.minimum(ow, OW - 1) + kw - P, W)
        dy_pix = tl.multiple_of(n * sdn + oh * sdh + ow * sdw, DY_ALIGN)
        x_pix = tl.multiple_of(n * sxn + ih * sxh + iw * sxw, X_ALIGN)
        if X_IS_A:
            a = tl.load(x + (x_pix[None, :] + cm[:, None] * sxc), mask=ow_ok[None, :], other=0.0)
            b = tl.load(dy + (dy_pix[:, None] + cn[None, :] * sdc), mask=ow_ok[:, None], other=0.0)
        else:
            a = tl.load(dy + (dy_pix[None, :] + cm[:, None] * sdc), mask=ow_ok[None, :], other=0.0)
            b = tl.load(x + (x_pix[:, None] + cn[None, :] * sxc), mask=ow_ok[:, None], other=0.0)
        acc = _dot(a, b, acc, PRECISION, DOT_FP32)  # [BM, BK] @ [BK, BN]

    if X_IS_A:
        ws_off = rm[:, None] * swc + rn[None, :] * swo
    else:
        ws_off = rm[:, None] * swo + rn[None, :] * swc
    ws_ptr = ws + s * OC * C * KH * KW + ws_off + (kh * swh + kw * sww)
    tl.store(ws_ptr, acc, mask=(rm < MC)[:, None] & (rn < NC)[None, :])


@triton.jit
def _dbias_kernel(
    dy, ws, N, OC, OH, OW, PIX_PER_SPLIT,
    sdn, sdc, sdh, sdw,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
):
    """ws[s, oc] = sum over pixels p of split s of dy[n, oc, oh, ow]. Grid: (OC tiles, splits)."""
    oc = _index(tl.program_id(0), INT64) * BLOCK_C + tl.arange(0, BLOCK_C)
    oc_ok = oc < OC
    s = _index(tl.program_id(1), INT64)
    OHW = _index(OH, INT64) * OW
    p_end = tl.minimum((s + 1) * PIX_PER_SPLIT, N * OHW)
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for p0 in range(s * PIX_PER_SPLIT, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        n = p // OHW
        oh = (p % OHW) // OW
        ow = p % OW
        g = tl.load(
            dy + oc[:, None] * sdc + (n * sdn + oh * sdh + ow * sdw)[None, :],
            mask=oc_ok[:, None] & (p < p_end)[None, :], other=0.0,
        )
        acc += g.to(tl.float32)
    tl.store(ws + s * OC + oc, tl.sum(acc, axis=1), mask=oc_ok)


@triton.jit
def _sum_splits_kernel(ws, out, SPLITS, NUMEL, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """out[i] = sum over s = 0, 1, ... of ws[s, i], in that fixed order (deterministic)."""
    offs = _index(tl.program_id(0), INT64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(ws + _index(s, INT64) * NUMEL + offs, mask=ok, other=0.0)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- small-channel packing
#
# CycleGAN's first and last layers have 3 channels. A 3-channel pixel is 6 or 12 bytes, too
# narrow for 16-byte loads and 5x wasted in a 16-wide dot. So when C fits in 16 bytes, the input
# is first copied, padded (reflect, or zero for dgrad) and with channels padded to
# CP = 16 / itemsize, into xp[n, h, w, cp]. A KW-wide row of taps is then one contiguous window
# of KWP.CP values (KWP = next power of 2 >= KW), and the conv becomes a (KH x 1) conv over
# C' = KWP.CP "channels" with no padding:
#
#     x_padded[n, h, w + kw, c] == xp_flat[n, h, w.CP + kw.CP + c]        (kw < KWP, c < CP)
#
# The weights are re-packed to match, (A, KH, KWP, CP) with zeros for kw >= KW, c >= C, and read
# with the strides of _window_strides: channel c' = kw.CP + c is contiguous, the one tap column
# has stride 0.


@triton.jit
def _pack_kernel(
    x, xp, N, C, H, W, HP, WP, PH, PW,
    sxn, sxc, sxh, sxw,
    CP: tl.constexpr, REFLECT: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr,
):
    """xp[n, h, w, c] (contiguous, HP x WP x CP) = x[n, c, pad(h - PH), pad(w - PW)] for c < C,
    else 0. pad reflects (REFLECT; columns right of the W + 2PW padded width stay 0) or reads
    zeros outside x."""
    offs = _index(tl.program_id(0), INT64) * BLOCK + tl.arange(0, BLOCK)
    c = offs % CP
    pix = offs // CP
    n = pix // (_index(HP, INT64) * WP)
    h = (pix // WP) % HP - PH
    w = pix % WP - PW
    ok = (n < N) & (c < C)
    if REFLECT:
        ok &= w < W + PW
        h = _reflect(h, H)
        w = _reflect(tl.minimum(w, W - 1 + PW), W)
    else:
        ok &= (h >= 0) & (h < H) & (w >= 0) & (w < W)
    v = tl.load(x + (n * sxn + c * sxc + h * sxh + w * sxw), mask=ok, other=0.0)
    tl.store(xp + offs, v, mask=n < N)


def _window(channels: int, kw: int, dtype: torch.dtype) -> tuple[int, int] | None:
    """(KWP, CP) if a conv input with this many channels is better read as packed windows of
    KWP pixels x CP channels (16 bytes a pixel), else None."""
    cp = 16 // (torch.finfo(dtype).bits // 8)
    kwp = triton.next_power_of_2(kw)
    return (kwp, cp) if channels <= cp and kw > 1 and kwp * cp >= 16 else None


def _window_strides(kh: int, kwp: int, cp: int) -> tuple[int, int, int, int]:
    """The (a, c', kh, kw) strides of a contiguous (A, KH, KWP, CP) weight read as a (KH x 1) conv
    over C' = KWP.CP channels."""
    return kh * kwp * cp, 1, kwp * cp, 0


def _pack(t: torch.Tensor, ph: int, pw: int, hp: int, wp: int, cp: int, reflect: bool) -> torch.Tensor:
    """(N, hp, wp', cp) contiguous copy of t (N, C, H, W) padded by (ph, pw) (reflect or zero),
    channels zero-padded to cp, zeros right of the padded width; wp' >= wp makes a row a
    multiple of 16 elements, so that every row starts 16-element aligned."""
    N, C, H, W = t.shape
    wp = triton.cdiv(wp * cp, 16) * 16 // cp
    out = torch.empty((N, hp, wp, cp), dtype=t.dtype, device=t.device)
    grid = (triton.cdiv(out.numel(), _PACK_BLOCK),)
    # The last block's tail runs into sample N (masked); zero padding reads up to (ph, pw) before 0.
    int64 = _int64(_reach(t.stride(), (N + 1, max(C, cp), hp, wp)), out.numel() + _PACK_BLOCK)
    _pack_kernel[grid](t, out, N, C, H, W, hp, wp, ph, pw, *t.stride(), CP=cp, REFLECT=reflect, BLOCK=_PACK_BLOCK,
                       INT64=int64)
    return out


def _pack_weight(w: torch.Tensor, kwp: int, cp: int) -> torch.Tensor:
    """w (A, KH, KW, B) zero-padded to a contiguous (A, KH, kwp, cp)."""
    A, KH, KW, B = w.shape
    out = w.new_zeros((A, KH, kwp, cp))
    out[:, :, :KW, :B] = w
    return out


def _as_window_input(tp: torch.Tensor, kwp: int) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, int, int]]:
    """A packed (N, HP, WP, CP) tensor seen as a conv input of C' = KWP.CP channels: its strides
    (n, c', h, w) and its (C', HP, WP)."""
    N, HP, WP, CP = tp.shape
    return tp, (HP * WP * CP, 1, WP * CP, CP), (kwp * CP, HP, WP)


# ----------------------------------------------------------------------------- dgrad border fold
#
# Reflection is many-to-one, so an input pixel also receives the gradient of its mirror images
# on the padded border. In one dimension the preimages of i on the padded grid are
#
#     q = i + P                 always (the interior)
#     q = P - i                 if 1 <= i <= P              (mirrored off the top edge)
#     q = 2(H - 1) - i + P      if H - 1 - P <= i <= H - 2  (mirrored off the bottom edge)
#
# so the dgrad GEMM's epilogue (FOLD) writes interior positions straight into dx and the border
# strip (the 6% of the padded grid outside the interior at 64^2, P = 1) into an fp32 workspace
# ws, laid out by _strip_index; _fold_kernel then adds each border pixel's mirror terms to dx
# (up to 8 of them, in a fixed order, no atomics).


@triton.jit
def _preimage(i, T: tl.constexpr, P, n):
    """The T-th padded-grid position q that reflects onto input index i, and where it exists."""
    q = i + P
    ok = i >= 0
    if T == 1:  # off the top/left edge
        q = P - i
        ok = (i >= 1) & (i <= P)
    if T == 2:  # off the bottom/right edge
        q = 2 * (n - 1) - i + P
        ok = (i >= n - 1 - P) & (i <= n - 2)
    return q, ok


@triton.jit
def _strip_index(qh, qw, H, W, P):
    """Index of padded-grid position (qh, qw), outside the H x W interior, in the border strip:
    the top P rows, the bottom P rows (each W + 2P wide), then the left and right P columns of
    the H interior rows."""
    Wp = W + 2 * P
    top = qh < P
    bottom = qh >= H + P
    side = 2 * P * Wp + (qh - P) * (2 * P) + tl.where(qw < P, qw, qw - W)
    return tl.where(top, qh * Wp + qw, tl.where(bottom, (qh - H) * Wp + qw, side))


@triton.jit
def _band(r, F0, NF, S0):
    """The r-th index of the band [F0, F0 + NF) then [S0, ...)."""
    return tl.where(r < NF, F0 + r, S0 + (r - NF))


@triton.jit
def _in_band(i, F0, NF, S0, NS):
    return ((i >= F0) & (i < F0 + NF)) | ((i >= S0) & (i < S0 + NS))


@triton.jit
def _fold_kernel(
    dx, ws, N, C, H, W, P,
    F0H, NFH, S0H, NSH, F0W, NFW, S0W, NSW,
    sxn, sxc, sxh, sxw,
    BM: tl.constexpr, BC: tl.constexpr, INT64: tl.constexpr,
):
    """dx[n, i, j, c] += the gradient of (i, j)'s mirror images on the padded border (in ws).

    Only pixels with a mirror image are visited: the band of rows that have one (up to two
    runs, [F0H, F0H + NFH) and [S0H, S0H + NSH)) across the whole width, then the band of
    columns down the other rows. Each pixel sums its up-to-8 mirror terms in a fixed order.
    Grid: (pixel tiles, C tiles).
    """
    rows, cols = _index(NFH + NSH, INT64), NFW + NSW
    per_image = rows * W + _index(H, INT64) * cols
    e = _index(tl.program_id(0), INT64) * BM + tl.arange(0, BM)
    c = _index(tl.program_id(1), INT64) * BC + tl.arange(0, BC)
    n = e // per_image
    e = e % per_image
    in_rows = e < rows * W
    e2 = e - rows * W
    i = tl.where(in_rows, _band(e // W, F0H, NFH, S0H), e2 // cols)
    j = tl.where(in_rows, e % W, _band(e2 % cols, F0W, NFW, S0W))
    ok = (n < N) & (in_rows | ~_in_band(i, F0H, NFH, S0H, NSH))

    acc = tl.zeros((BM, BC), dtype=tl.float32)
    strip = _index(H + 2 * P, INT64) * (W + 2 * P) - _index(H, INT64) * W
    c_ok = c < C
    for th in tl.static_range(3):
        qh, ok_h = _preimage(i, th, P, H)
        for tw in tl.static_range(3):
            if th + tw > 0:
                qw, ok_w = _preimage(j, tw, P, W)
                s = n * strip + _strip_index(qh, qw, H, W, P)
                m = (ok & ok_h & ok_w)[:, None] & c_ok[None, :]
                acc += tl.load(ws + (s[:, None] * C + c[None, :]), mask=m, other=0.0)
    ptr = dx + (n * sxn + i * sxh + j * sxw)[:, None] + c[None, :] * sxc
    m = ok[:, None] & c_ok[None, :]
    old = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    tl.store(ptr, (old + acc).to(dx.dtype.element_ty), mask=m)


def _mirror_band(n: int, p: int) -> tuple[int, int, int, int]:
    """The indices in [0, n) that have a mirror image under reflection padding p: [1, p] and
    [n - 1 - p, n - 2], as up to two disjoint runs (start, count, start, count)."""
    lo, hi = max(0, n - 1 - p), n - 2
    if lo <= p + 1:  # the runs touch or overlap: one run
        f0 = min(1, lo)
        return f0, max(p, hi) - f0 + 1, 0, 0
    return 1, p, lo, hi - lo + 1


def _fold(dx: torch.Tensor, ws: torch.Tensor, p: int) -> None:
    """dx += the mirror terms of its border pixels, from the padded-grid strip in ws."""
    N, C, H, W = dx.shape
    bh, bw = _mirror_band(H, p), _mirror_band(W, p)
    bm, bc = 32, min(64, triton.next_power_of_2(C))
    pixels = (bh[1] + bh[3]) * W + H * (bw[1] + bw[3])
    grid = (triton.cdiv(N * pixels, bm), triton.cdiv(C, bc))
    int64 = _int64(
        _reach(dx.stride(), (N + 1, grid[1] * bc, H, W)),  # the last pixel tile's tail runs into sample N (masked)
        _strip_reach(ws, H + 2 * p, W + 2 * p, grid[1] * bc),
        N * pixels + bm,
    )
    _fold_kernel[grid](dx, ws, N, C, H, W, p, *bh, *bw, *dx.stride(), BM=bm, BC=bc, INT64=int64)


# ----------------------------------------------------------------------------- host code


def _precision(x: torch.Tensor) -> str:
    """TF32 for fp32 on a GPU exactly when cuDNN's conv would use it; fp16/bf16 ignore the setting."""
    if x.dtype == torch.float32 and x.is_cuda and not _INTERPRET:
        return "tf32" if kernels.runtime.cudnn_conv_tf32() else "ieee"
    return "ieee"


def _dot_fp32(x: torch.Tensor) -> bool:
    return _INTERPRET and x.dtype == torch.bfloat16


def _target_programs(device: torch.device) -> int:
    """How many programs fill the device: two waves of SMs, or a few under the interpreter."""
    if _INTERPRET:
        return 16
    return 2 * _gpu(device).sms


def _rows_per_split(rows: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """Split a reduction over `rows` output rows so that tiles x splits programs fill the device.
    Returns (rows per split, number of splits)."""
    want = min(triton.cdiv(_target_programs(device), tiles), _MAX_SPLIT)
    per = triton.cdiv(rows, want)
    return per, triton.cdiv(rows, per)


def _sum_splits(ws: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (dense, in its own memory order) = ws.sum(0) in a fixed order."""
    numel = out.numel()
    grid = (triton.cdiv(numel, _SUM_BLOCK),)
    _sum_splits_kernel[grid](ws, out, ws.shape[0], numel, BLOCK=_SUM_BLOCK, INT64=_int64(ws.numel() + _SUM_BLOCK))
    return out


# Offsets. Triton computes a kernel's indices in int32 (its int arguments below 2**31, program ids,
# aranges), so each launch says whether an offset it computes can pass int32; INT64 then widens the
# kernel's index math, and every other launch keeps its 32-bit math. A launch's reach counts the
# indices it computes and masks: zero padding before 0 and past the edge, tile tails, negative strides.
_INT32_MAX = 2**31 - 1


def _reach(strides: tuple[int, ...], extents: tuple[int, ...]) -> int:
    """The farthest element offset, sum of i_d . stride_d, over indices |i_d| < extent_d."""
    return sum(abs(s) * (e - 1) for s, e in zip(strides, extents))


def _int64(*reaches: int) -> bool:
    """Whether a launch whose offsets and indices reach this far needs int64 index math."""
    return max(reaches) > _INT32_MAX


def _strip_reach(ws: torch.Tensor, HQ: int, WQ: int, C: int) -> int:
    """Beyond the farthest offset into the dgrad's border strips ws (N strips of C channels) that the
    GEMM's epilogue and the fold compute: a masked position's strip index (an interior position, a
    missing mirror image) lies within one padded HQ x WQ grid of its strip, n <= N."""
    return ws.numel() + 2 * HQ * WQ * C


def _empty_like_layout(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An output of the given shape: channels_last if x is, else contiguous NCHW."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _out_shape(x: torch.Tensor, w: torch.Tensor, p: int) -> tuple[int, int, int, int]:
    N, _, H, W = x.shape
    OC, _, KH, KW = w.shape
    return N, OC, H + 2 * p - KH + 1, W + 2 * p - KW + 1


def _align(strides: tuple[int, ...]) -> int:
    """The largest power of two up to 16 dividing the (n, h, w) strides of (n, c, h, w) strides."""
    sn, _, sh, sw = strides
    return math.gcd(sn, sh, sw, 16) or 16


def _launch_conv(
    *, x: torch.Tensor, x_strides: tuple[int, ...], C: int, H: int, W: int,
    w: torch.Tensor, w_strides: tuple[int, ...], KH: int, KW: int, PH: int, PW: int, reflect: bool,
    bias: torch.Tensor | None, out: torch.Tensor, OC: int, OH: int, OW: int,
    fold_pad: int = 0, ws: torch.Tensor | None = None,
) -> None:
    """out[n, oc, oh, ow] = the (C x H x W) input x, padded by (PH, PW) (reflect or zero), correlated
    with the (OC, C, KH, KW) weight w (+ bias): one _conv_kernel launch. x and w are read through
    x_strides and w_strides, (n, c, h, w) and (oc, c, kh, kw) in elements; out through its own strides.
    With ws (the dgrad), (OH, OW) is the padded grid of a forward conv with padding fold_pad:
    the interior goes to out, the border strip to the fp32 workspace ws."""
    N = out.shape[0]
    k_end = _cap(C, 32)  # the channel index's bound: the K tile BK <= next_pow2(C) (or 32, the smallest config's)
    int64 = _int64(
        _reach(x_strides, (N, k_end, H + PH, W + PW)),  # zero padding: PH rows before 0 and past H - 1
        _reach(w_strides, (OC, k_end, KH, KW)),
        _reach(out.stride(), (N, OC, OH - fold_pad, OW - fold_pad)),  # FOLD: rows oh - FP, oh in [0, OH)
        0 if ws is None else _strip_reach(ws, OH, OW, OC),
        N * OH * OW + _TILE,  # the GEMM row index, before it wraps around M
    )

    def grid(meta):
        return triton.cdiv(N * OH * OW, meta["BM"]), triton.cdiv(OC, meta["BN"])

    _conv_kernel[grid](
        x, w, w if bias is None else bias, out, out if ws is None else ws,
        N, C, H, W, OC, OH, OW, PH, PW, fold_pad,
        *x_strides, *w_strides, *out.stride(),
        KH=KH, KW=KW, REFLECT=reflect, FOLD=ws is not None, HAS_BIAS=bias is not None, X_ALIGN=_align(x_strides),
        PRECISION=_precision(x), DOT_FP32=_dot_fp32(x), INT64=int64,
    )


def _conv_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, p: int) -> torch.Tensor:
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    _, _, OH, OW = _out_shape(x, w, p)
    y = _empty_like_layout(x, (N, OC, OH, OW))
    if y.numel() == 0:
        return y
    window = _window(C, KW, x.dtype)
    if window:  # a (KH x 1) conv over packed windows; the padding is in the packed copy
        kwp, cp = window
        xp, xp_strides, (C2, HP, WP) = _as_window_input(_pack(x, p, p, H + 2 * p, W + 2 * p + kwp - KW, cp, True), kwp)
        w_packed = _pack_weight(w.permute(0, 2, 3, 1), kwp, cp)  # (OC, KH, KWP, CP)
        _launch_conv(x=xp, x_strides=xp_strides, C=C2, H=HP, W=WP,
                     w=w_packed, w_strides=_window_strides(KH, kwp, cp), KH=KH, KW=1, PH=0, PW=0, reflect=True,
                     bias=b, out=y, OC=OC, OH=OH, OW=OW)
    else:
        _launch_conv(x=x, x_strides=x.stride(), C=C, H=H, W=W,
                     w=w, w_strides=w.stride(), KH=KH, KW=KW, PH=p, PW=p, reflect=True,
                     bias=b, out=y, OC=OC, OH=OH, OW=OW)
    return y


def _conv_dgrad(dy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, p: int) -> torch.Tensor:
    """dx: the full correlation of dy with w on the padded grid, folded back by reflection."""
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    OH, OW = dy.shape[2:]
    dx = _empty_like_layout(x, x.shape)
    if dx.numel() == 0:
        return dx
    HQ, WQ = H + 2 * p, W + 2 * p
    ws = torch.empty(N * (HQ * WQ - H * W) * C, dtype=torch.float32, device=x.device) if p else None
    window = _window(OC, KW, x.dtype)
    if window:  # dy zero-padded by the kernel size into packed windows; taps flipped in the packed weights
        kwp, cp = window
        packed = _pack(dy, KH - 1, KW - 1, OH + 2 * KH - 2, OW + 2 * KW - 2 + kwp - KW, cp, False)
        dyp, dyp_strides, (C2, HP, WP) = _as_window_input(packed, kwp)
        w_packed = _pack_weight(w.flip(2, 3).permute(1, 2, 3, 0), kwp, cp)  # (C, KH, KWP, CP)
        _launch_conv(x=dyp, x_strides=dyp_strides, C=C2, H=HP, W=WP,
                     w=w_packed, w_strides=_window_strides(KH, kwp, cp), KH=KH, KW=1, PH=0, PW=0, reflect=True,
                     bias=None, out=dx, OC=C, OH=HQ, OW=WQ, fold_pad=p, ws=ws)
    else:  # w as (C, KH, KW, OC), so that a tap's B tile is OC-contiguous rows (K-major); the taps
        # flipped by negative strides from the last one
        w_t = w.permute(1, 2, 3, 0).contiguous()
        w_last = w_t[:, KH - 1:, KW - 1:, :]
        w_last_strides = (w_t.stride(0), 1, -w_t.stride(1), -w_t.stride(2))
        _launch_conv(x=dy, x_strides=dy.stride(), C=OC, H=OH, W=OW,
                     w=w_last, w_strides=w_last_strides, KH=KH, KW=KW, PH=KH - 1, PW=KW - 1, reflect=False,
                     bias=None, out=dx, OC=C, OH=HQ, OW=WQ, fold_pad=p, ws=ws)
    if p:
        _fold(dx, ws, p)
    return dx


def _conv_wgrad(dy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, p: int) -> torch.Tensor:
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    OH, OW = dy.shape[2:]
    dw = torch.empty_like(w)  # w's own memory order (channels_last weights stay so)
    if N * OH * OW == 0 or w.numel() == 0:
        return dw.zero_()
    window = _window(C, KW, x.dtype)
    small_oc = OC <= 16 and OC < C
    if window:  # x as packed windows: dw comes out as (OC, KH, KWP, CP)
        kwp, cp = window
        xp, xp_strides, (C2, HP, WP) = _as_window_input(_pack(x, p, p, H + 2 * p, W + 2 * p + kwp - KW, cp, True), kwp)
        dw_packed = torch.empty((OC, KH, kwp, cp), dtype=dw.dtype, device=dw.device)
        _launch_wgrad(x=xp, x_strides=xp_strides, C=C2, H=HP, W=WP, dy=dy, dy_strides=dy.stride(), OC=OC, OH=OH, OW=OW,
                      out=dw_packed, out_strides=_window_strides(KH, kwp, cp), KH=KH, KW=1, P=0, x_is_a=False)
        dw.copy_(dw_packed[:, :, :KW, :C].permute(0, 3, 1, 2))
    elif small_oc:  # few output channels: x's channels on the MMA rows, dy channel-padded to 16
        cp = 16
        dyp = _pack(dy, 0, 0, OH, OW, cp, False)
        dw_padded = torch.empty((cp, C, KH, KW), dtype=dw.dtype, device=dw.device)
        dyp_strides = (dyp.stride(0), 1, dyp.stride(1), dyp.stride(2))
        _launch_wgrad(x=x, x_strides=x.stride(), C=C, H=H, W=W, dy=dyp, dy_strides=dyp_strides, OC=cp, OH=OH, OW=OW,
                      out=dw_padded, out_strides=dw_padded.stride(), KH=KH, KW=KW, P=p, x_is_a=True)
        dw.copy_(dw_padded[:OC])
    else:
        _launch_wgrad(x=x, x_strides=x.stride(), C=C, H=H, W=W, dy=dy, dy_strides=dy.stride(), OC=OC, OH=OH, OW=OW,
                      out=dw, out_strides=dw.stride(), KH=KH, KW=KW, P=p, x_is_a=False)
    return dw


def _launch_wgrad(
    *, x: torch.Tensor, x_strides: tuple[int, ...], C: int, H: int, W: int,
    dy: torch.Tensor, dy_strides: tuple[int, ...], OC: int, OH: int, OW: int,
    out: torch.Tensor, out_strides: tuple[int, ...], KH: int, KW: int, P: int, x_is_a: bool,
) -> None:
    """out (dense, laid out as an (OC, C, KH, KW) weight with out_strides) = the weight gradient of
    a conv with reflection padding P from the (C x H x W) input x to the (OC x OH x OW) dy, via
    split-K partials in an fp32 workspace. x_is_a puts x's channels on the MMA rows."""
    N = dy.shape[0]
    m, n = (C, OC) if x_is_a else (OC, C)
    per, splits = _rows_per_split(N * OH, triton.cdiv(m, 64) * triton.cdiv(n, 64) * KH * KW, x.device)
    ws = torch.empty((splits, out.numel()), dtype=torch.float32, device=x.device)
    int64 = _int64(
        _reach(x_strides, (N, C, H, W)),  # reflected, and the channel tails wrapped: inside x
        _reach(dy_strides, (N, OC, OH, OW + _TILE)),  # a row's last pixel block runs past OW (masked)
        ws.numel() + _reach(out_strides, (OC + _TILE, C + _TILE, KH, KW)),  # the tile tails (masked)
        N * OH * OW + _TILE,
    )

    def grid(meta):
        return triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), KH * KW, splits

    _wgrad_kernel[grid](
        x, dy, ws,
        N, C, H, W, OC, OH, OW, P, per,
        *x_strides, *dy_strides, *out_strides,
        KH=KH, KW=KW, X_IS_A=x_is_a, X_ALIGN=_align(x_strides), DY_ALIGN=_align(dy_strides),
        PRECISION=_precision(x), DOT_FP32=_dot_fp32(x), INT64=int64,
    )
    _sum_splits(ws, out)


def _conv_dbias(dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """db[oc] = sum of dy[:, oc] in the given dtype (the bias's, which is x's)."""
    N, OC, OH, OW = dy.shape
    npix = N * OH * OW
    db = dy.new_empty(OC, dtype=dtype)
    if npix == 0 or OC == 0:
        return db.zero_()
    want = min(triton.cdiv(_target_programs(dy.device), triton.cdiv(OC, _DBIAS_BLOCK_C)), _MAX_SPLIT)
    per = triton.cdiv(triton.cdiv(npix, want), _DBIAS_BLOCK_P) * _DBIAS_BLOCK_P
    splits = triton.cdiv(npix, per)
    ws = torch.empty((splits, OC), dtype=torch.float32, device=dy.device)
    grid = (triton.cdiv(OC, _DBIAS_BLOCK_C), splits)
    int64 = _int64(
        _reach(dy.stride(), (N, grid[0] * _DBIAS_BLOCK_C, OH, OW)),
        splits * per + _DBIAS_BLOCK_P,  # the pixel index, past the last split's end (masked)
    )
    _dbias_kernel[grid](
        dy, ws, N, OC, OH, OW, per, *dy.stride(),
        BLOCK_C=_DBIAS_BLOCK_C, BLOCK_P=_DBIAS_BLOCK_P, INT64=int64,
    )
    return _sum_splits(ws, db)


# The Triton path is a pair of torch.library custom ops, so that torch.compile sees each one as
# a single opaque node (no graph break): the fake impls give only output metadata (shape,
# dtype, strides), and autograd connects the forward op to the backward op.


@torch.library.custom_op("minicycle::reflect_conv2d", mutates_args=())
def _reflect_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """conv2d(reflect_pad(x, padding), weight) + bias; the output takes x's memory format."""
    return _conv_fwd(x, weight, bias, padding)


@_reflect_conv2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    return _empty_like_layout(x, _out_shape(x, weight, padding))


@torch.library.custom_op("minicycle::reflect_conv2d_backward", mutates_args=())
def _reflect_conv2d_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int,
    need_x: bool, need_w: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db). Only the needed gradients are computed; the others come back as empty
    (0-element) placeholders, since a custom op can't return None. dbias needs only dy, so
    the bias itself is never an input (a conv without bias passes need_b=False)."""
    dx = _conv_dgrad(dy, weight, x, padding) if need_x else x.new_empty(0)
    dw = _conv_wgrad(dy, weight, x, padding) if need_w else x.new_empty(0)
    db = _conv_dbias(dy, x.dtype) if need_b else x.new_empty(0)
    return dx, dw, db


@_reflect_conv2d_backward.register_fake
def _(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int,
    need_x: bool, need_w: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx = _empty_like_layout(x, x.shape) if need_x else x.new_empty(0)
    dw = torch.empty_like(weight) if need_w else x.new_empty(0)  # as _conv_wgrad: w's memory order
    db = x.new_empty(weight.shape[0]) if need_b else x.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, _, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = padding


def _autograd_backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = _reflect_conv2d_backward(dy, x, weight, ctx.padding, need_x, need_w, need_b)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None


_reflect_conv2d.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"reflect_conv2d: x must be (N, C, H, W) and weight (OC, C, KH, KW); "
            f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"reflect_conv2d: floating-point tensors required; got x {x.dtype}, weight {weight.dtype}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(
            f"reflect_conv2d: x ({x.dtype}, {x.device}) and weight ({weight.dtype}, {weight.device}) "
            f"must share dtype and device"
        )
    if bias is not None and (
        bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device
    ):
        raise ValueError(
            f"reflect_conv2d: bias must be ({weight.shape[0]},) with x's dtype and device; "
            f"got {tuple(bias.shape)} {bias.dtype} {bias.device}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"reflect_conv2d: x has {x.shape[1]} channels but weight expects {weight.shape[1]}; "
            f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if isinstance(padding, bool) or not isinstance(padding, int):
        raise TypeError(f"reflect_conv2d: padding must be an int; got {padding!r}")
    H, W = x.shape[2:]
    if padding < 0 or padding >= H or padding >= W:
        raise ValueError(
            f"reflect_conv2d: reflection padding must satisfy 0 <= padding < H, W; "
            f"got padding={padding} for x {tuple(x.shape)}"
        )
    KH, KW = weight.shape[2:]
    if KH > H + 2 * padding or KW > W + 2 * padding:
        raise ValueError(
            f"reflect_conv2d: kernel {KH}x{KW} is larger than the padded input "
            f"{H + 2 * padding}x{W + 2 * padding}"
        )


def reflect_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, padding: int
) -> torch.Tensor:
    """F.conv2d(F.pad(x, (padding,) * 4, mode="reflect"), weight, bias); stride 1, groups 1.

    Runs the Triton kernels when kernels.runtime.use_triton(x) (CUDA, or CPU under
    TRITON_INTERPRET=1; float16 / bfloat16 / float32), else plain PyTorch. Under autocast the
    operands are cast to the autocast dtype first, as F.conv2d does.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    _check(x, weight, bias, padding)
    if not use_triton(x):
        if padding:
            x = F.pad(x, (padding,) * 4, mode="reflect")
        return F.conv2d(x, weight, bias)
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"reflect_conv2d: the Triton path supports {_TRITON_DTYPES}; got {x.dtype}")
    return _reflect_conv2d(x, weight, bias, padding)
