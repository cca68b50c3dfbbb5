"""Tokenizers stored beside a checkpoint: sentencepiece `tokenizer.model`, or HF `tokenizer.json`."""
from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.model", "tokenizer.json"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.path = path
        if path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer  # optional: only for HF BPE tokenizers

            self._hf = HFTokenizer.from_file(str(path))
            self._sp = None
        else:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self._hf = None

    @property
    def bos_id(self) -> int | None:
        if self._sp is not None:
            return self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        return None

    @property
    def eos_id(self) -> int | None:
        if self._sp is not None:
            return self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        return None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() if self._sp is not None else self._hf.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._sp.encode(text) if self._sp is not None else self._hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + list(ids)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids)
