"""python -m minicycle.tools.gpu_suite on a CPU machine: its plan, its refusal without a GPU, and its summary
of reports (made here by the CPU harness checks of the benchmarks)."""

import pytest
import torch

from kernels.tools import op_bench as bench
from minicycle.tools import gpu_suite
from minicycle.tools import iteration_bench as model_bench


def test_plan_lists_every_slice_within_the_command_limit(capsys):
    assert gpu_suite.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name, steps in gpu_suite.SLICES.items():
        assert f"--slice {name}" in out
        assert sum(s.timeout_s for s in steps) <= gpu_suite.SLICE_LIMIT_S, name
    assert "TRITON_INTERPRET=0 python -m pytest" in out and "minicycle.tools.iteration_bench" in out
    assert "kernels.tools.op_bench" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_refuses_without_a_gpu_in_one_line(tmp_path, capsys):
    assert gpu_suite.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m minicycle.tools.gpu_suite: error: PyTorch sees no CUDA GPU") and "\n" not in err


@pytest.mark.slow
def test_summary_reads_the_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--ops", "in", "--batch", "1", "--out", str(tmp_path / "ops-nchw.md")]) == 0
        assert model_bench.main(["--quick", "--batch", "1", "--variants", "eager,ours", "--iters", "1",
                                 "--out", str(tmp_path / "model-b1-fp32.md")]) == 0
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
    assert "Not run yet: ceilings, tests" in text
