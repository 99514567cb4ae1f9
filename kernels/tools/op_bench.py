"""Benchmark of minicycle's Triton ops against PyTorch eager and torch.compile.

    python -m kernels.tools.op_bench                                     # IN+ReLU and reflect-conv, fwd and bwd
    python -m kernels.tools.op_bench --ops conv --dtypes bf16 --batch 4  # a slice, to fit a time limit
    python -m kernels.tools.op_bench --layouts channels_last             # the same on channels_last tensors
    python -m kernels.tools.op_bench --quick                             # tiny shapes on CPU: checks the harness itself
    python -m kernels.tools.op_bench --ceilings                          # the device's copy GB/s and matmul TFLOP/s
    python -m kernels.tools.op_bench ... --out FILE.md                   # also write the markdown to FILE.md

Each op is timed at the ResNet generator's shapes (IN_SHAPES, CONV_SHAPES), forward and backward, three ways
on the same inputs: ours (kernels.instance_norm_relu, kernels.reflect_conv2d), eager (the official layers' ops)
and compile (torch.compile of eager, afresh for every row). A backward pass times torch.autograd.grad with
respect to one input only, so that each side computes just that gradient. Every row also checks ours against
eager (TOLERANCES: a row outside makes the exit status 1) and says which path --kernels auto takes there.
BENCHMARKS.md ("What is measured") gives the method and every column; --quick runs on one CPU thread.
The whole training iteration is benchmarked with the model: python -m minicycle.tools.iteration_bench.

kernels/ stands alone: this file imports nothing from minicycle.
"""

import argparse
import datetime
import functools
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo
import torch._functorch.config
import torch.nn as nn
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import kernels
from kernels import choice
from kernels.runtime import cudnn_conv_tf32, pytorch_norm, use_triton

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
OPS = ("in", "conv")
OP_NAMES = {"in": "IN+ReLU", "conv": "reflect conv"}
EPS = 1e-5

# ||ours - eager|| / ||eager||. fp32 conv: both sides use TF32 (10-bit mantissa) products;
# bf16: both sides round their output to bf16 (8-bit mantissa).
TOLERANCES = {("in", "fp32"): 1e-4, ("conv", "fp32"): 5e-3, ("in", "bf16"): 2e-2, ("conv", "bf16"): 2e-2}

# (C, H, W) of the generator's IN+ReLU layers, and (C, OC, K, P, H = W) of its convs.
IN_SHAPES = [(64, 256, 256), (128, 128, 128), (256, 64, 64)]
CONV_SHAPES = [(3, 64, 7, 3, 256), (256, 256, 3, 1, 64), (64, 3, 7, 3, 256)]
QUICK_IN_SHAPES = [(4, 8, 8)]
QUICK_CONV_SHAPES = [(2, 3, 3, 1, 8)]

CPU_WARMUP, CPU_REPS = 1, 3  # CPU ops (perf_counter): a harness check, not a measurement


# ---- Timing and checking ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of fn() in ms, the device synchronised around every call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def op_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of one op call in ms: do_bench (CUDA events, L2 cleared) on CUDA, else perf_counter."""
    if device.type == "cuda":
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return host_median_ms(fn, device, CPU_WARMUP, CPU_REPS)


def reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= 90 else text[:87] + "..."


# ---- Ops -------------------------------------------------------------------------------------------------------------
def ours_in_relu(x: torch.Tensor) -> torch.Tensor:
    return kernels.instance_norm_relu(x, eps=EPS)  # looked up at each call, so that tests can replace it


eager_in_relu = functools.partial(pytorch_norm, eps=EPS, slope=0.0, activation=True)  # the official layers' math


class EagerReflectConv(nn.Module):
    """nn.ReflectionPad2d + F.conv2d, as the official model (cuDNN on CUDA)."""

    def __init__(self, padding: int):
        super().__init__()
        self.pad = nn.ReflectionPad2d(padding)

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad(x), w, b)


@dataclass
class OpCase:
    """One row: an op, a pass, a shape, a dtype, a layout; the inputs, and what to differentiate."""

    op: str  # "in" | "conv"
    pass_name: str
    shape: str
    dtype: str
    layout: str
    work: float  # bytes (unit GB/s) or FLOP (unit TFLOP/s) per call
    unit: str
    ours: Callable[..., torch.Tensor]
    eager: Callable[..., torch.Tensor]
    args: tuple[torch.Tensor, ...]
    wrt: torch.Tensor | None  # None: time the forward; else the gradient w.r.t. this input
    dy: torch.Tensor | None
    auto: Callable[[], str]  # which path --kernels auto takes for this pass (kernels.choice decides)


