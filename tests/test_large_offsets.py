"""Every kernel on tensors whose element offsets pass 2**31, against PyTorch on compact copies.

Triton types an int argument below 2**31, a program id and an arange as int32, so a stride of
2**30 times an index of 2 wraps unless the kernel widens its index math. The views here are small
tensors laid over one untouched torch.empty(2**31 + k) buffer (never written but where the views
lie, so it costs a few pages of RAM), with one stride of 2**30 (2**28 for a pixel stride): an
offset of 2**31 and up for little work under the interpreter. A wrapped offset segfaults there, so
each op's cases run in a process of their own. The outputs are made far too (the op's allocation patched to
hand it such a view), so stores are covered as well as loads. The host functions are called
directly (the custom ops would refuse outputs that share the buffer with their inputs).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import sys
from unittest import mock

import torch
import torch.nn.functional as F

import kernels.conv_dgrad as dgrad
import kernels.conv_wgrad as wgrad
import kernels.instance_norm as inorm
import kernels.reflect_conv as rc

layout = sys.argv[1]
torch.manual_seed(0)
BUF = torch.empty(2**31 + 2**24)  # never written but where the views below lie
GAP = 2**30
used = [0]  # the views' starts, 2**16 apart, so that no two overlap


def compact(shape):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return torch.empty(shape).contiguous(memory_format=fmt).stride()


def far(values, spread):
    """values, as a view over BUF in `layout` whose dimension `spread` has stride GAP (its last
    index at 2**31 or past) and whose other dimensions keep their compact strides."""
    strides = list(compact(values.shape))
    if spread == 3:  # 9 pixels 2**28 apart, rows after columns, so that each plane is one strided run
        strides[3], strides[2] = GAP // 4, GAP // 4 * values.shape[3]
    else:  # 3 samples or channels 2**30 apart
        strides[spread] = GAP
    used[0] += 2**16
    view = BUF.as_strided(values.shape, strides, used[0])
    view.copy_(values)
    return view


def far_like(spread):
    """An allocation patch: the op's output, of the shape it asks for, made far."""
    return lambda *args, **kwargs: far(torch.full(args_shape(args), float("nan")), spread)


def args_shape(args):
    return args[1] if isinstance(args[1], tuple) else tuple(args[0].shape)


def check(got, want, what):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= 1e-4 * max(1.0, want.abs().max().item()), f"{case} {layout} {what}: max abs error {err:.3g}"


def conv(N, C, OC, k, p, spread_x, spread_dy, out_far=False):
    x, w, b = torch.randn(N, C, 3, 3), torch.randn(OC, C, k, k), torch.randn(OC)
    dy = torch.randn(N, OC, 3 + 2 * p - k + 1, 3 + 2 * p - k + 1)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = F.conv2d(F.pad(leaves[0], (p,) * 4, mode="reflect"), leaves[1], leaves[2])
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y, leaves, dy)
    xf = far(x, spread_x) if spread_x is not None else x
    dyf = far(dy, spread_dy) if spread_dy is not None else dy
    patch = mock.patch.object(rc, "_empty_like_layout", far_like(0)) if out_far else mock.MagicMock()
    with patch:
        if case.startswith("conv_fwd"):
            check(rc._conv_fwd(xf, w, b, p), y.detach(), "y")
        if case.startswith("conv_dgrad"):
            check(dgrad._conv_dgrad(dyf, w, xf, p), dx_ref, "dx")
    if case.startswith("conv_wgrad"):
        check(wgrad._conv_wgrad(dyf, w, xf, p), dw_ref, "dw")
    if case == "conv_dbias":
        check(wgrad._conv_dbias(dyf, torch.float32), db_ref, "db")


def norm(spread, max_block):
    shape = (1, 3, 8, 8) if spread == 1 else (1, 3, 3, 3) if spread == 3 else (3, 3, 8, 8)
    x, dy = torch.randn(shape) * 2 + 1, torch.randn(shape)
    x64 = x.double().requires_grad_()
    y_ref = F.leaky_relu(F.instance_norm(x64), 0.2)
    (dx_ref,) = torch.autograd.grad(y_ref, x64, dy.double())
    xf = far(x, spread)
    empty_like = torch.empty_like

    def far_output(t, **kwargs):  # y and dx, which the op allocates like x
        return far(empty_like(t), spread) if t.data_ptr() == xf.data_ptr() else empty_like(t, **kwargs)

    with mock.patch.object(inorm, "_MAX_BLOCK", max_block), \
         mock.patch.object(inorm, "_COMBINE_BLOCK", 2, create=True), \
         mock.patch.object(torch, "empty_like", far_output):
        y, mu, rstd = inorm._forward(*inorm._flat(xf), 1e-5, 0.2)
        check(y, y_ref.detach(), "y")
        if case.startswith("in_bwd"):
            check(inorm._backward(xf, far(dy, spread), mu, rstd, 0.2), dx_ref, "dx")


