"""Reports of experiments: Markdown tables, CSV files and PNG figures (error vs NFE, samples of
each solver side by side, 2-D trajectories, image grids and scatter plots of samples). Every
picture is drawn on matplotlib's Agg canvas; every file is written atomically (temporary file,
then ``os.replace``)."""
from __future__ import annotations

import csv
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._checks import as_samples, require
from ._files import atomic_write, write_text

__all__ = ["write_markdown_table", "write_csv", "write_text", "plot_error_vs_nfe",
           "plot_sample_panels", "plot_trajectories", "image_grid", "save_image_grid",
           "save_scatter", "require_matplotlib", "provenance", "REFERENCE_COLOR"]


_COLUMNS = ["solver", "kind", "nfe_budget", "nfe", "steps", "flow_rmse", "sliced_w", "sliced_w_se",
            "weight_tv", "var_ratio_err", "wall_s", "skipped"]
#: colour of the reference (data) density contours drawn over samples
REFERENCE_COLOR = "#d95f02"


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a core dependency
        raise ImportError("saving pictures needs matplotlib: pip install matplotlib") from exc
    return Figure, FigureCanvasAgg


def require_matplotlib() -> None:
    """Raise ``ImportError`` saying ``pip install matplotlib`` when pictures cannot be saved: a
    check to make before work whose results include pictures."""
    _matplotlib()


def _columns(rows: Sequence[dict]) -> List[str]:
    """The known columns in their usual order, then any others in the order they first appear."""
    present = list(dict.fromkeys(k for r in rows for k in r if k != "samples"))
    return [c for c in _COLUMNS if c in present] + [c for c in present if c not in _COLUMNS]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_markdown_table(rows: Sequence[dict], path: Optional[str] = None) -> str:
    """Rows as a Markdown table (returned, and written to ``path`` when given)."""
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    if path is not None:
        write_text(path, text)
    return text


def write_csv(rows: Sequence[dict], path: str, columns: Optional[Sequence[str]] = None) -> str:
    """``rows`` as a CSV file, written atomically; ``columns`` (default: the known columns in their
    usual order, then the others as they first appear) sets which and in what order."""
    cols = list(columns) if columns is not None else _columns(rows)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def plot_error_vs_nfe(rows: Sequence[dict], metric: str, path: str, title: Optional[str] = None,
                      floor: Optional[Tuple[float, float]] = None,
                      floor_label: str = "data vs data") -> str:
    """Log-log plot of ``metric`` against NFE, one line per solver; PNG written atomically.

    Rows holding ``METRIC_se`` get error bars of +-1 standard error (cut at 90% of the value below,
    for the log axis). ``floor = (value, spread)`` draws a horizontal line with a band of
    +-``spread`` (e.g. the metric between two data sets of the same size)."""
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    plotted = 0
    for s in solvers:
        pts = sorted((r["nfe"], r[metric], r.get(f"{metric}_se")) for r in rows
                     if r["solver"] == s and metric in r and r[metric] is not None and r[metric] > 0)
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        se = [p[2] if p[2] is not None and math.isfinite(p[2]) else 0.0 for p in pts]
        if any(se):
            ax.errorbar(xs, ys, yerr=[[min(e, 0.9 * y) for e, y in zip(se, ys)], se], marker="o",
                        capsize=2, label=s)
        else:
            ax.plot(xs, ys, marker="o", label=s)
        plotted += 1
    require(plotted > 0, f"no row holds the metric {metric!r}")
    if floor is not None:
        value, spread = floor
        ax.axhline(value, color="k", lw=1, ls="--", label=floor_label)
        if spread and spread > 0:
            ax.axhspan(max(value - spread, 0.1 * value), value + spread, color="k", alpha=0.08, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} vs NFE")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _grid_of_axes(fig, n: int, ncol: int):
    nrow = -(-n // ncol)
    return [fig.add_subplot(nrow, ncol, i + 1) for i in range(n)]


def _density_contours(ax, reference: torch.Tensor, lim: float, bins: int = 80) -> None:
    """Contour lines of the reference points' density (a 2-D histogram smoothed by a Gaussian of
    1.5 bins), at 5%, 20% and 50% of its peak, in :data:`REFERENCE_COLOR`: drawn over samples,
    they stay visible where the samples cover the data, and show where samples miss it."""
    from scipy.ndimage import gaussian_filter

    ref = reference.detach().cpu().double().numpy()
    hist, xe, ye = np.histogram2d(ref[:, 0], ref[:, 1], bins=bins, range=[[-lim, lim], [-lim, lim]])
    dens = gaussian_filter(hist.T, 1.5)
    if dens.max() <= 0:
        return
    centres = (0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1]))
    ax.contour(*centres, dens / dens.max(), levels=[0.05, 0.2, 0.5], colors=REFERENCE_COLOR,
               linewidths=0.9)


