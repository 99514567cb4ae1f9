"""Data: find and load images, the official transforms, the unaligned A/B dataset, epoch plans.

Semantics follow the official pytorch-CycleGAN-and-pix2pix `data/` package (dataroot/trainA,
trainB, ...; resize_and_crop / crop / scale_width / scale_width_and_crop / none; random flip;
pixels mapped to [-1, 1]), with three differences: every random choice comes from an explicit
`random.Random` (so runs and resumes are reproducible), odd image files (16-bit, palette,
CMYK, alpha) are converted properly instead of clipped, and unreadable files are skipped with a
warning instead of crashing a long run.
"""

import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")
PREPROCESS_MODES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")


class DataError(ValueError):
    """A problem with the user's data or data flags; the message is one line, fit to print."""


def find_images(folder: str | Path, max_dataset_size: float = float("inf")) -> list[Path]:
    """All images under `folder` (recursive), sorted by path, then cut to `max_dataset_size`."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    if max_dataset_size < 1:
        raise DataError(f"max_dataset_size must be at least 1, got {max_dataset_size}")
    paths, n_files = [], 0
    for root, dirs, files in os.walk(folder):
        # Skip hidden entries, such as the ._name.jpg resource forks and __MACOSX/ of macOS zips.
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__MACOSX"]
        files = [f for f in files if not f.startswith(".")]
        n_files += len(files)
        paths += [Path(root, f) for f in files if f.lower().endswith(IMG_EXTENSIONS)]
    if not paths:
        what = "is empty" if n_files == 0 else f"holds {n_files} files, none an image"
        raise DataError(f"image folder {folder} {what} (looked for {' '.join(IMG_EXTENSIONS)})")
    paths.sort()
    return paths if max_dataset_size == float("inf") else paths[: int(max_dataset_size)]


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (I;16*, I, F) -> L, scaled instead of clipped at 255."""
    a = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        a = a / 257  # 65535 -> 255
    else:  # 'I' or 'F': the range is not in the mode, so guess it from the values
        top = a.max(initial=0)
        if img.mode == "F" and top <= 1:
            a = a * 255  # float image in [0, 1]
        elif 255 < top <= 65535:
            a = a / 257  # 16-bit values
        elif top > 65535:
            a = a * (255 / top)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    # Transparent pixels often hide arbitrary colours (black, junk), so composite onto white, the
    # way the image looks in most viewers, rather than dropping alpha as the official repo does.
    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img).convert("RGB")


def load_image(path: str | Path, channels: int) -> Image.Image:
    """Open an image file as mode 'RGB' (channels=3) or 'L' (channels=1).

    Handles 1-bit, grayscale, palette (with transparency), alpha, CMYK, YCbCr and 16-bit/float
    images; honours the EXIF orientation tag. Unreadable or truncated files raise DataError.
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels} (see --input_nc/--output_nc)")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so that truncated files fail here
            img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I") or img.mode == "F":
            img = _to_8bit(img)
        elif img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = _flatten_alpha(img)
        return img.convert("RGB" if channels == 3 else "L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


def check_preprocess(preprocess: str, load_size: int, crop_size: int) -> None:
    """Raise DataError for a flag combination the transforms cannot honour."""
    if preprocess not in PREPROCESS_MODES:
        raise DataError(f"unknown --preprocess {preprocess!r}; choose from {', '.join(PREPROCESS_MODES)}")
    if load_size < 1 or crop_size < 1:
        raise DataError(f"--load_size and --crop_size must be at least 1, got {load_size} and {crop_size}")
    if preprocess in ("resize_and_crop", "scale_width_and_crop") and crop_size > load_size:
        raise DataError(f"--crop_size {crop_size} is larger than --load_size {load_size}, so --preprocess "
                        f"{preprocess} cannot crop; use --crop_size <= --load_size")


def _scale_width(img: Image.Image, width: int, min_height: int) -> Image.Image:
    # As the official __scale_width: width -> `width` keeping aspect, height at least `min_height`.
    w, h = img.size
    if w == width and h >= min_height:
        return img
    return img.resize((width, int(max(width * h / w, min_height))), Image.BICUBIC)


def _random_crop(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    w, h = img.size
    if w < size or h < size:
        # Too small to crop (the official repo dies with a randrange error, issue #390):
        # upscale, keeping the aspect ratio, until the shorter side equals the crop size.
        s = size / min(w, h)
        w, h = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((w, h), Image.BICUBIC)
    x, y = rng.randint(0, w - size), rng.randint(0, h - size)
    return img.crop((x, y, x + size, y + size))


def _round_to_4(img: Image.Image) -> Image.Image:
    # As the official __make_power_2(base=4): H and W rounded to the nearest multiple of 4.
    w, h = img.size
    w4, h4 = max(4, round(w / 4) * 4), max(4, round(h / 4) * 4)
    return img if (w4, h4) == (w, h) else img.resize((w4, h4), Image.BICUBIC)


def get_transform(preprocess: str, load_size: int, crop_size: int, no_flip: bool,
                  channels: int) -> Callable[[Image.Image, random.Random], torch.Tensor]:
    """The official train-time transform, as `f(img, rng) -> (C, H, W) float32 tensor in [-1, 1]`."""
    check_preprocess(preprocess, load_size, crop_size)
    mode = "RGB" if channels == 3 else "L"

    def transform(img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = img if img.mode == mode else img.convert(mode)
        if preprocess == "resize_and_crop":
            img = img.resize((load_size, load_size), Image.BICUBIC)
        elif preprocess.startswith("scale_width"):
            img = _scale_width(img, load_size, crop_size)
        if "crop" in preprocess:
            img = _random_crop(img, crop_size, rng)
        if preprocess == "none":
            img = _round_to_4(img)
        if not no_flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return image_to_tensor(img)

    return transform


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL 'RGB'/'L' image -> (C, H, W) float32 in [-1, 1], x = pixel / 255 * 2 - 1."""
    a = torch.from_numpy(np.array(img, dtype=np.uint8))
    a = a.unsqueeze(0) if a.ndim == 2 else a.permute(2, 0, 1)
    return a.float().div(255).mul(2).sub(1).contiguous()


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """(C, H, W) tensor in [-1, 1] -> uint8 PIL image ('L' for C=1, 'RGB' for C=3), rounded."""
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"expected a (1 or 3, H, W) tensor, got shape {tuple(t.shape)}")
    a = ((t.detach().float().cpu() + 1) / 2 * 255).clamp(0, 255).round().to(torch.uint8)
    if a.shape[0] == 1:
        return Image.fromarray(a[0].numpy(), "L")
    return Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB")


