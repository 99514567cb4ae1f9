"""torchrun with 2 CPU processes (gloo): ranks stay identical, one set of checkpoints is written,
and the result matches one process training on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from minicycle import datasets, networks
from minicycle.checkpoint import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks", "--load_size", "32", "--crop_size", "32",
        "--num_threads", "0", "--pool_size", "0", "--print_freq", "2", "--seed", "5", "--max_dataset_size", "6",
        "--no_flip", "--n_epochs", "1", "--n_epochs_decay", "1"]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    data = datasets.ensure_synthetic(tmp_path / "synthetic")
    common = [str(ROOT / "train.py"), "--dataroot", str(data), *TINY, "--max_steps", "4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # --save_latest_freq 1: a save after every step, and each save checks that the ranks hold equal weights
    ddp = run(torchrun + common + ["--batch_size", "1", "--save_latest_freq", "1",
                                   "--checkpoints_dir", str(tmp_path / "ddp")], tmp_path)
    assert "x 2 ranks" in ddp.stdout
    run([sys.executable] + common + ["--batch_size", "2", "--checkpoints_dir", str(tmp_path / "one")], tmp_path)

    a = load_file(tmp_path / "ddp" / "experiment_name" / "latest_state.pth")
    b = load_file(tmp_path / "one" / "experiment_name" / "latest_state.pth")
    assert a["run"]["steps"] == b["run"]["steps"] == 4 and a["run"]["images"] == b["run"]["images"] == 8
    assert len(a["pools_by_rank"]) == 2
    # Compare what the nets compute, not raw parameters: the conv biases in front of InstanceNorm
    # get a zero gradient up to rounding, which Adam turns into O(lr) noise that changes no output.
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for k in ("G_A", "G_B", "D_A", "D_B"):
        nets = []
        for state in (a, b):
            net = networks.define_G(3, 3, 4, "resnet_6blocks") if k[0] == "G" else networks.define_D(3, 4, "basic")
            net.load_state_dict(state["model"]["nets"][k])
            nets.append(net)
        with torch.no_grad():
            # fp32 sums in another order, amplified a little by Adam's normalisation over 4 steps
            torch.testing.assert_close(nets[0](x), nets[1](x), rtol=0, atol=2e-3, msg=k)
        weights = [n for n in a["model"]["nets"][k] if n.endswith("weight")]
        for n in weights:
            torch.testing.assert_close(a["model"]["nets"][k][n], b["model"]["nets"][k][n], rtol=0, atol=1e-4)
    # official-key files, written once, no `module.` prefix
    g = torch.load(tmp_path / "ddp" / "experiment_name" / "latest_net_G_A.pth", weights_only=True)
    assert all(not k.startswith("module.") for k in g)
    log = (tmp_path / "ddp" / "experiment_name" / "loss_log.txt").read_text()
    assert log.count("================ Training Loss") == 1


def test_resume_under_torchrun(tmp_path):
    data = datasets.ensure_synthetic(tmp_path / "synthetic")
    common = [str(ROOT / "train.py"), "--dataroot", str(data), *TINY, "--batch_size", "1",
              "--checkpoints_dir", str(tmp_path / "ckpt")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run(torchrun + common + ["--max_steps", "2"], tmp_path)
    out = run(torchrun + common + ["--max_steps", "5", "--continue_train"], tmp_path)
    assert "resuming" in out.stdout
    state = load_file(tmp_path / "ckpt" / "experiment_name" / "latest_state.pth")
    assert state["run"]["steps"] == 5
