"""score_sde's NCSN++ (cont.) on CIFAR-10 with the VE SDE (Song et al. 2021,
github.com/yang-song/score_sde_pytorch ``configs/ve/cifar10_ncsnpp_continuous.py``). Needs the local
``cifar-10-batches-py`` folder under ``config.data.path`` (never downloaded).

Same as the paper's: VE sigma 0.01..50 with N = 1000, continuous DSM summed over dimensions
(``reduce_mean = False``), Adam 2e-4, warm-up 5000, gradient clip 1, batch 128, 1.3 M iterations,
EMA 0.999, nf 128, ch_mult (1, 2, 2, 2), 4 residual blocks per level, attention at 16x16, dropout
0.1, BigGAN-style resampling blocks, skip rescaling, Gaussian Fourier features (scale 16) of
``log sigma``, the output divided by sigma (here: eps parameterization, score = -eps / sigma), PC
sampling with the reverse-diffusion predictor and a Langevin corrector at snr 0.16, 1000 steps.
Differs (what this toolkit's U-Net and loop do not have): no FIR up/down-sampling kernels
(``fir``), no progressive residual input path (``progressive_input = "residual"``), no random
horizontal flips; data on [-1, 1] (score_sde's VE recipe keeps [0, 1]; sigma_max = 50 covers both).
"""
from sde_diffusion.config import cifar10_config


def get_config():
    config = cifar10_config("vesde")
    config.training.reduce_mean = False
    config.training.likelihood_weighting = False
    config.sampling.method = "pc"                  # reverse_diffusion + langevin, snr 0.16 (defaults)
    model = config.model
    model.ema_rate = 0.999
    model.time_input = "sigma"                     # NCSN++ conditions on sigma ...
    model.time_embedding = "fourier"
    model.time_transform = "log"                   # ... through log sigma
    model.fourier_scale = 16.0
    model.embed_dim = None
    return config
