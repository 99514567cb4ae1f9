"""The feature extractor of the standard FID protocol: Inception-v3 as in TensorFlow's 2015-12-05 graph,
in the PyTorch port whose weights file is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.

Module names follow that file's keys (torchvision's Inception3 naming). Where this net differs from
torchvision's Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture"):

- a 1008-way classifier (`fc`) and no auxiliary head; FID reads the 2048-d average pool before `fc`,
  so `fc` is checked for shape when loading and then dropped;
- BatchNorm eps 1e-3 (TF's), every conv without bias, each conv -> BN -> ReLU;
- the 3x3 average pools of the pool branches in Mixed_5b..5d, 6b..6e and 7b divide by the number of
  pixels inside the image (TF's SAME average pool: `count_include_pad=False`);
- Mixed_7c's pool branch is a 3x3 max pool (stride 1, pad 1), not an average pool, as in the TF graph.

Input: N x 3 x 299 x 299 in [-1, 1]. Output: N x 2048, the pool3 features.
The weights are not shipped: `resolve_weights` finds or downloads them.
"""

import hashlib
import http.client
import io
import os
import urllib.request
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from kernels.runtime import write_atomic

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
CLASSIFIER = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}  # in the file, unused by FID


class WeightsError(ValueError):
    """A weights file that cannot be read or has another layout; the message is one line."""


class WeightsMissing(WeightsError):
    """No weights file and no way to download it; the message says what to fetch and where to put it."""


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU; keys `conv.weight`, `bn.*`."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average over the pixels inside the image (TF's SAME padding ignores the border)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1, concatenated."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class MixedB(nn.Module):
    """Mixed_6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedC(nn.Module):
    """Mixed_6b..6e (17x17), factorised 7x7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg pool-1x1."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          dbl,
                          self.branch_pool(tf_avg_pool(x))], 1)


class MixedD(nn.Module):
    """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedE(nn.Module):
    """Mixed_7b/7c (8x8), expanded: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1, where the pool is
    TF's average pool in 7b and a 3x3 max pool in 7c (`max_pool`)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """299x299 images in [-1, 1] -> 2048-d pool3 features (the global average of Mixed_7c)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)  # 149
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)  # 147
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)  # 147, then max pool 3x3/2 -> 73
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)  # 71, then max pool 3x3/2 -> 35
        self.Mixed_5b = MixedA(192, pool_features=32)  # 256 channels
        self.Mixed_5c = MixedA(256, pool_features=64)  # 288
        self.Mixed_5d = MixedA(288, pool_features=64)  # 288
        self.Mixed_6a = MixedB(288)  # 768 x 17 x 17
        self.Mixed_6b = MixedC(768, c7=128)
        self.Mixed_6c = MixedC(768, c7=160)
        self.Mixed_6d = MixedC(768, c7=160)
        self.Mixed_6e = MixedC(768, c7=192)
        self.Mixed_7a = MixedD(768)  # 1280 x 8 x 8
        self.Mixed_7b = MixedE(1280, max_pool=False)  # 2048
        self.Mixed_7c = MixedE(2048, max_pool=True)  # 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def file_layout(net: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the weights file: the net's parameters and BN statistics plus the classifier.
    BatchNorm's `num_batches_tracked` counters may or may not be in a file; they do not affect eval."""
    layout = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    return layout | CLASSIFIER


def load_weights(path: Path) -> tuple[FIDInceptionV3, str]:
    """The net in eval mode with the file's weights, checked key by key and shape by shape, and the
    file's sha256 (the feature cache's key). Anything else is refused in one line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the Inception weights ({e.strerror or e})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed global ...
        raise WeightsError(f"{path}: not a readable weights file (truncated or corrupt? {type(e).__name__})") from None
    net = FIDInceptionV3()
    check_layout(path, state, file_layout(net))
    net.load_state_dict({k: v for k, v in state.items() if k not in CLASSIFIER}, strict=False)
    return net.eval().requires_grad_(False), hashlib.sha256(data).hexdigest()


def check_layout(path: Path, state: object, layout: dict[str, tuple[int, ...]]) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise WeightsError(f"{path}: not a state_dict of tensors, so not {WEIGHTS_NAME}")
    keys = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(layout.keys() - keys), sorted(keys - layout.keys())
    if missing or unexpected:
        hint = " (a torchvision Inception-v3? FID needs the TF-ported weights)" if any(
            k.startswith("AuxLogits.") for k in unexpected) else ""
        raise WeightsError(f"{path}: not the FID Inception weights {WEIGHTS_NAME}{hint}: "
                           f"{len(missing)} keys missing (e.g. {missing[:2]}), "
                           f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for k, shape in layout.items():
        if tuple(state[k].shape) != shape:
            raise WeightsError(f"{path}: not the FID Inception weights {WEIGHTS_NAME}: {k} has shape "
                               f"{tuple(state[k].shape)}, expected {shape}")


def download(url: str, dest: Path) -> None:
    """Fetch `url` into memory, then into `dest` with write_atomic: nothing is written unless the whole file came."""
    data = io.BytesIO()
    with urllib.request.urlopen(url, timeout=30) as response:
        size = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := response.read(1 << 20):
                data.write(chunk)
                bar.update(len(chunk))
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, data.getbuffer())


def resolve_weights(given: str | None) -> Path:
    """The weights file: `given` (--inception), else $MINICYCLE_INCEPTION, else torch's hub cache, else
    downloaded there by `download` (looked up when called, so tests replace it). When that fails:
    WeightsMissing saying what to fetch, from where, and where to put it."""
    env = os.environ.get("MINICYCLE_INCEPTION")
    if given or env:
        path, source = (given, "--inception") if given else (env, "MINICYCLE_INCEPTION")
        if not Path(path).is_file():
            raise WeightsMissing(f"{source} {path}: Inception weights file not found (download: {WEIGHTS_URL})")
        return Path(path)
    dest = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME  # where torch.hub (and pytorch-fid) keeps it
    if dest.is_file():
        return dest
    try:
        download(WEIGHTS_URL, dest)
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, HTTP errors, a cut-off read, a full disk
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise WeightsMissing(f"Inception weights {WEIGHTS_NAME} not found and not downloadable ({reason}): "
                             f"fetch {WEIGHTS_URL} and save it as {dest}, or pass --inception FILE") from None
    return dest
