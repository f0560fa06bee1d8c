"""TokenRing under the zigzag causal layout sends only the query rows a peer needs (issue 14 item 6).

Closed form (derived by hand, independent of tokenring_comm.py), P ranks, S tokens per rank, h = S/2:
Q travels r -> r-1; rank r at step s holds Q_j, j = (r+s) mod P. A holder h < j needs all of Q_j
(against its first key chunk), a holder h > j only Q_j's second chunk. The route reaches the h < j
holders first, so once it wraps only h rows travel. Per rank r, in query rows:
    Q sent        : r = 0: (P-1) h;         r >= 1: (P-r) S + (r-1) h
    Q received    : (P-1-r) S + r h
    partial sent  : (P-1-r) S + r h           (rows of Q_{r+s} that rank r's keys see)
    partial recvd : r S + (P-1-r) h
versus (P-1) S everywhere before (the full Q every step): about 3/4 of the Q and partial traffic.
Bytes per row: Q B*H*D*e, (out|lse) B*H*(D+1)*a; backward (Q|dO) 2*B*H*D*e + (O|lse) per Q row,
dQ B*H*D*a per partial row. The ledger of a real run must equal this exactly, and the outputs and
gradients must equal the single-process fp64 reference (check_case of test_attention_sp).
"""

from __future__ import annotations

import pytest

from meshweave.attention.layout import shard_segments
from meshweave.attention.tokenring_comm import build_route, tokenring_bytes
from tests.attention_helpers import B, D, H, Case
from tests.test_attention_sp import _run, check_case


def closed_form_rows(p: int, s: int, r: int) -> dict[str, int]:
    h = s // 2
    q_sent = (p - 1) * h if r == 0 else (p - r) * s + (r - 1) * h
    return dict(q_sent=q_sent, q_recv=(p - 1 - r) * s + r * h, part_sent=(p - 1 - r) * s + r * h,
                part_recv=r * s + (p - 1 - r) * h)


def closed_form_bytes(p: int, s: int, r: int, e: int, a: int) -> tuple[dict, dict]:
    """{"send"|"recv": (calls, bytes)} for forward and backward on rank r (document-id gather excluded)."""
    rows = closed_form_rows(p, s, r)
    bh = B * H
    q, part, qdo, dq = bh * D * e, bh * (D + 1) * a, 2 * bh * D * e, bh * D * a
    fwd = {"send": (2 * (p - 1), rows["q_sent"] * q + rows["part_sent"] * part),
           "recv": (2 * (p - 1), rows["q_recv"] * q + rows["part_recv"] * part)}
    bwd = {"send": (3 * (p - 1), rows["q_sent"] * (qdo + part) + rows["part_sent"] * dq),
           "recv": (3 * (p - 1), rows["q_recv"] * (qdo + part) + rows["part_recv"] * dq)}
    return fwd, bwd


def _route(p: int, s: int, causal: bool):
    return build_route([shard_segments("tokenring", s * p, p, i) for i in range(p)], causal)


@pytest.mark.parametrize("p", [2, 3, 4, 5, 8])
def test_route_matches_closed_form(p):
    s = 8
    route = _route(p, s, causal=True)
    for r in range(p):
        fwd, bwd = closed_form_bytes(p, s, r, 8, 8)
        table = tokenring_bytes(route, r, B, H, D, 8, 8)
        assert table["forward"] == fwd, (p, r)
        assert table["backward"] == bwd, (p, r)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_causal_zigzag_moves_three_quarters_of_full_q(p):
    """Summed over ranks, Q rows sent fall from P(P-1) S to 3/4 of that; without a mask nothing changes."""
    s = 8
    sent = sum(closed_form_rows(p, s, r)["q_sent"] for r in range(p))
    assert sent * 4 == 3 * p * (p - 1) * s
    route = _route(p, s, causal=False)
    for r in range(p):
        table = tokenring_bytes(route, r, B, H, D, 8, 8)
        full_q = (p - 1) * s * B * H * D * 8
        full_part = (p - 1) * s * B * H * (D + 1) * 8
        assert table["forward"]["send"] == (2 * (p - 1), full_q + full_part)


def _ledger_bytes(snapshot: dict) -> dict:
    return {kind: (snapshot[f"sp/{kind}"]["calls"], snapshot[f"sp/{kind}"]["bytes"]) for kind in ("send", "recv")}


@pytest.mark.parametrize("p", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_run_sends_reduced_q_and_matches_reference(p):
    """A real run: outputs and gradients equal the fp64 reference, the ledger equals the closed form."""
    cases = [Case("tokenring", True, H, docs, "float64", tokens_per_rank=8) for docs in (False, True)]
    cases.append(Case("tokenring", True, 2, False, "bfloat16", tokens_per_rank=32))
    for case, shards in zip(cases, _run(cases, p)):
        check_case(case, p, shards)  # numerics, and the ledger against tokenring_comm's route
        e, a = case.torch_dtype.itemsize, 8 if case.dtype == "float64" else 4
        total = 0
        for shard in shards:
            fwd, bwd = closed_form_bytes(p, case.tokens_per_rank, shard["rank"], e, a)
            assert _ledger_bytes(shard["fwd"]) == fwd, (case, shard["rank"], shard["fwd"])
            assert _ledger_bytes(shard["bwd"]) == bwd, (case, shard["rank"], shard["bwd"])
            total += fwd["send"][1]
        full = p * (p - 1) * case.tokens_per_rank * B * H * (D * e + (D + 1) * a)  # the full Q every step
        assert total * 4 == full * 3
