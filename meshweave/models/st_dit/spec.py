"""The `st_dit` model spec: what each parallelism needs from the spatial-temporal diffusion transformer.

Torch-free at import; parts.py and model.py are imported when first called. Batch fields (no sequence dim
declared: under sp_method dsp the model shards its own activations at entry, see models/layout_api.py):
noisy latents (B, T, C, H, W), timesteps (B,), target velocity (B, T, C, H, W).
"""

from __future__ import annotations

from typing import Any

from meshweave.models.spec import LayerCosts, ModelSpec, ParallelLayout
from meshweave.models.st_dit.config import STDiTConfig, block_attends
from meshweave.models.st_dit.flops import block_params, embedding_params, final_params, flops_per_token, parameter_count


def _parts() -> Any:
    from meshweave.models.st_dit import parts

    return parts


def build(cfg: STDiTConfig) -> Any:
    from meshweave.models.st_dit.model import STDiT

    return STDiT(cfg)


def build_dataset(cfg: Any) -> Any:
    from meshweave.data.video import build_video_dataset

    return build_video_dataset(cfg)


def layer_costs(cfg: STDiTConfig, seq_len: int) -> LayerCosts:
    per_block = flops_per_token(cfg) / 3 / (2 * cfg.n_layers)
    return LayerCosts([per_block] * (2 * cfg.n_layers), float(2 * cfg.patch_width * cfg.dim),
                      float(2 * cfg.dim * cfg.patch_width))


def stage_parameters(cfg: STDiTConfig, layers: int, is_first: bool, is_last: bool) -> int:
    return layers * block_params(cfg) + is_first * embedding_params(cfg) + is_last * final_params(cfg)


def validate(cfg: STDiTConfig, layout: ParallelLayout) -> list[str]:
    """Shapes, then what the parallel layout needs of this model."""
    if cfg.height % cfg.patch or cfg.width % cfg.patch:
        return [f"model.patch: {cfg.patch} must divide model.height ({cfg.height}) and model.width ({cfg.width})"]
    if cfg.dim % cfg.n_heads:
        return [f"model.n_heads: dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}; pick n_heads dividing dim"]
    if cfg.n_heads % layout.tp:
        return [f"model.n_heads: {cfg.n_heads} heads do not split over parallel.tp {layout.tp} (each tensor-parallel "
                f"rank holds whole heads); pick tp dividing n_heads"]
    if cfg.mlp_hidden % layout.tp:
        return [f"model.mlp_ratio: the MLP's {cfg.mlp_hidden} hidden units do not split over parallel.tp {layout.tp}; "
                f"pick mlp_ratio * dim divisible by tp"]
    if layout.pp > 1:
        return ["parallel.pp: model kind st_dit has no pipeline split yet; use pp: 1"]
    if layout.sp > 1 and layout.sp_method not in ("dsp", "ulysses", "ring"):
        return [f"parallel.sp_method: {layout.sp_method} is not available for model kind st_dit (its attention is "
                f"factorised over frames and patches); use sp_method: dsp (or the baselines ulysses / ring)"]
    return []


SPEC = ModelSpec(
    kind="st_dit",
    build=build,
    input_field="noisy",
    kwarg_fields=("timesteps",),
    target_field="velocity",
    loss_sum=lambda *a: _parts().velocity_mse_sum(*a),
    count_targets=lambda *a: _parts().count_targets(*a),
    tp_plan=lambda *a: _parts().tensor_parallel_plan(*a),
    loss_parallel=False,
    fsdp_units=lambda *a: _parts().fsdp_units(*a),
    blocks=lambda *a: _parts().blocks(*a),
    num_layers=lambda cfg: 2 * cfg.n_layers,
    pipeline_stage=lambda *a: (_ for _ in ()).throw(NotImplementedError("st_dit has no pipeline split")),
    layer_costs=layer_costs,
    flops_per_token=flops_per_token,
    parameter_count=parameter_count,
    stage_parameters=stage_parameters,
    hidden_width=lambda cfg: cfg.dim,
    output_width=lambda cfg: cfg.patch_width,
    attention_slots=lambda cfg: ["spatial", "temporal"] * cfg.n_layers,
    slot_kinds=lambda cfg: frozenset({"spatial", "temporal"}),
    attention_heads=lambda cfg: (cfg.n_heads, cfg.n_heads),
    validate=validate,
    factorised_dims=block_attends,
    build_dataset=build_dataset,
    tokens_per_sample=lambda cfg: cfg.frames * cfg.tokens_per_frame,
)
