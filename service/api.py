"""The HTTP API (FastAPI), served by `wherefrom serve`.

Every route but /healthz and the OpenAPI schema wants `Authorization: Bearer <WHEREFROM_API_TOKEN>`.
Errors are `{"error": "<one line saying what to do>"}` with a 4xx status. Route functions are
plain `def`: FastAPI runs them on its thread pool, so a trace (seconds of CPU) never blocks the
event loop, and `tracer_cache.model_lock` keeps one trace at a time on the loaded models.
Jobs are the jobs table's (`service.jobs`): on the workers when a broker is set, else on one
background thread of this process.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from db.errors import Forbidden, InputError, WherefromError
from service import api_schemas as sc
from service import catalog, jobs, traces
from service.job_params import TraceJob
from service.settings import ApiSettings, Settings
from service.views import JobView, TraceOutcome


class BodyLimit:
    """ASGI middleware: 413 for bodies over `max_bytes`, declared (Content-Length) or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        # chunked uploads have no Content-Length: read up to the limit before the app sees a byte
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()
        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = JSONResponse({"error": f"request body over {self.max_bytes} bytes: send fewer documents "
                                          "per request, or raise WHEREFROM_API_MAX_BODY_BYTES"}, status_code=413)
        await response(scope, receive, send)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """The first problem, as `field: message` — what a person reads first."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(WherefromError)
    async def wherefrom_error(request: Request, exc: WherefromError):
        return _error(exc.http_status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


_bearer = HTTPBearer(auto_error=False, description="WHEREFROM_API_TOKEN")


def _require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    given = credentials.credentials.encode() if credentials else b""
    # constant time: the comparison does not reveal how many leading characters were right
    if not hmac.compare_digest(given, request.app.state.api.token.encode()):
        raise StarletteHTTPException(401, "missing or wrong bearer token: send "
                                          "`Authorization: Bearer $WHEREFROM_API_TOKEN`",
                                     headers={"WWW-Authenticate": "Bearer"})


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _background(request: Request) -> jobs.Background:
    return request.app.state.background


SettingsDep = Annotated[Settings, Depends(_settings)]
BackgroundDep = Annotated[jobs.Background, Depends(_background)]
ERRORS = {c: {"model": sc.ErrorOut} for c in (400, 401, 403, 404, 409, 413, 422)}
# the report is one self-contained page: forbid it every fetch, script and frame
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

open_routes = APIRouter()
routes = APIRouter(dependencies=[Depends(_require_token)], responses=ERRORS)


def inside_data_dir(settings: Settings, path: str) -> Path:
    """Resolve `path` (relative to the data directory) and refuse anything outside it."""
    root = settings.data_dir.resolve()
    try:
        resolved = (root / path).resolve()  # an absolute `path` replaces root; symlinks and .. resolved
    except (ValueError, OSError) as e:  # a NUL byte, a symlink loop
        raise InputError(f"{path!r} is not a usable path ({e})") from None
    if not resolved.is_relative_to(root):
        raise Forbidden(f"{path} is outside the data directory: copy the file under {root} "
                        "or send the documents in the body")
    return resolved


@open_routes.get("/healthz", responses={503: {"model": sc.ErrorOut}})
def healthz(settings: SettingsDep):
    """Liveness and database reachability; no token needed."""
    try:
        catalog.ping_database(settings)
    except Exception as e:  # any failure to reach the database is "not healthy", with its reason
        return _error(503, f"database unreachable: {type(e).__name__}")
    return {"status": "ok"}


@routes.post("/traces", status_code=201, response_model=TraceOutcome, responses={202: {"model": sc.JobAccepted}})
def create_trace(body: sc.TraceRequest, settings: SettingsDep, background: BackgroundDep):
    """Trace an answer now (201), or with `"async": true` queue it and answer 202 with a job."""
    if not body.run_async:
        return traces.trace(settings, **body.trace_params())
    traces.resolve_build(settings, body.corpus, body.model)  # unknown names: 404 now, not a failed job
    job_id = jobs.submit(settings, TraceJob(**body.trace_params()), background=background)
    return JSONResponse(sc.JobAccepted(job_id=job_id, status="queued", url=f"/jobs/{job_id}").model_dump(),
                        status_code=202, headers={"Location": f"/jobs/{job_id}"})


@routes.get("/traces", response_model=sc.TracePage)
def list_traces(settings: SettingsDep, model: str | None = Query(None, description="Only this model's traces."),
                q: str | None = Query(None, max_length=500, description="Question contains (any case)."),
                limit: int = Query(20, ge=1, le=500), offset: int = Query(0, ge=0)):
    items, total = traces.list_traces(settings, model, q, limit, offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@routes.get("/traces/{trace_id}", response_model=TraceOutcome)
def get_trace(trace_id: int, settings: SettingsDep):
    return traces.get_trace(settings, trace_id)


@routes.get("/traces/{trace_id}/report", response_class=HTMLResponse)
def trace_report(trace_id: int, settings: SettingsDep, top: int = Query(5, ge=1, le=20)):
    """The self-contained HTML report of a trace (seconds: it runs the explanations)."""
    from service.report import build_report
    from service.report_html import render
    return HTMLResponse(render(build_report(settings, trace_id, top=top)),
                        headers={"Content-Security-Policy": REPORT_CSP})


@routes.get("/jobs/{job_id}", response_model=JobView)
def get_job(job_id: str, settings: SettingsDep):
    """A job of the jobs table, by the id `wherefrom jobs` shows too."""
    return jobs.get(settings, job_id)


@routes.post("/corpora/{corpus}/documents", status_code=201, response_model=sc.IngestOut)
def ingest(corpus: str, body: sc.DocumentsIn, settings: SettingsDep):
    """Add documents to a corpus (created if new); the same documents again change nothing."""
    if body.path is not None:
        result = catalog.ingest(settings, inside_data_dir(settings, body.path), corpus)
    else:
        result = catalog.ingest_records(settings, corpus, [(d.id, d.text, d.metadata) for d in body.documents])
    return {"corpus": corpus, "added": result.added, "unchanged": result.unchanged}


def create_app(settings: Settings, api: ApiSettings, background: jobs.Background | None = None) -> FastAPI:
    """The API over one data directory; queued jobs run on the workers when a broker is set, else on
    `background` (default: one thread of this process)."""
    app = FastAPI(title="wherefrom", version="0.1.0",
                  description="Which training documents taught a language model this answer?")
    app.state.settings, app.state.api = settings, api
    app.state.background = background or jobs.Background()
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=api.max_body_bytes)
    app.include_router(open_routes)
    app.include_router(routes)
    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory (`uvicorn --factory service.api:app_from_env`): settings from the environment."""
    return create_app(Settings.from_env(), ApiSettings.from_env())
