"""Benchmark of one CycleGAN training iteration: ours against the official model eager, compiled, and
compiled with CUDA graphs.

    python -m minicycle.tools.iteration_bench                       # GPU: batch 1 and 4, fp32, every variant
    python -m minicycle.tools.iteration_bench --amp bf16 --batch 1  # a slice, to fit a time limit
    python -m minicycle.tools.iteration_bench --channels_last       # model and inputs in channels_last
    python -m minicycle.tools.iteration_bench --kernels triton      # ours with the Triton kernels everywhere (not auto)
    python -m minicycle.tools.iteration_bench --profile-dir DIR     # + a torch.profiler summary of one iteration each
    python -m minicycle.tools.iteration_bench --cpu                 # CPU: train.py's step against a plain eager loop
    python -m minicycle.tools.iteration_bench --plain-loop 300      # CPU: the plain loop alone, timed against train.py
    python -m minicycle.tools.iteration_bench --quick               # tiny model on the CPU: checks the harness itself
    python -m minicycle.tools.iteration_bench ... --out FILE.md     # also write the markdown to FILE.md

GPU mode
--------
One iteration is CycleGAN.optimize: 6 generator forwards (resnet_9blocks), 6 discriminator forwards
(basic, 70x70 PatchGAN), both backwards and both Adam steps, at 256x256. Variants of the same model,
built from the same seed (same weights, same inputs):

    eager            set_fused(net, False) on every net: the official layers, as the official code runs them
    compile          that eager model, each of the 4 nets net.compile(dynamic=False)
    reduce-overhead  the same with mode="reduce-overhead" (Inductor's CUDA graphs, what an expert tries
                     first); torch.compiler.cudagraph_mark_step_begin() before every iteration
    ours             the fused ops: CycleGAN.optimize as train.py runs it, with --kernels (default auto:
                     Triton or cuDNN per layer shape, as kernels/choice.py measures them at first use;
                     triton: the Triton kernels everywhere); rows with --kernels triton or pytorch say
                     so, e.g. "ours (triton)"
    ours+graph       ours as train.py --cuda_graph runs it: cuda_graph.GraphedStep, the whole iteration
                     captured once and replayed

cudnn.benchmark is True for all of them, as train.py and the official code set it. What --kernels
auto chose (kernels.choice.report(), once per new set of shapes) is listed under the table.

Timing: 5 warm-up iterations (the first compiles and autotunes; ours+graph runs 3 eagerly, then
captures), then --iters iterations back to back between two device synchronisations; ms/iter is
their mean. Every optimize() reads its 8 losses (one kb.sync an iteration, as in train.py); ours+graph
reads them once at the end, as train.py reads them once per --print_freq images. Peak memory is
torch.cuda.max_memory_reserved over the timed iterations, after empty_cache (reserved, not
allocated: a CUDA graph's private pool is reserved memory). The projection is ms/iter times the
iterations of 200 horse2zebra epochs as train.py runs them (1334 images an epoch: 266,800
iterations at batch 1, 66,800 at batch 4). Inference is G_A(x) under torch.no_grad (and autocast
with --amp). Loss check: the 8 losses of the first iteration against eager's, max
|l - l_eager| / max(|l_eager|, 1e-3), within MODEL_TOLERANCES[amp].

--profile-dir: after the timing, one more iteration under torch.profiler (CPU and CUDA
activities): GPU busy time (the sum of kernel and copy times), kernels run, host launch calls
(cudaLaunchKernel, cuLaunchKernel*, cudaGraphLaunch), and the top kernels by GPU time; the full
key_averages table goes to DIR/<variant>-b<batch>-<amp>-<layout>.txt. Wall time far above GPU
busy time means the host sets the pace.

CPU mode (--cpu)
----------------
The quick-start configuration (resnet_6blocks, ngf 16, ndf 16, 32x32 images, batch 1, pool 50),
iterations/s of:

    plain loop        a minimal eager loop of the official layers (plain_step below: the official
                      iteration written out, plain Adam steps, the same losses)
    optimize, eager   CycleGAN.optimize on the official layers (set_fused(net, False))
    optimize          CycleGAN.optimize as train.py runs it on a CPU (fused modules, PyTorch path)
    graph-ready step  cuda_graph.GraphedStep as train.py --cuda_graph runs it without CUDA

on the same preloaded images, with PyTorch's default thread count. The variants take turns in
--rounds rounds of --iters / --rounds iterations (the machine may be shared), and the rate is the
median over rounds. The first iteration's losses are checked against the plain loop's.

--quick runs the GPU mode's variants on a tiny model on the CPU (one thread) so that CI can check
the harness; it measures nothing of interest and leaves out the compiled variants unless
--compile is given.
"""

