"""Datasets: the official CycleGAN downloads and a built-in synthetic dataset with a known answer.

    python -m minicycle.datasets download horse2zebra [--root ./datasets]
    python -m minicycle.datasets synthetic [--root ./datasets]

The synthetic dataset (SYNTHETIC_README) has a known answer, T = swap(R, B) both ways: its test images come
with their exact translations in truth/, so a trained generator can be scored against the answer.
"""

import argparse
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from minicycle.data import DataError

OFFICIAL_DATASETS = (
    "apple2orange", "summer2winter_yosemite", "horse2zebra", "monet2photo", "cezanne2photo",
    "ukiyoe2photo", "vangogh2photo", "maps", "facades", "iphone2dslr_flower", "ae_photos", "mini",
)  # fmt: skip
DEFAULT_BASE_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
DEFAULT_ROOT = "./datasets"
SYNTHETIC_ROOT = "./datasets/synthetic"
SYNTHETIC_STAMP = "minicycle-synthetic v2"
SYNTHETIC_SIZES = {"trainA": 400, "trainB": 400, "testA": 60, "testB": 60}
SYNTHETIC_README = """\
minicycle built-in synthetic dataset ({stamp}), made by `python -m minicycle.datasets synthetic`.

32x32 RGB scenes: 2-4 large ellipses, rectangles and triangles in a fixed warm palette on a fixed
warm background, with slight noise. Domain A (trainA, testA) uses only these warm colours: red > blue
by a clear margin at every pixel. Domain B (trainB, testB) is other, independently drawn warm scenes
with the ground-truth mapping T applied, so B is cool (blue > red). The data are unpaired.

T swaps the red and blue channels: T(r, g, b) = (b, g, r). T is its own inverse, so it is the
correct translation A->B and B->A alike.

truth/testA/NAME.png = T(testA/NAME.png), the correct AtoB translation of each test image.
truth/testB/NAME.png = T(testB/NAME.png), the correct BtoA translation.
"""


def missing_dataroot_message(path: str | Path) -> str:
    """One line for a --dataroot that is not there, saying how to get it if we know how."""
    path = Path(path)
    msg = f"--dataroot {path} {'is not a folder' if path.exists() else 'does not exist'}"
    name = path.name
    if name in OFFICIAL_DATASETS:
        msg += (f"; {name} is an official CycleGAN dataset: get it with `python -m minicycle.datasets download "
                f"{name}` (it lands in {DEFAULT_ROOT}/{name}, then pass --dataroot {DEFAULT_ROOT}/{name})")
    elif name == "synthetic":
        msg += f"; make the built-in synthetic dataset with `python -m minicycle.datasets synthetic` ({SYNTHETIC_ROOT})"
    return msg


def download(name: str, root: str | Path = DEFAULT_ROOT, base_url: str = DEFAULT_BASE_URL) -> Path:
    """Fetch `{base_url}/{name}.zip` and unpack it into root/name, atomically. Returns root/name."""
    if name not in OFFICIAL_DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(OFFICIAL_DATASETS)}")
    root = Path(root)
    dest = root / name
    if dest.is_dir() and any(dest.iterdir()):
        print(f"{name} is already present in {dest}")
        return dest
    root.mkdir(parents=True, exist_ok=True)
    url = f"{base_url}/{name}.zip"
    fd, zip_path = tempfile.mkstemp(prefix=f".{name}-", suffix=".zip.part", dir=root)
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}-", suffix=".part", dir=root)
    try:
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=30) as r:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}.zip") as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except OSError as e:  # URLError, HTTPError, timeouts, refused connections
            reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
            raise DataError(f"could not reach {url}: {' '.join(str(reason).split())}") from None
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(tmp_dir)
        except zipfile.BadZipFile:
            raise DataError(f"{url} did not give a valid zip file") from None
        # The official zips hold a top folder NAME/; accept a zip without one too.
        src = Path(tmp_dir, name) if Path(tmp_dir, name).is_dir() else Path(tmp_dir)
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        os.replace(src, dest)
    finally:
        Path(zip_path).unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"{name} is in {dest}; train with --dataroot {dest}")
    return dest


def swap_rb(img: np.ndarray) -> np.ndarray:
    """The synthetic dataset's ground-truth mapping T: swap the red and blue channels."""
    return img[..., ::-1].copy()


# A fixed warm palette (red > blue in each). Colours are drawn from it, not at random, because an
# InstanceNorm generator cannot see an image's absolute colour (IN removes each channel's mean), only
# how regions differ: a fixed palette makes every region's true colour recoverable from the others.
BACKGROUND = np.array([226, 186, 150])
PALETTE = np.array([[205, 45, 35], [245, 150, 30], [238, 222, 70], [120, 62, 28]])


