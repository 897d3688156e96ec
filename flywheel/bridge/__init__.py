"""The MLflow-webhook → Prefect-event bridge (`python -m flywheel.bridge`).

OSS Prefect has no incoming webhooks, so this small ASGI app receives MLflow's signed registry webhooks and
turns each into a Prefect event that deployment triggers react to:

    MLflow `model_version_alias.created`  →  Prefect `mlflow.model_version_alias.created`
    MLflow `model_version_alias.deleted`  →  Prefect `mlflow.model_version_alias.deleted`
    MLflow `model_version.created`        →  Prefect `mlflow.model_version.created`

Every other MLflow event is acknowledged (200) and ignored. MLflow retries (urllib3, 3 times, 1/2/4 s back-off) on
connection errors and on 429/500/502/503/504 only, resending the same delivery id, timestamp and signature; any
other status is final. Hence:

* bad or missing signature → 401, a timestamp more than `max_age_seconds` away from now → 400: never retried;
* a delivery id already handed to Prefect → 200 `{"status": "duplicate"}` without a second event. The memory is
  a small SQLite file in the state dir (survives restarts, safe across threads and processes, pruned by age);
* a name MLflow could not have sent, or a model or version not in the registry → 422 `refused`, not emitted
  (`refusals`); the registry could not answer → 503, so MLflow retries;
* the event could not be handed to Prefect → 503, and the delivery is forgotten so MLflow's retry can succeed.

One concern per module: `signing` (MLflow's HMAC signature), `secrets` (the secret ring and its rotation),
`deliveries` (the replay log), `refusals` (names and the registry check), `emit` (handing an event to Prefect),
`webhooks` (the MLflow side: registering the webhook), `app` (the Starlette app) and `__main__` (the command).
Neither the secret nor a signature is ever logged.
"""
