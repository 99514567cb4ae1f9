"""kernels/runtime.py: the Triton versions the kernels run with (the gate, with the version mocked), and
the cuDNN conv precision setting the Triton conv and the kernel choice follow, through each of torch's APIs."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from kernels import choice, runtime
from minicycle import datasets

ROOT = Path(__file__).resolve().parents[1]
NEW_API = hasattr(torch.backends.cudnn, "conv")  # torch >= 2.9: per-backend fp32_precision settings


# ----------------------------------------------------------------------------- the conv's TF32 setting


@pytest.fixture
def fresh_precision():
    """torch's precision settings as a fresh process has them, after the test (TF32 for cuDNN's conv)."""
    yield
    if NEW_API:
        torch.backends.fp32_precision = "none"
        torch.backends.cudnn.fp32_precision = "none"
    torch.backends.cudnn.allow_tf32 = True  # conv and RNN both TF32 again, the default
    assert runtime.cudnn_conv_tf32()


@pytest.mark.skipif(not NEW_API, reason="this torch has only cudnn.allow_tf32")
@pytest.mark.parametrize("conv, cudnn, generic, tf32", [
    ("tf32", "none", "none", True),
    ("ieee", "none", "none", False),
    ("tf32", "ieee", "ieee", True),  # the conv's own setting wins
    ("none", "ieee", "tf32", False),  # "none" inherits cuDNN's ...
    ("none", "tf32", "ieee", True),
    ("none", "none", "tf32", True),  # ... which inherits torch's
    ("none", "none", "ieee", False),
    ("none", "none", "none", False),  # nothing asks for TF32: torch's conv then runs IEEE fp32
])
def test_the_conv_setting_through_the_per_backend_api(fresh_precision, conv, cudnn, generic, tf32):
    torch.backends.fp32_precision = generic
    torch.backends.cudnn.fp32_precision = cudnn
    torch.backends.cudnn.conv.fp32_precision = conv
    assert runtime.cudnn_conv_tf32() is tf32
    assert choice._cudnn_flags()[0] is tf32  # a key of the choice: another setting decides anew


@pytest.mark.skipif(not NEW_API, reason="this torch has only cudnn.allow_tf32")
def test_the_conv_alone_set_to_ieee_is_read_where_allow_tf32_raises(fresh_precision, monkeypatch):
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # the RNN setting left at TF32
    with pytest.raises(RuntimeError, match="different TF32 flags"):
        torch.backends.cudnn.allow_tf32  # noqa: B018  (what the conv and the choice used to read)
    assert runtime.cudnn_conv_tf32() is False
    if runtime.triton_problem():
        return  # no Triton conv here
    from kernels import reflect_conv as rc

    monkeypatch.setattr(rc, "_INTERPRET", False)  # the Triton conv's precision, as on a GPU
    assert rc._precision(types.SimpleNamespace(dtype=torch.float32, is_cuda=True)) == "ieee"
    assert rc._precision(types.SimpleNamespace(dtype=torch.bfloat16, is_cuda=True)) == "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert rc._precision(types.SimpleNamespace(dtype=torch.float32, is_cuda=True)) == "tf32"


@pytest.mark.parametrize("allow", [True, False])
def test_the_legacy_flag_set(fresh_precision, allow):
    torch.backends.cudnn.allow_tf32 = allow  # on torch >= 2.9 this sets the conv and RNN settings
    assert runtime.cudnn_conv_tf32() is allow


@pytest.mark.parametrize("allow", [True, False])
def test_a_torch_with_only_the_legacy_flag(monkeypatch, allow):
    old_torch = types.SimpleNamespace(backends=types.SimpleNamespace(cudnn=types.SimpleNamespace(allow_tf32=allow)))
    monkeypatch.setattr(runtime, "torch", old_torch)
    assert runtime.cudnn_conv_tf32() is allow


# ----------------------------------------------------------------------------- the Triton version gate


@pytest.mark.parametrize("text, want", [("3.7.1", (3, 7, 1)), ("3.2.0+git1234abc", (3, 2, 0)),
                                        ("3.10.0rc1", (3, 10, 0)), ("3.6", (3, 6, 0))])
def test_versions_compare_as_numbers(text, want):
    assert runtime.version(text) == want


@pytest.mark.parametrize("found, problem", [
    ("3.6.0", ""), ("3.7.1", ""), ("3.9.0", ""), ("3.12.0", ""),  # newer than tested: used, and checked by auto
    ("3.5.1", "Triton 3.5.1 found; the kernels need Triton 3.6.0 or newer"),
    ("3.2.0", "Triton 3.2.0 found; the kernels need Triton 3.6.0 or newer"),
])
def test_the_gate_by_version(monkeypatch, found, problem):
    monkeypatch.setattr(runtime.triton, "__version__", found)
    assert runtime.triton_problem() == problem


# A fresh process whose Triton is mocked before anything imports it: "3.2.0" (torch 2.6's pin) without the
# newer APIs the kernels use at import (triton.knobs), or none at all.
MOCK = """
import sys
if sys.argv[1] == "none":
    sys.modules["triton"] = None  # import triton raises ImportError
else:
    import triton
    triton.__version__ = sys.argv[1]
    triton.__dict__.pop("knobs", None)
"""
OPS = MOCK + """
import torch
import torch.nn.functional as F
import kernels
g = torch.Generator().manual_seed(0)
x, w = torch.randn(1, 3, 8, 8, generator=g), torch.randn(4, 3, 3, 3, generator=g)
y = kernels.reflect_conv2d(x, w, padding=1)
assert torch.equal(y, F.conv2d(F.pad(x, (1,) * 4, mode="reflect"), w))
assert torch.equal(kernels.instance_norm_relu(y), F.relu(F.instance_norm(y)))
kernels.instance_norm_relu(y, negative_slope=0.2)  # said once per process
try:
    kernels.reflect_conv2d(x, w, padding=8)
except ValueError as e:
    print("ValueError:", e)
"""
RUN = MOCK + """
import train, infer
common = ["--dataroot", sys.argv[2], "--checkpoints_dir", "ck", "--name", "old"]
code = train.main(common + ["--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks", "--load_size", "32",
                            "--crop_size", "32", "--max_steps", "1", "--seed", "1"])
sys.exit(code or infer.main(common + ["--results_dir", "res", "--num_test", "2"]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("found", ["3.2.0", "none"])
def test_an_old_triton_or_none_takes_pytorchs_path_and_says_so_once(found, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    why = "Triton 3.2.0 found" if found == "3.2.0" else "Triton is not installed"
    out = subprocess.run([sys.executable, "-c", OPS, found], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [f"kernels: {why}; the kernels need Triton 3.6.0 or newer: PyTorch's path "
                                       f"runs instead"]
    assert "ValueError: reflect_conv2d: reflection padding must satisfy 0 <= padding < H, W" in out.stdout

    # train.py and infer.py run on PyTorch's path; the run's first line says why, and the ops do not repeat it.
    dataroot = datasets.ensure_synthetic(tmp_path / "synthetic")
    out = subprocess.run([sys.executable, "-c", RUN, found, str(dataroot)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert f"; kernels: PyTorch ({why}; the kernels need Triton 3.6.0 or newer); " in first, first
    assert "PyTorch's path runs instead" not in out.stderr
    assert "translated 2 images" in out.stdout
