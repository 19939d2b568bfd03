"""Replicas on Ray Serve: two CPU replicas of the server, driven with the ``openai`` client."""

import socket

import pytest

import engine

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_two_replicas_serve_the_same_completions(tiny_checkpoint):
    from engine.serve.ray import build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build({"model": str(tiny_checkpoint), "served_model_name": "tiny", "dtype": "float32",
                     "device": "cpu", "max_batch": 2, "replicas": 2, "num_cpus": 0.5})
        serve.run(app, name="gpt2engine", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        model = engine.load_model(str(tiny_checkpoint), device="cpu", dtype="float32")
        for i in range(6):  # spread over both replicas by Ray's router: every answer is the model's
            out = client.completions.create(model="tiny", prompt=f"Request {i}", max_tokens=5, temperature=0)
            want = engine.generate(model, f"Request {i}", 5, temperature=0)
            assert out.choices[0].text == want.texts[0]
        streamed = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == \
            engine.generate(model, "Hi", 4, temperature=0).texts[0]
        status = serve.status().applications["gpt2engine"].deployments["gpt2engine"]
        assert status.replica_states.get("RUNNING") == 2
    finally:
        serve.shutdown()
        ray.shutdown()