import argparse
import contextlib
import gc
import itertools
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo
import torch.nn as nn

from kernels import choice
from kernels.runtime import use_triton
from kernels.tools import op_bench as kb
from minicycle import datasets, networks
from minicycle.cuda_graph import GraphedStep
from minicycle.data import image_to_tensor, load_image
from minicycle.model import LOSS_NAMES, Config, CycleGAN, GANLoss
from minicycle.networks import set_fused
from minicycle.pool import ImagePool

VARIANTS = ("eager", "ours", "ours+graph", "compile", "reduce-overhead")  # run in this order: the slow compiles last
CPU_VARIANTS = ("plain loop", "optimize, eager", "optimize", "graph-ready step")
MODEL_TOLERANCES = {"fp32": 1e-2, "bf16": 5e-2}  # relative, first iteration's losses vs eager's
WARMUP = 5  # ours+graph: 3 eager steps, the capture, one replay
ITERS, QUICK_ITERS = 20, 3
H2Z_IMAGES, EPOCHS = 1334, 200  # horse2zebra's larger domain; --n_epochs 100 + --n_epochs_decay 100
QUICKSTART = dict(netG="resnet_6blocks", ngf=16, ndf=16)  # train.py's preset for the built-in dataset, 32x32


def iterations_200_epochs(batch: int) -> int:
    """Iterations of 200 horse2zebra epochs at this batch size, as train.py runs them."""
    return EPOCHS * math.ceil(H2Z_IMAGES / batch)


# ------------------------------------------------------------------------------------------------
# GPU mode (and --quick)
# ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    losses: dict[str, float]  # the first iteration's
    train_ms: float
    peak_mib: float | None  # None off CUDA
    infer_ms: float | str | None  # None for ours+graph (the same generator as ours); str: why it failed
    profile: list[str] | None  # the profile table's cells, with --profile-dir


def build(variant: str, cfg: Config, device: torch.device, amp: torch.dtype | None, batch: int,
          channels_last: bool, kernels: str = "auto"
          ) -> tuple[CycleGAN, Callable[[torch.Tensor, torch.Tensor], None], Callable[[], list]]:
    """The model, one iteration step(real_A, real_B), and read() -> the losses of the steps since the last read."""
    torch.manual_seed(cfg.seed)
    model = CycleGAN(cfg, device, amp=amp)
    if channels_last:
        model.set_memory_format(torch.channels_last)  # as train.py --channels_last: weights, Adam moments, pools
    for net in model.nets().values():
        networks.set_kernels(net, kernels if variant.startswith("ours") else "pytorch")
        if variant in ("compile", "reduce-overhead"):
            net.compile(dynamic=False, mode="reduce-overhead" if variant == "reduce-overhead" else None)
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


def run_variant(variant: str, cfg: Config, device: torch.device, amp: torch.dtype | None, real_A: torch.Tensor,
                real_B: torch.Tensor, iters: int, channels_last: bool, profile_to: Path | None,
                kernels: str = "auto") -> Result:
    model, step, read = build(variant, cfg, device, amp, len(real_A), channels_last, kernels)
    step(real_A, real_B)
    losses = read()[0]  # the loss check; compiles, autotunes
    for _ in range(WARMUP - 1):
        step(real_A, real_B)
    read()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    kb.sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step(real_A, real_B)
    read()
    kb.sync(device)
    train_ms = (time.perf_counter() - t0) / iters * 1e3
    peak = torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None
    # The training numbers are in: a failing profiler or inference costs only its own cells.
    profile = None
    if profile_to:
        try:
            profile = profile_iteration(step, read, real_A, real_B, train_ms, profile_to)
        except Exception as e:
            profile = [f"n/a ({kb.reason(e)})"] + ["—"] * 5
    infer_ms: float | str | None = None
    if variant != "ours+graph":
        autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        try:
            with torch.no_grad(), autocast:
                infer_ms = kb.host_median_ms(lambda: model.netG_A(real_A), device, WARMUP, iters)
        except Exception as e:
            infer_ms = f"n/a ({kb.reason(e)})"
    return Result(losses, train_ms, peak, infer_ms, profile)


