"""Tokenizers stored beside a checkpoint: the shipped model's and every converted checkpoint's HF files
load in transformers' AutoTokenizer (without protobuf or tiktoken) to exactly the ids of our
tokenizer and of the sentencepiece model they were made from."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece

from hf_models import build_hf_model, fresh_seed, hf_config, save_hf
from megatron_ssm.checkpoint.convert import convert
from megatron_ssm.tokenizer import Tokenizer, write_tokenizer_files

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "megatron_ssm" / "assets" / "tiny-mamba2"
CODE = "def f(x):\n\tif x:\n        return {'a': [1, 2]}  # café ✓\n"
SPECIAL_TEXT = ("<s>", "</s>", "<unk>", "<pad>")
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

# Run in a child without protobuf and tiktoken (imports of them fail there), as a user's machine may be.
AUTO_TOKENIZER = """
import json, sys
for name in ("google", "google.protobuf", "tiktoken"):
    sys.modules[name] = None
from transformers import AutoTokenizer
texts = json.loads(sys.stdin.read())
out = {}
for d in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(d)
    ids = [tok(t)["input_ids"] for t in texts]
    out[d] = {"ids": ids, "decoded": [tok.decode(i) for i in ids], "bos": tok.bos_token_id, "eos": tok.eos_token_id,
              "chat_template": tok.chat_template}
print(json.dumps(out))
"""


def auto_tokenizer(dirs: list[Path], texts: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-c", AUTO_TOKENIZER, *map(str, dirs)], input=json.dumps(texts),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return {Path(k): v for k, v in json.loads(res.stdout).items()}


def random_texts(seed: int, n: int = 240) -> list[str]:
    """Code-like text with non-ASCII letters, CJK, emoji (with modifiers and ZWJ), whitespace runs,
    tabs and newlines, control characters, and now and then a special token's text."""
    rng = random.Random(seed)
    atoms = (list("abcdefghijklmnopqrstuvwxyzABCDEFXYZ0123456789_()[]{}:;.,'\"#=+-*/\\<>|&%$@!?~`^")
             + list("éüßçñøÆœ✓€£¥°±×÷漢字日本語한국어привет") + ["😀", "🚀", "👍🏽", "👩\u200d💻", "🇫🇷"]
             + [" ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\u00a0", "\u200b", "\x00", "\x1b", "\ufeff"]
             + ["def ", "return ", "self.", "import ", "    if ", "__init__"])
    texts = []
    for i in range(n):
        parts = [rng.choice(atoms) for _ in range(rng.randint(0, 60))]
        if i % 10 == 0:
            parts.insert(rng.randint(0, len(parts)), rng.choice(SPECIAL_TEXT))
        texts.append("".join(parts))
    return texts + [CODE, "", " ", "\n", " leading", "trailing ", "a" * 500, (ASSETS / "heldout.txt").read_text()[:3000]]


