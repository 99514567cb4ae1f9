"""Fused InstanceNorm (affine=False) + ReLU / LeakyReLU, forward and backward, in Triton.

For every (n, c) plane of x with HW = H*W elements:

    mean = sum(x) / HW            var = sum((x - mean)^2) / HW        rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd      y = xhat if xhat > 0 else slope * xhat

activation=False is run as slope = 1 (the identity). Backward, with g = dy * act'(xhat):

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))

Numerics. Statistics are accumulated in fp32 on *shifted* data x - k, where k = x[n, c, 0, 0]
is the plane's first element: mu = mean(x - k) is small when the mean is much larger than the
spread, so neither the mean nor (x - k) - mu loses digits, and a constant plane gives exact zeros.
Forward saves x, mu and rstd (fp32, one per plane); backward reloads k from x.

Layout. A plane is addressed as one strided run x[n, c] + i * stride_hw (i = h*W + w), which
covers contiguous NCHW (stride_hw = 1) and channels_last (stride_hw = C) without copies; other
layouts are made contiguous. Programs work on [BLOCK_C, BLOCK_HW] tiles: BLOCK_C = 1 for NCHW
(contiguous vector loads along HW), and for channels_last BLOCK_C channels side by side so each
tile row is one 32-byte sector.

Grid. If a plane fits one tile, one program per (n, channel block) reads x once and writes y
(backward: reads x and dy, writes dx). Otherwise each plane is split into S = cdiv(HW, BLOCK_HW)
chunks, and three launches do that program's work:

    partial   one program per tile (n, chunk, channel block): each plane's chunk statistics, the
              count n_j, mean mu_j and M2_j = sum((x - k - mu_j)^2) (backward: sum(g), sum(g * xhat))
    combine   one program per plane: its S partials merged, BLOCK_S at a time in a fixed order
              (backward: summed), into mu and rstd (backward: mean(g), mean(g * xhat))
    apply     one program per tile: y from x and its plane's mu and rstd (backward: dx)

Two parts a and b of a plane merge by Chan et al.'s rule, the order fixed (deterministic, no atomics):

    n = n_a + n_b      mu = mu_a + (mu_b - mu_a) n_b / n      M2 = M2_a + M2_b + (mu_b - mu_a)^2 n_a n_b / n

so work and traffic grow with H*W, and every program holds one tile, whatever the plane's size.
Grid axis 0 takes a sample's tiles (up to 2**31 - 1), the channel block fastest, so that
neighbouring programs read neighbouring channels of channels_last x: (chunk, channel block) is
program chunk * 2**CB_SHIFT + channel block, the channel blocks rounded up to a power of two (a
shift, not a division, which costs registers). Axis 1 takes the samples, up to 65,535 (CUDA's limit
there) per launch; a larger batch is launched in slabs. A combine's programs are all on axis 0.

Offsets. Triton computes indices in int32; a launch whose element offsets can reach 2**31 (a
batch of large photos) sets INT64, which widens the kernel's index math, and no other launch pays
for it (a sample's offset n * stride_n is always formed in int64: a scalar).
"""

import torch
import triton
import triton.language as tl

from kernels.runtime import pytorch_norm, use_triton

# Largest tile (elements) one program holds in registers; larger planes take the split path.
# Tests lower it to run the split path on small tensors.
_MAX_BLOCK = 4096
# Partials a combine program merges at a time, in registers (tests lower it too).
_COMBINE_BLOCK = 1024
# CUDA launches up to 65,535 programs on grid axis 1, the samples; more are launched in slabs.
_MAX_SAMPLES = 65535

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _index(i, INT64: tl.constexpr):
    """i as int64 when INT64 (a launch whose offsets can pass int32), else as it is (int32)."""
    if INT64:
        i = tl.cast(i, tl.int64)
    return i


