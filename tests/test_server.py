"""The text generation server end to end: torchrun (TP=2, CPU) serving the shipped model over HTTP,
driven by real clients (requests, the openai client, raw sockets, our CLI).

The server is started once for most tests; the last of them stops it with SIGTERM. A second
server, started by hand without torchrun, checks that losing a rank ends the others.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_ssm.parallel import free_port

requests = pytest.importorskip("requests")

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "megatron_ssm" / "assets" / "tiny-mamba2"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STARTUP_TIMEOUT = 240


# ---- the checkpoint ------------------------------------------------------------------------------

def _tokenizer_model(tmp: Path) -> Path:
    """The shipped sentencepiece model, or (before it exists) a small one trained here."""
    if (ASSET / "tokenizer.model").is_file():
        return ASSET / "tokenizer.model"
    import sentencepiece as spm

    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(p.read_text() for p in sorted((ROOT / "megatron_ssm").rglob("*.py"))))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp / "sp"), vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2)
    return tmp / "sp.model"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The shipped tiny Mamba-2 converted to TP=2, or, while it is not there yet, a random tiny
    Mamba-2 with the shipped tokenizer."""
    root = tmp_path_factory.mktemp("server")
    if (ASSET / "config.json").is_file() and list(ASSET.glob("*.safetensors")):
        hf_dir = ASSET
    else:
        import sentencepiece as spm

        from hf_models import build_hf_model, fresh_seed, hf_config, save_hf

        tok = _tokenizer_model(root)
        vocab = spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()
        hf_dir = save_hf(build_hf_model(hf_config("mamba2", vocab=vocab), fresh_seed()), root / "hf")
        shutil.copy(tok, hf_dir / "tokenizer.model")
    res = subprocess.run([sys.executable, "tools/convert_hf.py", "--load-dir", str(hf_dir), "--save-dir",
                          str(root / "tp2"), "--tp", "2", "--dtype", "float32", "--no-progress"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (root / "tp2" / "tokenizer.model").is_file()
    return root / "tp2"


# ---- processes -----------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of a process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = stat[stat.rindex(")") + 2:].split()
    return f[0], int(f[1]), f[19]


def _descendants(root: int) -> dict[int, str]:
    """root and every process below it (torchrun starts each rank in a session of its own, so
    the tree, not the session, finds them), as pid -> start time."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None and st[0] not in ("Z", "X"):
                stats[int(d)] = st
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in out:
            out[pid] = stats[pid][2]
            todo += [c for c, st in stats.items() if st[1] == pid]
    return out


def _env_of(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


class Server:
    """A server process tree started in its own session, so that every process it made can be found."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 (closed in kill)
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env or ENV, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = None
        self.known: dict[int, str] = {}

    @classmethod
    def torchrun(cls, ckpt: Path, log: Path, *extra: str, env: dict | None = None) -> "Server":
        return cls([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "examples/run_text_generation_server.py", "--load", str(ckpt), "--port", "0", *extra], log, env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"listening on (http://[\d.]+:\d+)", self.log())
            if m:
                self.url = m.group(1)
                try:
                    if requests.get(self.url + "/health", timeout=5).status_code == 200:
                        self.pids()
                        return self.url
                except requests.RequestException:
                    pass
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} while starting:\n{self.log()[-5000:]}")
            time.sleep(0.3)
        pytest.fail(f"server not ready within {timeout} s:\n{self.log()[-5000:]}")

    def pids(self) -> list[int]:
        """Live processes of the tree: those seen under the launcher so far, even once orphaned."""
        self.known.update(_descendants(self.proc.pid))
        alive = []
        for pid, start in self.known.items():
            st = _stat(pid)
            if st is not None and st[2] == start and st[0] not in ("Z", "X"):
                alive.append(pid)
        return alive

    def wait_gone(self, timeout: float) -> float:
        """Seconds until no process of the tree is left; fails after timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            if not self.pids():
                return time.monotonic() - t0
            time.sleep(0.2)
        left = self.pids()
        self.kill()
        pytest.fail(f"processes {left} still alive {timeout} s later:\n{self.log()[-5000:]}")

    def kill(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    srv = Server.torchrun(ckpt, tmp_path_factory.mktemp("log") / "server.log",
                          env={**ENV, "MEGATRON_SSM_DIST_TIMEOUT": "30"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        if srv.proc.poll() is None or srv.pids():
            srv.kill()


# ---- clients -------------------------------------------------------------------------------------

def megatron(url: str, **body) -> requests.Response:
    return requests.put(url + "/api", data=json.dumps(body), headers={"Content-Type": "application/json"},
                        timeout=120)


def completion(url: str, **body) -> requests.Response:
    return requests.post(url + "/v1/completions", json=body, timeout=120)


def sse_completion(url: str, **body) -> tuple[str, str | None, list[dict]]:
    """POST a streaming completion and read the events by hand: (text, finish_reason, chunks)."""
    chunks, done = [], False
    with requests.post(url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith(b"data: "), line
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            chunks.append(json.loads(data))
    assert done, "stream ended without data: [DONE]"
    assert all("error" not in c for c in chunks), chunks
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    return text, (finish[-1] if finish else None), chunks


def openai_client(url: str):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def prompts_pool(n: int, seed: int = 0) -> list[str]:
    """Distinct prompts of varied length: lines of held-out Python when shipped, else made up."""
    rng = random.Random(seed)
    lines = []
    if (ASSET / "heldout.txt").is_file():
        lines = [ln for ln in (ASSET / "heldout.txt").read_text().splitlines() if len(ln.strip()) > 8]
    words = ["def", "class", "return", "import", "self", "value", "for", "in", "if", "else", "None", "(", ")", ":"]
    out: list[str] = []
    while len(out) < n:
        if lines:
            i = rng.randrange(len(lines))
            p = "\n".join(lines[i:i + rng.randint(1, 4)]) + "\n"
        else:
            p = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        if p not in out:
            out.append(p)
    return out


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- tests ---------------------------------------------------------------------------------------

def test_health_models_and_only_rank_0_listens(server):
    r = requests.get(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["tensor_parallel"] == 2
    models = requests.get(server.url + "/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "tp2"
    assert server.url.startswith("http://127.0.0.1:")
    # every rank is a process of the session; only one of them listens on a TCP port outside torch's own
    ranks = [p for p in server.pids() if _env_of(p).get("RANK") in ("0", "1")]
    assert sorted(_env_of(p)["RANK"] for p in ranks) == ["0", "1"]
    port = int(server.url.rsplit(":", 1)[1])
    listening = {p: _listening_ports(p) for p in ranks}
    owner = [p for p, ports in listening.items() if port in ports]
    assert len(owner) == 1 and _env_of(owner[0])["RANK"] == "0", listening


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on, from /proc (its socket inodes matched in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def prompt_ids(url: str, prompt: str) -> list[int]:
    """The prompt's token ids, from a scoring request (tokens_to_generate 0)."""
    r = megatron(url, prompts=[prompt], tokens_to_generate=0, logprobs=True)
    assert r.status_code == 200, r.text
    return r.json()["tokens"][0]


def test_megatron_api(server):
    url = server.url
    prompts = ["def main():", "import os\n"]
    r = megatron(url, prompts=prompts, tokens_to_generate=6, top_k=1, logprobs=True)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"text", "segments", "logprobs", "tokens"}
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(url, prompt)
        assert out["tokens"][i][:len(ids)] == ids and 1 <= len(out["tokens"][i]) - len(ids) <= 6
        assert out["text"][i].startswith(prompt)
        assert len(out["segments"][i]) == len(out["tokens"][i])
        assert len(out["logprobs"][i]) == len(out["tokens"][i]) - 1
        assert all(lp <= 0 for lp in out["logprobs"][i])
    # greedy (top_k 1 or temperature 0) is deterministic; logprobs off gives null
    again = megatron(url, prompts=["def main():"], tokens_to_generate=6, temperature=0).json()
    assert again["tokens"][0] == out["tokens"][0] and again["text"][0] == out["text"][0]
    assert again["logprobs"] is None
    # tokens_to_generate 0 scores the prompt: the same log-probs as the generation's prompt part
    ids = prompt_ids(url, "def main():")
    scored = megatron(url, prompts=["def main():"], tokens_to_generate=0, logprobs=True).json()
    assert scored["text"][0] == "def main():" and len(scored["logprobs"][0]) == len(ids) - 1
    assert scored["logprobs"][0] == pytest.approx(out["logprobs"][0][:len(ids) - 1], abs=1e-4)
    # seeded sampling reproduces; add_BOS prepends the end-of-document token; stop_token is honoured
    a = megatron(url, prompts=["x = 1"], tokens_to_generate=8, temperature=0.9, top_p=0.9, random_seed=7).json()
    b = megatron(url, prompts=["x = 1"], tokens_to_generate=8, temperature=0.9, top_p=0.9, random_seed=7).json()
    assert a["tokens"] == b["tokens"]
    x_ids = prompt_ids(url, "x = 1")
    bos = megatron(url, prompts=["x = 1"], tokens_to_generate=2, top_k=1, add_BOS=True).json()
    assert bos["tokens"][0][:len(x_ids) + 1] == [2] + x_ids and bos["text"][0].startswith("x = 1")
    first = out["tokens"][0][len(ids)]
    stopped = megatron(url, prompts=["def main():"], tokens_to_generate=6, top_k=1, stop_token=first).json()
    assert stopped["tokens"][0] == out["tokens"][0][:len(ids) + 1]


