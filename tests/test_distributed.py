"""torchrun with 2 CPU processes (gloo): ranks stay identical, one set of checkpoints is written,
the result matches one process training on the same global batch, and without --seed the ranks
share the seed rank 0 draws and start from rank 0's weights. Every end of a run (the last epoch,
--max_steps, SIGTERM, a NaN, an error on one rank) leaves every rank exiting with its code, in one
line, with no gloo thread left running into interpreter shutdown."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minicycle import datasets, networks
from minicycle.checkpoint import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks", "--load_size", "32", "--crop_size", "32",
        "--num_threads", "0", "--pool_size", "0", "--print_freq", "2", "--max_dataset_size", "6",
        "--no_flip", "--n_epochs", "1", "--n_epochs_decay", "1"]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    data = datasets.ensure_synthetic(tmp_path / "synthetic")
    # A fixed seed: for some seeds, Adam's sign-like first steps turn the rounding of near-zero gradients
    # summed in another order into lr-sized weight differences, beyond the tolerances below.
    common = [str(ROOT / "train.py"), "--dataroot", str(data), *TINY, "--seed", "5", "--max_steps", "4"]
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


@pytest.mark.slow
def test_without_seed_ranks_share_rank_0s_seed_and_resume(tmp_path):
    data = datasets.ensure_synthetic(tmp_path / "synthetic")
    # 30 images: ranks drawing their own plans would rarely pick the same images by chance
    common = [str(ROOT / "train.py"), "--dataroot", str(data), *TINY, "--max_dataset_size", "30"]
    run_dir = tmp_path / "ckpt" / "experiment_name"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # a save after every step, each checking that the ranks hold equal weights
    run(torchrun + common + ["--max_steps", "2", "--save_latest_freq", "1",
                             "--checkpoints_dir", str(tmp_path / "ckpt")], tmp_path)
    seed = load_file(run_dir / "latest_state.pth")["options"]["seed"]  # drawn by rank 0
    assert f"seed: {seed} " in (run_dir / "train_opt.txt").read_text()
    out = run(torchrun + common + ["--max_steps", "4", "--continue_train", "--checkpoints_dir",
                                   str(tmp_path / "ckpt")], tmp_path)
    assert "resuming" in out.stdout
    state = load_file(run_dir / "latest_state.pth")
    assert state["run"]["steps"] == 4 and state["options"]["seed"] == seed
    assert sorted(p.name for p in tmp_path.joinpath("ckpt").rglob("*.pth")) == sorted(
        [f"latest_net_{k}.pth" for k in ("G_A", "G_B", "D_A", "D_B")] + ["latest_state.pth", "latest_state.prev.pth"])
    # The first step's losses, before any weight update, equal one process's on the same global batch with that
    # seed: the ranks started from its initial weights and took their images from its data plan.
    run([sys.executable] + common + ["--max_steps", "1", "--batch_size", "2", "--seed", str(seed),
                                     "--checkpoints_dir", str(tmp_path / "one")], tmp_path)
    one = load_file(tmp_path / "one" / "experiment_name" / "latest_state.pth")
    (x, ddp_losses), (y, one_losses) = state["run"]["history"][0], one["run"]["history"][0]
    assert x == y
    for k, v in one_losses.items():
        assert abs(ddp_losses[k] - v) <= 1e-4 * abs(v) + 1e-6, (k, ddp_losses, one_losses)


BROADCAST = """
import sys
import torch
sys.path.insert(0, sys.argv[2])
from minicycle import networks
from minicycle.distributed import Dist

d = Dist()
d.setup(torch.device("cpu"))
torch.manual_seed(d.rank)  # each rank makes different weights
nets = [networks.define_G(3, 3, 4, "resnet_6blocks"), networks.define_D(3, 4, "basic", norm="batch")]
for _ in range(d.rank + 1):  # BatchNorm running stats and its int64 batch counter differ too
    nets[1](torch.rand(2, 3, 32, 32))
