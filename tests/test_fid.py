"""FID and KID (minicycle/fid.py) and the FID Inception-v3 (minicycle/inception.py).

The real weights are never needed: random weights in the official key layout stand in for them, and
pytorch-fid (a test-only dependency that .ci/run installs) loaded with the same weights is the
independent reference for the features, the reading of images and the FID. The maths are checked
against closed forms, and nothing here touches the network.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import infer
from minicycle import fid, inception, networks

ROOT = Path(__file__).resolve().parents[1]
DOWNLOAD = inception.download  # the real one, before the autouse fixture replaces the module's


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No download, and neither the user's torch hub nor their feature cache."""
    def no_network(url, dest):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(inception, "download", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MINICYCLE_INCEPTION", raising=False)


# ---- fixtures: random weights in the file's layout, small folders of odd images ----

def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the keys and shapes of pt_inception-2015-12-05-6726825d.pth: He-scaled convs and
    BatchNorm statistics and affines of order one, so that features neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in inception.FIDInceptionV3().state_dict().items():
        if k.endswith("conv.weight"):
            v = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith(("bn.weight", "bn.running_var")):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("bn.bias", "bn.running_mean")):
            v = 0.1 * torch.randn(v.shape, generator=g)
        state[k] = v
    state["fc.weight"] = 0.01 * torch.randn(1008, 2048, generator=g)
    state["fc.bias"] = torch.zeros(1008)
    return state


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_state()


