"""One CycleGAN training iteration: the objective (objective.py) minimised by the official
alternation, a generator step with the discriminators frozen, then a discriminator step on pooled fakes.

CycleGAN holds the four nets, their Adam optimisers and LR schedules (optim.py), the two pools of
generated images (pool.py), and what running it needs besides the maths: autocast and the fp16
gradient scaler, the memory format, gradient averaging over data-parallel ranks, and its state for
an exact resume.
"""

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn

from minicycle import networks, objective, optim
from minicycle.distributed import average_gradients
from minicycle.objective import LOSS_NAMES, GANLoss
from minicycle.pool import ImagePool


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


class CycleGAN(nn.Module):
    """Two generators, two discriminators, their optimisers and LR schedulers, and the fake pools.

    world: the data-parallel ranks whose gradients are averaged before each step (1: no averaging).
    """

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", amp: torch.dtype | None = None,
                 world: int = 1):
        super().__init__()
        if cfg.lambda_identity > 0 and cfg.input_nc != cfg.output_nc:
            raise ValueError("--lambda_identity > 0 needs --input_nc == --output_nc (set --lambda_identity 0)")
        self.cfg, self.device, self.amp, self.world = cfg, torch.device(device), amp, world
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
        self.fake_A_pool = ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 1)
        self.fake_B_pool = ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 2)
        self.optimizer_G = optim.adam(itertools.chain(self.netG_A.parameters(), self.netG_B.parameters()),
                                      lr=cfg.lr, beta1=cfg.beta1)
        self.optimizer_D = optim.adam(itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()),
                                      lr=cfg.lr, beta1=cfg.beta1)
        self.schedulers = [optim.make_scheduler(o, policy=cfg.lr_policy, epoch_count=cfg.epoch_count,
                                                n_epochs=cfg.n_epochs, n_epochs_decay=cfg.n_epochs_decay,
                                                lr_decay_iters=cfg.lr_decay_iters)
                           for o in (self.optimizer_G, self.optimizer_D)]
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp is torch.float16)
        self.visuals: dict[str, torch.Tensor] = {}
        self.memory_format = torch.contiguous_format  # see set_memory_format

    def nets(self) -> dict[str, nn.Module]:
        return {"G_A": self.netG_A, "G_B": self.netG_B, "D_A": self.netD_A, "D_B": self.netD_B}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer_G, self.optimizer_D]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def set_memory_format(self, fmt: torch.memory_format) -> None:
        """Hold the nets' 4-d weights, their Adam moments and the inputs (see place) in `fmt`.
        torch.channels_last puts channels innermost, the layout the Triton convs are shaped for on
        CUDA (16-byte loads along K). Values, state_dict keys and saved files do not change."""
        self.memory_format = fmt
        for net in self.nets().values():
            net.to(memory_format=fmt)  # in place: the optimizers keep the same Parameter objects
        optim.set_memory_format(self.optimizers(), fmt)

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch on the model's device, in its memory format."""
        return x.to(self.device, memory_format=self.memory_format)

    def optimize(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, float]:
        """One iteration in the official order: forward, G step (D frozen), then D step."""
        losses = self.step(self.place(real_A), self.place(real_B))
        return dict(zip(LOSS_NAMES, losses.tolist()))  # one device sync

    def step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> torch.Tensor:
        """The iteration on device tensors, with no host sync: returns the 8 losses (LOSS_NAMES order)
        as one fp32 tensor."""
        cfg, G_A, G_B, D_A, D_B = self.cfg, self.netG_A, self.netG_B, self.netD_A, self.netD_B
        with self._autocast():
            images = objective.cycles(G_A, G_B, real_A, real_B)

        # The generators' step, the discriminators frozen.
        self._train_discriminators(False)
        self.optimizer_G.zero_grad(set_to_none=True)
        with self._autocast():
            losses = objective.generator_losses(G_A, G_B, D_A, D_B, real_A=real_A, real_B=real_B, images=images,
                                                gan=self.criterionGAN, lambda_A=cfg.lambda_A,
                                                lambda_B=cfg.lambda_B, lambda_identity=cfg.lambda_identity)
            loss_G = objective.generator_objective(losses)
        self.scaler.scale(loss_G).backward()
        average_gradients([G_A, G_B], self.world)
        self.scaler.step(self.optimizer_G)

        # The discriminators' step, on fakes drawn from the pools of earlier ones.
        self._train_discriminators(True)
        self.optimizer_D.zero_grad(set_to_none=True)
        # In the model's memory format, whatever the pools hold (a resumed pool's images are contiguous).
        pooled_B = self.fake_B_pool.query(images["fake_B"]).contiguous(memory_format=self.memory_format)
        pooled_A = self.fake_A_pool.query(images["fake_A"]).contiguous(memory_format=self.memory_format)
        with self._autocast():
            losses["D_A"] = objective.discriminator_loss(D_A, real_B, pooled_B, self.criterionGAN)
            losses["D_B"] = objective.discriminator_loss(D_B, real_A, pooled_A, self.criterionGAN)
        self.scaler.scale(losses["D_A"] + losses["D_B"]).backward()
        average_gradients([D_A, D_B], self.world)
        self.scaler.step(self.optimizer_D)
        self.scaler.update()

        visuals = {"real_A": real_A, "fake_B": images["fake_B"], "rec_A": images["rec_A"],
                   "idt_B": images.get("idt_B"), "real_B": real_B, "fake_A": images["fake_A"],
                   "rec_B": images["rec_B"], "idt_A": images.get("idt_A")}
        self.visuals = {k: v.detach() for k, v in visuals.items() if v is not None}
        return torch.stack([losses[k].detach().float() for k in LOSS_NAMES])

    def _train_discriminators(self, on: bool) -> None:
        for p in itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()):
            p.requires_grad_(on)

    def step_schedulers(self, metric: float) -> float:
        """Called once at the end of every epoch; returns the learning rate for the next one."""
        optim.step_schedulers(self.schedulers, metric)
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


def _contiguous(obj):
    """`obj` (nested dicts and lists) with every tensor in the default memory format."""
    if torch.is_tensor(obj):
        return obj.contiguous()
    if isinstance(obj, dict):
        return {k: _contiguous(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_contiguous(v) for v in obj)
    return obj
