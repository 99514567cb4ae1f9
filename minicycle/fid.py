"""FID and KID between two folders of images, by the standard protocol (pytorch-fid's).

    python -m minicycle.fid DIR_A DIR_B [--inception FILE] [--json]

The last two lines printed are `FID <value>` and `KID <mean> ± <std>`; with --json, one object with
the keys fid, kid_mean, kid_std, n_a, n_b. Lower is better for both.

Protocol (any change moves the number): the images of each folder (not recursive) are read as
pytorch-fid reads them, `PIL.Image.open(path).convert("RGB")` (alpha dropped, not composited; EXIF
orientation not applied), mapped to [0, 1] (x / 255), squashed to 299 x 299 by bilinear interpolation
(align_corners=False, no antialiasing), scaled to [-1, 1], and passed through the TF-ported Inception-v3
(minicycle/inception.py) for its 2048-d pool3 features. Features are cached per folder, keyed by the
files' names, sizes and mtimes and the weights file's sha256.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from kernels.runtime import write_atomic
from minicycle.cli import OneLineParser
from minicycle.inception import WeightsError, WeightsMissing, load_weights, resolve_weights

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")  # pytorch-fid's
SIZE = 299
DIMS = 2048
CACHE_FORMAT = "minicycle-fid-1"
GRAM_LIMIT = 6000  # images in both sets together: the joint KID kernel matrix then takes at most 288 MB


class FidError(ValueError):
    """Bad folders or too few images; the message is one line."""


def list_images(folder: Path) -> list[Path]:
    """The folder's image files (not recursive, extension case ignored), sorted by name."""
    if not folder.is_dir():
        raise FidError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise FidError(f"{folder}: no images (looked for {' '.join(IMAGE_EXTENSIONS)}, not in subfolders)")
    return paths


def read_image(path: Path) -> torch.Tensor:
    """3 x H x W float32 in [0, 1], exactly as pytorch-fid reads a file (convert('RGB'), then x / 255)."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


def inception_input(x: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W in [0, 1] -> N x 3 x 299 x 299 in [-1, 1]: bilinear, align_corners=False, no antialias."""
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
    return 2 * x - 1


@dataclass
class Inception:
    """The loaded feature extractor: the net on its device, and its weights' sha256 (part of the cache key)."""

    net: torch.nn.Module
    sha256: str
    device: torch.device
    batch_size: int = 50

    @classmethod
    def load(cls, weights: Path, device: torch.device | None = None) -> "Inception":
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net, sha256 = load_weights(weights)
        return cls(net.to(device), sha256, device)

    def features(self, paths: list[Path], desc: str) -> tuple[np.ndarray, list[Path]]:
        """n x 2048 float32 features of the readable images, and the unreadable ones (each warned about).
        Images are resized one by one (sizes may differ) and run in batches."""
        feats, batch, skipped = [], [], []

        def run() -> None:
            with torch.no_grad():
                feats.append(self.net(torch.cat(batch).to(self.device)).float().cpu().numpy())
            batch.clear()

        for path in tqdm(paths, desc=desc, unit="img", leave=False):
            try:
                x = read_image(path)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                reason = " ".join(str(e).split()) or type(e).__name__
                tqdm.write(f"minicycle.fid: warning: cannot read image {path}: {reason}; skipping it", file=sys.stderr)
                skipped.append(path)
                continue
            batch.append(inception_input(x[None]))
            if len(batch) == self.batch_size:
                run()
        if batch:
            run()
        return (np.concatenate(feats) if feats else np.zeros((0, DIMS), np.float32)), skipped


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/minicycle/fid, or ~/.cache/minicycle/fid."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minicycle" / "fid"


def folder_features(folder: Path, inception: Inception, cache: Path | None) -> tuple[np.ndarray, list[str]]:
    """The features of a folder's images (and the names of the unreadable ones), from `cache` when the
    folder's files (names, sizes, mtimes) and the weights are what they were; extracted and stored otherwise.
    `cache` None: no cache."""
    paths = list_images(folder)
    stats = [(p.name, st.st_size, st.st_mtime_ns) for p in paths for st in [p.stat()]]
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, inception.sha256, stats]).encode()).hexdigest()
    where = hashlib.sha256(f"{folder.resolve()}\0{inception.sha256}".encode()).hexdigest()[:24]
    file = cache / f"{where}.npz" if cache else None
    hit = read_cache(file, key) if file else None
    if hit is not None:
        for name in hit[1]:
            print(f"minicycle.fid: warning: cannot read image {folder / name}; skipping it", file=sys.stderr)
        return hit
    feats, bad = inception.features(paths, desc=str(folder))
    skipped = [p.name for p in bad]
    if file:
        write_cache(file, key, feats, skipped)
    return feats, skipped


