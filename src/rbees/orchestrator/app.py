"""``create_app(settings)``: the FastAPI app of ``rbees-orcd``.

The app's ``JobService`` is opened in the lifespan and kept at ``app.state.service``; routes (and the
OpenAI-compatible ``/v1`` routes) reach it through ``rbees.orchestrator.http.service(request)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from rbees import __version__
from rbees.heap import freeze_startup_heap
from rbees.httpd import install_error_handlers
from rbees.orchestrator import routes_tasks, routes_workers
from rbees.orchestrator.http import require_client, service
from rbees.orchestrator.openai_api import build_openai_router
from rbees.orchestrator.service import JobService
from rbees.orchestrator.settings import OrchestratorSettings
from rbees.protocol import OrchestratorHealth


class OrchestratorApp(FastAPI):
    """FastAPI, with ``POST /v2/tasks`` (the hot path) answered before the middleware stack and router."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v2/tasks" and scope["method"] == "POST":
            svc: JobService | None = getattr(self.state, "service", None)
            if svc is not None:
                scope["app"] = self
                await routes_tasks.submit_asgi(svc, self.state.settings, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: OrchestratorSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = await JobService.open(settings)
        freeze_startup_heap()  # what is loaded now stays: later full GC passes walk only the jobs
        try:
            yield
        finally:
            await app.state.service.close()

    app = OrchestratorApp(
        title="rbees-orcd",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(routes_tasks.submit_router)
    app.include_router(routes_tasks.router)
    app.include_router(routes_workers.router)
    app.include_router(build_openai_router())  # /v1: same JobService, same admission and queue

    @app.get("/health", response_model=OrchestratorHealth)
    async def health(request: Request) -> OrchestratorHealth:
        return service(request).health()

    @app.get("/metrics", dependencies=[Depends(require_client)], response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(
            service(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app
