"""The server's pieces without a server: sampling at tiny temperatures, the vocab-parallel top-k,
the engine's forks (n > 1), per-token text of multi-byte prompts, and the stop token's log-prob."""
from __future__ import annotations

import re
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


# ---- request parsing (server/protocol.py) without a server ------------------------------------------

def _info(**kw):
    from megatron_ssm.server.protocol import ModelInfo

    return ModelInfo(**{"name": "m", "vocab_size": 100, "max_sequence_length": None, "eos_id": 2, "bos_id": 1,
                        "codec": None, "max_prompts": 3, **kw})


@pytest.mark.parametrize("body,message,param", [
    ({"prompt": []}, "prompt is an empty list", "prompt"),
    ({"prompt": [5], "max_tokens": 0}, r"max_tokens=0 is only allowed with echo=true \(scoring the prompt\)", "max_tokens"),
    ({"prompt": [5], "suffix": "x"}, "suffix is not supported by this server", "suffix"),
    ({"prompt": [5], "n": 2, "best_of": 1}, r"best_of \(1\) must be >= n \(2\)", "best_of"),
    ({"prompt": [5], "best_of": 129}, "best_of must be <= 128, got 129", "best_of"),
    ({"prompt": [5], "stream_options": {"include_usage": True}}, "stream_options is only allowed with stream=true",
     "stream_options"),
    ({"prompt": [5], "stream": True, "best_of": 2}, r"best_of > n cannot be streamed \(the best are known only at the end\)",
     "best_of"),
    ({"prompt": [5], "n": 2, "max_tokens": 0, "echo": True}, "n and best_of > 1 need max_tokens >= 1", "n"),
    ({"prompt": [5], "stop": ""}, "stop sequences must not be empty strings", "stop"),
    ({"prompt": [5], "presence_penalty": 0.5}, r"presence_penalty is not supported by this server \(only 0\)",
     "presence_penalty"),
    ({"prompt": [5], "frequency_penalty": -1.0}, r"frequency_penalty is not supported by this server \(only 0\)",
     "frequency_penalty"),
    ({"prompt": [5], "logit_bias": {"5": 1.0}}, "logit_bias is not supported by this server", "logit_bias"),
    ({"prompt": [[5], [6], [7], [8]]}, "at most 3 prompts per request, got 4", "prompt"),
    ({"prompt": "text"}, "this server has no tokenizer, so it cannot take text prompts", "prompt"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_completion_requests_refused_by_rule(body, message, param):
    from megatron_ssm.server.protocol import ApiError, CompletionBody, completion_jobs

    with pytest.raises(ApiError) as e:
        completion_jobs(CompletionBody(**body), _info())
    assert e.value.status == 400 and e.value.param == param and re.match(f"^{message}", e.value.message), e.value.message
    assert e.value.body() == {"message": e.value.message, "error": {"message": e.value.message, "type":
                              "invalid_request_error", "param": param, "code": 400}}


def test_completion_jobs_carry_each_field():
    """What each OpenAI field becomes, written out: defaults (16 tokens, T = 1, EOS as the stop id),
    every fork of every prompt seeded seed + its choice index, best_of > n asking for log-probs,
    echo with logprobs scoring the prompt, top_k -1 = no limit, stop ids past the vocabulary dropped."""
    from megatron_ssm.inference.sampling import SamplingParams
    from megatron_ssm.server.protocol import CompletionBody, Job, completion_jobs

    req = completion_jobs(CompletionBody(prompt=[[5, 6], [7]], n=2, best_of=3, seed=40, top_k=-1, top_p=0.5,
                                         temperature=0.7, stop=["x", "yz"], stop_token_ids=[9, 150]), _info())
    assert (req.n, req.best_of, req.stream, req.include_usage, req.echo, req.logprobs, req.stop, req.model) == \
        (2, 3, False, False, False, None, ["x", "yz"], "m")
    assert req.jobs == [Job([5, 6], 16, SamplingParams(0.7, 0, 0.5, 40), (2, 9), logprobs=True, n=3),
                        Job([7], 16, SamplingParams(0.7, 0, 0.5, 43), (2, 9), logprobs=True, n=3)]
    req = completion_jobs(CompletionBody(prompt=[5, 6], max_tokens=0, echo=True, logprobs=2, ignore_eos=True,
                                         stop="q", model="other", stream=False), _info())
    assert req.jobs == [Job([5, 6], 0, SamplingParams(1.0, 0, 1.0, req.jobs[0].sampling.seed), (), logprobs=True,
                            prompt_logprobs=True, top_logprobs=2)]
    assert (req.stop, req.model, req.echo, req.logprobs, req.prompt_texts) == (["q"], "other", True, 2, [None])
    greedy = completion_jobs(CompletionBody(prompt=[5], temperature=0, seed=3, top_k=5), _info()).jobs[0].sampling
    assert greedy == SamplingParams() and \
        completion_jobs(CompletionBody(prompt=[5], top_k=1), _info()).jobs[0].sampling == SamplingParams()
    streamed = completion_jobs(CompletionBody(prompt=[5], stream=True, stream_options={"include_usage": True}), _info())
    assert streamed.stream and streamed.include_usage


@pytest.mark.parametrize("body,message,param", [
    ({"prompts": ["a"] * 4}, "Maximum number of prompts is 3", "prompts"),
    ({"prompts": ["a"], "tokens_to_generate": 0}, "tokens_to_generate=0 implies logprobs should be True",
     "tokens_to_generate"),
    ({"prompts": ["a"], "top_p_decay": 0.5}, "top_p_decay is not supported by this server", "top_p_decay"),
    ({"prompts": ["a"], "top_p_bound": 0.5}, "top_p_bound is not supported by this server", "top_p_bound"),
    ({"prompts": [""]}, "Empty prompts require add_BOS=true", "prompts"),
    ({"prompts": ["a"], "prevent_newline_after_colon": True},
     "prevent_newline_after_colon is not supported by this server", "prevent_newline_after_colon"),
    ({"prompts": ["a"], "beam_width": 2}, r"beam search \(beam_width\) is not supported by this server", "beam_width"),
    ({"prompts": ["a"]}, "this server has no tokenizer", "prompts"),
])
def test_megatron_requests_refused_by_rule(body, message, param):
    from megatron_ssm.server.protocol import ApiError, MegatronBody, megatron_jobs

    with pytest.raises(ApiError) as e:
        megatron_jobs(MegatronBody(**body), _info())
    assert e.value.param == param and re.match(f"^{message}", e.value.message), e.value.message


@pytest.mark.parametrize("body,message", [
    ({"max_len": 3, "prompts": ["a"]}, "max_len is no longer used. Replace with tokens_to_generate"),
    ({"sentences": ["a"]}, "sentences is no longer used. Replace with prompts"),
    ({"tokens_to_generate": 3}, "prompts argument required"),
    ({"prompts": "a"}, "prompts is not a list of strings"),
    ({"prompts": ["a", 3]}, "prompts is not a list of strings"),
    ({"prompts": []}, "prompts is empty"),
])
def test_megatron_body_uses_megatrons_own_messages(body, message):
    from pydantic import ValidationError

    from megatron_ssm.server.protocol import MegatronBody

    with pytest.raises(ValidationError, match=re.escape(message)):
        MegatronBody(**body)


def test_megatron_jobs_carry_each_field(codec):
    """add_BOS prepends the end-of-document id (EOS, else BOS); stop_token defaults to EOS and is
    dropped outside the vocabulary; each prompt i samples with random_seed + i; top_p 0 = no limit."""
    from megatron_ssm.inference.sampling import SamplingParams
    from megatron_ssm.server.protocol import Job, MegatronBody, megatron_jobs

    info = _info(codec=codec, vocab_size=codec.tokenizer.vocab_size)
    body = MegatronBody(prompts=["ab", ""], tokens_to_generate=4, temperature=0.5, top_k=3, random_seed=10,
                        add_BOS=True, logprobs=True, stop_on_eol=True, no_log=True)
    req = megatron_jobs(body, info)
    assert req.jobs == [Job([2] + codec.encode("ab"), 4, SamplingParams(0.5, 3, 1.0, 10), (2,), logprobs=True,
                            prompt_logprobs=True),
                        Job([2], 4, SamplingParams(0.5, 3, 1.0, 11), (2,), logprobs=True, prompt_logprobs=True)]
    assert (req.prompts, req.logprobs, req.stop_on_eol, req.stop_on_double_eol, req.no_log) == \
        (["ab", ""], True, True, False, True)
    other = megatron_jobs(MegatronBody(prompts=["ab"], stop_token=10**6, top_p=0.5, temperature=0), _info(
        codec=codec, vocab_size=codec.tokenizer.vocab_size, eos_id=None))
    assert other.jobs == [Job(codec.encode("ab"), 64, SamplingParams(), ())]
    with pytest.raises(Exception, match="neither an end-of-document nor a BOS token"):
        megatron_jobs(MegatronBody(prompts=["a"], add_BOS=True), _info(codec=codec, eos_id=None, bos_id=None))
    bos_only = megatron_jobs(MegatronBody(prompts=["a"], add_BOS=True, stop_token=7), _info(codec=codec, eos_id=None))
    assert bos_only.jobs[0].prompt[0] == 1 and bos_only.jobs[0].stop_ids == (7,)


def test_megatron_jobs_boundaries(codec):
    """The prompt limit admits exactly max_prompts; stop token 0 and vocab_size - 1 are kept, vocab_size
    dropped; with no EOS and no stop_token nothing stops early; add_BOS without any document token is
    refused naming add_BOS."""
    from megatron_ssm.server.protocol import ApiError, MegatronBody, megatron_jobs

    vocab = codec.tokenizer.vocab_size
    info = _info(codec=codec, vocab_size=vocab)
    assert len(megatron_jobs(MegatronBody(prompts=["a"] * 3), info).jobs) == 3  # max_prompts = 3
    for stop, kept in ((0, (0,)), (vocab - 1, (vocab - 1,)), (vocab, ()), (-1, ())):
        assert megatron_jobs(MegatronBody(prompts=["a"], stop_token=stop), info).jobs[0].stop_ids == kept, stop
    no_eos = _info(codec=codec, vocab_size=vocab, eos_id=None)
    assert megatron_jobs(MegatronBody(prompts=["a"]), no_eos).jobs[0].stop_ids == ()
    with pytest.raises(ApiError) as e:
        megatron_jobs(MegatronBody(prompts=["a"], add_BOS=True), _info(codec=codec, eos_id=None, bos_id=None))
    assert (e.value.message, e.value.param, e.value.status) == (
        "add_BOS: the tokenizer has neither an end-of-document nor a BOS token", "add_BOS", 400)


NO_TOKENIZER = ("this server has no tokenizer, so it cannot take text prompts; start it with --tokenizer-model "
                "or send token ids (OpenAI: prompt as a list of ints)")


@pytest.mark.parametrize("endpoint", ["completions", "megatron", "chat"])
def test_text_without_a_tokenizer_is_refused_with_the_whole_message(endpoint):
    from megatron_ssm.server.protocol import (ApiError, ChatBody, CompletionBody, MegatronBody, chat_jobs,
                                              completion_jobs, megatron_jobs)

    call, param = {"completions": (lambda: completion_jobs(CompletionBody(prompt="x"), _info()), "prompt"),
                   "megatron": (lambda: megatron_jobs(MegatronBody(prompts=["x"]), _info()), "prompts"),
                   "chat": (lambda: chat_jobs(ChatBody(messages=[{"role": "user", "content": "x"}]),
                                              _info(chat_template="{{ messages }}")), "messages")}[endpoint]
    with pytest.raises(ApiError) as e:
        call()
    assert (e.value.message, e.value.param, e.value.status) == (NO_TOKENIZER, param, 400)


def test_a_lone_surrogate_is_refused_where_it_is():
    from pydantic import ValidationError

    from megatron_ssm.server.protocol import CompletionBody

    with pytest.raises(ValidationError) as e:
        CompletionBody(prompt="ab\udfffc")
    messages = [err["msg"] for err in e.value.errors()]
    assert "Value error, not valid text: surrogates not allowed at character 2" in messages, messages


def test_an_unseeded_request_keeps_its_forks_consecutive(monkeypatch):
    """Without a seed the server draws one; its forks sample with drawn + choice index, so the draw
    leaves room below MAX_SEED for every fork (no wrap-around onto another request's seeds).
    randbits is made to return the largest value it can."""
    import secrets

    from megatron_ssm.server.protocol import MAX_N, MAX_SEED, CompletionBody, completion_jobs

    drawn = []
    monkeypatch.setattr(secrets, "randbits", lambda k: drawn.append(2**k - 1) or 2**k - 1)
    req = completion_jobs(CompletionBody(prompt=[[5], [6], [7]], n=MAX_N, temperature=0.5), _info())
    assert len(drawn) == 3 and all(d + 2 * MAX_N < MAX_SEED for d in drawn), drawn
    assert [j.sampling.seed for j in req.jobs] == [d + i * MAX_N for i, d in enumerate(drawn)]


# ---- chat parsing (chat_prompt, chat_jobs) without a server -------------------------------------------

# block tags on their own lines: the whitespace is what trim_blocks / lstrip_blocks decide
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}\n"
                 "    {% if m['role'] == 'tool' %}{{ raise_exception('no tools in this chat') }}{% endif %}\n"
                 "<|{{ m['role'] }}{% if m['name'] is defined %}:{{ m['name'] }}{% endif %}|>"
                 "{{ m['content'] if m['content'] is not none else '(none)' }}{{ eos_token }}\n"
                 "{% endfor %}\n"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}  # tokenizer_config


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(ASSET)


def _chat_info(codec, **kw):
    return _info(codec=codec, vocab_size=codec.tokenizer.vocab_size, chat_template=CHAT_TEMPLATE,
                 special_tokens=SPECIAL, **kw)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_prompt_is_the_template_as_transformers_renders_it(codec, hf_tok, add_generation_prompt):
    """Content as text parts joins them; a name is passed only when given; a None content is left out
    (transformers drops it, so the template sees it undefined); the tokenizer's special tokens are the
    template's variables; trim_blocks and lstrip_blocks as in transformers. Expected: written out by
    hand, and transformers' own apply_chat_template on the shipped tokenizer."""
    from megatron_ssm.server.protocol import ChatBody, chat_prompt

    body = ChatBody(messages=[{"role": "system", "content": "be brief"},
                              {"role": "user", "content": [{"type": "text", "text": "héllo "},
                                                           {"type": "text", "text": "wörld"}], "name": "bob"},
                              {"role": "assistant", "content": None},
                              {"role": "user", "content": "again", "name": ""}],
                    add_generation_prompt=add_generation_prompt)
    got = chat_prompt(body, _chat_info(codec))
    # undefined content is "not none" in jinja and prints as nothing
    want = ("<s><|system|>be brief</s>\n<|user:bob|>héllo wörld</s>\n<|assistant|></s>\n"
            "<|user|>again</s>\n" + ("<|assistant|>" if add_generation_prompt else ""))
    assert got == want
    hf_messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo wörld", "name": "bob"},
                   {"role": "assistant", "content": None}, {"role": "user", "content": "again"}]
    assert got == hf_tok.apply_chat_template(hf_messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)


