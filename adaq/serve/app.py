"""The OpenAI-compatible HTTP API over one LLMEngine: build_app(engine, settings) -> a FastAPI (ASGI) app.

Routes: POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with `stream: true`, ended by
`data: [DONE]`), GET /v1/models, /health, /metrics (Prometheus), /docs, /redoc, /openapi.json. With an API key every
route but /health needs it (/metrics and the OpenAPI pages too, unless `public_metrics` / `public_docs`).
Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 malformed JSON or a request the
model cannot serve (prompt longer than the context, a chat template that fails or overruns its limits, unsupported
option), 401 wrong or missing API key, 404 unknown route or model, 413 body larger than `max_body_bytes`, 422 a
field of the wrong type or out of range, 429 the server is at capacity (bounded queue), 500 the engine failed.
"""

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from adaq.engine.chat import (DEFAULT_MEMORY_BYTES, DEFAULT_TIMEOUT_S, TemplateLimits, TemplateRenderer,
                              has_chat_template)
from adaq.engine.llm_engine import LLMEngine
from adaq.errors import AdaqError
from adaq.serve import completions as api
from adaq.serve.engine_loop import EngineFailed, EngineLoop, QueueFull
from adaq.serve.errors import APIError, error_body, error_response
from adaq.serve.metrics import CONTENT_TYPE, ServerMetrics
from adaq.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, SamplingFields

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
TEMPLATE_WORKERS = 2
OPEN_PATHS = ("/health",)
METRICS_PATHS = ("/metrics",)
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


@dataclass
class ServeSettings:
    model_names: list[str]  # the first is the name /v1/models reports; requests may use any of them
    model_root: str
    api_key: str | None = None
    max_queue: int = 256  # requests admitted beyond max_num_seqs; past it, 429
    max_prompt_tokens: int | None = None  # None: the context length - 1
    max_output_tokens: int | None = None  # None: the context length - 1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    public_metrics: bool = False  # /metrics without the API key
    public_docs: bool = False  # /docs, /redoc, /openapi.json without the API key
    chat_template_timeout: float = DEFAULT_TIMEOUT_S
    chat_template_memory: int = DEFAULT_MEMORY_BYTES

    def __post_init__(self):
        _require(bool(self.model_names) and all(self.model_names), "served-model-name", self.model_names,
                 "a non-empty name")
        if self.api_key is not None and (not self.api_key.strip() or self.api_key != self.api_key.strip()):
            raise AdaqError("invalid setting --api-key (or ADAQ_API_KEY): it is empty or starts or ends with "
                            "whitespace; give a real key, or leave both unset to serve without one")
        _require(self.max_queue >= 0, "max-queue", self.max_queue, ">= 0")
        _require(self.chat_template_timeout > 0, "chat-template-timeout", self.chat_template_timeout, "> 0")
        for name in ("max_prompt_tokens", "max_output_tokens", "max_body_bytes"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name.replace("_", "-"), value, ">= 1")

    def limits(self, max_model_len: int) -> api.Limits:
        return api.Limits(max_model_len, min(self.max_prompt_tokens or max_model_len - 1, max_model_len - 1),
                          min(self.max_output_tokens or max_model_len - 1, max_model_len - 1))

    def open_paths(self) -> tuple[str, ...]:
        """Routes that answer without the API key."""
        return OPEN_PATHS + (METRICS_PATHS if self.public_metrics else ()) + (DOCS_PATHS if self.public_docs else ())

    def template_limits(self, max_model_len: int) -> TemplateLimits:
        return TemplateLimits(self.chat_template_timeout, self.chat_template_memory,
                              self.limits(max_model_len).max_prompt_chars)


def _require(condition: bool, flag: str, value, expected: str) -> None:
    if not condition:
        raise AdaqError(f"invalid setting --{flag} {value}: must be {expected}")


class ClientGone(Exception):
    """The client disconnected before its (non-streaming) answer was ready."""


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


def build_app(engine: LLMEngine, settings: ServeSettings) -> FastAPI:
    """The app; `app.state.renderer.close()` stops the chat template workers (a render in progress fails at once)."""
    metrics = ServerMetrics(engine, settings.model_names[0], in_flight=lambda: loop.num_in_flight)
    loop = EngineLoop(engine, settings.max_queue, metrics)
    renderer = TemplateRenderer(settings.template_limits(engine.max_model_len), workers=TEMPLATE_WORKERS)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await loop.start()
        chat = has_chat_template(engine.tokenizer)
        warming = asyncio.create_task(asyncio.to_thread(renderer.warm)) if chat else None
        yield
        renderer.close()
        await loop.stop()
        if warming is not None:
            await asyncio.gather(warming, return_exceptions=True)

    app = FastAPI(title="adaq", summary="OpenAI-compatible server on adaq's engine", lifespan=lifespan)
    app.state.engine_loop, app.state.metrics, app.state.settings = loop, metrics, settings
    app.state.renderer = renderer
    _add_error_handlers(app)
    _add_routes(app, engine, loop, metrics, settings, renderer)
    app.add_middleware(Gatekeeper, api_key=settings.api_key, open_paths=settings.open_paths(),
                       max_body_bytes=settings.max_body_bytes, metrics=metrics)
    return app


