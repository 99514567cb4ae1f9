"""Benchmark of one CycleGAN training iteration, and of its generator's inference: ours against the official
model eager, compiled, and with CUDA graphs; also the kernel launches of one iteration, counted on a CPU.

    python -m minicycle.tools.iteration_bench                       # GPU: batch 1 and 4, fp32, every variant
    python -m minicycle.tools.iteration_bench --amp bf16 --batch 1  # a slice, to fit a time limit
    python -m minicycle.tools.iteration_bench --channels_last       # model and inputs in channels_last
    python -m minicycle.tools.iteration_bench --kernels triton,auto # the ours variants once per --kernels mode
    python -m minicycle.tools.iteration_bench --profile-dir DIR     # + a torch.profiler summary of one iteration each
    python -m minicycle.tools.iteration_bench --infer --size 6000,8000 --batch 1   # G_A on large photos, checked
    TRITON_INTERPRET=1 python -m minicycle.tools.iteration_bench --count-launches  # launches of one iteration (CPU)
    python -m minicycle.tools.iteration_bench --cpu                 # CPU: train.py's step against a plain eager loop
    python -m minicycle.tools.iteration_bench --plain-loop 300      # CPU: the plain loop alone, timed against train.py
    python -m minicycle.tools.iteration_bench --quick               # tiny model on the CPU: checks the harness itself
    python -m minicycle.tools.iteration_bench ... --out FILE.md     # also write the markdown to FILE.md

The model (--netG, --ngf = --ndf, --size H[,W]; by default the paper's: resnet_9blocks, 64, 256x256) is
built from the same seed (same weights, same inputs) in each variant: eager (the official layers), ours (the
fused ops as train.py runs them, once per --kernels mode; rows of a mode other than auto name it), ours+graph
(train.py --cuda_graph: cuda_graph.GraphedStep), ours+compile (train.py --compile), compile (eager, each net
compiled) and reduce-overhead (the same with Inductor's CUDA graphs). BENCHMARKS.md ("What is measured") says
how each mode measures and defines every column. --quick (resnet_6blocks, ngf 4, 32x32, one CPU thread, no
compiled variants unless --compile) only checks the harness.
"""

import argparse
import contextlib
import gc
import itertools
import math
import os
import random
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import torch._dynamo
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function

from kernels import choice
from kernels.runtime import use_triton
from kernels.tools import op_bench as kb
from minicycle import datasets, memory, networks
from minicycle.cuda_graph import GraphedStep
from minicycle.data import image_to_tensor, load_image
from minicycle.model import LOSS_NAMES, Config, CycleGAN, GANLoss
from minicycle.pool import ImagePool

VARIANTS = ("eager", "ours", "ours+graph", "ours+compile", "compile", "reduce-overhead")
TIMED = ("eager", "ours", "ours+graph", "compile", "reduce-overhead")  # the default, in this order: compiles last
COUNTED = ("eager", "ours", "ours+graph", "ours+compile", "compile")
INFERRED = ("eager", "ours", "ours+compile", "compile")
CPU_VARIANTS = {"plain loop": "eager", "optimize, eager": "eager", "optimize": "ours", "graph-ready step": "ours+graph"}
MODEL_TOLERANCES = {"fp32": 1e-2, "bf16": 5e-2}  # relative: the first iteration's losses, or G_A's output, vs eager's
WARMUP = 5  # ours+graph: 3 eager steps, the capture, one replay
COUNT_WARMUP = 2  # the counted iteration is the third
ITERS, QUICK_ITERS = 20, 3
H2Z_IMAGES, EPOCHS = 1334, 200  # horse2zebra's larger domain; --n_epochs 100 + --n_epochs_decay 100
QUICKSTART = dict(netG="resnet_6blocks", ngf=16, ndf=16)  # train.py's preset for the built-in dataset, 32x32
IN_SPLIT_AT_256 = 4096  # kernels.instance_norm._MAX_BLOCK, elements: scaled by pixels / 256² in --count-launches


def iterations_200_epochs(batch: int) -> int:
    """Iterations of 200 horse2zebra epochs at this batch size, as train.py runs them."""
    return EPOCHS * math.ceil(H2Z_IMAGES / batch)


