"""Train the tiny Mamba2 model shipped as megatron-ssm's embedded default.

Everything runs offline, on CPU by default (``--device cuda`` also works):

1. Corpus: the Python standard library's own ``.py`` sources (skipping ``test/``,
   ``tests/``, ``idlelib/``, ``site-packages/``, the ``encodings/`` codec tables and
   files over 200 KB). ~2% of files are held out for validation, chosen by a hash
   of the relative path; a ~50 KB slice of them is written to ``heldout.txt``.
2. Tokenizer: a 4096-piece sentencepiece BPE model with byte fallback and identity
   normalization, so that code (newlines, indentation, tabs) round-trips exactly.
3. Model: ``Mamba2ForCausalLM`` (hidden 256, 6 layers, 16 heads of 32, state 32),
   trained with AdamW (warmup + cosine over the wall-clock budget), then saved in
   bfloat16 safetensors together with the tokenizer and a README.

Usage::

    python tools/train_tiny_model.py --out megatron_ssm/assets/tiny-mamba2 --minutes 12
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try to fetch hub kernels

import argparse
import hashlib
import io
import math
import random
import sysconfig
import time
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "encodings"}
MAX_FILE_BYTES = 200_000
UNK, BOS, EOS, PAD = 0, 1, 2, 3


def collect_sources(root):
    """Return (train, val) lists of (relative path, text) from the stdlib at root."""
    train, val = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.endswith(".py") or path.stat().st_size > MAX_FILE_BYTES:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            rel = path.relative_to(root).as_posix()
            bucket = int(hashlib.md5(rel.encode()).hexdigest(), 16) % 100
            (val if bucket < 2 else train).append((rel, text))
    return train, val


def heldout_sample(val, target_bytes=50_000):
    """Concatenate held-out files (whole lines) up to about target_bytes."""
    lines, size = [], 0
    for _, text in val:
        for line in text.splitlines(keepends=True):
            if size + len(line.encode()) > target_bytes:
                return "".join(lines)
            lines.append(line)
            size += len(line.encode())
        lines.append("\n")
        size += 1
    return "".join(lines)


def chunk_lines(text, max_bytes=2000):
    """Split text into multi-line chunks (newlines kept) for sentencepiece training."""
    chunk = ""
    for line in text.splitlines(keepends=True):
        if chunk and len((chunk + line).encode()) > max_bytes:
            yield chunk
            chunk = ""
        chunk += line[: max_bytes // 2]
    if chunk:
        yield chunk


def train_tokenizer(train, out_dir, vocab_size, seed):
    sentences = [c for _, text in train for c in chunk_lines(text)]
    random.Random(seed).shuffle(sentences)
    model = io.BytesIO()  # written via model_writer, so no output path is baked into the model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n", "\t"],
        max_sentence_length=8192,
        unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD,
        num_threads=2,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def encode_files(sp, files):
    ids = []
    for _, text in files:
        ids.extend(sp.encode(text))
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def make_model(vocab_size):
    config = Mamba2Config(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=6, expand=2,
        head_dim=32, num_heads=16, n_groups=1, state_size=32, conv_kernel=4,
        chunk_size=64, tie_word_embeddings=True, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=PAD, use_bias=False, use_conv_bias=True,
        residual_in_fp32=True, initializer_range=0.02,
    )
    return Mamba2ForCausalLM(config)


@torch.no_grad()
def evaluate(model, data, seq_len, n_windows=32, batch=8):
    """Mean next-token loss over evenly spaced windows of the held-out stream."""
    model.eval()
    step = max(1, (len(data) - seq_len) // n_windows)
    starts = list(range(0, len(data) - seq_len, step))[:n_windows]
    losses = []
    for i in range(0, len(starts), batch):
        x = torch.stack([data[s : s + seq_len] for s in starts[i : i + batch]]).to(model.device)
        losses.append(model(input_ids=x, labels=x).loss.item())  # HF shifts labels internally
    model.train()
    return sum(losses) / len(losses)


def train(model, train_ids, val_ids, args):
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    budget, start, step = args.minutes * 60, time.time(), 0
    model.train()
    while (elapsed := time.time() - start) < budget:
        # warmup by steps, then cosine decay to 10% over the wall-clock budget
        frac = min(1.0, elapsed / budget)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq_len, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()]).to(args.device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step == 10:
            print(f"  speed: {(time.time() - start) / 10:.2f} s/step", flush=True)
        if step % args.log_every == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  train {loss.item():.3f}", flush=True)
        if step % args.eval_every == 0:
            print(f"step {step:5d}  val {evaluate(model, val_ids, args.seq_len):.3f}", flush=True)
    train_loss = evaluate(model, train_ids[: len(val_ids) * 4], args.seq_len)
    val_loss = evaluate(model, val_ids, args.seq_len)
    minutes = (time.time() - start) / 60
    print(f"done: {step} steps in {minutes:.1f} min  train {train_loss:.3f}  val {val_loss:.3f}", flush=True)
    return {"steps": step, "minutes": minutes, "train_loss": train_loss, "val_loss": val_loss}


def write_readme(out_dir, args, stats):
    tokens = args.batch * args.seq_len * stats["steps"]
    where = (f"{torch.get_num_threads()} CPU threads" if args.device == "cpu"
             else torch.cuda.get_device_name(args.device))
    command = (f"python tools/train_tiny_model.py --out megatron_ssm/assets/tiny-mamba2 --minutes {args.minutes:g} "
               f"--device {args.device} --batch {args.batch} --seq-len {args.seq_len} --warmup {args.warmup} --seed {args.seed}")
    (out_dir / "README.md").write_text(f"""# tiny-mamba2

