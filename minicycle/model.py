"""The CycleGAN objective and one optimisation step (Zhu et al. 2017, eq. 1-3 and section 4):

    L(G, F, D_X, D_Y) = L_GAN(G, D_Y) + L_GAN(F, D_X) + lambda * L_cyc(G, F)  [+ identity loss]

with G = G_A: A->B, F = G_B: B->A, D_A judging domain B, D_B judging domain A (official naming).
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from minicycle import networks
from minicycle.distributed import average_gradients
from minicycle.pool import ImagePool

LOSS_NAMES = ("D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B")
VISUAL_NAMES = ("real_A", "fake_B", "rec_A", "idt_B", "real_B", "fake_A", "rec_B", "idt_A")
LR_POLICIES = ("linear", "step", "plateau", "cosine")
PoolFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Config:
    """The training hyper-parameters the model needs (train.py fills it from the flags)."""

    input_nc: int = 3
    output_nc: int = 3
    ngf: int = 64
    ndf: int = 64
    netG: str = "resnet_9blocks"
    netD: str = "basic"
    n_layers_D: int = 3
    norm: str = "instance"
    init_type: str = "normal"
    init_gain: float = 0.02
    no_dropout: bool = True
    gan_mode: str = "lsgan"
    pool_size: int = 50
    lambda_A: float = 10.0
    lambda_B: float = 10.0
    lambda_identity: float = 0.5
    lr: float = 0.0002
    beta1: float = 0.5
    lr_policy: str = "linear"
    n_epochs: int = 100
    n_epochs_decay: int = 100
    epoch_count: int = 1
    lr_decay_iters: int = 50
    seed: int = 0


class GANLoss(nn.Module):
    """LSGAN: mean (D(x) - target)^2 (Mao et al. 2017, what the paper uses); vanilla: BCE with logits."""

    def __init__(self, gan_mode: str):
        super().__init__()
        if gan_mode == "lsgan":
            self.loss = nn.MSELoss()
        elif gan_mode == "vanilla":
            self.loss = nn.BCEWithLogitsLoss()
        else:
            raise ValueError(f"--gan_mode {gan_mode!r}: choose lsgan or vanilla")

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = torch.full_like(prediction, 1.0 if target_is_real else 0.0)
        return self.loss(prediction.float(), target.float())


def linear_lr_factor(epoch_index: int, epoch_count: int, n_epochs: int, n_epochs_decay: int) -> float:
    """Official 'linear' rule. The scheduler steps once at the end of each epoch, so epoch E
    (1-based) trains at 1 - max(0, E - n_epochs) / (n_epochs_decay + 1): never a zero-LR epoch."""
    return 1.0 - max(0, epoch_index + epoch_count - n_epochs) / float(n_epochs_decay + 1)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    if cfg.lr_policy == "linear":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: linear_lr_factor(e, cfg.epoch_count, cfg.n_epochs, cfg.n_epochs_decay))
    if cfg.lr_policy == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_iters, gamma=0.1)
    if cfg.lr_policy == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.2, threshold=0.01,
                                                          patience=5)
    if cfg.lr_policy == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.n_epochs, eta_min=0)
    raise ValueError(f"--lr_policy {cfg.lr_policy!r}: choose one of {', '.join(LR_POLICIES)}")


class CycleGAN(nn.Module):
    """Two generators, two discriminators, their optimisers and LR schedulers, and the fake pools."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", amp: torch.dtype | None = None):
        super().__init__()
        if cfg.lambda_identity > 0 and cfg.input_nc != cfg.output_nc:
            raise ValueError("--lambda_identity > 0 needs --input_nc == --output_nc (set --lambda_identity 0)")
        self.cfg, self.device, self.amp = cfg, torch.device(device), amp
        g = dict(ngf=cfg.ngf, netG=cfg.netG, norm=cfg.norm, use_dropout=not cfg.no_dropout)
        d = dict(ndf=cfg.ndf, netD=cfg.netD, n_layers_D=cfg.n_layers_D, norm=cfg.norm)
        self.netG_A = networks.define_G(cfg.input_nc, cfg.output_nc, **g)
        self.netG_B = networks.define_G(cfg.output_nc, cfg.input_nc, **g)
        self.netD_A = networks.define_D(cfg.output_nc, **d)
        self.netD_B = networks.define_D(cfg.input_nc, **d)
        for net in self.nets().values():
            networks.init_weights(net, cfg.init_type, cfg.init_gain)
        self.to(self.device)
        self.criterionGAN = GANLoss(cfg.gan_mode)
        self.l1 = nn.L1Loss()
        self.fake_A_pool = ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 1)
        self.fake_B_pool = ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 2)
        betas = (cfg.beta1, 0.999)
        self.optimizer_G = torch.optim.Adam(itertools.chain(self.netG_A.parameters(), self.netG_B.parameters()),
                                            lr=cfg.lr, betas=betas)
        self.optimizer_D = torch.optim.Adam(itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()),
                                            lr=cfg.lr, betas=betas)
        self.schedulers = [make_scheduler(o, cfg) for o in (self.optimizer_G, self.optimizer_D)]
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp is torch.float16)
        self.visuals: dict[str, torch.Tensor] = {}
        self.memory_format = torch.contiguous_format  # see set_memory_format
        self.capturable = False  # Adam's form; see set_capturable
        self.world = 1  # data-parallel ranks whose gradients are averaged before each step (train.py sets it)

    def nets(self) -> dict[str, nn.Module]:
        return {"G_A": self.netG_A, "G_B": self.netG_B, "D_A": self.netD_A, "D_B": self.netD_B}

    def _autocast(self, cache: bool = True):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None,
                              cache_enabled=cache)

    def set_memory_format(self, fmt: torch.memory_format) -> None:
        """Hold the nets' 4-d weights, their Adam moments and the inputs (see place) in `fmt`.
        torch.channels_last puts channels innermost, the layout the Triton convs are shaped for on
        CUDA (16-byte loads along K). Values, state_dict keys and saved files do not change."""
        self.memory_format = fmt
        for net in self.nets().values():
            net.to(memory_format=fmt)  # in place: the optimizers keep the same Parameter objects
        for opt in (self.optimizer_G, self.optimizer_D):
            for state in opt.state.values():
                for k, v in state.items():
                    if torch.is_tensor(v) and v.dim() == 4:
                        state[k] = v.contiguous(memory_format=fmt)

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch on the model's device, in its memory format."""
        return x.to(self.device, memory_format=self.memory_format)

    def optimize(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, float]:
        """One iteration in the official order: forward, G step (D frozen), then D step."""
        losses = self.step(self.place(real_A), self.place(real_B), self._query_pools)
        return dict(zip(LOSS_NAMES, losses.tolist()))  # one device sync

    def _query_pools(self, fake_B: torch.Tensor, fake_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # In the model's memory format whatever the pool holds (a resumed pool's images are contiguous).
        fmt = self.memory_format
        return (self.fake_B_pool.query(fake_B).contiguous(memory_format=fmt),
                self.fake_A_pool.query(fake_A).contiguous(memory_format=fmt))

    def step(self, real_A: torch.Tensor, real_B: torch.Tensor, pools: PoolFn, graph_safe: bool = False) -> torch.Tensor:
        """The iteration on device tensors, with no host sync: returns the 8 losses (LOSS_NAMES order)
        as one fp32 tensor. pools(fake_B, fake_A) gives the (pooled) fakes D_A and D_B see.

        graph_safe (for CUDA graph capture, minicycle/cuda_graph.py): autocast keeps no cache of
        cast weights, as capture requires. Without the cache a weight used several times in one
        autocast region is cast once per use, so under bf16 its gradient is summed in fp32 over the
        uses rather than in bf16: the last bits differ (fp32 is unaffected). Gradients are set to
        None as usual: under capture, backward then allocates them in the graph's own memory pool,
        at addresses every replay reuses.
        """
        cfg = self.cfg
        with self._autocast(not graph_safe):
            fake_B = self.netG_A(real_A)
            rec_A = self.netG_B(fake_B)
            fake_A = self.netG_B(real_B)
            rec_B = self.netG_A(fake_A)

        # Generators: fool both D's, reconstruct both ways, and (optionally) leave the target domain alone.
        for p in itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()):
            p.requires_grad_(False)
        self.optimizer_G.zero_grad(set_to_none=True)
        with self._autocast(not graph_safe):
            losses = {}
            if cfg.lambda_identity > 0:
                idt_A = self.netG_A(real_B)
                idt_B = self.netG_B(real_A)
                losses["idt_A"] = self.l1(idt_A.float(), real_B) * cfg.lambda_B * cfg.lambda_identity
                losses["idt_B"] = self.l1(idt_B.float(), real_A) * cfg.lambda_A * cfg.lambda_identity
            else:
                idt_A = idt_B = None
                losses["idt_A"] = losses["idt_B"] = torch.zeros((), device=self.device)
            losses["G_A"] = self.criterionGAN(self.netD_A(fake_B), True)
            losses["G_B"] = self.criterionGAN(self.netD_B(fake_A), True)
            losses["cycle_A"] = self.l1(rec_A.float(), real_A) * cfg.lambda_A
            losses["cycle_B"] = self.l1(rec_B.float(), real_B) * cfg.lambda_B
            loss_G = sum(losses[k] for k in ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B"))
        self.scaler.scale(loss_G).backward()
        average_gradients([self.netG_A, self.netG_B], self.world)
        self.scaler.step(self.optimizer_G)

        # Discriminators: real -> 1, (pooled) fake -> 0, halved so D learns slower than G.
        for p in itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()):
            p.requires_grad_(True)
        self.optimizer_D.zero_grad(set_to_none=True)
        pooled_B, pooled_A = pools(fake_B, fake_A)
        with self._autocast(not graph_safe):
            losses["D_A"] = self._loss_D(self.netD_A, real_B, pooled_B)
            losses["D_B"] = self._loss_D(self.netD_B, real_A, pooled_A)
        self.scaler.scale(losses["D_A"] + losses["D_B"]).backward()
        average_gradients([self.netD_A, self.netD_B], self.world)
        self.scaler.step(self.optimizer_D)
        self.scaler.update()

        self.visuals = {"real_A": real_A, "fake_B": fake_B, "rec_A": rec_A, "idt_B": idt_B,
                        "real_B": real_B, "fake_A": fake_A, "rec_B": rec_B, "idt_A": idt_A}
        self.visuals = {k: v.detach() for k, v in self.visuals.items() if v is not None}
        return torch.stack([losses[k].detach().float() for k in LOSS_NAMES])

    def _loss_D(self, netD: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return (self.criterionGAN(netD(real), True) + self.criterionGAN(netD(fake.detach()), False)) * 0.5

    def set_capturable(self, capturable: bool) -> None:
        """Adam in its capturable form (step counts on the device, bias corrections as tensor ops: no
        host sync, as a CUDA graph needs; CUDA only) or the default one. The two round differently
        (last bits). A loaded optimizer state carries the flag it was saved with, so
        load_training_state applies this one again."""
        self.capturable = capturable
        for opt in (self.optimizer_G, self.optimizer_D):
            for group in opt.param_groups:
                group["capturable"] = capturable
                for p in group["params"]:
                    state = opt.state.get(p, {})
                    if "step" in state:
                        state["step"] = state["step"].to(p.device if capturable else "cpu")

    def step_schedulers(self, metric: float) -> float:
        """Called once at the end of every epoch; returns the learning rate for the next one."""
        for s in self.schedulers:
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                s.step(metric)
            else:
                s.step()
        return self.optimizer_G.param_groups[0]["lr"]

    def training_state(self) -> dict:
        """Everything an exact resume needs besides the counters and RNGs (train.py adds those).
        Tensors in the default memory format, whatever set_memory_format chose."""
        return _contiguous({
            "nets": {k: v.state_dict() for k, v in self.nets().items()},
            "optimizer_G": self.optimizer_G.state_dict(),
            "optimizer_D": self.optimizer_D.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "fake_A_pool": self.fake_A_pool.state_dict(),
            "fake_B_pool": self.fake_B_pool.state_dict(),
        })

    def load_training_state(self, state: dict) -> None:
        for k, net in self.nets().items():
            net.load_state_dict(state["nets"][k])
        self.optimizer_G.load_state_dict(state["optimizer_G"])
        self.optimizer_D.load_state_dict(state["optimizer_D"])
        for s, sd in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(sd)
        self.scaler.load_state_dict(state["scaler"])
        self.fake_A_pool.load_state_dict(state["fake_A_pool"], self.device)
        self.fake_B_pool.load_state_dict(state["fake_B_pool"], self.device)
        self.set_memory_format(self.memory_format)  # the loaded Adam moments too
        self.set_capturable(self.capturable)


def _contiguous(obj):
    """`obj` (nested dicts and lists) with every tensor in the default memory format."""
    if torch.is_tensor(obj):
        return obj.contiguous()
    if isinstance(obj, dict):
        return {k: _contiguous(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_contiguous(v) for v in obj)
    return obj
