"""--kernels auto: the measured choice between the Triton kernels and PyTorch (kernels/choice.py).

On the CPU the choice runs with injected facts: a stand-in sm_90 device, CPU tensors (through the
Triton interpreter, conftest sets TRITON_INTERPRET=1), a timer that reads a table instead of a clock,
and injected failures. The default chooser applies to CUDA tensors only, so that CPU runs stay as
they were; --kernels pytorch is the official layers bit for bit.
"""

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
import triton
from helpers import assert_same_tensors
from torch._dynamo.testing import CompileCounterWithBackend

import infer
import kernels
import train
from kernels import choice, conv_dgrad, conv_wgrad
from kernels import reflect_conv as rc
from kernels.device import Device
from minicycle import datasets, networks
from minicycle.checkpoint import load_file
from minicycle.cuda_graph import GraphedStep
from minicycle.model import Config, CycleGAN

H90 = Device("stand-in H100", 90, 132, 232_448)
T4 = Device("stand-in T4", 75, 40, 65_536)
TRITON_FASTER = {"fwd": (1.0, 2.0), "dgrad": (1.0, 2.0), "wgrad": (1.0, 2.0), "fwd+bwd": (1.0, 2.0)}
PYTORCH_FASTER = {k: (2.0, 1.0) for k in TRITON_FASTER}


class TableTimer:
    """Milliseconds from a table {pass: (triton, pytorch)}, and a log of what was timed."""

    def __init__(self, table: dict[str, tuple[float, float]]):
        self.table, self.calls = table, []

    def __call__(self, fn, path: str, pass_name: str) -> float:
        self.calls.append((pass_name, path))
        return self.table[pass_name][path == choice.PYTORCH]


def stand_in(monkeypatch, table=TRITON_FASTER, facts=H90, cache_file=None) -> tuple[choice.Chooser, TableTimer]:
    """A chooser for CPU tensors, installed as the one the layers ask."""
    timer = TableTimer(table)
    chooser = choice.Chooser(timer=timer, facts=lambda device: facts, device_types=("cpu",), cache_file=cache_file)
    monkeypatch.setattr(choice, "CHOOSER", chooser)
    return chooser, timer


def conv_inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 6, 7, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(4, 3, 3, 3, generator=g) / 5).to(dtype).requires_grad_()
    b = torch.randn(4, generator=g).to(dtype).requires_grad_()
    return x, w, b, torch.randn(1, 4, 6, 7, generator=g).to(dtype)


def eager_conv(x, w, b):
    return F.conv2d(F.pad(x, (1,) * 4, mode="reflect"), w, b)


def grads(fn, x, w, b, dy):
    y = fn(x, w, b)
    return [y.detach(), *torch.autograd.grad(y, (x, w, b), dy)]