def _warm_scene(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One warm scene as a (size, size, 3) uint8 array: 2-4 large shapes on the background."""
    img = np.broadcast_to(BACKGROUND.astype(np.float64), (size, size, 3)).copy()
    y, x = np.mgrid[:size, :size] + 0.5
    for _ in range(rng.integers(2, 5)):
        kind = rng.integers(3)
        cx, cy = rng.uniform(4, size - 4, 2)
        if kind == 0:  # ellipse
            rx, ry = rng.uniform(4, 11, 2)
            mask = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        elif kind == 1:  # rectangle
            hw, hh = rng.uniform(3, 10, 2)
            mask = (abs(x - cx) <= hw) & (abs(y - cy) <= hh)
        else:  # triangle: inside all three edges; corners at jittered thirds of a circle
            angle = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.5, 0.5, 3)
            radius = rng.uniform(6, 13, 3)
            p = np.array([cx, cy]) + radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
            d = [(x - p[i, 0]) * (p[j, 1] - p[i, 1]) - (y - p[i, 1]) * (p[j, 0] - p[i, 0])
                 for i, j in ((0, 1), (1, 2), (2, 0))]  # fmt: skip
            mask = ((d[0] >= 0) & (d[1] >= 0) & (d[2] >= 0)) | ((d[0] <= 0) & (d[1] <= 0) & (d[2] <= 0))
        img[mask] = PALETTE[rng.integers(len(PALETTE))]
    img += rng.integers(-2, 3, img.shape)  # slight noise, well inside the red-blue margin
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_synthetic(out: Path) -> None:
    for k, (split, n) in enumerate(SYNTHETIC_SIZES.items()):
        rng = np.random.default_rng([2017, k])  # one fixed stream per split
        is_test = split.startswith("test")
        (out / split).mkdir()
        if is_test:
            (out / "truth" / split).mkdir(parents=True)
        for i in range(n):
            scene = _warm_scene(rng)
            img = swap_rb(scene) if split.endswith("B") else scene
            Image.fromarray(img).save(out / split / f"{i:04d}.png")
            if is_test:  # the correct translation of this test image
                Image.fromarray(swap_rb(img)).save(out / "truth" / split / f"{i:04d}.png")
    (out / "README.txt").write_text(SYNTHETIC_README.format(stamp=SYNTHETIC_STAMP))
    (out / "STAMP").write_text(SYNTHETIC_STAMP + "\n")  # last: marks the folder complete


def ensure_synthetic(root: str | Path = SYNTHETIC_ROOT) -> Path:
    """Make the synthetic dataset at `root` unless a complete, current copy is there. Returns root."""
    root = Path(root)
    stamp = root / "STAMP"
    if stamp.is_file() and stamp.read_text().strip() == SYNTHETIC_STAMP:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", suffix=".part", dir=root.parent))
    try:
        _write_synthetic(tmp)
        if root.exists():  # incomplete or stale: move it aside, then delete it
            old = tmp.with_name(tmp.name + ".old")
            os.replace(root, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, root)
    except OSError:
        # Another process may have finished first; its copy is as good as ours.
        if not (stamp.is_file() and stamp.read_text().strip() == SYNTHETIC_STAMP):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def truth_folder(dataroot: str | Path, direction: str) -> Path | None:
    """dataroot/truth/testA (AtoB) or truth/testB (BtoA): exact translations of the test images."""
    if direction not in ("AtoB", "BtoA"):
        raise ValueError(f"direction must be AtoB or BtoA, got {direction!r}")
    folder = Path(dataroot, "truth", "testA" if direction == "AtoB" else "testB")
    return folder if folder.is_dir() else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minicycle.datasets", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help=f"fetch an official dataset: {', '.join(OFFICIAL_DATASETS)}")
    d.add_argument("name")
    d.add_argument("--root", default=DEFAULT_ROOT, help="unpack into ROOT/NAME (default %(default)s)")
    s = sub.add_parser("synthetic", help="make the built-in synthetic dataset")
    s.add_argument("--root", default=DEFAULT_ROOT, help="write ROOT/synthetic (default %(default)s)")
    args = p.parse_args(argv)
    try:
        if args.command == "download":
            download(args.name, args.root)
        else:
            path = ensure_synthetic(Path(args.root, "synthetic"))
            print(f"synthetic dataset ready in {path}; train with --dataroot {path}")
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
