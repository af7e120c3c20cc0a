"""``rollout`` command line.

    rollout generate --model smollm2 --chat "What is the capital of France?"
    rollout serve --model smollm2 --local --bind tcp://127.0.0.1:5555      (one engine in this process)
    rollout serve --model DIR --workers 2                                  (a Ray pool of 2 workers)
    rollout serve --model smollm2 --local --http 127.0.0.1:8000            (+ OpenAI-compatible HTTP)
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger("rollout")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="Hugging Face model directory, or 'smollm2' for the offline SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: the share of the device the engine may fill (everything in use at its start counts)")
    p.add_argument("--fp32-lm-head", action="store_true",
                   help="bf16/fp16 models: the final norm, lm_head and logprobs in fp32")


def _engine_config(args: argparse.Namespace, **extra):
    from engine import EngineConfig
    return EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                        seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
                        fp32_lm_head=args.fp32_lm_head, **extra)


def _generate(args: argparse.Namespace) -> int:
    from engine import LLMEngine, SamplingParams
    from engine.smollm2 import chat_prompt_ids

    engine = LLMEngine(_engine_config(args))
    tok = engine.tokenizer
    texts = args.chat or args.prompt
    if not texts:
        raise SystemExit("give at least one --chat or --prompt")
    prompts = ([chat_prompt_ids(tok, [{"role": "user", "content": t}]) for t in args.chat] if args.chat
               else [tok.encode(t) for t in args.prompt])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.sample_seed)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(c.token_ids) for c in outs)
    for text, out in zip(texts, outs):
        answer = tok.decode(out.token_ids, skip_special_tokens=True)
        print(f"> {text}\n{answer}\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]\n")
    print(f"{num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.1f} tokens/s "
          f"({engine.config.device}, {engine.config.dtype}, batch of {len(prompts)})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    config = _engine_config(args, host_kv_cache_bytes=int(args.host_kv_cache_gb * (1 << 30)))
    if args.http is not None:
        _check_http_args(args)
    secret = None
    if args.auth_secret_file:
        with open(args.auth_secret_file, "rb") as f:
            secret = f.read().strip()
    return asyncio.run(_serve_async(args, config, secret))


def _check_http_args(args: argparse.Namespace) -> None:
    """Before any model loads: a well-formed --http address, and a key when it is not loopback."""
    from rollout.http_uvicorn import parse_host_port
    from rollout.server import is_loopback

    host, port = parse_host_port(args.http)
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            args.api_key = f.read().strip()
        if not args.api_key:
            raise ValueError(f"--api-key-file {args.api_key_file!r} is empty")
    if args.http_max_in_flight < 1:
        raise ValueError(f"--http-max-in-flight must be >= 1, got {args.http_max_in_flight}")
    if not is_loopback(f"tcp://{host}:{port}") and not args.api_key:
        raise ValueError(f"--http {args.http} is not loopback: give --api-key or --api-key-file (bearer auth)")
    if args.chat_template is not None:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                args.chat_template_text = f.read()
        except OSError as e:
            raise ValueError(f"--chat-template: cannot read {args.chat_template!r}: {e.strerror}") from None
        if not args.chat_template_text.strip():
            raise ValueError(f"--chat-template {args.chat_template!r} is empty")
    from rollout.chat_sessions import SessionConfig
    args.session_config = SessionConfig(ttl_s=args.http_session_ttl, max_conversations=args.http_max_sessions,
                                        max_tokens=args.http_session_max_tokens,
                                        completions=not args.http_no_completion_sessions)


def _served_model_name(args: argparse.Namespace) -> str:
    from pathlib import Path
    return args.served_model_name or (args.model if args.model.lower() == "smollm2" else Path(args.model).name)


def _http_tokenizer_and_len(backend, config):
    """The tokenizer and context length the HTTP front end works with: the local engine's, or for a Ray pool
    the model directory's (loaded here; the workers' engines read the same files)."""
    from engine.llm_engine import resolve_model_path
    from engine.model_config import ModelConfig
    from rollout.local import LocalBackend

    if isinstance(backend, LocalBackend):
        return backend.loop.tokenizer(), backend.loop.engine.max_model_len
    from transformers import AutoTokenizer
    path = resolve_model_path(config.model)
    max_pos = ModelConfig.from_pretrained(path).max_position_embeddings
    return AutoTokenizer.from_pretrained(str(path)), min(config.max_model_len or max_pos, max_pos)


def _allow_update_weights(args: argparse.Namespace) -> bool | None:
    """--no-update-weights: off; --allow-update-weights: on; neither: on iff an auth secret is set (FrontEnd)."""
    if args.no_update_weights:
        return False
    return True if args.allow_update_weights else None


def _make_backend(args: argparse.Namespace, config):
    if args.local or args.workers == 0:
        from rollout.local import LocalBackend
        logger.info("serve: one engine in this process (%s on %s)", args.model, args.device)
        return LocalBackend(config)
    import ray

    from rollout.pool import RolloutPool
    if args.ray_address is None and not ray.is_initialized():
        ray.init(address="local", num_cpus=args.ray_num_cpus or max(2, args.workers), include_dashboard=False)
    logger.info("serve: a Ray pool of %d workers (%s on %s)", args.workers, args.model, args.device)
    return RolloutPool(config, args.workers, address=args.ray_address, num_gpus_per_worker=args.num_gpus_per_worker)


async def _serve_async(args: argparse.Namespace, config, secret: bytes | None) -> int:
    import asyncio
    import signal

    from rollout.protocol import ProtocolLimits
    from rollout.server import FrontEnd

    loop = asyncio.get_running_loop()
    # NOTE: building a backend blocks (model load, Ray start); keep the loop free for signals meanwhile.
    backend = await loop.run_in_executor(None, _make_backend, args, config)
    frontend = FrontEnd(backend, args.bind, limits=ProtocolLimits(), allow_update_weights=_allow_update_weights(args),
                        auth_secret=secret, max_in_flight=args.max_in_flight,
                        request_timeout_s=args.request_timeout)
    http = None
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.http is not None:
            from rollout.http_server import HttpConfig, create_app
            from rollout.http_uvicorn import HttpServer, parse_host_port
            tokenizer, max_model_len = await loop.run_in_executor(None, _http_tokenizer_and_len, backend, config)
            if args.chat_template is not None:
                tokenizer.chat_template = args.chat_template_text
            http_config = HttpConfig(model_name=_served_model_name(args), max_model_len=max_model_len,
                                     api_key=args.api_key or None, limits=ProtocolLimits(),
                                     max_in_flight=args.http_max_in_flight, sessions=args.session_config)
            http = HttpServer(create_app(backend, tokenizer, http_config), *parse_host_port(args.http))
        address = await frontend.start()
        logger.info("serve: listening on %s (Ctrl-C or SIGTERM for a graceful shutdown)", address)
        print(f"rollout serve: listening on {address}", flush=True)
        if http is not None:
            url = await http.start()
            print(f"rollout serve: OpenAI-compatible HTTP on {url}/v1 (model {http_config.model_name!r})", flush=True)
        await stop.wait()
        logger.info("serve: shutting down: no new requests; waiting up to %.0f s for %d in flight",
                    args.shutdown_timeout, frontend.num_in_flight)
        if http is not None:
            await http.shutdown()
        await frontend.shutdown(args.shutdown_timeout)
    finally:
        await backend.shutdown()
    logger.info("serve: stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rollout", description="RLHF rollout generation service")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from prompts with one engine in this process")
    _add_engine_args(gen)
    gen.add_argument("--chat", action="append", help="a user message, wrapped in the model's chat template")
    gen.add_argument("--prompt", action="append", help="raw text, tokenized as is")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sample-seed", type=int, default=None)
    gen.set_defaults(func=_generate)
    srv = sub.add_parser("serve", help="serve rollouts over ZeroMQ (docs/protocol.md)")
    _add_engine_args(srv)
    srv.add_argument("--bind", default="tcp://127.0.0.1:5555",
                     help="ZeroMQ endpoint; a non-loopback address needs --auth-secret-file")
    srv.add_argument("--workers", type=int, default=1, help="Ray workers (0 = --local)")
    srv.add_argument("--local", action="store_true", help="one engine in this process, no Ray")
    srv.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    srv.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray (default max(2, workers))")
    srv.add_argument("--num-gpus-per-worker", type=float, default=None,
                     help="CUDA: each worker's share of a GPU (< 1 shares it, e.g. with a colocated trainer)")
    upd = srv.add_mutually_exclusive_group()
    upd.add_argument("--no-update-weights", action="store_true", help="answer update_weights with 'disabled'")
    upd.add_argument("--allow-update-weights", action="store_true",
                     help="serve update_weights without an auth secret (by default it is on only with "
                          "--auth-secret-file: without one any local user could reach the socket)")
    srv.add_argument("--host-kv-cache-gb", type=float, default=0.0, help="pinned host pool for idle sessions' KV")
    srv.add_argument("--auth-secret-file", default=None,
                     help="file holding the shared HMAC secret (>= 16 bytes); every message must be signed")
    srv.add_argument("--max-in-flight", type=int, default=1024)
    srv.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                     help="cancel a request (not health / update_weights) after this long; it is answered 'aborted' "
                          "(default: no timeout)")
    srv.add_argument("--http", default=None, metavar="HOST:PORT",
                     help="also serve the OpenAI-compatible HTTP API (docs/openai.md) over the same backend, next to "
                          "ZeroMQ; a non-loopback host needs --api-key or --api-key-file")
    srv.add_argument("--http-max-in-flight", type=int, default=1024,
                     help="HTTP completions generating at once (streams included); past it: 429")
    srv.add_argument("--api-key", default=None, help="HTTP bearer key (any host); prefer --api-key-file")
    srv.add_argument("--api-key-file", default=None, help="file holding the HTTP bearer key")
    srv.add_argument("--chat-template", default=None, metavar="FILE",
                     help="HTTP: a Jinja chat template replacing the tokenizer's (e.g. "
                          "examples/tool_chat_template.jinja gives SmolLM2 tools)")
    srv.add_argument("--http-session-ttl", type=float, default=600.0,
                     help="HTTP: seconds an idle chat conversation keeps its session (docs/openai.md, Sessions)")
    srv.add_argument("--http-max-sessions", type=int, default=1024,
                     help="HTTP: conversations remembered at most (the least recently used idle one goes)")
    srv.add_argument("--http-session-max-tokens", type=int, default=4_000_000,
                     help="HTTP: tokens remembered over all conversations at most (the token-prefix index)")
    srv.add_argument("--http-no-completion-sessions", action="store_true",
                     help="HTTP: /v1/completions neither records nor continues conversations (chat still does)")
    srv.add_argument("--served-model-name", default=None,
                     help="the model name HTTP requests must send (default: the --model folder's name)")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds to wait for in-flight requests on SIGINT/SIGTERM")
    srv.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
