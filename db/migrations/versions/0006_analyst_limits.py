"""analyst limits: query timeouts, and CONNECT to this database only where granted

Revision ID: 0006
Revises: 0004

PostgreSQL only (SQLite has no roles); nothing changes in the schema.

- `wherefrom_analyst` gets `statement_timeout` and `idle_in_transaction_session_timeout` in this
  database (`ALTER ROLE … IN DATABASE`, so other databases sharing the cluster-wide role keep their
  own): a runaway analyst query, or a session left open in a transaction, cannot hold a connection
  and its snapshot for hours while builds publish. These are defaults for every analyst session,
  not caps: an analyst may `SET` them otherwise in a session. They stop accidents, not intent.
- CONNECT on this database is revoked from PUBLIC. The analyst keeps the grant of 0002, the role
  running this migration (the application's) is granted it here, owners and superusers always
  have it. What it does not do: keep the analyst out of the cluster's other databases that still
  grant CONNECT to PUBLIC (`postgres`, `template1`, others'); that needs `REVOKE CONNECT ON
  DATABASE … FROM PUBLIC` by their owners, or a `pg_hba.conf` line limiting the role to this one.

Downgrade resets both settings and grants CONNECT to PUBLIC again (the migrating role's own grant
stays: it had CONNECT through PUBLIC before).
"""
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

ANALYST = "wherefrom_analyst"
# generous for the queries of docs/sql.md (index lookups and aggregates over the results): a query
# running past 5 min is most likely a mistake (a cross join, a missing filter) holding back vacuum
TIMEOUTS = {"statement_timeout": "5min", "idle_in_transaction_session_timeout": "10min"}


def _in_this_database(*statements: str) -> None:
    """Run statements naming the current database (`%I`), which SQL cannot write as a literal."""
    body = "\n".join(f"EXECUTE format('{s}', current_database());" for s in statements)
    op.execute(f"DO $$ BEGIN {body} END $$")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _in_this_database(*(f"ALTER ROLE {ANALYST} IN DATABASE %I SET {name} = ''{value}''"
                        for name, value in TIMEOUTS.items()),
                      "GRANT CONNECT ON DATABASE %I TO CURRENT_USER",
                      "REVOKE CONNECT ON DATABASE %I FROM PUBLIC")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _in_this_database(*(f"ALTER ROLE {ANALYST} IN DATABASE %I RESET {name}" for name in TIMEOUTS),
                      "GRANT CONNECT ON DATABASE %I TO PUBLIC")
