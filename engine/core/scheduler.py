"""Continuous batching, the one driver of a model's runner: requests wait in a bounded queue, are
prefilled into free slots between decode steps, and leave their slot once they end, so a long
request never holds up a short one and a new one never waits for a whole batch to end.

``generate()``, the CLI, the scoring-free API and the server all run requests through it. Any
thread may ``submit`` or cancel; ``step`` may be called from several threads (one runs at a time),
so ``generate()`` on a model that a server is also serving simply shares its batch.

On CUDA the host reads step n's tokens while the device runs step n + 1 (``TokenReader``): a
request's end is seen one step late, and its token of that extra step is ignored.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from ..checks import check_int, check_prompt_ids
from ..errors import ContextLengthError, EngineError, NumericalError, QueueFullError
from ..model.gpt2 import GPT2
from .request import Request
from .runner import GRAPH_BUCKETS, StepPlan, TokenReader, graph_bucket, rounded_len, runner_for

# Copies in flight at once: a step's admission and decode reads, and the previous step's.
READ_DEPTH = 4


def check_context(prompt_len: int, max_new_tokens: int, n_positions: int, limit: str = "the model's context") -> None:
    """Raise ContextLengthError unless the prompt and the new tokens fit in ``n_positions``.

    The last new token is sampled, never fed back, so it needs no position: as in HF, a prompt of
    ``n_positions`` tokens may still get one new token.
    """
    if prompt_len + max_new_tokens - 1 > n_positions:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens plus {max_new_tokens} new tokens needs {prompt_len + max_new_tokens - 1} "
            f"positions (the last new token needs none), more than {limit} of {n_positions}")


@dataclass
class _Read:
    """Tokens (and log-probabilities) of one step on their way to the host, and whose they are."""
    owners: dict[int, Request]  # slot -> the request it held when the step ran
    slots: list[int]            # the rows copied, in order
    tokens: tuple[TokenReader, object]  # the reader and its ticket (a regrown cache has other readers)
    logprobs: tuple[TokenReader, object] | None


class Scheduler:
    """Runs up to ``max_batch`` requests at once over one model; up to ``max_waiting`` more wait.

    A model has one scheduler and one runner (one KV cache): making a scheduler closes the model's
    previous one (ending its requests, "cancelled") and ``scheduler_for(model)`` returns the latest.
    With ``allocate`` (the server's case) the cache is sized now for ``max_batch`` slots of
    ``max_context`` positions (default: the model's), and with ``cuda_graph`` every batch
    bucket's decode step is captured now, before any request runs. Otherwise (``scheduler_for``'s)
    the cache is sized whenever requests enter an empty batch, for those waiting then (a request
    longer than the cache waits for the batch to empty), and the batch grows to the requests
    waiting (``size_for`` does both ahead of a ``generate()`` call).

    ``on_step(requests)``, when set, receives each step's requests that got tokens or ended
    (called on the stepping thread; the server hands them to its event loop in one wake-up);
    without it the scheduler turns their tokens into text itself (``Request.drain``).
    """

    def __init__(self, model: GPT2, max_batch: int = 16, max_waiting: int = 256, cuda_graph: bool | None = None,
                 max_context: int | None = None, allocate: bool = True):
        self.max_batch = check_int("max_batch", max_batch, 1)
        self.max_waiting = check_int("max_waiting", max_waiting, 0)
        positions = model.config.n_positions
        self.max_context = positions if max_context is None else check_int("max_context", max_context, 1, positions)
        previous = getattr(model, "scheduler", None)
        if previous is not None:
            previous.close()
        self.model = model
        self.runner = runner_for(model)  # the model's one runner, shared with the retired scheduler
        self.cuda_graph = model.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.runner.check_device(self.cuda_graph)
        self.active: dict[int, Request] = {}  # slot -> request
        self.waiting: deque[Request] = deque()
        self.retired = False
        self.on_step: Callable[[list[Request]], None] | None = None
        self.capture_seconds = 0.0
        self.steps = 0
        self.wakeup = threading.Event()  # set by submit and cancel: work may be waiting
        self._queue_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._unread: list[_Read] = []
        self._produced: dict[int, int] = {}  # slot -> tokens its request has had sampled (read or not)
        self._readers: dict[tuple[int, int, torch.dtype], TokenReader] = {}
        self.allocated = allocate
        if allocate:
            self._allocate(self.max_batch, self.max_context)
        model.scheduler = self

    # --- sizing --------------------------------------------------------------------------------------
    def _capacity(self, batch: int) -> int:
        """Slots a batch of ``batch`` rows needs: with graphs every step runs a bucket's rows (12 -> 16)."""
        return graph_bucket(batch) if self.cuda_graph else batch

    def _allocate(self, batch: int, max_len: int) -> None:
        """The server's sizing: ``batch`` slots of ``max_len`` positions and, with graphs, every
        bucket's step in every mode (with and without penalties and log-probabilities; and greedy,
        without penalties, where the model's lm_head picks greedy tokens)."""
        self.runner.reserve(self._capacity(batch), max_len)
        if self.cuda_graph:
            buckets = sorted({graph_bucket(b) for b in range(1, batch + 1)})
            modes = [(False, False), (True, False)] + ([(False, True)] if self.model.fuses_greedy else [])
            self.capture_seconds += self.runner.capture([StepPlan(b, penalized, logprobs, greedy) for b in buckets
                                                         for penalized, greedy in modes for logprobs in (False, True)])

    def size_for(self, requests: list[Request], cuda_graph: bool) -> float:
        """Before ``generate()`` submits ``requests``: while the scheduler is idle, grow the batch to
        hold them all at once, size the cache for them and capture the one graph their steps
        replay. Returns seconds spent capturing (0.0 when busy or nothing was missing: they then
        queue as any request does)."""
        with self._step_lock:
            if not self.idle:
                return 0.0
            self._read_all([])
            if cuda_graph != self.cuda_graph:
                self.runner.check_device(cuda_graph)
                self.cuda_graph = cuda_graph
            self.max_batch = max(self.max_batch, len(requests))
            before = self.capture_seconds
            self._fit(requests)
            return self.capture_seconds - before

    def _fit(self, requests: list[Request]) -> None:
        """With no request running: a cache that holds ``max_batch`` slots of the positions
        ``requests`` need (rounded up, so that similar calls reuse it) and the graph of their step."""
        needed = max(len(r.prompt) + r.max_new_tokens for r in requests)
        self.runner.reserve(self._capacity(self.max_batch), rounded_len(needed, self.model.config.n_positions))
        if self.cuda_graph:
            batch = min(len(requests), self.max_batch)
            self.capture_seconds += self.runner.capture([StepPlan.of(graph_bucket(batch), requests)])

    # --- requests in ---------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise ParameterError (prompt) or ContextLengthError if ``request`` cannot run here: its
        prompt and new tokens must fit the model's context, and a server's ``max_context``."""
        check_prompt_ids(request.prompt, self.model.config.vocab_size)
        if self.max_context < self.model.config.n_positions:
            check_context(len(request.prompt), request.max_new_tokens, self.max_context, "this server's --max-context")
        check_context(len(request.prompt), request.max_new_tokens, self.model.config.n_positions)

    def submit(self, requests: list[Request], queue_limit: bool = True) -> None:
        """Queue ``requests`` (all or none): ParameterError or ContextLengthError if one cannot run,
        QueueFullError if they do not all fit in the waiting queue (unless not ``queue_limit``).
        Thread-safe."""
        if self.retired:
            raise EngineError("this scheduler was replaced by a newer one for the same model (scheduler_for(model))")
        for r in requests:
            self.check(r)
        with self._queue_lock:
            if queue_limit and len(self.waiting) + len(requests) > self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); try again later")
            self.waiting.extend(requests)
        self.wakeup.set()

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting

    # --- the step ------------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """End the running requests that were cancelled (or whose text hit a stop string), prefill
        waiting ones into free slots, run one decode step for every running request, and hand each
        request its tokens (those of the step before, on CUDA). Returns the requests that got
        tokens or ended, also given to ``on_step`` (on CPU in two parts: the admitted requests'
        first tokens before the decode step, so that they do not wait for it, then the step's)."""
        with self._step_lock:
            updated: list[Request] = []
            for slot, r in list(self.active.items()):
                if r.cancelled or r.out_of_time():
                    r.end("cancelled" if r.cancelled else "time")
                    updated.append(r)
                    self._free(slot)
            self._admit(updated)
            lookahead = self.runner.device.type == "cuda"
            notified = 0
            if not lookahead:  # the first tokens are on the host already: out before the step, not after it
                self._read_all(updated)
                self._notify(updated)
                notified = len(updated)
            plan = self._plan()
            if plan is not None:
                self.runner.step(plan, self.cuda_graph)
                for slot in self.active:
                    self._produced[slot] += 1
                self._submit_read(list(range(plan.rows)), plan.logprobs, index=None)
                self.steps += 1
            if lookahead and plan is not None:  # read everything but this step's, which the device is running
                unread, self._unread = self._unread[:-1], self._unread[-1:]
                for read in unread:
                    self._hand_out(read, updated)
            else:
                self._read_all(updated)
            self._notify(updated[notified:])
            return updated

    def _plan(self) -> StepPlan | None:
        """The decode step the running requests need, or None when none needs another token (each
        has had ``max_new_tokens`` sampled, some still unread)."""
        needing = [s for s, r in self.active.items() if self._produced[s] < r.max_new_tokens]
        if not needing:
            return None
        rows = max(self.active) + 1
        plan = StepPlan.of(rows, self.active.values())
        if not self.cuda_graph:
            return plan
        # The smallest captured graph that covers the step (StepPlan.covers), doing the least beside it.
        covering = [p for p in self.runner.graphs if p.covers(plan)]
        if covering:
            return min(covering, key=lambda p: (p.rows, p.extra_work))
        return StepPlan(graph_bucket(rows), plan.penalized, plan.logprobs, plan.greedy)  # run op by op

    def _admit(self, updated: list[Request]) -> None:
        if not self.active and self.waiting:  # the one moment the cache may grow
            with self._queue_lock:
                waiting = list(self.waiting)
            if not self.allocated:  # sized by demand: as many slots as requests wait, up to a bucket's worth
                self.max_batch = max(self.max_batch, min(len(waiting), GRAPH_BUCKETS[-1]))
            self._fit(waiting)
        free = [s for s in range(self.max_batch) if s not in self.active]
        admitted: list[tuple[int, Request]] = []
        with self._queue_lock:
            expired = [r for r in self.waiting if r.cancelled or r.out_of_time()]
            for r in expired:  # a queued request past its deadline is not kept waiting for a slot
                self.waiting.remove(r)
                r.end("cancelled" if r.cancelled else "time")
                updated.append(r)
            while self.waiting and len(admitted) < len(free):
                if len(self.waiting[0].prompt) + self.waiting[0].max_new_tokens > self.runner.cache.max_len + 1:
                    break  # longer than the cache sized for the running requests: it waits for them to end
                admitted.append((free[len(admitted)], self.waiting.popleft()))
        if not admitted:
            return
        slots = [s for s, _ in admitted]
        self.runner.admit([r for _, r in admitted], slots)
        self.active.update(admitted)
        self._produced.update((s, 1) for s in slots)
        index = torch.tensor(slots, device=self.runner.device)
        self._submit_read(slots, StepPlan.of(len(slots), [r for _, r in admitted]).logprobs, index)

    def _reader(self, columns: int, dtype: torch.dtype) -> TokenReader:
        slots = self.runner.cache.slots
        key = (slots, columns, dtype)
        if key not in self._readers:
            self._readers[key] = TokenReader(slots, self.runner.device, columns, dtype, depth=READ_DEPTH)
        return self._readers[key]

    def _submit_read(self, slots: list[int], logprobs: bool, index: torch.Tensor | None) -> None:
        """Start copying the tokens (and log-probabilities) of ``slots`` (rows [0, n) when ``index``
        is None, else the slots ``index`` names) for the host; ``_hand_out`` reads them."""
        rows = slice(0, len(slots)) if index is None else index
        reader = self._reader(0, torch.int64)
        tokens = reader, reader.submit(self.runner.tokens[rows])
        lp = None
        if logprobs:
            out = self.runner.logprob_out
            lp_reader = self._reader(out.shape[1], torch.float32)
            lp = lp_reader, lp_reader.submit(out[rows])
        self._unread.append(_Read({s: self.active[s] for s in slots if s in self.active}, slots, tokens, lp))

    def _hand_out(self, read: _Read, updated: list[Request]) -> None:
        """Give each request of ``read`` its token (and its row of log-probabilities); free the
        slots of the requests that ended."""
        reader, ticket = read.tokens
        tokens = reader.read(ticket)
        logprobs = None
        if read.logprobs is not None:
            reader, ticket = read.logprobs
            logprobs = reader.read(ticket)
        for i, slot in enumerate(read.slots):
            r = read.owners.get(slot)
            if r is None or r.end_reason is not None:
                continue  # a free row, or the extra step of a request that had ended
            try:
                r.record(tokens[i], None if logprobs is None else logprobs[i])
            except NumericalError as e:  # NaN logits: this request fails, the others go on
                r.fail(str(e))
            updated.append(r)
            if r.end_reason is not None and self.active.get(slot) is r:
                self._free(slot)

    def _notify(self, updated: list[Request]) -> None:
        if not updated:
            return
        if self.on_step is not None:
            self.on_step(updated)
        else:
            for r in updated:
                r.drain()

    def _free(self, slot: int) -> None:
        del self.active[slot]
        self._produced.pop(slot, None)
        self.runner.release([slot])

    def _end_running(self, reason: str) -> list[Request]:
        """End every running request with ``reason``, free its slot and drop the unread steps; returns them."""
        running = list(self.active.values())
        for slot, r in list(self.active.items()):
            r.end(reason)
            self._free(slot)
        self._unread.clear()
        return running

    def fail_running(self) -> None:
        """End every running request with "error" and free its slot (after a failed step)."""
        with self._step_lock:
            self._notify(self._end_running("error"))

    def _read_all(self, updated: list[Request]) -> None:
        unread, self._unread = self._unread, []
        for read in unread:
            self._hand_out(read, updated)

    def run(self, requests: list[Request], cancel=None) -> None:
        """Step until every one of ``requests`` (submitted) has finished, its text included, and left
        its slot; their text is drained on this thread. ``cancel`` (anything with ``is_set()``)
        cancels them all once set. The scheduler may be a server's, stepped by its thread too:
        whoever steps serves every request."""
        def running(r):  # requests compare by identity
            return r in self.active.values() or r in self.waiting

        while True:
            if cancel is not None and cancel.is_set():
                for r in requests:
                    r.cancel()
            for r in requests:
                r.drain()
            if all(r.finished for r in requests) and not any(map(running, requests)):
                return
            self.step()

    def run_until_idle(self) -> None:
        """Step until no request is running or waiting and every token is read (for callers without a
        loop of their own)."""
        while not self.idle or self._unread:
            self.step()

    def close(self, reason: str = "cancelled") -> list[Request]:
        """Refuse new requests and end every running and waiting one with ``reason`` (a server's
        shutdown). Returns them; their text is drained as after any step."""
        with self._step_lock:
            self.retired = True
            with self._queue_lock:
                waiting, self.waiting = list(self.waiting), deque()
            for r in waiting:
                r.end(reason)
            ended = waiting + self._end_running(reason)
            self._notify(ended)
            return ended


def scheduler_for(model: GPT2) -> Scheduler:
    """The model's scheduler: the latest made for it (a server's), else one made now that sizes
    itself by demand: its batch grows to the requests waiting when it is idle (up to 64 at a
    time; to a whole ``generate()`` call's, ``Scheduler.size_for``), its cache to their lengths."""
    scheduler = getattr(model, "scheduler", None)
    if scheduler is None or scheduler.retired:
        scheduler = Scheduler(model, max_batch=1, allocate=False)
    return scheduler


__all__ = ["GRAPH_BUCKETS", "Scheduler", "check_context", "scheduler_for"]
