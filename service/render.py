"""Rich tables for traces."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


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
    console.print(head)
    if out.supported is False:
        console.print("unsupported: probably not learned from this corpus — no returned document states "
                      "the answer or raises its probability when trained on", style="bold red")
    verified = out.supported is not None
    extra = ("tail-patch", "states it") if verified else ()
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for col in ("#", "doc", "score", "grad", "dense", "bm25", *extra, "text"):
        table.add_column(col, justify="left" if col in ("doc", "text") else "right")
    for h in out.hits[:limit]:
        star = "★ " if truth and h.external_id in truth else ""
        checks = (f"{h.scores['tail_patch']:+.3f}", "yes" if h.scores["lexical"] else "no") if verified else ()
        table.add_row(str(h.rank), star + h.external_id, f"{h.score:.2f}", f"{h.scores['grad']:.3f}",
                      f"{h.scores['dense']:.3f}", f"{h.scores['bm25']:.2f}", *checks,
                      snippet(h.text, h.char_start, h.char_end),
                      style="green" if star else None)
    console.print(table)
    console.print(f"trace {out.trace_id} · method {out.method} · "
                  + " · ".join(f"{k} {v * 1000:.0f} ms" for k, v in out.timings.items()), style="dim")
