"""benchmarks/gpu_throughput.py runs in its ``--smoke`` mode on a CPU (tiny UNet, batch 2, 3 steps)
and writes what it promises; the real run needs a GPU. Skipped when diffusers is missing."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os

import pytest

pytest.importorskip("diffusers", reason="needs diffusers, the 'ecosystem' extra")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location(
        "gpu_throughput", os.path.join(ROOT, "benchmarks", "gpu_throughput.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_md_csv_json(tmp_path):
    stem = str(tmp_path / "gt")
    res = _module().main(["--smoke", "--device", "cpu", "--out", stem])
    rows = list(csv.DictReader(open(stem + ".csv", encoding="utf-8")))
    assert [r["method"] for r in rows] == ["network floor", "ours (dpm_solver++_2m)",
                                           "diffusers (DPMSolverMultistepScheduler)"]
    assert all(r["batch"] == "2" and r["steps"] == "3" and r["unet"] == "tiny" for r in rows)
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    saved = json.load(open(stem + ".json", encoding="utf-8"))
    assert math.isfinite(saved["ratio"]) and saved["ratio"] > 0
    # the two loops compute the same DPM-Solver++(2M) chain: float32 round-off apart
    assert saved["agreement_rel"] < 1e-5
    assert saved["agreement_rel"] == res["agreement_rel"]
    text = open(stem + ".md", encoding="utf-8").read()
    assert "GPU figures are owed" in text and "ours / diffusers" in text


def test_smoke_writes_nothing_without_out(tmp_path, monkeypatch):
    mod = _module()
    monkeypatch.setattr(mod, "DEFAULT_OUT", str(tmp_path / "never"))
    mod.main(["--smoke", "--device", "cpu"])
    assert not list(tmp_path.iterdir())


def test_bad_sizes_are_refused():
    with pytest.raises(SystemExit):
        _module().parse_args(["--batch", "0"])
