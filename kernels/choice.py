"""Which path the generator's layers take on a GPU: our Triton kernels or PyTorch's (cuDNN for the
conv), measured at first use, as cudnn.benchmark measures cuDNN's own algorithms (README, "The kernels":
the key, the check and what follows when it fails, the cache file, the report line).

    --kernels  what minicycle.networks.FusedSequential calls
    auto       measured_reflect_conv2d / measured_instance_norm_relu below: on CUDA the faster correct path
               per key, decided once; on a CPU, the ops (their own rule)
    triton     kernels.reflect_conv2d / kernels.instance_norm_relu, always
    pytorch    nothing here: set_fused(net, False) runs the official layers

The first use of a key on CUDA (outside CUDA graph capture and torch.compile tracing) decides, on the live
inputs and a fixed pseudo-random output gradient dy: PyTorch untimed where Triton cannot profit
(_cannot_profit); else each pass runs once both ways and is checked (see "The check" below), then timed both
ways, and the faster path is kept per pass: the conv's fwd, dgrad (dx) and wgrad (dw, db), the norm's
fwd+bwd as one choice (the Triton backward needs the Triton forward's statistics). A conv whose passes
disagree runs as the custom op minicycle::reflect_conv2d_chosen; an all-Triton one calls
kernels.reflect_conv2d, an all-PyTorch one F.pad + F.conv2d, as the official layers do.

kernels/ stands alone: this file imports nothing from minicycle.
"""

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import kernels
from kernels import device as devices
from kernels import runtime
from kernels.runtime import pytorch_norm, use_triton

KERNELS = not runtime.triton_problem()  # else kernels.* are PyTorch's path, and there is nothing to choose
if KERNELS:
    from kernels import conv_dgrad, conv_wgrad
    from kernels import reflect_conv as rc

MODES = ("auto", "triton", "pytorch")
# Per op, the passes decided one by one: training (some input requires grad), or forward only.
PASSES = {"conv": ("fwd", "dgrad", "wgrad"), "conv_fwd": ("fwd",), "norm": ("fwd+bwd",), "norm_fwd": ("fwd",)}
TRITON, PYTORCH = "triton", "pytorch"
TOLERANCES = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # see "The check" below
TILE, FLOOR = 8, 0.25  # a tile: one channel's 8x8 block of pixels; small tiles are held to FLOOR x the RMS
CHUNK = 1 << 20  # elements compared at a time in float64: the check's extra memory is a few 8 MB chunks
WARMUP_MS, REP_MS = 10, 40  # do_bench's warm-up and timed span per (pass, path)

Timer = Callable[[Callable[[], object], str, str], float]  # (fn, path, pass) -> ms
Runs = dict[str, tuple[Callable[[], object], ...]]  # per path, a function per pass of PASSES[op] (or more)


def device_ms(fn: Callable[[], object], path: str, pass_name: str) -> float:
    """Median ms of fn on the current CUDA stream: triton.testing.do_bench (CUDA events, L2 cleared)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


class Errors(NamedTuple):
    """Triton's output against PyTorch's (see rel_err)."""

    whole: float  # ||triton - pytorch|| / ||pytorch||
    tile: float  # the same in the worst TILE x TILE tile


@dataclasses.dataclass
class Decision:
    op: str  # a key of PASSES
    label: str  # e.g. "conv 7x7 3->64 @ 1x256x256 fp32"
    device: str  # the device's name
    paths: tuple[str, ...]  # per pass of PASSES[op]: TRITON or PYTORCH
    ms: tuple[tuple[float, float], ...] | None = None  # per pass (Triton, PyTorch) medians, when timed
    why: str = ""  # why PyTorch without timing, or after a failed launch or check
    cached: bool = False  # read from the cache file
    errors: tuple[Errors, ...] | None = None  # per pass checked, Triton's worst output against PyTorch's

    def pytorch_name(self, cuda: bool = True) -> str:
        return "cuDNN" if self.op.startswith("conv") and cuda else "PyTorch"

    def verdict(self, i: int, cuda: bool = True) -> str:
        """Pass i's path and why, in a few words: 'Triton, by 1.42x', 'cuDNN, by 1.30x', 'cuDNN (why)'."""
        name = "Triton" if self.paths[i] == TRITON else self.pytorch_name(cuda)
        if self.ms is None:
            return f"{name} ({self.why})"
        t, p = self.ms[i]
        return f"{name}, by {max(t, p) / max(min(t, p), 1e-9):.2f}x"

    def reason(self, i: int) -> str:
        """Why pass i takes PyTorch."""
        if self.ms is None:
            return self.why
        t, p = self.ms[i]
        return f"Triton {t / p:.1f}x slower" if p > 0 else "Triton slower"


