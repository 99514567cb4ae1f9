"""The training objective's parts: ImagePool semantics, LR schedule per epoch, GAN losses, one step."""

import io
import random

import pytest
import torch

from minicycle.model import Config, CycleGAN
from minicycle.objective import GANLoss
from minicycle.optim import linear_lr_factor
from minicycle.pool import ImagePool


def test_pool_size_zero_returns_input():
    x = torch.randn(3, 3, 4, 4)
    assert ImagePool(0).query(x) is x


def test_pool_fills_then_swaps_half_the_time():
    pool = ImagePool(4, seed=1)
    first = [torch.full((1, 1, 2, 2), float(i)) for i in range(4)]
    for t in first:  # while filling: stores and returns the current image
        assert torch.equal(pool.query(t), t)
    assert len(pool.images) == 4
    returned_old = 0
    for i in range(4, 404):
        t = torch.full((1, 1, 2, 2), float(i))
        out = pool.query(t)
        if not torch.equal(out, t):
            returned_old += 1
            assert out[0, 0, 0, 0].item() < i  # an earlier image, and the new one took its slot
            assert any(torch.equal(img, t) for img in pool.images)
    assert 150 < returned_old < 250  # p = 0.5
    assert len(pool.images) == 4


def test_pool_matches_reference_semantics_per_sample():
    """Batch queries act per sample, in order, exactly like the official per-image loop."""
    pool, rng = ImagePool(3, seed=7), random.Random(7)
    ref_images: list[torch.Tensor] = []
    for step in range(20):
        batch = torch.randn(2, 1, 2, 2)
        out = pool.query(batch)
        for j in range(2):
            img = batch[j:j + 1]
            if len(ref_images) < 3:
                ref_images.append(img)
                expect = img
            elif rng.uniform(0, 1) > 0.5:
                k = rng.randint(0, 2)
                expect, ref_images[k] = ref_images[k], img
            else:
                expect = img
            assert torch.equal(out[j:j + 1], expect), (step, j)


def test_pool_state_round_trip():
    a, b = ImagePool(2, seed=3), ImagePool(2, seed=99)
    for _ in range(5):
        a.query(torch.randn(1, 1, 2, 2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 2, 2)
    assert torch.equal(a.query(x), b.query(x))


def test_linear_lr_factor_per_epoch():
    f = [linear_lr_factor(e - 1, 1, 100, 100) for e in range(1, 201)]  # epoch E trains at f[E-1]
    assert f[:100] == [1.0] * 100
    assert f[100] == pytest.approx(1 - 1 / 101) and f[199] == pytest.approx(1 / 101)
    assert min(f) > 0  # never a zero-LR epoch


def test_scheduler_steps_at_epoch_end():
    cfg = Config(ngf=4, ndf=4, netG="resnet_6blocks", n_epochs=2, n_epochs_decay=3)
    model = CycleGAN(cfg)
    lrs = [model.optimizer_G.param_groups[0]["lr"]]
    for _ in range(5):
        lrs.append(model.step_schedulers(0.0))
    assert lrs[:5] == pytest.approx([2e-4, 2e-4, 2e-4 * 3 / 4, 2e-4 * 2 / 4, 2e-4 * 1 / 4])
    assert model.optimizer_D.param_groups[0]["lr"] == lrs[-1]


@pytest.mark.parametrize("policy", ["step", "plateau", "cosine"])
def test_other_lr_policies_run(policy):
    model = CycleGAN(Config(ngf=4, ndf=4, netG="resnet_6blocks", lr_policy=policy, n_epochs=4, lr_decay_iters=1))
    lr = [model.step_schedulers(1.0) for _ in range(7)]
    assert all(0 <= x <= 2e-4 for x in lr) and lr[-1] < 2e-4


def test_gan_losses():
    pred = torch.tensor([[0.5, -1.0]])
    assert GANLoss("lsgan")(pred, True).item() == pytest.approx(((0.5 - 1) ** 2 + 4) / 2)
    assert GANLoss("lsgan")(pred, False).item() == pytest.approx((0.25 + 1) / 2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(pred, torch.ones_like(pred))
    assert GANLoss("vanilla")(pred, True).item() == pytest.approx(bce.item())


def test_one_step_updates_all_nets_and_losses_are_finite(torch_path):
    torch.manual_seed(0)
    model = CycleGAN(Config(ngf=4, ndf=4, netG="resnet_6blocks", pool_size=2))
    before = {k: [p.clone() for p in n.parameters()] for k, n in model.nets().items()}
    losses = model.optimize(torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1)
    assert set(losses) == {"D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    for k, net in model.nets().items():
        assert any(not torch.equal(a, b) for a, b in zip(before[k], net.parameters())), k
    assert set(model.visuals) == {"real_A", "fake_B", "rec_A", "idt_B", "real_B", "fake_A", "rec_B", "idt_A"}


def test_identity_needs_equal_channels():
    with pytest.raises(ValueError, match="lambda_identity"):
        CycleGAN(Config(ngf=4, ndf=4, netG="resnet_6blocks", input_nc=1, output_nc=3))
    CycleGAN(Config(ngf=4, ndf=4, netG="resnet_6blocks", input_nc=1, output_nc=3, lambda_identity=0))


def test_bf16_autocast_steps_stay_finite(torch_path):
    torch.manual_seed(0)
    model = CycleGAN(Config(ngf=4, ndf=4, netG="resnet_6blocks"), amp=torch.bfloat16)
    for _ in range(3):
        losses = model.optimize(torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1)
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def test_channels_last_trains_as_nchw_saves_the_default_layout_and_resumes_exactly(torch_path):
    """set_memory_format(channels_last): the same losses up to fp32 rounding (NHWC convolutions sum in
    another order), weights and Adam moments held channels_last, the saved state in the default
    layout, and a resume from it continuing bit for bit."""
    def build(fmt: torch.memory_format) -> CycleGAN:
        torch.manual_seed(0)
        m = CycleGAN(Config(ngf=4, ndf=4, netG="resnet_6blocks", pool_size=2))
        m.set_memory_format(fmt)
        return m

    gen = torch.Generator().manual_seed(1)
    batches = [tuple(torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1 for _ in "AB") for _ in range(4)]
    ref, cl = build(torch.contiguous_format), build(torch.channels_last)
    for a, b in batches[:2]:
        want, got = ref.optimize(a, b), cl.optimize(a, b)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    weights = [p for p in cl.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert sum(not p.is_contiguous() for p in weights) > len(weights) // 2
    moments = [v for o in (cl.optimizer_G, cl.optimizer_D) for s in o.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() == 4]
    assert len(moments) == 2 * len(weights) and all(v.is_contiguous(memory_format=torch.channels_last)
                                                    for v in moments)
    state = cl.training_state()
    assert all(t.is_contiguous() for t in _tensors(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    resumed = build(torch.channels_last)
    resumed.load_training_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert all(v.is_contiguous(memory_format=torch.channels_last) for o in (resumed.optimizer_G,)
               for s in o.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() == 4)
    for a, b in batches[2:]:
        assert resumed.optimize(a, b) == cl.optimize(a, b)
    for x, y in zip(_tensors(resumed.training_state()), _tensors(cl.training_state())):
        assert torch.equal(x, y)
