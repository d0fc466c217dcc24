"""store paths relative to the data directory

Revision ID: 0005
Revises: 0004

`index_builds.store_path` held the store's absolute folder, so a copied, moved or restored data
directory went on reading the original's stores, and an update or delete there replaced and
removed them. Stores always lie in the data directory's `stores/`: each path becomes
`stores/<its last component>`, which `Settings.resolve_store` resolves against the data directory
wherever it is read.
"""
import os
import posixpath

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def _rewrite(new_path) -> None:
    conn = op.get_bind()
    for build_id, path in conn.execute(sa.text("SELECT id, store_path FROM index_builds")).all():
        changed = new_path(path)
        if changed != path:
            conn.execute(sa.text("UPDATE index_builds SET store_path = :path WHERE id = :id"),
                         {"path": changed, "id": build_id})


def upgrade() -> None:
    _rewrite(lambda path: f"stores/{posixpath.basename(path.rstrip('/'))}" if posixpath.isabs(path) else path)


def downgrade() -> None:
    # code before 0005 reads absolute paths: those of the data directory the environment names,
    # as `Settings.from_env` finds it
    root = os.path.realpath(os.environ.get("WHEREFROM_DATA_DIR", "wherefrom-data"))
    _rewrite(lambda path: path if posixpath.isabs(path) else posixpath.join(root, path))