class Chooser:
    """The measured choice and its decisions for one process. Tests inject the timer, the device
    facts and the device types it applies to (CPU tensors, through the Triton interpreter)."""

    def __init__(self, *, timer: Timer = device_ms, facts: Callable[[torch.device], devices.Device] = devices.of,
                 device_types: Sequence[str] = ("cuda",), cache_file: Path | None = None):
        self.timer, self.facts, self.device_types, self.cache_file = timer, facts, tuple(device_types), cache_file
        self.paths: dict[tuple, tuple[str, ...]] = {}  # the decisions in use: what the layers (and torch.compile) read
        self.decisions: dict[tuple, Decision] = {}
        self.stored: dict[tuple, Decision] = {}  # read from the cache file, not used yet
        self.loaded: set[torch.device] = set()  # devices whose cache section has been read
        self.unreported: list[tuple] = []
        self.seconds = 0.0  # spent deciding since the last report

    def applies(self, x: torch.Tensor) -> bool:
        return KERNELS and x.device.type in self.device_types

    # ---- the lookup ----------------------------------------------------------------------------
    def conv_paths(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding: int) -> tuple[str, ...]:
        return self._paths(_conv_key(x, w, b, padding), x, lambda: _conv_runs(x, w, b, padding))

    def norm_paths(self, x: torch.Tensor, eps: float, slope: float, activation: bool) -> tuple[str, ...]:
        key = _norm_key(x, eps, slope, activation)
        return self._paths(key, x, lambda: _norm_runs(x, eps, slope, activation, train=key[1] == "norm"),
                           kink=activation and slope != 1.0)

    def conv_decision(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding: int) -> Decision:
        """The decision for these conv inputs (made now if new), as the layers would take it."""
        self.conv_paths(x, w, b, padding)
        return self.decisions[_conv_key(x, w, b, padding)]

    def norm_decision(self, x: torch.Tensor, eps: float, slope: float, activation: bool) -> Decision:
        self.norm_paths(x, eps, slope, activation)
        return self.decisions[_norm_key(x, eps, slope, activation)]

    def _paths(self, key: tuple, x: torch.Tensor, runs: Callable[[], Runs], kink: bool = False) -> tuple[str, ...]:
        paths = self.paths.get(key)  # the hot path: one look-up per layer call
        if paths is not None:
            return paths
        if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return (PYTORCH,) * len(PASSES[key[1]])  # nothing can be checked here: PyTorch's path, never unchecked
        self._read_section(key[0])
        decision = self.stored.pop(key, None)
        if decision is None:
            start = time.perf_counter()
            decision = self._decide(key, x.shape, runs, kink)
            self.seconds += time.perf_counter() - start
            if decision.ms is not None:
                self._save(key, decision)
        self._use(key, decision)
        return decision.paths

    def _use(self, key: tuple, decision: Decision) -> None:
        self.decisions[key], self.paths[key] = decision, decision.paths
        self.unreported.append(key)

    # ---- deciding ------------------------------------------------------------------------------
    def _decide(self, key: tuple, shape: Sequence[int], runs: Callable[[], Runs], kink: bool) -> Decision:
        """Check every Triton pass against PyTorch's, then time both per pass and keep the faster.
        kink: the pass returns (y, dx) of an activation with a kink at 0 (see rel_err)."""
        device, op, dtype, passes = key[0], key[1], getattr(torch, key[2].removeprefix("torch.")), PASSES[key[1]]
        dev, label, errors, ms = self.facts(device), _label(key, shape), [], []
        if why := _cannot_profit(op, dev, dtype):
            return Decision(op, label, dev.name, (PYTORCH,) * len(passes), why=why)
        tol = TOLERANCES[dtype]
        try:
            with torch.no_grad():
                todo = runs()
                for name, triton_run, torch_run in zip(passes, todo[TRITON], todo[PYTORCH]):
                    with _fatal(device, label, name, PYTORCH):
                        want = _outputs(torch_run(), name)
                    with _fatal(device, label, name, TRITON):
                        got = _outputs(triton_run(), name)
                        kinks = [(got[0], want[0]) if kink and i == 1 else None for i in range(len(want))]
                        err = [rel_err(g, w, kink=k) for g, w, k in zip(got, want, kinks)]
                    del got, want
                    errors.append(Errors(max(e.whole for e in err), max(e.tile for e in err)))
                    if not (errors[-1].whole <= tol and errors[-1].tile <= tol):  # NaN included
                        return self._fall_back(key, label, dev, (
                            f"Triton's {name} differs from PyTorch's by {errors[-1].whole:.1e} over the whole output "
                            f"and {errors[-1].tile:.1e} in its worst {TILE}x{TILE} tile (tolerance {tol:.0e} for "
                            f"{key[2].removeprefix('torch.')})"), errors)
                for name, triton_run, torch_run in zip(passes, todo[TRITON], todo[PYTORCH]):
                    with _fatal(device, label, name, TRITON):
                        t = self.timer(triton_run, TRITON, name)
                    with _fatal(device, label, name, PYTORCH):
                        ms.append((t, self.timer(torch_run, PYTORCH, name)))
        except TritonFailed as e:  # our kernels failed, the GPU still usable: PyTorch, never a crash
            return self._fall_back(key, label, dev, f"the Triton kernels failed: {e}", errors)
        paths = tuple(TRITON if t < q else PYTORCH for t, q in ms)
        return Decision(op, label, dev.name, paths, tuple(ms), errors=tuple(errors))

    def _fall_back(self, key: tuple, label: str, dev: devices.Device, why: str, errors: list[Errors]) -> Decision:
        decision = Decision(key[1], label, dev.name, (PYTORCH,) * len(PASSES[key[1]]), why=why,
                            errors=tuple(errors) or None)
        print(f"kernels: {decision.pytorch_name(key[0].type == 'cuda')} for {decision.label}: {why}",
              file=sys.stderr, flush=True)
        return decision

    # ---- the cache file ------------------------------------------------------------------------
    def _section(self, device: torch.device) -> str:
        dev = self.facts(device)
        return (f"{dev.name} sm_{dev.arch} | torch {torch.__version__} | triton {runtime.triton.__version__} | "
                f"cuDNN {torch.backends.cudnn.version()} | kernels {_sources_hash()}")

    def load(self, device: torch.device) -> int:
        """Use this device's decisions from the cache file from now on (torch.compile traces with the
        decisions it finds and makes none); they are listed in the next report()."""
        if device.type == "cuda" and device.index is None:  # train.py's torch.device("cuda"): the tensors' index
            device = torch.device("cuda", torch.cuda.current_device())
        self._read_section(device)
        keys = [k for k in self.stored if k[0] == device]
        for key in keys:
            self._use(key, self.stored.pop(key))
        return len(keys)

    def _read_section(self, device: torch.device) -> None:
        """The cache file's decisions for this device, into self.stored (used when a layer asks), once."""
        if device in self.loaded or self.cache_file is None:
            return
        self.loaded.add(device)
        name = self.facts(device).name
        for entry in _entries(_read(self.cache_file), self._section(device)):
            try:
                key = (device, *(tuple(e) if isinstance(e, list) else e for e in entry["key"]))
                label, paths, ms = entry["label"], tuple(entry["paths"]), tuple(tuple(m) for m in entry["ms"])
                errors = tuple(Errors(*e) for e in entry.get("errors", ())) or None
                ok = key[1] in PASSES and len(paths) == len(ms) == len(PASSES[key[1]])
            except (KeyError, TypeError, IndexError):
                ok = False
            if ok and key not in self.paths:
                self.stored[key] = Decision(key[1], label, name, paths, ms, cached=True, errors=errors)

    def _save(self, key: tuple, decision: Decision) -> None:
        """Add a timed decision to the cache file (read, merge, atomic replace; a cache never fails a run)."""
        if self.cache_file is None:
            return
        section, key_json = self._section(key[0]), [list(e) if isinstance(e, tuple) else e for e in key[1:]]
        data = _read(self.cache_file)
        entries = [e for e in _entries(data, section) if e.get("key") != key_json]
        data[section] = entries + [{"key": key_json, "label": decision.label, "paths": list(decision.paths),
                                    "ms": [list(m) for m in decision.ms], "errors": decision.errors}]
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            runtime.write_atomic(self.cache_file, (json.dumps(data) + "\n").encode())
        except OSError:
            pass

    # ---- the summary ---------------------------------------------------------------------------
    def report(self) -> str | None:
        """One line on the decisions first used since the last report (None if there are none)."""
        if not self.unreported:
            return None
        keys, self.unreported = self.unreported, []
        seconds, self.seconds = self.seconds, 0.0
        found = [(self.decisions[k], k[0].type == "cuda") for k in keys]
        choices = [(d, i, cuda) for d, cuda in found for i in range(len(d.paths))]
        slower = [f"{d.pytorch_name(cuda)} for {d.label}{' ' + PASSES[d.op][i] if d.op != 'norm' else ''} "
                  f"({d.reason(i)})" for d, i, cuda in choices if d.paths[i] == PYTORCH]
        n = sum(d.paths[i] == TRITON for d, i, _ in choices)
        line = f"kernels: Triton for {n} of {len(choices)} (op, shape, pass) choices"
        if slower:
            line += ", " + ", ".join(slower[:4]) + (f" and {len(slower) - 4} more" if len(slower) > 4 else "")
        cached = sum(d.cached for d, _ in found)
        from_file = f" ({cached} of {len(found)} from {self.cache_file})" if cached else ""
        return line + f"; decided on {found[0][0].device} in {seconds:.1f} s{from_file}"


