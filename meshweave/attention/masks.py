"""Which (query rows, key rows) of a block see each other, across shards.

A shard holds one or more contiguous runs (`Segment`s) of the global sequence; the global position
of a token decides causality, and `document_ids` (equal ids attend to each other) decide packed
documents. `plan_block` turns one (query shard, key shard) pair into the few kernel calls that
cover every visible pair: blocks with no visible key are skipped (never computed, never merged),
fully visible and diagonal-causal blocks use the fast kernel paths, packed documents become one
FULL or CAUSAL call per pair of same-document runs (as varlen attention does), and only what is
left (partially visible pairs, or too many tiny documents) carries an explicit boolean mask. Pure computation: no communication. Hand-written because flex_attention's BlockMask (the torch
way to describe such masks) has no backward on CPU, and the plan must also drive the flash kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

FULL = "full"
CAUSAL = "causal"  # square block on the diagonal: row i sees keys 0..i
BlockMask = str | torch.Tensor  # FULL, CAUSAL or a (B, 1, Sq, Sk) bool tensor, True = visible


@dataclass(frozen=True)
class Segment:
    """A run of `length` consecutive global positions starting at `start`."""

    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local query rows x local key rows of batch rows `batch` under `mask`."""

    q_rows: slice
    k_rows: slice
    mask: BlockMask
    batch: slice = field(default_factory=lambda: slice(None))


# Packed documents are planned like varlen attention: one FULL or CAUSAL call per pair of same-document
# runs, so no dense mask is built and the flash kernels apply. Past this many calls per (query segment)
# one call with a dense mask is cheaper than many tiny ones.
MAX_DOCUMENT_CALLS = 32


def positions(segments: Sequence[Segment], device: torch.device | str = "cpu") -> torch.Tensor:
    """Global positions of a shard's tokens, in local order."""
    return torch.cat([torch.arange(s.start, s.stop, device=device) for s in segments])


def _offsets(segments: Sequence[Segment]) -> list[int]:
    out, acc = [], 0
    for seg in segments:
        out.append(acc)
        acc += seg.length
    return out


def _pair_kind(q: Segment, k: Segment, causal: bool) -> str:
    """'empty', 'full', 'diag' or 'partial' by position alone."""
    if not causal:
        return "full"
    if k.start > q.stop - 1:
        return "empty"
    if k.stop - 1 <= q.start:
        return "full"
    if q == k:
        return "diag"
    return "partial"


def _ascending(segments: Sequence[Segment]) -> bool:
    return all(a.stop <= b.start for a, b in zip(segments, segments[1:]))


def plan_block(
    q_segments: Sequence[Segment],
    k_segments: Sequence[Segment],
    causal: bool,
    q_docs: torch.Tensor | None = None,
    k_docs: torch.Tensor | None = None,
) -> list[BlockCall]:
    """Kernel calls covering every visible (query, key) pair of a block; [] if nothing is visible.

    q_docs (B, Sq) / k_docs (B, Sk): document ids in the shards' local order, or None.
    """
    everything = slice(0, sum(s.length for s in q_segments)), slice(0, sum(s.length for s in k_segments))
    if q_docs is None:
        if not causal:
            return [BlockCall(*everything, FULL)]
        if list(q_segments) == list(k_segments) and _ascending(q_segments):
            return [BlockCall(*everything, CAUSAL)]
    calls: list[BlockCall] = []
    q_off, k_off = _offsets(q_segments), _offsets(k_segments)
    for qi, qseg in enumerate(q_segments):
        kinds = [_pair_kind(qseg, kseg, causal) for kseg in k_segments]
        visible = [j for j, kind in enumerate(kinds) if kind != "empty"]
        if not visible:
            continue
        j0, j1 = visible[0], visible[-1]
        q_rows = slice(q_off[qi], q_off[qi] + qseg.length)
        k_rows = slice(k_off[j0], k_off[j1] + k_segments[j1].length)
        diag = j0 == j1 and kinds[j0] == "diag"
        span = k_segments[j0 : j1 + 1]
        if q_docs is not None:
            visible_k = [(k_segments[j], k_off[j]) for j in visible]
            doc_calls = _document_calls(qseg, q_off[qi], visible_k, q_docs, k_docs, causal)
            if doc_calls is not None:
                calls += doc_calls
                continue
        by_position = None  # dense (Sq, Sk) visibility by position, only when some pair is partial
        if not all(kinds[j] == "full" for j in range(j0, j1 + 1)) or q_docs is not None:
            qpos = positions([qseg], q_docs.device if q_docs is not None else "cpu")
            kpos = positions(span, qpos.device)
            by_position = kpos[None, :] <= qpos[:, None] if causal else torch.ones(len(qpos), len(kpos), dtype=torch.bool)
        if q_docs is None:
            mask: BlockMask = FULL if by_position is None else (CAUSAL if diag else by_position[None, None])
        else:
            same_doc = q_docs[:, q_rows, None] == k_docs[:, None, k_rows]
            visible_pairs = same_doc & by_position[None]
            if not bool(visible_pairs.any()):
                continue
            if bool(visible_pairs.all()):
                mask = FULL
            elif diag and bool((same_doc | ~by_position[None]).all()):
                mask = CAUSAL
            else:
                mask = visible_pairs[:, None]
        calls.append(BlockCall(q_rows, k_rows, mask))
    return _merge_full_calls(calls)


