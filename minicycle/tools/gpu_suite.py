"""Everything a session with a GPU should measure, in one command: python -m minicycle.tools.gpu_suite OUTDIR.

    python -m minicycle.tools.gpu_suite --list                   # the plan: slices, their commands and budgets
    python -m minicycle.tools.gpu_suite OUTDIR                   # every slice, one after the other (~30 minutes)
    python -m minicycle.tools.gpu_suite OUTDIR --slice check     # one slice (each fits a 10-minute command limit)
    python -m minicycle.tools.gpu_suite OUTDIR --summary         # only the summary of what OUTDIR holds

Slices (each step's markdown and log go to OUTDIR, and OUTDIR/summary.md is rewritten after every slice):

    check     the device's ceilings (device-to-device copy GB/s, bf16 and TF32 matmul TFLOP/s, so
              that every result can be stated against them); the kernel and CUDA-graph tests on CUDA
              with the real Triton compiler (TRITON_INTERPRET=0 pytest)
    (each slice that times the generator's layers first compiles their kernels on every core into
    Triton's cache, python -m kernels.tools.compile_report --compile-only: the JIT then finds them there)
    ops       the op tables (python -m kernels.tools.op_bench): IN+ReLU and reflect conv, fwd and bwd, at the
              generator's shapes, batch 1 and 4, fp32 and bf16, ours / eager / torch.compile, each
              row also a correctness check on fresh random inputs and the path --kernels auto takes
              (and by how much it won); channels_last rows too (ours and eager only: torch.compile
              recompiles for every row, and the budget is for NCHW)
    model-b1  the training-iteration table (python -m minicycle.tools.iteration_bench) at batch 1, fp32 and bf16, NCHW:
              eager / compile / reduce-overhead / ours / ours+graph, peak memory, and a torch.profiler
              summary of one iteration each (GPU busy time against wall time, kernels, launch calls,
              top kernels)
    model-cl  the same in channels_last, the layout train.py runs on CUDA (eager / ours / ours+graph):
              batch 1 in bf16 and fp32, batch 4 in bf16
    model-b4  batch 4, NCHW, fp32 and bf16, every variant
    model-triton  model-cl's rows again with --kernels triton (ours and ours+graph with the Triton
              kernels everywhere, next to eager), against which model-cl's default --kernels auto is
              read; each model report lists what auto chose

Every step has a budget (seconds after which it starts no new row; rows left out are listed as
skipped, with the command that runs them) and a hard timeout, so a slice stays under 9 minutes
and the whole suite near 30 on an H100. Nothing here is a GPU number until a GPU ran it.
"""

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SLICE_LIMIT_S = 540  # a GPU command is cut at 10 minutes: leave a minute for start-up and copying back


@dataclass
class Step:
    name: str  # OUTDIR/<name>.md (the report) and OUTDIR/<name>.log (stdout and stderr)
    argv: list[str]  # run with sys.executable; "{out}" is replaced by OUTDIR
    timeout_s: int
    env: dict[str, str] | None = None


def _bench(name: str, module: str, args: str, budget: int, timeout: int) -> Step:
    argv = ["-m", module, *shlex.split(args), "--budget", str(budget), "--out", f"{{out}}/{name}.md"]
    return Step(name, argv, timeout)


def _warm(name: str, args: str, timeout: int) -> Step:
    """Compile, on every core, each kernel the slice's generator layers launch into Triton's cache, where
    the JIT then finds them (the autotuner would otherwise compile each config one at a time)."""
    return Step(name, ["-m", "kernels.tools.compile_report", "--compile-only", *shlex.split(args)], timeout)


OPS, MODEL = "kernels.tools.op_bench", "minicycle.tools.iteration_bench"
KERNEL_TESTS = ["tests/test_instance_norm.py", "tests/test_reflect_conv.py", "tests/test_compile.py",
                "tests/test_cuda_graph.py"]
