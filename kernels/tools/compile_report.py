"""Compile report: what the compiler makes of every kernel for sm_90 (H100) or any arch, on any machine.

    python -m kernels.tools.compile_report               # the generator's layers: batch 1, 4, fp32, bf16, channels_last
    python -m kernels.tools.compile_report --size 3000,4000 --batch 1   # its layers for a 12-MP photo
    python -m kernels.tools.compile_report --json        # the same rows as a JSON list
    python -m kernels.tools.compile_report --arch sm_80,sm_86,sm_89,sm_90 --summary   # per arch, with its device limits
    python -m kernels.tools.compile_report --layers conv3x3 --batch 1 --dtypes bf16 --layouts nchw,channels_last
    python -m kernels.tools.compile_report --compile-only  # only compile, on every core, into Triton's cache
    python -m kernels.tools.compile_report --jit-replay    # the launches through Triton's JIT: what compiles, how long

No GPU is needed. For each layer, the op's host code runs on tensors of the layer's real shape and strides
(for an H x W input image, --size) on PyTorch's meta device (no memory, so a batch of photos costs nothing; its
pointers are 0 plus the view's offset, so aligned as a GPU allocation's), with every kernel launch recorded, not
run. Each launch is then specialised as the JIT would specialise it on the GPU, through Triton's own argument
binder, and compiled with triton.compile for GPUTarget("cuda", arch), once for every config the autotuner may
pick (after its pruning). The host code's questions to the device are answered by the arch's stand-in GPU
(kernels.device.KNOWN: an H100 for sm_90, an RTX 3090 for sm_86, ...); fp32 convs use TF32 (torch's default).
An arch the wheel's ptxas does not know is skipped with a line saying so. From each cubin, cuobjdump reads:

    registers    per thread (255 is the ceiling: the compiler then spills)
    spill_bytes  the stack frame (local memory); STL / LDL count its stores and loads
    shared_bytes shared memory per program (Triton's dynamic allocation plus any static); Triton
                 refuses to launch a kernel needing more than the device's limit (OutOfResources)
    grid         the launch grid [x, y, z] (--json rows also give "programs", their product): CUDA
                 launches up to 2**31 - 1 programs on x, 65,535 on y and on z
    hgmma, hmma  Hopper warpgroup MMA (wgmma) and the older mma.sync instructions
    ldgsts, tma  pipelined global->shared copies: cp.async (LDGSTS; ldgsts128: 16 bytes each) and TMA (UTMALDG)
    ldg128 ...   global loads by width: 16-byte (LDG.E.128), 8, 4, and 2-or-1-byte
    int_ops      integer/index arithmetic instructions (IMAD, IADD3, LOP3, ISETP, SHF, LEA, SEL, ...)
    step_int_ops of those, the ones in one iteration of the innermost MMA loop, on its always-taken path:
                 the index math paid per k-step
    loop_ldg     synchronous global loads (LDG) inside that loop, which stall it

These are facts about the generated code, not timings. Compiles run on every core and land in Triton's cache,
keyed as the JIT keys them, so on a GPU machine --compile-only warms the cache for the autotuner (README.md).
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver as triton_driver
from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature

import kernels.conv_dgrad as cdgrad
import kernels.conv_tiles as ctiles
import kernels.conv_wgrad as cwgrad
import kernels.device
import kernels.instance_norm as inorm
import kernels.reflect_conv as rconv
from kernels import choice
from kernels.tools.op_bench import csv_list, markdown_table

# Triton 3.9 warns once per process that its fp-fusion default will change; the report compiles
# with the default the GPU's JIT uses (fusion on), so the warning is noise here.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

DEFAULT_ARCH = 90
MODULES = (rconv, cdgrad, cwgrad, inorm)

# The generator's hot layers (ResNet-9, ngf 64), named by their size on a 256x256 image: (name, op, args).
#   conv: (C, OC, K, P, scale);  in: (C, scale). A layer runs at (H / scale) x (W / scale) of the image.
LAYERS = {
    "stem7x7": ("conv", (3, 64, 7, 3, 1)),
    "conv3x3": ("conv", (256, 256, 3, 1, 4)),
    "head7x7": ("conv", (64, 3, 7, 3, 1)),
    "in256": ("in", (64, 1)),
    "in128": ("in", (128, 2)),
    "in64": ("in", (256, 4)),
}
DEFAULT_SIZE = (256, 256)
# The generator downsamples twice by 2, so an image is padded up to a multiple of 4 (as infer.py does).
SIZE_MULTIPLE = 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
PASSES = ("fwd", "dgrad", "wgrad", "dbias", "bwd")

GEMM_KERNELS = ("_conv_kernel", "_dgrad_kernel", "_wgrad_kernel")
COLUMNS = ["arch", "shape", "pass", "dtype", "layout", "kernel", "config", "grid", "registers", "spill_bytes",
           "stl", "ldl", "shared_bytes", "hgmma", "hmma", "ldgsts", "ldgsts128", "tma", "ldg128", "ldg64", "ldg32",
           "ldg16", "int_ops", "step_int_ops", "loop_ldg"]
INT_OPS = {"IMAD", "IADD3", "IADD", "LOP3", "ISETP", "SHF", "LEA", "SEL", "IABS", "IMNMX", "VIMNMX", "PRMT", "SGXT",
           "IMUL", "I2F", "F2I", "LEA.HI", "BMSK"}


class ToolMissing(RuntimeError):
    pass


# ---- launches --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    module: str
    name: str
    args: tuple
    kwargs: dict
    grid: object
    arch: int = DEFAULT_ARCH


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Replace every kernel's launch in kernels/ with a recorder; yields the list of launches."""
    launches: list[Launch] = []
    with contextlib.ExitStack() as stack:
        for module in MODULES:
            for name, obj in vars(module).items():
                if isinstance(obj, KernelInterface):  # a kernel, autotuned, or run by the interpreter
                    def record(*args, grid, warmup, _m=module.__name__, _n=name, **kwargs):
                        launches.append(Launch(_m, _n, args, kwargs, grid))
                    stack.enter_context(mock.patch.object(obj, "run", record))
        yield launches