torch.save([n.state_dict() for n in nets], sys.argv[1] + f"/before{d.rank}.pt")
d.broadcast_nets(nets)
torch.save([n.state_dict() for n in nets], sys.argv[1] + f"/after{d.rank}.pt")
d.close()
"""


@pytest.mark.slow
def test_broadcast_nets_gives_every_rank_rank_0s_parameters_and_buffers(tmp_path):
    (tmp_path / "broadcast.py").write_text(BROADCAST)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run(torchrun + [str(tmp_path / "broadcast.py"), str(tmp_path), str(ROOT)], tmp_path)
    before = [torch.load(tmp_path / f"before{r}.pt") for r in (0, 1)]
    after = [torch.load(tmp_path / f"after{r}.pt") for r in (0, 1)]
    assert not torch.equal(before[0][0]["model.1.weight"], before[1][0]["model.1.weight"])
    assert before[0][1]["model.3.num_batches_tracked"] != before[1][1]["model.3.num_batches_tracked"]
    for r in (0, 1):
        for state in range(2):
            assert after[r][state].keys() == before[0][state].keys()
            for k, t in before[0][state].items():
                assert torch.equal(after[r][state][k], t), (r, k)


# train.py as torchrun runs it, then, once its main() and teardown are done, the native threads still alive.
# A gloo thread left there runs into interpreter shutdown, where freeing a collective's tensors takes the GIL,
# and Python's pthread_exit of such a thread unwinds through C++ destructors: std::terminate, exit -6.
# "fail-on-rank-1": rank 1's second optimizer step raises a one-line DataError.
END = """
import os, runpy, sys
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "fail-on-rank-1" and os.environ["RANK"] == "1":
    from minicycle.data import DataError
    from minicycle.model import CycleGAN
    optimize, steps = CycleGAN.optimize, []
    def failing(self, real_A, real_B):
        steps.append(1)
        if len(steps) == 2:
            raise DataError("trainA/broken.png: cannot identify image file")
        return optimize(self, real_A, real_B)
    CycleGAN.optimize = failing
