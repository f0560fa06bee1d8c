"""benchmarks/gpu_check.py runs end to end on its CPU twin (`--device cpu --quick`) and reports every section.

The GPU path cannot run here; this proves the script's plumbing (process group, trainer, kernel and
SP-op comparisons, lazy checkpoint + bitwise reload, Markdown/JSON output) and that asking for CUDA
where there is none is a clear exit-2 error, not a traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # runs the whole script in a subprocess

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check"
    proc = _run("--device", "cpu", "--quick", "--out", str(out))
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert out.with_suffix(".md").exists()
    data = json.loads(out.with_suffix(".json").read_text())
    data["_markdown"] = out.with_suffix(".md").read_text()
    return data


def test_every_section_present_and_passed(report):
    for section in ("environment", "training", "kernels", "sp_ops", "checkpoint", "checks"):
        assert section in report, section
    assert "errors" not in report
    assert report["passed"] is True
    assert report["checks"] and all(report["checks"].values())
    for heading in ("## Training", "## Local attention kernels", "## Sequence-parallel ops", "## Lazy checkpoint"):
        assert heading in report["_markdown"]


def test_training_numbers_are_finite(report):
    t = report["training"]
    assert t["steps"] == 8 and t["timed_steps"] > 0
    assert t["losses"] and all(_finite(v) for v in t["losses"].values())
    for key in ("tokens_per_s", "step_ms", "tflops", "flops_per_token"):
        assert _finite(t[key]) and t[key] > 0, key
    assert t["mfu"] is None and t["peak_tflops"] is None  # no known peak on CPU: MFU is n/a, never guessed


def test_kernel_and_sp_errors_are_small_and_finite(report):
    kernels = report["kernels"]
    assert {r["mask"] for r in kernels} == {"full", "causal", "dense mask"}
    assert {r["backend"] for r in kernels} >= {"auto", "math"}
    assert all(r["resolves_to"] == "cpu_flash" for r in kernels if r["backend"] == "auto")
    for r in kernels:
        assert set(r["errors"]) == {"out", "lse", "dq", "dk", "dv"}
        assert all(_finite(v) and v < 1e-2 for v in r["errors"].values()), r
    sp = report["sp_ops"]
    assert {(r["method"], r["case"]) for r in sp} == {
        (m, c) for m in ("ulysses", "ring", "tokenring", "usp") for c in ("causal", "full", "documents")}
    for r in sp:
        assert set(r["errors"]) == {"out", "dq", "dk", "dv"}
        assert all(_finite(v) and v < 3e-2 for v in r["errors"].values()), r
        # the local kernels that ran are recorded per row: on CPU, auto runs the CPU flash op for every call
        assert r["expected_backend"] == "cpu_flash" and set(r["backends"]) == {"cpu_flash"}, r
        assert r["backends"]["cpu_flash"] >= 2  # at least one forward and one backward call
    assert "| kernels |" in report["_markdown"] and "cpu_flash x" in report["_markdown"]


def test_checkpoint_reload_is_bitwise_and_stalls_are_finite(report):
    c = report["checkpoint"]
    assert c["saves"] == c["committed"] == 3 and c["failed"] == 0
    assert c["reloaded_step"] == c["saved_step"] == 6
    assert c["tensors_compared"] > 0 and c["mismatched"] == []
    assert len(c["stall_after_ms"]) == 3 and all(_finite(x) and x >= 0 for x in c["stall_after_ms"])
    assert _finite(c["stall_per_save_ms"]) and _finite(c["state_mib"]) and c["state_mib"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    proc = _run("--device", "cuda", "--quick", timeout=60)
    assert proc.returncode == 2
    assert "--device cuda" in proc.stderr and "--device cpu --quick" in proc.stderr
    assert "Traceback" not in proc.stderr
