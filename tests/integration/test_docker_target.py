"""The `docker` serving target on a real Docker-compatible engine: podman's Docker API, driven by the docker SDK.

A `flywheel up` stack with FLYWHEEL_DEPLOY_TARGET=docker and DOCKER_HOST pointing at a private podman service:
`flywheel train` makes v1 champion → the webhook → deploy-model builds MLflow's serving image for v1 through the
engine, runs it, health-checks and smoke-tests it, and the model server (the stable URL) forwards to it. v2 is then
deployed while a client sends requests throughout (no failure), v1's container stays up for a switch back, and the
stack's stop removes the containers. v1 compiles at packaging, so its image carries the compiled model and serves
it with Flywheel's model server (the same image with FLYWHEEL_COMPILE_MODELS=false is MLflow's scoring server).

This machine reaches no image registry, so the `python:<version>-slim` base that MLflow's Dockerfile starts from is
built here once: Debian's python3 in a root made by debootstrap from the machine's own Debian mirror, imported under
that name into a private podman storage (cached under ~/.cache/flywheel-tests between runs). Everything after that —
MLflow's Dockerfile, pip installs, the container, its scoring server — is the real thing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pandas as pd
import pytest
from needs import missing
from stacks import Traffic, running_stack, stop_process, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

MODEL = "flights-docker-it"
BIN = Path(sys.executable).parent
BASE_IMAGE = f"docker.io/library/python:{platform.python_version()}-slim"


def _wait(what: str, check, timeout: float = 120.0, interval: float = 1.0):
    return wait_for(what, check, timeout, interval)


# --------------------------------------------------------------------------------------------------- the engine
def _debian_mirror() -> tuple[str, str]:
    """(mirror URL, codename) of this machine's own Debian sources."""
    codename = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip('"')
    texts = [p.read_text() for p in Path("/etc/apt/sources.list.d").glob("*.sources")]
    texts += [Path("/etc/apt/sources.list").read_text()] if Path("/etc/apt/sources.list").exists() else []
    for text in texts:
        for url in re.findall(r"(?:URIs:|^deb)\s+(\S+)", text, flags=re.M):
            if url.rstrip("/").endswith("/debian"):
                return url, codename
    missing("no Debian mirror in this machine's apt sources: cannot build the base image",
            "a Debian mirror in /etc/apt/sources.list.d")