def counting(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of module.name from now on."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# ----------------------------------------------------------------------------- the timing picks


def test_timing_picks_the_faster_path_per_pass(monkeypatch):
    table = {"fwd": (1.0, 2.0), "dgrad": (3.0, 1.0), "wgrad": (1.0, 1.5), "fwd+bwd": (2.0, 1.0)}
    chooser, timer = stand_in(monkeypatch, table)
    x, w, b, dy = conv_inputs()
    got = grads(lambda *a: choice.measured_reflect_conv2d(*a, padding=1), x, w, b, dy)
    assert list(chooser.paths.values()) == [("triton", "pytorch", "triton")]
    assert sorted(timer.calls) == sorted((p, q) for p in ("fwd", "dgrad", "wgrad") for q in ("triton", "pytorch"))
    for g, r in zip(got, grads(eager_conv, x, w, b, dy)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)

    # Decided: the next calls run Triton's forward and wgrad, PyTorch's dgrad, and time nothing.
    fwd, dx, dw = (counting(monkeypatch, m, n) for m, n in ((rc, "_conv_fwd"), (conv_dgrad, "_conv_dgrad"),
                                                           (conv_wgrad, "_conv_wgrad")))
    grads(lambda *a: choice.measured_reflect_conv2d(*a, padding=1), x, w, b, dy)
    assert (len(fwd), len(dx), len(dw), len(timer.calls)) == (1, 0, 1, 6)

    # IN+LeakyReLU: PyTorch timed faster, so the layer runs PyTorch's code exactly.
    y = choice.measured_reflect_conv2d(x, w, b, padding=1)
    out = choice.measured_instance_norm_relu(y, negative_slope=0.2)
    assert timer.calls[-2:] == [("fwd+bwd", "triton"), ("fwd+bwd", "pytorch")]
    assert torch.equal(out, F.leaky_relu(F.instance_norm(y), 0.2))


def test_all_pytorch_runs_the_official_ops_and_forward_only_times_only_the_forward(monkeypatch):
    chooser, timer = stand_in(monkeypatch, PYTORCH_FASTER)
    x, w, b, dy = conv_inputs()
    assert_same_tensors(grads(lambda *a: choice.measured_reflect_conv2d(*a, padding=1), x, w, b, dy),
                        grads(eager_conv, x, w, b, dy))
    with torch.no_grad():  # inference: a key of its own, one pass
        assert torch.equal(choice.measured_reflect_conv2d(x, w, b, padding=1), eager_conv(x, w, b))
    assert [k[1] for k in chooser.paths] == ["conv", "conv_fwd"] and timer.calls[-2:] == [("fwd", "triton"),
                                                                                         ("fwd", "pytorch")]


def test_autocast_decides_for_the_autocast_dtype(monkeypatch):
    chooser, _ = stand_in(monkeypatch)
    x, w, b, _ = conv_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = choice.measured_reflect_conv2d(x, w, b, padding=1)
        z = choice.measured_instance_norm_relu(y)
    assert y.dtype == torch.bfloat16 and [k[2] for k in chooser.paths] == ["torch.bfloat16"] * 2
    torch.testing.assert_close(y.float(), eager_conv(x, w, b), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(z.float(), F.relu(F.instance_norm(eager_conv(x, w, b))), rtol=3e-2, atol=3e-2)


# ----------------------------------------------------------------------------- fallbacks


def test_a_mismatch_takes_pytorch_and_says_so_once(monkeypatch, capsys):
    chooser, timer = stand_in(monkeypatch)
    real = rc._conv_fwd
    monkeypatch.setattr(rc, "_conv_fwd", lambda *a: real(*a) + 1)  # a wrong kernel
    x, w, b, dy = conv_inputs()
    for _ in range(2):
        got = grads(lambda *a: choice.measured_reflect_conv2d(*a, padding=1), x, w, b, dy)
    assert_same_tensors(got, grads(eager_conv, x, w, b, dy))  # trained on PyTorch's numbers
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"kernels: PyTorch for conv 3x3 3->4 @ 1x6x7 fp32: Triton's fwd differs "
                                          r"from PyTorch's by \S+ over the whole output and \S+ in its worst 8x8 "
                                          r"tile \(tolerance 5e-03 for float32\)", err[0]), err
    assert timer.calls == []
    assert "PyTorch for conv 3x3 3->4 @ 1x6x7 fp32 dgrad (Triton's fwd differs" in chooser.report()
    assert chooser.decisions[next(iter(chooser.decisions))].errors[0].whole > 0.1  # kept for reports


# Failures a Triton launch may raise that leave the GPU usable: PyTorch takes over.
RECOVERABLE = {
    "OutOfResources": (triton.runtime.errors.OutOfResources(110_592, 101_376, "shared memory"),
                       "OutOfResources: out of resource: shared memory"),
    "CompilationError": (triton.compiler.errors.CompilationError(None, None, "bad dot shape"),
                         "CompilationError: <source unavailable>"),
    "before launch": (ValueError("wgrad: no config fits"), "ValueError: wgrad: no config fits"),
}
# CUDA errors after which every CUDA call fails (torch's and Triton's wording): nothing can take over.
STICKY = {
    "illegal address": "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                       "asynchronously reported at some other API call, so the stacktrace below might be incorrect.",
    "misaligned": "Triton Error [CUDA]: misaligned address",
    "launch failure": "CUDA error: unspecified launch failure",
    "illegal instruction": "Triton Error [CUDA]: an illegal instruction was encountered",
    "device assert": "CUDA error: device-side assert triggered",
}


def failing(exc: BaseException):
    def launch(*args):
        raise exc
    return launch


def inject(monkeypatch, chooser, exc: BaseException, where: str, path: str = "triton") -> None:
    """exc from Triton's wgrad launch in the check, or from `path`'s timing."""
    if where == "launch":
        monkeypatch.setattr(conv_wgrad, "_conv_wgrad", failing(exc))
    else:
        table_timer = chooser.timer
        chooser.timer = lambda fn, p, name: failing(exc)() if p == path else table_timer(fn, p, name)


@pytest.mark.parametrize("where", ["launch", "timing"])
@pytest.mark.parametrize("kind", RECOVERABLE)
def test_a_recoverable_launch_failure_takes_pytorch_and_says_so_once(monkeypatch, capsys, where, kind):
    chooser, timer = stand_in(monkeypatch)
    exc, said = RECOVERABLE[kind]
    inject(monkeypatch, chooser, exc, where)
    x, w, b, dy = conv_inputs()
    for _ in range(2):
        got = grads(lambda *a: choice.measured_reflect_conv2d(*a, padding=1), x, w, b, dy)
    assert_same_tensors(got, grads(eager_conv, x, w, b, dy))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kernels: PyTorch for conv 3x3 3->4 @ 1x6x7 fp32: the Triton "
                                               f"kernels failed: {said}"), err
    assert list(chooser.paths.values()) == [("pytorch",) * 3]


