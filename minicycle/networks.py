"""CycleGAN networks (Zhu et al. 2017, appendix 7.2), layer for layer as the official
pytorch-CycleGAN-and-pix2pix `models/networks.py`, so state_dict keys and parameter counts match
and its pretrained `.pth` files load strictly.

The layer lists are plain `nn` modules. `FusedSequential.forward` walks them and sends
ReflectionPad2d+Conv2d pairs to a fused reflection-padded conv and InstanceNorm2d(+ReLU/LeakyReLU)
to a fused norm: `kernels.choice.measured_*` (--kernels auto: on CUDA, Triton or PyTorch per layer
shape, measured at first use) or `kernels.reflect_conv2d` and `kernels.instance_norm_relu` (--kernels
triton). With `set_fused(net, False)`
(--kernels pytorch) the same modules run one by one, which is exactly the official eager model (used
as the reference in tests and benchmarks).
"""

import functools

import torch
import torch.nn as nn
from torch.nn import init

import kernels
from kernels import choice

GENERATORS = ("resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128")
DISCRIMINATORS = ("basic", "n_layers", "pixel")
NORMS = ("instance", "batch", "none")
INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")


class FusedSequential(nn.Sequential):
    """nn.Sequential whose forward fuses pad+conv and norm+activation into the Triton ops, or (auto)
    into the path kernels.choice measured faster for each layer's inputs."""

    fused = True
    auto = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        conv, norm = ((choice.measured_reflect_conv2d, choice.measured_instance_norm_relu) if self.auto
                      else (kernels.reflect_conv2d, kernels.instance_norm_relu))
        layers = list(self)
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, nn.ReflectionPad2d) and _is_plain_conv(nxt):
                pad = layer.padding  # (left, right, top, bottom), all equal here
                x = conv(x, nxt.weight, nxt.bias, padding=pad[0])
                i += 2
            elif isinstance(layer, nn.InstanceNorm2d) and not layer.affine and not layer.track_running_stats:
                if isinstance(nxt, (nn.ReLU, nn.LeakyReLU)):
                    slope = nxt.negative_slope if isinstance(nxt, nn.LeakyReLU) else 0.0
                    x = norm(x, eps=layer.eps, negative_slope=slope)
                    i += 2
                else:
                    x = norm(x, eps=layer.eps, activation=False)
                    i += 1
            else:
                x = layer(x)
                i += 1
        return x


def _is_plain_conv(m: nn.Module | None) -> bool:
    return type(m) is nn.Conv2d and (m.stride, m.padding, m.dilation, m.groups) == ((1, 1), (0, 0), (1, 1), 1)


def set_fused(net: nn.Module, fused: bool) -> nn.Module:
    """Switch every FusedSequential in `net` between the fused kernels and plain nn layers."""
    for m in net.modules():
        if isinstance(m, FusedSequential):
            m.fused = fused
    return net


def set_kernels(net: nn.Module, mode: str) -> nn.Module:
    """--kernels: 'auto' (the measured choice per layer shape on CUDA; the ops' own rule on a CPU),
    'triton' (the Triton ops always), 'pytorch' (the official layers: set_fused(net, False))."""
    if mode not in choice.MODES:
        raise ValueError(f"--kernels {mode!r}: choose one of {', '.join(choice.MODES)}")
    for m in net.modules():
        if isinstance(m, FusedSequential):
            m.fused, m.auto = mode != "pytorch", mode == "auto"
    return net


def get_norm_layer(norm: str):
    """instance: affine-free, no running stats (no state_dict entries); batch: affine + running stats."""
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm == "none":
        return lambda num_features: nn.Identity()
    raise ValueError(f"--norm {norm!r}: choose one of {', '.join(NORMS)}")


def _uses_bias(norm_layer) -> bool:
    # Official rule: convs followed by a norm carry a bias only under InstanceNorm (BatchNorm has its own).
    return getattr(norm_layer, "func", norm_layer) is nn.InstanceNorm2d  # a partial's class, or the class


