"""The OpenAI-compatible HTTP server: FastAPI app factory and the uvicorn runner behind `seekforge serve`.

    app = create_app(ServerConfig("path/to/checkpoint"))     # or serve(config): runs uvicorn until SIGTERM

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (a real
one-token generation; 503 while loading or shutting down), GET /metrics (Prometheus), and GET / (a chat
page in the browser, static/chat.html, that calls the /v1 endpoints with the key the user types in).

The HTTP port opens at once and the model loads in the engine thread meanwhile (/health answers 503
until it is ready). Every error is the OpenAI envelope {"error": {message, type, param, code}}: invalid
JSON, wrong types and impossible combinations are 400 (FastAPI's 422 is turned into 400), an unknown
model 404, a missing or wrong API key 401 (compared in constant time; /health, /metrics, the schema and
the page at / stay open), a full queue 503. A client that goes away mid-request has its generation aborted. On
SIGTERM (or Ctrl-C) the server stops admitting (new connections are refused, requests on open ones get
503), lets the requests in flight finish, then stops the engine and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from seekforge.engine import LLM, QueueFullError, SamplingParams
from seekforge.server.config import ServerConfig
from seekforge.server.engine_loop import EngineFailure, EngineLoop, Generation
from seekforge.server.metrics import ServerMetrics
from seekforge.server.protocol import (
    UNSUPPORTED, APIError, ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ErrorResponse, Health,
    ModelCard, ModelList,
)
from seekforge.server.serving import OpenAIServing, json_response

log = logging.getLogger("seekforge.server")

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")
_CLIENT_GONE = 499  # nginx's code for "client closed the request": only ever seen in metrics


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def _streamed(model, chunk: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is `model` as JSON, or with stream=true server-sent events (the schema is one event's)."""
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "properties": {"data": {
            "type": "string", "description": f"a {chunk} as JSON, or [DONE] in the last event"}}}}}}}


def create_app(config: ServerConfig) -> FastAPI:
    """The app; the checkpoint loads in the engine thread once the app starts (its lifespan)."""
    metrics = ServerMetrics(config.model_names[0])
    engine = EngineLoop(lambda: LLM(config.model_path, config.engine), metrics,
                        on_fatal=lambda: app.state.on_fatal())
    serving = OpenAIServing(engine, config)
    chat_page = (resources.files("seekforge.server") / "static" / "chat.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="seekforge", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible server for seekforge checkpoints.")
    app.openapi = lambda: _openapi_without_422(app)
    app.state.config, app.state.engine, app.state.metrics = config, engine, metrics
    app.state.draining = False
    app.state.on_fatal = lambda: None
    app.add_middleware(_Gate, app_state=app.state)
    # declares the key in the schema; _Gate enforces it (before the body is even parsed)
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> Response:
        return api_error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> Response:
        return api_error_response(_validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> Response:
        log.exception("seekforge: unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal server error ({type(err).__name__}); the server keeps running",
                                     type="server_error").body(), status_code=500)

    @app.post("/v1/chat/completions", dependencies=[Depends(bearer)], response_model=None,
              responses={**_streamed(ChatCompletion, "chat.completion.chunk"), **_errors(400, 401, 404, 500, 503)})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _unless_disconnected(request, serving.chat(body, request.state.arrival))

    @app.post("/v1/completions", dependencies=[Depends(bearer)], response_model=None,
              responses={**_streamed(Completion, "text_completion chunk"), **_errors(400, 401, 404, 500, 503)})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _unless_disconnected(request, serving.completions(body, request.state.arrival))

    @app.get("/v1/models", dependencies=[Depends(bearer)], response_model=ModelList, responses=_errors(401, 503))
    async def models() -> Response:
        created = int(time.time())
        return json_response(ModelList(data=[
            ModelCard(id=name, created=created, root=config.model_path, max_model_len=engine.llm.max_model_len)
            for name in config.model_names]))

    @app.get("/health", response_model=Health, responses=_errors(503))
    async def health() -> Response:
        if app.state.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        _check_ready(engine)
        gen = Generation(engine, [[engine.probe_token()]], SamplingParams(max_tokens=1, temperature=0),
                         prefix="health", record=False)
        try:
            await asyncio.wait_for(_drain(gen), config.health_timeout)
        except TimeoutError:
            raise APIError(503, f"the engine produced no token within {config.health_timeout:g} s",
                           type="server_error", code="engine_unresponsive") from None
        except (QueueFullError, EngineFailure) as err:
            raise APIError(503, f"the engine cannot serve: {err}", type="server_error",
                           code="engine_unavailable") from None
        finally:
            gen.close()
        return json_response(Health(status="ok"))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> Response:
        return HTMLResponse(chat_page)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def _openapi_without_422(app: FastAPI) -> dict:
    """FastAPI's schema, less the 422 responses it documents by default: this server answers 400 instead."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema


def api_error_response(err: APIError) -> Response:
    return JSONResponse(err.body(), status_code=err.status)


async def _drain(gen: Generation) -> None:
    await gen.admit()
    async for _ in gen:
        pass


def _check_ready(engine: EngineLoop) -> None:
    if engine.state == "starting":
        raise APIError(503, "the model is still loading: retry shortly (GET /health turns 200 when ready)",
                       type="server_error", code="starting")
    if engine.state != "ready":
        raise APIError(503, f"the engine is not serving ({engine.state}: {engine.error or 'stopped'})",
                       type="server_error", code="engine_unavailable")


async def _unless_disconnected(request: Request, work) -> Response:
    """Run a handler, cancelling it if the client disconnects first (its `finally` aborts the generation)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=_CLIENT_GONE)
    return task.result()


