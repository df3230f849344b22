"""CIFAR-10 from its local python files (sde_diffusion.data.cifar10) and the score_sde CIFAR-10
recipes (configs/cifar10/), smoke-tested on a tiny fake set written in the same pickle format."""
import os
import pickle

import numpy as np
import pytest
import torch

from sde_diffusion.config import apply_overrides, load_config
from sde_diffusion.data import CIFAR10_FOLDER, cifar10, get_dataset, write_cifar10
from sde_diffusion.models import build_network
from sde_diffusion.config import network_config
from sde_diffusion.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = [os.path.join(ROOT, "configs", "cifar10", name) for name in ("ddpmpp_vp.py", "ncsnpp_ve.py")]
SHRINK = {"training.batch_size": 4, "training.n_iters": 3, "training.log_freq": 1,
          "training.snapshot_freq": 0, "training.snapshot_freq_for_preemption": 2,
          "model.base_channels": 8, "model.channel_mults": (1, 2), "model.num_res_blocks": 1,
          "model.attn_resolutions": (16,), "optim.warmup": 2, "device": "cpu"}


def _write_fake(root):
    r = np.random.RandomState(0)
    train_x = r.randint(0, 256, (12, 3, 32, 32)).astype(np.uint8)
    test_x = r.randint(0, 256, (4, 3, 32, 32)).astype(np.uint8)
    write_cifar10(root / CIFAR10_FOLDER, train_x, r.randint(0, 10, 12), test_x, [0, 1, 2, 9])
    return root, train_x, test_x


@pytest.fixture
def fake(tmp_path):
    """A fake CIFAR-10: 12 train and 4 test images of 3x32x32 uint8 with labels, in the
    cifar-10-batches-py format."""
    return _write_fake(tmp_path)