def profile_iteration(step: Callable, read: Callable, real_A: torch.Tensor, real_B: torch.Tensor, train_ms: float,
                      path: Path) -> list[str]:
    """One iteration under torch.profiler: [GPU busy ms, host op ms, wall ms, kernels, host launch calls,
    top kernels]."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

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


def _release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


MODEL_COLUMNS = ["variant", "layout", "batch", "amp", "train ms/iter", "eager/this", "peak MiB", "200 epochs",
                 "infer ms", "images/s", "loss Δ vs eager", "ok"]
PROFILE_COLUMNS = ["variant", "layout", "batch", "amp", "GPU busy ms", "host op ms", "wall ms/iter", "kernels",
                   "host launch calls", "top kernels (ms)"]


def bench_model(variants: Sequence[str], batches: Sequence[int], amp_name: str, channels_last: bool,
                device: torch.device, quick: bool, compile_note: str | None, iters: int,
                profile_dir: Path | None, budget_s: float | None, rows: list[list[str]],
                prof_rows: list[list[str]], on_row: Callable[[], None], kernels: str = "auto",
                chosen: list[str] | None = None) -> bool:
    """Appends a model row (and a profile row) for each batch size and variant, calling on_row() after
    each, so that a run cut short keeps what it measured; returns whether every check passed. The ours
    variants run with --kernels `kernels`; what auto chose goes to `chosen` (kernels.choice.report())."""
    cfg = Config(ngf=4, ndf=4, netG="resnet_6blocks") if quick else Config()
    size = 32 if quick else 256
    amp = kb.DTYPES[amp_name] if amp_name != "fp32" else None
    layout = "channels_last" if channels_last else "nchw"
    all_ok = True
    start = time.monotonic()
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        real_A, real_B = ((torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device) for _ in "AB")
        if channels_last:
            real_A, real_B = (t.contiguous(memory_format=torch.channels_last) for t in (real_A, real_B))
        ref: Result | None = None
        for variant in variants:
            label = f"{variant} ({kernels})" if variant.startswith("ours") and kernels != "auto" else variant
            head = [label, layout, str(batch), amp_name]
            skip = None
            if variant in ("compile", "reduce-overhead") and compile_note:
                skip = compile_note
            elif variant == "reduce-overhead" and device.type != "cuda":
                skip = "n/a (CUDA graphs need CUDA)"
            elif budget_s is not None and time.monotonic() - start > budget_s:
                skip = f"skipped (--budget {budget_s:.0f} s spent)"
            if skip:
                rows.append(head + [skip] + ["—"] * 6 + [""])
                on_row()
                continue
            name = f"{variant.replace('+', '-')}-b{batch}-{amp_name}-{layout}.txt"
            try:
                r = run_variant(variant, cfg, device, amp, real_A, real_B, iters, channels_last,
                                profile_dir / name if profile_dir else None, kernels)
            except Exception as e:  # a failing variant is reported in its row; the run goes on
                failed = variant.startswith("ours") or variant == "eager"
                rows.append(head + [f"{'error' if failed else 'n/a'} ({kb.reason(e)})"] + ["—"] * 6
                            + ["✗" if failed else ""])
                all_ok &= not failed
                on_row()
                continue
            finally:
                _release(device)
                line = choice.report()  # what --kernels auto decided in this variant (training and inference)
                if line and chosen is not None:
                    chosen.append(f"{label}, batch {batch}, {amp_name}, {layout}: {line}")
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
                f"{ref.train_ms / r.train_ms:.2f}×" if ref is not None else "—",
                f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "n/a (CPU)",
                f"{hours:.1f} h",
                f"{r.infer_ms:.2f}" if isinstance(r.infer_ms, float) else r.infer_ms or "as ours",
                f"{batch / (r.infer_ms * 1e-3):.1f}" if isinstance(r.infer_ms, float) else "—",
                delta,
                mark,
            ])
            if r.profile:
                prof_rows.append(head + r.profile)
            print(kb.md_row(rows[-1]), file=sys.stderr, flush=True)  # progress
            on_row()
    return all_ok


MODEL_LEGEND = (
    "One iteration = 6 G forwards, 6 D forwards, both backwards, both Adam steps. train ms/iter: mean of "
    "back-to-back iterations after 5 warm-up ones. eager/this above 1× means faster than eager. peak MiB = "
    "torch.cuda.max_memory_reserved over the timed iterations. 200 epochs = ms/iter × 200·ceil(1334/batch) "
    "iterations (horse2zebra). infer = G_A forward under no_grad. loss Δ = max relative difference of the "
    "first iteration's 8 losses from eager's (same weights, same inputs). cudnn.benchmark=True throughout."
)
PROFILE_LEGEND = (
    "One more iteration under torch.profiler (which slows the host). GPU busy ms: sum of kernel and copy "
    "times; host op ms: CPU time inside the profiled ops and CUDA API calls (profiler overhead included; "
    "Python between them left out); kernels: GPU kernels run; host launch calls: cudaLaunchKernel / "
    "cuLaunchKernel* / cudaGraphLaunch calls; wall ms/iter: from the timing above, without the profiler. "
    "Full tables in the --profile-dir files."
)


# ------------------------------------------------------------------------------------------------
# CPU mode
# ------------------------------------------------------------------------------------------------


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


def cpu_steppers(cfg: Config, variants: Sequence[str] = CPU_VARIANTS
                 ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], list[float] | None]]:
    """Each CPU variant's step, freshly built from the same seed (same weights)."""
    steppers = {}
    for variant in variants:
        torch.manual_seed(cfg.seed)
        model = CycleGAN(cfg)
        for net in model.nets().values():
            set_fused(net, variant not in ("plain loop", "optimize, eager"))
        if variant == "plain loop":
            # The model's nets, initialised identically; everything else is the plain loop's own.
            nets = model.nets()
            betas = (cfg.beta1, 0.999)
            opt_G = torch.optim.Adam(itertools.chain(nets["G_A"].parameters(), nets["G_B"].parameters()),
                                     lr=cfg.lr, betas=betas)
            opt_D = torch.optim.Adam(itertools.chain(nets["D_A"].parameters(), nets["D_B"].parameters()),
                                     lr=cfg.lr, betas=betas)
            pools = {"A": ImagePool(cfg.pool_size, cfg.seed * 2 + 1), "B": ImagePool(cfg.pool_size, cfg.seed * 2 + 2)}
            steppers[variant] = (lambda a, b, n=nets, g=opt_G, d=opt_D, p=pools:
                                 plain_step(n, g, d, p, a, b, cfg))
        elif variant == "graph-ready step":
            graphed = GraphedStep(model, 1, graph=False)

            def graph_step(a: torch.Tensor, b: torch.Tensor, g: GraphedStep = graphed) -> list[float]:
                g.step(a, b)
                return list(g.read()[0].values())  # one read per step: train.py reads less often

            steppers[variant] = graph_step
        else:
            steppers[variant] = lambda a, b, m=model: list(m.optimize(a, b).values())
    return steppers


