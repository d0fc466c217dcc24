"""checkpoints.base_path: the local base model of a LoRA adapter checkpoint

Revision ID: 0003
Revises: 0002

An adapter folder names its base model in adapter_config.json, often as a hub id; `wherefrom model
add --base PATH` records the local copy here so builds and traces load the same base.
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('base_path', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('base_path')