A ~{stats['params'] / 1e6:.1f}M-parameter Mamba2 language model (HuggingFace `Mamba2ForCausalLM`,
bfloat16 safetensors) trained from scratch on Python source code. It is the embedded default model of
megatron-ssm: small enough to ship in the repo and to run tensor-parallel tests on (16 SSM heads,
divisible by 1/2/4/8 ranks), and trained enough to emit Python-looking text. It is not useful as
a language model beyond that.

- Architecture: hidden 256, 6 layers, expand 2, 16 heads x head_dim 32, n_groups 1, state 32,
  conv kernel 4, chunk 64, vocab 4096, tied embeddings; {stats['params']:,} parameters.
- Tokenizer: `tokenizer.model`, sentencepiece BPE, 4096 pieces, byte fallback, identity
  normalization (newlines and indentation round-trip exactly); unk/bos/eos/pad = 0/1/2/3.
- Data: the Python {stats['pyver']} standard library `.py` files (no `test/`, `tests/`, `idlelib/`,
  `encodings/`, or files > 200 KB): {stats['n_train']} train files ({stats['train_tokens']:,} tokens),
  {stats['n_val']} held-out files ({stats['val_tokens']:,} tokens) chosen by md5 of the path.
  `heldout.txt` is a ~50 KB sample of the held-out files, for perplexity checks.
- Training: `{command}`; AdamW lr {args.lr:g} (warmup {args.warmup} steps, cosine to 10% over the
  time budget), batch {args.batch} x {args.seq_len} tokens, {stats['steps']} steps
  (~{tokens / 1e6:.1f}M tokens) in {stats['minutes']:.1f} min on {where}.
- Final loss (nats/token): train {stats['train_loss']:.3f}, validation {stats['val_loss']:.3f}
  (validation perplexity {math.exp(stats['val_loss']):.1f}).
""")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("megatron_ssm/assets/tiny-mamba2"))
    p.add_argument("--minutes", type=float, default=12.0, help="wall-clock training budget")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="Python stdlib directory to train on (default: this interpreter's)")
    args = p.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    train_files, val_files = collect_sources(args.stdlib)
    heldout = heldout_sample(val_files)
    (args.out / "heldout.txt").write_text(heldout, encoding="utf-8")
    print(f"{len(train_files)} train files, {len(val_files)} val files, heldout.txt {len(heldout.encode())} bytes")

    sp = train_tokenizer(train_files, args.out, 4096, args.seed)
    for _, text in val_files[:5]:
        snippet = text[:3000]
        assert sp.decode(sp.encode(snippet)) == snippet, "tokenizer round trip failed"
    assert sp.decode(sp.encode(heldout)) == heldout, "tokenizer round trip failed"
    train_ids, val_ids = encode_files(sp, train_files), encode_files(sp, val_files)
    print(f"tokenizer ok: {len(train_ids):,} train / {len(val_ids):,} val tokens "
          f"({sum(len(t.encode()) for _, t in train_files) / len(train_ids):.2f} bytes/token)")

    model = make_model(sp.get_piece_size()).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")
    stats = train(model, train_ids, val_ids, args)
    stats.update(params=n_params, n_train=len(train_files), n_val=len(val_files),
                 train_tokens=len(train_ids), val_tokens=len(val_ids),
                 pyver=args.stdlib.name.removeprefix("python") if args.stdlib.name.startswith("python")
                 else sysconfig.get_python_version())

    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    write_readme(args.out, args, stats)

    reloaded = Mamba2ForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    for prompt in ["def fibonacci(n):", "import os\n"]:
        ids = torch.tensor([sp.encode(prompt)])
        out = reloaded.generate(ids, max_new_tokens=60, do_sample=False)
        print(f"--- {prompt!r} -> {ids[0].tolist()}\n{sp.decode(out[0].tolist())}\n")


if __name__ == "__main__":
    main()
