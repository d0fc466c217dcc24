"""The HTTP API (FastAPI), served by `wherefrom serve`.

Every route but /healthz and the OpenAPI schema wants `Authorization: Bearer <WHEREFROM_API_TOKEN>`.
Errors are `{"error": "<one line saying what to do>"}` with a 4xx status. Route functions are
plain `def`: FastAPI runs them on its thread pool, so a trace (seconds of CPU) never blocks the
event loop, and `tracer_cache.model_lock` keeps one trace at a time on the loaded models.
Jobs are the jobs table's (`service.jobs`): on the workers when a broker is set, else on one
background thread of this process.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from db.errors import Forbidden, InputError, WherefromError
from service import api_schemas as sc
from service import catalog, jobs, traces
from service.job_params import TraceJob
from service.settings import ApiSettings, Settings
from service.views import JobView, TraceOutcome

log = logging.getLogger("wherefrom.api")


class Gate:
    """ASGI middleware that answers before the app reads a body byte: 401 without the token (every
    path but `open_paths`), 413 for a declared length over the limit, 503 when `max_uploads` bodies
    are already coming in. Then it counts the body as it streams (413 past the limit) and allows
    `read_timeout` seconds between chunks (408). Every refusal closes the connection, so a client
    that stalls holds neither a buffer nor a socket: 8 MiB per token-less request used to be read
    first.
    """

    def __init__(self, app, api: ApiSettings, open_paths: frozenset[str]):
        self.app, self.api, self.open_paths = app, api, open_paths
        self.receiving = 0  # bodies being received now; one event loop, so no lock

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        has_body = b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"
        refusal = self._refusal(scope["path"], headers, has_body)
        if refusal is not None:
            return await _answer_now(send, *refusal)
        if not has_body:
            return await self.app(scope, receive, send)
        self.receiving += 1
        body = _Body(receive, send, self.api, release=self._release)
        try:
            await self.app(scope, body.receive, body.send)
        finally:
            body.finish()

    def _release(self) -> None:
        self.receiving -= 1

    def _refusal(self, path: str, headers: dict, has_body: bool) -> tuple | None:
        if path not in self.open_paths and not self._authorized(headers.get(b"authorization", b"")):
            return 401, ("missing or wrong bearer token: send `Authorization: Bearer $WHEREFROM_API_TOKEN`",
                         {"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.api.max_body_bytes:
            return 413, (_too_large(self.api.max_body_bytes), {})
        if has_body and self.receiving >= self.api.max_uploads:
            return 503, (f"{self.api.max_uploads} uploads are already coming in: retry in a few seconds, "
                         "or raise WHEREFROM_API_MAX_UPLOADS", {"Retry-After": "5"})
        return None

    def _authorized(self, authorization: bytes) -> bool:
        scheme, _, given = authorization.partition(b" ")
        # constant time: the comparison does not reveal how many leading characters were right
        return hmac.compare_digest(given, self.api.token.encode()) and scheme.lower() == b"bearer"


class _Body:
    """One request's body as the app reads it: counted, and timed between chunks."""

    def __init__(self, receive, send, api: ApiSettings, release):
        self._receive, self._send, self.api, self._release = receive, send, api, release
        self.size, self.done, self.refused, self.started = 0, False, False, False

    async def receive(self):
        if self.refused:
            return {"type": "http.disconnect"}  # the app stops; its answer is dropped in `send`
        if self.done:  # after the body, a wait for the client to go away has no deadline
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), self.api.read_timeout)
        except asyncio.TimeoutError:
            return await self._refuse(408, f"no body bytes for {self.api.read_timeout:g} s: send the body "
                                           "without pausing, or raise WHEREFROM_API_READ_TIMEOUT")
        self.size += len(message.get("body", b""))
        if self.size > self.api.max_body_bytes:
            return await self._refuse(413, _too_large(self.api.max_body_bytes))
        if message["type"] != "http.request" or not message.get("more_body"):
            self.finish()
        return message

    async def send(self, message):
        if not self.refused:
            self.started = self.started or message["type"] == "http.response.start"
            await self._send(message)

    async def _refuse(self, status: int, message: str):
        self.finish()
        if not self.started:
            self.refused = True
            await _answer_now(self._send, status, (message, {}))
        return {"type": "http.disconnect"}

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self._release()


async def _answer_now(send, status: int, reason: tuple[str, dict]) -> None:
    """Answer `status` without reading the body, and have the server close the connection."""
    message, headers = reason
    response = _error(status, message, {**headers, "Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _too_large(max_bytes: int) -> str:
    return (f"request body over {max_bytes} bytes: send fewer documents per request, "
            "or raise WHEREFROM_API_MAX_BODY_BYTES")


class InternalErrors:
    """ASGI middleware: an exception that escapes the app is a bug. It is logged with a short id and
    answered `{"error": "internal error <id>: see the server log"}` (500), never a traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            ref = uuid.uuid4().hex[:8]
            log.exception("internal error %s on %s %s", ref, scope["method"], scope["path"])
            if not started:
                await _error(500, f"internal error {ref}: see the server log")(scope, receive, send)


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
        named = exc.errors()[0].get("ctx", {}).get("error")  # a schema check that raised one of ours
        if isinstance(named, WherefromError):
            return _error(named.http_status, str(named))
        return _error(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


# the token is checked by `Gate`, before a body byte is read; this only puts the scheme in the schema
_bearer = HTTPBearer(auto_error=False, description="WHEREFROM_API_TOKEN")


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _background(request: Request) -> jobs.Background:
    return request.app.state.background


SettingsDep = Annotated[Settings, Depends(_settings)]
BackgroundDep = Annotated[jobs.Background, Depends(_background)]
ERRORS = {c: {"model": sc.ErrorOut} for c in (400, 401, 403, 404, 408, 409, 413, 422, 503)}
# the report is one self-contained page: forbid it every fetch, script and frame
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

open_routes = APIRouter()
routes = APIRouter(dependencies=[Depends(_bearer)], responses=ERRORS)


def inside_data_dir(settings: Settings, path: str) -> Path:
    """Resolve `path` (relative to the data directory) and refuse anything outside it."""
    root = settings.data_dir.resolve()
    try:
        resolved = (root / path).resolve()  # an absolute `path` replaces root; symlinks and .. resolved
    except (ValueError, OSError, RuntimeError) as e:  # a NUL byte; a symlink loop (RuntimeError before 3.13)
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
        # a folder's symlinks may point anywhere in the data dir, nowhere else
        result = catalog.ingest(settings, inside_data_dir(settings, body.path), corpus, root=settings.data_dir)
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
    app.add_middleware(InternalErrors)
    # added last, so outermost: nothing of the app runs for a request it refuses
    app.add_middleware(Gate, api=api, open_paths=frozenset({"/healthz", app.openapi_url, app.docs_url}))
    app.include_router(open_routes)
    app.include_router(routes)
    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory (`uvicorn --factory service.api:app_from_env`): settings from the environment."""
    return create_app(Settings.from_env(), ApiSettings.from_env())
