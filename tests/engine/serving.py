"""What the server's tests share: a uvicorn server in a thread over a model's scheduler, plain
HTTP requests, and waiting for ``python -m engine.serve`` to come up."""

import contextlib
import http.client
import json
import socket
import threading
import time

import uvicorn

KEY = "sk-test"
NAME = "tiny-gpt2"


class Response:
    def __init__(self, status, headers, text):
        self.status_code, self.headers, self.text = status, headers, text

    def json(self):
        return json.loads(self.text)


def http_request(url, method, path, body=None, key=KEY, raw=None):
    """One plain HTTP request (the standard library's client: no dependency of our own)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request(method, path, body=raw if raw is not None else (None if body is None else json.dumps(body)),
                 headers=headers)
    r = conn.getresponse()
    out = Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
    conn.close()
    return out


class Server:
    """uvicorn in a thread on a free loopback port, stopped at the end of the module."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)




@contextlib.contextmanager
def serving(model, **scheduler_options):
    """(server, scheduler): the app over a new scheduler of ``model``, served until the block ends."""
    from engine.core.scheduler import Scheduler
    from engine.serve.app import create_app

    scheduler = Scheduler(model, **scheduler_options)
    server = Server(create_app(scheduler, NAME, api_key=KEY))
    try:
        yield server, scheduler
    finally:
        server.stop()


def wait_until_healthy(url: str, proc, seconds: float = 120) -> None:
    """Wait for ``python -m engine.serve`` (``proc``) to answer /health; fail with its stderr if it exits."""
    deadline = time.time() + seconds
    while True:
        try:
            if http_request(url, "GET", "/health", key=None).status_code == 200:
                return
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.1)
