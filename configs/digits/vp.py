"""sklearn's 8x8 digits with the VP SDE and a small DDPM++-style U-Net (CPU-sized)."""
from sde_diffusion.config import default_config


def get_config():
    config = default_config()
    config.seed = 0

    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.reduce_mean = True
    training.batch_size = 128
    training.n_iters = 20000
    training.log_freq = 100
    training.snapshot_freq = 5000
    training.snapshot_freq_for_preemption = 1000
    training.sample_freq = 5000
    training.n_preview = 64

    config.sampling.method = "euler_maruyama"
    config.sampling.steps = 500

    config.eval.n_samples = 2000
    config.eval.batch_size = 500
    config.eval.metric = "frechet_digits"

    data = config.data
    data.dataset = "digits"
    data.image_size = 8
    data.split = "train"

    model = config.model
    model.name = "unet"
    model.parameterization = "eps"
    model.time_input = "t"
    model.ema_rate = 0.999
    # UNet constructor arguments
    model.base_channels = 32
    model.channel_mults = (1, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (4,)
    model.dropout = 0.1
    model.time_embedding = "fourier"
    model.embed_dim = None
    model.fourier_scale = 16.0
    model.skip_rescale = True
    model.num_classes = None
    model.resblock_updown = False
    model.activation = "silu"

    optim = config.optim
    optim.lr = 1e-3
    optim.warmup = 500
    optim.grad_clip = 1.0
    return config