# ---- The variants, and the loop over them ----------------------------------------------------------------------------
def runs(variants: Sequence[str], kernels: Sequence[str]) -> list[tuple[str, str]]:
    """(variant, kernels mode) in order: each ours variant once per --kernels mode, the others on PyTorch's layers."""
    return [(v, k) for v in variants for k in (kernels if v.startswith("ours") else ["pytorch"])]


def label(variant: str, kernels: str) -> str:
    return f"{variant} ({kernels})" if variant.startswith("ours") and kernels != "auto" else variant


def build(variant: str, kernels: str, cfg: Config, device: torch.device, amp: torch.dtype | None, batch: int,
          channels_last: bool) -> tuple[CycleGAN, Callable[[torch.Tensor, torch.Tensor], None], Callable[[], list]]:
    """The model, one iteration step(real_A, real_B), and read() -> the losses of the steps since the last read."""
    torch.manual_seed(cfg.seed)
    model = CycleGAN(cfg, device, amp=amp)
    if channels_last:
        model.set_memory_format(torch.channels_last)  # as train.py --channels_last: weights, Adam moments, pools
    for net in model.nets().values():
        networks.set_kernels(net, kernels)
        if variant.endswith("compile") or variant == "reduce-overhead":
            net.compile(mode="reduce-overhead" if variant == "reduce-overhead" else None)
    if variant == "ours+graph":
        graphed = GraphedStep(model, batch, graph=device.type == "cuda")
        return model, graphed.step, graphed.read
    done: list[dict[str, float]] = []

    def step(real_A: torch.Tensor, real_B: torch.Tensor) -> None:
        if variant == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        done.append(model.optimize(real_A, real_B))

    def read() -> list[dict[str, float]]:
        out = done[:]
        done.clear()
        return out

    return model, step, read


def images(batch: int, size: tuple[int, int], device: torch.device, channels_last: bool) -> list[torch.Tensor]:
    """real_A, real_B: uniform in [-1, 1], the same for every variant."""
    gen = torch.Generator().manual_seed(batch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(torch.rand(batch, 3, *size, generator=gen) * 2 - 1).to(device).contiguous(memory_format=fmt) for _ in "AB"]


Measure = Callable[[str, str, int, dict], tuple[list[str], bool]]  # (variant, kernels, batch, the batch's state)


def each_run(args: argparse.Namespace, device: torch.device, compile_note: str | None, width: int,
             measure: Measure, rows: list[list[str]], on_row: Callable[[], None]) -> bool:
    """For each batch size and run: a row [variant, layout, batch, amp] + measure()'s `width` cells, or a skipped
    or failed one, calling on_row() after each so that a run cut short keeps what it measured (measure keeps
    what the batch's runs share, eager's results among them, in its dict). Returns whether every check passed."""
    all_ok, start = True, time.monotonic()
    layout = "channels_last" if args.channels_last else "nchw"
    for batch in args.batch:
        state: dict = {}
        for variant, kernels in runs(args.variants, args.kernels):
            head = [label(variant, kernels), layout, str(batch), args.amp]
            skip = None
            if ("compile" in variant or variant == "reduce-overhead") and compile_note:
                skip = compile_note
            elif variant == "reduce-overhead" and device.type != "cuda":
                skip = "n/a (CUDA graphs need CUDA)"
            elif args.budget is not None and time.monotonic() - start > args.budget:
                skip = f"skipped (--budget {args.budget:.0f} s spent)"
            try:
                cells, ok = ([skip] + ["—"] * (width - 2) + [""], True) if skip else measure(variant, kernels, batch,
                                                                                             state)
            except Exception as e:  # a failing variant is reported in its row; the run goes on
                ok = not (variant.startswith("ours") or variant == "eager")  # a compile that fails is only n/a
                cells = [f"{'n/a' if ok else 'error'} ({kb.reason(e)})"] + ["—"] * (width - 2) + ["" if ok else "✗"]
            finally:
                torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(head + cells)
            all_ok &= ok
            print(kb.md_row(rows[-1]), file=sys.stderr, flush=True)  # progress
            on_row()
    return all_ok


