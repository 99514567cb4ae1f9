"""kernels.instance_norm_relu against F.instance_norm + activation computed in fp64.

Runs the Triton kernels through the interpreter (conftest sets TRITON_INTERPRET=1). Planes are
kept small, and `_MAX_BLOCK` is lowered so that small planes also take the split (multi-chunk)
path, with planes larger than a block and sizes that are not multiples of it.
"""

import os
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from triton.runtime.interpreter import InterpreterBuilder

import kernels.instance_norm as inorm
from kernels import instance_norm_relu

# Tolerances per dtype. "fwd": (rtol, atol) on y. "bwd": (rtol, atol) on dx / (rstd * max|dy|),
# i.e. relative to the gradient's natural scale, so large and tiny rstd are judged alike.
# fp32 computes in fp32 from exact inputs; fp16 adds one output rounding (2^-11 relative);
# bf16 adds one output rounding that the interpreter does not do round-to-nearest-even
# (kernels.md section 3), so up to 1 ulp = 2^-7 relative.
TOL = {
    torch.float32: {"fwd": (1e-5, 1e-5), "bwd": (1e-5, 1e-5)},
    torch.float16: {"fwd": (2e-3, 2e-3), "bwd": (2e-3, 2e-3)},
    torch.bfloat16: {"fwd": (1.6e-2, 1.6e-2), "bwd": (1.6e-2, 1.6e-2)},
}

KERNELS = [
    "_fwd_kernel",
    "_fwd_partial_kernel",
    "_fwd_combine_kernel",
    "_fwd_apply_kernel",
    "_bwd_kernel",
    "_bwd_partial_kernel",
    "_bwd_combine_kernel",
    "_bwd_apply_kernel",
]

# Real GPU runs: CUDA and the compiled kernels (TRITON_INTERPRET=0 set by the user; conftest
# defaults it to 1, which would run even CUDA tensors through the interpreter).
GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"

# (activation, negative_slope): ReLU, LeakyReLU(0.2), none.
ACTIVATIONS = [(True, 0.0), (True, 0.2), (False, 0.0)]


def reference(x, eps, slope, activation):
    """F.instance_norm + activation in fp64; also xhat, and rstd per plane (N, C, 1, 1).

    Contiguous in, and the caller passes a contiguous dy: torch 2.13's CPU instance_norm backward
    is wrong when x and dy differ in memory format and H or W is 1.
    """
    x64 = x.detach().double().contiguous().requires_grad_(True)
    y = F.instance_norm(x64, eps=eps)
    if activation:
        y = F.leaky_relu(y, slope)
    var, mean = torch.var_mean(x64.detach(), dim=(2, 3), correction=0, keepdim=True)
    rstd = (var + eps).rsqrt()
    return x64, y, (x64.detach() - mean) * rstd, rstd


def layout(t, kind):
    """t (N, C, H, W) in memory layout `kind`, same values."""
    if kind == "nchw":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "transposed":  # H and W swapped in memory: not a flat plane, copied by the op
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "expanded":  # one value broadcast over each plane (stride 0), like sum().backward()
        return t[:, :, :1, :1].expand(t.shape)
    raise ValueError(kind)


def check_against_reference(x, dy, eps, slope, activation):
    """Forward and autograd backward of instance_norm_relu vs the fp64 reference."""
    x = x.detach().requires_grad_(True)
    y = instance_norm_relu(x, eps=eps, negative_slope=slope, activation=activation)
    y.backward(dy)

    x64, y64, xhat, rstd = reference(x, eps, slope, activation)
    y64.backward(dy.double().contiguous())

    rtol, atol = TOL[x.dtype]["fwd"]
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y64.detach(), rtol=rtol, atol=atol)
    if activation and (xhat.abs() < 1e-6).any():
        # An element sits on the activation's kink (e.g. a constant plane of quantized fp16),
        # where the derivative is a convention; test_constant_plane_gives_zeros covers ours.
        return y, x.grad
    rtol, atol = TOL[x.dtype]["bwd"]
    scale = rstd * dy.abs().max().double().clamp_min(1e-30)
    assert x.grad.dtype == x.dtype
    torch.testing.assert_close(x.grad.double() / scale, x64.grad / scale, rtol=rtol, atol=atol)
    return y, x.grad


