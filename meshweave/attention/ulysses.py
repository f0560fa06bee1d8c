"""DeepSpeed-Ulysses attention: all-to-all to head-sharded, full-sequence attention, all-to-all back.

Hand-written rather than wrapping DeepSpeed's `DistributedAttention` so that the all-to-alls go
through our accounted CommGroup, GQA with fewer kv heads than ranks works (kv heads replicated,
exact because autograd sums the replicas' gradients), and packed documents are masked.

Each rank sends its (B, S/P, H, D) shard and receives (B, S, H/P, D): it then sees the whole
sequence for H/P heads, so causal attention needs no load balancing (contiguous layout).

Communication per call: forward 4 all_to_all (q, k, v, out), backward 4 (dout, dq, dk, dv), each
with payload = the local tensor (q/out: B*S_local*H*D, k/v: B*S_local*max(H_kv, P)*D elements);
plus 1 all_gather of document ids when they are given.
"""

from __future__ import annotations

import torch

from meshweave.attention.usp import usp_attention
from meshweave.core.comm import CommGroup, single_process_group
from meshweave.models.attention_api import BatchCache


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: CommGroup,
    causal: bool,
    scale: float,
    document_ids: torch.Tensor | None = None,
    backend: str = "auto",
    cache: BatchCache | None = None,
) -> torch.Tensor:
    """q (B,S_local,H,D), k/v (B,S_local,H_kv,D) in the contiguous layout -> out (B,S_local,H,D).

    Ulysses is USP with a ring of one rank: after the all-to-all each rank holds whole sequences
    for its heads, and attends locally in one pass (attention/single_block.py: one kernel call, or
    one per packed document, written straight into the output; no ring accumulators or merges).
    """
    local = single_process_group(f"{group.name}/local", group.ledger)
    return usp_attention(q, k, v, group, local, causal, scale, document_ids, backend, cache)
