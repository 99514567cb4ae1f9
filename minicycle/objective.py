"""The CycleGAN objective (Zhu et al. 2017, section 3), one term at a time.

G = G_A translates A -> B and F = G_B translates B -> A; D_A judges domain B (the paper's D_Y) and
D_B judges domain A (D_X), as the official code names them. The full objective, eq. 3:

    L(G, F, D_X, D_Y) = L_GAN(G, D_Y) + L_GAN(F, D_X) + lambda * L_cyc(G, F)   [+ L_identity, section 5.2]

The generators minimise it and the discriminators maximise the L_GAN terms. Optimisers, mixed
precision, data parallelism and the pool of generated images live elsewhere (model.py, pool.py).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# The order of every loss vector and log line, as the official code prints them.
LOSS_NAMES = ("D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B")
VISUAL_NAMES = ("real_A", "fake_B", "rec_A", "idt_B", "real_B", "fake_A", "rec_B", "idt_A")


class GANLoss(nn.Module):
    """L_GAN (eq. 1) with the least-squares loss of section 4 (LSGAN, Mao et al. 2017):

        lsgan     mean (D(x) - t)^2,  t = 1 for real, 0 for fake    (what the paper trains with)
        vanilla   binary cross-entropy of the logits D(x) against t (eq. 1 as written)
    """

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


def cycles(G_A: nn.Module, G_B: nn.Module, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both translation cycles: A -> G(A) -> F(G(A)) and B -> F(B) -> G(F(B))."""
    fake_B = G_A(real_A)
    rec_A = G_B(fake_B)
    fake_A = G_B(real_B)
    rec_B = G_A(fake_A)
    return {"fake_B": fake_B, "rec_A": rec_A, "fake_A": fake_A, "rec_B": rec_B}


def generator_losses(G_A: nn.Module, G_B: nn.Module, D_A: nn.Module, D_B: nn.Module, *, real_A: torch.Tensor,
                     real_B: torch.Tensor, images: dict[str, torch.Tensor], gan: GANLoss, lambda_A: float,
                     lambda_B: float, lambda_identity: float) -> dict[str, torch.Tensor]:
    """The generators' six terms; adds the identity mappings G(B) and F(A) to `images` when used."""
    losses = {}
    # Identity (section 5.2, from Taigman et al.): a generator fed its own target domain should leave
    # it alone, which keeps colours. L_idt = E_y ||G(y) - y||_1 + E_x ||F(x) - x||_1, weighted lambda_idt * lambda.
    if lambda_identity > 0:
        images["idt_A"] = G_A(real_B)
        images["idt_B"] = G_B(real_A)
        losses["idt_A"] = F.l1_loss(images["idt_A"].float(), real_B) * lambda_B * lambda_identity
        losses["idt_B"] = F.l1_loss(images["idt_B"].float(), real_A) * lambda_A * lambda_identity
    else:
        losses["idt_A"] = losses["idt_B"] = torch.zeros((), device=real_A.device)
    # Adversarial (eq. 1; least squares, section 4): G minimises E_x (D_Y(G(x)) - 1)^2, F likewise.
    losses["G_A"] = gan(D_A(images["fake_B"]), True)
    losses["G_B"] = gan(D_B(images["fake_A"]), True)
    # Cycle consistency (eq. 2): L_cyc = E_x ||F(G(x)) - x||_1 + E_y ||G(F(y)) - y||_1, each weighted lambda.
    losses["cycle_A"] = F.l1_loss(images["rec_A"].float(), real_A) * lambda_A
    losses["cycle_B"] = F.l1_loss(images["rec_B"].float(), real_B) * lambda_B
    return losses


def generator_objective(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 3 as the generators minimise it, plus the identity terms (summed in the official order)."""
    return sum(losses[k] for k in ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B"))


def discriminator_loss(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, gan: GANLoss) -> torch.Tensor:
    """D's side of eq. 1 (least squares): E_y (D(y) - 1)^2 + E_x D(G(x))^2, halved so that D learns
    slower than G (section 4). `fake` comes from the pool of earlier fakes, and no gradient reaches G."""
    return (gan(D(real), True) + gan(D(fake.detach()), False)) * 0.5
