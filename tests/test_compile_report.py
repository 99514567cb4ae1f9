"""The compile report (python -m kernels.tools.compile_report) and what it must say about the kernels.

The report compiles the real kernels with Triton's compiler for an H100 (or any arch's stand-in
GPU) on this CPU machine, so these tests pin facts a GPU run would depend on. On sm_90, at the
generator's hot layers, in the layout it runs in on CUDA (channels_last), every config the
autotuner may pick compiles with no register spills, every GEMM kernel uses Hopper's warpgroup MMA
(HGMMA), and the 16-bit GEMMs feed it with 16-byte cp.async copies (LDGSTS.128, the pipelined
path), with no synchronous load in the K loop. On every arch from sm_80 up, every config the
pruning keeps fits the GPU's shared memory (the pruning's estimate is exact or above what the
compiler allocates), and every launch of the generator's layers has a spill-free config on tensor
cores, in bf16 and in fp32 (TF32). They run the tool in a subprocess with TRITON_INTERPRET=0
(conftest turns the interpreter on for everything else).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

import kernels.conv_tiles
import kernels.device
import kernels.tools.compile_report as ki

ROOT = Path(__file__).resolve().parents[1]
GEMM_KERNELS = {"_conv_kernel", "_dgrad_kernel", "_wgrad_kernel"}
SMEM_LIMIT = 227 * 1024  # the most shared memory an H100 thread block can have
KEYS = {"arch", "kernel", "config", "dtype", "layout", "shape", "pass", "registers", "spill_bytes", "shared_bytes",
        "hgmma", "ldgsts", "tma", "ldg128", "grid"}
MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's limits on grid axes x, y, z


def _report(*args: str) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "kernels.tools.compile_report", "--json", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if "not found" in run.stderr:  # no ptxas / cuobjdump in this Triton wheel
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def conv_rows() -> list[dict]:
    return _report("--layers", "stem7x7,conv3x3,head7x7", "--batch", "1", "--dtypes", "fp32,bf16")


@pytest.mark.slow
def test_report_has_every_pass_and_the_documented_keys(conv_rows):
    for row in conv_rows:
        assert KEYS <= row.keys(), row
        assert len(row["grid"]) == 3 and row["grid"][0] * row["grid"][1] * row["grid"][2] == row["programs"], row
    seen = {(r["shape"], r["pass"], r["dtype"]) for r in conv_rows}
    for shape in {r["shape"] for r in conv_rows}:
        for dtype in ("fp32", "bf16"):
            assert {(shape, p, dtype) for p in ("fwd", "dgrad", "wgrad", "dbias")} <= seen


@pytest.mark.slow
def test_no_config_spills(conv_rows):
    bad = [(r["shape"], r["pass"], r["dtype"], r["kernel"], r["config"], r["spill_bytes"]) for r in conv_rows
           if r["spill_bytes"] or r["stl"] or r["ldl"]]
    assert not bad, bad


@pytest.mark.slow
def test_every_gemm_config_uses_hgmma(conv_rows):
    gemms = [r for r in conv_rows if r["kernel"] in GEMM_KERNELS]
    assert {r["kernel"] for r in gemms} == GEMM_KERNELS
    bad = [(r["shape"], r["pass"], r["dtype"], r["config"]) for r in gemms if not r["hgmma"] or r["hmma"]]
    assert not bad, bad


@pytest.mark.slow
def test_16bit_gemms_are_pipelined_with_16_byte_copies(conv_rows):
    bf16 = [r for r in conv_rows if r["kernel"] in GEMM_KERNELS and r["dtype"] == "bf16"]
    assert bf16
    # Every copy in flight is 16 bytes, and nothing in the K loop waits on a synchronous load.
    bad = [(r["shape"], r["pass"], r["config"]) for r in bf16
           if not (r["ldgsts128"] or r["tma"]) or r["ldgsts"] != r["ldgsts128"] or r["loop_ldg"]]
    assert not bad, bad


@pytest.mark.slow
def test_shared_memory_fits_an_h100_block(conv_rows):
    bad = [(r["shape"], r["pass"], r["config"], r["shared_bytes"]) for r in conv_rows if r["shared_bytes"] > SMEM_LIMIT]
    assert not bad, bad


@pytest.mark.slow
def test_instance_norm_kernels_compile_clean_in_both_layouts():
    rows = _report("--layers", "in256,in64", "--batch", "1", "--dtypes", "fp32,bf16", "--layouts", "nchw,channels_last")
    assert {r["kernel"] for r in rows} == {"_fwd_kernel", "_fwd_partial_kernel", "_fwd_combine_kernel",
                                          "_fwd_apply_kernel", "_bwd_kernel", "_bwd_partial_kernel",
                                          "_bwd_combine_kernel", "_bwd_apply_kernel"}
    assert not [r for r in rows if r["spill_bytes"]], rows
    # The bulk loads are 16 bytes wide in both layouts (a per-plane scalar, the shift k, may be narrower;
    # the combines read a plane's partials, whose start is aligned only when the chunk count is).
    assert all(r["ldg128"] for r in rows if "combine" not in r["kernel"]), rows


@pytest.mark.slow
@pytest.mark.parametrize("size", ["2048,2048", "3000,4000"])
def test_instance_norm_kernels_at_photo_sizes(size):
    """The IN layers of a 2048² image and of a 12-MP photo, on sm_90 and sm_86, fp32 and bf16, both
    layouts: every kernel compiles with no spill (its registers do not depend on the plane's size),
    and every launch grid is one CUDA takes."""
    rows = _report("--arch", "sm_90,sm_86", "--layers", "in256,in128,in64", "--batch", "1", "--dtypes", "fp32,bf16",
                   "--layouts", "nchw,channels_last", "--size", size)
    seen = {(r["arch"], r["dtype"], r["layout"], r["pass"], r["kernel"]) for r in rows}
    kernels = {"fwd": ("_fwd_partial_kernel", "_fwd_combine_kernel", "_fwd_apply_kernel"),
               "bwd": ("_bwd_partial_kernel", "_bwd_combine_kernel", "_bwd_apply_kernel")}
    assert seen == {(a, d, lay, p, k) for a in ("sm_90", "sm_86") for d in ("fp32", "bf16")
                    for lay in ("nchw", "channels_last") for p, ks in kernels.items() for k in ks}
    bad = [(r["arch"], r["shape"], r["dtype"], r["layout"], r["kernel"], r.get("error"), r.get("spill_bytes"))
           for r in rows if "error" in r or r["spill_bytes"] or r["stl"] or r["ldl"]]
    assert not bad, bad
    assert all(0 < g <= limit for r in rows for g, limit in zip(r["grid"], MAX_GRID)), rows


def test_size_sets_the_layers_shapes():
    """--size H,W: the stem, the head and the first norm at H x W, the next at H/2, the ResNet blocks at
    H/4, the image padded up to a multiple of 4 as the generator needs."""
    assert [ki.layer_size(layer, (3000, 4000)) for layer in ki.LAYERS] == \
        [(3000, 4000), (750, 1000), (3000, 4000), (3000, 4000), (1500, 2000), (750, 1000)]
    assert ki.layer_size("in128", (301, 402)) == (152, 202)
    assert ki.layer_size("conv3x3", ki.DEFAULT_SIZE) == (64, 64)


@pytest.mark.parametrize("size", ["3000", "3000,0", "a,b", "1,2,3"])
def test_bad_size_is_a_one_line_error(size, capsys):
    with pytest.raises(SystemExit) as e:
        ki.main(["--size", size])
    assert e.value.code == 2
    assert "--size" in capsys.readouterr().err


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



@pytest.mark.slow
def test_the_jit_finds_what_compile_only_compiled(tmp_path):
    """--compile-only keys each kernel as the JIT will on the GPU, so a GPU run finds all of them in
    Triton's cache (the GPU suite warms it on every core before timing anything); and the compile
    report's specialisations are the JIT's own. --jit-replay runs the real JIT, as on an H100."""
    args = ["--layers", "conv3x3,in64", "--batch", "1", "--dtypes", "bf16", "--passes", "fwd"]

    def inspect(cache: str, *flags: str) -> str:
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / cache)}
        run = subprocess.run([sys.executable, "-m", "kernels.tools.compile_report", *flags, *args], cwd=ROOT, env=env,
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


# ------------------------------------------------------------------------------- every arch

# Tensor cores for bf16 and fp32 (TF32) from sm_80: mma.sync (HMMA) up to sm_89, warpgroup MMA
# (HGMMA) on sm_90. One process compiles them all, in parallel. sm_89 and sm_120 have sm_86's limits
# and keep its configs (checked below without compiling); their compile facts are in BENCHMARKS.md,
# left out here to keep the suite's time.
ARCHS = ("sm_80", "sm_86", "sm_90")
CONV_LAYERS = "stem7x7,conv3x3,head7x7"
NORM_LAYERS = "in256,in128,in64"


def _limit(arch: str) -> int:
    return kernels.device.for_arch(int(arch.removeprefix("sm_"))).shared_bytes


@pytest.fixture(scope="module")
def arch_rows(conv_rows) -> list[dict]:
    """The generator's convs, batch 1, fp32 and bf16, channels_last on every arch, and on sm_86 (the
    least shared memory of these) also its norms (whose kernels use no MMA and little shared memory
    on any arch; sm_90's are pinned above) and the convs in NCHW in bf16 (where the K tile's gathers
    compete with mma.sync's operands for registers). After conv_rows, whose sm_90 kernels are cached."""
    rows = _report("--arch", ",".join(ARCHS), "--layers", CONV_LAYERS, "--batch", "1")
    rows += _report("--arch", "sm_86", "--layers", NORM_LAYERS, "--batch", "1")
    return rows + _report("--arch", "sm_86", "--layers", CONV_LAYERS, "--batch", "1", "--layouts", "nchw",
                          "--dtypes", "bf16")


def _launches(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["shape"], r["pass"], r["dtype"], r["layout"], r["kernel"]), []).append(r)
    return groups