def _build_base_image(env: dict, work: Path) -> None:
    """debootstrap a minimal Debian with python3 and pip, import it as BASE_IMAGE in the private storage."""
    if not shutil.which("debootstrap"):
        missing("debootstrap is missing: cannot build the base image", "the Debian package `debootstrap` "
                "(`make parts` as root)")
    mirror, codename = _debian_mirror()
    root = work / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", "--include=ca-certificates", codename, str(root), mirror],
                   check=True, capture_output=True, timeout=900)  # fmt: skip
    subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install "
         "-y -q --no-install-recommends python3 python3-pip python-is-python3 && rm -rf /var/lib/apt/lists/*"],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    # The machine's CA bundle (its package registries may sit behind a TLS proxy), for pip inside the build.
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
    archive = work / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    ca = "/etc/ssl/certs/ca-certificates.crt"
    changes = ["ENV PIP_BREAK_SYSTEM_PACKAGES=1", "ENV PIP_DISABLE_PIP_VERSION_CHECK=1", f"ENV PIP_CERT={ca}",
               f"ENV SSL_CERT_FILE={ca}", 'CMD ["python3"]']  # fmt: skip
    cmd = ["podman", "import", *[a for c in changes for a in ("--change", c)], str(archive), BASE_IMAGE]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
    shutil.rmtree(root, ignore_errors=True)
    archive.unlink()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """DOCKER_HOST of a podman service on a private socket and storage; stopped by its PID at the end."""
    if not (shutil.which("podman") and shutil.which("runc")):
        missing("no Docker-compatible engine: podman and runc are missing",
                "the Debian packages `podman runc` (`make parts` as root)")
    import docker

    work = tmp_path_factory.mktemp("engine")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flywheel-tests" / "podman"
    cache.mkdir(parents=True, exist_ok=True)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = min(hard if hard != resource.RLIM_INFINITY else 65536, 65536)
    # runc (crun refuses this kernel's hybrid cgroups) and limits no higher than ours: raising them needs
    # CAP_SYS_RESOURCE, which a sandboxed root may not have.
    (work / "containers.conf").write_text(
        f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    (work / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{cache}/storage"\nrunroot = "{work}/run"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(work / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(work / "storage.conf")}  # fmt: skip
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=env, timeout=60).returncode != 0:
        _build_base_image(env, work)
    sock = work / "podman.sock"
    log = open(work / "podman-service.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        host = f"unix://{sock}"
        _wait("the podman service", lambda: sock.exists() and docker.DockerClient(base_url=host).ping(), timeout=60)
        yield host
    finally:
        stop_process(proc, 30)
        log.close()


# --------------------------------------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory):
    state = tmp_path_factory.mktemp("docker-stack")
    with running_stack(state, MODEL, DOCKER_HOST=engine, FLYWHEEL_DEPLOY_TARGET="docker") as started:
        yield started


@pytest.fixture(scope="module")
def client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack[1]["mlflow_url"])


@pytest.fixture(scope="module")
def docker_client(engine):
    import docker

    return docker.DockerClient(base_url=engine, timeout=60)


def containers(docker_client, role: str = "production") -> dict[str, str]:
    """{version: status} of this model's containers for one role (production serves champion, staging challenger)."""
    found = docker_client.containers.list(all=True, filters={"label": f"flywheel.model={MODEL}"})
    return {c.labels["flywheel.version"]: c.status for c in found if c.labels["flywheel.role"] == role}


def ledger_row(urls, version: str, alias: str) -> dict | None:
    """The newest finished row of the deployment table artifact for this version and alias."""
    query = {"artifacts": {"key": {"any_": [f"deployments-{MODEL}"]}}, "limit": 1}
    resp = httpx.post(urls["prefect_api_url"] + "/artifacts/latest/filter", json=query, timeout=10)
    resp.raise_for_status()
    found = resp.json()
    data = found[0]["data"] if found else []
    rows = json.loads(data) if isinstance(data, str) else data
    return next((r for r in rows if r["version"] == version and r["alias"] == alias), None)


def admin_state(st, urls) -> dict:
    token = (st.root / "admin_token").read_text().strip()
    return httpx.get(
        urls["model_url"] + "/admin/state", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).json()


def holdout(client, st, version: str) -> pd.DataFrame:
    mv = client.get_model_version(MODEL, version)
    path = client.download_artifacts(mv.run_id, "reference/holdout_sample.parquet", str(st.root / f"v{version}"))
    return pd.read_parquet(path).drop(columns=["late"])


def test_champion_is_built_run_and_served_from_its_container(stack, client, docker_client):
    import mlflow

    st, urls, env = stack
    proc = subprocess.run([str(BIN / "flywheel"), "train", "--start", "2013-01-01", "--end", "2013-02-01"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    # The staging (challenger) and production (champion) deployments of v1 both run: read production's ledger row.
    row = _wait("v1's production deployment in the ledger", lambda: ledger_row(urls, "1", "champion"),
                timeout=900, interval=2)  # fmt: skip
    assert row["outcome"] == "serving", row
    assert row["target"] == "docker" and row["trigger"] == "event" and "url" not in row  # no ports in the ledger
    assert row["image"].startswith("sha256:")  # built by the engine, recorded by id
    image = docker_client.images.get(row["image"])
    assert f"flywheel/{MODEL}:1" in {t.split("/", 1)[-1] for t in image.tags}
    assert row["container"] == f"flywheel-{MODEL}-production-v1"
    assert containers(docker_client) == {"1": "running"}
    staging = _wait("v1's staging deployment", lambda: ledger_row(urls, "1", "challenger"), timeout=600, interval=2)
    assert staging["target"] == "docker-staging" and staging["image"] == row["image"]  # one image for both

    active = admin_state(st, urls)["active"]
    assert active["version"] == "1" and active["upstream"].startswith("http://127.0.0.1:")
    # The container answers on its own port too: it is MLflow's scoring server, predicting like pyfunc.
    sample = holdout(client, st, "1").head(20)
    body = {"dataframe_split": json.loads(sample.to_json(orient="split", index=False))}
    mlflow.set_tracking_uri(urls["mlflow_url"])
    want = mlflow.pyfunc.load_model(f"models:/{MODEL}/1").predict(sample).tolist()
    direct = httpx.post(active["upstream"] + "/invocations", json=body, timeout=60)
    assert direct.status_code == 200 and direct.json()["predictions"] == want
    resp = httpx.post(urls["model_url"] + "/invocations", json=body, timeout=60)
    assert resp.status_code == 200 and resp.json()["predictions"] == want
    assert resp.headers["X-Flywheel-Model-Version"] == "1"
    bad = httpx.post(urls["model_url"] + "/invocations", json={"dataframe_records": [{"nope": 1}]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error_code"]


def _run_ready(docker_client, image: str, name: str, environment: dict) -> tuple[object, str]:
    """Run `image` unlabelled (no target prunes it) on a loopback port; (container, URL) once /ping answers."""
    from flywheel.tasks.serving import _container_url

    for old in docker_client.containers.list(all=True, filters={"name": f"^{name}$"}):
        old.remove(force=True)
    c = docker_client.containers.run(image, detach=True, name=name, environment=environment,
                                     ports={"8080/tcp": ("127.0.0.1",)})  # fmt: skip

    def ready() -> str | None:
        c.reload()
        assert c.status not in ("exited", "dead"), c.logs(tail=20).decode(errors="replace")
        url = _container_url(c)
        try:
            return url if url and httpx.get(url + "/ping", timeout=3).status_code == 200 else None
        except httpx.HTTPError:
            return None

    return c, _wait(f"container {name}", ready, timeout=300, interval=1)


def test_a_compiled_champion_is_served_compiled_by_its_container_with_mlflows_answers_and_errors(
    stack, client, docker_client
):
    """v1 compiled at packaging (parity on its holdout): its image serves it with Flywheel's model server in
    compiled mode; the same image with FLYWHEEL_COMPILE_MODELS=false is MLflow's scoring server, and both give the
    same predictions and the same errors."""
    st, urls, _ = stack
    row = ledger_row(urls, "1", "champion")
    assert row["engine"] == "onnxruntime" and row["engine_reason"].startswith("compiled: yes"), row
    assert "in the version's own container" in row["engine_reason"]
    active = admin_state(st, urls)["active"]
    assert active["engine"] == "onnxruntime" and active["upstream"]
    info = httpx.get(active["upstream"] + "/version", timeout=10).json()  # the container itself
    assert info["engine"] == "onnxruntime" and info["model_version"] == "1" and info["model_name"] == MODEL
    assert httpx.get(urls["model_url"] + "/version", timeout=10).json()["engine"] == "onnxruntime"  # the front

    pyfunc, mlflow_url = _run_ready(docker_client, row["image"], f"{MODEL}-mlflow-check",
                                    {"FLYWHEEL_COMPILE_MODELS": "false"})  # fmt: skip
    try:
        answer = httpx.get(mlflow_url + "/version", timeout=10)  # MLflow's image: no engine (404 behind its nginx)
        assert "engine" not in (answer.json() if answer.text.lstrip().startswith("{") else {}), answer.text
        assert "through MLflow's scoring server: compiled: off" in pyfunc.logs().decode(errors="replace")
        rows = holdout(client, st, "1").head(200)
        split = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
        records = {"dataframe_records": rows.astype(object).where(rows.notna(), None).to_dict(orient="records")}
        for body in (split, records):
            ours = httpx.post(active["upstream"] + "/invocations", json=body, timeout=60)
            theirs = httpx.post(mlflow_url + "/invocations", json=body, timeout=60)
            assert ours.status_code == theirs.status_code == 200
            assert ours.json()["predictions"] == theirs.json()["predictions"]
        # A missing column: MLflow's status, error code and error text (Flywheel's server keeps the useful part of
        # MLflow's message, which otherwise embeds the whole input frame: flywheel.serving.errors).
        bad = {"dataframe_records": [{"nope": 1}]}
        ours = httpx.post(active["upstream"] + "/invocations", json=bad, timeout=60)
        theirs = httpx.post(mlflow_url + "/invocations", json=bad, timeout=60)
        front = httpx.post(urls["model_url"] + "/invocations", json=bad, timeout=60)
        assert ours.status_code == theirs.status_code == front.status_code == 400, (ours.text, theirs.text)
        assert ours.json()["error_code"] == theirs.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert ours.json()["message"].split(": ", 1)[1] in theirs.json()["message"]
        assert front.json() == ours.json()  # the same answer through the stable URL as from the container
    finally:
        pyfunc.remove(force=True)


def test_next_version_switches_with_zero_failed_requests_and_the_old_container_stays(stack, client, docker_client):
    import mlflow

    st, urls, _ = stack
    v1 = client.get_model_version(MODEL, "1")
    mlflow.set_tracking_uri(urls["mlflow_url"])
    v2 = mlflow.register_model(v1.source, MODEL).version  # v1's logged model again: a new version, same run
    rows = holdout(client, st, "1").head(50)
    records = rows.astype(object).where(rows.notna(), None).to_dict(orient="records")
    with Traffic(urls["model_url"], records) as traffic:
        client.set_registered_model_alias(MODEL, "champion", v2)
        row = _wait(f"v{v2}'s deployment", lambda: ledger_row(urls, v2, "champion"), timeout=900, interval=2)
        _wait("traffic on the new version", lambda: traffic.versions and traffic.versions[-1] == v2, timeout=30)
    statuses, versions = traffic.statuses, traffic.versions
    assert row["outcome"] == "serving", row
    assert row["previous_version"] == "1" and row["container"] == f"flywheel-{MODEL}-production-v{v2}"
    assert statuses and set(statuses) == {200}, f"failed requests during the switch: {set(statuses)}"
    assert versions[0] == "1" and versions[-1] == v2
    state = admin_state(st, urls)
    assert state["active"]["version"] == v2 and state["standby"]["version"] == "1"
    assert containers(docker_client) == {"1": "running", v2: "running"}  # v1 stays up for a switch back


def test_after_a_model_server_restart_the_reconciler_puts_the_champion_back_in_its_container(stack, client,
                                                                                            docker_client):  # fmt: skip
    st, urls, env = stack
    v2 = client.get_model_version_by_alias(MODEL, "champion").version
    st.children["model-server"].stop()
    st.children["model-server"] = st._start_model_server("model-server", st.settings.serving_port, st._token())
    active = _wait("the restarted server to serve the champion", lambda: admin_state(st, urls)["active"], timeout=180)
    assert active["version"] == v2 and active["upstream"] is None  # from the registry, in-process, at once
    proc = subprocess.run([str(BIN / "prefect"), "deployment", "run", "reconcile/every-minute", "--watch"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    active = _wait("the champion back in its container", lambda: admin_state(st, urls)["active"]["upstream"] and
                   admin_state(st, urls)["active"], timeout=600, interval=2)  # fmt: skip
    assert active["version"] == v2

    def redeployed() -> dict | None:
        row = ledger_row(urls, v2, "champion")
        return row if row and row["previous_version"] == v2 else None

    row = _wait("the redeployment's ledger row", redeployed, timeout=120)
    assert row["outcome"] == "serving" and row["trigger"] == "event", row
    assert containers(docker_client) == {v2: "running"}  # v1's container is used by neither slot any more
    assert client.get_model_version_by_alias(MODEL, "champion").version == v2


def test_stopping_the_stack_removes_its_containers(stack, docker_client):
    st, _, _ = stack
    assert containers(docker_client, "staging")  # the challenger's container, behind the staging server
    st.stop()
    assert containers(docker_client) == {} and containers(docker_client, "staging") == {}
