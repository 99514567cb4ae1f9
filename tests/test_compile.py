"""The Triton ops as torch.library custom ops: opcheck, and torch.compile without graph breaks.

Runs under the interpreter on CPU (conftest sets TRITON_INTERPRET=1), so shapes are tiny. The
compile tests use backend="aot_eager": Dynamo + AOTAutograd trace the graph (through the fake
impls) and build the joint forward/backward, then run it eagerly, i.e. the same custom ops.
"""

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.library import opcheck

import kernels

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
TRITON_RUNS = DEVICE == "cuda" or INTERPRET

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")

OPS = torch.ops.minicycle
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    """No TF32 (tight fp32 comparisons), and no compiled code shared between tests."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _randn(*shape: int, seed: int = 0, layout: str = "nchw") -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return t.contiguous(memory_format=LAYOUTS[layout]) if t.dim() == 4 else t


# ----------------------------------------------------------------------------- opcheck
# All of opcheck's default tests: test_schema, test_autograd_registration, test_faketensor
# (fake vs real shapes, dtypes and strides) and test_aot_dispatch_dynamic.


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_instance_norm(layout):
    x = _randn(2, 3, 4, 5, layout=layout).requires_grad_()
    opcheck(OPS.instance_norm_relu, (x, 1e-5, 0.2))
    dy, mu, rstd = _randn(2, 3, 4, 5, seed=1, layout=layout), _randn(6, seed=2), _randn(6, seed=3).abs()
    opcheck(OPS.instance_norm_relu_backward, (dy, x.detach(), mu, rstd, 0.2))


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "bias"), [("nchw", True), ("channels_last", False)])
def test_opcheck_reflect_conv2d(layout, bias):
    x = _randn(1, 2, 4, 5, layout=layout).requires_grad_()
    w = _randn(3, 2, 3, 3, seed=1).requires_grad_()
    b = _randn(3, seed=2).requires_grad_() if bias else None
    opcheck(OPS.reflect_conv2d, (x, w, b, 1))


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, False)])
def test_opcheck_reflect_conv2d_backward(needs, layout):
    # channels_last: x, dy and w (as model.to(memory_format=torch.channels_last) makes them);
    # dx and dw come back in their layouts, and the fake impl must say so.
    x, dy = _randn(1, 2, 4, 5, layout=layout), _randn(1, 3, 4, 5, seed=2, layout=layout)
    w = _randn(3, 2, 3, 3, seed=1, layout=layout)
    opcheck(OPS.reflect_conv2d_backward, (dy, x, w, 1, *needs))
    dx, dw, db = OPS.reflect_conv2d_backward(dy, x, w, 1, *needs)
    # Gradients that aren't needed come back as 0-element placeholders.
    assert [t.shape != (0,) for t in (dx, dw, db)] == list(needs)


# ----------------------------------------------------------------------------- torch.compile


def _compile(fn):
    """torch.compile(fn, backend="aot_eager", fullgraph=True), counting the captured graphs."""
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=False), counter


def _ops_in(graph: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}


def _conv_norm(x, w, b, dy):
    y = kernels.reflect_conv2d(x, w, b, padding=1)
    y = kernels.instance_norm_relu(y, negative_slope=0.2)
    return (y * dy).sum()


def _grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:-1]]
    loss = fn(*leaves, inputs[-1])
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_function_matches_eager(layout):
    x = _randn(2, 3, 5, 6, layout=layout)
    w, b = _randn(4, 3, 3, 3, seed=1), _randn(4, seed=2)
    dy = _randn(2, 4, 5, 6, seed=3, layout=layout)
    compiled, counter = _compile(_conv_norm)

    loss, grads = _grads(compiled, x, w, b, dy)
    ref_loss, ref_grads = _grads(_conv_norm, x, w, b, dy)

    # fullgraph=True already refuses graph breaks; the one graph calls the custom ops.
    assert counter.frame_count == 1
    assert {"minicycle.reflect_conv2d.default", "minicycle.instance_norm_relu.default"} <= _ops_in(counter.graphs[0])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("dx", "dw", "db"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert grads[0].is_contiguous(memory_format=LAYOUTS[layout])


def test_compiled_without_bias_and_frozen_weight():
    """No bias, and a weight that needs no gradient: the traced backward asks only for dx."""
    x, w, dy = _randn(1, 2, 4, 5), _randn(3, 2, 3, 3, seed=1), _randn(1, 3, 4, 5, seed=2)

    def fn(x, dy):
        return (kernels.instance_norm_relu(kernels.reflect_conv2d(x, w, padding=1)) * dy).sum()

    compiled, counter = _compile(fn)
    loss, (dx,) = _grads(compiled, x, dy)
    ref_loss, (ref_dx,) = _grads(fn, x, dy)
    assert counter.frame_count == 1
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_resnet_generator_matches_eager():
    from minicycle.networks import ResnetGenerator

    torch.manual_seed(0)
    net = ResnetGenerator(3, 3, ngf=4, n_blocks=1).to(DEVICE)
    x = _randn(1, 3, 8, 8)
    weight = torch.linspace(-1, 1, x.numel(), device=DEVICE).view_as(x)  # output is 3 x 8 x 8 too

    def forward_backward(model):
        net.zero_grad(set_to_none=True)
        y = model(x)
        (y * weight).sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    # The whole generator is one graph: FusedSequential's layer walk is traced away.
    compiled, counter = _compile(net)
    y, grads = forward_backward(compiled)
    y_ref, grads_ref = forward_backward(net)

    assert counter.frame_count == 1
    ops = _ops_in(counter.graphs[0])
    assert {"minicycle.reflect_conv2d.default", "minicycle.instance_norm_relu.default"} <= ops
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
