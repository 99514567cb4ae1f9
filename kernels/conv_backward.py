"""minicycle::reflect_conv2d_backward, which the forward op's autograd calls (kernels/reflect_conv.py):
the input gradient (kernels/conv_dgrad.py), the weight and bias gradients (kernels/conv_wgrad.py)."""

import torch

from kernels import conv_dgrad, conv_wgrad
from kernels.reflect_conv import _empty_like_layout


@torch.library.custom_op("minicycle::reflect_conv2d_backward", mutates_args=())
def _reflect_conv2d_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int,
    need_x: bool, need_w: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db). Only the needed gradients are computed; the others come back as empty
    (0-element) placeholders, since a custom op can't return None. dbias needs only dy, so
    the bias itself is never an input (a conv without bias passes need_b=False)."""
    dx = conv_dgrad._conv_dgrad(dy, weight, x, padding) if need_x else x.new_empty(0)
    dw = conv_wgrad._conv_wgrad(dy, weight, x, padding) if need_w else x.new_empty(0)
    db = conv_wgrad._conv_dbias(dy, x.dtype) if need_b else x.new_empty(0)
    return dx, dw, db


@_reflect_conv2d_backward.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int, need_x: bool, need_w: bool,
      need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx = _empty_like_layout(x, x.shape) if need_x else x.new_empty(0)
    dw = torch.empty_like(weight) if need_w else x.new_empty(0)  # as _conv_wgrad: w's memory order
    db = x.new_empty(weight.shape[0]) if need_b else x.new_empty(0)
    return dx, dw, db
