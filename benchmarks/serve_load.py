"""Load test of ``engine.serve``: N concurrent streaming clients over loopback HTTP, then the same
workload through the scheduler in-process (no HTTP), on the same machine in the same run.

    python -m benchmarks.serve_load                       # gpt2 (random weights), 16 clients x 64 tokens
    python -m benchmarks.serve_load --clients 64 --device cuda

Each client sends ``--requests`` streaming completions one after another (a ``--prompt-tokens``
prompt of its own, ``--max-tokens`` new tokens, EOS ignored, temperature 1 with its own seed) and
stops starting new ones after ``--time-limit`` seconds. Reported per phase: requests/s, output
tokens/s, time to first token and inter-token latency (p50/p99), for one client alone and for all
together: the aggregate over a single stream is what continuous batching buys, and the HTTP
aggregate over the in-process one is what the server costs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .report import write_results

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Trace:
    """One request as its client saw it."""
    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival time of each text piece
    tokens: int = 0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summarise(traces: list[Trace], wall: float) -> dict:
    ttft = [(t.chunks[0] - t.sent) * 1e3 for t in traces if t.chunks]
    itl = [(b - a) * 1e3 for t in traces for a, b in zip(t.chunks, t.chunks[1:])]
    tokens = sum(t.tokens for t in traces)
    return {"requests": len(traces), "wall_s": wall, "req_per_s": len(traces) / wall, "out_tok_per_s": tokens / wall,
            "ttft_p50_ms": _percentile(ttft, 50), "ttft_p99_ms": _percentile(ttft, 99),
            "itl_p50_ms": _percentile(itl, 50), "itl_p99_ms": _percentile(itl, 99)}


def _prompt(client: int, request: int, length: int) -> list[int]:
    rng = random.Random(client * 1000 + request)
    return [rng.randrange(50256) for _ in range(length)]


def _run_clients(clients: int, requests: int, time_limit: float, one_request) -> tuple[list[Trace], float]:
    """``clients`` threads, each calling ``one_request(client, request) -> Trace`` in turn."""
    traces: list[Trace] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def client(c):
        for r in range(requests):
            if time.perf_counter() - start > time_limit:
                return
            trace = one_request(c, r)
            with lock:
                traces.append(trace)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return traces, time.perf_counter() - start


# --- over HTTP ---------------------------------------------------------------------------------------
def _http_request(port: int, body: dict) -> Trace:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    trace = Trace(time.perf_counter())
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    for line in r:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            trace.tokens = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["text"]:
            trace.chunks.append(time.perf_counter())
    conn.close()
    return trace


def _start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.serve", "--model", args.model, "--port", str(port),
           "--max-batch", str(args.clients), "--max-waiting", str(4 * args.clients), "--log-level", "warning"]
    for flag in ("device", "dtype", "backend", "detokenize_on"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)


def http_phase(args, clients: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start_server(args, port)
    try:
        def one(c, r):
            body = {"prompt": _prompt(c, r, args.prompt_tokens), "max_tokens": args.max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}, "temperature": 1.0, "seed": c * 1000 + r,
                    "ignore_eos": True}
            return _http_request(port, body)

        one(0, 99)  # warm-up: first-call costs (kernels, allocator) stay out of the figures
        traces, wall = _run_clients(clients, args.requests, args.time_limit, one)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return summarise(traces, wall)


# --- in-process, no HTTP ---------------------------------------------------------------------------
def api_phase(args, clients: int, scheduler) -> dict:
    from engine.core.request import Request, SamplingParams

    def one(c, r):
        done = threading.Event()
        trace = Trace(time.perf_counter())
        request = Request(_prompt(c, r, args.prompt_tokens), args.max_tokens,
                          SamplingParams(temperature=1.0, seed=c * 1000 + r), stop_at_eos=False,
                          on_text=lambda piece: trace.chunks.append(time.perf_counter()),
                          on_finish=lambda req: done.set())
        scheduler.submit([request])
        done.wait()
        trace.tokens = len(request.tokens)
        return trace

    one(0, 99)
    traces, wall = _run_clients(clients, args.requests, args.time_limit, one)
    return summarise(traces, wall)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--detokenize-on", choices=["auto", "engine", "loop"], default=None,
                   help="the server's --detokenize-on (default: its own)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--time-limit", type=float, default=300.0, help="clients start no request after this (s)")
    p.add_argument("--name", default="serve_load")
    p.add_argument("--smoke", action="store_true", help="a tiny run: 2 clients, 1 request, 4 tokens")
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.requests, args.max_tokens, args.prompt_tokens = 2, 1, 4, 5

    import engine
    from engine.core.scheduler import Scheduler
    from engine.serve.loop import EngineLoop

    rows = []
    for clients in (1, args.clients):  # a single stream first: the baseline the aggregate is judged by
        rows.append({"path": "http", "clients": clients, **http_phase(args, clients)})
        print(rows[-1], flush=True)
    from engine.serve.defaults import server_dtype

    model = engine.load_model(args.model, device=args.device, dtype=args.dtype or server_dtype(args.device),
                              backend=args.backend)
    scheduler = Scheduler(model, max_batch=args.clients, max_waiting=4 * args.clients)
    loop = EngineLoop(scheduler)
    loop.start()
    try:
        for clients in (1, args.clients):
            rows.append({"path": "api", "clients": clients, **api_phase(args, clients, scheduler)})
            print(rows[-1], flush=True)
    finally:
        loop.stop()
    agg = {(r["path"], r["clients"]): r["out_tok_per_s"] for r in rows}
    n = args.clients
    extra = {"model": args.model, "dtype": str(model.dtype), "quantize": model.quantize, "backend": model.backend,
             "threads": torch.get_num_threads(),
             "clients": n, "requests_per_client": args.requests, "prompt_tokens": args.prompt_tokens,
             "max_tokens": args.max_tokens, "cuda_graph": scheduler.cuda_graph,
             "detokenize_on": args.detokenize_on or "auto",
             "aggregate_over_single_stream_http": agg["http", n] / agg["http", 1],
             "aggregate_over_single_stream_api": agg["api", n] / agg["api", 1],
             "http_overhead": 1 - agg["http", n] / agg["api", n]}
    notes = ("Output tokens/s summed over every client; TTFT from sending the request to its first text; "
             "ITL between consecutive text pieces of a request. `http`: `python -m engine.serve` in its own "
             "process, clients in this one (http.client, one thread each); `api`: `Scheduler` + `EngineLoop` in "
             "this process, one thread per client, no HTTP.")
    out = write_results(args.name, model.device, rows, ["path", "clients", "requests", "wall_s", "req_per_s",
                                                         "out_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                                                         "itl_p99_ms"], extra, notes)
    print(json.dumps({k: v for k, v in extra.items() if "over" in k or "overhead" in k}, indent=1))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
