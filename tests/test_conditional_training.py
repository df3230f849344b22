"""Training with class labels (issue 12): labels reach the network, label dropout for
classifier-free guidance, exact resume, a conditional toy that learns its classes, and the
noise-conditional classifier against the exact class posterior of a Gaussian mixture."""
import math
import os

import pytest
import torch

from sde_diffusion import GaussianMixture
from sde_diffusion.checkpoints import (CheckpointError, classifier_from_checkpoint, load_checkpoint,
                                       model_from_checkpoint)
from sde_diffusion.config import apply_overrides, classifier_config, load_config, toy_config
from sde_diffusion.data import mixture_dataset
from sde_diffusion.losses import drop_labels
from sde_diffusion.models.classifier import MLPClassifier, NoisyClassifier, UNetClassifier
from sde_diffusion.samplers import sample
from sde_diffusion.sdes import VPSDE
from sde_diffusion.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COND = os.path.join(ROOT, "configs", "toy", "8gaussians_cond.py")
TINY = {"training.batch_size": 64, "training.log_freq": 5, "training.snapshot_freq_for_preemption": 5,
        "model.hidden": 16, "model.depth": 2, "model.embed_dim": 16, "data.n_train": 512,
        "optim.warmup": 4, "training.sample_freq": 0}


def tiny(n_iters, **over):
    c = load_config(COND)
    return apply_overrides(c, {**TINY, "training.n_iters": n_iters, **over})


class Spy(torch.nn.Module):
    """Records the labels it is called with, and whether x's sign agrees with them."""

    def __init__(self, dim=1):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append((x.detach().clone(), None if y is None else y.clone()))
        return x * 0 + self.w


# ---- labels reach the network, dropout -----------------------------------------------------------
def test_labels_reach_the_network_with_their_samples_and_dropout_at_its_rate(tmp_path):
    n, K = 256, 2
    y = torch.arange(n) % K
    x = torch.where(y == 1, 1e4, -1e4).float()[:, None]          # sign(x_t) = label for every t
    spy = Spy()
    c = tiny(30, **{"training.batch_size": 64, "model.num_classes": K, "training.p_uncond": 0.25})
    train(c, str(tmp_path), quiet=True, net=spy, data=(x, y))
    ys = torch.cat([s[1] for s in spy.seen])
    xs = torch.cat([s[0][:, 0] for s in spy.seen])
    assert len(spy.seen) == 30 and ys.shape == (30 * 64,)
    kept = ys != K
    assert bool(((xs[kept] > 0).long() == ys[kept]).all())          # each label with its own sample
    rate = float((~kept).double().mean())                           # 1920 draws: sd 0.0099
    assert abs(rate - 0.25) < 0.04, rate
    # p_uncond = 0: every label arrives, none is the null label
    spy0 = Spy()
    train(tiny(5, **{"model.num_classes": K, "training.p_uncond": 0.0}), str(tmp_path / "nodrop"), quiet=True, net=spy0, data=(x, y))
    assert all(s[1] is not None and bool((s[1] < K).all()) for s in spy0.seen)
    # an unconditional config passes no labels
    spy_u = Spy()
    train(tiny(3, **{"model.num_classes": None, "training.p_uncond": 0.0}), str(tmp_path / "uncond"), quiet=True, net=spy_u, data=x)
    assert all(s[1] is None for s in spy_u.seen)


