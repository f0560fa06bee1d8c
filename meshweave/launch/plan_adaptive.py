"""`meshweave plan CONFIG --world-size N --adaptive`: what `sp: adaptive` would do with the first steps' batches.

Reads the data exactly as training would (the same documents and order), plans a few steps with the
configured strategy and with its peers (the best static group size, Megatron's greedy rule) under the same
cost model, and prints each plan's groups and predicted time. The cost model is the config's, or the one
measured on this machine by an earlier run (cached); without either, an uncalibrated estimate from the
model's FLOPs, labelled as such. Starts no process.
"""

from __future__ import annotations

import dataclasses

import torch

from meshweave.core.mesh import device_type_for
from meshweave.core.schema import Config
from meshweave.data.documents import TokenBudgetSampler, build_document_dataset
from meshweave.models.registry import model_spec
from meshweave.parallel.adaptive import CostModel, StepPlan
from meshweave.parallel.adaptive_calibrate import cache_path, cost_model, read_cache
from meshweave.parallel.adaptive_sp import PlannerSettings
from meshweave.train.build import compute_dtype

ESTIMATE_FLOPS = 1e11  # FLOP/s assumed per rank by the uncalibrated estimate (a CPU core's order of magnitude)
ESTIMATE_BANDWIDTH = 5e9  # bytes/s of the uncalibrated estimate's all-to-all


def planning_cost(cfg: Config, world: int) -> tuple[CostModel, str]:
    """The cost model a plan is shown under, and where it came from."""
    device_type = device_type_for(cfg.train.device)
    element_bytes = torch.finfo(compute_dtype(cfg, device_type)).bits // 8  # as the run would train
    device = torch.cuda.get_device_name(0) if device_type == "cuda" else "cpu"
    path = cache_path(cfg, world, device)
    c = cfg.parallel.adaptive.cost
    if c.alpha1 and c.alpha2 and c.beta and c.bandwidth_gbps:
        return cost_model(cfg, {}, element_bytes, world), "the config's parallel.adaptive.cost"
    cached = read_cache(path)
    if cached is not None:
        return cost_model(cfg, cached, element_bytes, world), f"measured on this machine (cached in {path})"
    return cost_model(cfg, _flops_estimate(cfg, world), element_bytes, world), (
        "UNCALIBRATED estimate from the model's FLOPs (a run measures the real one at start-up and caches it)")


def _flops_estimate(cfg: Config, world: int) -> dict[str, object]:
    m, spec = cfg.model, model_spec(cfg.model.kind)
    per_token = 3 * spec.flops_per_token(m, 1)  # forward + backward, without attention's length term
    attention = 3 * 4 * m.n_layers * m.dim  # per token per token of context (QK^T and PV, fwd + bwd)
    sizes = [1 << i for i in range(1, world.bit_length()) if (1 << i) <= world]
    return {"alpha1": attention / ESTIMATE_FLOPS, "alpha2": per_token / ESTIMATE_FLOPS, "beta": 1e-3,
            "bandwidth": {str(s): ESTIMATE_BANDWIDTH for s in sizes}}


def render_adaptive_plan(cfg: Config, world: int, samples: int = 3) -> str:
    d, t = cfg.data, cfg.train
    dataset = build_document_dataset(d.source, d.path, d.max_bytes, d.max_len, cfg.model.vocab_size, t.seed,
                                     d.synthetic_mean_len, d.synthetic_max_len)
    sampler = TokenBudgetSampler(dataset.lengths, d.tokens_per_step, t.seed)
    cost, source = planning_cost(cfg, world)
    settings = PlannerSettings.from_config(cfg, world)
    lines = [f"adaptive sequence parallelism on {world} ranks: strategy {settings.strategy}, groups of 1.."
             f"{settings.max_group} ranks, at most {settings.capacity_tokens} tokens per rank per micro-batch",
             f"cost model: {source}",
             f"  compute {cost.alpha1:.3g}·L² + {cost.alpha2:.3g}·L s per sequence / group size, "
             f"+ {cost.beta:.3g} s per group and micro-batch"]
    for step in range(samples):
        lengths = dataset.lengths[sampler.next_global_rows()].tolist()
        lines += _step_lines(step, lengths, settings, cost, world)
    return "\n".join(lines)


def _step_lines(step: int, lengths: list[int], settings: PlannerSettings, cost: CostModel, world: int) -> list[str]:
    plan = settings.plan(lengths, cost)
    lines = [f"step {step + 1}: {len(lengths)} sequences, {sum(lengths)} tokens, longest {max(lengths)}; "
             f"{plan.solver} in {plan.solve_s * 1e3:.1f} ms, predicted {plan.predicted_s * 1e3:.2f} ms "
             f"in {len(plan.microbatches)} micro-batch(es)"]
    for i, micro in enumerate(plan.microbatches):
        groups = ", ".join(f"ranks {g.start}-{g.start + g.size - 1}: {len(g.sequences)} seq / "
                           f"{sum(lengths[j] for j in g.sequences)} tok" for g in micro.groups)
        lines.append(f"  micro-batch {i + 1} ({micro.predicted_s * 1e3:.2f} ms): {groups}")
    lines.append("  peers: " + ", ".join(f"{name} {p.predicted_s * 1e3:.2f} ms" for name, p in
                                         _peer_plans(lengths, settings, cost, world)))
    return lines


def _peer_plans(lengths: list[int], settings: PlannerSettings, cost: CostModel, world: int) -> list[tuple[str, StepPlan]]:
    """The same batch under Megatron's greedy rule and the best static group size that fits."""
    peers = [("megatron greedy", dataclasses.replace(settings, strategy="megatron").plan(lengths, cost))]
    static = []
    for size in (1 << i for i in range(settings.max_group.bit_length())):
        try:
            static.append((f"static {size}", dataclasses.replace(settings, strategy=f"static-{size}").plan(lengths, cost)))
        except ValueError:
            continue  # this size cannot hold the longest sequence
    if static:
        peers.append(min(static, key=lambda item: item[1].predicted_s))
        peers[-1] = (f"best {peers[-1][0]}", peers[-1][1])
    return peers
