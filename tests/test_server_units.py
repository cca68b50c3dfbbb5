"""The server's pieces without a server: sampling at tiny temperatures, the vocab-parallel top-k,
the engine's forks (n > 1), per-token text of multi-byte prompts, and the stop token's log-prob."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_models import build_hf_model, fresh_seed, hf_config, save_hf

ASSET = Path(__file__).resolve().parents[1] / "megatron_ssm" / "assets" / "tiny-mamba2"


# ---- sampling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-40, 1e-45, 1e-30, 1e-8])
def test_tiny_temperature_samples_the_best_token_without_nan(temperature):
    """1e-40 is inside the accepted range; dividing logits by it overflowed to inf and the
    probabilities to NaN (the server answered '????????')."""
    from megatron_ssm.inference.sampling import SamplingParams, draw, scale_logits

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, generator=g) * 5
    logits[250:] = float("-inf")  # vocabulary padding
    assert not torch.isnan(torch.softmax(scale_logits(logits, temperature), -1)).any()
    params = SamplingParams(temperature=temperature, top_k=0, top_p=0.9, seed=seed)
    picks = {draw(logits, params, torch.Generator().manual_seed(seed + i)) for i in range(20)}
    assert picks == {int(logits.argmax())}, f"seed {seed}"


def _rank_topk(seed: int, k: int):
    from megatron_ssm.inference.sampling import VocabShard, vocab_parallel_topk
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    vocab, padded = 250, 256  # at TP 2, 128 ids per rank, of which 122 real on rank 1
    per_rank = padded // tp.size
    full = torch.randn(5, padded, generator=g)
    full[0, 3] = full[0, 200] = full[0].max() + 1  # a tie across ranks: the lower id comes first
    full[:, vocab:] = float("-inf")
    local = full[:, tp.rank * per_rank:(tp.rank + 1) * per_rank]
    vals, ids = vocab_parallel_topk(local, k, VocabShard(tp.rank * per_rank, vocab, tp))
    return vals, ids, full[:, :vocab]


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_parallel_topk_equals_log_softmax_topk(ranks, tp):
    seed = fresh_seed()
    for k in (1, 5, 20):
        out = ranks(tp).run(_rank_topk, seed, k)
        vals, ids, full = out[0]
        ref = torch.log_softmax(full, -1)
        want_vals, _ = ref.topk(k, -1)
        assert torch.allclose(vals, want_vals, atol=1e-5), f"seed {seed}"
        assert torch.allclose(ref.gather(1, ids), vals, atol=1e-5), f"seed {seed}"  # the ids hold those values
        if tp > 1 and k > 1:
            assert ids[0, :2].tolist() == [3, 200], f"seed {seed}: a tie across ranks goes to the lower id"
        for v, i, _ in out[1:]:  # every rank holds the same answer
            assert torch.equal(v, vals) and torch.equal(i, ids)


# ---- the engine's forks ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp2_ckpt(tmp_path_factory):
    from megatron_ssm.checkpoint.convert import convert

    root = tmp_path_factory.mktemp("fork")
    hf_dir = save_hf(build_hf_model(hf_config("mamba2"), fresh_seed()), root / "hf")
    convert(hf_dir, str(root / "tp2"), 2, progress=False)
    return str(root / "tp2")


def _rank_forks(ckpt, prompt, seed):
    from megatron_ssm.inference.engine import Engine, EngineConfig, Request
    from megatron_ssm.inference.sampling import SamplingParams
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    def engine():
        return Engine(load_model(ckpt, tp_context(torch.device("cpu"))), EngineConfig(max_batch=4))

    def run(eng, reqs):
        ids = [eng.add_request(r) for r in reqs]
        out, tops = {}, {}
        while eng.has_work():
            for o in eng.step():
                out.setdefault(o.request_id, []).append(o.token)
                tops.setdefault(o.request_id, []).append(o.top_logprobs)
        return ids, out, tops

    params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    eng = engine()
    calls = []
    forward = eng.model.forward
    eng.model.forward = lambda tokens, *a, **kw: (calls.append(tokens.shape[1]), forward(tokens, *a, **kw))[1]
    [first], forked, tops = run(eng, [Request(prompt, 6, params, logprobs=True, top_logprobs=3, n=3)])
    prefills = sum(1 for L in calls if L > 1)
    alone = []
    for i in range(3):
        p = SamplingParams(temperature=0.9, top_p=0.95, seed=seed + i)
        [rid], out, _ = run(engine(), [Request(prompt, 6, p)])
        alone.append(out[rid])
    return [forked[first + i] for i in range(3)], alone, prefills, [tops[first + i] for i in range(3)]


def test_fork_n_prefills_once_and_equals_separately_seeded_requests(ranks, tp2_ckpt):
    seed = fresh_seed()
    prompt = torch.randint(3, 250, (37,), generator=torch.Generator().manual_seed(seed)).tolist()
    forked, alone, prefills, tops = ranks(2).run(_rank_forks, tp2_ckpt, prompt, seed)[0]
    assert forked == alone, f"seed {seed}"
    assert prefills == 1, f"seed {seed}: {prefills} prefill forwards for one prompt forked 3 ways"
    assert len({tuple(t) for t in forked}) > 1, f"seed {seed}: the forks drew the same tokens"
    assert all(len(t) == 3 and t[0][1] >= t[1][1] >= t[2][1] for fork in tops for t in fork)


# ---- text --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def codec():
    from megatron_ssm.server.text import TextCodec
    from megatron_ssm.tokenizer import Tokenizer

    return TextCodec(Tokenizer(ASSET))


@pytest.mark.parametrize("text", ["héllo wörld €", "日本語のテキスト and ü", "def f():\n  return 'ß'", "😀 x 😀😀"])
def test_token_texts_join_to_the_text_with_whole_characters(codec, text):
    """Byte-fallback pieces (<0xC3>) came back as pieces that did not join to the prompt, with
    offsets running past it; now a token inside a character gets "" and the one completing it
    gets the character."""
    from megatron_ssm.server.text import offsets, token_texts

    ids = codec.encode(text)
    pieces = token_texts(codec, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    offs = offsets(pieces)
    assert offs == sorted(offs) and all(0 <= o <= len(text) for o in offs)
    for p, o in zip(pieces, offs):
        assert text[o:o + len(p)] == p
    assert any(codec.piece(t).startswith("<0x") for t in ids) or text.isascii()


def test_stop_token_keeps_its_logprob_for_scoring(codec):
    """lm-eval scores `echo` + max_tokens 1 + logprobs and drops the last entry (the generated
    token). When that token was end-of-text the server left it out, so lm-eval lost the scored
    text's last token instead."""
    from megatron_ssm.inference.engine import TokenOutput
    from megatron_ssm.server.app import Choice, _logprobs_obj
    from megatron_ssm.server.protocol import CompletionRequest, Job, ModelInfo

    info = ModelInfo("m", 4096, 100, eos_id=2, bos_id=1, codec=codec)
    prompt = codec.encode("x = 1")
    job = Job(prompt, 1, stop_ids=(2,), logprobs=True, prompt_logprobs=True, top_logprobs=1)
    req = CompletionRequest([None], [job], 1, 1, False, False, True, 1, [], "m")
    c = Choice(job, info, keep_stop_token=False)
    plps = [-1.0 - i for i in range(len(prompt) - 1)]
    c.on_event("prompt_logprobs", TokenOutput(0, 2, -0.05, True, "stop", plps, [(2, -0.05)],
                                              [[(t, lp)] for t, lp in zip(prompt[1:], plps)]))
    assert c.on_event("token", TokenOutput(0, 2, -0.05, True, "stop", top_logprobs=[(2, -0.05)]))
    lp = _logprobs_obj(info, req, c, 0, len(c.ids), len("x = 1"), True)
    assert lp["token_logprobs"] == [None] + plps + [-0.05]
    assert lp["token_logprobs"][len(prompt) - 1:-1] == [plps[-1]]  # what lm-eval reads for the last token
    assert lp["tokens"][-1] == "</s>" and c.text == "" and c.finish == "stop"
    assert lp["top_logprobs"][-1] == {"</s>": -0.05}