def _target(arch: int) -> GPUTarget:
    return GPUTarget("cuda", arch, 32)


def _policy(arch: int) -> contextlib.ExitStack:
    """What the host code asks of the device, answered as the arch's stand-in GPU would."""
    stack = contextlib.ExitStack()
    tf32 = lambda x: "tf32" if x.dtype == torch.float32 else "ieee"  # noqa: E731  (cudnn.allow_tf32 default)
    stack.enter_context(mock.patch.object(rconv, "_precision", tf32))
    stack.enter_context(mock.patch.object(ctiles, "_gpu", lambda device: kernels.device.for_arch(arch)))
    return stack


def layer_size(layer: str, size: tuple[int, int] = DEFAULT_SIZE) -> tuple[int, int]:
    """The layer's (H, W) on an image of `size`, padded up to a multiple of SIZE_MULTIPLE."""
    scale = LAYERS[layer][1][-1]
    return tuple(-(-n // SIZE_MULTIPLE) * SIZE_MULTIPLE // scale for n in size)


def layer_launches(layer: str, batch: int, dtype: torch.dtype, fmt: torch.memory_format,
                   passes: tuple[str, ...] = PASSES, arch: int = DEFAULT_ARCH,
                   size: tuple[int, int] = DEFAULT_SIZE) -> list[tuple[str, Launch]]:
    """(pass, launch) for every kernel launch of the layer's forward and backward passes on an image of
    `size`, on the arch's stand-in GPU."""
    op, dims = LAYERS[layer]
    H, W = layer_size(layer, size)
    out: list[tuple[str, Launch]] = []

    def act(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, memory_format=fmt, device="meta")

    with _policy(arch):
        if op == "conv":
            C, OC, K, P, _ = dims
            x, w = act(batch, C, H, W), act(OC, C, K, K)
            b = torch.empty(OC, dtype=dtype, device="meta")
            dy = act(batch, OC, H + 2 * P - K + 1, W + 2 * P - K + 1)
            todo: list[tuple[str, Callable[[], object]]] = [
                ("fwd", lambda: rconv._conv_fwd(x, w, b, P)),
                ("dgrad", lambda: cdgrad._conv_dgrad(dy, w, x, P)),
                ("wgrad", lambda: cwgrad._conv_wgrad(dy, w, x, P)),
                ("dbias", lambda: cwgrad._conv_dbias(dy, dtype)),
            ]
        else:
            C, _ = dims
            x, dy = act(batch, C, H, W), act(batch, C, H, W)
            mu = torch.empty(batch * C, device="meta")
            todo = [
                ("fwd", lambda: inorm._forward(*inorm._flat(x), 1e-5, 0.0)),
                ("bwd", lambda: inorm._backward(inorm._flat(x)[0], dy, mu, mu, 0.0)),
            ]
        for pass_name, fn in todo:
            if pass_name not in passes:
                continue
            with recording() as launches:
                fn()
            out += [(pass_name, dataclasses.replace(launch, arch=arch)) for launch in launches]
    return out


# ---- compiling -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: a kernel, and the arch, signature, constants, attributes and options the JIT would use."""

    arch: int
    module: str
    name: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple


def _jit_fn(module: str, name: str) -> JITFunction:
    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, JITFunction):
        obj = obj.fn  # Autotuner / Heuristics wrap the JITFunction
    return obj


def _jit_kwargs(launch: Launch, config: triton.Config | None) -> dict:
    """The keyword arguments the JITFunction gets: the launch's, the config's, the heuristics'."""
    fn = _jit_fn(launch.module, launch.name)
    kwargs = {**launch.kwargs, **(config.all_kwargs() if config else {})}
    obj = getattr(importlib.import_module(launch.module), launch.name)
    while not isinstance(obj, JITFunction):  # heuristics compute constexprs from the arguments
        for name, rule in getattr(obj, "values", {}).items():
            kwargs[name] = rule({**dict(zip(fn.arg_names, launch.args)), **kwargs})
        obj = obj.fn
    return kwargs


def specialise(launch: Launch, config: triton.Config | None) -> Job:
    """The compile the JIT would do for this launch (and config), via Triton's own binder."""
    fn = _jit_fn(launch.module, launch.name)
    kwargs = _jit_kwargs(launch, config)
    backend = make_backend(_target(launch.arch))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    opts = {k: v for k, v in options.__dict__.items() if k != "extern_libs"}
    return Job(launch.arch, launch.module, launch.name, tuple(signature.items()), tuple(constexprs.items()),
               tuple((k, json.dumps(v)) for k, v in attrs.items()), tuple(sorted(opts.items())))


def _tool(name: str) -> str:
    try:
        path = getattr(triton.knobs.nvidia, name).path
    except RuntimeError:  # Triton's own lookup: env TRITON_<NAME>_PATH, then the wheel's bin/
        path = None
    if not path or not os.path.exists(path):
        raise ToolMissing(f"{name} not found (the Triton wheel ships it under triton/backends/nvidia/bin/; "
                          f"or set TRITON_{name.upper()}_PATH)")
    return path


_SASS_LINE = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")


def _instructions(sass: str) -> list[tuple[int, bool, str, list[str], str]]:
    """(address, predicated, opcode, modifiers, operands) for every SASS instruction."""
    found = (_SASS_LINE.match(line) for line in sass.splitlines())
    return [(int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(4).split(".")[1:], m.group(5))
            for m in found if m]


def _opcode_counts(sass: str) -> dict[str, int | str]:
    names = ["hgmma", "hmma", "ldgsts", "ldgsts128", "tma", "ldg128", "ldg64", "ldg32", "ldg16", "stl", "ldl"]
    counts: dict[str, int | str] = dict.fromkeys([*names, "int_ops"], 0)
    insts = _instructions(sass)
    counted = {"HGMMA": "hgmma", "HMMA": "hmma", "LDGSTS": "ldgsts", "UTMALDG": "tma", "STL": "stl", "LDL": "ldl"}
    for _, _, op, mods, _ in insts:
        if op in counted:
            counts[counted[op]] += 1
            counts["ldgsts128"] += op == "LDGSTS" and "128" in mods
        elif op == "LDG":
            width = next((w for w in ("128", "64", "U16", "S16", "U8", "S8") if w in mods), "32")
            counts[{"128": "ldg128", "64": "ldg64", "32": "ldg32"}.get(width, "ldg16")] += 1
        elif op in INT_OPS:
            counts["int_ops"] += 1
    counts.update(_loop_counts(insts))
    return counts


def _loop_counts(insts: list) -> dict[str, int | str]:
    """In the innermost loop that issues MMAs: integer instructions per iteration on its always-
    taken path (code a conditional forward branch skips is left out), and synchronous global
    loads (LDG: the loop's operands should all arrive by cp.async or TMA). '' without such a loop."""
    def target(operands: str) -> int | None:
        m = re.match(r"0x([0-9a-f]+)", operands.strip())
        return int(m.group(1), 16) if m else None

    branches = [(a, p, target(ops)) for a, p, op, _, ops in insts if op == "BRA"]
    mma = [a for a, _, op, _, _ in insts if op in ("HGMMA", "HMMA")]
    loops = [(t, a) for a, _, t in branches if t is not None and t < a and any(t <= x <= a for x in mma)]
    if not loops:
        return {"step_int_ops": "", "loop_ldg": ""}
    start, end = min(loops, key=lambda r: r[1] - r[0])
    skipped = [(a, t) for a, pred, t in branches if pred and t is not None and start <= a < t <= end + 16]
    body = [(a, op) for a, _, op, _, _ in insts if start <= a <= end]
    return {"step_int_ops": sum(op in INT_OPS and not any(b < a < t for b, t in skipped) for a, op in body),
            "loop_ldg": sum(op == "LDG" for _, op in body)}


def compile_job(job: Job):
    """Compile one job for its arch through Triton's cache: under the same key the JIT computes for
    the launch, so on a GPU the JIT then finds it there instead of compiling."""
    fn = _jit_fn(job.module, job.name)
    attrs = {k: json.loads(v) for k, v in job.attrs}
    src = ASTSource(fn, dict(job.signature), dict(job.constexprs), attrs)
    return triton.compile(src, target=_target(job.arch), options=dict(job.options))


def analyse(job: Job) -> dict:
    """Compile one job for its arch and read registers, stack, shared memory and the SASS opcode mix."""
    kernel = compile_job(job)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(kernel.asm["cubin"])
        cuobjdump = _tool("cuobjdump")
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True, check=True).stdout

    def field(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    return {"registers": field("REG"), "spill_bytes": field("STACK") + field("LOCAL"),
            "shared_bytes": int(kernel.metadata.shared) + field("SHARED"), **_opcode_counts(sass)}


def _analyse_in_worker(job: Job, compile_only: bool = False) -> dict:
    try:
        if compile_only:
            compile_job(job)
            return {}
        return analyse(job)
    except ToolMissing:
        raise
    except Exception as e:  # the compiler rejected it: report, do not stop the other rows
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]}


