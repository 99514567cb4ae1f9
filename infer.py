"""Translate images with a trained generator (ours or an official pretrained .pth).

    python infer.py --dataroot ./datasets/horse2zebra --name horse2zebra --direction AtoB
    python infer.py --checkpoint horse2zebra.pth --input photos/ --output zebras/ --preprocess none
    python infer.py                     # the built-in dataset's run: prints the error against the truth

Like the official test.py, results go to results/NAME/test_<epoch>/ with an index.html. The generator's
architecture is read from the checkpoint's keys unless --netG/--ngf/--norm are given.

Reading order: main() calls infer(), the procedure: set-up, then three steps: translate (write the
translations), score (against the truth), fid_of; how one batch is translated follows (write_batch,
translated, with the device-memory check of minicycle/memory.py).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kernels import choice
from minicycle import cli, datasets, fid, memory, networks
from minicycle.checkpoint import CheckpointError, describe_generator, load_file, load_into
from minicycle.data import DataError, image_to_tensor, input_paths, load_image, tensor_to_image
from minicycle.inception import WeightsError, WeightsMissing, resolve_weights
from minicycle.report import results_page, save_image_atomic


@dataclass
class Generator:
    """A generator loaded for translation, and what feeding it needs."""

    net: torch.nn.Module  # on `device`, with the chosen --kernels, in `layout`
    device: torch.device
    layout: torch.memory_format
    input_nc: int  # channels of the images it reads
    multiple: int  # input sides are padded up to a multiple of this
    shadow: torch.nn.Module  # the same layers on the meta device, official path: what a batch needs (memory)
    said_split: bool = False  # the note that batches are split has been printed


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
    cli.add_device_flags(p, "generator")
    return p


def build_generator(opt: argparse.Namespace, path: Path, device: torch.device) -> Generator:
    """Read the architecture from the file's keys (explicit flags win), build it, load it strictly; then the
    --kernels and the layout it runs with."""
    state = load_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    info = describe_generator(state) if isinstance(state, dict) else {}
    netG = opt.netG or info.get("netG")
    if netG not in networks.GENERATORS:
        raise CheckpointError(f"{path}: cannot tell the generator type from its keys; pass --netG")
    ngf, norm = opt.ngf or info.get("ngf", 64), opt.norm or info.get("norm", "instance")
    input_nc, output_nc = opt.input_nc or info.get("input_nc") or 3, opt.output_nc or info.get("output_nc") or 3
    args = (input_nc, output_nc, ngf, netG, norm, bool(info.get("dropout", False)))
    net = networks.define_G(*args)
    load_into(net, path, expected_flags=f"--netG {netG} --ngf {ngf} --norm {norm}")
    with torch.device("meta"):
        shadow = networks.set_fused(networks.define_G(*args), False).train(not opt.eval)
    net = networks.set_kernels(net.to(device).train(not opt.eval), opt.kernels)
    use_cl = device.type == "cuda" if opt.channels_last is None else opt.channels_last
    layout = torch.channels_last if use_cl else torch.contiguous_format
    return Generator(net=net.to(memory_format=layout), device=device, layout=layout, input_nc=input_nc,
                     multiple=networks.input_multiple(netG), shadow=shadow)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Pad H and W up to a multiple of `multiple` (reflect where possible) so any size can be translated."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
    return x, h, w


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


def infer(opt: argparse.Namespace) -> int:
    """The procedure: set-up; translate (write the translations); score them against the truth; FID; the page."""
    device = cli.pick_device(opt.device)
    if opt.batch_size < 1 or (opt.load_size is not None and opt.load_size < 1):
        raise DataError("--batch_size and --load_size must be positive")
    ckpt, source, truth, name = resolve(opt)
    fid_dir = fid_target(opt)
    weights = resolve_weights(opt.inception) if fid_dir else None  # before translating, to fail early
    gen = build_generator(opt, ckpt, device)
    if notice := choice.compile_notice(opt.kernels, device):
        print(notice)
    out_dir = Path(opt.output) if opt.output else Path(opt.results_dir) / name / f"{opt.phase}_{opt.epoch}"
    img_dir = out_dir if opt.output else out_dir / "images"
    try:
        img_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write to {img_dir} ({e.strerror or e})") from None

    written, unreadable = translate(opt, gen, source, img_dir)
    if not written:
        raise DataError(f"none of the {unreadable} images in {source} can be read")
    rows, errors = ([], "") if opt.output else score(img_dir, truth, [path for path, _ in written])
    distances = fid_of([fake for _, fake in written], fid_dir, weights, device) if fid_dir else ""
    if not opt.output:
        summary = "; ".join(line for line in (errors, distances) if line)
        results_page(out_dir, f"{name}: {opt.direction} with {ckpt.name}", rows, summary=summary)
    skipped = f" ({unreadable} unreadable, skipped)" if unreadable else ""
    print(f"translated {len(written)} images {opt.direction} with {ckpt} -> {out_dir}{skipped}")
    for line in (errors, distances):
        if line:
            print(line)
    return 0


# ---- the three steps -----------------------------------------------------------------------------------------
def translate(opt: argparse.Namespace, gen: Generator, source: Path, img_dir: Path
              ) -> tuple[list[tuple[Path, Path]], int]:
    """Translate the readable images of `source` (a folder or one file; --num_test at most) in batches of one size,
    writing each translation to img_dir: with --output as <stem>.png, else as <stem>_fake.png beside the input as
    <stem>_real.png (for the results page). Returns the (input, translation) files in order, and how many inputs
    could not be read (each skipped with a warning)."""
    limit = opt.num_test or float("inf")
    written: list[tuple[Path, Path]] = []
    batch: list[tuple[Path, Image.Image]] = []
    unreadable = 0
    for path in input_paths(source):
        if len(written) + len(batch) == limit:
            break
        try:
            img = load_image(path, gen.input_nc)
        except DataError as e:
            print(f"infer.py: warning: {e}; skipping it", file=sys.stderr)
            unreadable += 1
            continue
        if opt.preprocess == "resize":
            img = img.resize((opt.load_size, opt.load_size), Image.BICUBIC)
        if batch and (len(batch) == opt.batch_size or batch[0][1].size != img.size):
            written += write_batch(gen, batch, img_dir, alone=bool(opt.output))
            batch = []
        batch.append((Path(path), img))
    if batch:
        written += write_batch(gen, batch, img_dir, alone=bool(opt.output))
    return written, unreadable


def score(img_dir: Path, truth: Path | None, inputs: list[Path]) -> tuple[list, str]:
    """The results page's rows: per input its real and fake images and, where the truth folder has its correct
    translation, that image too, with the mean absolute error (0-255) of the fake and of the real (the identity
    baseline) against it. And the mean errors as one line ('' when nothing had a truth)."""
    rows, errors, baselines = [], [], []
    for path in inputs:
        stem, fake = path.stem, Image.open(img_dir / f"{path.stem}_fake.png")
        images = [("real", f"images/{stem}_real.png"), ("fake", f"images/{stem}_fake.png")]
        target = read_truth(truth, path.name, fake)
        if target is not None:
            save_image_atomic(target, img_dir / f"{stem}_truth.png")
            t = np.asarray(target, dtype=np.float64)
            errors.append(np.abs(np.asarray(fake, dtype=np.float64) - t).mean())
            baselines.append(np.abs(np.asarray(Image.open(img_dir / f"{stem}_real.png"), dtype=np.float64) - t).mean())
            images = [(f"real (identity error {baselines[-1]:.1f})", images[0][1]),
                      (f"fake (error {errors[-1]:.1f})", images[1][1]), ("truth", f"images/{stem}_truth.png")]
        rows.append((stem, images))
    line = (f"mean absolute error vs truth (0-255): {np.mean(errors):.2f}  (identity baseline: "
            f"{np.mean(baselines):.2f}) over {len(errors)} images") if errors else ""
    return rows, line


def fid_of(fakes: list[Path], target: Path, weights: Path, device: torch.device) -> str:
    """FID and KID of the written translations against the real images in `target` (whose features are
    cached), by minicycle.fid's protocol, as one line for the console and the results page."""
    inception = fid.Inception.load(weights, device)
    feats, _ = inception.features(fakes, desc="translations")
    real, _ = fid.folder_features(target, inception, fid.cache_dir())
    result = fid.score(feats, real, name_a="translations", name_b=str(target))
    return (f"FID {result['fid']:.2f}, KID {result['kid_mean']:.4f} ± {result['kid_std']:.4f}: "
            f"{result['n_a']} translations vs {result['n_b']} images of {target}")


