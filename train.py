"""Train a CycleGAN on unpaired folders DIR/trainA and DIR/trainB.

    python train.py --dataroot ./datasets/horse2zebra --name horse2zebra   # the paper's setup
    python train.py                                                        # built-in synthetic dataset

Flags, defaults and outputs follow the official pytorch-CycleGAN-and-pix2pix train.py. Unlike it,
checkpoints hold the full training state, so `--continue_train` resumes exactly where a run stopped.

Reading order: main() parses the flags and calls train(), the procedure from top to bottom: set_up (and
resume), the loop over epochs (train_epoch; one iteration is train_step: CycleGAN.step, run
by EagerStep or, with --cuda_graph, GraphedStep), the end. The helpers follow in that order. The machinery
lives in its own rooms: checkpoints in minicycle/checkpoint.py, loss_log.txt, train_opt.txt and the page in
minicycle/report.py, data parallelism in minicycle/distributed.py, --cuda_graph in minicycle/cuda_graph.py.
"""

import argparse
import contextlib
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kernels import choice
from minicycle import cli, datasets, networks, objective
from minicycle.checkpoint import CheckpointError, Run, RunCheckpoints, caused_by, load_into, restore
from minicycle.cuda_graph import GraphedStep
from minicycle.data import DataError, UnalignedDataset, check_preprocess, collate_batch, epoch_plan
from minicycle.distributed import CollectiveFailed, Dist, RanksDisagree, average_losses, rank_batches
from minicycle.model import LOSS_NAMES, Config, CycleGAN
from minicycle.optim import LR_POLICIES
from minicycle.report import LossLog, write_options, write_training_page

# Used when --dataroot is not given: sizes that learn the built-in dataset in a few CPU minutes.
# Any flag given explicitly wins over these.
BUILTIN_PRESET = dict(name="synthetic", load_size=32, crop_size=32, netG="resnet_6blocks", ngf=16, ndf=16,
                      n_epochs=4, n_epochs_decay=3, batch_size=1, print_freq=100, save_epoch_freq=4)
ARCH_FLAGS = ("netG", "netD", "n_layers_D", "ngf", "ndf", "input_nc", "output_nc", "norm", "no_dropout")


def train(opt: argparse.Namespace, explicit: set[str], argv: list[str], dist: Dist, stop: "StopSignal") -> int:
    """The training procedure: set-up and resume, the loop over epochs, the end. Returns the exit code."""
    s, run = set_up(opt, explicit, dist, stop)
    # ---- the loop: epochs of iterations; at each epoch's end the learning rate, a checkpoint, a page -------
    last_epoch = opt.n_epochs + opt.n_epochs_decay
    stopped = None  # why the run stops before its last epoch: "max_steps" or "signal"
    threads_before = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        with stop.loop():
            while run.epoch <= last_epoch:
                stopped = train_epoch(s, run)
                if stopped is not None:
                    break
                epoch = run.epoch
                lr = s.model.step_schedulers(epoch_metric(run.history, epoch))
                run.epoch, run.epoch_keys = epoch + 1, 0
                save(s, run, epoch_label=str(epoch) if epoch % opt.save_epoch_freq == 0 else None)
                if dist.main and not opt.no_html:
                    write_training_page(s.ckpt.dir / "web", opt.name, s.model.visuals, epoch, run.history)
                more = f"; learning rate now {lr:.7f}" if epoch < last_epoch else ""
                dist.say(f"end of epoch {epoch}/{last_epoch}{more}")
            if stopped is not None and run.saved_steps != run.steps:
                save(s, run)
            # Under torchrun, tear the group down only once every rank is past its last collective, so that no
            # rank closes its connections while another still takes part in the last gather.
            dist.barrier()
    finally:
        torch.set_num_threads(threads_before)  # for callers of main() in the same process
        dist.close()

    # ---- the end -------------------------------------------------------------------------------------------
    if dist.main and not opt.no_html and stopped is not None:
        write_training_page(s.ckpt.dir / "web", opt.name, s.model.visuals, run.epoch, run.history)
    if not dist.main:
        return 0
    if stopped == "signal":
        resume = resume_command(argv, dist.local_world if dist.enabled else 1)
        print(f"stopped by {stop.name} at epoch {run.epoch}, iteration {run.steps}; state saved in "
              f"{s.ckpt.dir}. Resume with: {resume}")
    elif stopped == "max_steps":
        print(f"reached --max_steps {opt.max_steps}; state saved in {s.ckpt.dir} (resume with --continue_train "
              f"and a larger --max_steps)")
    else:
        print(f"finished {last_epoch} epochs ({run.steps} iterations); generators in {s.ckpt.dir}/latest_net_G_*.pth")
    return 0