# ---- Training --------------------------------------------------------------------------------------------------------
def profile_iteration(step: Callable, read: Callable, real_A: torch.Tensor, real_B: torch.Tensor, train_ms: float,
                      path: Path) -> list[str]:
    """One iteration under torch.profiler: [GPU busy ms, host op ms, wall ms, kernels, host launch calls,
    top kernels]."""
    from torch.autograd import DeviceType

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if real_A.is_cuda else [])
    with profile(activities=activities) as prof:
        step(real_A, real_B)
        read()
        kb.sync(real_A.device)
    events = prof.events()
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    busy: dict[str, float] = {}
    for e in device_events:
        busy[e.name] = busy.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
    host = [e for e in events if e.device_type == DeviceType.CPU]
    launches = [e for e in host if "LaunchKernel" in e.name or "GraphLaunch" in e.name]
    host_ms = sum(e.self_cpu_time_total for e in host) / 1e3
    path.parent.mkdir(parents=True, exist_ok=True)
    sort = "self_device_time_total" if device_events else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90) + "\n")
    top = sorted(busy.items(), key=lambda kv: -kv[1])[:3]
    return [f"{sum(busy.values()):.2f}", f"{host_ms:.2f}", f"{train_ms:.2f}", f"{len(kernels):,}", f"{len(launches):,}",
            "; ".join(f"{_short(n)} {ms:.2f}" for n, ms in top) or "—"]


def _short(name: str) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= 48 else name[:45] + "..."


MODEL_COLUMNS = ["variant", "layout", "batch", "amp", "train ms/iter", "eager/this", "peak MiB", "200 epochs",
                 "infer ms", "images/s", "loss Δ vs eager", "ok"]
PROFILE_COLUMNS = ["variant", "layout", "batch", "amp", "GPU busy ms", "host op ms", "wall ms/iter", "kernels",
                   "host launch calls", "top kernels (ms)"]


def train_measure(args: argparse.Namespace, cfg: Config, device: torch.device, prof_rows: list[list[str]]) -> Measure:
    """measure() of one training row (see each_run and the legend); a profile row goes to prof_rows."""
    amp = kb.DTYPES[args.amp] if args.amp != "fp32" else None
    layout = "channels_last" if args.channels_last else "nchw"

    def measure(variant: str, kernels: str, batch: int, state: dict) -> tuple[list[str], bool]:
        if "images" not in state:
            state["images"] = images(batch, args.size, device, args.channels_last)
        real_A, real_B = state["images"]
        model, step, read = build(variant, kernels, cfg, device, amp, batch, args.channels_last)
        step(real_A, real_B)
        losses = read()[0]  # the loss check; compiles, autotunes
        for _ in range(WARMUP - 1):
            step(real_A, real_B)
        read()
        kb.sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step(real_A, real_B)
        read()
        kb.sync(device)
        train_ms = (time.perf_counter() - t0) / args.iters * 1e3
        peak = f"{torch.cuda.max_memory_reserved(device) / 2**20:,.0f}" if device.type == "cuda" else "n/a (CPU)"
        # The training numbers are in: a failing profiler or inference costs only its own cells.
        head = [label(variant, kernels), layout, str(batch), args.amp]
        if args.profile_dir:
            path = args.profile_dir / f"{'-'.join(re.findall(r'[a-z]+', head[0]))}-b{batch}-{args.amp}-{layout}.txt"
            try:
                prof_rows.append(head + profile_iteration(step, read, real_A, real_B, train_ms, path))
            except Exception as e:
                prof_rows.append(head + [f"n/a ({kb.reason(e)})"] + ["—"] * 5)
        infer_ms: float | str = "as ours"  # ours+graph: the same generator
        if variant != "ours+graph":
            try:
                with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    infer_ms = kb.host_median_ms(lambda: model.netG_A(real_A), device, WARMUP, args.iters)
            except Exception as e:
                infer_ms = f"n/a ({kb.reason(e)})"
        if variant == "eager":
            state["eager"] = (losses, train_ms)
        ref = state.get("eager")
        delta, mark, ok = "ref", "ref", True
        if ref is None:
            delta, mark, ok = "no eager reference", "✗", False
        elif variant != "eager":
            d = max(abs(losses[k] - ref[0][k]) / max(abs(ref[0][k]), 1e-3) for k in LOSS_NAMES)
            ok = d <= MODEL_TOLERANCES[args.amp]  # NaN fails
            delta, mark = f"{d:.1e}", "✓" if ok else "✗"
        timed = isinstance(infer_ms, float)
        return [f"{train_ms:.1f}", f"{ref[1] / train_ms:.2f}×" if ref else "—", peak,
                f"{train_ms * iterations_200_epochs(batch) / 3.6e6:.1f} h", f"{infer_ms:.2f}" if timed else infer_ms,
                f"{batch / (infer_ms * 1e-3):.1f}" if timed else "—", delta, mark], ok

    return measure


