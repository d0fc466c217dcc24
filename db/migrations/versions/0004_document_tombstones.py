"""document tombstones

Revision ID: 0004
Revises: 0003

- `documents.deleted_at`: set by `wherefrom delete`. The row stays (past traces still show the
  document); every build over its corpus drops its rows from FAISS and BM25 in the same transaction.
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('documents', sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # SQLite 3.35+ drops a plain column in place; batch mode would copy the table and break the
    # analyst views that read it
    op.execute("ALTER TABLE documents DROP COLUMN deleted_at")
