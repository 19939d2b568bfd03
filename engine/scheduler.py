"""Continuous batching: requests wait in a bounded queue, are prefilled into free slots between
decode steps, and leave their slot the step they finish, so a long request never holds up a
short one and a new one never waits for a whole batch to end.

One thread drives it (``step``); ``submit`` and ``Request.cancel`` may come from any thread.
"""

from __future__ import annotations

import threading
from collections import deque

import torch

from .errors import EngineError, NumericalError, QueueFullError
from .generation import check_context
from .model import GPT2
from .request import Request
from .runner import Runner, graph_bucket


class Scheduler:
    """Runs up to ``max_batch`` requests at once over one model; up to ``max_waiting`` more wait.

    The cache is allocated once, at full context (``n_positions``) for every slot, and with
    ``cuda_graph`` every batch bucket's decode step is captured here, before any request runs.
    """

    def __init__(self, model: GPT2, max_batch: int = 16, max_waiting: int = 256, cuda_graph: bool | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise EngineError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise EngineError(f"max_waiting must be an integer >= 0, got {max_waiting!r}")
        self.model = model
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.cuda_graph = model.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.runner = Runner(model)  # its own cache: generate() on the same model does not disturb it
        # With graphs every step runs a bucket's rows, which may pass max_batch (12 -> 16): allocate them.
        capacity = graph_bucket(max_batch) if self.cuda_graph else max_batch
        self.capture_seconds = self.runner.reserve(capacity, model.config.n_positions, self.cuda_graph)
        self.active: dict[int, Request] = {}  # slot -> request
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self.wakeup = threading.Event()  # set by submit and cancel: work may be waiting
        self.steps = 0

    def check(self, request: Request) -> None:
        """Raise EngineError (ContextLengthError for the context) if ``request`` cannot run on this model."""
        cfg = self.model.config
        if not request.prompt:
            raise EngineError("the prompt is empty (start from <|endoftext|> instead)")
        bad = [t for t in request.prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise EngineError(f"prompt token {bad[0]} is outside the model's vocabulary [0, {cfg.vocab_size})")
        check_context(len(request.prompt), request.max_new_tokens, cfg.n_positions)

    def submit(self, requests: list[Request]) -> None:
        """Queue ``requests`` (all or none): EngineError if one cannot run, QueueFullError if they do
        not all fit in the waiting queue. Thread-safe."""
        for r in requests:
            self.check(r)
        with self._lock:
            if len(self.waiting) + len(requests) > self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); try again later")
            self.waiting.extend(requests)
        self.wakeup.set()

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting

    def step(self) -> None:
        """Free the slots of cancelled requests, prefill waiting ones into free slots, then run one
        decode step for every running request. Each request learns of its tokens and its end
        through its own callbacks."""
        for slot, r in list(self.active.items()):
            if r.cancelled:
                r.finish("cancelled")
                self._free(slot)
        self._admit()
        if not self.active:
            return
        rows = max(self.active) + 1
        if self.cuda_graph:
            rows = graph_bucket(rows)
        self.runner.penalized = any(r.sampling.penalized for r in self.active.values())
        self.runner.logprobs = any(r.logprobs is not None for r in self.active.values())
        tokens = self.runner.step(rows).tolist()
        logprobs = self.runner.logprob_out[:rows].tolist() if self.runner.logprobs else None
        self.steps += 1
        self._hand_out(list(self.active), tokens, logprobs)

    def _admit(self) -> None:
        free = [s for s in range(self.max_batch) if s not in self.active]
        admitted: list[tuple[int, Request]] = []
        with self._lock:
            while self.waiting and len(admitted) < len(free):
                r = self.waiting.popleft()
                if r.cancelled:
                    r.finish("cancelled")
                else:
                    admitted.append((free[len(admitted)], r))
        if not admitted:
            return
        slots = [s for s, _ in admitted]
        self.runner.admit([r for _, r in admitted], slots)
        self.active.update(admitted)
        index = torch.tensor(slots, device=self.runner.device)
        tokens = dict(zip(slots, self.runner.tokens[index].tolist()))
        with_logprobs = any(r.logprobs is not None for _, r in admitted)
        logprobs = dict(zip(slots, self.runner.logprob_out[index].tolist())) if with_logprobs else None
        self._hand_out(slots, tokens, logprobs)

    def _hand_out(self, slots: list[int], tokens, logprobs) -> None:
        """Give each of ``slots`` its token (and its row of log-probabilities): ``tokens`` and
        ``logprobs`` (or None) are indexed by slot."""
        for slot in slots:
            r = self.active[slot]
            try:
                r.accept(tokens[slot], None if logprobs is None else logprobs[slot])
            except NumericalError:  # NaN logits: this request fails, the others go on
                r.finish("error")
            if r.finished:
                self._free(slot)

    def _free(self, slot: int) -> None:
        del self.active[slot]
        self.runner.release([slot])

    def fail_running(self) -> None:
        """End every running request with "error" and free its slot (after a failed step)."""
        for slot, r in list(self.active.items()):
            r.finish("error")
            self._free(slot)

    def run_until_idle(self) -> None:
        """Step until no request is running or waiting (for callers without a loop of their own)."""
        while not self.idle:
            self.step()