# ---- Inference -------------------------------------------------------------------------------------------------------
INFER_COLUMNS = ["variant", "layout", "batch", "amp", "infer ms", "eager/this", "megapixels/s", "peak GiB",
                 "estimate GiB", "max abs Δ vs eager", "err", "worst-tile err", "ok"]


def infer_measure(args: argparse.Namespace, cfg: Config, device: torch.device) -> Measure:
    """measure() of one inference row (see each_run)."""
    amp = kb.DTYPES[args.amp] if args.amp != "fp32" else None
    with torch.device("meta"):
        shadow = networks.set_kernels(networks.define_G(3, 3, cfg.ngf, cfg.netG), "pytorch")
    cuda = device.type == "cuda"

    def measure(variant: str, kernels: str, batch: int, state: dict) -> tuple[list[str], bool]:
        if "x" not in state:
            state["x"] = images(batch, args.size, device, args.channels_last)[0]
        x = state["x"]
        net = build(variant, kernels, cfg, device, amp, batch, args.channels_last)[0].netG_A
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            y = net(x)  # compiles, autotunes, decides
            kb.sync(device)
            before = torch.cuda.memory_allocated(device) if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            ms = kb.host_median_ms(lambda: net(x), device, 0, args.iters)
        peak = f"{(torch.cuda.max_memory_allocated(device) - before + x.nbytes) / 2**30:.2f}" if cuda else "n/a (CPU)"
        if variant == "eager":
            state["eager"] = (y, ms)
        ref, check, ok = state.get("eager"), ["ref"] * 4, True
        if ref is None:
            check, ok = ["no eager reference", "—", "—", "✗"], False
        elif variant != "eager":
            err = choice.rel_err(y, ref[0])
            ok = err.whole <= MODEL_TOLERANCES[args.amp]  # NaN fails
            check = [f"{(y.float() - ref[0].float()).abs().max():.1e}", f"{err.whole:.1e}", f"{err.tile:.1e}",
                     "✓" if ok else "✗"]
        return [f"{ms:.1f}", f"{ref[1] / ms:.2f}×" if ref else "—", f"{x.numel() / 3 / (ms * 1e3):.1f}", peak,
                f"{memory.forward_bytes(shadow, tuple(x.shape)) / 2**30:.2f}", *check], ok

    return measure


# ---- Launch count ----------------------------------------------------------------------------------------------------
# ATen ops that launch no kernel on a GPU: views, allocations, metadata.
NO_KERNEL = {
    "aten::" + name for name in (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "view", "_unsafe_view",
        "_reshape_alias", "view_as", "reshape", "as_strided", "expand", "expand_as", "t", "transpose", "permute",
        "squeeze", "unsqueeze", "detach", "detach_", "alias", "slice", "select", "unbind", "split", "chunk",
        "narrow", "flatten", "lift_fresh", "requires_grad_", "set_", "contiguous", "to", "_nnpack_available",
        "is_nonzero", "item", "_local_scalar_dense", "result_type", "size", "stride", "numel", "dim",
    )
}
COPIES = {"aten::copy_", "aten::clone", "aten::_to_copy"}  # composite ops that copy only sometimes


@dataclass
class Count:
    aten: Counter = field(default_factory=Counter)  # top-level ATen ops that launch a kernel, by name
    no_kernel: int = 0
    custom: int = 0
    triton: Counter = field(default_factory=Counter)
    inductor: int = 0

    @property
    def launches(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values()) + self.inductor


def triton_launches_recorded() -> contextlib.AbstractContextManager:
    """Every Triton launch becomes a profiler event triton::<kernel> and does nothing else."""
    from triton.runtime.interpreter import InterpretedFunction

    def launch(self, *args, **kwargs):
        with record_function(f"triton::{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"):
            pass

    return mock.patch.object(InterpretedFunction, "run", launch)