def test_megatron_cli_pattern_and_our_cli(server):
    # exactly what Megatron-LM's tools/text_generation_cli.py sends and reads
    url = "http://" + server.url.split("://")[1] + "/api"
    data = {"prompts": ["def f(x):"], "tokens_to_generate": 5}
    response = requests.put(url, data=json.dumps(data), headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 200 and response.json()["text"][0].startswith("def f(x):")
    bad = requests.put(url, data=json.dumps({"prompts": ["x"], "tokens_to_generate": "five"}),
                       headers={"Content-Type": "application/json"}, timeout=60)
    assert bad.status_code == 400 and "tokens_to_generate" in bad.json()["message"]
    # ours, interactively as Megatron's, then one-shot, streaming and greedy
    host = server.url.split("://")[1]
    cli = [sys.executable, "tools/text_generation_cli.py", host]
    res = subprocess.run(cli, input="def f(x):\n5\n", cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "Megatron Response: \ndef f(x):" in res.stdout, res.stdout + res.stderr
    greedy = megatron(server.url, prompts=["class A:"], tokens_to_generate=6, temperature=0).json()["text"][0]
    res = subprocess.run(cli + ["--prompt", "class A:", "--tokens", "6", "--temperature", "0"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and greedy in res.stdout, res.stdout + res.stderr
    res = subprocess.run(cli + ["--prompt", "class A:", "--tokens", "6", "--temperature", "0", "--stream"], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.rstrip("\n") == greedy, res.stdout + res.stderr
    res = subprocess.run(cli + ["--prompt", "x", "--tokens", "-3"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1 and "Error 400" in res.stderr


def test_openai_client_and_streaming(server):
    client = openai_client(server.url)
    prompt = "def read(path):\n"
    ids = prompt_ids(server.url, prompt)
    greedy = megatron(server.url, prompts=[prompt], tokens_to_generate=10, temperature=0).json()
    r = client.completions.create(model="tp2", prompt=prompt, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert prompt + r.choices[0].text == greedy["text"][0]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(greedy["tokens"][0]) - len(ids)
    assert r.choices[0].finish_reason in ("length", "stop")
    # streamed through the openai client: the same text, piece by piece, and usage at the end
    stream = client.completions.create(model="tp2", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == r.choices[0].text
    assert len([c for c in chunks if c.choices]) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # several prompts (text and token ids), echo, logprobs, stop sequences
    multi = client.completions.create(model="tp2", prompt=[ids, ids], max_tokens=10, temperature=0, logprobs=1)
    assert [c.index for c in multi.choices] == [0, 1]
    assert all(c.text == r.choices[0].text for c in multi.choices)
    lp = multi.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    echo = client.completions.create(model="tp2", prompt=prompt, max_tokens=10, temperature=0, echo=True)
    assert echo.choices[0].text == greedy["text"][0]
    scored = client.completions.create(model="tp2", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].logprobs.token_logprobs[0] is None
    assert len(scored.choices[0].logprobs.token_logprobs) == r.usage.prompt_tokens
    full = r.choices[0].text
    cut = next((k for k in range(2, len(full)) if full[k:k + 2].strip()), None)
    if cut is not None:
        stop = full[cut:cut + 2]
        s = client.completions.create(model="tp2", prompt=prompt, max_tokens=10, temperature=0, stop=[stop])
        assert s.choices[0].text == full[:full.index(stop)] and s.choices[0].finish_reason == "stop"
        text, finish, _ = sse_completion(server.url, prompt=prompt, max_tokens=10, temperature=0, stop=stop)
        assert text == full[:full.index(stop)] and finish == "stop"
    # seeded sampling: same seed, same text
    s1 = client.completions.create(model="tp2", prompt=prompt, max_tokens=8, temperature=0.8, seed=3)
    s2 = client.completions.create(model="tp2", prompt=prompt, max_tokens=8, temperature=0.8, seed=3)
    assert s1.choices[0].text == s2.choices[0].text
    # errors come back as the client's exceptions
    import openai

    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="tp2", prompt=prompt, max_tokens=4, n=2)


def test_300_requests_16_way_each_identical_to_alone(server, capsys):
    """40 distinct greedy requests (Megatron, OpenAI, OpenAI streaming; a few seeded samples), each
    sent alone first; then 300 of them, shuffled, from 16 threads. Every answer must equal its
    lone answer, and none may be lost."""
    url = server.url
    rng = random.Random(1)
    specs = []
    for i, prompt in enumerate(prompts_pool(40, seed=5)):
        kind = ("megatron", "openai", "stream")[i % 3]
        specs.append({"kind": kind, "prompt": prompt, "n": rng.randint(8, 16), "temperature": 0.0 if i % 8 else 0.7,
                      "seed": i})

    def send(spec) -> tuple[object, int]:
        if spec["kind"] == "megatron":
            body = dict(prompts=[spec["prompt"]], tokens_to_generate=spec["n"], temperature=spec["temperature"])
            if spec["temperature"]:
                body["random_seed"] = spec["seed"]
            r = megatron(url, **body)
            assert r.status_code == 200, r.text
            out = r.json()
            return (out["tokens"][0], out["text"][0]), len(out["tokens"][0])
        body = dict(prompt=spec["prompt"], max_tokens=spec["n"], temperature=spec["temperature"], seed=spec["seed"])
        if spec["kind"] == "stream":
            text, finish, chunks = sse_completion(url, **body, stream_options={"include_usage": True})
            return (text, finish), chunks[-1]["usage"]["completion_tokens"]
        r = completion(url, **body)
        assert r.status_code == 200, r.text
        out = r.json()
        return (out["choices"][0]["text"], out["choices"][0]["finish_reason"]), out["usage"]["completion_tokens"]

    def counters() -> tuple[float, float]:
        text = requests.get(url + "/metrics", timeout=10).text
        return metric(text, "megatron_ssm_engine_steps_total"), metric(text, "megatron_ssm_generation_tokens_total")

    alone = [send(s)[0] for s in specs]
    prompt_len = {i: len(prompt_ids(url, s["prompt"])) for i, s in enumerate(specs) if s["kind"] == "megatron"}
    order = [i % len(specs) for i in range(300)]
    rng.shuffle(order)
    steps0, generated0 = counters()
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: (i, send(specs[i])), order, timeout=600))
    elapsed = time.monotonic() - t0
    steps1, generated1 = counters()
    assert len(results) == 300
    tokens = 0
    for i, (answer, n_tokens) in results:
        assert answer == alone[i], f"request {i} ({specs[i]['kind']}) differs under load"
        tokens += n_tokens - prompt_len[i] if specs[i]["kind"] == "megatron" else n_tokens
    assert generated1 - generated0 == tokens
    per_step = (generated1 - generated0) / (steps1 - steps0)
    with capsys.disabled():
        print(f"\nload test: 300 requests (16 concurrent, 8-16 new tokens, TP=2 on CPU) in {elapsed:.1f} s: "
              f"{300 / elapsed:.1f} requests/s, {tokens / elapsed:.0f} generated tokens/s, "
              f"{per_step:.1f} tokens per engine step")
    assert per_step > 2, "concurrent requests were not batched together"


MALFORMED_API = [
    b"{", b"", b"null", b"[]", b'"prompts"', b"{'prompts': ['x']}", b'{"prompts": ["x"],}', b"\xff\xfe{}",
    b'{"prompts": ["x"], "temperature": NaN}', b"[" * 100000 + b"]" * 100000,
]
BAD_API_BODIES = [
    {}, {"prompts": "x"}, {"prompts": [1, 2]}, {"prompts": []}, {"prompts": ["x"] * 129}, {"prompts": [""]},
    {"prompts": ["x"], "tokens_to_generate": "5"}, {"prompts": ["x"], "tokens_to_generate": -1},
    {"prompts": ["x"], "tokens_to_generate": 1.5}, {"prompts": ["x"], "tokens_to_generate": True},
    {"prompts": ["x"], "tokens_to_generate": 10**7}, {"prompts": ["x"], "tokens_to_generate": 0},
    {"prompts": ["x"], "temperature": "hot"}, {"prompts": ["x"], "temperature": -1},
    {"prompts": ["x"], "temperature": 1000}, {"prompts": ["x"], "top_k": -1}, {"prompts": ["x"], "top_k": 5000},
    {"prompts": ["x"], "top_k": 1.5}, {"prompts": ["x"], "top_p": 2.0}, {"prompts": ["x"], "top_p": "x"},
    {"prompts": ["x"], "logprobs": "yes"}, {"prompts": ["x"], "add_BOS": 1}, {"prompts": ["x"], "random_seed": -5},
    {"prompts": ["x"], "random_seed": "x"}, {"prompts": ["x"], "stop_token": "x"},
    {"prompts": ["x"], "tokens": 5}, {"prompts": ["x"], "max_len": 5}, {"sentences": ["x"]},
    {"prompts": ["x"], "beam_width": 2}, {"prompts": ["x " * 20000], "tokens_to_generate": 1},
]
BAD_COMPLETIONS = [
    {}, {"prompt": None}, {"prompt": 5}, {"prompt": []}, {"prompt": [[1, "a"]]}, {"prompt": [10**6]},
    {"prompt": [-1]}, {"prompt": "x", "max_tokens": -1}, {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "max_tokens": 10**7}, {"prompt": "x", "temperature": -0.5}, {"prompt": "x", "top_p": 0},
    {"prompt": "x", "top_p": 1.5}, {"prompt": "x", "n": 2}, {"prompt": "x", "best_of": 3},
    {"prompt": "x", "logprobs": 5}, {"prompt": "x", "logprobs": -1}, {"prompt": "x", "stop": 5},
    {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, {"prompt": "x", "stop": [""]},
    {"prompt": "x", "presence_penalty": 1}, {"prompt": "x", "logit_bias": {"1": 5}}, {"prompt": "x", "suffix": "y"},
    {"prompt": "x", "stream": "yes"}, {"prompt": "x", "stream_options": {"include_usage": True}},
    {"prompt": "x", "seed": -1}, {"prompt": "x", "seed": "x"}, {"prompt": "x", "max_token": 5},
    {"prompt": "x", "model": 5}, {"prompt": "x", "echo": "no"}, {"prompt": "x", "temperature": float("inf")},
]


def _raw(url: str, request: bytes) -> int:
    """Send raw bytes, return the status code of the answer (which must be JSON)."""
    host, port = url.split("://")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            got = s.recv(65536)
            if not got:
                break
            data += got
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        while len(rest) < length:
            got = s.recv(65536)
            if not got:
                break
            rest += got
        assert "message" in json.loads(rest[:length]), rest
        return int(head.split()[1])


def test_malformed_requests_get_4xx_while_a_stream_completes(server):
    url = server.url
    client = openai_client(url)
    started, result = threading.Event(), {}
    prompt = "def parse(text):\n"
    expected = completion(url, prompt=prompt, max_tokens=200, temperature=0, ignore_eos=True).json()

    def stream():
        parts, finish = [], None
        for chunk in client.completions.create(model="tp2", prompt=prompt, max_tokens=200, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            started.set()
        result.update(text="".join(parts), finish=finish, end=time.monotonic())

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert started.wait(60), "the stream did not start"
    first_bad = time.monotonic()
    statuses = []
    for raw in MALFORMED_API:
        r = requests.put(url + "/api", data=raw, headers={"Content-Type": "application/json"}, timeout=60)
        statuses.append((raw[:30], r.status_code, r.json()["message"]))
    for body in BAD_API_BODIES:
        r = megatron(url, **body)
        statuses.append((body, r.status_code, r.json()["message"]))
    for body in BAD_COMPLETIONS:
        r = requests.post(url + "/v1/completions", data=json.dumps(body, allow_nan=True), timeout=60)
        statuses.append((body, r.status_code, r.json()["error"]["message"]))
    r = requests.post(url + "/v1/completions", data=b"x" * (2 << 20), timeout=60)  # over the body size limit
    statuses.append(("2 MiB body", r.status_code, r.json()["message"]))
    for raw in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n",  # no Content-Length
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                b"PUT /api HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
                b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n", b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
                b"DELETE /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n"):
        statuses.append((raw[:30], _raw(url, raw), ""))
    last_bad = time.monotonic()
    t.join(120)
    assert not t.is_alive(), "the stream did not finish"
    bad = [s for s in statuses if not 400 <= s[1] < 500]
    assert not bad, bad
    assert len(statuses) >= 50
    assert all(s[2] or s[0][:4] in (b"POST", b"PUT ", b"GET ", b"DELE") for s in statuses)
    # the stream ran through all of them and came out whole
    print(f"\n{len(statuses)} malformed requests answered in {last_bad - first_bad:.2f} s; the stream ended "
          f"{result['end'] - last_bad:.2f} s after the last")
    assert result["end"] > last_bad
    assert result["text"] == expected["choices"][0]["text"] and result["finish"] == "length"
    assert requests.get(url + "/health", timeout=10).status_code == 200


def test_metrics(server):
    text = requests.get(server.url + "/metrics", timeout=10).text
    for name in ("megatron_ssm_requests_total", "megatron_ssm_generation_tokens_total", "megatron_ssm_queue_depth",
                 "megatron_ssm_running_sequences", "megatron_ssm_time_to_first_token_seconds_bucket",
                 "megatron_ssm_inter_token_latency_seconds_bucket"):
        assert name in text
    assert metric(text, "megatron_ssm_time_to_first_token_seconds_count") >= 300
    assert metric(text, "megatron_ssm_generation_tokens_total") >= 300 * 8
    assert re.search(r'megatron_ssm_requests_total\{endpoint="/api",code="400"\} \d+', text)


def test_sigterm_finishes_in_flight_then_stops_every_rank(server):
    url = server.url
    result = {}

    def long_request():
        result["r"] = completion(url, prompt="import sys\n", max_tokens=200, temperature=0, ignore_eos=True)

    t = threading.Thread(target=long_request, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and requests.get(url + "/health", timeout=10).json()["running"] == 0:
        time.sleep(0.05)
    assert len(server.pids()) >= 3  # torchrun and two ranks
    os.kill(server.proc.pid, signal.SIGTERM)
    took = server.wait_gone(60)
    t.join(10)
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["usage"]["completion_tokens"] == 200
    assert "stopped" in server.log()
    print(f"\nSIGTERM to torchrun: every process gone {took:.1f} s later")


@pytest.mark.parametrize("victim", [1, 0])
def test_losing_a_rank_ends_the_others(ckpt, tmp_path, victim):
    """Two ranks started by hand (no torchrun to clean up after them). SIGKILL rank 1 mid-request:
    rank 0 must answer the request with an error and exit with a message. SIGKILL rank 0: rank 1
    must notice and exit with a message. Both within the control group's timeout."""
    port = free_port()
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "MEGATRON_SSM_DIST_TIMEOUT": "10"}
    args = [sys.executable, "examples/run_text_generation_server.py", "--load", str(ckpt), "--port", "0"]
    ranks = [Server(args, tmp_path / f"rank{r}.log", {**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    survivor = ranks[1 - victim]
    try:
        url = ranks[0].wait_ready()
        result = {}

        def long_request():
            try:
                result["r"] = completion(url, prompt="import sys\n", max_tokens=2000, temperature=0, ignore_eos=True)
            except requests.RequestException as e:
                result["r"] = e

        t = threading.Thread(target=long_request, daemon=True)
        t.start()
        time.sleep(1.0)
        ranks[victim].proc.kill()
        took = survivor.wait_gone(40)
        t.join(10)
        assert not t.is_alive(), "the request was left hanging"
        assert survivor.proc.returncode == 1
        if victim == 1:
            r = result["r"]
            assert not isinstance(r, Exception) and r.status_code == 503, r
            assert "inference engine stopped" in r.json()["message"]
            assert "lost contact with another rank" in survivor.log(), survivor.log()[-3000:]
        else:
            assert "lost contact with rank 0" in survivor.log(), survivor.log()[-3000:]
        print(f"\nrank {victim} killed: rank {1 - victim} exited {took:.1f} s later")
    finally:
        for r in ranks:
            r.kill()


def test_killing_the_launcher_stops_its_ranks(ckpt, tmp_path):
    """torchrun starts ranks in sessions of their own, so SIGKILL to torchrun orphans them instead
    of signalling them: they must notice and stop by themselves."""
    srv = Server.torchrun(ckpt, tmp_path / "server.log")
    try:
        srv.wait_ready()
        assert len(srv.pids()) >= 3
        srv.proc.kill()
        took = srv.wait_gone(40)
        assert "the launcher" in srv.log() and "is gone: stopping" in srv.log()
        print(f"\ntorchrun killed: its ranks stopped {took:.1f} s later")
    finally:
        srv.kill()

