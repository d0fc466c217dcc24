"""The report of a trace: what it computes (on the tiny world), and how it looks in a real Chromium."""

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from service import tracer_cache, traces
from service.report import build_report
from service.report_html import render

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def fact(world, n):
    return next(q for q in world.questions if q.n_paraphrases == n)


@pytest.fixture(scope="module")
def single(indexed):
    """The report of a fact stated in one document, traced with its true answer."""
    q = fact(indexed.world, 1)
    out = traces.trace(indexed.settings, q.prompt, answer=" " + q.answer, k=8)
    return q, out, build_report(indexed.settings, out.trace_id, top=4)


def test_token_shares_add_up_to_the_gradient_score(single, indexed):
    _, _, report = single
    target = traces.resolve_build(indexed.settings)
    weights = tracer_cache.build_tracer(target.store_path, target.by_step).weights
    for card in report.cards:
        assert sum(w for _, _, w in card.tokens) == pytest.approx(card.scores["grad"], abs=5e-3), card.external_id
        # per-checkpoint cosines, weighted as the build weighted them, give the same score
        assert sum(w * w * c for w, c in zip(weights, card.cosines)) == pytest.approx(card.scores["grad"], abs=5e-3)
    assert len(report.cards) == 4 and [c.rank for c in report.cards] == [1, 2, 3, 4]
    assert len(report.more) == 4 and report.more[0]["rank"] == 5


def test_the_true_source_states_the_answer_and_training_on_it_raises_it(single):
    q, out, report = single
    top = report.cards[0]
    assert top.external_id in q.source_ids
    assert [top.text[a:b] for a, b in top.answer_spans] == [q.answer]
    assert report.supported and report.exposure == 1
    others = [c.tail_patch for c in report.cards[1:] if not c.answer_spans]
    assert top.tail_patch > 0 and all(top.tail_patch > d for d in others), (top.tail_patch, others)


def test_the_answer_tokens_carry_the_alignment(single):
    """Within the true source, the answer's own tokens carry more of the score than an average token."""
    q, _, report = single
    top = report.cards[0]
    (a, b), = top.answer_spans
    inside = [w for s, e, w in top.tokens if s < b and e > a]
    mean_all = sum(w for *_, w in top.tokens) / len(top.tokens)
    assert inside and sum(inside) / len(inside) > mean_all > 0


def test_the_answer_depends_on_the_person_named_in_the_question(single):
    """Removing either part of the person's name from the question lowers the answer's probability."""
    q, _, report = single
    assert "".join(w for w, _ in report.words) == q.prompt
    words = {w.strip(): s for w, s in report.words}
    assert all(words[n] > 0 for n in q.person.split())


def test_exposure_counts_the_documents_that_state_a_fact(indexed):
    for n in (2, 4):
        q = fact(indexed.world, n)
        out = traces.trace(indexed.settings, q.prompt, answer=" " + q.answer, k=n + 2)
        report = build_report(indexed.settings, out.trace_id, top=2, tail_patch=False)
        assert report.exposure == n, (q.prompt, report.exposure)


def test_an_answer_no_document_states_is_flagged_unsupported(indexed):
    q = fact(indexed.world, 1)
    out = traces.trace(indexed.settings, q.prompt, answer=" Zanzibar", k=3)
    report = build_report(indexed.settings, out.trace_id, top=3, tail_patch=False)
    assert not report.supported and report.exposure == 0
    assert all(c.tail_patch is None for c in report.cards)
    page = render(report)
    assert 'class="banner bad" id="verdict">Unsupported' in page and "Zanzibar" in page


def test_everything_from_the_database_is_escaped(indexed):
    q = fact(indexed.world, 1)
    out = traces.trace(indexed.settings, q.prompt, answer=" <script>alert(1)</script>", k=1)
    page = render(build_report(indexed.settings, out.trace_id, top=1, tail_patch=False))
    assert "<script>" not in page and "&lt;script&gt;" in page


class Elements(HTMLParser):
    """Text of elements with an id, count of elements per class."""

    def __init__(self):
        super().__init__()
        self.by_id, self.classes, self.marks, self._open = {}, {}, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for c in (attrs.get("class") or "").split():
            self.classes[c] = self.classes.get(c, 0) + 1
        self._open.append((tag, attrs.get("id")))
        if tag == "mark":
            self.marks.append("")

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for tag, ident in self._open:
            if ident:
                self.by_id[ident] = self.by_id.get(ident, "") + data
        if any(t == "mark" for t, _ in self._open):
            self.marks[-1] += data


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("WHEREFROM_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def chromium(*args, profile: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: run `bash scripts/system-deps`")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.browser
def test_report_renders_in_headless_chromium(indexed, tmp_path, capsys, monkeypatch):
    """The CLI writes the report of a demo-world question; Chromium renders it; we keep a screenshot."""
    from service.cli import main

    q = fact(indexed.world, 2)
    out = traces.trace(indexed.settings, q.prompt, k=6)
    page = tmp_path / "report.html"
    monkeypatch.setenv("WHEREFROM_DATA_DIR", str(indexed.settings.data_dir))
    monkeypatch.setattr(sys, "argv", ["wherefrom", "report", str(out.trace_id), "-o", str(page), "--top", "3"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None) and page.exists()

    dom = chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = Elements()
    found.feed(dom.stdout)
    assert q.prompt.split()[0] in found.by_id["answer"] or out.answer.strip() in found.by_id["answer"]
    assert found.by_id["verdict"].startswith("Backed by the training data")
    assert found.classes["doc"] == 3 and found.classes["bar"] == 9 and found.classes["word"] == len(q.prompt.split())
    assert found.classes["tok"] > 10 and "checkpoints" in found.by_id and "more" in found.by_id
    assert q.answer in found.marks
    assert "src=" not in dom.stdout and "<link" not in dom.stdout  # self-contained

    shot = artifacts_dir() / "report.png"
    shot.unlink(missing_ok=True)
    run = chromium(f"--screenshot={shot}", "--window-size=1180,1800", page.as_uri(), profile=tmp_path / "profile-png")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    shutil.copy(page, artifacts_dir() / "report.html")
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1800, 1180)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # drawn, not a blank page
    with capsys.disabled():
        print(f"\nreport screenshot: {shot}")