# ---- the passes, as the measurement times them and the layers run them -----------------------------


def forward(path: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, p: int) -> torch.Tensor:
    """conv2d(reflect_pad(x, p), w) + b, in x's memory format."""
    if path == TRITON:
        return rc._conv_fwd(x, w, b, p)
    with _no_autocast(x):
        y = F.conv2d(F.pad(x, (p,) * 4, mode="reflect") if p else x, w, b)
    return y.contiguous(memory_format=_format(x))


def dgrad(path: str, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, p: int) -> torch.Tensor:
    """dx in x's memory format. PyTorch: the padded input's gradient (the input's values unused,
    so an empty tensor of its shape stands in), folded back by the pad's own backward."""
    if path == TRITON:
        return conv_dgrad._conv_dgrad(dy, w, x, p)
    N, C, H, W = x.shape
    padded = torch.empty((N, C, H + 2 * p, W + 2 * p), dtype=x.dtype, device=x.device, memory_format=_format(x))
    with _no_autocast(x):
        g = torch.ops.aten.convolution_backward(dy, padded, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                [True, False, False])[0]
        dx = torch.ops.aten.reflection_pad2d_backward(g, x, [p] * 4) if p else g
    return dx.contiguous(memory_format=_format(x))


def wgrad(path: str, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, p: int, need_w: bool,
          need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dw in w's memory format, db), each None where not needed."""
    if path == TRITON:
        dw = conv_wgrad._conv_wgrad(dy, w, x, p) if need_w else None
        return dw, (conv_wgrad._conv_dbias(dy, x.dtype) if need_b else None)
    with _no_autocast(x):
        padded = F.pad(x, (p,) * 4, mode="reflect") if p else x
        _, dw, db = torch.ops.aten.convolution_backward(dy, padded, w, [w.shape[0]] if need_b else None, [1, 1],
                                                        [0, 0], [1, 1], False, [0, 0], 1, [False, need_w, need_b])
    return (dw.contiguous(memory_format=_format(w)) if need_w else None), (db if need_b else None)


def _no_autocast(x: torch.Tensor):
    """The operands are in the autocast dtype already (as the Triton op casts them); CPU autocast would
    run the pad in fp32."""
    return torch.autocast(x.device.type, enabled=False)


def _format(t: torch.Tensor) -> torch.memory_format:
    """channels_last if t is (and not also contiguous), else contiguous: the Triton ops' rule for outputs."""
    channels_last = not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


# A conv whose passes disagree: one custom op (opaque to torch.compile, safe in a CUDA graph) that
# runs each pass on the path decided for it, with the Triton op's contract (outputs in x's and w's
# memory formats, 0-element placeholders for gradients not needed).


@torch.library.custom_op("minicycle::reflect_conv2d_chosen", mutates_args=())
def _chosen(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, fwd_path: str,
            dgrad_path: str, wgrad_path: str) -> torch.Tensor:
    return forward(fwd_path, x, weight, bias, padding)


@_chosen.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, fwd_path: str,
      dgrad_path: str, wgrad_path: str) -> torch.Tensor:
    return rc._empty_like_layout(x, rc._out_shape(x, weight, padding))