@pytest.mark.parametrize("where", ["launch", "timing"])
@pytest.mark.parametrize("kind", STICKY)
def test_a_sticky_cuda_error_stops_in_one_line_and_claims_no_fallback(monkeypatch, capsys, where, kind):
    chooser, _ = stand_in(monkeypatch)
    inject(monkeypatch, chooser, RuntimeError(STICKY[kind]), where)
    x, w, b, dy = conv_inputs()
    with pytest.raises(choice.FatalKernelError) as e:
        grads(lambda *a: choice.measured_reflect_conv2d(*a, padding=1), x, w, b, dy)
    message, pass_name = str(e.value), "wgrad" if where == "launch" else "fwd"  # the pass that failed
    assert "\n" not in message and message.startswith(f"conv 3x3 3->4 @ 1x6x7 fp32 {pass_name}: Triton's kernels "
                                                      "failed with a CUDA error that leaves the GPU unusable"), message
    assert STICKY[kind].split("\n")[0].split(": ", 1)[1] in message and message.endswith("--kernels pytorch")
    assert capsys.readouterr().err == "" and chooser.paths == {}  # no fallback claimed, nothing decided


def test_a_cuda_error_code_is_enough(monkeypatch):
    """torch's AcceleratorError carries cudaError's code: 700 is an illegal address, whatever the message."""
    e = RuntimeError("CUDA error 700")
    e.error_code = 700
    assert choice.sticky(e) and not choice.sticky(RuntimeError("CUDA error: invalid argument"))


@pytest.mark.parametrize("where, path", [("launch", "triton"), ("timing", "triton"), ("timing", "pytorch")])
def test_out_of_memory_in_the_check_names_the_layer(monkeypatch, capsys, where, path):
    chooser, _ = stand_in(monkeypatch)
    inject(monkeypatch, chooser, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
                                                        "total capacity of 23.55 GiB of which 1.02 GiB is free."),
           where, path)
    x, w, b, dy = conv_inputs()
    with pytest.raises(torch.OutOfMemoryError) as e:
        grads(lambda *a: choice.measured_reflect_conv2d(*a, padding=1), x, w, b, dy)
    pass_name = "wgrad" if where == "launch" else "fwd"
    assert str(e.value).startswith(f"out of GPU memory while checking conv 3x3 3->4 @ 1x6x7 fp32 {pass_name} (Triton "
                                   "against PyTorch): OutOfMemoryError: CUDA out of memory. Tried to allocate "
                                   "2.00 GiB."), e
    assert "the Triton kernels failed" not in capsys.readouterr().err and chooser.paths == {}


def test_no_tensor_core_path_takes_pytorch_without_timing(monkeypatch, capsys):
    """sm_75 has no TF32: the fp32 conv takes cuDNN untimed; the norm (no dot) is still measured."""
    chooser, timer = stand_in(monkeypatch, facts=T4)
    x, w, b, dy = conv_inputs()
    y = choice.measured_reflect_conv2d(x, w, b, padding=1)
    choice.measured_instance_norm_relu(y)
    assert timer.calls == [("fwd+bwd", "triton"), ("fwd+bwd", "pytorch")]
    assert list(chooser.paths.values()) == [("pytorch",) * 3, ("triton",)]
    assert capsys.readouterr().err == ""
    line = chooser.report()
    assert line.startswith("kernels: Triton for 1 of 4 (op, shape, pass) choices, PyTorch for conv 3x3 3->4 @ "
                           "1x6x7 fp32 fwd (no tensor-core float32 dot on sm_75), "), line
    assert chooser.report() is None  # each decision is reported once


