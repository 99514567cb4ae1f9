"""kernels.reflect_conv2d against F.conv2d(F.pad(x, (p,) * 4, mode="reflect"), w, b) in fp64.

On this CPU-only CI the Triton kernels run under TRITON_INTERPRET=1 (set by conftest), so the
shapes are small. With a GPU and TRITON_INTERPRET=0 the same tests run on CUDA tensors.
"""

import os

import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import example, given
from hypothesis import strategies as st

import kernels
from kernels import conv_dgrad, conv_wgrad
from kernels import reflect_conv as rc

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
TRITON_RUNS = DEVICE == "cuda" or INTERPRET

# Max abs error allowed, relative to max(1, max |reference|). fp32 runs with TF32 off (see the
# autouse fixture); fp16/bf16 round the output (and bf16's interpreter cast is not RNE: 1 ulp).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
KERNELS = {"_conv_kernel": rc, "_pack_kernel": rc, "_dgrad_kernel": conv_dgrad, "_fold_kernel": conv_dgrad,
           "_wgrad_kernel": conv_wgrad, "_dbias_kernel": conv_wgrad, "_sum_splits_kernel": conv_wgrad}


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    """Tight fp32 checks: no TF32 in the kernels (nor in the reference, should it run on GPU)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _inputs(N, C, OC, H, W, k, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g).to(DEVICE, dtype)
    w = torch.randn(OC, C, k, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(OC, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


def _reference(x, w, b, p, dy):
    """Output and grads of the PyTorch composition, in fp64 on the CPU."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    xr, wr = leaves[:2]
    y = F.conv2d(F.pad(xr, (p,) * 4, mode="reflect"), wr, leaves[2] if b is not None else None)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy.detach().cpu().double()))


