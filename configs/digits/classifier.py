"""A noise-conditional classifier p(y | x_t, t) of the digits under the VP SDE (Dhariwal & Nichol
2021, Sec. 4; score_sde's controllable generation): the encoder half of vp.py's U-Net (same
blocks and widths), mean pooling and a linear head over 10 classes, cross-entropy on x_t at
t ~ U[eps, 1]. For classifier guidance of vp.py / cond.py models. Load it with
``sde_diffusion.checkpoints.classifier_from_checkpoint``."""
from sde_diffusion.config import classifier_config, digits_config


def get_config():
    config = classifier_config(digits_config("vpsde"), num_classes=10)
    config.training.n_iters = 3000
    config.training.snapshot_freq = 1000
    return config
