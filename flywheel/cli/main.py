"""The `flywheel` command line."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from flywheel.core.errors import UserError

app = typer.Typer(
    help="Flywheel: train, gate, deploy and watch tabular models with Prefect and MLflow.", no_args_is_help=True
)


@app.callback()
def main() -> None:
    """Flywheel's commands; settings come from FLYWHEEL_* variables and .env."""
    from flywheel.cli.tracebacks import hide_user_error_tracebacks
    from flywheel.core.settings import get_settings
    from flywheel.stack import local

    # Before anything imports Prefect: it reads PREFECT_API_URL once, at import (a running stack's, if any).
    local.prepare_env(get_settings())
    # A flow run that fails on a user's mistake: its message, printed by the command, and no traceback from Prefect.
    hide_user_error_tracebacks()


def _fail(exc: Exception) -> NoReturn:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


SpecOpt = Annotated[Path | None, typer.Option("--spec", help="Dataset spec YAML (default: the flights demo).")]
DataOpt = Annotated[str | None, typer.Option("--data", help="Data source URI: path, folder, glob or s3://bucket/key.")]
ParamsOpt = Annotated[Path | None, typer.Option("--params", help="Model params YAML (estimator + hyper-parameters).")]


@app.command()
def train(
    spec: SpecOpt = None,
    data: DataOpt = None,
    params: ParamsOpt = None,
    start: Annotated[str | None, typer.Option(help="Event-time window start (inclusive), e.g. 2013-01-01.")] = None,
    end: Annotated[str | None, typer.Option(help="Event-time window end (exclusive), e.g. 2013-03-01.")] = None,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Registered model name.")] = None,
    target: Annotated[str | None, typer.Option(help="Override the spec's target column.")] = None,
    task_type: Annotated[str | None, typer.Option("--task", help="binary, multiclass or regression.")] = None,
    positive_class: Annotated[str | None, typer.Option("--positive-class", help="Positive class label.")] = None,
    numeric: Annotated[str | None, typer.Option(help="Comma-separated numeric feature columns.")] = None,
    categorical: Annotated[str | None, typer.Option(help="Comma-separated categorical feature columns.")] = None,
    drop: Annotated[str | None, typer.Option(help="Comma-separated columns to drop.")] = None,
    event_time: Annotated[str | None, typer.Option("--event-time", help="Event-time column.")] = None,
) -> None:
    """Run the `train` flow: pull → validate → train → evaluate → register → gate → promote.

    Uses MLFLOW_TRACKING_URI when set; otherwise a running `flywheel up` stack, otherwise it starts a local
    MLflow server (SQLite + local artifacts in the state dir) for the run and stops it afterwards. The spec, the
    params file and the data itself are checked first, before any server starts.
    """
    from flywheel.cli.precheck import check_train_input
    from flywheel.core.settings import get_settings
    from flywheel.core.spec import load_spec
    from flywheel.stack import local

    settings = get_settings()
    try:
        split = lambda s: [c.strip() for c in s.split(",") if c.strip()] if s else None  # noqa: E731
        base = load_spec(spec or settings.spec)
        ds = _with_overrides(
            base, source=data or settings.data, target=target, task=task_type, positive_class=positive_class,
            numeric=split(numeric), categorical=split(categorical), drop=split(drop), event_time=event_time,
        )  # fmt: skip
        spec_file = _write_effective_spec(settings, ds) if ds != base else spec
        checked = check_train_input(spec_file, None, params, start, end, model_name)
    except UserError as exc:
        _fail(exc)
    typer.echo(checked.summary())

    local.prepare_env(settings)
    try:
        with local.tracking_server(settings) as uri:
            from flywheel.flows.train import train as train_flow

            typer.echo(f"MLflow tracking server: {uri}")
            result = train_flow(
                spec_path=str(spec_file) if spec_file else None,
                data_uri=None,
                params_path=str(params) if params else None,
                start=start,
                end=end,
                model_name=model_name,
            )
    except UserError as exc:
        _fail(exc)
    _print_train_result(result)