def set_up(opt: argparse.Namespace, explicit: set[str], dist: Dist, stop: "StopSignal") -> tuple["Setup", Run]:
    """The device, the data, the run's folder, the model; then the resumed state (exact), or an epoch's weights
    only (as the official code)."""
    device = dist.setup(cli.pick_device(opt.device))
    # As the official code: cuDNN times its algorithms once per input shape, unless the shapes vary.
    torch.backends.cudnn.benchmark = opt.preprocess not in ("none", "scale_width")
    if opt.channels_last is None:
        opt.channels_last = device.type == "cuda"
    find_dataroot(opt, dist)
    ckpt = RunCheckpoints(Path(opt.checkpoints_dir) / opt.name)
    state = ckpt.load_latest_state() if opt.continue_train and opt.epoch == "latest" else None
    if state is not None:
        adopt_resumed_options(opt, explicit, state["options"])
    dataset, min_size = load_dataset(opt)
    ckpt.prepare()
    if opt.seed is None:  # rank 0 draws it; every rank needs it for the same init and data plan
        opt.seed = dist.broadcast(random.SystemRandom().randrange(2**31) if dist.main else None)
    torch.manual_seed(opt.seed)
    model = build_model(opt, device, dist)
    if opt.cuda_graph and device.type != "cuda":
        print("note: --cuda_graph: no CUDA device, so the step runs eagerly (same results, no speed-up)",
              file=sys.stderr)
    # Made before the state is loaded: a GraphedStep adopts the pools at its first step.
    stepper = (GraphedStep(model, opt.batch_size, graph=device.type == "cuda") if opt.cuda_graph
               else EagerStep(model, dist, stop))
    workers, threads = choose_parallelism(opt.num_threads, device, dist.local_world)
    dist.say(first_line(opt, model, dataset, device, dist, workers, threads, ckpt.dir))
    if notice := choice.compile_notice(opt.kernels, device):
        dist.say(notice)
    if opt.builtin:
        dist.say(f"no --dataroot: using the built-in synthetic dataset in {opt.dataroot} "
                 f"(A: warm scenes, B: cool scenes; truth: swap red and blue)")

    run = Run(opt.epoch_count, opt.seed)
    if state is not None:
        restore(model, run, state, dist, device)
        dist.say(f"resuming {ckpt.dir} at epoch {run.epoch}, iteration {run.steps}")
    elif opt.continue_train:
        for k, net in model.nets().items():
            load_into(net, ckpt.dir / f"{opt.epoch}_net_{k}.pth", map_location=device)
        dist.say(f"loaded {opt.epoch}_net_*.pth (weights only; optimizer restarts) starting at epoch {run.epoch}")
    dist.broadcast_nets(list(model.nets().values()))
    if opt.channels_last:
        model.set_memory_format(torch.channels_last)
    log = LossLog(ckpt.dir / "loss_log.txt", write=dist.main)
    if dist.main:
        write_options(vars(opt), vars(build_parser().parse_args([])), ckpt.dir / "train_opt.txt")
    log.start(resumed_size=state.get("log_bytes") if state is not None else None)
    return Setup(opt=opt, dist=dist, dataset=dataset, min_size=min_size, workers=workers,
                 threads=threads, model=model, stepper=stepper, ckpt=ckpt, log=log, stop=stop), run