SLICES: dict[str, list[Step]] = {
    "check": [
        Step("ceilings", ["-m", "minicycle.tools.gpu_suite", "--ceilings", "{out}/ceilings.md"], 120),
        Step("tests", ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS], 390,
             {"TRITON_INTERPRET": "0"}),
    ],
    "ops": [
        _warm("warm-ops", "--batch 1,4 --dtypes fp32,bf16 --layouts nchw,channels_last", 60),
        _bench("ops-nchw", OPS, "--batch 1,4 --dtypes fp32,bf16 --layouts nchw", 300, 390),
        _bench("ops-channels_last", OPS, "--batch 1,4 --dtypes fp32,bf16 --layouts channels_last "
               "--no-compile", 60, 90),
    ],
    "model-b1": [
        _warm("warm-b1", "--batch 1 --dtypes fp32,bf16 --layouts nchw", 60),
        _bench("model-b1-fp32", MODEL, "--batch 1 --amp fp32 --profile-dir {out}/profiles", 150, 240),
        _bench("model-b1-bf16", MODEL, "--batch 1 --amp bf16 --profile-dir {out}/profiles", 120, 200),
    ],
    "model-cl": [
        _warm("warm-cl", "--batch 1,4 --dtypes fp32,bf16 --layouts channels_last", 60),
        _bench("model-b1-bf16-channels_last", MODEL, "--batch 1 --amp bf16 --channels_last "
               "--variants eager,ours,ours+graph --profile-dir {out}/profiles", 60, 120),
        _bench("model-b1-fp32-channels_last", MODEL, "--batch 1 --amp fp32 --channels_last "
               "--variants eager,ours,ours+graph --profile-dir {out}/profiles", 60, 120),
        _bench("model-b4-bf16-channels_last", MODEL, "--batch 4 --amp bf16 --channels_last "
               "--variants eager,ours,ours+graph", 60, 120),
    ],
    "model-b4": [
        _warm("warm-b4", "--batch 4 --dtypes fp32,bf16 --layouts nchw", 60),
        _bench("model-b4-fp32", MODEL, "--batch 4 --amp fp32 --profile-dir {out}/profiles", 150, 240),
        _bench("model-b4-bf16", MODEL, "--batch 4 --amp bf16 --profile-dir {out}/profiles", 150, 240),
    ],
    "model-triton": [
        _warm("warm-triton", "--batch 1,4 --dtypes fp32,bf16 --layouts channels_last", 60),
        _bench("model-b1-bf16-channels_last-triton", MODEL, "--batch 1 --amp bf16 --channels_last "
               "--kernels triton --variants eager,ours,ours+graph", 60, 120),
        _bench("model-b1-fp32-channels_last-triton", MODEL, "--batch 1 --amp fp32 --channels_last "
               "--kernels triton --variants eager,ours,ours+graph", 60, 120),
        _bench("model-b4-bf16-channels_last-triton", MODEL, "--batch 4 --amp bf16 --channels_last "
               "--kernels triton --variants eager,ours,ours+graph", 60, 120),
    ],
}


def command(step: Step, out: Path) -> list[str]:
    return [sys.executable] + [a.replace("{out}", str(out)) for a in step.argv]


def run_slice(name: str, out: Path) -> None:
    start = time.monotonic()
    print(f"== slice {name}: {', '.join(s.name for s in SLICES[name])}", flush=True)
    for step in SLICES[name]:
        left = SLICE_LIMIT_S - (time.monotonic() - start)
        timeout = int(min(step.timeout_s, left))
        cmd = command(step, out)
        shown = " ".join(f"{k}={v}" for k, v in (step.env or {}).items()) + " " + shlex.join(cmd[1:])
        print(f"-- {step.name}: python {shown.strip()} (timeout {timeout} s)", flush=True)
        if timeout < 20:
            (out / f"{step.name}.log").write_text(f"not run: the slice's {SLICE_LIMIT_S} s were spent\n")
            continue
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, env={**os.environ, **(step.env or {})}, capture_output=True, text=True,
                                  timeout=timeout)
            status, log = f"exit {proc.returncode}", proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status = f"timed out after {timeout} s"
            log = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        (out / f"{step.name}.log").write_text(f"$ python {shown.strip()}\n{status}\n\n{log}")
        tail = log.strip().splitlines()[-1] if log.strip() else ""
        print(f"   {status} in {time.monotonic() - t0:.0f} s; {tail[:160]}", flush=True)


# ------------------------------------------------------------------------------------------------
# Ceilings
# ------------------------------------------------------------------------------------------------


def ceilings(path: Path) -> None:
    """Device-to-device copy bandwidth and large matmul throughput, measured with triton's do_bench."""
    import torch
    from triton.testing import do_bench

    from kernels.tools.op_bench import header, markdown_table, write_report

    device = torch.device("cuda")
    rows = []
    n = 2**30 // 4  # 1 GiB of fp32
    x, y = torch.empty(n, device=device), torch.empty(n, device=device)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    rows.append(["copy, 1 GiB device to device", f"{ms:.3f}", f"{2 * n * 4 / ms / 1e6:,.0f} GB/s (read + write)"])
    m = 8192
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on TF32 tensor cores (this process only)
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "TF32")):
        a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in "ab")
        ms = do_bench(lambda a=a, b=b: a @ b, return_mode="median")
        rows.append([f"matmul {m}³, {label}", f"{ms:.3f}", f"{2 * m**3 / ms / 1e9:,.0f} TFLOP/s"])
    report = "\n\n".join([header(device, "python -m minicycle.tools.gpu_suite --ceilings", [str(path)],
                                 "minicycle: device ceilings"),
                          "## Device ceilings", markdown_table(["what", "median ms", "rate"], rows),
                          "triton.testing.do_bench medians (CUDA events, L2 cleared before each call)."])
    write_report(report + "\n", str(path))


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------


def tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in md, as (columns, rows)."""
    out, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            if len(block) >= 2 and set(block[1]) == {"---"}:
                out.append((block[0], block[2:]))
            block = []
    return out


def summary(out: Path) -> str:
    lines = [f"# GPU suite summary ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {out})", ""]
    ceil = out / "ceilings.md"
    if ceil.exists():
        text = ceil.read_text()
        lines += [text.splitlines()[2], ""] + [f"- {r[0]}: {r[2]}" for _, rows in tables(text) for r in rows] + [""]
    log = out / "tests.log"
    if log.exists():
        text = log.read_text().strip().splitlines()
        lines += [f"- kernel and CUDA-graph tests: {text[1]}; {text[-1] if len(text) > 2 else ''}", ""]
    for md in sorted(out.glob("ops-*.md")):
        marks = [r[-1] for cols, rows in tables(md.read_text()) if cols[:1] == ["op"] for r in rows]
        bad = [" ".join(r[:5]) for cols, rows in tables(md.read_text()) if cols[:1] == ["op"] for r in rows
               if r[-1] == "✗"]
        skipped = sum(1 for cols, rows in tables(md.read_text()) if cols[:1] == ["op"] for r in rows
                      if r[5].startswith("skipped"))
        takes = [r[cols.index("auto takes")].split(" ")[0].rstrip(",") for cols, rows in tables(md.read_text())
                 if "auto takes" in cols for r in rows]
        picks = ", ".join(f"{name} {takes.count(name)}" for name in ("Triton", "cuDNN", "PyTorch") if name in takes)
        lines.append(f"- {md.stem}: {marks.count('✓')} rows ✓, {len(bad)} ✗{': ' + '; '.join(bad) if bad else ''}"
                     f"{f', {skipped} skipped (budget)' if skipped else ''}{f'; auto takes {picks}' if picks else ''}")
    lines += ["", "| batch | amp | layout | " + " | ".join(VARIANT_ORDER) + " |",
              "| --- | --- | --- | " + " | ".join(["---"] * len(VARIANT_ORDER)) + " |"]
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    busy: list[str] = []
    for md in sorted(out.glob("model-*.md")):
        for cols, rows in tables(md.read_text()):
            if cols[:1] == ["variant"] and "train ms/iter" in cols:
                for r in rows:
                    key = (r[2], r[3], r[1])
                    ms = r[4]
                    cells.setdefault(key, {})[r[0]] = (f"{ms} ms ({r[5]})" if re.match(r"^[\d.]+$", ms)
                                                       else ms.split(" (")[0])
            if "GPU busy ms" in cols:
                busy += [f"- {r[0]} b{r[2]} {r[3]} {r[1]}: GPU busy {r[4]} ms, host ops {r[5]} ms, wall {r[6]} ms; "
                         f"{r[7]} kernels, {r[8]} launch calls" for r in rows]
    for (batch, amp, layout), by_variant in sorted(cells.items()):
        lines.append(f"| {batch} | {amp} | {layout} | "
                     + " | ".join(by_variant.get(v, "—") for v in VARIANT_ORDER) + " |")
    lines += ["", "Model cells: ms per training iteration (speed-up over eager); ours = --kernels auto.", ""] + busy
    missing = [s.name for steps in SLICES.values() for s in steps if not (out / f"{s.name}.log").exists()]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


VARIANT_ORDER = ("eager", "compile", "reduce-overhead", "ours", "ours+graph", "ours (triton)", "ours+graph (triton)")


def plan() -> str:
    lines = []
    for name, steps in SLICES.items():
        lines.append(f"{name}: python -m minicycle.tools.gpu_suite OUTDIR --slice {name}")
        for s in steps:
            env = " ".join(f"{k}={v}" for k, v in (s.env or {}).items())
            argv = shlex.join(s.argv).replace("{out}", "OUTDIR")
            lines.append(f"    {s.name}: {(env + ' ') if env else ''}python {argv}  (timeout {s.timeout_s} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minicycle.tools.gpu_suite", description=__doc__.splitlines()[0])
    p.add_argument("outdir", nargs="?", type=Path, help="where every report, log and profile goes")
    p.add_argument("--slice", action="append", choices=tuple(SLICES), help="run only this slice (repeatable)")
    p.add_argument("--list", action="store_true", help="print the slices and their commands, run nothing")
    p.add_argument("--summary", action="store_true", help="only summarise what OUTDIR holds")
    p.add_argument("--ceilings", type=Path, metavar="FILE", help=argparse.SUPPRESS)  # the check slice's first step
    args = p.parse_args(argv)
    if args.list:
        print(plan())
        return 0
    if args.ceilings:
        ceilings(args.ceilings)
        return 0
    if args.outdir is None:
        p.error("give OUTDIR (or --list)")
    import torch

    if not args.summary and not torch.cuda.is_available():
        print("python -m minicycle.tools.gpu_suite: error: PyTorch sees no CUDA GPU; this suite measures one "
              "(python -m minicycle.tools.gpu_suite --list shows what it runs)", file=sys.stderr)
        return 1
    args.outdir.mkdir(parents=True, exist_ok=True)
    if not args.summary:
        for name in args.slice or list(SLICES):
            run_slice(name, args.outdir)
            (args.outdir / "summary.md").write_text(summary(args.outdir))
    text = summary(args.outdir)
    (args.outdir / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
