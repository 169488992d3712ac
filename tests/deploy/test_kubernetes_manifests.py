"""deploy/kubernetes/: every overlay renders, validates offline, and means what the docs say.

Needs kubectl (or kustomize) and the `kubernetes-validate` package; without them the tests skip,
except in CI (env CI set), where that is a failure.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.kubernetes import (
    KUBERNETES_DIR,
    OVERLAYS,
    kustomize_command,
    render,
    validation_errors,
)
from helpers.service import postgres_server, unavailable

from tooncrafter.service import jobs
from tooncrafter.service.jobs.tables import jobs_table
from tooncrafter.settings import Settings

# Environment variables read by libraries, not by Settings.
OTHER_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_HOME", "HOME"}
SECRET_NAME = "tooncrafter-secrets"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    command = kustomize_command()
    if command is None:
        unavailable("neither kubectl nor kustomize is installed (set KUBECTL to a kubectl binary)")
    return {overlay: render(command, overlay) for overlay in OVERLAYS}


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in objects(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in objects(docs, "Deployment") + objects(docs, "Job"):
        spec = pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield workload, container


def env_value(container: dict[str, Any], name: str) -> str:
    values = [entry.get("value") for entry in container.get("env", []) if entry["name"] == name]
    assert len(values) == 1 and values[0] is not None, f"{container['name']}: {name} must be set once, as a value"
    return values[0]


def secret_keys_example() -> set[str]:
    lines = (KUBERNETES_DIR / "overlays/production/secrets.env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if line.strip() and not line.startswith("#")}


# --- rendered and valid ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_schemas(rendered, overlay):
    pytest.importorskip("jsonschema")
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        unavailable("the kubernetes-validate package is not installed (pip install -e '.[test]')")
    docs = rendered[overlay]
    assert docs, f"{overlay} rendered nothing"
    errors = [error for doc in docs for error in validation_errors(doc)]
    assert errors == []


def test_the_keda_schema_refuses_what_keda_refuses(rendered):
    """The hand-written KEDA schema is not a rubber stamp: a misspelt field or a zero target fails."""
    scaled = one(rendered["overlays/production-keda"], "ScaledObject", "tooncrafter-worker")
    misspelt = {**scaled, "spec": {**scaled["spec"], "minReplicas": 0}}
    assert any("minReplicas" in error for error in validation_errors(misspelt))
    trigger = {**scaled["spec"]["triggers"][0], "metadata": {"query": "SELECT 1", "targetQueryValue": "0"}}
    zero_target = {**scaled, "spec": {**scaled["spec"], "triggers": [trigger]}}
    assert validation_errors(zero_target)


# --- the API -----------------------------------------------------------------------------------


def api_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_spec(one(docs, "Deployment", "tooncrafter-api"))["containers"]
    return container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_probes_call_health_on_the_served_port(rendered, overlay):
    docs = rendered[overlay]
    container = api_container(docs)
    command = container["command"]
    assert command[:3] == ["tooncrafter", "serve", "--no-worker"]
    port = int(command[command.index("--port") + 1])
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in container["ports"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["httpGet"] == {"path": PROBE_PATH, "port": "http"}, kind
    service = one(docs, "Service", "tooncrafter-api")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert service["spec"]["selector"].items() <= pod_template_labels(one(docs, "Deployment", "tooncrafter-api")).items()


def pod_template_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


PROBE_PATH = "/health/live"


def test_the_probe_path_passes_on_an_api_without_workers(tmp_path):
    """The real app, API-only with no worker anywhere: the probe path is up while /health says 503."""
    from fastapi.testclient import TestClient
    from helpers.service import make_settings

    from tooncrafter.service.app import create_app

    with TestClient(create_app(make_settings(tmp_path), with_worker=False)) as client:
        assert client.get("/health").status_code == 503
        assert client.get(PROBE_PATH).status_code == 200


def test_api_replicas_belong_to_the_hpa_which_scales_on_cpu(rendered):
    for overlay, docs in rendered.items():
        api = one(docs, "Deployment", "tooncrafter-api")
        assert "replicas" not in api["spec"], f"{overlay}: the HPA owns the API's replica count"
        hpa = one(docs, "HorizontalPodAutoscaler", "tooncrafter-api")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tooncrafter-api"}
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert one(rendered["overlays/production"], "HorizontalPodAutoscaler", "tooncrafter-api")["spec"]["minReplicas"] > (
        one(rendered["base"], "HorizontalPodAutoscaler", "tooncrafter-api")["spec"]["minReplicas"]
    )


# --- the workers -------------------------------------------------------------------------------


def worker(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = one(docs, "Deployment", "tooncrafter-worker")
    (container,) = pod_spec(deployment)["containers"]
    return deployment, container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_worker_process_per_gpu(rendered, overlay):
    _, container = worker(rendered[overlay])
    assert container["command"] == ["tooncrafter", "worker"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources.get("requests", {}).get("nvidia.com/gpu", 1) == 1
    assert env_value(container, "TOONCRAFTER_DEVICE") in ("cuda", "cuda:0"), "the pod sees its one GPU only"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_waits_for_the_workers_grace_period(rendered, overlay):
    deployment, container = worker(rendered[overlay])
    grace = float(env_value(container, "TOONCRAFTER_WORKER_GRACE_S"))
    kill_after = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert 0 < grace < kill_after, "SIGKILL must come after the worker's own grace period"


def test_worker_count_is_fixed_without_keda_and_left_to_keda_with_it(rendered):
    assert worker(rendered["overlays/production"])[0]["spec"]["replicas"] > worker(rendered["base"])[0]["spec"]["replicas"]
    assert "replicas" not in worker(rendered["overlays/production-keda"])[0]["spec"]


# --- KEDA --------------------------------------------------------------------------------------


def test_keda_scales_the_worker_deployment_from_a_secret(rendered):
    docs = rendered["overlays/production-keda"]
    scaled = one(docs, "ScaledObject", "tooncrafter-worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "tooncrafter-worker"
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql"
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "connection" and ref["name"] == SECRET_NAME
    assert ref["key"] in secret_keys_example()
    assert scaled["metadata"]["namespace"] == auth["metadata"]["namespace"] == worker(docs)[0]["metadata"]["namespace"]


def keda_query(rendered) -> str:
    (trigger,) = one(rendered["overlays/production-keda"], "ScaledObject", "tooncrafter-worker")["spec"]["triggers"]
    return trigger["metadata"]["query"]


def test_keda_query_names_the_job_table_and_the_unfinished_statuses(rendered):
    query = keda_query(rendered)
    assert re.search(rf"\bFROM\s+{jobs_table.name}\b", query)
    assert "status" in jobs_table.c
    assert set(re.findall(r"'([A-Z_]+)'", query)) == {jobs.IN_QUEUE, jobs.IN_PROGRESS}
    assert jobs.COMPLETED not in query


def test_keda_query_counts_queued_and_running_jobs_in_a_migrated_database(rendered, tmp_path):
    """The query itself, on PostgreSQL, against the schema the Alembic migrations build."""
    from sqlalchemy import text

    try:
        server = postgres_server(tmp_path)
        url = server.__enter__()
    except (FileNotFoundError, OSError, subprocess.CalledProcessError) as exc:
        unavailable(f"no PostgreSQL server: {exc}")
    try:
        store = jobs.JobStore(url)  # migrates
        try:
            submitted = [
                store.submit(endpoint="fal-ai/toon-crafter", owner="", input={}, base_url="http://t") for _ in range(4)
            ]
            running = store.claim("worker-1", lease_s=60)
            store.claim("worker-2", lease_s=60)
            store.complete(running.id, jobs.JobOutcome(status_code=200, body={}))
            with store.engine.connect() as conn:
                depth = conn.execute(text(keda_query(rendered))).scalar_one()
            assert isinstance(depth, float) and depth == len(submitted) - 1  # 2 queued + 1 running
        finally:
            store.close()
    finally:
        server.__exit__(None, None, None)


# --- migration, settings, secrets, images, hardening -------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_migration_job_runs_db_upgrade(rendered, overlay):
    (job,) = objects(rendered[overlay], "Job")
    (container,) = pod_spec(job)["containers"]
    assert container["command"] == ["tooncrafter", "db", "upgrade"]
    assert {entry["name"] for entry in container["env"]} >= {"TOONCRAFTER_DATABASE_URL"}
    assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")


def configmap_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    (configmap,) = objects(docs, "ConfigMap")
    return configmap["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_environment_name_is_a_real_setting(rendered, overlay):
    docs = rendered[overlay]
    names = set(configmap_data(docs))
    for _, container in containers(docs):
        names |= {entry["name"] for entry in container.get("env", [])}
    settings = set(Settings.model_fields)
    prefix = "TOONCRAFTER_"
    unknown = {n for n in names if n.startswith(prefix) and n[len(prefix) :].lower() not in settings}
    assert unknown == set(), "not fields of tooncrafter.settings.Settings"
    assert {n for n in names if not n.startswith(prefix)} <= OTHER_ENV


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_resolves(rendered, overlay):
    """ConfigMap refs name the rendered (hashed) ConfigMap; Secret keys exist in the documented Secret."""
    docs = rendered[overlay]
    configmaps = {doc["metadata"]["name"] for doc in objects(docs, "ConfigMap")}
    keys = secret_keys_example()
    for workload, container in containers(docs):
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in configmaps
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == SECRET_NAME and ref["key"] in keys, f"{workload['metadata']['name']}: {ref}"
        assert pod_spec(workload)["serviceAccountName"] in {d["metadata"]["name"] for d in objects(docs, "ServiceAccount")}


def test_placeholder_secret_is_never_applied_in_production(rendered):
    (placeholder,) = objects(rendered["base"], "Secret")
    assert set(placeholder["stringData"]) == secret_keys_example()
    for overlay in ("overlays/production", "overlays/production-keda"):
        assert objects(rendered[overlay], "Secret") == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_image_for_every_role(rendered, overlay):
    images = {container["image"] for _, container in containers(rendered[overlay])}
    assert len(images) == 1, images
    (image,) = images
    assert image.rsplit("/", 1)[-1].startswith("tooncrafter:")
    if overlay != "base":
        assert not image.endswith(":latest"), "production pins a release"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_hardened_with_resources(rendered, overlay):
    for workload, container in containers(rendered[overlay]):
        name = f"{workload['metadata']['name']}/{container['name']}"
        pod = pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert {"/tmp"} <= {mount["mountPath"] for mount in container["volumeMounts"]}, f"{name}: writable /tmp"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        assert "memory" in container["resources"]["limits"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_api_and_workers(rendered, overlay):
    docs = rendered[overlay]
    budgets = objects(docs, "PodDisruptionBudget")
    for name in ("tooncrafter-api", "tooncrafter-worker"):
        labels = pod_template_labels(one(docs, "Deployment", name))
        matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, name
        assert matching[0]["spec"].get("maxUnavailable") == 1, "holds at any replica count, zero included"


def test_manifest_files_parse_as_yaml():
    """Every file under deploy/kubernetes is YAML (a broken file that no overlay lists still fails)."""
    import yaml

    files = sorted(Path(KUBERNETES_DIR).rglob("*.yaml"))
    assert files
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path
