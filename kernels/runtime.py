"""Which path an op takes: the Triton kernels, or plain PyTorch."""

import os

import torch


def use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors always run the Triton kernels; CPU tensors only under TRITON_INTERPRET=1.

    The environment is read at call time so that a test can switch a CPU model to the
    PyTorch path (TRITON_INTERPRET=0) without re-importing anything.
    """
    if x.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
