"""infer.py's device memory: the estimate (memory.forward_bytes) against a CPU measurement, and the check before
each batch, run on a CPU with a CUDA device's memory mocked: an image that cannot fit is refused in one line,
a batch that cannot fit is split into single images, an out-of-memory becomes one line naming the image."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from minicycle import memory, networks
from minicycle.tools import infer_memory

GiB = 2**30
# Bytes per pixel of the estimate, fp32, ngf 64, as README's Translate section states them.
README_BYTES_PER_PIXEL = {"resnet_9blocks": 526.9, "resnet_6blocks": 526.9, "unet_256": 268.0, "unet_128": 268.0}


def shadow(netG: str, ngf: int = 64) -> torch.nn.Module:
    with torch.device("meta"):
        return networks.set_fused(networks.define_G(3, 3, ngf, netG), False)


def test_forward_bytes_counts_the_tensors_alive_at_once():
    conv_in_place = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(8, 2, 1))
    # the input, the first conv's output (the ReLU writes into it) and the last output: 3 + 8 + 2 channels of 4 bytes
    assert memory.forward_bytes(conv_in_place, (1, 3, 10, 10)) == (3 + 8 + 2) * 100 * 4
    conv_relu = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    # a ReLU out of place holds its input and output at once: 3 + 8 + 8, then the first conv's output is freed
    assert memory.forward_bytes(conv_relu, (2, 3, 10, 10)) == 2 * (3 + 8 + 8) * 100 * 4


@pytest.mark.parametrize("netG", networks.GENERATORS)
def test_estimate_is_linear_in_pixels_and_images_as_readme_states(netG):
    net = shadow(netG)
    sides = [256, 512, 768]
    a, b, residual = infer_memory.fit([s * s for s in sides], [memory.forward_bytes(net, (1, 3, s, s)) for s in sides])
    assert residual < 0.005 and b == pytest.approx(README_BYTES_PER_PIXEL[netG], abs=0.1)
    assert memory.forward_bytes(net, (3, 3, 256, 512)) == 3 * memory.forward_bytes(net, (1, 3, 256, 512))


@pytest.mark.parametrize("netG, side", [("resnet_6blocks", 64), ("unet_128", 128)])
def test_estimate_against_a_cpu_measurement(netG, side, torch_path):
    """The meta-device count is the count of the same forward on real CPU tensors, and below what the CPU
    allocates in all (the tensors, and its kernels' scratch), within a small factor."""
    torch.manual_seed(0)
    net = networks.set_fused(networks.define_G(3, 3, 8, netG), False)
    shape = (1, 3, side, side)
    estimate = memory.forward_bytes(shadow(netG, 8), shape)
    assert memory.forward_bytes(net, shape) == estimate
    assert estimate <= infer_memory.cpu_peak_bytes(net, shape) <= 3 * estimate


def test_available_bytes_is_free_memory_and_what_the_allocator_holds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * GiB, 24 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: GiB)
    assert memory.available_bytes(torch.device("cuda")) == 6 * GiB
    assert memory.available_bytes(torch.device("cpu")) is None


# ---- the check, through infer.main ----

def photos(tmp_path: Path, n: int, size: tuple[int, int] = (40, 24)) -> tuple[Path, Path]:
    """A tiny generator's checkpoint and a folder of n random images of one size (width, height)."""
    torch.manual_seed(0)
    g = networks.define_G(3, 3, 4, "resnet_6blocks")
    networks.init_weights(g, "normal", 0.02)
    torch.save(g.state_dict(), tmp_path / "g.pth")
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return tmp_path / "g.pth", folder


