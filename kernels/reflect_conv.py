"""Reflection-padded stride-1 convolution in Triton: the forward pass, from the math to the public op.

    y = conv2d(reflect_pad(x, P), w) + b        x: (N, C, H, W), w: (OC, C, KH, KW)
    OH = H + 2P - KH + 1,  OW = W + 2P - KW + 1

is an implicit GEMM with an fp32 accumulator (the padded tensor is never built), M = N.OH.OW rows
(output pixels), N = OC columns, and K = KH.KW.C reduced over taps and channels:

    y[m, n] = sum over k of A[m, k] . B[k, n]       A[(img, oh, ow), (kh, kw, c)] = x[img, c, ih, iw]
                                                    B[(kh, kw, c), n] = w[n, c, kh, kw]

with ih = refl(oh + kh - P) as index math, i = |i|, i = (H - 1) - |(H - 1) - i| (stride 1, P <= H - 1).
The backward passes are GEMMs too: kernels/conv_dgrad.py runs _implicit_gemm on dy, conv_wgrad.py
reduces over the pixels, conv_backward.py is their custom op; conv_tiles.py holds all three's tiles.

Layout. The kernels are stride-generic, and fast when channels are innermost (channels_last, as
`model.to(memory_format=torch.channels_last)` makes them): a tile row of A is then BK contiguous
channels, copied 16 bytes at a time by cp.async (LDGSTS) in a software pipeline of num_stages. The
K loop is one flat loop over (tap, channel slice), so that the pipeline runs across taps, and the
configs take the widest BK that fits in shared memory, so that a tap is one step (256 channels in
bf16, 128 in fp32) and its reflected offsets are computed once. NCHW works, with narrower loads.

Reading order: jit helpers; the implicit GEMM and the forward kernel; small-channel packing (3
channels as 16-byte pixel windows); host code (offsets, _conv_fwd); the custom op, reflect_conv2d.
Names: a GEMM's operands are a and b, a: (BATCH, CA, AH, AW), b: (N, CA, KH, KW), their strides
in elements sa_*, sb_* in that order; a trailing p means padded (xp: a packed, padded copy of x;
HP, WP: a padded height and width; kwp, cp: KW and C padded for the windows).
"""

import math

import torch
import triton
import triton.language as tl

