"""How a full sequence is split over the ranks of an SP group, per method, and back.

- contiguous (local, ulysses): rank r holds tokens [r N/P, (r+1) N/P).
- zigzag (ring, tokenring, allgather): the sequence is cut into 2P chunks and rank r holds chunks r and
  2P-1-r, so that under a causal mask every rank does the same work.
- usp (P = P_ulysses x P_ring, SP rank = ring_rank * P_ulysses + ulysses_rank): the zigzag pair of
  the ring rank is cut into P_ulysses pieces and ulysses rank u holds piece u, so that after the
  Ulysses all-to-all every ring rank holds exactly its zigzag pair.

Tokens, position ids, labels and document ids must all be sharded with the same function; the
model uses explicit position ids, so a permuted layout is otherwise invisible to it.
Pure indexing: no communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshweave.attention.masks import Segment
from meshweave.core.schema import SP_METHODS

METHODS = ("local", *SP_METHODS)  # "local": one rank, no communication
_LAYOUT = {"local": "contiguous", "ulysses": "contiguous", "ring": "zigzag", "tokenring": "zigzag", "usp": "usp",
           "allgather": "zigzag", "dsp": "contiguous"}  # dsp: a dim's padded contiguous chunks (attention/dsp.py)


def layout_of(method: str) -> str:
    if method not in _LAYOUT:
        raise ValueError(f"unknown sequence-parallel method {method!r}; choose one of {METHODS}")
    return _LAYOUT[method]


def zigzag_segments(seq_len: int, size: int, rank: int) -> list[Segment]:
    """Chunks rank and 2*size-1-rank of a sequence cut into 2*size chunks."""
    if seq_len % (2 * size):
        raise ValueError(f"zigzag layout needs the sequence length ({seq_len}) divisible by 2*sp ({2 * size})")
    chunk = seq_len // (2 * size)
    return [Segment(rank * chunk, chunk), Segment((2 * size - 1 - rank) * chunk, chunk)]


def shard_segments(method: str, seq_len: int, size: int, rank: int, ulysses_degree: int | None = None) -> list[Segment]:
    """Global position runs held by SP rank `rank` of `size`, in local order."""
    kind = layout_of(method)
    if kind == "contiguous":
        if seq_len % size:
            raise ValueError(f"{method} needs the sequence length ({seq_len}) divisible by sp ({size})")
        n = seq_len // size
        return [Segment(rank * n, n)]
    if kind == "zigzag":
        return zigzag_segments(seq_len, size, rank)
    u = _ulysses_degree(size, ulysses_degree)
    pair = zigzag_segments(seq_len, size // u, rank // u)
    piece = 2 * pair[0].length // u
    return _slice_segments(pair, (rank % u) * piece, piece)


def _ulysses_degree(size: int, ulysses_degree: int | None) -> int:
    if ulysses_degree is None or ulysses_degree < 1 or size % ulysses_degree:
        raise ValueError(f"usp needs ulysses_degree dividing sp ({size}), got {ulysses_degree}")
    return ulysses_degree


def _slice_segments(segments: Sequence[Segment], start: int, length: int) -> list[Segment]:
    """The runs covering local indices [start, start+length) of a concatenation of segments."""
    out, offset = [], 0
    for seg in segments:
        lo, hi = max(start, offset), min(start + length, offset + seg.length)
        if lo < hi:
            out.append(Segment(seg.start + lo - offset, hi - lo))
        offset += seg.length
    return out


def shard_indices(method: str, seq_len: int, size: int, rank: int, ulysses_degree: int | None = None) -> torch.Tensor:
    """Global indices of the tokens SP rank `rank` holds, in local order."""
    segs = shard_segments(method, seq_len, size, rank, ulysses_degree)
    return torch.cat([torch.arange(s.start, s.stop) for s in segs])


def shard_sequence(
    x: torch.Tensor, method: str, rank: int, size: int, dim: int = 1, ulysses_degree: int | None = None
) -> torch.Tensor:
    """This rank's shard of a full-sequence tensor (tokens, positions, labels, doc ids, activations)."""
    idx = shard_indices(method, x.shape[dim], size, rank, ulysses_degree).to(x.device)
    return x.index_select(dim, idx)


def unshard_sequence(
    shards: Sequence[torch.Tensor], method: str, dim: int = 1, ulysses_degree: int | None = None
) -> torch.Tensor:
    """Inverse of `shard_sequence`: the full tensor from every rank's shard (listed by SP rank)."""
    size = len(shards)
    seq_len = sum(s.shape[dim] for s in shards)
    idx = torch.cat([shard_indices(method, seq_len, size, r, ulysses_degree) for r in range(size)])
    stacked = torch.cat(list(shards), dim=dim)
    return stacked.index_select(dim, torch.argsort(idx).to(stacked.device))
