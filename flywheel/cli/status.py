"""`flywheel status`: what runs, where, and what each model serves, as tables a person reads (no raw JSON).

`gather` collects plain data (stack file, process liveness, the registry's aliases and tags, what the model servers
answer); `format_status` turns it into text. The registered-model tags `last_deployment` and `last_drift` hold
readable text (older registries: JSON, with `*_json` companions): either is shown as one readable line.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

URL_LABELS = (
    ("mlflow_url", "MLflow UI + registry"),
    ("prefect_url", "Prefect UI"),
    ("prefect_api_url", "Prefect API"),
    ("model_url", "model server (champion)"),
    ("staging_url", "model server (challenger)"),
    ("bridge_url", "webhook bridge"),
)
MAX_MODELS = 20
CELL = 80  # wrap width of a table cell
MAX_TEXT = 400


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns under a header and a rule; a long cell wraps onto further lines of its column."""
    wrapped = [[textwrap.wrap(_clip(str(c)), CELL) or [""] for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in wrapped:
        widths = [max(w, *(len(part) for part in cell)) for w, cell in zip(widths, row, strict=True)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()  # noqa: E731
    out = [line(headers), line(["-" * w for w in widths])]
    for row in wrapped:
        for i in range(max(len(cell) for cell in row)):
            out.append(line([cell[i] if i < len(cell) else "" for cell in row]))
    return "\n".join(out)


def _clip(text: str, width: int = MAX_TEXT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _as_dict(value: Any) -> dict | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def describe_deployment(value: Any) -> str:
    """One line for the `last_deployment` tag: JSON of a ledger record, or text already meant for people."""
    if value in (None, ""):
        return "none yet"
    rec = _as_dict(value)
    if rec is None:
        return _clip(str(value))
    version = rec.get("version")
    parts = [f"v{version}" if version not in (None, "") else "?", str(rec.get("outcome") or "?")]
    if rec.get("alias"):
        parts.append(f"({rec['alias']})")
    when = rec.get("finished_at") or rec.get("started_at") or rec.get("at")
    if when:
        parts.append(f"at {when}")
    if rec.get("trigger"):
        parts.append(f"by {rec['trigger']}")
    if rec.get("previous_version"):
        parts.append(f"after v{rec['previous_version']}")
    text = " ".join(parts)
    if rec.get("reason"):
        text += f": {rec['reason']}"
    return _clip(text)


def describe_drift(value: Any) -> str:
    """One line for the `last_drift` tag: text already meant for people (what the drift check writes), or JSON of a
    verdict (an older registry's tag), read as the drift check reads its own verdicts."""
    if value in (None, ""):
        return "no check yet"
    verdict = _as_dict(value)
    if verdict is None:
        return _clip(str(value))
    from flywheel.tasks.monitoring import drift_sentence

    return _clip(drift_sentence(verdict))


def format_status(data: dict) -> str:
    """The status as text: the supervisor line, processes, URLs, then each model."""
    out: list[str] = []
    sup = data.get("supervisor")
    if sup is None:
        out.append(f"no Flywheel stack is running from {data.get('state_dir')}")
        return "\n".join(out)
    if sup.get("alive"):
        out.append(f"supervisor (flywheel up) pid {sup.get('pid')}: running — state in {data.get('state_dir')}")
    else:
        out.append(
            f"supervisor (flywheel up) pid {sup.get('pid')}: DEAD — nothing restarts or stops the stack; "
            "`flywheel up` again stops what is left and starts afresh"
        )
    procs = data.get("processes") or []
    if procs:
        out += ["", table(["process", "pid", "state"], [[p["name"], str(p["pid"]), p["state"]] for p in procs])]
    urls = data.get("urls") or {}
    rows = [[label, urls[key]] for key, label in URL_LABELS if urls.get(key)]
    if rows:
        out += ["", table(["service", "URL"], rows)]
    models = data.get("models")
    if models is None:
        out += ["", f"models: {data.get('registry_error') or 'the MLflow server is not answering'}"]
    elif not models:
        out += ["", "models: none registered yet"]
    else:
        aliases = [[m["name"], _version(m.get("champion")), _version(m.get("challenger")), m.get("serving") or "—"]
                   for m in models]  # fmt: skip
        history = []
        for m in models:
            history.append([m["name"], "last deployment", describe_deployment(m.get("last_deployment"))])
            history.append(["", "last drift check", describe_drift(m.get("last_drift"))])
        out += ["", table(["model", "champion", "challenger", "serving"], aliases)]
        out += ["", table(["model", "event", "what happened"], history)]
    return "\n".join(out)


def _version(v: Any) -> str:
    return f"v{v}" if v not in (None, "") else "—"


# ----------------------------------------------------------------------------------------------- gathering
def _tag(tags: dict, name: str) -> Any:
    """The readable tag, falling back to a machine-readable companion (`<name>_json`, `<name>.json`)."""
    for key in (name, f"{name}_json", f"{name}.json"):
        if tags.get(key):
            return tags[key]
    return None


def gather(settings) -> dict:
    """Plain data for `format_status`, from the state dir's stack file, /proc and the stack's servers."""
    import httpx

    from flywheel.stack import local
    from flywheel.stack.supervisor import live_children, pid_alive

    stack = local.read_stack_file(settings)
    data: dict[str, Any] = {"state_dir": str(settings.state_path)}
    if not stack or not stack.get("supervisor_pid"):
        data["supervisor"] = None
        return data
    data["supervisor"] = {"pid": stack["supervisor_pid"], "alive": pid_alive(int(stack["supervisor_pid"]))}
    alive = live_children(stack)
    gave_up, restarting = stack.get("gave_up") or {}, set(stack.get("restarting") or [])
    data["processes"] = [
        {"name": name, "pid": pid, "state": _state(name, name in alive, gave_up, restarting)}
        for name, pid in (stack.get("pids") or {}).items()
    ]
    data["urls"] = {k: stack[k] for k, _ in URL_LABELS if stack.get(k)}
    mlflow_url = stack.get("mlflow_url")
    try:
        up = bool(mlflow_url) and httpx.get(mlflow_url + "/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        up = False
    if not up:
        data["models"] = None
        return data
    serving = _served(stack.get("model_url"))
    try:
        data["models"] = _models(mlflow_url, stack.get("model_name") or settings.model_name, serving)
    except Exception as exc:  # the registry answering badly must not hide the rest of the status
        data["models"] = None
        data["registry_error"] = f"could not read the registry: {type(exc).__name__}: {exc}"
    return data


def _state(name: str, alive: bool, gave_up: dict, restarting: set) -> str:
    if name in gave_up:
        return f"GAVE UP ({gave_up[name]})"
    if name in restarting:
        return "restarting"
    return "running" if alive else "DEAD"


def _served(model_url: str | None) -> dict:
    import httpx

    if not model_url:
        return {}
    try:
        return httpx.get(model_url + "/version", timeout=3).json()
    except (httpx.HTTPError, ValueError):
        return {"error": "not answering"}


def _models(mlflow_url: str, stack_model: str, served: dict) -> list[dict]:
    from flywheel.tasks import registry

    client = registry.client(mlflow_url)
    names = [m.name for m in client.search_registered_models(max_results=MAX_MODELS)]
    names.sort(key=lambda n: (n != stack_model, n))
    models = []
    for name in names:
        model = client.get_registered_model(name)
        aliases, tags = dict(model.aliases or {}), dict(model.tags or {})
        serving = None
        if name == stack_model:
            serving = "not answering" if "error" in served else _version(served.get("model_version"))
        models.append(
            {
                "name": name, "champion": aliases.get("champion"), "challenger": aliases.get("challenger"),
                "serving": serving, "last_deployment": _tag(tags, "last_deployment"),
                "last_drift": _tag(tags, "last_drift"),
            }
        )  # fmt: skip
    return models