@pytest.fixture(scope="module")
def weights(state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / inception.WEIGHTS_NAME
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def net(weights) -> fid.Inception:
    return fid.Inception.load(weights, torch.device("cpu"))


def noise(w: int, h: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def odd_images(seed: int) -> dict[str, Image.Image]:
    """One image per awkward case: grayscale, RGBA with hidden colours, palette, grayscale+alpha, 16-bit,
    CMYK JPEG, and an RGB image larger than the net's input (so the resize shrinks it: no antialiasing)."""
    rgba = noise(31, 17, seed, 4)
    rgba[..., 3] = np.where(np.arange(31) % 2, 0, 255)  # half the columns fully transparent
    return {"gray.png": Image.fromarray(noise(24, 24, seed + 1, 1), "L"),
            "rgba.png": Image.fromarray(rgba, "RGBA"),
            "palette.png": Image.fromarray(noise(20, 28, seed + 2)).convert("P", palette=Image.ADAPTIVE),
            "la.png": Image.fromarray(noise(18, 22, seed + 3, 1), "L").convert("LA"),
            "deep.png": Image.fromarray(noise(19, 21, seed + 4, 1).astype(np.uint16) * 2),  # I;16
            "cmyk.jpg": Image.fromarray(noise(33, 33, seed + 5)).convert("CMYK"),
            "rgb.png": Image.fromarray(noise(400, 330, seed + 6))}  # larger than 299: downscaled


def image_folder(folder: Path, images: dict[str, Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        img.save(folder / name)
    return folder


def rgb_folder(folder: Path, n: int, seed: int, size=(16, 12)) -> Path:
    return image_folder(folder, {f"{i}.png": Image.fromarray(noise(*size, seed + i)) for i in range(n)})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    a = image_folder(root / "a", dict(list(odd_images(0).items())[:4]))
    b = image_folder(root / "b", dict(list(odd_images(10).items())[3:]))
    return a, b


# ---- the independent reference: pytorch-fid with the same weights ----

def conv_bn(module: nn.Module, **convs: tuple) -> None:
    """torchvision's BasicConv2d for each name: (in, out, kernel[, padding[, stride]])."""
    for name, (cin, cout, kernel, *rest) in convs.items():
        padding, stride = rest[0] if rest else 0, rest[1] if len(rest) > 1 else 1
        setattr(module, name, BasicConv2d(cin, cout, kernel_size=kernel, padding=padding, stride=stride))


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    def __init__(self, c, pool_features):
        super().__init__()
        conv_bn(self, branch1x1=(c, 64, 1), branch5x5_1=(c, 48, 1), branch5x5_2=(48, 64, 5, 2),
                branch3x3dbl_1=(c, 64, 1), branch3x3dbl_2=(64, 96, 3, 1), branch3x3dbl_3=(96, 96, 3, 1),
                branch_pool=(c, pool_features, 1))


class InceptionB(nn.Module):
    def __init__(self, c):
        super().__init__()
        conv_bn(self, branch3x3=(c, 384, 3, 0, 2), branch3x3dbl_1=(c, 64, 1), branch3x3dbl_2=(64, 96, 3, 1),
                branch3x3dbl_3=(96, 96, 3, 0, 2))

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c, channels_7x7):
        super().__init__()
        c7, w, t = channels_7x7, (1, 7), (7, 1)
        conv_bn(self, branch1x1=(c, 192, 1), branch7x7_1=(c, c7, 1), branch7x7_2=(c7, c7, w, (0, 3)),
                branch7x7_3=(c7, 192, t, (3, 0)), branch7x7dbl_1=(c, c7, 1), branch7x7dbl_2=(c7, c7, t, (3, 0)),
                branch7x7dbl_3=(c7, c7, w, (0, 3)), branch7x7dbl_4=(c7, c7, t, (3, 0)),
                branch7x7dbl_5=(c7, 192, w, (0, 3)), branch_pool=(c, 192, 1))


class InceptionD(nn.Module):
    def __init__(self, c):
        super().__init__()
        conv_bn(self, branch3x3_1=(c, 192, 1), branch3x3_2=(192, 320, 3, 0, 2), branch7x7x3_1=(c, 192, 1),
                branch7x7x3_2=(192, 192, (1, 7), (0, 3)), branch7x7x3_3=(192, 192, (7, 1), (3, 0)),
                branch7x7x3_4=(192, 192, 3, 0, 2))

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, c):
        super().__init__()
        conv_bn(self, branch1x1=(c, 320, 1), branch3x3_1=(c, 384, 1), branch3x3_2a=(384, 384, (1, 3), (0, 1)),
                branch3x3_2b=(384, 384, (3, 1), (1, 0)), branch3x3dbl_1=(c, 448, 1),
                branch3x3dbl_2=(448, 384, 3, 1), branch3x3dbl_3a=(384, 384, (1, 3), (0, 1)),
                branch3x3dbl_3b=(384, 384, (3, 1), (1, 0)), branch_pool=(c, 192, 1))


class Inception3(nn.Module):
    """torchvision's module tree without the auxiliary head (pytorch-fid asks for aux_logits=False)."""

    def __init__(self, num_classes=1000, aux_logits=True, **_):
        super().__init__()
        assert not aux_logits
        conv_bn(self, Conv2d_1a_3x3=(3, 32, 3, 0, 2), Conv2d_2a_3x3=(32, 32, 3), Conv2d_2b_3x3=(32, 64, 3, 1),
                Conv2d_3b_1x1=(64, 80, 1), Conv2d_4a_3x3=(80, 192, 3))
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280), InceptionE(2048)
        self.fc = nn.Linear(2048, num_classes)


class ToTensor:
    def __call__(self, pic):
        return torch.from_numpy(np.array(pic, np.uint8, copy=True)).permute(2, 0, 1).contiguous().float().div(255)


def torchvision_stand_in() -> dict[str, types.ModuleType]:
    """What pytorch-fid 0.3.0 takes from torchvision (0.13 or later), nothing more: the Inception3 module tree
    (hence the weights' keys) from inception_v3(), the InceptionA..E blocks (the forward of B and D; FID's
    own classes override A, C and E's), and transforms.ToTensor. For machines whose torchvision does not
    load (the registry's wheel is a CUDA build)."""
    tv, models, inc, tf = (types.ModuleType(n) for n in ("torchvision", "torchvision.models",
                                                          "torchvision.models.inception", "torchvision.transforms"))
    tv.__version__ = "0.17.0"
    for cls in (BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE, Inception3):
        setattr(inc, cls.__name__, cls)
    models.inception = inc
    models.inception_v3 = lambda weights=None, init_weights=None, **kw: Inception3(**kw)
    tf.ToTensor = ToTensor
    tv.models, tv.transforms = models, tf
    return {m.__name__: m for m in (tv, models, inc, tf)}


@pytest.fixture(scope="module")
def reference(state):
    """pytorch-fid's InceptionV3 (pool3 block) holding `state`. `state` has our net's keys and shapes, and
    pytorch-fid loads it with a strict load_state_dict, so building this checks our key layout too."""
    pytest.importorskip("pytorch_fid")
    saved = dict(sys.modules)
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or a build whose C extension does not load against this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules.update(torchvision_stand_in())
    import pytorch_fid.inception as pfi

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda url, progress=True: dict(state))
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    yield model
    for name in set(sys.modules) - set(saved):
        del sys.modules[name]
    sys.modules.update(saved)


