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

    def label(self, token: int) -> str:
        return _label(self, token)

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


def _label(codec: "TextCodec", token: int) -> str:
    """A token's text on its own, for top_logprobs keys: what it adds to text (a sentencepiece
    word-boundary "▁" as a space), or its piece (<0xC3>, </s>) when it is no text by itself."""
    if codec._sp is not None:
        piece = codec.piece(token)
        if not (piece.startswith("<0x") or codec._sp.is_control(token) or codec._sp.is_unknown(token)):
            return piece.replace("\u2581", " ")
        text = codec.decode([token]) if not codec._sp.is_control(token) else ""
    else:
        text = codec.decode([token])
    return text if text and REPLACEMENT not in text else codec.piece(token)


class Detokenizer:
    """Each token's share of the text, as tokens arrive: the pieces join to exactly the decoded
    text. A token that ends inside a multi-byte character (a byte-fallback piece such as <0xC3>)
    gets "" and the token that completes the character gets all of it, so every piece is whole
    text and each token's offset is the length of the pieces before it. Decoding looks back about
    _WINDOW tokens (word-boundary spaces come out as in the whole text), from a token that starts
    a character: a byte-fallback decoder turns a whole run of byte tokens that starts mid-character
    into replacement characters."""

    def __init__(self, codec: TextCodec, context: list[int] = ()):
        self.codec = codec
        self.ids = list(context)
        self.done = len(self.ids)  # tokens whose text has been handed out
        start = max(0, self.done - _WINDOW)
        for _ in range(_WINDOW):  # the context may begin inside a character: back up to its start
            if start == 0 or not codec.decode(self.ids[start:self.done]).startswith(REPLACEMENT):
                break
            start -= 1
        self._starts = [start]  # token indices known to start a character
        self._base_at, self._base = None, ""

    def push(self, token: int, final: bool = False) -> str:
        """The text `token` adds ("" while it ends inside a character, unless final)."""
        self.ids.append(token)
        return self._take(final)

    def flush(self) -> str:
        """Whatever waits for the rest of a character (it never came): its replacement text."""
        return self._take(True) if self.done < len(self.ids) else ""

    def _take(self, final: bool) -> str:
        while len(self._starts) > 1 and self._starts[1] <= self.done - _WINDOW:
            self._starts.pop(0)
        start = self._starts[0]
        if self._base_at != (start, self.done):
            self._base_at, self._base = (start, self.done), self.codec.decode(self.ids[start:self.done])
        cur = self.codec.decode(self.ids[start:])
        if not final and cur.endswith(REPLACEMENT):
            return ""
        piece = cur[len(self._base):] if cur.startswith(self._base) else self.codec.decode(self.ids[self.done:])
        self.done = len(self.ids)
        if piece and not piece.endswith(REPLACEMENT):
            self._starts.append(self.done)
        return piece


def token_texts(codec: TextCodec, ids: list[int]) -> list[str]:
    """Each token's share of decode(ids) (see Detokenizer); the pieces join to the whole text."""
    d = Detokenizer(codec)
    return [d.push(t, final=i == len(ids) - 1) for i, t in enumerate(ids)]


def offsets(pieces: list[str], start: int = 0) -> list[int]:
    out = []
    for p in pieces:
        out.append(start)
        start += len(p)
    return out


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
