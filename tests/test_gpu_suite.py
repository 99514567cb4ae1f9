"""python -m minicycle.tools.gpu_suite on a CPU machine: its plan and budget, its refusal without a GPU, its
summary of reports (made here by the CPU harness checks of the benchmarks), and its CPU rehearsal end to end."""

import tarfile
import time

import pytest
import torch

from kernels.tools import op_bench as bench
from minicycle.tools import gpu_suite
from minicycle.tools import iteration_bench as model_bench


def test_plan_lists_every_step_within_the_budget(capsys):
    assert gpu_suite.main(["--list", "--budget", "480"]) == 0
    out = capsys.readouterr().out
    steps = gpu_suite.plan(rehearse=False)
    seconds = []
    for step, line in zip(steps, out.splitlines(), strict=True):
        assert line.startswith(f"{step.name} (share ")
        seconds.append(int(line.split(" s): ")[0].rsplit(", ", 1)[1]))
    assert abs(sum(seconds) - 480) <= len(steps)  # rounding
    assert "TRITON_INTERPRET=0 python -m pytest" in out and "minicycle.tools.iteration_bench" in out
    assert "kernels.tools.op_bench" in out
    assert [s.name for s in steps][:3] == ["warm", "tests", "ceilings"]
    assert [s.name for s in steps][-2:] == ["model-bf16-compile", "model-fp32-compile"]


def test_a_short_budget_cuts_the_plan_from_its_end():
    steps = gpu_suite.plan(rehearse=False)
    assert gpu_suite.step_share(15, steps) == gpu_suite.MIN_STEP_S  # the first step still gets its minimum
    assert gpu_suite.step_share(5, steps[3:]) == 5  # under the minimum: run_plan starts nothing more
    assert gpu_suite.step_share(1000, steps[-1:]) == 1000  # the last step gets what is left
    total = sum(s.weight for s in steps)
    assert gpu_suite.step_share(1000, steps) == pytest.approx(1000 * steps[0].weight / total)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_refuses_without_a_gpu_in_one_line(tmp_path, capsys):
    assert gpu_suite.main([str(tmp_path), "--budget", "60"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m minicycle.tools.gpu_suite: error: PyTorch sees no CUDA GPU") and "\n" not in err


def test_refuses_to_run_without_a_budget(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_suite.main([str(tmp_path), "--rehearse"])
    assert e.value.code == 2 and "--budget SECONDS" in capsys.readouterr().err


def test_a_spent_budget_lists_every_step_as_skipped_with_its_command(tmp_path, capsys):
    t0 = time.monotonic()
    assert gpu_suite.main([str(tmp_path), "--budget", "1", "--rehearse"]) == 0
    assert time.monotonic() - t0 < 5
    text = (tmp_path / "summary.md").read_text()
    for step in gpu_suite.plan(rehearse=True):
        assert f"- {step.name} (skipped: " in text and gpu_suite.shown(step, gpu_suite.command(step, "OUT")) in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "profiles.tar.gz", "summary.md",
                                                          "tables.md", "tests.log"]


@pytest.mark.slow
def test_summary_reads_the_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    steps = tmp_path / "steps"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--ops", "in", "--batch", "1", "--out", str(steps / "ops-nchw.md")]) == 0
        assert model_bench.main(["--quick", "--batch", "1", "--variants", "eager,ours", "--iters", "1",
                                 "--out", str(steps / "model-b1-fp32.md")]) == 0
    finally:
        torch.set_num_threads(threads)  # --quick uses one thread
    capsys.readouterr()
    assert gpu_suite.main([str(tmp_path), "--summary"]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "summary.md").read_text() == text
    assert "- ops-nchw: 4 rows ✓, 0 ✗" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1 | fp32 | nchw |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].endswith("ms (1.00×)") and cells[6].endswith("×)") and cells[4] == "—"  # eager, ours, compile
    assert "Not run yet: warm, tests, ceilings" in text


@pytest.mark.slow
def test_rehearsal_runs_the_whole_plan_into_five_files(tmp_path, monkeypatch, capsys):
    """The plan end to end on this CPU with tiny shapes, as it would run on a GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert gpu_suite.main([str(tmp_path), "--budget", "600", "--rehearse"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "profiles.tar.gz", "summary.md",
                                                          "tables.md", "tests.log"]
    steps = gpu_suite.plan(rehearse=True)
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        logs = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    for step in steps:
        assert logs[f"steps/{step.name}.log"].splitlines()[1] == "exit 0", logs[f"steps/{step.name}.log"][-2000:]
    with tarfile.open(tmp_path / "profiles.tar.gz") as tar:
        assert any(m.name.startswith("profiles/") and m.isfile() for m in tar.getmembers())
    text = (tmp_path / "summary.md").read_text()
    assert "Not run yet" not in text and "Skipped (budget)" not in text
    assert "- ops-bf16: " in text and "- ops-fp32: " in text and "| 1 | bf16 | channels_last |" in text
    assert "collected" in (tmp_path / "tests.log").read_text()
    tables = (tmp_path / "tables.md").read_text()
    assert tables.count("# minicycle") == sum(1 for s in steps if s.budgeted or s.name == "ceilings")
    assert capsys.readouterr().out.endswith(text)
