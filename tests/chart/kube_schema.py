"""kubernetes-validate's strict schemas with the validator built once per kind and version
(its validate() re-reads the multi-megabyte definitions file for every manifest)."""

from __future__ import annotations

import functools
import re

import jsonschema
from kubernetes_validate import utils
from referencing import Registry, Resource


def _schema_version(version: str) -> str:
    return [v for v in utils.all_versions() if utils.major_minor(v) <= utils.major_minor(version)][-1]


@functools.lru_cache(maxsize=None)
def _definitions(version: str) -> Registry:
    schema_dir = f"v{version}-local-strict"
    return Resource.from_contents(utils.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)) @ Registry()


@functools.lru_cache(maxsize=None)
def validator(kind: str, api_version: str, version: str) -> jsonschema.Validator:
    version = _schema_version(version)
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/{kind.lower()}-{api}.json", version)
    registry = Resource.from_contents(schema) @ _definitions(version)
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def errors(doc: dict, version: str) -> list[str]:
    """What the strict schema of that Kubernetes version finds wrong with the manifest."""
    return [f"{e.message} at {list(e.absolute_path)}" for e in validator(doc["kind"], doc["apiVersion"], version).iter_errors(doc)]