# ---- JIT replay ------------------------------------------------------------------------------------------------------
class _StandInDriver:
    """As much of Triton's CUDA driver as the JIT asks before a launch, and its loader before the
    first one: one device of the arch, with the stand-in GPU's limits. The device index is the arch,
    so that the JIT keeps each arch's kernels apart."""

    def __init__(self, arch: int):
        self.arch, self.utils = arch, self

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return _target(self.arch)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_properties(self, device: int) -> dict:
        gpu = kernels.device.for_arch(self.arch)
        return {"max_shared_mem": gpu.shared_bytes, "multiprocessor_count": gpu.sms}

    def launcher_cls(self, src, metadata) -> None:
        return None

    def load_binary(self, name, kernel, shared, device) -> tuple[int, int, int, int, int]:
        """(module, function, registers, spills, threads): no module is loaded, nothing can launch."""
        return 0, 0, 0, 0, 1024


@dataclasses.dataclass
class Replay:
    runs: int  # launch configs the JIT ran
    compiled: int  # kernels it compiled (not found in Triton's cache)
    max_shared: int  # the most shared memory one of them needs
    refused: list[str]  # what Triton's loader refused to launch (OutOfResources)
    tuned: int = 0  # autotuner keys met for the first time: each config timed on a GPU
    timed: int = 0  # the configs those timings ran
    decisions: int = 0  # (op, key)s --kernels auto decides (checks and times both paths) on a GPU


