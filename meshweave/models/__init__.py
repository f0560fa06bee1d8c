"""Model kinds. Each kind is a `ModelSpec` (models/spec.py) bundling its module, config, TP plan, FSDP
units, pipeline split, FLOPs, loss, batch fields and per-layer attention slots; the rest of meshweave
looks a kind up in `registry` and never names a model's attributes.

Models never import parallel/ or attention/: token mixing goes through `AttentionSlot`s whose op the
parallel layer replaces. This package's __init__ imports nothing, so config loading needs no torch.
"""