def count_events(events) -> Count:
    """Classify the profiler events of one iteration (BENCHMARKS.md, "Kernel launches"): ATen ops are the aten::
    events not nested in another, those in NO_KERNEL launch no kernel unless they copy; minicycle:: events are
    custom ops, triton:: events Triton launches, cpp_fused_* Inductor's CPU kernels."""
    c = Count()
    for e in events:
        name, parent = e.name, e.cpu_parent
        while parent is not None and not parent.name.startswith(("aten::", "triton::")):
            parent = parent.cpu_parent
        if parent is not None:
            continue  # inside an op already counted, or inside a launch
        if name.startswith("triton::"):
            c.triton[name[len("triton::"):]] += 1
        elif name.startswith("minicycle::"):
            c.custom += 1
        elif "cpp_fused" in name:
            c.inductor += 1
        elif name.startswith("aten::"):
            copies = name in {"aten::reshape", "aten::contiguous", "aten::to", "aten::flatten"} and _copies(e)
            if name in NO_KERNEL and not copies:
                c.no_kernel += 1
            else:
                c.aten[name] += 1
    return c


def _copies(event) -> bool:
    return any(child.name in COPIES or _copies(child) for child in event.cpu_children)


def count_launches(variant: str, kernels: str, cfg: Config, size: tuple[int, int], channels_last: bool) -> Count:
    """The launches of the third iteration of this variant at batch 1, on the CPU."""
    model, step, _ = build(variant, kernels, cfg, torch.device("cpu"), None, 1, channels_last)
    for opt in model.optimizers():
        for group in opt.param_groups:
            group["foreach"] = True  # PyTorch's default on CUDA (a CPU defaults to a loop over parameters)
    real_A, real_B = images(1, size, torch.device("cpu"), channels_last)
    with triton_launches_recorded():
        for _ in range(COUNT_WARMUP):
            step(real_A, real_B)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(real_A, real_B)
    return count_events(prof.events())


COUNT_COLUMNS = ["build", "launches", "ATen ops with a kernel", "ATen ops without (views, allocations)",
                 "custom ops (minicycle::)", "Triton launches", "Inductor kernels"]


def count_row(name: str, c: Count) -> list[str]:
    return [name, f"{c.launches:,}", f"{sum(c.aten.values()):,}", f"{c.no_kernel:,}", f"{c.custom:,}",
            f"{sum(c.triton.values()):,}", f"{c.inductor:,}"]


def count_detail(name: str, c: Count, top: int = 12) -> str:
    ops = ", ".join(f"{n.removeprefix('aten::')} {k}" for n, k in c.aten.most_common(top))
    kernels_ = ", ".join(f"{n} {k}" for n, k in c.triton.most_common())
    return f"- {name}: ATen {ops}" + (f"; Triton {kernels_}" if kernels_ else "")


# ---- CPU mode --------------------------------------------------------------------------------------------------------
def plain_step(nets: dict[str, nn.Module], opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer,
               pools: dict[str, ImagePool], real_A: torch.Tensor, real_B: torch.Tensor, cfg: Config) -> list[float]:
    """The official CycleGAN iteration written out plainly (models/cycle_gan_model.py): the reference loop."""
    G_A, G_B, D_A, D_B = nets["G_A"], nets["G_B"], nets["D_A"], nets["D_B"]
    gan, l1 = GANLoss(cfg.gan_mode), nn.L1Loss()
    fake_B = G_A(real_A)
    rec_A = G_B(fake_B)
    fake_A = G_B(real_B)
    rec_B = G_A(fake_A)
    for p in itertools.chain(D_A.parameters(), D_B.parameters()):
        p.requires_grad_(False)
    opt_G.zero_grad(set_to_none=True)
    idt_A = G_A(real_B)
    idt_B = G_B(real_A)
    loss_idt_A = l1(idt_A, real_B) * cfg.lambda_B * cfg.lambda_identity
    loss_idt_B = l1(idt_B, real_A) * cfg.lambda_A * cfg.lambda_identity
    loss_G_A = gan(D_A(fake_B), True)
    loss_G_B = gan(D_B(fake_A), True)
    loss_cycle_A = l1(rec_A, real_A) * cfg.lambda_A
    loss_cycle_B = l1(rec_B, real_B) * cfg.lambda_B
    (loss_G_A + loss_G_B + loss_cycle_A + loss_cycle_B + loss_idt_A + loss_idt_B).backward()
    opt_G.step()
    for p in itertools.chain(D_A.parameters(), D_B.parameters()):
        p.requires_grad_(True)
    opt_D.zero_grad(set_to_none=True)
    fake_B_pooled = pools["B"].query(fake_B)
    loss_D_A = (gan(D_A(real_B), True) + gan(D_A(fake_B_pooled.detach()), False)) * 0.5
    loss_D_A.backward()
    fake_A_pooled = pools["A"].query(fake_A)
    loss_D_B = (gan(D_B(real_A), True) + gan(D_B(fake_A_pooled.detach()), False)) * 0.5
    loss_D_B.backward()
    opt_D.step()
    losses = (loss_D_A, loss_G_A, loss_cycle_A, loss_idt_A, loss_D_B, loss_G_B, loss_cycle_B, loss_idt_B)
    return [v.item() for v in losses]


