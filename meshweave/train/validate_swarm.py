"""Checks of a `fault_tolerance.mode: swarm` config, before any process starts (one line each)."""

from __future__ import annotations

from meshweave.core.schema import Config
from meshweave.models.registry import model_spec
from meshweave.train.config import ConfigError


def swarm_problems(cfg: Config) -> list[str]:
    ft, t, p = cfg.fault_tolerance, cfg.train, cfg.parallel
    problems = []
    if ft.mode != "swarm":
        problems.append("fault_tolerance.mode: set it to swarm for `meshweave swarm`")
    layers = model_spec(cfg.model.kind).num_layers(cfg.model)
    if layers % ft.stages:
        problems.append(f"fault_tolerance.stages: {ft.stages} does not divide the model's {layers} layers")
    if len(ft.peers) != ft.stages or min(ft.peers, default=0) < 1:
        problems.append(f"fault_tolerance.peers: {ft.peers} must list >= 1 peer for each of the {ft.stages} stages")
    microbatches = ft.microbatches or t.global_batch
    if t.global_batch % microbatches:
        problems.append(f"fault_tolerance.microbatches: {microbatches} does not divide train.global_batch {t.global_batch}")
    if any(d not in (1, -1) for d in (p.dp, p.tp, p.pp)) or p.sp not in (1, "1"):
        problems.append("parallel: swarm runs its own pipeline of whole stages; leave dp, tp, pp and sp at 1")
    if not ft.heartbeat_s < ft.dead_after_s < ft.transfer_timeout_s:
        problems.append("fault_tolerance: need heartbeat_s < dead_after_s < transfer_timeout_s "
                        f"(got {ft.heartbeat_s:g}, {ft.dead_after_s:g}, {ft.transfer_timeout_s:g})")
    if cfg.checkpoint.enabled:
        problems.append("checkpoint.dir: swarm runs survive peer loss without checkpoints; unset it "
                        "(stage checkpoints of swarm runs are not supported yet)")
    if not cfg.data.packing or cfg.model.kind not in ("llama", "linear_llama"):
        problems.append("swarm: supports packed text models (llama, linear_llama) for now")
    return problems


def check_swarm(cfg: Config) -> None:
    problems = swarm_problems(cfg)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "; ".join(problems))
