"""The OpenAI-compatible server, driven by the official ``openai`` client over loopback."""

import http.client
import json
import socket
import threading
import time

import pytest
import torch

import engine
from engine.core.request import Request, SamplingParams

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


from .serving import KEY, NAME, http_request as _http, serving, wait_until_healthy  # noqa: E402



@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return engine.load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def served(model):
    with serving(model, max_batch=4, max_waiting=8) as server_and_scheduler:
        yield server_and_scheduler


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _alone(model, prompt, n, **kw):
    return engine.generate(model, prompt, n, stop_at_eos=False, **kw)


def test_completion_equals_generate(client, model):
    out = client.completions.create(model=NAME, prompt="The cat sat", max_tokens=12, temperature=0)
    want = engine.generate(model, "The cat sat", 12, temperature=0)
    assert out.choices[0].text == want.texts[0] and out.object == "text_completion"
    assert out.choices[0].finish_reason == ("stop" if want.finish_reasons[0] == "stop" else "length")
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == len(want.tokens[0])
    assert out.usage.total_tokens == 3 + len(want.tokens[0])


def test_streaming_pieces_concatenate_to_the_completion(client):
    kw = dict(model=NAME, prompt="Once upon", max_tokens=20, temperature=0.9, seed=4)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.text and reasons == [whole.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_logprobs_equal_generate_plain_and_streamed(client, model):
    kw = dict(model=NAME, prompt="The cat sat", max_tokens=10, temperature=0.8, seed=9, logprobs=3)
    want = engine.generate(model, "The cat sat", 10, temperature=0.8, seed=9, logprobs=True, top_logprobs=3)
    got = client.completions.create(**kw).choices[0].logprobs
    assert got.tokens == [engine.decode([t]) for t in want.tokens[0]]
    assert got.token_logprobs == pytest.approx(want.logprobs[0], abs=1e-6)
    assert [list(top.values()) for top in got.top_logprobs] == \
        [pytest.approx([lp for _, lp in top], abs=1e-6) for top in want.top_logprobs[0]]
    assert got.text_offset[0] == 0 and got.text_offset[1] == len(got.tokens[0])
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    streamed = [lp for c in chunks if c.logprobs for lp in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(got.token_logprobs, abs=1e-6)
    plain = client.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0]
    assert plain.logprobs is None


def test_raw_stream_ends_with_done(served):
    r = _http(served[0].url, "POST", "/v1/completions",
              {"prompt": "hi", "max_tokens": 3, "stream": True, "temperature": 0})
    events = [line for line in r.text.split("\n\n") if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_n_prompts_seeds_and_stop(client, model):
    out = client.completions.create(model=NAME, prompt=["A", "B c"], n=2, max_tokens=8, temperature=1.0, seed=11)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for i, c in enumerate(out.choices):  # choice k of the request draws with seed 11 + k
        want = _alone(model, ["A", "B c"][i // 2], 8, temperature=1.0, seed=[11 + i])
        assert c.text == want.texts[0] or want.finish_reasons[0] == "stop"
    again = client.completions.create(model=NAME, prompt=["A", "B c"], n=2, max_tokens=8, temperature=1.0, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    full = client.completions.create(model=NAME, prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model=NAME, prompt="Hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_token_prompts_echo_and_extensions(client, model):
    ids = engine.encode("Token prompt")
    out = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, echo=True,
                                    extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2})
    want = _alone(model, [ids], 6, temperature=0, top_k=5, min_p=0.1, repetition_penalty=1.2)
    assert out.choices[0].text == "Token prompt" + engine.decode(want.tokens[0])


def test_concurrent_requests_equal_each_alone(served, model):
    """Eight clients at once over four slots: each gets exactly its solo tokens."""
    specs = [dict(prompt=f"Request {i}", max_tokens=6 + i, temperature=[0, 1.0][i % 2], seed=100 + i,
                  presence_penalty=0.5 * (i % 3)) for i in range(8)]
    results = [None] * 8

    def call(i):
        c = openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        results[i] = c.completions.create(model=NAME, stream=i % 2 == 0, **specs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, s in enumerate(specs):
        got = results[i]
        text = "".join(c.choices[0].text for c in got) if i % 2 == 0 else got.choices[0].text
        want = _alone(model, s["prompt"], s["max_tokens"], temperature=s["temperature"], seed=[s["seed"]],
                      presence_penalty=s["presence_penalty"])
        ended = want.tokens[0].index(engine.EOT_ID) if engine.EOT_ID in want.tokens[0] else None
        assert text == engine.decode(want.tokens[0][:ended]), i


def test_a_client_gone_mid_stream_frees_its_slot(served, monkeypatch):
    server, scheduler = served
    step = scheduler.runner.decode_step

    def slow_step(*args):  # 120 tokens of the tiny model would otherwise fit in a loaded machine's hiccup
        time.sleep(0.01)
        step(*args)

    monkeypatch.setattr(scheduler.runner, "decode_step", slow_step)
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "long", "max_tokens": 120, "stream": True,
                                                        "temperature": 0, "stop": None}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.readline().startswith(b"data: ")  # one event, then hang up
    while not scheduler.active:
        time.sleep(0.001)
    request = next(iter(scheduler.active.values()))
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 10
    while scheduler.active or scheduler.waiting:
        assert time.time() < deadline, "the abandoned request still holds its slot"
        time.sleep(0.01)
    # ended by the disconnect, long before its 120 tokens: the slot was freed at the next step. (The
    # engine side's reason: the text side's finish_reason is set by the server's loop thread, which
    # may not have drained the request yet when the slot is already free.)
    assert request.end_reason == "cancelled" and len(request.tokens) < 120


def test_queue_limit_answers_503(served, model):
    server, scheduler = served
    blockers = [Request([1], 100, SamplingParams(temperature=0), stop_at_eos=False) for _ in range(8)]
    scheduler.submit(blockers)  # 4 run and 4 wait (or all 8 wait): 7 more cannot fit in a queue of 8
    r = _http(server.url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 7})
    for b in blockers:
        b.cancel()
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "min_p": 2}, 400, "min_p"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": "2"}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": 1, "echo": True, "stream": True}, 400, "stream"),
    ({"prompt": "x", "max_tokens": 0, "echo": True, "stream": True}, 400, "stream"),
    ({"prompt": [1, 2, 60000]}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 200}, 400, "max_tokens"),  # TINY: 128 positions
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "seed": -5}, 400, "seed"),  # the CLI's and generate()'s rule: [0, 2^64)
    ({"prompt": "x", "seed": 2**64}, 400, "seed"),
])
def test_bad_requests_get_openai_errors(served, body, status, param):
    r = _http(served[0].url, "POST", "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_api_key_models_health_and_404(served):
    url = served[0].url
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model=NAME, prompt="x", max_tokens=1)
    assert _http(url, "GET", "/v1/models", key=None).status_code == 401
    models = openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list()
    assert [m.id for m in models.data] == [NAME]
    assert _http(url, "GET", "/health", key=None).json()["status"] == "ok"
    missing = _http(url, "GET", "/v1/chat")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert _http(url, "POST", "/v1/completions", raw=b"{not json").status_code == 400


