#!/usr/bin/env python3
"""Accuracy of each all-reduce variant against the exact one, on a trained checkpoint.

    torchrun --nproc_per_node 2 tools/allreduce_accuracy.py --load CKPT --text held_out.txt

For every variant: perplexity on held-out text (teacher-forced, windows of --window tokens), top-1
agreement with the exact model on that text, and greedy agreement over --new-tokens generations
(the fraction of positions where the variant's greedy token equals the exact model's, teacher-forced
on the exact model's own continuation, so one early difference does not count for every later one).
Rank 0 prints a markdown table.
"""
from __future__ import annotations

import argparse
import math

import torch


@torch.no_grad()
def score(model, ids: torch.Tensor):
    """Teacher-forced: (sum of -log p(next token), number of predictions, greedy next tokens [b, L-1])."""
    from megatron_ssm.inference.sampling import gather_logits

    logits = gather_logits(model(ids), model.cfg.vocab_size, model.tp).float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).sum().item()
    return nll, ids[:, 1:].numel(), logits[:, :-1].argmax(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True)
    ap.add_argument("--text", required=True, help="held-out text file")
    ap.add_argument("--variants", default="exact,int8,fp8,fp16")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()

    from megatron_ssm.comm import make_allreduce
    from megatron_ssm.inference.generate import generate
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import init_distributed, shutdown
    from megatron_ssm.tokenizer import Tokenizer

    tp = init_distributed()
    tok = Tokenizer(args.load)
    ids = tok.encode(open(args.text).read())
    n = min(args.windows, len(ids) // args.window)
    text = torch.tensor(ids[: n * args.window], device=tp.device).view(n, args.window)
    prompts = [row[:32].tolist() for row in text[: args.prompts]]

    rows, exact_greedy, exact_cont = [], None, None
    for variant in args.variants.split(","):
        model = load_model(args.load, tp, allreduce=make_allreduce(variant))
        nll, count, greedy = score(model, text)
        if variant == "exact":
            exact_greedy = greedy
            gens = generate(model, prompts, args.new_tokens)
            exact_cont = torch.tensor([p + g for p, g in zip(prompts, gens)], device=tp.device)
        text_agree = (greedy == exact_greedy).float().mean().item()
        _, _, cont = score(model, exact_cont)
        gen_agree = (cont[:, 31:] == exact_cont[:, 32:]).float().mean().item()
        rows.append((variant, math.exp(nll / count), text_agree, gen_agree))
        del model
    if tp.is_first:
        base = rows[0][1]
        print(f"| all-reduce | TP | perplexity | vs exact | top-1 agreement (text) | greedy agreement ({args.new_tokens} tok) |")
        print("|---|---|---|---|---|---|")
        for v, ppl, ta, ga in rows:
            print(f"| {v} | {tp.size} | {ppl:.4f} | {100 * (ppl / base - 1):+.3f}% | {100 * ta:.2f}% | {100 * ga:.2f}% |")
    shutdown()


if __name__ == "__main__":
    main()