@pytest.mark.slow
def test_every_arch_compiles_every_launch(arch_rows):
    compiled = {r["arch"] for r in arch_rows}
    assert compiled == set(ARCHS)
    assert not [r for r in arch_rows if "error" in r]
    for arch in compiled:
        shapes = {(r["shape"], r["pass"], r["dtype"]) for r in arch_rows if r["arch"] == arch}
        norms = 3 * 2 * 2 if arch == "sm_86" else 0  # 3 norms x 2 passes x 2 dtypes
        assert len(shapes) == 3 * 4 * 2 + norms, arch  # 3 convs x 4 passes x 2 dtypes


@pytest.mark.slow
def test_no_kept_config_exceeds_the_arch_shared_memory(arch_rows):
    """Triton refuses to launch a kernel needing more shared memory than the GPU has: the pruning
    must never hand one to the autotuner."""
    bad = [(r["arch"], r["shape"], r["pass"], r["dtype"], r["layout"], r["config"], r["shared_bytes"])
           for r in arch_rows if r["shared_bytes"] > _limit(r["arch"])]
    assert not bad, bad


def _config(name: str) -> triton.Config:
    meta = dict(re.findall(r"([A-Za-z]+?)(\d+)(?:\s|$)", name))
    return triton.Config({k: int(meta[k]) for k in ("BM", "BN", "BK")}, num_warps=int(meta["w"]),
                         num_stages=int(meta["s"]))


