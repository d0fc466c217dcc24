"""Jobs and shards in SQL, the analyst views, and migrations both ways, on SQLite and PostgreSQL."""

import pytest
from sqlalchemy import create_engine, inspect, text

from db import job_repo
from db.engine import downgrade, get_engine, transaction, upgrade
from db.errors import Conflict, JobFinished, NotFound


def new_job(url, kind="index", **params):
    with transaction(url) as s:
        return job_repo.create_job(s, kind, {"corpus": "c", "model": "m", **params}).id


def test_a_job_runs_fails_once_resumes_and_finishes_once(db_url):
    job_id = new_job(db_url)
    with transaction(db_url) as s:
        job = job_repo.start_job(s, job_id, "w1")
        assert (job.status, job.attempts, job.worker) == ("running", 1, "w1")
    with transaction(db_url) as s:
        assert job_repo.fail_job(s, job_id, "first error")
        assert not job_repo.fail_job(s, job_id, "second error")  # the first error wins
    with transaction(db_url) as s:
        assert job_repo.get_job(s, job_id).error == "first error"
        with pytest.raises(JobFinished):
            job_repo.start_job(s, job_id, "w2")
    with transaction(db_url) as s:
        job_repo.requeue_job(s, job_id)
    with transaction(db_url) as s:
        job = job_repo.start_job(s, job_id, "w2")
        assert (job.status, job.attempts, job.error) == ("running", 2, None)
        job_repo.finish_job(s, job, {"build_id": 1})
    with transaction(db_url) as s:
        with pytest.raises(JobFinished):
            job_repo.lock_open_job(s, job_id)
        with pytest.raises(Conflict, match="already succeeded"):
            job_repo.requeue_job(s, job_id)
        assert not job_repo.fail_job(s, job_id, "late failure of a duplicate run")
    with transaction(db_url) as s:
        job = job_repo.get_job(s, job_id)
        assert (job.status, job.result, job.progress, job.error) == ("succeeded", {"build_id": 1}, 1.0, None)
        with pytest.raises(NotFound, match="wherefrom jobs"):
            job_repo.get_job(s, 10**9)


def test_shards_track_attempts_progress_and_the_build_status_view(db_url):
    job_id = new_job(db_url, corpus="books")
    with transaction(db_url) as s:
        job_repo.start_job(s, job_id, "w1")
        job_repo.ensure_shards(s, job_id, [(0, 10), (10, 20)])
        job_repo.ensure_shards(s, job_id, [(0, 10), (10, 20)])  # a second plan run adds nothing
    with transaction(db_url) as s:
        job_repo.start_shard(s, job_id, 0, "w1")
    with transaction(db_url) as s:
        job_repo.start_shard(s, job_id, 0, "w2")  # w1 died; w2 took the redelivered task
        job_repo.shard_progress(s, job_id, 1, 0.5)
    with transaction(db_url) as s:
        assert job_repo.finish_shard(s, job_id, 0, "w2") == (1, 2)
        assert job_repo.finish_shard(s, job_id, 0, "w3") == (1, 2)  # a duplicate changes nothing
    with transaction(db_url) as s:
        rows = job_repo.shards_of(s, job_id)
        assert [(r.status, r.attempts, r.worker) for r in rows] == [("done", 2, "w2"), ("pending", 0, None)]
        assert job_repo.get_job(s, job_id).progress == pytest.approx(job_repo.MERGE_SHARE * 0.75)
        row = s.execute(text("SELECT corpus, status, shards, shards_done, workers, shard_retries, build_id "
                             "FROM build_status_v WHERE job_id = :j"), {"j": job_id}).one()
    assert tuple(row) == ("books", "running", 2, 1, 1, 1, None)


@pytest.mark.parametrize("own_db_url", ["sqlite", "postgresql"], indirect=True)
def test_views_exist_and_migrations_go_down_and_up(own_db_url):
    views = {"trace_results_v", "document_influence_v", "build_status_v"}
    assert views <= set(inspect(get_engine(own_db_url)).get_view_names())
    engine = create_engine(own_db_url)
    try:
        downgrade(engine, "0001")
        insp = inspect(engine)
        assert not views & set(insp.get_view_names()) and "jobs" not in insp.get_table_names()
        assert "job_id" not in {c["name"] for c in insp.get_columns("traces")}
        assert "deleted_at" not in {c["name"] for c in insp.get_columns("documents")}
        upgrade(engine)
        assert views <= set(inspect(engine).get_view_names())
    finally:
        engine.dispose()


def test_models_match_the_migrations(pg_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from db.models import Base
    with get_engine(pg_url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


@pytest.mark.parametrize("own_db_url", ["postgresql"], indirect=True)
def test_workers_starting_together_migrate_the_database_once(own_db_url):
    from concurrent.futures import ThreadPoolExecutor
    # lock_timeout: a regression fails here instead of hanging (without the advisory lock they block)
    engines = [create_engine(own_db_url, connect_args={"options": "-c lock_timeout=30s"}) for _ in range(3)]
    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(upgrade, engines))
        with engines[0].connect() as c:
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0009"]
    finally:
        for e in engines:
            e.dispose()


def test_idle_workers_claim_only_jobs_whose_message_was_lost(db_url):
    from datetime import timedelta

    from sqlalchemy import update

    from db.models import Job, utcnow
    now = utcnow()
    ago = {"fresh": now, "quiet": now - timedelta(seconds=60), "silent": now - timedelta(seconds=7200)}
    jobs = {}
    for name, kind, status, stage, shard, age in [
        ("queued", "trace", "queued", "queued", None, "quiet"),
        ("queued just now", "trace", "queued", "queued", None, "fresh"),
        ("shard lost", "index", "running", "shards 4/5 done", "pending", "quiet"),
        ("shard running", "index", "running", "shard 4 started on w1", "running", "quiet"),
        ("merging", "index", "running", "merging shards", None, "quiet"),
        ("merging for hours", "index", "running", "merging shards", None, "silent"),
        ("tracing", "trace", "running", "running", None, "quiet"),
        ("done", "trace", "succeeded", "done", None, "silent"),
    ]:
        job_id = new_job(db_url, kind)
        with transaction(db_url) as s:
            if shard:
                job_repo.ensure_shards(s, job_id, [(0, 1)])
                s.execute(text("UPDATE job_shards SET status = :st WHERE job_id = :j"), {"st": shard, "j": job_id})
            s.execute(update(Job).where(Job.id == job_id).values(status=status, stage=stage, updated_at=ago[age]))
        jobs[name] = job_id
    with transaction(db_url) as s:
        claimed = job_repo.claim_stalled(s, now - timedelta(seconds=30), now - timedelta(seconds=3600))
    mine = {name for name, job_id in jobs.items() if job_id in claimed}
    assert mine == {"queued", "shard lost", "merging for hours"}
    with transaction(db_url) as s:  # claimed jobs were touched: a second idle worker leaves them alone
        assert not set(job_repo.claim_stalled(s, now - timedelta(seconds=30), now - timedelta(seconds=3600))) & set(jobs.values())
