"""Static checks of a sequence-parallel layout: heads and sequence length vs method and degree.

The config layer calls `validate_sp` before any process starts; the ops call it again on the
actual shapes. Pure arithmetic: no communication.
"""

from __future__ import annotations

from meshweave.core.schema import SP_METHODS

METHODS = ("local", *SP_METHODS)  # as in layout.py, which imports torch: this module must not
ZIGZAG_METHODS = ("ring", "tokenring", "usp", "allgather")  # the methods whose layout cuts 2*sp chunks


def _heads_ok(n_heads: int, n_kv_heads: int, degree: int) -> bool:
    return n_heads % degree == 0 and (n_kv_heads % degree == 0 or degree % n_kv_heads == 0)


def max_ulysses_degree(n_heads: int, n_kv_heads: int, sp: int) -> int:
    """The largest Ulysses degree dividing sp that the (query, kv) head counts allow."""
    return max(d for d in range(1, sp + 1) if sp % d == 0 and _heads_ok(n_heads, n_kv_heads, d))


def validate_sp(
    method: str, n_heads: int, n_kv_heads: int, sp: int, seq_len: int, usp_ulysses: int | None = None,
    split_heads: bool = True,
) -> list[str]:
    """One-line error messages (field, problem, fix) for an SP layout; [] when it is valid.

    `split_heads=False` for a model without softmax layers: LASP-2 shards its linear layers in the method's
    layout but splits no heads, so only the sequence and degree rules apply.
    """
    if method not in METHODS:
        return [f"parallel.sp_method: unknown method {method!r}; use one of {', '.join(METHODS)}"]
    if sp < 1:
        return [f"parallel.sp: must be >= 1, got {sp}"]
    errors: list[str] = []
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        errors.append(f"model.n_heads ({n_heads}) must be a multiple of model.n_kv_heads ({n_kv_heads})")
    if method == "local" and sp != 1:
        errors.append(f"parallel.sp: method local runs on one rank, got sp={sp}; use sp_method: {', '.join(SP_METHODS)}")
    if method == "ulysses" and split_heads:
        errors += _ulysses_head_problems(n_heads, n_kv_heads, sp)
    if method == "ulysses" and seq_len % sp:
        errors.append(f"train.seq_len: ulysses needs seq_len ({seq_len}) divisible by sp ({sp}); pad it to a multiple of {sp}")
    if method in ZIGZAG_METHODS and seq_len % (2 * sp):
        errors.append(
            f"train.seq_len: {method} (zigzag layout) needs seq_len ({seq_len}) divisible by 2*sp ({2 * sp}); "
            f"pad it to a multiple of {2 * sp}"
        )
    if method == "usp":
        errors += _usp_problems(n_heads, n_kv_heads, sp, usp_ulysses, split_heads)
    return errors


def _ulysses_head_problems(n_heads: int, n_kv_heads: int, sp: int) -> list[str]:
    fix = f"use sp_method: ring, or usp with ulysses <= {max_ulysses_degree(n_heads, n_kv_heads, sp)}"
    if n_heads % sp:
        return [f"parallel.sp: ulysses needs model.n_heads ({n_heads}) divisible by sp ({sp}); {fix}"]
    if n_kv_heads % sp and sp % n_kv_heads:
        return [f"parallel.sp: ulysses needs model.n_kv_heads ({n_kv_heads}) divisible by sp ({sp}) or dividing it; {fix}"]
    return []


def _usp_problems(n_heads: int, n_kv_heads: int, sp: int, usp_ulysses: int | None, split_heads: bool) -> list[str]:
    if usp_ulysses is None or usp_ulysses < 1 or sp % usp_ulysses:
        return [f"parallel.usp.ulysses: must be set to a divisor of sp ({sp}), got {usp_ulysses}"]
    if split_heads and not _heads_ok(n_heads, n_kv_heads, usp_ulysses):
        return [(
            f"parallel.usp.ulysses: needs model.n_heads ({n_heads}) divisible by it ({usp_ulysses}) and "
            f"model.n_kv_heads ({n_kv_heads}) divisible by or dividing it; use usp.ulysses <= "
            f"{max_ulysses_degree(n_heads, n_kv_heads, sp)}"
        )]
    return []
