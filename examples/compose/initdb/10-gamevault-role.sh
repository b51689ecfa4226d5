#!/bin/sh
# Runs once, when the postgres image initialises its data directory
# (/docker-entrypoint-initdb.d). GameVault's role owns its database and is
# nothing more: no SUPERUSER, CREATEDB or CREATEROLE. safehold restores with this
# role, and a restored dump runs with its rights: a superuser's dump could run
# programs on the database host (COPY ... TO PROGRAM).
set -eu
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
    -v role="$DB_USERNAME" -v password="$DB_PASSWORD" -v db="$DB_DATABASE" <<'SQL'
CREATE ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"role";
SQL
