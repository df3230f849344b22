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
from sde_diffusion.config import default_config


def _shared(sde: str):
    """What the two continuous CIFAR-10 recipes share (score_sde's ``default_cifar10_configs.py``)."""
    config = default_config()
    config.seed = 42

    training = config.training
    training.sde = sde
    training.continuous = True
    training.batch_size = 128
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.snapshot_freq_for_preemption = 10000
    training.sample_freq = 0

    config.sampling.steps = 1000          # model.num_scales: score_sde samples on the N-step grid
    config.sampling.noise_removal = True
    config.eval.n_samples = 50000
    config.eval.batch_size = 1024

    data = config.data
    data.dataset = "cifar10"
    data.path = "data"                    # holds cifar-10-batches-py; --config.data.path=...
    data.split = "train"
    data.image_size = 32
    data.num_channels = 3

    model = config.model
    model.name = "unet"
    model.parameterization = "eps"        # score = -eps / sigma: score_sde's output / sigma
    model.num_scales = 1000
    model.beta_min, model.beta_max = 0.1, 20.0
    model.sigma_min, model.sigma_max = 0.01, 50.0
    # UNet (DDPM++ / NCSN++ trunk): nf = 128, ch_mult (1, 2, 2, 2), 4 res blocks, attention at 16
    model.base_channels = 128
    model.channel_mults = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.skip_rescale = True
    model.resblock_updown = True          # score_sde's resblock_type = "biggan"
    model.num_classes = None
    model.activation = "silu"             # swish

    optim = config.optim
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1, optim.beta2, optim.eps = 0.9, 0.999, 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000
    optim.grad_clip = 1.0
    return config


def get_config():
    config = _shared("vesde")
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