@pytest.mark.slow
def test_shared_memory_estimate_is_exact_or_conservative(arch_rows, conv_rows):
    """The pruning's estimate of a GEMM config's shared memory is never below what the compiler
    allocates, on any arch, layout or dtype (so a config it keeps can launch)."""
    gemms = [r for r in arch_rows + conv_rows if r["kernel"] in GEMM_KERNELS]
    assert {r["arch"] for r in gemms} == set(ARCHS)
    under = []
    for r in gemms:
        gpu = kernels.device.for_arch(int(r["arch"].removeprefix("sm_")))
        estimate = kernels.conv_tiles.shared_bytes(_config(r["config"]), 4 if r["dtype"] == "fp32" else 2, gpu)
        if estimate < r["shared_bytes"]:
            under.append((r["arch"], r["shape"], r["pass"], r["dtype"], r["layout"], r["config"], estimate,
                          r["shared_bytes"]))
    assert not under, under


@pytest.mark.slow
def test_every_launch_has_a_spill_free_tensor_core_config_on_every_arch(arch_rows):
    """Each launch keeps a config that does not spill; in channels_last (how the generator runs on
    CUDA) none spills at all, nor does any helper kernel. GEMMs run on the arch's tensor cores, fp32
    as TF32."""
    for (arch, *launch, kernel), rs in _launches(arch_rows).items():
        mma, other = ("hgmma", "hmma") if arch == "sm_90" else ("hmma", "hgmma")
        if kernel in GEMM_KERNELS:
            assert all(r[mma] and not r[other] for r in rs), (arch, launch, kernel)
        spills = [(r["config"], r["spill_bytes"]) for r in rs if r["spill_bytes"] or r["stl"] or r["ldl"]]
        assert len(spills) < len(rs), (arch, launch, kernel, spills)
        if kernel not in GEMM_KERNELS or launch[3] == "channels_last":
            assert not spills, (arch, launch, kernel, spills)