def cpu_steppers(cfg: Config, variants: Sequence[str] = tuple(CPU_VARIANTS)
                 ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], list[float]]]:
    """Each CPU variant's step, returning its losses, freshly built from the same seed (same weights)."""
    steppers = {}
    for name in variants:
        variant = CPU_VARIANTS[name]
        model, step, read = build(variant, "pytorch" if variant == "eager" else "auto", cfg, torch.device("cpu"),
                                  None, 1, False)
        if name == "plain loop":
            # The model's nets, initialised identically; everything else is the plain loop's own.
            nets = model.nets()
            betas = (cfg.beta1, 0.999)
            opt_G = torch.optim.Adam(itertools.chain(nets["G_A"].parameters(), nets["G_B"].parameters()),
                                     lr=cfg.lr, betas=betas)
            opt_D = torch.optim.Adam(itertools.chain(nets["D_A"].parameters(), nets["D_B"].parameters()),
                                     lr=cfg.lr, betas=betas)
            pools = {"A": ImagePool(cfg.pool_size, cfg.seed * 2 + 1), "B": ImagePool(cfg.pool_size, cfg.seed * 2 + 2)}
            steppers[name] = lambda a, b, n=nets, g=opt_G, d=opt_D, p=pools: plain_step(n, g, d, p, a, b, cfg)
        else:  # one read per step: train.py reads less often with --cuda_graph
            steppers[name] = lambda a, b, s=step, r=read: (s(a, b), list(r()[0].values()))[1]
    return steppers


CPU_COLUMNS = ["variant", "iterations/s", "vs plain loop", "first losses vs plain loop"]


def bench_cpu(iters: int, rounds: int) -> tuple[list[list[str]], str]:
    """The rows, and a note of the machine's load average before and after (the CPU may be shared)."""
    load = os.getloadavg()[0]
    cfg = Config(**QUICKSTART)
    gen = torch.Generator().manual_seed(0)
    pairs = [tuple(torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1 for _ in "AB") for _ in range(16)]
    steppers = cpu_steppers(cfg)
    first = {name: step(*pairs[0]) for name, step in steppers.items()}
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    per_round = max(1, iters // rounds)
    for r in range(rounds):
        for name, step in steppers.items():
            t0 = time.perf_counter()
            for i in range(per_round):
                step(*pairs[(r * per_round + i) % len(pairs)])
            rates[name].append(per_round / (time.perf_counter() - t0))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()),
              file=sys.stderr, flush=True)
    plain = statistics.median(rates["plain loop"])
    rows = []
    for name in steppers:
        rate = statistics.median(rates[name])
        diff = max(abs(a - b) / max(abs(b), 1e-3) for a, b in zip(first[name], first["plain loop"]))
        rows.append([name, f"{rate:.1f}", f"{rate / plain:.2f}×", "ref" if name == "plain loop" else
                     ("identical" if diff == 0 else f"max rel. diff {diff:.1e}")])
        print(kb.md_row(rows[-1]), file=sys.stderr, flush=True)
    note = (f"Load average (1 min) {load:.1f} before and {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores; "
            f"{torch.get_num_threads()} torch threads.")
    return rows, note


