"""Text data that needs no download, packing into fixed-length rows that keep document boundaries.

- The built-in corpus is real code and prose found on every machine that runs meshweave: the
  Python standard library's own source files (docstrings, comments and code), read in a fixed
  order. `source: path` reads the user's text files instead.
- Packing concatenates documents ([BOS] text [EOS]) and cuts rows of seq_len + 1 tokens. Each row
  records per-token document ids and positions that restart at every document start, so that
  attention can be masked per document (also across sequence-parallel shards).
- `synthetic_documents` draws long-tailed document lengths for benchmarks of variable-length work.

Unusable data (a directory without text, unreadable or binary files, a corpus shorter than one row)
raises `DataError`: one line naming the field to change (`data.path`, `train.seq_len`, ...). The
launcher calls `corpus_tokens` before any worker starts, so these are found there.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

from meshweave.core.batch import IGNORE_INDEX, Batch
from meshweave.core.config import _short
from meshweave.data.tokenizer import ByteTokenizer

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


class DataError(ValueError):
    """The training data cannot be used; the message is one line naming the field and the fix."""


def _quoted(path: str | Path) -> str:
    return _short(str(path))  # a bounded prefix: a path never floods the error line


def builtin_documents(max_bytes: int) -> list[str]:
    """Python standard-library source files, sorted by path, up to max_bytes in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return read_documents(sorted(p for p in root.glob("*.py")), max_bytes)