import kernels.runtime
from kernels.conv_tiles import _INTERPRET, GEMM_CONFIGS, TILE, cap, prune_gemm
from kernels.instance_norm import _index

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PACK_BLOCK = 1024


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _reflect(i, n):
    """Reflect an index in [-(n-1), 2(n-1)] into [0, n-1] (edge pixel not repeated)."""
    i = tl.abs(i)
    return (n - 1) - tl.abs((n - 1) - i)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc += a @ b. DOT_FP32 upcasts the operands (the interpreter's bf16 dot is wrong)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)


# ----------------------------------------------------------------------------- the forward kernel


@triton.jit
def _implicit_gemm(
    a, b, BATCH, CA, AH, AW, N, OH, OW, PH, PW,
    sa_img, sa_c, sa_h, sa_w, sb_n, sb_c, sb_h, sb_w,
    KH: tl.constexpr, KW: tl.constexpr, REFLECT: tl.constexpr, MASK_BOUNDS: tl.constexpr, A_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, INT64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """This program's BM x BN tile of sum over k of A[m, k] . B[k, n], m = (img, oh, ow) on a BATCH x OH x OW
    grid, A[m, (kh, kw, c)] = a[img, c, pad(oh + kh - PH), pad(ow + kw - PW)], B[(kh, kw, c), n] = b[n, c, kh, kw].
    pad reflects (REFLECT), reads zeros outside a (MASK_BOUNDS), or, with neither, every index is inside a
    (a packed copy holds the padding). A_ALIGN divides a's pixel strides (the JIT only knows multiples of
    16), so 16-byte copies are provably aligned. INT64: the index math in int64 (the program ids, the
    channel offsets, and so all derived from them). Grid: (M tiles, N tiles). Returns the fp32 tile, its
    rows' (img, oh, ow), its columns n, and which of its entries lie inside the output."""
    OHW = _index(OH, INT64) * OW
    M = BATCH * OHW
    rm = _index(tl.program_id(0), INT64) * BM + tl.arange(0, BM)
    rn = _index(tl.program_id(1), INT64) * BN + tl.arange(0, BN)
    # Wrap the row and column tails around so the loads need no masks; the store masks them.
    m = rm % M
    n = rn % N
    img = m // OHW
    oh = (m % OHW) // OW
    ow = m % OW
    a_img = img * sa_img
    b_n = n * sb_n
    rk = _index(tl.arange(0, BK), INT64)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # One flat loop over K = (tap, channel block), so the software pipeline runs across taps. With
    # BK >= CA a tap is one step, and its pixel offsets are computed once. (An if around them would skip
    # the recompute for wider CA, but Triton 3.6 then stops pipelining the loads.)
    num_cb = tl.cdiv(CA, BK)
    kh, kw, cb = 0, 0, 0
    for _ in range(KH * KW * num_cb):
        ih = oh + (kh - PH)
        iw = ow + (kw - PW)
        c = cb * BK + rk
        c_ok = (c < CA) | EVEN_K  # EVEN_K: no channel tail, no mask
        if REFLECT:
            ih = _reflect(ih, AH)
            iw = _reflect(iw, AW)
        if MASK_BOUNDS:
            a_mask = ((ih >= 0) & (ih < AH) & (iw >= 0) & (iw < AW))[:, None] & c_ok[None, :]
        else:
            a_mask = c_ok[None, :]
        a_row = tl.multiple_of(a_img + ih * sa_h + iw * sa_w, A_ALIGN)
        a_tile = tl.load(a + (a_row[:, None] + c[None, :] * sa_c), mask=a_mask, other=0.0)
        b_tile = tl.load(b + ((b_n + kh * sb_h + kw * sb_w)[None, :] + c[:, None] * sb_c), mask=c_ok[:, None],
                         other=0.0)
        acc = _dot(a_tile, b_tile, acc, PRECISION, DOT_FP32)
        # the next (tap, channel block)
        cb += 1
        if cb == num_cb:
            cb = 0
            kw += 1
            if kw == KW:
                kw = 0
                kh += 1
    return acc, img, oh, ow, n, (rm < M)[:, None] & (rn < N)[None, :]


# The autotuner tunes once per key (and keeps its pick on disk): what the pruning reads (channels, the
# channel stride, which keeps NCHW and channels_last apart) and the power of two M_BUCKET >= M, so that
# photos of many sizes share a pick (the masks make any config right at any size). The JIT specialises the
# sizes only on 1 and 16 | n (which the compiled index math uses), not on their values: a compile per class.
@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "CA", "N", "KH", "KW", "sa_c"], cache_results=True,
                 prune_configs_by={"early_config_prune": prune_gemm})
