#!/usr/bin/env python3
"""Tensor-parallel text generation from a converted checkpoint.

    torchrun --nproc_per_node N examples/generate.py --load CKPT --prompt-ids 5,17,3 [--prompt-ids 9,2] \
        --max-new-tokens K --temperature 0 --output-json out.json
    torchrun --nproc_per_node N examples/generate.py --load CKPT --prompt "def main():"
    # a TP=2 checkpoint on 4 ranks: prompts from 8192 tokens are prefilled split over 2 CP ranks
    torchrun --nproc_per_node 4 examples/generate.py --load CKPT-TP2 --context-parallel-size 2 --prompt-ids ...

Repeated --prompt-ids / --prompt form one batch. Rank 0 prints the results and writes
{"tokens": [[generated ids], ...]} (and "text" when a tokenizer is present) to --output-json.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from megatron_ssm.choices import ALLREDUCE_CHOICES, DTYPE_CHOICES


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids needs at least one id")
    return ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True,
                    help="checkpoint written by tools/convert_hf.py, or a Megatron-LM checkpoint directory (legacy "
                         "torch or torch_dist, any TP/PP degree: resharded for this run's ranks as it loads)")
    ap.add_argument("--tensor-model-parallel-size", type=int, default=None,
                    help="must equal the number of ranks if given (Megatron's flag; inference is TP only)")
    ap.add_argument("--tokenizer-model", default=None,
                    help="sentencepiece .model, HF tokenizer.json, or a directory holding one (default: the "
                         "checkpoint's own; Megatron-LM checkpoints carry none)")
    ap.add_argument("--tokenizer-type", default=None,
                    choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer"],
                    help="which tokenizer file to use when a directory holds both (Megatron's names)")
    ap.add_argument("--prompt-ids", type=parse_ids, action="append", default=[], help="comma-separated token ids")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text (uses the checkpoint's tokenizer)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-ids", type=parse_ids, default=None, help="comma-separated ids that end a sequence")
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                    help="run in this dtype (default: the checkpoint's)")
    ap.add_argument("--allreduce", default="oneshot", choices=ALLREDUCE_CHOICES,
                    help="reduction of every row-parallel output (default oneshot: exact, one kernel for small "
                         "GPU messages, NCCL/gloo otherwise; exact: always the backend's all-reduce)")
    ap.add_argument("--context-parallel-size", type=int, default=1,
                    help="ranks a long prompt's prefill is split over along the sequence (world = TP x CP; "
                         "every CP rank of a TP rank loads the same checkpoint shard)")
    ap.add_argument("--context-parallel-min-tokens", type=int, default=None,
                    help="prompts from this many tokens are prefilled context-parallel (default: the engine's)")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    if not args.prompt_ids and not args.prompt:
        ap.error("give --prompt-ids or --prompt")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if args.context_parallel_size < 1:
        ap.error("--context-parallel-size must be >= 1")

    from megatron_ssm.checkpoint.convert import DTYPES
    from megatron_ssm.comm import make_allreduce
    from megatron_ssm.checkpoint.hf import CheckpointError
    from megatron_ssm.inference.engine import EngineConfig
    from megatron_ssm.inference.generate import generate
    from megatron_ssm.inference.sampling import SamplingParams
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import cp_context, init_distributed, shutdown
    from megatron_ssm.tokenizer import Tokenizer

    try:
        tp = init_distributed(cp_size=args.context_parallel_size)
    except ValueError as e:  # world size and --context-parallel-size disagree: the same on every rank
        print(f"generate.py: error: {e}", file=sys.stderr)
        shutdown()
        return 2
    cp = cp_context()
    try:
        if args.tensor_model_parallel_size not in (None, tp.size):
            raise ValueError(f"--tensor-model-parallel-size {args.tensor_model_parallel_size} but {tp.size} ranks "
                             f"were started: launch with torchrun --nproc_per_node {args.tensor_model_parallel_size}")
        model = load_model(args.load, tp, dtype=DTYPES[args.dtype] if args.dtype else None,
                           allreduce=make_allreduce(args.allreduce))
        tokenizer = None
        prompts = list(args.prompt_ids)
        if args.prompt:
            from megatron_ssm.server.main import TOKENIZER_TYPES

            tokenizer = Tokenizer(args.tokenizer_model or args.load, TOKENIZER_TYPES.get(args.tokenizer_type))
            prompts += [tokenizer.encode(p, add_bos=True) for p in args.prompt]
        stop = tuple(args.stop_ids) if args.stop_ids is not None else \
            ((model.cfg.eos_token_id,) if args.prompt and model.cfg.eos_token_id is not None else ())
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        config = EngineConfig(max_batch=len(prompts))
        if args.context_parallel_min_tokens is not None:
            config.context_parallel_min_tokens = args.context_parallel_min_tokens
        tokens = generate(model, [[int(t) for t in p] for p in prompts], args.max_new_tokens, params, stop,
                          config, cp)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"generate.py (rank {tp.rank}): error: {e}", file=sys.stderr)
        shutdown()
        return 2
    if tp.is_first and cp.is_first:  # one printer and writer in the world
        result = {"tokens": tokens}
        if tokenizer is not None:
            result["text"] = [tokenizer.decode(t) for t in tokens]
            for prompt, text in zip(args.prompt_ids + args.prompt, result["text"]):
                print(f"--- prompt: {prompt!r}\n{prompt if isinstance(prompt, str) else ''}{text}")
        else:
            print(json.dumps(result))
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(result, f)
    shutdown()
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