# ---- translating a batch -------------------------------------------------------------------------------------
def write_batch(gen: Generator, batch: list[tuple[Path, Image.Image]], img_dir: Path, alone: bool
                ) -> list[tuple[Path, Path]]:
    """Translate a batch of same-size images and write each translation (alone: as <stem>.png; else as
    <stem>_fake.png, after the input as <stem>_real.png). Returns the (input, translation) files."""
    fakes = translated(gen, torch.stack([image_to_tensor(img) for _, img in batch]), [path for path, _ in batch])
    if chosen := choice.report():  # what --kernels auto decided for this batch's shapes, if they are new
        print(chosen)
    written = []
    for (path, img), fake in zip(batch, fakes):
        if not alone:
            save_image_atomic(img, img_dir / f"{path.stem}_real.png")
        written.append((path, img_dir / (f"{path.stem}.png" if alone else f"{path.stem}_fake.png")))
        save_image_atomic(tensor_to_image(fake), written[-1][1])
    return written


def translated(gen: Generator, x: torch.Tensor, paths: list[Path]) -> torch.Tensor:
    """The translations of the batch x (N, C, H, W), on the CPU: one image at a time where the device cannot hold
    the batch; an image it cannot hold alone is a DataError naming it (checked first, and on an out-of-memory)."""
    n, c, h, w = x.shape
    have = memory.available_bytes(gen.device)
    shape = (n, c, h + -h % gen.multiple, w + -w % gen.multiple)  # padded as pad_to_multiple pads it
    if have is not None and (need := memory.batch_bytes(gen.net, gen.shadow, shape)) > have:
        short = f"needs about {memory.gib(need)} of GPU memory and the GPU has {memory.gib(have)} available"
    else:
        try:
            with torch.no_grad():
                padded, _, _ = pad_to_multiple(x.to(gen.device), gen.multiple)
                return gen.net(padded.contiguous(memory_format=gen.layout))[..., :h, :w].float().cpu()
        except torch.OutOfMemoryError:
            short = "ran out of GPU memory"
    if n == 1:
        raise DataError(f"{paths[0]} ({w}x{h}): translating it {short}; use --preprocess resize "
                        f"(--load_size N) for smaller images, or --device cpu")
    if not gen.said_split:
        gen.said_split = True
        print(f"infer.py: a batch of {n} images of {w}x{h} {short}; translating such batches one image at a time")
    return torch.cat([translated(gen, x[i:i + 1], paths[i:i + 1]) for i in range(n)])


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(argv)
    try:
        return infer(opt)
    except (DataError, CheckpointError, fid.FidError, WeightsError, choice.FatalKernelError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, WeightsMissing) else 1
    except torch.OutOfMemoryError as e:
        print(f"infer.py: error: {' '.join(str(e).split()).split('. Including')[0]}; try a smaller --batch_size or "
              f"--load_size, or --preprocess resize for large images", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
