"""The kernels compile with the Triton that each supported CUDA torch pins, not only with the one CI runs:
3.6.0 (torch 2.11) and 3.7.1 (torch 2.13), each in a virtualenv of its own (`python -m venv
--system-site-packages`, then `pip install triton==X` into it). The compile report builds the real sm_86 and
sm_90 cubins of the generator's layers (batch 1, fp32 and bf16, channels_last) with that Triton: every kernel
compiles, and none spills. Skipped, with pip's reason, where the wheel cannot be had (offline)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINNED = ["3.6.0", "3.7.1"]  # by CUDA torch 2.11, 2.13 (kernels.runtime.OLDEST is the first)


@pytest.mark.slow
@pytest.mark.parametrize("version", PINNED)
def test_the_kernels_compile_without_spills_with_the_triton_torch_pins(version, tmp_path):
    venv = tmp_path / f"triton-{version}"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"triton=={version}"],
                         capture_output=True, text=True, timeout=1200)
    if pip.returncode:
        pytest.skip(f"pip cannot install triton=={version}: {(pip.stderr.strip().splitlines() or [''])[-1]}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}
    found = subprocess.run([python, "-c", "import triton, kernels.runtime as r; print(triton.__version__, "
                            "repr(r.triton_problem()))"], env=env, capture_output=True, text=True, timeout=300)
    assert found.stdout.split() == [version, "''"], found.stderr  # this venv's Triton, and the kernels take it
    report = subprocess.run([python, "-m", "kernels.tools.compile_report", "--json", "--arch", "sm_86,sm_90",
                             "--batch", "1", "--dtypes", "fp32,bf16", "--layers",
                             "stem7x7,conv3x3,head7x7,in256,in128,in64"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert report.returncode == 0 and "skipped" not in report.stderr, report.stderr[-2000:]
    rows = json.loads(report.stdout)
    assert {r["arch"] for r in rows} == {"sm_86", "sm_90"}, {r["arch"] for r in rows}
    assert not [r for r in rows if "error" in r or r["spill_bytes"]], [r for r in rows if "error" in r][:3]
    kernels = {r["kernel"] for r in rows}  # every pass of the conv, and of IN + ReLU
    assert {"_conv_kernel", "_fold_kernel", "_wgrad_kernel", "_sum_splits_kernel", "_dbias_kernel"} <= kernels
    assert any(k.startswith("_fwd") for k in kernels) and any(k.startswith("_bwd") for k in kernels), kernels
