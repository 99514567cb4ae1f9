"""Train a CycleGAN on unpaired folders DIR/trainA and DIR/trainB.

    python train.py --dataroot ./datasets/horse2zebra --name horse2zebra   # the paper's setup
    python train.py                                                        # built-in synthetic dataset

Flags, defaults and outputs follow the official pytorch-CycleGAN-and-pix2pix train.py. Unlike it,
checkpoints hold the full training state, so `--continue_train` resumes exactly where a run stopped.
"""

import argparse
import math
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kernels import choice
from minicycle import datasets, networks
from minicycle.checkpoint import CheckpointError, atomic_save, caused_by, load_file
from minicycle.cuda_graph import GraphedStep
from minicycle.data import DataError, UnalignedDataset, check_preprocess, collate_batch, epoch_plan, tensor_to_image
from minicycle.distributed import CollectiveFailed, Dist, RanksDisagree, fingerprint
from minicycle.model import LOSS_NAMES, Config, CycleGAN
from minicycle.optim import LR_POLICIES
from minicycle.report import save_image_atomic, training_page, write_text_atomic

# Used when --dataroot is not given: sizes that learn the built-in dataset in a few CPU minutes.
# Any flag given explicitly wins over these.
BUILTIN_PRESET = dict(name="synthetic", load_size=32, crop_size=32, netG="resnet_6blocks", ngf=16, ndf=16,
                      n_epochs=4, n_epochs_decay=3, batch_size=1, print_freq=100,
                      save_epoch_freq=4)
