"""Architectures against the official layer lists: parameter counts, state_dict keys, loading
official-layout files (with stale InstanceNorm keys), and the fused forward vs plain nn layers."""

import pytest
import torch
import torch.nn as nn

from minicycle import networks
from minicycle.checkpoint import CheckpointError, load_into

RESNET9_KEYS = (
    ["model.1.weight", "model.1.bias", "model.4.weight", "model.4.bias", "model.7.weight", "model.7.bias"]
    + [f"model.{i}.conv_block.{j}.{p}" for i in range(10, 19) for j in (1, 5) for p in ("weight", "bias")]
    + [f"model.{i}.{p}" for i in (19, 22, 26) for p in ("weight", "bias")]
)


def official_resnet(input_nc=3, output_nc=3, ngf=8, n_blocks=2, stale_running_stats=True) -> nn.Module:
    """The official ResnetGenerator's `model` list (reference.md 1.2), written out independently.
    With stale_running_stats, InstanceNorm keeps buffers, as checkpoints from PyTorch < 0.4 do."""
    def norm(c):
        return nn.InstanceNorm2d(c, affine=False, track_running_stats=stale_running_stats)

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(d, d, 3), norm(d), nn.ReLU(True),
                                            nn.ReflectionPad2d(1), nn.Conv2d(d, d, 3), norm(d))

        def forward(self, x):
            return x + self.conv_block(x)

    layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7), norm(ngf), nn.ReLU(True),
              nn.Conv2d(ngf, 2 * ngf, 3, 2, 1), norm(2 * ngf), nn.ReLU(True),
              nn.Conv2d(2 * ngf, 4 * ngf, 3, 2, 1), norm(4 * ngf), nn.ReLU(True)]
    layers += [Block(4 * ngf) for _ in range(n_blocks)]
    layers += [nn.ConvTranspose2d(4 * ngf, 2 * ngf, 3, 2, 1, 1), norm(2 * ngf), nn.ReLU(True),
               nn.ConvTranspose2d(2 * ngf, ngf, 3, 2, 1, 1), norm(ngf), nn.ReLU(True),
               nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(*layers)

        def forward(self, x):
            return self.model(x)

    return Generator()


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_parameter_counts_match_official():
    assert n_params(networks.define_G(3, 3, 64, "resnet_9blocks")) == 11_378_179
    assert n_params(networks.define_D(3, 64, "basic")) == 2_764_737
    assert n_params(networks.define_G(3, 3, 64, "unet_256", norm="batch")) == 54_413_955


def test_resnet9_keys_exact():
    assert list(networks.define_G(3, 3, 64, "resnet_9blocks").state_dict()) == RESNET9_KEYS


def test_dropout_moves_second_conv_to_index_6():
    keys = networks.define_G(3, 3, 8, "resnet_6blocks", use_dropout=True).state_dict()
    assert "model.10.conv_block.6.weight" in keys and "model.10.conv_block.5.weight" not in keys
    assert "model.23.weight" in keys  # final conv of resnet_6blocks


@pytest.mark.slow
def test_discriminator_keys_and_output():
    d = networks.define_D(3, 64, "basic")
    assert list(d.state_dict()) == [f"model.{i}.{p}" for i in (0, 2, 5, 8, 11) for p in ("weight", "bias")]
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    pixel = networks.define_D(3, 64, "pixel")
    assert [k for k in pixel.state_dict() if k.endswith("weight")] == ["net.0.weight", "net.2.weight", "net.5.weight"]


def test_unet_keys_nest_like_official():
    keys = list(networks.define_G(3, 3, 8, "unet_128", norm="batch").state_dict())
    assert keys[0] == "model.model.0.weight"
    assert "model.model.1.model.1.weight" in keys and "model.model.3.weight" in keys


def test_official_layout_file_with_stale_keys_loads_and_reproduces(tmp_path, torch_path):
    torch.manual_seed(0)
    ref = official_resnet(ngf=8, n_blocks=2)
    for m in ref.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0, 0.2)
            nn.init.normal_(m.bias, 0, 0.1)
    state = ref.state_dict()
    assert any(k.endswith("running_mean") for k in state) and any(k.endswith("num_batches_tracked") for k in state)
    torch.save(state, tmp_path / "latest_net_G.pth")
    ours = networks.ResnetGenerator(3, 3, ngf=8, n_blocks=2)
    load_into(ours, tmp_path / "latest_net_G.pth")
    # Reference forward as the official model runs at test time (instance stats, not running stats).
    for m in ref.modules():
        if isinstance(m, nn.InstanceNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    x = torch.randn(2, 3, 20, 28)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_our_state_dict_loads_strictly_into_official_layout():
    ours = networks.ResnetGenerator(3, 3, ngf=8, n_blocks=2)
    official_resnet(ngf=8, n_blocks=2, stale_running_stats=False).load_state_dict(ours.state_dict(), strict=True)


def test_mismatched_checkpoint_names_likely_flags(tmp_path):
    torch.save(networks.define_G(3, 3, 16, "resnet_6blocks").state_dict(), tmp_path / "g.pth")
    net = networks.define_G(3, 3, 16, "resnet_9blocks")
    try:
        load_into(net, tmp_path / "g.pth", expected_flags="--netG resnet_9blocks --ngf 16")
    except CheckpointError as e:
        msg = str(e)
    else:
        raise AssertionError("a 6-block file loaded into a 9-block generator")
    assert "g.pth" in msg and "--netG resnet_6blocks" in msg and "\n" not in msg


def test_fused_forward_and_grads_match_plain_layers(torch_path):
    """The FusedSequential walk (pad+conv, norm+act pairs) equals running the nn layers one by one."""
    torch.manual_seed(0)
    for net in (networks.define_G(3, 3, 8, "resnet_6blocks"), networks.define_D(3, 8, "basic"),
                networks.define_G(3, 3, 4, "unet_128")):
        networks.init_weights(net, "normal", 0.1)
        x = torch.randn(1, 3, 128, 128) if isinstance(net, networks.UnetGenerator) else torch.randn(2, 3, 32, 32)
        y_fused = net(x)
        g_fused = torch.autograd.grad(y_fused.square().sum(), list(net.parameters()))
        networks.set_fused(net, False)
        y_plain = net(x)
        g_plain = torch.autograd.grad(y_plain.square().sum(), list(net.parameters()))
        torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_fused, g_plain):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_init_types():
    for init_type in networks.INIT_TYPES:
        net = networks.init_weights(networks.define_D(3, 8, "basic"), init_type, 0.02)
        assert all(torch.isfinite(p).all() for p in net.parameters())
        assert all((m.bias == 0).all() for m in net.modules() if isinstance(m, nn.Conv2d) and m.bias is not None)
