"""Every GPU measurement in one run on the user's time budget: python -m minicycle.tools.gpu_suite OUT --budget S.

    python -m minicycle.tools.gpu_suite --list [--budget 480]      # the plan: its steps, shares and commands
    python -m minicycle.tools.gpu_suite OUT --budget 480           # run the plan within 480 s, results in OUT
    python -m minicycle.tools.gpu_suite OUT --summary              # only the summary of what OUT holds
    python -m minicycle.tools.gpu_suite OUT --budget 300 --rehearse   # the same plan, tiny shapes, on a CPU

The plan, in order, so that a short budget leaves out what matters least:

    1 warm      compile every kernel the timed layers launch into Triton's cache, on every core
                (python -m kernels.tools.compile_report --compile-only): the JIT then finds them there
      tests     the kernel and CUDA-graph tests on CUDA with the real Triton compiler (TRITON_INTERPRET=0);
                their full output, a failure's too, is OUT/tests.log
    2 ceilings  the device's ceilings, once: device-to-device copy GB/s, 8192³ bf16 and TF32 matmul TFLOP/s,
                so that every result can be read against them
    3 ops-*     the op table (python -m kernels.tools.op_bench) at batch 1, channels_last, bf16 then fp32:
                ours against reflection pad + cuDNN (conv fwd, dgrad, wgrad; IN+ReLU fwd, bwd), each row a
                correctness check too, with the path --kernels auto takes there
    4 model-*   the training iteration (python -m minicycle.tools.iteration_bench): resnet_9blocks, 256²,
                batch 1, channels_last, bf16 then fp32: eager (the official layers) and ours --kernels triton;
                eager, ours --kernels auto and ours+graph (train.py --cuda_graph); then torch.compile and
                reduce-overhead. ms/iter, peak memory, and a profile of one iteration (GPU busy against wall)

Budget: a step gets a share of what is left when it starts, its weight over the weights of itself and of
every step after it (so the time a step leaves unused goes to the ones after it). The benchmarks start no
new row past their share (--budget); every step is stopped at twice its share or at the end of the budget.
A share is at least MIN_STEP_S while that much is left, and no step starts with less: a short budget
cuts the plan from its end. Rows and steps left out are listed in summary.md as skipped, with the
command that runs them.

OUT ends with five files: summary.md; tables.md (every step's report, in plan order); tests.log;
logs.tar.gz (each step's command, exit status and output, and its report); profiles.tar.gz. While the
plan runs they are in OUT/steps/, and summary.md is rewritten after every step. --rehearse runs the same
plan on a CPU with tiny shapes (the benchmarks' --quick; the tests only collected), so that the plan can
be run until it runs clean: none of its numbers is a measurement.
"""

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PROG = "python -m minicycle.tools.gpu_suite"
OPS, MODEL = "kernels.tools.op_bench", "minicycle.tools.iteration_bench"
KERNEL_TESTS = ["tests/test_instance_norm.py", "tests/test_reflect_conv.py", "tests/test_compile.py",
                "tests/test_cuda_graph.py"]
MIN_STEP_S = 10  # a step with a smaller share would measure nothing worth its start-up
REAL_TRITON = {"TRITON_INTERPRET": "0"}


@dataclass
class Step:
    name: str  # its report is steps/<name>.md, its log steps/<name>.log
    argv: list[str]  # run with sys.executable; "{steps}" is replaced by the steps' folder
    weight: float  # against the weights of the steps after it: its share of the budget left
    env: dict[str, str] = field(default_factory=dict)
    budgeted: bool = False  # a benchmark: takes --budget (its share) and --out (its report)