# ---- set-up ------------------------------------------------------------------------------------------------
def find_dataroot(opt: argparse.Namespace, dist: Dist) -> None:
    """Without --dataroot, the built-in dataset (generated on first use); with it, the folder must exist."""
    if opt.builtin:
        if not dist.main:
            dist.barrier()  # rank 0 generates the dataset first
        opt.dataroot = str(datasets.ensure_synthetic())
        if dist.main:
            dist.barrier()
    elif not Path(opt.dataroot).is_dir():
        raise DataError(datasets.missing_dataroot_message(opt.dataroot))


def adopt_resumed_options(opt: argparse.Namespace, explicit: set[str], saved: dict) -> None:
    """A resume continues the run it resumes: architecture flags not given take its values (given ones must
    match them), and the seed and the schedule are always its own."""
    for k in ARCH_FLAGS:
        if k not in saved or getattr(opt, k) == saved[k]:
            continue
        if k in explicit:
            raise CheckpointError(f"--{k} {getattr(opt, k)} differs from the run being resumed "
                                  f"(--{k} {saved[k]}); drop the flag or start a new --name")
        setattr(opt, k, saved[k])
    for k in ("seed", "epoch_count", "n_epochs", "n_epochs_decay", "lr", "lr_policy", "lr_decay_iters"):
        if k in saved and getattr(opt, k) != saved[k]:
            if k in explicit:
                print(f"note: keeping --{k} {saved[k]} of the run being resumed", file=sys.stderr)
            setattr(opt, k, saved[k])


def load_dataset(opt: argparse.Namespace) -> tuple[UnalignedDataset, int]:
    """The unpaired dataset, and the smallest image side the nets accept (checked against the flags here,
    and against each batch under --preprocess none)."""
    check_preprocess(opt.preprocess, opt.load_size, opt.crop_size)
    dataset = UnalignedDataset(opt.dataroot, opt.phase, preprocess=opt.preprocess, load_size=opt.load_size,
                               crop_size=opt.crop_size, no_flip=opt.no_flip, input_nc=opt.input_nc,
                               output_nc=opt.output_nc, max_dataset_size=opt.max_dataset_size)
    multiple = networks.input_multiple(opt.netG)
    if opt.preprocess != "none" and opt.crop_size % multiple:
        raise DataError(f"--crop_size {opt.crop_size} must be divisible by {multiple} for --netG {opt.netG}")
    min_size = networks.min_input_size(opt.netG, opt.netD, opt.n_layers_D)
    size = opt.crop_size if "crop" in opt.preprocess else min(opt.load_size, opt.crop_size)
    if opt.preprocess != "none" and size < min_size:
        raise DataError(f"--crop_size {size} is below {min_size}, the smallest image --netG {opt.netG} "
                        f"with --netD {opt.netD} accepts")
    return dataset, min_size


def build_model(opt: argparse.Namespace, device: torch.device, dist: Dist) -> CycleGAN:
    """The CycleGAN of the flags (initialised from torch's RNG), with the chosen kernels; under torchrun each
    rank's pools draw from their own stream and BatchNorm syncs."""
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[opt.amp]
    cfg = Config(**{k: getattr(opt, k) for k in Config.__dataclass_fields__})
    model = CycleGAN(cfg, device, amp, world=dist.world)
    for net in model.nets().values():
        networks.set_kernels(net, opt.kernels)
    if opt.compile:
        choice.load(device)  # the cache file's decisions; the nets are compiled at the first step (compile_nets)
    if dist.enabled:  # each rank keeps its own pool of fakes, with its own random stream
        model.fake_A_pool.rng.seed(f"{opt.seed}:A:{dist.rank}")
        model.fake_B_pool.rng.seed(f"{opt.seed}:B:{dist.rank}")
        if opt.norm == "batch":
            for net in model.nets().values():
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return model


