"""Two moons with the VP SDE and a time-conditioned MLP: the default toy set-up.

Trains in about a minute on two CPU cores (see docs/training.md for the measured quality).
"""
from sde_diffusion.config import default_config


def get_config():
    config = default_config()
    config.seed = 0

    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.batch_size = 512
    training.n_iters = 6000
    training.log_freq = 100
    training.snapshot_freq_for_preemption = 1000
    training.sample_freq = 0
    training.n_preview = 1000

    config.sampling.method = "euler_maruyama"
    config.sampling.steps = 500

    config.eval.n_samples = 5000
    config.eval.batch_size = 5000
    config.eval.metric = "sliced_wasserstein"

    data = config.data
    data.dataset = "moons"
    data.n_train = 20000

    model = config.model
    model.name = "mlp"
    model.parameterization = "eps"
    model.time_input = "t"
    model.ema_rate = 0.999
    # TimeMLP constructor arguments
    model.hidden = 256
    model.depth = 3
    model.time_embedding = "fourier"
    model.embed_dim = 64
    model.fourier_scale = 16.0
    model.num_classes = None
    model.activation = "silu"

    optim = config.optim
    optim.lr = 2e-3
    optim.warmup = 200
    optim.grad_clip = 1.0
    return config
