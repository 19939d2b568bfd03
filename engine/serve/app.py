"""The ASGI app (Starlette): /v1/completions (plain and streamed), /v1/models, /health."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import ContextLengthError, EngineError, QueueFullError
from ..scheduler import Scheduler
from .loop import EngineLoop, attach
from .protocol import APIError, Completion, choice_logprobs, finish_reason, parse_completion

DISCONNECT_POLL_SECONDS = 0.05  # a non-streamed request checks its client this often while it waits


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(scheduler: Scheduler, model_name: str, api_key: str | None = None) -> Starlette:
    """The server's app over ``scheduler``; its engine thread runs while the app is up (lifespan)."""
    engine_loop = EngineLoop(scheduler)
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
        return JSONResponse({"status": "ok", "running": len(scheduler.active), "waiting": len(scheduler.waiting)})

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
            job = parse_completion(body, model_name)
            events = attach(job.requests, asyncio.get_running_loop(), job.stream)
            try:
                scheduler.submit(job.requests)
            except QueueFullError as e:
                raise APIError(503, str(e), None, "queue_full", "server_busy") from None
            except ContextLengthError as e:
                raise APIError(400, str(e), "max_tokens", "context_length_exceeded") from None
            except EngineError as e:
                raise APIError(400, str(e), "prompt") from None
        except APIError as e:
            return _error(e)
        if job.stream:
            return StreamingResponse(_stream(job, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(job, events, request)

    async def _complete(job: Completion, events: asyncio.Queue, request: HTTPRequest) -> JSONResponse:
        left = len(job.requests)
        try:
            while left:
                try:
                    kind, _, _ = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it; the slots are freed below
                    continue
                left -= kind == "end"
        finally:
            _cancel(job)
        if any(r.finish_reason == "error" for r in job.requests):
            return _error(APIError(500, "the model produced NaN or infinite logits", None, "model_error",
                                   "server_error"))
        choices = [{"index": i, "text": _echo(job, i) + r.text, "finish_reason": finish_reason(r),
                    "logprobs": None if job.logprobs is None else choice_logprobs(r, 0, len(r.tokens))}
                   for i, r in enumerate(job.requests)]
        return JSONResponse(job.chunk(choices, job.usage()))

    async def _stream(job: Completion, events: asyncio.Queue):
        """Server-sent events: text chunks as they come, one with each choice's finish_reason,
        usage when asked for, then ``[DONE]``. A client that goes away cancels its requests."""
        def sse(payload) -> str:
            return f"data: {json.dumps(payload)}\n\n"

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

            while left:
                kind, i, item = await events.get()
                if kind == "text":
                    piece, tokens = item
                    yield sse(job.chunk([{"index": i, "text": piece, "logprobs": logprobs(i, tokens),
                                          "finish_reason": None}]))
                    continue
                left -= 1
                if item.finish_reason == "error":
                    yield sse(APIError(500, "the model produced NaN or infinite logits", None, "model_error",
                                       "server_error").body())
                    continue
                yield sse(job.chunk([{"index": i, "text": "", "logprobs": logprobs(i, len(item.tokens)),
                                      "finish_reason": finish_reason(item)}]))
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
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
