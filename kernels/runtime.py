"""Which path an op takes: the Triton kernels, or plain PyTorch; and one interpreter fix."""

import os

import torch
import triton


def use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors always run the Triton kernels; CPU tensors only under TRITON_INTERPRET=1.

    The environment is read at call time so that a test can switch a CPU model to the
    PyTorch path (TRITON_INTERPRET=0) without re-importing anything.
    """
    if x.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fix_triton_36_interpreter() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with int(array of shape (1,)), which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so every loop over a
    runtime bound fails on the CPU. Triton 3.7 squeezes the array first; do the same on 3.6."""
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_fix_triton_36_interpreter()