def choose_parallelism(num_threads: int | None, device: torch.device, ranks_here: int) -> tuple[int, int]:
    """(data-loading workers, torch intra-op threads) for one rank. An explicit --num_threads wins.
    On a CPU, loading a training image costs a small fraction of a step and a worker process takes
    cores from the step's threads: images load in the main process. On a GPU, workers load the next
    batches while the device computes, with one of the rank's cores left to drive the device.
    Torch's thread count is only ever lowered: to the cores the workers leave free."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = max(1, cpus // ranks_here)
    if num_threads is None:
        num_threads = 0 if device.type == "cpu" else min(8, max(1, cores - 1))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        threads = min(threads, max(1, cores - num_threads))
    return num_threads, threads


def first_line(opt: argparse.Namespace, model: CycleGAN, dataset: UnalignedDataset, device: torch.device,
               dist: Dist, workers: int, threads: int, run_dir: Path) -> str:
    """What is trained, where, with how many threads and workers, on how many images."""
    n_params = sum(p.numel() for p in model.netG_A.parameters())
    ranks = f" x {dist.world} ranks" if dist.enabled else ""
    chosen = "" if opt.num_threads is None else " from --num_threads"
    layout = ", channels_last" if opt.channels_last else ""
    return (f"training {opt.netG} ({n_params / 1e6:.3f} M parameters per generator) on {device}{ranks}{layout} "
            f"(torch threads: {threads}, data-loading workers: {workers}{chosen}{' per rank' if ranks else ''}); "
            f"kernels: {choice.describe(opt.kernels, device)}; "
            f"{len(dataset.A_paths)} A and {len(dataset.B_paths)} B images; checkpoints in {run_dir}")


# ---- the loop ----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What the set-up built, for the loop."""

    opt: argparse.Namespace
    dist: Dist
    dataset: UnalignedDataset
    min_size: int  # the smallest image side the nets accept
    workers: int  # data-loading worker processes
    threads: int  # torch's intra-op threads
    model: CycleGAN
    stepper: "GraphedStep | EagerStep"
    ckpt: RunCheckpoints
    log: LossLog
    stop: "StopSignal"
    compiled: bool = False  # --compile: the nets are compiled at the first step


def train_epoch(s: Setup, run: Run) -> str | None:
    """Train on what is left of epoch run.epoch, logging and saving on the way. Returns None once the epoch
    is done, else why the run stops: "max_steps" or "signal" (the iteration under way is finished first).
    Losses are read back when they are needed: to log, before a save, before stopping, at the epoch's end."""
    opt = s.opt
    plan = epoch_plan(len(s.dataset.A_paths), len(s.dataset.B_paths), run.epoch, opt.seed, opt.serial_batches)
    batches, consumed = rank_batches(plan, run.epoch_keys, opt.batch_size, s.dist)
    loader = torch.utils.data.DataLoader(s.dataset, batch_sampler=batches, num_workers=s.workers,
                                         collate_fn=collate_batch, pin_memory=s.model.device.type == "cuda",
                                         worker_init_fn=_ignore_sigint)
    bar = tqdm(total=len(plan), initial=run.epoch_keys, desc=f"epoch {run.epoch}/{opt.n_epochs + opt.n_epochs_decay}",
               unit="img", dynamic_ncols=True, leave=False, disable=None if s.dist.main else True)
    losses: list[dict[str, float]] = []  # read since the last log line
    unread: list[tuple[int, int]] = []  # (epoch, iteration) of the steps whose losses are not read yet
    t_data = time.perf_counter()
    images = seconds = 0  # since the last log line: images trained, and the seconds their steps took
    try:
        for step, batch in enumerate(loader):
            t_start = time.perf_counter()
            train_step(s, batch)
            n, before = consumed[step], run.images
            run.steps, run.images, run.epoch_keys = run.steps + 1, run.images + n, run.epoch_keys + n
            unread.append((run.epoch, run.steps))
            logging = run.images // opt.print_freq > before // opt.print_freq
            saving = run.images // opt.save_latest_freq > before // opt.save_latest_freq
            signalled = bool(s.stop.name)  # a signal arriving after this is handled a step later
            reached = opt.max_steps is not None and run.steps >= opt.max_steps
            if logging or saving or reached or signalled or step == len(batches) - 1:
                read = s.stepper.read()  # one device sync under --cuda_graph; before every save: no NaN is saved
                for (epoch, iteration), row in zip(unread, read, strict=True):
                    check_finite(row, epoch=epoch, iteration=iteration, run_dir=s.ckpt.dir)
                losses, unread = losses + read, []
                bar.set_postfix({k: f"{losses[-1][k]:.3f}" for k in ("D_A", "G_A", "cycle_A", "D_B", "G_B")},
                                refresh=False)
            bar.update(n)
            # A replayed graph runs ahead of the host and waits at the read: its time shows in the mean only.
            images, seconds = images + n, seconds + time.perf_counter() - t_start
            if logging:
                means = {k: sum(v[k] for v in losses) / len(losses) for k in LOSS_NAMES}
                run.history.append((run.epoch - 1 + run.epoch_keys / len(plan), means))
                line = s.log.line(means, epoch=run.epoch, iters=run.epoch_keys, compute=seconds / images,
                                  data=(t_start - t_data) / n)
                losses, images, seconds = [], 0, 0
                if s.dist.main and bar.disable:
                    print(line)
            if saving:
                save(s, run)
            if reached or signalled:
                return "max_steps" if reached else "signal"
            t_data = time.perf_counter()
    finally:
        bar.close()
    return None


