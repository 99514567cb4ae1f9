"""Smoke tests of the benchmark harnesses (python -m kernels.tools.op_bench for the ops, python -m
minicycle.tools.iteration_bench for the training iteration): they run, print and write the tables with the
expected rows and columns, and their correctness columns are honest. No timing is asserted."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.tools import op_bench as bench
from minicycle.tools import iteration_bench as model_bench

ROOT = Path(__file__).resolve().parents[1]


def run_bench(args: list[str], interpret: str, module: str = "kernels.tools.op_bench") -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def table(md: str, first_column: str) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the markdown table whose first header cell is first_column."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip("|").split("|")])
    assert set(block[1]) == {"---"}
    return block[0], block[2:]


@pytest.mark.slow
def test_quick_ops_write_the_report(tmp_path):
    out = tmp_path / "x.md"
    proc = run_bench(["--quick", "--layouts", "nchw,channels_last", "--out", str(out)], interpret="0")
    assert proc.returncode == 0, proc.stderr[-3000:]

    text = out.read_text(encoding="utf-8")
    assert text == proc.stdout  # the file holds exactly what was printed
    lines = text.splitlines()
    assert lines[0] == "# minicycle benchmark"
    assert f"torch {torch.__version__}" in lines[2] and "triton" in lines[2] and "CPU" in lines[2]
    assert f"`python -m kernels.tools.op_bench --quick --layouts nchw,channels_last --out {out}`" in lines[2]
    assert "plain PyTorch fallback" in text  # TRITON_INTERPRET=0: says which path "ours" took
    assert "cudnn.benchmark=True" in text  # as the official code runs cuDNN

    columns, rows = table(text, "op")
    assert columns == bench.OP_COLUMNS
    got = {tuple(r[:5]) for r in rows}
    want = {(op, p, shape, dt, layout)
            for n in (1, 4) for dt in ("fp32", "bf16") for layout in ("nchw", "channels_last")
            for op, p, shape in [("IN+ReLU", "fwd", f"({n},4,8,8)"), ("IN+ReLU", "bwd", f"({n},4,8,8)"),
                                 *[("reflect conv", p, f"N={n} 2→3 3×3 p1 @8²") for p in ("fwd", "dgrad", "wgrad")]]}
    assert got == want and len(rows) == len(want)
    for r in rows:
        assert r[-1] == "✓", r
        assert float(r[5]) > 0 and float(r[6]) > 0  # ours and eager were timed
        assert r[7].startswith("skipped")  # no torch.compile in --quick without --compile
        assert r[10].endswith("GB/s" if r[0] == "IN+ReLU" else "TFLOP/s")
    for path in (ROOT / "kernels").rglob("*.py"):  # kernels/ stands alone
        imported = {n.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
                    for n in node.names} | {node.module for node in ast.walk(ast.parse(path.read_text()))
                                            if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in imported if m.split(".")[0] == "minicycle"}, path


def test_budget_skips_rows_and_keeps_the_report_valid(tmp_path):
    out = tmp_path / "x.md"
    assert bench.main(["--quick", "--ops", "in", "--batch", "1", "--dtypes", "fp32", "--budget", "0",
                       "--out", str(out)]) == 0
    _, rows = table(out.read_text(encoding="utf-8"), "op")
    assert [r[5] for r in rows] == ["skipped (--budget 0 s spent)"] * 2


@pytest.mark.slow
def test_quick_model_runs_every_variant_and_writes_the_report(tmp_path):
    out, profiles = tmp_path / "m.md", tmp_path / "prof"
    proc = run_bench(["--quick", "--profile-dir", str(profiles), "--out", str(out)], "0",
                     "minicycle.tools.iteration_bench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert text == proc.stdout
    assert "`python -m minicycle.tools.iteration_bench --quick --profile-dir" in text.splitlines()[2]
    columns, rows = table(text, "variant")
    assert columns == model_bench.MODEL_COLUMNS
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(v, "nchw", n, "fp32") for n in ("1", "4")
                                                       for v in model_bench.VARIANTS]
    for r in rows:
        if r[0] in ("compile", "reduce-overhead"):
            assert r[4].startswith("skipped")
            continue
        assert float(r[4]) > 0 and r[7].endswith(" h")
        assert r[-1] == ("ref" if r[0] == "eager" else "✓"), r
        assert r[10] in ("ref", "0.0e+00")  # the same first iteration as eager, on the PyTorch path
    _, prof_rows = table(text.split("## Profile")[1], "variant")
    assert len(prof_rows) == 6 and len(list(profiles.glob("*.txt"))) == 6


@pytest.mark.slow
def test_cpu_mode_compares_the_step_with_a_plain_loop(tmp_path):
    proc = run_bench(["--cpu", "--iters", "2", "--rounds", "1"], "0", "minicycle.tools.iteration_bench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    columns, rows = table(proc.stdout, "variant")
    assert columns == model_bench.CPU_COLUMNS
    assert [r[0] for r in rows] == list(model_bench.CPU_VARIANTS)
    assert rows[0][2:] == ["1.00×", "ref"]
    for r in rows:
        assert float(r[1]) > 0
    # the plain loop is the official iteration: every build computes the same first losses
    assert [r[3] for r in rows[1:]] == ["identical"] * 3


def test_plain_loop_yardstick_trains_on_the_builtin_dataset(capsys, cpu_threads):
    assert model_bench.main(["--plain-loop", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("plain loop: 2 iterations; last losses ")
    losses = [float(v) for v in line.split("last losses ")[1].split(", ")]
    assert len(losses) == len(model_bench.LOSS_NAMES) and all(0 < v < 100 for v in losses)


@pytest.mark.slow
def test_quick_ops_through_the_triton_interpreter():
    """The same harness with ours running the Triton kernels (interpreter) at batch 1."""
    proc = run_bench(["--quick", "--batch", "1"], interpret="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Triton kernels through the interpreter" in proc.stdout
    _, rows = table(proc.stdout, "op")
    assert len(rows) == 10
    assert all(r[-1] == "✓" for r in rows), rows


@pytest.fixture
def cpu_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # --quick sets one thread in-process


def test_a_mismatch_is_shown_and_fails_the_run(monkeypatch, capsys, cpu_threads):
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    real = kernels.instance_norm_relu
    monkeypatch.setattr(kernels, "instance_norm_relu", lambda x, **kw: real(x, **kw) * 1.01)  # 1% off
    assert bench.main(["--quick", "--ops", "in", "--batch", "1", "--dtypes", "fp32"]) == 1
    out = capsys.readouterr().out
    _, rows = table(out, "op")
    assert [r[-1] for r in rows] == ["✗", "✗"]
    assert "Some checks failed" in out


def test_bad_filters_are_rejected():
    for args in (["--ops", "matmul"], ["--dtypes", "fp64"], ["--batch", "0"], ["--batch", "x"],
                 ["--layouts", "nhwc"]):
        with pytest.raises(SystemExit):
            bench.parse_args(args)
    for args in (["--variants", "fast"], ["--iters", "0"], ["--amp", "fp16"]):
        with pytest.raises(SystemExit):
            model_bench.parse_args(args)


def test_200_epoch_iterations_follow_train_py():
    assert model_bench.iterations_200_epochs(1) == 266_800
    assert model_bench.iterations_200_epochs(4) == 200 * 334  # 1334 / 4: 333 full batches and one of 2
