"""The OpenAI-compatible HTTP app: `create_app(chat_model) -> FastAPI`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /v1/tools (what
the server runs itself, see `server_tools`), GET /health, GET /metrics (Prometheus), GET / (the chat
page, from `static/`). With `api_keys`, the /v1 routes want `Authorization: Bearer KEY` with one of
them; the page, /health and /metrics stay open.

Every refusal is OpenAI's error shape with its status (see `errors`); a body above
`max_body_bytes` is refused (413) before it is parsed, reading no more of it than the limit.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.staticfiles import StaticFiles

from .backend import make_backend
from .chat_completions import chat_completions
from .completions import completions
from .errors import APIError, bad_request
from .server_tools import ServerTools
from .service import Limits, Service

STATIC = Path(__file__).parent / "static"
# Metrics labels; other paths count as "other".
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/tools")


def create_app(chat_model_or_parts: Any, *, api_keys: Sequence[str] = (), model_name: str = "chatglm3-6b",
               backend: Any = None, max_num_seqs: int = 64, max_pending: int = 256,
               max_body_bytes: int = 4 * 2**20, server_tools: ServerTools | None = None) -> FastAPI:
    """The app serving `chat_model_or_parts` (a `glmkit.ChatModel`, or a (model, tokenizer) pair).

    backend: what generates (see `backend`); None = the batched engine when glmkit has one, else the
        sequential backend. The app starts and stops it with its own lifespan.
    max_pending: generations admitted at once, running or queued (`n` counts n); beyond it a 503.
    server_tools: the tools and code interpreter the server runs for clients that ask (default: none).
    """
    model, tokenizer = _parts(chat_model_or_parts)
    if backend is None:
        backend = make_backend("auto", model, tokenizer, max_num_seqs)
    if max_pending < 1 or max_body_bytes < 1:
        raise ValueError("max_pending and max_body_bytes must be at least 1")
    service = Service(model, tokenizer, backend, model_name, Limits(max_pending, max_body_bytes))
    server_tools = server_tools or ServerTools()
    keys = [key.encode() for key in api_keys]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="glmkit", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    app.state.server_tools = server_tools
    app.add_middleware(_CountRequests, metrics=service.metrics)
    _add_error_handlers(app)

    def authorize(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key. Send it in the Authorization header as "
                           "'Bearer YOUR_KEY'.", code="invalid_api_key")
        given = token.strip().encode()
        if not any(hmac.compare_digest(given, key) for key in keys):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        arrived = time.monotonic()
        authorize(request)
        return await chat_completions(service, await _read_json(request, service.limits.max_body_bytes), request,
                                      arrived, server_tools)

    @app.post("/v1/completions")
    async def complete(request: Request) -> Response:
        arrived = time.monotonic()
        authorize(request)
        return await completions(service, await _read_json(request, service.limits.max_body_bytes), request, arrived)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        service.check_model(name)
        return _model_card(service)

    @app.get("/v1/tools")
    async def tools(request: Request) -> dict[str, Any]:
        authorize(request)
        return server_tools.describe()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_name, **service.stats()}

    @app.get("/metrics")
    async def metrics() -> Response:
        text = service.metrics.render(service.stats(), service.pending, service.limits.max_pending)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _parts(chat_model_or_parts: Any) -> tuple[Any, Any]:
    if isinstance(chat_model_or_parts, tuple) and len(chat_model_or_parts) == 2:
        return chat_model_or_parts
    if hasattr(chat_model_or_parts, "model") and hasattr(chat_model_or_parts, "tokenizer"):
        return chat_model_or_parts.model, chat_model_or_parts.tokenizer
    raise TypeError("create_app takes a glmkit.ChatModel or a (model, tokenizer) pair, "
                    f"got {type(chat_model_or_parts).__name__}")


def _version() -> str:
    from glmkit import __version__

    return __version__


def _model_card(service: Service) -> dict[str, Any]:
    return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "glmkit",
            "context_window": service.context_window}


async def _read_json(request: Request, limit: int) -> Any:
    """The request body decoded as JSON; 413 past `limit` bytes (read no further), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is {int(declared)} bytes; this server accepts at most {limit}.",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"The request body is over {limit} bytes, the most this server accepts.",
                           code="request_too_large")
    if not body:
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.") from None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        message = {404: f"Unknown request URL: {request.method} {request.url.path}.",
                   405: f"Method {request.method} is not allowed for {request.url.path}."}.get(
            error.status_code, str(error.detail))
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(APIError(error.status_code, message, code=code).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> Response:
        body = APIError(500, f"Internal server error: {type(error).__name__}: {error}").body()
        return JSONResponse(body, status_code=500)


class _CountRequests:
    """ASGI middleware: counts each answered /v1 request by endpoint and status for /metrics."""

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        endpoint = "/v1/models" if path.startswith("/v1/models") else path if path in _ENDPOINTS else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
