#!/usr/bin/env python3
"""Single-GPU baselines measured the same way as tools/benchmark.py, for side-by-side tables.

    python tools/baselines.py --impl mamba-ssm --config configs/mamba2-2.7b.yaml --batch 1,16 --prompt 512 --new 128
    python tools/baselines.py --impl hf --config configs/mamba2-2.7b.yaml --batch 1 --prompt 512 --new 16

mamba-ssm: `MambaLMHeadModel.generate(cg=True)` (its Triton kernels; works without its CUDA extension,
which only its Mamba-1 scan needs, so Mamba-1 configs are refused). hf: transformers' `generate`.
TTFT is the prompt's forward (prefill to the first token's logits); the decode step is the rest of a
full `generate` call over its remaining tokens, after a warm-up call of the same length.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types

import torch
import yaml


def ints(s):
    return [int(x) for x in s.split(",") if x]


def import_mamba_ssm():
    """mamba-ssm's package __init__ imports its CUDA extension, absent in a Triton-only install;
    the Mamba-2 path never calls it, so a placeholder lets the import through."""
    for ext in ("selective_scan_cuda", "causal_conv1d_cuda"):
        try:
            __import__(ext)
        except ImportError:
            sys.modules[ext] = types.ModuleType(ext)
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    return MambaConfig, MambaLMHeadModel


def build(impl, hf, dtype):
    if impl == "hf":
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
        with torch.device("cuda"):  # initialising 2.7B parameters on the host takes minutes
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    if hf["model_type"] != "mamba2":
        raise SystemExit("mamba-ssm without its CUDA extension runs Mamba-2 only")
    MambaConfig, MambaLMHeadModel = import_mamba_ssm()
    cfg = MambaConfig(d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
                      ssm_cfg=dict(layer="Mamba2", d_state=hf["state_size"], headdim=hf["head_dim"],
                                   ngroups=hf["n_groups"], chunk_size=hf["chunk_size"]),
                      rms_norm=True, residual_in_fp32=True, fused_add_norm=False,
                      pad_vocab_size_multiple=16, tie_embeddings=hf["tie_word_embeddings"])
    return MambaLMHeadModel(cfg, device="cuda", dtype=dtype).eval()


def generate(impl, model, ids, new):
    if impl == "hf":
        model.generation_config.eos_token_id = None
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return model.generate(ids, max_length=ids.shape[1] + new, cg=True, temperature=1.0, top_k=1)


def prefill(impl, model, ids, new):
    """The prompt's forward with a fresh state cache and the last position's logits (= TTFT)."""
    if impl == "hf":
        return model(ids, use_cache=True, logits_to_keep=1)
    from mamba_ssm.utils.generation import InferenceParams

    params = InferenceParams(max_seqlen=ids.shape[1] + new, max_batch_size=ids.shape[0])
    return model(ids, inference_params=params, num_last_tokens=1)


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=["mamba-ssm", "hf"], required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=ints, default=[1])
    ap.add_argument("--prompt", type=ints, default=[512])
    ap.add_argument("--new", type=ints, default=[128])
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    spec = yaml.safe_load(open(args.config))
    torch.set_grad_enabled(False)
    model = build(args.impl, spec["hf_config"], torch.bfloat16)
    for p in model.parameters():
        if p.dim() >= 2:
            p.data.normal_(0, 0.02)
    for prompt in args.prompt:
        for batch in args.batch:
            for new in args.new:
                ids = torch.randint(0, spec["hf_config"]["vocab_size"], (batch, prompt), device="cuda")
                # warm-up at the timed length: kernels compile and mamba-ssm captures its decode graph
                # (it recaptures whenever max_length changes, so TTFT is a plain prefill forward)
                generate(args.impl, model, ids, new)
                ttft = timed(lambda: prefill(args.impl, model, ids, new))
                total = timed(lambda: generate(args.impl, model, ids, new))
                step = (total - ttft) / max(new - 1, 1)
                r = dict(model=spec["name"], impl=args.impl, tp=1, batch=batch, prompt=prompt, new=new,
                         ttft_ms=ttft * 1e3, step_ms=step * 1e3, decode_tok_s=batch / step,
                         gen_tok_s=batch * new / total, total_tok_s=batch * (prompt + new) / total,
                         peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9, device=torch.cuda.get_device_name())
                print(f"{args.impl} {spec['name']} b={batch} p={prompt} n={new}  ttft {r['ttft_ms']:.1f} ms  "
                      f"step {r['step_ms']:.2f} ms  gen {r['gen_tok_s']:.0f} tok/s  total {r['total_tok_s']:.0f} tok/s",
                      flush=True)
                if args.json_out:
                    with open(args.json_out, "a") as f:
                        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
