"""Whole documents instead of packed rows (`data.packing: false`), for adaptive sequence parallelism.

A document of n tokens becomes one *sequence* of n - 1 (input, next-token) pairs, or several when it is
longer than `data.max_len`: pieces of at most max_len pairs, cut where packing would cut them (each piece
keeps the token after its last input as that input's label, so nothing is predicted across a cut).

Each step takes whole sequences, in a seeded shuffled order, until the next one would pass
`data.tokens_per_step` (a step always holds at least one). Every rank reads the same global batch: the
adaptive runner decides, per step, which ranks compute which sequence. The sampler's position is a
count of sequences in that global order, so it does not depend on the number of ranks, and a resume on
any layout continues exactly.
"""

from __future__ import annotations

import torch

from meshweave.core.batch import Batch
from meshweave.data.text import (
    DataError,
    SamplerStateError,
    builtin_documents,
    encode_documents,
    path_documents,
    synthetic_count,
    synthetic_documents,
)


class DocumentDataset:
    """Sequences of at most `max_len` tokens, each one whole document or a piece of a long one."""

    def __init__(self, token_docs: list[torch.Tensor], max_len: int) -> None:
        starts, lengths = [], []
        offset = 0
        for doc in token_docs:
            for lo in range(0, len(doc) - 1, max_len):
                starts.append(offset + lo)
                lengths.append(min(max_len, len(doc) - 1 - lo))
            offset += len(doc)
        if not lengths:
            raise DataError("data: no document has two tokens; give more text (data.path, data.max_bytes)")
        self.max_len = max_len
        self.tokens = torch.cat(token_docs).to(torch.int32)
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.lengths = torch.tensor(lengths, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, indices: list[int]) -> Batch:
        """The sequences as one text row (1, total tokens), document ids 0..k-1 in the order given, positions
        restarting at each sequence: the layout every packed-document op already reads."""
        tokens, labels, positions, documents = [], [], [], []
        for doc_id, i in enumerate(indices):
            start, length = int(self.starts[i]), int(self.lengths[i])
            window = self.tokens[start:start + length + 1].long()
            tokens.append(window[:-1])
            labels.append(window[1:])
            positions.append(torch.arange(length))
            documents.append(torch.full((length,), doc_id))
        return Batch.text(*(torch.cat(parts).unsqueeze(0) for parts in (tokens, labels, positions, documents)))


def build_document_dataset(source: str, path: str | None, max_bytes: int, max_len: int, vocab_size: int, seed: int,
                           synthetic_mean_len: int = 256, synthetic_max_len: int = 4096) -> DocumentDataset:
    """The same corpora as `build_dataset` (built-in text, a user's directory, long-tailed synthetic), unpacked."""
    if source == "synthetic":
        n = synthetic_count(max_bytes, synthetic_mean_len)
        return DocumentDataset(synthetic_documents(n, synthetic_mean_len, synthetic_max_len, vocab_size, seed), max_len)
    texts = builtin_documents(max_bytes) if source == "builtin" else path_documents(path, max_bytes)
    return DocumentDataset(encode_documents(texts), max_len)


class TokenBudgetSampler:
    """Whole sequences in a seeded shuffled order, a step's worth of tokens at a time, the same on every rank."""

    def __init__(self, lengths: torch.Tensor, tokens_per_step: int, seed: int) -> None:
        self.lengths, self.tokens_per_step, self.seed = lengths, tokens_per_step, seed
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + epoch))

    def next_global_rows(self) -> list[int]:
        """The sequences of the next step (wrapping into the next epoch when needed)."""
        chosen: list[int] = []
        total = 0
        order = self._order(self.epoch)
        while True:
            index = int(order[self.position])
            length = int(self.lengths[index])
            if chosen and total + length > self.tokens_per_step:
                return chosen
            chosen.append(index)
            total += length
            self.position += 1
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order(self.epoch)
            if total == self.tokens_per_step:
                return chosen

    next_local_rows = next_global_rows  # every rank reads the whole step; the adaptive runner divides the work

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_sequences": len(self.lengths),
                "tokens_per_step": self.tokens_per_step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int], allow_dp_change: bool = True) -> None:
        """Any layout may resume (the position does not depend on it); the data and the budget may not change."""
        mine = self.state_dict()
        changed = [k for k in ("num_sequences", "tokens_per_step", "seed") if state.get(k) != mine[k]]
        if changed:
            raise SamplerStateError(f"data sampler state has {', '.join(f'{k} {state.get(k)}' for k in changed)} but this "
                                    f"run has {', '.join(f'{k} {mine[k]}' for k in changed)}: the data, "
                                    f"data.max_len/tokens_per_step or train.seed changed")
        self.epoch, self.position = state["epoch"], state["position"]
