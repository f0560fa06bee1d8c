"""The scaling study's cost-model calibration (benchmarks/bench_scaling_model.calibrate), on synthetic runs.

Runs whose step times were made from known coefficients must give those coefficients back, with every
row's modelled step equal to its measured one; noisy runs must report their misfit, not hide it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_scaling_model as model

OVERHEAD, PER_TOKEN, BYTES_PER_S, LATENCY = 0.002, 5e-6, 2e8, 3e-4


def _run(key: str, world: int, degrees: dict, ledger: dict, tokens: int, noise: float = 0.0) -> dict:
    link_bytes, latencies = model.comm_terms(ledger, 1, degrees, world)
    step = (OVERHEAD + tokens / world * max(1.0, world / 2) * PER_TOKEN + link_bytes / BYTES_PER_S
            + latencies * LATENCY) * (1 + noise)
    return {"key": key, "mode": "strong", "world": world, "degrees": degrees, "tokens": tokens,
            "ledgers": [ledger] * world, "step_times": [step], "step_s": step}


def _runs(noise: tuple[float, ...] = (0.0,) * 6) -> list[dict]:
    return [
        _run("1", 1, {}, {}, 1024, noise[0]),
        _run("1b", 1, {}, {}, 4096, noise[1]),
        _run("dp2", 2, {"dp": 2}, {"dp_sp:0/all_gather": {"calls": 5, "bytes": 4e6},
                                   "dp_sp:0/reduce_scatter": {"calls": 3, "bytes": 8e6}}, 1024, noise[2]),
        _run("tp2", 2, {"tp": 2}, {"tp/all_reduce": {"calls": 40, "bytes": 2e5}}, 1024, noise[3]),
        _run("pp2", 2, {"pp": 2}, {"pp/send": {"calls": 8, "bytes": 6e6}, "pp/recv": {"calls": 8, "bytes": 6e6}},
             1024, noise[4]),
        _run("dp4", 4, {"dp": 4}, {"dp_sp:0/all_gather": {"calls": 5, "bytes": 9e6},
                                   "dp_sp:0/reduce_scatter": {"calls": 3, "bytes": 1.2e7}}, 4096, noise[5]),
    ]


def test_exact_runs_give_their_coefficients_back():
    cal = model.calibrate(_runs(), cores=2)
    assert cal["overhead_s"] == pytest.approx(OVERHEAD, rel=1e-6)
    assert cal["s_per_token"] == pytest.approx(PER_TOKEN, rel=1e-6)
    assert cal["bytes_per_s"] == pytest.approx(BYTES_PER_S, rel=1e-6)
    assert cal["latency_s"] == pytest.approx(LATENCY, rel=1e-6)
    assert cal["mean_abs_error"] < 1e-6 and len(cal["rows"]) == 6


def test_noisy_runs_report_their_misfit():
    cal = model.calibrate(_runs((0.2, -0.2, 0.2, -0.2, 0.2, -0.2)), cores=2)
    assert 0.05 < cal["mean_abs_error"] < 0.3
    for row in cal["rows"]:
        assert row["error"] == pytest.approx(row["model_s"] / row["measured_s"] - 1)


def test_comm_terms_follow_the_ring_formulas():
    # all_gather of X bytes on n ranks: (n - 1) X bytes over the link and (n - 1) latencies per call
    link_bytes, latencies = model.comm_terms({"dp_sp:0/all_gather": {"calls": 2, "bytes": 1000}}, 1, {"dp": 4}, 4)
    assert link_bytes == pytest.approx(3 * 1000) and latencies == pytest.approx(2 * 3)
    # a receive is the other end of a send: counted once
    assert model.comm_terms({"pp/recv": {"calls": 1, "bytes": 10}}, 1, {"pp": 2}, 2) == (0.0, 0.0)
