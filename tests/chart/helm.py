"""Rendering the chart with Helm's own engine (the Helm v4 Go SDK in the helm-python-sdk wheel:
no helm binary exists on these machines), cached per value set."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import yaml

import helm_python

CHART = Path(__file__).resolve().parents[2] / "charts" / "dicom-node"
RELEASE = "dn"
NAMESPACE = "pacs"


class RenderRefused(Exception):
    """The chart refused the values (schema or a template's fail)."""


def _render(values: dict) -> dict[str, str]:
    with helm_python.Chart.load(str(CHART)) as chart:
        try:
            # Helm checks the values against values.schema.json on install; render alone does not.
            chart.validate_schema(values)
            return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm_python.HelmError as exc:
            raise RenderRefused(str(exc)) from exc


@functools.lru_cache(maxsize=None)
def _render_cached(values_json: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(_render(json.loads(values_json)).items()))


def render_files(values: dict) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included); raises RenderRefused."""
    return dict(_render_cached(json.dumps(values, sort_keys=True)))


def render(values: dict) -> list[dict]:
    """The manifests (chart tests included, NOTES.txt not), in a stable order (a fresh copy)."""
    return copy.deepcopy(_parsed(json.dumps(values, sort_keys=True)))


@functools.lru_cache(maxsize=None)
def _parsed(values_json: str) -> list[dict]:
    docs: list[dict] = []
    for path, text in _render_cached(values_json):
        if path.endswith(".txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def notes(values: dict) -> str:
    return render_files(values)[f"{CHART.name}/templates/NOTES.txt"]


def find(docs: list[dict], kind: str, suffix: str) -> dict:
    """The one manifest of that kind whose name ends with suffix."""
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def load_values_file(name: str) -> dict:
    return yaml.safe_load((CHART / name).read_text()) or {}
