"""The Helm chart, rendered by Helm's engine for the value sets a hospital would use: valid for
Kubernetes 1.29 and the newest, scheduled where it can run, closed network, credentials only in
Secrets, and the wrong value sets refused with a message saying what to change."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dicom_node.config import Settings

from . import kube_schema
from .env import container_env as _container_env
from .env import known_env_names as _known_env_names
from .helm import CHART, NAMESPACE, RenderRefused, find, notes, render
from .value_sets import DIGEST, EXTERNAL_REDIS_BROKER, EXTERNAL_REDIS_RESULT, PEERS, REFUSED, value_sets

VALUE_SETS = value_sets()
# Kubernetes' own kinds are validated by kubernetes-validate; these CRDs by the tests below.
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}
KUBE_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
NODE_COMPONENTS = ("node", "worker-io", "worker-gpu")


def pods(docs: list[dict]) -> list[tuple[str, dict]]:
    """(name, pod spec) of every workload."""
    out = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            out.append((doc["metadata"]["name"], doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            out.append((doc["metadata"]["name"], doc["spec"]))
    return out


def pod_spec(docs: list[dict], suffix: str) -> dict:
    return find(docs, "Deployment", suffix)["spec"]["template"]["spec"]


def container(docs: list[dict], suffix: str) -> dict:
    return pod_spec(docs, suffix)["containers"][0]


# --- every value set renders and is valid Kubernetes ------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_value_set_is_valid_kubernetes(name, kube_version):
    docs = render(VALUE_SETS[name])
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        problems = kube_schema.errors(doc, kube_version)
        assert not problems, f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for {kube_version}: {problems}"
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_the_strict_schemas_catch_a_misplaced_field():
    # The check above can fail: a field Kubernetes does not know is an error, in every version.
    deployment = find(render({}), "Deployment", "-node")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    for version in KUBE_VERSIONS:
        assert not kube_schema.errors(deployment, version)
        assert kube_schema.errors(broken, version)


@pytest.mark.parametrize("name,case", sorted(REFUSED.items()), ids=sorted(REFUSED))
def test_wrong_value_set_is_refused(name, case):
    values, phrase = case
    with pytest.raises(RenderRefused) as refused:
        render(values)
    assert phrase in str(refused.value)


def test_kube_version_is_declared():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.29.0-0"


# --- values.schema.json covers every value ---------------------------------------------------


def _leaves(values: dict, prefix=()):
    for key, value in values.items():
        path = prefix + (key,)
        if isinstance(value, dict) and value:
            yield from _leaves(value, path)
        else:
            yield path


def test_schema_names_every_value_and_refuses_unknown_keys():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in _leaves(values):
        node = schema
        for key in path:
            if "properties" not in node:
                # A map typed by Kubernetes (resources, nodeSelector, ...) or of DICOM_NODE_* names.
                assert node.get("type") == "object" and node.get("additionalProperties") is not False, ".".join(path)
                break
            assert node.get("additionalProperties") is False, f"{'.'.join(path)}: open object"
            assert key in node["properties"], f"values.yaml {'.'.join(path)} is not in values.schema.json"
            node = node["properties"][key]

    def closed(node, where):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{where} accepts unknown keys"
            for key, child in node["properties"].items():
                closed(child, f"{where}.{key}")

    closed(schema, "values")


# --- scheduling and storage -------------------------------------------------------------------


def _gpu_limit(c: dict) -> int:
    return int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def _tolerates_gpu(spec: dict) -> bool:
    return any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))


def test_in_process_gpu_worker_shares_the_scp_host_which_tolerates_the_gpu_taint():
    # singleNode (ReadWriteOnce, SQLite): the GPU worker follows the SCP, so the SCP and io worker
    # must be allowed onto the tainted GPU node and select it too (else the worker is Pending).
    docs = render(VALUE_SETS["site-in-process-gpu"])
    gpu = pod_spec(docs, "-worker-gpu")
    assert _gpu_limit(gpu["containers"][0]) == 1
    assert gpu["runtimeClassName"] == "nvidia"
    affinity = gpu["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert affinity["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "node"
    assert affinity["topologyKey"] == "kubernetes.io/hostname"
    for suffix in ("-node", "-worker-io"):
        spec = pod_spec(docs, suffix)
        assert _tolerates_gpu(spec), suffix
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, suffix
    strategy = find(docs, "Deployment", "-worker-gpu")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxSurge"] == 0
    assert find(docs, "Deployment", "-node")["spec"]["strategy"]["type"] == "Recreate"
    assert find(docs, "PersistentVolumeClaim", "-data")["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("name", ["model-server-vllm", "model-server-trtllm", "external-model-endpoint"])
def test_served_vlm_puts_the_gpu_queue_worker_on_cpu_nodes(name):
    docs = render(VALUE_SETS[name])
    gpu_worker = pod_spec(docs, "-worker-gpu")
    c = gpu_worker["containers"][0]
    assert _gpu_limit(c) == 0 and not _tolerates_gpu(gpu_worker) and "nodeSelector" not in gpu_worker
    assert c["image"] == container(docs, "-node")["image"], "the thin worker runs from the node image"
    for suffix in ("-node", "-worker-io"):
        assert not _tolerates_gpu(pod_spec(docs, suffix)), suffix
    config = find(docs, "ConfigMap", "dicom-node")["data"]
    assert config["DICOM_NODE_VLM_BACKEND"] == "openai"
    # No --concurrency: the worker then keeps vlm_max_concurrency requests in flight (threads).
    assert c["args"] == ["worker", "--queues", "gpu"]
    assert config["DICOM_NODE_VLM_MAX_CONCURRENCY"] == str(VALUE_SETS[name].get("vlm", {}).get("maxConcurrency", 8))
    if name == "external-model-endpoint":
        assert config["DICOM_NODE_VLM_BASE_URL"] == "https://vlm.hospital.example/v1"
        assert not [d for d in docs if d["metadata"]["name"].endswith("-model-server")]
        assert config["DICOM_NODE_VLM_API_KEY_FILE"] == "/etc/dicom-node/secrets/vlm-api-key"
    else:
        assert config["DICOM_NODE_VLM_BASE_URL"] == "http://dn-dicom-node-model-server:8000/v1"


def test_model_server_runs_on_gpu_nodes_with_weights_from_a_claim():
    docs = render(VALUE_SETS["model-server-vllm"])
    server = pod_spec(docs, "-model-server")
    c = server["containers"][0]
    assert _gpu_limit(c) == 1 and _tolerates_gpu(server)
    assert server["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert c["args"][0] == "/models/medgemma-4b-it"
    weights = next(v for v in server["volumes"] if v["name"] == "weights")
    assert weights["persistentVolumeClaim"] == {"claimName": "vlm-weights", "readOnly": True}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert find(docs, "Deployment", "-model-server")["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    service = find(docs, "Service", "-model-server")
    assert service["spec"]["type"] == "ClusterIP"
    policy = find(docs, "NetworkPolicy", "-model-server")
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][1]["values"]
    assert "worker-gpu" in allowed and "worker-io" not in allowed


def _engine(values_overrides: dict) -> tuple[dict, dict]:
    from .value_sets import merged

    docs = render(merged(VALUE_SETS["model-server-trtllm"], values_overrides))
    return find(docs, "Job", "") if [d for d in docs if d["kind"] == "Job"] else None, pod_spec(docs, "-model-server")


def test_engine_build_job_is_keyed_by_weights_gpu_and_engine_version_and_the_server_waits_for_it():
    job, server = _engine({})
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    key = env["ENGINE_KEY"]
    assert job["metadata"]["name"].endswith(key)
    wait = server["initContainers"][0]
    assert wait["env"][0]["value"] == f"/cache/engines/{key}"
    assert "$ENGINE_DIR/.complete" in wait["command"][2]
    server_env = {e["name"]: e.get("value") for e in server["containers"][0]["env"]}
    assert server_env["ENGINE_DIR"] == f"/cache/engines/{key}"
    # The engine runs only on the GPU it was built for; the build runs on one too.
    assert server["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
    assert job["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
    keys = {key}
    for change in ({"weightsHash": "sha256:other"}, {"gpuProduct": "NVIDIA-H100-80GB-HBM3"}, {"engineVersion": "tensorrt-llm-1.2.0"}):
        other_job, _ = _engine({"modelServer": {"engineBuild": change}})
        keys.add({e["name"]: e.get("value") for e in other_job["spec"]["template"]["spec"]["containers"][0]["env"]}["ENGINE_KEY"])
    assert len(keys) == 4
    same_job, _ = _engine({"modelServer": {"engineBuild": {"backoffLimit": 5}}})
    assert same_job["metadata"]["name"] == job["metadata"]["name"]


def test_multi_node_spreads_pods_and_drops_the_host_affinity():
    docs = render(VALUE_SETS["postgres-multi-replica"])
    for suffix in ("-node", "-worker-io", "-worker-gpu"):
        spec = pod_spec(docs, suffix)
        assert "affinity" not in spec, suffix
        assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert find(docs, "PersistentVolumeClaim", "-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert find(docs, "Deployment", "-node")["spec"]["replicas"] == 3
    assert find(docs, "Deployment", "-node")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budgets = {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert budgets == {"dn-dicom-node-node", "dn-dicom-node-worker-io", "dn-dicom-node-worker-gpu"}


# --- network ----------------------------------------------------------------------------------


def test_default_service_is_not_open_to_the_world():
    docs = render({})
    assert find(docs, "Service", "-dicom")["spec"]["type"] == "ClusterIP"
    assert find(docs, "Service", "-http")["spec"]["type"] == "ClusterIP"
    lb = find(render(VALUE_SETS["tls-only"]), "Service", "-dicom")["spec"]
    assert lb["type"] == "LoadBalancer" and lb["loadBalancerSourceRanges"] == PEERS


def test_network_policies_admit_dicom_from_peers_http_from_namespaces_redis_from_node_pods():
    docs = render(VALUE_SETS["site-in-process-gpu"])
    node = find(docs, "NetworkPolicy", "-node")["spec"]["ingress"]
    dicom, http = node[0], node[1]
    assert [p["ipBlock"]["cidr"] for p in dicom["from"]] == PEERS
    assert [p["port"] for p in dicom["ports"]] == ["dicom"]
    assert http["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in http["from"]
    assert {"podSelector": {}} in http["from"]  # this namespace
    workers = find(docs, "NetworkPolicy", "-workers")["spec"]
    assert workers["ingress"] == [] and workers["policyTypes"] == ["Ingress"]
    redis = find(docs, "NetworkPolicy", "-redis")["spec"]["ingress"]
    assert len(redis) == 1 and len(redis[0]["from"]) == 1
    expressions = redis[0]["from"][0]["podSelector"]["matchExpressions"]
    assert {"key": "app.kubernetes.io/component", "operator": "In", "values": list(NODE_COMPONENTS)} in expressions
    # No peers configured: no DICOM rule at all (nobody reaches it), and the notes say so.
    assert all("ipBlock" not in str(rule) for rule in find(render({}), "NetworkPolicy", "-node")["spec"]["ingress"])
    assert "networkPolicy.dicomPeers is empty" in notes({})


def test_tls_only_exposes_and_admits_the_tls_port_alone():
    docs = render(VALUE_SETS["tls-only"])
    assert [p["name"] for p in find(docs, "Service", "-dicom")["spec"]["ports"]] == ["dicom-tls"]
    node = container(docs, "-node")
    assert [p["name"] for p in node["ports"]] == ["dicom-tls", "http"]
    ingress = find(docs, "NetworkPolicy", "-node")["spec"]["ingress"]
    assert all(p["port"] != "dicom" for rule in ingress for p in rule["ports"])
    config = find(docs, "ConfigMap", "dicom-node")["data"]
    assert config["DICOM_NODE_TLS_ENABLED"] == "true" and config["DICOM_NODE_TLS_CA"] == "/etc/dicom-node/tls/ca.crt"
    tls = next(v for v in pod_spec(docs, "-node")["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "dicom-node-tls"
    annotations = find(docs, "Deployment", "-node")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/tls" in annotations


# --- credentials --------------------------------------------------------------------------------


def _secret_data(docs) -> dict[str, str]:
    secret = find(docs, "Secret", "-credentials")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_no_credential_in_a_config_map(name):
    docs = render(VALUE_SETS[name])
    config = json.dumps([d["data"] for d in docs if d["kind"] == "ConfigMap"])
    secrets = [v for d in docs if d["kind"] == "Secret" for v in _secret_data(docs).values()]
    for value in secrets:
        assert value not in config
    assert "s3cret" not in config and "pw@" not in config and "password" not in config.lower()
    for pod_name, spec in pods(docs):
        for c in spec["containers"]:
            for env in c.get("env", []):
                if env["name"] in ("DICOM_NODE_DATABASE_URL", "REDIS_PASSWORD", "REDISCLI_AUTH"):
                    assert "secretKeyRef" in env["valueFrom"], (pod_name, env["name"])


def test_bundled_redis_has_a_password_and_urls_that_use_it():
    docs = render({})
    secret = _secret_data(docs)
    assert re.fullmatch(r"[A-Za-z0-9]{40}", secret["redis-password"])
    assert re.fullmatch(r"k\d{8}:[A-Za-z0-9]{40}", secret["pseudonym-key"])  # KEY_ID:SECRET (pseudonyms.py)
    assert len(secret["http-token"]) == 40
    redis = container(docs, "-redis")
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    env = {e["name"]: e for e in container(docs, "-worker-io")["env"]}
    assert list(env)[:3] == ["REDIS_PASSWORD", "DICOM_NODE_BROKER_URL", "DICOM_NODE_RESULT_BACKEND"]  # defined before use
    assert env["DICOM_NODE_BROKER_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@dn-dicom-node-redis:6379/0"


def test_external_redis_urls_are_taken_as_given():
    # An external URL with a db and a query string reaches the settings unchanged (no /0 appended).
    docs = render(VALUE_SETS["external-redis-tls"])
    secret = _secret_data(docs)
    assert secret["broker-url"] == EXTERNAL_REDIS_BROKER and secret["result-url"] == EXTERNAL_REDIS_RESULT
    assert not [d for d in docs if d["metadata"]["name"].endswith("-redis")]
    io = pod_spec(docs, "-worker-io")
    assert {"name": "redis-ca", "mountPath": "/etc/dicom-node/redis-ca", "readOnly": True} in io["containers"][0]["volumeMounts"]
    assert {"name": "redis-ca", "secret": {"secretName": "redis-ca"}} in io["volumes"]
    # Celery parses them as meant: db 0 and 1 over TLS with the CA.
    from celery import Celery
    from celery.backends.redis import RedisBackend
    from kombu.utils.url import url_to_parts

    broker = url_to_parts(secret["broker-url"])
    assert broker.path == "0" and broker.query["ssl_cert_reqs"] == "required"
    backend = RedisBackend(app=Celery(), url=secret["result-url"])
    assert backend.connparams["db"] == 1 and backend.connparams["ssl_ca_certs"] == "/etc/dicom-node/redis-ca/ca.crt"


def test_existing_secrets_are_referenced_and_nothing_is_generated_for_them():
    from .value_sets import merged

    docs = render(merged(VALUE_SETS["postgres-existing-secret"], {
        "redis": {"password": {"existingSecret": "redis-auth"}},
        "secrets": {"httpToken": {"existingSecret": "ui-token", "key": "token"},
                    "pseudonymKey": {"existingSecret": "site-key", "key": "keys"}}}))
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = {e["name"]: e for e in container(docs, "-node")["env"]}
    assert env["DICOM_NODE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "dicom-node-db", "key": "database-url"}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "redis-password"}
    sources = next(v for v in pod_spec(docs, "-node")["volumes"] if v["name"] == "credentials")["projected"]["sources"]
    assert sources == [{"secret": {"name": "ui-token", "items": [{"key": "token", "path": "http-token"}]}},
                       {"secret": {"name": "site-key", "items": [{"key": "keys", "path": "pseudonym-key"}]}}]


# --- every env value the chart renders loads into the settings --------------------------------

def test_unknown_names_are_caught_by_the_env_check():
    from .value_sets import merged

    names, open_prefixes = _known_env_names()
    docs = render(merged(VALUE_SETS["defaults"], {"extraEnv": {"DICOM_NODE_STUDY_IDLE_SECOND": "60"}}))
    env = _container_env(docs, container(docs, "-node"))
    unknown = [n for n in env if n.startswith("DICOM_NODE_") and n not in names and not n.startswith(open_prefixes)]
    assert unknown == ["DICOM_NODE_STUDY_IDLE_SECOND"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_env_value_loads_into_the_settings(name, monkeypatch):
    docs = render(VALUE_SETS[name])
    names, open_prefixes = _known_env_names()
    checked = 0
    for component in NODE_COMPONENTS:
        c = container(docs, f"-{component}")
        env = _container_env(docs, c)
        unknown = [n for n in env if n.startswith("DICOM_NODE_") and n not in names and not n.startswith(open_prefixes)]
        assert not unknown, f"{name} {component}: no setting reads {unknown}"
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        for variable, value in env.items():
            # The TLS listener's files matter in the SCP only (workers never listen).
            listener = component == "node" and variable in ("DICOM_NODE_TLS_CERT", "DICOM_NODE_TLS_KEY", "DICOM_NODE_TLS_CA")
            if variable.endswith("_FILE") or listener:
                assert any(value.startswith(m + "/") for m in mounts), f"{component}: {variable}={value} is on no mount"
        for variable in list(__import__("os").environ):
            if variable.startswith("DICOM_NODE_"):
                monkeypatch.delenv(variable)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        settings = Settings()
        assert settings.ae_title == "DICOM_NODE"
        assert settings.http_host == "0.0.0.0" and str(settings.http_token_file) == "/etc/dicom-node/secrets/http-token"
        assert settings.broker_url == env["DICOM_NODE_BROKER_URL"] and "$(" not in settings.broker_url
        if "uidRoot" in VALUE_SETS[name]:
            assert settings.uid_root == VALUE_SETS[name]["uidRoot"] + "."
        if "priors" in VALUE_SETS[name]:
            assert [a.name for a in settings.priors.archives] == ["pacs"]
        checked += 1
    assert checked == 3


# --- hardening -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_pod_is_hardened(name):
    docs = render(VALUE_SETS[name])
    assert find(docs, "ServiceAccount", "dicom-node")["automountServiceAccountToken"] is False
    for pod_name, spec in pods(docs):
        assert spec["automountServiceAccountToken"] is False, pod_name
        assert spec["serviceAccountName"] == "dn-dicom-node", pod_name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, pod_name
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, pod_name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], pod_name


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_probes_mean_something(name):
    docs = render(VALUE_SETS[name])
    node = container(docs, "-node")
    assert node["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert node["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for suffix in ("-worker-io", "-worker-gpu"):
        c = container(docs, suffix)
        assert c["livenessProbe"]["exec"]["command"] == ["dicom-node", "worker-alive"], suffix
        assert c["startupProbe"]["exec"]["command"] == ["dicom-node", "worker-alive"], suffix


def test_images_by_digest():
    docs = render(VALUE_SETS["site-in-process-gpu"])
    images = {c["image"] for _, spec in pods(docs) for c in spec["containers"]}
    assert images == {f"registry.hospital.example/dicom-node@{DIGEST}", f"registry.hospital.example/dicom-node-gpu@{DIGEST}",
                      f"docker.io/library/redis@{DIGEST}"}


def test_chart_test_pod_checks_readiness_the_token_and_the_dicom_port():
    docs = render({})
    pod = find(docs, "Pod", "-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "/readyz" in script and "/status without token refused" in script and "DICOM port" in script
    compile(script, "helm-test", "exec")
    assert "DICOM port" not in find(render(VALUE_SETS["tls-only"]), "Pod", "-test")["spec"]["containers"][0]["args"][0]


def test_service_monitor_scrapes_metrics_of_the_http_service():
    docs = render(VALUE_SETS["autoscaling-keda"])
    monitor = find(docs, "ServiceMonitor", "dicom-node")
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    http = find(docs, "Service", "-http")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= http["metadata"]["labels"].items()
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= find(docs, "Service", "-dicom")["metadata"]["labels"].items()


def test_hpa_fallback_without_keda():
    docs = render(VALUE_SETS["autoscaling-hpa"])
    hpas = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert hpas == {"dn-dicom-node-worker-io", "dn-dicom-node-worker-gpu"}
    assert not [d for d in docs if d["kind"] == "ScaledObject"]
    assert "replicas" not in find(docs, "Deployment", "-worker-io")["spec"]  # the autoscaler owns it


def test_helm_lint_strict_is_clean():
    import helm_python

    for values in (VALUE_SETS["defaults"], VALUE_SETS["model-server-trtllm"], VALUE_SETS["autoscaling-keda"]):
        report = helm_python.lint(str(CHART), values, strict=True, kube_version="v1.29.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
        assert not problems, problems


def test_an_in_process_worker_without_gpu():
    docs = render({"workers": {"gpu": {"gpus": 0}}})
    assert _gpu_limit(container(docs, "-worker-gpu")) == 0


def test_kubernetes_validate_cli_agrees(tmp_path):
    # The command line itself, --strict, for both versions, on one value set that holds every
    # Kubernetes kind the chart makes (the CLI re-reads its schemas for every manifest).
    import subprocess
    import sys

    from .value_sets import POSTGRES_MULTI, merged

    values = merged(VALUE_SETS["model-server-trtllm"], POSTGRES_MULTI, {"autoscaling": {"enabled": True, "mode": "hpa"}})
    docs = [d for d in render(values) if d["kind"] not in CRD_KINDS]
    every_kind = {d["kind"] for v in VALUE_SETS.values() for d in render(v)} - CRD_KINDS
    assert {d["kind"] for d in docs} == every_kind
    path = tmp_path / "chart.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    files = [str(path)]
    cli = Path(sys.executable).parent / "kubernetes-validate"
    for version in KUBE_VERSIONS:
        result = subprocess.run([str(cli), "--strict", "--quiet", "-k", version, *files], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_extra_env_cannot_override_what_the_chart_sets():
    # A duplicate ConfigMap key would leave which value wins to the YAML reader.
    managed = find(render(VALUE_SETS["site-in-process-gpu"]), "ConfigMap", "dicom-node")["data"]
    assert len(managed) > 20
    # The rule is one lookup over all of them; a sample of kinds keeps the renders few.
    for name in ("DICOM_NODE_AE_TITLE", "DICOM_NODE_STORAGE_DIR", "DICOM_NODE_PRIORS__ARCHIVES",
                 "DICOM_NODE_DATABASE_URL", sorted(managed)[-1]):
        assert name in managed
        with pytest.raises(RenderRefused, match=f"extraEnv {name}: (the chart sets this one itself|a credential)"):
            render({**VALUE_SETS["site-in-process-gpu"], "extraEnv": {name: "x"}})
    config = find(render({"extraEnv": {"DICOM_NODE_STUDY_IDLE_SECONDS": 60}}), "ConfigMap", "dicom-node")["data"]
    assert config["DICOM_NODE_STUDY_IDLE_SECONDS"] == "60"


ALLOWED_VOLUMES = {"configMap", "secret", "projected", "emptyDir", "persistentVolumeClaim", "downwardAPI"}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_node_pods_meet_the_restricted_pod_security_standard(name):
    # The namespace can enforce pod-security.kubernetes.io/enforce=restricted for the node's pods
    # and Redis (the model server and its build Job run the engine image's own user).
    docs = render(VALUE_SETS[name])
    for pod_name, spec in pods(docs):
        if "model-server" in pod_name or "-engine-" in pod_name:
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True, pod_name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), pod_name
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= ALLOWED_VOLUMES, (pod_name, volume)
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], pod_name
            assert not sc.get("privileged") and "add" not in sc["capabilities"], pod_name
            assert sc["readOnlyRootFilesystem"] is True, pod_name
            assert not any(p.get("hostPort") for p in c.get("ports", [])), pod_name
