"""Packing keeps document boundaries; the sampler is deterministic, disjoint over dp ranks and resumes exactly."""

import pytest
import torch

from meshweave.data.text import (IGNORE_INDEX, DistributedSampler, PackedDataset, SamplerStateError,
                                    build_dataset, encode_documents, synthetic_documents)
from meshweave.data.tokenizer import ByteTokenizer


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo, wörld")
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "héllo, wörld"


def test_packing_records_documents_positions_and_boundary_labels():
    docs = encode_documents(["ab", "cdef", "g"])  # [B a b E] [B c d e f E] [B g E]: 4 + 6 + 3 = 13 tokens
    ds = PackedDataset(docs, seq_len=6)
    assert len(ds) == 2  # (13 - 1) // 6
    b = ds.batch([0, 1])
    tok = ByteTokenizer()
    assert b.tokens[0].tolist() == [tok.BOS, ord("a"), ord("b"), tok.EOS, tok.BOS, ord("c")]
    assert b.document_ids[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1]
    # label of E (position 3) would be the next document's BOS: ignored; everything else is the next token
    assert b.labels[0].tolist() == [ord("a"), ord("b"), tok.EOS, IGNORE_INDEX, ord("c"), ord("d")]
    # row 1 starts mid-document: positions restart at the row start, ids renumber from 0
    assert b.document_ids[1].tolist() == [0, 0, 0, 0, 1, 1]
    assert b.position_ids[1].tolist() == [0, 1, 2, 3, 0, 1]
    assert b.labels[1].tolist()[3] == IGNORE_INDEX


def test_builtin_corpus_is_real_text():
    ds = build_dataset("builtin", None, 100_000, 128, 320, seed=0)
    text = ByteTokenizer().decode(ds.tokens[:20_000].tolist())
    assert "def " in text and "import" in text and len(set(text.split())) > 500


def test_synthetic_documents_are_long_tailed_and_deterministic():
    docs = synthetic_documents(2000, mean_len=200, max_len=5000, vocab_size=100, seed=3)
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.float64)
    assert lengths.max() > 5 * lengths.median()  # a long tail
    assert abs(lengths.mean().item() - 200) < 40
    again = synthetic_documents(2000, mean_len=200, max_len=5000, vocab_size=100, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again, docs))


def _consume(sampler, steps):
    return [sampler.next_local_rows() for _ in range(steps)]


def test_sampler_splits_each_global_batch_disjointly_over_dp():
    ranks = [DistributedSampler(37, global_batch=8, dp_rank=r, dp_degree=4, seed=1) for r in range(4)]
    single = DistributedSampler(37, global_batch=8, dp_rank=0, dp_degree=1, seed=1)
    for _ in range(12):  # crosses several epochs of 37 rows
        parts = [s.next_local_rows() for s in ranks]
        assert sum(parts, []) == single.next_local_rows()
        assert all(len(p) == 2 for p in parts)


def test_sampler_resumes_exactly():
    straight = DistributedSampler(50, 4, 1, 2, seed=5)
    expected = _consume(straight, 30)
    first = DistributedSampler(50, 4, 1, 2, seed=5)
    got = _consume(first, 13)
    resumed = DistributedSampler(50, 4, 1, 2, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert got + _consume(resumed, 17) == expected


def test_sampler_refuses_other_dp_degree_unless_resharding_is_allowed():
    saved = DistributedSampler(50, 4, 0, 2, seed=5)
    _consume(saved, 3)
    other = DistributedSampler(50, 4, 0, 4, seed=5)
    with pytest.raises(SamplerStateError, match="saved with dp=2 but this run has dp=4"):
        other.load_state_dict(saved.state_dict())
    # Resharded: the four dp=4 ranks together continue exactly where the dp=2 pair stopped.
    reference = DistributedSampler(50, 4, 0, 1, seed=5)
    _consume(reference, 3)
    ranks = [DistributedSampler(50, 4, r, 4, seed=5) for r in range(4)]
    for s in ranks:
        s.load_state_dict(saved.state_dict(), allow_dp_change=True)
    for _ in range(20):
        assert sum((s.next_local_rows() for s in ranks), []) == reference.next_local_rows()


def test_sampler_refuses_state_of_another_dataset():
    with pytest.raises(SamplerStateError, match="dataset or train.seq_len/seed changed"):
        DistributedSampler(51, 4, 0, 2, seed=5).load_state_dict(DistributedSampler(50, 4, 0, 2, seed=5).state_dict())