def reference_features(model, paths: list[Path]) -> np.ndarray:
    """pytorch-fid's reading (Image.open(path).convert('RGB'), ToTensor) and its model, one image at a time."""
    import torchvision.transforms as TF

    with torch.no_grad():
        return np.stack([model(TF.ToTensor()(Image.open(p).convert("RGB"))[None])[0].flatten().numpy()
                         for p in paths])


@pytest.mark.slow  # two Inception nets on 8 images: ~15 s on 2 cores
def test_features_match_pytorch_fid(net, reference, folders):
    paths = [p for folder in folders for p in fid.list_images(folder)]
    ours, skipped = net.features(paths, desc="test")
    theirs = reference_features(reference, paths)
    assert not skipped and ours.shape == theirs.shape == (len(paths), 2048)
    assert np.abs(theirs).max() > 0.1 and theirs.std(0).mean() > 1e-2  # the random net gives real features
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


@pytest.mark.slow  # scipy's 2048 x 2048 sqrtm
def test_fid_and_kid_match_pytorch_fid(net, reference, folders):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")  # imports scipy
    files = [fid.list_images(folder) for folder in folders]
    acts = [fid_score.get_activations(f, reference, batch_size=1, num_workers=0) for f in files]
    stats = [(np.mean(a, axis=0), np.cov(a, rowvar=False)) for a in acts]
    expected = fid_score.calculate_frechet_distance(*stats[0], *stats[1])
    result = fid.score(*[fid.folder_features(folder, net, None)[0] for folder in folders])
    assert result["n_a"] == result["n_b"] == 4
    assert result["fid"] == pytest.approx(expected, rel=1e-5)
    # Equal sizes below 1000: every subset is the whole set, so KID is MMD²_u of the sets, here by its definition.
    k = lambda x, y: (x @ y / 2048 + 1) ** 3  # noqa: E731
    x, y = acts
    within = sum(k(p[i], p[j]) for p in (x, y) for i in range(4) for j in range(4) if i != j) / 12
    cross = sum(k(x[i], y[j]) for i in range(4) for j in range(4)) / 16
    assert result["kid_mean"] == pytest.approx(within - 2 * cross, rel=1e-5)
    assert result["kid_std"] <= 1e-9 * abs(result["kid_mean"])


# ---- the weights file ----

def test_weights_without_batch_counters_load(state, tmp_path):
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "w.pth")
    loaded, _ = inception.load_weights(tmp_path / "w.pth")
    assert torch.equal(loaded.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])


def torchvision_like(state: dict) -> dict:
    """A torchvision Inception-v3 state_dict: 1000 classes and an auxiliary head."""
    out = {k: v for k, v in state.items() if not k.startswith("fc.")}
    out |= {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
            "AuxLogits.conv0.conv.weight": torch.zeros(128, 768, 1, 1), "AuxLogits.fc.weight": torch.zeros(1000, 768)}
    return out


