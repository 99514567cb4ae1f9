"""Smoke tests of the benchmark harness (python -m kernels.bench): it runs, prints and writes the
tables with the expected rows and columns, and its correctness column is honest. No timing is
asserted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import bench

ROOT = Path(__file__).resolve().parents[1]


def run_bench(args: list[str], interpret: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    return subprocess.run([sys.executable, "-m", "kernels.bench", *args], cwd=ROOT, env=env,
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


def test_quick_runs_ops_and_model_and_writes_the_report(tmp_path):
    out = tmp_path / "x.md"
    proc = run_bench(["--quick", "--out", str(out)], interpret="0")
    assert proc.returncode == 0, proc.stderr[-3000:]

    text = out.read_text(encoding="utf-8")
    assert text == proc.stdout  # the file holds exactly what was printed
    lines = text.splitlines()
    assert lines[0] == "# minicycle benchmark"
    assert f"torch {torch.__version__}" in lines[2] and "triton" in lines[2] and "CPU" in lines[2]
    assert f"`python -m kernels.bench --quick --out {out}`" in lines[2]
    assert "plain PyTorch fallback" in text  # TRITON_INTERPRET=0: says which path "ours" took

    columns, rows = table(text, "op")
    assert columns == bench.OP_COLUMNS
    got = {(r[0], r[1], r[2], r[3]) for r in rows}
    want = {(op, p, shape, dt)
            for n in (1, 4) for dt in ("fp32", "bf16")
            for op, p, shape in [("IN+ReLU", "fwd", f"({n},4,8,8)"), ("IN+ReLU", "bwd", f"({n},4,8,8)"),
                                 *[("reflect conv", p, f"N={n} 2→3 3×3 p1 @8²") for p in ("fwd", "dgrad", "wgrad")]]}
    assert got == want and len(rows) == len(want)
    for r in rows:
        assert r[-1] == "✓", r
        assert float(r[4]) > 0 and float(r[5]) > 0  # ours and eager were timed
        assert r[6].startswith("skipped")  # no torch.compile in --quick without --compile
        assert r[9].endswith("GB/s" if r[0] == "IN+ReLU" else "TFLOP/s")

    columns, rows = table(text, "variant")
    assert columns == bench.MODEL_COLUMNS
    assert [(r[0], r[1], r[2]) for r in rows] == [(v, n, "fp32") for n in ("1", "4")
                                                 for v in ("eager", "ours", "compile")]
    for r in rows:
        if r[0] == "compile":
            assert r[3].startswith("skipped")
            continue
        assert float(r[3]) > 0 and r[6].endswith(" h") and float(r[8]) > 0
        assert r[-1] == ("ref" if r[0] == "eager" else "✓"), r


def test_quick_ops_through_the_triton_interpreter():
    """The same harness with ours running the Triton kernels (interpreter) at batch 1."""
    proc = run_bench(["--quick", "--batch", "1"], interpret="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Triton kernels through the interpreter" in proc.stdout
    assert "## Model" not in proc.stdout and "Model section not run" in proc.stdout  # minutes in the interpreter
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
    for args in (["--ops", "matmul"], ["--dtypes", "fp64"], ["--batch", "0"], ["--batch", "x"], ["--iters", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(args)


def test_200_epoch_iterations_follow_train_py():
    assert bench.iterations_200_epochs(1) == 266_800
    assert bench.iterations_200_epochs(4) == 200 * 334  # 1334 / 4: 333 full batches and one of 2
