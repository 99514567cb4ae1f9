"""Translate images with a trained generator (ours or an official pretrained .pth).

    python infer.py --dataroot ./datasets/horse2zebra --name horse2zebra --direction AtoB
    python infer.py --checkpoint horse2zebra.pth --input photos/ --output zebras/ --preprocess none
    python infer.py                     # the built-in dataset's run: prints the error against the truth

Like the official test.py, results go to results/NAME/test_<epoch>/ with an index.html. The generator's
architecture is read from the checkpoint's keys unless --netG/--ngf/--norm are given.
"""

import argparse
import functools
import itertools
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels import choice
from minicycle import cli, datasets, fid, networks
from minicycle.checkpoint import CheckpointError, describe_generator, load_file, load_into
from minicycle.data import DataError, ImageFolder, image_to_tensor, load_image, tensor_to_image
from minicycle.inception import WeightsError, WeightsMissing, resolve_weights
from minicycle.report import results_page, save_image_atomic


@dataclass
class Generator:
    """A generator loaded for translation, and what feeding it needs."""

    net: torch.nn.Module
    input_nc: int  # channels of the images it reads
    multiple: int  # input sides are padded up to a multiple of this
    shadow: torch.nn.Module  # the same layers on the meta device, official path: what a batch needs (batch_bytes)


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(prog="infer.py", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--dataroot", help="folder with testA/ (AtoB) or testB/ (BtoA); default: the built-in dataset")
    a("--name", default=None, help="run name (default: experiment_name, or synthetic for the built-in dataset)")
    a("--checkpoints_dir", default="./checkpoints")
    a("--results_dir", default="./results/")
    a("--direction", default="AtoB", choices=("AtoB", "BtoA"), help="AtoB uses G_A, BtoA uses G_B")
    a("--epoch", default="latest", help="which <epoch>_net_G_*.pth to load")
    a("--phase", default="test", help="read <phase>A or <phase>B under --dataroot")
    a("--checkpoint", help="any generator state_dict file, e.g. an official pretrained .pth")
    a("--input", help="one image or a folder of images, instead of --dataroot")
    a("--output", help="write each input's translation alone to OUTPUT/<stem>.png")
    a("--fid", action="store_true", help="FID and KID of the translations against the target domain's real "
      "images (DIR/testB for AtoB, testA for BtoA; needs --dataroot); translates the whole test set by default")
    a("--inception", help="with --fid: the FID Inception weights file (default as in python -m minicycle.fid)")
    a("--netG", choices=networks.GENERATORS, help="default: read from the checkpoint")
    a("--ngf", type=int, help="default: read from the checkpoint")
    a("--norm", choices=networks.NORMS, help="default: read from the checkpoint")
    a("--input_nc", type=int, help="default: read from the checkpoint")
    a("--output_nc", type=int, help="default: read from the checkpoint")
    a("--no_dropout", action="store_true", help="accepted for compatibility; dropout is read from the checkpoint")
    a("--eval", action="store_true", help="eval mode (BatchNorm running stats, no dropout), as the official --eval")
    a("--preprocess", default="resize", choices=("resize", "none"),
      help="resize: to load_size x load_size (official test.py); none: keep each image's own size")
    a("--load_size", type=int, default=None, help="with --preprocess resize (default 256; 32 for the built-in set)")
    a("--num_test", type=int, default=None, help="translate at most this many images (default 50 with --dataroot)")
    a("--batch_size", type=int, default=1)
    a("--device", default="auto", choices=("auto", "cpu", "cuda"))
    a("--channels_last", action="store_true", default=None,
      help="generator and images in torch.channels_last (default: on with CUDA, off on a CPU)")
    a("--no_channels_last", dest="channels_last", action="store_false", help="generator and images in NCHW")
    a("--kernels", default="auto", choices=choice.MODES,
      help="auto: on CUDA, per layer shape the faster of Triton and PyTorch/cuDNN, measured at first use; "
           "triton: our Triton kernels always; pytorch: the official layers")
    return p


def build_generator(opt: argparse.Namespace, path: Path, device: torch.device) -> Generator:
    """Read the architecture from the file's keys (explicit flags win), build it, load it strictly."""
    state = load_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    info = describe_generator(state) if isinstance(state, dict) else {}
    netG = opt.netG or info.get("netG")
    if netG not in networks.GENERATORS:
        raise CheckpointError(f"{path}: cannot tell the generator type from its keys; pass --netG")
    spec = dict(netG=netG, ngf=opt.ngf or info.get("ngf", 64), norm=opt.norm or info.get("norm", "instance"),
                input_nc=opt.input_nc or info.get("input_nc") or 3,
                output_nc=opt.output_nc or info.get("output_nc") or 3,
                use_dropout=bool(info.get("dropout", False)))
    args = (spec["input_nc"], spec["output_nc"], spec["ngf"], netG, spec["norm"], spec["use_dropout"])
    net = networks.define_G(*args)
    flags = f"--netG {netG} --ngf {spec['ngf']} --norm {spec['norm']}"
    load_into(net, path, expected_flags=flags)
    with torch.device("meta"):
        shadow = networks.set_fused(networks.define_G(*args), False).train(not opt.eval)
    return Generator(net=net.to(device).train(not opt.eval), input_nc=spec["input_nc"],
                     multiple=networks.input_multiple(netG), shadow=shadow)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Pad H and W up to a multiple of `multiple` (reflect where possible) so any size can be translated."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


# Device memory. A batch needs the peak of its tensors (forward_bytes: per pixel of the padded batch, a constant
# of the generator; README gives it), the weights, and MARGIN: 10% of the tensors and 1 GiB for what no tensor
# shows (cuDNN's handle and workspaces, the timing buffers of Triton's autotuner and of --kernels auto, the
# caching allocator's rounding). The margin is an allowance, not measured on a GPU.
MARGIN = (0.10, 2**30)


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storage alive at once while it is on, and their peak: a storage counts from the op
    that makes it until it is freed (views and in-place results share their input's)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # id of each storage made under it and still alive -> its bytes
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(s := t.untyped_storage()) not in self.live:
                self.live[id(s)] = s.nbytes()
                self.now += s.nbytes()
                weakref.finalize(s, self._free, id(s))  # torch keeps this object as long as the storage
        self.peak = max(self.peak, self.now)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)


@functools.cache
def forward_bytes(net: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Peak bytes of the tensors one no_grad forward of `net` holds at once on an input of `shape`, the input and
    output included, the weights not. On the meta device (Generator.shadow) it takes milliseconds at any size:
    meta tensors have sizes, but no memory and no arithmetic."""
    with torch.no_grad(), LiveBytes() as live:
        net(torch.empty(shape, device=next(net.parameters()).device))
    return live.peak


def batch_bytes(gen: Generator, shape: tuple[int, ...]) -> int:
    """Device memory that translating a padded batch of `shape` needs: its tensors' peak, the weights, MARGIN."""
    weights = sum(t.nbytes for t in itertools.chain(gen.net.parameters(), gen.net.buffers()))
    return weights + round(forward_bytes(gen.shadow, shape) * (1 + MARGIN[0])) + MARGIN[1]


def available_bytes(device: torch.device) -> int | None:
    """What a CUDA device has for this process: its free memory, and what torch's caching allocator holds (the
    weights, and blocks that earlier batches freed, which it reuses); None elsewhere (nothing is checked)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def resolve(opt: argparse.Namespace) -> tuple[Path, Path, Path | None, str]:
    """Which checkpoint, which inputs (a folder or file), the truth folder if any, and the run name."""
    builtin = opt.dataroot is None and opt.input is None
    if builtin:
        opt.dataroot = str(datasets.SYNTHETIC_ROOT)
        opt.load_size = opt.load_size or 32
        if not Path(opt.dataroot).is_dir():
            raise DataError(f"{opt.dataroot} not found: run `python train.py` first (it creates the built-in "
                            f"dataset and trains on it), or pass --dataroot/--input")
    name = opt.name or ("synthetic" if builtin else "experiment_name")
    opt.load_size = opt.load_size or 256
    suffix = "A" if opt.direction == "AtoB" else "B"
    if opt.checkpoint:
        ckpt = Path(opt.checkpoint)
    else:
        run_dir = Path(opt.checkpoints_dir) / name
        ckpt = run_dir / f"{opt.epoch}_net_G_{suffix}.pth"
        if not ckpt.exists() and (run_dir / f"{opt.epoch}_net_G.pth").exists():  # official pretrained layout
            ckpt = run_dir / f"{opt.epoch}_net_G.pth"
        if not ckpt.exists():
            raise CheckpointError(f"{ckpt}: checkpoint not found (train with --name {name}, or pass --checkpoint FILE)")
    truth = None
    if opt.input:
        source = Path(opt.input)
        if not source.exists():
            raise DataError(f"--input {source}: no such file or folder")
    else:
        if not Path(opt.dataroot).is_dir():
            raise DataError(datasets.missing_dataroot_message(opt.dataroot))
        source = Path(opt.dataroot) / f"{opt.phase}{suffix}"
        truth = datasets.truth_folder(opt.dataroot, opt.direction)
        if opt.num_test is None:
            # official default 50; the built-in test set whole, and the whole test set for FID as papers do
            opt.num_test = float("inf") if builtin or opt.fid else 50
    return ckpt, source, truth, name


def read_truth(folder: Path | None, name: str, like: Image.Image) -> Image.Image | None:
    """The correct translation of input `name` from the truth folder, in `like`'s mode and size;
    None when there is none (or it cannot be read, with a warning)."""
    if folder is None or not (folder / name).is_file():
        return None
    try:
        target = load_image(folder / name, 3 if like.mode == "RGB" else 1)
    except DataError as e:
        print(f"infer.py: warning: {e}; no error measured for {name}", file=sys.stderr)
        return None
    return target.resize(like.size, Image.BICUBIC)


def fid_target(opt: argparse.Namespace) -> Path | None:
    """With --fid: the real images of the target domain, DIR/<phase>B for AtoB (<phase>A for BtoA)."""
    if not opt.fid:
        return None
    if opt.input:
        raise DataError("--fid needs --dataroot (it compares the translations with DIR/testB or testA); to compare "
                        "--output's folder with other images: python -m minicycle.fid OUTPUT_DIR REAL_DIR")
    target = Path(opt.dataroot) / f"{opt.phase}{'B' if opt.direction == 'AtoB' else 'A'}"
    fid.list_images(target)
    return target


def translate(opt: argparse.Namespace) -> int:
    if opt.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda, but PyTorch sees no CUDA GPU (use --device cpu)")
    device = torch.device("cuda" if opt.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if opt.device == "auto" else opt.device))
    if opt.batch_size < 1 or (opt.load_size is not None and opt.load_size < 1):
        raise DataError("--batch_size and --load_size must be positive")
    ckpt, source, truth, name = resolve(opt)
    fid_dir = fid_target(opt)
    weights = resolve_weights(opt.inception) if fid_dir else None  # before translating, to fail early
    gen = build_generator(opt, ckpt, device)
    net = networks.set_kernels(gen.net, opt.kernels)
    use_cl = device.type == "cuda" if opt.channels_last is None else opt.channels_last
    fmt = torch.channels_last if use_cl else torch.contiguous_format
    net.to(memory_format=fmt)
    paths = ImageFolder(source).paths
    limit = opt.num_test or float("inf")

    if opt.output:
        out_dir, img_dir = Path(opt.output), Path(opt.output)
    else:
        out_dir = Path(opt.results_dir) / name / f"{opt.phase}_{opt.epoch}"
        img_dir = out_dir / "images"
    try:
        img_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write to {img_dir} ({e.strerror or e})") from None

    rows, errors, baselines, fakes = [], [], [], []
    pending: list[tuple[torch.Tensor, Image.Image, str]] = []
    split_said = []  # the note that batches are split is printed once

    def forward(batch: list[tuple[torch.Tensor, Image.Image, str]]) -> torch.Tensor:
        x = torch.stack([t for t, _, _ in batch]).to(device)
        x, h, w = pad_to_multiple(x, gen.multiple)
        x = x.contiguous(memory_format=fmt)
        with torch.no_grad():
            return net(x)[..., :h, :w].float().cpu()

    def translated(batch: list[tuple[torch.Tensor, Image.Image, str]]) -> torch.Tensor:
        """The batch's translations, on the CPU: one image at a time where the device cannot hold the batch;
        an image it cannot hold alone is a DataError naming it (checked first, and on an out-of-memory)."""
        c, h, w = batch[0][0].shape
        shape = (len(batch), c, h + -h % gen.multiple, w + -w % gen.multiple)  # padded as forward pads it
        have = available_bytes(device)
        if have is not None and (need := batch_bytes(gen, shape)) > have:
            short = f"needs about {gib(need)} of GPU memory and the GPU has {gib(have)} available"
        else:
            try:
                return forward(batch)
            except torch.OutOfMemoryError:
                short = "ran out of GPU memory"
        if len(batch) == 1:
            raise DataError(f"{batch[0][2]} ({w}x{h}): translating it {short}; use --preprocess resize "
                            f"(--load_size N) for smaller images, or --device cpu")
        if not split_said:
            split_said.append(True)
            print(f"infer.py: a batch of {len(batch)} images of {w}x{h} {short}; translating such batches "
                  f"one image at a time")
        return torch.cat([translated([item]) for item in batch])

    def flush() -> None:
        y = translated(pending)
        chosen = choice.report()  # what --kernels auto decided for this batch's shapes, if they are new
        if chosen:
            print(chosen)
        for (_, img, path), out in zip(pending, y):
            fake = tensor_to_image(out)
            stem = Path(path).stem
            fakes.append(img_dir / (f"{stem}.png" if opt.output else f"{stem}_fake.png"))
            if opt.output:
                save_image_atomic(fake, img_dir / f"{stem}.png")
                continue
            save_image_atomic(img, img_dir / f"{stem}_real.png")
            save_image_atomic(fake, img_dir / f"{stem}_fake.png")
            target = read_truth(truth, Path(path).name, fake)
            if target is None:
                rows.append((stem, [("real", f"images/{stem}_real.png"), ("fake", f"images/{stem}_fake.png")]))
                continue
            t = np.asarray(target, dtype=np.float64)
            errors.append(np.abs(np.asarray(fake, dtype=np.float64) - t).mean())
            baselines.append(np.abs(np.asarray(img.resize(fake.size, Image.BICUBIC), dtype=np.float64) - t).mean())
            save_image_atomic(target, img_dir / f"{stem}_truth.png")
            rows.append((stem, [(f"real (identity error {baselines[-1]:.1f})", f"images/{stem}_real.png"),
                                (f"fake (error {errors[-1]:.1f})", f"images/{stem}_fake.png"),
                                ("truth", f"images/{stem}_truth.png")]))
        pending.clear()

    done, unreadable = 0, []
    for path in paths:
        if done == limit:
            break
        try:
            img = load_image(path, gen.input_nc)
        except DataError as e:
            print(f"infer.py: warning: {e}; skipping it", file=sys.stderr)
            unreadable.append(path)
            continue
        done += 1
        if opt.preprocess == "resize":
            img = img.resize((opt.load_size, opt.load_size), Image.BICUBIC)
        x = image_to_tensor(img)
        if pending and (len(pending) == opt.batch_size or pending[0][0].shape != x.shape):
            flush()
        pending.append((x, img, str(path)))
    if pending:
        flush()

    if not done:
        raise DataError(f"none of the {len(unreadable)} images in {source} can be read")
    score = (f"mean absolute error vs truth (0-255): {np.mean(errors):.2f}  (identity baseline: "
             f"{np.mean(baselines):.2f}) over {len(errors)} images") if errors else ""
    distances = fid_of(fakes, fid_dir, weights, device) if fid_dir else ""
    if not opt.output:
        summary = "; ".join(s for s in (score, distances) if s)
        results_page(out_dir, f"{name}: {opt.direction} with {ckpt.name}", rows, summary=summary)
    skipped = f" ({len(unreadable)} unreadable, skipped)" if unreadable else ""
    print(f"translated {done} images {opt.direction} with {ckpt} -> {out_dir}{skipped}")
    for line in (score, distances):
        if line:
            print(line)
    return 0


def fid_of(fakes: list[Path], target: Path, weights: Path, device: torch.device) -> str:
    """FID and KID of the written translations against the real images in `target` (whose features are
    cached), by minicycle.fid's protocol, as one line for the console and the results page."""
    inception = fid.Inception.load(weights, device)
    feats, _ = inception.features(fakes, desc="translations")
    real, _ = fid.folder_features(target, inception, fid.cache_dir())
    result = fid.score(feats, real, name_a="translations", name_b=str(target))
    return (f"FID {result['fid']:.2f}, KID {result['kid_mean']:.4f} ± {result['kid_std']:.4f}: "
            f"{result['n_a']} translations vs {result['n_b']} images of {target}")


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(argv)
    try:
        return translate(opt)
    except (DataError, CheckpointError, fid.FidError, WeightsError, choice.FatalKernelError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, WeightsMissing) else 1
    except torch.OutOfMemoryError as e:
        print(f"infer.py: error: {' '.join(str(e).split()).split('. Including')[0]}; try a smaller --batch_size or "
              f"--load_size, or --preprocess resize for large images", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
