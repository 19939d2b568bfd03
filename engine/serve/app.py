"""The ASGI app (Starlette): /v1/completions (plain, streamed, and the prompt's log-probabilities),
/v1/models, /health, /metrics; /v1/chat/completions answers why it is not served."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import torch

from ..checks import check_prompt_ids
from ..errors import ContextLengthError, EngineError, ParameterError, QueueFullError
from ..core.scheduler import Scheduler
from .loop import EngineLoop
from .metrics import ServerMetrics
from .protocol import (APIError, Completion, choice_logprobs, finish_reason, join_logprobs, parse_completion,
                       prompt_logprobs)

DISCONNECT_POLL_SECONDS = 0.05  # a non-streamed request checks its client this often while it waits
CHAT_MESSAGE = ("GPT-2 is a base model without a chat format (no roles, no chat template, no instruction "
                "tuning), so this server has no /v1/chat/completions: send the text to continue to "
                "/v1/completions")


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class ServerState:
    """What the app shares with its command: ``draining`` (set at shutdown: new completions get 503)."""

    def __init__(self):
        self.draining = False


def create_app(scheduler: Scheduler, model_name: str, api_key: str | None = None,
               request_timeout: float | None = None, state: ServerState | None = None,
               text_on_loop: bool | None = None) -> Starlette:
    """The server's app over ``scheduler``; its engine thread runs while the app is up (lifespan).

    ``request_timeout``: seconds from a request's arrival after which it ends (queued or running;
    finish_reason "length", as max_tokens). ``state``: shared with the command, which drains the
    server on SIGTERM (``state.draining``). ``text_on_loop``: where tokens become text
    (``EngineLoop``; None: by device)."""
    engine_loop = EngineLoop(scheduler, text_on_loop)
    metrics = ServerMetrics(scheduler)
    state = state or ServerState()
    cfg = scheduler.model.config
    created = int(time.time())

    def check_key(request: HTTPRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", None,
                           "invalid_api_key")

    async def health(request: HTTPRequest) -> JSONResponse:
        status = "draining" if state.draining else "ok"
        return JSONResponse({"status": status, "running": len(scheduler.active), "waiting": len(scheduler.waiting)},
                            status_code=503 if state.draining else 200)

    async def metrics_page(request: HTTPRequest) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def chat(request: HTTPRequest) -> JSONResponse:
        return _error(APIError(404, CHAT_MESSAGE, None, "not_found"))

    async def models(request: HTTPRequest) -> JSONResponse:
        try:
            check_key(request)
        except APIError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "gpt2engine",
             "max_model_len": cfg.n_positions}]})

    async def completions(request: HTTPRequest):
        try:
            check_key(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise APIError(400, "the request body is not valid JSON") from None
            if state.draining:
                raise APIError(503, "the server is shutting down", None, "shutting_down", "server_busy")
            job = parse_completion(body, model_name)
            if request_timeout is not None:
                for r in job.requests:
                    r.deadline = r.arrived + request_timeout
            scored = await _score_prompts(job) if job.scores_prompt else None
            if not job.requests:  # max_tokens 0: the prompt's log-probabilities only
                return JSONResponse(job.chunk(_choices(job, scored), job.usage()))
            events = engine_loop.attach(job.requests, job.stream)
            try:
                scheduler.submit(job.requests)
            except QueueFullError as e:
                raise APIError(503, str(e), None, "queue_full", "server_busy") from None
            except ContextLengthError as e:
                raise APIError(400, str(e), "max_tokens", "context_length_exceeded") from None
            except ParameterError as e:
                raise APIError(400, str(e), e.param) from None
            except EngineError as e:  # a retired scheduler: the server is shutting down
                raise APIError(503, str(e), None, "shutting_down", "server_busy") from None
        except APIError as e:
            return _error(e)
        if job.stream:
            return StreamingResponse(_stream(job, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(job, events, request, scored)

    async def _score_prompts(job: Completion) -> list[dict]:
        """Each prompt's ``logprobs`` object (``echo`` with ``logprobs``), computed on the engine thread."""
        for i, ids in enumerate(job.prompts):
            try:
                check_prompt_ids(ids, cfg.vocab_size, f"prompt {i}")
            except ParameterError as e:
                raise APIError(400, str(e), e.param) from None
            if len(ids) > cfg.n_positions:
                raise APIError(400, f"a prompt of {len(ids)} tokens is longer than the model's context of "
                                    f"{cfg.n_positions}", "prompt", "context_length_exceeded")
        model = scheduler.model

        def score() -> list[dict]:
            out = []
            for ids in job.prompts:
                lp, top_lp, top_ids = model.prompt_logprobs(torch.tensor(ids, device=model.device), job.logprobs)
                top = [list(zip(i.tolist(), v.tolist())) for i, v in zip(top_ids, top_lp)] if job.logprobs else None
                out.append(prompt_logprobs(ids, lp.tolist(), top))
            return out

        return await engine_loop.call(score)

    def _choices(job: Completion, scored: list[dict] | None) -> list[dict]:
        """The choices of a finished job (or of a ``max_tokens`` 0 one, which has no requests)."""
        count = len(job.prompts) * job.n
        choices = []
        for i in range(count):
            r = job.requests[i] if job.requests else None
            text = _echo(job, i) + (r.text if r else "")
            logprobs = None
            if job.logprobs is not None:
                offset = len(_echo(job, i))
                generated = choice_logprobs(r, 0, len(r.tokens), offset) if r else None
                if scored is not None:
                    logprobs = scored[i // job.n] if generated is None else join_logprobs(scored[i // job.n], generated)
                else:
                    logprobs = generated
            choices.append({"index": i, "text": text, "finish_reason": finish_reason(r) if r else "length",
                            "logprobs": logprobs})
        return choices

    async def _complete(job: Completion, events: asyncio.Queue, request: HTTPRequest,
                        scored: list[dict] | None) -> JSONResponse:
        left = len(job.requests)
        try:
            while left:
                try:
                    kind, _, item = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it; the slots are freed below
                    continue
                if kind == "end":
                    left -= 1
                    metrics.ended(item)
        finally:
            _cancel(job)
        if any(r.finish_reason == "error" for r in job.requests):
            return _error(APIError(500, "the model produced NaN or infinite logits", None, "model_error",
                                   "server_error"))
        return JSONResponse(job.chunk(_choices(job, scored), job.usage()))

    async def _stream(job: Completion, events: asyncio.Queue):
        """Server-sent events: text chunks as they come, one with each choice's finish_reason,
        usage when asked for, then ``[DONE]``. The events a step queued go out in one write. A
        client that goes away cancels its requests."""
        def sse(payload) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        # A plain text chunk is this request's constant fields around the piece: one json.dumps of
        # the piece per token instead of the whole chunk's (the same bytes as sse(job.chunk(...))).
        head = sse(job.chunk([{"index": 0}])).split('{"index": 0}')[0]

        def text_chunk(i: int, piece: str) -> str:
            return f'{head}{{"index": {i}, "text": {json.dumps(piece)}, "logprobs": null, ' \
                   '"finish_reason": null}]}\n\n'

        try:
            if job.echo:
                yield sse(job.chunk([{"index": i, "text": _echo(job, i), "logprobs": None, "finish_reason": None}
                                     for i in range(len(job.requests))]))
            left = len(job.requests)
            sent = [0] * len(job.requests)  # tokens whose logprobs a chunk carried, per choice
            offset = [0] * len(job.requests)  # their text's length

            def logprobs(i: int, end: int):
                if job.logprobs is None:
                    return None
                out = choice_logprobs(job.requests[i], sent[i], end, offset[i])
                sent[i], offset[i] = end, offset[i] + sum(len(t) for t in out["tokens"])
                return out

            def event_text(kind, i, item) -> str:
                nonlocal left
                if kind == "text":
                    piece, tokens = item
                    if job.logprobs is None:
                        return text_chunk(i, piece)
                    return sse(job.chunk([{"index": i, "text": piece, "logprobs": logprobs(i, tokens),
                                           "finish_reason": None}]))
                left -= 1
                metrics.ended(item)
                if item.finish_reason == "error":
                    return sse(APIError(500, "the model produced NaN or infinite logits", None, "model_error",
                                        "server_error").body())
                return sse(job.chunk([{"index": i, "text": "", "logprobs": logprobs(i, len(item.tokens)),
                                       "finish_reason": finish_reason(item)}]))

            while left:
                out = [event_text(*await events.get())]
                while not events.empty():
                    out.append(event_text(*events.get_nowait()))
                yield "".join(out)
            if job.include_usage:
                yield sse(job.chunk([], job.usage()))
            yield "data: [DONE]\n\n"
        finally:  # also on cancellation, when the client disconnects
            _cancel(job)

    def _echo(job: Completion, i: int) -> str:
        return job.prompt_texts[i // job.n] if job.echo else ""

    def _cancel(job: Completion) -> None:
        for r in job.requests:
            if not r.finished:
                r.cancel()
        scheduler.wakeup.set()

    async def not_found(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code))

    @asynccontextmanager
    async def lifespan(app):
        engine_loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            engine_loop.stop()

    routes = [Route("/health", health), Route("/metrics", metrics_page), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST", "GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