@torch.library.custom_op("minicycle::reflect_conv2d_chosen_backward", mutates_args=())
def _chosen_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int, need_x: bool,
                     need_w: bool, need_b: bool, dgrad_path: str,
                     wgrad_path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gx = dgrad(dgrad_path, dy, x, weight, padding) if need_x else x.new_empty(0)
    gw, gb = wgrad(wgrad_path, dy, x, weight, padding, need_w, need_b)
    return gx, x.new_empty(0) if gw is None else gw, x.new_empty(0) if gb is None else gb


@_chosen_backward.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int, need_x: bool, need_w: bool,
      need_b: bool, dgrad_path: str, wgrad_path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gx = rc._empty_like_layout(x, x.shape) if need_x else x.new_empty(0)
    gw = torch.empty_like(weight) if need_w else x.new_empty(0)
    gb = x.new_empty(weight.shape[0]) if need_b else x.new_empty(0)
    return gx, gw, gb


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, _, padding, _, dgrad_path, wgrad_path = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding, ctx.dgrad_path, ctx.wgrad_path = padding, dgrad_path, wgrad_path


def _autograd_backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw, gb = _chosen_backward(dy, x, weight, ctx.padding, need_x, need_w, need_b, ctx.dgrad_path,
                                  ctx.wgrad_path)
    return gx if need_x else None, gw if need_w else None, gb if need_b else None, None, None, None, None


