"""The sampler benchmark takes each configuration's kind from the registry's declaration: a
stochastic configuration is never scored against the exact flow map (benchmarks/samplers.py)."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "samplers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_bench_samplers", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up there
    path = list(sys.path)                    # it puts benchmarks/ on the path: undone after
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path[:] = path


def test_benchmark_kinds_follow_the_registry(bench):
    from sde_diffusion import VPSDE, random_mixture

    oracle = bench.TimedMixture(random_mixture(4, 2, seed=0, sde=VPSDE()))
    args = argparse.Namespace(optimize_max_nfe=20, pilot=8, dim=4, seed=0)
    kinds = {e.name: e.stochastic for e in bench.our_entries(oracle, args)}
    assert kinds["edm_heun"] is False and kinds["edm_heun(churn)"] is True
    assert kinds["ddim"] is False and kinds["ddim(eta=1)"] is True
    assert kinds["pc(rd+langevin)"] is True and kinds["unipc_3"] is False
    assert kinds["sde_dpm_solver++"] is True and kinds["euler_maruyama"] is True
