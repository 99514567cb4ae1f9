"""Reliability: no lost work, exact resume, and a one-line answer to every bad input.

Covered elsewhere, not repeated here: the bitwise resume across an epoch boundary with batch size 1
(test_train.test_resume_is_exact), native-size inference on a size not divisible by 4
(test_train.test_infer_native_size_any_shape), loading each odd image mode (test_data.test_load_*),
folder errors (test_data.test_find_images_errors_name_the_folder), the --crop_size/--load_size checks
(test_data.test_check_preprocess_errors), a corrupt image in the dataset (test_data.test_unaligned_*),
and a 6-block file loaded into a 9-block net (test_networks.test_mismatched_checkpoint_names_likely_flags).
Here they are exercised through train.py / infer.py end to end, plus crashes, signals and divergence.
"""

import concurrent.futures
import contextlib
import errno
import io
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_tensors
from PIL import Image

import infer
import train
from minicycle import datasets, networks
from minicycle.checkpoint import CheckpointError, RunCheckpoints, load_file, load_into
from minicycle.distributed import Dist
from minicycle.model import CycleGAN

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks", "--load_size", "32", "--crop_size", "32",
        "--num_threads", "0", "--seed", "6"]
NETS = ("G_A", "G_B", "D_A", "D_B")
# One intra-op thread: the 2-core CI box is shared, and oversubscribed OpenMP threads are ~3x slower.
ENV = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory) -> Path:
    return datasets.ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic")


@pytest.fixture(scope="module")
def trained(dataroot, tmp_path_factory) -> Path:
    """A 3-iteration run: latest_state.pth (iteration 3), latest_state.prev.pth (iteration 2), nets."""
    ckpt = tmp_path_factory.mktemp("trained")
    prev, threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)
    try:
        assert run_train(["--dataroot", str(dataroot), "--save_latest_freq", "2", "--max_steps", "3"], ckpt) == 0
    finally:
        os.environ["TRITON_INTERPRET"] = prev if prev is not None else "1"
        torch.set_num_threads(threads)
    return ckpt