def train_step(s: Setup, batch: dict) -> None:
    """One iteration (CycleGAN.step: the G step, then the D step); its losses come with the stepper's next read."""
    check_image_sizes(batch, s.min_size)
    if s.opt.compile and not s.compiled:
        compile_nets(s, batch)
    s.stepper.step(batch["A"], batch["B"])
    if decided := choice.report():  # what --kernels auto decided in this step, if it met new shapes
        s.dist.say(decided)


class EagerStep:
    """CycleGAN.optimize in GraphedStep's shape: read() returns the losses of the steps since the last read,
    under torchrun averaged over the ranks (which also agree at every step on whether one was signalled to stop)."""

    def __init__(self, model: CycleGAN, dist: Dist, stop: "StopSignal"):
        self.model, self.dist, self.stop, self.ready = model, dist, stop, []

    def step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
        losses = self.model.optimize(real_A, real_B)
        if self.dist.enabled:
            losses, stop = average_losses(self.dist, losses, stop=bool(self.stop.name), device=self.model.device)
            if stop and not self.stop.name:
                self.stop.name = "a signal on another rank"
        self.ready.append(losses)

    def read(self) -> list[dict[str, float]]:
        out, self.ready = self.ready, []
        return out


def compile_nets(s: Setup, batch: dict) -> None:
    """--compile, before the first step: the kernels of every layer decided (decide_kernels), so that the
    compiled graphs hold checked choices only, then the four nets compiled in place (parameters and
    state_dict keys stay those of the plain modules; torch.compile traces at their next call)."""
    if s.opt.kernels == "auto":
        decide_kernels(s.model, s.model.place(batch["A"]), s.model.place(batch["B"]))
    for net in s.model.nets().values():
        net.compile()
    s.compiled = True