def _run(x, w, b, p, dy=None):
    """Output and grads of kernels.reflect_conv2d (dy defaults to a fixed random tensor)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = kernels.reflect_conv2d(leaves[0], leaves[1], leaves[2] if b is not None else None, padding=p)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy)), dy


def _assert_close(got, ref, dtype, what):
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (got.detach().cpu().double() - ref).abs().max().item() if ref.numel() else 0.0
    assert got.dtype == dtype, what
    assert err <= TOL[dtype] * scale, f"{what}: max abs error {err:.3g} > {TOL[dtype]} x {scale:.3g}"


def _check(N, C, OC, H, W, k, p, bias, dtype):
    x, w, b = _inputs(N, C, OC, H, W, k, bias, dtype)
    got, dy = _run(x, w, b, p)
    ref = _reference(x, w, b, p, dy)
    for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
        _assert_close(g, r, dtype, f"{name} for {(N, C, OC, H, W)} k={k} p={p} {dtype}")


@st.composite
def conv_cases(draw):
    k = draw(st.sampled_from([1, 3, 5, 7]))
    H = draw(st.integers(2, 9))
    W = draw(st.integers(2, 9))
    p = draw(st.integers(0, min(H, W) - 1))
    # the kernel must fit the padded input
    H, W = max(H, k - 2 * p), max(W, k - 2 * p)
    N = draw(st.integers(1, 2))
    C = draw(st.integers(1, 6))
    OC = draw(st.integers(1, 6))
    return N, C, OC, H, W, k, p, draw(st.booleans())


@pytest.mark.property
@needs_triton
@given(conv_cases())
@example((1, 2, 3, 3, 3, 3, 2, True))  # P = H - 1: a border pixel has three preimages per axis
@example((2, 3, 4, 6, 7, 1, 2, False))  # 1x1 with padding: the output is the mirrored border only
def test_matches_pytorch_fp32(case):
    N, C, OC, H, W, k, p, bias = case
    _check(N, C, OC, H, W, k, p, bias, torch.float32)


@pytest.mark.property
@needs_triton
@given(conv_cases(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_matches_pytorch_half(case, dtype):
    # The interpreter's fp16 dot is exact; its bf16 dot is not, which the kernels work around
    # by upcasting bf16 operands under the interpreter, so both are checked here too.
    N, C, OC, H, W, k, p, bias = case
    _check(N, C, OC, H, W, k, p, bias, dtype)


@needs_triton
def test_crosses_block_boundaries():
    # C and OC above the 16-wide blocks (masked tails), and a wgrad reduction over 2.8 output
    # rows that is split across programs.
    assert conv_wgrad._split(2 * 8, 9, torch.device(DEVICE))[1] > 1
    _check(2, 20, 18, 8, 10, 3, 1, True, torch.float32)


@pytest.mark.slow
@needs_triton
def test_head_and_tail_7x7():
    # CycleGAN's first (3 -> ngf) and last (ngf -> 3) convs; dgrad of the first one has only
    # 3 output channels, padded up to a 16-wide dot tile.
    _check(1, 3, 8, 10, 12, 7, 3, True, torch.float32)
    _check(1, 8, 3, 10, 12, 7, 3, True, torch.float32)


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_and_tail_7x7_half_channels_last(dtype):
    # The 16-bit paths of the 3-channel layers (packed windows, channel-padded dy) and the
    # plain path for C > 8, all channels_last as the generator runs on CUDA.
    for N, C, OC, k, p in ((1, 3, 16, 7, 3), (1, 16, 3, 7, 3), (2, 17, 18, 3, 1)):
        x, w, b = _inputs(N, C, OC, 9, 11, k, True, dtype)
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
        got, dy = _run(x, w, b, p)
        ref = _reference(x, w, b, p, dy)
        for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
            _assert_close(g, r, dtype, f"{name} for C={C} OC={OC} k={k} {dtype}")
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[2].is_contiguous(memory_format=torch.channels_last)  # dw keeps w's layout


@pytest.mark.slow
@needs_triton
def test_small_channel_layers_take_the_packed_paths(monkeypatch):
    # 3 input channels: x is packed into 16-byte pixel windows for the forward and wgrad; 3
    # output channels: dy is packed for the dgrad (windows) and the wgrad (channel padding).
    spies = _spy_all(monkeypatch)
    _check(1, 3, 8, 10, 12, 7, 3, False, torch.float32)
    assert spies["_pack_kernel"].launches == 2
    spies = _spy_all(monkeypatch)
    _check(1, 8, 3, 10, 12, 7, 3, False, torch.float32)
    assert spies["_pack_kernel"].launches == 2
    spies = _spy_all(monkeypatch)
    _check(1, 8, 8, 6, 6, 3, 1, False, torch.float32)
    assert spies["_pack_kernel"].launches == 0


@needs_triton
def test_channels_last_and_strided_grad():
    x, w, b = _inputs(2, 5, 6, 7, 8, 3, True, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    # y.sum() backpropagates an expanded (stride 0) dy through the stride-generic kernels.
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = kernels.reflect_conv2d(*leaves, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    got = (y.detach(), *torch.autograd.grad(y.sum(), leaves))
    ref = _reference(x, w, b, 1, torch.ones(y.shape))
    for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
        _assert_close(g, r, torch.float32, name)
    assert got[1].is_contiguous(memory_format=torch.channels_last)


BAND = 64


def _banded(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t's values, in a view with t's strides inside a NaN-filled buffer, BAND elements of it (a
    guard band) before and after: (the view, the buffer)."""
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    buf = torch.full((span + 2 * BAND,), float("nan"), dtype=t.dtype, device=t.device)
    view = buf.as_strided(t.shape, t.stride(), BAND)
    view.copy_(t)
    return view, buf


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("int64", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_guard_bands(monkeypatch, fmt, int64):
    """Operands and outputs inside NaN-filled buffers: no read outside an operand reaches a result,
    no write lands outside an output (its bands stay NaN), with the 32-bit index math and with
    INT64 forced on (as a launch whose offsets pass int32 runs). The plain path, packed x (3 input
    channels) and packed dy (3 output channels, and x's channels on the wgrad's MMA rows)."""
    if int64:
        monkeypatch.setattr(rc, "_int64", lambda *reaches: True)
    outputs = []
    empty_like_layout = rc._empty_like_layout

    def banded_output(x, shape):
        view, buf = _banded(empty_like_layout(x, shape).fill_(float("nan")))
        outputs.append(buf)
        return view

    monkeypatch.setattr(rc, "_empty_like_layout", banded_output)
    for N, C, OC, k, p in ((2, 5, 6, 3, 1), (1, 3, 8, 7, 3), (1, 8, 3, 7, 3)):
        x, w, b = _inputs(N, C, OC, 9, 10, k, True, torch.float32)
        x, w = (t.contiguous(memory_format=fmt) for t in (x, w))
        dy = torch.randn(N, OC, 9 + 2 * p - k + 1, 10 + 2 * p - k + 1).to(DEVICE).contiguous(memory_format=fmt)
        (xb, _), (wb, _), (bb, _), (dyb, _) = (_banded(t) for t in (x, w, b, dy))
        got = rc._conv_fwd(xb, wb, bb, p), conv_dgrad._conv_dgrad(dyb, wb, xb, p), \
            conv_wgrad._conv_wgrad(dyb, wb, xb, p), conv_wgrad._conv_dbias(dyb, torch.float32)
        ref = _reference(x, w, b, p, dy)
        for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
            _assert_close(g, r, torch.float32, f"{name} for C={C} OC={OC} k={k}")
    assert len(outputs) == 6  # y and dx of each case
    for buf in outputs:
        assert buf[:BAND].isnan().all() and buf[-BAND:].isnan().all(), "a write outside an output"


@needs_triton
def test_nchw_output_is_contiguous():
    x, w, b = _inputs(1, 2, 3, 5, 5, 3, False, torch.float32)
    assert kernels.reflect_conv2d(x, w, b, padding=1).is_contiguous()


@pytest.mark.slow
@needs_triton
def test_backward_is_deterministic():
    x, w, b = _inputs(2, 5, 6, 8, 9, 3, True, torch.float32)
    dy = torch.randn(2, 6, 8, 9).to(DEVICE)
    first, _ = _run(x, w, b, 1, dy)
    second, _ = _run(x, w, b, 1, dy)
    for name, a, c in zip(("y", "dx", "dw", "db"), first, second):
        assert torch.equal(a, c), name


class _Spy:
    """Wraps a kernel (kernel[grid](...)) and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _spy_all(monkeypatch) -> dict[str, _Spy]:
    spies = {name: _Spy(getattr(module, name)) for name, module in KERNELS.items()}
    for name, spy in spies.items():
        monkeypatch.setattr(KERNELS[name], name, spy)
    return spies


@needs_triton
def test_only_needed_grads(monkeypatch):
    spies = _spy_all(monkeypatch)
    x, w, b = _inputs(1, 3, 4, 5, 6, 3, True, torch.float32)
    w.requires_grad_()
    kernels.reflect_conv2d(x, w, b, padding=1).sum().backward()
    assert spies["_wgrad_kernel"].launches == 1
    assert spies["_conv_kernel"].launches == 1  # the forward
    assert spies["_dgrad_kernel"].launches == spies["_fold_kernel"].launches == spies["_dbias_kernel"].launches == 0


@needs_triton
def test_triton_path_actually_runs(monkeypatch):
    x, w, b = _inputs(1, 3, 4, 5, 6, 3, True, torch.float32)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    spies = _spy_all(monkeypatch)

    def no_torch_conv(*args, **kwargs):
        raise AssertionError("the PyTorch conv ran on the Triton path")

    monkeypatch.setattr(F, "conv2d", no_torch_conv)
    monkeypatch.setattr(F, "pad", no_torch_conv)
    kernels.reflect_conv2d(x, w, b, padding=1).sum().backward()
    assert {name: spy.launches > 0 for name, spy in spies.items()} == dict.fromkeys(KERNELS, True)


def test_torch_path_on_cpu_without_interpreter(torch_path, monkeypatch):
    spies = _spy_all(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 3, 6, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    y = kernels.reflect_conv2d(x, w, b, padding=2)
    assert torch.equal(y, F.conv2d(F.pad(x, (2,) * 4, mode="reflect"), w, b))
    assert all(spy.launches == 0 for spy in spies.values())


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "padding", "error", "match"),
    [
        ((1, 3, 4, 8), (2, 3, 3, 3), 4, ValueError, "padding"),  # padding == H
        ((1, 3, 8, 4), (2, 3, 3, 3), 5, ValueError, "padding"),  # padding > W
        ((1, 3, 8, 8), (2, 3, 3, 3), -1, ValueError, "padding"),
        ((1, 3, 8, 8), (2, 4, 3, 3), 1, ValueError, r"\(1, 3, 8, 8\).*\(2, 4, 3, 3\)"),
        ((1, 3, 2, 2), (2, 3, 7, 7), 1, ValueError, "larger than the padded input"),
        ((3, 8, 8), (2, 3, 3, 3), 1, ValueError, "N, C, H, W"),
    ],
)
def test_errors(x_shape, w_shape, padding, error, match):
    with pytest.raises(error, match=match):
        kernels.reflect_conv2d(torch.randn(x_shape), torch.randn(w_shape), padding=padding)


def test_dtype_and_device_errors():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3)
    with pytest.raises(TypeError, match="floating"):
        kernels.reflect_conv2d(x.long(), w.long(), padding=1)
    with pytest.raises(ValueError, match="dtype and device"):
        kernels.reflect_conv2d(x, w.double(), padding=1)
    with pytest.raises(ValueError, match="bias"):
        kernels.reflect_conv2d(x, w, torch.randn(3), padding=1)
    with pytest.raises(ValueError, match="bias"):
        kernels.reflect_conv2d(x, w, torch.randn(2).half(), padding=1)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="dtype and device"):
            kernels.reflect_conv2d(x.cuda(), w, padding=1)


@needs_triton
def test_float64_refused_on_triton_path():
    x, w = torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="Triton path"):
        kernels.reflect_conv2d(x.to(DEVICE), w.to(DEVICE), padding=1)


@pytest.mark.skipif(DEVICE != "cuda", reason="TF32 exists only on a GPU")
def test_tf32_follows_cudnn_flag(monkeypatch):
    x, w, b = _inputs(2, 32, 32, 16, 16, 3, True, torch.float32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    got, dy = _run(x, w, b, 1)
    ref = _reference(x, w, b, 1, dy)
    for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
        err = (g.cpu().double() - r).abs().max().item()
        assert err <= 1e-2 * max(1.0, r.abs().max().item()), name


@pytest.mark.slow
@needs_triton
def test_resnet_generator_end_to_end(monkeypatch):
    """A tiny ResNet generator: Triton ops vs the PyTorch path, same weights and input."""
    from minicycle.networks import ResnetGenerator

    torch.manual_seed(0)
    net = ResnetGenerator(3, 3, ngf=4, n_blocks=2).to(DEVICE)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def forward_backward():
        net.zero_grad(set_to_none=True)
        y = net(x)
        # a non-uniform upstream gradient, so that every bias and border term is exercised
        (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
        return y.detach(), {n: p.grad.detach().clone() for n, p in net.named_parameters()}

    y_triton, grads_triton = forward_backward()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEVICE == "cuda":  # a CUDA tensor always takes the Triton path; compare with CPU eager
        net.cpu()
        x = x.cpu()
    y_torch, grads_torch = forward_backward()

    torch.testing.assert_close(y_triton.cpu(), y_torch, atol=1e-4, rtol=1e-4)
    assert grads_triton.keys() == grads_torch.keys()
    for name, g in grads_triton.items():
        torch.testing.assert_close(g.cpu(), grads_torch[name], atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_autotune_keys_tell_layouts_apart():
    """The autotuner caches its pick per key. A launch whose operands are NCHW prunes to other
    configs than one whose channels are contiguous, so a pick made for one layout must not be
    reused for the other of the same shape in one process: the keys must differ wherever a
    channel stride does."""
    from kernels.tools.compile_report import LAYOUTS, layer_launches

    launches = {}
    for layout in ("nchw", "channels_last"):
        passes = ("fwd", "dgrad", "wgrad")
        for pass_name, launch in layer_launches("conv3x3", 1, torch.bfloat16, LAYOUTS[layout], passes):
            tuner = getattr(KERNELS[launch.name], launch.name)
            if isinstance(tuner, triton.runtime.Autotuner):
                named = {**dict(zip(tuner.arg_names, launch.args)), **launch.kwargs}
                channel_strides = tuple(named[k] for k in ("sa_c", "sxc", "sdc") if k in named)
                key = tuple(named[k] for k in tuner.keys)
                launches.setdefault((pass_name, launch.name), []).append((channel_strides, key))
    differing = 0
    for (pass_name, name), [(nchw_strides, nchw_key), (cl_strides, cl_key)] in launches.items():
        if nchw_strides != cl_strides:
            differing += 1
            assert nchw_key != cl_key, (pass_name, name)
    assert differing == 3  # fwd, dgrad, wgrad


SAME_BUCKET = ((2048, 3072), (2304, 3328))  # photos whose every conv layer has M in the same power-of-two bucket
OTHER_BUCKET = (1024, 1536)
BUCKET_SCRIPT = r"""
import importlib, json, sys, torch
import kernels.tools.compile_report as ki
from triton.runtime.autotuner import Autotuner

found = {}
for size in json.loads(sys.argv[1]):
    for layer in ("stem7x7", "conv3x3", "head7x7"):
        for pass_name, launch in ki.layer_launches(layer, 1, torch.bfloat16, torch.channels_last, size=tuple(size)):
            tuner = getattr(importlib.import_module(launch.module), launch.name)
            if isinstance(tuner, Autotuner):  # its cache key, as Autotuner.run makes it; the JIT's specialisation
                named = {**dict(zip(tuner.arg_names, launch.args)), **launch.kwargs}
                key = [named[k] for k in tuner.keys] + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
                job = ki.specialise(launch, ki._configs(launch)[0])
                found.setdefault(f"{layer} {pass_name} {launch.name}", []).append([repr(key), repr(job)])
print(json.dumps(found))
"""


def test_photo_sizes_in_one_bucket_share_the_tuning_and_the_compile():
    """The autotuners key on the power-of-two bucket of the GEMM's size, and the JIT does not specialise
    on the sizes: two photo sizes whose layers fall in the same buckets share every GEMM launch's autotune
    key and compiled variant (so a new size neither tunes nor compiles again); a size in another bucket
    tunes anew. Triton's own binder specialises the launches, as compiled for sm_90 (no GPU needed)."""
    import json
    import subprocess
    import sys

    sizes = json.dumps([*SAME_BUCKET, OTHER_BUCKET])
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", BUCKET_SCRIPT, sizes], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert {name.split()[-1] for name in found} == {"_conv_kernel", "_dgrad_kernel", "_wgrad_kernel"}
    for name, [(key, job), (same_key, same_job), (other_key, _)] in found.items():
        assert key == same_key and job == same_job, name
        assert other_key != key, name