def test_reads_the_standard_format(fake):
    root, train_x, test_x = fake
    x, y = cifar10(root, return_labels=True)                 # the parent folder
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(train_x))
    test = get_dataset("cifar10", path=str(root / CIFAR10_FOLDER), split="test")   # the folder itself
    assert torch.equal(((test + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(test_x))
    assert get_dataset("cifar10", path=str(root), split="test", return_labels=True)[1].tolist() == [0, 1, 2, 9]
    # the real files' layout: data rows are the R, G, B planes of each image in turn
    with open(root / CIFAR10_FOLDER / "data_batch_1", "rb") as fh:
        d = pickle.load(fh, encoding="bytes")
    assert np.array_equal(d[b"data"][0, 1024:2048].reshape(32, 32), train_x[0, 1])


def test_missing_folder_and_bad_files_give_one_clear_line(tmp_path, fake):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found at .*never downloads") as info:
        cifar10(tmp_path / "nowhere")
    assert "\n" not in str(info.value)
    root = fake[0]
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        cifar10(root, split="val")
    # a pickle that would run code is refused, not run
    with open(root / CIFAR10_FOLDER / "test_batch", "wb") as fh:
        pickle.dump({b"data": os.system, b"labels": []}, fh)
    with pytest.raises(ValueError, match="posix.system is not allowed in a CIFAR-10 batch"):
        cifar10(root, split="test")


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_networks_build_at_full_size(path):
    config = load_config(path)
    net = build_network(network_config(config.model), (3, 32, 32))
    n_params = sum(p.numel() for p in net.parameters())
    assert 30e6 < n_params < 80e6           # score_sde's DDPM++/NCSN++ base: tens of millions
    assert config.data.dataset == "cifar10" and config.training.batch_size == 128


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipes_train_a_few_steps_on_a_fake_set(path, fake, tmp_path):
    config = load_config(path)
    apply_overrides(config, {**SHRINK, "data.path": str(fake[0])})
    result = train(config, tmp_path / "work", quiet=True)
    assert result.step == 3
    assert all(torch.isfinite(p).all() for p in result.net.parameters())
    assert os.path.isfile(tmp_path / "work" / "checkpoint_last.pt")


def test_a_recipe_without_the_data_fails_in_one_line(tmp_path):
    config = load_config(RECIPES[0])
    apply_overrides(config, {**SHRINK, "data.path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        train(config, tmp_path / "work", quiet=True)


def _cli_overrides(fake_root) -> list:
    over = {**SHRINK, "data.path": str(fake_root), "eval.n_samples": 4, "eval.batch_size": 4,
            "sampling.steps": 3}
    return [f"--config.{k}={v}" if not isinstance(v, tuple) else f"--config.{k}={list(v)}"
            for k, v in over.items()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``sde-diffusion train --eval`` of the VP recipe, shrunk, on a fake set: (fake, workdir,
    the printed scores)."""
    import contextlib
    import io
    import json

    from sde_diffusion.cli import main
    root = tmp_path_factory.mktemp("cifar")
    fake = _write_fake(root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--config", RECIPES[0], "--workdir", str(root / "work"), "--eval",
                     "--quiet", *_cli_overrides(root)]) == 0
    return fake, root / "work", json.loads(out.getvalue().strip().splitlines()[-1])


def test_train_eval_scores_cifar10_samples_against_the_test_split(trained):
    """Pixel Fréchet distance of the samples to the test split, with its two baselines at the same
    sample size (no Inception offline)."""
    import json
    _, work, scores = trained
    assert scores == json.load(open(work / "eval.json"))
    assert scores["n"] == 4 and scores["n_reference"] == 4 and scores["n_train_baseline"] == 4
    for key in ("fd_pool8", "fd_pool8_real_vs_real", "fd_pool8_real_vs_noise"):
        assert np.isfinite(scores[key]) and scores[key] > 0, key
    # uniform 8-bit fakes: other fakes are closer to the test split than clamped N(0, 1) noise
    assert scores["fd_pool8_real_vs_real"] < scores["fd_pool8_real_vs_noise"]


def test_likelihood_of_cifar10_test_images_in_bits_per_dim(trained, capsys):
    """``likelihood --data cifar10`` reads the test split from the checkpoint's data.path (or a
    folder given as --data), dequantizes the 8-bit images (seed + 2) and reports the discrete
    bits/dim: the continuous bits/dim of the dequantized images plus log2(128) = 7 (bin width
    2/256 in [-1, 1])."""
    import json
    import math

    from sde_diffusion.checkpoints import model_from_checkpoint
    from sde_diffusion.cli import main
    from sde_diffusion.likelihood import dequantize, log_likelihood

    fake, work, _ = trained
    common = ["--checkpoint", str(work), "--n", "2", "--probes", "1", "--rtol", "1e-2",
              "--atol", "1e-2", "--seed", "3"]
    assert main(["likelihood", *common, "--data", "cifar10"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["likelihood", *common, "--data", str(fake[0] / CIFAR10_FOLDER)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert report["n"] == 2 and report["dim"] == 3 * 32 * 32 and report["bpd_offset_bits"] == 7.0

    model, sde, _ = model_from_checkpoint(str(work / "checkpoint_last.pt"), use_ema=True)
    model.net.double()
    images = torch.from_numpy(fake[2][:2]).double()
    x = dequantize(images, 8, True, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    plain = log_likelihood(model, sde, x, divergence="hutchinson", n_probes=1, rtol=1e-2, atol=1e-2,
                           generator=torch.Generator().manual_seed(3))
    expected = float(plain.bpd.mean()) + 7.0
    assert abs(report["bpd"] - expected) < 1e-9 * abs(expected)
    assert abs(report["nll_nats"] - (float(plain.nll.mean()) + 3072 * 7 * math.log(2))) < 1e-6


def test_likelihood_cifar10_without_a_cifar10_config_names_the_folder_form(capsys):
    from sde_diffusion.cli import main
    assert main(["likelihood", "--oracle", "image16", "--data", "cifar10", "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sde-diffusion: error: --data cifar10 reads the folder of a CIFAR-10 "
                          "checkpoint's config") and "--data DIR" in err and "\n" not in err