@st.composite
def problems(draw, dtype):
    """Small random problems: shape, layouts, eps, activation, value scale/offset, block knob."""
    N = draw(st.integers(1, 2))
    C = draw(st.integers(1, 3))
    H = draw(st.integers(1, 8))
    W = draw(st.integers(2 if H == 1 else 1, 8))  # H*W == 1 is an error, tested separately
    scale, offset = draw(st.sampled_from([(1.0, 0.0), (1e-1, 1e3), (10.0, -5.0), (1e-3, 0.0)]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = (torch.randn(N, C, H, W, generator=gen) * scale + offset).to(dtype)
    dy = torch.randn(N, C, H, W, generator=gen).to(dtype)
    return {
        "x": layout(x, draw(st.sampled_from(["nchw", "channels_last", "transposed"]))),
        "dy": layout(dy, draw(st.sampled_from(["nchw", "channels_last", "expanded"]))),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.5])),
        "act": draw(st.sampled_from(ACTIVATIONS)),
        # 4096: one tile per plane. 8, 16: planes split into chunks (often with a ragged tail).
        "max_block": draw(st.sampled_from([4096, 16, 8])),
    }


def run_problem(p):
    activation, slope = p["act"]
    with mock.patch.object(inorm, "_MAX_BLOCK", p["max_block"]):
        y, _ = check_against_reference(p["x"], p["dy"], p["eps"], slope, activation)
    if p["x"].is_contiguous() or p["x"].is_contiguous(memory_format=torch.channels_last):
        assert y.stride() == p["x"].stride()  # same memory format as the input


@pytest.mark.property
@given(p=problems(torch.float32))
def test_fp32_matches_reference(p):
    run_problem(p)


@pytest.mark.property
@given(p=problems(torch.float16))
def test_fp16_matches_reference(p):
    run_problem(p)


@pytest.mark.slow
@pytest.mark.parametrize("max_block", [4096, 8])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_bf16_matches_reference(max_block, kind):
    # The kernels do no bf16 arithmetic (load, compute in fp32, store), which the interpreter
    # handles; only the final fp32 -> bf16 rounding differs (see TOL).
    gen = torch.Generator().manual_seed(0)
    x = layout((torch.randn(2, 3, 5, 6, generator=gen) * 3 + 1).bfloat16(), kind)
    dy = torch.randn(2, 3, 5, 6, generator=gen).bfloat16()
    with mock.patch.object(inorm, "_MAX_BLOCK", max_block):
        check_against_reference(x, dy, 1e-5, 0.2, True)


@pytest.fixture(autouse=True)
def launches(monkeypatch):
    """Record every kernel launch ({kernel name: [args of each launch]}), and check that each
    load and store the interpreter performs for it stays inside one of its tensor arguments.

    Interpreter pointers are real host addresses (CPU tensors are not copied), so an access
    outside every argument's storage is a read or write a GPU would fault on.
    """
    record = {name: [] for name in KERNELS}
    storages = []  # [lo, hi) byte ranges of the running launch's tensor arguments

    def check(ptrs, mask):
        addrs = np.broadcast_to(ptrs.data, mask.data.shape)[mask.data]
        inside = np.zeros(addrs.shape, dtype=bool)
        for lo, hi in storages:
            inside |= (addrs >= lo) & (addrs < hi)
        assert inside.all(), "kernel accessed memory outside its tensor arguments"

    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def checked_load(self, ptrs, mask, *rest, **kwargs):
        check(ptrs, mask)
        return load(self, ptrs, mask, *rest, **kwargs)

    def checked_store(self, ptrs, value, mask, *rest, **kwargs):
        check(ptrs, mask)
        return store(self, ptrs, value, mask, *rest, **kwargs)

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                record[self.name].append(args)
                tensors = [a.untyped_storage() for a in args if isinstance(a, torch.Tensor)]
                storages[:] = [(t.data_ptr(), t.data_ptr() + t.nbytes()) for t in tensors]
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", checked_load)
    monkeypatch.setattr(InterpreterBuilder, "create_masked_store", checked_store)
    for name in KERNELS:
        monkeypatch.setattr(inorm, name, Spy(name, getattr(inorm, name)))
    return record


def counts(record):
    return {name: len(args) for name, args in record.items()}


