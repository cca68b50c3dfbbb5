"""Start the text generation server on every rank (see examples/run_text_generation_server.py)."""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("megatron_ssm.server")

from ..choices import ALLREDUCE_CHOICES, DTYPE_CHOICES

TOKENIZER_TYPES = {"SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece",
                   "HuggingFaceTokenizer": "huggingface"}
PROG = "run_text_generation_server.py"


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    env_timeout = os.environ.get("MEGATRON_SSM_DIST_TIMEOUT")
    ap = argparse.ArgumentParser(prog=PROG, description="Tensor-parallel text generation server: Megatron's PUT /api "
                                 "and OpenAI's POST /v1/completions, served by rank 0 of a torchrun job.")
    ap.add_argument("--load", required=True, help="checkpoint written by tools/convert_hf.py")
    ap.add_argument("--tokenizer-type", choices=sorted(TOKENIZER_TYPES), default=None,
                    help="default: whatever tokenizer file is stored with the checkpoint")
    ap.add_argument("--tokenizer-model", default=None,
                    help="sentencepiece .model, HF tokenizer.json, or a directory holding one "
                         "(default: the checkpoint's own)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--allowed-hosts", default="",
                    help="comma-separated Host header names accepted besides localhost and --host ('*': any), "
                         "e.g. the server's DNS name when it is reached through one")
    ap.add_argument("--port", type=int, default=5000, help="port to bind (0: any free port, printed at start)")
    ap.add_argument("--served-model-name", default=None, help="model name in OpenAI responses (default: --load's name)")
    ap.add_argument("--chat-template", default=None,
                    help="jinja chat template file for /v1/chat/completions (default: the tokenizer_config.json "
                         "chat_template or chat_template.jinja beside the tokenizer)")
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="run in this dtype (default: the checkpoint's)")
    ap.add_argument("--bf16", action="store_true", help="same as --dtype bfloat16 (Megatron's flag)")
    ap.add_argument("--fp16", action="store_true", help="same as --dtype float16 (Megatron's flag)")
    ap.add_argument("--tensor-model-parallel-size", type=_positive(int), default=None,
                    help="must equal the number of ranks over --context-parallel-size if given")
    ap.add_argument("--context-parallel-size", type=_positive(int), default=1,
                    help="ranks a long prompt's prefill is split over, along the sequence (world = TP x CP; "
                         "every CP rank of a TP rank loads the same checkpoint shard)")
    ap.add_argument("--context-parallel-min-tokens", type=_positive(int), default=8192,
                    help="prompts from this many tokens are prefilled context-parallel (a default, not a "
                         "measurement: see tools/gpu_sweep.sh SWEEP=cp)")
    ap.add_argument("--inference-max-requests", "--max-batch-size", dest="max_batch", type=_positive(int), default=64,
                    help="sequences generated concurrently (state-cache slots); more wait in a queue")
    ap.add_argument("--inference-max-seq-length", dest="max_seq", type=_positive(int), default=8192,
                    help="context budget per request: prompt + generated tokens. A served limit bounds what one "
                         "request may ask of the server (max_tokens); an SSM's state does not grow with the context, "
                         "so raise it freely (the engine itself has no limit unless given one)")
    ap.add_argument("--prefill-chunk", type=_positive(int), default=2048, help="tokens per prefill forward")
    ap.add_argument("--max-prefill-tokens", type=_positive(int), default=8192,
                    help="prompt tokens admitted per engine step, so running sequences keep decoding")
    ap.add_argument("--lazy-prefill-graphs", action="store_true",
                    help="capture each packed-prefill CUDA graph when a pack first needs it, instead of all at "
                         "start (a capture stalls running requests for ~0.5 s; start-up is that much faster)")
    ap.add_argument("--prefix-cache-bytes", type=int, default=0, help="reuse states of shared prompt prefixes (0: off)")
    ap.add_argument("--decode-ahead", action=argparse.BooleanOptionalAction, default=True,
                    help="launch each decode step before the one before is delivered, so the host's per-step work "
                         "overlaps the GPU's (EngineConfig.decode_ahead; on by default)")
    ap.add_argument("--allreduce", default="oneshot", choices=ALLREDUCE_CHOICES,
                    help="row-parallel all-reduce: exact (NCCL) | oneshot (exact; one kernel for small GPU "
                         "messages, else NCCL) | int8|fp8|fp16 (lossy) | auto (oneshot, int8 where measured faster)")
    ap.add_argument("--max-prompts", type=_positive(int), default=128, help="prompts per request")
    ap.add_argument("--max-queued-requests", type=_positive(int), default=4096,
                    help="prompts that may wait for a sequence slot; beyond that requests get 503")
    ap.add_argument("--max-request-bytes", type=_positive(int), default=1 << 20, help="request body size limit")
    ap.add_argument("--request-timeout", type=_positive(float), default=600.0,
                    help="seconds a request may take before it is aborted with 504")
    ap.add_argument("--drain-timeout", type=_positive(float), default=20.0,
                    help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are aborted "
                         "(keep it under torchrun's 30 s grace before SIGKILL)")
    ap.add_argument("--dist-timeout", type=_positive(float), default=float(env_timeout) if env_timeout else 60.0,
                    help="seconds a collective may wait before a rank gives up on its peers "
                         "(default: $MEGATRON_SSM_DIST_TIMEOUT or 60)")
    ap.add_argument("--heartbeat", type=_positive(float), default=0.5,
                    help="seconds between control messages while idle (how fast ranks notice a dead rank 0)")
    ap.add_argument("--health-stall-timeout", type=_positive(float), default=30.0,
                    help="/health answers 503 when the engine loop has not advanced for this many seconds")
    ap.add_argument("--header-timeout", type=_positive(float), default=10.0,
                    help="seconds a connection may take to send a request's headers")
    ap.add_argument("--keep-alive-timeout", type=_positive(int), default=5,
                    help="seconds an idle keep-alive connection stays open")
    ap.add_argument("--max-connections", type=_positive(int), default=1024,
                    help="concurrent connections and requests; beyond that requests get 503")
    ap.add_argument("--log-requests", action="store_true", help="log every HTTP request")
    return ap


