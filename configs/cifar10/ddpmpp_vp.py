"""score_sde's DDPM++ (cont.) on CIFAR-10 with the VP SDE (Song et al. 2021,
github.com/yang-song/score_sde_pytorch ``configs/vp/cifar10_ddpmpp_continuous.py``; the base, not
the deep, variant). Needs the local ``cifar-10-batches-py`` folder under ``config.data.path``
(never downloaded).

Same as the paper's: VP beta 0.1..20 with N = 1000, continuous DSM with ``reduce_mean``, Adam 2e-4,
warm-up 5000, gradient clip 1, batch 128, 1.3 M iterations, EMA 0.9999, nf 128, ch_mult
(1, 2, 2, 2), 4 residual blocks per level, attention at 16x16, dropout 0.1, BigGAN-style resampling
blocks, skip rescaling, positional (sinusoidal) embedding of ``999 t``, Euler-Maruyama sampling with
N steps and a final denoising step. Differs (what this toolkit's U-Net and loop do not have): no
random horizontal flips; GroupNorm/attention/initialisation as in this toolkit's ``UNet`` (its
``init_scale`` and DDPM-style attention details are not configurable); eps parameterization
instead of a raw score output (the same function: score = -eps / sigma).
"""
from sde_diffusion.config import cifar10_config


def get_config():
    config = cifar10_config("vpsde")
    config.training.reduce_mean = True
    config.training.likelihood_weighting = False
    config.sampling.method = "euler_maruyama"      # score_sde: pc, euler_maruyama predictor, no corrector
    model = config.model
    model.ema_rate = 0.9999
    model.time_input = "index"                     # t (N - 1) = 999 t, score_sde's labels
    model.time_embedding = "sinusoidal"            # embedding_type = "positional"
    model.time_scale = 1.0                         # the index is fed as it is
    model.embed_dim = None
    return config
