"""Operations hardening: no password of a broker or database URL in any output, log or SQL row; a
database lost mid-command is one line; a running job nobody works on is shown stalled."""

import json
import logging
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url

from bench.cluster import PG_ADMIN, REDIS, Workers, forget_queue, wait_job
from db import job_repo
from db.admin import create_database, drop_database
from db.engine import transaction
from db.models import Job, utcnow
from service import jobs
from service.job_params import TraceJob
from service.settings import Settings

SECRET = "s3cret"
DOWN_BROKER = f"redis://:{SECRET}@127.0.0.1:1/0"


@pytest.fixture
def secret_db():
    """A fresh PostgreSQL database reached by a URL with a password (trust auth ignores it)."""
    name = f"wherefrom_test_{uuid.uuid4().hex[:10]}"
    url = make_url(create_database(PG_ADMIN, name)).set(password=SECRET).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        drop_database(PG_ADMIN, name)


def sql_text(url: str) -> str:
    """Every row of the jobs table, as text: what an analyst could SELECT."""
    with transaction(url) as s:
        return repr(s.execute(select(Job.__table__)).all())


@pytest.fixture
def cli(run_cli, secret_db, tmp_path, monkeypatch):
    monkeypatch.setenv("WHEREFROM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WHEREFROM_DATABASE_URL", secret_db)
    return run_cli


def test_no_password_in_async_trace_and_worker_check_output_or_jobs(cli, secret_db, tmp_path):
    code, out, err = cli("trace", "Who?", "--async", env={"WHEREFROM_BROKER_URL": DOWN_BROKER})
    assert code == 2 and err.count("\n") == 1 and "cannot reach the broker at redis://:***@127.0.0.1:1/0" in err
    code2, out2, err2 = cli("worker", "--check")
    assert code2 == 2 and "redis://:***@127.0.0.1:1/0" in err2
    [job] = jobs.list_jobs(Settings(data_dir=tmp_path, database_url=secret_db))
    assert job.status == "failed" and "redis://:***@" in job.error
    assert SECRET not in out + err + out2 + err2 + sql_text(secret_db)


def test_fail_job_redacts_whatever_it_is_given(secret_db):
    with transaction(secret_db) as s:
        job_id = job_repo.create_job(s, "trace", {}).id
        job_repo.fail_job(s, job_id, f"internal error (psycopg: postgresql://u:{SECRET}@db/x and redis://:p@ss:{SECRET}@r/0)")
    with transaction(secret_db) as s:
        assert job_repo.get_job(s, job_id).error == \
            "internal error (psycopg: postgresql://u:***@db/x and redis://:***@r/0)"


def test_logs_and_settings_reprs_hide_passwords(caplog):
    caplog.set_level(logging.INFO)
    try:
        raise RuntimeError(f"lost {DOWN_BROKER}")
    except RuntimeError:
        jobs.log.exception("job %s failed at %s", 7, f"postgresql://u:{SECRET}@db/x")
    settings = Settings(data_dir="/d", database_url=f"postgresql://u:{SECRET}@db/x", broker_url=DOWN_BROKER)
    assert "job 7 failed at postgresql://u:***@db/x" in caplog.text and "lost redis://:***@127.0.0.1:1/0" in caplog.text
    assert "database_url='postgresql://u:***@db/x'" in repr(settings)
    assert SECRET not in caplog.text + repr(settings)


def test_a_real_worker_logs_and_stores_no_password(secret_db, tmp_path, run_cli, monkeypatch):
    broker = REDIS.replace("redis://", f"redis://:{SECRET}@")  # a Redis without requirepass ignores it
    settings = Settings(data_dir=tmp_path / "data", database_url=secret_db, broker_url=broker,
                        queue=f"wherefrom-test-{uuid.uuid4().hex[:8]}")
    (tmp_path / "logs").mkdir()
    workers = Workers(settings, tmp_path / "logs", threads=1)
    try:
        workers.start("a")
        job_id = jobs.submit(settings, TraceJob("Who?"))  # no build: the worker fails it
        job = wait_job(settings, job_id, workers)
        for name, value in [("WHEREFROM_DATA_DIR", str(settings.data_dir)), ("WHEREFROM_DATABASE_URL", secret_db),
                            ("WHEREFROM_BROKER_URL", broker), ("WHEREFROM_QUEUE", settings.queue)]:
            monkeypatch.setenv(name, value)
        code, out, err = run_cli("worker", "--check")
    finally:
        workers.stop()
        forget_queue(REDIS, settings.queue)
    assert job.status == "failed" and "no index build" in job.error
    assert code == 0 and out.startswith("broker redis://:***@") and "reachable" in out, err
    log = workers.log("a").read_text()
    assert "ready." in log and f"job {job_id} failed" in log
    assert SECRET not in log + out + err + sql_text(secret_db)


def test_a_database_lost_mid_command_is_one_line(cli, secret_db):
    assert cli("jobs")[0] == 0  # the engine is made and kept: the next command finds the database gone
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE "{make_url(secret_db).database}" WITH (FORCE)'))
    admin.dispose()
    code, out, err = cli("jobs")
    assert code == 2 and err.count("\n") == 1 and SECRET not in out + err
    assert err.startswith("error: the database stopped answering (") and "fix WHEREFROM_DATABASE_URL" in err


def test_a_running_job_nobody_updates_is_shown_stalled(settings, run_cli, monkeypatch):
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import ApiSettings
    with transaction(settings.database_url) as s:
        quiet, live = (job_repo.create_job(s, "trace", {"question": "Who?"}).id for _ in range(2))
        for job_id in (quiet, live):
            job_repo.start_job(s, job_id, "w1")
    with transaction(settings.database_url) as s:  # quiet: its worker died an hour and a second ago
        s.execute(update(Job).where(Job.id == quiet)
                  .values(updated_at=utcnow() - timedelta(seconds=settings.visibility_timeout + 1)))
    before = sql_text(settings.database_url)
    monkeypatch.setenv("WHEREFROM_DATA_DIR", str(settings.data_dir))
    code, out, err = run_cli("jobs", "--json")
    shown = {j["id"]: j for j in json.loads(out)}
    assert code == 0 and (shown[quiet]["status"], shown[live]["status"]) == ("stalled", "running"), err
    assert f"`wherefrom jobs resume {quiet}`" in shown[quiet]["stage"] and "(at: queued)" in shown[quiet]["stage"]
    assert [j["id"] for j in json.loads(run_cli("jobs", "--status", "stalled", "--json")[1])] == [quiet]
    assert [j["id"] for j in json.loads(run_cli("jobs", "--status", "running", "--json")[1])] == [live]
    token = "ops-test-" + "t" * 20
    with TestClient(create_app(settings, ApiSettings(token=token)), headers={"Authorization": f"Bearer {token}"}) as api:
        r = api.get(f"/jobs/{quiet}")
    assert r.status_code == 200 and r.json()["status"] == "stalled" and r.json()["stage"] == shown[quiet]["stage"]
    assert sql_text(settings.database_url) == before  # showing it changes nothing
