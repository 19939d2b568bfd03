"""The server as operators and tools use it: prompt scoring as lm-evaluation-harness asks for it,
/metrics, request timeouts, graceful shutdown, and many clients that come and go."""

import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import engine
from engine.core.request import Request, SamplingParams
from engine.core.scheduler import Scheduler

pytest.importorskip("uvicorn")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from engine.serve.app import create_app  # noqa: E402

from .serving import KEY, NAME, Server, http_request, serving, wait_until_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """(server, scheduler) over a float32 tiny model of this module's own, 16 slots."""
    with serving(engine.load_model(tiny_checkpoint, device="cpu", dtype=torch.float32), max_batch=16,
                 max_waiting=128) as server_and_scheduler:
        yield server_and_scheduler


@pytest.fixture(scope="module")
def model(served):
    return served[1].model


@pytest.fixture
def own_model(tiny_checkpoint):
    """A model of its own: a scheduler made on ``model`` would close the served one (one per model)."""
    return engine.load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)


def _post(served, body):
    return http_request(served[0].url, "POST", "/v1/completions", body)


# --- prompt scoring ---------------------------------------------------------------------------------

def test_lm_eval_loglikelihood_requests_score_the_prompt(served, model):
    """lm-evaluation-harness's ``local-completions`` loglikelihood request, verbatim in shape: token
    prompts (context + continuation), echo, logprobs 1, max_tokens 1, temperature 0, a seed; it reads
    ``token_logprobs[ctxlen:-1]`` (the last is the generated token) and checks greediness against
    ``top_logprobs``. Both must equal the engine's own scoring of the same tokens."""
    contexts = [engine.encode("The capital of France is"), engine.encode("1 2 3")]
    continuations = [engine.encode(" Paris"), engine.encode(" 4 5")]
    prompts = [c + x for c, x in zip(contexts, continuations)]
    r = _post(served, {"model": NAME, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
                       "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    for choice, context, prompt in zip(choices, contexts, prompts):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
        got = lp["token_logprobs"][len(context):-1]
        want = engine.score(model, [prompt])[0].token_logprobs[len(context) - 1:]
        assert got == pytest.approx(want, abs=1e-4)
        for token, top in zip(lp["tokens"][len(context):-1], lp["top_logprobs"][len(context):-1]):
            assert len(top) == 1 and max(top.values()) >= lp["token_logprobs"][lp["tokens"].index(token)] - 1e-4
        assert "".join(lp["tokens"][:-1]) == engine.decode(prompt)
        assert lp["text_offset"][len(prompt)] == len(engine.decode(prompt))  # the generated token follows


def test_max_tokens_0_with_echo_returns_the_prompts_logprobs(served, model):
    text = "Once upon a time there was"
    r = _post(served, {"model": NAME, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    choice, ids = body["choices"][0], engine.encode(text)
    assert choice["text"] == text and body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                                         "total_tokens": len(ids)}
    lp = choice["logprobs"]
    want = engine.score(model, text)[0].token_logprobs
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4) and lp["top_logprobs"][0] is None
    full = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)
    for t, top in enumerate(lp["top_logprobs"][1:]):
        assert list(top.values()) == pytest.approx(full[t].topk(3).values.tolist(), abs=1e-4)
    assert _post(served, {"prompt": text, "max_tokens": 0}).status_code == 400  # 0 only with echo


def test_chat_completions_is_a_404_that_says_why(served):
    r = http_request(served[0].url, "POST", "/v1/chat/completions",
                     {"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "base model without a chat format" in r.json()["error"]["message"]


# --- timeouts ---------------------------------------------------------------------------------------

def test_a_request_past_its_deadline_ends_queued_or_running(own_model):
    sched = Scheduler(own_model, max_batch=1, max_waiting=4)
    running = Request([1], 60, SamplingParams(temperature=0), stop_at_eos=False)
    queued = Request([2], 5, SamplingParams(temperature=0), deadline=time.monotonic() + 0.05)
    sched.submit([running, queued])
    sched.step()
    running.deadline = time.monotonic()  # due now, mid-generation
    time.sleep(0.06)
    sched.run_until_idle()
    assert running.finish_reason == "time" and 1 <= len(running.tokens) < 60
    assert queued.finish_reason == "time" and queued.tokens == []


def test_the_servers_request_timeout_ends_a_request(own_model):
    scheduler = Scheduler(own_model, max_batch=2)
    server = Server(create_app(scheduler, NAME, request_timeout=1e-3))
    try:
        r = http_request(server.url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 100}, key=None)
    finally:
        server.stop()
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] < 100


# --- many clients, disconnects, /metrics ------------------------------------------------------------

def _stream(url: str, body: dict, hang_up_after: int | None) -> tuple[str, str | None]:
    """Stream a completion; with ``hang_up_after`` events, close the connection then. Returns (text, finish)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    text, finish, events = "", None, 0
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        text, finish, events = text + choice["text"], choice["finish_reason"] or finish, events + 1
        if hang_up_after is not None and events >= hang_up_after:
            conn.sock.shutdown(socket.SHUT_RDWR)
            break
    conn.close()
    return text, finish


def test_64_streaming_clients_with_random_disconnects(served, model):
    """Every client that stays gets exactly its solo text; every slot comes back; /metrics parses under load."""
    server, scheduler = served
    rng = random.Random(5)
    specs = [dict(prompt=f"Client {i} says", max_tokens=rng.randint(4, 24), temperature=1.0, seed=1000 + i,
                  ignore_eos=True) for i in range(64)]
    hang_up = [rng.randint(1, 3) if rng.random() < 0.3 else None for _ in specs]
    results = [None] * len(specs)
    scrapes = []

    def client(i):
        results[i] = _stream(server.url, specs[i], hang_up[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        scrapes.append(http_request(server.url, "GET", "/metrics", key=None).text)
        time.sleep(0.05)
    for t in threads:
        t.join()
    deadline = time.time() + 10
    while scheduler.active or scheduler.waiting:
        assert time.time() < deadline, f"slots leaked: {list(scheduler.active)}"
        time.sleep(0.01)
    for i, s in enumerate(specs):
        if hang_up[i] is None:
            want = engine.generate(model, s["prompt"], s["max_tokens"], temperature=1.0, seed=s["seed"],
                                   stop_at_eos=False)
            assert results[i] == (want.texts[0], "length"), i
    for text in scrapes + [http_request(server.url, "GET", "/metrics", key=None).text]:
        families = {f.name: f for f in prometheus_parser.text_string_to_metric_families(text)}
        assert {"gpt2engine_requests", "gpt2engine_requests_running", "gpt2engine_time_to_first_token_seconds",
                "gpt2engine_kv_cache_bytes"} <= set(families)
    ended = {s.labels["finish_reason"]: s.value for s in families["gpt2engine_requests"].samples
             if s.name == "gpt2engine_requests_total"}
    assert ended.get("length", 0) >= sum(h is None for h in hang_up)
    running = [s.value for s in families["gpt2engine_requests_running"].samples]
    assert running == [0.0]
    ttft = {s.name: s.value for s in families["gpt2engine_time_to_first_token_seconds"].samples}
    assert ttft["gpt2engine_time_to_first_token_seconds_count"] >= sum(h is None for h in hang_up)


# --- graceful shutdown ------------------------------------------------------------------------------

def test_sigterm_mid_stream_ends_streams_and_exits_0(tiny_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--model", str(tiny_checkpoint), "--port",
                             str(port), "--dtype", "float32", "--max-batch", "2", "--log-level", "warning",
                             "--shutdown-timeout", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until_healthy(url, proc)
        host, _ = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 120, "stream": True,
                                                            "ignore_eos": True}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        rest = r.read().decode()  # returns: the stream ends, it does not hang
        finishes = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in rest.split("\n\n")
                    if e.startswith("data: {") and json.loads(e[6:])["choices"]]
        assert rest.rstrip().endswith("data: [DONE]") and [f for f in finishes if f] in (["abort"], ["length"])
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "shutting down" in proc.stderr.read()
