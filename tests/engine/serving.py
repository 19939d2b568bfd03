"""What the server's tests share: a uvicorn server in a thread, and plain HTTP requests."""

import http.client
import json
import socket
import threading
import time

import uvicorn

KEY = "sk-test"


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


