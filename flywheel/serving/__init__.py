"""Flywheel's model server: the registered MLflow model of one name at a stable URL, blue/green in one process.

Run: `python -m flywheel.serving --model NAME --port P [--initial-alias champion]`, tokens from
`FLYWHEEL_ADMIN_TOKEN` / `FLYWHEEL_SERVING_TOKEN`. Scoring speaks MLflow's protocol (`mlflow models serve`), and
answers equal `mlflow.pyfunc.load_model(uri).predict(df)`, whether a version is served by its compiled form
(onnxruntime, after a parity check when it was packaged) or through pyfunc.

One concern per module, in the order a request goes through them (transport → codec → handler → model):
`app` (the Starlette app: routes, auth, capped bodies, the edge that adds request ids, model headers and HTTP
metrics), `parsing` (media types, JSON bodies, input format keys, batching keys: the codecs), `server`
(`ModelServer`, the handler: two slots, loading, swap/rollback, smoke tests, state), `batching` (jobs, the
micro-batcher), `scoring` (parse, predict and encode as MLflow does, one job or a merged group), `compiled` (a
version's compiled form: JSON straight to onnxruntime's inputs, MLflow's path for anything else), `slots` (a loaded
version: loading, warm-up, release), `upstream` (a slot that predicts in another process), `metrics` (Prometheus),
`errors` (ApiError and JSON error bodies), `request_log` (the writer of scored rows; the format and the reader are
flywheel.tasks.request_log) and `__main__` (the command). Nothing below `app` knows HTTP types.

This `__init__` imports nothing: the stack launches the server as a subprocess (`-m flywheel.serving`).
"""