ARCH_FLAGS = ("netG", "netD", "n_layers_D", "ngf", "ndf", "input_nc", "output_nc", "norm", "no_dropout")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train.py", description=__doc__.split("\n")[0], allow_abbrev=False)
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
    a("--device", default="auto", choices=("auto", "cpu", "cuda"))
    a("--seed", type=int, default=None, help="seed for init, data order and the pools (default: random)")
    a("--max_steps", type=int, default=None, help="stop when the run reaches this many iterations in all")
    a("--amp", default="none", choices=("none", "bf16", "fp16"), help="mixed precision for G and D")
    a("--compile", action="store_true", default=False,
      help="torch.compile the four nets (the Triton kernels stay in the graph as custom ops)")
    a("--cuda_graph", action="store_true", default=False,
      help="capture the whole iteration once as a CUDA graph and replay it (far fewer host launches; "
           "losses are read back every --print_freq images)")
    a("--channels_last", action="store_true", default=None,
      help="nets and images in torch.channels_last, the layout the Triton convs are shaped for "
           "(default: on with CUDA, off on a CPU)")
    a("--no_channels_last", dest="channels_last", action="store_false", help="nets and images in NCHW")
    a("--kernels", default="auto", choices=choice.MODES,
      help="auto: on CUDA, per layer shape the faster of Triton and PyTorch/cuDNN, measured and checked at first "
           "use (on a CPU, as the ops decide); triton: our Triton kernels always; pytorch: the official layers")
    return p


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    opt = parser.parse_args(argv)
    given = {a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
    explicit = {x.dest for x in parser._actions if given & set(x.option_strings)}
    opt.builtin = opt.dataroot is None
    opt._explicit = sorted(explicit)  # underscore: not an option, not saved; resume needs to know it
    opt._argv = list(sys.argv[1:] if argv is None else argv)  # for the resume command
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


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.py: error: --device cuda, but PyTorch sees no CUDA GPU (use --device cpu)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


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


def resume_command(argv: list[str], nproc: int) -> str:
    """The command that resumes this run, shell-quoted so that paths with spaces survive copy and paste."""
    launcher = ["torchrun", "--nproc_per_node", str(nproc)] if nproc > 1 else ["python"]
    return shlex.join(launcher + ["train.py"] + [a for a in argv if a != "--continue_train"] + ["--continue_train"])


def options_of(opt: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(opt).items() if not k.startswith("_")}


def write_options(opt: argparse.Namespace, path: Path) -> None:
    """train_opt.txt in the official format: every option, and its default where it differs."""
    defaults = vars(build_parser().parse_args([]))
    lines = ["----------------- Options ---------------"]
    for k, v in sorted(options_of(opt).items()):
        note = f"\t[default: {defaults[k]}]" if k in defaults and defaults[k] != v else ""
        lines.append(f"{k:>25}: {str(v):<30}{note}")
    lines.append("----------------- End -------------------")
    write_text_atomic(path, "\n".join(lines) + "\n")


class Run:
    """Counters, RNG and history that, with the model's state, make a resume exact."""

    def __init__(self, epoch: int, seed: int):
        self.epoch = epoch  # current epoch (1-based)
        self.epoch_keys = 0  # samples of this epoch's plan already consumed
        self.steps = 0  # optimizer iterations in the whole run
        self.images = 0  # images seen in the whole run (official counters use images)
        self.seed = seed
        self.history: list[tuple[float, dict[str, float]]] = []

    def state(self) -> dict:
        return {"epoch": self.epoch, "epoch_keys": self.epoch_keys, "steps": self.steps, "images": self.images,
                "seed": self.seed, "history": self.history}


class Trainer:
    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.dir = Path(opt.checkpoints_dir) / opt.name
        self.state_path = self.dir / "latest_state.pth"
        self.log_path = self.dir / "loss_log.txt"
        self.stop_signal: str | None = None
        self.dist = Dist()
        self.saved_steps = -1  # run.steps at the last save, so a stop right after one does not save twice
        self.graphed: GraphedStep | None = None  # --cuda_graph

    def say(self, *args, **kwargs) -> None:
        """print, on rank 0 only."""
        if self.dist.main:
            print(*args, **kwargs)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, model: CycleGAN, run: Run, epoch_label: str | None = None) -> None:
        """latest_state.pth (full state; the previous one kept as .prev) then latest_net_*.pth.
        Under torchrun every rank calls this (to hand over its image pools); rank 0 writes."""
        pools = self.dist.gather({"A": model.fake_A_pool.state_dict(), "B": model.fake_B_pool.state_dict()})
        prints = self.dist.gather(fingerprint(model.nets()))
        differ = [k for i, k in enumerate(model.nets()) if len({p[i] for p in prints}) > 1]
        if differ:
            raise RanksDisagree(f"the ranks hold different {', '.join(differ)} weights; refusing to save a "
                                f"diverged run (the last saved checkpoint in {self.dir} is intact)")
        self.saved_steps = run.steps
        if not self.dist.main:
            return
        state = {"format": "minicycle-train-state/1", "options": options_of(self.opt), "run": run.state(),
                 "model": model.training_state(), "pools_by_rank": pools, "rng": {"torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                 "log_bytes": self.log_path.stat().st_size if self.log_path.exists() else 0}
        tmp_target = self.state_path.with_name("latest_state.next.pth")
        atomic_save(state, tmp_target)
        if self.state_path.exists():
            os.replace(self.state_path, self.state_path.with_name("latest_state.prev.pth"))
        os.replace(tmp_target, self.state_path)
        for label in ["latest"] + ([epoch_label] if epoch_label else []):
            for k, net in model.nets().items():
                atomic_save({n: t.detach().cpu().contiguous() for n, t in net.state_dict().items()},
                            self.dir / f"{label}_net_{k}.pth")

    def load_latest_state(self) -> dict:
        """The newest intact training state: latest_state.pth, else the one before it."""
        candidates = [self.state_path.with_name(n) for n in
                      ("latest_state.pth", "latest_state.next.pth", "latest_state.prev.pth")]
        errors = []
        for path in candidates:
            if not path.exists():
                continue
            try:
                state = load_file(path)
                if not isinstance(state, dict) or state.get("format") != "minicycle-train-state/1":
                    raise CheckpointError(f"{path}: not a minicycle training state")
            except CheckpointError as e:
                errors.append(str(e))
                print(f"warning: {e}; trying an older checkpoint", file=sys.stderr)
                continue
            if errors:
                print(f"resuming from the older intact checkpoint {path}", file=sys.stderr)
            return state
        if errors:
            raise CheckpointError(f"no intact training state in {self.dir}: " + "; ".join(errors))
        raise CheckpointError(f"--continue_train: nothing to resume in {self.dir} (no latest_state.pth)")

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        opt = self.opt
        device = self.dist.setup(pick_device(opt.device))
        # As the official code: cuDNN times its algorithms once per input shape, unless the shapes vary.
        torch.backends.cudnn.benchmark = opt.preprocess not in ("none", "scale_width")
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[opt.amp]
        if opt.channels_last is None:
            opt.channels_last = device.type == "cuda"
        if opt.builtin:
            if not self.dist.main:
                self.dist.barrier()  # rank 0 generates the dataset first
            opt.dataroot = str(datasets.ensure_synthetic())
            if self.dist.main:
                self.dist.barrier()
        elif not Path(opt.dataroot).is_dir():
            raise DataError(datasets.missing_dataroot_message(opt.dataroot))
        state = None
        if opt.continue_train and opt.epoch == "latest":
            state = self.load_latest_state()
            self._check_same_architecture(state["options"])
            for k in ("seed", "epoch_count", "n_epochs", "n_epochs_decay", "lr", "lr_policy", "lr_decay_iters"):
                if k in state["options"] and getattr(opt, k) != state["options"][k]:
                    if k in opt._explicit:
                        print(f"note: keeping --{k} {state['options'][k]} of the run being resumed", file=sys.stderr)
                    setattr(opt, k, state["options"][k])
        check_preprocess(opt.preprocess, opt.load_size, opt.crop_size)
        dataset = UnalignedDataset(opt.dataroot, opt.phase, preprocess=opt.preprocess, load_size=opt.load_size,
                                   crop_size=opt.crop_size, no_flip=opt.no_flip, input_nc=opt.input_nc,
                                   output_nc=opt.output_nc, max_dataset_size=opt.max_dataset_size)
        multiple = networks.input_multiple(opt.netG)
        if opt.preprocess != "none" and opt.crop_size % multiple:
            raise DataError(f"--crop_size {opt.crop_size} must be divisible by {multiple} for --netG {opt.netG}")
        self.min_size = networks.min_input_size(opt.netG, opt.netD, opt.n_layers_D)
        size = opt.crop_size if "crop" in opt.preprocess else min(opt.load_size, opt.crop_size)
        if opt.preprocess != "none" and size < self.min_size:
            raise DataError(f"--crop_size {size} is below {self.min_size}, the smallest image --netG {opt.netG} "
                            f"with --netD {opt.netD} accepts")
        self._prepare_dir()

        if opt.seed is None:  # rank 0 draws it; every rank needs it for the same init and data plan
            opt.seed = self.dist.broadcast(random.SystemRandom().randrange(2**31) if self.dist.main else None)
        torch.manual_seed(opt.seed)
        cfg = Config(**{k: getattr(opt, k) for k in Config.__dataclass_fields__})
        model = CycleGAN(cfg, device, amp, world=self.dist.world)
        for net in model.nets().values():
            networks.set_kernels(net, opt.kernels)
        if opt.compile:
            choice.load(device)  # torch.compile traces with the decisions it finds, and makes none
            for net in model.nets().values():
                net.compile()  # in place: parameters and state_dict keys stay those of the plain module
        if opt.cuda_graph:  # set up before the state is loaded: the pools are adopted at the first step
            if device.type != "cuda":
                print("note: --cuda_graph: no CUDA device, so the step runs eagerly (same results, no speed-up)",
                      file=sys.stderr)
            self.graphed = GraphedStep(model, opt.batch_size, graph=device.type == "cuda")
        if self.dist.enabled:  # each rank keeps its own pool of fakes, with its own random stream
            model.fake_A_pool.rng.seed(f"{opt.seed}:A:{self.dist.rank}")
            model.fake_B_pool.rng.seed(f"{opt.seed}:B:{self.dist.rank}")
            if opt.norm == "batch":
                for net in model.nets().values():
                    torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        workers, threads = choose_parallelism(opt.num_threads, device, self.dist.local_world)
        n_params = sum(p.numel() for p in model.netG_A.parameters())
        ranks = f" x {self.dist.world} ranks" if self.dist.enabled else ""
        chosen = "" if opt.num_threads is None else " from --num_threads"
        layout = ", channels_last" if opt.channels_last else ""
        self.say(f"training {opt.netG} ({n_params / 1e6:.3f} M parameters per generator) on {device}{ranks}{layout} "
                 f"(torch threads: {threads}, data-loading workers: {workers}{chosen}{' per rank' if ranks else ''}); "
                 f"kernels: {choice.describe(opt.kernels, device)}; "
                 f"{len(dataset.A_paths)} A and {len(dataset.B_paths)} B images; checkpoints in {self.dir}")
        if opt.builtin:
            self.say(f"no --dataroot: using the built-in synthetic dataset in {opt.dataroot} "
                     f"(A: warm scenes, B: cool scenes; truth: swap red and blue)")
        run = Run(opt.epoch_count, opt.seed)
        if state is not None:
            model.load_training_state(state["model"])
            pools = state.get("pools_by_rank", [])
            if len(pools) == self.dist.world:
                model.fake_A_pool.load_state_dict(pools[self.dist.rank]["A"], device)
                model.fake_B_pool.load_state_dict(pools[self.dist.rank]["B"], device)
            for k, v in state["run"].items():
                setattr(run, k, v)
            torch.set_rng_state(state["rng"]["torch"])
            if device.type == "cuda" and state["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self.say(f"resuming {self.dir} at epoch {run.epoch}, iteration {run.steps}")
        elif opt.continue_train:  # weights only, from <epoch>_net_*.pth, as the official repo does
            from minicycle.checkpoint import load_into
            for k, net in model.nets().items():
                load_into(net, self.dir / f"{opt.epoch}_net_{k}.pth", map_location=device)
            self.say(f"loaded {opt.epoch}_net_*.pth (weights only; optimizer restarts) starting at epoch {run.epoch}")
        self.dist.broadcast_nets(list(model.nets().values()))
        if opt.channels_last:
            model.set_memory_format(torch.channels_last)

        log_path = self.log_path
        if self.dist.main:
            write_options(opt, self.dir / "train_opt.txt")
            if state is not None:
                self._cut_log(state.get("log_bytes"))
            with open(log_path, "a") as f:
                f.write(f"================ Training Loss ({time.strftime('%c')}) ================\n")

        last_epoch = opt.n_epochs + opt.n_epochs_decay
        self.workers, threads_before = workers, torch.get_num_threads()
        torch.set_num_threads(threads)
        self._install_signal_handlers()
        try:
            while run.epoch <= last_epoch:
                outcome = self._train_epoch(model, dataset, run, device, log_path)
                if outcome != "epoch_done":
                    if self.saved_steps != run.steps:
                        self.save(model, run)
                    break
                epoch = run.epoch
                lr = model.step_schedulers(self._epoch_metric(run, epoch))
                run.epoch, run.epoch_keys = epoch + 1, 0
                label = str(epoch) if epoch % opt.save_epoch_freq == 0 else None
                self.save(model, run, epoch_label=label)
                if self.dist.main and not opt.no_html:
                    self._write_page(model, run, epoch)
                more = f"; learning rate now {lr:.7f}" if epoch < last_epoch else ""
                self.say(f"end of epoch {epoch}/{last_epoch}{more}")
            else:
                outcome = "finished"
            # Under torchrun, tear the group down only once every rank is past its last collective, so that no
            # rank closes its connections while another still takes part in the last gather.
            self.dist.barrier()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            torch.set_num_threads(threads_before)  # for callers of main() in the same process
            self.dist.close()
        if self.dist.main and not opt.no_html and outcome != "finished":
            self._write_page(model, run, run.epoch)
        if not self.dist.main:
            return 0
        resume = resume_command(opt._argv, self.dist.local_world if self.dist.enabled else 1)
        if outcome == "signal":
            print(f"stopped by {self.stop_signal} at epoch {run.epoch}, iteration {run.steps}; state saved in "
                  f"{self.dir}. Resume with: {resume}")
        elif outcome == "max_steps":
            print(f"reached --max_steps {opt.max_steps}; state saved in {self.dir} (resume with --continue_train "
                  f"and a larger --max_steps)")
        else:
            print(f"finished {last_epoch} epochs ({run.steps} iterations); generators in {self.dir}/latest_net_G_*.pth")
        return 0

    def _train_epoch(self, model: CycleGAN, dataset: UnalignedDataset, run: Run, device: torch.device,
                     log_path: Path) -> str:
        opt = self.opt
        plan = epoch_plan(len(dataset.A_paths), len(dataset.B_paths), run.epoch, opt.seed, opt.serial_batches)
        keys = plan[run.epoch_keys:]
        # A global batch is batch_size images per rank; rank r takes its slice. A short last batch is
        # filled from the plan's start (as DistributedSampler pads) so that every rank steps together.
        world, size = self.dist.world, opt.batch_size * self.dist.world
        batches, taken = [], []
        for i in range(0, len(keys), size):
            chunk = keys[i:i + size]
            taken.append(len(chunk))
            if world > 1 and len(chunk) < size:
                chunk = chunk + (plan * size)[:size - len(chunk)]
            batches.append(chunk[self.dist.rank::world] if world > 1 else chunk)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                                             collate_fn=collate_batch,
                                             pin_memory=device.type == "cuda", worker_init_fn=_ignore_sigint)
        last_epoch = opt.n_epochs + opt.n_epochs_decay
        bar = tqdm(total=len(plan), initial=run.epoch_keys, desc=f"epoch {run.epoch}/{last_epoch}",
                   unit="img", dynamic_ncols=True, leave=False, disable=None if self.dist.main else True)
        window: dict[str, list[float]] = {k: [] for k in LOSS_NAMES}
        unread: list[tuple[int, int]] = []  # (epoch, iteration) of the steps whose losses are not read yet
        t_data = time.perf_counter()
        t_compute = n_window = 0  # --cuda_graph: compute time and images since the last log line
        try:
            for step, batch in enumerate(loader):
                t_start = time.perf_counter()
                for side in ("A", "B"):  # --preprocess none keeps each image's size: it may be too small
                    if min(batch[side].shape[-2:]) < self.min_size:
                        raise DataError(f"{batch[side + '_paths'][0]}: {tuple(batch[side].shape[-2:])} is smaller "
                                        f"than {self.min_size}x{self.min_size}, the smallest image the nets accept "
                                        f"(use --preprocess resize_and_crop or scale_width)")
                if self.graphed is None:
                    results = [model.optimize(batch["A"], batch["B"])]
                    if self.dist.enabled:  # mean losses over ranks, and stop together if any rank was signalled
                        *values, stop = self.dist.average([*results[0].values(), float(bool(self.stop_signal))],
                                                          device)
                        results = [dict(zip(results[0], values))]
                        if stop and not self.stop_signal:
                            self.stop_signal = "a signal on another rank"
                else:
                    self.graphed.step(batch["A"], batch["B"])
                    results = []
                decided = choice.report()  # what --kernels auto decided in this step, if it met new shapes
                if decided:
                    self.say(decided)
                n = taken[step]
                before = run.images
                run.steps, run.images, run.epoch_keys = run.steps + 1, run.images + n, run.epoch_keys + n
                unread.append((run.epoch, run.steps))
                logging = run.images // opt.print_freq > before // opt.print_freq
                saving = run.images // opt.save_latest_freq > before // opt.save_latest_freq
                signalled = bool(self.stop_signal)  # a signal arriving after this is handled a step later
                stopping = (opt.max_steps is not None and run.steps >= opt.max_steps) or signalled
                if self.graphed is not None and (logging or saving or stopping or step == len(batches) - 1):
                    results = self.graphed.read()  # the device's loss rows: one sync, and never a NaN saved
                for (epoch, iteration), losses in zip(unread, results):
                    bad = [k for k, v in losses.items() if not math.isfinite(v)]
                    if bad:
                        raise FloatingPointError(
                            f"loss {bad[0]} is {losses[bad[0]]} at epoch {epoch}, iteration {iteration}: "
                            f"training stopped; the last saved checkpoint in {self.dir} is untouched "
                            f"(try a lower --lr, or --amp none)")
                    for k, v in losses.items():
                        window[k].append(v)
                if results:
                    unread = []
                    bar.set_postfix({k: f"{results[-1][k]:.3f}" for k in ("D_A", "G_A", "cycle_A", "D_B", "G_B")},
                                    refresh=False)
                bar.update(n)
                t_compute, n_window = t_compute + time.perf_counter() - t_start, n_window + n
                if logging:
                    means = {k: sum(v) / len(v) for k, v in window.items()}
                    window = {k: [] for k in LOSS_NAMES}
                    run.history.append((run.epoch - 1 + run.epoch_keys / len(plan), means))
                    # Graph steps run ahead of the host and wait at the read: their time is the window's mean.
                    compute = t_compute / n_window if self.graphed else (time.perf_counter() - t_start) / n
                    t_compute = n_window = 0
                    line = (f"(epoch: {run.epoch}, iters: {run.epoch_keys}, time: {compute:.3f}, "
                            f"data: {(t_start - t_data) / n:.3f}) ")
                    line += " ".join(f"{k}: {v:.3f}" for k, v in means.items())
                    if self.dist.main:
                        with open(log_path, "a") as f:
                            f.write(line + "\n")
                        if bar.disable:
                            print(line)
                if saving:
                    self.save(model, run)
                if opt.max_steps is not None and run.steps >= opt.max_steps:
                    return "max_steps"
                if signalled:
                    return "signal"
                t_data = time.perf_counter()
        finally:
            bar.close()
        return "epoch_done"

    @staticmethod
    def _epoch_metric(run: Run, epoch: int) -> float:
        """Mean generator loss over the epoch's logged points (the plateau policy's metric)."""
        points = [v for x, v in run.history if epoch - 1 < x <= epoch]
        return sum(v["G_A"] + v["G_B"] + v["cycle_A"] + v["cycle_B"] for v in points) / max(1, len(points))

    def _write_page(self, model: CycleGAN, run: Run, epoch: int) -> None:
        web = self.dir / "web"
        images = web / "images"
        images.mkdir(parents=True, exist_ok=True)
        for label, t in model.visuals.items():
            save_image_atomic(tensor_to_image(t[0].float().cpu()), images / f"epoch{epoch:03d}_{label}.png")
        rows: dict[int, list[str]] = {}
        for f in sorted(images.glob("epoch*_*.png")):
            e = int(f.name[5:8])
            rows.setdefault(e, []).append(f.name)
        order = {k: i for i, k in enumerate(model.visuals)}
        ordered = [(e, sorted(fs, key=lambda n: order.get(n[9:-4], 99))) for e, fs in rows.items()]
        training_page(web, self.opt.name, ordered, run.history)

    def _cut_log(self, size: int | None) -> None:
        """Drop the loss_log.txt lines written after the state being resumed was saved (by a run stopped or
        killed later, or when an older state is resumed), so that each iteration's line appears once."""
        if size is None or not self.log_path.exists():
            return
        data = self.log_path.read_bytes()
        if len(data) > size:
            write_text_atomic(self.log_path, data[:size].decode("utf-8", errors="replace"))

    def _prepare_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write_test.{os.getpid()}"  # one per process: ranks probe at the same time
            probe.write_text("ok")
            probe.unlink()
            # Temp files of a save cut short by kill -9 or a power cut (a clean failure removes its own).
            # No save can be under way yet: the first one waits for the first step, which waits for every rank.
            for leftover in self.dir.glob(".*.pth.*.tmp"):
                leftover.unlink(missing_ok=True)
        except OSError as e:
            raise DataError(f"--checkpoints_dir: cannot write to {self.dir} ({e.strerror or e})") from None

    def _check_same_architecture(self, saved: dict) -> None:
        """Architecture flags not given take the resumed run's values; given ones must match them."""
        for k in ARCH_FLAGS:
            if k not in saved or getattr(self.opt, k) == saved[k]:
                continue
            if k not in getattr(self.opt, "_explicit", ()):
                setattr(self.opt, k, saved[k])
                continue
            raise CheckpointError(f"--{k} {getattr(self.opt, k)} differs from the run being resumed "
                                  f"(--{k} {saved[k]}); drop the flag or start a new --name")

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.stop_signal:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self.stop_signal = signal.Signals(signum).name
            print(f"\n{self.stop_signal}: finishing this iteration and saving (press Ctrl-C again to abort)",
                  file=sys.stderr)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; the main process decides when to stop, not the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    opt = parse_options(argv)
    trainer = Trainer(opt)
    try:
        return trainer.run()
    except (DataError, CheckpointError, FloatingPointError, ValueError, RanksDisagree, CollectiveFailed) as e:
        msg = str(e)
        if "\nOriginal Traceback" in msg:  # re-raised from a DataLoader worker: keep the worker's own message
            msg = msg.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"train.py: error: {msg}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions ... while saving: the previous checkpoint is intact
        print(f"train.py: error: {e.strerror or e}: {e.filename or ''} (the previous checkpoint is intact)",
              file=sys.stderr)
        return 1
    except BaseException as e:  # Ctrl-C, or a library's own error while cleaning up after one
        if not caused_by(e, KeyboardInterrupt):
            raise
        print("train.py: aborted; the last saved checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        trainer.dist.close()  # also after an error raised before the training loop's own teardown


if __name__ == "__main__":
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over and saved: a late Ctrl-C changes nothing
    sys.exit(code)