def jit_replay(layers: list[str], batches: list[int], dtypes: list[str], layouts: list[str],
               passes: tuple[str, ...] = PASSES, arch: int = DEFAULT_ARCH,
               sizes: tuple[tuple[int, int], ...] = (DEFAULT_SIZE,)) -> Replay:
    """Every launch through the JIT itself, as on the arch's stand-in GPU, image size after image size, as a
    folder of photos meets them: an autotuned kernel runs every config (after pruning) for a key its autotuner
    has not met, as the autotuner times them, and then the one it keeps (the first: which one is fastest
    does not matter here). JITFunction.run(warmup=True) specialises, keys, looks in Triton's cache and compiles
    on a miss; Triton's loader then checks the kernel against the device's limits (shared memory, threads) as
    before a first launch, and nothing is launched. 0 compiled after --compile-only. `decisions` counts the
    distinct keys of kernels.choice for the same layers."""
    cache = Path(triton.knobs.cache.dir)
    before = set(cache.glob("*"))
    replay, tuned, decided = Replay(0, 0, 0, []), {}, set()
    with mock.patch.object(triton_driver, "_active", _StandInDriver(arch)):
        for size, layer, batch, dtype, layout in itertools.product(sizes, layers, batches, dtypes, layouts):
            decided.add(_choice_key(layer, batch, DTYPES[dtype], LAYOUTS[layout], size, passes != ("fwd",)))
            for _, launch in layer_launches(layer, batch, DTYPES[dtype], LAYOUTS[layout], passes, arch, size):
                configs, tuner = _configs(launch), getattr(importlib.import_module(launch.module), launch.name)
                if isinstance(tuner, Autotuner):  # its key, as Autotuner.run makes it
                    named = {**dict(zip(tuner.arg_names, launch.args)), **launch.kwargs}
                    key = (launch.name, *(named[k] for k in tuner.keys if k in named),
                           *(str(v.dtype) for v in named.values() if hasattr(v, "dtype")))
                    if key in tuned:
                        configs = [tuned[key]]
                    else:
                        tuned[key] = configs[0]
                        replay.tuned, replay.timed = replay.tuned + 1, replay.timed + len(configs)
                _run(launch, configs, replay)
    replay.compiled, replay.decisions = len(set(cache.glob("*")) - before), len(decided)
    return replay