def read_cache(file: Path, key: str) -> tuple[np.ndarray, list[str]] | None:
    """Features and skipped names stored under `key`; None when absent, stale or damaged (then rebuilt)."""
    try:
        with np.load(file, allow_pickle=False) as z:
            return (z["features"], [str(s) for s in z["skipped"]]) if str(z["key"]) == key else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def write_cache(file: Path, key: str, feats: np.ndarray, skipped: list[str]) -> None:
    """Atomically (write_atomic); a cache that cannot be written is only a warning."""
    data = io.BytesIO()
    np.savez(data, key=np.array(key), features=feats, skipped=np.array(skipped, dtype=str))
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, data.getbuffer())
    except OSError as e:
        print(f"minicycle.fid: warning: cannot write the feature cache {file} ({e.strerror or e})", file=sys.stderr)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), in float64, exactly, in rank-aware form.

    With the centred features Aᵢ = (Xᵢ − 1μᵢᵀ) / √(nᵢ − 1) (nᵢ x d), Σᵢ = AᵢᵀAᵢ, Tr Σᵢ = ‖Aᵢ‖²_F, and since
    PQ and QP have the same nonzero eigenvalues (P = A₁ᵀ, Q = A₁Σ₂):

        eig(√Σ₁ Σ₂ √Σ₁) = eig(Σ₁Σ₂) = eig(A₁ᵀ · A₁A₂ᵀA₂) = eig(A₁A₂ᵀ · A₂A₁ᵀ) = σ(A₁A₂ᵀ)²   (off zero)

    so Tr((Σ₁Σ₂)^½) = Σⱼ σⱼ(A₁A₂ᵀ), the nuclear norm of an n₁ x n₂ matrix. Replacing each Aᵢ by the R of
    its QR decomposition (RᵢᵀRᵢ = AᵢᵀAᵢ, at most d x d) keeps that matrix at most d x d for any n. No
    matrix square root, no eigen-decomposition of a singular d x d matrix: when n < d (Σ singular) the
    value is still exact for the samples, and FID(X, X) = 0 to rounding.
    """
    a, b = feats_a.astype(np.float64), feats_b.astype(np.float64)
    ra, rb = (np.linalg.qr((x - x.mean(0)) / np.sqrt(len(x) - 1), mode="r") for x in (a, b))
    mean_term = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    cross = float(np.linalg.svd(ra @ rb.T, compute_uv=False).sum())
    return mean_term + float(np.sum(ra**2) + np.sum(rb**2)) - 2 * cross


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(u, v) = (u·v / d + 1)³ between the rows of x and y."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD² of two samples of size m from their kernel matrices:
    (Σ_{i≠j} k(xᵢ, xⱼ) + Σ_{i≠j} k(yᵢ, yⱼ)) / (m(m − 1)) − 2 Σ_{i,j} k(xᵢ, yⱼ) / m²."""
    m = len(kxx)
    within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
    return float(within / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 100,
                              max_subset: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): mean and standard deviation of `mmd2_unbiased` over `subsets` pairs of
    subsets of size min(n_a, n_b, max_subset), each drawn without replacement (seeded, so repeatable).
    Up to GRAM_LIMIT images in all, the kernel is computed once for all pairs and each subset reads its
    blocks; above, per subset (n² memory)."""
    a, b = feats_a.astype(np.float64), feats_b.astype(np.float64)
    m = min(len(a), len(b), max_subset)
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)) for _ in range(subsets)]
    joint = np.concatenate([a, b])
    gram = polynomial_kernel(joint, joint) if len(joint) <= GRAM_LIMIT else None
    values = []
    for ia, ib in draws:
        if gram is not None:
            ja, jb = ia, len(a) + ib
            blocks = gram[np.ix_(ja, ja)], gram[np.ix_(jb, jb)], gram[np.ix_(ja, jb)]
        else:
            x, y = a[ia], b[ib]
            blocks = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        values.append(mmd2_unbiased(*blocks))
    return float(np.mean(values)), float(np.std(values))


def score(feats_a: np.ndarray, feats_b: np.ndarray, name_a: str = "A", name_b: str = "B") -> dict:
    """FID and KID of two feature sets: {fid, kid_mean, kid_std, n_a, n_b}. A note on stderr when fewer
    images than feature dimensions make a covariance singular."""
    for feats, name in ((feats_a, name_a), (feats_b, name_b)):
        if len(feats) < 2:
            raise FidError(f"{name}: {len(feats)} readable image(s); FID and KID need at least 2 per set")
    few = min(len(feats_a), len(feats_b))
    if few < DIMS:
        print(f"minicycle.fid: note: {few} images < {DIMS} feature dimensions, so a covariance is singular; the FID is "
              f"still exact for these images, but it shrinks as images are added: compare FIDs over equal counts",
              file=sys.stderr)
    kid_mean, kid_std = kernel_inception_distance(feats_a, feats_b)
    return {"fid": frechet_distance(feats_a, feats_b), "kid_mean": kid_mean, "kid_std": kid_std,
            "n_a": len(feats_a), "n_b": len(feats_b)}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m minicycle.fid", description=__doc__.split("\n")[0])
    p.add_argument("dir_a", type=Path, metavar="DIR_A")
    p.add_argument("dir_b", type=Path, metavar="DIR_B")
    p.add_argument("--inception", help="the weights file pt_inception-2015-12-05-6726825d.pth (default: "
                                       "$MINICYCLE_INCEPTION, else torch's hub cache, else downloaded there)")
    p.add_argument("--json", action="store_true", help="print one JSON object: fid, kid_mean, kid_std, n_a, n_b")
    return p


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(argv)
    try:
        for folder in (opt.dir_a, opt.dir_b):
            list_images(folder)  # a bad folder fails before the weights are looked for
        inception = Inception.load(resolve_weights(opt.inception))
        feats = [folder_features(folder, inception, cache_dir())[0] for folder in (opt.dir_a, opt.dir_b)]
        result = score(*feats, name_a=str(opt.dir_a), name_b=str(opt.dir_b))
    except (FidError, WeightsError) as e:
        print(f"minicycle.fid: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, WeightsMissing) else 1
    if opt.json:
        print(json.dumps(result))
    else:
        print(f"{opt.dir_a}: {result['n_a']} images, {opt.dir_b}: {result['n_b']} images")
        print(f"FID {result['fid']:.4f}\nKID {result['kid_mean']:.6f} ± {result['kid_std']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