class ResnetBlock(nn.Module):
    """x + [pad, conv3x3, norm, relu, (dropout), pad, conv3x3, norm](x); no ReLU after the add."""

    def __init__(self, dim: int, norm_layer, use_dropout: bool, use_bias: bool):
        super().__init__()
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=use_bias), norm_layer(dim), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=use_bias), norm_layer(dim)]
        self.conv_block = FusedSequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """c7s1-64, d128, d256, R256 x n_blocks, u128, u64, c7s1-3, tanh (paper appendix 7.2)."""

    def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, norm: str = "instance",
                 use_dropout: bool = False, n_blocks: int = 9):
        super().__init__()
        norm_layer = get_norm_layer(norm)
        use_bias = _uses_bias(norm_layer)
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, bias=use_bias), norm_layer(ngf), nn.ReLU(True)]
        for i in range(2):  # downsample
            mult = 2**i
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias),
                       norm_layer(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4, norm_layer, use_dropout, use_bias) for _ in range(n_blocks)]
        for i in range(2):  # upsample
            mult = 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
                                          output_padding=1, bias=use_bias),
                       norm_layer(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = FusedSequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetSkipConnectionBlock(nn.Module):
    """down -> submodule -> up, with the input concatenated to the output (except outermost)."""

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None, submodule=None,
                 outermost=False, innermost=False, norm_layer=nn.BatchNorm2d, use_dropout=False):
        super().__init__()
        self.outermost = outermost
        use_bias = _uses_bias(norm_layer)
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=use_bias)
        downrelu, uprelu = nn.LeakyReLU(0.2, True), nn.ReLU(True)
        downnorm, upnorm = norm_layer(inner_nc), norm_layer(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            layers = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            layers = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            layers = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = FusedSequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """U-Net with num_downs halvings (unet_256: 8, unet_128: 7), built from the innermost block out."""

    def __init__(self, input_nc: int, output_nc: int, num_downs: int, ngf: int = 64,
                 norm: str = "batch", use_dropout: bool = False):
        super().__init__()
        norm_layer = get_norm_layer(norm)
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, innermost=True, norm_layer=norm_layer)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, norm_layer=norm_layer,
                                            use_dropout=use_dropout)
        block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, norm_layer=norm_layer)
        self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=block,
                                             outermost=True, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: C64 (no norm), C128, C256, C512 (stride 1), then a 1-channel conv; no sigmoid.
    With n_layers=3 each output sees a 70x70 patch."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, norm: str = "instance"):
        super().__init__()
        norm_layer = get_norm_layer(norm)
        use_bias = _uses_bias(norm_layer)
        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=use_bias),
                       norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = FusedSequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """1x1 PatchGAN (pixelGAN): classifies each pixel independently."""

    def __init__(self, input_nc: int, ndf: int = 64, norm: str = "instance"):
        super().__init__()
        norm_layer = get_norm_layer(norm)
        use_bias = _uses_bias(norm_layer)
        self.net = FusedSequential(
            nn.Conv2d(input_nc, ndf, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 1, bias=use_bias), norm_layer(ndf * 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, 1, bias=use_bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def init_weights(net: nn.Module, init_type: str = "normal", init_gain: float = 0.02) -> nn.Module:
    """Conv/Linear weights ~ init_type(gain), biases 0; BatchNorm weight ~ N(1, gain), bias 0."""

    def init_fn(m: nn.Module) -> None:
        name = m.__class__.__name__
        if hasattr(m, "weight") and ("Conv" in name or "Linear" in name):
            if init_type == "normal":
                init.normal_(m.weight, 0.0, init_gain)
            elif init_type == "xavier":
                init.xavier_normal_(m.weight, gain=init_gain)
            elif init_type == "kaiming":
                init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                init.orthogonal_(m.weight, gain=init_gain)
            else:
                raise ValueError(f"--init_type {init_type!r}: choose one of {', '.join(INIT_TYPES)}")
            if m.bias is not None:
                init.constant_(m.bias, 0.0)
        elif "BatchNorm2d" in name:
            init.normal_(m.weight, 1.0, init_gain)
            init.constant_(m.bias, 0.0)

    net.apply(init_fn)
    return net


def define_G(input_nc: int, output_nc: int, ngf: int, netG: str, norm: str = "instance",
             use_dropout: bool = False) -> nn.Module:
    if netG in ("resnet_9blocks", "resnet_6blocks"):
        return ResnetGenerator(input_nc, output_nc, ngf, norm, use_dropout, 9 if netG == "resnet_9blocks" else 6)
    if netG in ("unet_128", "unet_256"):  # 7 or 8 halvings: 128 or 256 pixels down to 1
        return UnetGenerator(input_nc, output_nc, 7 if netG == "unet_128" else 8, ngf, norm, use_dropout)
    raise ValueError(f"--netG {netG!r}: choose one of {', '.join(GENERATORS)}")


def define_D(input_nc: int, ndf: int, netD: str, n_layers_D: int = 3, norm: str = "instance") -> nn.Module:
    if netD in ("basic", "n_layers"):  # basic: the 70x70 PatchGAN, 3 layers
        return NLayerDiscriminator(input_nc, ndf, 3 if netD == "basic" else n_layers_D, norm)
    if netD == "pixel":
        return PixelDiscriminator(input_nc, ndf, norm)
    raise ValueError(f"--netD {netD!r}: choose one of {', '.join(DISCRIMINATORS)}")


def min_input_size(netG: str, netD: str, n_layers_D: int = 3) -> int:
    """Smallest square image both nets accept. PatchGAN: n stride-2 4x4 convs halve the size, then a
    stride-1 conv (size - 1, normalised: needs 2+ pixels) and the output conv (size - 2) must stay >= 1."""
    g = {"unet_128": 128, "unet_256": 256}.get(netG, 8)  # ResNet: reflect pad 1 at 1/4 scale needs 2+ pixels
    n = {"basic": 3, "n_layers": n_layers_D}.get(netD, 0)
    d = 3 * 2**n if n else 2
    return max(g, d)


def input_multiple(netG: str) -> int:
    """Height and width a generator's input must be divisible by (2 downsamplings, or the U-Net depth)."""
    return {"unet_128": 128, "unet_256": 256}.get(netG, 4)