def _run(launch: Launch, configs: list[triton.Config | None], replay: Replay) -> None:
    for config in configs:
        kernel = _jit_fn(launch.module, launch.name).run(*launch.args, grid=(1,), warmup=True,
                                                          **_jit_kwargs(launch, config))
        replay.runs += 1
        replay.max_shared = max(replay.max_shared, kernel.metadata.shared)
        try:
            kernel._init_handles()
        except triton.runtime.errors.OutOfResources as e:
            replay.refused.append(f"{launch.name} {_config_name(launch.name, launch.kwargs, config)}: "
                                  f"{type(e).__name__}: {e}")


def _choice_key(layer: str, batch: int, dtype: torch.dtype, fmt: torch.memory_format, size: tuple[int, int],
                training: bool) -> tuple:
    op, dims = LAYERS[layer]
    x = torch.empty(batch, dims[0], *layer_size(layer, size), dtype=dtype, device="meta", requires_grad=training)
    x = x.contiguous(memory_format=fmt)
    if op == "in":
        return choice._norm_key(x, 1e-5, 0.0, True)
    C, OC, K, P, _ = dims
    w = torch.empty(OC, C, K, K, dtype=dtype, device="meta").contiguous(memory_format=fmt)
    return choice._conv_key(x, w, None, P)


# ---- report ----------------------------------------------------------------------------------------------------------
def _config_name(kernel: str, kwargs: dict, config: triton.Config | None) -> str:
    meta = {**kwargs, **(config.all_kwargs() if config else {})}
    blocks = [f"{k}{meta[k]}" for k in ("BM", "BN", "BK", "BLOCK_C", "BLOCK_HW", "BLOCK", "BLOCK_P") if k in meta]
    return " ".join(blocks + [f"w{meta.get('num_warps', 4)}", f"s{meta.get('num_stages', 3)}"])


