"""train.py and infer.py through their real entry points, on tiny images."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors

import infer
import train
from minicycle import datasets, networks
from minicycle.checkpoint import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks", "--load_size", "32", "--crop_size", "32",
        "--num_threads", "0", "--pool_size", "2", "--print_freq", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory) -> Path:
    return datasets.ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic")


def run_train(args: list[str], ckpt: Path, name: str = "t") -> int:
    return train.main(TINY + ["--checkpoints_dir", str(ckpt), "--name", name] + args)


def all_state(ckpt: Path, name: str = "t") -> dict:
    return load_file(ckpt / name / "latest_state.pth")


def test_end_to_end_scripts(dataroot, tmp_path):
    """python train.py ... then python infer.py ..., as a user runs them."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    ckpt, results = tmp_path / "ckpt", tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataroot", str(dataroot), *TINY, "--max_steps", "4",
           "--checkpoints_dir", str(ckpt), "--name", "e2e"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    run = ckpt / "e2e"
    for k in ("G_A", "G_B", "D_A", "D_B"):
        assert (run / f"latest_net_{k}.pth").is_file()
    log = (run / "loss_log.txt").read_text()
    assert log.startswith("================ Training Loss (") and "D_A: " in log and "idt_B: " in log
    assert "netG: resnet_6blocks" in (run / "train_opt.txt").read_text()
    page = (run / "web" / "index.html").read_text()
    assert "<svg" in page and "fake_B.png" in page

    cmd = [sys.executable, str(ROOT / "infer.py"), "--dataroot", str(dataroot), "--name", "e2e",
           "--checkpoints_dir", str(ckpt), "--results_dir", str(results), "--load_size", "32", "--num_test", "4"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "error vs truth" in out.stdout and "identity baseline" in out.stdout
    res = results / "e2e" / "test_latest"
    assert (res / "index.html").is_file() and len(list((res / "images").glob("*_fake.png"))) == 4
    # the page shows the truth beside real and fake, each image's error, and the mean
    page = (res / "index.html").read_text()
    assert len(list((res / "images").glob("*_truth.png"))) == 4 and page.count("_truth.png'") == 4
    errors = [float(e) for e in re.findall(r"fake \(error ([\d.]+)\)", page)]
    assert len(errors) == 4 and len(re.findall(r"real \(identity error [\d.]+\)", page)) == 4
    mean = re.search(r"error vs truth \(0-255\): ([\d.]+)", out.stdout).group(1)
    assert f"error vs truth (0-255): {mean}" in page
    assert abs(sum(errors) / 4 - float(mean)) <= 0.05


def test_saved_generators_use_official_keys_and_round_trip(dataroot, tmp_path, torch_path):
    assert run_train(["--dataroot", str(dataroot), "--max_steps", "2"], tmp_path) == 0
    state = torch.load(tmp_path / "t" / "latest_net_G_A.pth", weights_only=True)
    g = networks.define_G(3, 3, 4, "resnet_6blocks")
    assert list(state) == list(g.state_dict())
    g.load_state_dict(state, strict=True)
    full = all_state(tmp_path)
    assert_same_tensors(state, full["model"]["nets"]["G_A"])
    assert full["run"]["steps"] == 2


@pytest.mark.slow
def test_resume_is_exact(dataroot, tmp_path, torch_path):
    """N steps, stop, --continue_train to N+M == N+M uninterrupted steps, bitwise (weights, Adam state,
    pools, counters). Crosses an epoch boundary (6 images per epoch) and fills the pools."""
    common = ["--dataroot", str(dataroot), "--max_dataset_size", "6", "--n_epochs", "1", "--n_epochs_decay", "2"]
    assert run_train(common + ["--max_steps", "10"], tmp_path / "straight") == 0
    assert run_train(common + ["--max_steps", "4"], tmp_path / "resumed") == 0
    assert run_train(common + ["--max_steps", "10", "--continue_train"], tmp_path / "resumed") == 0
    a, b = all_state(tmp_path / "straight"), all_state(tmp_path / "resumed")
    assert a["run"]["steps"] == b["run"]["steps"] == 10
    assert_same_tensors(a["model"], b["model"])
    assert a["run"]["history"] == b["run"]["history"]


def test_finished_run_resumes_to_nothing(dataroot, tmp_path, torch_path):
    common = ["--dataroot", str(dataroot), "--max_dataset_size", "2", "--n_epochs", "1", "--n_epochs_decay", "0"]
    assert run_train(common, tmp_path) == 0
    assert all_state(tmp_path)["run"]["epoch"] == 2
    assert (tmp_path / "t" / "1_net_G_A.pth").exists() is False  # save_epoch_freq 5
    assert run_train(common + ["--continue_train"], tmp_path) == 0
    assert all_state(tmp_path)["run"]["steps"] == 2


def test_builtin_preset_only_fills_unset_flags():
    opt = train.parse_options(["--ngf", "8"])
    assert opt.builtin and opt.ngf == 8 and opt.ndf == train.BUILTIN_PRESET["ndf"]
    assert opt.crop_size == 32 and opt.name == "synthetic"
    opt = train.parse_options(["--dataroot", "x"])
    assert not opt.builtin and opt.ngf == 64 and opt.crop_size == 256 and opt.name == "experiment_name"
    assert train.parse_options([]).num_threads is None  # the workers are chosen for the device, preset or not


def test_resume_command_is_quoted_for_the_shell():
    argv = ["--dataroot", "my data/h2z", "--name=it's", "--continue_train", "--max_steps", "9"]
    one, two = train.resume_command(argv, 1), train.resume_command(argv, 2)
    assert shlex.split(one) == ["python", "train.py", "--dataroot", "my data/h2z", "--name=it's", "--max_steps", "9",
                                "--continue_train"]
    assert shlex.split(two) == ["torchrun", "--nproc_per_node", "2"] + shlex.split(one)[1:]


def test_workers_and_threads_follow_the_device_and_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(16)
        assert train.choose_parallelism(None, cpu, 1) == (0, 16)  # CPU: the step gets every core
        assert train.choose_parallelism(None, cpu, 2) == (0, 8)  # two ranks on the machine share them
        assert train.choose_parallelism(3, cpu, 1) == (3, 13)  # explicit workers win, and take their cores
        assert train.choose_parallelism(None, cuda, 1) == (8, 16)  # GPU: workers feed it, one core drives it
        assert train.choose_parallelism(None, cuda, 4) == (3, 16)
        assert train.choose_parallelism(None, cuda, 16) == (1, 16)
        assert train.choose_parallelism(0, cuda, 1) == (0, 16)
        torch.set_num_threads(2)
        assert train.choose_parallelism(None, cpu, 1) == (0, 2)  # torch's count is never raised
    finally:
        torch.set_num_threads(threads)


def test_first_line_says_the_workers_and_threads_used(dataroot, tmp_path, capsys, monkeypatch, torch_path):
    workers = []
    real = torch.utils.data.DataLoader

    def loader(*args, **kwargs):
        workers.append(kwargs["num_workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", loader)
    i = TINY.index("--num_threads")
    default = TINY[:i] + TINY[i + 2:] + ["--dataroot", str(dataroot), "--max_steps", "1"]
    capsys.readouterr()
    assert train.main(default + ["--checkpoints_dir", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("training resnet_6blocks ") and workers == [0], first
    assert f"on cpu (torch threads: {torch.get_num_threads()}, data-loading workers: 0);" in first
    assert train.main(default + ["--checkpoints_dir", str(tmp_path / "b"), "--num_threads", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "data-loading workers: 1 from --num_threads)" in first and workers == [0, 1], first


def test_channels_last_trains_saves_default_layout_files_and_resumes_exactly(dataroot, tmp_path, capsys,
                                                                             torch_path):
    """--channels_last (off by default on a CPU): the first line and train_opt.txt say it, the net
    files hold default-layout tensors that load strictly, and --continue_train continues bit for bit."""
    common = ["--dataroot", str(dataroot), "--max_dataset_size", "4", "--channels_last"]
    capsys.readouterr()
    assert run_train(common + ["--max_steps", "2"], tmp_path / "resumed") == 0
    assert "on cpu, channels_last (" in capsys.readouterr().out.splitlines()[0]
    opts = (tmp_path / "resumed" / "t" / "train_opt.txt").read_text()
    assert re.search(r"channels_last: True\s+\[default: None\]", opts)
    files = {k: torch.load(tmp_path / "resumed" / "t" / f"latest_net_{k}.pth", weights_only=True)
             for k in ("G_A", "D_A")}
    assert all(t.is_contiguous() for sd in files.values() for t in sd.values())
    networks.define_G(3, 3, 4, "resnet_6blocks").load_state_dict(files["G_A"], strict=True)
    assert run_train(common + ["--max_steps", "4", "--continue_train"], tmp_path / "resumed") == 0
    assert run_train(common + ["--max_steps", "4"], tmp_path / "straight") == 0
    assert_same_tensors(all_state(tmp_path / "straight")["model"], all_state(tmp_path / "resumed")["model"])
    capsys.readouterr()
    assert run_train(common[:-1] + ["--max_steps", "1"], tmp_path / "default") == 0
    assert "on cpu (" in capsys.readouterr().out.splitlines()[0]
    opts = (tmp_path / "default" / "t" / "train_opt.txt").read_text()
    assert re.search(r"channels_last: False\s+\[default: None\]", opts)


def test_infer_channels_last_translates_as_nchw(tmp_path, torch_path):
    import numpy as np
    from PIL import Image
    torch.manual_seed(0)
    g = networks.define_G(3, 3, 4, "resnet_6blocks")
    networks.init_weights(g, "normal", 0.02)
    torch.save(g.state_dict(), tmp_path / "g.pth")
    (tmp_path / "in").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (29, 35, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in" / "x.png")
    outs = []
    for flag in ("--channels_last", "--no_channels_last"):
        out = tmp_path / flag.strip("-")
        assert infer.main(["--checkpoint", str(tmp_path / "g.pth"), "--input", str(tmp_path / "in"), "--output",
                           str(out), "--preprocess", "none", flag]) == 0
        outs.append(np.asarray(Image.open(out / "x.png"), dtype=np.int16))
    assert outs[0].shape == (29, 35, 3) and np.abs(outs[0] - outs[1]).max() <= 1


def test_infer_native_size_any_shape(tmp_path, torch_path):
    """--preprocess none keeps each image's exact size, even when not divisible by 4."""
    from PIL import Image
    g = networks.define_G(3, 3, 4, "resnet_6blocks")
    torch.save(g.state_dict(), tmp_path / "g.pth")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (37, 23), (200, 30, 10)).save(tmp_path / "in" / "odd.png")
    Image.new("L", (16, 16), 128).save(tmp_path / "in" / "gray.jpg")
    code = infer.main(["--checkpoint", str(tmp_path / "g.pth"), "--input", str(tmp_path / "in"),
                       "--output", str(tmp_path / "out"), "--preprocess", "none", "--batch_size", "2"])
    assert code == 0
    assert Image.open(tmp_path / "out" / "odd.png").size == (37, 23)
    assert Image.open(tmp_path / "out" / "gray.png").size == (16, 16)