def test_continuation_text_after_a_prompt_ending_mid_script(codec):
    """Generated multi-byte text after a prompt of multi-byte text: the decoding window must not
    start inside a character (a byte-fallback decoder then garbles the whole run)."""
    from megatron_ssm.server.text import Detokenizer

    prompt, more = codec.encode("日本語のテキスト"), codec.encode("日本語のテキスト and ü")
    d = Detokenizer(codec, prompt)
    pieces = [d.push(t, final=i == len(more) - 1) for i, t in enumerate(more)]
    assert "".join(pieces) == codec.decode(prompt + more)[len(codec.decode(prompt)):]


@pytest.mark.parametrize("flag,marker", [("stop_on_eol", "\n"), ("stop_on_double_eol", "\n\n"), (None, None)])
def test_megatron_stop_on_eol_ends_at_the_first_newline(codec, flag, marker):
    """Megatron's stop_on_eol / stop_on_double_eol: generation ends with the token that brings the
    first newline (or blank line) into the text; without either flag it runs to the last token.
    The expected cut is found by decoding growing prefixes, not by the server's text code."""
    from megatron_ssm.inference.engine import TokenOutput
    from megatron_ssm.server.app import Choice
    from megatron_ssm.server.protocol import Job, ModelInfo

    info = ModelInfo("m", 4096, 100, eos_id=2, bos_id=1, codec=codec)
    prompt = codec.encode("def f():")
    generated = codec.encode("  x = 1\n  y = 2\n\n  return x")
    job = Job(prompt, len(generated), stop_ids=(2,))
    c = Choice(job, info, keep_stop_token=True, **({flag: True} if flag else {}))
    events = [TokenOutput(0, t, None, i == len(generated) - 1, "length" if i == len(generated) - 1 else None)
              for i, t in enumerate(generated)]
    stopped_at = next(i for i, o in enumerate(events) if c.on_event("token", o))
    full = codec.decode(generated)
    if marker is None:
        assert stopped_at == len(generated) - 1 and c.finish == "length" and c.text == full
        return
    want = next(k for k in range(1, len(generated) + 1) if marker in codec.decode(generated[:k]))
    assert stopped_at == want - 1 and c.finish == "stop"
    assert c.ids == generated[:want] and c.text == full[:full.index(marker) + len(marker)]
