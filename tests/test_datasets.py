"""minicycle.datasets: the synthetic dataset, download() against a local server, the CLI."""

import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicycle.data import DataError
from minicycle.datasets import (
    OFFICIAL_DATASETS,
    SYNTHETIC_SIZES,
    download,
    ensure_synthetic,
    missing_dataroot_message,
    swap_rb,
    truth_folder,
)

REPO = Path(__file__).resolve().parents[1]


def load_all(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]).astype(int)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic")


# ---- synthetic dataset ----


def test_synthetic_layout(synthetic):
    for split, n in SYNTHETIC_SIZES.items():
        names = sorted(p.name for p in (synthetic / split).iterdir())
        assert names == [f"{i:04d}.png" for i in range(n)]
    for split in ("testA", "testB"):
        assert sorted(p.name for p in (synthetic / "truth" / split).iterdir()) == [f"{i:04d}.png" for i in range(60)]
    assert "swaps the red and blue" in (synthetic / "README.txt").read_text()
    assert [p.name for p in synthetic.parent.iterdir()] == ["synthetic"]  # no temp folders left
    img = Image.open(synthetic / "trainA" / "0000.png")
    assert img.mode == "RGB" and img.size == (32, 32)


def test_synthetic_domains_and_truth(synthetic):
    trainA, trainB = load_all(synthetic / "trainA"), load_all(synthetic / "trainB")
    testA, testB = load_all(synthetic / "testA"), load_all(synthetic / "testB")
    assert trainA.shape == (400, 32, 32, 3) and testB.shape == (60, 32, 32, 3)
    for warm in (trainA, testA):  # red above blue at every pixel, by a clear margin
        assert (warm[..., 0] - warm[..., 2]).min() >= 20
    for cool in (trainB, testB):
        assert (cool[..., 2] - cool[..., 0]).min() >= 20
    assert np.array_equal(load_all(synthetic / "truth" / "testA"), swap_rb(testA))
    assert np.array_equal(load_all(synthetic / "truth" / "testB"), swap_rb(testB))
    assert not any(np.array_equal(swap_rb(a), b) for a, b in zip(trainA, trainB))  # unpaired
    assert len({a.tobytes() for a in trainA}) == 400
    assert trainA.std() > 40  # varied scenes, not flat colour
    identity_error = np.abs(testA - swap_rb(testA)).mean()
    assert 60 < identity_error < 110  # the do-nothing baseline a trained G_A must beat


def test_synthetic_second_call_is_noop(synthetic):
    before = (synthetic / "trainA" / "0000.png").stat().st_mtime_ns
    t = time.perf_counter()
    assert ensure_synthetic(synthetic) == synthetic
    assert time.perf_counter() - t < 0.05
    assert (synthetic / "trainA" / "0000.png").stat().st_mtime_ns == before


@pytest.mark.slow
def test_synthetic_regenerates_incomplete_or_stale(tmp_path, synthetic):
    root = tmp_path / "synthetic"
    root.mkdir()
    (root / "trainA").mkdir()
    (root / "leftover.png").write_bytes(b"x")  # a half-written folder without a stamp
    assert ensure_synthetic(root) == root
    assert not (root / "leftover.png").exists()
    assert np.array_equal(load_all(root / "testB"), load_all(synthetic / "testB"))  # deterministic
    (root / "STAMP").write_text("minicycle-synthetic v0\n")  # an older version
    (root / "leftover.png").write_bytes(b"x")
    ensure_synthetic(root)
    assert not (root / "leftover.png").exists() and (root / "STAMP").read_text() != "minicycle-synthetic v0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_truth_folder(synthetic, tmp_path):
    assert truth_folder(synthetic, "AtoB") == synthetic / "truth" / "testA"
    assert truth_folder(synthetic, "BtoA") == synthetic / "truth" / "testB"
    assert truth_folder(tmp_path, "AtoB") is None
    with pytest.raises(ValueError):
        truth_folder(synthetic, "AtoC")


# ---- messages ----


def test_missing_dataroot_message():
    msg = missing_dataroot_message("/data/horse2zebra/")
    assert "/data/horse2zebra does not exist" in msg
    assert "python -m minicycle.datasets download horse2zebra" in msg and "./datasets/horse2zebra" in msg
    other = missing_dataroot_message("/data/my_photos")
    assert "/data/my_photos does not exist" in other and "download" not in other
    assert "python -m minicycle.datasets synthetic" in missing_dataroot_message("datasets/synthetic")
    assert all("\n" not in m for m in (msg, other))


# ---- download ----


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over tmp_path/srv; yields (base_url, folder)."""
    srv = tmp_path / "srv"
    srv.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=srv))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", srv
    httpd.shutdown()
    httpd.server_close()


def test_download_from_local_server(server, tmp_path, capsys):
    base_url, srv = server
    with zipfile.ZipFile(srv / "mini.zip", "w") as z:
        for split in ("trainA", "trainB", "testA", "testB"):
            z.writestr(f"mini/{split}/0.png", b"png bytes")
    root = tmp_path / "datasets"
    dest = download("mini", root=root, base_url=base_url)
    assert dest == root / "mini"
    assert sorted(p.name for p in dest.iterdir()) == ["testA", "testB", "trainA", "trainB"]
    assert [p.name for p in root.iterdir()] == ["mini"]  # no temp files left
    capsys.readouterr()
    assert download("mini", root=root, base_url=base_url) == dest
    assert "already present" in capsys.readouterr().out


def test_download_errors(server, tmp_path):
    base_url, srv = server
    root = tmp_path / "datasets"
    with pytest.raises(DataError, match="unknown dataset 'cityscapes'.*horse2zebra"):
        download("cityscapes", root=root, base_url=base_url)
    with pytest.raises(DataError, match="could not reach .*/facades.zip.*404") as e:
        download("facades", root=root, base_url=base_url)
    assert "\n" not in str(e.value)
    (srv / "maps.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="maps.zip did not give a valid zip"):
        download("maps", root=root, base_url=base_url)
    assert list(root.iterdir()) == []  # nothing half-done left behind


def test_download_offline(tmp_path):
    with socket.socket() as s:  # a port that was just free, so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=f"could not reach http://127.0.0.1:{port}/mini.zip") as e:
        download("mini", root=tmp_path, base_url=f"http://127.0.0.1:{port}")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


# ---- CLI ----


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "minicycle.datasets", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_cli_synthetic_and_errors(tmp_path):
    r = run_cli("synthetic", "--root", str(tmp_path / "d"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / "synthetic" / "STAMP").is_file() and "synthetic" in r.stdout
    r = run_cli("download", "nosuch", "--root", str(tmp_path / "d"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown dataset 'nosuch'") and "\n" not in r.stderr.strip()
    assert "Traceback" not in r.stderr
    assert OFFICIAL_DATASETS[0] in r.stderr