NO_TEMPLATE = ("this model's tokenizer has no chat template (no chat_template in tokenizer_config.json): use "
               "/v1/completions, or start the server with --chat-template")


@pytest.mark.parametrize("template,messages,message", [
    (None, [{"role": "user", "content": "x"}],
     NO_TEMPLATE),
    ("", [{"role": "user", "content": "x"}],
     NO_TEMPLATE),
    (CHAT_TEMPLATE, [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}],
     "the chat template refused these messages: no tools in this chat"),
])
def test_chat_refusals_by_message(codec, template, messages, message):
    from megatron_ssm.server.protocol import ApiError, ChatBody, chat_jobs, chat_prompt

    for call in (chat_prompt, chat_jobs):
        with pytest.raises(ApiError) as e:
            call(ChatBody(messages=messages), _info(codec=codec, chat_template=template, special_tokens=SPECIAL))
        assert (e.value.message, e.value.param, e.value.status) == (message, "messages", 400), call


def test_chat_top_logprobs_needs_logprobs(codec):
    from megatron_ssm.server.protocol import ApiError, ChatBody, chat_jobs

    for logprobs in (None, False):
        with pytest.raises(ApiError) as e:
            chat_jobs(ChatBody(messages=[{"role": "user", "content": "x"}], top_logprobs=2, logprobs=logprobs),
                      _chat_info(codec))
        assert (e.value.message, e.value.param) == ("top_logprobs needs logprobs=true", "top_logprobs")


