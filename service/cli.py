"""The `wherefrom` command line. Heavy imports stay inside commands so `--help` answers at once."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from indexer.corpus import MAX_DOC_BYTES
from service.cli_common import DataDir, write_atomically
from service.cli_common import settings as _settings
from service.cli_index import Device, Dtype, delete, index, runtime_of
from service.cli_study import study_app, study_report

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="wherefrom: which training documents taught a language model this answer?")
model_app = typer.Typer(no_args_is_help=True, help="Register models.")
app.add_typer(model_app, name="model")
jobs_app = typer.Typer(help="Background jobs: list them (default), resume or cancel one.")
app.add_typer(jobs_app, name="jobs")
db_app = typer.Typer(no_args_is_help=True, help="The database schema.")
app.add_typer(db_app, name="db")
app.add_typer(study_app, name="study")

MAX_ID = 2**31 - 1  # ids are SQL INTEGER columns (PostgreSQL int4): larger numbers name nothing
TraceId = typer.Argument(..., min=1, max=MAX_ID, help="A trace id from `wherefrom traces`.")


@app.callback()
def _threads(threads: Optional[int] = typer.Option(None, "--threads", min=1, envvar="WHEREFROM_THREADS",
                                                     help="CPU threads for torch (default: the cores this "
                                                          "process may use).")):
    """wherefrom: which training documents taught a language model this answer?"""
    # Set before torch loads (every command imports it lazily). OpenMP threads that spin while they
    # wait made `wherefrom demo` beside one other CPU-bound process take 548 s instead of ~90 s;
    # passive waiting costs nothing when the cores are free.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads or "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads or len(os.sched_getaffinity(0)))
    if threads and "torch" in sys.modules:  # loaded already (the CLI called from Python)
        sys.modules["torch"].set_num_threads(threads)


@app.command()
def ingest(path: Path = typer.Argument(..., help="JSONL, Parquet, CSV, a folder of .txt files, or a saved HF dataset."),
           corpus: str = typer.Option(..., "--corpus", "-c", help="Corpus name to add the documents to."),
           fmt: str = typer.Option("auto", "--format", help="auto|jsonl|parquet|csv|text|hf"),
           id_field: str = typer.Option("id", help="Field holding the document id."),
           text_field: str = typer.Option("text", help="Field holding the document text."),
           max_doc_bytes: int = typer.Option(MAX_DOC_BYTES, min=1, help="Refuse any document larger than "
                                                                      "this many UTF-8 bytes."),
           data_dir: Optional[Path] = DataDir):
    """Add documents to a corpus (idempotent: the same documents again change nothing)."""
    from service import catalog
    r = catalog.ingest(_settings(data_dir), path, corpus, fmt, id_field, text_field, max_doc_bytes)
    typer.echo(f"corpus {corpus}: {r.added} added, {r.unchanged} already there")


@model_app.command("add")
def model_add(path: Path = typer.Argument(..., help="A save_pretrained folder or a Trainer output folder "
                                                    "(either may hold PEFT LoRA adapters)."),
              name: str = typer.Option(..., "--name", "-n", help="Name to refer to the model by."),
              base: Optional[Path] = typer.Option(None, help="LoRA adapters only: the local base model folder, "
                                                              "when adapter_config.json names a hub id or another path."),
              data_dir: Optional[Path] = DataDir):
    """Register a model and its checkpoints (weights checksums, learning rates, optimizer state)."""
    from service import catalog
    model_id, n, created = catalog.add_model(_settings(data_dir), path, name, base)
    typer.echo(f"model {name} (id {model_id}): {n} checkpoint(s){'' if created else ', already registered'}")
    found = catalog.training_store(path)
    if found:
        typer.echo(f"training store: {found['rows']} rows of {len(found['ids'])} documents recorded over saves "
                   f"{found['saves']}: publish it with `wherefrom index --from-training -c CORPUS -m {name}`")


app.command()(index)
app.command()(delete)


def _input_error(msg: str):
    from db.errors import InputError
    return InputError(msg)


@app.command()
def trace(question: str = typer.Argument(..., help="The prompt or question the model answered."),
          answer: Optional[str] = typer.Option(None, help="The answer to trace, as the model writes it after the "
                                               "question (a word typed without its leading space gets one); "
                                               "default: the model's greedy answer."),
          k: int = typer.Option(10, "--k", help="How many documents to return."),
          method: str = typer.Option("hybrid", help="hybrid | grad | dense | bm25"),
          rerank: Optional[str] = typer.Option(None, help="exact: rescore the top candidates with full gradients (captum TracInCP)."),
          verify: bool = typer.Option(False, "--verify", help="Tail-patch and lexical check of each document."),
          text_query: Optional[str] = typer.Option(None, "--text-query", help="What dense and BM25 search with; "
                                                   "default: the question's content (template removed) and the answer."),
          gradient_positions: str = typer.Option("subject", "--gradient-positions",
                                                 help="subject | all: what the gradient query sums over, the "
                                                      "question's names and the answer's positions, or every position."),
          corpus: Optional[str] = typer.Option(None, "--corpus", "-c", help="Default: the latest build's."),
          model: Optional[str] = typer.Option(None, "--model", "-m", help="Default: the latest build's."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
          run_async: bool = typer.Option(False, "--async", help="Run it as a job (on the workers when "
                                                                 "WHEREFROM_BROKER_URL is set) and print the job."),
          device: Optional[str] = Device, dtype: Optional[str] = Dtype,
          data_dir: Optional[Path] = DataDir):
    """Which training documents back the model's answer to QUESTION?"""
    if run_async:
        from service import jobs
        from service.job_params import TraceJob
        settings = _settings(data_dir)
        spec = TraceJob(question, answer, corpus, model, k, method, rerank, verify, text_query, gradient_positions)
        _print_jobs([jobs.get(settings, jobs.submit(settings, spec))], as_json)
        return
    from indexer.config import applied
    from service import traces
    with applied(runtime_of(device=device, dtype=dtype)):
        out = traces.trace(_settings(data_dir), question, answer, corpus, model, k, method, rerank, verify,
                           text_query, gradient_positions)
    if as_json:
        typer.echo(json.dumps(asdict(out), indent=2))
    else:
        from service.render import print_trace
        print_trace(out)


