"""Byte-level tokenizer: every UTF-8 byte is a token, plus BOS/EOS/PAD. Needs no download."""

from __future__ import annotations


BYTE_VOCAB_SIZE = 259  # 256 bytes + BOS, EOS, PAD


class ByteTokenizer:
    BOS, EOS, PAD = 256, 257, 258
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
