"""Benchmarks: minicycle's Triton ops, and the whole CycleGAN training step, against PyTorch.

    python -m kernels.bench                         # ops: IN+ReLU and reflect-conv, fwd and bwd
    python -m kernels.bench --model                 # one training iteration, and G_A inference
    python -m kernels.bench --model --amp bf16      # the same under bf16 autocast
    python -m kernels.bench --ops conv --dtypes bf16 --batch 4   # a slice, to fit a time limit
    python -m kernels.bench --quick                 # tiny shapes on CPU: checks the harness itself
    python -m kernels.bench ... --out FILE.md       # also write the markdown to FILE.md

Everything is printed as markdown: a header (device, date, versions, the exact command), then
one table per section.

Ops
---
Each op is timed three ways, on the same input tensors:

    ours     kernels.instance_norm_relu, kernels.reflect_conv2d (the Triton kernels on CUDA)
    eager    what the official model runs: F.instance_norm + in-place ReLU, and
             nn.ReflectionPad2d + F.conv2d (cuDNN on CUDA)
    compile  torch.compile(eager, dynamic=False), compiled afresh for every row

at the shapes of the ResNet generator (ngf 64, 256x256 images, batch 1 and 4):

    IN+ReLU  (N, 64, 256, 256), (N, 128, 128, 128), (N, 256, 64, 64)
    conv     7x7 pad 3, 3 -> 64 at 256^2 (first layer); 3x3 pad 1, 256 -> 256 at 64^2 (the 18
             residual-block convs); 7x7 pad 3, 64 -> 3 at 256^2 (last layer); all with bias

Passes. IN+ReLU: fwd (x requires grad, as in training) and bwd (dx from x and dy). Conv: fwd,
dgrad (dx only) and wgrad (dw only). A backward pass runs one forward outside the timing and
then times torch.autograd.grad(y, [t], dy, retain_graph=True), with t = x or w the only tensor
that requires grad, so every implementation computes just that gradient: ours skips the others
through ctx.needs_input_grad, and torch.compile builds its backward graph for t alone. dbias is
not timed (one reduction over dy). torch.compile's donated buffers are switched off for this
section, since they forbid retain_graph.

Work per pass (the fewest bytes that must cross DRAM, and the arithmetic):

    IN+ReLU fwd     bytes = read x + write y           = 2 * numel * itemsize
    IN+ReLU bwd     bytes = read x, dy + write dx      = 3 * numel * itemsize
                    (the saved per-plane mean and rstd, 8 bytes a plane, are left out)
    conv, each of fwd / dgrad / wgrad
                    FLOP  = 2 * N * OH * OW * OC * C * KH * KW

The "ours" column of achieved rate is bytes / time (GB/s) or FLOP / time (TFLOP/s), for ours.
Ratios are eager / ours and compile / ours: above 1 means ours is faster.

Timing. CUDA: one call outside the timing (Triton compilation and autotuning, torch.compile),
then triton.testing.do_bench(fn, return_mode="median"): its own warm-up (25 ms of calls), then
about 100 ms of calls, each timed with CUDA events and each preceded by a write that clears the
L2 cache (so inputs come from DRAM, and host launch overhead shorter than that write is hidden:
these are close to device times). CPU: time.perf_counter around each call, median of three.

Precision. fp32 runs with PyTorch's defaults: torch.backends.cudnn.allow_tf32 is True, so cuDNN
convolutions use TF32 tensor cores, and so does our conv (it follows the same flag);
cudnn.benchmark stays False. bf16: every tensor is bf16; both sides accumulate in fp32.

Correctness. After timing, each row compares ours with eager on the benchmarked inputs:
err = ||ours - eager|| / ||eager|| in float64, and the row gets a check mark when err is within
TOLERANCES[(op, dtype)], a cross otherwise (NaN included). Any cross makes the exit status 1.

Model (--model)
---------------
One iteration is CycleGAN.optimize: 6 generator forwards (resnet_9blocks), 6 discriminator
forwards (basic, 70x70 PatchGAN), both backwards and both Adam steps, at 256x256 and batch 1
and 4. Three variants of the same model, built from the same seed (same weights, same inputs):

    ours     the generators' FusedSequential layers run the Triton ops
    eager    set_fused(net, False) on every net: plain torch.nn layers, the official model
    compile  the eager model with each of the 4 nets compiled (net.compile(dynamic=False))

Warm-up iterations first (the first one also compiles), then the median of --iters iterations,
each timed with the device synchronised before and after. Peak memory is
torch.cuda.max_memory_allocated over the timed iterations (reset after warm-up; parameters,
gradients, Adam state and the image pools included). The projection is ms/iter times the
iterations of 200 horse2zebra epochs as train.py runs them: 1334 images an epoch (the larger of
trainA and trainB), ceil(1334 / batch) iterations, so 266,800 at batch 1 and 66,800 at batch 4.
Inference is G_A(x) under torch.no_grad (and autocast with --amp), reported as images/s.
Loss check: the 8 losses of the first iteration against eager's, max |l - l_eager| /
max(|l_eager|, 1e-3), within MODEL_TOLERANCES[amp].

torch.compile can fail (no C++ toolchain, an unsupported op): the cell then reads
"n/a (reason)" and the run goes on.

--quick runs tiny shapes on the CPU (one thread) so that CI can check the harness itself: the
ops (IN+ReLU (N,4,8,8), conv 2 -> 3 3x3 pad 1 at 8x8) and the model (ngf=4, ndf=4,
resnet_6blocks, 32x32). It times nothing of interest and skips torch.compile unless --compile is
given. Ours takes whichever path kernels.runtime.use_triton picks: the Triton interpreter under
TRITON_INTERPRET=1 (then the model section is left out unless --model asks for it, since one
fused iteration takes minutes in the interpreter), else the plain PyTorch path.
"""