def plan(rehearse: bool) -> list[Step]:
    """The steps in the order they run; rehearse: the same steps with tiny shapes on a CPU."""
    quick = ["--quick"] if rehearse else []
    warm_only = ["--layers", "head7x7", "--passes", "fwd"] if rehearse else []
    steps = [
        Step("warm", ["-m", "kernels.tools.compile_report", "--compile-only", "--batch", "1", "--dtypes",
                      "bf16,fp32", "--layouts", "channels_last", *warm_only], 1.5, REAL_TRITON),
        Step("tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", *(["--collect-only"] if rehearse else []),
                       *KERNEL_TESTS], 4, REAL_TRITON),
        Step("ceilings", ["-m", "minicycle.tools.gpu_suite", "--ceilings", "{steps}/ceilings.md",
                          *(["--rehearse"] if rehearse else [])], 1),
    ]
    for amp in ("bf16", "fp32"):
        steps.append(Step(f"ops-{amp}", ["-m", OPS, *quick, "--batch", "1", "--layouts", "channels_last", "--dtypes",
                                         amp, "--no-compile"], 1.5, budgeted=True))
    model = ["-m", MODEL, *quick, "--batch", "1", "--channels_last", *(["--iters", "1"] if rehearse else [])]
    profile = ["--profile-dir", "{steps}/profiles"]
    for amp in ("bf16", "fp32"):
        steps += [Step(f"model-{amp}-triton", [*model, "--amp", amp, "--kernels", "triton", "--variants",
                                               "eager,ours", *profile], 1, budgeted=True),
                  Step(f"model-{amp}", [*model, "--amp", amp, "--kernels", "auto", "--variants",
                                        "eager,ours,ours+graph", *profile], 1.5, budgeted=True)]
    for amp in ("bf16", "fp32"):
        steps.append(Step(f"model-{amp}-compile", [*model, "--amp", amp, "--variants", "eager,compile,reduce-overhead"],
                          2, budgeted=True))
    return steps


def command(step: Step, steps_dir: Path | str, share_s: float | None = None) -> list[str]:
    argv = [a.replace("{steps}", str(steps_dir)) for a in step.argv]
    if step.budgeted:
        budget = ["--budget", f"{share_s:.0f}"] if share_s is not None else []
        argv += [*budget, "--out", f"{steps_dir}/{step.name}.md"]
    return [sys.executable, *argv]


def shown(step: Step, cmd: list[str]) -> str:
    """The command as a user would type it."""
    return " ".join([*(f"{k}={v}" for k, v in step.env.items()), "python", shlex.join(cmd[1:])])


def run_step(step: Step, cmd: list[str], timeout_s: float) -> tuple[str, str]:
    """Run one step; its exit status and its whole output (also when it was stopped)."""
    try:
        proc = subprocess.run(cmd, env={**os.environ, **step.env}, capture_output=True, text=True, timeout=timeout_s)
        return f"exit {proc.returncode}", proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        return f"stopped after {timeout_s:.0f} s", out


def step_share(left_s: float, steps: list[Step]) -> float:
    """The share of steps[0], the next step, in the left_s seconds left for steps: its weight over theirs, and at
    least MIN_STEP_S while that much is left, so that a short budget cuts the plan from its end."""
    left_s = max(0.0, left_s)
    return max(left_s * steps[0].weight / sum(s.weight for s in steps), min(left_s, MIN_STEP_S))


def run_plan(steps: list[Step], steps_dir: Path, budget_s: float, after_step: Callable[[], None]) -> None:
    start = time.monotonic()
    for i, step in enumerate(steps):
        left = budget_s - (time.monotonic() - start)
        share = step_share(left, steps[i:])
        cmd = command(step, steps_dir, share)
        log = steps_dir / f"{step.name}.log"
        if share < MIN_STEP_S:
            log.write_text(f"$ {shown(step, cmd)}\nskipped: {max(0, left):.0f} s of the budget left "
                           f"(a step needs {MIN_STEP_S} s)\n")
            print(f"-- {step.name}: skipped, {max(0, left):.0f} s of the budget left", flush=True)
            continue
        timeout = min(2 * share, left)
        print(f"-- {step.name}: {shown(step, cmd)} (share {share:.0f} s, stopped at {timeout:.0f} s)", flush=True)
        t0 = time.monotonic()
        status, output = run_step(step, cmd, timeout)
        log.write_text(f"$ {shown(step, cmd)}\n{status}\n\n{output}")
        tail = output.strip().splitlines()[-1] if output.strip() else ""
        print(f"   {status} in {time.monotonic() - t0:.0f} s; {tail[:160]}", flush=True)
        after_step()


