"""The environment a rendered container's process sees, and the names the settings read."""

from __future__ import annotations

import base64
import re

from dicom_node.config import Settings

from .helm import find

SAMPLE_SECRETS = {"database-url": "postgresql+psycopg://dn:pw@pg.hospital.example/dicom_node"}


def known_env_names() -> tuple[set[str], tuple[str, ...]]:
    from pydantic import BaseModel

    names, open_prefixes = set(), []

    def walk(model, prefix):
        for field, info in model.model_fields.items():
            env = prefix + field.upper()
            names.add(env)
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, env + "__")
            elif getattr(annotation, "__origin__", None) is dict:
                open_prefixes.append(env + "__")

    walk(Settings, "DICOM_NODE_")
    return names, tuple(open_prefixes)


def container_env(docs: list[dict], c: dict) -> dict[str, str]:
    """What the container's process sees, Secrets replaced by sample values."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    generated = {k: base64.b64decode(v).decode() for d in docs if d["kind"] == "Secret" for k, v in d["data"].items()}
    for entry in c.get("env", []):
        if "value" in entry:
            value = entry["value"]
        else:
            key = entry["valueFrom"]["secretKeyRef"]["key"]
            value = generated.get(key) or SAMPLE_SECRETS.get(key) or "redis://:sample@redis:6379/0"
        env[entry["name"]] = re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], value)
    return env