sys.argv = sys.argv[3:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
# one write of the whole line: the ranks share torchrun's stderr, and print's separate newline can interleave
os.write(2, f"rank {os.environ['RANK']} exits {code} with threads: {' '.join(threads)}\\n".encode())
sys.exit(code)
"""
GLOO_THREADS = ("gloo_tcp_loop", "pt_gloo_runloop")
needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads in /proc/self/task")


def torchrun_end(tmp_path: Path, args: list[str], mode: str = "plain") -> list[str]:
    """The command that runs train.py under torchrun through END."""
    (tmp_path / "end.py").write_text(END)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(tmp_path / "end.py"), str(ROOT), mode, str(ROOT / "train.py"), *args]


def rank_ends(err: str) -> dict[int, tuple[str, list[str]]]:
    """{rank: (exit code, native threads alive after main)} from END's last lines."""
    found = re.findall(r"^rank (\d) exits (\S+) with threads: (.*)$", err, flags=re.M)
    return {int(r): (code, names.split()) for r, code, names in found}


def assert_clean_ends(out: subprocess.CompletedProcess, code: str) -> None:
    ends = rank_ends(out.stderr)
    assert sorted(ends) == [0, 1], out.stdout + out.stderr
    for rank, (rank_code, names) in ends.items():
        assert rank_code == code, (rank, out.stdout + out.stderr)
        assert not set(names) & set(GLOO_THREADS), (rank, names)
    assert "terminate called" not in out.stderr and "[rank0]: Traceback" not in out.stderr
    assert "[rank1]: Traceback" not in out.stderr


def end_env() -> dict[str, str]:
    return {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@needs_proc
def test_last_epoch_ends_with_no_gloo_thread_left(tmp_path):
    data = datasets.ensure_synthetic(tmp_path / "synthetic")
    # 4 images, 2 ranks: one epoch of 2 steps, then the end of the last epoch (its save's gathers, the barrier)
    args = ["--dataroot", str(data), *TINY, "--max_dataset_size", "4", "--n_epochs_decay", "0", "--seed", "1",
            "--checkpoints_dir", str(tmp_path / "ckpt")]
    out = subprocess.run(torchrun_end(tmp_path, args), cwd=tmp_path, env=end_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "finished 1 epochs (2 iterations)" in out.stdout
    assert_clean_ends(out, "0")


@pytest.mark.slow
@needs_proc
def test_teardown_under_cpu_load_never_aborts(tmp_path):
    """The end that aborted: --max_steps right after saves (gathers), on a busy machine, many times."""
    data = datasets.ensure_synthetic(tmp_path / "synthetic")
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    runs, aborted, failed, threads_left = 6, [], [], []
    try:
        for i in range(runs):
            args = ["--dataroot", str(data), *TINY, "--seed", "5", "--max_steps", "2", "--save_latest_freq", "1",
                    "--checkpoints_dir", str(tmp_path / f"ckpt{i}")]
            out = subprocess.run(torchrun_end(tmp_path, args), cwd=tmp_path, env=end_env(), capture_output=True,
                                 text=True, timeout=600)
            if "terminate called" in out.stderr:
                aborted.append(i)
            elif out.returncode != 0:
                failed.append((i, out.stderr[-2000:]))
            ends = rank_ends(out.stderr)
            if any(set(names) & set(GLOO_THREADS) for _, names in ends.values()):
                threads_left.append(i)
    finally:
        load.kill()
        load.wait()
    assert not aborted and not failed and not threads_left, (
        f"{runs} runs: aborted {aborted}, failed {failed}, gloo threads alive at exit {threads_left}")


@pytest.mark.slow
@needs_proc
def test_sigterm_to_torchrun_saves_on_every_rank_and_each_exits_0(tmp_path):
    data = datasets.ensure_synthetic(tmp_path / "synthetic")
    ckpt = tmp_path / "ckpt"
    args = ["--dataroot", str(data), *TINY, "--seed", "5", "--n_epochs", "1000", "--save_latest_freq", "1",
            "--checkpoints_dir", str(ckpt)]
    proc = subprocess.Popen(torchrun_end(tmp_path, args), cwd=tmp_path, env=end_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (ckpt / "experiment_name" / "latest_state.pth").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to each rank
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    # torchrun then raises the signal it got (its own traceback and status); each rank saved and exited 0
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_clean_ends(out, "0")
    stop = [s for s in stdout.splitlines() if s.startswith("stopped by SIGTERM at epoch ")]
    assert len(stop) == 1, stdout
    steps = load_file(ckpt / "experiment_name" / "latest_state.pth")["run"]["steps"]
    assert steps >= 1 and f"iteration {steps};" in stop[0]


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("mode", ["nan", "fail-on-rank-1"])
def test_a_nan_or_an_error_on_one_rank_stops_every_rank_in_one_line(mode, tmp_path):
    data = datasets.ensure_synthetic(tmp_path / "synthetic")
    args = ["--dataroot", str(data), *TINY, "--seed", "5", "--max_steps", "20", "--checkpoints_dir", str(tmp_path)]
    if mode == "nan":
        args += ["--lr", "1e30"]
    out = subprocess.run(torchrun_end(tmp_path, args, mode), cwd=tmp_path, env=end_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode != 0
    assert_clean_ends(out, "1")
    errors = [s for s in out.stderr.splitlines() if s.startswith("train.py: error: ")]
    assert len(errors) == 2, out.stderr
    if mode == "nan":  # the losses are averaged over the ranks: both see the NaN at the same step
        assert all(" is nan at epoch 1, iteration " in e for e in errors), errors
    else:
        assert "trainA/broken.png: cannot identify image file" in errors[0] + errors[1]
        assert any("with the other ranks failed (" in e and "that error is the cause" in e for e in errors), errors