@pytest.mark.slow
def test_triton_path_runs(launches, monkeypatch):
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    instance_norm_relu(x).sum().backward()
    assert counts(launches) == dict.fromkeys(KERNELS, 0) | {"_fwd_kernel": 1, "_bwd_kernel": 1}

    monkeypatch.setattr(inorm, "_MAX_BLOCK", 8)
    for args in launches.values():
        args.clear()
    instance_norm_relu(x).sum().backward()
    expected = dict.fromkeys(KERNELS, 1) | {"_fwd_kernel": 0, "_bwd_kernel": 0}
    assert counts(launches) == expected


def test_interpret_off_takes_pytorch_path(torch_path, launches):
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = instance_norm_relu(x, negative_slope=0.2)
    y.sum().backward()
    assert counts(launches) == dict.fromkeys(KERNELS, 0)
    torch.testing.assert_close(y, F.leaky_relu(F.instance_norm(x, eps=1e-5), 0.2))


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("x_kind", ["nchw", "channels_last"])
def test_pytorch_path_backward_with_a_channels_last_gradient_at_batch_1(torch_path, x_kind, act):
    """torch 2.13's own CPU instance_norm backward is wrong at batch 1 when dy is channels_last (as the
    residual add of a channels_last ResNet block hands it); the op's PyTorch path must still be right."""
    activation, slope = act
    torch.manual_seed(0)
    x = layout(torch.randn(1, 6, 5, 7), x_kind).requires_grad_(True)
    dy = torch.randn(1, 6, 5, 7)
    y = instance_norm_relu(x, negative_slope=slope, activation=activation)
    y.backward(dy.contiguous(memory_format=torch.channels_last))
    x64, y64, _, _ = reference(x, 1e-5, slope, activation)
    y64.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("max_block", [4096, 8])
