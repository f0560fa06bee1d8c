"""Point-to-point and gather traffic of the ring-style methods (ring, tokenring, usp's ring).

Everything goes through a `CommGroup`, so each call is counted in its ledger, and a group of size
one never communicates. Peers are group-local ranks.

Ordering: several messages between the same pair of ranks may be in flight at once (e.g. K/V for
the next step and dK/dV for the previous one). Both gloo and NCCL deliver messages between a pair
in posting order, and every rank posts its sends and receives in the same order, so they match.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshweave.core.comm import P2P, CommGroup


def next_rank(group: CommGroup, hops: int = 1) -> int:
    return (group.rank + hops) % group.size


def prev_rank(group: CommGroup, hops: int = 1) -> int:
    return (group.rank - hops) % group.size


def start_exchange(
    group: CommGroup,
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[tuple[torch.Tensor, int]],
):
    """Post sends (tensor, peer) and receives (buffer, peer) as one batch; call .wait() on the result.

    Communicates: one send per entry of `sends` and one receive per entry of `recvs`.
    """
    ops = [P2P("send", t.contiguous(), peer) for t, peer in sends]
    ops += [P2P("recv", buf, peer) for buf, peer in recvs]
    return group.batch_isend_irecv(ops)


def gather_shards(x: torch.Tensor, group: CommGroup) -> list[torch.Tensor]:
    """Every rank's x (equal shapes), listed by group rank. Communicates: one all_gather of x."""
    if group.size == 1:
        return [x]
    return list(group.all_gather(x.contiguous(), dim=0).chunk(group.size, dim=0))