CPU_COLUMNS = ["variant", "iterations/s", "vs plain loop", "first losses vs plain loop"]


def bench_cpu(iters: int, rounds: int) -> tuple[list[list[str]], str]:
    """The rows, and a note of the machine's load average before and after (the CPU may be shared)."""
    load = os.getloadavg()[0]
    cfg = Config(**QUICKSTART)
    gen = torch.Generator().manual_seed(0)
    images = [tuple(torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1 for _ in "AB") for _ in range(16)]
    steppers = cpu_steppers(cfg)
    first = {name: step(*images[0]) for name, step in steppers.items()}
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    per_round = max(1, iters // rounds)
    for r in range(rounds):
        for name, step in steppers.items():
            t0 = time.perf_counter()
            for i in range(per_round):
                step(*images[(r * per_round + i) % len(images)])
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


CPU_LEGEND = (
    "The quick-start configuration (resnet_6blocks, ngf 16, ndf 16, 32×32, batch 1, pool 50, identity 0.5), "
    "on 16 preloaded image pairs; iterations/s = median over rounds in which the variants take turns. No data "
    "loading, logging or saving: the training step alone."
)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minicycle.tools.iteration_bench", description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="CPU mode: train.py's step against a plain eager loop")
    p.add_argument("--plain-loop", type=kb.positive_int, default=None, metavar="ITERS",
                   help="only run the plain loop ITERS iterations on the built-in dataset: the whole-process "
                        "yardstick for `python train.py --max_steps ITERS`")
    p.add_argument("--quick", action="store_true",
                   help="tiny model on the CPU to check the harness; not a performance measurement")
    p.add_argument("--variants", type=kb.csv_list(VARIANTS), default=list(VARIANTS),
                   help=f"GPU mode: {','.join(VARIANTS)} (default: all)")
    p.add_argument("--batch", type=kb.batch_list, default=[1, 4], help="batch sizes (default 1,4)")
    p.add_argument("--amp", choices=tuple(kb.DTYPES), default="fp32", help="bf16: train under torch.autocast(bfloat16)")
    p.add_argument("--channels_last", action="store_true", help="model and inputs in torch.channels_last")
    p.add_argument("--kernels", choices=choice.MODES, default="auto",
                   help="what the ours variants run, as train.py --kernels (default auto)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include the compiled variants (default: yes, except with --quick)")
    p.add_argument("--iters", type=kb.positive_int, default=None,
                   help=f"timed iterations (default {ITERS}; --quick {QUICK_ITERS}; --cpu 300)")
    p.add_argument("--rounds", type=kb.positive_int, default=10, help="--cpu: rounds the iterations are split into")
    p.add_argument("--threads", type=kb.positive_int, default=None,
                   help="--cpu: torch threads (default: PyTorch's, as train.py)")
    p.add_argument("--profile-dir", type=Path, default=None, help="profile one iteration per variant, tables here")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: variants not started by then are skipped (to fit a time limit)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (CPU with --quick and --cpu)")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cpu_only = args.quick or args.cpu
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not cpu_only else "cpu")
    else:
        device = torch.device(args.device)
    if args.cpu and device.type != "cpu":
        print("python -m minicycle.tools.iteration_bench: error: --cpu measures the CPU; drop --device cuda",
              file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # as train.py and the official code
    if args.quick:
        torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CI machine
    if args.threads:
        torch.set_num_threads(args.threads)
    prog = "python -m minicycle.tools.iteration_bench"
    if args.plain_loop:
        plain_loop(args.plain_loop)
        return 0
    if args.cpu:
        if use_triton(torch.empty(0)):
            print("python -m minicycle.tools.iteration_bench: error: --cpu times the PyTorch path that train.py takes "
                  "on a CPU; run it without TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        rows, note = bench_cpu(args.iters or 300, args.rounds)
        parts = [kb.header(device, prog, argv), "## CPU: train.py's training step against a plain eager loop",
                 kb.markdown_table(CPU_COLUMNS, rows), CPU_LEGEND + " " + note]
        kb.write_report("\n\n".join(parts) + "\n", args.out)
        return 0

    compile_on = args.compile if args.compile is not None else not args.quick
    compile_note = None if compile_on else ("skipped (--quick; pass --compile)" if args.quick else
                                            "skipped (--no-compile)")
    what = ("ngf=4, ndf=4, resnet_6blocks, basic D, 32×32; --quick: a harness check" if args.quick else
            "resnet_9blocks G ×2, basic D ×2, ngf=ndf=64, 256×256")
    top = kb.header(device, prog, argv)

    def report(rows: list[list[str]], prof_rows: list[list[str]], ok: bool = True) -> str:
        parts = [top, f"## Model: one training iteration and G_A inference ({what})",
                 kb.markdown_table(MODEL_COLUMNS, rows), MODEL_LEGEND]
        if chosen:
            parts += ["## What --kernels auto chose", "\n".join(f"- {line}" for line in chosen)]
        if prof_rows:
            parts += ["## Profile of one iteration", kb.markdown_table(PROFILE_COLUMNS, prof_rows), PROFILE_LEGEND]
        if not ok:
            parts.append("**Some checks failed (✗ above).**")
        return "\n\n".join(parts) + "\n"

    def partial() -> None:  # the report so far, in case the run is cut short
        if args.out:
            kb.write_file(args.out, report(rows, prof_rows))

    rows: list[list[str]] = []
    prof_rows: list[list[str]] = []
    chosen: list[str] = []
    ok = bench_model(args.variants, args.batch, args.amp, args.channels_last, device, args.quick, compile_note,
                     args.iters or (QUICK_ITERS if args.quick else ITERS), args.profile_dir, args.budget,
                     rows, prof_rows, partial, args.kernels, chosen)
    kb.write_report(report(rows, prof_rows, ok), args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