def _pass_fn(impl: Callable[..., torch.Tensor], case: OpCase) -> Callable[[], torch.Tensor]:
    """The timed call: impl(*args), or (after one forward now) the one gradient d(y . dy)/d(wrt)."""
    if case.wrt is None:
        return lambda: impl(*case.args)
    y = impl(*case.args)
    return lambda: torch.autograd.grad(y, [case.wrt], case.dy, retain_graph=True)[0]


def in_cases(batch: int, dtype: str, layout: str, device: torch.device,
             shapes: Sequence[tuple[int, int, int]]) -> list[OpCase]:
    cases = []
    fmt = LAYOUTS[layout]
    for c, h, w in shapes:
        x = torch.randn(batch, c, h, w, device=device, dtype=DTYPES[dtype]).contiguous(memory_format=fmt)
        x.requires_grad_()
        dy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        shape = f"({batch},{c},{h},{w})"
        for pass_name, work, wrt in (("fwd", 2 * nbytes, None), ("bwd", 3 * nbytes, x)):
            cases.append(OpCase("in", pass_name, shape, dtype, layout, work, "GB/s", ours_in_relu, eager_in_relu,
                                (x,), wrt, dy, lambda x=x: auto_norm(x)))
    return cases


def conv_cases(batch: int, dtype: str, layout: str, device: torch.device,
               shapes: Sequence[tuple[int, int, int, int, int]]) -> list[OpCase]:
    cases = []
    dt, fmt = DTYPES[dtype], LAYOUTS[layout]
    for c, oc, k, p, hw in shapes:
        x = torch.randn(batch, c, hw, hw, device=device, dtype=dt).contiguous(memory_format=fmt)
        w = (torch.randn(oc, c, k, k, device=device, dtype=dt) / math.sqrt(c * k * k)).contiguous(memory_format=fmt)
        b = 0.1 * torch.randn(oc, device=device, dtype=dt)
        ohw = hw + 2 * p - k + 1
        dy = torch.randn(batch, oc, ohw, ohw, device=device, dtype=dt).contiguous(memory_format=fmt)
        flop = 2 * batch * ohw * ohw * oc * c * k * k
        shape = f"N={batch} {c}→{oc} {k}×{k} p{p} @{hw}²"
        ours = functools.partial(kernels.reflect_conv2d, padding=p)
        for pass_name, x_grad, w_grad in (("fwd", True, True), ("dgrad", True, False), ("wgrad", False, True)):
            xi = x.detach().requires_grad_(x_grad)
            wi = w.detach().requires_grad_(w_grad)
            wrt = None if pass_name == "fwd" else (xi if pass_name == "dgrad" else wi)
            cases.append(OpCase("conv", pass_name, shape, dtype, layout, flop, "TFLOP/s", ours, EagerReflectConv(p),
                                (xi, wi, b), wrt, dy, lambda a=(x, w, b, p), n=pass_name: auto_conv(*a, n)))
    return cases


