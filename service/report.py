"""Everything the report of one trace shows, computed from SQL rows and the trace's build.

`build_report` returns a `Report` of plain data (the CLI prints it as JSON, `report_html` draws it).
It recomputes the query gradient of the stored answer, so it needs the build's checkpoints
unchanged: a changed model is refused as in `trace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from db import repo
from db.engine import transaction
from service.catalog import checkpoints_by_step
from service.settings import Settings
from service.tracer_cache import build_tracer, model_lock
from service.views import iso_utc


@dataclass
class Card:
    """One explained document."""

    rank: int
    external_id: str
    position: int  # row of the build's stores
    text: str  # the chunk the build indexed
    score: float
    scores: dict[str, float]
    answer_spans: list[tuple[int, int]]  # where the answer occurs in `text`
    tokens: list[tuple[int, int, float]]  # (start, end) in `text`, share of the gradient score
    cosines: list[float]  # gradient cosine with the query, per checkpoint
    tail_patch: float | None  # change in log p(answer) after one step on this document
    span: tuple[int, int] = (0, 0)  # where `text` lies in the document, in characters


@dataclass
class Report:
    trace_id: int
    question: str
    answer: str
    answer_generated: bool
    model: str
    method: str
    build_id: int
    created_at: str
    steps: list[int]  # checkpoint steps of the build
    answer_logprobs: list[float]  # log p(answer | question) per checkpoint
    words: list[tuple[str, float]] | None  # question words and how much the answer depends on them
    exposure: int  # documents stating the fact (near-duplicates and paraphrases)
    exposure_threshold: float
    cards: list[Card]
    more: list[dict] = field(default_factory=list)  # ranked hits beyond the explained ones
    tail_patch_lr: float | None = None
    tail_patch_step: int | None = None  # the checkpoint the tail-patch steps from
    generated_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def supported(self) -> bool:
        """Some explained document states the answer (the rule of `attribution.verify.supported`)."""
        return any(c.answer_spans for c in self.cards)


def _load(settings: Settings, trace_id: int):
    with transaction(settings.database_url) as s:
        t = repo.get_trace(s, trace_id)
        build = repo.get_build(s, t.build_id)
        model = repo.get_model(s, t.model_id)
        entries = repo.entries_at(s, t.build_id, [r.position for r in t.results])
        rows = [(r, entries[r.position][0], entries[r.position][1]) for r in t.results]
        return t, str(settings.resolve_store(build.store_path)), model.name, checkpoints_by_step(model), rows


def build_report(settings: Settings, trace_id: int, top: int = 5, tail_patch: bool = True) -> Report:
    """Explain the top `top` documents of a stored trace (token shares, checkpoints, tail-patch)."""
    from attribution import explain
    from attribution.verify import tail_patcher

    t, store_path, model_name, by_step, rows = _load(settings, trace_id)
    with model_lock:
        tracer = build_tracer(store_path, by_step)
        q_grad = tracer.query_gradient(t.question, t.answer)
        shown = rows[:top]
        cosines = explain.checkpoint_cosines(tracer, q_grad, [r.position for r, _, _ in shown])
        patcher = tail_patcher(tracer) if tail_patch and shown else None
        cards = [_card(tracer, q_grad, t, r, e, d, cos, patcher) for (r, e, d), cos in zip(shown, cosines)]
        logprobs = explain.answer_logprobs(tracer, t.question, t.answer)
        words = explain.word_attribution(tracer, t.question, t.answer)
        stating = next((c for c in cards if c.answer_spans), None)
        exposed = explain.exposure(tracer, stating.position, t.question, t.answer, _text_of(settings, t.build_id)) \
            if stating else explain.Exposure(0, explain.EXPOSURE_THRESHOLD, [], [])
        steps = [c.step for c in tracer.ckpts]
    more = [_more(r, d.external_id, d.text, (e.char_start, e.char_end), t.answer) for r, e, d in rows[top:]]
    return Report(t.id, t.question, t.answer, t.answer_generated, model_name, t.method, t.build_id,
                  iso_utc(t.created_at), steps, logprobs, words, exposed.count, exposed.threshold, cards, more,
                  patcher.lr if patcher else None, patcher.step if patcher else None)


def _more(result, external_id: str, document: str, span: tuple[int, int], answer: str) -> dict:
    from attribution.verify import lexical_spans
    text = document[span[0]:span[1]]
    return {"rank": result.rank, "external_id": external_id, "score": result.score, "scores": result.scores,
            "text": text, "span": span, "lexical": bool(lexical_spans(text, answer))}


def _text_of(settings: Settings, build_id: int):
    def text_of(positions: list[int]) -> dict[int, str]:
        with transaction(settings.database_url) as s:
            return repo.texts_at(s, build_id, positions)
    return text_of


def _card(tracer, q_grad, t, result, entry, doc, cosines, patcher) -> Card:
    from attribution import explain
    from attribution.verify import lexical_spans

    _, tokenizer, _ = tracer.featurizer(len(tracer.ckpts) - 1)
    toks = explain.document_tokens(tokenizer, doc.text, entry.char_start, entry.char_end,
                                   tracer.config.append_eos)
    shares = explain.token_contributions(tracer, q_grad, toks.ids)
    start = entry.char_start
    text = doc.text[start:entry.char_end]
    delta = patcher.deltas(t.question, t.answer, [toks.ids])[0] if patcher is not None else None
    return Card(result.rank, doc.external_id, result.position, text, result.score, dict(result.scores),
                lexical_spans(text, t.answer), [(a - start, b - start, float(w)) for (a, b), w in zip(toks.spans, shares)],
                [float(c) for c in cosines], delta, (entry.char_start, entry.char_end))