def _grid(launch: Launch, config: triton.Config | None) -> list[int]:
    """The launch grid as [x, y, z]."""
    grid = launch.grid
    if callable(grid):
        fn = _jit_fn(launch.module, launch.name)
        grid = grid({**dict(zip(fn.arg_names, launch.args)), **launch.kwargs, **(config.kwargs if config else {})})
    return [int(g) for g in grid] + [1] * (3 - len(grid))


def _configs(launch: Launch) -> list[triton.Config | None]:
    obj = getattr(importlib.import_module(launch.module), launch.name)
    if not isinstance(obj, Autotuner):
        return [None]
    obj.nargs = dict(zip(obj.arg_names, launch.args))
    try:
        with _policy(launch.arch):
            return list(obj.prune_configs(launch.kwargs))
    finally:
        obj.nargs = None


def _shape_label(layer: str, batch: int, size: tuple[int, int]) -> str:
    op, dims = LAYERS[layer]
    H, W = layer_size(layer, size)
    if op == "conv":
        C, OC, K, _, _ = dims
        return f"N={batch} {C}→{OC} {K}×{K} @{f'{H}²' if H == W else f'{H}×{W}'}"
    return f"({batch},{dims[0]},{H},{W})"


@triton.jit
def _probe_kernel(x):
    tl.store(x, 1.0)


def unsupported(arch: int) -> str | None:
    """Why this Triton and its ptxas cannot compile for the arch, or None if they can."""
    try:
        triton.compile(ASTSource(_probe_kernel, {"x": "*fp32"}, {}, {}), target=_target(arch))
    except Exception as e:  # the compiler's own message says what it rejected
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:200]
    return None


def report(layers: list[str], batches: list[int], dtypes: list[str], layouts: list[str], jobs: int,
           passes: tuple[str, ...] = PASSES, compile_only: bool = False, archs: tuple[int, ...] = (DEFAULT_ARCH,),
           sizes: tuple[tuple[int, int], ...] = (DEFAULT_SIZE,)) -> list[dict]:
    """One row per arch x layer x pass x kernel launch x config, with the compile facts (none if compile_only)."""
    _tool("ptxas")
    if not compile_only:
        _tool("cuobjdump")
    rows, todo = [], {}
    for arch, size, layer, batch, dtype, layout in itertools.product(archs, sizes, layers, batches, dtypes, layouts):
        for pass_name, launch in layer_launches(layer, batch, DTYPES[dtype], LAYOUTS[layout], passes, arch, size):
            for config in _configs(launch):
                job = specialise(launch, config)
                todo.setdefault(job, None)
                grid = _grid(launch, config)
                rows.append(({"arch": f"sm_{arch}", "shape": _shape_label(layer, batch, size), "pass": pass_name,
                              "dtype": dtype, "layout": layout, "kernel": launch.name,
                              "config": _config_name(launch.name, launch.kwargs, config),
                              "grid": grid, "programs": grid[0] * grid[1] * grid[2]}, job))
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        results = dict(zip(todo, pool.map(functools.partial(_analyse_in_worker, compile_only=compile_only), todo)))
    return [{**row, **results[job]} for row, job in rows]


def markdown(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if c not in ("stl", "ldl")] + ["stl/ldl", "error"]
    rows = [{**r, "stl/ldl": f"{r.get('stl', '')}/{r.get('ldl', '')}"} for r in rows]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    if not any(c[-1] for c in cells):
        cols, cells = cols[:-1], [c[:-1] for c in cells]
    return markdown_table(cols, cells)


def _mma(rs: list[dict]) -> str:
    """Which tensor-core instruction the configs' K loops use: HGMMA (wgmma), HMMA (mma.sync) or none."""
    kinds = ["HGMMA" if r["hgmma"] else "HMMA" if r["hmma"] else "none" for r in rs]
    if len(set(kinds)) == 1:
        return kinds[0]
    return ", ".join(f"{k} {kinds.count(k)}" for k in ("HGMMA", "HMMA", "none") if k in kinds)


