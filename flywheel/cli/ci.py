"""`flywheel ci`: the train flow as a CI step — a Markdown report, a JSON verdict and an exit code.

Exit codes: 0 the gate passed (or the run was "unchanged" and that version had passed its gate), 1 the gate
failed, 2 a user error (bad spec, params or data; MLflow unreachable) — the same errors `flywheel train`
reports. The report goes to `<state_dir>/ci-report.md` (or `--report`), is appended to `$GITHUB_STEP_SUMMARY`
when that is set, and `ci-result.json` beside it carries what a pipeline needs for its deploy step:
`model_name`, `version`, `deploy` (true only when that version is the champion now) and `exit_code`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_PASSED = 0
EXIT_GATE_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_CRASHED = 1  # anything else that goes wrong propagates; Python then exits 1 with its traceback

REPORT_NAME = "ci-report.md"
RESULT_NAME = "ci-result.json"

# Metrics where a smaller value is better (flywheel.tasks.evaluation.HIGHER_IS_BETTER lists the others). Kept
# here so rendering a report never imports scikit-learn or Prefect.
LOWER_IS_BETTER = frozenset({"rmse", "mae"})
UNCHANGED_NOTE = " (nothing new registered: same data, params and code)"


# ------------------------------------------------------------------------------------------------ verdict
def _is_champion(result: dict) -> bool:
    """For an "unchanged" run: does `champion` point at the version the run found?"""
    champ = (result.get("recorded_gate") or {}).get("champion_version")
    return champ is not None and str(champ) == str(result.get("version"))


def exit_code(result: dict) -> int:
    """The CI verdict of a train-flow result (as enriched by `run_ci` for an "unchanged" run)."""
    status = result.get("status")
    if status == "error":
        return EXIT_USER_ERROR
    if status == "crashed":
        return EXIT_CRASHED
    if status == "unchanged":
        recorded = result.get("recorded_gate") or {}
        return EXIT_PASSED if recorded.get("passed") or _is_champion(result) else EXIT_GATE_FAILED
    gate = result.get("gate") or {}
    return EXIT_PASSED if gate.get("passed", result.get("promoted", False)) else EXIT_GATE_FAILED


def should_deploy(result: dict) -> bool:
    """Whether a pipeline may deploy `version` as champion: only the version `champion` points at now.

    `deploy-model` run by hand moves the alias to the version it is given, so deploying an unchanged version that
    is no longer champion would roll production back; this says no to that.
    """
    if result.get("status") == "registered":
        return bool(result.get("promoted"))
    if result.get("status") == "unchanged":
        return _is_champion(result)
    return False


def ci_summary(result: dict, report_path: Path | None = None) -> dict:
    """The small JSON a pipeline reads (`jq -r .version ci-result.json`)."""
    code = exit_code(result)
    gate = result.get("gate") or {}
    verdict = "passed" if code == EXIT_PASSED else "failed"
    return {
        "exit_code": code,
        "verdict": "error" if result.get("status") in ("error", "crashed") else verdict,
        "deploy": should_deploy(result),
        "status": result.get("status"),
        "model_name": result.get("model_name"),
        "version": result.get("version"),
        "promoted": bool(result.get("promoted")),
        "data_hash": result.get("data_hash"),
        "rows": result.get("rows"),
        "rows_unlabeled": result.get("rows_unlabeled"),
        "window": list(result.get("window") or (None, None)),
        "metrics": result.get("metrics") or {},
        "gate_metric": gate.get("metric"),
        "champion_version": gate.get("champion_version") or (result.get("recorded_gate") or {}).get("champion_version"),
        "reasons": gate.get("reasons") or (result.get("recorded_gate") or {}).get("reasons") or [],
        "error": result.get("error"),
        "report": str(report_path) if report_path else None,
    }


# ------------------------------------------------------------------------------------------------- report
def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _delta(metric: str, candidate: float | None, champion: float | None) -> str:
    if candidate is None or champion is None:
        return ""
    diff = candidate - champion
    if abs(diff) < 5e-5:
        return "±0.0000"
    better = diff < 0 if metric in LOWER_IS_BETTER else diff > 0
    return f"{diff:+.4f} {'▲' if better else '▼'}"


def _md(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _metrics_table(
    candidate: dict, champion: dict | None, champion_label: str, primary: str | None,
    baseline: dict | None = None, baseline_label: str = "baseline",
) -> list[str]:  # fmt: skip
    """Candidate vs champion (with the change), or the candidate alone when there is no champion to compare; with
    the trivial baseline's metrics on the same holdout in a last column when the gate recorded them."""
    if not candidate and not champion:
        return ["_No metrics were recorded._"]
    keys = sorted(set(candidate) | set(champion or {}))
    mark = lambda key: f"**{key}** (primary)" if key == primary else key  # noqa: E731
    base_head, base_rule = (f" {baseline_label} |", "---:|") if baseline is not None else ("", "")
    base = lambda key: f" {_fmt((baseline or {}).get(key))} |" if baseline is not None else ""  # noqa: E731
    if champion is None:
        lines = [f"| metric | candidate |{base_head}", f"|---|---:|{base_rule}"]
        return lines + [f"| {mark(key)} | {_fmt(candidate.get(key))} |{base(key)}" for key in keys]
    lines = [
        f"| metric | candidate | {champion_label} | Δ (candidate − champion) |{base_head}",
        f"|---|---:|---:|---|{base_rule}",
    ]
    for key in keys:
        cand, champ = candidate.get(key), champion.get(key)
        lines.append(f"| {mark(key)} | {_fmt(cand)} | {_fmt(champ)} | {_delta(key, cand, champ)} |{base(key)}")
    return lines


