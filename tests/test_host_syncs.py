"""The step loop reads nothing back to the host except on log steps (accounting off, the default).

Every tensor method that reads a value to the host (`item`, `tolist`, `cpu`, `numpy`, `float()`,
`int()`, `bool()`) is patched to record calls made from meshweave's own code, except code that works
on host tensors by construction: the data pipeline (meshweave/data) and the attention mask planner
(attention/masks.py, fed a host copy of the document ids). On CUDA each recorded call would be a
device synchronisation; on this CPU machine the count is what the test can see of them.

With sequence parallelism and packed documents the batch has one read by design: the gathered
document ids are copied to the host once (all layers reuse the plans), asserted below.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import meshweave
from meshweave.testing import run_distributed

HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
PACKAGE = str(Path(meshweave.__file__).parent)
HOST_SIDE = (str(Path(PACKAGE) / "data"), str(Path(PACKAGE) / "attention" / "masks.py"))


def _count_host_reads(counter: Counter):
    """Patch torch.Tensor's host-reading methods to count calls made from meshweave code."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def patched(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE) and not caller.startswith(HOST_SIDE):  # str.startswith takes a tuple
                frame = sys._getframe(1)
                counter[f"{name} at {Path(caller).relative_to(PACKAGE)}:{frame.f_lineno}"] += 1
            return original(self, *args, **kwargs)
        return method

    for name in HOST_READS:
        setattr(torch.Tensor, name, patched(name))
    return lambda: [setattr(torch.Tensor, n, f) for n, f in originals.items()]


def steps_and_their_host_reads(overrides: list[str], steps: int, log_every: int) -> list[dict]:
    """Train `steps` steps logging every `log_every`; per step, the host reads of the step and of its log."""
    from meshweave.testing_equivalence import SMALL_TEST_CONFIG
    from meshweave.train.build import build_trainer
    from meshweave.train.config import load_config

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, SMALL_TEST_CONFIG + [f"train.steps={steps}", f"logging.every_steps={log_every}",
                                                     f"run_dir={run_dir}", *overrides])
        trainer = build_trainer(cfg)
        trainer.train_step()  # first step: lazy initialisation (pipeline shape inference, FSDP state)
        per_step = []
        for _ in range(steps - 1):
            in_step, in_log = Counter(), Counter()
            restore = _count_host_reads(in_step)
            try:
                metrics = trainer.train_step()
            finally:
                restore()
            restore = _count_host_reads(in_log)
            try:
                logged = trainer.p.metrics.log(metrics) is not None
            finally:
                restore()
            per_step.append({"step": metrics.step, "logged": logged, "step_reads": dict(in_step),
                             "log_reads": dict(in_log)})
        trainer.p.mesh.close()
        return per_step


def _expected_step_reads(overrides: list[str]) -> dict[str, int]:
    """The one planned read per (micro)batch of the SP document plans; nothing otherwise."""
    if "parallel.sp=2" not in overrides:
        return {}
    return {"cpu at attention/ring.py": 2 if "train.grad_accum=2" in overrides else 1}


@pytest.mark.parametrize("world,overrides", [
    (2, ["parallel.dp=2"]),
    pytest.param(2, ["parallel.dp=2", "parallel.dp_mode=ddp", "train.grad_accum=2"], marks=pytest.mark.slow),
    (2, ["parallel.tp=2"]),
    pytest.param(2, ["parallel.pp=2", "parallel.microbatches=2"], marks=pytest.mark.slow),
    (2, ["parallel.sp=2", "parallel.sp_method=ring", "train.grad_accum=2"]),
    pytest.param(2, ["parallel.sp=2", "parallel.sp_method=ulysses", "parallel.activation_checkpointing=true"],
                 marks=pytest.mark.slow),
], ids=["dp2-fsdp", "dp2-ddp-accum2", "tp2", "pp2", "sp2-ring-accum2", "sp2-ulysses-ac"])
def test_no_host_reads_except_on_log_steps(world, overrides):
    expected = _expected_step_reads(overrides)
    for rank, per_step in enumerate(run_distributed(steps_and_their_host_reads, world, overrides, 7, 3)):
        assert [s["step"] for s in per_step if s["logged"]] == [3, 6, 7]  # and the last step
        for s in per_step:
            reads = {where.rsplit(":", 1)[0]: n for where, n in s["step_reads"].items()}
            assert reads == expected, f"rank {rank} step {s['step']} read to the host: {s['step_reads']}"
            if not s["logged"]:
                assert s["log_reads"] == {}, f"rank {rank} step {s['step']} (not logged): {s['log_reads']}"
        logged = [s["log_reads"] for s in per_step if s["logged"]]
        assert all(reads and all("train/metrics.py" in where for where in reads) for reads in logged), logged


def test_the_counter_sees_a_host_read():
    """Guard: a read from meshweave code is counted (else the test above would pass vacuously)."""
    from meshweave.train.metrics import StepMetrics, format_progress  # noqa: F401 - a meshweave frame below

    counter = Counter()
    restore = _count_host_reads(counter)
    try:
        from meshweave.core.batch import Batch
        Batch.text(*(torch.zeros(1, 2, dtype=torch.long),) * 4).size  # no host read
        float_via_meshweave = __import__("meshweave.train.metrics", fromlist=["x"])
        float_via_meshweave.MetricsLogger._summarise  # attribute access only
        exec(compile("float(torch.ones(()))", f"{PACKAGE}/probe.py", "exec"), {"torch": torch})
    finally:
        restore()
    assert list(counter) == ["__float__ at probe.py:1"]
