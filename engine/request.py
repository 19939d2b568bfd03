"""One request: its prompt, its sampling, and what it has produced so far (tokens, text, why it ended)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from numbers import Number
from typing import Callable, Sequence

from gpt2kernels import check_penalties, check_sampling_params

from .errors import NumericalError, ParameterError
from .tokenizer import EOT_ID, StreamDecoder


SEED_LIMIT = 2**64  # a seed is the 64 bits of a Philox key


def check_seed(seed) -> int:
    """``seed`` when it is an integer in [0, 2^64); ParameterError naming it otherwise. The one rule
    for ``generate``'s seeds, the CLI's ``--seed`` and the server's ``"seed"``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ParameterError("seed", f"seed must be an integer in [0, 2^64), got {seed!r}")
    return seed


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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ParameterError("seed", f"seed must be an int, got {self.seed!r}")

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
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
        raise ParameterError("top_logprobs", f"top_logprobs must be an integer in [0, 20], got {top_logprobs!r}")
    if top_logprobs and not logprobs:
        raise ParameterError("top_logprobs", "top_logprobs needs logprobs=True")
    return top_logprobs if logprobs else None


def check_max_time(max_time: float | None) -> None:
    """ParameterError unless ``max_time`` is None or a finite number of seconds > 0."""
    if max_time is None:
        return
    if isinstance(max_time, bool) or not isinstance(max_time, Number) or not (math.isfinite(max_time) and max_time > 0):
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


@dataclass
class Request:
    """A prompt to continue, and the state of its continuation.

    ``accept`` takes each sampled token. The request finishes (``finish_reason``) at EOS or a stop
    string ("stop"), after ``max_new_tokens`` ("length"), once ``max_time`` seconds have passed
    since it was admitted ("time"), when ``cancel`` was called ("cancelled"), or when the model
    failed it ("error", e.g. NaN logits in a scheduler, which keeps serving the others). ``text`` is the
    output so far as text, without the EOS and without a stop string and what followed it; text
    that might be the start of a stop string is held back until it cannot be. ``on_text`` receives
    each new piece of ``text``.

    With ``logprobs`` (None: off; n in [0, 20]: the chosen token's and the n likeliest tokens'),
    ``token_logprobs`` holds each output token's log-probability and ``top_logprobs`` the n
    (token, log-probability) pairs, likeliest first, of each step (see ``Runner._logprobs``).
    """
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_at_eos: bool = True
    on_text: Callable[[str], None] | None = None
    on_finish: Callable[["Request"], None] | None = None  # called once, when the request ends
    stop: tuple[str, ...] = ()
    max_time: float | None = None
    keep_text: bool = True  # False: tokens only (ids a tokenizer may not know are never decoded)
    logprobs: int | None = None
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    cancelled: bool = False  # set from any thread; the owner of the runner finishes the request
    started: float | None = None
    _decoder: StreamDecoder | None = None
    _held: str = ""

    def begin(self) -> None:
        """Mark the request admitted: ``max_time`` counts from here."""
        self.started = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True

    def accept(self, token: int, logprobs: Sequence[float] | None = None) -> None:
        """Take the next sampled token (and its row of ``Runner.logprob_out`` when the request
        asked for ``logprobs``); stream its text; finish when a limit is reached."""
        if self.finished:
            return
        if token < 0:
            raise NumericalError("the model produced NaN or all -inf logits: its activations overflow in this "
                                 "dtype (try float32) or the weights are broken")
        self.tokens.append(token)
        if self.logprobs is not None and logprobs is not None:
            k = (len(logprobs) - 1) // 2  # [log p(token), k top log p, their k ids]
            self.token_logprobs.append(logprobs[0])
            self.top_logprobs.append([(int(i), lp) for lp, i in zip(logprobs[1:1 + self.logprobs],
                                                                      logprobs[1 + k:1 + k + self.logprobs])])
        if self.stop_at_eos and token == EOT_ID:
            self.finish("stop")
            return
        if self.keep_text or self.on_text is not None or self.stop:
            self._decoder = self._decoder or StreamDecoder()
            self._push(self._decoder.push(token))
            if self.finished:
                return
        if len(self.tokens) >= self.max_new_tokens:
            self.finish("length")
        elif self.max_time is not None and time.monotonic() - (self.started or 0.0) >= self.max_time:
            self.finish("time")

    def finish(self, reason: str) -> None:
        """End the request, releasing held-back text (unless a stop string ended it)."""
        if self.finished:
            return
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