def _arch_heading(arch: str, rows: list[dict]) -> str:
    """The arch's stand-in GPU and limit, and what the pruning kept for it: configs per GEMM launch,
    the most shared memory one needs, how many exceed the limit (could not launch) or spill."""
    gpu = kernels.device.for_arch(int(arch.removeprefix("sm_")))
    mine = [r for r in rows if r["arch"] == arch and "error" not in r]
    per_launch: dict[tuple, list[bool]] = {}  # whether each config fits
    for r in mine:
        if r["kernel"] in GEMM_KERNELS:
            key = (r["shape"], r["pass"], r["dtype"], r["layout"], r["kernel"])
            per_launch.setdefault(key, []).append(r["shared_bytes"] <= gpu.shared_bytes)
    counts = sorted(len(fits) for fits in per_launch.values()) or [0]
    stuck = sum(not any(fits) for fits in per_launch.values())
    most = max((r["shared_bytes"] for r in mine), default=0)
    over = sum(r["shared_bytes"] > gpu.shared_bytes for r in mine)
    spilling = [r["spill_bytes"] for r in mine if r["spill_bytes"]]
    return (f"{arch} ({gpu.name.split('(')[-1].rstrip(')')}: {gpu.shared_bytes:,} B of shared memory per program, "
            f"{gpu.sms} SMs): {sum(counts)} GEMM configs for {len(per_launch)} launches ({counts[0]}–{counts[-1]} "
            f"each); the most shared memory one needs: {most:,} B; over the limit: {over} (launches left with none "
            f"that fits: {stuck}); spilling: "
            f"{len(spilling)}{f' ({_range(spilling)} B)' if spilling else ''}")


def _range(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def summary(rows: list[dict]) -> str:
    """Per arch, one line per layer x pass x dtype x layout x kernel, over the configs the autotuner may pick."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["shape"], r["pass"], r["dtype"], r["layout"], r["kernel"]), []).append(r)

    def span(rs: list[dict], key: str) -> str:
        vals = [r[key] for r in rs if r.get(key, "") != ""]
        return _range(vals) if vals else ""

    cols = ["shape", "pass", "dtype", "layout", "kernel", "configs", "registers", "spill bytes", "shared bytes",
            "MMA", "cp.async 16 B", "LDG in K loop", "int ops / k-step"]
    tables: dict[str, list[list[str]]] = {}  # per arch, its table's rows
    for key, rs in groups.items():
        arch, key = key[0], key[1:]
        cells = tables.setdefault(arch, [])
        if any("error" in r for r in rs):
            cells.append([*key, str(len(rs)), "error: " + rs[0].get("error", "")])
            continue
        mma = "—" if rs[0]["step_int_ops"] == "" else _mma(rs)
        copies = sum(r["ldgsts"] for r in rs)
        wide = f"{sum(r['ldgsts128'] for r in rs) / copies:.0%}" if copies else "—"
        cells.append([*key, str(len(rs)), span(rs, "registers"), span(rs, "spill_bytes"), span(rs, "shared_bytes"),
                      mma, wide, span(rs, "loop_ldg") or "—", span(rs, "step_int_ops") or "—"])
    return "\n\n".join(f"{_arch_heading(arch, rows)}\n\n{markdown_table(cols, cells)}"  # the device's limits, the table
                       for arch, cells in tables.items())


def _local_arch() -> int:
    """This machine's GPU architecture when it has one the report knows (so that --compile-only warms the
    cache the JIT will look in), else sm_90."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major * 10 + minor in kernels.device.KNOWN:
            return major * 10 + minor
    return DEFAULT_ARCH


def _size(value: str) -> tuple[int, int]:
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{value!r}: give the image's height and width, e.g. 3000,4000")
    return int(parts[0]), int(parts[1])