def pack(out: Path, steps: list[Step]) -> None:
    """OUT/steps/ into OUT's five files."""
    steps_dir = out / "steps"
    reports = [steps_dir / f"{s.name}.md" for s in steps if (steps_dir / f"{s.name}.md").exists()]
    (out / "tables.md").write_text("\n\n".join(r.read_text() for r in reports))
    if (steps_dir / "tests.log").exists():
        shutil.copyfile(steps_dir / "tests.log", out / "tests.log")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(steps_dir.glob("*.log")) + reports:
            tar.add(path, arcname=f"steps/{path.name}")
    with tarfile.open(out / "profiles.tar.gz", "w:gz") as tar:
        if (steps_dir / "profiles").is_dir():
            tar.add(steps_dir / "profiles", arcname="profiles")
    shutil.rmtree(steps_dir)


def step_files(out: Path) -> dict[str, str]:
    """Each step's report and log by file name: from OUT/steps/ while the plan runs, from logs.tar.gz after."""
    if (out / "steps").is_dir():
        return {p.name: p.read_text() for p in sorted((out / "steps").iterdir()) if p.suffix in (".md", ".log")}
    if (out / "logs.tar.gz").exists():
        with tarfile.open(out / "logs.tar.gz") as tar:
            return {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    return {}


# ------------------------------------------------------------------------------------------------
# Ceilings
# ------------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], on_cuda: bool) -> float:
    """triton's do_bench on CUDA (CUDA events, L2 cleared before each call); a wall-clock median on a CPU."""
    if on_cuda:
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[2]


def ceilings(path: Path, rehearse: bool) -> None:
    """Device-to-device copy bandwidth and large matmul throughput; rehearse: small sizes on the CPU."""
    import torch

    from kernels.tools.op_bench import header, markdown_table, write_report

    device = torch.device("cpu" if rehearse else "cuda")
    on_cuda = device.type == "cuda"
    rows = []
    n = (2**20 if rehearse else 2**30) // 4  # fp32 elements: 1 GiB (1 MiB rehearsed)
    x, y = torch.empty(n, device=device), torch.empty(n, device=device)
    ms = median_ms(lambda: y.copy_(x), on_cuda)
    rows.append([f"copy, {n * 4 >> 20} MiB device to device", f"{ms:.3f}",
                 f"{2 * n * 4 / ms / 1e6:,.0f} GB/s (read + write)"])
    m = 256 if rehearse else 8192
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on TF32 tensor cores (this process only)
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "TF32")):
        a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in "ab")
        ms = median_ms(lambda a=a, b=b: a @ b, on_cuda)
        rows.append([f"matmul {m}³, {label}", f"{ms:.3f}", f"{2 * m**3 / ms / 1e9:,.3f} TFLOP/s"])
    report = "\n\n".join([header(device, f"{PROG} --ceilings", [str(path)], "minicycle: device ceilings"),
                          "## Device ceilings" + (" (--rehearse: small sizes on the CPU)" if rehearse else ""),
                          markdown_table(["what", "median ms", "rate"], rows), median_ms.__doc__.strip()])
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


