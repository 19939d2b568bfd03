"""The engine thread: the one owner of the model, stepping the scheduler while there is work.

HTTP handlers run on the asyncio loop and never touch the model: they submit requests (a
thread-safe call) and receive each request's text and end through an asyncio queue. Once per
step the engine thread hands the step's work to the event loop in one ``call_soon_threadsafe``
(one wake-up for 64 clients, not 64): on CUDA the requests, whose tokens become text there
(``Request.drain``: detokenisation, stop strings) while the device runs the next step; on CPU the
events, their text made on the engine thread between steps (``EngineLoop(text_on_loop=...)``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from typing import Callable

from ..core.request import Request
from ..core.scheduler import Scheduler

log = logging.getLogger("engine.serve")

IDLE_POLL_SECONDS = 0.5  # how often an idle loop looks at its stop flag (work wakes it at once)


class EngineLoop:
    """Runs ``scheduler.step()`` in a daemon thread from ``start()`` to ``stop()``; ``call`` runs a
    function on that thread between steps (prompt scoring uses the model too)."""

    def __init__(self, scheduler: Scheduler, text_on_loop: bool | None = None):
        """``text_on_loop``: turn tokens into text on the event loop (default on CUDA, where it
        overlaps the device's next step) or on the engine thread between steps (default on CPU,
        where the step itself runs Python op by op and text work beside it only contends for the
        interpreter: measured in ``benchmarks/results/cpu/serve_load.md``). Events reach the
        loop in one wake-up a step either way."""
        self.scheduler = scheduler
        self.text_on_loop = scheduler.model.device.type == "cuda" if text_on_loop is None else text_on_loop
        self._outbox: list[tuple[asyncio.Queue, tuple]] = []  # events made by the thread draining text
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._calls: list[tuple[Callable, Future]] = []
        self._calls_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: dict[int, asyncio.Queue] = {}  # id(request) -> its job's event queue

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start stepping; each step's requests are handed to ``loop`` (without one, their text is
        made on the engine thread and their callbacks run there: an in-process driver)."""
        self._loop = loop
        if loop is not None:
            self.scheduler.on_step = self._post
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.scheduler.wakeup.set()
        self._thread.join(timeout=30)
        self.scheduler.on_step = None

    def call(self, fn: Callable[[], object]) -> asyncio.Future:
        """``fn()`` run on the engine thread between two steps; an awaitable of its result."""
        future: Future = Future()
        with self._calls_lock:
            self._calls.append((fn, future))
        self.scheduler.wakeup.set()
        return asyncio.wrap_future(future)

    def attach(self, requests: list[Request], stream: bool) -> asyncio.Queue:
        """Route each request's events to one asyncio queue (call on the event loop): ``("text", i,
        (piece, tokens))`` when ``stream`` (``tokens``: how many the request had when that text
        came) and ``("end", i, request)``, i the request's index."""
        events: asyncio.Queue = asyncio.Queue()
        for i, r in enumerate(requests):
            if stream:
                r.on_text = lambda piece, i=i, r=r: self._outbox.append((events, ("text", i, (piece, len(r.tokens)))))
            r.on_finish = lambda req, i=i: self._outbox.append((events, ("end", i, req)))
            self._listeners[id(r)] = events
        return events

    def _drain(self, requests: list[Request]) -> list[tuple[asyncio.Queue, tuple]]:
        """The step's tokens of this server's requests as text and events (a ``generate()`` sharing
        the model drains its own requests)."""
        for r in requests:
            if id(r) in self._listeners:
                r.drain()
                if r.finished:
                    del self._listeners[id(r)]
        outbox, self._outbox = self._outbox, []
        return outbox

    def _post(self, requests: list[Request]) -> None:
        """On the engine thread, once a step: hand the step's requests (or their events) to the loop."""
        try:
            if self.text_on_loop:
                self._loop.call_soon_threadsafe(self._deliver, requests)
            else:
                self._loop.call_soon_threadsafe(self._put, self._drain(requests))
        except RuntimeError:  # the event loop has closed (the server is shutting down): nobody listens
            pass

    def _deliver(self, requests: list[Request]) -> None:
        """On the event loop: the step's tokens become text and events."""
        self._put(self._drain(requests))

    @staticmethod
    def _put(outbox: list[tuple[asyncio.Queue, tuple]]) -> None:
        for events, item in outbox:
            events.put_nowait(item)

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # handed to the awaiting handler
                    future.set_exception(e)

    def _run(self) -> None:
        sched = self.scheduler
        while not self._stopping.is_set():
            self._run_calls()
            if sched.idle:
                sched.wakeup.wait(IDLE_POLL_SECONDS)
                sched.wakeup.clear()
                continue
            try:
                sched.step()
            except Exception:  # a bug or an out-of-memory: fail what runs, keep serving
                log.exception("the decode step failed; failing the running requests")
                sched.fail_running()