@triton.heuristics({"EVEN_K": lambda args: args["CA"] % args["BK"] == 0})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _conv_kernel(
    a, b, bias, y,
    BATCH, CA, AH, AW, N, OH, OW, PH, PW, M_BUCKET,
    sa_img, sa_c, sa_h, sa_w, sb_n, sb_c, sb_h, sb_w, sy_img, sy_c, sy_h, sy_w,
    KH: tl.constexpr, KW: tl.constexpr, REFLECT: tl.constexpr, HAS_BIAS: tl.constexpr, A_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, INT64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """y[img, n, oh, ow] = the implicit GEMM of A = x reflected by (PH, PW) (REFLECT; else a packed
    copy of x that holds the padding) and B = w, + bias[n] (HAS_BIAS)."""
    acc, img, oh, ow, n, ok = _implicit_gemm(
        a, b, BATCH, CA, AH, AW, N, OH, OW, PH, PW, sa_img, sa_c, sa_h, sa_w, sb_n, sb_c, sb_h, sb_w,
        KH, KW, REFLECT, False, A_ALIGN, PRECISION, DOT_FP32, INT64, BM, BN, BK, EVEN_K,
    )
    if HAS_BIAS:
        acc += tl.load(bias + n).to(tl.float32)[None, :]
    y_off = img * sy_img + oh * sy_h + ow * sy_w
    tl.store(y + (y_off[:, None] + n[None, :] * sy_c), acc.to(y.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- small-channel packing
#
# CycleGAN's first and last layers have 3 channels: a pixel of 6 or 12 bytes, too narrow for 16-byte
# loads and 5x wasted in a 16-wide dot. So when C fits in 16 bytes, the input is first copied, padded
# (reflect, or zero for dgrad), channels padded to CP = 16 / itemsize, into xp[n, h, w, cp]. A KW-wide
# row of taps is then one contiguous window of KWP.CP values (KWP = next power of 2 >= KW), and the
# conv a (KH x 1) conv over C' = KWP.CP "channels" with no padding:
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


def _pack_weight(w: torch.Tensor, kwp: int, cp: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """w (A, KH, KW, B) zero-padded to a contiguous (A, KH, kwp, cp), and its _window_strides."""
    A, KH, KW, B = w.shape
    out = w.new_zeros((A, KH, kwp, cp))
    out[:, :, :KW, :B] = w
    return out, _window_strides(KH, kwp, cp)


def _window_input(t: torch.Tensor, ph: int, pw: int, hp: int, wp: int, kwp: int, cp: int,
                  reflect: bool) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, int, int]]:
    """t packed (_pack) and seen as a conv input of C' = KWP.CP channels: the copy, its (n, c', h, w)
    strides and its (C', HP, WP)."""
    tp = _pack(t, ph, pw, hp, wp, cp, reflect)
    N, HP, WP, CP = tp.shape
    return tp, (HP * WP * CP, 1, WP * CP, CP), (kwp * CP, HP, WP)


# ----------------------------------------------------------------------------- host code


def _precision(x: torch.Tensor) -> str:
    """TF32 for fp32 on a GPU exactly when cuDNN's conv would use it; fp16/bf16 ignore the setting."""
    if x.dtype == torch.float32 and x.is_cuda and not _INTERPRET:
        return "tf32" if kernels.runtime.cudnn_conv_tf32() else "ieee"
    return "ieee"


def _dot_args(x: torch.Tensor) -> dict:
    """The dot's constexprs for operands of x's dtype: its input precision, and the interpreter's bf16 upcast."""
    return {"PRECISION": _precision(x), "DOT_FP32": _INTERPRET and x.dtype == torch.bfloat16}


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


def _gemm_reach(a_strides: tuple[int, ...], a_shape: tuple[int, ...], b_strides: tuple[int, ...], N: int,
                taps: tuple[int, int], pads: tuple[int, int], rows: int) -> int:
    """How far _implicit_gemm's offsets into a and b and its row index reach: a read PH rows before 0 and past
    AH - 1 (zero padding), the channels up to BK <= next_pow2(CA) (or 32), the rows a tile past M."""
    (BATCH, CA, AH, AW), (KH, KW), (PH, PW) = a_shape, taps, pads
    k_end = cap(CA, 32)
    return max(_reach(a_strides, (BATCH, k_end, AH + PH, AW + PW)), _reach(b_strides, (N, k_end, KH, KW)),
               rows + TILE)


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


def _gemm_grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))