@pytest.mark.parametrize("make, needles", [
    (lambda s, p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), ["truncated or corrupt"]),
    (lambda s, p: torch.save(torchvision_like(s), p), ["torchvision", "unexpected", "AuxLogits"]),
    (lambda s, p: torch.save(s | {"Mixed_6b.branch1x1.conv.weight": torch.zeros(192, 768, 3, 3)}, p),
     ["Mixed_6b.branch1x1.conv.weight", "(192, 768, 3, 3)", "(192, 768, 1, 1)"]),
    (lambda s, p: torch.save(torch.zeros(3), p), ["not a state_dict"]),
], ids=["truncated", "torchvision", "shape", "tensor"])
def test_bad_weights_refused_in_one_line(make, needles, state, weights, folders, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    shutil.copy(weights, bad)
    make(state, bad)
    line = expect_error(capsys, [*map(str, folders), "--inception", str(bad)], 1, str(bad))
    for needle in needles:
        assert needle in line


def test_missing_weights_offline_says_what_to_fetch_and_writes_nothing(folders, tmp_path, monkeypatch, capsys):
    def unreachable(url, dest):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(inception, "download", unreachable)
    line = expect_error(capsys, list(map(str, folders)), 2, inception.WEIGHTS_URL,
                        str(tmp_path / "torch" / "hub" / "checkpoints" / inception.WEIGHTS_NAME), "name resolution")
    assert not (tmp_path / "torch").exists() and not (tmp_path / "cache").exists(), line
    expect_error(capsys, [*map(str, folders), "--inception", str(tmp_path / "none.pth")], 2, "--inception",
                 "none.pth", "not found")
    monkeypatch.setenv("MINICYCLE_INCEPTION", str(tmp_path / "gone.pth"))
    expect_error(capsys, list(map(str, folders)), 2, "MINICYCLE_INCEPTION", "gone.pth", "not found")


def test_real_download_opens_the_url_before_writing(tmp_path, monkeypatch):
    def unreachable(url, timeout):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(inception.urllib.request, "urlopen", unreachable)
    with pytest.raises(urllib.error.URLError):
        DOWNLOAD(inception.WEIGHTS_URL, tmp_path / "hub" / "checkpoints" / inception.WEIGHTS_NAME)
    assert not (tmp_path / "hub").exists()


def test_weights_found_in_the_hub_cache_or_downloaded_there(weights, tmp_path, monkeypatch, capsys):
    folders = rgb_folder(tmp_path / "a", 2, seed=0), rgb_folder(tmp_path / "b", 2, seed=5)
    fetched = []
    monkeypatch.setattr(inception, "download", lambda url, dest: fetched.append(url) or shutil.copy(weights, dest))
    dest = tmp_path / "torch" / "hub" / "checkpoints" / inception.WEIGHTS_NAME
    dest.parent.mkdir(parents=True)
    assert fid.main([*map(str, folders), "--json"]) == 0
    assert fetched == [inception.WEIGHTS_URL] and dest.is_file()
    first = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert fid.main([*map(str, folders), "--json"]) == 0 and len(fetched) == 1  # found there now
    monkeypatch.setenv("MINICYCLE_INCEPTION", str(weights))
    dest.unlink()
    assert fid.main([*map(str, folders), "--json"]) == 0 and len(fetched) == 1
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == first


# ---- the maths ----

def with_moments(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n points whose sample mean and (n-1)-normalised sample covariance are exactly `mean` and `cov`."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # now cov(z) = I
    return mean + z @ np.linalg.cholesky(cov).T


def random_cov(d: int, seed: int) -> np.ndarray:
    m = np.random.default_rng(seed).standard_normal((d, d))
    return m @ m.T / d + 0.1 * np.eye(d)


def test_fid_of_gaussians_is_the_closed_form():
    # d = 2, any covariances: Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for a 2x2 M with eigenvalues >= 0.
    s1, s2, mu1, mu2 = random_cov(2, 0), random_cov(2, 1), np.array([1.0, -2.0]), np.array([0.5, 0.5])
    m = s1 @ s2
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    got = fid.frechet_distance(with_moments(mu1, s1, 50, 2), with_moments(mu2, s2, 40, 3))
    assert got == pytest.approx(expected, rel=1e-10)
    # d = 64 (more images than dimensions: the QR path), Σ₂ = c²Σ₁: FID = ‖Δμ‖² + (1 - c)² Tr Σ₁.
    s, c, shift = random_cov(64, 4), 1.7, np.full(64, 0.3)
    got = fid.frechet_distance(with_moments(np.zeros(64), s, 200, 5), with_moments(shift, c**2 * s, 150, 6))
    assert got == pytest.approx(64 * 0.09 + (1 - c) ** 2 * np.trace(s), rel=1e-10)


def eigh_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook form in float64: Tr sqrt(sqrt(Σ₁) Σ₂ sqrt(Σ₁)) by two symmetric eigen-decompositions."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_fid_with_fewer_images_than_dimensions(capsys):
    rng = np.random.default_rng(0)
    a, b = rng.random((7, 128)).astype(np.float32), (1.1 * rng.random((5, 128))).astype(np.float32)
    got = fid.frechet_distance(a, b)
    assert np.isfinite(got) and got == pytest.approx(eigh_fid(a.astype(np.float64), b.astype(np.float64)), rel=1e-6)
    a, b = rng.random((7, 2048)), rng.random((5, 2048))
    assert np.isfinite(fid.score(a, b)["fid"]) and "singular" in capsys.readouterr().err
    assert abs(fid.frechet_distance(a, a)) <= 1e-5 * fid.frechet_distance(a, b)
    many = rng.random((100, 64))
    assert abs(fid.frechet_distance(many, many)) <= 1e-5 * fid.frechet_distance(many, rng.random((100, 64)))


def kernel(x: np.ndarray, y: np.ndarray) -> float:
    return (float(np.dot(x, y)) / len(x) + 1) ** 3


def population_mmd2(a: np.ndarray, b: np.ndarray) -> float:
    """What MMD²_u of subsets drawn without replacement from `a` and `b` averages to: the mean kernel over
    distinct pairs within each set, minus twice the mean over all cross pairs."""
    within = sum(np.mean([kernel(p[i], p[j]) for i in range(len(p)) for j in range(len(p)) if i != j])
                 for p in (a, b))
    return within - 2 * np.mean([kernel(x, y) for x in a for y in b])


def test_kid_is_unbiased_on_a_known_answer():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)) + 0.5
    exact = population_mmd2(a, b)
    k = fid.polynomial_kernel
    every = [fid.mmd2_unbiased(k(x, x), k(y, y), k(x, y)) for s in itertools.combinations(range(5), 3)
             for t in itertools.combinations(range(4), 3) for x, y in [(a[list(s)], b[list(t)])]]
    assert np.mean(every) == pytest.approx(exact, rel=1e-12)  # the expectation over all subset pairs
    mean, std = fid.kernel_inception_distance(a, b, subsets=4000, max_subset=3)
    assert std > 0 and abs(mean - exact) < 4 * std / np.sqrt(4000)
    assert fid.kernel_inception_distance(a, b, subsets=50, max_subset=3) == fid.kernel_inception_distance(
        a, b, subsets=50, max_subset=3)  # seeded