@triton.jit
def _tile(C, HW, CB_SHIFT, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, SPLIT: tl.constexpr,
          INT64: tl.constexpr):
    """This program's tile: its sample n (grid axis 1), chunk and channel block (axis 0: chunk .
    2**CB_SHIFT + channel block when SPLIT, else the channel block of chunk 0), the tile's channel
    indices c, spatial indices s, and mask."""
    n = tl.program_id(1).to(tl.int64)  # n * stride_n may pass int32 alone
    tile = _index(tl.program_id(0), INT64)
    if SPLIT:
        chunk = tile >> CB_SHIFT
        cb = tile & ((1 << CB_SHIFT) - 1)
    else:
        chunk = _index(0, INT64)
        cb = tile
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (c < C)[:, None] & (s < HW)[None, :]
    return n, chunk, c, s, mask


@triton.jit
def _load_shifted(x_ptr, c, s, mask, C, stride_c, stride_hw):
    """x - k for a tile (0 outside the mask), k = x[n, c, 0, 0] per channel."""
    k = tl.load(x_ptr + c * stride_c, mask=c < C, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + c[:, None] * stride_c + s[None, :] * stride_hw, mask=mask, other=0.0)
    return tl.where(mask, x.to(tl.float32) - k[:, None], 0.0)