def auto_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padding: int, pass_name: str) -> str:
    """The path --kernels auto takes for this pass of a training conv: kernels.choice's own decision
    (measured now on these inputs, or already made in this process or found in its cache file)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()  # a training layer: all three passes
    decision = choice.CHOOSER.conv_decision(x, w, b, padding)
    return decision.verdict(choice.PASSES["conv"].index(pass_name), x.is_cuda)


def auto_norm(x: torch.Tensor) -> str:
    """The path --kernels auto takes for a training IN+ReLU on x (forward and backward, one choice)."""
    return choice.CHOOSER.norm_decision(x.detach().requires_grad_(), EPS, 0.0, True).verdict(0)


def _fmt_rate(work: float, ms: float, unit: str) -> str:
    scale = 1e9 if unit == "GB/s" else 1e12
    v = work / (ms * 1e-3) / scale
    text = f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.3g}"
    return f"{text} {unit}"


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
            times[variant] = f"n/a ({reason(e)})" if variant == "compile" else f"error ({reason(e)})"
    err = choice.rel_err(outs["ours"], outs["eager"]).whole if "ours" in outs and "eager" in outs else math.nan
    ok = err <= TOLERANCES[(case.op, case.dtype)]
    try:
        # after the row's timing, which its own measurement would disturb; on a CPU the ops decide
        auto = case.auto().replace("|", "/") if choice.CHOOSER.applies(case.args[0]) else "the ops' own (CPU)"
    except Exception as e:  # reported in its cell; the run goes on
        auto = f"error ({reason(e)})"

    def us(v: float | str) -> str:
        return f"{v * 1e3:.1f}" if isinstance(v, float) else v

    def ratio(v: float | str) -> str:
        r = v / times["ours"] if isinstance(v, float) and isinstance(times["ours"], float) else None
        return "—" if r is None else f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"

    t_ours = times["ours"]
    rate = _fmt_rate(case.work, t_ours, case.unit) if isinstance(t_ours, float) else "—"
    row = [OP_NAMES[case.op], case.pass_name, case.shape, case.dtype, case.layout,
           us(times["ours"]), us(times["eager"]), us(times["compile"]), ratio(times["eager"]), ratio(times["compile"]),
           rate, auto, f"{err:.1e}", "✓" if ok else "✗"]
    return row, ok


OP_COLUMNS = ["op", "pass", "shape", "dtype", "layout", "ours µs", "eager µs", "compile µs", "eager/ours",
              "compile/ours", "ours achieved", "auto takes", "err", "ok"]


def bench_ops(ops: Sequence[str], dtypes: Sequence[str], layouts: Sequence[str], batches: Sequence[int],
              device: torch.device, quick: bool, compile_note: str | None, budget_s: float | None,
              rows: list[list[str]], on_row: Callable[[], None]) -> bool:
    """Appends every op row, calling on_row() after each (a run cut short keeps what it measured);
    returns whether every check passed. Rows not started within budget_s are skipped."""
    all_ok = True
    start = time.monotonic()
    # torch.compile's donated buffers let the backward reuse saved tensors, which forbids the
    # retain_graph=True that times one backward many times.
    with torch._functorch.config.patch(donated_buffer=False):
        for batch in batches:
            for dtype in dtypes:
                for layout in layouts:
                    cases: list[OpCase] = []
                    if "in" in ops:
                        cases += in_cases(batch, dtype, layout, device, QUICK_IN_SHAPES if quick else IN_SHAPES)
                    if "conv" in ops:
                        cases += conv_cases(batch, dtype, layout, device, QUICK_CONV_SHAPES if quick else CONV_SHAPES)
                    for case in cases:
                        if budget_s is not None and time.monotonic() - start > budget_s:
                            rows.append([OP_NAMES[case.op], case.pass_name, case.shape, case.dtype, case.layout,
                                         f"skipped (--budget {budget_s:.0f} s spent)"] + ["—"] * 8)
                        else:
                            row, ok = run_op_case(case, device, compile_note)
                            rows.append(row)
                            all_ok &= ok
                            print(md_row(row), file=sys.stderr, flush=True)  # progress
                        on_row()
    return all_ok


def ceilings(device: torch.device, quick: bool) -> list[list[str]]:
    """Rows (what, median µs, rate) of a device-to-device copy and of square bf16 and TF32 matmuls (--quick:
    1 MiB and 256^3)."""
    n = (2**20 if quick else 2**30) // 4  # fp32 elements
    x, y = torch.empty(n, device=device), torch.empty(n, device=device)
    ms = op_ms(lambda: y.copy_(x), device)
    rows = [[f"copy {n * 4 >> 20} MiB, device to device", f"{ms * 1e3:.1f}", _fmt_rate(2 * n * 4, ms, "GB/s")]]
    m, precision = 256 if quick else 8192, torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "TF32")):
        a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in "ab")
        ms = op_ms(lambda a=a, b=b: a @ b, device)
        rows.append([f"matmul {m}³, {label}", f"{ms * 1e3:.1f}", _fmt_rate(2 * m**3, ms, "TFLOP/s")])
    torch.set_float32_matmul_precision(precision)
    return rows


DECISION_COLUMNS = ["layer", "pass", "auto takes", "Triton ms", "PyTorch ms", "err", "worst-tile err", "tolerance"]


def decision_rows() -> list[list[str]]:
    """Every decision of --kernels auto in this process, per pass: the path, the two medians, and the parity
    check's errors (kernels.choice.rel_err, Triton against PyTorch: whole output, worst tile)."""
    rows = []
    for key, d in choice.CHOOSER.decisions.items():
        tol = choice.TOLERANCES.get(getattr(torch, key[2].removeprefix("torch."), None))
        for i, pass_name in enumerate(choice.PASSES[d.op]):
            takes = d.verdict(i, key[0].type == "cuda").replace("|", "/") + (" (cached)" if d.cached else "")
            ms = [f"{t:.3f}" for t in d.ms[i]] if d.ms else ["—", "—"]
            err = [f"{e:.1e}" for e in d.errors[i]] if d.errors and i < len(d.errors) else ["—", "—"]
            rows.append([d.label, pass_name, takes, *ms, *err, f"{tol:.0e}" if tol else "—"])
    return rows


def decisions_section() -> list[str]:
    """The markdown parts of auto's decisions, or none if it made none."""
    rows = decision_rows()
    return ["## What --kernels auto decided, and the parity check's errors", markdown_table(DECISION_COLUMNS, rows),
            f"Deciding took {choice.CHOOSER.seconds:.1f} s in all."] if rows else []