# ---- routes --------------------------------------------------------------------------------------------------------
def _add_routes(app: FastAPI, engine: LLMEngine, loop: EngineLoop, metrics: ServerMetrics,
                settings: ServeSettings, renderer: TemplateRenderer) -> None:
    limits = settings.limits(engine.max_model_len)
    defaults = engine.default_sampling_params()
    model_name = settings.model_names[0]
    created = int(time.time())

    def card() -> ModelCard:
        return ModelCard(id=model_name, created=created, root=settings.model_root, max_model_len=limits.max_model_len)

    def check_model(name: str | None) -> None:
        if name is not None and name not in settings.model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")

    @app.get("/health")
    async def health():
        if not loop.alive:
            return JSONResponse(error_body(503, "the engine loop is not running"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return card()

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        check_model(body.model)
        api.reject_unsupported(body)
        prompts = await api.completion_prompts(engine, body, limits)
        plan = api.plan_requests(body, prompts, limits, defaults, model_name, "cmpl", body.max_tokens, "prompt")
        return await _respond(request, loop, plan, body,
                              lambda group: api.completion_stream(plan, group, _include_usage(body), body.echo),
                              lambda finals: api.completion_response(plan, finals, body.echo))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        api.reject_unsupported(body)
        prompts = await api.chat_prompt(engine, body, limits, renderer)
        asked = body.max_completion_tokens or body.max_tokens
        plan = api.plan_requests(body, prompts, limits, defaults, model_name, "chatcmpl", asked, "messages")
        return await _respond(request, loop, plan, body,
                              lambda group: api.chat_stream(plan, group, _include_usage(body)),
                              lambda finals: api.chat_response(plan, finals))


def _include_usage(body: SamplingFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _respond(request: Request, loop: EngineLoop, plan: api.Plan, body: SamplingFields, streamer, whole):
    group = loop.submit(plan.requests, plan.response_id)
    if body.stream:
        return EventStream(streamer(group), on_close=group.close)
    try:
        finals = await _unless_disconnected(group.final_outputs(), request)
    finally:
        group.close()
    return JSONResponse(whole(finals).model_dump())


async def _unless_disconnected(work, request: Request):
    """Await `work`, cancelling it (and so aborting its requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        gone.cancel()
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (done, client gone, never started)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# ---- errors --------------------------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = f"no route {request.method} {request.url.path}" if error.status_code == 404 else str(error.detail)
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return error_response(APIError(error.status_code, message, code=codes.get(error.status_code)))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, error: RequestValidationError):
        return error_response(_validation_error(error.errors()))

    @app.exception_handler(QueueFull)
    async def queue_full(_, error: QueueFull):
        return error_response(APIError(429, str(error), code="queue_full", headers={"Retry-After": "1"}))

    @app.exception_handler(AdaqError)
    async def engine_refused(_, error: AdaqError):
        return error_response(APIError(400, str(error)))

    @app.exception_handler(EngineFailed)
    async def engine_failed(_, error: EngineFailed):
        return error_response(APIError(500, str(error)))

    @app.exception_handler(ClientGone)
    async def client_gone(_, __):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def _validation_error(errors) -> APIError:
    if any(error.get("type") == "json_invalid" for error in errors):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if not loc and first.get("type") == "missing":
        return APIError(400, "the request needs a JSON body", code="invalid_json")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(422, f"{param or 'body'}: {first.get('msg')}{more}", param, first.get("type"))


# ---- authentication, body size and HTTP metrics, before anything is parsed ----------------------------------------
class Gatekeeper:
    """Pure ASGI middleware: the API key (every route but `open_paths`), the body-size limit, and the per-status
    request counter."""

    def __init__(self, app, api_key: str | None, open_paths: tuple[str, ...], max_body_bytes: int,
                 metrics: ServerMetrics):
        self.app, self.api_key, self.open_paths = app, api_key, open_paths
        self.max_body_bytes, self.metrics = max_body_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_recording(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_recording)
            else:
                await self.app(scope, self._limited(receive), send_recording)
        finally:
            self.metrics.http_request(scope["path"], status[0])

    def _refusal(self, scope) -> APIError | None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.api_key and scope["path"] not in self.open_paths:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return APIError(413, f"the request body is {length} bytes, more than this server accepts "
                                 f"({self.max_body_bytes})", code="request_too_large")
        return None

    def _limited(self, receive):
        seen = [0]

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return receive_limited