@triton.jit
def _normalize_store(y_ptr, xs, mu, rstd, c, s, mask, stride_c, stride_hw, slope):
    """y = act((x - k - mu) * rstd), stored in y's dtype."""
    xhat = (xs - mu[:, None]) * rstd[:, None]
    y = tl.where(xhat > 0, xhat, xhat * slope)
    y_ptrs = y_ptr + c[:, None] * stride_c + s[None, :] * stride_hw
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, mu_ptr, rstd_ptr, C, HW, sx_n, sx_c, sx_hw, sy_n, sy_c, sy_hw, eps, slope,
                BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, INT64: tl.constexpr):
    """Whole planes in one tile, one program per (n, channel block)."""
    n, _, c, s, mask = _tile(C, HW, 0, BLOCK_C, BLOCK_HW, False, INT64)
    x_ptr += n * sx_n
    y_ptr += n * sy_n

    # Two passes over the tile in registers: mu = mean(x - k), var = mean((x - k - mu)^2).
    xs = _load_shifted(x_ptr, c, s, mask, C, sx_c, sx_hw)
    mu = tl.sum(xs, axis=1) / HW
    d = tl.where(mask, xs - mu[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / HW + eps)

    _normalize_store(y_ptr, xs, mu, rstd, c, s, mask, sy_c, sy_hw, slope)
    row = n * C + c
    tl.store(mu_ptr + row, mu, mask=c < C)
    tl.store(rstd_ptr + row, rstd, mask=c < C)


@triton.jit
def _fwd_partial_kernel(x_ptr, part_mu_ptr, part_m2_ptr, C, HW, n_chunks, CB_SHIFT, sx_n, sx_c, sx_hw,
                        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, INT64: tl.constexpr):
    """Split, partial: each chunk's mean mu_j = mean(x - k) and M2_j = sum((x - k - mu_j)^2),
    laid out [N*C, n_chunks]."""
    n, chunk, c, s, mask = _tile(C, HW, CB_SHIFT, BLOCK_C, BLOCK_HW, True, INT64)
    x_ptr += n * sx_n

    xs = _load_shifted(x_ptr, c, s, mask, C, sx_c, sx_hw)
    count = tl.minimum(HW - chunk * BLOCK_HW, BLOCK_HW).to(tl.float32)
    mu = tl.sum(xs, axis=1) / count
    d = tl.where(mask, xs - mu[:, None], 0.0)

    idx = (n * C + c) * n_chunks + chunk
    tl.store(part_mu_ptr + idx, mu, mask=c < C)
    tl.store(part_m2_ptr + idx, tl.sum(d * d, axis=1), mask=c < C)


@triton.jit
def _fwd_combine_kernel(part_mu_ptr, part_m2_ptr, mu_ptr, rstd_ptr, HW, n_chunks, eps, BLOCK_HW: tl.constexpr,
                        BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """Split, combine: one program per plane merges its chunks' (n_j, mu_j, M2_j) into its mu and
    rstd. Lane l of a BLOCK_S-wide block merges chunks l, l + BLOCK_S, ... in turn, then the lanes
    are merged (Chan et al., as in the module's docstring)."""
    plane = _index(tl.program_id(0), INT64)
    part_mu_ptr += plane * n_chunks
    part_m2_ptr += plane * n_chunks
    count = tl.zeros((BLOCK_S,), dtype=tl.float32)
    mu = tl.zeros((BLOCK_S,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for j0 in range(0, n_chunks, BLOCK_S):
        j = _index(j0, INT64) + tl.arange(0, BLOCK_S)
        # Chunk j holds min(BLOCK_HW, HW - j * BLOCK_HW) elements (0 past the last chunk).
        count_j = tl.minimum(BLOCK_HW, tl.maximum(HW - j * BLOCK_HW, 0)).to(tl.float32)
        mu_j = tl.load(part_mu_ptr + j, mask=j < n_chunks, other=0.0)
        m2_j = tl.load(part_m2_ptr + j, mask=j < n_chunks, other=0.0)
        total = count + count_j
        share = count_j / tl.maximum(total, 1.0)  # n_b / n, and 0 where both parts are empty
        delta = mu_j - mu
        mu += delta * share
        m2 += m2_j + delta * delta * count * share
        count = total
    # The lanes at once: mu = sum(n_l mu_l) / HW, M2 = sum(M2_l) + sum(n_l (mu_l - mu)^2).
    mean = tl.sum(count * mu, axis=0) / HW
    d = mu - mean
    var = (tl.sum(m2, axis=0) + tl.sum(count * d * d, axis=0)) / HW
    tl.store(mu_ptr + plane, mean)
    tl.store(rstd_ptr + plane, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _fwd_apply_kernel(x_ptr, y_ptr, mu_ptr, rstd_ptr, C, HW, n_chunks, CB_SHIFT, sx_n, sx_c, sx_hw, sy_n, sy_c, sy_hw,
                      slope, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, INT64: tl.constexpr):
    """Split, apply: normalize + activate this program's tile with its planes' mu and rstd."""
    n, _, c, s, mask = _tile(C, HW, CB_SHIFT, BLOCK_C, BLOCK_HW, True, INT64)
    x_ptr += n * sx_n
    y_ptr += n * sy_n
    mu = tl.load(mu_ptr + n * C + c, mask=c < C, other=0.0)
    rstd = tl.load(rstd_ptr + n * C + c, mask=c < C, other=0.0)
    xs = _load_shifted(x_ptr, c, s, mask, C, sx_c, sx_hw)
    _normalize_store(y_ptr, xs, mu, rstd, c, s, mask, sy_c, sy_hw, slope)


@triton.jit
def _load_g_xhat(x_ptr, dy_ptr, mu_ptr, rstd_ptr, row, c, s, mask, C,
                 sx_c, sx_hw, sdy_c, sdy_hw, slope):
    """Recompute xhat from x and the saved (mu, rstd); g = dy * act'(xhat). Both 0 off the mask."""
    mu = tl.load(mu_ptr + row, mask=c < C, other=0.0)
    rstd = tl.load(rstd_ptr + row, mask=c < C, other=0.0)
    xs = _load_shifted(x_ptr, c, s, mask, C, sx_c, sx_hw)
    xhat = tl.where(mask, (xs - mu[:, None]) * rstd[:, None], 0.0)
    dy = tl.load(dy_ptr + c[:, None] * sdy_c + s[None, :] * sdy_hw, mask=mask, other=0.0)
    g = tl.where(xhat > 0, dy.to(tl.float32), dy.to(tl.float32) * slope)
    return xhat, g, rstd


@triton.jit
def _store_dx(dx_ptr, xhat, g, rstd, mean_g, mean_gx, c, s, mask, stride_c, stride_hw):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), stored in dx's dtype."""
    dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
    dx_ptrs = dx_ptr + c[:, None] * stride_c + s[None, :] * stride_hw
    tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(x_ptr, dy_ptr, dx_ptr, mu_ptr, rstd_ptr, C, HW, sx_n, sx_c, sx_hw, sdy_n, sdy_c, sdy_hw, sdx_n, sdx_c,
                sdx_hw, slope, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, INT64: tl.constexpr):
    """Whole planes in one tile, one program per (n, channel block)."""
    n, _, c, s, mask = _tile(C, HW, 0, BLOCK_C, BLOCK_HW, False, INT64)
    x_ptr += n * sx_n
    dy_ptr += n * sdy_n
    dx_ptr += n * sdx_n
    row = n * C + c

    xhat, g, rstd = _load_g_xhat(x_ptr, dy_ptr, mu_ptr, rstd_ptr, row, c, s, mask, C,
                                 sx_c, sx_hw, sdy_c, sdy_hw, slope)
    mean_g = tl.sum(g, axis=1) / HW
    mean_gx = tl.sum(g * xhat, axis=1) / HW
    _store_dx(dx_ptr, xhat, g, rstd, mean_g, mean_gx, c, s, mask, sdx_c, sdx_hw)


@triton.jit
def _bwd_partial_kernel(x_ptr, dy_ptr, mu_ptr, rstd_ptr, part_g_ptr, part_gx_ptr, C, HW, n_chunks, CB_SHIFT, sx_n, sx_c,
                        sx_hw, sdy_n, sdy_c, sdy_hw, slope, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                        INT64: tl.constexpr):
    """Split, partial: each chunk's sum(g) and sum(g * xhat), laid out [N*C, n_chunks]."""
    n, chunk, c, s, mask = _tile(C, HW, CB_SHIFT, BLOCK_C, BLOCK_HW, True, INT64)
    x_ptr += n * sx_n
    dy_ptr += n * sdy_n
    row = n * C + c

    xhat, g, _ = _load_g_xhat(x_ptr, dy_ptr, mu_ptr, rstd_ptr, row, c, s, mask, C,
                              sx_c, sx_hw, sdy_c, sdy_hw, slope)
    idx = row * n_chunks + chunk
    tl.store(part_g_ptr + idx, tl.sum(g, axis=1), mask=c < C)
    tl.store(part_gx_ptr + idx, tl.sum(g * xhat, axis=1), mask=c < C)


@triton.jit
def _bwd_combine_kernel(part_g_ptr, part_gx_ptr, mean_g_ptr, mean_gx_ptr, HW, n_chunks, BLOCK_S: tl.constexpr,
                        INT64: tl.constexpr):
    """Split, combine: one program per plane sums its chunks' partials, BLOCK_S at a time, in a
    fixed order, into mean(g) and mean(g * xhat)."""
    plane = _index(tl.program_id(0), INT64)
    part_g_ptr += plane * n_chunks
    part_gx_ptr += plane * n_chunks
    sum_g = tl.zeros((BLOCK_S,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for j0 in range(0, n_chunks, BLOCK_S):
        j = _index(j0, INT64) + tl.arange(0, BLOCK_S)
        sum_g += tl.load(part_g_ptr + j, mask=j < n_chunks, other=0.0)
        sum_gx += tl.load(part_gx_ptr + j, mask=j < n_chunks, other=0.0)
    tl.store(mean_g_ptr + plane, tl.sum(sum_g, axis=0) / HW)
    tl.store(mean_gx_ptr + plane, tl.sum(sum_gx, axis=0) / HW)


@triton.jit
def _bwd_apply_kernel(x_ptr, dy_ptr, dx_ptr, mu_ptr, rstd_ptr, mean_g_ptr, mean_gx_ptr, C, HW, n_chunks, CB_SHIFT, sx_n,
                      sx_c, sx_hw, sdy_n, sdy_c, sdy_hw, sdx_n, sdx_c, sdx_hw, slope, BLOCK_C: tl.constexpr,
                      BLOCK_HW: tl.constexpr, INT64: tl.constexpr):
    """Split, apply: this program's tile of dx, with its planes' mean(g) and mean(g * xhat)."""
    n, _, c, s, mask = _tile(C, HW, CB_SHIFT, BLOCK_C, BLOCK_HW, True, INT64)
    x_ptr += n * sx_n
    dy_ptr += n * sdy_n
    dx_ptr += n * sdx_n
    row = n * C + c

    mean_g = tl.load(mean_g_ptr + row, mask=c < C, other=0.0)
    mean_gx = tl.load(mean_gx_ptr + row, mask=c < C, other=0.0)
    xhat, g, rstd = _load_g_xhat(x_ptr, dy_ptr, mu_ptr, rstd_ptr, row, c, s, mask, C,
                                 sx_c, sx_hw, sdy_c, sdy_hw, slope)
    _store_dx(dx_ptr, xhat, g, rstd, mean_g, mean_gx, c, s, mask, sdx_c, sdx_hw)


# ---------------------------------------------------------------------------------------------
# Host side: layout, launch heuristics, custom ops + autograd
# ---------------------------------------------------------------------------------------------


def _plane_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_hw) if every plane t[n, c] is one strided run of H*W elements.

    Element (h, w) sits at h*stride_h + w*stride_w, which equals (h*W + w) * stride_hw when
    stride_h == W * stride_w (true for NCHW, channels_last, and expanded gradients).
    """
    _, _, H, W = t.shape
    sn, sc, sh, sw = t.stride()
    if W == 1:
        return sn, sc, sh
    if H == 1 or sh == W * sw:
        return sn, sc, sw
    return None


def _config(x: torch.Tensor, *strides: tuple[int, int, int]) -> tuple[int, dict, int, int]:
    """Chunks per plane; the tile shape, num_warps and INT64 as launch meta-parameters; the channel blocks, and
    the shift that makes room for them, rounded up to a power of two, in the split grid's axis 0. strides: x's
    plane strides first, then those of the other tensors the launches index."""
    N, C, H, W = x.shape
    HW = H * W
    _, sc, shw = strides[0]
    if sc == 1 and shw != 1:
        # channels_last: BLOCK_C neighbouring channels make one 32-byte sector per tile row.
        block_c = min(triton.next_power_of_2(C), 32 // x.element_size(), _MAX_BLOCK)
    else:
        block_c = 1
    block_hw = min(triton.next_power_of_2(HW), _MAX_BLOCK // block_c)
    num_warps = min(max(block_c * block_hw // 256, 1), 8)  # as in Triton's layer-norm tutorial
    meta = {"BLOCK_C": block_c, "BLOCK_HW": block_hw, "num_warps": num_warps}
    n_chunks, c_blocks = triton.cdiv(HW, block_hw), triton.cdiv(C, block_c)
    meta["INT64"] = _int64(N, C, HW, n_chunks, meta, *strides)
    return n_chunks, meta, c_blocks, (c_blocks - 1).bit_length()


def _slabs(N: int, C: int):
    """(samples, their planes) of each launch: grid axis 1 takes up to 65,535 samples at a time."""
    for n0 in range(0, N, _MAX_SAMPLES):
        n1 = min(N, n0 + _MAX_SAMPLES)
        yield slice(n0, n1), slice(n0 * C, n1 * C)


def _int64(N: int, C: int, HW: int, n_chunks: int, meta: dict, *strides: tuple[int, int, int]) -> bool:
    """Whether some offset or index the launches compute can pass int32: into a tensor with these
    plane strides (x, y, dy, dx: the tiles run past C, to the power-of-two count of channel blocks,
    and past HW, masked), into the partials (the combine's last block past the chunks), and the
    chunks' element counts."""
    c_end = triton.next_power_of_2(triton.cdiv(C, meta["BLOCK_C"])) * meta["BLOCK_C"]
    hw_end = n_chunks * meta["BLOCK_HW"]
    tensors = max(abs(sn) * (N - 1) + abs(sc) * (c_end - 1) + abs(shw) * (hw_end - 1) for sn, sc, shw in strides)
    partials = N * C * n_chunks + _COMBINE_BLOCK
    counts = (n_chunks + _COMBINE_BLOCK) * meta["BLOCK_HW"]
    return max(tensors, partials, counts) > 2**31 - 1


def _flat(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """t and its plane strides, copying to contiguous only for layouts the kernels can't index."""
    strides = _plane_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _plane_strides(t)
    return t, strides


def _fwd_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty y (x's layout), mu and rstd (fp32, one per plane): shared by the op and its fake."""
    N, C = x.shape[:2]
    mu = x.new_empty(N * C, dtype=torch.float32)
    return torch.empty_like(x), mu, torch.empty_like(mu)


def _forward(x: torch.Tensor, sx: tuple[int, int, int], eps: float,
             slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mu, rstd (mu and rstd fp32, one per plane) for x with plane strides sx."""
    N, C, H, W = x.shape
    y, mu, rstd = _fwd_outputs(x)
    sy = _plane_strides(y)
    if x.numel() == 0:
        return y, mu, rstd
    HW = H * W
    n_chunks, meta, c_blocks, cb_shift = _config(x, sx, sy)
    for samples, planes in _slabs(N, C):
        xs, ys, mus, rstds = x[samples], y[samples], mu[planes], rstd[planes]
        if n_chunks == 1:
            _fwd_kernel[(c_blocks, xs.shape[0])](xs, ys, mus, rstds, C, HW, *sx, *sy, eps, slope, **meta)
            continue
        grid = (n_chunks << cb_shift, xs.shape[0])
        part_mu = torch.empty(mus.numel() * n_chunks, device=x.device, dtype=torch.float32)
        part_m2 = torch.empty_like(part_mu)
        _fwd_partial_kernel[grid](xs, part_mu, part_m2, C, HW, n_chunks, cb_shift, *sx, **meta)
        _fwd_combine_kernel[(mus.numel(),)](part_mu, part_m2, mus, rstds, HW, n_chunks, eps, BLOCK_HW=meta["BLOCK_HW"],
                                            BLOCK_S=_COMBINE_BLOCK, INT64=meta["INT64"], num_warps=4)
        _fwd_apply_kernel[grid](xs, ys, mus, rstds, C, HW, n_chunks, cb_shift, *sx, *sy, slope, **meta)
    return y, mu, rstd


def _backward(x: torch.Tensor, dy: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, slope: float) -> torch.Tensor:
    """dx for x (which has plane strides) and the saved mu and rstd."""
    N, C, H, W = x.shape
    sx = _plane_strides(x)
    dy, sdy = _flat(dy)
    dx = torch.empty_like(x)
    sdx = _plane_strides(dx)
    if x.numel() == 0:
        return dx
    HW = H * W
    n_chunks, meta, c_blocks, cb_shift = _config(x, sx, sdy, sdx)
    for samples, planes in _slabs(N, C):
        xs, dys, dxs, mus, rstds = x[samples], dy[samples], dx[samples], mu[planes], rstd[planes]
        if n_chunks == 1:
            _bwd_kernel[(c_blocks, xs.shape[0])](xs, dys, dxs, mus, rstds, C, HW, *sx, *sdy, *sdx, slope, **meta)
            continue
        grid = (n_chunks << cb_shift, xs.shape[0])
        part_g = torch.empty(mus.numel() * n_chunks, device=x.device, dtype=torch.float32)
        part_gx = torch.empty_like(part_g)
        mean_g, mean_gx = torch.empty_like(mus), torch.empty_like(mus)
        _bwd_partial_kernel[grid](xs, dys, mus, rstds, part_g, part_gx, C, HW, n_chunks, cb_shift, *sx, *sdy, slope,
                                  **meta)
        _bwd_combine_kernel[(mus.numel(),)](part_g, part_gx, mean_g, mean_gx, HW, n_chunks, BLOCK_S=_COMBINE_BLOCK,
                                            INT64=meta["INT64"], num_warps=4)
        _bwd_apply_kernel[grid](xs, dys, dxs, mus, rstds, mean_g, mean_gx, C, HW, n_chunks, cb_shift, *sx, *sdy, *sdx,
                                slope, **meta)
    return dx


# The Triton path is a pair of torch.library custom ops, so that torch.compile sees each one as
# a single opaque node (no graph break): the fake impls give only output metadata (shape,
# dtype, strides), and autograd connects the forward op to the backward op. Layouts the kernels
# can't index are copied to contiguous inside each op (again in backward: an op's outputs may
# not alias its inputs, so the copy can't be handed on).


@torch.library.custom_op("minicycle::instance_norm_relu", mutates_args=())
def _instance_norm_relu(x: torch.Tensor, eps: float, slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = act(instance_norm(x)) with act(v) = v if v > 0 else slope * v, and the saved
    statistics mu, rstd (fp32, one per (n, c) plane) that the backward op needs."""
    x, sx = _flat(x)
    return _forward(x, sx, eps, slope)


@_instance_norm_relu.register_fake
def _(x: torch.Tensor, eps: float, slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_outputs(_flat(x)[0])


@torch.library.custom_op("minicycle::instance_norm_relu_backward", mutates_args=())
def _instance_norm_relu_backward(dy: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor,
                                 slope: float) -> torch.Tensor:
    """dx from dy, the forward's input x and its saved mu and rstd."""
    return _backward(_flat(x)[0], dy, mu, rstd, slope)


@_instance_norm_relu_backward.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.empty_like(_flat(x)[0])


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    """Save x (not y: xhat is needed where the activation is off) plus fp32 mu and rstd."""
    x, _, slope = inputs
    _, mu, rstd = output
    ctx.mark_non_differentiable(mu, rstd)
    # Their gradients stay None: materialized, they would be two zero-filled tensors (two kernel
    # launches) per backward call for nothing.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, mu, rstd)
    ctx.slope = slope


def _autograd_backward(ctx, dy: torch.Tensor, _dmu, _drstd) -> tuple[torch.Tensor | None, None, None]:
    x, mu, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad[0] and dy is not None
    dx = _instance_norm_relu_backward(dy, x, mu, rstd, ctx.slope) if need else None
    return dx, None, None


_instance_norm_relu.register_autograd(_autograd_backward, setup_context=_setup_context)


def instance_norm_relu(x: torch.Tensor, *, eps: float = 1e-5, negative_slope: float = 0.0,
                       activation: bool = True) -> torch.Tensor:
    """act(instance_norm(x)) for x of shape (N, C, H, W): ReLU (negative_slope=0), LeakyReLU,
    or nothing (activation=False). Same as F.instance_norm(x, eps=eps) + activation."""
    if x.dim() != 4:
        raise ValueError(f"instance_norm_relu expects (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"instance_norm_relu supports float32, float16, bfloat16; got {x.dtype}")
    if x.shape[2] * x.shape[3] == 1:
        # Same check as PyTorch: a 1x1 plane would normalize to 0 with no gradient.
        raise ValueError(f"Expected more than 1 spatial element, got input size {tuple(x.shape)}")

    if use_triton(x):
        y, _, _ = _instance_norm_relu(x, float(eps), float(negative_slope) if activation else 1.0)
        return y

    return pytorch_norm(x, eps, negative_slope, activation)
