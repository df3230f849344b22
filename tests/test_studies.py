"""The study tables (sde_diffusion.studies, `sde-diffusion study`): the Student-t interval covers
the truth at its level (and a normal-quantile interval would not), the studies' cells and NFE, the
common random numbers across rows, the Langevin hook, and the command end to end on a freshly
trained tiny digits U-Net: its files, the table's shape, quiet progress, one-line errors."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from sde_diffusion.cli import main
from sde_diffusion.studies import (Cell, Study, ddim_table, make_study, pc_table, run_study,
                                   student_t_interval)

from helpers import assert_one_line_error  # noqa: E402

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

REPO = os.path.join(os.path.dirname(__file__), "..")


# ---- the interval -----------------------------------------------------------------------------------
def test_student_t_interval_closed_form():
    mean, hw = student_t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert hw == pytest.approx(4.3026527297 / math.sqrt(3), rel=1e-9)   # t_{0.975, 2} s/sqrt(3)


@pytest.mark.parametrize("seeds", [2, 4])
def test_interval_covers_the_true_mean_95_percent_of_the_time(seeds):
    """4000 seeded repetitions of S draws from N(3, 2^2): the interval holds 3 in 95% of them
    (binomial sd 0.0034); the normal quantile 1.96 in place of t would cover 70% (S = 2) or 86%
    (S = 4), outside the band."""
    rng = np.random.default_rng(17)
    draws = rng.normal(3.0, 2.0, size=(4000, seeds))
    hits = 0
    for row in draws:
        mean, hw = student_t_interval(row)
        hits += abs(mean - 3.0) <= hw
    assert 0.935 <= hits / len(draws) <= 0.965, hits / len(draws)
    z = np.abs(draws.mean(1) - 3.0) <= 1.96 * draws.std(1, ddof=1) / math.sqrt(seeds)
    assert z.mean() < 0.9                                            # the test tells them apart


def test_interval_errors():
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        student_t_interval([1.0])
    with pytest.raises(ValueError, match="level must lie in"):
        student_t_interval([1.0, 2.0], level=1.5)


# ---- the studies as data ------------------------------------------------------------------------------
def test_ddim_table_cells_and_nfe():
    st = ddim_table()
    assert st.columns == ("10", "20", "50", "100", "1000")
    assert st.rows[:4] == ("ddim:eta=0", "ddim:eta=0.2", "ddim:eta=0.5", "ddim:eta=1")
    cell = st.cells[("ddim:eta=0.5", "50")]
    assert (cell.solver, cell.steps, cell.options) == ("ddim", 50, {"eta": 0.5})
    assert cell.nfe() == 51 and cell.nfe(denoise=False) == 50
    assert make_study("ddim-table", [7]).columns == ("7",)


def test_pc_table_layout_and_equal_costs():
    st = pc_table(1000, snr=0.16)
    assert st.columns == ("P1000", "P2000", "C2000", "PC1000")
    nfe = {k: c.nfe(denoise=False) for k, c in st.cells.items()}
    for row in ("reverse diffusion", "ancestral sampling", "probability flow"):
        assert nfe[(row, "P1000")] == 1000
        assert nfe[(row, "P2000")] == nfe[(row, "PC1000")] == 2000    # equal total cost
        assert (row, "C2000") not in st.cells                          # "-", as in the paper
    assert [k for k in st.cells if k[0] == "corrector only"] == [("corrector only", "C2000")]
    assert nfe[("corrector only", "C2000")] == 2000
    assert st.cells[("probability flow", "PC1000")].langevin_snr == 0.16
    with pytest.raises(ValueError, match="one step count N"):
        make_study("pc-table", [10, 20])
    with pytest.raises(ValueError, match="unknown study 'ddpm-table'"):
        make_study("ddpm-table")


# ---- runs on a small untrained U-Net (the API) ----------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    from sde_diffusion.config import digits_config
    from sde_diffusion.models import model_from_config

    config = digits_config("vpsde")
    config.model.base_channels, config.model.channel_mults = 8, (1,)
    config.model.attn_resolutions = ()
    torch.manual_seed(0)
    net, model = model_from_config(config, data_shape=(1, 8, 8))
    net.eval()
    return model


def test_common_noise_across_rows_and_fresh_noise_across_seeds(small_model):
    """pc with corrector='none' is its predictor exactly, so two rows spelled differently give the
    same per-seed distances only if every row starts from the same x_T with the same step noise;
    the seeds differ."""
    rows = ("reverse_diffusion", "pc:predictor=reverse_diffusion")
    cells = {(rows[0], "3"): Cell("reverse_diffusion", 3),
             (rows[1], "3"): Cell("pc", 3, {"predictor": "reverse_diffusion", "corrector": "none"})}
    st = Study("t", "t", rows, ("3",), {"3": 3}, cells)
    with torch.no_grad():
        res = run_study(st, small_model, n=12, seeds=3, shape=(1, 8, 8), batch=5)
    a, b = res.fd[(rows[0], "3")], res.fd[(rows[1], "3")]
    assert a == b and len(set(a)) == 3 and len(res.floor) == 3
    assert res.nfe[(rows[0], "3")] == 4


def test_workers_give_the_values_of_one_process(small_model):
    """The (cell, seed) pairs run in two spawned processes give the per-seed distances of the
    sequential run, in seed order (each pair draws its own indexed noise; both on one thread so
    that not even the rounding differs), with the Langevin hook and a skipped cell too."""
    cells = {("pf+C", "3"): Cell("ode_euler", 3, langevin_snr=0.16),
             ("ddim", "3"): Cell("ddim", 3, {"eta": 1.0}), ("ddim", "5"): Cell("ddim", 5)}
    st = Study("t", "t", ("pf+C", "ddim"), ("3", "5"), {"3": 3, "5": 5}, cells)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            one = run_study(st, small_model, n=8, seeds=3, shape=(1, 8, 8), batch=5)
        messages = []
        two = run_study(st, small_model, n=8, seeds=3, shape=(1, 8, 8), batch=5, workers=2,
                        progress=messages.append)
    finally:
        torch.set_num_threads(threads)
    assert two.fd == one.fd and two.nfe == one.nfe and two.floor == one.floor
    assert len(set(one.fd[("ddim", "3")])) == 3 and len(messages) == 9 and "[9/9]" in " ".join(messages)


def test_workers_errors(small_model):
    st = Study("t", "t", ("ddim",), ("3",), {"3": 3}, {("ddim", "3"): Cell("ddim", 3)})
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        run_study(st, small_model, n=4, seeds=2, shape=(1, 8, 8), workers=0)
    with pytest.raises(ValueError, match="workers > 1 runs CPU processes"):
        run_study(st, small_model, n=4, seeds=2, shape=(1, 8, 8), workers=2, device="cuda")


def test_langevin_hook_adds_one_network_call_per_step(small_model):
    cells = {("pf", "4"): Cell("ode_euler", 4, langevin_snr=0.16),
             ("pf", "8"): Cell("ode_euler", 8)}
    st = Study("t", "t", ("pf",), ("4", "8"), {"4": 4, "8": 8}, cells)
    with torch.no_grad():
        res = run_study(st, small_model, n=6, seeds=2, shape=(1, 8, 8), denoise=False)
    assert res.nfe[("pf", "4")] == res.nfe[("pf", "8")] == 8
    assert res.fd[("pf", "4")] != res.fd[("pf", "8")]


def test_ancestral_cells_are_skipped_under_sub_vp(small_model):
    from sde_diffusion.models import ScoreModel
    from sde_diffusion.sdes import SubVPSDE

    model = ScoreModel(small_model.net, SubVPSDE(), parameterization="eps",
                       time_input=small_model.time_input)
    st = pc_table(2)
    st = Study(st.name, st.title, ("ancestral sampling",), ("P2",), {"P2": 2},
               {("ancestral sampling", "P2"): st.cells[("ancestral sampling", "P2")]})
    with torch.no_grad():
        res = run_study(st, model, n=4, seeds=2, shape=(1, 8, 8))
    assert not res.fd and "ancestral sampling is defined" in res.skipped[("ancestral sampling", "P2")]


# ---- the command on a freshly trained tiny digits U-Net ------------------------------------------------
TINY_UNET = ["--config.training.batch_size=8", "--config.training.sample_freq=0",
             "--config.model.base_channels=8", "--config.model.channel_mults=(1,)",
             "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=()",
             "--config.optim.warmup=1", "--config.training.n_iters=2", "--config.device=cpu"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits") / "run"
    config = os.path.join(REPO, "configs", "digits", "vp.py")
    assert main(["train", "--config", config, "--workdir", str(workdir), *TINY_UNET, "--quiet"]) == 0
    return workdir


def _table_rows(text, which=0):
    """The rows of the ``which``-th Markdown table of ``text`` (0: the main one, 1: the paired)."""
    tables, current = [], []
    for ln in text.splitlines() + [""]:
        if ln.startswith("|"):
            current.append(ln)
        elif current:
            tables.append(current)
            current = []
    return [ln for ln in tables[which] if not ln.startswith("|---")]


def test_ddim_table_command(digits_run, tmp_path, capsys):
    out = tmp_path / "ddim"
    assert main(["study", "ddim-table", "--checkpoint", str(digits_run), "--n", "20", "--seeds",
                 "2", "--steps", "2,3", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""                                         # --quiet: nothing
    text = (out / "table.md").read_text()
    assert captured.out == text
    rows = _table_rows(text)
    assert rows[0] == "| sampler | 2 | 3 |"
    body = rows[1:]
    assert [r.split(" | ")[0][2:] for r in body] == [
        "ddim:eta=0", "ddim:eta=0.2", "ddim:eta=0.5", "ddim:eta=1", "ddim:sigma_hat=True",
        "data vs data (floor)", "NFE per sample"]
    assert all(r.count("|") == 4 for r in body)
    assert body[-1] == "| NFE per sample | 3 | 4 |"
    paired = _table_rows(text, 1)
    assert paired[0] == rows[0] and len(paired) == 6
    cells = [[c.strip() for c in r.strip("|").split("|")[1:]] for r in paired[1:]]
    assert [sum(row[j] == "=" for row in cells) for j in range(2)] == [1, 1]   # one best per column
    with open(out / "table.csv") as fh:
        long = list(csv.DictReader(fh))
    assert list(long[0]) == ["sampler", "column", "solver", "steps", "nfe", "n", "seed", "fd", "fd_ci95"]
    assert len(long) == 5 * 2 * 3 + 3                                 # cells x (2 seeds + mean) + floor
    assert all(math.isfinite(float(r["fd"])) and float(r["fd"]) > 0 for r in long)
    info = json.loads((out / "run.json").read_text())
    assert info["n"] == 20 and info["seeds"] == [0, 1] and info["study"] == "ddim-table"
    assert info["wall_s"] > 0 and info["estimate_s"] > 0 and "torch" in info
    assert (out / "fd_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing report is not replaced without --overwrite
    _one_line_error(capsys, ["ddim-table", "--checkpoint", str(digits_run), "--out", str(out)],
                    "table.md", "exists; pass --overwrite")


def test_pc_table_command_progress_and_costs(digits_run, tmp_path, capsys):
    out = tmp_path / "pc"
    assert main(["study", "pc-table", "--checkpoint", str(digits_run), "--n", "20", "--seeds", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "estimated" in captured.err.splitlines()[0] and "[20/20]" in captured.err
    rows = _table_rows((out / "table.md").read_text())
    assert rows[0] == "| sampler | P2 | P4 | C4 | PC2 |"
    assert rows[-1] == "| NFE per sample | 3 | 5 | 5 | 5 |"
    corrector = [r for r in rows if r.startswith("| corrector only")][0].split(" | ")
    assert corrector[1:3] == ["-", "-"] and corrector[4].strip(" |") == "-"


def _one_line_error(capsys, args, *fragments):
    code = main(["study", *args, "--quiet"])
    return assert_one_line_error(code, capsys.readouterr().err, *fragments)


def test_errors(digits_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = ["--checkpoint", str(digits_run)]
    _one_line_error(capsys, ["ddim-table", *ck, "--seeds", "1"], "--seeds must be >= 2")
    _one_line_error(capsys, ["ddim-table", *ck, "--n", "1"], "--n must be >= 2")
    _one_line_error(capsys, ["pc-table", *ck, "--steps", "10,20"], "pc-table takes one N")
    _one_line_error(capsys, ["ddim-table", *ck, "--steps", "10,x"], "--steps must be comma-separated")
    _one_line_error(capsys, ["ddim-table", *ck, "--n", "2000"], "--n 2000", "1437")
    _one_line_error(capsys, ["ddpm-table", *ck], "invalid choice: 'ddpm-table'")
    _one_line_error(capsys, ["ddim-table", "--checkpoint", "nowhere"], "'nowhere': no such file")


def test_a_moons_checkpoint_is_refused(tmp_path, capsys):
    workdir = tmp_path / "moons"
    config = os.path.join(REPO, "configs", "toy", "moons_vp.py")
    assert main(["train", "--config", config, "--workdir", str(workdir),
                 "--config.training.n_iters=2", "--quiet"]) == 0
    _one_line_error(capsys, ["ddim-table", "--checkpoint", str(workdir), "--out", str(tmp_path / "o")],
                    "trained on 'moons'", "digits classifier", "digits checkpoint")


def test_paired_differences_to_the_best_row():
    from sde_diffusion.studies import StudyResult, markdown_table, paired_differences

    st = ddim_table([10])
    res = StudyResult(st, 50, [0, 1, 2])
    res.fd = {("ddim:eta=0", "10"): [10.0, 20.0, 30.0], ("ddim:eta=1", "10"): [11.0, 22.0, 30.0]}
    res.nfe = {k: 11 for k in res.fd}
    res.floor = [5.0, 6.0, 7.0]
    diffs = paired_differences(res)
    assert list(diffs) == [("ddim:eta=1", "10")]                      # the best row is left out
    assert diffs[("ddim:eta=1", "10")] == pytest.approx(student_t_interval([1.0, 2.0, 0.0]))
    text = markdown_table(res)
    assert "| ddim:eta=0 | = |" in text and "| ddim:eta=1 | 1.0 ± 2.5 |" in text


def test_estimate_only(digits_run, tmp_path, capsys):
    assert main(["study", "pc-table", "--checkpoint", str(digits_run), "--estimate", "--quiet",
                 "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "estimated" in out and "17010 NFE per sample and seed" in out
    assert not (tmp_path / "e").exists()


def test_compare_metric_fd(digits_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--checkpoint", str(digits_run), "--metric", "fd", "--solvers",
                 "ddim:eta=0,dpm_solver_2", "--nfe", "1,4", "--n", "10", "--seeds", "2",
                 "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    rows = _table_rows((out / "compare.md").read_text())
    assert rows[0] == "| sampler | 1 | 4 |"
    assert rows[2].startswith("| dpm_solver_2 | - | ")              # 1 NFE is below its minimum
    assert rows[-1] == "| NFE per sample | 1 | 4 |"                 # no denoising step: the budget
    for name in ("compare.csv", "fd_vs_nfe.png", "compare.json"):
        assert (out / name).stat().st_size > 100
    # without --n: COMPARE_FD_N per seed (compare's oracle default, 2000, is more digits than the
    # floor's 1437)
    from sde_diffusion.cli import COMPARE_FD_N
    assert main(["compare", "--checkpoint", str(digits_run), "--metric", "fd", "--solvers", "ddim",
                 "--nfe", "1", "--seeds", "2", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    long = list(csv.DictReader(open(tmp_path / "d" / "compare.csv")))
    assert {int(r["n"]) for r in long} == {COMPARE_FD_N}
    code = main(["compare", "--oracle", "image16", "--metric", "fd", "--out", str(tmp_path / "o"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--metric fd" in err and "digits --checkpoint" in err


def test_fit_n_fills_the_time_budget():
    from sde_diffusion.studies import OVERHEAD, fit_n, study_nfe

    st = ddim_table([10, 20])                                        # 5 x (11 + 21) = 160 NFE
    assert study_nfe(st) == 160
    # 1 s per call of 100 samples: 10 ms per sample-NFE, 160 NFE x 4 seeds = 6.4 s per sample
    assert fit_n(1.0, 100, st, 4, 640.0 * OVERHEAD) == 100
    assert fit_n(1.0, 100, st, 4, 1.0) == 20 and fit_n(1e-6, 100, st, 4, 1e6) == 1437   # clamped


def test_low_nfe_trained_benchmark_smoke(digits_run, tmp_path, monkeypatch):
    """benchmarks/low_nfe_trained.py (issue 15's trained-network check) runs on checkpoints: one
    pooled row per budget naming the default's configuration, every error finite and > 0, and the
    best configuration's ratios are 1 on the checkpoint it is best on."""
    import importlib.util
    import sys

    path = os.path.join(REPO, "benchmarks", "low_nfe_trained.py")
    spec = importlib.util.spec_from_file_location("_bench_low_nfe_trained", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))      # it puts benchmarks/ on the path: undone
    spec.loader.exec_module(module)
    out = tmp_path / "lnt"
    assert module.main(["--checkpoint", f"a={digits_run}", "--checkpoint", f"b={digits_run}",
                        "--nfe", "4,6", "--n", "4", "--quick", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(str(out) + ".csv")))
    assert {int(r["nfe"]) for r in rows} == {4, 6} and {r["checkpoint"] for r in rows} == {"a", "b"}
    assert all(math.isfinite(float(r["error"])) and float(r["error"]) > 0 for r in rows)
    summary = _table_rows((tmp_path / "lnt.md").read_text())
    assert len(summary) == 1 + 2 and all("ipndm" in r or "unipc" in r for r in summary[1:])
    ranked = module.pooled([{**r, "nfe": int(r["nfe"]), "error": float(r["error"])} for r in rows],
                           ["a", "b"], 4)
    best = next(r for r in ranked if r[2] != module.DEFAULT)
    assert best[0] == best[1] == 1.0   # the same checkpoint twice: the best is best on both
    # --afs: the rule's configuration with and without the analytical first step, paired
    assert module.main(["--afs", "--checkpoint", f"a={digits_run}", "--nfe", "4,6", "--n", "4",
                        "--quick", "--out", str(out)]) == 0
    pairs = list(csv.DictReader(open(str(out) + "_afs.csv")))
    assert [int(r["nfe"]) for r in pairs] == [4, 6]
    for r in pairs:
        assert float(r["ratio"]) == pytest.approx(float(r["error_afs"]) / float(r["error"]))
    assert len(_table_rows((tmp_path / "lnt_afs.md").read_text())) == 1 + 2
    # --grids: the rule's solver on each candidate grid, the rule's own grid the baseline
    assert module.main(["--grids", "--checkpoint", f"a={digits_run}", "--nfe", "4", "--n", "4",
                        "--quick", "--out", str(out)]) == 0
    grid_rows = list(csv.DictReader(open(str(out) + "_grids.csv")))
    assert [r["grid"] for r in grid_rows] == [g[0] for g in module.GRID_CANDIDATES]
    assert [r["grid"] for r in grid_rows if r["rule"] == "True"] == ["focus(2,0.4)"]
    assert "| 4 | **focus(2,0.4)** | 1.00 | 1.00 |" in (tmp_path / "lnt_grids.md").read_text()


