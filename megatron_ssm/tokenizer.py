"""The tokenizer stored beside a checkpoint, and the HF files every checkpoint carries.

One tokenizer everywhere: a directory with HF `tokenizer.json` is read with the `tokenizers`
package, the file transformers' AutoTokenizer, lm-eval and vLLM load from the same directory, so
the server's ids are theirs by construction. A sentencepiece-only directory (`tokenizer.model`, as
Megatron's SentencePieceTokenizer reads) is still served with sentencepiece; the converter gives
every checkpoint it writes the HF files (`write_tokenizer_files`), made from tokenizer.model by
transformers' SentencePiece converter and checked against sentencepiece before they are kept.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

SP_MODEL = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
# Copied as they are when the source has them (transformers 5 saves a chat template on its own).
COPIED_FILES = (SP_MODEL, HF_TOKENIZER, HF_CONFIG, "special_tokens_map.json", "chat_template.jinja",
                "chat_template.json")
# Keys of a source tokenizer_config.json kept when ours is written for a new tokenizer.json; the rest
# (tokenizer_class, add_bos_token, legacy, ...) would change how transformers tokenizes.
KEPT_CONFIG_KEYS = ("chat_template", "model_max_length", "padding_side", "truncation_side")
SENTENCEPIECE = "sentencepiece"
HUGGINGFACE = "huggingface"


class Tokenizer:
    """Tokenizer(dir or file). In a directory tokenizer.json wins; kind="sentencepiece" picks
    tokenizer.model instead (Megatron's --tokenizer-type SentencePieceTokenizer)."""

    def __init__(self, path: str | Path, kind: str | None = None):
        path = Path(path)
        if path.is_dir():
            order = (SP_MODEL, HF_TOKENIZER) if kind == SENTENCEPIECE else (HF_TOKENIZER, SP_MODEL)
            found = next((path / n for n in order if (path / n).is_file()), None)
            if found is None:
                raise FileNotFoundError(f"no {SP_MODEL} or {HF_TOKENIZER} in {path}")
            path = found
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.path = path
        self._sp = self._hf = None
        if path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(path))
            self.kind = HUGGINGFACE
            self._bos, self._eos = (self._special_id(_special_tokens(path.parent).get(k)) for k in ("bos", "eos"))
        else:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self.kind = SENTENCEPIECE
            self._bos, self._eos = (i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id()))

    def _special_id(self, token: str | None) -> int | None:
        return None if token is None else self._hf.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() if self._sp is not None else self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._sp.encode(text) if self._sp is not None else self._hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Special tokens (`</s>`, ...) are left out, as sentencepiece leaves out its
        control pieces and servers leave them out of generated text; skip_special_tokens=False keeps
        them, as AutoTokenizer.decode does, so that decode(encode(text)) == text for any text."""
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)


def _special_tokens(directory: Path) -> dict[str, str]:
    """bos/eos token strings named by tokenizer_config.json (or the older special_tokens_map.json)."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", HF_CONFIG):  # tokenizer_config.json wins
        try:
            raw = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        for key in ("bos", "eos"):
            value = raw.get(f"{key}_token")
            if isinstance(value, dict):  # a serialised AddedToken
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out


# ---- the HF files of a sentencepiece model -------------------------------------------------------

# Text the converted tokenizer must encode exactly as sentencepiece does before it is kept: code,
# whitespace runs, newlines and tabs, accents, CJK, emoji and control characters (byte fallback).
CHECK_TEXTS = (
    "def f(x):\n\tif x:\n        return {'a': [1, 2]}  # café ✓\n",
    "  leading and trailing spaces  ", "\n\n\nthree newlines\r\nand CRLF\t\ttabs", "Hello, world! 123 4567.89",
    "naïve façade Ærøskøbing straße", "日本語のテキストと漢字", "emoji 😀🚀👍🏽 and ZWJ 👩‍💻", "\x00\x07\x1b[0m",
    "ünïcödé\u00a0nbsp\u200bzwsp", " ", "", "a" * 300, "    " * 10 + "x",
)


