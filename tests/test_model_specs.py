"""The model-spec seam: a second model kind, whose layers take two op kinds, trains under dp, tp, pp
and sp exactly like one process, through the same trainer and config as Llama.

Tolerances as in test_tp_pp.py (fp32): losses and gradients 2e-5 relative / 1e-7 absolute, parameters
1e-5 absolute. A slot given the wrong op kind under SP (e.g. softmax instead of mean_mix) or an SP
mixer without the backward all-reduce changes losses at the 1e-2 level (checked by hand).
"""

from __future__ import annotations

import pytest

from meshweave.models.registry import model_spec
from meshweave.testing import run_distributed
from meshweave.testing_equivalence import train_and_collect
from meshweave.train.config import load_config
from tests import toy_models
from tests.test_tp_pp import assert_matches_reference

KIND = ["model.kind=alternating"]


def train_alternating(overrides: list[str], steps: int = 3):
    import tests.toy_models  # noqa: F401 - registers the kind in the worker process

    return train_and_collect(KIND + overrides, steps)


@pytest.fixture(scope="module")
def reference():
    return run_distributed(train_alternating, 1, [])[0]


def test_the_kind_is_resolved_from_the_config_and_its_layers_alternate():
    cfg = load_config(None, KIND + ["model.n_layers=4"])
    assert type(cfg.model) is toy_models.AlternatingConfig
    spec = model_spec("alternating")
    assert spec.attention_slots(cfg.model) == ["softmax", "mean_mix", "softmax", "mean_mix"]
    assert toy_models.slot_kinds(spec.build(cfg.model)) == spec.attention_slots(cfg.model)


@pytest.mark.slow  # a second one-process training run
def test_the_two_kinds_compute_different_things(reference):
    llama = run_distributed(train_and_collect, 1, [])[0]
    assert abs(llama["losses"][-1] - reference["losses"][-1]) > 1e-4


@pytest.mark.parametrize("overrides", [
    ["parallel.dp=2"],
    pytest.param(["parallel.tp=2"], marks=pytest.mark.slow),
    pytest.param(["parallel.pp=2", "parallel.microbatches=2"], marks=pytest.mark.slow),
    ["parallel.sp=2", "parallel.sp_method=ring"],
    pytest.param(["parallel.sp=2", "parallel.sp_method=ulysses"], marks=pytest.mark.slow),
], ids=["dp2", "tp2", "pp2", "sp2-ring", "sp2-ulysses"])
def test_two_op_kind_model_matches_one_process(overrides, reference):
    assert_matches_reference(run_distributed(train_alternating, 2, overrides), reference)
