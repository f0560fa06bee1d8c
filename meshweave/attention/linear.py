"""Reference linear attention: the two oracles the fast kernels are tested against (and benchmarks check).

- `linear_attention_reference`: the O(N^2) masked form. Weights lambda^|i-j| (q_i . k_j) over the pairs a
  mask allows: j <= i for causal, and equal document ids (the documents as masks, like softmax attention).
- `linear_attention_recurrent`: the step-by-step recurrence S_t = lambda S_{t-1} + k_t v_t^T, out_t = q_t S_t,
  with S reset to zero wherever the document id changes (the documents as state resets); bidirectional adds a
  right-to-left pass over j > i.

The two define documents differently (same id vs. unbroken run), which agree on packed data, so a test that
passes against both checks the kernels against two independent readings of the specification. Both use plain
autograd; the fast kernels (meshweave.models.linear_attention, the default op of "linear" slots, and the
sequence-parallel LASP-2 of meshweave.attention.lasp2) have hand-written backwards. Shapes as for every
attention op: q (B, S, H, Dk), k (B, S, H_kv, Dk), v (B, S, H_kv, Dv), log_decay (H,) or None; returns
(B, S, H, Dv). Computed in the inputs' dtype; O(N^2) memory, O(N) Python steps: for tests only.
"""

from __future__ import annotations

import torch


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    groups = q.shape[2] // k.shape[2]
    return k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)


def _decay_per_head(log_decay: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """lambda per head as (1, H, 1) in like's dtype (ones without decay)."""
    if log_decay is None:
        return torch.ones(1, like.shape[2], 1, dtype=like.dtype, device=like.device)
    return log_decay.to(like).exp()[None, :, None]


def linear_attention_reference(q, k, v, log_decay=None, document_ids=None, causal=True) -> torch.Tensor:
    """O(N^2): out_i = sum_j lambda^|i-j| (q_i . k_j) v_j over j <= i (causal) with equal document ids."""
    k, v = _repeat_kv(q, k, v)
    n = q.shape[1]
    pos = torch.arange(n, device=q.device)
    gap = (pos[:, None] - pos[None, :]).abs().to(q.dtype)
    weights = torch.ones(1, q.shape[2], n, n, dtype=q.dtype, device=q.device)
    if log_decay is not None:
        weights = torch.exp(log_decay.to(q)[None, :, None, None] * gap)
    if causal:
        weights = weights * (pos[None, :] <= pos[:, None]).to(q.dtype)
    if document_ids is not None:
        weights = weights * (document_ids[:, :, None] == document_ids[:, None, :]).to(q.dtype)[:, None]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * weights
    return torch.einsum("bhij,bjhd->bihd", scores, v)


def linear_attention_recurrent(q, k, v, log_decay=None, document_ids=None, causal=True) -> torch.Tensor:
    """The recurrence, one token at a time, resetting the state where the document id changes."""
    k, v = _repeat_kv(q, k, v)
    b, n, h, _ = q.shape
    lam = _decay_per_head(log_decay, q)[..., None]  # (1, H, 1, 1)
    ids = document_ids if document_ids is not None else torch.zeros(b, n, dtype=torch.long, device=q.device)
    same_as_prev = torch.cat([torch.zeros_like(ids[:, :1]), (ids[:, 1:] == ids[:, :-1]).long()], 1).to(q.dtype)
    same_as_next = torch.cat([(ids[:, :-1] == ids[:, 1:]).long(), torch.zeros_like(ids[:, :1])], 1).to(q.dtype)
    outer = torch.einsum("bthk,bthv->bthkv", k, v)
    state = torch.zeros(b, h, k.shape[-1], v.shape[-1], dtype=q.dtype, device=q.device)
    outs = []
    for t in range(n):  # S_t = lambda S_{t-1} + k_t v_t^T (S_{t-1} dropped at a document start)
        state = lam * state * same_as_prev[:, t, None, None, None] + outer[:, t]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    out = torch.stack(outs, dim=1)
    if causal:
        return out
    upper, back = torch.zeros_like(state), [None] * n
    for t in reversed(range(n)):  # R_t = lambda (k_{t+1} v_{t+1}^T + R_{t+1}), within the document
        carried = lam * upper * same_as_next[:, t, None, None, None]
        back[t] = torch.einsum("bhk,bhkv->bhv", q[:, t], carried)
        upper = carried + outer[:, t]
    return out + torch.stack(back, dim=1)
