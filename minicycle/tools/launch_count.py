"""Kernel launches of one CycleGAN training iteration, counted on a CPU.

    python -m minicycle.tools.launch_count                    # the paper's model: resnet_9blocks, ngf 64, 256², batch 1
    python -m minicycle.tools.launch_count --size 32 --ngf 4  # a small model: the same counts for eager and ours
    python -m minicycle.tools.launch_count --out FILE.md      # also write the markdown to FILE.md

At batch 1 the host likely sets the pace: every launch costs Python, dispatcher and launcher
time. This counts what one steady-state iteration (the third: the first two allocate gradients
and Adam's state, and compile) dispatches, for each build of the same model:

    eager          the official layers (networks.set_fused(net, False)), as the official code runs them
    ours           the fused Triton ops: CycleGAN.optimize, what train.py runs
    graph-ready    what train.py --cuda_graph captures (cuda_graph.GraphedStep's step, run eagerly);
                   on a GPU it is replayed as one graph launch plus three small host-to-device copies
    compile        ours with every net torch.compile'd, as train.py --compile
    eager-compile  the official layers compiled: what a user of the official code would try

Counted with torch.profiler (CPU activity):

- ATen ops: aten:: events not nested in another aten:: event, i.e. the calls that Python,
  autograd, our custom ops and Inductor's generated wrapper make into the dispatcher. Those in
  NO_KERNEL (views, allocations, metadata) launch no kernel on a GPU; the rest are counted as
  launches, one each (on a GPU a few launch more: cuDNN's batch norm, for one).
- custom ops: minicycle:: events, one dispatcher call into our Python wrapper each.
- Triton launches: counted at launch, and not executed. Under the CPU interpreter one iteration
  of ours takes about ten minutes, and nothing in the step branches on tensor values, so the
  sequence of launches is the same; the outputs are left unwritten.
- Inductor kernels: the kernels it generates (cpp_fused_* on a CPU, recorded through
  inductor's cpp.enable_kernel_profile). On a GPU it generates Triton kernels and fuses by
  other rules, so the compile rows count CPU Inductor, at this machine's sizes.
- launches: ATen ops with a kernel + Triton launches + Inductor kernels.

Adam runs with foreach=True here, PyTorch's default on CUDA (on a CPU it defaults to a loop
over parameters). The default is the paper's configuration, so the counts are those of the model
people train. Smaller models run faster but may launch differently wherever a kernel picks its
path from the sizes or the channel count: --size below 256 scales the IN kernel's split threshold
(kernels.instance_norm._MAX_BLOCK) by (size/256)², so that every IN layer takes the path it takes
at 256² (one program per plane, or split planes: two launches), but nothing is done for others
(a conv that packs inputs of few channels, for one).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: ours must reach its kernel launches

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import kernels.instance_norm  # noqa: E402
from kernels.tools.op_bench import header, markdown_table, write_report  # noqa: E402
from minicycle.cuda_graph import GraphedStep  # noqa: E402
from minicycle.model import Config, CycleGAN  # noqa: E402
from minicycle.networks import set_fused  # noqa: E402

VARIANTS = ("eager", "ours", "graph-ready", "compile", "eager-compile")
WARMUP = 2

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
# Composite ops that copy only sometimes: a launch when their subtree copies.
COPIES = {"aten::copy_", "aten::clone", "aten::_to_copy"}


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


@contextlib.contextmanager
def triton_launches_recorded() -> Iterator[None]:
    """Every Triton launch becomes a profiler event triton::<kernel> and does nothing else."""
    real = InterpretedFunction.run

    def launch(self, *args, **kwargs):
        with record_function(f"triton::{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"):
            pass

    InterpretedFunction.run = launch
    try:
        yield
    finally:
        InterpretedFunction.run = real


def count_events(events) -> Count:
    """Classify the profiler events of one iteration (see the module docstring)."""
    c = Count()
    for e in events:
        name, parent = e.name, e.cpu_parent
        ancestors = []
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        if any(a.startswith(("aten::", "triton::")) for a in ancestors):
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


def build(variant: str, cfg: Config, channels_last: bool = False) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """One training iteration of the given build, as a function of (real_A, real_B)."""
    torch.manual_seed(cfg.seed)
    model = CycleGAN(cfg)
    if channels_last:
        model.set_memory_format(torch.channels_last)  # as train.py on CUDA
    for opt in (model.optimizer_G, model.optimizer_D):
        for group in opt.param_groups:
            group["foreach"] = True
    for net in model.nets().values():
        set_fused(net, variant not in ("eager", "eager-compile"))
        if variant.endswith("compile"):
            net.compile()
    if variant == "graph-ready":
        step = GraphedStep(model, batch_size=1, graph=False)
        return step.step
    return model.optimize


def count_iteration(variant: str, cfg: Config, size: int, channels_last: bool = False) -> Count:
    step = build(variant, cfg, channels_last)
    gen = torch.Generator().manual_seed(0)
    real_A, real_B = (torch.rand(1, cfg.input_nc, size, size, generator=gen) * 2 - 1 for _ in "AB")
    with triton_launches_recorded():
        for _ in range(WARMUP):
            step(real_A, real_B)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(real_A, real_B)
    return count_events(prof.events())


COLUMNS = ["build", "launches", "ATen ops with a kernel", "ATen ops without (views, allocations)",
           "custom ops (minicycle::)", "Triton launches", "Inductor kernels"]


def row(variant: str, c: Count) -> list[str]:
    return [variant, f"{c.launches:,}", f"{sum(c.aten.values()):,}", f"{c.no_kernel:,}", f"{c.custom:,}",
            f"{sum(c.triton.values()):,}", f"{c.inductor:,}"]


def detail(variant: str, c: Count, top: int = 12) -> str:
    ops = ", ".join(f"{n.removeprefix('aten::')} {k}" for n, k in c.aten.most_common(top))
    kernels_ = ", ".join(f"{n} {k}" for n, k in c.triton.most_common())
    return f"- {variant}: ATen {ops}" + (f"; Triton {kernels_}" if kernels_ else "")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minicycle.tools.launch_count", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--netG", default="resnet_9blocks")
    p.add_argument("--ngf", type=int, default=64, help="also --ndf")
    p.add_argument("--size", type=int, default=256, help="image height and width")
    p.add_argument("--channels_last", action="store_true",
                   help="model and inputs in channels_last (train.py's CUDA default)")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.size % 4 or args.size < 32:
        p.error(f"--size {args.size}: must be a multiple of 4, at least 32")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if os.environ["TRITON_INTERPRET"] != "1":
        print("python -m minicycle.tools.launch_count: error: needs TRITON_INTERPRET=1 (unset or 1), so that ours "
              "reaches its Triton launches on a CPU", file=sys.stderr)
        return 2
    import torch._inductor.config
    torch._inductor.config.cpp.enable_kernel_profile = True  # Inductor's CPU kernels show in the profiler
    kernels.instance_norm._MAX_BLOCK = max(1, 4096 * args.size**2 // 256**2)
    cfg = Config(netG=args.netG, ngf=args.ngf, ndf=args.ngf)
    counts = {}
    for variant in args.variants:
        counts[variant] = count_iteration(variant, cfg, args.size, args.channels_last)
        print(markdown_table(COLUMNS, [row(variant, counts[variant])]).splitlines()[-1], file=sys.stderr, flush=True)
    what = (f"{args.netG} G ×2, basic D ×2, ngf=ndf={args.ngf}, {args.size}×{args.size}, batch 1, identity loss, "
            f"pool 50{'; channels_last' if args.channels_last else ''}; "
            f"IN split threshold {kernels.instance_norm._MAX_BLOCK} elements")
    parts = [header(torch.device("cpu"), "python -m minicycle.tools.launch_count", argv,
                    "minicycle: kernel launches per training iteration"),
             f"## One steady-state iteration ({what})",
             markdown_table(COLUMNS, [row(v, c) for v, c in counts.items()]),
             "Most frequent kernel-launching ATen ops, and the Triton kernels:",
             "\n".join(detail(v, c) for v, c in counts.items()),
             f"Counted with torch.profiler; triton {triton.__version__}'s kernels counted at launch, not run "
             f"(see minicycle/tools/launch_count.py). Facts about this code and this PyTorch, not timings."]
    write_report("\n\n".join(parts) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