def _say(rank: int, text: str) -> None:
    """Write a line to stderr with os.write: safe from signal handlers and dying processes."""
    try:
        os.write(2, f"{PROG} (rank {rank}): {text}\n".encode())
    except OSError:
        pass


def _load_codec(args, vocab_size: int):
    from ..tokenizer import Tokenizer
    from .text import TextCodec

    kind = TOKENIZER_TYPES.get(args.tokenizer_type)
    if args.tokenizer_model is None:
        try:
            tok = Tokenizer(args.load, kind)
        except FileNotFoundError:
            if args.tokenizer_type:
                raise ValueError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model: {args.load} holds no "
                                 "tokenizer.model or tokenizer.json") from None
            log.warning("no tokenizer in %s and no --tokenizer-model: only token-id prompts (OpenAI API) are "
                        "accepted", args.load)
            return None
    else:
        tok = Tokenizer(args.tokenizer_model, kind)
    codec = TextCodec(tok)
    if args.tokenizer_type and TOKENIZER_TYPES[args.tokenizer_type] != codec.kind:
        raise ValueError(f"--tokenizer-type {args.tokenizer_type} expects a {TOKENIZER_TYPES[args.tokenizer_type]} "
                         f"tokenizer, but {tok.path} is a {codec.kind} one")
    if tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer {tok.path} has {tok.vocab_size} tokens, more than the model's vocabulary "
                         f"of {vocab_size}")
    return codec


def _describe(e: BaseException, rank: int, timeout: float) -> str:
    from .loop import StopTimeout

    if isinstance(e, StopTimeout):
        return f"{e}; exiting"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    import torch.distributed as dist

    comm = isinstance(e, getattr(dist, "DistError", ())) or any(
        k in text.lower() for k in ("gloo", "connection", "timed out", "timeout", "nccl", "peer"))
    if not comm:
        return f"the engine loop failed ({type(e).__name__}: {text[:300]}); exiting"
    who = "rank 0" if rank != 0 else "another rank"
    return (f"lost contact with {who}: a collective failed or waited more than {timeout:g} s "
            f"({type(e).__name__}: {text[:300]}). {who[0].upper() + who[1:]} has probably died; exiting")


