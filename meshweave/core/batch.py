"""`Batch`: a set of named tensors that share the batch dimension (dim 0), each with a declared sequence dimension.

Everything that cuts a batch works from the declarations alone, for text and non-text models alike:
slicing for gradient accumulation and microbatching cuts dim 0 of every field; sequence
parallelism shards each field along its declared sequence dimension (fields without one, such as a
per-sample diffusion timestep, are left whole); moving to the device moves every field. Which field
is the model's input, which the loss target, and how targets are counted is the model spec's
business, not the batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

IGNORE_INDEX = -100  # label value that the token loss skips (and the target count leaves out)


class Batch:
    """Named tensors with a common batch dim 0; `seq_dims[name]` is the field's sequence dim or None.

    Fields are also attributes (`batch.tokens`) for readability at the call sites that know them.
    """

    __slots__ = ("fields", "seq_dims")

    def __init__(self, fields: Mapping[str, torch.Tensor], seq_dims: Mapping[str, int | None]) -> None:
        missing = set(fields) ^ set(seq_dims)
        if missing:
            raise ValueError(f"batch fields and sequence-dim declarations differ on {sorted(missing)}")
        sizes = {t.shape[0] for t in fields.values()}
        if len(sizes) > 1:
            raise ValueError(f"batch fields disagree on the batch size: { {n: t.shape[0] for n, t in fields.items()} }")
        self.fields, self.seq_dims = dict(fields), dict(seq_dims)

    @classmethod
    def text(cls, tokens: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
             document_ids: torch.Tensor) -> Batch:
        """Packed text rows: all four fields (B, S), sequence on dim 1."""
        fields = {"tokens": tokens, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}
        return cls(fields, dict.fromkeys(fields, 1))

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"batch has no field {name!r}; fields: {', '.join(self.fields)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    @property
    def size(self) -> int:
        """Number of samples (rows) in the batch."""
        return next(iter(self.fields.values())).shape[0]

    def slice(self, start: int, stop: int) -> Batch:
        """Samples start..stop-1 of every field (for accumulation micro-steps and microbatches)."""
        return Batch({n: t[start:stop] for n, t in self.fields.items()}, self.seq_dims)

    def map_sequence(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Batch:
        """Apply fn(tensor, seq_dim) to every field that has a sequence dim (e.g. SP sharding)."""
        return Batch({n: fn(t, self.seq_dims[n]) if self.seq_dims[n] is not None else t
                      for n, t in self.fields.items()}, self.seq_dims)

    def to(self, device: torch.device | str) -> Batch:
        """Every field on `device` (non-blocking where the source allows it)."""
        return Batch({n: t.to(device, non_blocking=True) for n, t in self.fields.items()}, self.seq_dims)

    def select(self, names: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        """The named fields as a dict (e.g. the model's keyword inputs)."""
        return {n: self.fields[n] for n in names}
