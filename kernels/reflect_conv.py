"""Reflection-padded stride-1 convolution in Triton, forward and backward.

    y = conv2d(reflect_pad(x, P), w) + b        x: (N, C, H, W), w: (OC, C, KH, KW)
    OH = H + 2P - KH + 1,  OW = W + 2P - KW + 1

Every kernel is an implicit GEMM with an fp32 accumulator. The padded tensor is never built:
the reflection is index math in the loads (stride 1 and P <= H - 1 assumed),

    ih = oh + kh - P;  ih = |ih|;  ih = (H - 1) - |(H - 1) - ih|        (same for iw)

    forward  y[m, oc]  = sum_k  x[m, k] . w[k, oc]        M = N.OH.OW, K = (kh, kw, c)
    dgrad    dx[m, c]  = sum_k dy'[m, k] . w[k, c]        M = N.H.W,   K = (kh, kw, oc)
    wgrad    dw[oc, c] = sum_p dy[oc, p] . x[p, c]        per (kh, kw), K = N.OH.OW pixels
    dbias    db[oc]    = sum_p dy[oc, p]

Layout: the kernels are stride-generic and the op makes no copies. An NCHW -> NHWC copy of x
would cost a full read and write of the activation (as much traffic as the conv's own read of
a 3x3 layer), so NCHW inputs are read through their strides, and channels_last inputs (stride
1 on c, which Triton specialises) get contiguous, vectorised loads along the K = c axis. The
weights (at most 2.4 MB, L2-resident) are also read through their strides. Outputs take the
input's memory format.

dgrad gathers (each program owns input pixels, no atomics, deterministic): the gradient on
the padded grid is a full correlation of dy with w, and reflection is many-to-one, so input
pixel i also receives the gradient of its mirror images. In one dimension its preimages on
the padded grid are

    q = i + P                 always
    q = P - i                 if 1 <= i <= P              (mirrored off the top edge)
    q = 2(H - 1) - i + P      if H - 1 - P <= i <= H - 2  (mirrored off the bottom edge)

so the A tile of dgrad sums dy over the (up to 3 x 3) preimage combinations before the dot.

wgrad reduces over all N.OH.OW pixels, so the reduction is split across programs (split-K);
each writes an fp32 partial tile to a workspace, and a second kernel sums the partials in a
fixed order (deterministic, no atomics). dbias uses the same two-stage scheme.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.runtime import use_triton

# triton.jit picks the interpreter at decoration time; so do the autotune config lists, since
# benchmarking more than one config crashes under the interpreter (no active GPU driver).
_INTERPRET = bool(triton.knobs.runtime.interpret)

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


# (BM, BN, BK, num_stages, num_warps). Every tl.dot dimension is >= 16 so that each config
# compiles on a GPU; BN = 16 serves the 3-channel layers at either end of the generator.
if _INTERPRET:
    _GEMM_CONFIGS = _configs([(128, 16, 16, 1, 4)])
    _WGRAD_CONFIGS = _configs([(16, 16, 128, 1, 4)])
else:
    _GEMM_CONFIGS = _configs(
        [
            (128, 128, 32, 3, 8),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 32, 4, 4),
            (128, 32, 32, 4, 4),
            (128, 16, 16, 4, 4),
        ]
    )
    # wgrad: BM tiles OC, BN tiles C, BK runs over pixels.
    _WGRAD_CONFIGS = _configs(
        [
            (128, 128, 32, 3, 8),
            (128, 64, 32, 3, 4),
            (64, 128, 32, 3, 4),
            (64, 64, 64, 3, 4),
            (64, 16, 64, 4, 4),
            (16, 64, 64, 4, 4),
        ]
    )

# A wgrad split covers a multiple of this many pixels, so every config's BK divides it.
_SPLIT_UNIT = max(c.kwargs["BK"] for c in _WGRAD_CONFIGS)
_MAX_SPLIT = 64
_DBIAS_BLOCK_C = 16
_DBIAS_BLOCK_P = 128
_SUM_BLOCK = 1024


@triton.jit
def _reflect(i, n):
    """Reflect an index in [-(n-1), 2(n-1)] into [0, n-1] (edge pixel not repeated)."""
    i = tl.abs(i)
    return (n - 1) - tl.abs((n - 1) - i)


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
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc += a @ b. DOT_FP32 upcasts the operands (the interpreter's bf16 dot is wrong)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)


@triton.autotune(configs=_GEMM_CONFIGS, key=["N", "C", "H", "W", "OC", "KH", "KW"])
@triton.jit
def _fwd_kernel(
    x, w, b, y,
    N, C, H, W, OC, OH, OW, P,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """y[m, oc] = sum over (kh, kw, c) of x[n, c, refl(oh+kh-P), refl(ow+kw-P)] . w[oc, c, kh, kw]."""
    M = N * OH * OW
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    # Wrap the row and column tails around so the loads need no masks; the store masks them.
    m = rm % M
    oc = rn % OC
    n = m // (OH * OW)
    oh = (m % (OH * OW)) // OW
    ow = m % OW
    x_n = x + n * sxn
    w_oc = w + oc * swo
    oh_p = oh - P
    ow_p = ow - P

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # One flat loop over K = (kh, kw, c-block) keeps the body small and lets Triton pipeline it.
    num_cb = tl.cdiv(C, BK)
    for k in range(KH * KW * num_cb):
        khw = k // num_cb
        kh = khw // KW
        kw = khw % KW
        c = (k % num_cb) * BK + tl.arange(0, BK)
        c_ok = c < C
        ih = _reflect(oh_p + kh, H)
        iw = _reflect(ow_p + kw, W)
        a = tl.load((x_n + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc, mask=c_ok[None, :], other=0.0)
        wt = tl.load(w_oc[None, :] + (kh * swh + kw * sww) + c[:, None] * swc, mask=c_ok[:, None], other=0.0)
        acc = _dot(a, wt, acc, PRECISION, DOT_FP32)

    if HAS_BIAS:
        acc += tl.load(b + oc).to(tl.float32)[None, :]
    y_ptr = y + (n * syn + oh * syh + ow * syw)[:, None] + oc[None, :] * syc
    tl.store(y_ptr, acc.to(y.dtype.element_ty), mask=(rm < M)[:, None] & (rn < OC)[None, :])


@triton.jit
def _gather_dy(dy_row, ok_row, qw, ok_w, kw, oc_off, oc_ok, OW, sdw):
    """dy[n, oc, oh, qw - kw] as an fp32 [BM, BK] tile; rows are masked where the padded-grid
    column qw does not reflect onto the pixel or qw - kw falls outside dy."""
    ow = qw - kw
    ok = ok_row & ok_w & (ow >= 0) & (ow < OW)
    g = tl.load((dy_row + ow * sdw)[:, None] + oc_off[None, :], mask=ok[:, None] & oc_ok[None, :], other=0.0)
    return g.to(tl.float32)


@triton.jit
def _fold_row(a, dy_n, qh, ok_h, qw0, ok_w0, qw1, ok_w1, qw2, ok_w2, kh, kw, oc_off, oc_ok,
              OH, OW, sdh, sdw):
    """a += dy at padded row qh - kh and each of the three column preimages (qw_t, ok_w_t)."""
    oh = qh - kh
    ok_h = ok_h & (oh >= 0) & (oh < OH)
    dy_row = dy_n + oh * sdh
    a += _gather_dy(dy_row, ok_h, qw0, ok_w0, kw, oc_off, oc_ok, OW, sdw)
    a += _gather_dy(dy_row, ok_h, qw1, ok_w1, kw, oc_off, oc_ok, OW, sdw)
    a += _gather_dy(dy_row, ok_h, qw2, ok_w2, kw, oc_off, oc_ok, OW, sdw)
    return a


@triton.autotune(configs=_GEMM_CONFIGS, key=["N", "C", "H", "W", "OC", "KH", "KW"])
@triton.jit
def _dgrad_kernel(
    dy, w, dx,
    N, C, H, W, OC, OH, OW, P,
    sdn, sdc, sdh, sdw,
    swo, swc, swh, sww,
    sxn, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """dx[m, c] = sum over (kh, kw, oc) of (sum over preimages q of dy[n, oc, q - (kh, kw)]) . w[oc, c, kh, kw].

    Rows m are input pixels (n, i, j); q runs over the padded-grid positions (qh, qw) that
    reflect onto (i, j) (see _preimage), and q - (kh, kw) must land inside dy (the full
    correlation's zero border).
    """
    M = N * H * W
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m = rm % M
    c = rn % C
    n = m // (H * W)
    i = (m % (H * W)) // W
    j = m % W
    dy_n = dy + n * sdn
    w_c = w + c * swc
    # The preimages of each pixel's row and column; the mirrored rows (t = 1, 2) exist only
    # in tiles that touch the top or bottom border, so the others skip them entirely.
    qh0, ok_h0 = _preimage(i, 0, P, H)
    qh1, ok_h1 = _preimage(i, 1, P, H)
    qh2, ok_h2 = _preimage(i, 2, P, H)
    qw0, ok_w0 = _preimage(j, 0, P, W)
    qw1, ok_w1 = _preimage(j, 1, P, W)
    qw2, ok_w2 = _preimage(j, 2, P, W)
    has_top = tl.max(ok_h1.to(tl.int32), axis=0) > 0
    has_bottom = tl.max(ok_h2.to(tl.int32), axis=0) > 0

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    num_ob = tl.cdiv(OC, BK)
    for k in range(KH * KW * num_ob):
        khw = k // num_ob
        kh = khw // KW
        kw = khw % KW
        oc = (k % num_ob) * BK + tl.arange(0, BK)
        oc_ok = oc < OC
        oc_off = oc * sdc
        # A[m, oc]: the reflection fold, summed before the dot (masked-off rows cost no traffic).
        a = tl.zeros((BM, BK), dtype=tl.float32)
        a = _fold_row(a, dy_n, qh0, ok_h0, qw0, ok_w0, qw1, ok_w1, qw2, ok_w2, kh, kw,
                      oc_off, oc_ok, OH, OW, sdh, sdw)
        if has_top:
            a = _fold_row(a, dy_n, qh1, ok_h1, qw0, ok_w0, qw1, ok_w1, qw2, ok_w2, kh, kw,
                          oc_off, oc_ok, OH, OW, sdh, sdw)
        if has_bottom:
            a = _fold_row(a, dy_n, qh2, ok_h2, qw0, ok_w0, qw1, ok_w1, qw2, ok_w2, kh, kw,
                          oc_off, oc_ok, OH, OW, sdh, sdw)
        wt = tl.load(w_c[None, :] + (kh * swh + kw * sww) + oc[:, None] * swo, mask=oc_ok[:, None], other=0.0)
        acc = _dot(a, wt, acc, PRECISION, DOT_FP32)  # [BM, BK] @ [BK, BN]

    dx_ptr = dx + (n * sxn + i * sxh + j * sxw)[:, None] + c[None, :] * sxc
    tl.store(dx_ptr, acc.to(dx.dtype.element_ty), mask=(rm < M)[:, None] & (rn < C)[None, :])


@triton.autotune(configs=_WGRAD_CONFIGS, key=["N", "C", "H", "W", "OC", "KH", "KW", "PIX_PER_SPLIT"])
@triton.jit
def _wgrad_kernel(
    x, dy, ws,
    N, C, H, W, OC, OH, OW, P, PIX_PER_SPLIT,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    KH: tl.constexpr, KW: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """ws[s, oc, c, kh, kw] = sum over pixels p of split s of dy[oc, p] . x[c, refl(p + (kh, kw) - P)].

    Grid: (OC tiles x C tiles, KH.KW, splits). Split s covers pixels
    [s . PIX_PER_SPLIT, (s + 1) . PIX_PER_SPLIT) of the N.OH.OW reduction.
    """
    num_n = tl.cdiv(C, BN)
    ro = (tl.program_id(0) // num_n) * BM + tl.arange(0, BM)
    rc = (tl.program_id(0) % num_n) * BN + tl.arange(0, BN)
    kh = tl.program_id(1) // KW
    kw = tl.program_id(1) % KW
    s = tl.program_id(2)
    oc = ro % OC
    c = rc % C

    npix = N * OH * OW
    p_end = tl.minimum((s + 1) * PIX_PER_SPLIT, npix)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for p0 in range(s * PIX_PER_SPLIT, p_end, BK):
        p = p0 + tl.arange(0, BK)
        p_ok = p < p_end
        n = p // (OH * OW)
        oh = (p % (OH * OW)) // OW
        ow = p % OW
        g = tl.load(
            dy + oc[:, None] * sdc + (n * sdn + oh * sdh + ow * sdw)[None, :],
            mask=p_ok[None, :], other=0.0,
        )  # [BM, BK]
        ih = _reflect(oh + kh - P, H)
        iw = _reflect(ow + kw - P, W)
        xt = tl.load(
            x + (n * sxn + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
            mask=p_ok[:, None], other=0.0,
        )  # [BK, BN]
        acc = _dot(g, xt, acc, PRECISION, DOT_FP32)

    ws_ptr = ws + s * (OC * C * KH * KW) + (ro[:, None] * C + rc[None, :]) * (KH * KW) + kh * KW + kw
    tl.store(ws_ptr, acc, mask=(ro < OC)[:, None] & (rc < C)[None, :])


@triton.jit
def _dbias_kernel(
    dy, ws, N, OC, OH, OW, PIX_PER_SPLIT,
    sdn, sdc, sdh, sdw,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """ws[s, oc] = sum over pixels p of split s of dy[n, oc, oh, ow]. Grid: (OC tiles, splits)."""
    oc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    oc_ok = oc < OC
    s = tl.program_id(1)
    p_end = tl.minimum((s + 1) * PIX_PER_SPLIT, N * OH * OW)
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for p0 in range(s * PIX_PER_SPLIT, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        n = p // (OH * OW)
        oh = (p % (OH * OW)) // OW
        ow = p % OW
        g = tl.load(
            dy + oc[:, None] * sdc + (n * sdn + oh * sdh + ow * sdw)[None, :],
            mask=oc_ok[:, None] & (p < p_end)[None, :], other=0.0,
        )
        acc += g.to(tl.float32)
    tl.store(ws + s * OC + oc, tl.sum(acc, axis=1), mask=oc_ok)


@triton.jit
def _sum_splits_kernel(ws, out, SPLITS, NUMEL, BLOCK: tl.constexpr):
    """out[i] = sum over s = 0, 1, ... of ws[s, i], in that fixed order (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(ws + s * NUMEL + offs, mask=ok, other=0.0)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- host side


def _precision(x: torch.Tensor) -> str:
    """TF32 for fp32 on a GPU exactly when cuDNN would use it; fp16/bf16 ignore the setting."""
    if x.dtype == torch.float32 and x.is_cuda and not _INTERPRET:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "ieee"


def _dot_fp32(x: torch.Tensor) -> bool:
    return _INTERPRET and x.dtype == torch.bfloat16


@functools.cache
def _target_programs(device: torch.device) -> int:
    """How many programs fill the device: two waves of SMs, or a few under the interpreter."""
    if _INTERPRET:
        return 16
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _pixels_per_split(npix: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """Split a reduction over npix pixels so that tiles x splits programs fill the device.

    Returns (pixels per split, a multiple of _SPLIT_UNIT; number of splits).
    """
    want = min(triton.cdiv(_target_programs(device), tiles), _MAX_SPLIT)
    per = triton.cdiv(triton.cdiv(npix, want), _SPLIT_UNIT) * _SPLIT_UNIT
    return per, triton.cdiv(npix, per)


def _sum_splits(ws: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (contiguous) = ws.sum(0) in a fixed order."""
    numel = out.numel()
    grid = (triton.cdiv(numel, _SUM_BLOCK),)
    _sum_splits_kernel[grid](ws, out, ws.shape[0], numel, BLOCK=_SUM_BLOCK)
    return out


def _empty_like_layout(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An output of the given shape: channels_last if x is, else contiguous NCHW."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _out_shape(x: torch.Tensor, w: torch.Tensor, p: int) -> tuple[int, int, int, int]:
    N, _, H, W = x.shape
    OC, _, KH, KW = w.shape
    return N, OC, H + 2 * p - KH + 1, W + 2 * p - KW + 1


def _conv_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, p: int) -> torch.Tensor:
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    _, _, OH, OW = _out_shape(x, w, p)
    y = _empty_like_layout(x, (N, OC, OH, OW))
    if y.numel() == 0:
        return y

    def grid(meta):
        return triton.cdiv(N * OH * OW, meta["BM"]), triton.cdiv(OC, meta["BN"])

    _fwd_kernel[grid](
        x, w, w if b is None else b, y,
        N, C, H, W, OC, OH, OW, p,
        *x.stride(), *w.stride(), *y.stride(),
        KH=KH, KW=KW, HAS_BIAS=b is not None,
        PRECISION=_precision(x), DOT_FP32=_dot_fp32(x),
    )
    return y


def _conv_dgrad(dy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, p: int) -> torch.Tensor:
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    OH, OW = dy.shape[2:]
    dx = _empty_like_layout(x, x.shape)
    if dx.numel() == 0:
        return dx

    def grid(meta):
        return triton.cdiv(N * H * W, meta["BM"]), triton.cdiv(C, meta["BN"])

    _dgrad_kernel[grid](
        dy, w, dx,
        N, C, H, W, OC, OH, OW, p,
        *dy.stride(), *w.stride(), *dx.stride(),
        KH=KH, KW=KW, PRECISION=_precision(x), DOT_FP32=_dot_fp32(x),
    )
    return dx


def _conv_wgrad(dy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, p: int) -> torch.Tensor:
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    OH, OW = dy.shape[2:]
    npix = N * OH * OW
    dw = w.new_empty(w.shape)  # contiguous, whatever w's layout
    if npix == 0 or w.numel() == 0:
        return dw.zero_()
    # Size the split for nominal 64 x 64 output tiles; the autotuned tile may differ.
    tiles = triton.cdiv(OC, 64) * triton.cdiv(C, 64) * KH * KW
    per, splits = _pixels_per_split(npix, tiles, x.device)
    ws = torch.empty((splits, OC, C, KH, KW), dtype=torch.float32, device=x.device)

    def grid(meta):
        return triton.cdiv(OC, meta["BM"]) * triton.cdiv(C, meta["BN"]), KH * KW, splits

    _wgrad_kernel[grid](
        x, dy, ws,
        N, C, H, W, OC, OH, OW, p, per,
        *x.stride(), *dy.stride(),
        KH=KH, KW=KW, PRECISION=_precision(x), DOT_FP32=_dot_fp32(x),
    )
    return _sum_splits(ws, dw)


def _conv_dbias(dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """db[oc] = sum of dy[:, oc] in the given dtype (the bias's, which is x's)."""
    N, OC, OH, OW = dy.shape
    npix = N * OH * OW
    db = dy.new_empty(OC, dtype=dtype)
    if npix == 0 or OC == 0:
        return db.zero_()
    per, splits = _pixels_per_split(npix, triton.cdiv(OC, _DBIAS_BLOCK_C), dy.device)
    ws = torch.empty((splits, OC), dtype=torch.float32, device=dy.device)
    grid = (triton.cdiv(OC, _DBIAS_BLOCK_C), splits)
    _dbias_kernel[grid](
        dy, ws, N, OC, OH, OW, per, *dy.stride(),
        BLOCK_C=_DBIAS_BLOCK_C, BLOCK_P=_DBIAS_BLOCK_P,
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
    dw = weight.new_empty(weight.shape) if need_w else x.new_empty(0)
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