def summary(out: Path, steps: list[Step]) -> str:
    files = step_files(out)
    lines = [f"# GPU suite summary ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {out})", ""]
    if "ceilings.md" in files:
        text = files["ceilings.md"]
        lines += [text.splitlines()[2], ""] + [f"- {r[0]}: {r[2]}" for _, rows in tables(text) for r in rows] + [""]
    if "tests.log" in files:
        text = files["tests.log"].strip().splitlines()
        lines += [f"- kernel and CUDA-graph tests: {text[1]}; {text[-1] if len(text) > 2 else ''}", ""]
    for name in sorted(n for n in files if n.startswith("ops-") and n.endswith(".md")):
        op_tables = [(cols, rows) for cols, rows in tables(files[name]) if cols[:1] == ["op"]]
        marks = [r[-1] for _, rows in op_tables for r in rows]
        bad = [" ".join(r[:5]) for _, rows in op_tables for r in rows if r[-1] == "✗"]
        skipped = sum(1 for _, rows in op_tables for r in rows if r[5].startswith("skipped"))
        takes = [r[cols.index("auto takes")].split(" ")[0].rstrip(",") for cols, rows in op_tables
                 if "auto takes" in cols for r in rows]
        picks = ", ".join(f"{pick} {takes.count(pick)}" for pick in ("Triton", "cuDNN", "PyTorch") if pick in takes)
        lines.append(f"- {Path(name).stem}: {marks.count('✓')} rows ✓, {len(bad)} ✗"
                     f"{': ' + '; '.join(bad) if bad else ''}{f', {skipped} skipped (budget)' if skipped else ''}"
                     f"{f'; auto takes {picks}' if picks else ''}")
    lines += ["", "| batch | amp | layout | " + " | ".join(VARIANT_ORDER) + " |",
              "| --- | --- | --- | " + " | ".join(["---"] * len(VARIANT_ORDER)) + " |"]
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    busy: list[str] = []
    for name in sorted(n for n in files if n.startswith("model-") and n.endswith(".md")):
        for cols, rows in tables(files[name]):
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
    lines += skipped_steps(files, steps)
    missing = [s.name for s in steps if f"{s.name}.log" not in files]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def skipped_steps(files: dict[str, str], steps: list[Step]) -> list[str]:
    """Each step the budget left out, or whose report skipped rows, with the command that runs it."""
    lines = []
    for s in steps:
        log = files.get(f"{s.name}.log", "").splitlines()
        status = log[1] if len(log) > 1 else ""
        rows_skipped = "skipped (--budget" in files.get(f"{s.name}.md", "")
        if status.startswith(("skipped", "stopped")) or rows_skipped:
            why = "rows skipped (budget)" if status.startswith("exit") else status
            lines.append(f"- {s.name} ({why}): {shown(s, command(s, 'OUT'))}")
    return ["", "Skipped (budget):", *lines] if lines else []


VARIANT_ORDER = ("eager", "compile", "reduce-overhead", "ours", "ours+graph", "ours (triton)", "ours+graph (triton)")


def plan_text(steps: list[Step], budget_s: float | None) -> str:
    """Each step with its command and its share: weight / total weight of the budget, if every step before
    it spends exactly its own share."""
    total = sum(s.weight for s in steps)
    lines = []
    for s in steps:
        share = f"{s.weight / total:.0%}" + (f", {budget_s * s.weight / total:.0f} s" if budget_s else "")
        lines.append(f"{s.name} (share {share}): {shown(s, command(s, 'OUT'))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("outdir", nargs="?", type=Path, help="where the summary, tables, logs and profiles go")
    p.add_argument("--budget", type=float, metavar="SECONDS", help="the time the whole plan may take")
    p.add_argument("--rehearse", action="store_true", help="the same plan with tiny shapes on a CPU")
    p.add_argument("--list", action="store_true", help="print the plan (its steps, shares and commands), run nothing")
    p.add_argument("--summary", action="store_true", help="only summarise what OUTDIR holds")
    p.add_argument("--ceilings", type=Path, metavar="FILE", help=argparse.SUPPRESS)  # the ceilings step
    args = p.parse_args(argv)
    steps = plan(args.rehearse)
    if args.list:
        print(plan_text(steps, args.budget))
        return 0
    if args.ceilings:
        ceilings(args.ceilings, args.rehearse)
        return 0
    if args.outdir is None:
        p.error("give OUTDIR (or --list)")
    if not args.summary and (args.budget is None or args.budget <= 0):
        p.error("give --budget SECONDS (> 0), the time the whole plan may take")
    import torch

    if not args.summary and not args.rehearse and not torch.cuda.is_available():
        print(f"{PROG}: error: PyTorch sees no CUDA GPU; this suite measures one "
              f"({PROG} --list shows what it runs; --rehearse runs it on a CPU)", file=sys.stderr)
        return 1
    args.outdir.mkdir(parents=True, exist_ok=True)
    if not args.summary:
        steps_dir = args.outdir / "steps"
        steps_dir.mkdir(exist_ok=True)

        def write_summary() -> None:
            (args.outdir / "summary.md").write_text(summary(args.outdir, steps))

        run_plan(steps, steps_dir, args.budget, write_summary)
        pack(args.outdir, steps)
    text = summary(args.outdir, steps)
    (args.outdir / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
