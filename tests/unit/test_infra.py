"""infra/, checked offline without a container engine: real validators and parsers where they exist, structure
cross-checks where they do not.

- docker-compose.yml: the compose-spec JSON schema vendored in check-jsonschema (and a broken copy it rejects);
  every `${VAR}` defined in .env.example; service_healthy dependencies have healthchecks; published ports on
  127.0.0.1; the commands of the services built from infra/Dockerfile parsed by the real parsers of their entry
  points (flywheel.serving's argparse, the bridge's main, mlflow's click command, Prefect's cyclopts app).
- The worker's rendering of prefect.yaml onto a work pool, validated by Prefect's own prefect.yaml model.
- Prometheus rules and Grafana panels: balanced PromQL, and every metric name they use exists in the model
  server's real metrics registry (or is a drift metric of DRIFT_METRICS); the live scrape is
  tests/integration/test_metrics_scrape.py.
- Kubernetes: no schema is installed offline (no kubernetes client, no kubeconform), so manifests are checked for
  apiVersion/kind/required fields and cross-references (selectors ↔ pod labels, probe ports ↔ container ports,
  envFrom/serviceAccount/PVC/roleRef ↔ defined objects, ConfigMap ↔ the worker's renderer).
- Shell scripts pass shellcheck; the Dockerfile is parsed instruction by instruction.

Every external tool runs with proxies pointed at a closed local port, so a download attempt fails the test.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from offline_tools import offline_env, tool

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
DOCKERFILE = INFRA / "Dockerfile"
PROMETHEUS = INFRA / "prometheus" / "prometheus.yml"
ALERTS = INFRA / "prometheus" / "alerts.yml"
DASHBOARD = INFRA / "grafana" / "dashboards" / "flywheel.json"
DATASOURCE = INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = INFRA / "grafana" / "provisioning" / "dashboards" / "flywheel.yml"
K8S = INFRA / "k8s"
WORKER_SCRIPT = INFRA / "worker" / "entrypoint.sh"
RENDERER = INFRA / "worker" / "render_deployments.py"

# The metrics the check-drift flow pushes to the Pushgateway (one series per model). Until the flow's own
# registry exists, this list is the contract the dashboard and the alert rules are held to.
DRIFT_METRICS = (
    "flywheel_drift_share",
    "flywheel_drift_detected",
    "flywheel_drift_last_check_timestamp_seconds",
)
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ENCRYPTION_KEY")
PLACEHOLDERS = {"change-me", ""}


# ------------------------------------------------------------------------------------------------- helpers
def start_compose_schema_check(path: Path) -> subprocess.Popen:
    cmd = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=offline_env())


def read_env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f".env.example: not KEY=VALUE: {line!r}"
        assert key not in values, f".env.example defines {key} twice"
        values[key] = value
    return values


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def compose_variables(text: str) -> set[str]:
    """Variables compose interpolates (`$$` is a literal dollar for the container)."""
    return {m.group(1) or m.group(4) for m in _VAR.finditer(text.replace("$$", ""))}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation of one string with .env.example's values (`${V}`, `${V:-d}`, `${V:?e}`, `$V`)."""

    def repl(m: re.Match) -> str:
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        current = env.get(name)
        if op in (":-", "-"):
            return current if current else (arg or "")
        if op in (":?", "?"):
            assert current, f"{name} is required ({arg}) but empty in .env.example"
        return current or ""

    return _VAR.sub(repl, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_example()


def built_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def load_renderer():
    spec = importlib.util.spec_from_file_location("flywheel_infra_render_deployments", RENDERER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A subprocess that parses the MLflow server command with mlflow's own click command (importing mlflow.cli takes
# ~5 s, so it runs beside the other tests and is collected by test_mlflow_server_command_parses_with_mlflow_cli).
_MLFLOW_PARSE = """
import json, sys
from mlflow.cli import server
ctx = server.make_context("server", json.loads(sys.argv[1]))
print(json.dumps({k: str(v) for k, v in ctx.params.items() if v is not None}))
"""


@pytest.fixture(scope="module", autouse=True)
def mlflow_cli_parse(compose, env_example):
    command = [interpolate(str(t), env_example) for t in compose["services"]["mlflow"]["command"]]
    assert command[:2] == ["mlflow", "server"], command
    proc = subprocess.Popen(
        [sys.executable, "-c", _MLFLOW_PARSE, json.dumps(command[2:])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=offline_env(),
    )  # fmt: skip
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------- compose
# Broken copies the schema must reject: proof that the validation looks at the file at all.
BREAKAGES = {
    "unknown-key": lambda c: c["services"]["mlflow"].update(helthcheck={"test": ["CMD", "true"]}),
    "bad-depends-on-condition": lambda c: c["services"]["worker"]["depends_on"]["mlflow"].update(
        condition="service_happy"
    ),
    "bad-type": lambda c: c["services"]["postgres"]["healthcheck"].update(retries=["many"]),
}


@pytest.fixture(scope="module", autouse=True)
def schema_checks(compose, tmp_path_factory):
    """check-jsonschema on the real file and on each broken copy, started together (each takes ~1 s to start)."""
    procs = {"real": start_compose_schema_check(COMPOSE)}
    for name, breakage in BREAKAGES.items():
        broken = copy.deepcopy(compose)
        breakage(broken)
        path = tmp_path_factory.mktemp(f"compose-{name}") / "docker-compose.yml"
        path.write_text(yaml.safe_dump(broken, sort_keys=False))
        procs[name] = start_compose_schema_check(path)
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_compose_validates_against_compose_spec(schema_checks):
    out, _ = schema_checks["real"].communicate(timeout=60)
    assert schema_checks["real"].returncode == 0, out


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_compose_schema_rejects_a_broken_copy(schema_checks, breakage):
    proc = schema_checks[breakage]
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, f"the schema accepted a broken compose file ({breakage}): {out}"
    assert "Schema validation errors" in out, out


def test_every_compose_variable_is_defined_in_env_example(env_example):
    used = compose_variables(COMPOSE.read_text())
    missing = sorted(used - set(env_example))
    assert not missing, f"docker-compose.yml uses variables .env.example does not define: {missing}"
    unused = sorted(set(env_example) - used - {"COMPOSE_PROJECT_NAME"})
    assert not unused, f".env.example defines variables docker-compose.yml never uses: {unused}"


def test_env_example_holds_placeholders_not_secrets(env_example):
    for key, value in env_example.items():
        if SECRET_KEY.search(key):
            assert value in PLACEHOLDERS, f".env.example: {key} must be a placeholder (change-me), not {value!r}"
    assert env_example["MINIO_ROOT_PASSWORD"] and len(env_example["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO's minimum


def test_compose_has_no_literal_credentials(compose):
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            value = str(value)
            if SECRET_KEY.search(key) or key == "AWS_SECRET_ACCESS_KEY":
                assert value.startswith("${"), f"{name}.{key} must come from infra/.env, not a literal"
            for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
                assert password.startswith("${"), f"{name}.{key}: a literal password in a URL"


def test_service_healthy_dependencies_have_healthchecks(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must say which condition it waits for"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on an unknown service {dep}"
            condition = spec.get("condition")
            if condition == "service_healthy":
                check = services[dep].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), f"{name} waits for {dep} to be healthy: no check"
            elif condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot job: restart must be 'no'"
    long_running = [n for n, s in services.items() if s.get("restart") != "no"]
    for name in long_running:
        assert services[name].get("healthcheck", {}).get("test"), f"{name}: every long-running service has a check"
        assert services[name].get("restart") == "unless-stopped", f"{name}: no restart policy"


def test_published_ports_bind_loopback(compose):
    published = 0
    for name, svc in compose["services"].items():
        for port in svc.get("ports") or []:
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port} does not bind 127.0.0.1"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: port {port!r} does not bind 127.0.0.1"
        if str(svc.get("network_mode", "")).startswith("service:"):
            assert not svc.get("ports"), f"{name} shares another service's network: publish ports there"
    assert published >= 8


def test_upstream_images_are_pinned_and_built_images_come_from_the_dockerfile(compose, env_example):
    for name, svc in compose["services"].items():
        image = svc["image"]
        if "build" in svc:
            assert image.startswith("${FLYWHEEL_"), f"{name}: built images are named in .env"
            build = svc["build"]
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
            assert ":" in interpolate(image, env_example)
        else:
            repo, _, tag = image.rpartition(":")
            assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: unpinned image {image!r}"


def test_model_server_commands_parse_with_its_parser(compose, env_example):
    from flywheel.serving.__main__ import _parser

    roles = {}
    for name, svc in built_services(compose).items():
        command = [interpolate(str(t), env_example) for t in svc.get("command") or []]
        if command[:3] != ["python", "-m", "flywheel.serving"]:
            continue
        args = _parser().parse_args(command[3:])
        assert args.host == "0.0.0.0", f"{name}: a container must bind all its interfaces"
        roles[args.role] = (args.initial_alias, args.port, str(args.request_log_dir), svc)
        check = " ".join(svc["healthcheck"]["test"])
        assert f":{args.port}/" in check, f"{name}: its healthcheck probes another port"
    assert set(roles) == {"production", "staging"}
    assert roles["production"][0] == "champion" and roles["staging"][0] == "challenger"
    assert "/ping" in " ".join(roles["production"][3]["healthcheck"]["test"])
    # The staging server shares model-server's network: the deploy flow reaches both on FLYWHEEL_HOST.
    assert roles["staging"][3]["network_mode"] == "service:model-server"
    worker = compose["services"]["worker"]["environment"]
    assert worker["FLYWHEEL_HOST"] == "model-server"
    assert int(worker["FLYWHEEL_SERVING_PORT"]) == roles["production"][1]
    assert int(worker["FLYWHEEL_STAGING_PORT"]) == roles["staging"][1]
    # The drift check reads the production request log from the same volume.
    assert roles["production"][2] == "/state/serving/production" and worker["FLYWHEEL_STATE_DIR"] == "/state"
    mounts = {m.split(":")[0] for m in compose["services"]["worker"]["volumes"]}
    assert mounts & {m.split(":")[0] for m in roles["production"][3]["volumes"]}


def test_bridge_command_parses_with_the_bridge_main(compose, env_example, monkeypatch, fresh_settings):
    import flywheel.bridge.__main__ as bridge

    svc = compose["services"]["bridge"]
    command = [interpolate(str(t), env_example) for t in svc["command"]]
    assert command[:3] == ["python", "-m", "flywheel.bridge"]
    seen = {}
    monkeypatch.setattr(bridge, "load_or_create_secret", lambda state_dir: "file-secret")
    monkeypatch.setattr(bridge, "run_bridge", lambda host, port, secret, state_dir, **kw: seen.update(
        host=host, port=port, secret=secret, state_dir=state_dir))  # fmt: skip
    monkeypatch.setenv("FLYWHEEL_WEBHOOK_SECRET", "from-env")
    monkeypatch.setattr(sys, "argv", command[2:])
    bridge.main(command[3:])
    assert seen["host"] == "0.0.0.0" and seen["secret"] == "from-env"
    assert str(seen["state_dir"]) == "/state"
    assert f":{seen['port']}/health" in " ".join(svc["healthcheck"]["test"])
    assert compose["services"]["webhook-init"]["environment"]["FLYWHEEL_BRIDGE_URL"] == f"http://bridge:{seen['port']}"
    assert (
        svc["environment"]["FLYWHEEL_WEBHOOK_SECRET"]
        == compose["services"]["webhook-init"]["environment"]["FLYWHEEL_WEBHOOK_SECRET"]
    )


def test_one_shot_scripts_exist_where_the_image_puts_them(compose):
    dockerfile = DOCKERFILE.read_text()
    for name, svc in built_services(compose).items():
        tokens = list(svc.get("entrypoint") or []) + [str(t) for t in svc.get("command") or []]
        for token in tokens:
            if token.startswith("/app/"):
                assert (ROOT / token.removeprefix("/app/")).is_file(), f"{name}: {token} is not in the repository"
            elif token.endswith(".py") and "/" in token:
                assert (ROOT / token).is_file(), f"{name}: {token} is not in the repository"
            else:
                continue
            top = Path(token.removeprefix("/app/")).parent.as_posix()
            assert re.search(rf"^COPY {re.escape(top)} ", dockerfile, re.M), f"the image lacks {top} ({name})"


def _prefect_commands(script: str) -> list[list[str]]:
    joined = script.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
        for m in re.finditer(r"(?:^|[\s;(])(prefect\s[^;&|>\n]*)", line):
            tokens = shlex.split(m.group(1))
            commands.append([t if not t.startswith("$") else "VALUE" for t in tokens[1:]])
    return commands


def test_worker_script_prefect_commands_parse_with_prefect_cli():
    from prefect.cli._app import _app

    commands = _prefect_commands(WORKER_SCRIPT.read_text())
    verbs = set()
    for tokens in commands:
        if tokens[:1] == ["--no-prompt"]:
            tokens = tokens[1:]
        command, bound, _ = _app.parse_args(tokens)  # raises SystemExit on an unknown command or option
        verbs.add(" ".join(tokens[:2]))
        if tokens[:2] == ["worker", "start"]:
            assert bound.arguments["with_healthcheck"] is True
            assert bound.arguments["install_policy"].value == "never"
        if tokens[:1] == ["deploy"]:
            assert bound.arguments["deploy_all"] is True and "prefect_file" in bound.arguments
    assert {"work-pool inspect", "work-pool create", "deploy --all", "worker start"} <= verbs
    assert "get-default-base-job-template" in " ".join(verbs)


def test_prefect_server_command_parses_with_prefect_cli(compose, env_example):
    from prefect.cli._app import _app

    svc = compose["services"]["prefect-server"]
    command = [interpolate(str(t), env_example) for t in svc["command"]]
    assert command[0] == "prefect"
    _, bound, _ = _app.parse_args(command[1:])
    assert bound.arguments["host"] == "0.0.0.0"
    assert f":{bound.arguments['port']}/api/health" in " ".join(svc["healthcheck"]["test"])
    assert svc["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    api = compose["x-flywheel-env"]["PREFECT_API_URL"]
    assert api == f"http://prefect-server:{bound.arguments['port']}/api"


def test_worker_pool_matches_prefect_yaml_and_render_validates_with_prefect(compose, env_example, tmp_path):
    from prefect.cli.deploy._models import PrefectYamlModel

    render = load_renderer()
    source = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in source["deployments"]}
    assert pools == {env_example["FLYWHEEL_WORK_POOL"]}, "the process worker must poll the pool prefect.yaml names"
    assert compose["services"]["worker"]["environment"]["FLYWHEEL_WORK_POOL_TYPE"] == "process"

    docker = compose["services"]["worker-docker"]
    assert docker["profiles"] == ["docker"]
    denv = {k: interpolate(str(v), env_example) for k, v in docker["environment"].items()}
    variables = render.job_variables("docker", denv)
    assert variables["networks"] == [compose["networks"]["default"]["name"]]
    volume = variables["volumes"][0].split(":")[0]
    assert compose["volumes"]["flywheel-state"]["name"] == volume
    assert variables["image"] == env_example["FLYWHEEL_IMAGE"]
    assert "FLYWHEEL_ADMIN_TOKEN" not in variables.get("env", {}) and variables["env"]["FLYWHEEL_HOST"]
    assert "prefect-docker" in interpolate(docker["build"]["args"]["WORKER_EXTRAS"], env_example)
    rendered = render.render_deployments(source, denv["FLYWHEEL_WORK_POOL"], variables)
    model = PrefectYamlModel.model_validate(rendered)
    assert len(model.deployments) == len(source["deployments"])
    assert {d.work_pool.name for d in model.deployments} == {env_example["FLYWHEEL_DOCKER_WORK_POOL"]}
    assert all(d.work_pool.job_variables["image"] == variables["image"] for d in model.deployments)
    assert [d["entrypoint"] for d in rendered["deployments"]] == [d["entrypoint"] for d in source["deployments"]]

    # The CLI writes the same thing the worker script deploys.
    out = tmp_path / "prefect.yaml"
    env = {**offline_env(), **denv}
    proc = subprocess.run([sys.executable, str(RENDERER), "deployments", "--source", str(ROOT / "prefect.yaml"),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(out.read_text()) == json.loads(json.dumps(rendered))


def test_render_refuses_secrets_in_job_variables_and_unknown_pool_types():
    render = load_renderer()
    with pytest.raises(render.RenderError, match="secrets"):
        render.job_variables("docker", {"FLYWHEEL_IMAGE": "i", "FLYWHEEL_JOB_ENV": "FLYWHEEL_ADMIN_TOKEN"})
    with pytest.raises(render.RenderError, match="unknown work pool type"):
        render.job_variables("ecs", {})
    with pytest.raises(render.RenderError, match="FLYWHEEL_IMAGE"):
        render.job_variables("kubernetes", {})
    assert render.job_variables("process", {}) == {}


# ------------------------------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        assert keyword.isupper(), f"Dockerfile: not an instruction: {line!r}"
        out.append((keyword, " ".join(rest.split())))
    return out


def test_dockerfile_pinned_non_root_and_installs_the_lock():
    ins = dockerfile_instructions()
    froms = [rest for kw, rest in ins if kw == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", froms[0]), froms
    users = [rest for kw, rest in ins if kw == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    assert [kw for kw, _ in ins].index("USER") > max(i for i, (kw, _) in enumerate(ins) if kw == "RUN")
    runs = [rest for kw, rest in ins if kw == "RUN"]
    copies = [rest for kw, rest in ins if kw == "COPY"]
    lock_copy = next(c for c in copies if c.startswith("requirements.lock "))
    lock_path = lock_copy.split()[-1]
    lock_install = [r for r in runs if f"-r {lock_path}" in r]
    assert lock_install and "uv pip install" in lock_install[0] and "--compile-bytecode" in lock_install[0]
    project = [r for r in runs if "--no-deps ." in r]
    assert project and "--compile-bytecode" in project[0], "the project goes in with --no-deps on top of the lock"
    assert runs.index(lock_install[0]) < runs.index(project[0])
    for kw, rest in ins:
        if kw in ("ENV", "ARG"):
            for name in re.findall(r"([A-Z_][A-Z0-9_]*)=", rest):
                assert not SECRET_KEY.search(name), f"Dockerfile bakes a secret-looking {kw} {name}"
    # Every COPY source exists and the build context's ignore file lets it through.
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for c in copies:
        for src in c.split()[:-1]:
            if src.startswith("--"):
                continue
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"COPY {src} is excluded by Dockerfile.dockerignore"
    uid = users[-1].split(":")[0]
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            ctx = ((doc or {}).get("spec", {}).get("template", {}).get("spec", {}) or {}).get("securityContext")
            if ctx:
                assert str(ctx["runAsUser"]) == uid and ctx["runAsNonRoot"] is True


# ------------------------------------------------------------------------------------------------- shell
def test_shell_scripts_pass_shellcheck():
    scripts = sorted(INFRA.rglob("*.sh"))
    assert {p.name for p in scripts} >= {"entrypoint.sh", "init-databases.sh", "create-bucket.sh"}
    out = subprocess.run([tool("shellcheck"), "--severity=style", *map(str, scripts)], capture_output=True,
                         text=True, env=offline_env(), timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------- PromQL
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?")
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan", "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip


def check_balanced(expr: str) -> None:
    text = _STRING.sub('""', expr)
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack[-1] == pairs[ch], f"unbalanced {ch!r} in {expr!r}"
            stack.pop()
    assert not stack, f"unclosed {stack} in {expr!r}"
    assert _STRING.sub("", text).count('"') == 0, f"unterminated string in {expr!r}"


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, aggregations, keywords, labels or ranges)."""
    check_balanced(expr)
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def test_promql_extraction_itself():
    expr = ('histogram_quantile(0.99, sum by (le, role) (rate(foo_bucket{a="x(", b=~"$role"}[$__rate_interval])))'
            " / ignoring(class) group_left sum(bar_total offset 5m) > 1e-9 and time() - baz > 3 * 3600")  # fmt: skip
    assert promql_metric_names(expr) == {"foo_bucket", "bar_total", "baz"}
    for bad in ("sum(rate(x[5m])", 'x{a="b"', "x)", "rate(x[5m)]"):
        with pytest.raises(AssertionError):
            check_balanced(bad)


def model_server_sample_names() -> set[str]:
    """Every sample name the real model server registry exposes (counters' _total, histograms' _bucket, ...)."""
    from flywheel.serving.metrics import _Metrics

    metrics = _Metrics("m", "production")
    metrics.requests.labels(endpoint="/invocations", method="POST", status="200").inc()
    metrics.latency.labels(endpoint="/invocations").observe(0.01)
    metrics.predictions.labels(version="1", **{"class": "0"}).inc()
    metrics.rows.labels(version="1").inc()
    metrics.batch_rows.observe(1)
    metrics.served.labels(model="m", slot="active", version="1").set(1)
    metrics.swaps.inc()
    metrics.rollbacks.inc()
    metrics.loads.labels(outcome="ok").inc()
    metrics.log_rows.labels(state="written").set(1)
    return {s.name for fam in metrics.registry.collect() for s in fam.samples}


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash.get("annotations", {}).get("list", []) if a.get("expr")]
    return exprs


def test_alert_rules_parse_and_use_real_metric_names():
    known = model_server_sample_names()
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    used = set()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"])
        for template in rule["annotations"].values():
            check_balanced(template.replace("{{", "(").replace("}}", ")"))
        found = promql_metric_names(rule["expr"])
        assert found, f"{rule['alert']}: no metric in {rule['expr']!r}"
        used |= found
    unknown = used - known - set(DRIFT_METRICS) - PROMETHEUS_BUILTINS
    assert not unknown, f"alert rules use metrics nothing exports: {sorted(unknown)}"
    # What the issue asks the alerts to cover: error rate, p99 latency, drift share.
    assert "flywheel_http_requests_total" in used
    assert "flywheel_http_request_duration_seconds_bucket" in used
    assert "flywheel_drift_share" in used
    exprs = " ".join(r["expr"] for r in rules)
    assert "histogram_quantile(0.99" in exprs and 'status=~"5.."' in exprs


def test_grafana_dashboard_panels_parse_and_use_real_metric_names():
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]
    known = model_server_sample_names()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"]
            names = promql_metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            used |= names
    for annotation in dash["annotations"]["list"]:
        used |= promql_metric_names(annotation["expr"])
    unknown = used - known - set(DRIFT_METRICS) - PROMETHEUS_BUILTINS
    assert not unknown, f"the dashboard uses metrics nothing exports: {sorted(unknown)}"
    drift_used = {n for n in used if n.startswith("flywheel_drift")}
    assert drift_used == set(DRIFT_METRICS), "drift panels must use exactly the pushed drift metrics"
    # Traffic, latency, version changes, swaps/rollbacks.
    for needed in ("flywheel_http_requests_total", "flywheel_http_request_duration_seconds_bucket",
                   "flywheel_active_model_version", "flywheel_swaps_total", "flywheel_rollbacks_total"):  # fmt: skip
        assert needed in used, needed
    # Grafana finds the dashboard where compose mounts it, and the datasource where Prometheus listens.
    provider = yaml.safe_load(DASHBOARD_PROVIDER.read_text())["providers"][0]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert any(v.endswith(f":{provider['options']['path']}:ro") for v in grafana["volumes"])
    assert ds["url"] == "http://prometheus:9090"


def test_prometheus_config_matches_compose(compose):
    prom = yaml.safe_load(PROMETHEUS.read_text())
    svc = compose["services"]["prometheus"]
    mounts = {v.split(":")[1] for v in svc["volumes"] if v.startswith("./")}
    assert set(prom["rule_files"]) <= mounts
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    targets = {t for sc in jobs["model-server"]["static_configs"] for t in sc["targets"]}
    assert targets == {"model-server:8080", "model-server:8081"}
    assert {sc["labels"]["role"] for sc in jobs["model-server"]["static_configs"]} == {"production", "staging"}
    assert jobs["pushgateway"]["honor_labels"] is True
    assert jobs["pushgateway"]["static_configs"][0]["targets"] == ["pushgateway:9091"]
    assert compose["services"]["worker"]["environment"]["FLYWHEEL_PUSHGATEWAY_URL"] == "http://pushgateway:9091"
    am = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am == ["alertmanager:9093"] and "alertmanager" in compose["services"]
    alertmanager = yaml.safe_load((INFRA / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in alertmanager["receivers"]}
    assert alertmanager["route"]["receiver"] in receivers
    assert all(r["receiver"] in receivers for r in alertmanager["route"].get("routes", []))
    alerts = {r["alert"] for r in alert_rules()}
    for rule in alertmanager.get("inhibit_rules", []):
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            assert re.fullmatch(r'alertname="(\w+)"', matcher).group(1) in alerts


def test_mlflow_server_command_parses_with_mlflow_cli(mlflow_cli_parse, compose, env_example):
    out, err = mlflow_cli_parse.communicate(timeout=60)
    assert mlflow_cli_parse.returncode == 0, err[-2000:]
    params = json.loads(out)
    assert params["host"] == "0.0.0.0" and params["artifacts_destination"].startswith("s3://")
    env = compose["services"]["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")  # from the environment: it holds a password
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true" and "http" in env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"]
    assert 0 < int(env_example["MLFLOW_WEBHOOK_CACHE_TTL"]) < 60
    assert compose["x-flywheel-env"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{params['port']}"


# ------------------------------------------------------------------------------------------------- Kubernetes
KINDS = {
    ("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "Secret"), ("v1", "Service"), ("v1", "ServiceAccount"),
    ("v1", "PersistentVolumeClaim"), ("apps/v1", "Deployment"), ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
}  # fmt: skip
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert (doc["apiVersion"], doc["kind"]) in KINDS, (
                f"{path.name}: unexpected {doc['apiVersion']}/{doc['kind']}"
            )
            name = doc["metadata"]["name"]
            assert DNS_LABEL.fullmatch(name) and len(name) <= 63, name
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "flywheel", f"{path.name}: {name} has no namespace"
            key = (doc["kind"], name)
            assert key not in objects, f"{key} defined twice"
            objects[key] = {**doc, "_file": path.name}
    return objects


def _containers(dep: dict) -> list[dict]:
    return dep["spec"]["template"]["spec"]["containers"]


def _resolve_port(container: dict, port) -> int:
    by_name = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, int):
        assert port in by_name.values(), f"{container['name']}: probe port {port} is not a container port"
        return port
    assert port in by_name, f"{container['name']}: probe port {port!r} is not a named container port"
    return by_name[port]


def test_kustomization_lists_every_manifest_but_the_secret_template(k8s):
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustom["apiVersion"].startswith("kustomize.config.k8s.io/") and kustom["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustom["resources"]) == files - {"secret.template.yaml"}
    images = {c["image"].split(":")[0] for d in k8s.values() if d["kind"] == "Deployment" for c in _containers(d)}
    assert images == {i["name"] for i in kustom["images"]}
    secret = k8s[("Secret", "flywheel-secrets")]
    assert secret["_file"] == "secret.template.yaml"
    for key, value in secret["stringData"].items():
        assert value in PLACEHOLDERS, f"the Secret template must hold placeholders: {key}"


def test_deployments_selectors_probes_and_resources(k8s):
    from flywheel.serving.__main__ import _parser

    deployments = [d for d in k8s.values() if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"flywheel-model-server", "flywheel-worker"}
    for dep in deployments:
        spec = dep["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), dep["metadata"]["name"]
        pod = spec["template"]["spec"]
        if "serviceAccountName" in pod:
            assert ("ServiceAccount", pod["serviceAccountName"]) in k8s
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in k8s
        for c in _containers(dep):
            assert c["image"] and c["resources"]["requests"] and c["resources"]["limits"], c["name"]
            for probe in ("readinessProbe", "livenessProbe"):
                _resolve_port(c, c[probe]["httpGet"]["port"])
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ("ConfigMap", ref["configMapRef"]["name"]) in k8s
                if "secretRef" in ref:
                    assert ("Secret", ref["secretRef"]["name"]) in k8s
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])}
    server = {c["name"]: c for c in _containers(k8s[("Deployment", "flywheel-model-server")])}
    prod = server["production"]
    assert (
        prod["readinessProbe"]["httpGet"]["path"] == "/ping" and prod["livenessProbe"]["httpGet"]["path"] == "/health"
    )
    for c in server.values():
        args = _parser().parse_args(c["args"][3:])
        assert c["args"][:3] == ["python", "-m", "flywheel.serving"] and args.host == "0.0.0.0"
        assert args.port == _resolve_port(c, c["readinessProbe"]["httpGet"]["port"])
    assert k8s[("Deployment", "flywheel-model-server")]["spec"]["replicas"] == 1  # blue/green lives in the process
    worker = _containers(k8s[("Deployment", "flywheel-worker")])[0]
    assert worker["command"] == ["/bin/sh", "/app/infra/worker/entrypoint.sh"]


def test_services_select_pods_and_target_their_ports(k8s):
    deployments = [d for d in k8s.values() if d["kind"] == "Deployment"]
    services = [s for s in k8s.values() if s["kind"] == "Service"]
    assert services
    for svc in services:
        selector = svc["spec"]["selector"]
        matched = [d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert matched, f"Service {svc['metadata']['name']} selects no Deployment's pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(
                (p.get("name") == target or p["containerPort"] == target)
                for d in matched for c in _containers(d) for p in c.get("ports", [])
            ), f"{svc['metadata']['name']}: targetPort {target!r} is no container port"  # fmt: skip


def test_rbac_and_configmap_agree_with_the_worker_renderer(k8s):
    binding = k8s[("RoleBinding", "flywheel-worker")]
    assert ("Role", binding["roleRef"]["name"]) in k8s
    for subject in binding["subjects"]:
        assert ("ServiceAccount", subject["name"]) in k8s
    rules = k8s[("Role", "flywheel-worker")]["rules"]
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    cfg = k8s[("ConfigMap", "flywheel-config")]["data"]
    assert all(isinstance(v, str) for v in cfg.values()), "ConfigMap values must be strings"
    assert not [k for k in cfg if SECRET_KEY.search(k) and k != "FLYWHEEL_K8S_SECRET"], "secrets belong in the Secret"
    assert ("ConfigMap", cfg["FLYWHEEL_K8S_CONFIGMAP"]) in k8s and ("Secret", cfg["FLYWHEEL_K8S_SECRET"]) in k8s
    assert ("ServiceAccount", cfg["FLYWHEEL_K8S_SERVICE_ACCOUNT"]) in k8s
    assert ("PersistentVolumeClaim", cfg["FLYWHEEL_K8S_STATE_PVC"]) in k8s
    assert cfg["FLYWHEEL_WORK_POOL_TYPE"] == "kubernetes"
    # The deploy flow reaches both servers on FLYWHEEL_HOST, whether or not a champion is loaded yet.
    admin = k8s[("Service", cfg["FLYWHEEL_HOST"])]
    assert admin["spec"]["publishNotReadyAddresses"] is True
    ports = {p["port"] for p in admin["spec"]["ports"]}
    assert {int(cfg["FLYWHEEL_SERVING_PORT"]), int(cfg["FLYWHEEL_STAGING_PORT"])} <= ports

    render = load_renderer()
    variables = render.job_variables("kubernetes", cfg)
    assert variables["namespace"] == "flywheel" and variables["service_account_name"] == "flywheel-flow-run"
    template = {"job_configuration": {"job_manifest": {"spec": {"template": {"spec": {
        "containers": [{"name": "prefect-job", "env": "{{ env }}", "image": "{{ image }}"}]}}}}}}  # fmt: skip
    once = render.patch_base_job_template(template, cfg["FLYWHEEL_K8S_CONFIGMAP"], cfg["FLYWHEEL_K8S_SECRET"],
                                          state_pvc=cfg["FLYWHEEL_K8S_STATE_PVC"])  # fmt: skip
    twice = render.patch_base_job_template(once, cfg["FLYWHEEL_K8S_CONFIGMAP"], cfg["FLYWHEEL_K8S_SECRET"],
                                           state_pvc=cfg["FLYWHEEL_K8S_STATE_PVC"])  # fmt: skip
    assert once == twice, "patching the template must be idempotent"
    pod = once["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["envFrom"] == [{"configMapRef": {"name": "flywheel-config"}},
                                               {"secretRef": {"name": "flywheel-secrets"}}]  # fmt: skip
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "flywheel-state"
    assert pod["containers"][0]["volumeMounts"] == [{"name": "flywheel-state", "mountPath": "/state"}]
    with pytest.raises(render.RenderError):
        render.patch_base_job_template({"job_configuration": {}}, "a", "b")
