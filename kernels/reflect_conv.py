"""Reflection-padded stride-1 convolution. Placeholder PyTorch body."""

import torch
import torch.nn.functional as F


def reflect_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, padding: int
) -> torch.Tensor:
    """F.conv2d(F.pad(x, (padding,) * 4, mode="reflect"), weight, bias)."""
    if padding:
        x = F.pad(x, (padding,) * 4, mode="reflect")
    return F.conv2d(x, weight, bias)
