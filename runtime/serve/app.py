"""`create_app(engine, config)`: the FastAPI app (routes below; the handlers live in chat.py and realtime.py).

    POST /v1/chat/completions   OpenAI Chat Completions, streaming (SSE) or not
    GET  /v1/models             the one model this server serves
    GET  /health                status, slots in use / free, requests waiting and open
    GET  /metrics               Prometheus text
    WS   /v1/realtime           OpenAI Realtime core events

Every error is an OpenAI-style error object; an unexpected exception is a 500 for its own request only.
"""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.serve.chat import chat_completions
from runtime.serve.errors import APIError
from runtime.serve.realtime import realtime_endpoint
from runtime.serve.service import ServeConfig, Service


def create_app(engine, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    app = FastAPI(title="omni-rt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = Service(engine, config)
    app.state.realtime = set()
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = "not_found" if err.status_code == 404 else "method_not_allowed" if err.status_code == 405 else None
        return APIError(err.status_code, str(err.detail), code=code).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        return APIError(500, f"internal error: {type(err).__name__}: {err}", code="internal_error",
                        kind="server_error").response()

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_websocket_route("/v1/realtime", realtime_endpoint)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "omni-rt"}]}

    @app.get("/health")
    async def health():
        service = app.state.service
        slots = await asyncio.to_thread(service.slots)
        status = "shutting_down" if service.shutting_down else "ok"
        body = {"status": status, "model": config.model_name, "slots": slots, "max_queue": config.max_queue}
        if config.replica_id is not None:  # one of many (Ray Serve): which one answered, and its process
            body["replica"] = {"id": config.replica_id, "pid": os.getpid()}
        return JSONResponse(body, status_code=503 if service.shutting_down else 200)

    @app.get("/metrics")
    async def metrics():
        service = app.state.service
        slots = await asyncio.to_thread(service.slots)
        return Response(service.metrics.render(slots), media_type=CONTENT_TYPE_LATEST)

    return app