def _print_replays(args: argparse.Namespace, archs: list[int], start: float) -> int:
    refused = 0
    for arch in archs:
        r = jit_replay(args.layers, args.batch, args.dtypes, args.layouts, tuple(args.passes), arch, tuple(args.size))
        limit = kernels.device.for_arch(arch).shared_bytes
        print(f"sm_{arch}: the JIT ran {r.runs} launch configs and compiled {r.compiled} kernels (the rest were in "
              f"Triton's cache, {triton.knobs.cache.dir}) in {time.monotonic() - start:.1f} s; the most shared memory "
              f"one needs: {r.max_shared} B of {limit} B; refused at launch: {len(r.refused)}; over "
              f"{len(args.size)} image size(s), the autotuners met {r.tuned} new keys (timing {r.timed} configs on "
              f"a GPU) and --kernels auto would decide {r.decisions} (op, key)s")
        for line in r.refused:
            print(" ", line)
        refused += len(r.refused)
    return 1 if refused else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.tools.compile_report", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=csv_list(tuple(LAYERS)), default=list(LAYERS),
                   help=f"comma-separated, from {', '.join(LAYERS)} (default: all)")
    p.add_argument("--batch", type=lambda v: [int(b) for b in csv_list([str(i) for i in range(1, 65)])(v)],
                   default=[1, 4], help="batch sizes, e.g. 1,4 (default)")
    p.add_argument("--dtypes", type=csv_list(tuple(DTYPES)), default=list(DTYPES), help="fp32,bf16 (default)")
    p.add_argument("--layouts", type=csv_list(tuple(LAYOUTS)), default=["channels_last"],
                   help="activation and weight layouts: channels_last (default: how the generator runs on CUDA), nchw")
    p.add_argument("--size", type=_size, nargs="+", default=[DEFAULT_SIZE], metavar="H,W",
                   help="the input image's height and width, which set the layers' shapes (padded up to a multiple "
                        f"of {SIZE_MULTIPLE}, as the generator needs; default: 256,256); several: each in turn")
    p.add_argument("--passes", type=csv_list(PASSES), default=list(PASSES),
                   help="conv: fwd, dgrad, wgrad, dbias; IN: fwd, bwd (default: all)")
    known = [f"sm_{a}" for a in kernels.device.KNOWN]
    p.add_argument("--arch", type=lambda v: [int(n.removeprefix("sm_")) for n in csv_list(known)(v)],
                   default=[_local_arch()], help=f"target architectures, comma-separated, from {', '.join(known)} "
                   f"(default: this machine's GPU if it is one of them, else sm_{DEFAULT_ARCH}); an arch the wheel's "
                   "ptxas rejects is skipped")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: cores)")
    p.add_argument("--json", action="store_true", help="print a JSON list of row objects instead of a table")
    p.add_argument("--summary", action="store_true",
                   help="a line per layer, pass and kernel, over all its configs (ranges), not a line per config")
    p.add_argument("--compile-only", action="store_true", help="only compile, into Triton's cache, and say how "
                   "many (on a GPU machine, before timing: its JIT then finds every kernel the layers launch)")
    p.add_argument("--jit-replay", action="store_true", help="every launch through Triton's JIT as on the arch's "
                   "GPU, launching nothing: what it compiled, in how long, and whether any could not launch")
    args = p.parse_args(argv)
    if triton.knobs.runtime.interpret:
        print("kernels.tools.compile_report: error: TRITON_INTERPRET=1 is set; the report compiles the real kernels "
              "(run it with TRITON_INTERPRET unset or 0)", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        _tool("ptxas")
        archs = []
        for arch in args.arch:
            if why := unsupported(arch):
                print(f"kernels.tools.compile_report: skipped: sm_{arch}: {why}", file=sys.stderr)
            else:
                archs.append(arch)
        if args.jit_replay:
            return _print_replays(args, archs, start)
        rows = report(args.layers, args.batch, args.dtypes, args.layouts, max(1, args.jobs), tuple(args.passes),
                      args.compile_only, tuple(archs), tuple(args.size))
    except ToolMissing as e:
        print(f"kernels.tools.compile_report: skipped: {e}", file=sys.stderr)
        return 0
    if args.compile_only:
        errors = sum("error" in r for r in rows)
        print(f"compiled {len(rows)} launch configs for {', '.join(f'sm_{a}' for a in archs)} in "
              f"{time.monotonic() - start:.0f} s, {errors} errors (Triton's cache: {triton.knobs.cache.dir})")
        for r in (r for r in rows if "error" in r):
            print(" ", *(r[k] for k in ("arch", "shape", "pass", "dtype", "layout", "kernel", "config")), r["error"])
        return 1 if errors else 0
    if args.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
    elif args.summary:
        print(summary(rows))
    else:
        print(markdown(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