def copy_run(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def run_train(args: list[str], ckpt: Path, name: str = "t") -> int:
    return train.main(TINY + ["--checkpoints_dir", str(ckpt), "--name", name] + args)


def run_checkpoints(ckpt: Path, name: str = "t") -> RunCheckpoints:
    return RunCheckpoints(ckpt / name)


def one_error_line(err: str, prog: str) -> str:
    """The error is the last thing on stderr, on one line of its own, and no traceback came before."""
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    assert lines and lines[-1].startswith(f"{prog}: error: "), err
    assert sum(line.startswith(f"{prog}: error: ") for line in lines) == 1, err
    return lines[-1]


def expect_error(capsys, call, prog: str, code: int, *needles: str) -> str:
    """Run train.main/infer.main in-process: exit `code`, one line on stderr containing every needle."""
    capsys.readouterr()
    try:
        got = call()
    except SystemExit as e:  # argparse and the early option checks exit through SystemExit
        got = e.code
        if isinstance(got, str):  # SystemExit("message") prints the message and exits 1
            print(got, file=sys.stderr)
            got = 1
    err = capsys.readouterr().err
    assert got == code, err
    line = one_error_line(err, prog)
    for needle in needles:
        assert needle in line, line
    return line


def script(name: str, args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def net_shapes() -> dict[str, torch.nn.Module]:
    g = lambda: networks.define_G(3, 3, 4, "resnet_6blocks")  # noqa: E731
    d = lambda: networks.define_D(3, 4, "basic")  # noqa: E731
    return {"G_A": g(), "G_B": g(), "D_A": d(), "D_B": d()}


def assert_nets_load_strictly(run: Path, label: str = "latest") -> None:
    for k, net in net_shapes().items():
        load_into(net, run / f"{label}_net_{k}.pth")
        assert all(torch.isfinite(t).all() for t in net.state_dict().values()), k


def stray_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def image_folder(folder: Path, images: dict[str, Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        img.save(folder / name)
    return folder


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def rgb_folder(folder: Path, n: int, seed: int, size=(32, 32)) -> Path:
    return image_folder(folder, {f"{i}.png": noise(*size, seed=seed + i) for i in range(n)})


# ============================================================================================
# Checkpoints: atomic writes, crashes and full disks while saving
# ============================================================================================


class FullDisk(io.RawIOBase):
    """A file whose disk fills up after `room` bytes."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            self.f.write(bytes(b[: self.room]))
            self.room = 0
            raise self.failure()
        self.room -= len(b)
        return self.f.write(b)

    def failure(self) -> BaseException:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes
            self.f.close()


class CtrlCMidWrite(FullDisk):
    """A second Ctrl-C arriving in the middle of writing a checkpoint file."""

    def failure(self) -> BaseException:
        return KeyboardInterrupt()


def install_fault(fault: str, monkeypatch) -> None:
    real_save, real_replace, real_fdopen = torch.save, os.replace, os.fdopen
    calls = {"n": 0}

    def save_dies_halfway(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == (2 if fault == "crash_writing_first_net_file" else 1):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.EIO, "simulated crash in the middle of torch.save")
        return real_save(obj, f, *a, **k)

    def replace_fails(src, dst, *a, **k):
        if str(dst).endswith(".pth"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src), None, str(dst))
        return real_replace(src, dst, *a, **k)

    def disk_full_fdopen(fd, mode="r", *a, **k):
        f = real_fdopen(fd, mode, *a, **k)
        if "b" in mode and ".pth" in os.readlink(f"/proc/self/fd/{fd}"):
            return (CtrlCMidWrite if fault == "ctrl_c_mid_write" else FullDisk)(f, room=4096)
        return f

    if fault in ("crash_mid_torch_save", "crash_writing_first_net_file"):
        monkeypatch.setattr(torch, "save", save_dies_halfway)
    elif fault == "rename_fails":
        monkeypatch.setattr(os, "replace", replace_fails)
    elif fault in ("disk_full", "ctrl_c_mid_write"):
        monkeypatch.setattr(os, "fdopen", disk_full_fdopen)


@pytest.mark.parametrize("fault", ["crash_mid_torch_save", "crash_writing_first_net_file", "rename_fails",
                                   "disk_full"])
def test_failed_save_keeps_previous_checkpoint(fault, trained, tmp_path, torch_path, monkeypatch, capsys, dataroot):
    ckpt = copy_run(trained, tmp_path)
    run = ckpt / "t"
    before = {p.name: p.read_bytes() for p in run.glob("latest_*.pth")}
    with monkeypatch.context() as m:  # (not monkeypatch.undo(): that would also undo torch_path)
        install_fault(fault, m)
        line = expect_error(capsys, lambda: run_train(["--dataroot", str(dataroot), "--save_latest_freq", "1",
                                                       "--max_steps", "6", "--continue_train"], ckpt),
                            "train.py", 1, "the previous checkpoint is intact", str(run))
    if fault == "disk_full":
        assert "No space left on device" in line
    assert stray_files(run) == [], "temp files left behind"
    after = {p.name: p.read_bytes() for p in run.glob("latest_*.pth")}
    if fault == "crash_writing_first_net_file":  # the new state (step 4) was complete; the net files are old
        assert "latest_net_G_A.pth" in line
        assert run_checkpoints(ckpt).load_latest_state()["run"]["steps"] == 4
        assert after["latest_state.prev.pth"] == before["latest_state.pth"]
        assert all(after[f"latest_net_{k}.pth"] == before[f"latest_net_{k}.pth"] for k in NETS)
    else:  # the first write of the resumed run failed: nothing changed at all
        assert after == before
        assert run_checkpoints(ckpt).load_latest_state()["run"]["steps"] == 3
    assert_nets_load_strictly(run)
    # ... and the run resumes from what is there
    assert run_train(["--dataroot", str(dataroot), "--max_steps", "5", "--continue_train"], ckpt) == 0
    assert load_file(run / "latest_state.pth")["run"]["steps"] == 5


def test_ctrl_c_in_the_middle_of_a_save_aborts_cleanly(trained, tmp_path, torch_path, monkeypatch, capsys,
                                                       dataroot):
    """A second Ctrl-C in the middle of writing a checkpoint file: the run stops as aborted (exit 130, one
    line), with no temp file and the previous checkpoint intact."""
    ckpt = copy_run(trained, tmp_path)
    run = ckpt / "t"
    before = {p.name: p.read_bytes() for p in run.glob("latest_*.pth")}
    with monkeypatch.context() as m:
        install_fault("ctrl_c_mid_write", m)
        capsys.readouterr()
        code = run_train(["--dataroot", str(dataroot), "--save_latest_freq", "1", "--max_steps", "6",
                          "--continue_train"], ckpt)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == "train.py: aborted; the last saved checkpoint is intact"
    assert stray_files(run) == []
    assert {p.name: p.read_bytes() for p in run.glob("latest_*.pth")} == before


@contextlib.contextmanager
def busy_cpus():
    """Two busy processes beside the test, as on a loaded 2-core machine."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


# Back-to-back saves; a Ctrl-C raises KeyboardInterrupt (as train.py's second Ctrl-C does) while one is under way,
# and is ignored elsewhere, so that it never lands in this loop's own bookkeeping.
SAVES_UNDER_CTRL_C = """
import signal, sys, time
import torch
from minicycle.checkpoint import atomic_save

path, done, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
saving = False
def second_ctrl_c(signum, frame):
    if saving:
        raise KeyboardInterrupt
signal.signal(signal.SIGINT, second_ctrl_c)
state = {"w": torch.arange(16.0).view(4, 4), "b": torch.ones(3)}
atomic_save(state, path)
saves = interrupted = 0
print("saving", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        saving = True
        atomic_save(state, path)
        saves += 1
    except KeyboardInterrupt:
        interrupted += 1
    finally:
        saving = False
print(saves, interrupted, flush=True)
open(done, "w").close()
sys.stdin.read()  # until the test has stopped sending: then exit (and collect what is left) as train.py does
"""


@pytest.mark.slow
def test_ctrl_c_at_any_moment_of_a_save_never_aborts_the_process(tmp_path):
    """A Ctrl-C every 0.2-1 ms for 4 s into back-to-back checkpoint saves, beside two busy processes: each
    KeyboardInterrupt is caught, the process ends cleanly, the last completed save loads, no temp file is left.
    One landing after torch.save has made its zip writer and before its `with` holds it (or as the `with` ends)
    leaves the writer unfinished in the traceback: when it is collected, its C++ destructor writes the end of the
    archive into whatever it was given, and into a closed file that is std::terminate (SIGABRT; within 2 s here
    when atomic_save gave torch.save the file)."""
    path, done = tmp_path / "state.pth", tmp_path / "done"
    proc = subprocess.Popen([sys.executable, "-c", SAVES_UNDER_CTRL_C, str(path), str(done), "4"], cwd=ROOT,
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rng = random.Random(6)
    try:
        assert proc.stdout.readline() == "saving\n", proc.communicate()
        with busy_cpus():
            while not done.exists() and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                time.sleep(rng.uniform(0.0002, 0.001))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == "", err
    saves, interrupted = map(int, out.split())
    assert interrupted >= 200, out  # the Ctrl-Cs did land in saves, many times
    assert_same_tensors(load_file(path), {"w": torch.arange(16.0).view(4, 4), "b": torch.ones(3)})
    assert stray_files(tmp_path) == []


class Payload:
    """A pickle that runs code when unpickled with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_not_run(tmp_path, capsys, torch_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pth"
    torch.save({"model.1.weight": torch.zeros(4, 3, 7, 7), "x": Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match="evil.pth: not a readable checkpoint"):
        load_file(evil)
    rgb_folder(tmp_path / "in", 1, seed=0)
    expect_error(capsys, lambda: infer.main(["--checkpoint", str(evil), "--input", str(tmp_path / "in"),
                                             "--output", str(tmp_path / "out")]), "infer.py", 1, "evil.pth")
    run = tmp_path / "ckpt" / "t"
    run.mkdir(parents=True)
    shutil.copy(evil, run / "latest_state.pth")
    shutil.copy(evil, run / "latest_state.prev.pth")
    rgb_folder(tmp_path / "d" / "trainA", 2, seed=0)
    rgb_folder(tmp_path / "d" / "trainB", 2, seed=5)
    expect_error(capsys, lambda: run_train(["--dataroot", str(tmp_path / "d"), "--continue_train"],
                                           tmp_path / "ckpt"),
                 "train.py", 1, "no intact training state", "latest_state.pth", "latest_state.prev.pth")
    assert not marker.exists()


def test_continue_train_falls_back_to_newest_intact_state(trained, tmp_path):
    """Unit level: which file load_latest_state picks when some are damaged or missing."""
    ckpt = copy_run(trained, tmp_path)
    run = ckpt / "t"
    t = run_checkpoints(ckpt)
    assert t.load_latest_state()["run"]["steps"] == 3
    # a crash between the two renames of save(): only .next (newest) and .prev remain
    os.replace(run / "latest_state.pth", run / "latest_state.next.pth")
    assert t.load_latest_state()["run"]["steps"] == 3
    os.replace(run / "latest_state.next.pth", run / "latest_state.pth")
    # something that loads but is not a training state (a net file copied over it)
    good = (run / "latest_state.pth").read_bytes()
    shutil.copy(run / "latest_net_G_A.pth", run / "latest_state.pth")
    assert t.load_latest_state()["run"]["steps"] == 2
    # truncated: both broken -> one line naming both files
    (run / "latest_state.pth").write_bytes(good[: len(good) // 2])
    prev = (run / "latest_state.prev.pth").read_bytes()
    (run / "latest_state.prev.pth").write_bytes(prev[:1000])
    with pytest.raises(CheckpointError) as e:
        t.load_latest_state()
    msg = str(e.value)
    assert "\n" not in msg and "latest_state.pth" in msg and "latest_state.prev.pth" in msg
    assert "no intact training state" in msg


def test_unwritable_checkpoint_folder_is_a_checkpoint_error(tmp_path):
    (tmp_path / "file.txt").write_text("a regular file: nothing can be created under it, not even by root")
    with pytest.raises(CheckpointError, match=r"^--checkpoints_dir: cannot write to .*file.txt/t \(Not a directory\)$"):
        RunCheckpoints(tmp_path / "file.txt" / "t").prepare()


def test_continue_train_with_corrupt_latest_resumes_from_prev(trained, tmp_path, dataroot, capsys, torch_path):
    ckpt = copy_run(trained, tmp_path)
    run = ckpt / "t"
    data = (run / "latest_state.pth").read_bytes()
    (run / "latest_state.pth").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert run_train(["--dataroot", str(dataroot), "--max_steps", "4", "--continue_train"], ckpt) == 0
    out, err = capsys.readouterr()
    assert f"{run / 'latest_state.pth'}: not a readable checkpoint" in err
    assert f"resuming from the older intact checkpoint {run / 'latest_state.prev.pth'}" in err
    assert "iteration 2" in out
    assert load_file(run / "latest_state.pth")["run"]["steps"] == 4


@pytest.mark.slow
def test_truncated_checkpoint_at_inference_is_named(tmp_path, capsys):
    g = tmp_path / "g.pth"
    torch.save(networks.define_G(3, 3, 4, "resnet_6blocks").state_dict(), g)
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    rgb_folder(tmp_path / "in", 1, seed=0)
    args = ["--checkpoint", str(g), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    expect_error(capsys, lambda: infer.main(args), "infer.py", 1, str(g), "truncated or corrupt")
    out = script("infer.py", args, tmp_path)  # the real entry point: exit 1, no traceback
    assert out.returncode == 1
    assert str(g) in one_error_line(out.stderr, "infer.py")


# ============================================================================================
# Interrupts, divergence, exact resume
# ============================================================================================


def start_training(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_step_saves_and_resumes_exactly(sig, dataroot, tmp_path, torch_path):
    ckpt = tmp_path / "check points"  # the printed resume command must survive a space in a path
    common = TINY + ["--dataroot", str(dataroot), "--checkpoints_dir", str(ckpt), "--name", "t",
                     "--pool_size", "3", "--print_freq", "2"]
    proc = start_training(common + ["--max_steps", "100000"], tmp_path)
    try:
        line = proc.stdout.readline()
        assert line.startswith("training "), line + proc.stderr.read()
        time.sleep(1.5)  # a few iterations in
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    stop = [s for s in out.splitlines() if s.startswith("stopped by")]
    assert len(stop) == 1 and f"stopped by {sig.name} at epoch 1, iteration" in stop[0], out
    resume = shlex.split(stop[0].split("Resume with: ", 1)[1])
    assert resume == ["python", "train.py", *common, "--max_steps", "100000", "--continue_train"], stop[0]
    steps = load_file(ckpt / "t" / "latest_state.pth")["run"]["steps"]
    assert f"iteration {steps};" in stop[0] and steps >= 1
    assert_nets_load_strictly(ckpt / "t")
    # the printed command resumes from that step, and equals an uninterrupted run bitwise
    resume[resume.index("--max_steps") + 1] = str(steps + 2)
    assert train.main(resume[2:]) == 0
    assert train.main(common + ["--max_steps", str(steps + 2), "--name", "straight"]) == 0
    a, b = load_file(ckpt / "t" / "latest_state.pth"), load_file(ckpt / "straight" / "latest_state.pth")
    assert a["run"]["steps"] == b["run"]["steps"] == steps + 2
    assert_same_tensors(a["model"], b["model"])


ABORTED = "train.py: aborted; the last saved checkpoint is intact"
# When the two signals come: a few iterations in (the second 0-0.1 s after the first); SIGTERM, then Ctrl-C; around
# the first iteration of a resumed run; the second as soon as a save is under way; the second as soon as the
# run has printed that it stopped (its exit under way), thrice: that one used to fail most often.
SECOND_SIGNALS = ("ctrl_c_twice", "sigterm_then_ctrl_c", "first_iteration", "during_a_save") + ("after_the_stop",) * 3


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Polls `condition` until it holds, or the run has ended."""
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def signal_twice(proc: subprocess.Popen, run: Path, when: str, rng: random.Random) -> str:
    """Sends a training run the two signals of `when`; returns the stdout lines read on the way."""
    seen = []

    def read_until(prefix: str) -> None:
        while (line := proc.stdout.readline()) and not line.startswith(prefix):
            seen.append(line)
        seen.append(line)

    if when == "first_iteration":
        read_until("resuming ")
        time.sleep(rng.uniform(0, 0.2))
    else:
        wait_until((run / "latest_state.pth").exists, proc)
        time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGTERM if when == "sigterm_then_ctrl_c" else signal.SIGINT)
    if when == "during_a_save":
        wait_until(lambda: any(p.name.endswith(".tmp") for p in run.iterdir()), proc)
    elif when == "after_the_stop":
        read_until("stopped by ")
    else:
        time.sleep(rng.uniform(0, 0.1))
    proc.send_signal(signal.SIGINT)
    return "".join(seen)


@pytest.mark.slow
def test_second_signal_ends_the_run_in_one_line_every_time(trained, dataroot, tmp_path):
    """A second signal stops the run at once (exit 130) with one line, or, come after the run had stopped,
    changes nothing (exit 0): never a traceback or a C++ abort, and the last saved state always loads.
    The seven runs of SECOND_SIGNALS at once on the machine's cores. "after_the_stop" used to end in a
    KeyboardInterrupt traceback (exit -2) 13 times in 15: the second Ctrl-C landed in main()'s clean-up."""
    rng = random.Random(6)
    runs = []
    for i, when in enumerate(SECOND_SIGNALS):
        ckpt = tmp_path / f"{when}{i}"
        args = ["--save_latest_freq", "1", "--max_steps", "100000"]
        if when == "first_iteration":
            shutil.copytree(trained, ckpt)
            args += ["--continue_train"]
        proc = start_training(TINY + ["--dataroot", str(dataroot), "--checkpoints_dir", str(ckpt), "--name", "t"] +
                              args, tmp_path)
        runs.append((when, proc, ckpt / "t", random.Random(rng.random())))
    try:
        with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
            seen = list(pool.map(lambda r: signal_twice(r[1], r[2], r[0], r[3]), runs))
        ended = [proc.communicate(timeout=120) for _, proc, _, _ in runs]
    finally:
        for _, proc, _, _ in runs:
            proc.kill()
    for (when, proc, run, _), before, (out, err) in zip(runs, seen, ended):
        code = proc.returncode
        # (Python runs the handlers of signals pending together in signal number order: SIGINT's first.)
        first = [f"{name}: finishing this iteration and saving (press Ctrl-C again to abort)"
                 for name in (("SIGTERM", "SIGINT") if when == "sigterm_then_ctrl_c" else ("SIGINT",))]
        lines = [line for line in err.splitlines() if line]
        if code == 130:  # the first signal may come before the loop, where it stops the run at once
            assert lines[-1:] == [ABORTED] and len(lines) <= 2 and set(lines[:-1]) <= set(first), (when, err)
        else:  # the second came once the run had stopped
            assert code == 0 and len(lines) == 1 and lines[0] in first and "stopped by " in before + out, \
                (when, code, err)
        assert stray_files(run) == [], when
        assert run_checkpoints(run.parent).load_latest_state()["run"]["steps"] >= 1, when
        for k, net in net_shapes().items():  # (a stop within the first save can come before its net files)
            if (run / f"latest_net_{k}.pth").exists():
                load_into(net, run / f"latest_net_{k}.pth")


def test_ctrl_c_before_the_first_save_says_nothing_was_saved(dataroot, tmp_path, capsys, monkeypatch, torch_path):
    def interrupted(self, a, b):
        raise KeyboardInterrupt  # as a second Ctrl-C in the first iteration

    monkeypatch.setattr(CycleGAN, "optimize", interrupted)
    capsys.readouterr()
    assert run_train(["--dataroot", str(dataroot), "--max_steps", "3"], tmp_path) == 130
    assert capsys.readouterr().err == "train.py: aborted before anything was saved\n"
    assert not list((tmp_path / "t").glob("*.pth"))


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(trained, tmp_path, dataroot, capsys, monkeypatch,
                                                              torch_path):
    """A loss turning NaN (the weights with it) stops the run; no NaN reaches the checkpoint files."""
    ckpt = copy_run(trained, tmp_path)
    run = ckpt / "t"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.glob("latest_*.pth")}
    real = CycleGAN.optimize

    def diverging(self, a, b):
        losses = real(self, a, b)
        with torch.no_grad():
            for p in self.netG_A.parameters():
                p.fill_(float("nan"))
        return {**losses, "cycle_A": float("nan")}

    monkeypatch.setattr(CycleGAN, "optimize", diverging)
    expect_error(capsys, lambda: run_train(["--dataroot", str(dataroot), "--save_latest_freq", "1",
                                            "--max_steps", "10", "--continue_train"], ckpt),
                 "train.py", 1, "loss cycle_A is nan", "iteration 4", str(run), "--lr")
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.glob("latest_*.pth")}
    assert after == before
    assert stray_files(run) == []


def logged_iterations(log: str) -> list[tuple[int, int]]:
    return [(int(e), int(i)) for e, i in re.findall(r"^\(epoch: (\d+), iters: (\d+),", log, re.M)]


def test_resume_from_an_older_state_logs_each_iteration_once(dataroot, tmp_path, torch_path):
    """Lines logged after the resumed state was saved (here: iteration 5, when the newest state is lost and
    the one of iteration 4 is resumed) are cut from loss_log.txt before the run goes on."""
    common = ["--dataroot", str(dataroot), "--print_freq", "1", "--save_latest_freq", "2"]
    assert run_train(common + ["--max_steps", "5"], tmp_path) == 0
    run = tmp_path / "t"
    assert logged_iterations((run / "loss_log.txt").read_text()) == [(1, i) for i in range(1, 6)]
    (run / "latest_state.pth").unlink()  # resumes latest_state.prev.pth: iteration 4
    assert run_train(common + ["--max_steps", "7", "--continue_train"], tmp_path) == 0
    log = (run / "loss_log.txt").read_text()
    assert logged_iterations(log) == [(1, i) for i in range(1, 8)]
    assert log.count("================ Training Loss (") == 2  # the resume is marked
    # resuming the newest state cuts nothing
    assert run_train(common + ["--max_steps", "8", "--continue_train"], tmp_path) == 0
    assert logged_iterations((run / "loss_log.txt").read_text()) == [(1, i) for i in range(1, 9)]


def test_ranks_with_different_weights_stop_in_one_line(dataroot, tmp_path, capsys, monkeypatch, torch_path):
    """The check before every save: a second rank whose weights differ stops the run with one line."""
    real = Dist.gather

    def with_a_diverged_rank(self, obj):
        return real(self, obj) + [[v + 1 for v in obj] if isinstance(obj, list) else obj]

    monkeypatch.setattr(Dist, "gather", with_a_diverged_rank)
    expect_error(capsys, lambda: run_train(["--dataroot", str(dataroot), "--max_steps", "2"], tmp_path),
                 "train.py", 1, "ranks hold different G_A, G_B, D_A, D_B weights", "refusing to save", str(tmp_path))
    assert not (tmp_path / "t" / "latest_state.pth").exists()


def test_huge_lr_diverges_without_saving_nan_weights(dataroot, tmp_path, capsys, torch_path):
    """The real thing: --lr 1e30 blows up within a couple of steps."""
    expect_error(capsys, lambda: run_train(["--dataroot", str(dataroot), "--lr", "1e30", "--save_latest_freq", "1",
                                            "--max_steps", "20"], tmp_path),
                 "train.py", 1, " is nan at epoch 1, iteration ", "loss ")
    state = load_file(tmp_path / "t" / "latest_state.pth")
    assert 1 <= state["run"]["steps"] < 20
    for k, net in state["model"]["nets"].items():
        assert all(torch.isfinite(t).all() for t in net.values()), k
    assert_nets_load_strictly(tmp_path / "t")


@pytest.mark.slow
def test_resume_mid_epoch_batch2_shuffled_with_pool_is_exact(dataroot, tmp_path, torch_path):
    """Batch 2 over 7 images (a short last batch), shuffled order, random B pairing, flips, a pool of 3."""
    common = ["--dataroot", str(dataroot), "--max_dataset_size", "7", "--batch_size", "2", "--pool_size", "3",
              "--n_epochs", "1", "--n_epochs_decay", "2", "--print_freq", "3"]
    assert run_train(common + ["--max_steps", "9"], tmp_path / "straight") == 0
    assert run_train(common + ["--max_steps", "2"], tmp_path / "resumed") == 0  # mid-epoch 1 (4 batches)
    mid = load_file(tmp_path / "resumed" / "t" / "latest_state.pth")
    assert mid["run"]["epoch"] == 1 and mid["run"]["epoch_keys"] == 4
    assert run_train(common + ["--max_steps", "9", "--continue_train"], tmp_path / "resumed") == 0
    a = load_file(tmp_path / "straight" / "t" / "latest_state.pth")
    b = load_file(tmp_path / "resumed" / "t" / "latest_state.pth")
    assert a["run"] == b["run"] and a["run"]["steps"] == 9 and a["run"]["epoch"] == 3
    assert_same_tensors(a["model"], b["model"])


@pytest.mark.slow
def test_sigkill_at_random_moments_always_resumes_exactly(dataroot, tmp_path, torch_path):
    """Fault injection: kill -9 at seeded random moments (saving after every image, so most kills land
    in or near a save), resume each time; every time a state loads and the run has progressed; the
    finished run equals an uninterrupted one bitwise and its net files load strictly."""
    rng = random.Random(6)
    ckpt = tmp_path / "ckpt"
    common = TINY + ["--dataroot", str(dataroot), "--checkpoints_dir", str(ckpt), "--name", "t",
                     "--max_dataset_size", "5", "--n_epochs", "50", "--n_epochs_decay", "50", "--pool_size", "3",
                     "--print_freq", "2", "--save_latest_freq", "1", "--save_epoch_freq", "2"]
    state_path = ckpt / "t" / "latest_state.pth"
    steps, kills = 0, 0
    for attempt in range(4):
        mtime = state_path.stat().st_mtime_ns if state_path.exists() else 0
        args = common + ["--max_steps", "100000"] + (["--continue_train"] if attempt else [])
        proc = start_training(args, tmp_path)
        try:
            deadline = time.monotonic() + 60
            while not (state_path.exists() and state_path.stat().st_mtime_ns != mtime):  # first save of this run
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))
            proc.send_signal(signal.SIGKILL)
            kills += 1
            proc.communicate(timeout=30)
        finally:
            proc.kill()
        state = run_checkpoints(ckpt).load_latest_state()
        assert state["run"]["steps"] > steps
        steps = state["run"]["steps"]
    assert kills == 4
    final = steps + 3
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "--max_steps", str(final),
                          "--continue_train"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert stray_files(ckpt / "t") == []  # temp files of saves cut short are swept on the next start
    assert_nets_load_strictly(ckpt / "t")
    assert train.main(common + ["--max_steps", str(final), "--name", "straight"]) == 0
    a, b = load_file(state_path), load_file(ckpt / "straight" / "latest_state.pth")
    assert a["run"]["steps"] == b["run"]["steps"] == final
    assert_same_tensors(a["model"], b["model"])


