"""Local attention kernels: one (Q block, KV block) pair -> (out, lse), and the matching backward.

Every sequence-parallel method is built from these two calls. Layout is (B, H, S, D) for q and
(B, H_kv, S, D) for k/v (grouped-query attention: H % H_kv == 0, query head h reads kv head
h // (H / H_kv), as `repeat_interleave` does). `out` and `lse` come back in the accumulation
dtype (fp64 for fp64 inputs, fp32 otherwise) so partials can be merged without rounding; rows
with no visible key get out = 0 and lse = -inf.

The backward takes the *global* (merged) out and lse of the query rows, not the block's own:
then P = exp(S - lse_global) is the block's slice of the true softmax and the returned dq, dk, dv
are this block's exact contribution to the full gradient.

Backends (no communication happens here); `pick_backend` says which one "auto" resolves to:
- "flash_attn": flash-attn on CUDA (imported lazily; half dtypes; full or causal blocks only).
- "cuda_flash": torch's own CUDA flash SDPA op (`aten._scaled_dot_product_flash_attention` and its
  backward), used when flash-attn is not installed: it returns the logsumexp, (B, H, Sq) fp32 in
  natural log, the layout the merge keeps; half dtypes, head_dim a multiple of 8 up to 256, sm80+,
  GQA natively (as SDPA's enable_gqa uses it); full or causal (square) blocks only.
- "cpu_flash": `aten._scaled_dot_product_flash_attention_for_cpu` and its backward. It returns
  logsumexp, supports fp64/fp32/bf16, GQA and additive masks; half inputs are upcast to fp32 so
  the partial results keep fp32 precision (the same accumulation a single SDPA call does inside).
- "math": plain matmul/softmax in the accumulation dtype; works on any device and dtype.
"""

from __future__ import annotations

import torch

from meshweave.attention.masks import CAUSAL, BlockMask

