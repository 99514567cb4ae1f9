"""Command-line helpers shared by train.py, infer.py and the tools."""

import argparse

import torch

from kernels.choice import MODES
from minicycle.data import DataError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written out in `argv` (`--flag value` or `--flag=value`),
    as opposed to those left at their defaults."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {action.dest for action in parser._actions if given & set(action.option_strings)}


def add_device_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--device, --channels_last / --no_channels_last and --kernels, as train.py and infer.py take them."""
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--channels_last", action="store_true", default=None,
                   help=f"{what} and images in torch.channels_last, the layout the Triton convs are shaped for "
                        "(default: on with CUDA, off on a CPU)")
    p.add_argument("--no_channels_last", dest="channels_last", action="store_false", help=f"{what} and images in NCHW")
    p.add_argument("--kernels", default="auto", choices=MODES,
                   help="auto: on CUDA, per layer shape the faster of Triton and PyTorch/cuDNN, checked and timed at "
                        "first use (on a CPU, as the ops decide); triton: always our kernels; pytorch: official layers")


def pick_device(flag: str) -> torch.device:
    """--device: auto is CUDA when PyTorch sees a GPU, else the CPU; cuda without one is a DataError."""
    if flag == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda, but PyTorch sees no CUDA GPU (use --device cpu)")
    return torch.device(flag if flag != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