def _validation_error(errors: list[dict]) -> APIError:
    """FastAPI/pydantic validation errors as one OpenAI 400 naming the field(s)."""
    first = errors[0] if errors else {"type": "missing", "loc": ("body",), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"the request body is not valid JSON ({reason}): send one JSON object")
    if tuple(first["loc"]) == ("body",):
        return APIError(400, "the request body must be a JSON object, sent with Content-Type: application/json")
    field = next((p for p in first["loc"][1:2] if isinstance(p, str)), None)
    if field in UNSUPPORTED and first["loc"][:1] == ("body",):
        return APIError(400, f"{field} is not supported by this server ({UNSUPPORTED[field]}): leave it out",
                        param=field)
    parts, seen = [], set()
    for e in errors[:8]:
        param = _param(e["loc"])
        text = f"{param}: {e['msg']}" if param else e["msg"]
        if text not in seen:
            seen.add(text)
            parts.append(text)
    return APIError(400, "invalid request: " + "; ".join(parts[:3]), param=_param(first["loc"]) or None)


_ROLES = ("system", "developer", "user", "assistant", "tool")
_FORMATS = ("text", "json_object", "json_schema")  # the response_format union's tags


def _param(loc) -> str:
    """('body', 'messages', 0, 'user', 'content', 'str') -> 'messages[0].content': pydantic's union tags (type
    names, the message role that picks the message model, the response_format type) dropped."""
    out, previous = "", None
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif any(c in part for c in "[]-") or part in ("str", "int", "float", "bool", "none", "list", "dict") or (
                isinstance(previous, int) and part in _ROLES) or (previous == "response_format" and part in _FORMATS):
            pass
        else:
            out += f".{part}" if out else part
        previous = part
    return out


class _Gate:
    """Pure ASGI middleware: stamps the arrival time, enforces the API key and readiness on /v1/*, and
    counts every answer by endpoint and status code."""

    def __init__(self, app, app_state):
        self.app = app
        self.state = app_state
        config: ServerConfig = app_state.config
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["arrival"] = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        status = [_CLIENT_GONE]

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope) if path.startswith("/v1/") else None
            if refusal is not None:
                await api_error_response(refusal)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        except Exception:
            status[0] = 500
            raise
        finally:
            self.state.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()

    def _refusal(self, scope) -> APIError | None:
        if self.key is not None:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
                                "the server's --api-key", code="invalid_api_key")
        if self.state.draining:
            return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        try:
            _check_ready(self.state.engine)
        except APIError as err:
            return err
        return None


def serve(config: ServerConfig) -> int:
    """Run the server until SIGTERM/SIGINT; returns 1 if the engine failed to start, else 0."""
    import uvicorn

    app = create_app(config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.draining = True  # /health and new requests answer 503 while in-flight ones finish
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                   timeout_graceful_shutdown=None))

    def fatal() -> None:
        server.should_exit = True

    app.state.on_fatal = fatal
    server.run()
    return 1 if app.state.engine.state == "failed" else 0
