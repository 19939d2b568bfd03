"""``python -m engine.serve --model M``: serve the model over HTTP in OpenAI's completions format.

A user mistake ends in one ``error:`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import socket
import sys

from ..cli import (CommandParser, HelpFormatter, UsageError, add_placement_options, float_in, int_at_least, int_in,
                   run_cli)
from .defaults import MAX_WAITING, server_dtype, server_max_batch


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m engine.serve", formatter_class=HelpFormatter,
                description="Serve GPT-2 over HTTP: POST /v1/completions (OpenAI's format, streamed with "
                            "stream=true), GET /v1/models, GET /health. Requests join the running batch "
                            "between decode steps (continuous batching).",
                epilog="example: python -m engine.serve --model gpt2 --port 8000, then\n  "
                       "curl localhost:8000/v1/completions -H 'Content-Type: application/json' "
                       "-d '{\"prompt\": \"Hello\", \"max_tokens\": 20}'")
    p.add_argument("--model", default="gpt2", help="hub name, local HF directory, or random:<size>")
    p.add_argument("--served-model-name", default=None, help="the name clients send as 'model' (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int_in("--port", 0, 65535), default=8000, help="TCP port (0: any free one)")
    add_placement_options(p, "default: float16 on CUDA; on CPU int8-all where its fused step is measured "
                             "fastest, else bfloat16 where the processor has native bf16, else float32; "
                             "float32 with --quantize on CPU")
    p.add_argument("--max-batch", type=int_at_least("--max-batch", 1), default=None,
                   help="requests decoded together (default: 64 on CUDA, 16 on CPU)")
    p.add_argument("--max-waiting", type=int_at_least("--max-waiting", 0), default=MAX_WAITING,
                   help="requests queued beyond the batch before the server answers 503")
    p.add_argument("--max-context", type=int_at_least("--max-context", 1), default=None,
                   help="positions a request may use, prompt and new tokens (default: the model's, 1024): the KV "
                        "cache holds max-batch x max-context positions, and its size is said at start-up")
    p.add_argument("--request-timeout", type=float_in("--request-timeout", "(0, inf)", lambda v: v > 0), default=None,
                   help="seconds from a request's arrival after which it ends, queued or running, with the text so "
                        "far (finish_reason length)")
    p.add_argument("--shutdown-timeout", type=float_in("--shutdown-timeout", "[0, inf)", lambda v: v >= 0),
                   default=30.0, help="on SIGTERM or Ctrl-C: seconds the running requests may take to finish "
                                      "before they are cut (finish_reason abort); new ones get 503 meanwhile")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1/*")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                   help="on CUDA, run every decode step op by op instead of replaying CUDA graphs")
    p.add_argument("--detokenize-on", choices=["auto", "engine", "loop"], default="auto",
                   help="the thread that turns tokens into text and matches stop strings: the engine thread "
                        "between steps, or the HTTP event loop; auto: the loop on CUDA (beside the device's next "
                        "step), the engine thread on CPU (where the step itself needs the interpreter)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    return p


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` as uvicorn binds one (IPv6 when the host has a colon,
    SO_REUSEADDR); UsageError naming both when the host is no address of this machine or the
    port is taken. Bound before the model loads, so that such a mistake costs no load, and handed
    to uvicorn, so that no other process can take the port in between."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # gaierror for a name that does not resolve, EADDRINUSE, EADDRNOTAVAIL, EACCES
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}") from None
    return sock


def run(args) -> int:
    sock = listen(args.host, args.port)
    try:
        import uvicorn

        from .app import ServerState, create_app
        from .shutdown import DrainingServer
    except ImportError as e:
        raise UsageError(f"the server needs the 'serve' extra ({e.name} is missing): pip install -e \".[serve]\"") \
            from None
    import torch

    from ..errors import EngineError
    from ..model.loader import load_model
    from ..core.scheduler import Scheduler

    try:
        dtype = args.dtype or server_dtype(args.device, args.quantize)
        model = load_model(args.model, device=args.device, dtype=dtype, backend=args.backend, quantize=args.quantize)
        max_batch = args.max_batch or server_max_batch(model.device.type)
        if args.max_context is not None and args.max_context > model.config.n_positions:
            raise UsageError(f"--max-context must be at most the model's context of {model.config.n_positions}, "
                             f"got {args.max_context}")
        scheduler = Scheduler(model, max_batch=max_batch, max_waiting=args.max_waiting, cuda_graph=args.cuda_graph,
                              max_context=args.max_context)
    except (EngineError, torch.cuda.OutOfMemoryError) as e:
        raise UsageError(str(e)) from None
    name = args.served_model_name or args.model
    dtype = str(model.dtype).removeprefix("torch.")
    weights = f"{model.quantize} weights, {dtype}" if model.quantize else dtype
    graphs = f", graphs captured in {scheduler.capture_seconds:.1f} s" if scheduler.capture_seconds else ""
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    cache = scheduler.runner.cache
    print(f"serving {name} ({model.config.n_layer}L/{model.config.n_embd}d {weights} {model.device} "
          f"{model.backend}, batch {max_batch}, KV cache {_megabytes(cache.nbytes)} MB for {cache.slots} x "
          f"{scheduler.max_context} positions{graphs}) on http://{url_host}:{port}", file=sys.stderr)
    state = ServerState()
    text_on_loop = {"auto": None, "engine": False, "loop": True}[args.detokenize_on]
    app = create_app(scheduler, name, args.api_key, args.request_timeout, state, text_on_loop)
    server = DrainingServer(uvicorn.Config(app, log_level=args.log_level), scheduler, state, args.shutdown_timeout)
    server.run(sockets=[sock])
    return 0


def _megabytes(n: int) -> str:
    mb = n / 2**20
    return f"{mb:.0f}" if mb >= 10 else f"{mb:.1f}"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_cli(build_parser, run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
