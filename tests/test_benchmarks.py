"""The measuring tools on a CPU (python -m kernels.tools.op_bench for the ops and the device's ceilings, python -m
minicycle.tools.iteration_bench for the training iteration, the generator's inference and the kernel launches):
they run, print and write the tables with the expected rows and columns, their correctness columns are honest,
and the launch counts add up. No timing is asserted."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import choice
from kernels.device import Device
from kernels.tools import op_bench as bench
from minicycle.model import Config
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
                                                       for v in model_bench.TIMED]
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
    for args in (["--variants", "fast"], ["--iters", "0"], ["--amp", "fp16"], ["--size", "30"], ["--size", "64,66"],
                 ["--size", "1,2,3"], ["--netG", "unet_256", "--size", "128"], ["--kernels", "fast"],
                 ["--infer", "--variants", "eager,ours+graph"], ["--cpu", "--infer"]):
        with pytest.raises(SystemExit):
            model_bench.parse_args(args)
    assert model_bench.parse_args(["--size", "64,96"]).size == (64, 96)
    assert model_bench.parse_args(["--quick"]).size == (32, 32)


def test_200_epoch_iterations_follow_train_py():
    assert model_bench.iterations_200_epochs(1) == 266_800
    assert model_bench.iterations_200_epochs(4) == 200 * 334  # 1334 / 4: 333 full batches and one of 2


# ----------------------------------------------------------------------------- the ceilings and auto's decisions


def test_ceilings_rate_a_copy_and_two_matmuls(capsys, cpu_threads):
    assert bench.main(["--quick", "--ceilings"]) == 0
    columns, rows = table(capsys.readouterr().out, "what")
    assert columns == ["what", "median µs", "rate"]
    assert [r[0] for r in rows] == ["copy 1 MiB, device to device", "matmul 256³, bf16", "matmul 256³, TF32"]
    assert rows[0][2].endswith(" GB/s") and all(r[2].endswith(" TFLOP/s") for r in rows[1:])
    assert all(float(r[1]) > 0 for r in rows)


@pytest.mark.slow
def test_the_decisions_table_gives_the_parity_checks_errors_per_pass(monkeypatch, capsys, cpu_threads):
    """A chooser for CPU tensors (a stand-in sm_90, Triton twice as fast): the op benchmark's rows take it, and
    the table under them lists each decision per pass with its medians and the errors its check measured."""
    chooser = choice.Chooser(timer=lambda fn, path, pass_name: 1.0 if path == choice.TRITON else 2.0,
                             facts=lambda device: Device("stand-in H100", 90, 132, 232_448), device_types=("cpu",))
    monkeypatch.setattr(choice, "CHOOSER", chooser)
    assert bench.main(["--quick", "--batch", "1", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    columns, rows = table(out.split("## What --kernels auto decided")[1], "layer")
    assert columns == bench.DECISION_COLUMNS
    assert [(r[0], r[1]) for r in rows] == [("IN+ReLU 4 @ 1x8x8 fp32", "fwd+bwd")] + [
        ("conv 3x3 2->3 @ 1x8x8 fp32", p) for p in ("fwd", "dgrad", "wgrad")]
    for r in rows:
        assert r[2:5] == ["Triton, by 2.00x", "1.000", "2.000"] and r[7] == "5e-03", r
        assert 0 <= float(r[5]) < 5e-3 and 0 <= float(r[6]) < 5e-3, r  # Triton's errors, whole and worst tile


# ----------------------------------------------------------------------------- --infer


@pytest.mark.slow
def test_quick_inference_checks_every_run_against_eager(tmp_path, cpu_threads, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "i.md"
    assert model_bench.main(["--quick", "--infer", "--size", "32,64", "--batch", "1,2", "--kernels", "triton,auto",
                             "--variants", "eager,ours", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## G_A inference (resnet_6blocks, ngf=4, 32×64; --quick: a harness check)" in text
    columns, rows = table(text, "variant")
    assert columns == model_bench.INFER_COLUMNS
    assert [(r[0], r[2]) for r in rows] == [(v, n) for n in "12" for v in ("eager", "ours (triton)", "ours")]
    for r in rows:
        assert float(r[4]) > 0 and float(r[8]) >= 0 and r[7] == "n/a (CPU)"
        assert r[9:] == (["ref"] * 4 if r[0] == "eager" else ["0.0e+00", "0.0e+00", "0.0e+00", "✓"]), r


def test_an_inference_that_differs_from_eager_fails(monkeypatch, capsys, cpu_threads):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    real = kernels.instance_norm_relu
    monkeypatch.setattr(kernels, "instance_norm_relu", lambda x, **kw: real(x, **kw) * 1.5)
    assert model_bench.main(["--quick", "--infer", "--kernels", "triton", "--variants", "eager,ours",
                             "--batch", "1", "--iters", "1"]) == 1
    out = capsys.readouterr().out
    _, rows = table(out, "variant")
    assert rows[1][0] == "ours (triton)" and rows[1][-1] == "✗" and float(rows[1][10]) > 1e-2
    assert "Some checks failed" in out


# ----------------------------------------------------------------------------- --count-launches


def count(args: list[str]) -> tuple[dict[str, list[str]], str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "minicycle.tools.iteration_bench", "--count-launches", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    columns, rows = table(proc.stdout, "build")
    assert columns == model_bench.COUNT_COLUMNS
    return {r[0]: r[1:] for r in rows}, proc.stdout


@pytest.fixture(scope="module")
def small():
    return count(["--size", "32", "--ngf", "4", "--variants", "eager,ours,ours+graph"])


@pytest.mark.slow
def test_counts_add_up_and_ours_launches_triton_kernels(small):
    rows, text = small
    assert list(rows) == ["eager", "ours", "ours+graph"]
    for build, cells in rows.items():
        total, aten, _, custom, triton, inductor = (int(c.replace(",", "")) for c in cells)
        assert total == aten + triton + inductor > 0, build
        assert (triton > 0) == (custom > 0) == (build != "eager"), build
    # the graph-ready step adds only the device-side pool moves (a handful of index ops) to ours
    extra = int(rows["ours+graph"][0].replace(",", "")) - int(rows["ours"][0].replace(",", ""))
    assert 0 < extra <= 20
    ours = text.split("- ours:")[-1].split("\n")[0]
    aten_ops = [item.rsplit(" ", 1)[0] for item in ours.split(";")[0].removeprefix(" ATen ").split(", ")]
    assert "add_" in aten_ops and "zeros" not in aten_ops  # no zero-filled gradients for the IN op's mu, rstd
    assert "_fwd_partial_kernel" in ours  # the 256² layers' split path, at 32² with a scaled threshold


@pytest.mark.slow
def test_eager_counts_do_not_depend_on_size_or_channels(small):
    """The official layers launch the same kernels at any size and width. (Ours may not: a kernel can
    pick its path from the channel count, which is why the recorded counts are at the paper's config.)"""
    rows, _ = small
    other, _ = count(["--size", "64", "--ngf", "8", "--variants", "eager"])
    assert other["eager"] == rows["eager"]


def test_counting_needs_the_interpreter_and_the_cpu(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert model_bench.main(["--count-launches"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("python -m minicycle.tools.iteration_bench: error: --count-launches needs TRITON_INTERPRET=1, so "
                   "that ours reaches its Triton launches on a CPU")
    assert model_bench.main(["--count-launches", "--device", "cuda"]) == 2
    assert "--count-launches measures the CPU" in capsys.readouterr().err


def test_channels_last_builds_the_model_as_train_py_on_cuda():
    model, _, _ = model_bench.build("ours", "auto", Config(ngf=4, ndf=4, netG="resnet_6blocks"), torch.device("cpu"),
                                    None, 1, channels_last=True)
    assert model.memory_format == torch.channels_last
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
