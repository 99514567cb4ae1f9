"""Optimisers and learning-rate schedules, as the official code sets them up (paper, section 4):
Adam(lr 2e-4, betas (0.5, 0.999)) for the generators together and for the discriminators together,
the rate kept for n_epochs and then decayed linearly to zero over n_epochs_decay.
"""

from collections.abc import Iterable

import torch

LR_POLICIES = ("linear", "step", "plateau", "cosine")


def adam(params: Iterable[torch.nn.Parameter], *, lr: float, beta1: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999))


def linear_lr_factor(epoch_index: int, epoch_count: int, n_epochs: int, n_epochs_decay: int) -> float:
    """Official 'linear' rule. The scheduler steps once at the end of each epoch, so epoch E
    (1-based) trains at 1 - max(0, E - n_epochs) / (n_epochs_decay + 1): never a zero-LR epoch."""
    return 1.0 - max(0, epoch_index + epoch_count - n_epochs) / float(n_epochs_decay + 1)


def make_scheduler(optimizer: torch.optim.Optimizer, *, policy: str, epoch_count: int, n_epochs: int,
                   n_epochs_decay: int, lr_decay_iters: int):
    if policy == "linear":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: linear_lr_factor(e, epoch_count, n_epochs, n_epochs_decay))
    if policy == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_decay_iters, gamma=0.1)
    if policy == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.2, threshold=0.01,
                                                          patience=5)
    if policy == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_epochs, eta_min=0)
    raise ValueError(f"--lr_policy {policy!r}: choose one of {', '.join(LR_POLICIES)}")


def step_schedulers(schedulers: list, metric: float) -> None:
    """Once at the end of every epoch (plateau watches `metric`)."""
    for s in schedulers:
        if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
            s.step(metric)
        else:
            s.step()


def set_memory_format(optimizers: list[torch.optim.Optimizer], fmt: torch.memory_format) -> None:
    """Hold the 4-d Adam moments in `fmt`, as their weights are."""
    for opt in optimizers:
        for state in opt.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() == 4:
                    state[k] = v.contiguous(memory_format=fmt)
