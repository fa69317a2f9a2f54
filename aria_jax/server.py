"""`aria-jax serve`: an OpenAI-compatible HTTP server in front of an `Engine`.

Endpoints: `POST /v1/chat/completions` (messages with text and `image_url` parts), `POST
/v1/completions` (a plain prompt), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus).
Answers stream as server-sent events ending `data: [DONE]` when asked. Errors have OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request, 404 for an
unknown model, 429 when the engine's queue is full, 503 once it has stopped. A client that
disconnects mid-stream cancels its request, which frees its slot.

Needs the `serve` extra (FastAPI, uvicorn, sse-starlette, prometheus-client).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from aria_jax.buckets import prompt_bucket
from aria_jax.engine import Completion, Engine, EngineStopped, QueueFull, RoundFailed
from aria_jax.host_loop import RequestError
from aria_jax.image_processing import ImageError
from aria_jax.openai_schema import ChatCompletionRequest, CompletionRequest, InvalidRequest, aria_messages
from aria_jax.processing import ProcessorError
from aria_jax.tokenizer import TokenizerError

# seconds: from a millisecond (a tiny model's step) to a minute (a long prompt behind a queue)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, str(self), self.kind, self.param, self.code)


def error_response(status: int, message: str, kind: str, param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class Metrics:
    """The engine's latencies and outcomes as Prometheus metrics, and its queue and slots read
    at each scrape."""

    def __init__(self, engine: Engine):
        disable_created_metrics()  # a `_created` timestamp beside every series is noise here
        self.registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "aria_jax_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "aria_jax_inter_token_latency_seconds",
            "Between a request's consecutive tokens",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "aria_jax_requests", "Requests finished, by outcome", ["outcome"], registry=self.registry
        )
        self.registry.register(_EngineCollector(engine))

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)


class _EngineCollector:
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        yield GaugeMetricFamily("aria_jax_queue_length", "Requests waiting for a slot", value=self.engine.queue_length)
        yield GaugeMetricFamily("aria_jax_busy_slots", "Decode slots holding a request", value=self.engine.busy_slots)
        yield GaugeMetricFamily("aria_jax_slots", "Decode slots", value=self.engine.max_batch)
        yield CounterMetricFamily("aria_jax_generated_tokens", "Tokens generated", value=self.engine.tokens_generated)


def create_app(engine: Engine, processor, model_name: str, *, allowed_media_dir: str | None = None) -> FastAPI:
    """The server's routes over a started `engine`, for a model loaded with `processor`."""
    app = FastAPI(title="aria-jax", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    engine.metrics = metrics
    multimodal = hasattr(getattr(engine.model, "config", None), "vision_config")  # Aria's or Qwen2-VL's

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        first = error.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or None
        return error_response(
            400, f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}", "invalid_request_error", param
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), "invalid_request_error")

    @app.get("/health")
    async def health():
        if engine.stopped:
            raise APIError(503, "the engine has stopped", "service_unavailable")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "aria-jax"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{model_name}`",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def submit(inputs: dict, body, loop):
        """Runs on a worker thread: image decoding and tokenizing must not hold the event loop."""
        settings = body.settings(engine.max_length - prompt_bucket(inputs["input_ids"].shape[1]))
        media = media_inputs(engine.model, inputs)
        return engine.submit(inputs["input_ids"], inputs.get("attention_mask"), **media, **settings, loop=loop)

    async def submitted(make_inputs, body):
        loop = asyncio.get_running_loop()
        try:
            return await run_in_threadpool(lambda: submit(make_inputs(), body, loop))
        except InvalidRequest as error:
            raise APIError(400, str(error), "invalid_request_error", error.param) from None
        except (RequestError, ProcessorError, ImageError, TokenizerError, ValueError) as error:
            raise APIError(400, " ".join(str(error).split()), "invalid_request_error") from None
        except QueueFull as error:
            raise APIError(429, f"the server is busy: {error}", "rate_limit_exceeded") from None
        except EngineStopped as error:
            raise APIError(503, str(error), "service_unavailable") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)

        def inputs():
            messages, images = aria_messages(body.messages, allowed_media_dir)
            if images and not multimodal:
                raise InvalidRequest("this model is text-only: it takes no images", "messages")
            return chat_inputs(processor, messages, images)

        handle = await submitted(inputs, body)
        return await answer(handle, body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        handle = await submitted(lambda: processor(text=body.text()), body)
        return await answer(handle, body, request, chat=False)

    async def answer(handle, body, request: Request, chat: bool):
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        shape = {"id": ident, "created": created, "model": model_name}
        if body.stream:
            return EventSourceResponse(stream(handle, body, shape, chat), ping=15)
        try:
            completion = await finished(handle, request)
        except EngineStopped as error:
            raise APIError(503, str(error), "service_unavailable") from None
        except RoundFailed as error:
            raise APIError(500, str(error), "server_error") from None
        if completion is None:  # the client went away
            return error_response(499, "the client closed the request", "invalid_request_error")
        metrics.requests.labels(completion.finish_reason).inc()
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": completion.text, "finish_reason": completion.finish_reason, "logprobs": None}
        return {
            **shape,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice],
            "usage": usage(completion),
        }

    async def finished(handle, request: Request) -> Completion | None:
        """The completion; None (the request cancelled) if the client disconnects first."""
        events = handle.__aiter__()
        while True:
            next_event = asyncio.ensure_future(events.__anext__())
            while not next_event.done():
                await asyncio.wait([next_event], timeout=0.5)
                if not next_event.done() and await request.is_disconnected():
                    next_event.cancel()
                    handle.cancel()
                    return None
            event = next_event.result()
            if isinstance(event, Completion):
                return event

    async def stream(handle, body, shape: dict, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, finish_reason=None, role: bool = False) -> str:
            if chat:
                delta = (
                    {"role": "assistant", "content": ""}
                    if role
                    else ({} if delta_text is None else {"content": delta_text})
                )
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish_reason, "logprobs": None}
            return json.dumps({**shape, "object": kind, "choices": [choice]})

        completion = None
        try:
            if chat:
                yield {"data": chunk(None, role=True)}
            async for event in handle:
                if isinstance(event, Completion):
                    completion = event
                    break
                yield {"data": chunk(event)}
            metrics.requests.labels(completion.finish_reason).inc()
            yield {"data": chunk(None, completion.finish_reason)}
            if body.include_usage:
                yield {"data": json.dumps({**shape, "object": kind, "choices": [], "usage": usage(completion)})}
        except (EngineStopped, RoundFailed) as error:
            kind = "service_unavailable" if isinstance(error, EngineStopped) else "server_error"
            yield {"data": json.dumps({"error": {"message": str(error), "type": kind, "param": None, "code": None}})}
        finally:
            if completion is None:  # the client disconnected (or the engine failed)
                handle.cancel()
        yield {"data": "[DONE]"}

    return app


def chat_inputs(processor, messages: list[dict], images: list) -> dict:
    """The model inputs of a conversation: Aria's processor renders and processes it in one call,
    Qwen2-VL's in two."""
    if hasattr(processor, "from_messages"):
        return processor.from_messages(messages, images=images or None)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=prompt, images=images or None)


def media_inputs(model, inputs: dict) -> dict:
    """The processor's image outputs that the model's family takes (`MEDIA_ARGUMENTS`: Aria's
    pixel_values, pixel_mask, num_crops; Qwen2-VL's pixel_values, image_grid_thw), by name."""
    return {name: inputs[name] for name in model.MEDIA_ARGUMENTS if name in inputs}


def usage(completion: Completion) -> dict:
    completion_tokens = len(completion.tokens)
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": completion.prompt_tokens + completion_tokens,
    }


def default_model_name(model_dir: str) -> str:
    return os.path.basename(os.path.normpath(model_dir))