def sentencepiece_to_hf(model_path: str | Path):
    """A `tokenizers.Tokenizer` that encodes and decodes as the sentencepiece model does, made by
    transformers' converter from the model's own settings (normalizer, byte fallback, user-defined
    pieces); its unknown and control pieces become special tokens. Needs transformers and protobuf
    (reading the model file), which loading the result never does."""
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        raise ImportError("this transformers has no SpmConverter.build_tokenizer_from_spm_proto (transformers 5 has)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab)
    if tok is None:
        raise ValueError(f"{model_path}: transformers cannot convert this sentencepiece model")
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (2, 3)])  # UNKNOWN, CONTROL
    return tok


def _check_same_ids(sp, hf, texts) -> None:
    for text in texts:
        want, got = sp.encode(text), hf.encode(text, add_special_tokens=False).ids
        if want != got:
            raise ValueError(f"the converted tokenizer encodes {text[:40]!r} as {got[:12]}..., "
                             f"sentencepiece as {want[:12]}...")
        if hf.decode(got, skip_special_tokens=False) != sp.decode(want):
            raise ValueError(f"the converted tokenizer decodes {text[:40]!r} differently from sentencepiece")


def hf_tokenizer_config(model_path: str | Path, source_config: dict | None = None) -> dict:
    """tokenizer_config.json for the tokenizer.json made from `model_path`: the plain fast tokenizer
    class (so AutoTokenizer reads tokenizer.json as it is, whatever model the directory holds), the
    model's special tokens, nothing added around the text, and the source's chat template."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                    "clean_up_tokenization_spaces": False}
    for key, i in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                   ("pad_token", sp.pad_id())):
        if i >= 0:
            config[key] = sp.id_to_piece(i)
    for key in KEPT_CONFIG_KEYS:
        if source_config and key in source_config:
            config[key] = source_config[key]
    return config


def write_hf_files(model_path: str | Path, dest_dir: str | Path, source_config: dict | None = None) -> None:
    """tokenizer.json + tokenizer_config.json for a sentencepiece model, after checking that they
    give sentencepiece's ids on CHECK_TEXTS and on every piece of the vocabulary."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    hf = sentencepiece_to_hf(model_path)
    pieces = [sp.decode([i]) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    _check_same_ids(sp, hf, CHECK_TEXTS + ("".join(pieces), " ".join(pieces)))
    dest_dir = Path(dest_dir)
    hf.save(str(dest_dir / HF_TOKENIZER))
    config = hf_tokenizer_config(model_path, source_config)
    (dest_dir / HF_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def write_tokenizer_files(source_dir: str | Path, dest_dir: str | Path) -> None:
    """Give `dest_dir` the tokenizer of `source_dir`: its files copied, plus tokenizer.json and
    tokenizer_config.json made from tokenizer.model when the source has only that (without them
    AutoTokenizer would take the tokenizer of the model type, not this one)."""
    source_dir, dest_dir = Path(source_dir), Path(dest_dir)
    for name in COPIED_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, dest_dir / name)
    if (source_dir / HF_TOKENIZER).is_file():
        if not (source_dir / HF_CONFIG).is_file():  # AutoTokenizer would fall back to the model type's class
            (dest_dir / HF_CONFIG).write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
        return
    if not (source_dir / SP_MODEL).is_file():
        return
    try:
        source_config = json.loads((source_dir / HF_CONFIG).read_text()) if (source_dir / HF_CONFIG).is_file() else None
    except ValueError:
        source_config = None
    try:
        write_hf_files(source_dir / SP_MODEL, dest_dir, source_config)
    except Exception as e:  # noqa: BLE001 - missing packages, an unreadable model, ids that differ: all warn
        for name in (HF_TOKENIZER, HF_CONFIG):
            (dest_dir / name).unlink(missing_ok=True)
        if source_config is not None:
            shutil.copy2(source_dir / HF_CONFIG, dest_dir / HF_CONFIG)
        warnings.warn(f"{source_dir / SP_MODEL} was copied without an HF tokenizer.json ({e}); transformers' "
                      f"AutoTokenizer will not read this checkpoint's tokenizer. Install transformers>=5 and "
                      f"protobuf and convert again to add it.", stacklevel=2)