def _merge_full_calls(calls: list[BlockCall]) -> list[BlockCall]:
    """Join consecutive FULL calls over the same keys and adjacent query rows into one call."""
    merged: list[BlockCall] = []
    for call in calls:
        prev = merged[-1] if merged else None
        if (
            prev is not None and isinstance(prev.mask, str) and isinstance(call.mask, str)
            and prev.mask == FULL and call.mask == FULL and prev.k_rows == call.k_rows
            and prev.q_rows.stop == call.q_rows.start and prev.batch == call.batch
        ):
            merged[-1] = BlockCall(slice(prev.q_rows.start, call.q_rows.stop), call.k_rows, FULL, call.batch)
        else:
            merged.append(call)
    return merged


def _runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(value, start, stop) of the runs of equal consecutive values of a 1-D tensor."""
    if ids.numel() == 0:
        return []
    cuts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
    starts, stops = [0, *cuts], [*cuts, ids.numel()]
    return list(zip(ids[starts].tolist(), starts, stops))


def _document_calls(
    qseg: Segment, q_start: int, visible_k: Sequence[tuple[Segment, int]], q_docs: torch.Tensor, k_docs: torch.Tensor,
    causal: bool,
) -> list[BlockCall] | None:
    """FULL/CAUSAL calls per pair of same-document runs, batch rows with equal plans merged.

    None when a pair of runs is only partly visible or there would be more than MAX_DOCUMENT_CALLS
    calls: the caller then uses one dense mask.
    """
    per_row: list[list[tuple[slice, slice, str]]] = []
    for b in range(q_docs.shape[0]):
        k_runs: dict[int, list[tuple[int, int, int]]] = {}
        for kseg, k_start in visible_k:
            for doc, a, z in _runs(k_docs[b, k_start : k_start + kseg.length]):
                k_runs.setdefault(doc, []).append((k_start + a, k_start + z, kseg.start + a))
        row: list[tuple[slice, slice, str]] = []
        for doc, a, z in _runs(q_docs[b, q_start : q_start + qseg.length]):
            q_run = Segment(qseg.start + a, z - a)
            for ka, kz, kpos in k_runs.get(doc, []):
                kind = _pair_kind(q_run, Segment(kpos, kz - ka), causal)
                if kind == "partial":
                    return None
                if kind != "empty":
                    row.append((slice(q_start + a, q_start + z), slice(ka, kz), FULL if kind == "full" else CAUSAL))
        if len(row) > MAX_DOCUMENT_CALLS:
            return None
        per_row.append(row)
    calls: list[BlockCall] = []
    b = 0
    while b < len(per_row):
        e = b + 1
        while e < len(per_row) and per_row[e] == per_row[b]:
            e += 1
        calls += [BlockCall(q, k, m, slice(b, e)) for q, k, m in per_row[b]]
        b = e
    if len(calls) > MAX_DOCUMENT_CALLS:
        return None
    return calls
