"""The engine thread: the one owner of the model, stepping the scheduler while there is work.

HTTP handlers run on the asyncio loop and never touch the model: they submit requests (a
thread-safe call) and receive each request's text and end through an asyncio queue, fed from this
thread with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from ..request import Request
from ..scheduler import Scheduler

log = logging.getLogger("engine.serve")

IDLE_POLL_SECONDS = 0.5  # how often an idle loop looks at its stop flag (work wakes it at once)


class EngineLoop:
    """Runs ``scheduler.step()`` in a daemon thread from ``start()`` to ``stop()``."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.scheduler.wakeup.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        sched = self.scheduler
        while not self._stopping.is_set():
            if sched.idle:
                sched.wakeup.wait(IDLE_POLL_SECONDS)
                sched.wakeup.clear()
                continue
            try:
                sched.step()
            except Exception:  # a bug or an out-of-memory: fail what runs, keep serving
                log.exception("the decode step failed; failing the running requests")
                sched.fail_running()


def attach(requests: list[Request], loop: asyncio.AbstractEventLoop, stream: bool) -> asyncio.Queue:
    """Route each request's events to one asyncio queue, from the engine thread: ``("text", i,
    (piece, tokens))`` (when ``stream``; ``tokens``: how many the request had when that text came)
    and ``("end", i, request)``, i the request's index."""
    events: asyncio.Queue = asyncio.Queue()

    def put(item):
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server is shutting down): nobody listens
            pass

    for i, r in enumerate(requests):
        if stream:
            r.on_text = lambda piece, i=i, r=r: put(("text", i, (piece, len(r.tokens))))
        r.on_finish = lambda req, i=i: put(("end", i, req))
    return events