def test_channels_last_is_not_copied(launches, monkeypatch, max_block):
    monkeypatch.setattr(inorm, "_MAX_BLOCK", max_block)
    x = torch.randn(2, 5, 4, 6).to(memory_format=torch.channels_last).requires_grad_(True)
    dy = torch.randn(2, 5, 4, 6).to(memory_format=torch.channels_last)
    y = instance_norm_relu(x)
    y.backward(dy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    # Every launch that reads x got x's own storage (args[0] is x in every kernel but the combines,
    # which read only the partials), not a contiguous copy.
    reads_x = [args for name, records in launches.items() if "combine" not in name for args in records]
    assert len(reads_x) == (2 if max_block == 4096 else 4)
    assert all(args[0].data_ptr() == x.data_ptr() for args in reads_x)


@pytest.mark.slow
@pytest.mark.parametrize("max_block", [4096, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_is_deterministic(max_block, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 5, generator=gen).to(dtype)
    dy = torch.randn(2, 3, 7, 5, generator=gen).to(dtype)
    grads = []
    with mock.patch.object(inorm, "_MAX_BLOCK", max_block):
        for _ in range(2):
            xi = x.clone().requires_grad_(True)
            instance_norm_relu(xi, negative_slope=0.2).backward(dy)
            grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])


def test_split_and_single_paths_agree():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 7, generator=gen) * 0.1 + 1e3
    dy = torch.randn(2, 3, 9, 7, generator=gen)
    out = []
    for max_block in [4096, 16]:
        with mock.patch.object(inorm, "_MAX_BLOCK", max_block):
            xi = x.clone().requires_grad_(True)
            y = instance_norm_relu(xi, negative_slope=0.2)
            y.backward(dy)
            out.append((y, xi.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-4)


def ramp(shape, kind):
    """Planes whose chunks differ: a ramp along H*W (mean far from 0) plus noise, so the chunks'
    means spread and merging them in the wrong proportions shows."""
    gen = torch.Generator().manual_seed(4)
    N, C, H, W = shape
    x = torch.linspace(0, 50, H * W).view(1, 1, H, W) + torch.randn(shape, generator=gen) + 1e2
    return layout(x, kind), torch.randn(shape, generator=gen)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_many_chunks_merged_per_plane(kind, launches, monkeypatch):
    """Planes of 143 elements in tiles of 16 (9 chunks, NCHW) or 4 (36 chunks, 4 channels side by side),
    merged 4 partials at a time: the combine loops over blocks with a ragged last one."""
    monkeypatch.setattr(inorm, "_MAX_BLOCK", 16)
    monkeypatch.setattr(inorm, "_COMBINE_BLOCK", 4)
    x, dy = ramp((2, 3, 13, 11), kind)
    check_against_reference(x, dy, 1e-5, 0.2, True)
    assert counts(launches) == dict.fromkeys(KERNELS, 1) | {"_fwd_kernel": 0, "_bwd_kernel": 0}


@pytest.mark.parametrize("max_block", [4096, 8])
def test_batch_in_slabs(max_block, launches, monkeypatch):
    """More samples than a launch's grid axis takes (65,535; lowered to 2 here): slabs of 2, 2, 1."""
    monkeypatch.setattr(inorm, "_MAX_SAMPLES", 2)
    monkeypatch.setattr(inorm, "_MAX_BLOCK", max_block)
    x, dy = ramp((5, 3, 4, 5), "channels_last")
    check_against_reference(x, dy, 1e-5, 0.2, True)
    assert counts(launches)["_fwd_kernel" if max_block == 4096 else "_fwd_apply_kernel"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_large_plane_with_real_tiles(kind):
    """A 600 x 1000 plane with the real tile sizes and combine block: 147 chunks of 4096 (NCHW) or
    1,172 chunks of 8 channels x 512 pixels (channels_last, two combine blocks)."""
    x, dy = ramp((1, 8, 600, 1000), kind)
    check_against_reference(x, dy, 1e-5, 0.2, True)


@pytest.mark.parametrize("max_block", [4096, 8])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_int64_index_math(kind, max_block, monkeypatch):
    """The kernels with INT64 forced on (as a launch whose offsets pass int32 runs them) agree with
    the reference, and (the autouse fixture) stay inside their tensors."""
    monkeypatch.setattr(inorm, "_int64", lambda *args: True)
    monkeypatch.setattr(inorm, "_MAX_BLOCK", max_block)
    monkeypatch.setattr(inorm, "_COMBINE_BLOCK", 4)
    x, dy = ramp((2, 3, 5, 7), kind)
    check_against_reference(x, dy, 1e-5, 0.2, True)


@pytest.mark.slow
@pytest.mark.parametrize("max_block", [4096, 8])
@pytest.mark.parametrize("value", [0.0, 3.0, 1e3 + 0.1])
def test_constant_plane_gives_zeros(max_block, value):
    x = torch.full((2, 3, 5, 5), value)
    x[1, 2] = torch.randn(5, 5)  # one ordinary plane next to the constant ones
    x.requires_grad_(True)
    with mock.patch.object(inorm, "_MAX_BLOCK", max_block):
        y = instance_norm_relu(x, negative_slope=0.2)
        y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert (y[:1] == 0).all() and (y[1, :2] == 0).all()
    # ReLU kills the gradient at xhat == 0 (PyTorch's convention); LeakyReLU scales it.
    x.grad = None
    with mock.patch.object(inorm, "_MAX_BLOCK", max_block):
        instance_norm_relu(x).sum().backward()
    assert (x.grad[:1] == 0).all()


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_single_spatial_element_raises(path, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        instance_norm_relu(torch.randn(2, 3, 1, 1))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_empty_input(shape, launches):
    x = torch.randn(shape, requires_grad=True)
    y = instance_norm_relu(x)
    y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape
    assert counts(launches) == dict.fromkeys(KERNELS, 0)


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        instance_norm_relu(torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match="float32"):
        instance_norm_relu(torch.ones(1, 2, 3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="float32"):
        instance_norm_relu(torch.randn(1, 2, 3, 3, dtype=torch.float64))


def test_no_grad_and_keyword_defaults():
    x = torch.randn(1, 2, 3, 4)
    with torch.no_grad():
        y = instance_norm_relu(x)
    torch.testing.assert_close(y, F.relu(F.instance_norm(x)), rtol=1e-5, atol=1e-5)
    y = instance_norm_relu(x, eps=0.1, activation=False)
    torch.testing.assert_close(y, F.instance_norm(x, eps=0.1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not GPU, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 8, 64, 64), (1, 4, 256, 256), (2, 3, 33, 17)])
def test_cuda_matches_reference(shape, kind, dtype):
    gen = torch.Generator().manual_seed(3)
    x = layout((torch.randn(shape, generator=gen) * 2 + 3).to(dtype), kind).cuda()
    dy = layout(torch.randn(shape, generator=gen).to(dtype), kind).cuda()
    check_against_reference(x, dy, 1e-5, 0.2, True)
