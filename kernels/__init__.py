"""minicycle's fused ops for the CycleGAN generator.

    instance_norm_relu(x, *, eps=1e-5, negative_slope=0.0, activation=True) -> Tensor
        == F.instance_norm(x, eps=eps) then ReLU (slope 0), LeakyReLU(slope), or nothing.
        x: (N, C, H, W), fp32 / fp16 / bf16. Differentiable.
    reflect_conv2d(x, weight, bias=None, *, padding) -> Tensor
        == F.conv2d(F.pad(x, (padding,) * 4, mode="reflect"), weight, bias); stride 1, groups 1.
        Differentiable w.r.t. x, weight and bias; padding >= H or W raises ValueError.

CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) run the Triton kernels, registered as
torch.library custom ops so torch.compile keeps them in its graph; other CPU tensors run plain
PyTorch. Each module explains its kernels' math. With a Triton older than the kernels need (or
none), both names are PyTorch's path (kernels/runtime.py), and the first call that would have run
Triton says so in one line. The generator does not call these directly by default:
kernels/choice.py picks, per layer shape on CUDA, the faster of them and PyTorch's path.

Reading order: instance_norm.py; reflect_conv.py (the forward: math, kernel, host code, custom op),
conv_dgrad.py, conv_wgrad.py, conv_backward.py (their op), conv_tiles.py (the tiles and their pruning);
device.py (what a GPU offers them), choice.py (Triton or PyTorch, measured), runtime.py; tools/.
"""

from kernels.runtime import triton_problem

if triton_problem():  # the kernel modules are not even imported: they use the newer Triton's APIs at import
    from kernels.runtime import instance_norm_relu, reflect_conv2d
else:
    import kernels.conv_backward  # noqa: F401  (registers the conv's backward op, which its autograd calls)
    from kernels.instance_norm import instance_norm_relu
    from kernels.reflect_conv import reflect_conv2d

__all__ = ["instance_norm_relu", "reflect_conv2d"]