BACKENDS = ("auto", "flash_attn", "cuda_flash", "cpu_flash", "math")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which partial outputs, lse and gradients are kept and merged."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B,H,Sq,D) over k, v (B,Hkv,Sk,D) under `mask`; returns (out, lse) in accum dtype."""
    chosen = _choose(backend, q, mask)
    if chosen == "flash_attn":
        return _flash_forward(q, k, v, mask, scale)
    if chosen == "cuda_flash":
        return _cuda_forward(q, k, v, mask, scale)
    if chosen == "cpu_flash":
        return _cpu_forward(q, k, v, mask, scale)
    return _math_forward(q, k, v, mask, scale)


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: BlockMask,
    scale: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's contribution (dq, dk, dv), in accum dtype, given the rows' global out and lse."""
    # A row with lse = -inf saw no key anywhere; +inf makes its probabilities exp(s - inf) = 0.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    chosen = _choose(backend, q, mask)
    if chosen == "flash_attn":
        return _flash_backward(dout, q, k, v, out, lse, mask, scale)
    if chosen == "cuda_flash":
        return _cuda_backward(dout, q, k, v, out, lse, mask, scale)
    if chosen == "cpu_flash":
        return _cpu_backward(dout, q, k, v, out, lse, mask, scale)
    return _math_backward(dout, q, k, v, out, lse, mask, scale)


# --- backend choice --------------------------------------------------------------------------
def _choose(backend: str, q: torch.Tensor, mask: BlockMask) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    on_cuda_half = q.is_cuda and q.dtype in HALF_DTYPES  # only then do the CUDA probes matter
    return pick_backend(
        q.device.type, q.dtype, q.shape[-1], isinstance(mask, torch.Tensor),
        flash_attn=on_cuda_half and _has_flash_attn(), cuda_flash=on_cuda_half and _cuda_flash_supported(q.device),
    )


def pick_backend(device_type: str, dtype: torch.dtype, head_dim: int, dense_mask: bool, *, flash_attn: bool,
                 cuda_flash: bool) -> str:
    """The backend "auto" resolves to. Pure: the environment comes in as arguments (flash_attn: flash-attn
    imports; cuda_flash: torch was built with flash attention and the GPU is sm80 or newer)."""
    if device_type == "cpu":
        return "cpu_flash"  # fp64/fp32/bf16, dense masks too
    # Both flash kernels take no mask and compute in fp16/bf16 only: fp32 (and fp64) must keep its
    # precision, and a dense mask is rare (many tiny documents), so those go to the math path.
    if device_type != "cuda" or dense_mask or dtype not in HALF_DTYPES:
        return "math"
    if flash_attn:
        return "flash_attn"
    if cuda_flash and head_dim % 8 == 0 and head_dim <= 256:  # the op asserts both (SDPA pads before it)
        return "cuda_flash"
    return "math"


_FLASH: list = []


def _has_flash_attn() -> bool:
    if not _FLASH:
        try:
            import flash_attn.flash_attn_interface as fa  # noqa: PLC0415 - optional, CUDA-only

            _FLASH.append(fa)
        except ImportError:
            _FLASH.append(None)
    return _FLASH[0] is not None


_CUDA_FLASH: dict[int | None, bool] = {}


def _cuda_flash_supported(device: torch.device) -> bool:
    """torch built with flash attention and a GPU of compute capability 8.0 or newer (the kernel's floor)."""
    if device.index not in _CUDA_FLASH:
        built = torch.backends.cuda.is_flash_attention_available()
        _CUDA_FLASH[device.index] = built and torch.cuda.get_device_capability(device) >= (8, 0)
    return _CUDA_FLASH[device.index]


def _row_has_key(mask: BlockMask, sq: int, sk: int) -> torch.Tensor | None:
    """(B or 1, 1, Sq) bool: rows with at least one visible key; None if every row has one."""
    if isinstance(mask, torch.Tensor):
        return mask.any(-1)
    if sk == 0:
        return torch.zeros(1, 1, sq, dtype=torch.bool)
    return None


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _check_causal_square(mask: BlockMask, sq: int, sk: int) -> None:
    if isinstance(mask, str) and mask == CAUSAL and sq != sk:
        raise ValueError(f"a causal block must be square (diagonal), got {sq} queries x {sk} keys")


def _strided_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, copied only if its last dim is strided: the CPU flash ops take any batch/head/row
    strides (bitwise the same result), so transposed (B, S, H, D) views need no contiguous copy."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


# --- CPU flash op ----------------------------------------------------------------------------
def _cpu_forward(q, k, v, mask, scale):
    acc = accum_dtype(q.dtype)
    _check_causal_square(mask, q.shape[2], k.shape[2])
    q, k, v = (_strided_rows(t, acc) for t in (q, k, v))
    explicit = _additive(mask, acc) if isinstance(mask, torch.Tensor) else None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, mask == CAUSAL if isinstance(mask, str) else False, attn_mask=explicit, scale=scale
    )
    lse = lse.to(acc)
    has_key = _row_has_key(mask, q.shape[2], k.shape[2])
    if has_key is not None:  # the op reports lse = 0 for a row with no visible key
        lse = lse.masked_fill(~has_key, float("-inf"))
        out = out.masked_fill(~has_key[..., None], 0.0)
    return out, lse


def _cpu_backward(dout, q, k, v, out, lse, mask, scale):
    acc = accum_dtype(q.dtype)
    dout, q, k, v, out = (_strided_rows(t, acc) for t in (dout, q, k, v, out))
    explicit = _additive(mask, acc) if isinstance(mask, torch.Tensor) else None
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse.to(acc).contiguous(), 0.0, mask == CAUSAL if isinstance(mask, str) else False,
        attn_mask=explicit, scale=scale,
    )
    return dq, dk, dv


# --- plain math ------------------------------------------------------------------------------
def _scores(q, k, mask, scale):
    acc = accum_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    k = k.to(acc).repeat_interleave(groups, dim=1)
    s = torch.matmul(q.to(acc), k.transpose(-1, -2)) * scale
    if isinstance(mask, torch.Tensor):
        s = s.masked_fill(~mask, float("-inf"))
    elif mask == CAUSAL:
        _check_causal_square(mask, q.shape[2], k.shape[2])
        tril = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~tril, float("-inf"))
    return s, groups