def on_a_gpu_with(monkeypatch, free: int) -> None:
    """The run stays on the CPU, but the check sees a CUDA device with `free` bytes free and nothing held."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    available = memory.available_bytes
    monkeypatch.setattr(memory, "available_bytes", lambda device: available(torch.device("cuda")))


def needs(ckpt: Path, images: int, side_w: int = 40, side_h: int = 24) -> int:
    gen = infer.build_generator(infer.build_parser().parse_args(["--checkpoint", str(ckpt)]), ckpt, torch.device("cpu"))
    return memory.batch_bytes(gen.net, gen.shadow, (images, 3, side_h, side_w))


def translate(ckpt: Path, folder: Path, out: Path, *flags: str) -> int:
    return infer.main(["--checkpoint", str(ckpt), "--input", str(folder), "--output", str(out),
                       "--preprocess", "none", *flags])


def outputs(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("infer.py: error: ")]
    assert len(lines) == 1 and err.rstrip("\n").endswith(lines[0]), err
    return lines[0]


def test_an_image_that_cannot_fit_is_refused_in_one_line(tmp_path, monkeypatch, capsys, torch_path):
    ckpt, folder = photos(tmp_path, 1)
    need = needs(ckpt, 1)
    on_a_gpu_with(monkeypatch, free=need - 1)
    assert translate(ckpt, folder, tmp_path / "out") == 1
    line = one_error_line(capsys.readouterr().err)
    for needle in (str(folder / "p0.png"), "(40x24)", f"needs about {memory.gib(need)} of GPU memory",
                   f"{memory.gib(need - 1)} available", "--preprocess resize", "--device cpu"):
        assert needle in line, line
    assert not list((tmp_path / "out").iterdir())  # nothing written


def test_a_batch_that_cannot_fit_is_translated_one_image_at_a_time(tmp_path, monkeypatch, capsys, torch_path):
    ckpt, folder = photos(tmp_path, 6)
    assert translate(ckpt, folder, tmp_path / "one", "--batch_size", "1") == 0
    one, three = needs(ckpt, 1), needs(ckpt, 3)
    assert one < three
    on_a_gpu_with(monkeypatch, free=(one + three) // 2)
    capsys.readouterr()
    assert translate(ckpt, folder, tmp_path / "split", "--batch_size", "3") == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "one image at a time" in line]
    assert notes == [f"infer.py: a batch of 3 images of 40x24 needs about {memory.gib(three)} of GPU memory and "
                     f"the GPU has {memory.gib((one + three) // 2)} available; translating such batches one image at "
                     f"a time"]
    split, single = outputs(tmp_path / "split"), outputs(tmp_path / "one")
    assert list(split) == [f"p{i}.png" for i in range(6)]
    assert all(np.array_equal(split[name], single[name]) for name in single)


class OutOfMemoryAbove(torch.nn.Module):
    """The generator, but a batch of more than `most` images raises the CUDA out-of-memory error."""

    def __init__(self, net: torch.nn.Module, most: int):
        super().__init__()
        self.net, self.most = net, most

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.most:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return self.net(x)


def test_an_out_of_memory_splits_the_batch_then_is_one_line(tmp_path, monkeypatch, capsys, torch_path):
    ckpt, folder = photos(tmp_path, 3)
    assert translate(ckpt, folder, tmp_path / "one", "--batch_size", "1") == 0
    set_kernels = networks.set_kernels
    monkeypatch.setattr(networks, "set_kernels", lambda net, mode: OutOfMemoryAbove(set_kernels(net, mode), 1))
    capsys.readouterr()
    assert translate(ckpt, folder, tmp_path / "split", "--batch_size", "3") == 0
    note = "infer.py: a batch of 3 images of 40x24 ran out of GPU memory; translating such batches one image at a time"
    assert note in capsys.readouterr().out.splitlines()
    split, single = outputs(tmp_path / "split"), outputs(tmp_path / "one")
    assert len(split) == 3 and all(np.array_equal(split[name], single[name]) for name in single)

    monkeypatch.setattr(networks, "set_kernels", lambda net, mode: OutOfMemoryAbove(set_kernels(net, mode), 0))
    assert translate(ckpt, folder, tmp_path / "none", "--batch_size", "3") == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{folder / 'p0.png'} (40x24): translating it ran out of GPU memory; use --preprocess resize" in line
    assert not list((tmp_path / "none").iterdir())


@pytest.mark.slow
def test_the_tool_prints_the_fits(capsys, torch_path):
    sides = [128, 256]
    assert infer_memory.main(["--netG", "resnet_6blocks,unet_128", "--ngf", "4", "--sizes", "128,256"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet")]
    assert [row[1] for row in rows] == ["tensors", "CPU"]
    estimate = [memory.forward_bytes(shadow("resnet_6blocks", 4), (1, 3, s, s)) for s in sides]
    assert float(rows[0][2]) == pytest.approx((estimate[1] - estimate[0]) / (sides[1] ** 2 - sides[0] ** 2), abs=0.1)
    with pytest.raises(SystemExit):
        infer_memory.main(["--netG", "unet_256", "--sizes", "128,256"])
