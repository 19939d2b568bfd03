"""Log-likelihood of given text: ``score`` (per text, per token) and ``perplexity`` (over one long text).

Texts longer than the model's window are scored by the sliding-window method of HF's perplexity
guide: windows of ``window`` tokens starting every ``stride`` tokens; each window scores only the
tokens after the previous window's end, with the tokens before them as context. So every token is
scored once, with up to ``window - 1`` tokens of context, and the first token of the text is not
scored (nothing predicts it). With ``stride == window`` the windows do not overlap and, as in HF's
guide, the first token of each window is not scored either.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .checks import check_int, check_prompt_ids, is_int
from .errors import EngineError, ParameterError
from .model.gpt2 import GPT2
from .tokenizer import encode

IGNORE = -100  # a target that is not scored (kernels' and torch's ignore_index)


@dataclass(frozen=True)
class Window:
    begin: int   # the window is tokens [begin, end) of the text
    end: int
    first: int   # it scores tokens [first, end), each predicted from the tokens before it in the window


def windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The sliding windows over a text of ``n_tokens`` tokens (module docstring)."""
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append(Window(begin, end, first))
        if end >= n_tokens:
            return out
        prev_end, begin = end, begin + stride


def check_window(model: GPT2, window: int | None, stride: int | None) -> tuple[int, int]:
    """(window, stride) with defaults filled in (the model's positions; half of it, as HF's guide's
    512 at GPT-2's 1024); raises ParameterError naming a bad one."""
    positions = model.config.n_positions
    window = positions if window is None else window
    check_int("window", window, 2, positions, f"an integer in [2, {positions}] (the model's positions)")
    stride = max(1, window // 2) if stride is None else stride
    check_int("stride", stride, 1, window, f"an integer in [1, window = {window}]")
    return window, stride


def _check_batch_size(batch_size: int) -> None:
    check_int("batch_size", batch_size, 1)


def _window_logprobs(model: GPT2, spans: list[tuple[Sequence[int], Window]], batch_size: int
                     ) -> Iterator[torch.Tensor]:
    """For each (text's ids, window), log p(token | the window's tokens before it) of the window's
    scored tokens, fp32 on the host, in order; ``batch_size`` windows a forward, shorter ones
    right-padded (padding is never attended by the positions before it, and is not scored)."""
    for i in range(0, len(spans), batch_size):
        batch = spans[i:i + batch_size]
        length = max(w.end - w.begin for _, w in batch)
        inputs = torch.zeros(len(batch), length, dtype=torch.int64)
        targets = torch.full((len(batch), length), IGNORE, dtype=torch.int64)
        for row, (ids, w) in enumerate(batch):
            inputs[row, :w.end - w.begin] = torch.tensor(ids[w.begin:w.end])
            # token p of the text is predicted at position p - 1 of the window
            targets[row, w.first - 1 - w.begin:w.end - 1 - w.begin] = torch.tensor(ids[w.first:w.end])
        logprobs = model.target_logprobs(inputs.to(model.device), targets.to(model.device)).cpu()
        for row, (_, w) in enumerate(batch):
            yield logprobs[row, w.first - 1 - w.begin:w.end - 1 - w.begin]


def _token_ids(model: GPT2, text: str | Sequence[int], what: str) -> list[int]:
    if isinstance(text, str):
        ids = encode(text)
    elif isinstance(text, (list, tuple)) and all(map(is_int, text)):
        ids = [int(t) for t in text]
    else:
        raise ParameterError("texts", f"{what} must be a string or a list of token ids, got {type(text).__name__}")
    check_prompt_ids(ids, model.config.vocab_size, what, "texts", allow_empty=True)
    return ids


@dataclass
class Score:
    tokens: list[int]
    token_logprobs: list[float]  # log p(tokens[i] | tokens[:i]) for i = 1 .. T - 1 (T - 1 values)
    total_logprob: float         # their sum: what HF's labels= loss counts, times -(T - 1)


def score(model: GPT2, texts: str | Sequence[int] | Sequence[str | Sequence[int]], window: int | None = None,
          stride: int | None = None, batch_size: int = 8) -> list[Score]:
    """Per text, the log-probability of each token given the ones before it, and their sum.

    texts: a string or a list of token ids (one text), or a list of those. Texts longer than
    ``window`` tokens (default: the model's positions) are scored with sliding windows of that
    size every ``stride`` tokens (default window // 2; it must be < window, so that every token
    after the first is scored). Windows of all texts run ``batch_size`` at a time.
    """
    if isinstance(texts, str) or (isinstance(texts, (list, tuple)) and texts and isinstance(texts[0], int)):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise ParameterError("texts", "texts must be a non-empty list of strings or of token-id lists")
    window, stride = check_window(model, window, stride)
    if stride >= window:
        raise ParameterError("stride", f"stride must be < window ({window}) to score every token, got {stride}")
    _check_batch_size(batch_size)
    all_ids = [_token_ids(model, t, f"texts[{i}]") for i, t in enumerate(texts)]
    owned = [(i, (ids, w)) for i, ids in enumerate(all_ids) for w in windows(len(ids), window, stride)]
    parts: list[list[torch.Tensor]] = [[] for _ in texts]
    logprobs = _window_logprobs(model, [span for _, span in owned], batch_size)
    for (owner, _), lp in zip(owned, logprobs):
        parts[owner].append(lp)
    out = []
    for ids, mine in zip(all_ids, parts):
        lp = torch.cat(mine) if mine else torch.zeros(0)
        out.append(Score(tokens=ids, token_logprobs=lp.tolist(), total_logprob=float(lp.double().sum())))
    return out


@dataclass
class Perplexity:
    tokens: int          # tokens scored
    loss: float          # mean negative log-likelihood, nats per token
    perplexity: float    # exp(loss)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def perplexity(model: GPT2, text: str | Sequence[int], window: int | None = None, stride: int | None = None,
               batch_size: int = 1, progress: Callable[[int], None] | None = None) -> Perplexity:
    """Perplexity of one (long) text with sliding windows (module docstring): window defaults to
    the model's positions, stride to half of it. ``progress(n)`` is called as each batch of
    windows finishes, with the tokens it scored."""
    window, stride = check_window(model, window, stride)
    _check_batch_size(batch_size)
    ids = _token_ids(model, text, "text")
    if len(ids) < 2:
        raise EngineError(f"the text has {len(ids)} token(s): perplexity needs at least 2 (the first is not scored)")
    spans = [(ids, w) for w in windows(len(ids), window, stride)]
    start = time.perf_counter()
    total, count = 0.0, 0
    for lp in _window_logprobs(model, spans, batch_size):
        total -= float(lp.double().sum())
        count += len(lp)
        if progress is not None:
            progress(len(lp))
    loss = total / count
    return Perplexity(tokens=count, loss=loss, perplexity=math.exp(loss), seconds=time.perf_counter() - start)