def text_files(path: str | Path) -> list[Path]:
    """The file itself, or the text files (TEXT_SUFFIXES) under a directory, sorted; DataError if none."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"data.path: {_quoted(p)} does not exist; give a text file or a directory of text files")
    if not os.access(p, os.R_OK | os.X_OK):
        raise DataError(f"data.path: cannot read the directory {_quoted(p)} (permission denied)")
    files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"data.path: {_quoted(p)} holds no text files ({', '.join(TEXT_SUFFIXES)}); "
                        f"point it at UTF-8 text")
    return files


def path_documents(path: str | Path, max_bytes: int) -> list[str]:
    return read_documents(text_files(path), max_bytes, field="data.path")


def read_documents(files: list[Path], max_bytes: int, field: str = "data.source") -> list[str]:
    """UTF-8 text of each file (undecodable bytes replaced), at most max_bytes characters in all. Files
    holding NUL bytes are binary and skipped; DataError when a file cannot be read or none holds text."""
    docs, total, binary = [], 0, 0
    for f in files:
        text = _read_text(f, max_bytes - total, field)
        if text is None:
            binary += 1
            continue
        if not text.strip():
            continue
        docs.append(text[: max_bytes - total])
        total += len(docs[-1])
        if total >= max_bytes:
            break
    if not docs:
        kind = "all binary (they hold NUL bytes)" if binary == len(files) > 0 else "empty or binary"
        raise DataError(f"{field}: no text found: the {len(files)} file(s) are {kind}; give UTF-8 text files")
    return docs


def _read_text(f: Path, max_chars: int, field: str) -> str | None:
    """The first max_chars characters of a file or more (at most 4 bytes each are read: a huge file is
    not read whole), with universal newlines as `read_text` gives them; None for a binary file."""
    try:
        with open(f, "rb") as fh:
            data = fh.read(4 * max_chars)
    except OSError as err:
        raise DataError(f"{field}: cannot read {_quoted(f)}: {err.strerror or err}") from None
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def synthetic_documents(n: int, mean_len: int, max_len: int, vocab_size: int, seed: int) -> list[torch.Tensor]:
    """Token documents with log-normal (long-tailed) lengths: many short ones, a few very long."""
    g = torch.Generator().manual_seed(seed)
    lengths = _synthetic_lengths(n, mean_len, max_len, g)
    return [torch.randint(0, vocab_size, (int(n_tok),), generator=g) for n_tok in lengths]


def _synthetic_lengths(n: int, mean_len: int, max_len: int, g: torch.Generator) -> torch.Tensor:
    sigma = 1.0
    mu = torch.log(torch.tensor(float(mean_len))) - sigma ** 2 / 2
    return torch.exp(mu + sigma * torch.randn(n, generator=g)).clamp(2, max_len).long()


def synthetic_count(max_bytes: int, mean_len: int) -> int:
    """How many synthetic documents `build_dataset` draws for a data budget."""
    return max(8, max_bytes // max(1, mean_len))


def corpus_tokens(source: str, path: str | None, max_bytes: int, seed: int, synthetic_mean_len: int = 256,
                  synthetic_max_len: int = 4096) -> int:
    """Tokens `build_dataset` would pack for these settings, without building it (the launcher's check
    before any worker starts); DataError for unusable data."""
    if source == "synthetic":
        n = synthetic_count(max_bytes, synthetic_mean_len)
        return int(_synthetic_lengths(n, synthetic_mean_len, synthetic_max_len, torch.Generator().manual_seed(seed)).sum())
    texts = builtin_documents(max_bytes) if source == "builtin" else path_documents(path, max_bytes)
    return sum(len(t.encode("utf-8")) + 2 for t in texts)  # [BOS] bytes [EOS]


def require_rows(tokens: int, seq_len: int) -> None:
    """DataError unless `tokens` make at least one packed row of seq_len (+1 for the shifted labels)."""
    if (tokens - 1) // seq_len < 1:
        raise DataError(f"train.seq_len: {seq_len} is longer than the whole corpus ({tokens} tokens, one row needs "
                        f"{seq_len + 1}); lower train.seq_len or give more text (data.path, data.max_bytes)")


def encode_documents(texts: list[str]) -> list[torch.Tensor]:
    """Byte-tokenize each text as [BOS] bytes [EOS] (vectorised: the corpus is megabytes)."""
    tok = ByteTokenizer()
    out = []
    for text in texts:
        body = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        out.append(torch.cat([torch.tensor([tok.BOS]), body, torch.tensor([tok.EOS])]))
    return out


class PackedDataset:
    """Rows of seq_len tokens cut from the concatenation of all documents, with boundaries kept."""

    def __init__(self, token_docs: list[torch.Tensor], seq_len: int, document_masking: bool = True) -> None:
        self.seq_len, self.document_masking = seq_len, document_masking
        self.tokens = torch.cat(token_docs).to(torch.int32)
        lengths = torch.tensor([len(d) for d in token_docs])
        self.doc_index = torch.repeat_interleave(torch.arange(len(token_docs)), lengths)
        require_rows(len(self.tokens), seq_len)
        self.num_rows = (len(self.tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_rows

    def batch(self, rows: list[int]) -> Batch:
        """Rows as a text batch; without document masking the document ids are left out (the model then
        attends across documents, while labels still never cross a boundary)."""
        batch = Batch.text(*(torch.stack(t) for t in zip(*(self._row(r) for r in rows))))
        if not self.document_masking:
            del batch.fields["document_ids"], batch.seq_dims["document_ids"]
        return batch

    def _row(self, r: int) -> tuple[torch.Tensor, ...]:
        lo, hi = r * self.seq_len, (r + 1) * self.seq_len
        window, docs = self.tokens[lo:hi + 1].long(), self.doc_index[lo:hi + 1]
        tokens, labels = window[:-1], window[1:].clone()
        labels[docs[1:] != docs[:-1]] = IGNORE_INDEX  # never predict across a document boundary
        local_docs = docs[:-1]
        starts = torch.ones_like(local_docs, dtype=torch.bool)
        starts[1:] = local_docs[1:] != local_docs[:-1]
        document_ids = torch.cumsum(starts.long(), 0) - 1
        start_index = torch.cummax(torch.where(starts, torch.arange(len(starts)), 0), 0).values
        positions = torch.arange(len(starts)) - start_index
        return tokens, labels, positions, document_ids


def build_dataset(source: str, path: str | None, max_bytes: int, seq_len: int, vocab_size: int, seed: int,
                  synthetic_mean_len: int = 256, synthetic_max_len: int = 4096,
                  document_masking: bool = True) -> PackedDataset:
    if source == "synthetic":
        n = synthetic_count(max_bytes, synthetic_mean_len)
        docs = synthetic_documents(n, synthetic_mean_len, synthetic_max_len, vocab_size, seed)
        return PackedDataset(docs, seq_len, document_masking)
    texts = builtin_documents(max_bytes) if source == "builtin" else path_documents(path, max_bytes)
    return PackedDataset(encode_documents(texts), seq_len, document_masking)


class SamplerStateError(ValueError):
    pass


class DistributedSampler:
    """Deterministic shuffled order of rows, consumed a global batch at a time, split over dp ranks.

    The position is kept in *global* rows consumed, so the same state describes the stream for
    any data-parallel degree: data-parallel rank r of dp takes the r-th slice of each global batch.
    The dp degree is recorded; loading under another degree is refused unless `allow_dp_change`
    (the checkpoint layer allows it: the global position makes the reshard exact).
    `row_tokens` (train.seq_len, when known) is recorded too: a state saved with another row length
    over the same corpus (a long-context recipe's next stage) resumes at the same number of tokens
    consumed, rounded up to whole rows (a new shuffle of the new rows: the exact rows cannot carry over).
    """

    def __init__(self, num_rows: int, global_batch: int, dp_rank: int, dp_degree: int, seed: int,
                 row_tokens: int | None = None) -> None:
        if global_batch % dp_degree:
            raise ValueError(f"global batch {global_batch} is not divisible by dp degree {dp_degree}")
        self.num_rows, self.global_batch, self.seed, self.row_tokens = num_rows, global_batch, seed, row_tokens
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))

    def next_global_rows(self) -> list[int]:
        """The rows of the next global batch (wrapping into the next epoch when needed)."""
        rows: list[int] = []
        while len(rows) < self.global_batch:
            order = self._order(self.epoch)
            take = order[self.position:self.position + self.global_batch - len(rows)].tolist()
            rows += take
            self.position += len(take)
            if self.position >= self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
        return rows

    def next_local_rows(self) -> list[int]:
        rows = self.next_global_rows()
        per_rank = self.global_batch // self.dp_degree
        return rows[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def state_dict(self) -> dict[str, int]:
        state = {"epoch": self.epoch, "position": self.position, "dp_degree": self.dp_degree,
                 "global_batch": self.global_batch, "num_rows": self.num_rows, "seed": self.seed}
        if self.row_tokens is not None:
            state["row_tokens"] = self.row_tokens
        return state

    def tokens_consumed(self) -> int | None:
        """Tokens of the stream consumed so far (None when the row length is unknown)."""
        return None if self.row_tokens is None else (self.epoch * self.num_rows + self.position) * self.row_tokens

    def load_state_dict(self, state: dict[str, int], allow_dp_change: bool = False) -> None:
        if self._row_length_changed(state):
            self._load_by_tokens(state)
            return
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise SamplerStateError(
                f"data sampler state is for {state['num_rows']} rows / seed {state['seed']}, but this run has "
                f"{self.num_rows} rows / seed {self.seed}: the dataset or train.seq_len/seed changed")
        if state["dp_degree"] != self.dp_degree and not allow_dp_change:
            raise SamplerStateError(
                f"data sampler state was saved with dp={state['dp_degree']} but this run has dp={self.dp_degree}; "
                f"resume with the same data-parallel degree, or load through the checkpointer, which reshards")
        self.epoch, self.position = state["epoch"], state["position"]

    def _row_length_changed(self, state: dict[str, int]) -> bool:
        saved = state.get("row_tokens")
        return saved is not None and self.row_tokens is not None and saved != self.row_tokens

    def _load_by_tokens(self, state: dict[str, int]) -> None:
        """Resume a state saved with another row length over the same corpus at the same token count."""
        old, new = state["row_tokens"], self.row_tokens
        # rows = (corpus tokens - 1) // row length, so the corpus size lies in [rows*len, rows*len + len)
        same_corpus = max(state["num_rows"] * old, self.num_rows * new) < min((state["num_rows"] + 1) * old,
                                                                             (self.num_rows + 1) * new)
        if state["seed"] != self.seed or not same_corpus:
            raise SamplerStateError(
                f"data sampler state is for {state['num_rows']} rows of {old} tokens / seed {state['seed']}, but this run "
                f"has {self.num_rows} rows of {new} tokens / seed {self.seed}: the dataset or seed changed")
        tokens = (state["epoch"] * state["num_rows"] + state["position"]) * old
        self.epoch, self.position = divmod(-(-tokens // new), self.num_rows)
