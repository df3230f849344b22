"""Reports: the reference stays visible over samples, error bars and floors, provenance, image grids
and scatter plots of samples."""
import os
import re

import numpy as np
import pytest
import torch

from sde_diffusion import data
from sde_diffusion.reports import (plot_error_vs_nfe, plot_sample_panels, provenance, save_image_grid,
                                   save_scatter)

pytest.importorskip("matplotlib")


def _pixels(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))[..., :3]


def test_reference_is_visible_over_samples_that_cover_it(tmp_path):
    """Issue 10, item 10: the reference (test data) used to be grey dots under the samples, hidden
    exactly where samples and data agree. Drawn over a panel whose samples *are* the reference, it
    must still change a visible share of the pixels."""
    x = data.get_dataset("moons", n=2000, seed=0).double()
    with_ref = _pixels(plot_sample_panels({"a": x}, str(tmp_path / "ref.png"), reference=x))
    without = _pixels(plot_sample_panels({"a": x}, str(tmp_path / "none.png")))
    assert with_ref.shape == without.shape
    changed = np.abs(with_ref - without).max(-1) > 0.2
    assert changed.mean() > 0.01, changed.mean()


def test_error_vs_nfe_takes_error_bars_and_a_floor(tmp_path):
    rows = [{"solver": "a", "nfe": k, "sliced_w": 1.0 / k, "sliced_w_se": 0.3 / k} for k in (10, 20)]
    rows += [{"solver": "b", "nfe": 10, "sliced_w": 0.2}]          # no error bar: a plain line
    path = plot_error_vs_nfe(rows, "sliced_w", str(tmp_path / "p.png"), floor=(0.02, 0.005))
    assert _pixels(path).shape[0] > 100
    with pytest.raises(ValueError, match="no row holds the metric"):
        plot_error_vs_nfe(rows, "flow_rmse", str(tmp_path / "q.png"))


def test_provenance_names_versions_seed_command_and_commit():
    record = provenance(seed=7, command="sde-diffusion demo", extra_field=1)
    assert record["seed"] == 7 and record["command"] == "sde-diffusion demo"
    assert record["extra_field"] == 1 and record["torch"] == torch.__version__
    assert record["numpy"] == np.__version__ and re.fullmatch(r"\d+\.\d+\.\d+", record["python"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["date_utc"])
    commit = record["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit), commit


# ---- pictures of samples (moved here from metrics) ---------------------------------------------
def test_save_image_grid(tmp_path):
    import matplotlib.image as mpimg

    imgs = -torch.ones(6, 1, 8, 8)
    imgs[1] = 1.0                                                 # second image white
    path = save_image_grid(imgs, tmp_path / "sub" / "grid.png", nrow=3, upscale=2)
    assert os.listdir(tmp_path / "sub") == ["grid.png"]           # no temporary file left
    pic = mpimg.imread(path)
    assert pic.shape[:2] == (2 * (1 + 2 * 9), 2 * (1 + 3 * 9))    # 2 rows x 3 cols of 8 px + 1 px padding
    grey = pic[..., 0]
    assert grey[2 * 1 + 4, 2 * 1 + 4] == pytest.approx(0.0, abs=0.01)          # image 0: black
    assert grey[2 * 1 + 4, 2 * (1 + 9) + 4] == pytest.approx(1.0, abs=0.01)    # image 1: white
    rgb = torch.zeros(4, 3, 8, 8)
    rgb[:, 0] = 1.0
    pic = mpimg.imread(save_image_grid(rgb, tmp_path / "rgb.png", nrow=2))
    assert pic.shape[1] >= 256                                    # auto upscale
    scale = -(-256 // 19)                                         # 2 images of 8 px + 3 px padding
    centre = scale * (1 + 4)
    assert pic[centre, centre, 0] == pytest.approx(1.0, abs=0.01)
    assert pic[centre, centre, 1] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        save_image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "bad.png")


def test_save_scatter(tmp_path):
    pts = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    path = save_scatter(pts, tmp_path / "s.png", reference=torch.randn(300, 2, generator=torch.Generator().manual_seed(1)), title="moons")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["s.png"]
    save_scatter(pts, path, lim=1.5)                              # overwrite in place
    assert os.listdir(tmp_path) == ["s.png"]
    with pytest.raises(ValueError, match=r"points must have shape \(N, 2\)"):
        save_scatter(torch.zeros(5, 3), tmp_path / "bad.png")
