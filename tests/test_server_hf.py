"""The server against HF's own model, through the clients people evaluate with: a tiny random
HF Mamba-2 with an HF tokenizer (tokenizer.json + tokenizer_config.json with a chat template),
converted to TP=2 and served by torchrun; the openai client, lm-evaluation-harness
`local-completions` and a schemathesis run against /openapi.json.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hf_models import build_hf_model, fresh_seed, hf_config, hf_greedy, save_hf
from test_server import ENV, ROOT, Server

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

NAME = "tiny-hf"
MAX_LEN = 160  # the server's context budget (keeps schemathesis' generations short)
EOS = 2
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _corpus() -> list[str]:
    lines = []
    for p in sorted((ROOT / "megatron_ssm").rglob("*.py"))[:40]:
        lines += p.read_text().splitlines()
    return lines + ["héllo wörld € 日本語 ü ß 😀"] * 20


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(model, tokenizer, HF dir, seed). EOS's output row is scaled up, so that end-of-text is the
    greedy next token after many texts (the case lm-eval's scoring lost a token on)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    seed = fresh_seed()
    model = build_hf_model(hf_config("mamba2", vocab=tok.get_vocab_size(), tied=False), seed)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 8
    hf_dir = save_hf(model, root / "hf")
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": MAX_LEN, "chat_template": TEMPLATE}))
    return model, AutoTokenizer.from_pretrained(hf_dir), hf_dir, seed


@pytest.fixture(scope="module")
def server(hf, tmp_path_factory):
    _, _, hf_dir, _ = hf
    root = tmp_path_factory.mktemp("served")
    res = subprocess.run([sys.executable, "tools/convert_hf.py", "--load-dir", str(hf_dir), "--save-dir",
                          str(root / NAME), "--tp", "2", "--no-progress"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    srv = Server.torchrun(root / NAME, root / "server.log", "--inference-max-seq-length", str(MAX_LEN),
                          "--max-batch-size", "16")
    srv.ckpt = root / NAME
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.kill()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _label(tok, i: int) -> str:
    text = tok.decode([i])
    return text if text and "\ufffd" not in text else tok.convert_ids_to_tokens(i)


def _top(d: dict, k: int) -> dict:
    return dict(sorted(d.items(), key=lambda kv: -kv[1])[:k])


def test_logprobs_top5_equal_hf_top5(hf, server):
    model, tok, _, seed = hf
    c = client(server)
    for prompt in ("def read(path):\n    return", "héllo wörld € and"):
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=5, echo=True,
                                 extra_body={"ignore_eos": True})
        lp = r.choices[0].logprobs
        ids = tok(prompt, add_special_tokens=False).input_ids
        n = len(ids)
        assert len(lp.tokens) == n + 4 and "".join(lp.tokens) == r.choices[0].text
        # the whole sequence, the prompt and HF's own greedy tokens, through HF's model
        gen = ids + hf_greedy(model, ids, 4)
        # (generated end-of-text, not a stop token under ignore_eos, decodes as "" or "</s>")
        assert r.choices[0].text in (tok.decode(gen), tok.decode(gen, skip_special_tokens=True)), f"seed {seed}"
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([gen])).logits[0].float(), -1)
        for pos in range(1, len(gen)):
            vals, top_ids = ref[pos - 1].topk(5)
            want = {_label(tok, i): v for i, v in zip(top_ids.tolist(), vals.tolist())}
            got = _top(lp.top_logprobs[pos], 5)
            assert list(got) == list(want), f"seed {seed}, position {pos}: {got} != {want}"
            assert list(got.values()) == pytest.approx(list(want.values()), abs=1e-3), f"seed {seed}"
            assert lp.token_logprobs[pos] == pytest.approx(ref[pos - 1, gen[pos]].item(), abs=1e-3)


def test_chat_completions_use_the_tokenizer_template(hf, server):
    _, tok, _, seed = hf
    c = client(server)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo, what is 2+2?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    chat = c.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    plain = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text, f"seed {seed}"
    assert chat.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False).input_ids)
    stream = c.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    lp = c.chat.completions.create(model=NAME, messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                   top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5) for e in content)  # greedy
    with pytest.raises(openai.BadRequestError, match="role"):
        c.chat.completions.create(model=NAME, messages=[{"role": "wizard", "content": "x"}], max_tokens=2)


def test_tokenizer_endpoints_match_hf(hf, server):
    _, tok, _, _ = hf
    info = requests.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "</s>" and info["chat_template"] == TEMPLATE
    for text in ("def f(x):\n  return x", "héllo 😀"):
        r = requests.post(server.url + "/tokenize", json={"prompt": text}, timeout=10).json()
        assert r["tokens"] == tok(text, add_special_tokens=False).input_ids
        back = requests.post(server.url + "/detokenize", json={"tokens": r["tokens"]}, timeout=10).json()
        assert back["prompt"] == text


# ---- lm-evaluation-harness -------------------------------------------------------------------------

def _docs(model, tok, seed: int) -> dict[str, list[dict]]:
    """Small task data: texts after which HF's greedy next token is end-of-text and texts after
    which it is not, continuations that are HF's greedy ones (is_greedy true) and random ones."""
    g = torch.Generator().manual_seed(seed)
    lines = [ln.strip() for ln in _corpus() if len(ln.strip()) > 12]
    picks = [lines[i] for i in torch.randint(0, len(lines), (60,), generator=g).tolist()]

    def next_token(text: str) -> int:
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            return int(model(torch.tensor([ids])).logits[0, -1].argmax())

    def greedy(text: str, n: int) -> tuple[list[int], list[int]]:
        ids = tok(text, add_special_tokens=False).input_ids
        return ids, hf_greedy(model, ids, n)

    eos_after, other = [], []
    for text in picks:
        ctx, cont = text[: len(text) // 2], text[len(text) // 2:]
        (eos_after if next_token(ctx + cont) == EOS else other).append({"context": ctx, "continuation": cont})
    assert len(eos_after) >= 2 and len(other) >= 2, f"seed {seed}: {len(eos_after)} texts end on EOS"
    def greedy_pair(text: str) -> dict | None:
        """text's first half and HF's 2 greedy tokens after it, when lm-eval's tokenization of the pair
        gives exactly those tokens (so is_greedy is true)."""
        ctx = text[: len(text) // 2].rstrip()  # lm-eval moves a context's trailing spaces into the continuation
        ids, new = greedy(ctx, 2)
        cont = tok.decode(new)
        ok = tok(ctx + cont, add_special_tokens=False).input_ids == ids + new and cont.strip()
        return {"context": ctx, "continuation": cont} if ok else None

    greedy_docs = [d for d in map(greedy_pair, picks[:30]) if d][:3]
    assert greedy_docs, f"seed {seed}: no greedy continuation survives re-tokenization"
    loglik = eos_after[:3] + other[:3] + greedy_docs
    mc = [{"question": d["context"], "choices": [d["continuation"], picks[i][:8], " x"], "answer": 0}
          for i, d in enumerate(greedy_docs + other[3:5])]
    rolling = [{"text": picks[i]} for i in range(10, 14)] + [{"text": " ".join(picks[20:40])}]  # > one window
    gen = [{"context": picks[i][:25]} for i in range(40, 44)]
    return {"loglik": loglik, "mc": mc, "rolling": rolling, "gen": gen}


def _rolling(model, tok, text: str, window: int) -> float:
    """loglikelihood_rolling of text in lm-eval's windows of `window` predicted tokens, by HF's model."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = tok(text, add_special_tokens=False).input_ids
    total = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, tok.bos_token_id, window, 1)):
        inp = ctx + cont
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), -1)
        total += sum(lp[p - 1, inp[p]].item() for p in range(len(ctx), len(inp)))
    return total


TASKS = {
    "ssm_loglik": {"output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}",
                   "target_delimiter": "",
                   "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]},
    "ssm_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
               "doc_to_target": "{{answer}}", "target_delimiter": "", "metric_list": [{"metric": "acc"}]},
    "ssm_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                    "metric_list": [{"metric": "word_perplexity"}]},
    "ssm_gen": {"output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "",
                "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False},
                "metric_list": [{"metric": "exact_match"}]},
}


def test_lm_eval_local_completions_equals_hf(hf, server, tmp_path):
    """lm-eval's local-completions against the server (tokenizer taken from the checkpoint) gives,
    per request, HF's own log-likelihoods (within 1e-3) and is_greedy, and HF's greedy text."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    model, tok, hf_dir, seed = hf
    docs = _docs(model, tok, seed)
    for name, cfg in TASKS.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs[name.removeprefix("ssm_")]))
        (tmp_path / f"{name}.yaml").write_text(json.dumps({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **cfg}))
    tasks = list(TASKS)

    def evaluate(model_name: str, args: dict) -> dict:
        out = lm_eval.simple_evaluate(model=model_name, model_args=args, tasks=tasks, log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        return {t: [s["resps"] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])] for t in tasks}

    ours = evaluate("local-completions", {"base_url": server.url + "/v1/completions", "model": NAME,
                                          "tokenizer_backend": "huggingface", "tokenizer": str(server.ckpt),
                                          "max_length": MAX_LEN, "num_concurrent": 2, "max_retries": 1})
    ref = evaluate("hf", {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu", "batch_size": 1,
                          "max_length": MAX_LEN})
    greedy_seen = set()
    for t in ("ssm_loglik", "ssm_mc"):
        for i, (a, b) in enumerate(zip(ours[t], ref[t], strict=True)):
            for x, y in zip(a, b, strict=True):
                x, y = x[0], y[0]
                assert x[0] == pytest.approx(y[0], abs=1e-3), f"seed {seed}: {t} doc {i}: {x} != {y}"
                assert x[1] == y[1], f"seed {seed}: {t} doc {i}: is_greedy {x[1]} != {y[1]}"
                greedy_seen.add(bool(y[1]))
    assert greedy_seen == {True, False}, f"seed {seed}: the docs did not test both is_greedy outcomes"
    # rolling: local-completions keeps one of max_length for the generated token and cuts windows of
    # max_length - 2 predictions, HFLM of max_length; the reference is local-completions' windows
    # (lm-eval's own code), scored by HF's model
    for i, (doc, a) in enumerate(zip(docs["rolling"], ours["ssm_rolling"], strict=True)):
        assert a[0][0] == pytest.approx(_rolling(model, tok, doc["text"], MAX_LEN - 2), abs=1e-3), f"seed {seed}: {i}"
    assert ours["ssm_gen"] == ref["ssm_gen"], f"seed {seed}"


# ---- schemathesis ------------------------------------------------------------------------------------

def test_no_generated_request_gets_a_5xx(server):
    """Requests generated from /openapi.json (valid and invalid bodies, every endpoint): none gets a
    5xx. A bounded number of examples per operation keeps it quick."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures, calls = [], [0]
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            calls[0] += 1
            response = case.call(timeout=60)
            if response.status_code >= 500:
                failures.append((op.label, case.body, response.status_code, response.text[:300]))

        check()
    assert calls[0] >= 50
    assert not failures, failures[:5]