def test_shipped_and_converted_tokenizers_give_autotokenizer_our_ids(tmp_path):
    seed = fresh_seed()
    texts = random_texts(seed)
    # a source with only tokenizer.model (and a chat template): the converter writes the HF files
    hf = save_hf(build_hf_model(hf_config("mamba2", vocab=4096), seed), tmp_path / "hf")
    shutil.copy(ASSETS / "tokenizer.model", hf / "tokenizer.model")
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "add_bos_token": True}))
    convert(hf, tmp_path / "tp2", 2, progress=False)
    convert(tmp_path / "tp2", tmp_path / "hf-out", to_hf=True, progress=False)
    dirs = [ASSETS, tmp_path / "tp2", tmp_path / "hf-out"]
    for d in dirs:
        assert (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file(), d
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ASSETS / "tokenizer.model"))
    theirs = auto_tokenizer(dirs, texts)
    for d in dirs:
        ours = Tokenizer(d)
        assert ours.kind == "huggingface" and ours.path.name == "tokenizer.json"
        assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.get_piece_size())
        assert (theirs[d]["bos"], theirs[d]["eos"]) == (sp.bos_id(), sp.eos_id())
        for text, ids, decoded in zip(texts, theirs[d]["ids"], theirs[d]["decoded"]):
            assert ours.encode(text) == ids, f"seed {seed}, {d.name}: {text!r}"
            assert ours.decode(ids, skip_special_tokens=False) == decoded == text, f"seed {seed}, {d.name}: {text!r}"
            if not any(s in text for s in SPECIAL_TEXT):  # sentencepiece reads those as plain text
                assert sp.encode(text) == ids, f"seed {seed}, {d.name}: {text!r}"
                assert ours.decode(ids) == sp.decode(ids) == text, f"seed {seed}, {d.name}: {text!r}"
            else:  # generated text leaves special tokens out
                assert ours.decode(ids) == decoded.replace("<unk>", "").replace("<s>", "").replace(
                    "</s>", "").replace("<pad>", ""), f"seed {seed}, {d.name}: {text!r}"
    assert theirs[ASSETS]["chat_template"] is None
    for d in dirs[1:]:  # the source's chat template passes through; its add_bos_token does not
        assert theirs[d]["chat_template"] == CHAT_TEMPLATE
        assert json.loads((d / "tokenizer_config.json").read_text())["add_bos_token"] is False


def test_sentencepiece_round_trip_keeps_whitespace():
    tok = Tokenizer(ASSETS, kind="sentencepiece")  # what --tokenizer-type SentencePieceTokenizer reads
    assert tok.kind == "sentencepiece" and tok.path.name == "tokenizer.model"
    ids = tok.encode(CODE, add_bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == CODE
    assert tok.eos_id is not None and tok.vocab_size == 4096
    assert Tokenizer(ASSETS).encode(CODE, add_bos=True) == ids  # the tokenizer.json made from it


def _trained_bpe(path: Path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([CODE * 20, (ASSETS / "heldout.txt").read_text()[:20000]],
                           trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir()
    hf.save(str(path / "tokenizer.json"))
    return hf


def test_hf_tokenizer_json_source_is_copied_and_readable_by_autotokenizer(tmp_path):
    hf = _trained_bpe(tmp_path / "src")
    tok = Tokenizer(tmp_path / "src")
    assert tok.path.name == "tokenizer.json" and tok.vocab_size == hf.get_vocab_size()
    ids = tok.encode(CODE)
    assert ids == hf.encode(CODE).ids and tok.decode(ids) == CODE
    # a GPT-NeoX-style source without tokenizer_config.json: one is written, naming the plain fast class
    write_tokenizer_files(tmp_path / "src", (tmp_path / "dst").mkdir() or tmp_path / "dst")
    assert json.loads((tmp_path / "dst" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    texts = random_texts(fresh_seed(), 40)
    theirs = auto_tokenizer([tmp_path / "dst"], texts)[tmp_path / "dst"]
    assert theirs["ids"] == [Tokenizer(tmp_path / "dst").encode(t) for t in texts]


def test_without_the_converter_the_model_is_copied_with_a_warning(tmp_path, monkeypatch):
    from megatron_ssm import tokenizer

    def unavailable(*args):
        raise ImportError("No module named 'google.protobuf'")

    monkeypatch.setattr(tokenizer, "sentencepiece_to_hf", unavailable)
    (tmp_path / "src").mkdir()
    shutil.copy(ASSETS / "tokenizer.model", tmp_path / "src")
    (tmp_path / "dst").mkdir()
    with pytest.warns(UserWarning, match="without an HF tokenizer.json.*google.protobuf"):
        write_tokenizer_files(tmp_path / "src", tmp_path / "dst")
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["tokenizer.model"]
    assert Tokenizer(tmp_path / "dst").kind == "sentencepiece"


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer(tmp_path)