def _primary(metrics: dict) -> str | None:
    """The gate's primary metric (F1 for binary, macro F1 for multiclass, RMSE for regression) among the metrics."""
    return next((m for m in ("f1", "f1_macro", "rmse") if m in metrics), None)


def render_report(result: dict) -> str:
    """The Markdown report of one `flywheel ci` run: headline verdict, facts, metrics vs champion, gate reasons."""
    status = result.get("status")
    name = result.get("model_name") or "model"
    version = result.get("version")
    code = exit_code(result)

    if status in ("error", "crashed"):
        what = "error" if status == "error" else "crashed"
        return "\n".join([
            f"## Flywheel model CI: `{name}` — ⛔ {what} (exit {code})",
            "",
            "The run did not finish:",
            "",
            "```",
            str(result.get("error") or "unknown error"),
            "```",
            "",
        ])  # fmt: skip

    gate = result.get("gate") or {}
    recorded = result.get("recorded_gate") or {}
    if status == "unchanged":
        if code == EXIT_PASSED:
            verdict = "✅ unchanged — this version passed its gate"
        else:
            verdict = "❌ unchanged — this version did not pass its gate"
    elif code == EXIT_PASSED:
        verdict = "✅ gate passed — promoted to `champion`"
    else:
        verdict = "❌ gate failed — stays `challenger`"

    start, end = (list(result.get("window") or []) + [None, None])[:2]
    window = f"{start or '…'} → {end or '…'}" if (start or end) else "all data"
    lines = [f"## Flywheel model CI: `{name}` v{version}: {verdict}", ""]
    lines += ["| | |", "|---|---|"]
    lines += [
        f"| model | `{name}` v{version} |",
        f"| status | {status}{UNCHANGED_NOTE if status == 'unchanged' else ''} |",
        f"| data hash | `{result.get('data_hash') or '—'}` |",
        f"| rows | {result.get('rows') if result.get('rows') is not None else '—'} |",
        *([f"| rows without a label (left out) | {n} |"] if (n := result.get("rows_unlabeled")) else []),
        f"| event-time window | {window} |",
        f"| deploy | {'yes: this version is `champion`' if should_deploy(result) else 'no'} |",
        f"| exit code | {code} |",
        "",
    ]  # fmt: skip

    metrics = result.get("metrics") or {}
    if status == "unchanged":
        champ_version = recorded.get("champion_version")
        champ_metrics = None if str(champ_version) == str(version) else recorded.get("champion_metrics")
        label = "champion" + (f" (v{champ_version})" if champ_version else "")
        lines += ["### Metrics (logged holdout metrics of this version)", ""]
        lines += _metrics_table(metrics, champ_metrics, label, _primary(metrics))
        lines += ["", "### Gate (recorded when this version was registered)", ""]
        if recorded.get("passed") is None:
            lines.append("No gate verdict is recorded on this version.")
        else:
            lines.append(f"**{'PASSED' if recorded['passed'] else 'FAILED'}**.")
        if champ_version:
            same = str(champ_version) == str(version)
            lines.append(f"`champion` is v{champ_version}{' (this version)' if same else ''}.")
        else:
            lines.append("The model has no `champion`.")
        reasons = recorded.get("reasons") or []
    else:
        champ_version = gate.get("champion_version")
        label = f"champion (v{champ_version})" if champ_version else "champion (none)"
        lines += ["### Metrics (holdout)", ""]
        baseline, baseline_label = gate.get("baseline"), f"baseline ({gate.get('baseline_model') or 'trivial'})"
        lines += _metrics_table(
            gate.get("candidate") or metrics, gate.get("champion"), label, gate.get("metric"), baseline, baseline_label
        )
        lines += ["", "### Gate", ""]
        passed = gate.get("passed", result.get("promoted", False))
        first = "the trivial baseline and the floors set" if baseline is not None else "the absolute floors only"
        head = f"v{champ_version}" if champ_version else f"none (first model: held to {first})"
        lines.append(f"**{'PASSED' if passed else 'FAILED'}**. Primary metric: `{gate.get('metric', '—')}`. "
                     f"Champion: {head}.")  # fmt: skip
        reasons = gate.get("reasons") or []
    if reasons:
        lines += ["", "Reasons:", ""]
        lines += [f"- {_md(r)}" for r in reasons]
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- run
def _train(**kwargs: Any) -> dict:
    """The train flow itself (a seam: unit tests replace it)."""
    from flywheel.flows.train import train as train_flow

    return train_flow(**kwargs)


