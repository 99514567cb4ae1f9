"""python -m minicycle.tools.launch_count: kernel launches per training iteration, counted on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_benchmarks import table

from minicycle.model import Config
from minicycle.tools import launch_count as launches

ROOT = Path(__file__).resolve().parents[1]


def count(args: list[str]) -> tuple[dict[str, list[str]], str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "minicycle.tools.launch_count", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    columns, rows = table(proc.stdout, "build")
    assert columns == launches.COLUMNS
    return {r[0]: r[1:] for r in rows}, proc.stdout


@pytest.fixture(scope="module")
def small():
    return count(["--size", "32", "--ngf", "4", "--variants", "eager,ours,graph-ready"])


@pytest.mark.slow
def test_counts_add_up_and_ours_launches_triton_kernels(small):
    rows, text = small
    assert list(rows) == ["eager", "ours", "graph-ready"]
    for build, (total, aten, no_kernel, custom, triton, inductor) in rows.items():
        n = {k: int(v.replace(",", "")) for k, v in zip(("total", "aten", "no", "custom", "triton", "ind"),
                                                        (total, aten, no_kernel, custom, triton, inductor))}
        assert n["total"] == n["aten"] + n["triton"] + n["ind"] > 0, build
        assert (n["triton"] > 0) == (n["custom"] > 0) == (build != "eager"), build
    # the graph-ready step adds only the device-side pool moves (a handful of index ops) to ours
    extra = int(rows["graph-ready"][0].replace(",", "")) - int(rows["ours"][0].replace(",", ""))
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


def test_bad_arguments():
    for args in (["--variants", "fast"], ["--size", "30"]):
        with pytest.raises(SystemExit):
            launches.parse_args(args)


def test_channels_last_builds_the_model_as_train_py_on_cuda():
    step = launches.build("ours", Config(ngf=4, ndf=4, netG="resnet_6blocks"), channels_last=True)
    model = step.__self__
    assert model.memory_format == torch.channels_last
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    assert launches.parse_args(["--channels_last"]).channels_last and not launches.parse_args([]).channels_last