def test_chat_jobs_carry_each_field(codec, hf_tok):
    """One job of the rendered prompt's ids (the HF tokenizer's, without special tokens added); the
    sampling fields as for completions; logprobs -> generated tokens' log-probs only (a chat does not
    echo); max_completion_tokens over max_tokens over the context left (context - 1 - prompt, at
    least 1), 4096 with no context limit."""
    from megatron_ssm.inference.sampling import SamplingParams
    from megatron_ssm.server.protocol import ChatBody, CompletionRequest, Job, chat_jobs

    messages = [{"role": "user", "content": "héllo wörld"}]
    prompt = "<s><|user|>héllo wörld</s>\n<|assistant|>"
    ids = hf_tok(prompt, add_special_tokens=False).input_ids
    info = _chat_info(codec)

    req = chat_jobs(ChatBody(messages=messages, n=2, seed=40, temperature=0.7, top_p=0.5, top_k=5, stop=["x"],
                             stop_token_ids=[9], max_tokens=7, logprobs=True, top_logprobs=3), info)
    assert req.prompt == prompt
    assert req.completion == CompletionRequest(
        [prompt], [Job(ids, 7, SamplingParams(0.7, 5, 0.5, 40), (2, 9), logprobs=True, top_logprobs=3, n=2)],
        2, 2, False, False, False, 3, ["x"], "m")

    req = chat_jobs(ChatBody(messages=messages, logprobs=True, ignore_eos=True, model="other", stream=True,
                             stream_options={"include_usage": True}, temperature=0), info).completion
    assert req.jobs == [Job(ids, 4096, SamplingParams(), (), logprobs=True, top_logprobs=0)]
    assert (req.logprobs, req.model, req.stream, req.include_usage, req.echo, req.stop) == \
        (0, "other", True, True, False, [])
    streamed = chat_jobs(ChatBody(messages=messages, stream=True, stream_options={"include_usage": False}), info)
    assert streamed.completion.stream and not streamed.completion.include_usage
    plain = chat_jobs(ChatBody(messages=messages, logprobs=False, top_logprobs=0), info).completion
    assert plain.logprobs is None and not plain.jobs[0].logprobs and plain.jobs[0].top_logprobs == 0
    assert not plain.stream and not plain.include_usage

    def budget(**kw):
        limits = {k: kw.pop(k) for k in ("max_sequence_length",) if k in kw}
        return chat_jobs(ChatBody(messages=messages, **kw), _chat_info(codec, **limits)).completion.jobs[0].max_new_tokens

    L = len(ids)
    assert budget(max_completion_tokens=5, max_tokens=7) == 5 and budget(max_completion_tokens=5) == 5
    assert budget(max_tokens=7, max_sequence_length=L + 3) == 7
    assert budget(max_sequence_length=100) == 100 - 1 - L
    assert budget(max_sequence_length=L + 3) == 2 and budget(max_sequence_length=L + 2) == 1
    assert budget(max_sequence_length=L + 1) == 1 and budget(max_sequence_length=L - 5) == 1
    assert budget() == 4096
