"""The `wherefrom` command line. Heavy imports stay inside commands so `--help` answers at once."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import typer

from indexer.config import BuildConfig, GradientConfig  # torch-free: --help stays instant
from indexer.corpus import MAX_DOC_BYTES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="wherefrom: which training documents taught a language model this answer?")
model_app = typer.Typer(no_args_is_help=True, help="Register models.")
app.add_typer(model_app, name="model")
jobs_app = typer.Typer(help="Background jobs: list them (default), resume one.")
app.add_typer(jobs_app, name="jobs")
db_app = typer.Typer(no_args_is_help=True, help="The database schema.")
app.add_typer(db_app, name="db")

MAX_ID = 2**31 - 1  # ids are SQL INTEGER columns (PostgreSQL int4): larger numbers name nothing
TraceId = typer.Argument(..., min=1, max=MAX_ID, help="A trace id from `wherefrom traces`.")
DataDir = typer.Option(None, "--data-dir", envvar="WHEREFROM_DATA_DIR",
                       help="Folder for stores and the SQLite database (default ./wherefrom-data).")


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


def _settings(data_dir):
    from service.settings import Settings
    return Settings.from_env(data_dir)


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


# `wherefrom index`'s build options are config fields: parameter -> (config class, field). Help and
# default come from the field, so the two cannot drift (tests/service/test_cli.py checks every field).
INDEX_OPTIONS = {"proj": (GradientConfig, "k_in"), "seed": (GradientConfig, "seed"),
                 "modules": (GradientConfig, "modules"), "no_adam": (GradientConfig, "optimizer_norm"),
                 "batch_size": (BuildConfig, "batch_size"), "shard_size": (BuildConfig, "shard_size"),
                 "chunking": (BuildConfig, "chunking"), "stride": (BuildConfig, "stride"),
                 "faiss_factory": (BuildConfig, "factory"), "nprobe": (BuildConfig, "nprobe")}
NEGATED = {"no_adam"}  # a flag that turns its boolean field off


def _config_option(param: str, *flags: str, help_prefix: str = ""):
    cls, name = INDEX_OPTIONS[param]
    f = next(f for f in fields(cls) if f.name == name)
    text = help_prefix + f.metadata["help"]
    return typer.Option(not f.default if param in NEGATED else f.default, *flags,
                        help=text[:1].upper() + text[1:] + ".")


def build_config(**values) -> BuildConfig:
    """The BuildConfig of `wherefrom index`'s options (`--proj` sets both projection sides)."""
    by_class = {GradientConfig: {}, BuildConfig: {}}
    for param, value in values.items():
        cls, name = INDEX_OPTIONS[param]
        by_class[cls][name] = not value if param in NEGATED else value
    by_class[GradientConfig]["k_out"] = by_class[GradientConfig]["k_in"]
    return BuildConfig(gradient=GradientConfig(**by_class[GradientConfig]), **by_class[BuildConfig])


@app.command()
def index(corpus: str = typer.Option(..., "--corpus", "-c"), model: str = typer.Option(..., "--model", "-m"),
          checkpoints: str = typer.Option("all", help="all | last | comma-separated steps"),
          proj: int = _config_option("proj", help_prefix="per side (features k×k per layer): "),
          seed: int = _config_option("seed"),
          batch_size: int = _config_option("batch_size"),
          modules: Optional[str] = _config_option("modules"),
          no_adam: bool = _config_option("no_adam", "--no-adam", help_prefix="turn off: "),
          shard_size: int = _config_option("shard_size"),
          chunking: str = _config_option("chunking"),
          stride: Optional[int] = _config_option("stride"),
          faiss_factory: Optional[str] = _config_option("faiss_factory"),
          nprobe: int = _config_option("nprobe"),
          update: bool = typer.Option(False, "--update", help="Add the documents ingested since the latest "
                                      "build to it (its own config; the options above are ignored)."),
          refit: bool = typer.Option(False, "--refit-curvature", help="With --update: refit EK-FAC over all "
                                     "rows, which rewrites every row's features (default: keep the curvature)."),
          from_training: bool = typer.Option(False, "--from-training", help="Publish the store the training "
                                             "callback recorded (its own gradient config; of the options above "
                                             "only --faiss-factory and --nprobe apply): no pass over the corpus."),
          data_dir: Optional[Path] = DataDir):
    """Build gradient, dense and BM25 indexes of a corpus for a model: queued for the workers when
    WHEREFROM_BROKER_URL is set, else built right here. With --update, extend the latest build here."""
    if refit and not update:
        raise _input_error("--refit-curvature goes with --update")
    if update:
        if from_training:
            raise _input_error("--from-training publishes a new build: leave --update out")
        _update(_settings(data_dir), corpus, model, refit)
        return
    if from_training:
        _from_training(_settings(data_dir), corpus, model, faiss_factory, nprobe)
        return
    from service import builds, jobs
    from service.render import progress_bars
    config = build_config(proj=proj, seed=seed, batch_size=batch_size, modules=modules, no_adam=no_adam,
                          shard_size=shard_size, chunking=chunking, stride=stride, faiss_factory=faiss_factory,
                          nprobe=nprobe)
    settings = _settings(data_dir)
    if settings.broker_url:
        job_id = jobs.submit(settings, builds.index_job(settings, corpus, model, config, checkpoints))
        typer.echo(f"job {job_id} queued on {settings.queue}: follow it with `wherefrom jobs`")
        return
    with progress_bars() as progress:
        out = jobs.index_here(settings, corpus, model, config, checkpoints, progress)
    typer.echo(f"build {out.build_id} (job {out.job_id}): {out.rows} rows, {len(out.info['checkpoints'])} "
               f"checkpoint(s), {sum(out.info['gradient']['dims'])} gradient dims, "
               f"{out.skipped_empty} empty document(s) skipped")


