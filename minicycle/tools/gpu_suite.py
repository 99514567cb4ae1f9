"""Every GPU measurement in one run on a time budget: python -m minicycle.tools.gpu_suite OUT --budget SECONDS.

    python -m minicycle.tools.gpu_suite --list --budget 480           # the plan: its steps, shares and commands
    python -m minicycle.tools.gpu_suite OUT --budget 480              # run the plan within 480 s, results in OUT
    python -m minicycle.tools.gpu_suite OUT --budget 300 --rehearse   # the same plan, tiny shapes, on a CPU

The plan is a list of (name, command, weight), most important first. A step's share is its weight over the
weights of the steps not run yet, of the budget left when it starts (what one step leaves unused goes to those
after it); the benchmarks take it as their --budget, and every step is stopped at twice its share or at the end
of the budget. A step is skipped when less than MIN_STEP_S is left. BENCHMARKS.md lists the steps and what OUT
holds (summary.md, logs.tar.gz), rewritten after every step. --rehearse runs the same plan on a CPU with tiny
shapes (the tests only collected), so that it can be run until it runs clean: it measures nothing.
"""

import argparse
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PROG = "python -m minicycle.tools.gpu_suite"
MIN_STEP_S = 10  # a step with a smaller share would measure nothing worth its start-up
KERNEL_TESTS = "tests/test_instance_norm.py tests/test_reflect_conv.py"
TAIL = 25  # lines of a step's output in summary.md


def plan(rehearse: bool) -> list[tuple[str, str, float]]:
    """(name, command, weight), in order. {out}: the step's report; {budget}: its share in s; {dir}: the steps'
    folder."""
    quick = " --quick" if rehearse else ""
    pytest = "python -m pytest -q -p no:cacheprovider" + (" --collect-only" if rehearse else "")
    bench = f"--budget {{budget}} --out {{out}}{quick}"
    model = f"python -m minicycle.tools.iteration_bench --batch 1 --channels_last {bench}" + (
        " --iters 1" if rehearse else "")
    large = ([("1x3x6000x8000", "--size 64,96 --batch 1"), ("3x3x3000x4000", "--size 32,48 --batch 3")] if rehearse
             else [("1x3x6000x8000", "--size 6000,8000 --batch 1"), ("3x3x3000x4000", "--size 3000,4000 --batch 3")])
    return [
        ("warm", "python -m kernels.tools.compile_report --compile-only --batch 1 --dtypes bf16,fp32 --layouts "
                 "channels_last" + (" --layers head7x7 --passes fwd" if rehearse else ""), 1),
        ("tests", f"TRITON_INTERPRET=0 {pytest} {KERNEL_TESTS} tests/test_compile.py tests/test_cuda_graph.py", 3),
        ("tests-debug", f"TRITON_INTERPRET=0 TRITON_DEBUG=1 {pytest} -x {KERNEL_TESTS}", 2),
        ("ceilings", f"python -m kernels.tools.op_bench --ceilings --out {{out}}{quick}", 0.3),
        *[(f"ops-{amp}", f"python -m kernels.tools.op_bench --batch 1 --layouts channels_last --dtypes {amp} "
                         f"--no-compile {bench}", 1) for amp in ("bf16", "fp32")],
        *[(f"model-{amp}", f"{model} --amp {amp} --kernels triton,auto --variants eager,ours,ours+graph "
                           f"--profile-dir {{dir}}/profiles", 1.5) for amp in ("bf16", "fp32")],
        *[(f"infer-{name}", f"python -m minicycle.tools.iteration_bench --infer {size} --channels_last --kernels "
                            f"triton,auto --variants eager,ours --iters {1 if rehearse else 3} {bench}", 1.5)
          for name, size in large],
        *[(f"model-{amp}-compile", f"{model} --amp {amp} --variants eager,ours+compile,compile,reduce-overhead", 2)
          for amp in ("bf16", "fp32")],
    ]