# ============================================================================================
# Bad input: a one-line error (exit != 0, no traceback) or a graceful path
# ============================================================================================


@pytest.mark.slow
def test_missing_dataroot_official_name_says_how_to_download(tmp_path):
    out = script("train.py", ["--dataroot", str(tmp_path / "horse2zebra")], tmp_path)
    assert out.returncode == 1
    line = one_error_line(out.stderr, "train.py")
    assert "--dataroot" in line and "horse2zebra does not exist" in line
    assert "python -m minicycle.datasets download horse2zebra" in line


def two_domains(root: Path, a: int = 2, b: int = 2) -> Path:
    if a:
        rgb_folder(root / "trainA", a, seed=0)
    if b:
        rgb_folder(root / "trainB", b, seed=10)
    return root


def setup_missing(root):
    return root / "nope"


def setup_no_trainA(root):
    return two_domains(root, a=0)


def setup_empty_trainB(root):
    two_domains(root, b=0)
    (root / "trainB").mkdir()
    return root


def setup_no_images(root):
    two_domains(root, a=0)
    (root / "trainA").mkdir()
    (root / "trainA" / "README.txt").write_text("x")
    (root / "trainA" / "labels.csv").write_text("x")
    return root


def setup_all_corrupt(root):
    two_domains(root, b=0)
    (root / "trainB").mkdir()
    (root / "trainB" / "a.png").write_bytes(b"not a png")
    (root / "trainB" / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


def setup_unwritable_ckpt(root):
    return two_domains(root)


@pytest.mark.parametrize("setup, extra, needles", [
    (setup_missing, [], ["--dataroot", "nope", "does not exist"]),
    (setup_no_trainA, [], ["trainA", "does not exist"]),
    (setup_empty_trainB, [], ["trainB", "is empty"]),
    (setup_no_images, [], ["trainA", "holds 2 files, none an image"]),
    (setup_all_corrupt, [], ["none of the 2 images in", "trainB", "can be read"]),
    (two_domains, ["--load_size", "32", "--crop_size", "64"], ["--crop_size 64", "--load_size 32"]),
    (two_domains, ["--preprocess", "scale_width_and_crop", "--crop_size", "64"], ["--crop_size 64", "--load_size"]),
    (two_domains, ["--crop_size", "30", "--load_size", "30"], ["--crop_size 30", "--netG resnet_6blocks"]),
    (two_domains, ["--checkpoints_dir", "FILE/ckpt"], ["--checkpoints_dir", "file.txt"]),
    (two_domains, ["--continue_train"], ["--continue_train", "nothing to resume"]),
    (two_domains, ["--batch_size", "0"], ["--batch_size"]),
], ids=["dataroot_missing", "trainA_missing", "trainB_empty", "no_images_only_other_files", "all_images_corrupt",
        "crop_gt_load", "crop_gt_load_scale_width", "crop_not_multiple_of_4", "checkpoints_dir_unwritable",
        "continue_without_checkpoint", "batch_size_0"])
def test_train_bad_input_one_line(setup, extra, needles, tmp_path, capsys, torch_path):
    root = setup(tmp_path / "data")
    (tmp_path / "file.txt").write_text("a regular file: nothing can be created under it, not even by root")
    extra = [str(tmp_path / "file.txt" / "ckpt") if a == "FILE/ckpt" else a for a in extra]
    args = TINY + ["--dataroot", str(root), "--checkpoints_dir", str(tmp_path / "ckpt"), "--max_steps", "1"]
    with pytest.warns(UserWarning) if setup is setup_all_corrupt else contextlib.nullcontext():
        expect_error(capsys, lambda: train.main(args + extra), "train.py", 1, *needles)


@pytest.mark.parametrize("flags, needle", [
    (["--netG", "foo"], "argument --netG: invalid choice: 'foo'"),
    (["--preprocess", "bar"], "argument --preprocess: invalid choice: 'bar'"),
    (["--norm", "group"], "argument --norm: invalid choice: 'group'"),
    (["--batch_size", "two"], "argument --batch_size: invalid int value: 'two'"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
])
def test_unknown_flag_values_exit_2_in_one_line(flags, needle, capsys):
    expect_error(capsys, lambda: train.main(["--dataroot", "x"] + flags), "train.py", 2, needle)
    if flags[0] != "--batch_size":  # infer.py has the same parser behaviour
        expect_error(capsys, lambda: infer.main(flags), "infer.py", 2, flags[0])


@pytest.mark.slow
def test_unknown_flag_value_real_entry_point(tmp_path):
    out = script("train.py", ["--netG", "foo"], tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert "--netG" in one_error_line(out.stderr, "train.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_gpu(tmp_path, capsys):
    root = two_domains(tmp_path / "data")
    expect_error(capsys, lambda: run_train(["--dataroot", str(root), "--device", "cuda"], tmp_path),
                 "train.py", 1, "--device cuda", "no CUDA GPU")
    g = tmp_path / "g.pth"
    torch.save(networks.define_G(3, 3, 4, "resnet_6blocks").state_dict(), g)
    expect_error(capsys, lambda: infer.main(["--checkpoint", str(g), "--input", str(root / "trainA"),
                                             "--device", "cuda"]), "infer.py", 1, "--device cuda")


@pytest.mark.slow
def test_all_corrupt_domain_with_loader_workers_is_one_line(tmp_path):
    """The error raised inside a DataLoader worker process is still one line, not a worker traceback."""
    root = setup_all_corrupt(tmp_path / "data")
    out = script("train.py", TINY[:-4] + ["--num_threads", "1", "--dataroot", str(root), "--max_steps", "2",
                                          "--checkpoints_dir", str(tmp_path / "ckpt")], tmp_path)
    assert out.returncode == 1
    line = one_error_line(out.stderr, "train.py")
    assert "none of the 2 images in" in line and "trainB" in line
    assert "cannot read image" in out.stderr and "a.png" in out.stderr  # the skip warnings name the files


def test_corrupt_images_are_skipped_with_a_warning(tmp_path, torch_path):
    root = two_domains(tmp_path / "data", a=4, b=4)
    good = (root / "trainA" / "0.png").read_bytes()
    (root / "trainA" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "trainB" / "garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.warns(UserWarning) as record:
        code = run_train(["--dataroot", str(root), "--serial_batches", "--n_epochs", "1", "--n_epochs_decay", "0"],
                         tmp_path / "ckpt")
    assert code == 0
    text = "\n".join(str(w.message) for w in record)
    assert "truncated.png" in text and "garbage.jpg" in text and "skipping it" in text
    state = load_file(tmp_path / "ckpt" / "t" / "latest_state.pth")
    assert state["run"]["steps"] == 5 and state["run"]["epoch"] == 2


def odd_mode_images(seed: int) -> dict[str, Image.Image]:
    rgb = noise(40, 36, seed)
    gray16 = Image.fromarray(np.asarray(noise(40, 36, seed + 1, "L"), dtype=np.uint16) * 257)
    assert gray16.mode.startswith("I;16")
    palette_t = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    palette_t.info["transparency"] = 0
    return {
        "gray.png": noise(40, 36, seed + 2, "L"),
        "palette.png": rgb.convert("P", palette=Image.ADAPTIVE, colors=32),
        "palette_transparent.png": palette_t,
        "rgba.png": rgb.convert("RGBA"),
        "la.png": noise(40, 36, seed + 3, "L").convert("LA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "gray16.png": gray16,
        "bilevel.png": noise(40, 36, seed + 4, "L").convert("1"),
        "small.png": noise(12, 20, seed + 5),  # smaller than --crop_size
    }


@pytest.mark.slow
@pytest.mark.parametrize("channels", [3, 1])
def test_odd_image_modes_train_end_to_end(channels, tmp_path, torch_path, recwarn):
    root = tmp_path / "data"
    image_folder(root / "trainA", odd_mode_images(0))
    image_folder(root / "trainB", odd_mode_images(100))
    nc = ["--input_nc", str(channels), "--output_nc", str(channels)]
    code = run_train(["--dataroot", str(root), "--serial_batches", "--n_epochs", "1", "--n_epochs_decay", "0"] + nc,
                     tmp_path / "ckpt")
    assert code == 0
    assert not [w for w in recwarn if "cannot read image" in str(w.message)]
    state = load_file(tmp_path / "ckpt" / "t" / "latest_state.pth")
    assert state["run"]["steps"] == 9  # every image of both domains was used
    assert state["model"]["nets"]["G_A"]["model.1.weight"].shape[1] == channels


@pytest.mark.parametrize("preprocess", ["crop", "scale_width_and_crop"])
def test_image_smaller_than_crop_size_is_handled(preprocess, tmp_path, torch_path):
    root = tmp_path / "data"
    image_folder(root / "trainA", {"tiny.png": noise(12, 20, 0), "thin.png": noise(40, 9, 1)})
    image_folder(root / "trainB", {"tiny.png": noise(17, 13, 2)})
    assert run_train(["--dataroot", str(root), "--preprocess", preprocess, "--max_steps", "2"], tmp_path) == 0


def test_image_too_small_for_the_nets_is_one_line(tmp_path, capsys, torch_path):
    """--preprocess none keeps a 40x9 image at 40x8: too small for the 70x70 PatchGAN (24 px a side)."""
    root = tmp_path / "data"
    image_folder(root / "trainA", {"thin.png": noise(40, 9, 1)})
    image_folder(root / "trainB", {"ok.png": noise(32, 32, 2)})
    expect_error(capsys, lambda: run_train(["--dataroot", str(root), "--preprocess", "none", "--max_steps", "2"],
                                           tmp_path), "train.py", 1, "thin.png", "smallest image")
    expect_error(capsys, lambda: run_train(["--dataroot", str(root), "--crop_size", "16", "--load_size", "16"],
                                           tmp_path), "train.py", 1, "--crop_size 16", "24")


def test_preprocess_none_mixed_sizes_in_a_batch_is_one_line(tmp_path, capsys, torch_path):
    root = tmp_path / "data"
    image_folder(root / "trainA", {"a.png": noise(32, 32, 0), "b.png": noise(40, 36, 1)})
    image_folder(root / "trainB", {"c.png": noise(32, 32, 2), "d.png": noise(36, 44, 3)})
    expect_error(capsys, lambda: run_train(["--dataroot", str(root), "--preprocess", "none", "--batch_size", "2",
                                            "--serial_batches", "--max_steps", "2"], tmp_path),
                 "train.py", 1, "different sizes in one batch", "--preprocess", "--batch_size 1", "b.png")
    # the same folders with --batch_size 1 train fine
    assert run_train(["--dataroot", str(root), "--preprocess", "none", "--max_steps", "2"], tmp_path, "b1") == 0


def test_continue_train_with_different_architecture_flags(trained, tmp_path, dataroot, capsys):
    ckpt = copy_run(trained, tmp_path)
    for flag, value in (("--ngf", "8"), ("--netG", "resnet_9blocks"), ("--norm", "batch"), ("--dropout", None)):
        args = ["--dataroot", str(dataroot), "--continue_train", flag] + ([value] if value else [])
        line = expect_error(capsys, lambda args=args: run_train(args, ckpt), "train.py", 1,
                            "differs from the run being resumed")
        assert (flag if value else "--no_dropout") in line


# ---- inference ----


def save_generator(path: Path, ngf=4, netG="resnet_6blocks", norm="instance", dropout=False) -> Path:
    torch.save(networks.define_G(3, 3, ngf, netG, norm, dropout).state_dict(), path)
    return path


@pytest.mark.parametrize("file_spec, flags, needles", [
    (dict(), ["--netG", "resnet_9blocks"], ["--netG resnet_6blocks", "--ngf 4"]),
    (dict(), ["--ngf", "8"], ["--ngf 4", "--no_dropout"]),
    (dict(dropout=True), ["--ngf", "8"], ["--ngf 4", "with dropout (without --no_dropout)"]),
    (dict(norm="batch"), ["--norm", "instance"], ["--norm batch"]),
    (dict(netG="unet_128"), ["--netG", "resnet_6blocks"], ["--netG unet_128"]),
], ids=["netG", "ngf", "dropout", "norm", "unet"])
def test_infer_wrong_architecture_names_likely_flags(file_spec, flags, needles, tmp_path, capsys):
    g = save_generator(tmp_path / "gen.pth", **file_spec)
    rgb_folder(tmp_path / "in", 1, seed=0)
    args = ["--checkpoint", str(g), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")] + flags
    expect_error(capsys, lambda: infer.main(args), "infer.py", 1, "gen.pth", "does not fit", *needles)


def test_infer_official_file_with_stale_instance_norm_stats_is_read_as_instance(tmp_path, torch_path):
    """Files saved by PyTorch < 0.4 (some official pretrained models) carry running_mean/var for their
    InstanceNorm layers; they used to be taken for --norm batch, and inference failed to load them."""
    from test_networks import official_resnet

    torch.save(official_resnet(ngf=4, n_blocks=6, stale_running_stats=True).state_dict(), tmp_path / "old.pth")
    image_folder(tmp_path / "in", {"x.png": noise(24, 20, 0)})
    assert infer.main(["--checkpoint", str(tmp_path / "old.pth"), "--input", str(tmp_path / "in"), "--output",
                       str(tmp_path / "out"), "--preprocess", "none"]) == 0
    assert Image.open(tmp_path / "out" / "x.png").size == (24, 20)


def test_infer_bad_paths_one_line(tmp_path, capsys, torch_path):
    g = save_generator(tmp_path / "g.pth")
    rgb_folder(tmp_path / "in", 1, seed=0)
    (tmp_path / "file.txt").write_text("x")
    under_file = str(tmp_path / "file.txt" / "sub")
    base = ["--checkpoint", str(g), "--input", str(tmp_path / "in")]
    expect_error(capsys, lambda: infer.main(base + ["--results_dir", under_file]), "infer.py", 1,
                 "cannot write to", "file.txt")
    expect_error(capsys, lambda: infer.main(base + ["--output", under_file]), "infer.py", 1,
                 "cannot write to", "file.txt")
    expect_error(capsys, lambda: infer.main(["--checkpoint", str(tmp_path / "none.pth"), "--input",
                                             str(tmp_path / "in")]), "infer.py", 1, "none.pth", "not found")
    expect_error(capsys, lambda: infer.main(["--checkpoint", str(g), "--input", str(tmp_path / "nope")]),
                 "infer.py", 1, "--input", "nope")
    expect_error(capsys, lambda: infer.main(["--dataroot", str(tmp_path / "horse2zebra"), "--checkpoint", str(g)]),
                 "infer.py", 1, "download horse2zebra")
    expect_error(capsys, lambda: infer.main(["--name", "nothing_here", "--checkpoints_dir", str(tmp_path),
                                             "--input", str(tmp_path / "in")]),
                 "infer.py", 1, "latest_net_G_A.pth", "not found")


def test_infer_skips_unreadable_images(tmp_path, capsys, torch_path):
    g = save_generator(tmp_path / "g.pth")
    folder = image_folder(tmp_path / "in", {"b.png": noise(32, 32, 0), "c.png": noise(32, 32, 1)})
    (folder / "a_truncated.png").write_bytes((folder / "b.png").read_bytes()[:60])
    (folder / "broken.png").write_bytes(b"nope")
    capsys.readouterr()
    assert infer.main(["--checkpoint", str(g), "--input", str(folder), "--output", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    warnings = err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("infer.py: warning: cannot read image") for w in warnings), err
    assert "a_truncated.png" in warnings[0] and "broken.png" in warnings[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.png", "c.png"]
    assert "translated 2 images" in out and "2 unreadable, skipped" in out
    # --num_test counts translations, not files: the first file is unreadable, yet one image is translated
    assert infer.main(["--checkpoint", str(g), "--input", str(folder), "--output", str(tmp_path / "one"),
                       "--num_test", "1"]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["b.png"]
    # nothing readable: one line, exit 1
    for f in ("b.png", "c.png"):
        (folder / f).unlink()
    expect_error(capsys, lambda: infer.main(["--checkpoint", str(g), "--input", str(folder)]),
                 "infer.py", 1, "none of the 2 images in", str(folder))


def test_infer_resize_to_size_not_divisible_by_4(tmp_path, torch_path):
    g = save_generator(tmp_path / "g.pth")
    image_folder(tmp_path / "in", {"x.png": noise(50, 40, 0)})
    assert infer.main(["--checkpoint", str(g), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--load_size", "30"]) == 0
    assert Image.open(tmp_path / "out" / "x.png").size == (30, 30)
