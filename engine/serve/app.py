"""The HTTP layer (FastAPI): middleware, error mapping, docs, the page and the routes (engine.serve.routes).

Every error is `{"error": kind, "detail": message}` (engine.serve.errors). Public without a key: the page
(`/`, `/static/*`), `/v1/info`, `/healthz`, `/readyz`, and `/metrics` and the docs unless --protect-metrics /
--protect-docs put them behind the key. OpenAPI at /openapi.json, Swagger UI at /docs, ReDoc at /redoc
(assets bundled, no CDN).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .bodies import describe_errors
from .core import ServerCore
from .errors import HANDLED, engine_error_response, error_response, error_responses
from .guards import AccessPolicy, AuthGuard, BodyGuard, ConcurrencyGuard, ErrorGuard, FramingGuard
from .metrics import MetricsMiddleware, RouteTable, ServerMetrics
from .iiif_routes import build_iiif_router
from .routes import Schemas, build_router
from .schemas import HealthResponse, ReadyResponse

log = logging.getLogger("engine.serve")
STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class HttpLimits:
    """Connection limits of the HTTP layer (see `python -m engine.serve --help`)."""

    max_body_bytes: int = 20 << 20
    body_timeout_s: float = 30.0
    max_concurrency: int = 64
    header_timeout_s: float = 10.0  # enforced by the connection protocol (engine.serve.guards.guarded_h11)


def docs_assets() -> Path:
    """The folder holding Swagger UI and ReDoc (the fastapi-offline package ships them)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def package_version() -> str:
    """The installed package's version (pyproject.toml's), shown on /docs; "unknown" in a source tree that was
    built in place but never installed (`python setup.py build_ext --inplace`)."""
    try:
        return version("cnclip-engine")
    except PackageNotFoundError:
        return "unknown"


def create_app(core: ServerCore, metrics: ServerMetrics, *, policy: AccessPolicy = AccessPolicy(),
               limits: HttpLimits = HttpLimits(),
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The FastAPI app over `core`; loading starts in the background at start-up (see /readyz)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        loading = asyncio.create_task(core.start())

        def report(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("start-up failed: %s", task.exception())
                if on_fatal is not None:
                    on_fatal(task.exception())

        loading.add_done_callback(report)
        yield
        if not loading.done():
            loading.cancel()
            with contextlib.suppress(BaseException):
                await loading
        await core.close()
        log.info("shut down: queues drained")

    app = FastAPI(title="cnclip-engine retrieval server", version=package_version(), lifespan=lifespan,
                  description="Chinese-CLIP text<->image retrieval with dynamic batching. " + (__doc__ or ""),
                  docs_url=None, redoc_url=None)
    app.add_middleware(ErrorGuard)
    app.add_middleware(BodyGuard, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(AuthGuard, policy=policy)
    app.add_middleware(ConcurrencyGuard, limit=limits.max_concurrency)
    app.add_middleware(FramingGuard)
    routes: list[RouteTable] = []
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=lambda: routes[0])

    for kind in HANDLED:
        app.add_exception_handler(kind, lambda _request, exc: engine_error_response(exc))

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "ValidationError", describe_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "NotFound", 405: "MethodNotAllowed"}
        return error_response(exc.status_code, kinds.get(exc.status_code, "HTTPError"), str(exc.detail),
                              dict(exc.headers or {}))

    schemas = Schemas()
    app.include_router(build_router(core, policy, schemas))
    app.include_router(build_iiif_router(core))
    _add_public_routes(app, core, metrics, policy)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            schemas.install(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    routes.append(RouteTable([*openapi()["paths"], "/", "/docs", "/redoc", "/openapi.json"],
                             mounts=["/static", "/docs/assets"]))
    return app


def _add_public_routes(app: FastAPI, core: ServerCore, metrics: ServerMetrics, policy: AccessPolicy) -> None:
    """Page, static files, docs, health, readiness and metrics."""
    assets = docs_assets()
    app.mount("/docs/assets", StaticFiles(directory=assets), name="docs-assets")
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            return error_response(404, "NotFound", "the search page is not installed (engine/serve/static)")
        return FileResponse(index, media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url="/docs/assets/redoc.standalone.js",
                              redoc_favicon_url="/docs/assets/favicon.png", with_google_fonts=False)

    @app.get("/healthz", summary="Liveness", response_model=HealthResponse,
             responses=error_responses([503]))
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: model loaded and warmed up; backend, precision, device",
             response_model=ReadyResponse, responses=error_responses([503]))
    async def readyz() -> Any:
        if not core.ready:
            return error_response(503, "NotReady", "the model is loading or warming up", {"Retry-After": "1"})
        images, texts = core.counts()
        return {"status": "ready", **core.describe(), "images": images, "texts": texts}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                        **error_responses([401] if policy.needs_key("/metrics") else [])})
    async def metrics_route() -> Response:
        return Response(metrics.render(core.batchers, core.ready), media_type=metrics.content_type)
