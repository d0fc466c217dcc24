"""The HTML report of a study: one self-contained page (inline CSS and SVG, no script, no fetch),
under the same Content-Security-Policy as a trace's report.

Every value from the database goes through `html.escape`. Each chart's numbers also sit in a
table beside it (and in `data-*` attributes), so what the eye reads is what the views hold.
"""

from __future__ import annotations

from html import escape

from service.report_html import CSS, line_chart
from service.study_report import StudyReport

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"  # service.api's REPORT_CSP
STUDY_CSS = """.tiles{grid-template-columns:repeat(5,1fr)}a{color:#6d28d9}.cap{font-size:12px;color:#78716c;margin:6px 0 0}
table.small td,table.small th{padding:4px 8px}.empty{color:#78716c;font-size:13px}"""


def _pct(v) -> str:
    return "—" if v is None else f"{v:.0%}"


def _link(trace_id) -> str:
    return f'<a href="trace-{trace_id}.html">trace {trace_id}</a>' if trace_id is not None else ""


def bar_chart(bars: list[tuple[str, int]], width: int = 460, height: int = 170) -> str:
    """A small SVG bar chart of (label, count); each bar carries its numbers in data attributes."""
    left, right, top, bottom = 36, 8, 10, 26
    w, h = width - left - right, height - top - bottom
    hi = max((n for _, n in bars), default=0) or 1
    slot = w / max(1, len(bars))
    parts = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" stroke="#d6d3d1"/>',
             f'<text x="{left - 6}" y="{top + 4}" font-size="10" text-anchor="end" fill="#78716c">{hi}</text>']
    for i, (label, n) in enumerate(bars):
        x, bh = left + i * slot + slot * 0.15, h * n / hi
        parts.append(f'<rect class="bar-n" data-label="{escape(label)}" data-questions="{n}" x="{x:.1f}" '
                     f'y="{top + h - bh:.1f}" width="{slot * 0.7:.1f}" height="{bh:.1f}" rx="3" fill="#7c3aed">'
                     f'<title>{escape(label)}: {n}</title></rect>'
                     f'<text x="{x + slot * 0.35:.1f}" y="{height - 8}" font-size="10" text-anchor="middle" '
                     f'fill="#78716c">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _tiles(r: StudyReport) -> str:
    s = r.summary
    tiles = [("questions", f"{s['traced']}/{s['questions']}", "questions traced"),
             ("accuracy", _pct(s["accuracy"]), f"correct ({s['correct']} of {s['correct'] + s['wrong']} with an "
                                               "expected answer)"),
             ("supported", str(s["supported"]), "answers a returned document states"),
             ("unsupported", str(s["unsupported"]), "answers no returned document states"),
             ("misled", str(s["misled"]), "wrong answers a returned document states")]
    return '<div class="tiles" id="tiles">' + "".join(
        f'<div class="tile" data-key="{k}"><b>{escape(v)}</b><span>{escape(t)}</span></div>' for k, v, t in tiles) + "</div>"


def _curve(r: StudyReport) -> str:
    if not r.curve:
        return '<div class="panel" id="curve"><h3>Accuracy against exposure</h3><p class="empty">No question has an ' \
               'expected answer: add an `expected` column to see it.</p></div>'
    chart = line_chart([c["exposure"] for c in r.curve], [("accuracy", [c["accuracy"] for c in r.curve], "#15803d")],
                       0.0, 1.0, fmt="{:.0%}")
    rows = "".join(f'<tr data-exposure="{c["exposure"]}" data-questions="{c["questions"]}" data-correct="{c["correct"]}" '
                   f'data-accuracy="{c["accuracy"]!r}"><td>{c["exposure"]}</td><td>{c["questions"]}</td>'
                   f'<td>{c["correct"]}</td><td>{_pct(c["accuracy"])}</td></tr>' for c in r.curve)
    return (f'<div class="panel" id="curve"><h3>Accuracy against exposure (documents stating the fact)</h3>{chart}'
            f'<table class="small" id="curve-table"><tr><th>exposure</th><th>questions</th><th>correct</th>'
            f'<th>accuracy</th></tr>{rows}</table></div>')


def _learned(r: StudyReport) -> str:
    bars = [(f"step {b['learned_step']}" if b["learned_step"] is not None else "never", b["questions"]) for b in r.learned]
    rows = "".join(f'<tr data-step="{b["learned_step"] if b["learned_step"] is not None else ""}" '
                   f'data-questions="{b["questions"]}"><td>{escape(label)}</td><td>{b["questions"]}</td></tr>'
                   for b, (label, _) in zip(r.learned, bars))
    return (f'<div class="panel" id="learned"><h3>When the answer became the top choice (checkpoint)</h3>'
            f'{bar_chart(bars)}<table class="small" id="learned-table"><tr><th>checkpoint</th><th>questions</th></tr>'
            f'{rows}</table></div>')


def _table(ident: str, title: str, rows: list[dict], columns: list[tuple[str, str]], total: int) -> str:
    if not rows:
        return f'<h2>{escape(title)}</h2><p class="empty" id="{ident}">None.</p>'
    head = "".join(f"<th>{escape(label)}</th>" for _, label in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(key, row)}</td>" for key, _ in columns) + "</tr>" for row in rows)
    more = f'<p class="cap">{total - len(rows)} more in `wherefrom study export`.</p>' if total > len(rows) else ""
    return f'<h2>{escape(title)} ({total})</h2><table id="{ident}"><tr>{head}</tr>{body}</table>{more}'


def _cell(key: str, row: dict) -> str:
    if key in ("trace_id", "first_trace_id"):
        return _link(row[key])
    value = row[key]
    return "" if value is None else escape(str(value))


ROW_COLUMNS = [("number", "#"), ("question", "question"), ("answer", "answer"), ("expected", "expected"),
               ("exposure", "exposure"), ("top_document", "top document"), ("trace_id", "report")]


def render_study(r: StudyReport) -> str:
    """The study report as one HTML page."""
    s = r.summary
    tables = (_table("documents", "Documents that back the most answers", r.documents,
                     [("document", "document"), ("answers", "answers backed"), ("best_rank", "best rank"),
                      ("first_trace_id", "first trace")], len(r.documents))
              + _table("unsupported", "Unsupported answers", r.unsupported[:r.shown], ROW_COLUMNS, len(r.unsupported))
              + _table("misled", "Misled wrong answers", r.misled[:r.shown], ROW_COLUMNS, len(r.misled))
              + _table("failed", "Questions that failed", r.failed[:r.shown],
                       [("number", "#"), ("question", "question"), ("error", "error")], len(r.failed)))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>wherefrom · study {escape(r.name)}</title><style>{CSS}{STUDY_CSS}</style></head>
<body><main>
<header><div class="brand">where<span>from</span></div>
<div class="meta">study <b id="study-name">{escape(r.name)}</b> · model <b>{escape(r.model)}</b> · corpus
{escape(r.corpus)} · build {r.build_id} · method {escape(str(s["method"]))} · top {s["k"]} · job {s["job_id"]}
({escape(str(s["status"]))})</div></header>
{_tiles(r)}<h2>Does seeing a fact more often make the model know it?</h2>
<div class="charts">{_curve(r)}{_learned(r)}</div>
{tables}
<div class="legend">Exposure: documents of the corpus that contain the expected answer (or, without one, the traced
answer) and every capitalised name of the question. Supported: one of the top {s["k"]} returned documents contains
the answer. Misled: a wrong answer that a returned document states. Checkpoint: the first of the build's checkpoints
({", ".join(map(str, r.steps))}) from which the answer's first token stays the model's greedy next token. Each
“trace N” opens trace-N.html beside this page: write it with <code>wherefrom report N -o trace-N.html</code>.
Generated {escape(r.generated_at[:19])} UTC.</div>
</main></body></html>
"""