def run_step(command: str, log: Path, timeout_s: float) -> str:
    """Run one step (KEY=VALUE words first set its environment; python is this interpreter), its output into
    log; its exit status, or that it was stopped (with every process it started)."""
    words, env = shlex.split(command), dict(os.environ)
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    words[0] = sys.executable if words[0] == "python" else words[0]
    with log.open("w") as f:
        f.write(f"$ {command}\n")
        f.flush()
        proc = subprocess.Popen(words, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return f"exit {proc.wait(timeout=timeout_s)}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"stopped after {timeout_s:.0f} s"


def write_out(out: Path, work: Path, done: list[tuple[str, str, str, float, float]], title: str) -> None:
    """summary.md (each step's command, status, time and share, then its report or the end of its output) and
    logs.tar.gz (the whole work folder: outputs, reports, profiles, kernels/choice.py's decisions file)."""
    lines = [title, "", "| step | status | seconds | share s | command |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {status} | {seconds:.0f} | {share:.0f} | `{command}` |"
              for name, command, status, seconds, share in done]
    for name, _, status, _, _ in done:
        report, log = work / f"{name}.md", work / f"{name}.log"
        lines += ["", f"## {name}: {status}", ""]
        if report.exists():
            lines.append(re.sub("^#", "###", report.read_text(), flags=re.M).strip())  # its headings under the step's
        if log.exists() and (status != "exit 0" or not report.exists()):
            lines += ["", "```", *log.read_text(errors="replace").strip().splitlines()[-TAIL:], "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="steps")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("outdir", nargs="?", type=Path, help="where summary.md and logs.tar.gz go")
    p.add_argument("--budget", type=float, metavar="SECONDS", help="the time the whole plan may take")
    p.add_argument("--rehearse", action="store_true", help="the same plan with tiny shapes on a CPU")
    p.add_argument("--list", action="store_true", help="print the plan (its steps, shares and commands), run nothing")
    args = p.parse_args(argv)
    steps = plan(args.rehearse)
    total = sum(weight for _, _, weight in steps)
    if args.list:
        for name, command, weight in steps:
            share = f", {args.budget * weight / total:.0f} s" if args.budget else ""
            print(f"{name} (share {weight / total:.0%}{share}): {command}")
        return 0
    if args.outdir is None or args.budget is None or args.budget <= 0:
        p.error("give OUTDIR and --budget SECONDS (> 0), the time the whole plan may take (or --list)")
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        print(f"{PROG}: error: PyTorch sees no CUDA GPU; this suite measures one ({PROG} --list shows what it runs; "
              f"--rehearse runs it on a CPU)", file=sys.stderr)
        return 1
    args.outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite."))
    os.environ["MINICYCLE_KERNEL_CACHE"] = str(work / "kernel_choice.json")  # every step's decisions, kept
    title = (f"# GPU suite{' rehearsal (tiny shapes on a CPU: no measurement)' if args.rehearse else ''}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}: "
             f"`{PROG} {shlex.join(sys.argv[1:] if argv is None else argv)}`")
    done, start = [], time.monotonic()
    for i, (name, command, weight) in enumerate(steps):
        left = args.budget - (time.monotonic() - start)
        share = max(left * weight / sum(w for _, _, w in steps[i:]), min(left, MIN_STEP_S))
        command = command.format(budget=f"{share:.0f}", out=work / f"{name}.md", dir=work)
        t0 = time.monotonic()
        if share < MIN_STEP_S:
            status = f"skipped: {max(0, left):.0f} s of the budget left"
        else:
            print(f"-- {name} (share {share:.0f} s): {command}", flush=True)
            status = run_step(command, work / f"{name}.log", min(2 * share, left))
        print(f"   {name}: {status} in {time.monotonic() - t0:.0f} s", flush=True)
        done.append((name, command, status, time.monotonic() - t0, share))
        write_out(args.outdir, work, done, title)
    shutil.rmtree(work)
    print((args.outdir / "summary.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