# ---- Report ----------------------------------------------------------------------------------------------------------
def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [md_row(columns), md_row(["---"] * len(columns))]
    lines += [md_row(r) for r in rows]
    return "\n".join(lines)


def ours_path(device: torch.device) -> str:
    if not use_triton(torch.empty(0, device=device)):
        return "plain PyTorch fallback (CPU without TRITON_INTERPRET=1): ours and eager run the same code"
    if device.type == "cpu":
        return "Triton kernels through the interpreter (TRITON_INTERPRET=1)"
    return "Triton kernels"


def header(device: torch.device, prog: str, argv: Sequence[str], title: str = "minicycle benchmark") -> str:
    """Title, device, date, versions and the exact command, and the settings every table depends on."""
    name = f"CPU, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), no GPU used"
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        name = f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
        versions += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = "TRITON_INTERPRET=1 " if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return "\n".join([
        f"# {title}",
        "",
        f"{name} · {date} · {versions} · `{env}{' '.join([prog, *map(shlex.quote, argv)])}`",
        "",
        f"- ours: {ours_path(device)}",
        f"- precision: fp32 convs {'use' if cudnn_conv_tf32() else 'do not use'} TF32 (torch's cuDNN conv setting, "
        f"default TF32; our conv follows it); cudnn.benchmark={torch.backends.cudnn.benchmark}",
    ])


def write_file(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def document(parts: Sequence[str], ok: bool = True) -> str:
    """A report of these markdown parts, which says at its end whether a check failed."""
    return "\n\n".join([*parts, *([] if ok else ["**Some checks failed (✗ above).**"])]) + "\n"


def write_report(report: str, path: str | None) -> None:
    """Print the markdown report, and write it to path too when given."""
    print(report, end="")
    if path:
        write_file(path, report)


def legend(part: str) -> str:
    """The line under a report's table: where its columns are defined."""
    return f'Every column is defined in BENCHMARKS.md, "What is measured" ({part}).'


def csv_list(choices: Sequence[str] | None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(choices or [])}")
        return items

    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def common_args(p: argparse.ArgumentParser) -> None:
    """The flags the op and the iteration benchmarks share."""
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes on the CPU to check the harness; not a performance measurement")
    p.add_argument("--batch", type=lambda t: [positive_int(v) for v in csv_list(None)(t)], default=[1, 4],
                   help="batch sizes (default 1,4)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile (default: yes, except with --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: rows not started by then are skipped (to fit a time limit)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (CPU with --quick)")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")


def setup(args: argparse.Namespace, cpu_only: bool) -> tuple[torch.device, str | None]:
    """The device (auto: CUDA when available, unless cpu_only) and why torch.compile is skipped (None: it runs).
    cudnn.benchmark is on, as the official code and train.py set it."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not cpu_only else "cpu")
    else:
        device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    if args.quick:
        torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CI machine
    if args.compile if args.compile is not None else not args.quick:
        return device, None
    return device, "skipped (--quick; pass --compile)" if args.quick else "skipped (--no-compile)"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernels.tools.op_bench", description=__doc__.splitlines()[0])
    common_args(p)
    p.add_argument("--ops", type=csv_list(OPS), default=list(OPS), help="ops to time: in,conv (default: both)")
    p.add_argument("--dtypes", type=csv_list(tuple(DTYPES)), default=list(DTYPES), help="dtypes: fp32,bf16")
    p.add_argument("--layouts", type=csv_list(tuple(LAYOUTS)), default=["nchw"],
                   help="memory layouts: nchw,channels_last (default nchw)")
    p.add_argument("--ceilings", action="store_true",
                   help="time the device's ceilings instead: copy GB/s, bf16 and TF32 matmul TFLOP/s")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device, compile_note = setup(args, cpu_only=args.quick)
    torch.manual_seed(0)
    top = header(device, "python -m kernels.tools.op_bench", argv)
    quick = " (--quick: tiny CPU shapes, a harness check)" if args.quick else ""
    if args.ceilings:
        rows = ceilings(device, args.quick)
        write_report(document([top, "## Device ceilings" + quick, markdown_table(["what", "median µs", "rate"], rows)]),
                     args.out)
        return 0
    rows = []

    def report(ok: bool = True) -> str:
        parts = [top, "## Ops" + quick, markdown_table(OP_COLUMNS, rows), legend("Ops"), *decisions_section()]
        return document(parts, ok)

    ok = bench_ops(args.ops, args.dtypes, args.layouts, args.batch, device, args.quick, compile_note, args.budget,
                   rows, lambda: args.out and write_file(args.out, report()))  # a run cut short keeps its rows
    write_report(report(ok), args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
