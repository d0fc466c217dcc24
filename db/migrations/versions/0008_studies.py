"""studies: many questions as one job, their outcomes, and the analyst views over them

Revision ID: 0008
Revises: 0004

- `studies`, `study_questions` (one row per question: its trace and outcome), `study_support`
  (the ranked documents of a study's trace that state its answer).
- Views `study_results_v` (one row per question), `study_summary_v` (one row per study),
  `study_exposure_v` (accuracy by exposure: the report's curve), `study_documents_v` (documents
  by how many answers they back). PostgreSQL and SQLite; booleans are tested with `WHEN x` /
  `WHEN NOT x`, which both read the same way.
- PostgreSQL: SELECT for `wherefrom_analyst` on the new tables and views (0002's default
  privileges cover objects its role creates; the grant covers a migration run by another role).
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

ANALYST = "wherefrom_analyst"
TABLES = ("studies", "study_questions", "study_support")


def _tables() -> None:
    op.create_table(
        'studies',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('build_id', sa.Integer(), nullable=False),
        sa.Column('source', sa.Text(), nullable=True),
        sa.Column('k', sa.Integer(), nullable=False),
        sa.Column('method', sa.String(length=40), nullable=False),
        sa.Column('tasks_of', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['build_id'], ['index_builds.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
    )
    op.create_index('ix_studies_job_id', 'studies', ['job_id'], unique=True)
    op.create_index('ix_studies_build_id', 'studies', ['build_id'])
    op.create_table(
        'study_questions',
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('number', sa.Integer(), nullable=False),
        sa.Column('question', sa.Text(), nullable=False),
        sa.Column('answer', sa.Text(), nullable=True),
        sa.Column('expected', sa.Text(), nullable=True),
        sa.Column('metadata', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('trace_id', sa.Integer(), nullable=True),
        sa.Column('correct', sa.Boolean(), nullable=True),
        sa.Column('supported', sa.Boolean(), nullable=True),
        sa.Column('exposure', sa.Integer(), nullable=True),
        sa.Column('learned_step', sa.Integer(), nullable=True),
        sa.Column('misled', sa.Boolean(), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['trace_id'], ['traces.id'], ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('study_id', 'number'),
    )
    op.create_index('ix_study_questions_trace_id', 'study_questions', ['trace_id'], unique=True)
    op.create_table(
        'study_support',
        sa.Column('trace_id', sa.Integer(), nullable=False),
        sa.Column('rank', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['trace_id', 'rank'], ['trace_results.trace_id', 'trace_results.rank'],
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('trace_id', 'rank'),
    )


COUNT = "sum(CASE WHEN {} THEN 1 ELSE 0 END)"
VIEWS = {
    # one row per question of every study, with its outcome and the top document of its trace
    "study_results_v": """
        SELECT st.name AS study, q.study_id, q.number, q.question, q.expected,
               coalesce(t.answer, q.answer) AS answer, t.answer_generated, q.status, q.error,
               CASE WHEN q.correct THEN 'correct' WHEN NOT q.correct THEN 'wrong' ELSE 'unknown' END AS outcome,
               q.supported, q.exposure, q.learned_step, q.misled, q.trace_id,
               d.external_id AS top_document, q.metadata, q.finished_at
        FROM study_questions q
        JOIN studies st ON st.id = q.study_id
        LEFT JOIN traces t ON t.id = q.trace_id
        LEFT JOIN trace_results r ON r.trace_id = q.trace_id AND r.rank = 1
        LEFT JOIN documents d ON d.id = r.document_id""",
    # one row per study: its job's status and the counts the report's tiles show
    "study_summary_v": f"""
        SELECT st.id AS study_id, st.name AS study, st.job_id, j.status, j.progress, st.build_id,
               st.k, st.method, count(q.number) AS questions,
               {COUNT.format("q.status = 'done'")} AS traced, {COUNT.format("q.status = 'failed'")} AS failed,
               {COUNT.format("q.correct")} AS correct, {COUNT.format("NOT q.correct")} AS wrong,
               {COUNT.format("q.status = 'done' AND q.correct IS NULL")} AS unknown,
               {COUNT.format("q.supported")} AS supported, {COUNT.format("NOT q.supported")} AS unsupported,
               {COUNT.format("q.misled")} AS misled,
               CAST({COUNT.format("q.correct")} AS DOUBLE PRECISION)
                   / nullif({COUNT.format("q.correct IS NOT NULL")}, 0) AS accuracy,
               avg(CAST(q.exposure AS DOUBLE PRECISION)) AS mean_exposure, st.created_at, j.finished_at
        FROM studies st
        LEFT JOIN jobs j ON j.id = st.job_id
        LEFT JOIN study_questions q ON q.study_id = st.id
        GROUP BY st.id, st.name, st.job_id, j.status, j.progress, st.build_id, st.k, st.method,
                 st.created_at, j.finished_at""",
    # accuracy against exposure, over the questions with an expected answer
    "study_exposure_v": f"""
        SELECT st.name AS study, q.study_id, q.exposure, count(*) AS questions,
               {COUNT.format("q.correct")} AS correct,
               CAST({COUNT.format("q.correct")} AS DOUBLE PRECISION) / count(*) AS accuracy
        FROM study_questions q
        JOIN studies st ON st.id = q.study_id
        WHERE q.correct IS NOT NULL
        GROUP BY st.name, q.study_id, q.exposure""",
    # documents by how many of a study's answers they back (returned, and stating the answer)
    "study_documents_v": """
        SELECT st.name AS study, q.study_id, d.external_id AS document, r.document_id,
               count(DISTINCT q.number) AS answers, min(r.rank) AS best_rank, min(q.trace_id) AS first_trace_id
        FROM study_support sp
        JOIN trace_results r ON r.trace_id = sp.trace_id AND r.rank = sp.rank
        JOIN study_questions q ON q.trace_id = sp.trace_id
        JOIN studies st ON st.id = q.study_id
        JOIN documents d ON d.id = r.document_id
        GROUP BY st.name, q.study_id, d.external_id, r.document_id""",
}


def upgrade() -> None:
    _tables()
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            DO $$ BEGIN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ANALYST}') THEN
                    GRANT SELECT ON {", ".join(TABLES + tuple(VIEWS))} TO {ANALYST};
                END IF;
            END $$""")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW {name}")
    op.drop_table('study_support')
    op.drop_index('ix_study_questions_trace_id', table_name='study_questions')
    op.drop_table('study_questions')
    op.drop_index('ix_studies_build_id', table_name='studies')
    op.drop_index('ix_studies_job_id', table_name='studies')
    op.drop_table('studies')
