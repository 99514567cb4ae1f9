"""--cuda_graph: the graph-ready step (static inputs, device-side pools, deferred loss read-back).

On the CPU the step runs eagerly and must give today's CycleGAN.optimize bit for bit (fp32),
through train.py too, resume included. With CUDA (TRITON_INTERPRET=0) the captured graph is
replayed and compared with its eager twin.
"""

import os
import random

import pytest
import torch
from helpers import assert_same_tensors

import train
from minicycle import datasets
from minicycle.checkpoint import load_file
from minicycle.cuda_graph import DevicePool, GraphedStep, capturable_adam
from minicycle.model import LOSS_NAMES, Config, CycleGAN
from minicycle.pool import ImagePool

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"
TINY = ["--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks", "--load_size", "32", "--crop_size", "32",
        "--num_threads", "0", "--pool_size", "2", "--seed", "3"]
CPU = ["--device", "cpu"]  # the bit-for-bit comparisons hold for the eager twin on the CPU


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory):
    return datasets.ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic")


@pytest.mark.parametrize("pool_size,batch", [(3, 1), (2, 3), (3, 4), (0, 2)])
def test_device_pool_matches_image_pool(pool_size, batch):
    """Same returned images and same stored images as the list pool, for batches that fill the pool,
    swap, and (pool smaller than the batch) swap a slot stored earlier in the same batch."""
    ref, dev = ImagePool(pool_size, seed=5), ImagePool(pool_size, seed=5)
    device_pool = DevicePool(dev, batch, (1, 2, 2), torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for step in range(30):
        n = batch if step % 7 else max(1, batch - 1)  # some short batches
        images = torch.randn(n, 1, 2, 2, generator=gen)
        device_pool.draw(n)
        assert torch.equal(device_pool.query(images), ref.query(images)), step
        assert_same_tensors(dev.state_dict(), ref.state_dict())  # the list holds views of the buffer


def test_device_pool_adopts_a_loaded_pool_and_saves_the_old_format():
    old = ImagePool(3, seed=1)
    for _ in range(5):
        old.query(torch.randn(1, 1, 2, 2))
    pool = ImagePool(3)
    pool.load_state_dict(old.state_dict())
    device_pool = DevicePool(pool, 1, (1, 2, 2), torch.float32, torch.device("cpu"))
    assert_same_tensors(pool.state_dict(), old.state_dict())
    x = torch.randn(1, 1, 2, 2)
    device_pool.draw(1)
    assert torch.equal(device_pool.query(x), old.query(x))


def test_capturable_adam_saves_the_default_form_and_loads_back_capturable():
    """A checkpoint of capturable Adam (--cuda_graph on CUDA) resumes without --cuda_graph, even on a CPU, where
    capturable Adam cannot step; a state loaded into capturable Adam takes the capturable form again."""
    def adam_after_a_step() -> torch.optim.Adam:
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.Adam([w])
        w.grad = torch.ones(3)
        opt.step()
        return opt

    graphed = adam_after_a_step()
    capturable_adam(graphed)
    state = graphed.state_dict()
    assert graphed.param_groups[0]["capturable"] and not state["param_groups"][0]["capturable"]
    plain = adam_after_a_step()
    plain.load_state_dict(state)
    plain.step()  # capturable Adam would raise here: it runs on CUDA only
    assert plain.state_dict()["state"][0]["step"].item() == 2
    again = adam_after_a_step()
    capturable_adam(again)
    again.load_state_dict(state)
    assert again.param_groups[0]["capturable"]


def run_steps(graphed: bool, sizes: list[int], amp: torch.dtype | None = None,
              fmt: torch.memory_format = torch.contiguous_format, **cfg) -> tuple[CycleGAN, list]:
    """A fresh tiny model trained on len(sizes) random batches (sizes[i] images), through optimize or GraphedStep."""
    torch.manual_seed(0)
    model = CycleGAN(Config(ngf=4, ndf=4, netG="resnet_6blocks", **cfg), amp=amp)
    model.set_memory_format(fmt)
    stepper = GraphedStep(model, max(sizes), graph=False) if graphed else None
    gen = torch.Generator().manual_seed(1)
    losses = []
    for i, n in enumerate(sizes):
        a, b = (torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1 for _ in "AB")
        if stepper is None:
            losses.append(model.optimize(a, b))
        else:
            stepper.step(a, b)
            if i % 3 == 2:  # read back now and then, as train.py does
                losses += stepper.read()
    return model, losses + (stepper.read() if stepper else [])


@pytest.mark.parametrize("sizes,cfg", [([1] * 5, dict(pool_size=2)),
                                       ([3, 3, 1, 3, 3], dict(pool_size=2)),  # a short batch runs eagerly
                                       ([2] * 4, dict(pool_size=0, lambda_identity=0.0)),
                                       ([1] * 5, dict(pool_size=2, fmt=torch.channels_last))])
def test_eager_twin_matches_optimize_bit_for_bit(sizes, cfg, torch_path):
    ref, ref_losses = run_steps(False, sizes, **cfg)
    twin, twin_losses = run_steps(True, sizes, **cfg)
    assert twin_losses == ref_losses  # every step's 8 losses, read back late, in order
    assert_same_tensors(twin.training_state(), ref.training_state())  # nets, Adam, pools
    assert set(twin.visuals) == set(ref.visuals)


def test_eager_twin_under_bf16_rounds_gradients_differently_but_within_bf16(torch_path):
    """bf16: the graph-ready step runs autocast without its cast cache (capture needs that), so a
    weight used several times has its gradient summed in fp32 instead of bf16. Same forward (same
    losses), and each net's gradient within bf16 rounding (2^-8 relative) of the default step's."""
    ref, ref_losses = run_steps(False, [1], amp=torch.bfloat16, pool_size=2)
    twin, twin_losses = run_steps(True, [1], amp=torch.bfloat16, pool_size=2)
    assert twin_losses == ref_losses
    for k, net in ref.nets().items():
        g_ref = torch.cat([p.grad.flatten() for p in net.parameters()])
        g_twin = torch.cat([p.grad.flatten() for p in twin.nets()[k].parameters()])
        assert 0 < (g_twin - g_ref).norm() / g_ref.norm() < 2**-8, k


def test_new_image_size_switches_to_the_normal_path_once(torch_path, capsys):
    sizes = [(32, 32), (32, 32), (40, 32), (32, 32)]
    torch.manual_seed(0)
    ref = CycleGAN(Config(ngf=4, ndf=4, netG="resnet_6blocks", pool_size=0))
    torch.manual_seed(0)
    model = CycleGAN(Config(ngf=4, ndf=4, netG="resnet_6blocks", pool_size=0))
    stepper = GraphedStep(model, 1, graph=False)
    gen = torch.Generator().manual_seed(1)
    ref_losses = []
    for h, w in sizes:
        a, b = (torch.rand(1, 3, h, w, generator=gen) for _ in "AB")
        ref_losses.append(ref.optimize(a, b))
        stepper.step(a, b)
    assert stepper.read() == ref_losses
    assert_same_tensors(model.training_state(), ref.training_state())
    err = capsys.readouterr().err
    assert err.count("note: --cuda_graph:") == 1 and "the normal path" in err and "(40, 32)" in err


# ---------------------------------------------------------------------------------------------- train.py


def train_run(args: list[str], ckpt, name: str = "t") -> int:
    return train.main(TINY + ["--checkpoints_dir", str(ckpt), "--name", name] + args)


@pytest.mark.slow
def test_train_with_cuda_graph_flag_matches_and_resumes_exactly(dataroot, tmp_path, torch_path, capsys):
    """On the CPU --cuda_graph runs the graph-ready step eagerly: the same weights, Adam state, pools
    and loss history as a run without it, bit for bit, and an interrupted run resumes exactly."""
    common = CPU + ["--dataroot", str(dataroot), "--max_dataset_size", "6", "--n_epochs", "1",
                    "--n_epochs_decay", "2", "--print_freq", "4"]
    assert train_run(common + ["--max_steps", "10"], tmp_path / "plain") == 0
    assert train_run(common + ["--max_steps", "10", "--cuda_graph"], tmp_path / "graph") == 0
    assert "no CUDA device, so the step runs eagerly" in capsys.readouterr().err
    assert train_run(common + ["--max_steps", "4", "--cuda_graph"], tmp_path / "resumed") == 0
    assert train_run(common + ["--max_steps", "10", "--cuda_graph", "--continue_train"], tmp_path / "resumed") == 0
    states = [load_file(tmp_path / d / "t" / "latest_state.pth") for d in ("plain", "graph", "resumed")]
    for state in states[1:]:
        assert state["run"] == states[0]["run"]  # counters and the logged loss history
        assert_same_tensors(state["model"], states[0]["model"])
    logs = [(tmp_path / d / "t" / "loss_log.txt").read_text().splitlines() for d in ("plain", "graph")]
    strip = [[line.split(") ", 1)[-1] for line in log if line.startswith("(")] for log in logs]
    assert strip[0] == strip[1] and len(strip[0]) == 2  # the same means, at images 4 and 8


def test_a_state_saved_by_capturable_adam_resumes_on_a_cpu(dataroot, tmp_path, torch_path, capsys):
    """A training state whose Adams were saved capturable, with their step counts on the device (as --cuda_graph
    on a GPU saved them before its save hook existed), resumes on a CPU: restore loads Adam in its default form."""
    common = CPU + ["--dataroot", str(dataroot), "--max_dataset_size", "4", "--n_epochs", "1", "--n_epochs_decay", "0"]
    assert train_run(common + ["--max_steps", "2"], tmp_path) == 0
    path = tmp_path / "t" / "latest_state.pth"
    state = load_file(path)
    for name in ("optimizer_G", "optimizer_D"):
        for group in state["model"][name]["param_groups"]:
            group["capturable"] = True
    torch.save(state, path)
    assert train_run(common + ["--max_steps", "4", "--continue_train"], tmp_path) == 0
    assert load_file(path)["run"]["steps"] == 4


def test_nan_under_cuda_graph_names_the_step_and_saves_nothing(dataroot, tmp_path, torch_path, capsys, monkeypatch):
    """Losses are read back late (here at the 10th step), but the error still names the loss and
    the iteration where it went bad, and no checkpoint is written after it."""
    real = CycleGAN.step
    calls = {"n": 0}

    def diverging(self, *args, **kwargs):
        losses = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:
            with torch.no_grad():
                for p in self.netG_A.parameters():
                    p.fill_(float("nan"))
            losses = losses.clone()
            losses[LOSS_NAMES.index("cycle_A")] = float("nan")
        return losses

    monkeypatch.setattr(CycleGAN, "step", diverging)
    capsys.readouterr()
    code = train_run(CPU + ["--dataroot", str(dataroot), "--max_dataset_size", "20", "--cuda_graph",
                            "--max_steps", "10", "--print_freq", "100", "--save_latest_freq", "100"], tmp_path)
    err = capsys.readouterr().err
    assert code == 1 and calls["n"] == 10
    assert "train.py: error: loss cycle_A is nan at epoch 1, iteration 3: training stopped" in err
    assert not (tmp_path / "t" / "latest_state.pth").exists()


@pytest.mark.parametrize("args,env,needle", [
    (["--amp", "fp16"], {}, "use --amp bf16"),
    ([], {"WORLD_SIZE": "2"}, "does not run under torchrun"),
])
def test_cuda_graph_refusals_are_one_line(args, env, needle, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        train.parse_options(["--cuda_graph", *args])
    assert str(e.value).startswith("train.py: error: --cuda_graph") and needle in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not GPU, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_graph_replay_matches_its_eager_twin_and_follows_the_lr(amp, monkeypatch):
    """Captured and replayed vs run eagerly (both with capturable Adam), with a pool that swaps and
    a learning-rate change mid-run; lr 0 must then leave the weights exactly as they are."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = CycleGAN(Config(ngf=8, ndf=8, netG="resnet_6blocks", pool_size=2), "cuda", amp=amp)
        stepper = GraphedStep(model, 2, graph=graph, warmup=2)
        rng = random.Random(0)
        for i in range(12):
            if i == 6:
                for opt in (model.optimizer_G, model.optimizer_D):
                    opt.param_groups[0]["lr"] = 1e-4
            a, b = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(rng.randrange(99))) for _ in "AB")
            stepper.step(a.pin_memory(), b.pin_memory())
        losses = stepper.read()
        for opt in (model.optimizer_G, model.optimizer_D):
            opt.param_groups[0]["lr"] = 0.0
        frozen = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            stepper.step(a, b)
        stepper.read()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), frozen)), "lr 0 did not reach the graph"
        runs.append((model, losses, stepper.graph))
    (eager, eager_losses, _), (graphed, graph_losses, graph) = runs
    assert graph is not None
    assert len(graph_losses) == len(eager_losses) == 12
    for a, b in zip(graph_losses, eager_losses):
        assert a == pytest.approx(b, rel=1e-4)
    for p, q in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not GPU, reason="needs CUDA and TRITON_INTERPRET=0")
def test_train_py_with_cuda_graph_on_a_gpu_logs_saves_and_resumes(dataroot, tmp_path, capsys):
    """End to end: replays across epoch boundaries (a new capture per learning rate), a save every 5
    images, a stop, a resume; finite weights, and the logged means every 4 images."""
    common = ["--device", "cuda", "--cuda_graph", "--dataroot", str(dataroot), "--max_dataset_size", "6",
              "--n_epochs", "1", "--n_epochs_decay", "2", "--print_freq", "4", "--save_latest_freq", "5"]
    assert train_run(common + ["--max_steps", "8"], tmp_path) == 0
    assert train_run(common + ["--max_steps", "16", "--continue_train"], tmp_path) == 0
    state = load_file(tmp_path / "t" / "latest_state.pth")
    assert state["run"]["steps"] == 16 and state["run"]["epoch"] == 3
    for net in state["model"]["nets"].values():
        assert all(torch.isfinite(t).all() for t in net.values())
    log = (tmp_path / "t" / "loss_log.txt").read_text().splitlines()
    assert sum(line.startswith("(epoch: ") for line in log) == 4
    assert "Traceback" not in capsys.readouterr().err
