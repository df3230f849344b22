"""TimeMLP, UNet, their embeddings and build_network: shapes, conditioning, gradients, seeds, errors."""
import math

import ml_collections
import pytest
import torch
import torch.nn.functional as F

from sde_diffusion import VPSDE
from sde_diffusion.models import ScoreModel, TimeMLP, UNet, build_network
from sde_diffusion.models.embeddings import GaussianFourierProjection, sinusoidal_embedding
from sde_diffusion.models.unet import AttnBlock, ResBlock


def tiny_unet(**kw):
    args = dict(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    args.update(kw)
    return UNet(**args)


def randomize_zero_params(net, seed=0):
    """Give the zero-initialised layers (outputs, second convs, attention projections) random
    weights, so that outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not bool(p.any()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


# ---- shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 5])
@pytest.mark.parametrize("embedding", ["fourier", "sinusoidal"])
def test_mlp_shapes_and_zero_init(dim, embedding):
    net = TimeMLP(dim, hidden=32, depth=2, time_embedding=embedding, embed_dim=16)
    x = torch.randn(7, dim)
    out = net(x, torch.rand(7))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))       # output layer starts at zero


@pytest.mark.parametrize("size,mults,attn", [(8, (1, 2), (4,)), (16, (1, 2, 2), (8,)), (32, (1, 2, 2, 2), (8,))])
def test_unet_shapes(size, mults, attn):
    net = randomize_zero_params(UNet(image_size=size, in_channels=3, base_channels=8, channel_mults=mults,
                                     num_res_blocks=1, attn_resolutions=attn))
    x = torch.randn(2, 3, size, size)
    out = net(x, torch.rand(2))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("kw", [dict(resblock_updown=True), dict(skip_rescale=False),
                                dict(time_embedding="sinusoidal"), dict(dropout=0.1, attn_resolutions=()),
                                dict(embed_dim=6, num_classes=4), dict(base_channels=12, channel_mults=(1, 3))])
def test_unet_variants(kw):
    net = tiny_unet(**kw)
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))       # output conv starts at zero


def test_networks_work_through_the_wrapper_in_float64():
    sde = VPSDE()
    for net, shape in ((TimeMLP(2, hidden=16), (4, 2)), (tiny_unet(), (4, 1, 8, 8))):
        model = ScoreModel(randomize_zero_params(net).double(), sde, parameterization="eps")
        x = torch.randn(shape, dtype=torch.float64)
        assert model.score(x, 0.5).dtype == torch.float64 and model.score(x, 0.5).shape == shape


# ---- time and label conditioning --------------------------------------------------------------
@pytest.mark.parametrize("make,shape", [(lambda **k: TimeMLP(2, hidden=16, **k), (5, 2)),
                                        (lambda **k: tiny_unet(**k), (5, 1, 8, 8))])
def test_time_conditioning(make, shape):
    net = randomize_zero_params(make())
    x = torch.randn(shape)
    t = torch.full((5,), 0.3)
    assert torch.allclose(net(x, t), net(x, 0.3)) and torch.allclose(net(x, t), net(x, torch.tensor(0.3)))
    assert torch.allclose(net(x, t), net(x, t[:, None]))
    assert not torch.allclose(net(x, t), net(x, t + 0.05))
    # per-sample times act per sample
    t2 = torch.tensor([0.3, 0.9, 0.3, 0.9, 0.3])
    out, out2 = net(x, t), net(x, t2)
    assert torch.allclose(out[0::2], out2[0::2], atol=1e-6) and not torch.allclose(out[1::2], out2[1::2])


def test_integer_index_time_is_accepted():
    net = randomize_zero_params(TimeMLP(2, hidden=16, time_embedding="sinusoidal", time_scale=1.0))
    x = torch.randn(3, 2)
    assert torch.allclose(net(x, torch.tensor([10, 500, 999])), net(x, torch.tensor([10.0, 500.0, 999.0])))


@pytest.mark.parametrize("make,shape", [(lambda **k: TimeMLP(2, hidden=16, **k), (6, 2)),
                                        (lambda **k: tiny_unet(**k), (6, 1, 8, 8))])
def test_label_conditioning_and_null_label(make, shape):
    K = 3
    net = randomize_zero_params(make(num_classes=K))
    x, t = torch.randn(shape), torch.rand(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = net(x, t, y)
    assert not torch.allclose(out, net(x, t, (y + 1) % K))
    assert torch.equal(net(x, t), net(x, t, torch.full((6,), K)))      # y=None is the null label K
    assert not torch.allclose(net(x, t), out)
    assert net.cond.label.table.num_embeddings == K + 1
    with pytest.raises(ValueError, match="labels must lie in"):
        net(x, t, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match="integer"):
        net(x, t, y.float())
    with pytest.raises(ValueError, match="unconditional"):
        make()(x, t, y)


# ---- gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("make,shape", [(lambda: TimeMLP(2, hidden=16, num_classes=2), (8, 2)),
                                        (lambda: tiny_unet(num_classes=2, dropout=0.1), (8, 1, 8, 8)),
                                        (lambda: tiny_unet(resblock_updown=True), (8, 1, 8, 8))])
def test_gradients_reach_every_parameter(make, shape):
    """From the default (zero-output) initialisation, two optimiser steps open every path: then
    every parameter gets a non-zero gradient, and so does the input."""
    net = make()
    x, t = torch.randn(shape), torch.rand(8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]) if net.num_classes else None
    target = torch.randn(shape)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(net(x, t, y), target).backward()
        opt.step()
    opt.zero_grad()
    x.requires_grad_(True)
    F.mse_loss(net(x, t, y), target).backward()
    silent = [name for name, p in net.named_parameters() if p.grad is None or not bool(p.grad.any())]
    assert not silent, f"no gradient reaches {silent}"
    assert bool(x.grad.any())


# ---- building blocks ----------------------------------------------------------------------------
def test_resblock_skip_rescale_and_attention_formula():
    x, temb = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    # the second conv starts at zero: a block starts as its (rescaled) shortcut
    assert torch.allclose(ResBlock(8, 8, 16, skip_rescale=True)(x, temb), x / math.sqrt(2))
    assert torch.allclose(ResBlock(8, 8, 16, skip_rescale=False)(x, temb), x)
    attn = randomize_zero_params(AttnBlock(8, skip_rescale=True))
    h = attn.norm(x)
    q, k, v = attn.qkv(h).reshape(2, 3, 8, 16).unbind(1)                     # (B, C, HW)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(8), dim=-1)
    ref = attn.proj(torch.einsum("bij,bcj->bci", w, v).reshape(2, 8, 4, 4))
    assert torch.allclose(attn(x), (x + ref) / math.sqrt(2), atol=1e-5)


def test_embeddings():
    s = torch.tensor([0.0, 0.5, 1.0])
    emb = sinusoidal_embedding(s, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 3)
    assert torch.allclose(emb, torch.cat([(s[:, None] * freqs).sin(), (s[:, None] * freqs).cos()], 1))
    assert sinusoidal_embedding(s, 7).shape == (3, 7)
    proj = GaussianFourierProjection(16, scale=16.0)
    ang = 2 * math.pi * s[:, None] * proj.W
    assert torch.allclose(proj(s), torch.cat([ang.sin(), ang.cos()], 1))
    assert torch.equal(proj.W, GaussianFourierProjection(16, scale=16.0).W)   # fixed, seeded frequencies
    assert "W" in dict(proj.named_buffers()) and not list(proj.parameters())
    # log transform for sigma inputs: sigma and exp(log sigma) agree
    net = randomize_zero_params(TimeMLP(2, hidden=16, time_transform="log"))
    x = torch.randn(3, 2)
    assert torch.allclose(net(x, torch.tensor([0.01, 1.0, 50.0])), net(x, torch.tensor([0.01, 1.0, 50.0]).log().exp()))


# ---- determinism --------------------------------------------------------------------------------
@pytest.mark.parametrize("make,shape", [(lambda: TimeMLP(2, hidden=16), (4, 2)),
                                        (lambda: tiny_unet(dropout=0.2), (4, 1, 8, 8))])
def test_same_seed_same_network(make, shape):
    torch.manual_seed(123)
    a = make()
    torch.manual_seed(123)
    b = make()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    torch.manual_seed(124)
    c = make()
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))
    randomize_zero_params(a), randomize_zero_params(b)
    x, t = torch.randn(shape), torch.rand(4)
    a.eval(), b.eval()
    assert torch.equal(a(x, t), b(x, t))


# ---- errors -------------------------------------------------------------------------------------
def test_clear_errors():
    with pytest.raises(ValueError, match=r"image_size=10 must be divisible by 2\*\*\(len\(channel_mults\)-1\) = 4"):
        UNet(image_size=10, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match=r"attn_resolutions \[16\] do not occur"):
        UNet(image_size=8, attn_resolutions=(16,))
    with pytest.raises(ValueError, match="channel_mults"):
        UNet(channel_mults=())
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.5)
    with pytest.raises(ValueError, match="time_embedding must be one of"):
        TimeMLP(2, time_embedding="learned")
    with pytest.raises(ValueError, match="activation must be one of"):
        TimeMLP(2, activation="sigmoidish")
    with pytest.raises(ValueError, match="even"):
        TimeMLP(2, embed_dim=15)
    with pytest.raises(ValueError, match="depth must be an integer >= 1, got 0"):
        TimeMLP(2, depth=0)
    net = tiny_unet()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 8, 8\).*got \(2, 1, 16, 16\)"):
        net(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match=r"got \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 2\), got \(4, 3\)"):
        TimeMLP(2)(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"t must be a scalar or a \(batch,\) tensor with batch 4, got shape \(3,\)"):
        TimeMLP(2)(torch.randn(4, 2), torch.rand(3))


# ---- build_network ------------------------------------------------------------------------------
def test_build_network_from_config():
    cfg = ml_collections.ConfigDict(dict(name="mlp", hidden=24, depth=2))
    net = build_network(cfg, (3,))
    assert isinstance(net, TimeMLP) and net.inp.in_features == 3 and net.inp.out_features == 24
    assert len(net.blocks) == 2 and net.cond.time.kind == "fourier"               # default kept
    cfg = ml_collections.ConfigDict(dict(name="unet", base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                                         attn_resolutions=(4,), num_classes=10, embed_dim=None, dropout=0.0,
                                         skip_rescale=True, resblock_updown=False, time_embedding="fourier",
                                         fourier_scale=16.0))
    net = build_network(cfg, (1, 8, 8))
    assert isinstance(net, UNet) and net.channel_mults == (1, 2) and net.num_classes == 10
    assert net(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([3, 10])).shape == (2, 1, 8, 8)
    assert isinstance(build_network({"name": "unet", "attn_resolutions": (8,)}, (1, 16, 16)), UNet)


def test_build_network_errors():
    with pytest.raises(ValueError, match=r"model name must be one of \['mlp', 'unet'\], got 'cnn'"):
        build_network(ml_collections.ConfigDict(dict(name="cnn")), (2,))
    with pytest.raises(ValueError, match=r"fields \['hiden'\] are not arguments of TimeMLP.*valid fields"):
        build_network(ml_collections.ConfigDict(dict(name="mlp", hiden=8)), (2,))
    with pytest.raises(ValueError, match=r"needs data_shape \(dim,\)"):
        build_network({"name": "mlp"}, (1, 8, 8))
    with pytest.raises(ValueError, match="square images"):
        build_network({"name": "unet"}, (1, 8, 16))
    with pytest.raises(ValueError, match="contradicts data_shape"):
        build_network({"name": "unet", "image_size": 16}, (1, 8, 8))


@pytest.mark.gpu
def test_networks_follow_the_device_on_cuda():
    from sde_diffusion.data import infinite_batches
    from sde_diffusion.metrics import sliced_wasserstein

    dev = torch.device("cuda")
    for net, shape in ((TimeMLP(2, hidden=16, num_classes=3), (4, 2)), (tiny_unet(num_classes=3), (4, 1, 8, 8))):
        net = randomize_zero_params(net).to(dev)
        x, t, y = torch.randn(shape, device=dev), torch.rand(4, device=dev), torch.tensor([0, 1, 2, 3], device=dev)
        out = net(x, t, y)
        assert out.device.type == "cuda" and out.shape == x.shape
        out.square().mean().backward()
        assert torch.allclose(out.cpu(), net.cpu()(x.cpu(), t.cpu(), y.cpu()), atol=1e-4)
    batches = infinite_batches(torch.arange(10, device=dev), 4, torch.Generator().manual_seed(0))
    assert next(batches).device.type == "cuda"
    assert sliced_wasserstein(torch.zeros(5, 2, device=dev), torch.zeros(5, 2)) == 0.0