CASES = {
    # conv forward: x read far (N = 3 samples 2**30 apart), or y written far; C = 3 is read by the packing kernel
    "conv_fwd": lambda: conv(3, 5, 6, 3, 1, 0, None),
    "conv_fwd_packed": lambda: conv(3, 3, 6, 3, 1, 0, None),
    "conv_fwd_out": lambda: conv(3, 5, 6, 3, 1, None, None, out_far=True),
    # dgrad: dy read far through the zero padding (and through the packing kernel for OC = 3);
    # dx written far by the GEMM's epilogue and read and written by the border fold
    "conv_dgrad": lambda: conv(3, 5, 6, 3, 1, None, 0),
    "conv_dgrad_packed": lambda: conv(3, 5, 3, 3, 1, None, 0),
    "conv_dgrad_fold": lambda: conv(3, 5, 6, 3, 2, None, None, out_far=True),
    # wgrad: x and dy read far; x's channels on the MMA rows (few output channels); packed x
    "conv_wgrad": lambda: conv(3, 5, 6, 3, 1, 0, 0),
    "conv_wgrad_small_oc": lambda: conv(3, 20, 3, 3, 1, 0, 0),
    "conv_wgrad_packed": lambda: conv(3, 3, 6, 3, 1, 0, 0),
    "conv_dbias": lambda: conv(3, 5, 6, 3, 1, None, 0),
    # InstanceNorm: channels 2**30 apart (NCHW) or pixels 2**28 apart (channels_last); samples 2**30
    # apart; one tile per plane, or planes split into chunks
    "in_fwd": lambda: norm(1 if layout == "nchw" else 3, 4096),
    "in_fwd_split": lambda: norm(1 if layout == "nchw" else 3, 4),
    "in_fwd_samples": lambda: norm(0, 16),
    "in_bwd": lambda: norm(1 if layout == "nchw" else 3, 4096),
    "in_bwd_split": lambda: norm(1 if layout == "nchw" else 3, 4),
    "in_bwd_samples": lambda: norm(0, 16),
}
for case in sys.argv[2:]:  # read by conv() and norm()
    CASES[case]()
    print("ok", case, flush=True)
'''

CASES = ["conv_fwd", "conv_fwd_packed", "conv_fwd_out", "conv_dgrad", "conv_dgrad_packed", "conv_dgrad_fold",
         "conv_wgrad", "conv_wgrad_small_oc", "conv_wgrad_packed", "conv_dbias",
         "in_fwd", "in_fwd_split", "in_fwd_samples", "in_bwd", "in_bwd_split", "in_bwd_samples"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("op", ["conv", "in"])
def test_offsets_past_int32(op, layout):
    """The op's cases one after another in one process (a wrap segfaults it: the last 'ok' names the case
    before the one that crashed)."""
    cases = [c for c in CASES if c.startswith(op)]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, layout, *cases], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0 and run.stdout.split() == [w for c in cases for w in ("ok", c)], \
        f"exit {run.returncode}: {run.stdout[-2000:]}{run.stderr[-3000:]}"


def _extent(t) -> int:
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def test_int64_only_where_an_offset_passes_int32():
    """The generator's layers, every kernel launch recorded (not run) on meta tensors: the 32-bit index
    math wherever every offset fits, so at 256 x 256 and for one 12-MP photo; int64 in every launch
    with an operand that reaches 2**31, as for two 24-MP photos at once."""
    import torch

    from kernels.tools.compile_report import LAYERS, LAYOUTS, layer_launches

    for layout in LAYOUTS.values():
        for layer in LAYERS:
            for size, batch in (((256, 256), 4), ((3000, 4000), 1)):
                launches = layer_launches(layer, batch, torch.float32, layout, size=size)
                assert not [(p, launch.name) for p, launch in launches if launch.kwargs["INT64"]], (layer, size)
            wide = 0
            for p, launch in layer_launches(layer, 2, torch.float32, layout, size=(4000, 6000)):
                if any(_extent(a) > 2**31 - 1 for a in launch.args if isinstance(a, torch.Tensor)):
                    assert launch.kwargs["INT64"], (layer, p, launch.name)
                    wide += 1
            # The full-size layers hold 2 x 64 x 24e6 = 3.07e9 elements; the others 1.5e9 or fewer.
            assert bool(wide) == (layer in ("stem7x7", "head7x7", "in256")), layer
