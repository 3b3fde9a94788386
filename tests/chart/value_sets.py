"""The value sets a hospital would install the chart with, and ones it must refuse."""

from __future__ import annotations

from .helm import load_values_file

DIGEST = "sha256:" + "ab" * 32
PEERS = ["10.20.0.0/16", "10.30.4.0/24"]

# A site's common part: PACS, callers, peers.
SITE = {
    "node": {"allowedCallers": ["MODALITY1", "PACS@10.20.1.5"]},
    "networkPolicy": {"dicomPeers": PEERS, "httpNamespaces": ["monitoring"]},
    "priors": {
        "nodeAddress": "dicom-node.hospital.example:11112",
        "archives": [{"name": "pacs", "method": "c-move", "ae_title": "PACS", "host": "pacs.hospital.example", "port": 104}],
    },
    "report": {"destinations": [{"name": "pacs", "kind": "c-store", "ae_title": "PACS", "host": "pacs.hospital.example", "port": 104}]},
    "uidRoot": "1.2.826.0.1.3680043.10.999",
}


def merged(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        out = _merge(out, part)
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


POSTGRES_MULTI = {
    "placement": "multiNode",
    "persistence": {"accessMode": "ReadWriteMany", "storageClass": "cephfs"},
    "database": {"existingSecret": "dicom-node-db"},
    "node": {"replicas": 3},
    "workers": {"io": {"replicas": 2}, "gpu": {"replicas": 2}},
}
EXTERNAL_REDIS_BROKER = "rediss://:s3cret@redis.hospital.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/dicom-node/redis-ca/ca.crt"
EXTERNAL_REDIS_RESULT = "rediss://:s3cret@redis.hospital.example:6380/1?ssl_cert_reqs=required&ssl_ca_certs=/etc/dicom-node/redis-ca/ca.crt"
EXTERNAL_REDIS = {
    "redis": {"bundled": False, "external": {"brokerUrl": EXTERNAL_REDIS_BROKER, "resultUrl": EXTERNAL_REDIS_RESULT}},
    "extraVolumes": [{"name": "redis-ca", "secret": {"secretName": "redis-ca"}}],
    "extraVolumeMounts": [{"name": "redis-ca", "mountPath": "/etc/dicom-node/redis-ca", "readOnly": True}],
}
TLS_ONLY = {
    "tls": {"enabled": True, "only": True, "secretName": "dicom-node-tls", "caKey": "ca.crt", "requireClientCert": True},
    "service": {"dicom": {"type": "LoadBalancer", "loadBalancerSourceRanges": PEERS}},
}
DIGESTS = {
    "image": {"digest": DIGEST},
    "gpuImage": {"digest": DIGEST},
    "redis": {"image": {"digest": DIGEST}},
}


def value_sets() -> dict[str, dict]:
    """name -> values; each renders and validates."""
    return {
        "defaults": {},
        "site-in-process-gpu": merged(SITE, DIGESTS, {"vlm": {"model": "medgemma-4b-it", "backend": "tensorrt"},
                                                      "models": {"existingClaim": "model-repo"},
                                                      "workers": {"gpu": {"runtimeClassName": "nvidia",
                                                                          "nodeSelector": {"nvidia.com/gpu.present": "true"}}}}),
        "model-server-vllm": merged(SITE, load_values_file("values-vllm.yaml")),
        "model-server-trtllm": merged(SITE, load_values_file("values-trtllm.yaml")),
        "model-server-nim": merged(SITE, load_values_file("values-nim.yaml")),
        "tls-only": merged(SITE, TLS_ONLY),
        "postgres-multi-replica": merged(SITE, POSTGRES_MULTI, {"database": {"existingSecret": "", "url": "postgresql+psycopg://dn:pw@pg.hospital.example/dicom_node"}}),
        "postgres-existing-secret": merged(SITE, POSTGRES_MULTI),
        "external-redis-tls": merged(SITE, EXTERNAL_REDIS),
        "autoscaling-keda": merged(SITE, POSTGRES_MULTI, {"autoscaling": {"enabled": True},
                                                          "metrics": {"serviceMonitor": {"enabled": True}}}),
        "autoscaling-keda-external-redis": merged(SITE, EXTERNAL_REDIS, {"autoscaling": {"enabled": True, "kedaRedis": {
            "address": "redis.hospital.example:6380", "enableTLS": True, "passwordSecret": {"name": "redis", "key": "password"}}}}),
        "autoscaling-hpa": merged(SITE, {"autoscaling": {"enabled": True, "mode": "hpa"}}),
        "external-model-endpoint": merged(SITE, load_values_file("values-external-endpoint.yaml")),
    }


# name -> (values, a phrase the refusal must contain)
REFUSED = {
    "several replicas on SQLite": ({"node": {"replicas": 3}}, "needs PostgreSQL"),
    "several replicas on one node's volume": ({"node": {"replicas": 2}, "database": {"existingSecret": "db"}},
                                              "node.replicas > 1 needs placement multiNode"),
    "multiNode on ReadWriteOnce": (merged(POSTGRES_MULTI, {"persistence": {"accessMode": "ReadWriteOnce"}}),
                                   "cannot share a ReadWriteOnce volume"),
    "multiNode on SQLite": (merged(POSTGRES_MULTI, {"database": {"existingSecret": ""}, "node": {"replicas": 1}}),
                            "SQLite cannot be shared"),
    "worker moved off the SCP's host on ReadWriteOnce": (
        {"workers": {"gpu": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}}}}},
        "workers.gpu.affinity with placement singleNode"),
    "model server replicas on a ReadWriteOnce weights claim": (
        merged(load_values_file("values-vllm.yaml"), {"modelServer": {"replicas": 2, "weights": {"accessMode": "ReadWriteOnce"}}}),
        "ReadWriteOnce weights claim"),
    "TLS without a Secret": ({"tls": {"enabled": True}}, "needs tls.secretName"),
    "TLS only without TLS": ({"tls": {"only": True}}, "tls.only needs tls.enabled"),
    "a typo": ({"node": {"replica": 3}}, "additional properties 'replica' not allowed"),
    "a typo at the top": ({"persistance": {"size": "1Ti"}}, "additional properties 'persistance' not allowed"),
    "extraEnv outside DICOM_NODE_": ({"extraEnv": {"STUDY_IDLE_SECONDS": "60"}}, "STUDY_IDLE_SECONDS"),
    "DICOM open to peers, any AE accepted": ({"networkPolicy": {"dicomPeers": PEERS}}, "node.allowedCallers is empty"),
    "a credential in extraEnv": ({"extraEnv": {"DICOM_NODE_DATABASE_URL": "postgresql+psycopg://u:pw@db/dn"}},
                                 "a credential, which would land in a ConfigMap"),
    "a LoadBalancer open to the world": ({"service": {"dicom": {"type": "LoadBalancer"}}}, "loadBalancerSourceRanges"),
    "external Redis without URLs": ({"redis": {"bundled": False}}, "redis.external.existingSecret"),
    "an image digest that is not one": ({"image": {"digest": "latest"}}, "/image/digest"),
    "openai without an endpoint": ({"vlm": {"backend": "openai"}}, "needs modelServer.enabled or vlm.baseUrl"),
    "both a model server and an external endpoint": (
        merged(load_values_file("values-vllm.yaml"), {"vlm": {"baseUrl": "https://vlm.example/v1"}}), "not both"),
    "engine build without its cache key": (
        merged(load_values_file("values-trtllm.yaml"), {"modelServer": {"engineBuild": {"gpuProduct": ""}}}),
        "weightsHash, gpuProduct, engineVersion"),
    "a UID root that is not one": ({"uidRoot": "1.2.03.x"}, "/uidRoot"),
}
