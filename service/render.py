"""Rich tables for traces."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.table import Table
from rich.text import Text


@contextmanager
def progress_bars(enabled: bool = True):
    """A `progress(stage, n, total)` callback drawing one rich bar with ETA per stage."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bars = Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=False, disable=not enabled, console=Console(stderr=True))
    tasks = {}

    def advance(stage: str, n: int, total: int):
        if not tasks:
            bars.start()  # on the first stage: a command refused before any work prints no empty line
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.advance(tasks[stage], n)

    try:
        yield advance
    finally:
        if tasks:
            bars.stop()


def snippet(text: str, start: int, end: int, width: int = 90) -> str:
    s = " ".join(text[start:end].split())
    return s if len(s) <= width else s[: width - 1] + "…"


def print_trace(out, truth: set[str] | None = None, correct: bool | None = None,
                console: Console | None = None, limit: int | None = None) -> None:
    """The question, the answer, and the ranked documents; ★ marks known true sources."""
    console = console or Console()
    head = Text()
    head.append("Q ", style="bold cyan").append(out.question)
    head.append("\nA ", style="bold cyan").append(out.answer.strip() or "(empty)")
    if out.answer_generated:
        head.append("  (model's greedy answer)", style="dim")
    if correct is not None:
        head.append("  ✓ correct" if correct else "  ✗ wrong", style="green" if correct else "red")
    if getattr(out, "text_query", None):
        head.append("\nT ", style="bold cyan").append(out.text_query, style="dim")
        head.append("  (what dense and BM25 searched)", style="dim")
    gq = getattr(out, "gradient_query", None)
    if gq:
        kept = " · ".join(t.strip() or repr(t) for t in gq.get("tokens", [])) if gq["positions"] == "subject" \
            else "every position"
        head.append("\nG ", style="bold cyan").append(kept, style="dim")
        head.append("  (what the gradient query summed over)", style="dim")
    console.print(head)
    if out.supported is False:
        console.print("unsupported: probably not learned from this corpus — no returned document states "
                      "the answer", style="bold red")
    verified = out.supported is not None
    extra = ("tail-patch", "states it") if verified else ()
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for col in ("#", "doc", "chars", "score", "grad", "dense", "bm25", *extra, "text"):
        table.add_column(col, justify="left" if col in ("doc", "text") else "right")
    for h in out.hits[:limit]:
        star = "★ " if truth and h.external_id in truth else ""
        checks = (f"{h.scores['tail_patch']:+.3f}", "yes" if h.scores["lexical"] else "no") if verified else ()
        table.add_row(str(h.rank), star + h.external_id, f"{h.char_start}-{h.char_end}", f"{h.score:.2f}", f"{h.scores['grad']:.3f}",
                      f"{h.scores['dense']:.3f}", f"{h.scores['bm25']:.2f}", *checks,
                      snippet(h.text, h.char_start, h.char_end),
                      style="green" if star else None)
    console.print(table)
    console.print(f"trace {out.trace_id} · method {out.method} · "
                  + " · ".join(f"{k} {v * 1000:.0f} ms" for k, v in out.timings.items()), style="dim")


def print_traces(items, total: int, offset: int, console: Console | None = None) -> None:
    """One row per past trace, newest first."""
    console = console or Console()
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for col in ("id", "created (UTC)", "model", "method", "hits", "question", "answer"):
        table.add_column(col, justify="right" if col in ("id", "hits") else "left", overflow="fold")
    for t in items:
        table.add_row(str(t.trace_id), t.created_at[:19].replace("T", " "), t.model, t.method, str(t.hits),
                      snippet(t.question, 0, len(t.question), 60), snippet(t.answer, 0, len(t.answer), 30))
    console.print(table)
    shown = f"{offset + 1}-{offset + len(items)}" if items else "none"
    console.print(f"{shown} of {total} trace(s) · `wherefrom show ID` for one, `wherefrom report ID` for its report",
                  style="dim")


STATUS_STYLE = {"ok": ("✓", "green"), "warn": ("!", "yellow"), "problem": ("✗", "red")}


def print_checks(checks, console: Console | None = None) -> None:
    """Doctor's findings: one row per check, with what to do for the ones that are not fine."""
    console = console or Console()
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for col in ("", "check", "finding", "what to do"):
        table.add_column(col, overflow="fold")
    for c in checks:
        mark, style = STATUS_STYLE[c.status]
        table.add_row(Text(mark, style=style), c.name, c.detail, c.fix)
    console.print(table)
    problems = sum(c.status == "problem" for c in checks)
    console.print(f"{problems} problem(s)" if problems else "all good", style="red" if problems else "green")


def _outcome(v) -> str:
    if v.error:
        return v.error
    r = v.result or {}
    if "added_rows" in r:  # an update job
        return f"build {r['build_id']}: {r['added_rows']} rows added, {r['rows']} in all"
    if "deleted" in r:
        return f"{r['deleted']} deleted, {r['already']} already; builds updated: {r['builds']}"
    if "model_id" in r:
        return f"model {r['model_id']}: {r['checkpoints']} checkpoint(s)"
    if "build_id" in r:
        return f"build {r['build_id']}: {r['rows']} rows, checksum {r['checksum'][:12]}"
    if "study_id" in r:
        return f"study {r['study']}: {r['traced']}/{r['questions']} traced, {r['failed']} failed"
    return f"trace {r['trace_id']}" if "trace_id" in r else ""


def print_study(row: dict, console: Console | None = None) -> None:
    """A study's row of `study_summary_v`, and where its report and export come from."""
    console = console or Console()
    accuracy = f" · accuracy {row['accuracy']:.0%}" if row["accuracy"] is not None else ""
    console.print(f"study {row['study']} (job {row['job_id']}, {row['status']}): {row['traced']}/{row['questions']} "
                  f"traced, {row['failed']} failed · {row['correct']} correct, {row['wrong']} wrong, "
                  f"{row['unknown']} unknown{accuracy} · {row['supported']} supported, {row['unsupported']} "
                  f"unsupported, {row['misled']} misled")
    console.print(f"`wherefrom report --study {row['study']} -o study.html` · "
                  f"`wherefrom study export {row['study']} -o results.parquet`", style="dim")


def print_jobs(views, console: Console | None = None) -> None:
    """One row per job: status, progress, what it is doing, its result or error."""
    console = console or Console()
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for col in ("job", "kind", "status", "done", "stage", "tries", "worker", "updated", "result / error"):
        table.add_column(col, justify="right" if col in ("job", "done", "tries") else "left",
                         no_wrap=col not in ("stage", "result / error"))
    colour = {"succeeded": "green", "failed": "red", "running": "yellow", "stalled": "red", "cancelled": "magenta"}
    for v in views:
        table.add_row(str(v.id), v.kind, Text(v.status, style=colour.get(v.status)), f"{100 * v.progress:.0f}%",
                      v.stage, str(v.attempts), v.worker or "", (v.updated_at or "")[11:19], _outcome(v))
    console.print(table if views else "no jobs")
