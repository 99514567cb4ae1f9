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

Grid. If a plane fits one tile, one program per (n, channel block) reads x once and writes y.
Otherwise each plane is split into S = cdiv(HW, BLOCK_HW) chunks, one program per chunk:
stage 1 writes per-chunk partials, stage 2 merges them (Chan et al.) and applies. Backward is
split the same way, with deterministic sums (no atomics, fixed reduction order).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.runtime import use_triton

# Largest tile (elements) one program holds in registers; larger planes take the split path.
# Tests lower it to run the split path on small tensors.
_MAX_BLOCK = 4096

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile(pid_c, pid_s, C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Channel indices, spatial indices and mask of tile (pid_c, pid_s) of one sample."""
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s = pid_s * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (c < C)[:, None] & (s < HW)[None, :]
    return c, s, mask


@triton.jit
def _load_shifted(x_ptr, c, s, mask, C, stride_c, stride_hw):
    """x - k for a tile (0 outside the mask), k = x[n, c, 0, 0] per channel."""
    k = tl.load(x_ptr + c * stride_c, mask=c < C, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + c[:, None] * stride_c + s[None, :] * stride_hw, mask=mask, other=0.0)
    return tl.where(mask, x.to(tl.float32) - k[:, None], 0.0)


@triton.jit
def _load_partials(part_ptr, row, c, C, n_chunks, S_BLOCK: tl.constexpr):
    """[BLOCK_C, S_BLOCK] tile of per-chunk partials (laid out [N*C, n_chunks]), 0 if masked."""
    j = tl.arange(0, S_BLOCK)
    mask = (c < C)[:, None] & (j < n_chunks)[None, :]
    return tl.load(part_ptr + row[:, None] * n_chunks + j[None, :], mask=mask, other=0.0)


@triton.jit
def _chan_merge(part_mu_ptr, part_m2_ptr, row, c, C, HW, n_chunks, BLOCK_HW,
                S_BLOCK: tl.constexpr):
    """Merge per-chunk (count, mu, M2) of the planes in `row` into each plane's (mu, var).

    mu = sum(n_j mu_j) / HW,  M2 = sum(M2_j) + sum(n_j (mu_j - mu)^2)  (Chan et al.)
    """
    mu_j = _load_partials(part_mu_ptr, row, c, C, n_chunks, S_BLOCK)
    m2_j = _load_partials(part_m2_ptr, row, c, C, n_chunks, S_BLOCK)
    j = tl.arange(0, S_BLOCK)
    # Chunk j holds min(BLOCK_HW, HW - j * BLOCK_HW) elements (0 past the last chunk).
    cnt = tl.minimum(BLOCK_HW, tl.maximum(HW - j * BLOCK_HW, 0)).to(tl.float32)[None, :]
    mu = tl.sum(cnt * mu_j, axis=1) / HW
    dmu = mu_j - mu[:, None]
    var = (tl.sum(m2_j, axis=1) + tl.sum(cnt * dmu * dmu, axis=1)) / HW
    return mu, var


@triton.jit
def _normalize_store(y_ptr, xs, mu, rstd, c, s, mask, stride_c, stride_hw, slope):
    """y = act((x - k - mu) * rstd), stored in y's dtype."""
    xhat = (xs - mu[:, None]) * rstd[:, None]
    y = tl.where(xhat > 0, xhat, xhat * slope)
    y_ptrs = y_ptr + c[:, None] * stride_c + s[None, :] * stride_hw
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(
    x_ptr, y_ptr, mu_ptr, rstd_ptr,
    C, HW,
    sx_n, sx_c, sx_hw, sy_n, sy_c, sy_hw,
    eps, slope,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Whole planes in one tile. Grid (N, cdiv(C, BLOCK_C))."""
    pid_n = tl.program_id(0).to(tl.int64)
    x_ptr += pid_n * sx_n
    y_ptr += pid_n * sy_n
    c, s, mask = _tile(tl.program_id(1), 0, C, HW, BLOCK_C, BLOCK_HW)

    # Two passes over the tile in registers: mu = mean(x - k), var = mean((x - k - mu)^2).
    xs = _load_shifted(x_ptr, c, s, mask, C, sx_c, sx_hw)
    mu = tl.sum(xs, axis=1) / HW
    d = tl.where(mask, xs - mu[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / HW + eps)

    _normalize_store(y_ptr, xs, mu, rstd, c, s, mask, sy_c, sy_hw, slope)
    row = pid_n * C + c
    tl.store(mu_ptr + row, mu, mask=c < C)
    tl.store(rstd_ptr + row, rstd, mask=c < C)


@triton.jit
def _fwd_partial_kernel(
    x_ptr, part_mu_ptr, part_m2_ptr,
    C, HW, n_chunks,
    sx_n, sx_c, sx_hw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Split stage 1: each chunk's mean mu_j = mean(x - k) and M2_j = sum((x - k - mu_j)^2).

    Grid (N, cdiv(C, BLOCK_C), n_chunks); partials are laid out [N*C, n_chunks].
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(2)
    x_ptr += pid_n * sx_n
    c, s, mask = _tile(tl.program_id(1), pid_s, C, HW, BLOCK_C, BLOCK_HW)

    xs = _load_shifted(x_ptr, c, s, mask, C, sx_c, sx_hw)
    count = tl.minimum(HW - pid_s * BLOCK_HW, BLOCK_HW).to(tl.float32)
    mu = tl.sum(xs, axis=1) / count
    d = tl.where(mask, xs - mu[:, None], 0.0)
    m2 = tl.sum(d * d, axis=1)

    idx = (pid_n * C + c) * n_chunks + pid_s
    tl.store(part_mu_ptr + idx, mu, mask=c < C)
    tl.store(part_m2_ptr + idx, m2, mask=c < C)


@triton.jit
def _fwd_apply_kernel(
    x_ptr, y_ptr, mu_ptr, rstd_ptr, part_mu_ptr, part_m2_ptr,
    C, HW, n_chunks,
    sx_n, sx_c, sx_hw, sy_n, sy_c, sy_hw,
    eps, slope,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, S_BLOCK: tl.constexpr,
):
    """Split stage 2: merge the partials, then normalize + activate this program's chunk.

    Every chunk's program redoes the (small) merge; chunk 0 also saves mu and rstd.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(2)
    x_ptr += pid_n * sx_n
    y_ptr += pid_n * sy_n
    c, s, mask = _tile(tl.program_id(1), pid_s, C, HW, BLOCK_C, BLOCK_HW)
    row = pid_n * C + c

    mu, var = _chan_merge(part_mu_ptr, part_m2_ptr, row, c, C, HW, n_chunks, BLOCK_HW, S_BLOCK)
    rstd = 1.0 / tl.sqrt(var + eps)

    xs = _load_shifted(x_ptr, c, s, mask, C, sx_c, sx_hw)
    _normalize_store(y_ptr, xs, mu, rstd, c, s, mask, sy_c, sy_hw, slope)
    if pid_s == 0:
        tl.store(mu_ptr + row, mu, mask=c < C)
        tl.store(rstd_ptr + row, rstd, mask=c < C)


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
def _bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, mu_ptr, rstd_ptr,
    C, HW,
    sx_n, sx_c, sx_hw, sdy_n, sdy_c, sdy_hw, sdx_n, sdx_c, sdx_hw,
    slope,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Whole planes in one tile. Grid (N, cdiv(C, BLOCK_C))."""
    pid_n = tl.program_id(0).to(tl.int64)
    x_ptr += pid_n * sx_n
    dy_ptr += pid_n * sdy_n
    dx_ptr += pid_n * sdx_n
    c, s, mask = _tile(tl.program_id(1), 0, C, HW, BLOCK_C, BLOCK_HW)
    row = pid_n * C + c

    xhat, g, rstd = _load_g_xhat(x_ptr, dy_ptr, mu_ptr, rstd_ptr, row, c, s, mask, C,
                                 sx_c, sx_hw, sdy_c, sdy_hw, slope)
    mean_g = tl.sum(g, axis=1) / HW
    mean_gx = tl.sum(g * xhat, axis=1) / HW
    _store_dx(dx_ptr, xhat, g, rstd, mean_g, mean_gx, c, s, mask, sdx_c, sdx_hw)


@triton.jit
def _bwd_partial_kernel(
    x_ptr, dy_ptr, mu_ptr, rstd_ptr, part_g_ptr, part_gx_ptr,
    C, HW, n_chunks,
    sx_n, sx_c, sx_hw, sdy_n, sdy_c, sdy_hw,
    slope,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Split stage 1: each chunk's sum(g) and sum(g * xhat). Grid as _fwd_partial_kernel."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(2)
    x_ptr += pid_n * sx_n
    dy_ptr += pid_n * sdy_n
    c, s, mask = _tile(tl.program_id(1), pid_s, C, HW, BLOCK_C, BLOCK_HW)
    row = pid_n * C + c

    xhat, g, _ = _load_g_xhat(x_ptr, dy_ptr, mu_ptr, rstd_ptr, row, c, s, mask, C,
                              sx_c, sx_hw, sdy_c, sdy_hw, slope)
    idx = row * n_chunks + pid_s
    tl.store(part_g_ptr + idx, tl.sum(g, axis=1), mask=c < C)
    tl.store(part_gx_ptr + idx, tl.sum(g * xhat, axis=1), mask=c < C)


@triton.jit
def _bwd_apply_kernel(
    x_ptr, dy_ptr, dx_ptr, mu_ptr, rstd_ptr, part_g_ptr, part_gx_ptr,
    C, HW, n_chunks,
    sx_n, sx_c, sx_hw, sdy_n, sdy_c, sdy_hw, sdx_n, sdx_c, sdx_hw,
    slope,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, S_BLOCK: tl.constexpr,
):
    """Split stage 2: sum the chunk partials in a fixed order, then write this chunk's dx."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(2)
    x_ptr += pid_n * sx_n
    dy_ptr += pid_n * sdy_n
    dx_ptr += pid_n * sdx_n
    c, s, mask = _tile(tl.program_id(1), pid_s, C, HW, BLOCK_C, BLOCK_HW)
    row = pid_n * C + c

    mean_g = tl.sum(_load_partials(part_g_ptr, row, c, C, n_chunks, S_BLOCK), axis=1) / HW
    mean_gx = tl.sum(_load_partials(part_gx_ptr, row, c, C, n_chunks, S_BLOCK), axis=1) / HW

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


def _config(x: torch.Tensor, strides: tuple[int, int, int]) -> tuple[int, dict]:
    """Chunks per plane, and the tile shape and num_warps as launch meta-parameters."""
    _, C, H, W = x.shape
    HW = H * W
    _, sc, shw = strides
    if sc == 1 and shw != 1:
        # channels_last: BLOCK_C neighbouring channels make one 32-byte sector per tile row.
        block_c = min(triton.next_power_of_2(C), 32 // x.element_size(), _MAX_BLOCK)
    else:
        block_c = 1
    block_hw = min(triton.next_power_of_2(HW), _MAX_BLOCK // block_c)
    num_warps = min(max(block_c * block_hw // 256, 1), 8)  # as in Triton's layer-norm tutorial
    meta = {"BLOCK_C": block_c, "BLOCK_HW": block_hw, "num_warps": num_warps}
    return triton.cdiv(HW, block_hw), meta


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


def _forward(
    x: torch.Tensor, sx: tuple[int, int, int], eps: float, slope: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mu, rstd (mu and rstd fp32, one per plane) for x with plane strides sx."""
    N, C, H, W = x.shape
    y, mu, rstd = _fwd_outputs(x)
    sy = _plane_strides(y)
    if x.numel() == 0:
        return y, mu, rstd
    n_chunks, meta = _config(x, sx)
    HW, c_blocks = H * W, triton.cdiv(C, meta["BLOCK_C"])
    if n_chunks == 1:
        _fwd_kernel[(N, c_blocks)](x, y, mu, rstd, C, HW, *sx, *sy, eps, slope, **meta)
    else:
        part_mu = torch.empty(N * C * n_chunks, device=x.device, dtype=torch.float32)
        part_m2 = torch.empty_like(part_mu)
        grid = (N, c_blocks, n_chunks)
        _fwd_partial_kernel[grid](x, part_mu, part_m2, C, HW, n_chunks, *sx, **meta)
        _fwd_apply_kernel[grid](
            x, y, mu, rstd, part_mu, part_m2, C, HW, n_chunks, *sx, *sy, eps, slope,
            S_BLOCK=triton.next_power_of_2(n_chunks), **meta,
        )
    return y, mu, rstd


def _backward(
    x: torch.Tensor, dy: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, slope: float
) -> torch.Tensor:
    """dx for x (which has plane strides) and the saved mu and rstd."""
    N, C, H, W = x.shape
    sx = _plane_strides(x)
    dy, sdy = _flat(dy)
    dx = torch.empty_like(x)
    sdx = _plane_strides(dx)
    if x.numel() == 0:
        return dx
    n_chunks, meta = _config(x, sx)
    HW, c_blocks = H * W, triton.cdiv(C, meta["BLOCK_C"])
    if n_chunks == 1:
        _bwd_kernel[(N, c_blocks)](x, dy, dx, mu, rstd, C, HW, *sx, *sdy, *sdx, slope, **meta)
    else:
        part_g = torch.empty(N * C * n_chunks, device=x.device, dtype=torch.float32)
        part_gx = torch.empty_like(part_g)
        grid = (N, c_blocks, n_chunks)
        _bwd_partial_kernel[grid](
            x, dy, mu, rstd, part_g, part_gx, C, HW, n_chunks, *sx, *sdy, slope, **meta
        )
        _bwd_apply_kernel[grid](
            x, dy, dx, mu, rstd, part_g, part_gx, C, HW, n_chunks, *sx, *sdy, *sdx, slope,
            S_BLOCK=triton.next_power_of_2(n_chunks), **meta,
        )
    return dx


# The Triton path is a pair of torch.library custom ops, so that torch.compile sees each one as
# a single opaque node (no graph break): the fake impls give only output metadata (shape,
# dtype, strides), and autograd connects the forward op to the backward op. Layouts the kernels
# can't index are copied to contiguous inside each op (again in backward: an op's outputs may
# not alias its inputs, so the copy can't be handed on).


@torch.library.custom_op("minicycle::instance_norm_act", mutates_args=())
def _instance_norm_act(
    x: torch.Tensor, eps: float, slope: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = act(instance_norm(x)) with act(v) = v if v > 0 else slope * v, and the saved
    statistics mu, rstd (fp32, one per (n, c) plane) that the backward op needs."""
    x, sx = _flat(x)
    return _forward(x, sx, eps, slope)


@_instance_norm_act.register_fake
def _(x: torch.Tensor, eps: float, slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_outputs(_flat(x)[0])


@torch.library.custom_op("minicycle::instance_norm_act_backward", mutates_args=())
def _instance_norm_act_backward(
    dy: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, slope: float
) -> torch.Tensor:
    """dx from dy, the forward's input x and its saved mu and rstd."""
    return _backward(_flat(x)[0], dy, mu, rstd, slope)


@_instance_norm_act_backward.register_fake
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
    dx = _instance_norm_act_backward(dy, x, mu, rstd, ctx.slope) if need else None
    return dx, None, None


_instance_norm_act.register_autograd(_autograd_backward, setup_context=_setup_context)


def instance_norm_relu(
    x: torch.Tensor, *, eps: float = 1e-5, negative_slope: float = 0.0, activation: bool = True
) -> torch.Tensor:
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
        y, _, _ = _instance_norm_act(x, float(eps), float(negative_slope) if activation else 1.0)
        return y

    y = F.instance_norm(x, eps=eps)
    if y.requires_grad:
        # torch 2.13's CPU instance_norm backward is wrong when the incoming gradient is channels_last
        # (seen at batch 1, as a channels_last model's next conv hands it): give it a contiguous one.
        y.register_hook(torch.Tensor.contiguous)
    if activation:
        y = F.leaky_relu(y, negative_slope) if negative_slope else F.relu(y)
    return y