def test_kid_per_subset_kernels_match_the_joint_kernel(monkeypatch):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((30, 16)), rng.standard_normal((20, 16)) + 0.2
    joint = fid.kernel_inception_distance(a, b, max_subset=12)
    monkeypatch.setattr(fid, "GRAM_LIMIT", 0)
    assert fid.kernel_inception_distance(a, b, max_subset=12) == pytest.approx(joint, rel=1e-12)


def test_kid_of_whole_equal_sets_has_no_spread():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
    mean, std = fid.kernel_inception_distance(a, b)
    assert mean == pytest.approx(population_mmd2(a, b), rel=1e-12) and std < 1e-12


# ---- reading images ----

def test_images_are_read_as_pytorch_fid_reads_them(tmp_path):
    images = odd_images(0)
    folder = image_folder(tmp_path, images)
    for name in images:
        x = fid.read_image(folder / name)
        expected = np.asarray(Image.open(folder / name).convert("RGB"), dtype=np.float32) / 255
        assert x.dtype == torch.float32 and np.array_equal(x.permute(1, 2, 0).numpy(), expected), name
    rgba = np.asarray(images["rgba.png"])
    x = fid.read_image(folder / "rgba.png")  # alpha dropped, the hidden colours kept (not composited)
    assert np.array_equal((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), rgba[..., :3])
    gray = fid.read_image(folder / "gray.png")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_exif_orientation_is_not_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.fromarray(noise(40, 20, 0)).save(tmp_path / "r.jpg", exif=exif)
    assert fid.read_image(tmp_path / "r.jpg").shape == (3, 20, 40)


