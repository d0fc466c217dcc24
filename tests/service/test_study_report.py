"""The study report in a real headless Chromium: every chart present, its numbers the views'."""

import json

import pytest
from sqlalchemy import text

from db.engine import transaction
from service import jobs, studies
from service.study_report import build_study_report
from service.study_report_html import render_study
from tests.service.test_report import Elements, artifacts_dir, chromium


class Rows(Elements):
    """Elements, plus the data-* attributes of every element that has any."""

    def __init__(self):
        super().__init__()
        self.data, self.links = [], []

    def handle_starttag(self, tag, attrs):
        super().handle_starttag(tag, attrs)
        found = {k[5:]: v for k, v in attrs if k.startswith("data-")}
        if found:
            self.data.append((tag, dict(attrs).get("class"), found))
        if tag == "a":
            self.links.append(dict(attrs)["href"])


@pytest.fixture(scope="module")
def reported(indexed, tmp_path_factory):
    """A study of the tiny world's questions, each asked once with its true answer expected and
    once with another person's value given (wrong, and stated by that person's documents)."""
    qs = indexed.world.questions
    rows = [{"question": q.prompt, "expected": q.answer} for q in qs]
    rows += [{"question": q.prompt, "answer": " " + other.answer, "expected": q.answer}
             for q, other in zip(qs[:8], qs[4:12]) if other.answer != q.answer]
    rows.append({"question": "<script>alert(1)</script> was born in", "answer": " <b>1850</b>"})
    path = tmp_path_factory.mktemp("study-report") / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    jobs.submit(indexed.settings, studies.study_job(indexed.settings, path, "report-study", k=4, tasks_of=10))
    return build_study_report(indexed.settings, "report-study")


def view(settings, sql):
    with transaction(settings.database_url) as s:
        return [dict(r) for r in s.execute(text(sql), {"n": "report-study"}).mappings()]


def test_the_report_holds_the_views_rows(reported, indexed):
    curve = view(indexed.settings, "SELECT exposure, questions, correct, accuracy FROM study_exposure_v "
                                   "WHERE study = :n ORDER BY exposure")
    assert reported.curve == curve and {c["exposure"] for c in curve} == {1, 2, 4, 8}
    assert reported.misled and all(r["outcome"] == "wrong" for r in reported.misled)
    assert sum(b["questions"] for b in reported.learned) == reported.summary["traced"]
    assert reported.documents[0]["answers"] >= reported.documents[-1]["answers"] >= 1


@pytest.mark.browser
def test_the_study_report_renders_in_headless_chromium(reported, indexed, run_cli, tmp_path, monkeypatch):
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)
    page = tmp_path / "study.html"
    code, out, err = run_cli("report", "--study", "report-study", "-o", page,
                             env={"WHEREFROM_DATA_DIR": str(indexed.settings.data_dir)})
    assert code in (0, None) and page.exists(), err
    dom = chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = Rows()
    found.feed(dom.stdout)
    for chart in ("curve", "learned", "tiles", "documents", "unsupported", "misled", "failed"):
        assert chart in found.by_id, chart
    assert dom.stdout.count("<svg") == 2 and "<script>" not in dom.stdout and "src=" not in dom.stdout

    summary = view(indexed.settings, "SELECT * FROM study_summary_v WHERE study = :n")[0]
    tiles = {d["key"]: None for _, c, d in found.data if c == "tile"}
    assert set(tiles) == {"questions", "accuracy", "supported", "unsupported", "misled"}
    assert f"{summary['traced']}/{summary['questions']}" in found.by_id["tiles"]
    assert f"{summary['accuracy']:.0%}" in found.by_id["tiles"]

    curve = view(indexed.settings, "SELECT * FROM study_exposure_v WHERE study = :n ORDER BY exposure")
    points = [d for tag, _, d in found.data if tag == "tr" and "exposure" in d]
    assert [(int(p["exposure"]), int(p["questions"]), int(p["correct"]), float(p["accuracy"])) for p in points] == \
        [(c["exposure"], c["questions"], c["correct"], pytest.approx(c["accuracy"])) for c in curve]
    assert found.by_id["curve"].count("%") >= len(curve)  # one label per point, drawn in the SVG

    learned = view(indexed.settings, "SELECT learned_step, count(*) AS n FROM study_results_v "
                                     "WHERE study = :n AND status = 'done' GROUP BY learned_step")
    bars = {d["label"]: int(d["questions"]) for tag, _, d in found.data if tag == "rect"}
    assert bars == {(f"step {r['learned_step']}" if r["learned_step"] is not None else "never"): r["n"] for r in learned}

    misled = view(indexed.settings, "SELECT trace_id FROM study_results_v WHERE study = :n AND misled")
    assert summary["misled"] == len(misled) > 0
    for trace_id in [r["trace_id"] for r in misled]:
        assert f"trace-{trace_id}.html" in found.links
    failed = view(indexed.settings, "SELECT error FROM study_results_v WHERE study = :n AND status = 'failed'")
    assert all(r["error"][:40] in found.by_id["failed"] for r in failed)
    (artifacts_dir() / "study-report.html").write_text(page.read_text())


def test_everything_from_the_database_is_escaped(reported):
    page = render_study(reported)
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "<b>1850" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
