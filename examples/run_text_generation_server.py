#!/usr/bin/env python3
"""Tensor-parallel text generation server, compatible with Megatron's and OpenAI's APIs.

    .venv/bin/torchrun --nproc_per_node N examples/run_text_generation_server.py --load CKPT \
        [--tokenizer-type SentencePieceTokenizer|GPTSentencePieceTokenizer|HuggingFaceTokenizer] \
        [--tokenizer-model PATH] [--host 127.0.0.1] [--port 5000]

Rank 0 listens (127.0.0.1 unless --host says otherwise); the other ranks open no port and follow
rank 0's schedule. A tokenizer stored with the checkpoint (tools/convert_hf.py copies it) is used
without flags.

    PUT  /api                  Megatron: {"prompts": [...], "tokens_to_generate": N, "temperature", "top_k",
                               "top_p", "logprobs", "add_BOS", "random_seed", "stop_token"}
                               -> {"text", "segments", "logprobs", "tokens"} (text = prompt + generation)
    POST /v1/completions       OpenAI completions: logprobs (top 20), echo, n, best_of, stop, "stream": true
    POST /v1/chat/completions  OpenAI chat, rendered by the tokenizer's chat template
    GET  /v1/models[/{id}]     the served model
    POST /tokenize, /detokenize, GET /tokenizer_info   vLLM's tokenizer endpoints (lm-eval's remote tokenizer)
    GET  /health               200 while serving; 503 shutting down or when the engine loop stalls
    GET  /metrics              Prometheus: requests, tokens, queue depth, running sequences, TTFT, inter-token latency
    GET  /openapi.json         the schema

SIGINT/SIGTERM (to torchrun or rank 0) lets in-flight requests finish (--drain-timeout), then stops
every rank. A rank that loses its peers exits with a message within --dist-timeout seconds.
Try it with tools/text_generation_cli.py HOST:PORT.
"""
import logging
import os
import sys

from megatron_ssm.server.main import main

if __name__ == "__main__":
    code = main()
    # Every rank has stopped and torch.distributed is torn down; skip the interpreter's own teardown,
    # which spends seconds in native destructors after a server run.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
