"""Tokenizers stored beside a checkpoint: sentencepiece (the shipped model's) and HF tokenizer.json
(what the published Mamba checkpoints carry), both built or shipped locally."""
from pathlib import Path

import pytest

from megatron_ssm.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "megatron_ssm" / "assets" / "tiny-mamba2"
CODE = "def f(x):\n\tif x:\n        return {'a': [1, 2]}  # café ✓\n"


def test_sentencepiece_round_trip_keeps_whitespace():
    tok = Tokenizer(ASSETS)
    ids = tok.encode(CODE, add_bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == CODE
    assert tok.eos_id is not None and tok.vocab_size == 4096


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([CODE * 20, (ASSETS / "heldout.txt").read_text()[:20000]],
                           trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    assert tok.path.name == "tokenizer.json" and tok.vocab_size == hf.get_vocab_size()
    ids = tok.encode(CODE)
    assert ids == hf.encode(CODE).ids and tok.decode(ids) == CODE


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer(tmp_path)
