"""python -m minicycle.tools.gpu_suite on a CPU machine: its plan and budget, its steps' commands and how they are
stopped, its refusal without a GPU, and its CPU rehearsal end to end."""

import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from minicycle.tools import gpu_suite


def test_plan_lists_every_step_within_the_budget(capsys):
    assert gpu_suite.main(["--list", "--budget", "480"]) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = gpu_suite.plan(rehearse=False)
    seconds = []
    for (name, command, _), line in zip(steps, lines, strict=True):
        assert line.startswith(f"{name} (share ") and line.endswith(f"): {command}")
        seconds.append(int(line.split(" s): ")[0].rsplit(", ", 1)[1]))
    assert abs(sum(seconds) - 480) <= len(steps)  # rounding
    names = [name for name, _, _ in steps]
    assert names[:4] == ["warm", "tests", "tests-debug", "ceilings"]  # what matters most first, compiles last
    assert names[-2:] == ["model-bf16-compile", "model-fp32-compile"]
    text = "\n".join(lines)
    for needed in ("TRITON_INTERPRET=0 python -m pytest", "TRITON_INTERPRET=0 TRITON_DEBUG=1 python -m pytest",
                   "op_bench --ceilings", "--layouts channels_last --dtypes bf16",
                   "--layouts channels_last --dtypes fp32", "--amp fp32 --kernels triton,auto",
                   "--amp bf16 --kernels triton,auto --variants eager,ours,ours+graph",
                   "--infer --size 6000,8000 --batch 1", "--infer --size 3000,4000 --batch 3"):
        assert needed in text, needed


def test_a_step_gets_its_environment_and_this_python(tmp_path):
    log = tmp_path / "s.log"
    assert gpu_suite.run_step("A=1 B=x=y python -c 'import os, sys; print(os.environ[\"A\"], os.environ[\"B\"], "
                              "sys.executable)'", log, 60) == "exit 0"
    assert log.read_text().splitlines()[1] == f"1 x=y {sys.executable}"


@pytest.mark.slow
def test_a_step_past_its_time_is_stopped_with_what_it_started(tmp_path):
    log, pid_file, script = tmp_path / "s.log", tmp_path / "pid", tmp_path / "step.py"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    script.write_text(f"import os, subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\n"
                      f"while not os.path.exists({str(pid_file)!r}): time.sleep(0.05)\n"
                      f"print('started', flush=True)\ntime.sleep(60)\n")
    t0 = time.monotonic()
    assert gpu_suite.run_step(f"python {script}", log, 10) == "stopped after 10 s"
    assert time.monotonic() - t0 < 20 and "started" in log.read_text()
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    for _ in range(50):  # the grandchild too: killed (a zombie until its new parent reaps it)
        if not stat.exists() or stat.read_text().split(") ")[1][0] in "ZX":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{stat}: still running")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_refuses_without_a_gpu_in_one_line(tmp_path, capsys):
    assert gpu_suite.main([str(tmp_path), "--budget", "60"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m minicycle.tools.gpu_suite: error: PyTorch sees no CUDA GPU") and "\n" not in err


def test_refuses_to_run_without_a_budget(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_suite.main([str(tmp_path), "--rehearse"])
    assert e.value.code == 2 and "--budget SECONDS" in capsys.readouterr().err


def test_a_spent_budget_lists_every_step_as_skipped_with_its_command(tmp_path):
    t0 = time.monotonic()
    assert gpu_suite.main([str(tmp_path), "--budget", "1", "--rehearse"]) == 0
    assert time.monotonic() - t0 < 5
    text = (tmp_path / "summary.md").read_text()
    for name, command, _ in gpu_suite.plan(rehearse=True):
        assert f"| {name} | skipped: " in text and f"## {name}: skipped: " in text
        assert command.split(" --budget")[0].split(" --out")[0] in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "summary.md"]


@pytest.mark.slow
def test_rehearsal_runs_the_whole_plan_into_two_files(tmp_path, monkeypatch, capsys):
    """The plan end to end on this CPU with tiny shapes, as it would run on a GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert gpu_suite.main([str(tmp_path), "--budget", "600", "--rehearse"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "summary.md"]
    steps = gpu_suite.plan(rehearse=True)
    text = (tmp_path / "summary.md").read_text()
    assert capsys.readouterr().out.endswith(text)
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        files = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    for name, _, _ in steps:
        assert files[f"steps/{name}.log"] and f"| {name} | exit 0 |" in text, files.get(f"steps/{name}.log")
    assert any(n.startswith("steps/profiles/") for n in files)
    assert "collected" in text  # the tests' output, as they have no report
    for heading in ("## Device ceilings", "## Ops", "## Model: one training iteration", "## G_A inference",
                    "## Profile of one iteration"):
        assert heading in text, heading  # every table, in the summary
    assert text.count("| ours (triton) | channels_last | 1 | fp32 |") == 3  # the iteration, its profile, an inference