def recorded_gate(model_name: str, version: str) -> dict:
    """For an "unchanged" run: the gate verdict recorded on that version, and the model's champion now."""
    from flywheel.tasks import registry

    client = registry.client()
    mv = client.get_model_version(model_name, str(version))
    tags = mv.tags or {}
    passed_tag = tags.get(registry.TAG_GATE_PASSED)
    try:
        reasons = json.loads(tags.get(registry.TAG_GATE_REASONS) or "[]")
    except json.JSONDecodeError:
        reasons = [tags[registry.TAG_GATE_REASONS]]
    champ = registry.get_alias_version(client, model_name, registry.CHAMPION)
    champ_metrics = None
    if champ is not None and champ.version != str(version):
        champ_metrics = registry.version_metrics(client, champ) or None
    return {
        "passed": None if passed_tag is None else passed_tag.lower() == "true",
        "reasons": reasons if isinstance(reasons, list) else [str(reasons)],
        "champion_version": champ.version if champ is not None else None,
        "champion_metrics": champ_metrics,
    }


def _precheck(spec: Path | None, data: str | None, params: Path | None, start, end, model_name) -> None:
    """Fail on a bad spec, params file or data before any server starts (the checks of `flywheel train`)."""
    from flywheel.cli.precheck import check_train_input

    check_train_input(spec, data, params, start, end, model_name)


def write_outputs(result: dict, report_path: Path, summary_env: str = "GITHUB_STEP_SUMMARY") -> str:
    """Write the report and `ci-result.json` beside it; append the report to the job summary file if set."""
    report = render_report(result)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report, encoding="utf-8")
    result_path = report_path.with_name(RESULT_NAME)
    result_path.write_text(json.dumps(ci_summary(result, report_path), indent=2, default=str) + "\n", encoding="utf-8")
    summary = os.environ.get(summary_env) if summary_env else None
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(report if report.endswith("\n") else report + "\n")
    return report


def _error(exc: Exception, name: str, report_path: Path, summary_env: str, echo, status: str = "error") -> int:
    result = {"status": status, "model_name": name, "error": f"{type(exc).__name__}: {exc}"}
    write_outputs(result, report_path, summary_env)
    echo(f"error: {exc}")
    echo(f"report: {report_path}")
    return exit_code(result)


def run_ci(
    spec: Path | str | None = None,
    data: str | None = None,
    params: Path | str | None = None,
    start: str | None = None,
    end: str | None = None,
    model_name: str | None = None,
    report_path: Path | None = None,
    summary_env: str = "GITHUB_STEP_SUMMARY",
    *,
    echo: Callable[[str], None] = print,
) -> int:
    """Run the train flow like `flywheel train`, write the report and verdict, and return the CI exit code."""
    from flywheel.core.errors import UserError
    from flywheel.core.settings import get_settings
    from flywheel.stack import local

    settings = get_settings()
    spec = Path(spec) if spec else None
    params = Path(params) if params else None
    report_path = Path(report_path) if report_path else local.state_dir(settings) / REPORT_NAME
    name = model_name or settings.model_name

    try:
        _precheck(spec, data, params, start, end, model_name)
    except (UserError, ValueError) as exc:  # ValueError: pydantic's complaint about an inconsistent spec
        return _error(exc, name, report_path, summary_env, echo)

    local.prepare_env(settings)
    try:
        with local.tracking_server(settings) as uri:
            echo(f"MLflow tracking server: {uri}")
            result = _train(
                spec_path=str(spec) if spec else None,
                data_uri=data,
                params_path=str(params) if params else None,
                start=start,
                end=end,
                model_name=model_name,
            )
            if result.get("status") == "unchanged":
                result = {**result, "recorded_gate": recorded_gate(result["model_name"], result["version"])}
    except UserError as exc:
        return _error(exc, name, report_path, summary_env, echo)
    except Exception as exc:  # not the user's fault: report it, then let it propagate with its traceback
        _error(exc, name, report_path, summary_env, echo, status="crashed")
        raise

    report = write_outputs(result, report_path, summary_env)
    echo(report)
    echo(f"report: {report_path}")
    return exit_code(result)
