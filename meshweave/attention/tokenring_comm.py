"""TokenRing's route: which query rows travel to which peer at which step, and the bytes that costs.

Q travels r -> r-1, so at step t rank r holds the queries of owner j = (r + t) mod P, and the holder
of Q_j at step t is (j - t) mod P. Under the zigzag causal layout this order is what makes the reduced
send possible (the reference note's causal zigzag variant): Q_j first visits ranks j-1 .. 0, whose
keys all come before Q_j's first chunk (they need every query row, against the first half of their
keys), and then ranks P-1 .. j+1, whose first key chunk lies after Q_j's first chunk (they need only
Q_j's second chunk). Once the route has wrapped, the first chunk is never needed again, so from then
on only the second half of Q is sent. The other direction (r -> r+1) would carry the full Q almost
all the way, because the ranks that need it come last.

The rows are decided by position alone (segments + causal), never by document ids, so the buffer
sizes are known on every rank without communication and the volume is data-independent (a document
mask only hides more rows inside the window; their partials stay empty and are not merged).

    need(j, h)  : hull of the query rows of Q_j that see any key of rank h, or None.
    carry(j, t) : the rows of Q_j held at step t = hull of need(j, holder(j, u)) for u >= t (t >= 1);
                  carry(j, 0) is all rows. It only shrinks, so a holder slices what it forwards out
                  of what it holds.
Pure arithmetic: no communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshweave.attention.masks import Segment, plan_block

Rows = slice | None  # a contiguous range of local query rows; None = nothing


def holder(owner: int, step: int, size: int) -> int:
    """The rank that holds the queries of `owner` at `step` (Q travels r -> r-1)."""
    return (owner - step) % size


def owner(rank: int, step: int, size: int) -> int:
    """Whose queries `rank` holds at `step`."""
    return (rank + step) % size


def _hull(rows: Sequence[Rows]) -> Rows:
    real = [r for r in rows if r is not None]
    if not real:
        return None
    return slice(min(r.start for r in real), max(r.stop for r in real))


@dataclass(frozen=True)
class Route:
    """need[j][h] and carry[j][t] for every owner j, key holder h and step t of a group of `size`."""

    size: int
    need: tuple[tuple[Rows, ...], ...]
    carry: tuple[tuple[Rows, ...], ...]

    def rows_sent_q(self, rank: int, step: int) -> Rows:
        """Rows of the held Q that `rank` forwards to rank-1 at `step` (absolute local rows of the owner)."""
        return self.carry[owner(rank, step, self.size)][step + 1]

    def rows_received_q(self, rank: int, step: int) -> Rows:
        """Rows of Q that `rank` receives from rank+1 at `step` (it holds them at step+1)."""
        return self.carry[owner(rank, step + 1, self.size)][step + 1]

    def rows_partial_sent(self, rank: int, step: int) -> Rows:
        """Rows of the partial (out|lse or dQ) that `rank` computed at `step` for its owner."""
        return self.need[owner(rank, step, self.size)][rank]

    def rows_partial_received(self, rank: int, step: int) -> Rows:
        """Rows of this rank's own queries whose partial the holder of `step` sends back."""
        return self.need[rank][holder(rank, step, self.size)]


def build_route(segments: Sequence[Sequence[Segment]], causal: bool) -> Route:
    """The route of a group whose rank i holds `segments[i]` (positions only; see the module docstring)."""
    p = len(segments)
    need = []
    for j in range(p):
        row = []
        for h in range(p):
            calls = plan_block(segments[j], segments[h], causal)
            row.append(_hull([c.q_rows for c in calls]))
        need.append(tuple(row))
    carry = []
    for j in range(p):
        n_rows = sum(s.length for s in segments[j])
        held = [slice(0, n_rows)]
        for t in range(1, p):
            held.append(_hull([need[j][holder(j, u, p)] for u in range(t, p)]))
        carry.append(tuple(held))
    return Route(p, tuple(need), tuple(carry))


def length(rows: Rows) -> int:
    return 0 if rows is None else rows.stop - rows.start


def relative(rows: slice, within: slice) -> slice:
    """`rows` (absolute) as a slice of a buffer that holds `within`."""
    return slice(rows.start - within.start, rows.stop - within.start)


def tokenring_bytes(route: Route, rank: int, batch: int, heads: int, head_dim: int, elem: int, acc: int) -> dict:
    """Analytic traffic of one TokenRing call on `rank`: {"forward"|"backward": {"send"|"recv": (calls, bytes)}}.

    Per row: Q is heads*head_dim*elem bytes, (out|lse) heads*(head_dim+1)*acc, (Q|dO) 2*heads*head_dim*elem,
    dQ heads*head_dim*acc. Excludes the one all_gather of document ids (forward, when ids are given).
    """
    p, bh = route.size, batch * heads
    q_row, part_row, qdo_row, dq_row = bh * head_dim * elem, bh * (head_dim + 1) * acc, 2 * bh * head_dim * elem, bh * head_dim * acc
    out: dict = {"forward": {}, "backward": {}}
    for kind in ("send", "recv"):
        q_rows = [route.rows_sent_q(rank, s) if kind == "send" else route.rows_received_q(rank, s) for s in range(p - 1)]
        partial_rows = [
            route.rows_partial_sent(rank, s) if kind == "send" else route.rows_partial_received(rank, s) for s in range(1, p)
        ]
        q_rows = [r for r in q_rows if r is not None]
        partial_rows = [r for r in partial_rows if r is not None]
        nq, npart = sum(map(length, q_rows)), sum(map(length, partial_rows))
        out["forward"][kind] = (len(q_rows) + len(partial_rows), nq * q_row + npart * part_row)
        out["backward"][kind] = (2 * len(q_rows) + len(partial_rows), nq * (qdo_row + part_row) + npart * dq_row)
    return out