def plain_loop(iters: int) -> None:
    """The yardstick for `python train.py --max_steps ITERS` as a whole process: the plain loop of the
    official layers, at train.py's preset, on the built-in dataset's training images loaded up front;
    random pairs, no logging or saving."""
    root = datasets.ensure_synthetic()
    A, B = ([image_to_tensor(load_image(p, 3))[None] for p in sorted((root / f"train{side}").glob("*.png"))]
            for side in "AB")
    step = cpu_steppers(Config(**QUICKSTART), ["plain loop"])["plain loop"]
    rng = random.Random(0)
    for i in range(iters):
        losses = step(A[i % len(A)], B[rng.randrange(len(B))])
    print(f"plain loop: {iters} iterations; last losses {', '.join(f'{v:.3f}' for v in losses)}")


# ---- Command line ----------------------------------------------------------------------------------------------------
PROG = "python -m minicycle.tools.iteration_bench"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    kb.common_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--infer", action="store_true", help="G_A inference alone, checked against eager's output")
    mode.add_argument("--count-launches", action="store_true",
                      help="count the kernel launches of one iteration on the CPU (needs TRITON_INTERPRET=1)")
    mode.add_argument("--cpu", action="store_true", help="CPU mode: train.py's step against a plain eager loop")
    mode.add_argument("--plain-loop", type=kb.positive_int, default=None, metavar="ITERS", help="only the plain "
                      "loop, ITERS iterations on the built-in dataset: the yardstick for `train.py --max_steps ITERS`")
    p.add_argument("--variants", type=kb.csv_list(VARIANTS), default=None,
                   help=f"of {','.join(VARIANTS)} (default: {','.join(TIMED)}; --infer: {','.join(INFERRED)}; "
                        f"--count-launches: {','.join(COUNTED)})")
    p.add_argument("--kernels", type=kb.csv_list(choice.MODES), default=["auto"],
                   help="what the ours variants run, as train.py --kernels; a list runs each (default auto)")
    p.add_argument("--netG", choices=networks.GENERATORS, default=None,
                   help="generator (default resnet_9blocks; --quick resnet_6blocks)")
    p.add_argument("--ngf", type=kb.positive_int, default=None, help="also --ndf (default 64; --quick 4)")
    p.add_argument("--size", type=lambda t: [kb.positive_int(v) for v in kb.csv_list(None)(t)], default=None,
                   help="image H[,W] (default 256; --quick 32)")
    p.add_argument("--amp", choices=tuple(kb.DTYPES), default="fp32", help="bf16: run under torch.autocast(bfloat16)")
    p.add_argument("--channels_last", action="store_true", help="model and inputs in torch.channels_last")
    p.add_argument("--iters", type=kb.positive_int, default=None,
                   help=f"timed iterations (default {ITERS}; --quick {QUICK_ITERS}; --cpu 300)")
    p.add_argument("--rounds", type=kb.positive_int, default=10, help="--cpu: rounds the iterations are split into")
    p.add_argument("--threads", type=kb.positive_int, default=None,
                   help="--cpu: torch threads (default: PyTorch's, as train.py)")
    p.add_argument("--profile-dir", type=Path, default=None, help="profile one iteration per variant, tables here")
    args = p.parse_args(argv)
    args.netG = args.netG or ("resnet_6blocks" if args.quick else "resnet_9blocks")
    args.ngf = args.ngf or (4 if args.quick else 64)
    size = args.size or [32 if args.quick else 256]
    if len(size) > 2:
        p.error(f"--size {','.join(map(str, size))}: give H or H,W")
    args.size = (size[0], size[-1])
    multiple = networks.input_multiple(args.netG)
    if min(args.size) < 32 or any(s % multiple for s in args.size):
        p.error(f"--size: H and W must be multiples of {multiple} (for --netG {args.netG}), at least 32")
    args.variants = args.variants or (INFERRED if args.infer else COUNTED if args.count_launches else TIMED)
    if args.infer and {"ours+graph", "reduce-overhead"} & set(args.variants):
        p.error("--variants: --infer times a forward; ours+graph and reduce-overhead capture training iterations")
    args.iters = args.iters or (QUICK_ITERS if args.quick else 300 if args.cpu else ITERS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device, compile_note = kb.setup(args, cpu_only=args.quick or args.cpu or args.count_launches)
    if (args.cpu or args.count_launches) and device.type != "cpu":
        return _error(f"--{'cpu' if args.cpu else 'count-launches'} measures the CPU; drop --device cuda")
    if args.cpu and use_triton(torch.empty(0)):
        return _error("--cpu times the PyTorch path that train.py takes on a CPU; run it without TRITON_INTERPRET=1")
    if args.count_launches and not use_triton(torch.empty(0)):
        return _error("--count-launches needs TRITON_INTERPRET=1, so that ours reaches its Triton launches on a CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plain_loop:
        plain_loop(args.plain_loop)
        return 0
    if args.infer:
        torch.backends.cudnn.benchmark = False  # as infer.py: its input sizes vary
    cfg = Config(netG=args.netG, ngf=args.ngf, ndf=args.ngf)
    what = (f"{args.netG}{'' if args.infer else ' G ×2, basic D ×2'}, ngf={args.ngf}{'' if args.infer else '=ndf'}, "
            f"{args.size[0]}×{args.size[1]}" + ("; --quick: a harness check" if args.quick else ""))
    top = kb.header(device, PROG, argv, "minicycle: kernel launches per training iteration" if args.count_launches
                    else "minicycle benchmark")
    if args.cpu or args.count_launches:
        kb.write_report(kb.document([top, *(cpu_report(args) if args.cpu else count_report(args, cfg, what))]),
                        args.out)
        return 0
    heading, columns, section = ((f"## G_A inference ({what})", INFER_COLUMNS, "Inference") if args.infer else
                                 (f"## Model: one training iteration and G_A inference ({what})", MODEL_COLUMNS,
                                  "Training iteration"))
    rows: list[list[str]] = []
    prof_rows: list[list[str]] = []

    def report(ok: bool = True) -> str:
        profile_parts = ["## Profile of one iteration", kb.markdown_table(PROFILE_COLUMNS, prof_rows),
                         kb.legend("Training iteration, --profile-dir")]
        return kb.document([top, heading, kb.markdown_table(columns, rows), kb.legend(section), *kb.decisions_section(),
                            *(profile_parts if prof_rows else [])], ok)

    measure = infer_measure(args, cfg, device) if args.infer else train_measure(args, cfg, device, prof_rows)
    ok = each_run(args, device, compile_note, len(columns) - 4, measure, rows,
                  lambda: args.out and kb.write_file(args.out, report()))  # a run cut short keeps its rows
    kb.write_report(report(ok), args.out)
    return 0 if ok else 1


def cpu_report(args: argparse.Namespace) -> list[str]:
    rows, note = bench_cpu(args.iters, args.rounds)
    return ["## CPU: train.py's training step against a plain eager loop", kb.markdown_table(CPU_COLUMNS, rows),
            kb.legend("CPU mode") + " " + note]


def count_report(args: argparse.Namespace, cfg: Config, what: str) -> list[str]:
    from torch._inductor import config as inductor

    import kernels.instance_norm

    inductor.cpp.enable_kernel_profile = True  # Inductor's CPU kernels show in the profiler
    kernels.instance_norm._MAX_BLOCK = max(1, IN_SPLIT_AT_256 * args.size[0] * args.size[1] // 256**2)
    counts = {}
    for variant, kernels_mode in runs(args.variants, args.kernels):
        name = label(variant, kernels_mode)
        counts[name] = count_launches(variant, kernels_mode, cfg, args.size, args.channels_last)
        print(kb.md_row(count_row(name, counts[name])), file=sys.stderr, flush=True)
    what += (f", batch 1, identity loss, pool 50{'; channels_last' if args.channels_last else ''}; "
             f"IN split threshold {kernels.instance_norm._MAX_BLOCK} elements")
    return [f"## One steady-state iteration ({what})",
            kb.markdown_table(COUNT_COLUMNS, [count_row(n, c) for n, c in counts.items()]),
            "Most frequent kernel-launching ATen ops, and the Triton kernels:",
            "\n".join(count_detail(n, c) for n, c in counts.items()),
            "Counted with torch.profiler; the Triton kernels counted at launch, not run (see "
            "minicycle/tools/iteration_bench.py). Facts about this code and this PyTorch, not timings."]


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
