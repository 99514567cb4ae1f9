"""minicycle's fused ops. CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) run the
Triton kernels; other CPU tensors run plain PyTorch. See each module for the math."""

from kernels.instance_norm import instance_norm_relu
from kernels.reflect_conv import reflect_conv2d

__all__ = ["instance_norm_relu", "reflect_conv2d"]