def _replay(*args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if "not found" in run.stderr:
        pytest.skip(run.stderr.strip())
    return run.stdout + run.stderr


REPLAY = re.compile(r"sm_86: the JIT ran (\d+) launch configs and compiled (\d+) kernels .* the most shared memory "
                    r"one needs: (\d+) B of 101376 B; refused at launch: (\d+)")


@pytest.mark.slow
def test_jit_on_an_sm86_stand_in_picks_only_launchable_configs(arch_rows):
    """A default-precision (fp32) training iteration's launches, through Triton's JIT on a stand-in
    RTX 3090 (101,376 B of shared memory per program): every config the autotuner may pick passes
    the check Triton makes before a first launch (OutOfResources). After arch_rows, whose compiles
    the JIT finds in the cache."""
    out = _replay("-m", "kernels.tools.compile_report", "--jit-replay", "--arch", "sm_86", "--batch", "1",
                  "--dtypes", "fp32")
    runs, _, shared, refused = map(int, REPLAY.search(out).groups())
    assert runs >= 20 and 0 < shared <= 101_376 and refused == 0, out


@pytest.mark.slow
def test_the_stand_in_refuses_what_does_not_fit(arch_rows):
    """The check the replay relies on: with 64 KB on the stand-in sm_86 (its pruning still sized
    for 99 KB), Triton's loader refuses the 3x3's widest bf16 tiles."""
    script = ("import kernels.tools.compile_report as ki, sys\n"
              "ki._StandInDriver.get_device_properties = lambda self, d: {'max_shared_mem': 65536}\n"
              "sys.exit(ki.main(['--jit-replay', '--arch', 'sm_86', '--layers', 'conv3x3', '--batch', '1', "
              "'--dtypes', 'bf16', '--passes', 'fwd']))")
    out = _replay("-c", script)
    refused = re.search(r"refused at launch: (\d+)", out)
    assert refused and int(refused.group(1)) > 0 and "OutOfResources" in out, out


def test_unknown_arch_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        ki.main(["--arch", "sm_70"])
    assert e.value.code == 2
    assert "--arch" in capsys.readouterr().err


@pytest.mark.slow
def test_sm89_and_sm120_keep_the_configs_of_sm86():
    """Same shared memory per program (101,376 B) and the same MMA (mma.sync): the pruning must keep
    the same configs for every launch, so sm_86's compile facts above stand for them."""
    script = ("import json, torch, kernels.tools.compile_report as ki\n"
              "kept = {}\n"
              "for arch in (86, 89, 120):\n"
              "    for layer in ('stem7x7', 'conv3x3', 'head7x7'):\n"
              "        for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
              "            for fmt in ki.LAYOUTS.values():\n"
              "                for p, launch in ki.layer_launches(layer, 1, dtype, fmt, arch=arch):\n"
              "                    configs = ki._configs(launch)\n"
              "                    names = [ki._config_name(launch.name, launch.kwargs, c) for c in configs]\n"
              "                    kept.setdefault(arch, []).append(names)\n"
              "print(json.dumps(kept))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    kept = json.loads(run.stdout)
    assert len(kept["86"]) >= 3 * 3 * 2 * 3 and kept["89"] == kept["86"] and kept["120"] == kept["86"]
