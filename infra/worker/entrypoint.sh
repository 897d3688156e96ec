#!/bin/sh
# Prefect worker for Flywheel's deployments: create the work pool if it is missing, (re)deploy every deployment of
# prefect.yaml onto it (idempotent), then poll it. Runs from the repository root inside the image (/app), where the
# flows' entrypoints (flows/train.py:train, ...) are.
#
#   FLYWHEEL_WORK_POOL       pool name (default flywheel)
#   FLYWHEEL_WORK_POOL_TYPE  process (default), docker or kubernetes
#   PREFECT_API_URL          the Prefect server's API
# The other variables are described in infra/worker/render_deployments.py and infra/.env.example.
set -eu

pool="${FLYWHEEL_WORK_POOL:-flywheel}"
pool_type="${FLYWHEEL_WORK_POOL_TYPE:-process}"
root="${FLYWHEEL_APP_DIR:-/app}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ -z "${PREFECT_API_URL:-}" ]; then
    echo "worker: PREFECT_API_URL is not set; a worker needs the Prefect server" >&2
    exit 2
fi
cd "$root"

# Docker flow runs share the state volume with the model servers and this worker; they read the admin token
# from it (owner-only file), so the token never goes into Prefect's job variables.
if [ "$pool_type" = docker ] && [ -n "${FLYWHEEL_ADMIN_TOKEN:-}" ]; then
    state_dir="${FLYWHEEL_STATE_DIR:-/state}"
    mkdir -p "$state_dir"
    (umask 077 && printf '%s' "$FLYWHEEL_ADMIN_TOKEN" > "$state_dir/admin_token")
fi

if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "worker: work pool $pool exists"
elif [ "$pool_type" = kubernetes ]; then
    prefect work-pool get-default-base-job-template --type kubernetes --file "$work/default-template.json"
    python infra/worker/render_deployments.py base-job-template \
        --in "$work/default-template.json" --out "$work/base-job-template.json"
    prefect work-pool create "$pool" --type kubernetes --base-job-template "$work/base-job-template.json"
else
    prefect work-pool create "$pool" --type "$pool_type"
fi

python infra/worker/render_deployments.py deployments --source prefect.yaml --out "$work/prefect.yaml"
prefect --no-prompt deploy --all --prefect-file "$work/prefect.yaml"

# No exec: the EXIT trap removes the rendered files once the worker stops. SIGINT stops a Prefect worker
# promptly (it ignored SIGTERM for >45 s), so compose and Kubernetes send SIGINT (stop_signal / preStop).
prefect worker start --pool "$pool" --type "$pool_type" --with-healthcheck --install-policy never &
child=$!
trap 'kill -INT "$child" 2>/dev/null' INT TERM
status=0
wait "$child" || status=$?
# A signal interrupts the first wait; wait again for the worker to finish its shutdown.
if kill -0 "$child" 2>/dev/null; then
    wait "$child" || status=$?
fi
exit "$status"
