"""A noise-conditional classifier p(y | x_t, t) of the eight Gaussians' modes under the VP SDE
(Dhariwal & Nichol 2021, Sec. 4): the TimeMLP's residual blocks with a linear head over 8 classes,
cross-entropy on x_t at t ~ U[eps, 1]. For classifier guidance of a model of 8gaussians (e.g.
8gaussians_cond.py with the same SDE). Load it with
``sde_diffusion.checkpoints.classifier_from_checkpoint``."""
from sde_diffusion.config import classifier_config, toy_config


def get_config():
    config = classifier_config(toy_config("8gaussians", "vpsde"), num_classes=8)
    config.training.n_iters = 2000
    return config
