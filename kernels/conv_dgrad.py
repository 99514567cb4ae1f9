"""The input gradient of the reflection-padded convolution (kernels/reflect_conv.py).

The gradient of the padded input reflect_pad(x, P) is the full correlation of dy with w on the
padded (H + 2P) x (W + 2P) grid,

    g[img, c, qh, qw] = sum over kh, kw, oc of dy[img, oc, qh - kh, qw - kw] . w[oc, c, kh, kw]   (0 outside dy)

the forward's _implicit_gemm with A = dy zero-padded by (KH - 1, KW - 1) (MASK_BOUNDS) and B = w as
(C, KH, KW, OC) (OC contiguous), its taps flipped by negative strides: N = C columns. Reflection is
many-to-one, so an input pixel also receives the gradient of its mirror images on the padded border.
In one dimension the preimages of i on the padded grid are

    q = i + P                 always (the interior)
    q = P - i                 if 1 <= i <= P              (mirrored off the top edge)
    q = 2(H - 1) - i + P      if H - 1 - P <= i <= H - 2  (mirrored off the bottom edge)

so the GEMM's epilogue writes interior positions straight into dx and the border strip (6% of the
padded grid at 64^2, P = 1) into an fp32 workspace ws, laid out by _strip_index; _fold_kernel then
adds each border pixel's mirror terms to dx (up to 8, in a fixed order, no atomics). A 3-channel dy
(the head's gradient) is read as packed windows, as the forward reads a 3-channel x.
"""

import torch
import triton
import triton.language as tl

from kernels import reflect_conv as rc
from kernels.conv_tiles import GEMM_CONFIGS, prune_gemm
from kernels.reflect_conv import _implicit_gemm, _index


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


@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "CA", "N", "KH", "KW", "sa_c"], cache_results=True,
                 prune_configs_by={"early_config_prune": prune_gemm})  # keys and specialisation: as _conv_kernel's
@triton.heuristics({"EVEN_K": lambda args: args["CA"] % args["BK"] == 0})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _dgrad_kernel(
    a, b, dx, ws,
    BATCH, CA, AH, AW, N, HQ, WQ, PH, PW, P, M_BUCKET,
    sa_img, sa_c, sa_h, sa_w, sb_n, sb_c, sb_h, sb_w, sdx_img, sdx_c, sdx_h, sdx_w,
    KH: tl.constexpr, KW: tl.constexpr, MASK_BOUNDS: tl.constexpr, A_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, INT64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """g on the padded grid HQ x WQ = the implicit GEMM of A = dy zero-padded by (PH, PW) (MASK_BOUNDS;
    else a packed copy of dy that holds the padding) and B = the flipped w, N = C columns. The interior
    goes to dx[img, c, qh - P, qw - P], the border strip to ws[img, _strip_index, c] in fp32 (for
    _fold_kernel)."""
    acc, img, qh, qw, c, ok = _implicit_gemm(
        a, b, BATCH, CA, AH, AW, N, HQ, WQ, PH, PW, sa_img, sa_c, sa_h, sa_w, sb_n, sb_c, sb_h, sb_w,
        KH, KW, False, MASK_BOUNDS, A_ALIGN, PRECISION, DOT_FP32, INT64, BM, BN, BK, EVEN_K,
    )
    H, W = HQ - 2 * P, WQ - 2 * P  # dx's
    inside = (qh >= P) & (qh < H + P) & (qw >= P) & (qw < W + P)
    dx_off = img * sdx_img + (qh - P) * sdx_h + (qw - P) * sdx_w
    tl.store(dx + (dx_off[:, None] + c[None, :] * sdx_c), acc.to(dx.dtype.element_ty), mask=ok & inside[:, None])
    strip = _index(HQ, INT64) * WQ - _index(H, INT64) * W
    s = img * strip + _strip_index(qh, qw, H, W, P)
    tl.store(ws + (s[:, None] * N + c[None, :]), acc, mask=ok & ~inside[:, None])


@triton.jit
def _fold_kernel(
    dx, ws, N, C, H, W, P,
    F0H, NFH, S0H, NSH, F0W, NFW, S0W, NSW,
    sdx_n, sdx_c, sdx_h, sdx_w,
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
    ptr = dx + (n * sdx_n + i * sdx_h + j * sdx_w)[:, None] + c[None, :] * sdx_c
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
    int64 = rc._int64(
        rc._reach(dx.stride(), (N + 1, grid[1] * bc, H, W)),  # the last pixel tile's tail runs into sample N (masked)
        _strip_reach(ws, H + 2 * p, W + 2 * p, grid[1] * bc),
        N * pixels + bm,
    )
    _fold_kernel[grid](dx, ws, N, C, H, W, p, *bh, *bw, *dx.stride(), BM=bm, BC=bc, INT64=int64)


def _strip_reach(ws: torch.Tensor, HQ: int, WQ: int, C: int) -> int:
    """Beyond the farthest offset into the border strips ws (N strips of C channels) that the GEMM's epilogue
    and the fold compute: a masked position's strip index lies within one padded HQ x WQ grid of its strip."""
    return ws.numel() + 2 * HQ * WQ * C


def _conv_dgrad(dy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, p: int) -> torch.Tensor:
    """dx: the full correlation of dy with w on the padded grid (one _dgrad_kernel launch), folded back."""
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    OH, OW = dy.shape[2:]
    dx = rc._empty_like_layout(x, x.shape)
    if dx.numel() == 0:
        return dx
    HQ, WQ = H + 2 * p, W + 2 * p
    ws = torch.empty(N * (HQ * WQ - H * W) * C, dtype=torch.float32, device=x.device) if p else None
    window = rc._window(OC, KW, x.dtype)
    if window:  # dy zero-padded by the kernel size into packed windows; taps flipped in the packed weights
        kwp, cp = window
        a, a_strides, (CA, AH, AW) = rc._window_input(dy, KH - 1, KW - 1, OH + 2 * KH - 2, OW + 2 * KW - 2 + kwp - KW,
                                                      kwp, cp, False)
        (b, b_strides), KW, PH, PW = rc._pack_weight(w.flip(2, 3).permute(1, 2, 3, 0), kwp, cp), 1, 0, 0
    else:  # w as (C, KH, KW, OC), so that a tap's B tile is OC-contiguous rows (K-major); the taps
        # flipped by negative strides from the last one
        w_t = w.permute(1, 2, 3, 0).contiguous()
        b, b_strides = w_t[:, KH - 1:, KW - 1:, :], (w_t.stride(0), 1, -w_t.stride(1), -w_t.stride(2))
        a, a_strides, (CA, AH, AW), PH, PW = dy, dy.stride(), (OC, OH, OW), KH - 1, KW - 1
    int64 = rc._int64(rc._gemm_reach(a_strides, (N, CA, AH, AW), b_strides, C, (KH, KW), (PH, PW), N * HQ * WQ),
                   rc._reach(dx.stride(), (N, C, H + p, W + p)),  # rows qh - p, qh in [0, HQ)
                   0 if ws is None else _strip_reach(ws, HQ, WQ, C))
    _dgrad_kernel[rc._gemm_grid(N * HQ * WQ, C)](
        a, b, dx, dx if ws is None else ws,
        N, CA, AH, AW, C, HQ, WQ, PH, PW, p, triton.next_power_of_2(N * HQ * WQ),
        *a_strides, *b_strides, *dx.stride(),
        KH=KH, KW=KW, MASK_BOUNDS=not window, A_ALIGN=rc._align(a_strides), INT64=int64, **rc._dot_args(x),
    )
    if p:
        _fold(dx, ws, p)
    return dx
