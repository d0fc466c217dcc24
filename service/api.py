"""The HTTP API (FastAPI), served by `wherefrom serve`.

Every route but /healthz and the OpenAPI schema wants `Authorization: Bearer <WHEREFROM_API_TOKEN>`.
Errors are `{"error": "<one line saying what to do>"}` with a 4xx status. Route functions are
plain `def`: FastAPI runs them on its thread pool, so a trace (seconds of CPU) never blocks the
event loop, and `tracer_cache.model_lock` keeps one trace at a time on the loaded models.
Jobs are the jobs table's (`service.jobs`): on the workers when a broker is set, else on one
background thread of this process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from db.errors import Forbidden, InputError, WherefromError
from service import api_schemas as sc
from service import catalog, jobs, studies, traces
from service.api_gate import Gate, InternalErrors, error
from service.job_params import DeleteJob, ModelJob, TraceJob, UpdateJob
from service.settings import ApiSettings, Settings
from service.views import JobView, TraceOutcome


def _validation_message(exc: RequestValidationError) -> str:
    """The first problem, as `field: message` — what a person reads first."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(WherefromError)
    async def wherefromerror(request: Request, exc: WherefromError):
        return error(exc.http_status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        named = exc.errors()[0].get("ctx", {}).get("error")  # a schema check that raised one of ours
        if isinstance(named, WherefromError):
            return error(named.http_status, str(named))
        return error(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def httperror(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


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
        return error(503, f"database unreachable: {type(e).__name__}")
    return {"status": "ok"}


@routes.post("/traces", status_code=201, response_model=TraceOutcome, responses={202: {"model": sc.JobAccepted}})
def create_trace(body: sc.TraceRequest, settings: SettingsDep, background: BackgroundDep):
    """Trace an answer now (201), or with `"async": true` queue it and answer 202 with a job."""
    if not body.run_async:
        return traces.trace(settings, **body.trace_params())
    traces.resolve_build(settings, body.corpus, body.model)  # unknown names: 404 now, not a failed job
    return _accepted(settings, TraceJob(**body.trace_params()), background)


def _accepted(settings: Settings, spec: jobs.Spec, background: jobs.Background) -> JSONResponse:
    """Submit a job and answer 202 with where to follow it: every long action's answer."""
    job_id = jobs.submit(settings, spec, background=background)
    return JSONResponse(sc.JobAccepted(job_id=job_id, status="queued", url=f"/jobs/{job_id}").model_dump(),
                        status_code=202, headers={"Location": f"/jobs/{job_id}"})


ACCEPTED = {"status_code": 202, "response_model": sc.JobAccepted}


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


@routes.delete("/jobs/{job_id}", response_model=JobView)
def cancel_job(job_id: str, settings: SettingsDep):
    """Cancel a queued or running job (`wherefrom jobs cancel`); 409 once it finished."""
    return jobs.cancel(settings, job_id)


@routes.post("/studies", **ACCEPTED)
def create_study(body: sc.StudyRequest, settings: SettingsDep, background: BackgroundDep):
    """`wherefrom study`: the questions inline or a file inside the data directory; 202 with the job."""
    questions = body.questions if body.path is None else inside_data_dir(settings, body.path)
    spec = studies.study_job(settings, questions, body.name, body.corpus, body.model, body.k, body.method,
                             body.tasks_of)
    return _accepted(settings, spec, background)


@routes.get("/studies", response_model=sc.StudyPage)
def list_studies(settings: SettingsDep, limit: int = Query(20, ge=1, le=500), offset: int = Query(0, ge=0)):
    """Studies newest first, each its row of `study_summary_v`."""
    items, total = studies.page(settings, limit, offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@routes.get("/studies/{study_id}")
def get_study(study_id: int, settings: SettingsDep) -> dict:
    """One study's row of `study_summary_v`: job status, counts, accuracy, mean exposure."""
    return studies.summary_by_id(settings, study_id)


@routes.get("/studies/{study_id}/report", response_class=HTMLResponse)
def study_report(study_id: int, settings: SettingsDep):
    """The study's self-contained HTML report (`wherefrom report --study`)."""
    from service.study_report import build_study_report
    from service.study_report_html import render_study
    name = studies.summary_by_id(settings, study_id)["study"]
    return HTMLResponse(render_study(build_study_report(settings, name)), headers={"Content-Security-Policy": REPORT_CSP})


@routes.post("/builds", **ACCEPTED)
def create_build(body: sc.BuildRequest, settings: SettingsDep, background: BackgroundDep):
    """`wherefrom index` with its options; names, documents, checkpoints and weights checked now."""
    from service import builds
    spec = builds.index_job(settings, body.corpus, body.model, body.config(), body.checkpoints)
    return _accepted(settings, spec, background)


@routes.post("/builds/{build_id}/update", **ACCEPTED)
def update_build(build_id: int, body: sc.UpdateRequest, settings: SettingsDep, background: BackgroundDep):
    """`wherefrom index --update` of this build (the latest of its corpus and model)."""
    from service import update
    update.build_names(settings, build_id)  # 404 / 409 now, not a failed job
    return _accepted(settings, UpdateJob(build_id, body.refit_curvature), background)


@routes.delete("/corpora/{corpus}/documents", **ACCEPTED)
def delete_documents(corpus: str, body: sc.DeleteRequest, settings: SettingsDep, background: BackgroundDep):
    """`wherefrom delete`: tombstone the documents and drop their rows from every build of the corpus."""
    catalog.check_corpus(settings, corpus)
    return _accepted(settings, DeleteJob(corpus, body.ids), background)


@routes.post("/models", **ACCEPTED)
def add_model(body: sc.ModelRequest, settings: SettingsDep, background: BackgroundDep):
    """`wherefrom model add` of a folder inside the data directory; hashing the weights is the job."""
    folder = _model_folder(settings, body.path)
    base = _model_folder(settings, body.base) if body.base else None
    return _accepted(settings, ModelJob(str(folder), body.name, str(base) if base else None), background)


def _model_folder(settings: Settings, path: str) -> Path:
    folder = inside_data_dir(settings, path)
    if not folder.is_dir():
        raise InputError(f"{path} is not a folder in the data directory: copy the model folder under "
                         f"{settings.data_dir.resolve()} and give its path relative to it")
    return folder


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