import argparse
import contextlib
import datetime
import gc
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch._dynamo
import torch._functorch.config
import torch.nn as nn
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import kernels
from kernels.runtime import use_triton
from minicycle.model import LOSS_NAMES, Config, CycleGAN
from minicycle.networks import set_fused

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ("in", "conv")
EPS = 1e-5

# ||ours - eager|| / ||eager||. fp32 conv: both sides use TF32 (10-bit mantissa) products;
# bf16: both sides round their output to bf16 (8-bit mantissa).
TOLERANCES = {("in", "fp32"): 1e-4, ("conv", "fp32"): 5e-3, ("in", "bf16"): 2e-2, ("conv", "bf16"): 2e-2}
# Relative difference of the first iteration's losses from eager's, per --amp.
MODEL_TOLERANCES = {"fp32": 1e-2, "bf16": 5e-2}

# (C, H, W) of the generator's IN+ReLU layers, and (C, OC, K, P, H = W) of its convs.
IN_SHAPES = [(64, 256, 256), (128, 128, 128), (256, 64, 64)]
CONV_SHAPES = [(3, 64, 7, 3, 256), (256, 256, 3, 1, 64), (64, 3, 7, 3, 256)]
QUICK_IN_SHAPES = [(4, 8, 8)]
QUICK_CONV_SHAPES = [(2, 3, 3, 1, 8)]

H2Z_IMAGES = 1334  # horse2zebra: 1067 horses (trainA), 1334 zebras (trainB)
EPOCHS = 200  # --n_epochs 100 + --n_epochs_decay 100

CPU_WARMUP, CPU_REPS = 1, 3  # CPU ops (perf_counter): a harness check, not a measurement
MODEL_WARMUP, QUICK_MODEL_WARMUP = 3, 1
MODEL_ITERS, QUICK_MODEL_ITERS = 20, 3