def _math_forward(q, k, v, mask, scale):
    s, groups = _scores(q, k, mask, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    out = torch.matmul(p, v.to(s.dtype).repeat_interleave(groups, dim=1))
    return out, lse


def _math_backward(dout, q, k, v, out, lse, mask, scale):
    s, groups = _scores(q, k, mask, scale)
    acc = s.dtype
    dout, out = dout.to(acc), out.to(acc)
    vv = v.to(acc).repeat_interleave(groups, dim=1)
    kk = k.to(acc).repeat_interleave(groups, dim=1)
    p = torch.exp(s - lse.to(acc)[..., None])
    delta = (dout * out).sum(-1, keepdim=True)
    ds = p * (torch.matmul(dout, vv.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kk) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    dv = torch.matmul(p.transpose(-1, -2), dout)
    b, h, sk, d = dk.shape
    return dq, dk.view(b, h // groups, groups, sk, d).sum(2), dv.view(b, h // groups, groups, sk, d).sum(2)


# --- flash-attn (CUDA only; not exercised on the CPU test machines) --------------------------
def _flash_forward(q, k, v, mask, scale):
    fa = _FLASH[0]
    causal = mask == CAUSAL
    out, lse, _ = fa.flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal,
        return_attn_probs=True,
    )
    return out.transpose(1, 2).to(torch.float32), lse.to(torch.float32)


def _flash_backward(dout, q, k, v, out, lse, mask, scale):
    fa = _FLASH[0]
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    fa._flash_attn_backward(
        dout.transpose(1, 2).to(q.dtype).contiguous(), qt, kt, vt, out.transpose(1, 2).to(q.dtype).contiguous(),
        lse.to(torch.float32).contiguous(), dq, dk, dv, dropout_p=0.0, softmax_scale=scale,
        causal=mask == CAUSAL, window_size_left=-1, window_size_right=-1, softcap=0.0,
        alibi_slopes=None, deterministic=False, rng_state=None,
    )
    return tuple(t.transpose(1, 2).to(torch.float32) for t in (dq, dk, dv))


# --- torch's CUDA flash SDPA op (CUDA only; gpu_check runs it against the fp64 reference) ------
def _cuda_forward(q, k, v, mask, scale):
    _check_flash_mask(mask, q.shape[2], k.shape[2])
    q, k, v = (_strided_rows(t, t.dtype) for t in (q, k, v))  # the kernel needs a unit stride in the last dim only
    # dropout 0, no debug mask; returns (out, lse, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, mask == CAUSAL, False, scale=scale)
    out, lse = out.to(torch.float32), lse.to(torch.float32)
    if k.shape[2] == 0:  # no keys: the kernel reports lse = +inf; the merge expects out = 0, lse = -inf
        lse = torch.full_like(lse, float("-inf"))
        out = torch.zeros_like(out)
    return out, lse


def _cuda_backward(dout, q, k, v, out, lse, mask, scale):
    _check_flash_mask(mask, q.shape[2], k.shape[2])
    # The rng state is read only when dropout_p > 0 (and the op skips the device check), so placeholders do.
    seed, offset = torch.empty((), dtype=torch.long), torch.empty((), dtype=torch.long)
    # cum_seq_q/k None (undefined) selects the dense kernel, not varlen; max_q/max_k are the block lengths.
    dout, q, k, v, out = (_strided_rows(t, q.dtype) for t in (dout, q, k, v, out))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.to(torch.float32).contiguous(), None, None,
        q.shape[2], k.shape[2], 0.0, mask == CAUSAL, seed, offset, scale=scale,
    )
    return dq.to(torch.float32), dk.to(torch.float32), dv.to(torch.float32)


def _check_flash_mask(mask: BlockMask, sq: int, sk: int) -> None:
    if isinstance(mask, torch.Tensor):
        raise TypeError("the cuda_flash backend takes full or causal blocks only, not a dense mask (use auto or math)")
    _check_causal_square(mask, sq, sk)