class UnalignedDataset(torch.utils.data.Dataset):
    """Unpaired images from dataroot/<phase>A and dataroot/<phase>B, indexed by epoch_plan keys."""

    def __init__(self, dataroot: str | Path, phase: str = "train", *, preprocess: str = "resize_and_crop",
                 load_size: int = 286, crop_size: int = 256, no_flip: bool = False, input_nc: int = 3,
                 output_nc: int = 3, max_dataset_size: float = float("inf")):
        self.dir_A, self.dir_B = Path(dataroot, f"{phase}A"), Path(dataroot, f"{phase}B")
        self.A_paths = find_images(self.dir_A, max_dataset_size)
        self.B_paths = find_images(self.dir_B, max_dataset_size)
        self.input_nc, self.output_nc = input_nc, output_nc
        self.transform_A = get_transform(preprocess, load_size, crop_size, no_flip, input_nc)
        self.transform_B = get_transform(preprocess, load_size, crop_size, no_flip, output_nc)
        self.bad_A: set[int] = set()  # indices of unreadable files, found as we go (per process)
        self.bad_B: set[int] = set()

    def __len__(self) -> int:
        return max(len(self.A_paths), len(self.B_paths))

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        a_index, b_index, seed = key
        A, A_path = self._load("A", a_index)
        B, B_path = self._load("B", b_index)
        # Separate streams for A and B, both fixed by the key's seed.
        A = self.transform_A(A, random.Random(f"{seed}:A"))
        B = self.transform_B(B, random.Random(f"{seed}:B"))
        return {"A": A, "B": B, "A_paths": str(A_path), "B_paths": str(B_path)}

    def _load(self, domain: str, index: int) -> tuple[Image.Image, Path]:
        # An unreadable file is replaced by the next readable one (cyclically), which is the same
        # file whichever process finds it, so substitution is deterministic.
        paths, bad, channels, folder = ((self.A_paths, self.bad_A, self.input_nc, self.dir_A) if domain == "A" else
                                        (self.B_paths, self.bad_B, self.output_nc, self.dir_B))
        for k in range(len(paths)):
            i = (index + k) % len(paths)
            if i in bad:
                continue
            try:
                return load_image(paths[i], channels), paths[i]
            except DataError as e:
                bad.add(i)
                warnings.warn(f"{e}; skipping it (domain {domain})", stacklevel=3)
        raise DataError(f"none of the {len(paths)} images in {folder} can be read")


def collate_batch(batch: list[dict]) -> dict:
    """default_collate, but images of different sizes in one batch (--preprocess none or scale_width
    with --batch_size > 1) are a one-line DataError naming two of them, not a torch.stack traceback."""
    for k in ("A", "B"):
        sizes = [tuple(s[k].shape[-2:]) for s in batch]
        odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
        if odd is not None:
            (h0, w0), (h1, w1) = sizes[0], sizes[odd]
            raise DataError(f"images of different sizes in one batch after --preprocess: {batch[0][k + '_paths']} "
                            f"is {w0}x{h0}, {batch[odd][k + '_paths']} is {w1}x{h1}; use --batch_size 1, or a "
                            f"--preprocess that crops to --crop_size")
    return torch.utils.data.default_collate(batch)


def epoch_plan(n_A: int, n_B: int, epoch: int, seed: int, serial_batches: bool) -> list[tuple[int, int, int]]:
    """The sample keys (a_index, b_index, sample_seed) of one epoch, fixed by (seed, epoch).

    As the official loader: i runs over a shuffled range(max(n_A, n_B)) (in order with
    serial_batches), a = i % n_A, b = i % n_B with serial_batches else uniform in [0, n_B).
    A resumed run can drop the first k keys and continue exactly.
    """
    if n_A < 1 or n_B < 1:
        raise ValueError(f"both domains need images, got n_A={n_A}, n_B={n_B}")
    rng = random.Random(f"epoch_plan:{seed}:{epoch}")
    order = list(range(max(n_A, n_B)))
    if not serial_batches:
        rng.shuffle(order)
    # (a, b, seed), evaluated left to right: b's draw comes before the seed's.
    return [(i % n_A, i % n_B if serial_batches else rng.randrange(n_B), rng.getrandbits(63)) for i in order]


def input_paths(path: str | Path) -> list[Path]:
    """The images to translate at inference: one image file, or every image under a folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"input {path} does not exist")
    return find_images(path)