@app.command()
def traces(model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model's traces."),
           contains: Optional[str] = typer.Option(None, "--contains", "-q", help="Question contains (any case)."),
           limit: int = typer.Option(20, help="Traces per page (1-500)."),
           offset: int = typer.Option(0, min=0, max=MAX_ID, help="Skip this many of the newest traces."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
           data_dir: Optional[Path] = DataDir):
    """List past traces, newest first."""
    from service import traces as trace_log
    items, total = trace_log.list_traces(_settings(data_dir), model, contains, limit, offset)
    if as_json:
        typer.echo(json.dumps({"items": [asdict(i) for i in items], "total": total, "limit": limit,
                               "offset": offset}, indent=2))
    else:
        from service.render import print_traces
        print_traces(items, total, offset)


@app.command()
def show(trace_id: int = TraceId,
         as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
         data_dir: Optional[Path] = DataDir):
    """Show a stored trace: its question, answer and ranked documents."""
    from service import traces
    out = traces.get_trace(_settings(data_dir), trace_id)
    if as_json:
        typer.echo(json.dumps(asdict(out), indent=2))
    else:
        from service.render import print_trace
        print_trace(out)


@app.command()
def report(trace_id: Optional[int] = typer.Argument(None, min=1, max=MAX_ID,
                                                   help="A trace id from `wherefrom traces`."),
           study: Optional[str] = typer.Option(None, "--study", help="Report a study by name instead: its "
                                               "aggregates, each row linking to trace-ID.html."),
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file (default trace-ID.html, "
                                                 "study-NAME.html)."),
           top: int = typer.Option(5, help="How many documents to explain (1-20)."),
           tail_patch: bool = typer.Option(True, help="Run the tail-patch check on each explained document."),
           as_json: bool = typer.Option(False, "--json", help="Print the report's data as JSON instead."),
           data_dir: Optional[Path] = DataDir):
    """Write a self-contained HTML report explaining a trace (or, with --study, a study)."""
    if study is not None:
        study_report(_settings(data_dir), study, output, as_json)
        return
    if trace_id is None:
        raise _input_error("give a trace id (`wherefrom traces` lists them), or --study NAME")
    if not 1 <= top <= 20:
        raise _input_error("--top must be between 1 and 20")
    from service.report import build_report
    data = build_report(_settings(data_dir), trace_id, top=top, tail_patch=tail_patch)
    if as_json:
        typer.echo(json.dumps({**asdict(data), "supported": data.supported}, indent=2))
        return
    from service.report_html import render
    path = output or Path(f"trace-{trace_id}.html")
    write_atomically(path, render(data))
    typer.echo(f"report of trace {trace_id} → {path}")


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
           fix: bool = typer.Option(False, "--fix", help="Remove orphan work folders (*.partial) of killed or "
                                                         "failed builds and updates; nothing else."),
           data_dir: Optional[Path] = DataDir):
    """Check the database, the broker, the stores and the model checksums; say what to fix."""
    from service.doctor import run_checks
    checks = run_checks(_settings(data_dir), fix)
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        from service.render import print_checks
        print_checks(checks)
    if any(c.status == "problem" for c in checks):
        raise typer.Exit(2)


@app.command()
def serve(host: Optional[str] = typer.Option(None, help="Interface to listen on (default WHEREFROM_API_HOST "
                                                        "or 127.0.0.1)."),
          port: Optional[int] = typer.Option(None, min=1, max=65535, help="Port (default WHEREFROM_API_PORT or 8000)."),
          data_dir: Optional[Path] = DataDir):
    """Serve the HTTP API (bearer token from WHEREFROM_API_TOKEN; schema at /openapi.json)."""
    import logging

    import uvicorn

    from service.api import create_app
    from service.settings import ApiSettings
    api = ApiSettings.from_env(host, port)
    # our loggers (an internal error's id and traceback, background jobs) beside uvicorn's lines
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(create_app(_settings(data_dir), api), host=api.host, port=api.port, log_level="info",
                proxy_headers=False)


