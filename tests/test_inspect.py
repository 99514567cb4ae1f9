"""The sm_90 compile report (python -m kernels.inspect) and what it must say about the kernels.

The report compiles the real kernels with Triton's compiler for an H100 on this CPU machine, so
these tests pin facts a GPU run would depend on: at the generator's hot layers, in the layout it
runs in on CUDA (channels_last), every config the autotuner may pick compiles with no register
spills, every GEMM kernel uses Hopper's warpgroup MMA (HGMMA), and the 16-bit GEMMs feed it with
16-byte cp.async copies (LDGSTS.128, the pipelined path), with no synchronous load in the K
loop. They run the tool in a subprocess with TRITON_INTERPRET=0 (conftest turns the
interpreter on for everything else).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kernels.inspect as ki

ROOT = Path(__file__).resolve().parents[1]
GEMM_KERNELS = {"_conv_kernel", "_wgrad_kernel"}
SMEM_LIMIT = 227 * 1024  # the most shared memory an H100 thread block can have
KEYS = {"kernel", "config", "dtype", "layout", "shape", "registers", "spill_bytes", "shared_bytes", "hgmma",
        "ldgsts", "tma", "ldg128"}


def _report(*args: str) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "kernels.inspect", "--json", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if "skipped" in run.stderr:
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def conv_rows() -> list[dict]:
    return _report("--layers", "stem7x7,conv3x3,head7x7", "--batch", "1,4", "--dtypes", "fp32,bf16")


def test_report_has_every_pass_and_the_documented_keys(conv_rows):
    for row in conv_rows:
        assert KEYS <= row.keys(), row
    seen = {(r["shape"], r["pass"], r["dtype"]) for r in conv_rows}
    for shape in {r["shape"] for r in conv_rows}:
        for dtype in ("fp32", "bf16"):
            assert {(shape, p, dtype) for p in ("fwd", "dgrad", "wgrad", "dbias")} <= seen


def test_no_config_spills(conv_rows):
    bad = [(r["shape"], r["pass"], r["dtype"], r["kernel"], r["config"], r["spill_bytes"]) for r in conv_rows
           if r["spill_bytes"] or r["stl"] or r["ldl"]]
    assert not bad, bad


def test_every_gemm_config_uses_hgmma(conv_rows):
    gemms = [r for r in conv_rows if r["kernel"] in GEMM_KERNELS]
    assert len({r["kernel"] for r in gemms}) == 2
    bad = [(r["shape"], r["pass"], r["dtype"], r["config"]) for r in gemms if not r["hgmma"] or r["hmma"]]
    assert not bad, bad


def test_16bit_gemms_are_pipelined_with_16_byte_copies(conv_rows):
    bf16 = [r for r in conv_rows if r["kernel"] in GEMM_KERNELS and r["dtype"] == "bf16"]
    assert bf16
    # Every copy in flight is 16 bytes, and nothing in the K loop waits on a synchronous load.
    bad = [(r["shape"], r["pass"], r["config"]) for r in bf16
           if not (r["ldgsts128"] or r["tma"]) or r["ldgsts"] != r["ldgsts128"] or r["loop_ldg"]]
    assert not bad, bad


def test_shared_memory_fits_an_h100_block(conv_rows):
    bad = [(r["shape"], r["pass"], r["config"], r["shared_bytes"]) for r in conv_rows if r["shared_bytes"] > SMEM_LIMIT]
    assert not bad, bad


def test_instance_norm_kernels_compile_clean_in_both_layouts():
    rows = _report("--layers", "in256,in64", "--batch", "1", "--dtypes", "fp32,bf16", "--layouts", "nchw,channels_last")
    assert {r["kernel"] for r in rows} == {"_fwd_kernel", "_fwd_partial_kernel", "_fwd_apply_kernel", "_bwd_kernel",
                                          "_bwd_partial_kernel", "_bwd_apply_kernel"}
    # The bulk loads are 16 bytes wide in both layouts (a per-plane scalar, the shift k, may be narrower).
    assert all(not r["spill_bytes"] and r["ldg128"] for r in rows), rows


def test_skips_cleanly_without_the_compiler_tools(monkeypatch, capsys):
    def missing(name):
        raise ki.ToolMissing(f"{name} not found")

    monkeypatch.setattr(ki, "_tool", missing)
    monkeypatch.setattr(ki.triton.knobs.runtime, "interpret", False)
    assert ki.main(["--layers", "conv3x3"]) == 0
    assert "skipped: ptxas not found" in capsys.readouterr().err


def test_refuses_to_run_under_the_interpreter(capsys):
    assert ki.main([]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err



def test_the_jit_finds_what_compile_only_compiled(tmp_path):
    """--compile-only keys each kernel as the JIT will on the GPU, so a GPU run finds all of them in
    Triton's cache (the GPU suite warms it on every core before timing anything); and the compile
    report's specialisations are the JIT's own. --jit-replay runs the real JIT, as on an H100."""
    args = ["--layers", "conv3x3,in64", "--batch", "1", "--dtypes", "bf16", "--passes", "fwd"]

    def inspect(cache: str, *flags: str) -> str:
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / cache)}
        run = subprocess.run([sys.executable, "-m", "kernels.inspect", *flags, *args], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        if "skipped" in run.stderr:
            pytest.skip(run.stderr.strip())
        assert run.returncode == 0, run.stdout + run.stderr[-3000:]
        return run.stdout

    assert "0 errors" in inspect("warm", "--compile-only")
    replay = re.compile(r"the JIT ran (\d+) launch configs and compiled (\d+) kernels")
    runs, compiled = map(int, replay.search(inspect("warm", "--jit-replay")).groups())
    assert runs >= 6 and compiled == 0
    # The same launches with an empty cache: the JIT compiles each one.
    assert tuple(map(int, replay.search(inspect("cold", "--jit-replay")).groups())) == (runs, runs)
