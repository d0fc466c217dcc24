"""jobs and shards, analyst views, read-only analyst role

Revision ID: 0002
Revises: 0001

- `jobs` and `job_shards`: background work and its progress, read by the CLI, the API and analysts.
- `index_builds.job_id`, `traces.job_id` (unique): a job redelivered after a worker died still
  publishes one build or stores one trace; `index_builds.checksum` records the published files.
- Views `trace_results_v`, `document_influence_v`, `build_status_v` (PostgreSQL and SQLite).
- PostgreSQL only: role `wherefrom_analyst`, SELECT on every table and view, now and later
  (default privileges), and read-only transactions by default. The role is cluster-wide, so a
  downgrade revokes its grants in this database but leaves the role to other databases.
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

ANALYST = "wherefrom_analyst"


def _jobs_tables() -> None:
    op.create_table(
        'jobs',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=20), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('progress', sa.Float(), nullable=False),
        sa.Column('stage', sa.String(length=200), nullable=False),
        sa.Column('result', sa.JSON(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('worker', sa.String(length=200), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_jobs_kind', 'jobs', ['kind'])
    op.create_index('ix_jobs_status', 'jobs', ['status'])
    op.create_table(
        'job_shards',
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('shard', sa.Integer(), nullable=False),
        sa.Column('row_start', sa.BigInteger(), nullable=False),
        sa.Column('row_end', sa.BigInteger(), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('progress', sa.Float(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('worker', sa.String(length=200), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('job_id', 'shard'),
    )


def _add_job_id(table: str) -> None:
    """A nullable, unique `job_id` referencing jobs. SQLite adds a column with REFERENCES in place;
    batch mode would copy the table and, with foreign keys on, cascade-delete its children."""
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"ALTER TABLE {table} ADD COLUMN job_id INTEGER REFERENCES jobs (id) ON DELETE SET NULL")
    else:
        op.add_column(table, sa.Column('job_id', sa.Integer(), nullable=True))
        op.create_foreign_key(f'fk_{table}_job_id', table, 'jobs', ['job_id'], ['id'], ondelete='SET NULL')
    op.create_index(f'ix_{table}_job_id', table, ['job_id'], unique=True)


def _json_text(column: str, key: str) -> str:
    if op.get_bind().dialect.name == "postgresql":
        return f"({column} ->> '{key}')"
    return f"json_extract({column}, '$.{key}')"


VIEWS = {
    # one row per ranked document of every trace
    "trace_results_v": """
        SELECT t.id AS trace_id, t.question, t.answer, m.name AS model, r.rank, r.score, t.method,
               c.name AS corpus, d.external_id AS document, r.document_id,
               substr(d.text, coalesce(e.char_start, 0) + 1, 300) AS snippet,
               t.build_id, t.job_id, t.created_at
        FROM trace_results r
        JOIN traces t ON t.id = r.trace_id
        JOIN models m ON m.id = t.model_id
        JOIN documents d ON d.id = r.document_id
        JOIN corpora c ON c.id = d.corpus_id
        LEFT JOIN index_entries e ON e.build_id = t.build_id AND e.position = r.position""",
    # per document and ranking method (scores of different methods are on different scales)
    "document_influence_v": """
        SELECT c.name AS corpus, d.external_id AS document, r.document_id, t.method,
               count(DISTINCT r.trace_id) AS traces,
               sum(CASE WHEN r.rank = 1 THEN 1 ELSE 0 END) AS rank1,
               avg(r.score) AS mean_score, avg(r.rank) AS mean_rank, min(r.rank) AS best_rank
        FROM trace_results r
        JOIN traces t ON t.id = r.trace_id
        JOIN documents d ON d.id = r.document_id
        JOIN corpora c ON c.id = d.corpus_id
        GROUP BY c.name, d.external_id, r.document_id, t.method""",
    # one row per index job, with its shards and, once published, its build
    "build_status_v": """
        SELECT j.id AS job_id, {corpus} AS corpus, {model} AS model, j.status, j.stage, j.progress,
               (SELECT count(*) FROM job_shards s WHERE s.job_id = j.id) AS shards,
               (SELECT count(*) FROM job_shards s WHERE s.job_id = j.id AND s.status = 'done') AS shards_done,
               (SELECT count(DISTINCT s.worker) FROM job_shards s WHERE s.job_id = j.id) AS workers,
               (SELECT coalesce(sum(CASE WHEN s.attempts > 1 THEN s.attempts - 1 ELSE 0 END), 0)
                FROM job_shards s WHERE s.job_id = j.id) AS shard_retries,
               j.attempts, j.worker, j.error, b.id AS build_id, b.row_count AS rows, b.checksum,
               j.created_at, j.started_at, j.updated_at, j.finished_at
        FROM jobs j
        LEFT JOIN index_builds b ON b.job_id = j.id
        WHERE j.kind = 'index'""",
}


def _analyst_role() -> None:
    op.execute(f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ANALYST}') THEN
                BEGIN
                    CREATE ROLE {ANALYST} LOGIN;
                EXCEPTION WHEN duplicate_object OR unique_violation THEN
                    NULL;  -- another database's migration created it a moment ago
                END;
            END IF;
            -- a second lock besides the grants: writes fail even where a grant slips through
            ALTER ROLE {ANALYST} SET default_transaction_read_only = on;
            EXECUTE format('GRANT CONNECT ON DATABASE %I TO {ANALYST}', current_database());
        END $$""")
    op.execute(f"GRANT USAGE ON SCHEMA public TO {ANALYST}")
    op.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {ANALYST}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {ANALYST}")
    # PostgreSQL < 15 lets every role create tables in `public`; 15+ already does not
    op.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")


def upgrade() -> None:
    _jobs_tables()
    _add_job_id('index_builds')
    op.add_column('index_builds', sa.Column('checksum', sa.String(length=64), nullable=True))
    _add_job_id('traces')
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS " + sql.format(corpus=_json_text("j.params", "corpus"),
                                                          model=_json_text("j.params", "model")))
    if op.get_bind().dialect.name == "postgresql":
        _analyst_role()


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON TABLES FROM {ANALYST}")
        op.execute(f"REVOKE SELECT ON ALL TABLES IN SCHEMA public FROM {ANALYST}")
        op.execute(f"REVOKE USAGE ON SCHEMA public FROM {ANALYST}")
    for name in VIEWS:
        op.execute(f"DROP VIEW {name}")
    for table in ('traces', 'index_builds'):
        op.drop_index(f'ix_{table}_job_id', table_name=table)
        dropped = ['job_id'] + (['checksum'] if table == 'index_builds' else [])
        if postgres:
            op.drop_constraint(f'fk_{table}_job_id', table, type_='foreignkey')
            for column in dropped:
                op.drop_column(table, column)
        else:  # SQLite drops a referencing column only by copying the table (db.engine.downgrade
            with op.batch_alter_table(table) as batch:  # turns foreign keys off around it)
                for column in dropped:
                    batch.drop_column(column)
    op.drop_table('job_shards')
    op.drop_index('ix_jobs_status', table_name='jobs')
    op.drop_index('ix_jobs_kind', table_name='jobs')
    op.drop_table('jobs')