_chosen.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---- the check: Triton's outputs against PyTorch's -------------------------------------------------------
#
# Each output of a pass gives two numbers, both ||triton - pytorch|| / ||pytorch||: `whole`, over the whole
# tensor, and `tile`, the worst over its tiles (one channel's TILE x TILE pixels; a weight's gradient is tiled as
# its (OC, C*KH*KW) matrix), each tile measured against max(its own norm, FLOOR x the whole reference's RMS x
# sqrt(its size)). A pass passes when both are within TOLERANCES[dtype] for every output. `whole` alone misses a
# local fault: one wrong 128x64 GEMM tile in a 1x64x2048x2048 output moves it by at most 5.5e-3; the tiles see it
# (tests/test_parity_check.py injects such faults at the generator's layer shapes).
#
# The tolerances, from a rounding model (two correct results differ by both sides' rounding errors):
#   fp32 with TF32 on both sides (cuDNN's default, which the Triton conv follows): each input is rounded to a
#     10-bit mantissa, |d| <= u = 2^-11 (a truncating side errs by up to 2u, with a bias of -u). A product a*b
#     errs by (d_a + d_b)*a*b, an output by the sum over its K terms (K = C*KH*KW for fwd and dgrad, N*OH*OW for
#     wgrad): a random part of RMS u*sqrt(2/3)*||ab||_2 per side, and 2u*y for a truncating side's bias. Over a
#     tile, with rho = sum ||ab||^2 / sum y^2 (1 for terms of random sign, more where they cancel), the sides
#     differ by about 2u*sqrt(1 + rho/3) = 1.1e-3 at rho = 1 (5.6e-4 if both round to nearest), whatever K;
#     fp32 accumulation adds about sqrt(K)*2^-24, under 3e-4 up to K = 2.4e7 (a 4000x6000 wgrad). 5e-3 leaves
#     room for rho up to 75; tiles whose reference is small against the whole (where rho is largest) are held to
#     the floor instead. Without TF32 both sides differ by fp32 accumulation alone.
#   fp16, bf16: exact inputs and products, fp32 sums (as above); each output rounded once (twice at the dgrad's
#     folded border), so two correct results differ by at most 1.5 ulp per element: 1.5 * 2^-10 = 1.5e-3 for
#     fp16, 1.5 * 2^-7 = 1.2e-2 for bf16, against 1e-2 and 2e-2.
#   IN + activation: no products, fp32 statistics, the same output roundings. Where the two forwards put an
#     element on opposite sides of the activation's kink (xhat within rounding of 0), either one-sided dx is
#     right, and through mean(g) and mean(g * xhat) the choice moves the whole plane's dx by 1/HW of it: such a
#     plane's dx is left out (`kink`; about 1e-7 of the elements sit that close to 0 in fp32).


