"""LASP-1's chain, the peer LASP-2 is measured against: the same math, the states passed rank to rank.

Forward: rank r waits for S_{r-1} from rank r-1, keeps E_r = cont_r S_{r-1} for its outputs and sends
S_r = a_r S_{r-1} + M_r to rank r+1: P-1 sequential hops (rank P-1 waits for all of them). Backward: the mirror
image, dS_{r-1} = cont_r dE_r + a_r dS_r travels from rank P-1 down to rank 0. Each hop carries one
B x H x Dk x Dv fp32 state, so a rank sends and receives what LASP-2's all-gather moves per peer, but the hops
cannot overlap each other; the local (intra-segment) work runs before the chain, as in LASP-1.

Contiguous layout and causal attention only (LASP-1's setting): with zigzag every rank holds two segments and
the chain would visit ranks 0..P-1..0. Per-document resets use the same boundary facts as LASP-2.
"""

from __future__ import annotations

import torch

from meshweave.attention.lasp2 import Chain, LinearSequenceParallel
from meshweave.core.comm import CommGroup
from meshweave.models.linear_attention import DEFAULT_CHUNK


class ChainStates:
    """`StateExchange` of LASP-1: one state per hop, forward from rank 0 to P-1, backward from P-1 to 0.

    Communicates per layer: forward one send (ranks < P-1) and one recv (ranks > 0) of a (B, H, Dk, Dv) state;
    backward the same, in the opposite direction.
    """

    def __init__(self, group: CommGroup) -> None:
        self.group = group

    def _coefficients(self, chains: list[Chain]) -> tuple[torch.Tensor, torch.Tensor]:
        size, rank = self.group.size, self.group.rank
        if len(chains) != 1 or chains[0].order != [(r, 0) for r in range(size)]:
            raise ValueError("the LASP-1 chain runs causal attention on the contiguous layout only (one segment per "
                             "rank, in rank order)")
        chain = chains[0]
        return chain.a[..., rank, None, None], chain.cont[..., rank, None, None]

    def start(self, states: torch.Tensor) -> torch.Tensor:
        return states  # nothing can start: the chain needs the previous rank's state first

    def incoming(self, states: torch.Tensor, chains: list[Chain]) -> torch.Tensor:
        a, cont = self._coefficients(chains)
        own = states[0, 0]
        prev = torch.zeros_like(own)
        if self.group.rank > 0:
            self.group.recv(prev, self.group.rank - 1)
        if self.group.rank < self.group.size - 1:
            self.group.send((a * prev + own).contiguous(), self.group.rank + 1)
        return (cont * prev)[None, None]

    def start_backward(self, grads: torch.Tensor) -> torch.Tensor:
        return grads

    def state_grads(self, grads: torch.Tensor, chains: list[Chain]) -> torch.Tensor:
        a, cont = self._coefficients(chains)
        grad_incoming = grads[0, 0]
        grad_state = torch.zeros_like(grad_incoming)
        if self.group.rank < self.group.size - 1:
            self.group.recv(grad_state, self.group.rank + 1)
        if self.group.rank > 0:
            self.group.send((cont * grad_incoming + a * grad_state).contiguous(), self.group.rank - 1)
        return grad_state[None, None]


def lasp1_op(group: CommGroup, chunk: int = DEFAULT_CHUNK) -> LinearSequenceParallel:
    """The LASP-1 chain as a "linear" op over `group` (batch sharded contiguously, causal)."""
    return LinearSequenceParallel(group, "ulysses", chunk=chunk, exchange=ChainStates(group))
