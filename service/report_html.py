"""The HTML report of a trace: one self-contained page (inline CSS and SVG, no script, no fetch).

Every value from the database or the model goes through `html.escape`; the page works offline
and can be mailed as one file.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from html import escape

from service.report import Card, Report

METHODS = ("grad", "dense", "bm25")
METHOD_LABEL = {"grad": "gradient", "dense": "semantic", "bm25": "BM25"}
SERIES = ("#7c3aed", "#0891b2", "#db2777", "#65a30d", "#ea580c")
CSS = """
*{box-sizing:border-box}body{margin:0;background:#f4f3ef;color:#1c1917;font:15px/1.5 system-ui,-apple-system,
"Segoe UI",Roboto,sans-serif}main{max-width:1040px;margin:0 auto;padding:28px 24px 48px}
header{display:flex;justify-content:space-between;align-items:baseline;gap:16px;flex-wrap:wrap}
.brand{font-weight:700;font-size:20px;letter-spacing:-.01em}.brand span{color:#7c3aed}
.meta{color:#78716c;font-size:13px}.qa{background:#fff;border-radius:12px;padding:18px 22px;margin:16px 0;
box-shadow:0 1px 2px #0000000f}.label{font-size:11px;font-weight:700;text-transform:uppercase;
letter-spacing:.08em;color:#a8a29e;margin-bottom:4px}.question{font-size:19px;display:flex;flex-wrap:wrap;gap:4px 2px}
.word{display:inline-flex;flex-direction:column;align-items:center;border-radius:6px;padding:1px 5px}
.word small{font-size:10px;color:#57534e;font-variant-numeric:tabular-nums}.answer{font-size:22px;font-weight:600;
color:#15803d;margin-top:10px}.answer em{font-size:13px;font-weight:400;color:#78716c;font-style:normal}
.banner{border-radius:12px;padding:14px 20px;margin:16px 0;font-weight:500}.banner.ok{background:#dcfce7;
color:#14532d;border:1px solid #86efac}.banner.bad{background:#fee2e2;color:#7f1d1d;border:1px solid #fca5a5}
.tiles{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin:16px 0}.tile{background:#fff;
border-radius:12px;padding:12px 16px;box-shadow:0 1px 2px #0000000f}.tile b{display:block;font-size:22px;
font-variant-numeric:tabular-nums}.tile span{font-size:12px;color:#78716c}.charts{display:grid;
grid-template-columns:1fr 1fr;gap:12px}.panel{background:#fff;border-radius:12px;padding:14px 16px;
box-shadow:0 1px 2px #0000000f}h2{font-size:15px;margin:26px 0 10px}.panel h3{font-size:13px;margin:0 0 6px;
color:#44403c}.doc{background:#fff;border-radius:12px;padding:14px 18px;margin:12px 0;box-shadow:0 1px 2px #0000000f;
display:grid;grid-template-columns:1fr 250px;gap:8px 22px}.doc-head{grid-column:1/3;display:flex;gap:10px;
align-items:center;flex-wrap:wrap}.rank{background:#1c1917;color:#fff;border-radius:999px;width:26px;height:26px;
display:inline-flex;align-items:center;justify-content:center;font-size:13px;font-weight:700}.docid{font-family:
ui-monospace,Menlo,monospace;font-size:13px}.badge{font-size:12px;border-radius:999px;padding:2px 10px;font-weight:600}
.badge.yes{background:#dcfce7;color:#166534}.badge.no{background:#f5f5f4;color:#78716c}.badge.up{background:#ede9fe;
color:#5b21b6}.badge.down{background:#ffedd5;color:#9a3412}.text{font-size:15px;line-height:1.9;word-wrap:break-word}
.tok{border-radius:3px}.text mark{background:none;color:inherit;font-weight:700;border-bottom:3px solid #16a34a}
.eos{font-size:10px;color:#57534e;border:1px solid #d6d3d1;border-radius:4px;padding:0 3px;margin-left:3px}
.bars{font-size:12px}.bar{display:grid;grid-template-columns:64px 1fr 52px;align-items:center;gap:6px;margin:3px 0}
.track{background:#f5f5f4;border-radius:4px;height:9px;overflow:hidden}.fill{height:100%;border-radius:4px}
.num{text-align:right;font-variant-numeric:tabular-nums;color:#57534e}.spark{margin-top:6px;color:#78716c;white-space:nowrap}
table{width:100%;border-collapse:collapse;font-size:13px;background:#fff;border-radius:12px;overflow:hidden}
td,th{padding:7px 10px;text-align:left;border-bottom:1px solid #f0efeb}th{color:#78716c;font-weight:600}
.legend{font-size:12px;color:#78716c;margin-top:28px;line-height:1.7}.sw{display:inline-block;width:26px;height:11px;
border-radius:3px;vertical-align:middle;margin:0 4px}
"""
FILL = {"grad": "#7c3aed", "dense": "#0891b2", "bm25": "#ca8a04"}


def _heat(w: float, scale: float) -> str:
    """Amber for tokens that push the document's score up, blue for those that pull it down."""
    a = min(1.0, abs(w) / scale) * 0.85 if scale > 0 else 0.0
    return f"rgba(245,158,11,{a:.2f})" if w >= 0 else f"rgba(59,130,246,{a:.2f})"


def highlighted(text: str, tokens: list[tuple[int, int, float]], spans: list[tuple[int, int]]) -> str:
    """The text cut at token and answer-span boundaries; tokens coloured, each answer span one <mark>."""
    scale = max((abs(w) for _, _, w in tokens), default=0.0)
    cuts = sorted({0, len(text), *(x for a, b, _ in tokens for x in (a, b)), *(x for s in spans for x in s)})
    starts = [a for a, _, _ in tokens]
    out, marked = [], False
    for x, y in zip(cuts, cuts[1:]):
        if x >= y or x >= len(text):
            continue
        inside = any(a <= x and y <= b for a, b in spans)
        if inside != marked:
            out.append("<mark>" if inside else "</mark>")
            marked = inside
        piece = escape(text[x:y])
        i = bisect_right(starts, x) - 1
        if i >= 0 and tokens[i][0] <= x and y <= tokens[i][1]:
            a, b, w = tokens[i]
            piece = (f'<span class="tok" style="background:{_heat(w, scale)}" '
                     f'title="{escape(text[a:b])}: {w:+.4f}">{piece}</span>')
        out.append(piece)
    if marked:
        out.append("</mark>")
    for a, b, w in tokens:  # end-of-document tokens have no characters of their own
        if a == b:
            out.append(f'<span class="eos" style="background:{_heat(w, scale)}" title="eos: {w:+.4f}">eos</span>')
    return "".join(out)


def line_chart(xs: list, series: list[tuple[str, list[float], str]], lo: float, hi: float,
               width: int = 460, height: int = 170, fmt: str = "{:.2f}") -> str:
    """A small SVG line chart: one polyline per (label, values, colour) over the x labels."""
    left, right, top, bottom = 44, 12, 10, 26
    w, h = width - left - right, height - top - bottom
    span = (hi - lo) or 1.0
    px = [left + (w * i / max(1, len(xs) - 1) if len(xs) > 1 else w / 2) for i in range(len(xs))]

    def py(v: float) -> float:
        return top + h * (1 - (min(max(v, lo), hi) - lo) / span)

    parts = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" xmlns="http://www.w3.org/2000/svg">']
    for tick in (lo, (lo + hi) / 2, hi):
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#e7e5e4"/>'
                     f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" font-size="10" text-anchor="end" '
                     f'fill="#78716c">{fmt.format(tick)}</text>')
    for x, label in zip(px, xs):
        parts.append(f'<text x="{x:.1f}" y="{height - 8}" font-size="10" text-anchor="middle" fill="#78716c">'
                     f'{escape(str(label))}</text>')
    for label, values, colour in series:
        points = " ".join(f"{x:.1f},{py(v):.1f}" for x, v in zip(px, values))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2.2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{py(v):.1f}" r="3.2" fill="{colour}"><title>{escape(label)}: '
                  f'{fmt.format(v)}</title></circle>' for x, v in zip(px, values)]
    parts.append("</svg>")
    return "".join(parts)


def _question(report: Report) -> str:
    if not report.words:
        return f'<div class="question">{escape(report.question)}</div>'
    scale = max((abs(s) for _, s in report.words), default=0.0) or 1.0
    chips = []
    for word, s in report.words:
        a = min(1.0, abs(s) / scale) * 0.75
        bg = f"rgba(22,163,74,{a:.2f})" if s >= 0 else f"rgba(220,38,38,{a:.2f})"
        chips.append(f'<span class="word" style="background:{bg}" title="removing it changes log p(answer) by '
                     f'{-s:+.2f}">{escape(word.strip())}<small>{s:+.2f}</small></span>')
    return f'<div class="question">{"".join(chips)}</div>'


def _verb(n: int) -> str:
    return "states" if n == 1 else "state"


def _banner(report: Report) -> str:
    stating = [c for c in report.cards if c.answer_spans]
    if not stating:
        return (f'<div class="banner bad" id="verdict">Unsupported: none of the top {len(report.cards)} documents '
                f'states “{escape(report.answer.strip())}”. The model may have inferred, memorised from elsewhere, '
                f'or made it up — treat this answer with care.</div>')
    plural = "" if report.exposure == 1 else "s"
    return (f'<div class="banner ok" id="verdict">Backed by the training data: {len(stating)} of the top '
            f'{len(report.cards)} documents {_verb(len(stating))} “{escape(report.answer.strip())}”, and '
            f'{report.exposure} document{plural} {_verb(report.exposure)} the fact in the whole corpus.</div>')


def _learned_at(report: Report) -> str:
    probs = [math.exp(lp) for lp in report.answer_logprobs]
    first = next((s for s, p in zip(report.steps, probs) if p >= 0.5), None)
    return f"step {first}" if first is not None else "not yet"


def _tiles(report: Report) -> str:
    patched = [c.tail_patch for c in report.cards if c.tail_patch is not None]
    best = f"{max(patched):+.2f}" if patched else "—"
    final = math.exp(report.answer_logprobs[-1]) if report.answer_logprobs else 0.0
    tiles = [(report.exposure, "documents state the fact (exposure)"),
             (f"{final:.0%}", "p(answer) at the last checkpoint"),
             (_learned_at(report), "first checkpoint with p(answer) ≥ 50%"),
             (best, "largest tail-patch change in log p (nats)")]
    return '<div class="tiles">' + "".join(f'<div class="tile"><b>{escape(str(v))}</b><span>{escape(t)}</span></div>'
                                           for v, t in tiles) + "</div>"


def _charts(report: Report) -> str:
    probs = [math.exp(lp) for lp in report.answer_logprobs]
    learned = line_chart(report.steps, [("p(answer)", probs, "#15803d")], 0.0, 1.0, fmt="{:.0%}")
    series = [(f"#{c.rank} {c.external_id}", c.cosines, SERIES[i % len(SERIES)]) for i, c in enumerate(report.cards)]
    values = [v for _, vs, _ in series for v in vs] or [0.0]
    lo, hi = min(0.0, min(values)), max(0.1, max(values))
    influence = line_chart(report.steps, series, lo, hi)
    legend = " ".join(f'<span class="sw" style="background:{col}"></span>{escape(lab)}' for lab, _, col in series)
    return (f'<h2>When did the model learn it?</h2><div class="charts" id="checkpoints">'
            f'<div class="panel"><h3>Probability of the answer, per checkpoint step</h3>{learned}</div>'
            f'<div class="panel"><h3>Gradient cosine with the answer, per checkpoint</h3>{influence}'
            f'<div class="legend" style="margin-top:4px">{legend}</div></div></div>')


def _bars(card: Card, maxima: dict[str, float]) -> str:
    rows = []
    for m in METHODS:
        v = card.scores.get(m, 0.0)
        width = 100 * max(0.0, v) / maxima[m] if maxima[m] > 0 else 0
        rows.append(f'<div class="bar" data-method="{m}"><span>{METHOD_LABEL[m]}</span><div class="track">'
                    f'<div class="fill" style="width:{width:.0f}%;background:{FILL[m]}"></div></div>'
                    f'<span class="num">{v:.3f}</span></div>')
    return "".join(rows)


def _card(card: Card, maxima: dict[str, float], steps: list[int], colour: str) -> str:
    lex = ('<span class="badge yes">✓ states the answer</span>' if card.answer_spans
           else '<span class="badge no">answer not in text</span>')
    patch = ""
    if card.tail_patch is not None:
        kind = "up" if card.tail_patch > 0 else "down"
        patch = (f'<span class="badge {kind}" title="change in log p(answer) after one training step on this '
                 f'document">tail-patch {card.tail_patch:+.2f} nats</span>')
    by_step = " · ".join(f'<span title="step {s}">{c:.2f}</span>' for s, c in zip(steps, card.cosines))
    return (f'<section class="doc" data-rank="{card.rank}"><div class="doc-head"><span class="rank">{card.rank}</span>'
            f'<span class="docid">{escape(card.external_id)}</span>{lex}{patch}'
            f'<span class="meta">chars {card.span[0]}–{card.span[1]} · score {card.score:.2f}</span></div>'
            f'<div class="text">{highlighted(card.text, card.tokens, card.answer_spans)}</div>'
            f'<div class="bars">{_bars(card, maxima)}<div class="spark" title="gradient cosine with the answer at each '
            f'checkpoint (the line in the chart above)"><span class="sw" style="background:{colour}"></span>'
            f'by checkpoint: {by_step}</div></div></section>')


def _more(report: Report) -> str:
    if not report.more:
        return ""
    rows = "".join(f'<tr><td>{h["rank"]}</td><td class="docid">{escape(h["external_id"])}</td><td>{h["score"]:.2f}</td>'
                   + "".join(f'<td>{h["scores"].get(m, 0.0):.3f}</td>' for m in METHODS)
                   + f'<td>{"✓" if h["lexical"] else ""}</td><td>{escape(h["text"][:90])}</td></tr>'
                   for h in report.more)
    head = "".join(f"<th>{METHOD_LABEL[m]}</th>" for m in METHODS)
    return (f'<h2>Further documents</h2><table id="more"><tr><th>#</th><th>document</th><th>score</th>{head}'
            f"<th>states it</th><th>text</th></tr>{rows}</table>")


def render(report: Report) -> str:
    """The report as one HTML page."""
    all_scores = [c.scores for c in report.cards] + [h["scores"] for h in report.more]
    maxima = {m: max((s.get(m, 0.0) for s in all_scores), default=0.0) for m in METHODS}
    cards = "".join(_card(c, maxima, report.steps, SERIES[i % len(SERIES)]) for i, c in enumerate(report.cards))
    generated = " (the model's own answer)" if report.answer_generated else " (given)"
    patch_note = (f"one Adam step on the document alone (learning rate {report.tail_patch_lr:.2g}) from checkpoint "
                  f"step {report.tail_patch_step}, then the change in log p(answer)" if report.tail_patch_lr else "not run")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>wherefrom · trace {report.trace_id}</title><style>{CSS}</style></head>
<body><main>
<header><div class="brand">where<span>from</span></div>
<div class="meta">trace {report.trace_id} · model <b>{escape(report.model)}</b> · build {report.build_id} ·
method {escape(report.method)} · {escape(report.created_at[:19].replace("T", " "))} UTC</div></header>
<div class="qa"><div class="label">Question · words coloured by how much the answer depends on them</div>
{_question(report)}<div class="label" style="margin-top:14px">Answer</div>
<div class="answer" id="answer">{escape(report.answer.strip())}<em>{generated}</em></div></div>
{_banner(report)}{_tiles(report)}{_charts(report)}
<h2>Documents that back the answer</h2>{cards}{_more(report)}
<div class="legend">Token colours: <span class="sw" style="background:rgba(245,158,11,.8)"></span>tokens whose
prediction, in training on this document, aligns with the answer's gradient (they raise the document's gradient
score), <span class="sw" style="background:rgba(59,130,246,.8)"></span>tokens that pull against it; the shares add up
to the gradient score. <mark style="background:none;font-weight:700;border-bottom:3px solid #16a34a">Underlined</mark>: the
answer as it occurs in the document. Score bars: each method's raw score, scaled to the best document of this trace.
Exposure: neighbours of the first stating document in the semantic index with cosine ≥ {report.exposure_threshold:.2f}
that contain the answer and every name of the question. Tail-patch: {escape(patch_note)}. Generated {escape(report.generated_at[:19])} UTC.</div>
</main></body></html>
"""