def rel_err(out: torch.Tensor, ref: torch.Tensor, *,
            kink: tuple[torch.Tensor, torch.Tensor] | None = None) -> Errors:
    """out against ref (see "The check" above), in float64 chunks of CHUNK elements (at least one band of TILE
    rows of one channel), so that the extra memory stays a few chunks whatever the outputs' size. A tensor that
    is not 4-d is compared as one row. kink: the forward outputs (out's, ref's) of an activation; the planes
    where they differ in sign somewhere are left out."""
    out, ref = (t.detach() if t.dim() == 4 else t.detach().reshape(1, 1, 1, -1) for t in (out, ref))
    N, C, H, W = ref.shape
    rows = min(-(-H // TILE) * TILE, max(TILE, CHUNK // max(W, 1) // TILE * TILE))
    chans = max(1, CHUNK // (rows * max(W, 1)))
    parts = [(n, slice(c, c + chans), slice(h, h + rows)) for n in range(N) for c in range(0, C, chans)
             for h in range(0, H, rows)]
    skip = torch.zeros(N, C, dtype=torch.bool, device=ref.device)  # the (n, c) planes left out
    for n, c, h in parts if kink is not None else ():
        skip[n, c] |= ((kink[0][n, c, h] > 0) != (kink[1][n, c, h] > 0)).flatten(1).any(1)
    diff, norm, count = [], [], []
    for part in parts:
        d, r = out[part].double(), ref[part].double()
        d.sub_(r).square_()[skip[part[:2]]] = 0
        diff.append(_tile_sums(d))
        norm.append(_tile_sums(r.square_()))
        count.append(_tile_sums(r.new_ones((1, *r.shape[1:]))).repeat(r.shape[0]))
    diff, norm, count = torch.cat(diff), torch.cat(norm), torch.cat(count)
    total = norm.sum()
    floor = FLOOR**2 * total / ref.numel() * count
    whole = (diff.sum() / total.clamp_min(1e-300)).sqrt()
    tile = (diff / torch.maximum(norm, floor).clamp_min(1e-300)).max().sqrt()
    return Errors(float(whole), float(tile))


def _tile_sums(t: torch.Tensor) -> torch.Tensor:
    """(channels, rows, columns) -> the sums over each channel's TILE x TILE blocks, flattened."""
    c, h, w = t.shape
    t = F.pad(t, (0, -w % TILE, 0, -h % TILE))
    return t.view(c, t.shape[1] // TILE, TILE, t.shape[2] // TILE, TILE).sum((2, 4)).flatten()


def _outputs(result: torch.Tensor | tuple, pass_name: str) -> list[torch.Tensor]:
    """A pass's outputs as rel_err compares them: a weight's gradient as its (OC, C*KH*KW) matrix."""
    if pass_name != "wgrad":
        return list(result) if isinstance(result, tuple) else [result]
    dw, db = result
    return [t.reshape(1, 1, t.shape[0], -1) for t in (dw, db) if t is not None]


# CUDA errors after which the process's CUDA context is unusable: every later CUDA call fails too, so no
# fallback can run (cudaError codes, and their messages as torch and Triton report them).
STICKY = {700: "an illegal memory access", 702: "the launch timed out", 710: "device-side assert",
          714: "hardware stack error", 715: "an illegal instruction", 716: "misaligned address",
          717: "operation not supported on global/shared address space", 718: "invalid program counter",
          719: "unspecified launch failure", 214: "uncorrectable ecc error"}


class FatalKernelError(RuntimeError):
    """A CUDA error during the check that leaves the GPU unusable in this process. One line: the layer, and
    the way around it."""


class TritonFailed(Exception):
    """Our kernels raised an error during the check that leaves the GPU usable: PyTorch for the key."""


def sticky(e: BaseException) -> bool:
    """Whether e is one of the CUDA errors in STICKY (by torch's error code, or by the message)."""
    text = str(e).lower()
    return getattr(e, "error_code", None) in STICKY or any(m in text for m in STICKY.values())


@contextlib.contextmanager
def _fatal(device: torch.device, label: str, pass_name: str, path: str):
    """Runs a pass of the check (then waits for the GPU, so that a kernel's fault shows here and not in a
    later layer), and turns its errors into ones that name the layer: a sticky CUDA error into
    FatalKernelError, running out of memory into torch.OutOfMemoryError, any other error of Triton's into
    TritonFailed."""
    what = f"{label} {pass_name}"
    try:
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(f"out of GPU memory while checking {what} (Triton against PyTorch): "
                                     f"{_reason(e)}") from None
    except Exception as e:
        if sticky(e):
            who = "Triton's kernels" if path == TRITON else "PyTorch"
            raise FatalKernelError(f"{what}: {who} failed with a CUDA error that leaves the GPU unusable in this "
                                   f"process ({_reason(e)}), so no fallback can run; rerun with --kernels "
                                   f"pytorch") from None
        if path == TRITON:
            raise TritonFailed(_reason(e)) from e
        raise


# ---- the generator's entry points -------------------------------------------------------------------


def _cache_file() -> Path | None:
    setting = os.environ.get("MINICYCLE_KERNEL_CACHE")
    if setting == "off":
        return None
    if setting:
        return Path(setting)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "minicycle" / "kernel_choice.json"


CHOOSER = Chooser(cache_file=_cache_file())


def measured_reflect_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                            padding: int) -> torch.Tensor:
    """kernels.reflect_conv2d's result, by the paths CHOOSER decided for these inputs (pass by pass)."""
    if not CHOOSER.applies(x):
        return kernels.reflect_conv2d(x, weight, bias, padding=padding)
    x, weight, bias = rc._autocast_checked(x, weight, bias, padding)  # as kernels.reflect_conv2d does
    paths = CHOOSER.conv_paths(x, weight, bias, padding)
    if PYTORCH not in paths:
        return kernels.reflect_conv2d(x, weight, bias, padding=padding)
    if TRITON not in paths:
        return forward(PYTORCH, x, weight, bias, padding)
    return _chosen(x, weight, bias, padding, *paths)  # training: (fwd, dgrad, wgrad), some of each


def measured_instance_norm_relu(x: torch.Tensor, *, eps: float = 1e-5, negative_slope: float = 0.0,
                                activation: bool = True) -> torch.Tensor:
    """kernels.instance_norm_relu's result, by the path CHOOSER decided for these inputs."""
    if not CHOOSER.applies(x) or x.dim() != 4 or x.shape[2] * x.shape[3] == 1:  # the op's own rule, or its error
        return kernels.instance_norm_relu(x, eps=eps, negative_slope=negative_slope, activation=activation)
    slope = float(negative_slope) if activation else 1.0
    (path,) = CHOOSER.norm_paths(x, float(eps), slope, activation)
    if path == TRITON:
        return kernels.instance_norm_relu(x, eps=eps, negative_slope=negative_slope, activation=activation)
    return pytorch_norm(x, eps, negative_slope, activation)


def report() -> str | None:
    """The summary line of the decisions first used since the last call, or None."""
    return CHOOSER.report()


def load(device: torch.device) -> int:
    """Take the cache file's decisions for this device now (before torch.compile traces the model)."""
    return CHOOSER.load(device) if KERNELS and device.type in CHOOSER.device_types else 0


def compile_notice(mode: str, device: torch.device) -> str:
    """The line a run prints before Triton compiles the kernels on this machine for the first time, or '' when
    a run has done so before (with this GPU, torch, Triton, cuDNN and these kernels: the cache section's
    name; the mark beside the cache file is left when the run ends). Triton keeps what it compiles in its own
    cache, so a later run starts at once."""
    if mode == "pytorch" or device.type not in CHOOSER.device_types or not KERNELS or CHOOSER.cache_file is None:
        return ""
    section = CHOOSER._section(device)
    mark = CHOOSER.cache_file.with_name(f"compiled-{hashlib.sha256(section.encode()).hexdigest()[:16]}")
    if mark.exists():
        return ""
    atexit.register(_mark, mark)
    # compile_report --jit-replay --batch 1 --dtypes fp32: 48 kernels in 47 s for the generator at one image
    # size (training), on 2 CPU cores; Triton compiles them one by one as the layers first run.
    return (f"kernels: compiling Triton kernels for {CHOOSER.facts(device).name} (first use on this machine with "
            f"Triton {runtime.triton.__version__}: about a minute, more for each new dtype or image size)")


def _mark(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def describe(mode: str, device: torch.device) -> str:
    """What --kernels `mode` runs on `device`, for a run's first line."""
    if mode == "pytorch":
        return "the official PyTorch layers (--kernels pytorch)"
    triton_here = use_triton(torch.empty(0, device=device))
    if triton_here and runtime.triton_problem():
        runtime.say_once()  # said here, in the run's first line
        return f"PyTorch ({runtime.triton_problem()})"
    if device.type not in CHOOSER.device_types:
        return "Triton, through its interpreter" if triton_here else "PyTorch (no Triton without a GPU)"
    if mode == "triton":
        return "Triton (--kernels triton)"
    return "Triton or cuDNN per layer, measured at first use (--kernels auto)"


# ---- helpers --------------------------------------------------------------------------------------


def _conv_key(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding: int) -> tuple:
    """(device, op, dtype, size, C, OC, KH, KW, layouts, bias, padding, cuDNN flags); the op is 'conv' when a
    gradient will be needed (three passes), else 'conv_fwd'. size: see _size."""
    grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    OC, C, KH, KW = w.shape
    return (x.device, "conv" if grad else "conv_fwd", str(x.dtype), _size(x, OC), C, OC, KH, KW,
            _format(x) == torch.channels_last, _format(w) == torch.channels_last, b is not None, padding,
            *_cudnn_flags())


def _norm_key(x: torch.Tensor, eps: float, slope: float, activation: bool) -> tuple:
    grad = torch.is_grad_enabled() and x.requires_grad
    return (x.device, "norm" if grad else "norm_fwd", str(x.dtype), _size(x, x.shape[1]), x.shape[1],
            _format(x) == torch.channels_last, eps, slope, activation)


def _size(x: torch.Tensor, out_channels: int) -> tuple[int, int, bool]:
    """(N, H.W) rounded up to powers of two, and whether an operand holds 2**31 elements or more: photos of
    nearby sizes share a decision (the kernels' masks make every size correct) and Triton's autotuned tiles,
    keyed the same way, while launches whose offsets need int64 index math, other code, stay apart."""
    N, C, H, W = x.shape
    return 1 << (N - 1).bit_length(), 1 << (H * W - 1).bit_length(), N * max(C, out_channels) * H * W >= 2**31


def _cudnn_flags() -> tuple[bool, bool]:
    """What the PyTorch conv's speed and precision depend on: TF32, and cuDNN's own benchmark."""
    return runtime.cudnn_conv_tf32(), bool(torch.backends.cudnn.benchmark)


def _cannot_profit(op: str, dev: devices.Device, dtype: torch.dtype) -> str:
    """Why PyTorch is taken without timing, or ''."""
    name = str(dtype).removeprefix("torch.")
    if dtype not in TOLERANCES:
        return f"no Triton kernels for {name}"
    if dev.arch < 75:
        return f"Triton does not support sm_{dev.arch}"
    if op.startswith("conv") and not dev.tensor_cores(dtype):
        return f"no tensor-core {name} dot on sm_{dev.arch}"
    return ""


def _label(key: tuple, shape: Sequence[int]) -> str:
    """The key in words, at the shape it is decided for: 'conv 7x7 3->64 @ 1x256x256 fp32', 'IN+ReLU 64 @
    1x256x256 bf16'."""
    op, dtype, _, c = key[1:5]
    n, _, h, w = shape
    short = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(dtype, dtype)
    if op.startswith("conv"):
        oc, kh, kw = key[5:8]
        return f"conv {kh}x{kw} {c}->{oc} @ {n}x{h}x{w} {short}"
    slope, activation = key[7:9]
    act = "" if not activation else "+ReLU" if slope == 0 else f"+LeakyReLU({slope:g})"
    return f"IN{act} {c} @ {n}x{h}x{w} {short}"


def _probe(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random output gradient in like's dtype, device and memory format (its own
    generator: the run's random streams are not touched)."""
    gen = torch.Generator(device=like.device).manual_seed(0)
    t = torch.randn(tuple(shape), generator=gen, dtype=like.dtype, device=like.device)
    return t.contiguous(memory_format=_format(like))


def _conv_runs(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, p: int) -> Runs:
    dy = _probe(rc._out_shape(x, w, p), x)
    return {path: (lambda q=path: forward(q, x, w, b, p), lambda q=path: dgrad(q, dy, x, w, p),
                   lambda q=path: wgrad(q, dy, x, w, p, True, b is not None)) for path in (TRITON, PYTORCH)}


def _norm_runs(x: torch.Tensor, eps: float, slope: float, activation: bool, train: bool) -> Runs:
    impls = {TRITON: lambda t: kernels.instance_norm_relu(t, eps=eps, negative_slope=slope, activation=activation),
             PYTORCH: lambda t: pytorch_norm(t, eps, slope, activation)}
    if not train:
        return {path: (lambda f=f: f(x),) for path, f in impls.items()}
    dy = _probe(tuple(x.shape), x)
    return {path: (lambda f=f: _forward_backward(f, x, dy),) for path, f in impls.items()}


def _forward_backward(impl: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        xi = x.detach().requires_grad_()
        y = impl(xi)
        (dx,) = torch.autograd.grad(y, xi, dy.to(y.dtype))  # CPU autocast runs PyTorch's norm in fp32
    return y.detach(), dx


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:160]


def _read(path: Path) -> dict:
    """The cache file's sections, or {} when it is missing or unreadable (it is then rewritten)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _entries(data: dict, section: str) -> list[dict]:
    entries = data.get(section)
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


@functools.cache
def _sources_hash() -> str:
    """Of every module in kernels/: a change in any of them decides anew."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()[:16]
