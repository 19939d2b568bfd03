"""The OpenAI completions protocol: a request body in, engine ``Request``s out; responses and errors
shaped as OpenAI's. No HTTP here, so it is testable on its own."""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, replace

from gpt2kernels import CONTROLS
from gpt2kernels.sampling import as_int64

from ..checks import has_type, is_int
from ..errors import ParameterError
from ..core.request import Request, check_max_time, check_seed, sampling_params, stop_strings
from ..tokenizer import EOT_ID, VOCAB_SIZE, decode, encode

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 128
MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions

class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """A checked /v1/completions request: ``n`` choices for each prompt."""
    id: str
    created: int
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    max_tokens: int
    requests: list[Request]  # prompt-major: choice i is prompt i // n
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None = None  # alternatives a token, as asked; None: no logprobs in the answer

    @property
    def scores_prompt(self) -> bool:
        """The answer carries the prompt's log-probabilities (``echo`` with ``logprobs``)."""
        return self.echo and self.logprobs is not None

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(r.tokens) for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out


def _logprobs_object(tokens: list[int], token_logprobs: list, top: list, offset: int) -> dict:
    """OpenAI's completions ``logprobs`` object: each token's text, its log-probability, the top
    alternatives ({text: log p}, or None where ``top`` holds None) and its offset in the choice's
    text (counted from ``offset``)."""
    texts = [decode([t]) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": token_logprobs,
            "top_logprobs": [None if row is None else {decode([i]): lp for i, lp in row} for row in top],
            "text_offset": offsets}


def choice_logprobs(request: Request, start: int, end: int, offset: int = 0) -> dict:
    """The ``logprobs`` object of tokens [start, end) of ``request`` (``offset``: the length of the
    choice's text before token ``start``)."""
    return _logprobs_object(request.tokens[start:end], request.token_logprobs[start:end],
                            request.top_logprobs[start:end], offset)


def finish_reason(request: Request) -> str:
    """OpenAI's two reasons, "stop" (EOS or a stop string) and "length" (max_tokens, max_time or
    the server's request timeout), and vLLM's "abort" (cut by the server's shutdown)."""
    return request.finish_reason if request.finish_reason in ("stop", "abort") else "length"


def prompt_logprobs(tokens: list[int], token_logprobs: list[float], top: list[list[tuple[int, float]]] | None,
                    ) -> dict:
    """OpenAI's legacy ``echo`` + ``logprobs`` object for a prompt: every token's text, its
    log-probability given the ones before (None for the first: nothing predicts it), the top
    alternatives ({text: log p}, None first; empty dicts when ``top`` is None) and its offset."""
    top = [[] for _ in tokens[1:]] if top is None else top
    return _logprobs_object(tokens, [None, *token_logprobs], [None, *top], 0)


def join_logprobs(first: dict, second: dict) -> dict:
    """Two ``logprobs`` objects of consecutive text, as one (``second``'s offsets already continue)."""
    return {key: first[key] + second[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def _typed(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name, default)
    if value is None:
        return default
    if not has_type(value, kinds):
        raise APIError(400, f"'{name}' must be {what}, got {value!r}", name)
    return value


def _prompts(prompt) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt: a string, a list of strings, a list of ids or a list of lists of ids."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", "prompt")
    ids, texts = [], []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            # <|endoftext|> in a prompt is the special token, as OpenAI's and HF's tokenizers read it.
            ids.append(encode(p, allow_special=True) or [EOT_ID])
            texts.append(p)
        elif isinstance(p, list) and p and all(map(is_int, p)):
            ids.append(list(p))
            texts.append(decode(p) if all(0 <= t < VOCAB_SIZE for t in p) else "")
        else:
            raise APIError(400, f"prompt {i} must be a string or a non-empty list of token ids", "prompt")
    return ids, texts


def parse_completion(body, served_model: str) -> Completion:
    """Check a /v1/completions body and build its engine requests (callbacks left for the caller).
    Whether they fit the model (vocabulary, context) is the scheduler's check, at submission.

    Raises APIError: 400 naming the parameter, 404 for another model's name.
    """
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{served_model}'", "model",
                       "model_not_found")
    for name in ("suffix", "logit_bias"):
        if body.get(name):  # None, "" and {} are their defaults
            raise APIError(400, f"'{name}' is not supported by this server", name)
    prompts, texts = _prompts(body.get("prompt"))
    echo = _typed(body, "echo", (bool,), False, "a boolean")
    max_tokens = _typed(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS, "an integer >= 1 (>= 0 with echo)")
    if max_tokens < (0 if echo else 1):
        raise APIError(400, f"'max_tokens' must be an integer >= {0 if echo else 1}"
                            f"{'' if echo else ' (0 only with echo: scoring the prompt)'}, got {max_tokens}",
                       "max_tokens")
    n = _typed(body, "n", (int,), 1, f"an integer in [1, {MAX_N}]")
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"'n' must be an integer in [1, {MAX_N}], got {n}", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise APIError(400, "'best_of' is not supported (other than equal to n)", "best_of")
    controls = {}
    for c in CONTROLS:  # each one by its own name, as vLLM accepts them
        integer = not c.dtype.is_floating_point
        controls[c.name] = _typed(body, c.name, (int,) if integer else (int, float), c.off,
                                  f"{'an integer' if integer else 'a number'} in {c.interval}")
    if controls["top_k"] == -1:
        controls["top_k"] = 0  # vLLM's spelling of "off"
    try:
        sampling = sampling_params(**controls)
        stop = stop_strings(body.get("stop"))
        max_time = body.get("max_time")
        check_max_time(max_time)
        seed = _typed(body, "seed", (int,), None, "an integer")
        if seed is not None:
            check_seed(seed)
    except ParameterError as e:
        raise APIError(400, str(e), e.param) from None
    stream = _typed(body, "stream", (bool,), False, "a boolean")
    options = _typed(body, "stream_options", (dict,), {}, "an object")
    ignore_eos = _typed(body, "ignore_eos", (bool,), False, "a boolean")  # vLLM's extension, for benchmarks
    logprobs = _typed(body, "logprobs", (int,), None, f"an integer in [0, {MAX_LOGPROBS}]")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    if logprobs is not None and echo and stream:
        raise APIError(400, "the prompt's log-probabilities ('echo' with 'logprobs') are not streamed: set "
                            "'stream' to false", "stream")
    if max_tokens == 0 and stream:
        raise APIError(400, "'max_tokens': 0 (scoring the prompt) is not streamed: set 'stream' to false", "stream")
    first = secrets.randbits(63) if seed is None else seed
    requests = [Request(p, max_tokens, replace(sampling, seed=as_int64(first + k)), stop_at_eos=not ignore_eos,
                        stop=stop, max_time=max_time, logprobs=logprobs)
                for k, p in enumerate(p for p in prompts for _ in range(n))] if max_tokens else []
    return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=served_model, prompts=prompts,
                      prompt_texts=texts, n=n, max_tokens=max_tokens, requests=requests, stream=stream,
                      include_usage=bool(options.get("include_usage")) and stream, echo=echo, logprobs=logprobs)