def test_resize_is_bilinear_without_antialias():
    x = torch.rand(1, 3, 600, 500)
    y = fid.inception_input(x)
    assert y.shape == (1, 3, 299, 299) and -1 <= y.min() and y.max() <= 1
    assert torch.allclose(y, 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
    assert not torch.allclose(y, 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False,
                                                   antialias=True) - 1, atol=1e-3)


# ---- folders, the cache and the command line ----

class Stub(nn.Module):
    """Stands in for the Inception net where only the plumbing is tested: 2048 pixels of the input."""

    def forward(self, x):
        return x.flatten(1)[:, ::131][:, :2048]


def stub(sha: str = "0" * 64) -> fid.Inception:
    return fid.Inception(Stub(), sha, torch.device("cpu"))


def test_cache_extracts_a_folder_once_until_a_file_changes(tmp_path, monkeypatch):
    folder = rgb_folder(tmp_path / "f", 3, seed=0)
    runs = []
    features = fid.Inception.features
    monkeypatch.setattr(fid.Inception, "features", lambda self, paths, desc: runs.append(len(paths)) or
                        features(self, paths, desc))
    cache = fid.cache_dir()
    first, _ = fid.folder_features(folder, stub(), cache)
    again, _ = fid.folder_features(folder, stub(), cache)
    assert runs == [3] and np.array_equal(first, again) and cache == tmp_path / "cache" / "minicycle" / "fid"
    st = (folder / "1.png").stat()
    os.utime(folder / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched
    fid.folder_features(folder, stub(), cache)
    assert runs == [3, 3]
    fid.folder_features(folder, stub("1" * 64), cache)  # other weights
    Image.fromarray(noise(16, 12, 9)).save(folder / "3.png")  # a file added
    fid.folder_features(folder, stub(), cache)
    assert runs == [3, 3, 3, 4]
    fid.folder_features(folder, stub(), cache)
    assert runs == [3, 3, 3, 4]
    for damaged in cache.glob("*.npz"):
        damaged.write_bytes(b"PK\x03\x04 cut short")
    fid.folder_features(folder, stub(), cache)
    assert runs == [3, 3, 3, 4, 4]


def test_unwritable_cache_is_a_warning(tmp_path, capsys):
    folder = rgb_folder(tmp_path / "f", 2, seed=0)
    (tmp_path / "file").write_text("")
    feats, _ = fid.folder_features(folder, stub(), tmp_path / "file" / "cache")
    assert feats.shape == (2, 2048) and "warning: cannot write the feature cache" in capsys.readouterr().err


def test_unreadable_images_are_skipped_with_a_warning(tmp_path, capsys):
    folder = rgb_folder(tmp_path / "f", 2, seed=0)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image")
    feats, skipped = fid.folder_features(folder, stub(), fid.cache_dir())
    assert feats.shape == (2, 2048) and skipped == ["broken.png"]
    err = capsys.readouterr().err
    assert "warning: cannot read image" in err and "broken.png" in err and "skipping it" in err
    fid.folder_features(folder, stub(), fid.cache_dir())  # from the cache: warned again
    assert "broken.png" in capsys.readouterr().err


def expect_error(capsys, argv: list[str], code: int, *needles: str) -> str:
    """fid.main(argv) exits `code` with one line on stderr, `minicycle.fid: error: ...`, holding each needle."""
    capsys.readouterr()
    try:
        got = fid.main(argv)
    except SystemExit as e:
        got = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == code and lines and "Traceback" not in err, err
    errors = [line for line in lines if " error: " in line]
    assert errors == [lines[-1]] and lines[-1].startswith(("minicycle.fid: error: ", "python -m minicycle.fid:")), err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def test_bad_folders_one_line(weights, tmp_path, capsys):
    good = str(rgb_folder(tmp_path / "good", 2, seed=0))
    w = ["--inception", str(weights)]
    expect_error(capsys, [good, str(tmp_path / "nope")] + w, 1, "nope", "no such folder")
    (tmp_path / "file.png").write_bytes(b"")
    expect_error(capsys, [str(tmp_path / "file.png"), good] + w, 1, "file.png", "not a folder")
    (tmp_path / "empty").mkdir()
    expect_error(capsys, [str(tmp_path / "empty"), good] + w, 1, "empty", "no images")
    one = rgb_folder(tmp_path / "one", 1, seed=0)
    (one / "bad.jpg").write_bytes(b"junk")
    expect_error(capsys, [str(one), good] + w, 1, "one", "1 readable image", "at least 2")
    expect_error(capsys, [good], 2, "DIR_B")


def test_cli_prints_fid_and_kid_last(folders, weights, capsys):
    assert fid.main([*map(str, folders), "--inception", str(weights)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    name, value = out[-2].split()
    assert name == "FID" and float(value) > 0
    kid, mean, pm, std = out[-1].split()
    assert (kid, pm) == ("KID", "±") and float(std) >= 0
    assert fid.main([*map(str, folders), "--inception", str(weights), "--json"]) == 0  # from the cache now
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"fid", "kid_mean", "kid_std", "n_a", "n_b"} and (result["n_a"], result["n_b"]) == (4, 4)
    assert f"{result['fid']:.4f}" == value and f"{result['kid_mean']:.6f}" == mean


@pytest.mark.slow
def test_cli_entry_point(folders, weights, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "cache"), "TORCH_HOME": str(tmp_path / "t"),
           "OMP_NUM_THREADS": "1", "MINICYCLE_INCEPTION": str(weights)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "minicycle.fid", *a], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    ok = run(*map(str, folders))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-2].startswith("FID ") and ok.stdout.splitlines()[-1].startswith("KID ")
    bad = run(str(folders[0]), str(tmp_path / "nope"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("minicycle.fid: error: ")


# ---- infer.py --fid ----

@pytest.fixture
def translated(tmp_path) -> tuple[Path, Path]:
    """A dataroot with 3 test images per domain, and a tiny random generator."""
    root = tmp_path / "data"
    rgb_folder(root / "testA", 3, seed=0)
    rgb_folder(root / "testB", 3, seed=10)
    gen = tmp_path / "g.pth"
    torch.save(networks.define_G(3, 3, 4, "resnet_6blocks").state_dict(), gen)
    return root, gen


def test_infer_fid_scores_the_translations(translated, weights, tmp_path, capsys, torch_path):
    root, gen = translated
    args = ["--dataroot", str(root), "--checkpoint", str(gen), "--results_dir", str(tmp_path / "r"),
            "--load_size", "32", "--device", "cpu", "--fid", "--inception", str(weights)]
    assert infer.main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("FID ") and f"3 translations vs 3 images of {root / 'testB'}" in line
    page = (tmp_path / "r" / "experiment_name" / "test_latest" / "index.html").read_text()
    assert line in page
    fakes = image_folder(tmp_path / "fakes", {p.name: Image.open(p) for p in
                                              (tmp_path / "r").rglob("*_fake.png")})
    assert fid.main([str(fakes), str(root / "testB"), "--inception", str(weights), "--json"]) == 0
    assert line.split(",")[0] == f"FID {json.loads(capsys.readouterr().out)['fid']:.2f}"


def test_infer_fid_needs_a_dataroot_and_weights_first(translated, tmp_path, capsys, monkeypatch, torch_path):
    root, gen = translated
    base = ["--checkpoint", str(gen), "--results_dir", str(tmp_path / "r"), "--load_size", "32", "--fid"]
    assert infer.main(base + ["--input", str(root / "testA"), "--output", str(tmp_path / "o")]) == 1
    assert "--fid needs --dataroot" in capsys.readouterr().err
    monkeypatch.setattr(inception, "download", lambda url, dest: (_ for _ in ()).throw(OSError("offline")))
    assert infer.main(base + ["--dataroot", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and inception.WEIGHTS_URL in err[0] and not (tmp_path / "r").exists()
    shutil.rmtree(root / "testB")
    assert infer.main(base + ["--dataroot", str(root)]) == 1
    assert "testB: no such folder" in capsys.readouterr().err
