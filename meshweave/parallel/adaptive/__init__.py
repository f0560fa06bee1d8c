"""Heterogeneity-adaptive sequence parallelism (FlexSP): the per-step planner, without torch.

`plan_step` turns one step's sequence lengths into micro-batches of aligned power-of-two SP groups that
cover every rank; the runtime (parallel/adaptive_sp.py) executes the plan. Modules: cost (the cost model),
groups (buddy blocks), buckets (length bucketing), blaster (micro-batching), greedy (peers and fallback),
milp (FlexSP's MILP on scipy's HiGHS), plan (the plan and its wire format), planner (the entry point).
"""

from meshweave.parallel.adaptive.cost import CostModel, capacity_tokens, flexsp_gpt7b_capacity, min_group_size
from meshweave.parallel.adaptive.groups import buddy_layout, candidate_sizes
from meshweave.parallel.adaptive.plan import GroupAssignment, MicroBatchPlan, StepPlan, validate_plan
from meshweave.parallel.adaptive.planner import AdaptivePlanWarning, plan_step

__all__ = ["AdaptivePlanWarning", "CostModel", "GroupAssignment", "MicroBatchPlan", "StepPlan", "buddy_layout",
           "candidate_sizes", "capacity_tokens", "flexsp_gpt7b_capacity", "min_group_size", "plan_step",
           "validate_plan"]
