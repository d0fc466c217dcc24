"""trace gradient query

Revision ID: 0009
Revises: 0008

- `traces.gradient_query`: which positions of prompt + answer the gradient query summed over —
  {"positions": "subject", "tokens": [the kept tokens' text]} (the question's names and the
  positions that emit the answer) or {"positions": "all"} (`trace --gradient-positions all`).
  NULL for traces stored before.
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('traces', sa.Column('gradient_query', sa.JSON(), nullable=True))


def downgrade() -> None:
    # a plain column drops in place (SQLite 3.35+); batch mode would copy the table under the views
    op.execute("ALTER TABLE traces DROP COLUMN gradient_query")
