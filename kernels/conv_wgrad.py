"""The weight and bias gradients of the reflection-padded convolution (kernels/reflect_conv.py).

    dw[oc, c, kh, kw] = sum over pixels p = (n, oh, ow) of dy[p, oc] . x[n, c, refl(oh + kh - P), refl(ow + kw - P)]
    db[oc] = sum over pixels p of dy[p, oc]

Per tap, dw is a GEMM reducing over all N.OH.OW pixels: M = OC rows (dy's channels), N = C columns
(x's), or the other way round for few output channels (X_IS_A). The reduction is split across
programs (split-K by output rows) when the tiles alone cannot fill the GPU; each split writes fp32
partials into ws, which _sum_splits_kernel sums in a fixed order (deterministic, no atomics), as for
db. A 3-channel x (the stem's input) is read as packed windows, as the forward reads it.
"""

import torch
import triton
import triton.language as tl

from kernels import reflect_conv as rc
from kernels.conv_tiles import TILE, WGRAD_CONFIGS, prune_wgrad, target_programs
from kernels.reflect_conv import _dot, _index, _reflect

_MAX_SPLIT = 64
_DBIAS_BLOCK_C = 16
_DBIAS_BLOCK_P = 128
_SUM_BLOCK = 1024


# Keyed and specialised as the forward's kernel is; K_BUCKET: the pixels reduced, N.OH.OW.
@triton.autotune(configs=WGRAD_CONFIGS, key=["K_BUCKET", "C", "OC", "KH", "KW", "X_IS_A", "sxc", "sdc"],
                 cache_results=True, prune_configs_by={"early_config_prune": prune_wgrad})
@triton.heuristics({"EVEN_K": lambda a: a["OW"] % a["BK"] == 0})
@triton.jit(do_not_specialize=["ROWS_PER_SPLIT", "K_BUCKET"])
def _wgrad_kernel(
    x, dy, ws,
    N, C, H, W, OC, OH, OW, P, ROWS_PER_SPLIT, K_BUCKET,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, swo, swc, swh, sww,
    KH: tl.constexpr, KW: tl.constexpr, X_IS_A: tl.constexpr, X_ALIGN: tl.constexpr, DY_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, INT64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """ws[s] (laid out as dw, strides sw*) = sum over split s's pixels p of dy[p, oc] . x[refl(p + (kh, kw) - P), c].
    The GEMM's rows are dy's channels (A = dy^T, B = x), or x's channels when X_IS_A (A = x^T,
    B = dy: for few output channels, so the 64-row MMA tile is not mostly padding). X_ALIGN and
    DY_ALIGN divide the pixel strides, and INT64 widens the index math, as in _implicit_gemm.
    Grid: (row tiles x column tiles, KH.KW, splits). Split s covers output rows (n, oh) in
    [s . ROWS_PER_SPLIT, (s + 1) . ROWS_PER_SPLIT), a row BK pixels at a time, so a step's
    reflected input row is one scalar and only its columns are reflected per pixel.
    """
    MC = C if X_IS_A else OC
    NC = OC if X_IS_A else C
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


def _conv_wgrad(dy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, p: int) -> torch.Tensor:
    """dw: one _wgrad_kernel launch, then the sum of its split-K partials."""
    N, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    OH, OW = dy.shape[2:]
    dw = torch.empty_like(w)  # w's own memory order (channels_last weights stay so)
    if N * OH * OW == 0 or w.numel() == 0:
        return dw.zero_()
    window = rc._window(C, KW, x.dtype)
    if window:  # x as packed windows: dw comes out as (OC, KH, KWP, CP)
        kwp, cp = window
        xp, xp_strides, (C2, HP, WP) = rc._window_input(x, p, p, H + 2 * p, W + 2 * p + kwp - KW, kwp, cp, True)
        dw_packed = dw.new_empty((OC, KH, kwp, cp))
        _launch_wgrad(x=xp, x_strides=xp_strides, C=C2, H=HP, W=WP, dy=dy, dy_strides=dy.stride(), OC=OC, OH=OH, OW=OW,
                      out=dw_packed, out_strides=rc._window_strides(KH, kwp, cp), KH=KH, KW=1, P=0, x_is_a=False)
        dw.copy_(dw_packed[:, :, :KW, :C].permute(0, 3, 1, 2))
    elif OC <= 16 and OC < C:  # few output channels: x's channels on the MMA rows, dy channel-padded to 16
        dyp, dw_padded = rc._pack(dy, 0, 0, OH, OW, 16, False), dw.new_empty((16, C, KH, KW))
        dyp_strides = (dyp.stride(0), 1, dyp.stride(1), dyp.stride(2))
        _launch_wgrad(x=x, x_strides=x.stride(), C=C, H=H, W=W, dy=dyp, dy_strides=dyp_strides, OC=16, OH=OH, OW=OW,
                      out=dw_padded, out_strides=dw_padded.stride(), KH=KH, KW=KW, P=p, x_is_a=True)
        dw.copy_(dw_padded[:OC])
    else:
        _launch_wgrad(x=x, x_strides=x.stride(), C=C, H=H, W=W, dy=dy, dy_strides=dy.stride(), OC=OC, OH=OH, OW=OW,
                      out=dw, out_strides=dw.stride(), KH=KH, KW=KW, P=p, x_is_a=False)
    return dw


def _launch_wgrad(*, x: torch.Tensor, x_strides: tuple[int, ...], C: int, H: int, W: int, dy: torch.Tensor,
                  dy_strides: tuple[int, ...], OC: int, OH: int, OW: int, out: torch.Tensor,
                  out_strides: tuple[int, ...], KH: int, KW: int, P: int, x_is_a: bool) -> None:
    """out (dense, laid out as an (OC, C, KH, KW) weight with out_strides) = the weight gradient of
    a conv with reflection padding P from the (C x H x W) input x to the (OC x OH x OW) dy, via
    split-K partials in an fp32 workspace. x_is_a puts x's channels on the MMA rows."""
    N = dy.shape[0]
    m, n = (C, OC) if x_is_a else (OC, C)
    per, splits = _split(N * OH, triton.cdiv(m, 64) * triton.cdiv(n, 64) * KH * KW, x.device)  # output rows
    ws = torch.empty((splits, out.numel()), dtype=torch.float32, device=x.device)
    int64 = rc._int64(
        rc._reach(x_strides, (N, C, H, W)),  # reflected, and the channel tails wrapped: inside x
        rc._reach(dy_strides, (N, OC, OH, OW + TILE)),  # a row's last pixel block runs past OW (masked)
        ws.numel() + rc._reach(out_strides, (OC + TILE, C + TILE, KH, KW)),  # the tile tails (masked)
        N * OH * OW + TILE,
    )

    def grid(meta):
        return triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), KH * KW, splits

    _wgrad_kernel[grid](
        x, dy, ws,
        N, C, H, W, OC, OH, OW, P, per, triton.next_power_of_2(N * OH * OW),
        *x_strides, *dy_strides, *out_strides,
        KH=KH, KW=KW, X_IS_A=x_is_a, X_ALIGN=rc._align(x_strides), DY_ALIGN=rc._align(dy_strides), INT64=int64,
        **rc._dot_args(x),
    )
    _sum_splits(ws, out)