@app.command()
def demo(
    months: Annotated[int | None, typer.Option(help="Replay only the first N months after February.")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the stack up afterwards for exploring.")] = False,
) -> None:
    """The closed loop on the embedded default: start the stack, train on January–February 2013, deploy, then
    replay March–December month by month (serve → drift check → retrain → gate → deploy) and summarise."""
    from flywheel.cli.demo import run_demo
    from flywheel.core.settings import get_settings

    try:
        run_demo(get_settings(), months=months, keep=keep, echo=typer.echo)
    except UserError as exc:
        _fail(exc)


@app.command()
def ci(
    spec: SpecOpt = None,
    data: DataOpt = None,
    params: ParamsOpt = None,
    start: Annotated[str | None, typer.Option(help="Event-time window start (inclusive).")] = None,
    end: Annotated[str | None, typer.Option(help="Event-time window end (exclusive).")] = None,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Registered model name.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Markdown report path (default: state dir).")] = None,
) -> None:
    """For CI systems: run `train` with the gate; write a Markdown report (metrics vs champion, gate reasons).

    Exit code: see `flywheel.cli.ci` (0 = the gate passed; non-zero = gate failed, bad input or a crash).
    """
    from flywheel.cli.ci import run_ci

    code = run_ci(spec, data, params, start, end, model_name, report_path=report, echo=typer.echo)
    raise typer.Exit(code=code)


@app.command()
def up() -> None:
    """Start the whole stack on 127.0.0.1 (MLflow, Prefect + UI, model servers, webhook bridge, deployments)
    as supervised child processes; Ctrl-C or SIGTERM stops everything. A child that dies or freezes is restarted
    (with backoff and a limit); if `up` itself dies, its watchdog stops every child."""
    from flywheel.core.settings import get_settings
    from flywheel.stack import local
    from flywheel.stack.processes import ServerStartError
    from flywheel.stack.supervisor import Stack

    settings = get_settings()
    local.prepare_env(settings)
    stack = Stack(settings)

    def _terminate(signum, frame):  # noqa: ARG001 - SIGTERM while starting: unwind like Ctrl-C, stopping every child
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C stops the stack even when `up` was started from a shell's background job (`flywheel up &` in a script):
    # such a job inherits SIGINT ignored, and Python then keeps it ignored. uvicorn installs its handlers the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        urls = stack.start()
    except ServerStartError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.secho("start-up interrupted; everything started so far was stopped", err=True)
        raise typer.Exit(code=130) from None
    _print_urls(urls)
    typer.echo("Ctrl-C stops the stack.")
    stack.run_until_signalled()


def _print_urls(urls: dict[str, str]) -> None:
    typer.echo(f"MLflow UI + registry:  {urls['mlflow_url']}")
    typer.echo(f"Prefect UI:            {urls['prefect_url']}")
    typer.echo(f"Model (champion):      {urls['model_url']}/invocations")
    typer.echo(f"Model (challenger):    {urls['staging_url']}/invocations")
    typer.echo("For the Prefect CLI:   export PREFECT_API_URL=" + urls["prefect_api_url"])
    typer.echo("For MLflow clients:    export MLFLOW_TRACKING_URI=" + urls["mlflow_url"])


@app.command()
def status() -> None:
    """The stack's processes and URLs, then each model's champion, challenger, what serves, the last deployment
    and the last drift verdict. Exit code 1 when no stack runs or its supervisor is dead."""
    from flywheel.cli.status import format_status, gather
    from flywheel.core.settings import get_settings

    data = gather(get_settings())
    typer.echo(format_status(data))
    if not (data.get("supervisor") or {}).get("alive"):
        raise typer.Exit(code=1)


@app.command()
def rollback(
    model: Annotated[str | None, typer.Argument(help="Registered model name (default: FLYWHEEL_MODEL_NAME).")] = None,
    to_version: Annotated[
        str | None, typer.Option("--to", help="Version to go back to (default: previous good).")
    ] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why, for the ledger (default: by hand).")] = None,
) -> None:
    """Move `champion` back to the previous good version through the `rollback/manual` deployment of a running
    stack: the run deploys it at once and records the version left as rolled back (when, by whom, why)."""
    from flywheel.cli.rollback import run_rollback
    from flywheel.core.settings import get_settings

    try:
        run_rollback(get_settings(), model, to_version, reason, echo=typer.echo)
    except UserError as exc:
        _fail(exc)


@app.command("rotate-webhook-secret")
def rotate_webhook_secret() -> None:
    """Replace the MLflow webhook's signing secret of a running stack; no delivery is lost during the switch."""
    from flywheel.bridge.secrets import rotate_secret
    from flywheel.core.settings import get_settings
    from flywheel.stack import local
    from flywheel.tasks import registry

    settings = get_settings()
    stack = local.running_stack(settings)
    if not stack:
        _fail(RuntimeError(f"no Flywheel stack is running from {settings.state_path}: start it with `flywheel up`"))
    rotate_secret(settings.state_path, registry.client(stack["mlflow_url"]), stack["bridge_url"] + "/webhooks/mlflow")
    typer.echo("webhook secret rotated (MLflow webhook updated; the bridge accepts the old one for a grace period)")


def _with_overrides(base, **overrides):
    """The spec with the command-line flags applied; an inconsistent result is the user's SpecError."""
    from pydantic import ValidationError

    from flywheel.core.spec import SpecError

    try:
        return base.with_overrides(**overrides)
    except ValidationError as exc:
        msgs = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise SpecError(f"dataset spec with the command-line options is invalid: {msgs}") from exc


def _write_effective_spec(settings, ds) -> Path:
    """CLI overrides become a spec file in the state dir so the flow run records exactly what it used."""
    import yaml

    from flywheel.stack import local

    path = local.state_dir(settings) / "specs" / f"{ds.name}-cli.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(ds.model_dump(), sort_keys=False))
    return path


def _print_train_result(result: dict) -> None:
    if result["status"] == "unchanged":
        typer.echo(
            f"{result['model_name']} v{result['version']} already holds this data, params and code: nothing new."
        )
    else:
        verdict = "promoted to champion" if result["promoted"] else "kept as challenger (gate failed)"
        typer.echo(f"registered {result['model_name']} v{result['version']}: {verdict}")
        for reason in (result.get("gate") or {}).get("reasons", []):
            typer.echo(f"  - {reason}")
    unlabeled = result.get("rows_unlabeled")  # the flow's count, where it reports one
    if unlabeled is not None:
        typer.echo(f"rows without a label (not trained on): {unlabeled}")
    typer.echo(json.dumps({k: result[k] for k in ("model_name", "version", "promoted", "metrics")}, indent=2))


if __name__ == "__main__":
    app()
