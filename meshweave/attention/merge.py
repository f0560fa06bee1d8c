"""Merging attention partials computed over disjoint key sets (the online-softmax rule).

Two partials (O_a, L_a), (O_b, L_b) over disjoint keys combine to
    L = max(L_a, L_b) - logsigmoid(|L_a - L_b|)          (= log(e^L_a + e^L_b), no overflow)
    O = O_a - sigmoid(L_b - L_a) * (O_a - O_b)
in the accumulation dtype (fp32, or fp64 for fp64 inputs). Rows where one side saw no key
(lse = -inf) take the other side unchanged; rows where neither did stay (0, -inf): no NaN.
Pure computation: no communication. Hand-written: torch's equivalent (`_SDPAMerger` in the context
parallel module) is private API and does not guard rows where both sides are empty.
"""

from __future__ import annotations

import torch


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partials: out (..., S, D), lse (..., S). Returns the merged (out, lse)."""
    both_empty = torch.isneginf(lse_a) & torch.isneginf(lse_b)
    diff = (lse_b - lse_a).masked_fill(both_empty, 0.0)  # +inf if only a is empty, -inf if only b
    lse = torch.maximum(lse_a, lse_b) - torch.nn.functional.logsigmoid(diff.abs())
    out = out_a - torch.sigmoid(diff)[..., None] * (out_a - out_b)
    return out, lse


class PartialAccumulator:
    """Running (out, lse) for a query shard (B, H, S, D), merged row-slice by row-slice."""

    def __init__(self, like: torch.Tensor, dtype: torch.dtype) -> None:
        b, h, s, d = like.shape
        self.out = torch.zeros(b, h, s, d, dtype=dtype, device=like.device)
        self.lse = torch.full((b, h, s), float("-inf"), dtype=dtype, device=like.device)

    def add(self, rows: slice, out: torch.Tensor, lse: torch.Tensor, batch: slice = slice(None)) -> None:
        """Merge a partial for query rows `rows` (sequence axis) of batch rows `batch`."""
        merged_out, merged_lse = merge_partials(
            self.out[batch, :, rows], self.lse[batch, :, rows], out.to(self.out.dtype), lse.to(self.lse.dtype)
        )
        self.out[batch, :, rows] = merged_out
        self.lse[batch, :, rows] = merged_lse