def decide_kernels(model: CycleGAN, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
    """One eager forward of each net as the step runs it (autocast, both cycles, each D on a fake), so that
    --kernels auto decides and checks every layer's kernels on these shapes now. On a CPU, where nothing is
    decided, nothing runs. Training does not change: the RNG is forked, the nets run in eval mode (no
    BatchNorm statistics updated, no dropout drawn) and no backward runs (no gradients)."""
    if not choice.CHOOSER.applies(real_A):
        return
    modes = {m: m.training for net in model.nets().values() for m in net.modules()}
    try:
        with torch.random.fork_rng(devices=[real_A.device] if real_A.is_cuda else []), model._autocast():
            for net in model.nets().values():
                net.eval()
            images = objective.cycles(model.netG_A, model.netG_B, real_A, real_B)
            model.netD_A(images["fake_B"]), model.netD_B(images["fake_A"])
    finally:
        for m, training in modes.items():
            m.train(training)


def check_image_sizes(batch: dict, min_size: int) -> None:
    """--preprocess none keeps each image's size: it may be too small for the nets."""
    for side in ("A", "B"):
        if min(batch[side].shape[-2:]) < min_size:
            raise DataError(f"{batch[side + '_paths'][0]}: {tuple(batch[side].shape[-2:])} is smaller "
                            f"than {min_size}x{min_size}, the smallest image the nets accept "
                            f"(use --preprocess resize_and_crop or scale_width)")


def check_finite(losses: dict[str, float], *, epoch: int, iteration: int, run_dir: Path) -> None:
    if bad := [k for k, v in losses.items() if not math.isfinite(v)]:
        raise FloatingPointError(f"loss {bad[0]} is {losses[bad[0]]} at epoch {epoch}, iteration {iteration}: "
                                 f"training stopped; the last saved checkpoint in {run_dir} is untouched "
                                 f"(try a lower --lr, or --amp none)")


def epoch_metric(history: list[tuple[float, dict[str, float]]], epoch: int) -> float:
    """Mean generator loss over the epoch's logged points (the plateau policy's metric)."""
    points = [v for x, v in history if epoch - 1 < x <= epoch]
    return sum(v["G_A"] + v["G_B"] + v["cycle_A"] + v["cycle_B"] for v in points) / max(1, len(points))


def save(s: Setup, run: Run, epoch_label: str | None = None) -> None:
    """latest_state.pth and latest_net_*.pth (and <epoch_label>_net_*.pth): RunCheckpoints.save."""
    s.ckpt.save(s.model, run, options=dict(vars(s.opt)), dist=s.dist, log_bytes=s.log.size(), epoch_label=epoch_label)


class StopSignal:
    """How a run answers Ctrl-C (SIGINT) and SIGTERM, in a `with` block around main(). Before the training loop,
    either stops the run at once (KeyboardInterrupt): nothing is under way that a save would keep. While the loop
    runs (`with stop.loop()`), the first sets `name`: the loop finishes its iteration, saves and stops; a second
    stops at once. After the loop they change nothing. One handler throughout, its answer set by `phase`: a
    handler swapped out on the way to the exit still runs for a signal that arrived just before (signal.signal
    runs pending handlers first), and a KeyboardInterrupt raised there would escape every `except` of main()."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.phase = "set-up"  # then "loop", then "over"

    def __enter__(self) -> "StopSignal":
        self.found = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        self.phase = "over"
        for s, handler in self.found.items():
            signal.signal(s, handler)

    @contextlib.contextmanager
    def loop(self):
        self.phase = "loop"
        try:
            yield
        finally:
            self.phase = "over"

    def _handler(self, signum, frame) -> None:
        if self.phase == "over":
            return
        if self.phase == "loop" and not self.name:
            self.name = signal.Signals(signum).name
            print(f"\n{self.name}: finishing this iteration and saving (press Ctrl-C again to abort)", file=sys.stderr)
            return
        raise KeyboardInterrupt


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; the main process decides when to stop, not the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- the command line --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The official train.py's flags, with its defaults, then ours (add_our_flags)."""
    p = cli.OneLineParser(prog="train.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    a = p.add_argument
    a("--dataroot", help="folder with trainA/ and trainB/ (default: the built-in synthetic dataset)")
    a("--name", default="experiment_name", help="run name: files go to checkpoints_dir/name")
    a("--checkpoints_dir", default="./checkpoints")
    a("--input_nc", type=int, default=3, help="channels of domain A images (1 = grayscale)")
    a("--output_nc", type=int, default=3, help="channels of domain B images")
    a("--ngf", type=int, default=64, help="generator filters in the first conv layer")
    a("--ndf", type=int, default=64, help="discriminator filters in the first conv layer")
    a("--netG", default="resnet_9blocks", choices=networks.GENERATORS)
    a("--netD", default="basic", choices=networks.DISCRIMINATORS, help="basic = 70x70 PatchGAN")
    a("--n_layers_D", type=int, default=3, help="discriminator depth with --netD n_layers")
    a("--norm", default="instance", choices=networks.NORMS)
    a("--init_type", default="normal", choices=networks.INIT_TYPES)
    a("--init_gain", type=float, default=0.02)
    a("--no_dropout", action="store_true", default=True, help="no dropout in the generator (CycleGAN default)")
    a("--dropout", dest="no_dropout", action="store_false", help="dropout 0.5 in the ResNet blocks")
    a("--gan_mode", default="lsgan", choices=("lsgan", "vanilla"))
    a("--pool_size", type=int, default=50, help="size of the buffer of past fakes; 0 disables it")
    a("--lambda_A", type=float, default=10.0, help="weight of the cycle loss A->B->A")
    a("--lambda_B", type=float, default=10.0, help="weight of the cycle loss B->A->B")
    a("--lambda_identity", type=float, default=0.5, help="identity loss weight, relative to lambda_A/B")
    a("--lr", type=float, default=0.0002)
    a("--beta1", type=float, default=0.5)
    a("--n_epochs", type=int, default=100, help="epochs at the initial learning rate")
    a("--n_epochs_decay", type=int, default=100, help="epochs of linear decay to zero")
    a("--lr_policy", default="linear", choices=LR_POLICIES)
    a("--lr_decay_iters", type=int, default=50, help="StepLR period (epochs) with --lr_policy step")
    a("--batch_size", type=int, default=1)
    a("--load_size", type=int, default=286, help="scale images to this size")
    a("--crop_size", type=int, default=256, help="then crop to this size")
    a("--preprocess", default="resize_and_crop",
      choices=("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none"))
    a("--no_flip", action="store_true", default=False, help="no random horizontal flips")
    a("--serial_batches", action="store_true", default=False, help="take images in order, pair A[i] with B[i]")
    a("--num_threads", type=int, default=None,
      help="data loading worker processes (default: 0 on a CPU, where the step needs every core; "
           "up to 8 on a GPU, one core per rank left to drive it)")
    a("--max_dataset_size", type=float, default=float("inf"), help="use at most this many images per domain")
    a("--phase", default="train", help="subfolder prefix: <phase>A, <phase>B")
    a("--continue_train", action="store_true", default=False, help="resume the run in checkpoints_dir/name")
    a("--epoch", default="latest", help="with --continue_train: 'latest' (exact resume) or an epoch's weights")
    a("--epoch_count", type=int, default=1, help="first epoch number (only for a run that starts fresh)")
    a("--save_epoch_freq", type=int, default=5, help="save <epoch>_net_*.pth every this many epochs")
    a("--save_latest_freq", type=int, default=5000, help="save latest_* every this many images")
    a("--print_freq", type=int, default=100, help="log losses every this many images")
    a("--no_html", action="store_true", default=False, help="do not write checkpoints_dir/name/web/index.html")
    add_our_flags(p)
    return p


def add_our_flags(p: argparse.ArgumentParser) -> None:
    cli.add_device_flags(p, "nets")
    a = p.add_argument
    a("--seed", type=int, default=None, help="seed for init, data order and the pools (default: random)")
    a("--max_steps", type=int, default=None, help="stop when the run reaches this many iterations in all")
    a("--amp", default="none", choices=("none", "bf16", "fp16"), help="mixed precision for G and D")
    a("--compile", action="store_true", default=False,
      help="torch.compile the four nets (the Triton kernels stay in the graph as custom ops)")
    a("--cuda_graph", action="store_true", default=False,
      help="capture the whole iteration once as a CUDA graph and replay it (far fewer host launches; "
           "losses are read back every --print_freq images)")


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with the built-in dataset's preset under the flags not given when there is no --dataroot."""
    parser = build_parser()
    opt = parser.parse_args(argv)
    explicit = cli.explicit_options(parser, sys.argv[1:] if argv is None else argv)
    opt.builtin = opt.dataroot is None
    if opt.builtin:
        for k, v in BUILTIN_PRESET.items():
            if k not in explicit:
                setattr(opt, k, v)
    for flag in ("batch_size", "load_size", "crop_size", "ngf", "ndf", "n_epochs_decay", "print_freq",
                 "save_epoch_freq", "save_latest_freq", "input_nc", "output_nc", "n_layers_D"):
        if getattr(opt, flag) < (0 if flag == "n_epochs_decay" else 1):
            raise SystemExit(f"train.py: error: --{flag} must be positive, got {getattr(opt, flag)}")
    if opt.n_epochs < 0 or (opt.num_threads or 0) < 0 or opt.pool_size < 0:
        raise SystemExit("train.py: error: --n_epochs, --num_threads and --pool_size must be >= 0")
    if opt.max_steps is not None and opt.max_steps < 1:
        raise SystemExit(f"train.py: error: --max_steps must be >= 1, got {opt.max_steps}")
    if opt.cuda_graph and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("train.py: error: --cuda_graph does not run under torchrun: each step's gradient "
                         "all-reduce and stop vote would have to move into the graph; drop --cuda_graph")
    if opt.cuda_graph and opt.amp == "fp16":
        raise SystemExit("train.py: error: --cuda_graph with --amp fp16: the gradient scaler checks for infs on "
                         "the host and skips steps, which a captured graph cannot; use --amp bf16")
    return opt


def resume_command(argv: list[str], nproc: int) -> str:
    """The command that resumes this run, shell-quoted so that paths with spaces survive copy and paste."""
    launcher = ["torchrun", "--nproc_per_node", str(nproc)] if nproc > 1 else ["python"]
    return shlex.join(launcher + ["train.py"] + [a for a in argv if a != "--continue_train"] + ["--continue_train"])


def error_line(message: str) -> None:
    """One line on stderr in one write: under torchrun the ranks share one stream, and print's separate
    newline would let two ranks' lines run into each other."""
    sys.stderr.write(f"train.py: {message}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opt = parse_options(argv)
    dist = Dist()
    try:
        with StopSignal() as stop:
            return train(opt, cli.explicit_options(build_parser(), argv), argv, dist, stop)
    except (DataError, CheckpointError, FloatingPointError, ValueError, RanksDisagree, CollectiveFailed,
            choice.FatalKernelError) as e:
        msg = str(e)
        if "\nOriginal Traceback" in msg:  # re-raised from a DataLoader worker: keep the worker's own message
            msg = msg.rstrip().splitlines()[-1].split(": ", 1)[-1]
        error_line(f"error: {msg}")
        return 1
    except torch.OutOfMemoryError as e:  # the GPU's memory, in a step or in the kernel choice's check
        error_line(f"error: {' '.join(str(e).split()).split('. Including')[0]}; try a smaller --batch_size, "
                   f"--load_size or --crop_size, or --amp bf16 (the last saved checkpoint is intact)")
        return 1
    except OSError as e:  # disk full, permissions ... while saving: the previous checkpoint is intact
        error_line(f"error: {e.strerror or e}: {e.filename or ''} (the previous checkpoint is intact)")
        return 1
    except BaseException as e:  # Ctrl-C, or a library's own error while cleaning up after one
        if not caused_by(e, KeyboardInterrupt):
            raise
        saved = any((Path(opt.checkpoints_dir) / opt.name).glob("latest_state*.pth"))
        error_line("aborted; the last saved checkpoint is intact" if saved else "aborted before anything was saved")
        return 130
    finally:
        dist.close()  # also after an error raised before the training loop's own teardown


if __name__ == "__main__":
    # What main() puts back when it returns: by then the run is over and saved, and a late Ctrl-C changes nothing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main())