def _from_training(settings, corpus: str, model: str, factory: Optional[str], nprobe: int) -> None:
    from service.render import progress_bars
    from service.training_builds import index_from_training
    with progress_bars() as progress:
        out = index_from_training(settings, corpus, model, BuildConfig(factory=factory, nprobe=nprobe), progress)
    typer.echo(f"build {out.build_id} (from training): {out.rows} rows, {len(out.info['checkpoints'])} checkpoint(s), "
               f"{sum(out.info['gradient']['dims'])} gradient dims, no gradient pass over the corpus")


def _update(settings, corpus: str, model: str, refit: bool) -> None:
    from service.render import progress_bars
    from service.update import update
    with progress_bars() as progress:
        out = update(settings, corpus, model, refit, progress)
    if not out.added_rows:
        typer.echo(f"build {out.build_id} is up to date: no new document with tokens in corpus {corpus}")
        return
    note = {"refitted": "curvature refitted, every row rewritten", "kept": "curvature kept",
            "none": "no curvature"}[out.curvature]
    typer.echo(f"build {out.build_id}: {out.added_documents} document(s) added as {out.added_rows} rows, "
               f"{out.rows} rows in all ({note})")


@app.command()
def delete(ids: list[str] = typer.Argument(..., help="Document ids, as in the ingested file."),
           corpus: str = typer.Option(..., "--corpus", "-c", help="The corpus they belong to."),
           data_dir: Optional[Path] = DataDir):
    """Delete documents: tombstone them and remove their rows from every build of the corpus."""
    from service.update import delete as delete_documents
    out = delete_documents(_settings(data_dir), corpus, ids)
    builds = ", ".join(map(str, out.builds)) or "none needed changes"
    typer.echo(f"corpus {corpus}: {out.deleted} deleted, {out.already} already deleted; builds updated: {builds}")


def _input_error(msg: str):
    from db.errors import InputError
    return InputError(msg)


@app.command()
def trace(question: str = typer.Argument(..., help="The prompt or question the model answered."),
          answer: Optional[str] = typer.Option(None, help="The answer to trace; default: the model's greedy answer."),
          k: int = typer.Option(10, "--k", help="How many documents to return."),
          method: str = typer.Option("hybrid", help="hybrid | grad | dense | bm25"),
          rerank: Optional[str] = typer.Option(None, help="exact: rescore the top candidates with full gradients (captum TracInCP)."),
          verify: bool = typer.Option(False, "--verify", help="Tail-patch and lexical check of each document."),
          corpus: Optional[str] = typer.Option(None, "--corpus", "-c", help="Default: the latest build's."),
          model: Optional[str] = typer.Option(None, "--model", "-m", help="Default: the latest build's."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
          run_async: bool = typer.Option(False, "--async", help="Run it as a job (on the workers when "
                                                                 "WHEREFROM_BROKER_URL is set) and print the job."),
          data_dir: Optional[Path] = DataDir):
    """Which training documents back the model's answer to QUESTION?"""
    if run_async:
        from service import jobs
        from service.job_params import TraceJob
        settings = _settings(data_dir)
        spec = TraceJob(question, answer, corpus, model, k, method, rerank, verify)
        _print_jobs([jobs.get(settings, jobs.submit(settings, spec))], as_json)
        return
    from service import traces
    out = traces.trace(_settings(data_dir), question, answer, corpus, model, k, method, rerank, verify)
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
def report(trace_id: int = TraceId,
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file (default trace-ID.html)."),
           top: int = typer.Option(5, help="How many documents to explain (1-20)."),
           tail_patch: bool = typer.Option(True, help="Run the tail-patch check on each explained document."),
           as_json: bool = typer.Option(False, "--json", help="Print the report's data as JSON instead."),
           data_dir: Optional[Path] = DataDir):
    """Write a self-contained HTML report explaining a trace."""
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


def write_atomically(path: Path, text: str) -> None:
    """Write next to `path` and rename: a reader never sees half a file."""
    if not path.parent.is_dir():
        raise _input_error(f"folder {path.parent} does not exist: create it or choose another --output")
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
           data_dir: Optional[Path] = DataDir):
    """Check the database, the broker, the stores and the model checksums; say what to fix."""
    from service.doctor import run_checks
    checks = run_checks(_settings(data_dir))
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
         status: Optional[str] = typer.Option(None, help="queued | running | stalled | succeeded | failed"),
         kind: Optional[str] = typer.Option(None, help="index | trace"),
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
           data_dir: Optional[Path] = DataDir):
    """Run a job worker: it takes index shards, merges and traces from WHEREFROM_BROKER_URL."""
    from service import worker as workers
    settings = _settings(data_dir)
    if check:
        typer.echo(workers.check(settings))
        return
    workers.start(settings, name, loglevel, threads)


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