@app.command()
def demo(fresh: bool = typer.Option(False, help="Retrain the demo model even if one is there."),
         questions: int = typer.Option(8, help="How many traced questions to print."),
         data_dir: Optional[Path] = DataDir):
    """Generate a world of niche facts, train a small GPT-2, index it and trace answers back to sources."""
    from service.demo.run import run_demo
    run_demo(_settings(data_dir), fresh=fresh, shown=questions)


@jobs_app.callback(invoke_without_command=True)
def jobs(ctx: typer.Context,
         status: Optional[str] = typer.Option(None, help="queued | running | stalled | succeeded | failed | cancelled"),
         kind: Optional[str] = typer.Option(None, help="index | trace | study | update | delete | model"),
         limit: int = typer.Option(20, min=1, max=500, help="How many, newest first (1-500)."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
         data_dir: Optional[Path] = DataDir):
    """List jobs, newest first, with their progress."""
    if ctx.invoked_subcommand:
        return
    from service import jobs as job_system
    _print_jobs(job_system.list_jobs(_settings(data_dir), status, kind, limit), as_json)


@jobs_app.command("resume")
def jobs_resume(job_id: int = typer.Argument(..., min=1, max=MAX_ID,
                                             help="The job to run again from where it stopped."),
                data_dir: Optional[Path] = DataDir):
    """Queue a failed or stuck job again; finished shards are kept."""
    from service import jobs as job_system
    settings = _settings(data_dir)
    job_system.resume(settings, job_id)
    _print_jobs([job_system.get(settings, job_id)], False)


@jobs_app.command("cancel")
def jobs_cancel(job_id: int = typer.Argument(..., min=1, max=MAX_ID, help="The job to cancel."),
                data_dir: Optional[Path] = DataDir):
    """Cancel a job: a queued one never starts, a running one stops at its next task (a build's
    shard, a study's task), keeping nothing half-written."""
    from service import jobs as job_system
    _print_jobs([job_system.cancel(_settings(data_dir), job_id)], False)


def _print_jobs(views, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([asdict(v) for v in views], indent=2))
    else:
        from service.render import print_jobs
        print_jobs(views)


@app.command()
def worker(name: Optional[str] = typer.Option(None, "--name", "-n", help="Worker name (default celery@HOST)."),
           loglevel: str = typer.Option("info", help="debug | info | warning | error"),
           check: bool = typer.Option(False, "--check", help="Only check the broker and the database, then exit."),
           threads: Optional[int] = typer.Option(None, min=1, max=1024, help="Torch threads (default: one per core); "
                                                                   "workers sharing a machine should split its cores."),
           device: Optional[str] = typer.Option(None, "--device", help="The device this worker's tasks use: "
                                                "auto | cpu | cuda | cuda:N (one worker per GPU)."),
           data_dir: Optional[Path] = DataDir):
    """Run a job worker: it takes index shards, merges and traces from WHEREFROM_BROKER_URL."""
    from service import worker as workers
    settings = _settings(data_dir)
    if check:
        typer.echo(workers.check(settings))
        return
    workers.start(settings, name, loglevel, threads, runtime_of(device=device))


@db_app.command("upgrade")
def db_upgrade(data_dir: Optional[Path] = DataDir):
    """Migrate the database to the latest schema (docker-compose's one-shot `migrate` service)."""
    from service.catalog import schema_revision
    revision = schema_revision(_settings(data_dir))  # migrates to head first
    typer.echo(f"database at revision {revision}")


def main():
    """Run the command line; every failure a user can cause is one line on stderr and exit code 2."""
    from sqlalchemy.exc import OperationalError
    from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors click: not click's

    from db.errors import WherefromError
    from service.settings import redact_url
    try:
        code = app(standalone_mode=False, prog_name="wherefrom")  # usage errors come here, not to click
    except NoArgsIsHelpError as e:
        e.show()  # the help of the group
        code = e.exit_code
    except ClickException as e:  # a missing argument, an unknown option, a value out of its range
        ctx = getattr(e, "ctx", None)
        _fail(e.format_message().rstrip(".") + (f": see `{ctx.command_path} --help`" if ctx else ""))
    except WherefromError as e:
        _fail(str(e))
    except OperationalError as e:  # the database went away after the first connection (db.engine covers that)
        from db.engine import first_line
        _fail(f"the database stopped answering ({redact_url(first_line(e.orig))}): "
              "start it or fix WHEREFROM_DATABASE_URL, then run the command again")
    except typer.Abort:
        _fail("aborted")
    sys.exit(code or 0)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