def test_photo_sizes_share_decisions_by_powers_of_two(monkeypatch):
    """A folder of photos of many sizes: N and H.W rounded up to powers of two key the decision, so a
    size in a bucket already decided measures nothing; the layout, another bucket, or a batch whose
    operands hold 2**31 elements (int64 index math in the kernels) decides anew."""
    chooser, timer = stand_in(monkeypatch)
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    with torch.no_grad():
        for h, w_ in ((6, 7), (7, 8), (5, 10), (8, 8)):  # 42, 56, 50, 64 pixels: one bucket, up to 64
            choice.measured_reflect_conv2d(torch.randn(1, 3, h, w_), w, b, padding=1)
        assert len(timer.calls) == 2 and len(chooser.decisions) == 1
        assert chooser.report().startswith("kernels: Triton for 1 of 1")
        choice.measured_reflect_conv2d(torch.randn(1, 3, 9, 8), w, b, padding=1)  # 72 pixels: up to 128
        choice.measured_reflect_conv2d(torch.randn(1, 3, 6, 7).to(memory_format=torch.channels_last), w, b,
                                       padding=1)
        assert len(timer.calls) == 6 and len(chooser.decisions) == 3
    huge = torch.empty(2**31, dtype=torch.float32, device="meta")
    small, wide = (huge.as_strided((n, 3, 6, 7), (126, 42, 7, 1)) for n in (1, 2**31 // 126 + 1))
    assert choice._conv_key(small, w, b, 1)[3][2] is False and choice._conv_key(wide, w, b, 1)[3][2] is True


def test_first_compile_on_a_machine_is_announced_once(monkeypatch, tmp_path):
    """One line before the first run on a machine compiles the kernels; the run leaves a mark beside the
    cache file when it ends (atexit), so that the next run with the same GPU, versions and kernels says
    nothing; another GPU, --kernels pytorch, or no cache file: nothing either way."""
    at_exit = []
    monkeypatch.setattr(choice.atexit, "register", lambda fn, *args: at_exit.append((fn, args)))
    stand_in(monkeypatch, cache_file=tmp_path / "choice.json")
    cpu = torch.device("cpu")
    line = choice.compile_notice("auto", cpu)
    assert re.fullmatch(r"kernels: compiling Triton kernels for stand-in H100 \(first use on this machine with "
                        r"Triton [\d.]+: about a minute, more for each new dtype or image size\)", line), line
    assert choice.compile_notice("pytorch", cpu) == ""
    assert choice.compile_notice("triton", cpu) == line  # the run has not ended: no mark yet
    for fn, args in at_exit:
        fn(*args)
    assert choice.compile_notice("triton", cpu) == "" and choice.compile_notice("auto", cpu) == ""
    stand_in(monkeypatch, cache_file=tmp_path / "choice.json", facts=T4)
    assert "for stand-in T4" in choice.compile_notice("auto", cpu)
    stand_in(monkeypatch, cache_file=None)
    assert choice.compile_notice("auto", cpu) == ""


# ----------------------------------------------------------------------------- the caches


def test_decisions_are_kept_per_process_and_on_disk(monkeypatch, tmp_path):
    cache = tmp_path / "choice.json"
    x, w, b, _ = conv_inputs()

    def decide(facts=H90) -> tuple[choice.Chooser, TableTimer]:
        chooser, timer = stand_in(monkeypatch, facts=facts, cache_file=cache)
        choice.measured_instance_norm_relu(choice.measured_reflect_conv2d(x, w, b, padding=1))
        return chooser, timer

    first, timer = decide()
    assert len(timer.calls) == 8 and len(first.paths) == 2
    line = first.report()
    assert re.fullmatch(r"kernels: Triton for 4 of 4 \(op, shape, pass\) choices; decided on stand-in H100 in "
                        r"[\d.]+ s", line), line
    choice.measured_reflect_conv2d(x, w, b, padding=1)  # the same key again: nothing new
    assert len(timer.calls) == 8 and first.report() is None

    second, timer = decide()  # another process on the same machine
    assert timer.calls == [] and second.paths == first.paths
    assert second.report().endswith(f"(2 of 2 from {cache})")

    _, timer = decide(Device("stand-in RTX 4090", 89, 128, 101_376))  # another device
    assert len(timer.calls) == 8
    monkeypatch.setattr(triton, "__version__", "0.0.0")  # another Triton
    _, timer = decide()
    assert len(timer.calls) == 8
    assert len(json.loads(cache.read_text())) == 3  # one section per device and versions

    cache.write_text("{not json")  # a damaged cache is ignored and rewritten, never fatal
    _, timer = decide()
    assert len(timer.calls) == 8 and len(json.loads(cache.read_text())) == 1


def test_no_cache_file_when_off(monkeypatch, tmp_path):
    monkeypatch.setenv("MINICYCLE_KERNEL_CACHE", "off")
    assert choice._cache_file() is None
    monkeypatch.setenv("MINICYCLE_KERNEL_CACHE", str(tmp_path / "c.json"))
    assert choice._cache_file() == tmp_path / "c.json"
    monkeypatch.delenv("MINICYCLE_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert choice._cache_file() == tmp_path / "minicycle" / "kernel_choice.json"


# ----------------------------------------------------------------------------- torch.compile, CUDA graphs


@pytest.mark.slow
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_opcheck_the_mixed_conv_ops(layout):
    """The custom ops of a conv whose passes disagree: schema, autograd registration, fake impls (the
    outputs' strides in both layouts) and AOT dispatch, as tests/test_compile.py checks the Triton ops."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 5, generator=g).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(3, 2, 3, 3, generator=g).contiguous(memory_format=layout).requires_grad_()
    b = torch.randn(3, generator=g).requires_grad_()
    dy = torch.randn(1, 3, 4, 5, generator=g).contiguous(memory_format=layout)
    ops = torch.ops.minicycle
    torch.library.opcheck(ops.reflect_conv2d_chosen, (x, w, b, 1, "triton", "pytorch", "triton"))
    torch.library.opcheck(ops.reflect_conv2d_chosen, (x, w, b, 1, "pytorch", "triton", "pytorch"))
    for paths in (("pytorch", "triton"), ("triton", "pytorch")):
        torch.library.opcheck(ops.reflect_conv2d_chosen_backward, (dy, x.detach(), w.detach(), 1, True, True, True,
                                                                   *paths))


def _conv_norm(x, w, b):
    return choice.measured_instance_norm_relu(choice.measured_reflect_conv2d(x, w, b, padding=1), negative_slope=0.2)


def _compiled_ops(fn, *args) -> tuple[torch.Tensor, set[str]]:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    out = torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)(*args)
    assert counter.frame_count == 1
    return out, {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}


def test_torch_compile_uses_the_decisions_and_never_measures(monkeypatch):
    chooser, timer = stand_in(monkeypatch, {**TRITON_FASTER, "dgrad": (2.0, 1.0), "fwd+bwd": (2.0, 1.0)})
    x, w, b, _ = conv_inputs()
    _, ops = _compiled_ops(_conv_norm, x, w, b)  # nothing decided yet: PyTorch's ops, never an unchecked Triton
    assert timer.calls == [] and chooser.paths == {}
    assert not any(op.startswith("minicycle.") for op in ops) and any("conv2d" in op for op in ops), ops

    eager = _conv_norm(x, w, b)  # eager: decides (conv: Triton but for dgrad; norm: PyTorch)
    out, ops = _compiled_ops(_conv_norm, x, w, b)
    assert "minicycle.reflect_conv2d_chosen.default" in ops and "minicycle.instance_norm_relu.default" not in ops
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    dx, = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(dx, torch.autograd.grad(eager.sum(), x)[0], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_torch_compile_takes_the_cache_files_decisions_when_loaded_first(monkeypatch, tmp_path):
    """train.py --compile: load() before the nets are traced, so the trace uses the last run's decisions."""
    table = {**TRITON_FASTER, "wgrad": (2.0, 1.0)}
    x, w, b, _ = conv_inputs()
    stand_in(monkeypatch, table, cache_file=tmp_path / "c.json")
    eager = _conv_norm(x, w, b)  # an earlier run decides
    chooser, timer = stand_in(monkeypatch, table, cache_file=tmp_path / "c.json")
    assert choice.load(x.device) == 2
    out, ops = _compiled_ops(_conv_norm, x, w, b)
    assert "minicycle.reflect_conv2d_chosen.default" in ops and timer.calls == []
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert chooser.report().endswith(f"(2 of 2 from {tmp_path / 'c.json'})")
    torch._dynamo.reset()


@pytest.mark.slow
def test_the_first_step_makes_every_decision(monkeypatch):
    """--cuda_graph captures the fourth step: the warm-up steps before it have made every decision."""
    chooser, timer = stand_in(monkeypatch, PYTORCH_FASTER)  # decided PyTorch: fast steps after the checks
    torch.manual_seed(0)
    model = CycleGAN(Config(ngf=2, ndf=2, netG="resnet_6blocks", netD="pixel", pool_size=2))
    step = GraphedStep(model, batch_size=1, graph=False)
    g = torch.Generator().manual_seed(0)
    images = [[torch.rand(1, 3, 8, 8, generator=g) * 2 - 1 for _ in "AB"] for _ in range(3)]
    step.step(*images[0])
    decided, timed = dict(chooser.paths), len(timer.calls)
    assert {k[1] for k in decided} == {"conv", "norm"} and len(decided) >= 5
    for a, b in images[1:]:
        step.step(a, b)
    assert chooser.paths == decided and len(timer.calls) == timed
    assert len(step.read()) == 3


@pytest.mark.parametrize("norm, dropout", [("instance", False), ("batch", True)])
def test_deciding_before_compile_decides_every_layer_and_changes_nothing(monkeypatch, norm, dropout):
    """train.py --compile, before the nets are compiled: one eager forward of each net decides every layer the
    step then meets, and leaves the RNG, BatchNorm's statistics, the gradients and the modes as they were."""
    chooser, timer = stand_in(monkeypatch, PYTORCH_FASTER)  # decided PyTorch: fast steps after the checks
    torch.manual_seed(0)
    model = CycleGAN(Config(ngf=2, ndf=2, netG="resnet_6blocks", netD="pixel", norm=norm, no_dropout=not dropout,
                            pool_size=2))
    g = torch.Generator().manual_seed(0)
    real_A, real_B = (torch.rand(1, 3, 16, 16, generator=g) * 2 - 1 for _ in "AB")
    rng, state = torch.get_rng_state(), copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    train.decide_kernels(model, real_A, real_B)
    assert torch.equal(torch.get_rng_state(), rng) and [m.training for m in model.modules()] == modes
    assert_same_tensors(model.state_dict(), state)  # BatchNorm's running statistics included
    assert all(p.grad is None for p in model.parameters())
    decided, timed = dict(chooser.paths), len(timer.calls)
    assert {k[1] for k in decided} == ({"conv", "norm"} if norm == "instance" else {"conv"}), decided
    model.optimize(real_A, real_B)  # the step finds every layer decided
    assert chooser.paths == decided and len(timer.calls) == timed


@pytest.mark.slow
def test_train_compile_traces_only_checked_choices_and_trains_as_without(dataroot, tmp_path, monkeypatch):
    table = {**TRITON_FASTER, "dgrad": (2.0, 1.0), "fwd+bwd": (2.0, 1.0)}  # convs: mixed; IN: PyTorch
    compiled = []  # (graph counter, decisions made) per net compiled
    real_compile = torch.nn.Module.compile

    def compile_counting(net, *args, **kwargs):
        compiled.append((CompileCounterWithBackend("eager"), len(choice.CHOOSER.paths)))
        real_compile(net, backend=compiled[-1][0])

    monkeypatch.setattr(torch.nn.Module, "compile", compile_counting)
    # The Triton conv passes stand-ins that run PyTorch's (what is traced matters here, not the kernels' numbers,
    # and the interpreter would take minutes for the steps' Triton passes).
    monkeypatch.setattr(rc, "_conv_fwd", lambda x, w, b, p: choice.forward(choice.PYTORCH, x, w, b, p))
    monkeypatch.setattr(conv_dgrad, "_conv_dgrad", lambda dy, w, x, p: choice.dgrad(choice.PYTORCH, dy, x, w, p))
    monkeypatch.setattr(conv_wgrad, "_conv_wgrad", lambda dy, w, x, p: choice.wgrad(choice.PYTORCH, dy, x, w, p,
                                                                                    True, False)[0])
    monkeypatch.setattr(conv_wgrad, "_conv_dbias", lambda dy, dtype: dy.sum((0, 2, 3)))
    args = TINY + ["--dataroot", str(dataroot), "--checkpoints_dir", str(tmp_path), "--netD", "pixel", "--ngf", "2",
                   "--ndf", "2", "--load_size", "8", "--crop_size", "8", "--norm", "instance"]
    states = []
    for flags in (["--compile"], []):
        stand_in(monkeypatch, table)
        torch._dynamo.reset()
        assert train.main(args + flags + ["--name", "c" if flags else "e"]) == 0
        states.append(load_file(tmp_path / ("c" if flags else "e") / "latest_state.pth")["model"])
    torch._dynamo.reset()
    assert len(compiled) == 4 and all(decided > 0 for _, decided in compiled)  # decided before compiling
    ops = {str(n.target) for counter, _ in compiled for g in counter.graphs for n in g.graph.nodes
           if n.op == "call_function"}
    assert "minicycle.reflect_conv2d_chosen.default" in ops, ops  # the measured choice, checked
    assert not {"minicycle.reflect_conv2d.default", "minicycle.instance_norm_relu.default"} & ops  # none unchecked
    assert "<built-in function pad>" not in ops  # and no layer left undecided
    assert_same_tensors(states[0], states[1])  # --compile trained exactly as without it


# ----------------------------------------------------------------------------- CPU unchanged, the flag


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_default_on_a_cpu_is_the_ops_own_rule(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    x, w, b, dy = conv_inputs()
    got = grads(lambda *a: choice.measured_instance_norm_relu(choice.measured_reflect_conv2d(*a, padding=1)),
                x, w, b, dy)
    want = grads(lambda *a: kernels.instance_norm_relu(kernels.reflect_conv2d(*a, padding=1)), x, w, b, dy)
    assert_same_tensors(got, want)
    assert choice.CHOOSER.paths == {}


def test_the_ops_called_directly_never_ask_the_chooser(monkeypatch):
    chooser, timer = stand_in(monkeypatch, PYTORCH_FASTER)
    x, w, b, _ = conv_inputs()
    kernels.instance_norm_relu(kernels.reflect_conv2d(x, w, b, padding=1))
    assert chooser.paths == {} and timer.calls == []


def test_set_kernels_switches_every_fused_block():
    net = networks.define_G(3, 3, 4, "resnet_6blocks")
    blocks = [m for m in net.modules() if isinstance(m, networks.FusedSequential)]
    for mode, want in (("pytorch", (False, False)), ("triton", (True, False)), ("auto", (True, True))):
        networks.set_kernels(net, mode)
        assert {(m.fused, m.auto) for m in blocks} == {want}
    with pytest.raises(ValueError, match="--kernels 'fast': choose one of auto, triton, pytorch"):
        networks.set_kernels(net, "fast")


TINY = ["--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks", "--load_size", "32", "--crop_size", "32",
        "--num_threads", "0", "--pool_size", "2", "--seed", "3", "--max_steps", "2"]


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory):
    return datasets.ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic")


def test_train_kernels_pytorch_is_the_official_layers_bit_for_bit(dataroot, tmp_path, monkeypatch, capsys):
    """--kernels pytorch (the official layers, kernels or not) and the default on a CPU (the ops' PyTorch
    path) train to the same bits; the first line says which."""
    runs = {}
    for mode, interpret in (("pytorch", "1"), ("auto", "0")):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        args = TINY + ["--dataroot", str(dataroot), "--checkpoints_dir", str(tmp_path), "--name", mode]
        capsys.readouterr()
        assert train.main(args + (["--kernels", mode] if mode != "auto" else [])) == 0
        runs[mode] = capsys.readouterr().out.splitlines()[0]
    assert "; kernels: the official PyTorch layers (--kernels pytorch); " in runs["pytorch"]
    assert "; kernels: PyTorch (no Triton without a GPU); " in runs["auto"]
    states = [load_file(tmp_path / m / "latest_state.pth")["model"] for m in runs]
    assert_same_tensors(states[0], states[1])


@pytest.mark.slow
def test_train_prints_what_auto_chose_after_the_first_iteration(dataroot, tmp_path, monkeypatch, capsys):
    stand_in(monkeypatch, PYTORCH_FASTER)  # CPU tensors as if on a GPU; decided PyTorch: fast steps after
    args = TINY + ["--dataroot", str(dataroot), "--checkpoints_dir", str(tmp_path), "--netD", "pixel", "--ngf", "2",
                   "--ndf", "2", "--load_size", "8", "--crop_size", "8", "--print_freq", "1"]
    capsys.readouterr()
    assert train.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    chosen = [i for i, line in enumerate(lines) if line.startswith("kernels: ")]
    assert len(chosen) == 1 and chosen[0] <= 2, lines  # once, right after the first iteration
    assert re.match(r"kernels: Triton for 0 of \d+ \(op, shape, pass\) choices, PyTorch for conv 7x7 3->2 @ "
                    r"1x8x8 fp32 fwd \(Triton 2\.0x slower\), ", lines[chosen[0]]), lines[chosen[0]]


def test_the_flag_rejects_other_values_in_one_line(capsys):
    for main in (train.main, infer.main):
        with pytest.raises(SystemExit) as e:
            main(["--kernels", "cudnn"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and "--kernels: invalid choice: 'cudnn'" in err


def test_infer_kernels_pytorch_translates_as_the_default(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    g = networks.init_weights(networks.define_G(3, 3, 4, "resnet_6blocks"))
    torch.save(g.state_dict(), tmp_path / "g.pth")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (12, 16), (200, 30, 10)).save(tmp_path / "in" / "x.png")
    outs = []
    for mode in ("pytorch", "auto"):
        assert infer.main(["--checkpoint", str(tmp_path / "g.pth"), "--input", str(tmp_path / "in"), "--output",
                           str(tmp_path / mode), "--preprocess", "none", "--kernels", mode]) == 0
        outs.append((tmp_path / mode / "x.png").read_bytes())
    assert outs[0] == outs[1]


# ----------------------------------------------------------------------------- the scripts' one-line errors


def generator_file(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    torch.save(networks.init_weights(networks.define_G(3, 3, 4, "resnet_6blocks")).state_dict(), tmp_path / "g.pth")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16), (200, 30, 10)).save(tmp_path / "in" / "x.png")
    return ["--checkpoint", str(tmp_path / "g.pth"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
            "--preprocess", "none"]


def test_a_sticky_cuda_error_in_the_check_stops_train_and_infer_in_one_line(dataroot, tmp_path, monkeypatch, capsys):
    stand_in(monkeypatch, PYTORCH_FASTER)  # CPU tensors as if on a GPU, whose Triton forward faults
    monkeypatch.setattr(rc, "_conv_fwd", failing(RuntimeError(STICKY["illegal address"])))
    capsys.readouterr()
    args = TINY + ["--dataroot", str(dataroot), "--checkpoints_dir", str(tmp_path), "--ngf", "2", "--ndf", "2"]
    assert train.main(args) == 1
    assert infer.main(generator_file(tmp_path)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{script}: error: conv 7x7 3->{c} @ 1x{s}x{s} fp32 fwd: Triton's kernels failed with a CUDA "
                   f"error that leaves the GPU unusable in this process (RuntimeError: CUDA error: an illegal memory "
                   f"access was encountered), so no fallback can run; rerun with --kernels pytorch"
                   for script, c, s in (("train.py", 2, 32), ("infer.py", 4, 16))], err


OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which 1.02 GiB "
       "is free. Including non-PyTorch memory, this process has 22.51 GiB memory in use. Of the allocated memory ...")


def test_out_of_memory_stops_train_and_infer_in_one_line_and_keeps_the_checkpoint(dataroot, tmp_path, monkeypatch,
                                                                                   capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = TINY + ["--dataroot", str(dataroot), "--checkpoints_dir", str(tmp_path), "--name", "oom"]
    assert train.main(args + ["--max_steps", "1"]) == 0  # one iteration, saved
    saved = {f: f.read_bytes() for f in (tmp_path / "oom").glob("*.pth")}

    def out_of_memory(*args):
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setattr(CycleGAN, "optimize", out_of_memory)
    monkeypatch.setattr(networks.FusedSequential, "forward", out_of_memory)
    capsys.readouterr()
    assert train.main(args + ["--continue_train"]) == 1
    assert infer.main(generator_file(tmp_path)) == 1
    ran_out = OOM.split(". Including")[0]  # torch's first sentences: what ran out, and by how much
    assert capsys.readouterr().err.splitlines() == [
        f"train.py: error: {ran_out}; try a smaller --batch_size, --load_size or --crop_size, or --amp bf16 (the last "
        f"saved checkpoint is intact)",
        f"infer.py: error: {tmp_path / 'in' / 'x.png'} (16x16): translating it ran out of GPU memory; use "
        f"--preprocess resize (--load_size N) for smaller images, or --device cpu"]
    assert saved and {f: f.read_bytes() for f in (tmp_path / "oom").glob("*.pth")} == saved


# ----------------------------------------------------------------------------- the benchmarks say it


@pytest.mark.slow
def test_op_bench_rows_say_which_path_auto_takes(monkeypatch, tmp_path, capsys):
    from test_benchmarks import table

    from kernels.tools import op_bench as bench

    stand_in(monkeypatch, {**TRITON_FASTER, "dgrad": (3.0, 1.0), "fwd+bwd": (1.0, 4.0)})
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--batch", "1", "--dtypes", "fp32", "--out", str(tmp_path / "ops.md")]) == 0
    finally:
        torch.set_num_threads(threads)  # --quick uses one thread
    cols, rows = table((tmp_path / "ops.md").read_text(), "op")
    takes = {(r[0], r[1]): r[cols.index("auto takes")] for r in rows}
    assert takes == {("IN+ReLU", "fwd"): "Triton, by 4.00x", ("IN+ReLU", "bwd"): "Triton, by 4.00x",
                     ("reflect conv", "fwd"): "Triton, by 2.00x", ("reflect conv", "dgrad"): "PyTorch, by 3.00x",
                     ("reflect conv", "wgrad"): "Triton, by 2.00x"}


def test_model_bench_rows_name_the_kernels_flag(monkeypatch, tmp_path):
    from test_benchmarks import table

    from minicycle.tools import iteration_bench as model_bench

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    try:
        assert model_bench.main(["--quick", "--batch", "1", "--variants", "eager,ours", "--iters", "1",
                                 "--kernels", "triton", "--out", str(tmp_path / "model.md")]) == 0
    finally:
        torch.set_num_threads(threads)
    _, rows = table((tmp_path / "model.md").read_text(), "variant")
    assert [r[0] for r in rows] == ["eager", "ours (triton)"]
