"""Graceful shutdown: the server's first SIGTERM or SIGINT drains it before uvicorn stops."""

from __future__ import annotations

import sys
import threading
import time

import uvicorn

from ..core.scheduler import Scheduler
from .app import ServerState

DRAIN_POLL_SECONDS = 0.05


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first SIGTERM or SIGINT drains: new completions get 503 at once
    (``state.draining``), the running requests get ``timeout`` seconds to finish, then the rest are
    cut (finish reason "abort", so their streams end properly), and only then does uvicorn close:
    no client hangs and the process exits 0. A second signal stops at once, as uvicorn's does."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, state: ServerState, timeout: float):
        super().__init__(config)
        self.scheduler, self.state, self.timeout = scheduler, state, timeout

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:
            return super().handle_exit(sig, frame)
        self.state.draining = True
        print("shutting down: finishing the running requests (signal again to stop at once)", file=sys.stderr)
        threading.Thread(target=self._drain, name="drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.scheduler.idle and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_SECONDS)
        self.scheduler.close("abort")
        self.should_exit = True