# --------------------------------------------------------------------------------------------
# Timing and checking
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of fn() in ms, the device synchronised around every call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def op_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of one op call in ms: do_bench (CUDA events, L2 cleared) on CUDA, else perf_counter."""
    if device.type == "cuda":
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return host_median_ms(fn, device, CPU_WARMUP, CPU_REPS)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN if either holds a NaN)."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= 90 else text[:87] + "..."


# --------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------


def ours_in_relu(x: torch.Tensor) -> torch.Tensor:
    return kernels.instance_norm_relu(x, eps=EPS)


def eager_in_relu(x: torch.Tensor) -> torch.Tensor:
    """nn.InstanceNorm2d (no affine, no running stats) + nn.ReLU(True), as the official model."""
    return F.relu(F.instance_norm(x, eps=EPS), inplace=True)


class EagerReflectConv(nn.Module):
    """nn.ReflectionPad2d + F.conv2d, as the official model (cuDNN on CUDA)."""

    def __init__(self, padding: int):
        super().__init__()
        self.pad = nn.ReflectionPad2d(padding)

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad(x), w, b)


@dataclass
class OpCase:
    """One row: an op, a pass, a shape, a dtype; the inputs, and what to differentiate."""

    op: str  # "in" | "conv"
    pass_name: str
    shape: str
    dtype: str
    work: float  # bytes (unit GB/s) or FLOP (unit TFLOP/s) per call
    unit: str
    ours: Callable[..., torch.Tensor]
    eager: Callable[..., torch.Tensor]
    args: tuple[torch.Tensor, ...]
    wrt: torch.Tensor | None  # None: time the forward; else the gradient w.r.t. this input
    dy: torch.Tensor | None


def _pass_fn(impl: Callable[..., torch.Tensor], case: OpCase) -> Callable[[], torch.Tensor]:
    """The timed call: impl(*args), or (after one forward now) the one gradient d(y . dy)/d(wrt)."""
    if case.wrt is None:
        return lambda: impl(*case.args)
    y = impl(*case.args)
    return lambda: torch.autograd.grad(y, [case.wrt], case.dy, retain_graph=True)[0]


def in_cases(batch: int, dtype: str, device: torch.device, shapes: Sequence[tuple[int, int, int]]) -> list[OpCase]:
    cases = []
    for c, h, w in shapes:
        x = torch.randn(batch, c, h, w, device=device, dtype=DTYPES[dtype]).requires_grad_()
        dy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        shape = f"({batch},{c},{h},{w})"
        for pass_name, work, wrt in (("fwd", 2 * nbytes, None), ("bwd", 3 * nbytes, x)):
            cases.append(OpCase("in", pass_name, shape, dtype, work, "GB/s", ours_in_relu, eager_in_relu,
                                (x,), wrt, dy))
    return cases


def conv_cases(batch: int, dtype: str, device: torch.device,
               shapes: Sequence[tuple[int, int, int, int, int]]) -> list[OpCase]:
    cases = []
    dt = DTYPES[dtype]
    for c, oc, k, p, hw in shapes:
        x = torch.randn(batch, c, hw, hw, device=device, dtype=dt)
        w = torch.randn(oc, c, k, k, device=device, dtype=dt) / math.sqrt(c * k * k)
        b = 0.1 * torch.randn(oc, device=device, dtype=dt)
        ohw = hw + 2 * p - k + 1
        dy = torch.randn(batch, oc, ohw, ohw, device=device, dtype=dt)
        flop = 2 * batch * ohw * ohw * oc * c * k * k
        shape = f"N={batch} {c}→{oc} {k}×{k} p{p} @{hw}²"
        ours = _ours_conv(p)
        for pass_name, x_grad, w_grad in (("fwd", True, True), ("dgrad", True, False), ("wgrad", False, True)):
            xi = x.detach().requires_grad_(x_grad)
            wi = w.detach().requires_grad_(w_grad)
            wrt = None if pass_name == "fwd" else (xi if pass_name == "dgrad" else wi)
            cases.append(OpCase("conv", pass_name, shape, dtype, flop, "TFLOP/s", ours, EagerReflectConv(p),
                                (xi, wi, b), wrt, dy))
    return cases


def _ours_conv(padding: int) -> Callable[..., torch.Tensor]:
    def ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return kernels.reflect_conv2d(x, w, b, padding=padding)

    return ours


def _fmt_rate(work: float, ms: float, unit: str) -> str:
    scale = 1e9 if unit == "GB/s" else 1e12
    v = work / (ms * 1e-3) / scale
    text = f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.3g}"
    return f"{text} {unit}"


def _fmt_ratio(r: float) -> str:
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def run_op_case(case: OpCase, device: torch.device, compile_note: str | None) -> tuple[list[str], bool]:
    """Time ours, eager and compile on one case; check ours against eager. Returns (row, ok)."""
    times: dict[str, float | str] = {}
    outs: dict[str, torch.Tensor] = {}
    for variant in ("ours", "eager", "compile"):
        if variant == "compile" and compile_note:
            times[variant] = compile_note
            continue
        try:
            if variant == "compile":
                torch._dynamo.reset()
                impl = torch.compile(case.eager, dynamic=False)
            else:
                impl = case.ours if variant == "ours" else case.eager
            fn = _pass_fn(impl, case)
            fn()  # compile / autotune / first-touch, outside the timing
            times[variant] = op_ms(fn, device)
            outs[variant] = fn()
        except Exception as e:  # a failing variant is reported in its cell; the run goes on
            times[variant] = f"n/a ({_reason(e)})" if variant == "compile" else f"error ({_reason(e)})"
    err = rel_err(outs["ours"], outs["eager"]) if "ours" in outs and "eager" in outs else math.nan
    ok = err <= TOLERANCES[(case.op, case.dtype)]

    def us(v: float | str) -> str:
        return f"{v * 1e3:.1f}" if isinstance(v, float) else v

    def ratio(v: float | str) -> str:
        t = times["ours"]
        return _fmt_ratio(v / t) if isinstance(v, float) and isinstance(t, float) else "—"

    t_ours = times["ours"]
    rate = _fmt_rate(case.work, t_ours, case.unit) if isinstance(t_ours, float) else "—"
    name = "IN+ReLU" if case.op == "in" else "reflect conv"
    row = [name, case.pass_name, case.shape, case.dtype, us(times["ours"]), us(times["eager"]), us(times["compile"]),
           ratio(times["eager"]), ratio(times["compile"]), rate, f"{err:.1e}", "✓" if ok else "✗"]
    return row, ok


OP_COLUMNS = ["op", "pass", "shape", "dtype", "ours µs", "eager µs", "compile µs", "eager/ours", "compile/ours",
              "ours achieved", "err", "ok"]


def bench_ops(ops: Sequence[str], dtypes: Sequence[str], batches: Sequence[int], device: torch.device,
              quick: bool, compile_note: str | None) -> tuple[list[list[str]], bool]:
    """All op rows, and whether every check passed."""
    rows, all_ok = [], True
    # torch.compile's donated buffers let the backward reuse saved tensors, which forbids the
    # retain_graph=True that times one backward many times.
    with torch._functorch.config.patch(donated_buffer=False):
        for batch in batches:
            for dtype in dtypes:
                cases: list[OpCase] = []
                if "in" in ops:
                    cases += in_cases(batch, dtype, device, QUICK_IN_SHAPES if quick else IN_SHAPES)
                if "conv" in ops:
                    cases += conv_cases(batch, dtype, device, QUICK_CONV_SHAPES if quick else CONV_SHAPES)
                for case in cases:
                    row, ok = run_op_case(case, device, compile_note)
                    rows.append(row)
                    all_ok &= ok
                    print(_md_row(row), file=sys.stderr, flush=True)  # progress
    return rows, all_ok


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------


@dataclass
class ModelResult:
    losses: dict[str, float]  # the first iteration's
    train_ms: float
    peak_mib: float | None  # None off CUDA
    infer_ms: float


def iterations_200_epochs(batch: int) -> int:
    """Iterations of 200 horse2zebra epochs at this batch size, as train.py runs them."""
    return EPOCHS * math.ceil(H2Z_IMAGES / batch)


def run_model_variant(cfg: Config, device: torch.device, amp: torch.dtype | None, variant: str,
                      real_A: torch.Tensor, real_B: torch.Tensor, warmup: int, iters: int) -> ModelResult:
    torch.manual_seed(cfg.seed)
    model = CycleGAN(cfg, device, amp=amp)
    for net in model.nets().values():
        set_fused(net, variant == "ours")
        if variant == "compile":
            net.compile(dynamic=False)
    losses = model.optimize(real_A, real_B)  # the loss check; compiles the compiled variant
    for _ in range(warmup - 1):
        model.optimize(real_A, real_B)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_ms = host_median_ms(lambda: model.optimize(real_A, real_B), device, 0, iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        infer_ms = host_median_ms(lambda: model.netG_A(real_A), device, warmup, iters)
    return ModelResult(losses, train_ms, peak, infer_ms)


def _release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


MODEL_COLUMNS = ["variant", "batch", "amp", "train ms/iter", "eager/this", "peak MiB", "200 epochs",
                 "infer ms", "images/s", "loss Δ vs eager", "ok"]


def bench_model(batches: Sequence[int], amp_name: str, device: torch.device, quick: bool,
                compile_note: str | None, iters: int) -> tuple[list[list[str]], bool]:
    """Model rows (eager, ours, compile per batch size), and whether every check passed."""
    cfg = Config(ngf=4, ndf=4, netG="resnet_6blocks") if quick else Config()
    size = 32 if quick else 256
    warmup = QUICK_MODEL_WARMUP if quick else MODEL_WARMUP
    amp = DTYPES[amp_name] if amp_name != "fp32" else None
    rows, all_ok = [], True
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        real_A = (torch.rand(batch, cfg.input_nc, size, size, generator=gen) * 2 - 1).to(device)
        real_B = (torch.rand(batch, cfg.output_nc, size, size, generator=gen) * 2 - 1).to(device)
        ref: ModelResult | None = None
        for variant in ("eager", "ours", "compile"):
            head = [variant, str(batch), amp_name]
            if variant == "compile" and compile_note:
                rows.append(head + [compile_note] + ["—"] * 6 + [""])
                continue
            try:
                r = run_model_variant(cfg, device, amp, variant, real_A, real_B, warmup, iters)
            except Exception as e:
                failed = variant != "compile"
                cell = f"error ({_reason(e)})" if failed else f"n/a ({_reason(e)})"
                rows.append(head + [cell] + ["—"] * 6 + ["✗" if failed else ""])
                all_ok &= not failed
                continue
            finally:
                _release(device)
            if variant == "eager":
                ref, delta, mark = r, "ref", "ref"
            elif ref is None:
                delta, mark = "no eager reference", "✗"
                all_ok = False
            else:
                d = max(abs(r.losses[k] - ref.losses[k]) / max(abs(ref.losses[k]), 1e-3) for k in LOSS_NAMES)
                ok = d <= MODEL_TOLERANCES[amp_name]  # NaN fails
                delta, mark = f"{d:.1e}", "✓" if ok else "✗"
                all_ok &= ok
            hours = r.train_ms * iterations_200_epochs(batch) / 3.6e6
            rows.append(head + [
                f"{r.train_ms:.1f}",
                _fmt_ratio(ref.train_ms / r.train_ms) if ref is not None else "—",
                f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "n/a (CPU)",
                f"{hours:.1f} h",
                f"{r.infer_ms:.2f}",
                f"{batch / (r.infer_ms * 1e-3):.1f}",
                delta,
                mark,
            ])
            print(_md_row(rows[-1]), file=sys.stderr, flush=True)  # progress
    return rows, all_ok


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [_md_row(columns), _md_row(["---"] * len(columns))]
    lines += [_md_row(r) for r in rows]
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    return f"CPU, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), no GPU used"


def ours_path(device: torch.device) -> str:
    if not use_triton(torch.empty(0, device=device)):
        return "plain PyTorch fallback (CPU without TRITON_INTERPRET=1): ours and eager run the same code"
    if device.type == "cpu":
        return "Triton kernels through the interpreter (TRITON_INTERPRET=1)"
    return "Triton kernels"


def command_line(argv: Sequence[str]) -> str:
    env = "TRITON_INTERPRET=1 " if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return env + " ".join(["python -m kernels.bench", *map(shlex.quote, argv)])


def header(device: torch.device, argv: Sequence[str]) -> str:
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    if device.type == "cuda":
        versions += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "# minicycle benchmark",
        "",
        f"{device_name(device)} · {date} · {versions} · `{command_line(argv)}`",
        "",
        f"- ours: {ours_path(device)}",
        f"- precision: fp32 leaves torch.backends.cudnn.allow_tf32 at {torch.backends.cudnn.allow_tf32} "
        f"(default; cuDNN and our conv then use TF32), cudnn.benchmark={torch.backends.cudnn.benchmark}",
    ])


OPS_LEGEND = (
    "Times are medians (µs). eager/ours, compile/ours: above 1× means ours is faster. ours achieved: "
    "IN+ReLU GB/s with bytes = 2·numel·itemsize (fwd: read x, write y) or 3·numel·itemsize (bwd: read x "
    "and dy, write dx); conv TFLOP/s with FLOP = 2·N·OH·OW·OC·C·KH·KW per pass (fwd, dgrad = dx only, "
    "wgrad = dw only). err = ‖ours − eager‖/‖eager‖ on the benchmarked inputs; ok = within tolerance "
    "(fp32 IN 1e-4, fp32/TF32 conv 5e-3, bf16 2e-2)."
)
MODEL_LEGEND = (
    "One iteration = CycleGAN.optimize (6 G forwards, 6 D forwards, both backwards, both Adam steps); "
    "median ms. eager/this above 1× means faster than eager. peak MiB = torch.cuda.max_memory_allocated "
    "over the timed iterations. 200 epochs = ms/iter × 200·ceil(1334/batch) iterations (horse2zebra). "
    "infer = G_A forward under no_grad. loss Δ = max relative difference of the first iteration's 8 losses "
    "from eager's (same weights, same inputs)."
)


def _csv(choices: Sequence[str] | None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(choices or [])}")
        return items

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def _batches(text: str) -> list[int]:
    return [_positive_int(t) for t in _csv(None)(text)]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="store_true",
                   help="time one full CycleGAN training iteration and G_A inference (instead of the ops, "
                        "unless --ops is also given)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes on CPU to check the harness (ops and model, unless --ops or --model "
                        "narrows it, or TRITON_INTERPRET=1 leaves the model out); not a performance measurement")
    p.add_argument("--ops", type=_csv(OPS), default=None, help="ops to time: in,conv (default: both)")
    p.add_argument("--dtypes", type=_csv(tuple(DTYPES)), default=list(DTYPES), help="op dtypes: fp32,bf16")
    p.add_argument("--batch", type=_batches, default=[1, 4], help="batch sizes (default 1,4)")
    p.add_argument("--amp", choices=tuple(DTYPES), default="fp32",
                   help="model mode: bf16 trains under torch.autocast(bfloat16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile (default: yes, except with --quick)")
    p.add_argument("--iters", type=_positive_int, default=None,
                   help=f"model mode: timed iterations (default {MODEL_ITERS}; --quick {QUICK_MODEL_ITERS})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (CPU with --quick)")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    else:
        device = torch.device(args.device)
    run_ops = args.ops is not None or not args.model
    # Under the Triton interpreter one fused training iteration takes minutes on a CPU, so --quick
    # alone checks the model section only when ours runs the PyTorch path (TRITON_INTERPRET=0).
    interpreted = device.type == "cpu" and use_triton(torch.empty(0))
    run_model = args.model or (args.quick and args.ops is None and not interpreted)
    compile_on = args.compile if args.compile is not None else not args.quick
    compile_note = None if compile_on else ("skipped (--quick; pass --compile)" if args.quick else
                                            "skipped (--no-compile)")
    iters = args.iters or (QUICK_MODEL_ITERS if args.quick else MODEL_ITERS)
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CI machine
    torch.manual_seed(0)

    parts, all_ok = [header(device, argv)], True
    if run_ops:
        rows, ok = bench_ops(args.ops or list(OPS), args.dtypes, args.batch, device, args.quick, compile_note)
        parts += ["## Ops" + (" (--quick: tiny CPU shapes, a harness check)" if args.quick else ""),
                  markdown_table(OP_COLUMNS, rows), OPS_LEGEND]
        all_ok &= ok
    if run_model:
        what = ("ngf=4, ndf=4, resnet_6blocks, basic D, 32×32; --quick: a harness check" if args.quick else
                "resnet_9blocks G ×2, basic D ×2, ngf=ndf=64, 256×256")
        rows, ok = bench_model(args.batch, args.amp, device, args.quick, compile_note, iters)
        parts += [f"## Model: one training iteration and G_A inference ({what})",
                  markdown_table(MODEL_COLUMNS, rows), MODEL_LEGEND]
        all_ok &= ok
    elif args.quick and args.ops is None:
        parts.append("Model section not run: under TRITON_INTERPRET=1 one fused training iteration takes minutes "
                     "on a CPU. `TRITON_INTERPRET=0 python -m kernels.bench --quick` checks it on the PyTorch path; "
                     "`--model` forces it.")
    if not all_ok:
        parts.append("**Some checks failed (✗ above).**")
    report = "\n\n".join(parts) + "\n"
    print(report, end="")
    if args.out:
        out_dir = os.path.dirname(args.out)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
