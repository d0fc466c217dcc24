"""`wherefrom study` (run a study, export it) and `wherefrom report --study`. Heavy imports stay
inside the commands, as in `service.cli`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
import typer.core

from service.cli_common import DataDir, settings, write_atomically


class _StudyCommands(typer.core.TyperGroup):
    """`wherefrom study QUESTIONS …` runs a study; `wherefrom study export NAME …` is a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


study_app = typer.Typer(cls=_StudyCommands, no_args_is_help=True,
                        help="Many questions traced as one job (`study QUESTIONS --name NAME`); `study export`.")


@study_app.command("run")
def study_run(questions: Path = typer.Argument(..., help="JSONL, CSV or Parquet: `question`, optional `answer` "
                                               "(default: the model's greedy answer) and `expected`, any other "
                                               "columns kept as metadata."),
              name: str = typer.Option(..., "--name", "-n", help="The study's name, to report and export it by."),
              corpus: Optional[str] = typer.Option(None, "--corpus", "-c", help="Default: the latest build's."),
              model: Optional[str] = typer.Option(None, "--model", "-m", help="Default: the latest build's."),
              k: int = typer.Option(10, "--k", help="Documents returned per question."),
              method: str = typer.Option("hybrid", help="hybrid | grad | dense | bm25"),
              tasks_of: int = typer.Option(25, "--tasks-of", help="Questions per task: what one worker takes, "
                                           "stores in one transaction, and redoes if it dies."),
              data_dir: Optional[Path] = DataDir):
    """Trace every question of a file as one job: on the workers when WHEREFROM_BROKER_URL is set,
    else here with a progress bar. Resume a cut-off study with `wherefrom jobs resume ID`."""
    from service import jobs, studies
    from service.render import print_study, progress_bars
    s = settings(data_dir)
    spec = studies.study_job(s, questions, name, corpus, model, k, method, tasks_of)
    if s.broker_url:
        job_id = jobs.submit(s, spec)
        typer.echo(f"study {name}: job {job_id} queued on {s.queue}: follow it with `wherefrom jobs`")
        return
    with progress_bars() as progress:
        jobs.submit(s, spec, progress)
    print_study(studies.summary(s, name))


@study_app.command("export")
def study_export(name: str = typer.Argument(..., help="The study's name."),
                 output: Path = typer.Option(..., "--output", "-o", help="results.parquet or results.csv"),
                 data_dir: Optional[Path] = DataDir):
    """Write one row per question (outcome, trace id, metadata) to Parquet or CSV."""
    from service import studies
    n = studies.export(settings(data_dir), name, output)
    typer.echo(f"study {name}: {n} question(s) → {output}")


def study_report(s, name: str, output: Optional[Path], as_json: bool) -> None:
    """`wherefrom report --study NAME`: the page (or its data as JSON)."""
    from service.study_report import build_study_report
    data = build_study_report(s, name)
    if as_json:
        typer.echo(json.dumps(asdict(data), indent=2))
        return
    from service.study_report_html import render_study
    path = output or Path(f"study-{name}.html")
    write_atomically(path, render_study(data))
    typer.echo(f"report of study {name} → {path}")
