"""Which path an op takes: the Triton kernels, or plain PyTorch. What the kernels need of the installed
Triton, the PyTorch path that stands in for them without it, the cuDNN precision setting the conv
follows, one interpreter fix, and the atomic file write that the choice's cache and minicycle's files use.

This module imports nothing from Triton beyond its version, so that `import kernels` works with any
Triton, or none (macOS and Windows have no Triton wheel): kernels/__init__.py imports the kernels only
when triton_problem() is '' and binds the PyTorch stand-ins below otherwise.
"""

import contextlib
import os
import re
import sys

import torch
import torch.nn.functional as F

try:
    import triton
except ImportError:
    triton = None

# The oldest Triton the kernels are compiled and tested with: 3.6.0, the one CUDA torch 2.11 pins (torch 2.13
# pins 3.7.1; tests/test_triton_versions.py compiles the kernels with both). Older releases lack APIs the
# kernels use (triton.knobs, for one). Newer ones are used too (the newest tested is NEWEST_TESTED), and
# --kernels auto checks each layer's results against PyTorch's before it uses them.
OLDEST, NEWEST_TESTED = (3, 6, 0), (3, 9, 0)


def version(text: str) -> tuple[int, int, int]:
    """'3.7.1' -> (3, 7, 1); '3.2.0+git1234', '3.10.0rc1' -> (3, 2, 0), (3, 10, 0)."""
    parts = [int(m.group()) if (m := re.match(r"\d+", p)) else 0 for p in text.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def triton_problem() -> str:
    """Why the Triton kernels cannot run with the installed Triton ('' when they can), in a few words."""
    need = f"the kernels need Triton {'.'.join(map(str, OLDEST))} or newer"
    if triton is None:
        return f"Triton is not installed; {need}"
    if version(triton.__version__) < OLDEST:
        return f"Triton {triton.__version__} found; {need}"
    return ""


def use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors always run the Triton kernels; CPU tensors only under TRITON_INTERPRET=1, read at each call
    (a test can switch a CPU model to the PyTorch path with TRITON_INTERPRET=0)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result  # torch.compile reads it once while tracing (it cannot trace the getters)
def cudnn_conv_tf32() -> bool:
    """Whether cuDNN's fp32 convolutions use TF32 now: what the Triton conv follows, and a key of the choice.

    torch >= 2.9 has per-backend settings, read here for the conv: `torch.backends.cudnn.conv.fp32_precision`
    ("tf32" or "ieee"; "none" inherits `torch.backends.cudnn.fp32_precision`, which inherits
    `torch.backends.fp32_precision`). torch resolves the inheritance when the setting is read, and its conv
    uses TF32 exactly when the result is "tf32" (so "none" all the way up means IEEE); the loop below resolves
    it on a torch whose getter does not. Reading the legacy `cudnn.allow_tf32` there raises once the conv and
    RNN settings differ. Older torch has only `allow_tf32`.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None:
        return bool(torch.backends.cudnn.allow_tf32)
    for level in (conv, torch.backends.cudnn, torch.backends):
        setting = level.fp32_precision
        if setting != "none":
            return setting == "tf32"
    return False


def write_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` through a temp file beside it, fsync, then rename over `path` (and fsync the folder):
    a crash, a full disk or a Ctrl-C at any moment leaves the old file or the new one, never a half-written file
    under the name. A failure removes the temp file and, if an OSError, names `path`."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")  # named before it exists: never orphaned
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)  # first, in one call on a str: a further Ctrl-C cannot land before it
        except FileNotFoundError:  # renamed already
            pass
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise
    with contextlib.suppress(OSError):  # the rename, on disk too (where folders can be opened)
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- PyTorch's path for kernels.* where the installed Triton cannot run the kernels -------------------------


_said = False


def say_once() -> str:
    """The reason, once per process, on stderr (from the first call that would have run Triton, or a run's first
    line, which says it itself: it gets the line, and nothing is printed)."""
    global _said
    line, first = f"kernels: {triton_problem()}: PyTorch's path runs instead", not _said
    _said = True
    return line if first else ""


def reflect_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   padding: int) -> torch.Tensor:
    """kernels.reflect_conv2d without the kernels: F.conv2d(F.pad(x, reflect), weight, bias)."""
    if use_triton(x) and (line := say_once()):
        print(line, file=sys.stderr, flush=True)
    if x.dim() == 4 and not 0 <= padding < min(x.shape[2:]):
        raise ValueError(f"reflect_conv2d: reflection padding must satisfy 0 <= padding < H, W; "
                         f"got padding={padding} for x {tuple(x.shape)}")
    return F.conv2d(F.pad(x, (padding,) * 4, mode="reflect") if padding else x, weight, bias)


def instance_norm_relu(x: torch.Tensor, *, eps: float = 1e-5, negative_slope: float = 0.0,
                       activation: bool = True) -> torch.Tensor:
    """kernels.instance_norm_relu without the kernels."""
    if use_triton(x) and (line := say_once()):
        print(line, file=sys.stderr, flush=True)
    return pytorch_norm(x, eps, negative_slope, activation)


def pytorch_norm(x: torch.Tensor, eps: float, slope: float, activation: bool) -> torch.Tensor:
    """F.instance_norm then ReLU (slope 0), LeakyReLU(slope), or nothing: the official layers' math."""
    y = F.instance_norm(x, eps=eps)
    if y.requires_grad and x.device.type == "cpu":
        # torch 2.13's CPU instance_norm backward is wrong when the incoming gradient is channels_last
        # (seen at batch 1, as a channels_last model's next conv hands it): give it a contiguous one.
        y.register_hook(torch.Tensor.contiguous)
    if not activation:
        return y
    return F.leaky_relu(y, slope) if slope else F.relu(y)


def _fix_triton_36_interpreter() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with int(array of shape (1,)), which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so every loop over a
    runtime bound fails on the CPU. Triton 3.7 squeezes the array first; do the same on 3.6."""
    if triton is None or version(triton.__version__)[:2] != (3, 6):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_fix_triton_36_interpreter()
