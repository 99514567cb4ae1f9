"""Training pinned bit for bit: four CPU iterations of train.py from a fixed seed, fp32, against values
recorded once. Any change that moves one bit of training (a loss, a weight, an Adam moment, a pooled
image) fails here; such a change must be deliberate, documented, and re-recorded:

    python tests/test_golden.py      # prints the values to paste below

The digests are of the exact bytes, so they hold on the CPU kind they were recorded on (oneDNN picks
kernels by instruction set); on another, the test says so and skips.
"""

import hashlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from minicycle import datasets  # noqa: E402
from minicycle.checkpoint import load_file  # noqa: E402

ARGS = ["--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks", "--load_size", "32", "--crop_size", "32",
        "--num_threads", "0", "--pool_size", "2", "--print_freq", "1", "--seed", "3", "--max_steps", "4"]

RECORDED_ON = "AVX2"
LOSSES = [
    # D_A, G_A, cycle_A, idt_A, D_B, G_B, cycle_B, idt_B per iteration, as float.hex of the fp32 values
    ["0x1.45ccea0000000p-1", "0x1.5c8c180000000p+0", "0x1.32e39e0000000p+2", "0x1.6f2db00000000p+1",
     "0x1.5af34a0000000p-2", "0x1.29f0540000000p-1", "0x1.71090c0000000p+2", "0x1.336e3e0000000p+1"],
    ["0x1.38d0dc0000000p-1", "0x1.2698980000000p+0", "0x1.436da00000000p+2", "0x1.92ef920000000p+1",
     "0x1.38e4d80000000p-2", "0x1.ceb5840000000p-1", "0x1.928ce80000000p+2", "0x1.4196200000000p+1"],
    ["0x1.24bfa80000000p-1", "0x1.5afd000000000p+0", "0x1.3df1380000000p+2", "0x1.7a66620000000p+1",
     "0x1.e5d7ee0000000p-2", "0x1.6449fc0000000p-1", "0x1.799a560000000p+2", "0x1.3ec2a60000000p+1"],
    ["0x1.f08a060000000p-2", "0x1.1f18440000000p+0", "0x1.28c7960000000p+2", "0x1.832c840000000p+1",
     "0x1.386b200000000p-2", "0x1.c512be0000000p-2", "0x1.81cfee0000000p+2", "0x1.2a7c9c0000000p+1"],
]
DIGESTS = {
    "net G_A": "ec391ae873d2b20fea27a4e35f3dcd369b72fe169166035e9bf1afd29bc0ad38",
    "net G_B": "fe97117dedf31a9fec00705704434dbe4e1d46e13cc85c6b4e9ee507881a0125",
    "net D_A": "f50486e7e18aab8aa2a98b37d0459321c800f00bee0d196f27477882d2eef962",
    "net D_B": "43762d05780fdfeab5516d294e5158635629dc630a1b6303d22082e65332c302",
    "optimizer_G": "3edc3103592c259922736e1256564858e86d633237605f149987dc0bdc848def",
    "optimizer_D": "e9826ed717d7d32a74702ad260c6387a726d60b5956d26fff61d84db11ef40a8",
    "schedulers": "14f2631e6f048c1bfcfc10c48335c438322e0e4984fbdc06784e5a25a3bfb132",
    "fake_A_pool": "3ecb68943e6a1a0bdf87adfb392f5c702f2f9c79c8ee3d6d76f41b9ca2d6eadf",
    "fake_B_pool": "1eda52b2c18334ae9dca9a77ffea8da9f2071b7fca09129dd0a3a75e23a4fb07",
    "counters": "7de199fd3b9585bac3abfa581b1be77104f4cf27067428ead9655900c111d58f",
}


def digest(obj) -> str:
    """sha256 of every tensor's dtype, shape and bytes, and every plain value, in a fixed order."""
    h = hashlib.sha256()

    def walk(o, path: str) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().contiguous().cpu()
            h.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{path}.{k}")
        elif isinstance(o, list | tuple):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]")
        else:
            h.update(f"{path}={o!r}".encode())

    walk(obj, "")
    return h.hexdigest()


def train_and_read(dataroot: Path, ckpt: Path) -> tuple[list[list[str]], dict[str, str]]:
    assert train.main(ARGS + ["--dataroot", str(dataroot), "--checkpoints_dir", str(ckpt), "--name", "g"]) == 0
    state = load_file(ckpt / "g" / "latest_state.pth")
    losses = [[float(v).hex() for v in row.values()] for _, row in state["run"]["history"]]
    model = state["model"]
    digests = {f"net {k}": digest(v) for k, v in model["nets"].items()}
    digests |= {k: digest(model[k]) for k in ("optimizer_G", "optimizer_D", "schedulers", "fake_A_pool",
                                              "fake_B_pool")}
    digests["counters"] = digest({k: state["run"][k] for k in ("epoch", "epoch_keys", "steps", "images")})
    return losses, digests


def test_four_iterations_are_what_they_were(tmp_path, torch_path):
    if torch.backends.cpu.get_cpu_capability() != RECORDED_ON:
        pytest.skip(f"golden values recorded on a {RECORDED_ON} CPU; this one is "
                    f"{torch.backends.cpu.get_cpu_capability()} (re-record: python tests/test_golden.py)")
    dataroot = datasets.ensure_synthetic(tmp_path / "data" / "synthetic")
    losses, digests = train_and_read(dataroot, tmp_path / "ckpt")
    assert losses == LOSSES
    assert digests == DIGESTS


if __name__ == "__main__":
    import os
    import tempfile

    os.environ["TRITON_INTERPRET"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        losses, digests = train_and_read(datasets.ensure_synthetic(Path(tmp) / "data"), Path(tmp) / "ckpt")
    print(f'RECORDED_ON = "{torch.backends.cpu.get_cpu_capability()}"')
    print("LOSSES =", losses)
    print("DIGESTS =", digests)