def test_the_command_serves_and_reports_mistakes_in_one_line(tiny_checkpoint):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--model", str(tiny_checkpoint), "--port",
                             str(port), "--dtype", "float32", "--max-batch", "2", "--log-level", "warning",
                             "--quantize", "int8"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", proc)
        out = _http(f"http://127.0.0.1:{port}", "POST", "/v1/completions",
                    {"prompt": "Hi", "max_tokens": 4, "temperature": 0}, key=None).json()
        assert out["model"] == str(tiny_checkpoint) and out["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    started = [line for line in proc.stderr.read().splitlines() if line.startswith("serving")]
    assert started == [f"serving {tiny_checkpoint} (2L/96d int8 weights, float32 cpu eager, batch 2, KV cache "
                       # the dtype and quantisation as generate says them
                       f"0.4 MB for 2 x 128 positions) on http://127.0.0.1:{port}"], started
    bad = subprocess.run([sys.executable, "-m", "engine.serve", "--model", "gpt5"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: unknown model name"), bad.stderr


def test_start_up_mistakes_are_one_line_before_the_model_loads():
    """The port and host are checked (bound) first: with an unknown model name, the error is still
    about them, so no load was attempted."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in [
            (["--port", "99999"], "error: argument --port: --port must be an integer in [0, 65535], got 99999"),
            (["--port", "-1"], "error: argument --port: --port must be an integer in [0, 65535], got -1"),
            (["--host", "999.1.1.1"], "error: cannot listen on 999.1.1.1:8000: "),
            (["--port", str(port)], f"error: cannot listen on 127.0.0.1:{port}: address already in use"),
        ]:
            r = subprocess.run([sys.executable, "-m", "engine.serve", "--model", "gpt5", *args], cwd=root,
                               capture_output=True, text=True, timeout=120)
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), (args, r.stderr)
