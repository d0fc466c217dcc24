"""document tombstones

Revision ID: 0003
Revises: 0002

- `documents.deleted_at`: set by `wherefrom delete`. The row stays (past traces still show the
  document); every build over its corpus drops its rows from FAISS and BM25 in the same transaction.
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('documents', sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":  # SQLite drops a column by copying the table
        with op.batch_alter_table('documents') as batch:  # (db.engine.downgrade turns foreign keys off)
            batch.drop_column('deleted_at')
    else:
        op.drop_column('documents', 'deleted_at')
