"""Fused InstanceNorm (affine=False) + ReLU / LeakyReLU. Placeholder PyTorch body."""

import torch
import torch.nn.functional as F


def instance_norm_relu(
    x: torch.Tensor, *, eps: float = 1e-5, negative_slope: float = 0.0, activation: bool = True
) -> torch.Tensor:
    """act(instance_norm(x)) for x of shape (N, C, H, W)."""
    y = F.instance_norm(x, eps=eps)
    if activation:
        y = F.leaky_relu(y, negative_slope) if negative_slope else F.relu(y)
    return y
