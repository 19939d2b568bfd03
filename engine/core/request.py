"""One request: its prompt, its sampling, and what it has produced so far (tokens, text, why it ended)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

from gpt2kernels import check_penalties, check_sampling_params

from ..checks import check_int, is_int, is_number
from ..errors import NumericalError, ParameterError
from ..tokenizer import EOT_ID, StreamDecoder


SEED_LIMIT = 2**64  # a seed is the 64 bits of a Philox key


def check_seed(seed) -> int:
    """``seed`` when it is an integer in [0, 2^64); ParameterError naming it otherwise. The one rule
    for ``generate``'s seeds, the CLI's ``--seed`` and the server's ``"seed"``."""
    return check_int("seed", seed, 0, SEED_LIMIT - 1, "an integer in [0, 2^64)")


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling (semantics: ``gpt2kernels.sampling``): temperature 0 is greedy; top_k 0,
    top_p 1 and min_p 0 disable those filters; repetition_penalty 1 and presence/frequency 0 disable
    the penalties. ``seed`` keys the request's own random stream (its n-th token draws at offset n)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        """ParameterError naming the first parameter out of its range (also when built directly,
        e.g. for a ``Request`` given to the scheduler); then each value as a plain float or int."""
        for f in fields(self):
            if f.name == "seed":
                continue
            value = getattr(self, f.name)
            try:
                if f.name.endswith("penalty"):
                    check_penalties(**{f.name: value})
                else:
                    check_sampling_params(**{f.name: value})
            except ValueError as e:
                raise ParameterError(f.name, str(e)) from None
            object.__setattr__(self, f.name, int(value) if f.name == "top_k" else float(value))
        if not is_int(self.seed):
            raise ParameterError("seed", f"seed must be an int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Every token is the argmax (temperature 0 or top_k 1): no draw, so the seed never matters."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def sampling_params(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                    repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    seed: int = 0) -> SamplingParams:
    """Checked ``SamplingParams`` of plain floats and ints (what the dataclass itself does, by the
    parameters' names in ``generate``'s order): ParameterError naming the first one out of its range."""
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, min_p=min_p,
                          repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                          frequency_penalty=frequency_penalty)


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (None: none); ParameterError otherwise."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ParameterError("stop", f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(stops)


def check_logprobs(logprobs: bool, top_logprobs: int) -> int | None:
    """A ``Request.logprobs`` value (None: off) from ``generate``'s two options; ParameterError unless
    ``top_logprobs`` is an integer in [0, 20] and, when > 0, ``logprobs`` is on (as OpenAI's API)."""
    check_int("top_logprobs", top_logprobs, 0, 20)
    if top_logprobs and not logprobs:
        raise ParameterError("top_logprobs", "top_logprobs needs logprobs=True")
    return top_logprobs if logprobs else None


def check_max_time(max_time: float | None) -> None:
    """ParameterError unless ``max_time`` is None or a finite number of seconds > 0."""
    if max_time is None:
        return
    if not is_number(max_time) or not (math.isfinite(max_time) and max_time > 0):
        raise ParameterError("max_time", f"max_time must be a number of seconds > 0, got {max_time!r}")


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that a stop string starts with (text that must be
    held back: the next tokens may complete the stop string)."""
    for k in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


@dataclass(eq=False)  # a request is itself: compared and hashed by identity
class Request:
    """A prompt to continue, and the state of its continuation.

    Two sides, which may run on two threads. The engine side (the scheduler's thread) ``record``s
    each sampled token and ends the request at EOS ("stop"), after ``max_new_tokens`` ("length"),
    once ``max_time`` seconds have passed since admission or at ``deadline`` ("time"), when ``cancel`` was called
    ("cancelled"), or when the model failed it ("error", e.g. NaN logits, while the others go on):
    ``end_reason``. The text side (one consumer: the caller of ``generate``, or the server's event
    loop) ``drain``s the recorded tokens into ``text``, matches stop strings and streams pieces to
    ``on_text``; it sets ``finished`` and ``finish_reason`` ("stop" too where a stop string ended
    the text, which also cancels the engine side) and calls ``on_finish`` once. ``accept`` does both.

    ``text`` is the output so far, without the EOS and without a stop string and what followed it;
    text that might be the start of a stop string is held back until it cannot be.

    With ``logprobs`` (None: off; n in [0, 20]: the chosen token's and the n likeliest tokens'),
    ``token_logprobs`` holds each output token's log-probability and ``top_logprobs`` the n
    (token, log-probability) pairs, likeliest first, of each step (see ``Runner._logprobs``).
    ``arrived``, ``first_token_at`` and ``ended_at`` are ``time.monotonic()`` stamps (the server's
    TTFT and inter-token metrics).
    """
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_at_eos: bool = True
    on_text: Callable[[str], None] | None = None
    on_finish: Callable[["Request"], None] | None = None  # called once, when the request ends
    stop: tuple[str, ...] = ()
    max_time: float | None = None
    deadline: float | None = None  # a ``time.monotonic()`` past which the request ends ("time"), queued or not
    keep_text: bool = True  # False: tokens only (ids a tokenizer may not know are never decoded)
    logprobs: int | None = None
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    end_reason: str | None = None  # the engine side's: set once, after the last token is recorded
    error: str | None = None  # why the model failed it (end_reason "error")
    cancelled: bool = False  # set from any thread; the owner of the runner ends the request
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token_at: float | None = None
    ended_at: float | None = None
    _drained: int = 0
    _decoder: StreamDecoder | None = None
    _held: str = ""

    def begin(self) -> None:
        """Mark the request admitted: ``max_time`` counts from here."""
        self.started = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True

    # --- the engine side ----------------------------------------------------------------------------
    def record(self, token: int, logprobs: Sequence[float] | None = None) -> None:
        """Take the next sampled token (and its row of ``Runner.logprob_out`` when the request asked
        for ``logprobs``); end the request when a limit is reached. A request that has ended
        ignores it (the token of the step that ran while its end was being read)."""
        if self.end_reason is not None:
            return
        if token < 0:
            raise NumericalError("the model produced NaN or all -inf logits: its activations overflow in this "
                                 "dtype (try float32) or the weights are broken")
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.logprobs is not None and logprobs is not None:
            k = (len(logprobs) - 1) // 2  # [log p(token), k top log p, their k ids]
            self.token_logprobs.append(logprobs[0])
            self.top_logprobs.append([(int(i), lp) for lp, i in zip(logprobs[1:1 + self.logprobs],
                                                                      logprobs[1 + k:1 + k + self.logprobs])])
        self.tokens.append(token)
        if self.stop_at_eos and token == EOT_ID:
            self.end("stop")
        elif len(self.tokens) >= self.max_new_tokens:
            self.end("length")
        elif self.out_of_time():
            self.end("time")

    def out_of_time(self) -> bool:
        """Past ``max_time`` since admission, or past ``deadline``."""
        now = time.monotonic()
        return (self.max_time is not None and self.started is not None and now - self.started >= self.max_time) or \
            (self.deadline is not None and now >= self.deadline)

    def end(self, reason: str) -> None:
        """End the engine side (the first reason stays)."""
        if self.end_reason is None:
            self.ended_at = time.monotonic()
            self.end_reason = reason

    def fail(self, message: str) -> None:
        """End the engine side with "error", keeping why."""
        if self.end_reason is None:
            self.error = message
            self.end("error")

    # --- the text side ------------------------------------------------------------------------------
    def drain(self) -> None:
        """Turn the tokens recorded since the last call into text (streamed to ``on_text``) and,
        once the engine side has ended and every token is drained, finish. One thread at a time."""
        if self.finished:
            return
        reason = self.end_reason  # read before the tokens: every token recorded before the end is there
        tokens = self.tokens[self._drained:]
        self._drained += len(tokens)
        if self.keep_text or self.on_text is not None or self.stop:
            for token in tokens:
                if self.stop_at_eos and token == EOT_ID:
                    break  # the last token: its text is not part of the output
                self._decoder = self._decoder or StreamDecoder()
                self._push(self._decoder.push(token))
                if self.finished:  # a stop string: the engine side stops at its next step
                    self.cancelled = True
                    return
        if reason is not None:
            self.finish(reason)

    def accept(self, token: int, logprobs: Sequence[float] | None = None) -> None:
        """``record`` then ``drain``: both sides on one thread."""
        self.record(token, logprobs)
        self.drain()

    def finish(self, reason: str) -> None:
        """End the text, releasing held-back text (unless a stop string ended it)."""
        if self.finished:
            return
        self.end(reason)
        if self._decoder is not None:
            self._push(self._decoder.flush())
            if self.finished:  # the decoder's tail completed a stop string
                return
            self._emit(self._held)
            self._held = ""
        self._end(reason)

    def _end(self, reason: str) -> None:
        self.finished, self.finish_reason = True, reason
        if self.on_finish is not None:
            self.on_finish(self)

    def _push(self, piece: str) -> None:
        if not self.stop:
            self._emit(piece)
            return
        self._held += piece
        cut = _first_stop(self._held, self.stop)
        if cut is not None:
            self._emit(self._held[:cut])
            self._held = ""
            self._end("stop")
            return
        keep = _partial_stop(self._held, self.stop)
        self._emit(self._held[:len(self._held) - keep])
        self._held = self._held[len(self._held) - keep:]

    def _emit(self, text: str) -> None:
        if text:
            self.text += text
            if self.on_text is not None:
                self.on_text(text)
