"""Networks (ALGORITHM §1): U-Net shapes and sizes, EDM preconditioning, dropout replay, LPIPS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ayt.errors import ConfigError
from ayt.networks.lpips import LPIPS, write_random_lpips_weights
from ayt.networks.precond import EDMPrecond, build_denoiser
from ayt.networks.unet import UNet

CONF = Path(__file__).resolve().parents[1] / "conf"
EDM = OmegaConf.create({"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5})


def network_cfg(preset: str, **overrides):
    cfg = OmegaConf.load(CONF / "network" / f"{preset}.yaml")
    return OmegaConf.merge(cfg, overrides)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize(net: torch.nn.Module, seed: int = 0) -> None:
    """Give every weight a non-trivial value (the near-zero inits would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a loaded shared 2-core machine, OpenMP thread contention
    made each small forward pass ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cpu_net() -> EDMPrecond:
    torch.manual_seed(0)
    net = build_denoiser(network_cfg("cpu"), EDM, img_resolution=16, img_channels=1)
    randomize(net)
    return net


# --- U-Net ----------------------------------------------------------------------------------


def test_cpu_preset_shape_and_size(cpu_net):
    x = torch.randn(3, 1, 16, 16)
    out = cpu_net.eval()(x, torch.tensor([0.01, 1.0, 80.0]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # "about 1M parameters" (ALGORITHM §1)
    assert 0.6e6 <= n_params(cpu_net) <= 1.6e6


def test_cifar10_preset_size():
    net = build_denoiser(network_cfg("cifar10"), EDM, img_resolution=32, img_channels=3)
    # the 56M-parameter DDPM++ class of the papers
    assert 45e6 <= n_params(net) <= 65e6


def test_cifar10_preset_structure_forward_at_small_width():
    # Same levels, blocks and attention as the cifar10 preset, narrower so the CPU test is fast.
    torch.manual_seed(0)
    net = build_denoiser(network_cfg("cifar10", model_channels=8), EDM, img_resolution=32, img_channels=3)
    x = torch.randn(2, 3, 32, 32)
    out = net(x, torch.tensor([0.5, 5.0]))
    assert out.shape == (2, 3, 32, 32)
    assert any(blk.attention for blk in net.unet.enc if hasattr(blk, "attention"))  # attention at 16


def test_resample_blocks_option_adds_parameters():
    plain = UNet(16, 1, 1, model_channels=8, channel_mult=(1, 2), num_blocks=1)
    blocks = UNet(16, 1, 1, model_channels=8, channel_mult=(1, 2), num_blocks=1, resample_blocks=True)
    assert n_params(blocks) > n_params(plain)
    out = blocks(torch.randn(2, 1, 16, 16), torch.zeros(2))
    assert out.shape == (2, 1, 16, 16)


def test_fourier_embedding_and_odd_sizes():
    torch.manual_seed(0)
    net = UNet(28, 1, 1, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), embedding="fourier")
    out = net(torch.randn(2, 1, 28, 28), torch.randn(2))  # MNIST size: levels 28, 14, 7
    assert out.shape == (2, 1, 28, 28)


def test_channels_last_matches_contiguous(cpu_net):
    net = cpu_net.eval()
    x = torch.randn(2, 1, 16, 16)
    sigma = torch.tensor([0.3, 3.0])
    ref = net(x, sigma)
    net_cl = build_denoiser(network_cfg("cpu"), EDM, 16, 1)
    net_cl.load_state_dict(net.state_dict())
    net_cl = net_cl.eval().to(memory_format=torch.channels_last)
    out = net_cl(x.to(memory_format=torch.channels_last), sigma)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError) as err:
        build_denoiser(network_cfg("cpu", embedding="sinusoid"), EDM, 16, 1)
    assert err.value.field == "network.embedding"
    with pytest.raises(ConfigError) as err:
        build_denoiser(network_cfg("cpu", widht=3), EDM, 16, 1)
    assert err.value.field == "network.widht"
    with pytest.raises(ConfigError) as err:
        build_denoiser(network_cfg("cpu", channel_mult=[1, 2, 2, 2, 2]), EDM, 28, 1)
    assert err.value.field == "network.channel_mult"
    with pytest.raises(ConfigError) as err:
        build_denoiser(network_cfg("cpu"), OmegaConf.merge(EDM, {"sigma_min": 100.0}), 16, 1)
    assert err.value.field == "edm.sigma_min"


# --- preconditioning ----------------------------------------------------------------------------


def test_boundary_condition_is_exact(cpu_net):
    net = cpu_net.eval()
    torch.manual_seed(1)
    x = torch.randn(4, 1, 16, 16) * 2
    c = net.coefficients(0.002, batch=4)
    raw = net.unet(c.c_in.reshape(-1, 1, 1, 1) * x, c.c_noise)
    assert raw.abs().mean() > 0.1  # the network's own output is far from zero here
    for sigma in (0.002, torch.full((4,), 0.002), torch.full((4, 1, 1, 1), 0.002), torch.tensor(0.002)):
        assert torch.equal(net(x, sigma), x)
    # mixed batch: only the rows at sigma_min are returned untouched
    out = net(x, torch.tensor([0.002, 0.5, 0.002, 10.0]))
    assert torch.equal(out[[0, 2]], x[[0, 2]])
    assert not torch.allclose(out[[1, 3]], x[[1, 3]])


def test_boundary_condition_exact_for_awkward_sigma_data():
    # sigma_data = 1.3: 1.69 / t computed as reciprocal(t) * 1.69 is not exactly 1 in float32.
    torch.manual_seed(0)
    net = EDMPrecond(8, 1, sigma_min=0.002, sigma_data=1.3, model_channels=8, channel_mult=(1, 2), num_blocks=1)
    randomize(net)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(net(x, 0.002), x)


def test_boundary_condition_under_autocast(cpu_net):
    x = torch.randn(2, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_net.eval()(x, 0.002)
        out_mid = cpu_net(x, 1.0)
    assert out.dtype == torch.float32 and out_mid.dtype == torch.float32
    assert torch.equal(out, x)


def test_coefficients_at_sigma_one(cpu_net):
    # By hand with sigma_data 0.5, sigma_min 0.002, sigma 1:
    # c_skip = 0.25 / (0.998^2 + 0.25) = 0.25 / 1.246004
    # c_out  = 0.998 * 0.5 / sqrt(1.25) = 0.499 / 1.1180340
    # c_in   = 1 / sqrt(1.25);  c_noise = ln(1) / 4 = 0
    c = cpu_net.coefficients(1.0)
    assert c.c_skip.item() == pytest.approx(0.20064141, abs=1e-7)
    assert c.c_out.item() == pytest.approx(0.44631917, abs=1e-7)
    assert c.c_in.item() == pytest.approx(0.89442719, abs=1e-7)
    assert c.c_noise.item() == 0.0
    # and the forward pass uses them: D = c_skip x + c_out F(c_in x, c_noise)
    net = cpu_net.eval()
    x = torch.randn(2, 1, 16, 16)
    expected = 0.20064141 * x + 0.44631917 * net.unet(0.89442719 * x, torch.zeros(2))
    torch.testing.assert_close(net(x, torch.ones(2)), expected, rtol=1e-5, atol=1e-5)


def test_dropout_mask_replay(cpu_net):
    net = cpu_net.train()
    x = torch.randn(2, 1, 16, 16)
    sigma = torch.tensor([0.5, 2.0])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = net(x, sigma)
    torch.set_rng_state(state)
    replayed = net(x, sigma)
    fresh = net(x, sigma)  # RNG has moved on: a new mask
    assert torch.equal(first, replayed)
    assert not torch.allclose(first, fresh, atol=1e-4)
    net.eval()
    assert torch.equal(net(x, sigma), net(x, sigma))


# --- LPIPS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    return write_random_lpips_weights(tmp_path_factory.mktemp("lpips"))


@pytest.fixture(scope="module")
def lpips(lpips_files):
    return LPIPS(*lpips_files)


def test_lpips_distance_properties(lpips):
    gen = torch.Generator().manual_seed(0)
    for shape in ((2, 1, 16, 16), (2, 3, 32, 32)):
        x = torch.rand(shape, generator=gen) * 2 - 1
        y = torch.rand(shape, generator=gen) * 2 - 1
        d_same = lpips(x, x)
        d_diff = lpips(x, y)
        assert d_same.shape == d_diff.shape == (2,)
        assert torch.equal(d_same, torch.zeros(2))
        assert (d_diff > 0).all()
        torch.testing.assert_close(lpips(y, x), d_diff)  # symmetric


def test_lpips_frozen_but_differentiable(lpips):
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training
    x = (torch.rand(2, 1, 16, 16) * 2 - 1).requires_grad_(True)
    lpips(x, torch.zeros(2, 1, 16, 16)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_matches_torchvision_vgg16(lpips, lpips_files):
    # Independent reference built on torchvision's own vgg16 module and the lpips recipe.
    from torchvision.models.vgg import cfgs, make_layers

    vgg = make_layers(cfgs["D"]).eval()  # what torchvision.models.vgg16().features is built from
    state = torch.load(lpips_files[0], weights_only=True)
    vgg.load_state_dict({k[len("features.") :]: v for k, v in state.items()})
    lins = torch.load(lpips_files[1], weights_only=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        h, out = (img - shift) / scale, []
        for i, layer in enumerate(vgg[:30]):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    with torch.no_grad():
        ref = sum(
            ((a - b) ** 2 * lins[f"lin{i}.model.1.weight"]).sum(1).mean((1, 2))
            for i, (a, b) in enumerate(zip(taps(x), taps(y)))
        )
        torch.testing.assert_close(lpips(x, y), ref, rtol=1e-4, atol=1e-6)


def test_lpips_missing_or_wrong_files(lpips_files, tmp_path):
    vgg, lin = lpips_files
    with pytest.raises(ConfigError) as err:
        LPIPS(str(tmp_path / "nope.pth"), lin)
    assert err.value.field == "loss.vgg_weights" and "file not found" in str(err.value)
    with pytest.raises(ConfigError) as err:
        LPIPS(vgg, str(tmp_path / "nope.pth"))
    assert err.value.field == "loss.lin_weights"
    with pytest.raises(ConfigError) as err:
        LPIPS(vgg, None)
    assert err.value.field == "loss.lin_weights"
    with pytest.raises(ConfigError) as err:
        LPIPS(lin, lin)  # swapped: not a vgg16 state dict
    assert err.value.field == "loss.vgg_weights"