def test_study_workers_benchmark_smoke(digits_run, tmp_path, monkeypatch):
    """benchmarks/study_workers.py times one process against two workers on a checkpoint and
    writes both rows, the speed-up and the largest difference of the distances (round-off)."""
    import importlib.util
    import sys

    path = os.path.join(REPO, "benchmarks", "study_workers.py")
    spec = importlib.util.spec_from_file_location("_bench_study_workers", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec.loader.exec_module(module)
    out = tmp_path / "sw"
    assert module.main(["--checkpoint", str(digits_run), "--steps", "2", "--n", "4", "--seeds",
                        "2", "--workers", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(str(out) + ".csv")))
    assert [int(r["workers"]) for r in rows] == [1, 2] and float(rows[0]["speed_up"]) == 1.0
    text = (tmp_path / "sw.md").read_text()
    diff = float(text.split("between the two runs: ")[1].split(" ")[0])
    assert diff < 1e-3


def test_estimate_times_a_call_on_a_workers_share_of_the_threads(small_model, monkeypatch):
    """With workers, the timed call runs on worker_threads(workers) threads (what each worker of
    run_study gets), the thread count is restored afterwards, and the estimate is shared out."""
    from sde_diffusion.studies import estimate_seconds, worker_threads

    seen = []
    real = small_model.eps
    monkeypatch.setattr(small_model, "eps", lambda x, t: (seen.append(torch.get_num_threads()),
                                                          real(x, t))[1])
    st = Study("t", "t", ("ddim",), ("3",), {"3": 3}, {("ddim", "3"): Cell("ddim", 3)})
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        est = estimate_seconds(st, small_model, 8, 2, 8, (1, 8, 8), workers=2)
        assert set(seen) == {worker_threads(2)} == {2} and torch.get_num_threads() == 4
        one = est["call_s"] / 8 * 8 * 4 * 2       # call per sample x n x NFE (3 + denoise) x seeds
        from sde_diffusion.studies import OVERHEAD
        assert est["seconds"] == pytest.approx(OVERHEAD * one / 2)
    finally:
        torch.set_num_threads(threads)


def test_study_dispersion_benchmark_smoke(digits_run, tmp_path, monkeypatch):
    """benchmarks/study_dispersion.py draws every sampler of its pairs for each seed and reports
    the spreads and the paired differences."""
    import importlib.util
    import sys

    path = os.path.join(REPO, "benchmarks", "study_dispersion.py")
    spec = importlib.util.spec_from_file_location("_bench_study_dispersion", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "PAIRS", tuple(tuple((label, solver, opts, 8) for label, solver, opts, _ in pair)
                                               for pair in module.PAIRS))
    out = str(tmp_path / "disp")
    assert module.main(["--checkpoint", str(digits_run), "--seeds", "3", "--steps", "2", "--out", out]) == 0
    values = json.load(open(out + ".json"))
    assert set(values) == {p[0] for pair in module.PAIRS for p in pair}
    assert all(len(v) == 3 and all(math.isfinite(x) and x > 0 for x in v) for v in values.values())
    text = open(out + ".md").read()
    assert len(_table_rows(text)) == 1 + 4   # the separator row is dropped
    pairs = _table_rows(text, 1)
    assert "Levene" in pairs[0] and len(pairs) == 1 + 2 and all(" vs " in r for r in pairs[1:])
