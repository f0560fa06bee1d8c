"""SWARM-style fault-tolerant pipelines: a coordinator, interchangeable peers per stage, random
throughput-weighted routes per microbatch, abort-and-redo of a failed step, joins and rebalancing.

Strict mode (the SWARM paper's wiring with exactly-once steps): a step commits only when every
microbatch passed every stage exactly once, so a run with failures ends with the weights of a run
without. See coordinator.py (control plane), peer.py (a stage peer), dataplane.py (transfers).
"""