def plot_sample_panels(panels: Dict[str, torch.Tensor], path: str,
                       reference: Optional[torch.Tensor] = None, ncol: int = 4,
                       lim: float = 1.6) -> str:
    """One scatter panel per entry of ``panels`` (label -> ``(N, 2)`` samples), the samples of
    each solver side by side; the optional ``reference`` points are drawn over each panel as
    contour lines of their density (:func:`_density_contours`), so that both stay visible."""
    require(len(panels) > 0, "no samples to plot")
    Figure, FigureCanvasAgg = _matplotlib()
    ncol = min(ncol, len(panels))
    nrow = -(-len(panels) // ncol)
    fig = Figure(figsize=(3.0 * ncol, 3.0 * nrow), dpi=100)
    FigureCanvasAgg(fig)
    for ax, (label, pts) in zip(_grid_of_axes(fig, len(panels), ncol), panels.items()):
        pts = pts.detach().cpu().double()
        require(pts.ndim == 2 and pts.shape[1] == 2, f"panel {label!r} must hold (N, 2) points")
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, c="tab:blue", linewidths=0)
        if reference is not None:
            _density_contours(ax, reference, lim)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_trajectories(trajectories: Dict[str, torch.Tensor], path: str,
                      reference: Optional[torch.Tensor] = None, lim: float = 2.5) -> str:
    """2-D paths from noise to data: each entry is ``(steps + 1, N, 2)`` states of one solver
    (e.g. the reverse SDE next to the probability-flow ODE from the same starting points)."""
    require(len(trajectories) > 0, "no trajectories to plot")
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(4.0 * len(trajectories), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    for ax, (label, traj) in zip(_grid_of_axes(fig, len(trajectories), len(trajectories)),
                                 trajectories.items()):
        traj = traj.detach().cpu().double()
        require(traj.ndim == 3 and traj.shape[2] == 2,
                f"trajectory {label!r} must have shape (steps + 1, N, 2), got {tuple(traj.shape)}")
        if reference is not None:
            ref = reference.detach().cpu().double()
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.8", linewidths=0)
        for j in range(traj.shape[1]):
            ax.plot(traj[:, j, 0], traj[:, j, 1], lw=0.6, alpha=0.7)
        ax.scatter(traj[0, :, 0], traj[0, :, 1], s=6, c="k", marker="x", label="x_T")
        ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=8, c="tab:red", label="sample")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


# ---- pictures of samples ------------------------------------------------------------------------
def image_grid(images, nrow: int = 8, padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [-1, 1] into an ``(rows, cols[, 3])`` array in [0, 1],
    ``nrow`` images per row, separated by ``padding`` pixels of ``pad_value``."""
    x = as_samples(images, "images")
    require(x.ndim == 4 and x.shape[1] in (1, 3), f"images must have shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
    require(isinstance(nrow, int) and nrow >= 1, f"nrow must be an integer >= 1, got {nrow!r}")
    x = ((x.clamp(-1, 1) + 1) / 2).numpy()
    N, C, H, W = x.shape
    ncol, nrows = min(nrow, N), -(-N // nrow)
    grid = np.full((C, padding + nrows * (H + padding), padding + ncol * (W + padding)), pad_value)
    for i in range(N):
        r, c = divmod(i, nrow)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top:top + H, left:left + W] = x[i]
    return grid[0] if C == 1 else grid.transpose(1, 2, 0)


def save_image_grid(images, path, nrow: int = 8, upscale: Optional[int] = None) -> str:
    """Write ``(N, C, H, W)`` images in [-1, 1] (C = 1 grey or 3 RGB) as one PNG grid with ``nrow``
    images per row. ``upscale`` enlarges pixels (nearest); default: enough for a >= 256 px wide
    picture. Atomic write; returns the path."""
    grid = image_grid(images, nrow)
    scale = upscale if upscale is not None else max(1, -(-256 // grid.shape[1]))
    require(isinstance(scale, int) and scale >= 1, f"upscale must be an integer >= 1, got {upscale!r}")
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    Figure, FigureCanvasAgg = _matplotlib()
    height, width = grid.shape[:2]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    fig.figimage(grid, cmap="gray", vmin=0.0, vmax=1.0, origin="upper")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def save_scatter(points, path, reference=None, title: Optional[str] = None,
                 lim: Optional[float] = None) -> str:
    """Scatter plot of ``(N, 2)`` points (blue) over optional ``reference`` points (orange), equal
    axes (``[-lim, lim]`` when given), PNG via the Agg canvas, atomic write; returns the path."""
    pts = as_samples(points, "points")
    require(pts.ndim == 2 and pts.shape[1] == 2, f"points must have shape (N, 2), got {tuple(pts.shape)}")
    ref = None
    if reference is not None:
        ref = as_samples(reference, "reference")
        require(ref.ndim == 2 and ref.shape[1] == 2, f"reference must have shape (M, 2), got {tuple(ref.shape)}")
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    size = max(1.0, min(8.0, 6000.0 / pts.shape[0]))
    if ref is not None:
        ax.scatter(ref[:, 0], ref[:, 1], s=size, c="tab:orange", alpha=0.5, linewidths=0, label="reference")
    ax.scatter(pts[:, 0], pts[:, 1], s=size, c="tab:blue", alpha=0.5, linewidths=0, label="samples")
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if ref is not None:
        ax.legend(loc="upper right", markerscale=max(1.0, 4.0 / size))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def provenance(seed: Optional[int] = None, command: Optional[str] = None, **extra) -> Dict[str, object]:
    """What a report needs to be reproduced: the date (UTC), the command, the seed, the versions of
    sde_diffusion, torch, numpy and Python, the platform, torch's CPU threads and the git commit of
    the package's checkout (with ``-dirty`` when it has uncommitted changes; ``None`` outside a
    git checkout or without git)."""
    import datetime
    import platform

    from . import __version__

    record: Dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command, "seed": seed, "sde_diffusion": __version__,
        "git_commit": _git_commit(), "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    record.update(extra)
    return record


def _git_commit() -> Optional[str]:
    import os
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:  # the package's own files must be tracked (not a copy inside some other repository)
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=here,
                                 capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10)
        if tracked.returncode != 0 or head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
