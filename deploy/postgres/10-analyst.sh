#!/bin/sh
# Runs once, when the postgres container initialises an empty volume: the analysts' login role,
# with a password. The migrations (`wherefrom db upgrade`) grant it SELECT on every table and view,
# now and later, and make its transactions read-only.
set -eu
psql -v ON_ERROR_STOP=1 -v pw="$ANALYST_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE wherefrom_analyst LOGIN PASSWORD :'pw';
SQL
