"""Text around token ids: encoding prompts, per-token segments, and incremental decoding of
generations (the text of the generated ids as it continues the prompt, safe to stream)."""
from __future__ import annotations

from ..tokenizer import Tokenizer

# How many prompt tokens give a continuation its context when decoding: enough for a
# sentencepiece word boundary ("▁") and a byte-fallback sequence to decode as they would in place.
_WINDOW = 8
REPLACEMENT = "\ufffd"


class TextCodec:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._sp = getattr(tokenizer, "_sp", None)
        self._hf = getattr(tokenizer, "_hf", None)

    @property
    def kind(self) -> str:
        return "sentencepiece" if self._sp is not None else "huggingface"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids)) if ids else ""

    def piece(self, token: int) -> str:
        """A token's own string, as Megatron's `segments` show it (sentencepiece's piece, HF's token)."""
        try:
            if self._sp is not None:
                return self._sp.id_to_piece(token)
            if self._hf is not None:
                piece = self._hf.id_to_token(token)
                if piece is not None:
                    return piece
        except (IndexError, ValueError, TypeError):
            pass
        return self.decode([token])


class Continuation:
    """The text that generated ids add after a prompt: decode(tail of prompt + ids) minus
    decode(tail of prompt), so word-boundary spaces come out as they would in the whole text."""

    def __init__(self, codec: TextCodec, prompt: list[int]):
        self.codec = codec
        self.context = list(prompt[-_WINDOW:])
        self.base = codec.decode(self.context)

    def text(self, ids: list[int]) -> str:
        if not ids:
            return ""
        full = self.codec.decode(self.context + list(ids))
        if full.startswith(self.base):
            return full[len(self.base):]
        return self.codec.decode(list(ids))


def stable_length(text: str, finished: bool, hold: int) -> int:
    """How much of `text` may be sent now: not a trailing incomplete character (U+FFFD from a
    partial byte sequence) and not the last `hold` characters, which might begin a stop sequence."""
    if finished:
        return len(text)
    n = len(text)
    while n and text[n - 1] == REPLACEMENT:
        n -= 1
    return max(0, n - hold)


def find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Index of the earliest stop sequence in text[start:] (searched from start), or -1."""
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best
