#!/bin/sh
# Runs once, when the postgres container initialises an empty volume: the analysts' login role,
# with a password. The migrations (`wherefrom db upgrade`) grant it SELECT on every table and view,
# now and later, make its transactions read-only, give its sessions statement and idle timeouts,
# and take CONNECT on this database away from everyone not granted it (db/migrations 0002, 0006).
set -eu
if [ "${#ANALYST_PASSWORD}" -lt 16 ]; then
    echo "10-analyst.sh: set ANALYST_PASSWORD to 16 characters or more, e.g. \$(openssl rand -hex 24)" >&2
    exit 1
fi
# \getenv keeps the password out of psql's command line, which every process on the host can read
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\getenv pw ANALYST_PASSWORD
CREATE ROLE wherefrom_analyst LOGIN PASSWORD :'pw';
SQL
