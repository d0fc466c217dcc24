"""trace text query

Revision ID: 0007
Revises: 0004

- `traces.text_query`: what dense and BM25 searched with — the question's content with the chat
  template, system and few-shot parts removed, and the answer (or `trace --text-query`). NULL for
  traces stored before.
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('traces', sa.Column('text_query', sa.Text(), nullable=True))


def downgrade() -> None:
    # a plain column drops in place (SQLite 3.35+); batch mode would copy the table under the views
    op.execute("ALTER TABLE traces DROP COLUMN text_query")