def test_drop_labels_rate_null_label_and_sharding():
    y = torch.zeros(200_000, dtype=torch.long)
    out = drop_labels(y, 0.15, 7, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0, 7}
    assert abs(float((out == 7).double().mean()) - 0.15) < 5 * math.sqrt(0.15 * 0.85 / 200_000)
    assert torch.equal(drop_labels(y[:10], 0.0, 7, torch.Generator().manual_seed(0)), y[:10])
    # two ranks' shards are the single-process global batch
    full = drop_labels(torch.arange(8), 0.5, 99, torch.Generator().manual_seed(3))
    parts = [drop_labels(torch.arange(8)[r * 4:(r + 1) * 4], 0.5, 99, torch.Generator().manual_seed(3),
                         rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match=r"p_uncond must lie in \[0, 1\), got 1.0"):
        drop_labels(y, 1.0, 7)


def test_resume_with_label_dropout_is_bit_for_bit(tmp_path):
    c = tiny(12, **{"training.p_uncond": 0.3})
    whole = train(c, str(tmp_path / "whole"), quiet=True)
    train(tiny(5, **{"training.p_uncond": 0.3}), str(tmp_path / "split"), quiet=True)
    torch.manual_seed(1234)                                         # scrambled global state
    resumed = train(c, str(tmp_path / "split"), quiet=True)
    assert resumed.resumed_from == 5 and resumed.step == 12
    for a, b in ((whole.net, resumed.net), (whole.ema_net, resumed.ema_net)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), k
    ckpt = load_checkpoint(tmp_path / "split" / "checkpoint_last.pt")
    assert ckpt["num_classes"] == 8 and ckpt["task"] == "score"
    model, _, _ = model_from_checkpoint(tmp_path / "split")
    assert model.net.num_classes == 8                               # labels 0..7, 8 = null


# ---- a conditional toy learns its classes ----------------------------------------------------------
def test_a_conditional_toy_samples_the_requested_mode(tmp_path):
    c = tiny(400, **{"training.batch_size": 256, "model.hidden": 64, "model.embed_dim": 32,
                     "data.n_train": 4000, "optim.warmup": 50, "training.log_freq": 100,
                     "training.snapshot_freq_for_preemption": 1000})
    r = train(c, str(tmp_path), quiet=True)
    y = torch.arange(800) % 8
    x = sample(r.model.bind(y=y), r.sde, shape=(800, 2), solver="ddim", steps=50,
               generator=torch.Generator().manual_seed(0), progress=False).samples
    mode = (torch.atan2(x[:, 1], x[:, 0]).remainder(2 * math.pi) / (math.pi / 4)).round().long() % 8
    accuracy = float((mode == y).double().mean())
    assert accuracy > 0.8, accuracy                                 # chance: 1/8


# ---- the noise-conditional classifier ---------------------------------------------------------------
def _bayes_log_posterior(mix, labels, sde, x, t):
    """log p(class | x_t) of an isotropic mixture computed directly (Bayes' rule)."""
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    var = a ** 2 * mix.stds.double() ** 2 + s ** 2                  # (components, dim)
    logp = mix.weights.double().log() - 0.5 * (((x[:, None, :] - a * mix.means.double()) ** 2) / var
                                               + torch.log(2 * math.pi * var)).sum(-1)
    K = int(labels.max()) + 1
    return torch.stack([torch.logsumexp(logp[:, labels == k], 1) for k in range(K)], 1) - \
        torch.logsumexp(logp, 1, keepdim=True)


def test_a_classifier_trained_on_the_oracle_nears_the_exact_posterior(tmp_path):
    labels = torch.tensor([0, 1, 0, 2])                             # four components, three classes
    mix = GaussianMixture([0.25, 0.25, 0.25, 0.25], [[-0.6, 0.0], [0.0, 0.5], [0.6, 0.0], [0.0, -0.5]],
                          [0.15, 0.15, 0.15, 0.15], sde=VPSDE(), labels=labels)
    x0, y0 = mixture_dataset(mix, 8000, torch.Generator().manual_seed(0), return_labels=True)
    assert abs(float((y0 == 0).double().mean()) - 0.5) < 0.03      # classes, not components
    c = classifier_config(toy_config("8gaussians", "vpsde"), num_classes=3)
    apply_overrides(c, {"training.n_iters": 600, "training.batch_size": 256, "model.hidden": 64,
                        "model.depth": 2, "model.embed_dim": 32, "optim.warmup": 50,
                        "training.log_freq": 100})
    r = train(c, str(tmp_path), quiet=True, data=(x0, y0))
    clf, sde, cfg = classifier_from_checkpoint(tmp_path)           # saved and loaded like a model
    assert isinstance(clf, NoisyClassifier) and clf.num_classes == 3 and cfg.training.task == "classifier"
    t = 0.2                                                         # alpha 0.81, sigma 0.58
    g = torch.Generator().manual_seed(1)
    xt0, yt = mixture_dataset(mix, 20000, g, dtype=torch.float64, return_labels=True)
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    xt = a * xt0 + s * torch.randn(xt0.shape, generator=g, dtype=torch.float64)
    exact = _bayes_log_posterior(mix, labels, sde, xt, t)
    assert torch.allclose(exact, mix.log_class_posterior(xt, t), atol=1e-10)   # the oracle's own
    with torch.no_grad():
        learned = clf(xt, t)
    assert learned.shape == (20000, 3) and learned.dtype == torch.float64
    acc_exact = float((exact.argmax(1) == yt).double().mean())
    acc_learned = float((learned.argmax(1) == yt).double().mean())
    nll_exact = float(-exact.gather(1, yt[:, None]).mean())
    nll_learned = float(-learned.gather(1, yt[:, None]).mean())
    assert 0.45 < acc_exact < 0.9                                   # a moderate t (0.545): not trivial
    assert acc_learned > acc_exact - 0.02, (acc_learned, acc_exact)
    assert nll_learned < nll_exact + 0.03, (nll_learned, nll_exact)
    # the trained weights are the EMA of the run, and the gradient is the score's extra term
    with torch.no_grad():
        assert torch.allclose(clf(xt[:5].float(), t), r.model(xt[:5].float(), t))
    grad = clf.grad_log_prob(xt[:4], t, yt[:4])
    assert grad.shape == (4, 2) and bool(torch.isfinite(grad).all())
    with pytest.raises(CheckpointError, match="holds a noise-conditional classifier.*classifier_from_checkpoint"):
        model_from_checkpoint(tmp_path)


def test_classifier_networks_and_gradient():
    sde = VPSDE()
    mlp = MLPClassifier(2, num_classes=3, hidden=8, depth=1, embed_dim=8)
    unet = UNetClassifier(8, 1, num_classes=10, base_channels=8, channel_mults=(1, 2),
                          attn_resolutions=(4,))
    assert mlp(torch.randn(5, 2), torch.rand(5)).shape == (5, 3)
    assert unet(torch.randn(5, 1, 8, 8), torch.rand(5)).shape == (5, 10)
    clf = NoisyClassifier(mlp, sde)
    lp = clf(torch.randn(5, 2), 0.5)
    assert torch.allclose(lp, torch.full((5, 3), -math.log(3)))     # zero head: uniform at start
    torch.nn.init.normal_(mlp.head.weight)
    mlp.double()
    x = torch.randn(3, 2, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    grad = clf.grad_log_prob(x, 0.4, y)
    h = 1e-6                                                        # central differences
    for i in range(2):
        e = torch.zeros_like(x)
        e[:, i] = h
        fd = (clf(x + e, 0.4).gather(1, y[:, None]) - clf(x - e, 0.4).gather(1, y[:, None]))[:, 0] / (2 * h)
        assert torch.allclose(grad[:, i], fd, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        clf.grad_log_prob(x, 0.4, torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="num_classes, an integer >= 2"):
        MLPClassifier(2, num_classes=1)
    with pytest.raises(ValueError, match="time_input must be one of"):
        NoisyClassifier(mlp, sde, time_input="step")


# ---- clear errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, data, message", [
    ({"training.p_uncond": 1.0}, None, r"p_uncond \(label dropout probability\) must lie in \[0, 1\), got 1.0"),
    ({"training.p_uncond": -0.1}, None, r"must lie in \[0, 1\), got -0.1"),
    ({"model.num_classes": None}, None, "p_uncond=0.1 drops labels, but the model is unconditional"),
    ({"data.dataset": "swiss_roll"}, None, "data set 'swiss_roll' has no class labels"),
    ({"model.num_classes": 4}, None, "num_classes=4 is too small for data set '8gaussians', which has 8"),
    ({"training.task": "classify"}, None, r"training.task must be one of \('score', 'classifier'\)"),
    ({"model.name": "mlp_classifier"}, None, "is a classifier: set config.training.task='classifier'"),
    ({"training.task": "classifier", "training.p_uncond": 0.0}, None, "needs a classifier network"),
    ({}, "unlabelled", r"num_classes=8 trains a class-conditional model: pass data=\(x, y\)"),
    ({}, "out of range", r"labels y of data must lie in \[0, 8\).*got values in \[0, 8\].*8 is the null label"),
    ({"model.num_classes": None, "training.p_uncond": 0.0}, "labelled", "data has labels y but config.model.num_classes is None"),
])
def test_bad_conditional_settings_are_named(tmp_path, over, data, message):
    x = torch.randn(64, 2)
    own = {None: None, "unlabelled": x, "out of range": (x, torch.arange(64) % 9),
           "labelled": (x, torch.arange(64) % 8)}[data]
    with pytest.raises(ValueError, match=message):
        train(tiny(2, **over), str(tmp_path), quiet=True, data=own)


def test_a_conditional_npz_without_labels_is_named(tmp_path):
    import numpy as np
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 2)))
    c = tiny(2, **{"data.dataset": "npz", "data.path": str(tmp_path / "d.npz")})
    with pytest.raises(ValueError, match=r"num_classes=8 trains a class-conditional model, which needs "
                                         r"labelled data: .* has no label array 'y'"):
        train(c, str(tmp_path / "run"), quiet=True)


@pytest.mark.slow
def test_conditional_ddp_with_two_gloo_processes_matches_one_process(tmp_path):
    """Labels shard with their samples and the dropout draws are the global batch's: two gloo
    processes equal one process with the same global batch (up to the all-reduce's rounding)."""
    import subprocess
    import sys
    over = {**TINY, "training.n_iters": 6, "training.batch_size": 32, "training.p_uncond": 0.5}
    args = [f"--config.{k}={v}" for k, v in over.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sde_diffusion.training", "--config", COND, "--workdir", str(tmp_path / "ddp"),
           "--quiet", "--config.device=cpu"] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    single = train(tiny(6, **{"training.batch_size": 32, "training.p_uncond": 0.5}), tmp_path / "one", quiet=True)
    ddp_model, _, _ = model_from_checkpoint(tmp_path / "ddp", use_ema=False)
    for (k, a), b in zip(single.net.state_dict().items(), ddp_model.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
    # a run with other dropout draws ends elsewhere: the comparison can fail
    other = train(tiny(6, **{"training.batch_size": 32, "training.p_uncond": 0.2}), tmp_path / "other", quiet=True)
    assert not torch.allclose(other.net.out.weight, ddp_model.net.out.weight, rtol=1e-4, atol=1e-6)
