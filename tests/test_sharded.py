"""Sharded, resumable sampling and likelihood (sde_diffusion.sharded, sample/likelihood --shards):
the same result whatever the number of processes, shard size and batch size; resume after an
interruption; a folder of another run refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sde_diffusion import VPSDE, random_mixture, sample
from sde_diffusion import sharded
from sde_diffusion.cli import main
from sde_diffusion.models import OracleModel, ScoreModel, TimeMLP
from sde_diffusion.sharded import (
    ShardError, gather_shards, indexed_probes, likelihood_shards, plan_shards, run_shards,
    sample_shards,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = ["sample", "--oracle", "ring8", "--solver", "ddim:eta=1", "--steps", "8", "--n", "37",
          "--quiet"]
LIKELIHOOD = ["likelihood", "--oracle", "ring8", "--data", "oracle", "--n", "12", "--probes", "2",
              "--quiet"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=ROOT)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _mixture():
    return random_mixture(dim=2, n_components=4, seed=0, sde=VPSDE())


def test_plan_shards_covers_the_indices_once():
    shards = plan_shards(10, 4)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    assert plan_shards(3, 8)[0].name == "shard_000000000_000000003.npz"
    with pytest.raises(ValueError, match="shard_size must be an integer >= 1, got 0"):
        plan_shards(3, 0)


@pytest.mark.parametrize("solver", ["ddim:eta=1", "sde_dpm_solver++", "dpm_solver++"])
def test_cli_sharded_samples_equal_one_batch_bit_for_bit(tmp_path, capsys, solver):
    """Any shard size and batch size give the samples of one plain `sample` call."""
    args = SAMPLE[:4] + [solver] + SAMPLE[5:]
    assert main(args + ["--out", str(tmp_path / "plain.npz")]) == 0
    plain = _npz(tmp_path / "plain.npz")
    for shard_size, batch in ((8, 3), (37, 37), (5, None), (100, 4)):
        out = tmp_path / f"s{shard_size}_{batch}.npz"
        extra = ["--shard-size", str(shard_size)] + ([] if batch is None else ["--batch", str(batch)])
        assert main(args + ["--out", str(out)] + extra) == 0
        got = _npz(out)
        assert np.array_equal(got["samples"], plain["samples"]), (shard_size, batch)
        assert got["nfe"] == plain["nfe"] and str(got["solver"]) == str(plain["solver"])
        assert os.path.isdir(str(out)[:-4] + ".shards")


def test_samples_of_a_network_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = ScoreModel(TimeMLP(dim=2, hidden=32, depth=2, embed_dim=16), VPSDE(), "eps")
    one = sample(model, shape=(20, 2), solver="sde_dpm_solver++", steps=6, generator=3).samples
    parts = [sample(model, shape=(b - a, 2), solver="sde_dpm_solver++", steps=6, generator=3,
                    index_offset=a).samples for a, b in ((0, 7), (7, 8), (8, 20))]
    assert torch.equal(one, torch.cat(parts))


def test_sample_shards_resume_after_an_interruption(tmp_path, monkeypatch):
    """A run killed after some shards resumes: only the missing shards are computed, and the files
    end up the same as those of an uninterrupted run; a deleted shard is computed again."""
    model, folder = OracleModel(_mixture()), str(tmp_path / "shards")
    kw = dict(seed=5, key={"what": "test"}, shard_size=4, batch_size=3, solver="ddim", steps=6)
    whole = sample_shards(model, str(tmp_path / "whole"), 18, (2,), **kw)

    calls = []
    real = sharded._in_batches

    def dying(a, b, size, fn):
        if len(calls) == 2:
            raise KeyboardInterrupt   # the process is stopped while computing its third shard
        calls.append(a)
        return real(a, b, size, fn)

    monkeypatch.setattr(sharded, "_in_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        sample_shards(model, folder, 18, (2,), **kw)
    monkeypatch.setattr(sharded, "_in_batches", real)
    names = sorted(n for n in os.listdir(folder) if n.startswith("shard_"))
    assert names == ["shard_000000000_000000004.npz", "shard_000000004_000000008.npz"]
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    log = []
    resumed = sample_shards(model, folder, 18, (2,), log=log.append, **kw)
    assert len(log) == 3                          # shards 8-12, 12-16, 16-18 only
    assert np.array_equal(resumed["samples"], whole["samples"])
    for name in os.listdir(folder):
        if name.startswith("shard_"):
            a, b = _npz(os.path.join(folder, name)), _npz(os.path.join(tmp_path / "whole", name))
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a if k != "meta_json")
    os.remove(os.path.join(folder, "shard_000000004_000000008.npz"))
    log.clear()
    again = sample_shards(model, folder, 18, (2,), log=log.append, **kw)
    assert len(log) == 1 and "[4, 8)" in log[0]
    assert np.array_equal(again["samples"], whole["samples"])
    # a larger n reuses every whole shard
    log.clear()
    more = sample_shards(model, folder, 22, (2,), log=log.append, **kw)
    assert len(log) == 2 and np.array_equal(more["samples"][:16], whole["samples"][:16])


def test_cli_resume_skips_finished_shards(tmp_path, capsys):
    out = str(tmp_path / "s.npz")
    assert main(SAMPLE + ["--out", out, "--shard-size", "10"]) == 0
    first = _npz(out)
    shards = str(tmp_path / "s.shards")
    os.remove(os.path.join(shards, "shard_000000010_000000020.npz"))
    os.remove(out)
    os.remove(out[:-4] + ".png")
    capsys.readouterr()
    assert main(SAMPLE[:-1] + ["--out", out, "--shard-size", "10"]) == 0
    err = capsys.readouterr().err
    assert err.count("written") == 1 and "[10, 20)" in err
    assert np.array_equal(_npz(out)["samples"], first["samples"])


def test_a_folder_of_another_run_is_refused_or_overwritten(tmp_path, capsys):
    out, shards = str(tmp_path / "s.npz"), str(tmp_path / "sh")
    assert main(SAMPLE + ["--out", out, "--shards", shards, "--shard-size", "10"]) == 0
    capsys.readouterr()
    other = SAMPLE + ["--out", str(tmp_path / "t.npz"), "--shards", shards, "--seed", "1"]
    assert main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds shards of another run (it differs in seed)" in err[0]
    assert main(other + ["--overwrite"]) == 0
    assert main(SAMPLE + ["--out", str(tmp_path / "u.npz"), "--seed", "1"]) == 0
    assert np.array_equal(_npz(tmp_path / "t.npz")["samples"], _npz(tmp_path / "u.npz")["samples"])
    with pytest.raises(ShardError, match="missing or belongs to another run"):
        gather_shards(shards, 37, key={"x": 1}, shard_size=10)
    assert main(SAMPLE + ["--out", str(tmp_path / "v.npz"), "--batch", "0"]) == 2
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err


def test_class_labels_follow_the_sample_index(tmp_path):
    """--class 0,1,2 with shards: each batch binds its slice of the labels (same as one call)."""
    args = ["sample", "--oracle", "ring8c", "--solver", "ddim", "--steps", "6", "--n", "13",
            "--class", "0,1,2", "--guidance", "2", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a.npz")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.npz"), "--shard-size", "5", "--batch", "2"]) == 0
    a, b = _npz(tmp_path / "a.npz"), _npz(tmp_path / "b.npz")
    assert np.array_equal(a["y"], b["y"]) and np.array_equal(a["samples"], b["samples"])


def test_indexed_probes_depend_on_the_index_only():
    full = indexed_probes(7, 0, (10, 3), n_probes=2)
    part = indexed_probes(7, 4, (6, 3), n_probes=2)
    assert torch.equal(full[:, 4:], part)
    assert set(full.unique().tolist()) == {-1.0, 1.0}
    big = indexed_probes(1, 0, (4000, 8))
    assert abs(float(big.mean())) < 0.02              # +-1 with probability 1/2 (sd 0.0056)
    g = indexed_probes(7, 0, (10, 3), n_probes=2, kind="gaussian")
    assert torch.equal(torch.where(g >= 0, 1.0, -1.0), full)


def test_likelihood_shards_match_across_splits_and_the_exact_density(tmp_path):
    mixture = _mixture()
    x = mixture.sample(15, t=mixture.sde.eps, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    # the exact log p_T as the prior: what remains is the integration error
    kw = dict(seed=2, key={}, rtol=1e-7, atol=1e-7, prior_logp=lambda z: mixture.log_prob(z, 1.0))
    a = likelihood_shards(mixture, None, x, str(tmp_path / "a"), shard_size=4, batch_size=3, **kw)
    b = likelihood_shards(mixture, None, x, str(tmp_path / "b"), shard_size=15, **kw)
    # per-sample error control: the same steps for every point whatever its companions; the
    # oracle's batched float64 arithmetic differs in the last bits between batch sizes
    assert torch.equal(a.n_fevals, b.n_fevals)
    torch.testing.assert_close(a.log_likelihood, b.log_likelihood, rtol=0, atol=1e-12)
    exact = mixture.log_prob(x, mixture.sde.eps)
    assert float((a.log_likelihood - exact).abs().max()) < 1e-5
    h = likelihood_shards(mixture, None, x, str(tmp_path / "h"), shard_size=4, divergence="hutchinson",
                          n_probes=3, **kw)
    h2 = likelihood_shards(mixture, None, x, str(tmp_path / "h2"), shard_size=6, batch_size=6,
                           divergence="hutchinson", n_probes=3, **kw)
    torch.testing.assert_close(h.log_likelihood, h2.log_likelihood, rtol=0, atol=1e-12)
    assert not torch.equal(h.log_likelihood, a.log_likelihood)     # an estimate, not the exact value
    assert a.summary()["n"] == 15 and np.isfinite(a.summary()["bpd_ci95"])


def _torchrun(args, nproc):
    # torchrun's parser reads "--n" as an ambiguous abbreviation of its own options
    args = ["--num-samples" if a == "--n" else a for a in args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "sde_diffusion", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout.decode()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_bit_for_bit(tmp_path):
    """torchrun with 2 CPU processes (gloo): the samples file equals one plain process's, bit for
    bit; the likelihood's per-point results and statistics equal a 1-process run's with the same
    shards and batches; a rerun under torchrun skips every shard."""
    plain, two = str(tmp_path / "plain.npz"), str(tmp_path / "two.npz")
    assert main(SAMPLE + ["--out", plain]) == 0
    out = _torchrun(SAMPLE + ["--out", two, "--shard-size", "6", "--batch", "4"], 2)
    assert len(out.strip().splitlines()) == 1          # rank 0 reports, once
    a, b = _npz(plain), _npz(two)
    assert np.array_equal(a["samples"], b["samples"]) and a["nfe"] == b["nfe"]
    lk = LIKELIHOOD + ["--shard-size", "5", "--batch", "2"]
    one = _torchrun(lk + ["--shards", str(tmp_path / "l1")], 1)
    both = _torchrun(lk + ["--shards", str(tmp_path / "l2")], 2)
    assert json.loads(one)["bpd"] == json.loads(both)["bpd"]
    r1, r2 = (json.load(open(tmp_path / d / "run.json"))["key"] for d in ("l1", "l2"))
    g1 = gather_shards(str(tmp_path / "l1"), 12, key=r1, shard_size=5)[0]
    g2 = gather_shards(str(tmp_path / "l2"), 12, key=r2, shard_size=5)[0]
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "-m", "sde_diffusion",
                            *["--num-samples" if a == "--n" else a for a in lk if a != "--quiet"],
                            "--shards", str(tmp_path / "l2")], cwd=ROOT, env=_env(),
                           capture_output=True, timeout=180)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    assert b"written" not in again.stderr
    assert json.loads(again.stdout.decode())["bpd"] == json.loads(both)["bpd"]


def test_a_killed_run_resumes_to_the_same_file(tmp_path):
    """SIGKILL the sampling process once some shards are on disk; the rerun computes only the
    rest and its samples file equals a plain run's."""
    import signal
    import time

    args = ["sample", "--oracle", "gmm64", "--solver", "euler_maruyama", "--steps", "400", "--n", "64",
            "--quiet"]
    out, shards = str(tmp_path / "k.npz"), tmp_path / "k.shards"
    cmd = [sys.executable, "-m", "sde_diffusion", *args, "--out", out, "--shard-size", "4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            if shards.is_dir() and len(list(shards.glob("shard_*.npz"))) >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(list(shards.glob("shard_*.npz")))
    assert 2 <= done < 16 and not os.path.exists(out), f"{done} shards"
    rerun = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert not [p for p in shards.iterdir() if p.name.endswith(".tmp")]
    assert main(args + ["--out", str(tmp_path / "plain.npz")]) == 0
    assert np.array_equal(_npz(out)["samples"], _npz(tmp_path / "plain.npz")["samples"])