def _conv_fwd(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, p: int) -> torch.Tensor:
    """y = conv2d(reflect_pad(x, p), w) + bias: one _conv_kernel launch (after packing x, for few channels)."""
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    y = _empty_like_layout(x, _out_shape(x, w, p))
    if y.numel() == 0:
        return y
    M = N * y.shape[2] * y.shape[3]
    a, a_strides, (CA, AH, AW), b, b_strides = x, x.stride(), (C, H, W), w, w.stride()
    window = _window(C, KW, x.dtype)
    if window:  # a (KH x 1) conv over packed windows, with no padding: the padding is in the packed copy
        kwp, cp = window
        a, a_strides, (CA, AH, AW) = _window_input(x, p, p, H + 2 * p, W + 2 * p + kwp - KW, kwp, cp, True)
        (b, b_strides), KW, p = _pack_weight(w.permute(0, 2, 3, 1), kwp, cp), 1, 0
    int64 = _int64(_gemm_reach(a_strides, (N, CA, AH, AW), b_strides, OC, (KH, KW), (p, p), M),
                   _reach(y.stride(), y.shape))
    _conv_kernel[_gemm_grid(M, OC)](
        a, b, b if bias is None else bias, y,
        N, CA, AH, AW, OC, *y.shape[2:], p, p, triton.next_power_of_2(M),
        *a_strides, *b_strides, *y.stride(),
        KH=KH, KW=KW, REFLECT=not window, HAS_BIAS=bias is not None, A_ALIGN=_align(a_strides), INT64=int64,
        **_dot_args(x),
    )
    return y


# The Triton path is a pair of torch.library custom ops, so that torch.compile sees each one as a single
# opaque node (no graph break): the fake impls give only output metadata (shape, dtype, strides), and
# autograd connects this op to the backward op (kernels/conv_backward.py, which kernels/__init__ imports).


@torch.library.custom_op("minicycle::reflect_conv2d", mutates_args=())
def _reflect_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """conv2d(reflect_pad(x, padding), weight) + bias; the output takes x's memory format."""
    return _conv_fwd(x, weight, bias, padding)


@_reflect_conv2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    return _empty_like_layout(x, _out_shape(x, weight, padding))


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, _, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = padding


def _autograd_backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.minicycle.reflect_conv2d_backward(dy, x, weight, ctx.padding, need_x, need_w, need_b)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None


_reflect_conv2d.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> None:
    shapes = f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"reflect_conv2d: x must be (N, C, H, W) and weight (OC, C, KH, KW); got {shapes}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"reflect_conv2d: floating-point tensors required; got x {x.dtype}, weight {weight.dtype}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"reflect_conv2d: x ({x.dtype}, {x.device}) and weight ({weight.dtype}, {weight.device}) "
                         f"must share dtype and device")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"reflect_conv2d: bias must be ({weight.shape[0]},) with x's dtype and device; "
                         f"got {tuple(bias.shape)} {bias.dtype} {bias.device}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"reflect_conv2d: x has {x.shape[1]} channels but weight expects {weight.shape[1]}; {shapes}")
    if isinstance(padding, bool) or not isinstance(padding, int):
        raise TypeError(f"reflect_conv2d: padding must be an int; got {padding!r}")
    (H, W), (KH, KW) = x.shape[2:], weight.shape[2:]
    if padding < 0 or padding >= H or padding >= W:
        raise ValueError(f"reflect_conv2d: reflection padding must satisfy 0 <= padding < H, W; "
                         f"got padding={padding} for x {tuple(x.shape)}")
    if KH > H + 2 * padding or KW > W + 2 * padding:
        raise ValueError(f"reflect_conv2d: kernel {KH}x{KW} is larger than the padded input "
                         f"{H + 2 * padding}x{W + 2 * padding}")


def _autocast_checked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> tuple:
    """The operands in the autocast dtype (as F.conv2d casts them) if autocast is on, checked."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    _check(x, weight, bias, padding)
    return x, weight, bias


def reflect_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, padding: int
) -> torch.Tensor:
    """F.conv2d(F.pad(x, (padding,) * 4, mode="reflect"), weight, bias); stride 1, groups 1.

    Runs the Triton kernels when kernels.runtime.use_triton(x) (CUDA, or CPU under
    TRITON_INTERPRET=1; float16 / bfloat16 / float32), else plain PyTorch. Under autocast the
    operands are cast to the autocast dtype first, as F.conv2d does.
    """
    x, weight, bias = _autocast_checked(x, weight, bias, padding)
    if not kernels.runtime.use_triton(x):
        return kernels.runtime.reflect_conv2d(x, weight, bias, padding=padding)
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"reflect_conv2d: the Triton path supports {_TRITON_DTYPES}; got {x.dtype}")
    return _reflect_conv2d(x, weight, bias, padding)