def _conv_dbias(dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """db[oc] = sum of dy[:, oc] in the given dtype (the bias's, which is x's)."""
    N, OC, OH, OW = dy.shape
    npix = N * OH * OW
    db = dy.new_empty(OC, dtype=dtype)
    if npix == 0 or OC == 0:
        return db.zero_()
    per, splits = _split(npix, triton.cdiv(OC, _DBIAS_BLOCK_C), dy.device, _DBIAS_BLOCK_P)
    ws = torch.empty((splits, OC), dtype=torch.float32, device=dy.device)
    grid = (triton.cdiv(OC, _DBIAS_BLOCK_C), splits)
    int64 = rc._int64(
        rc._reach(dy.stride(), (N, grid[0] * _DBIAS_BLOCK_C, OH, OW)),
        splits * per + _DBIAS_BLOCK_P,  # the pixel index, past the last split's end (masked)
    )
    _dbias_kernel[grid](
        dy, ws, N, OC, OH, OW, per, *dy.stride(),
        BLOCK_C=_DBIAS_BLOCK_C, BLOCK_P=_DBIAS_BLOCK_P, INT64=int64,
    )
    return _sum_splits(ws, db)


def _split(n: int, tiles: int, device: torch.device, multiple: int = 1) -> tuple[int, int]:
    """Split a reduction over n items so that tiles x splits programs fill the device, each split a
    multiple of `multiple` items. Returns (items per split, number of splits)."""
    want = min(triton.cdiv(target_programs(device), tiles), _MAX_SPLIT)
    per = triton.cdiv(triton.cdiv(n, want), multiple) * multiple
    return per, triton.cdiv(n, per)


def _sum_splits(ws: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (dense, in its own memory order) = ws.sum(0) in a fixed order."""
    numel = out.numel()
    grid = (triton.cdiv(numel, _SUM_BLOCK),)
    _sum_splits_kernel[grid](ws, out, ws.shape[0], numel, BLOCK=_SUM_BLOCK, INT64=rc._int64(ws.numel() + _SUM_BLOCK))
    return out
