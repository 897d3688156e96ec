#!/bin/bash
# Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d): one PostgreSQL instance,
# two databases with their own owners. MLflow and Prefect create their tables (migrations) themselves.
set -euo pipefail

: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD must be set}"
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD must be set}"
mlflow_user="${MLFLOW_DB_USER:-mlflow}"
prefect_user="${PREFECT_DB_USER:-prefect}"

create() {
    local user="$1" password="$2" database="$3"
    # psql variables (:'name', :"name") quote the values: no password is pasted into SQL text.
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -v user="$user" -v password="$password" -v database="$database" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \gexec
SQL
}

create "$mlflow_user" "$MLFLOW_DB_PASSWORD" "${MLFLOW_DB_NAME:-mlflow}"
create "$prefect_user" "$PREFECT_DB_PASSWORD" "${PREFECT_DB_NAME:-prefect}"