def _rendezvous_failed(e: BaseException, timeout: float) -> str:
    """Why the ranks did not meet, for a rank whose peers never came (one failed before start-up,
    or the launch gave the ranks different WORLD_SIZE / MASTER_ADDR / MASTER_PORT)."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if os.environ.get("RANK", "0") == "0":
        what = f"not every one of the {os.environ.get('WORLD_SIZE', '?')} ranks joined at {where} within {timeout:g} s"
    else:
        what = f"rank 0 did not answer at {where} within {timeout:g} s"
    return (f"{what} ({type(e).__name__}: {text[:300]}): a rank failed before start-up, or the ranks were "
            "launched with different WORLD_SIZE / MASTER_ADDR / MASTER_PORT; exiting")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bf16 or args.fp16:
        if args.dtype or (args.bf16 and args.fp16):
            build_parser().error("give one of --dtype, --bf16, --fp16")
        args.dtype = "bfloat16" if args.bf16 else "float16"

    import torch
    import torch.distributed as dist

    from ..parallel import cp_context, init_distributed, shutdown

    torch.set_grad_enabled(False)
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    try:
        tp = init_distributed(timeout=timeout, cp_size=args.context_parallel_size)
    except ValueError as e:  # the same on every rank: each one says so and stops
        print(f"{PROG}: error: {e}", file=sys.stderr)
        shutdown()
        return 2
    except dist.DistError as e:  # a rank that never joined: every rank waiting for it says so and stops
        _say(int(os.environ.get("RANK", "0")), "error: " + _rendezvous_failed(e, args.dist_timeout))
        return 1
    cp = cp_context()
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    # Control messages travel on their own gloo group: CPU objects, and a timeout that gloo honours.
    ctrl = dist.new_group(ranks=list(range(world)), backend="gloo", timeout=timeout) if world > 1 else None

    engine = server = ctx = None
    error = None
    try:
        if args.tensor_model_parallel_size is not None and args.tensor_model_parallel_size != tp.size:
            need = args.tensor_model_parallel_size * cp.size
            raise ValueError(f"--tensor-model-parallel-size {args.tensor_model_parallel_size} x --context-parallel-size "
                             f"{cp.size} but {world} ranks were started: launch with torchrun --nproc_per_node {need}")
        from ..checkpoint.convert import DTYPES
        from ..inference.engine import Engine, EngineConfig
        from ..model.load import load_model

        allreduce = None
        if args.allreduce != "exact":
            from ..comm import make_allreduce

            allreduce = make_allreduce(args.allreduce)
        model = load_model(args.load, tp, dtype=DTYPES[args.dtype] if args.dtype else None, allreduce=allreduce)
        engine = Engine(model, EngineConfig(max_batch=args.max_batch, max_sequence_length=args.max_seq,
                                            prefill_chunk=args.prefill_chunk, max_prefill_tokens=args.max_prefill_tokens,
                                            prefix_cache_bytes=args.prefix_cache_bytes,
                                            context_parallel_min_tokens=args.context_parallel_min_tokens,
                                            prefill_graphs_at_start=not args.lazy_prefill_graphs,
                                            decode_ahead=args.decode_ahead), cp=cp)
        if rank == 0:
            from .app import LOOPBACK, HttpServer, ServerConfig, ServerContext, build_app
            from .chat import check_template, load_tokenizer_config
            from .metrics import Metrics
            from .protocol import ModelInfo

            codec = _load_codec(args, model.cfg.vocab_size)
            tok = codec.tokenizer if codec is not None else None
            eos = model.cfg.eos_token_id if model.cfg.eos_token_id is not None else (tok.eos_id if tok else None)
            bos = model.cfg.bos_token_id if model.cfg.bos_token_id is not None else (tok.bos_id if tok else None)
            template, special = load_tokenizer_config(*[d for d in (args.tokenizer_model, args.load) if d])
            if args.chat_template:
                template = Path(args.chat_template).read_text()
            if template is not None:
                check_template(template)
            if codec is not None:  # the special tokens' text, where tokenizer_config.json does not say
                for key, tid in (("bos_token", bos), ("eos_token", eos)):
                    if key not in special and tid is not None:
                        special[key] = codec.piece(tid)
            info = ModelInfo(name=args.served_model_name or Path(args.load).resolve().name,
                             vocab_size=model.cfg.vocab_size, max_sequence_length=engine.max_length, eos_id=eos, bos_id=bos,
                             codec=codec, tp=tp.size, max_prompts=args.max_prompts, chat_template=template,
                             special_tokens=special)
            metrics = Metrics()
            extra = tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
            hosts = LOOPBACK + (args.host.lower().strip("[]"),) + extra
            ctx = ServerContext(None, info, metrics, ServerConfig(args.max_request_bytes, args.request_timeout,
                                                                  args.log_requests, hosts, args.health_stall_timeout))
            try:
                server = HttpServer(build_app(ctx), args.host, args.port, header_timeout=args.header_timeout,
                                    keep_alive=args.keep_alive_timeout, max_connections=args.max_connections,
                                    log_requests=args.log_requests)
            except OSError as e:
                raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    except Exception as e:  # every rank learns of any rank's failure below, so none waits for the others
        ours = isinstance(e, (ValueError, FileNotFoundError)) or type(e).__module__.startswith("megatron_ssm")
        error = f"{e}" if ours else f"{type(e).__name__}: {e}"

    errors = [error]
    if world > 1:
        errors = [None] * world
        try:
            dist.all_gather_object(errors, error, group=ctrl)
        except Exception as e:
            _say(rank, "error: " + _describe(e, rank, args.dist_timeout))
            os._exit(1)
    if any(errors):
        if error:
            _say(rank, f"error: {error}")
        elif rank == 0:
            bad = next(r for r, err in enumerate(errors) if err)
            _say(rank, f"error: rank {bad} failed to start: {errors[bad]}")
        if server is not None:
            server.sock.close()
        shutdown()
        return 2

    from .loop import ControlChannel, EngineLoop

    loop = EngineLoop(engine, ControlChannel(ctrl, world), rank, ctx.metrics if ctx else None,
                      heartbeat=args.heartbeat, drain_timeout=args.drain_timeout,
                      worker_grace=max(10.0, 2 * args.heartbeat), max_queue=args.max_queued_requests)
    signals = {"n": 0}

    def on_signal(signum, frame):
        signals["n"] += 1
        name = signal.Signals(signum).name
        if signals["n"] >= 3:
            _say(rank, f"{name} again: exiting now")
            os._exit(128 + signum)
        if rank == 0:
            _say(rank, f"{name}: " + ("finishing in-flight requests (up to {:g} s), then stopping every rank".format(
                args.drain_timeout) if signals["n"] == 1 else "aborting in-flight requests"))
        loop.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # torchrun starts each rank in a session of its own: if the launcher is killed outright, its
    # ranks are orphaned rather than signalled. Notice that and stop as if signalled.
    parent = os.getppid()

    def watch_parent():
        while not loop.stopped.wait(1.0):
            if os.getppid() != parent:
                _say(rank, f"the launcher (process {parent}) is gone: stopping")
                loop.request_stop()
                return

    if parent != 1:
        threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()

    if rank == 0:
        ctx.loop = loop
        ctx.metrics.gauge("queue_depth", "Requests waiting for a sequence slot", loop.queue_depth)
        ctx.metrics.gauge("running_sequences", "Sequences being generated", loop.running)
        server.start()
        host, port = server.address
        host = f"[{host}]" if ":" in host else host
        print(f"megatron-ssm server: listening on http://{host}:{port} (model {ctx.info.name}, "
              f"tensor-parallel {tp.size}); PUT /api, POST /v1/completions, POST /v1/chat/completions, "
              "GET /health, GET /metrics, GET /openapi.json", flush=True)

    code = 0
    try:
        loop.run()
    except Exception as e:
        _say(rank, "error: " + _describe(e, rank, args.dist_timeout))
        code = 1
    if rank == 0:
        deadline = time.monotonic() + 5.0  # let answered requests finish writing
        while ctx.active and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # a peer is gone: tearing down process groups could block on it
    shutdown()
    if rank == 0:
        _say(rank, "stopped")
    return 0
