"""Single-process causal (and bidirectional) linear attention: the default op of "linear" slots.

What it computes, per head, with feature-mapped q, k (the layer applies the feature map) and an optional
per-head decay lambda = exp(log_decay) in (0, 1]:

    out_i = sum over j <= i in i's document of lambda^(i-j) (q_i . k_j) v_j      (causal)
    out_i = sum over j in i's document of lambda^|i-j| (q_i . k_j) v_j           (bidirectional)

There is no denominator (Lightning Attention / TNL / RetNet style: the layer normalises the output), so
every feature map works with and without decay. A *document* is a maximal run of equal document ids: the
recurrent state resets wherever the id changes (packed sequences give runs with increasing ids).

How: the chunked form. The sequence is cut into blocks of `chunk` tokens; inside a block the quadratic
term (Q K^T * D) V uses a token-causal mask D (decay lambda^(a-c), c <= a, same run), and each block adds
Q * qd @ E_b, where E_b is the state carried in from the earlier blocks: the linear recurrence
S_b = a_b S_{b-1} + M_b over block memory states M_b = (K * kd)^T V, one small step per block. All
state arithmetic runs in fp32 (fp64 for fp64 inputs). The backward is written by hand (the formulas of
LASP-2's backward, generalised to decay and document runs) and recomputes the block terms instead of
keeping them, so a call keeps only q, k, v.

The same pieces (`chunked_forward/backward`, `edge_weights`, `incoming_states`, `segment_state`...) build
the sequence-parallel LASP-2 op in meshweave.attention.lasp2, where each rank's run of tokens is one
segment of this recurrence. This file lives in models/ (not attention/) because models may not import
attention/ and a "linear" slot needs a working op when there is no sequence parallelism, as
`attention_api.local_attention` is for "softmax" slots. Pure computation: no communication.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from meshweave.models.attention_api import AttentionMeta, AttentionSlot

DEFAULT_CHUNK = 64

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1.0,  # Katharopoulos et al.: positive features
    "relu": F.relu,
    "silu": F.silu,  # Lightning Attention / TransNormerLLM
}


def apply_feature_map(name: str, x: torch.Tensor) -> torch.Tensor:
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](x)


def head_log_decay(kind: str, n_heads: int) -> torch.Tensor | None:
    """log(lambda) per head (fp64, all < 0), or None for kind "none".

    alibi: lambda_h = exp(-2^(-8(h+1)/H)) (the ALiBi slopes Lightning Attention / TNL use as decay rates);
    retnet: lambda_h = 1 - 2^(-5-h) (RetNet's per-head gammas; with many heads they approach 1).
    """
    if kind == "none":
        return None
    h = torch.arange(n_heads, dtype=torch.float64)
    if kind == "alibi":
        return -torch.exp2(-8.0 * (h + 1) / n_heads)
    if kind == "retnet":
        return torch.log1p(-torch.exp2(-5.0 - h))
    raise ValueError(f"unknown decay {kind!r}; choose none, alibi or retnet")


def document_runs(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) index of each token's run of equal ids, counted from 0 inside this tensor."""
    changes = (document_ids[:, 1:] != document_ids[:, :-1]).long()
    return torch.cat([torch.zeros_like(document_ids[:, :1], dtype=torch.long), changes.cumsum(1)], dim=1)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and the kernel run in: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# --- coefficients ---------------------------------------------------------------------------------------


def _powers(log_decay: torch.Tensor | None, exponents: torch.Tensor) -> torch.Tensor | None:
    """lambda_h ** exponents, shape (1, H, *exponents.shape); None without decay."""
    if log_decay is None:
        return None
    return torch.exp(log_decay.reshape(1, -1, *([1] * exponents.dim())) * exponents)


def edge_weights(runs: torch.Tensor | None, log_decay: torch.Tensor | None, length: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights of the tokens of blocks of `length` tokens at their edges, each shaped (B|1, H|1, n|1, length|1):

    qd: how token a reads the state carried into its block: lambda^(a+1), if a is in the block's first run;
    kd: how token c enters the block's end state: lambda^(length-1-c), if c is in the block's last run;
    alpha: how the carried-in state reaches the block's end: lambda^length, if the block is one run.
    runs: (B, n, length) run ids, or None (one document).
    """
    pos = torch.arange(length, device=device, dtype=dtype)
    qd = _powers(log_decay, pos + 1)
    kd = _powers(log_decay, length - 1 - pos)
    alpha = _powers(log_decay, torch.full((1,), float(length), device=device, dtype=dtype))
    qd = torch.ones(1, 1, 1, 1, dtype=dtype, device=device) if qd is None else qd[:, :, None]  # (1, H, 1, L)
    kd = torch.ones(1, 1, 1, 1, dtype=dtype, device=device) if kd is None else kd[:, :, None]
    alpha = torch.ones(1, 1, 1, dtype=dtype, device=device) if alpha is None else alpha  # (1, H, 1)
    if runs is not None:
        first, last = runs[..., :1], runs[..., -1:]
        qd = qd * (runs == first).to(dtype)[:, None]
        kd = kd * (runs == last).to(dtype)[:, None]
        alpha = alpha * (first == last).to(dtype)[:, None, :, 0]
    return qd, kd, alpha


def intra_mask(runs: torch.Tensor | None, log_decay: torch.Tensor | None, chunk: int, strict: bool, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """D[a, c] of a block: lambda^(a-c) where c <= a (c < a if strict) in the same run, else 0.
    Shape (B|1, H|1, n|1, chunk, chunk)."""
    pos = torch.arange(chunk, device=device)
    gap = pos[:, None] - pos[None, :]
    visible = gap > 0 if strict else gap >= 0
    mask = visible.to(dtype)[None, None, None]
    decay = _powers(log_decay, gap.clamp(min=0).to(dtype))
    if decay is not None:
        mask = mask * decay[:, :, None]
    if runs is not None:
        mask = mask * (runs[..., :, None] == runs[..., None, :]).to(dtype)[:, None]
    return mask


def carries(runs: torch.Tensor | None, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """cont_b: whether block b's first token continues the run that ended block b-1; (B|1, 1, n), cont_0 = 0."""
    if runs is None:
        cont = torch.ones(1, 1, n, dtype=dtype, device=device)
    else:
        same = (runs[:, 1:, 0] == runs[:, :-1, -1]).to(dtype)
        cont = torch.cat([torch.ones_like(runs[:, :1, 0], dtype=dtype), same], dim=1)[:, None]
    cont = cont.clone()
    cont[..., 0] = 0
    return cont


# --- the recurrence over blocks (or over segments of ranks) ----------------------------------------------


def linear_scan(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """S_b = a_b S_{b-1} + x_b with S_{-1} = 0, along dim -3 of x (..., n, Dk, Dv); a (..., n).

    A plain loop over b: each step touches one (..., Dk, Dv) state, so the work is n states, where a
    log-depth (Hillis-Steele) scan moves all n states log2(n) times (~8x slower at 64 blocks in a CPU profile).
    """
    a = a[..., None, None].expand(*x.shape[:-2], 1, 1)
    out = torch.empty_like(x)
    state = out[..., 0, :, :] = x[..., 0, :, :]
    for b in range(1, x.shape[-3]):
        state = out[..., b, :, :] = torch.addcmul(x[..., b, :, :], a[..., b, :, :], state)
    return out


def incoming_states(a: torch.Tensor, cont: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """E_b = cont_b S_{b-1}, the state carried into each block, for S_b = a_b S_{b-1} + M_b.

    states M: (..., n, Dk, Dv); a = alpha * cont: (..., n); cont: (..., n) with cont_0 = 0.
    """
    s = linear_scan(a, states)
    shifted = torch.cat([torch.zeros_like(s[..., :1, :, :]), s[..., :-1, :, :]], dim=-3)
    return shifted * cont[..., None, None]


def incoming_states_backward(a: torch.Tensor, cont: torch.Tensor, grad_incoming: torch.Tensor) -> torch.Tensor:
    """d(loss)/dM_b from d(loss)/dE_b, the transpose of `incoming_states` (a suffix scan):
    R_b = a_{b+1} R_{b+1} + cont_{b+1} dE_{b+1}, R_last = 0."""
    y = grad_incoming * cont[..., None, None]
    y = torch.cat([y[..., 1:, :, :], torch.zeros_like(y[..., :1, :, :])], dim=-3)
    a_next = torch.cat([a[..., 1:], torch.zeros_like(a[..., :1])], dim=-1)
    # reversed (i = n-1-b): R'_i = a_next[n-1-i] R'_{i-1} + y'_i, a forward scan
    return linear_scan(a_next.flip(-1), y.flip(-3)).flip(-3)


# --- the chunked kernel (one segment, one direction) -----------------------------------------------------


def _blocks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, n, chunk, D), zero-padded at the end."""
    pad = -x.shape[2] % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.unflatten(2, (-1, chunk))


def _block_runs(runs: torch.Tensor | None, chunk: int) -> torch.Tensor | None:
    """(B, S) -> (B, n, chunk), padded with the last run (padded tokens have zero q, k, v)."""
    if runs is None:
        return None
    pad = -runs.shape[1] % chunk
    if pad:
        runs = torch.cat([runs, runs[:, -1:].expand(-1, pad)], dim=1)
    return runs.unflatten(1, (-1, chunk))


class _Terms:
    """What the forward and backward of one chunked call share (rebuilt in backward, never stored)."""

    def __init__(self, q, k, v, log_decay, runs, chunk, strict):
        dt, dev = q.dtype, q.device
        self.seq, self.chunk = q.shape[2], min(chunk, max(1, q.shape[2]))
        self.q, self.k, self.v = (_blocks(t, self.chunk) for t in (q, k, v))
        r = _block_runs(runs, self.chunk)
        n = self.q.shape[2]
        self.mask = intra_mask(r, log_decay, self.chunk, strict, dt, dev)
        self.qd, self.kd, alpha = edge_weights(r, log_decay, self.chunk, dt, dev)
        self.cont = carries(r, n, dt, dev)
        self.a = alpha * self.cont
        self.states = (self.k * self.kd[..., None]).transpose(-1, -2) @ self.v  # M_b: (B, H, n, Dk, Dv)
        self.incoming = incoming_states(self.a, self.cont, self.states)

    def unblock(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2, 3)[:, :, : self.seq]


def chunked_forward(q, k, v, log_decay=None, runs=None, chunk=DEFAULT_CHUNK, strict=False) -> torch.Tensor:
    """Causal linear attention of one run of tokens with no state carried in. q, k: (B, H, S, Dk); v: (B, H, S, Dv);
    runs: (B, S) run ids or None; strict: exclude the diagonal (j < i). Returns (B, H, S, Dv)."""
    t = _Terms(q, k, v, log_decay, runs, chunk, strict)
    scores = (t.q @ t.k.transpose(-1, -2)) * t.mask
    out = scores @ t.v + (t.q * t.qd[..., None]) @ t.incoming
    return t.unblock(out)


def chunked_backward(q, k, v, grad_out, log_decay=None, runs=None, chunk=DEFAULT_CHUNK, strict=False):
    """(dq, dk, dv) of `chunked_forward` for the output gradient grad_out (B, H, S, Dv)."""
    t = _Terms(q, k, v, log_decay, runs, chunk, strict)
    do = _blocks(grad_out, t.chunk)
    scores = (t.q @ t.k.transpose(-1, -2)) * t.mask
    dv = scores.transpose(-1, -2) @ do
    dscores = (do @ t.v.transpose(-1, -2)) * t.mask
    dq = dscores @ t.k + (do @ t.incoming.transpose(-1, -2)) * t.qd[..., None]
    dk = dscores.transpose(-1, -2) @ t.q
    dstates = incoming_states_backward(t.a, t.cont, (t.q * t.qd[..., None]).transpose(-1, -2) @ do)
    dk = dk + (t.v @ dstates.transpose(-1, -2)) * t.kd[..., None]
    dv = dv + (t.k * t.kd[..., None]) @ dstates
    return t.unblock(dq), t.unblock(dk), t.unblock(dv)


# --- a whole run of tokens as one segment of a longer recurrence (what LASP-2 exchanges) ------------------


def segment_weights(runs: torch.Tensor | None, log_decay: torch.Tensor | None, length: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`edge_weights` of a whole segment: qd, kd (B|1, H|1, length|1) and alpha (B|1, H|1)."""
    qd, kd, alpha = edge_weights(None if runs is None else runs[:, None], log_decay, length, dtype, device)
    return qd[:, :, 0], kd[:, :, 0], alpha[:, :, 0]


def segment_state(k: torch.Tensor, v: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
    """The segment's own contribution to the state at its end: (K * kd)^T V, (B, H, Dk, Dv)."""
    return (k * kd[..., None]).transpose(-1, -2) @ v


def segment_state_backward(k, v, kd, grad_state):
    """(dk, dv) of `segment_state`."""
    return (v @ grad_state.transpose(-1, -2)) * kd[..., None], (k * kd[..., None]) @ grad_state


def carried_output(q: torch.Tensor, qd: torch.Tensor, incoming: torch.Tensor) -> torch.Tensor:
    """What the state carried into a segment adds to its outputs: (Q * qd) E, (B, H, S, Dv)."""
    return (q * qd[..., None]) @ incoming


def carried_output_backward(q, qd, incoming, grad_out):
    """(dq, d incoming) of `carried_output`."""
    return (grad_out @ incoming.transpose(-1, -2)) * qd[..., None], (q * qd[..., None]).transpose(-1, -2) @ grad_out


# --- both directions, as one autograd function ------------------------------------------------------------


def _flip(x: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    return None if x is None else x.flip(dim)


def local_forward(q, k, v, log_decay, runs, causal: bool, chunk: int) -> torch.Tensor:
    """Causal, or bidirectional = causal + the strictly anti-causal part (the causal kernel on the reversed run)."""
    out = chunked_forward(q, k, v, log_decay, runs, chunk)
    if not causal:
        back = chunked_forward(q.flip(2), k.flip(2), v.flip(2), log_decay, _flip(runs, 1), chunk, strict=True)
        out = out + back.flip(2)
    return out


def local_backward(q, k, v, grad_out, log_decay, runs, causal: bool, chunk: int):
    dq, dk, dv = chunked_backward(q, k, v, grad_out, log_decay, runs, chunk)
    if not causal:
        grads = chunked_backward(q.flip(2), k.flip(2), v.flip(2), grad_out.flip(2), log_decay, _flip(runs, 1), chunk,
                                 strict=True)
        dq, dk, dv = (a + b.flip(2) for a, b in zip((dq, dk, dv), grads))
    return dq, dk, dv


class _LocalLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, runs, causal, chunk):
        ctx.save_for_backward(q, k, v)
        ctx.extra = (log_decay, runs, causal, chunk)
        return local_forward(q, k, v, log_decay, runs, causal, chunk)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = local_backward(q, k, v, grad_out.contiguous(), *ctx.extra)
        return dq, dk, dv, None, None, None, None


def heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None):
    """(B, S, H, D) inputs -> (B, H, S, D) in the state dtype, kv heads repeated to the query heads (their
    gradients sum back through autograd); log_decay in the same dtype."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    dt = state_dtype(q.dtype)
    q, k, v = (t.transpose(1, 2).to(dt).contiguous() for t in (q, k, v))
    if log_decay is not None:
        if log_decay.shape != (q.shape[1],):
            raise ValueError(f"log_decay must have one value per query head ({q.shape[1]}), got {tuple(log_decay.shape)}")
        log_decay = log_decay.to(device=q.device, dtype=dt)
    return q, k, v, log_decay


def local_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                           log_decay: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Linear attention over the full sequence on one process. q: (B, S, H, Dk); k: (B, S, H_kv, Dk);
    v: (B, S, H_kv, Dv), feature map already applied; log_decay: (H,) or None. Returns (B, S, H, Dv) in q's dtype."""
    out_dtype = q.dtype
    q, k, v, log_decay = heads_first(q, k, v, log_decay)
    runs = None if meta.document_ids is None else document_runs(meta.document_ids)
    out = _LocalLinearAttention.apply(q, k, v, log_decay, runs, meta.causal, chunk)
    return out.transpose(1, 2).to(out_dtype)


class LinearAttentionSlot(AttentionSlot):
    """The slot of a linear-attention layer: kind "linear"; its op also takes the layer's per-head log decay.

    Op signature: op(q, k, v, meta, log_decay) -> out, shapes as in `local_linear_attention` (the layer applies
    the feature map; decay and document resets are the op's). Sequence parallelism installs LASP-2 here.
    """

    def __init__(self, op: Callable = local_linear_attention) -> None:
        super().__init__("linear", op)

    def forward(self, q, k, v, meta, log_decay=None):  # type: ignore[override]
        return self.op(q, k, v, meta, log_decay)

