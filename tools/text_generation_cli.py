#!/usr/bin/env python3
"""A small client for the text generation server (standard library only).

    python tools/text_generation_cli.py 127.0.0.1:5000
        interactive, as Megatron-LM's tools/text_generation_cli.py: asks for a prompt and a number
        of tokens, prints the server's text (prompt + generation). Ctrl-D ends.
    python tools/text_generation_cli.py 127.0.0.1:5000 --prompt "def main():" --tokens 32 [--temperature 0.8]
        one request per --prompt through PUT /api; --stream prints tokens as they come (POST
        /v1/completions with stream=true); --json prints the whole response.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def _url(server: str, path: str) -> str:
    base = server if "://" in server else "http://" + server
    return base.rstrip("/") + path


def _call(method: str, url: str, body: dict, timeout: float):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read())["message"]
    except Exception:
        return e.reason


def _given(args, **fields) -> dict:
    """{request field: value} for each option the user set (attribute name -> request field name)."""
    return {field: getattr(args, attr) for attr, field in fields.items() if getattr(args, attr) is not None}


def generate(server: str, prompt: str, tokens: int, args) -> dict:
    body = {"prompts": [prompt], "tokens_to_generate": tokens,
            **_given(args, temperature="temperature", top_k="top_k", top_p="top_p", seed="random_seed")}
    if args.logprobs:
        body["logprobs"] = True
    with _call("PUT", _url(server, "/api"), body, args.timeout) as r:
        return json.loads(r.read())


def stream(server: str, prompt: str, tokens: int, args, out=sys.stdout) -> str:
    body = {"prompt": prompt, "max_tokens": tokens, "stream": True,
            "temperature": 1.0 if args.temperature is None else args.temperature,
            **_given(args, top_k="top_k", top_p="top_p", seed="seed")}
    text = []
    out.write(prompt)
    with _call("POST", _url(server, "/v1/completions"), body, args.timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for c in chunk["choices"]:
                text.append(c["text"])
                out.write(c["text"])
                out.flush()
    out.write("\n")
    return "".join(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("server", help="HOST:PORT of the server (or a URL)")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for more requests)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=None, help="0: greedy (default: the server's, 1.0)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--logprobs", action="store_true", help="ask for log-probabilities (shown with --json)")
    ap.add_argument("--stream", action="store_true", help="print tokens as they arrive (OpenAI API)")
    ap.add_argument("--json", action="store_true", help="print the whole JSON response")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for an answer")
    args = ap.parse_args(argv)

    def one(prompt: str, tokens: int) -> bool:
        try:
            if args.stream:
                stream(args.server, prompt, tokens, args)
                return True
            res = generate(args.server, prompt, tokens, args)
        except urllib.error.HTTPError as e:
            print(f"Error {e.code}: {_error_text(e)}", file=sys.stderr)
            return False
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            print(f"Error: {getattr(e, 'reason', e)}", file=sys.stderr)
            return False
        if args.json:
            print(json.dumps(res, indent=1))
        else:
            print("Megatron Response: ")
            print(res["text"][0])
        return True

    if args.prompt:
        ok = [one(p, args.tokens) for p in args.prompt]
        return 0 if all(ok) else 1
    while True:  # Megatron's interactive loop
        try:
            sentence = input("Enter prompt: ")
            raw = input("Enter number of tokens to generate: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        try:
            tokens = int(raw)
        except ValueError:
            print(f"Error: not a number of tokens: {raw!r}", file=sys.stderr)
            continue
        one(sentence, tokens)


if __name__ == "__main__":
    sys.exit(main())
