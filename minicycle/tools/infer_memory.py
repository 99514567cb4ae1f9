"""Device memory that `python infer.py --preprocess none` needs per megapixel, measured on a CPU.

    python -m minicycle.tools.infer_memory                                    # the four generators, ngf 64, fp32
    python -m minicycle.tools.infer_memory --netG resnet_9blocks --ngf 64 --sizes 256,512,768

For each generator (the official layers, as --kernels pytorch runs them; fp32; one S x S image for each S in
--sizes), two peaks over one no_grad forward: "tensors", infer.py's estimate (minicycle.memory.forward_bytes,
counted on the meta device), and "CPU", measured: the bytes CPU kernels allocated and had not yet freed
(torch.profiler), their scratch included (PyTorch's CPU conv_transpose2d holds two more buffers of its output's
size). Each is fitted as bytes = a + b * pixels by least squares; the table gives b per pixel and per
megapixel, the largest relative residual of the fit, and the fit at a 12-MP photo (4000 x 3000).
"""

import argparse
import datetime
import itertools

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from minicycle import memory, networks

PHOTO = 4000 * 3000  # pixels of a 12-MP photo


def cpu_peak_bytes(net: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """The peak of the bytes CPU kernels allocated and had not freed during one no_grad forward of `net`."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        net(torch.empty(shape))
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate(e.nbytes() for e in events))  # allocations count up, frees down


def fit(pixels: list[int], peaks: list[int]) -> tuple[float, float, float]:
    """bytes = a + b * pixels by least squares: (a, b, the largest residual relative to its peak)."""
    b, a = np.polyfit(pixels, peaks, 1)
    return a, b, max(abs(a + b * p - y) / y for p, y in zip(pixels, peaks))


def measure(netG: str, ngf: int, sizes: list[int]) -> dict[str, tuple[float, float, float]]:
    """The fits of the estimate ('tensors') and of the CPU measurement ('CPU') for one generator."""
    net = networks.set_fused(networks.define_G(3, 3, ngf, netG), False)  # train mode, as infer.py without --eval
    with torch.device("meta"):
        shadow = networks.set_fused(networks.define_G(3, 3, ngf, netG), False)
    shapes = [(1, 3, s, s) for s in sizes]
    pixels = [s * s for s in sizes]
    return {"tensors": fit(pixels, [memory.forward_bytes(shadow, shape) for shape in shapes]),
            "CPU": fit(pixels, [cpu_peak_bytes(net, shape) for shape in shapes])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minicycle.tools.infer_memory", description=__doc__.split("\n")[0])
    p.add_argument("--netG", default="resnet_9blocks,resnet_6blocks,unet_256,unet_128")
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--sizes", default="256,512,768", help="square image sides, at least two")
    opt = p.parse_args(argv)
    sizes, nets = [int(s) for s in opt.sizes.split(",")], opt.netG.split(",")
    if set(nets) - set(networks.GENERATORS) or len(sizes) < 2 or any(
            s % networks.input_multiple(n) for n in nets for s in sizes):
        p.error(f"--netG: some of {', '.join(networks.GENERATORS)}; --sizes: two or more multiples of 256 for "
                f"unet_256, of 128 for unet_128, of 4 for the ResNets")
    print(f"{datetime.date.today()}, torch {torch.__version__}, fp32, batch 1, ngf {opt.ngf}, sides {opt.sizes}\n")
    print("| generator | peak of | bytes per pixel | GiB per megapixel | 12-MP photo | largest residual of the fit |")
    print("|---|---|---|---|---|---|")
    for netG in nets:
        for what, (a, b, residual) in measure(netG, opt.ngf, sizes).items():
            print(f"| {netG} | {what} | {b:.1f} | {b * 1e6 / 2**30:.3f} | {(a + b * PHOTO) / 2**30:.2f} GiB "
                  f"| {residual:.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
