"""The whole pipeline with vlm_backend=openai: Orthanc routes a study to the node, the thin gpu
worker sends the comparison to a real `transformers serve` (through the recording proxy), a
busy server is retried by time, and the SR names the served model and the server's version."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.local_stack.scenario import acquire, seed_pacs, wait_for_report, write_history
from dicom_node.local_stack.stack import LocalStack, Ports
from tests.support.pipeline import jobs_of
from tests.support.validation import assert_valid_dicom
from tests.support.waiting import wait_until

ANSWER = json.dumps({
    "findings": [{"finding": "pulmonary nodule", "region": "left middle zone", "change": "new", "severity": "moderate",
                  "evidence": "new round opacity", "confidence": 0.7}],
    "devices": [], "impression": "New left mid zone nodule.", "priority": "urgent"})


def text_values(ds, concept: str | None = None) -> list[str]:
    """Every TEXT value in the SR content tree (of one concept name, if given)."""
    values = []
    for item in ds.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        if item.ValueType == "TEXT" and concept in (None, name):
            values.append(item.TextValue)
        values.extend(text_values(item, concept))
    return values


def test_pipeline_with_a_model_server(served, tmp_path):
    served.proxy.reset(status=503, message="model loading")  # the first try finds the server busy
    stack = LocalStack(tmp_path / "stack", Ports.free(), extra_env=served.settings_env())
    try:
        stack.start()
        scenario = write_history(tmp_path / "data", "new_nodule", size=512)
        seed_pacs(stack.orthanc, scenario)
        acquire(stack.orthanc, scenario)
        wait_until(lambda: served.proxy.requests, timeout=150)
        wait_until(lambda: any(j.error_class == "transient" for j in jobs_of(stack, scenario.current_study_uid)), timeout=30)
        served.proxy.reset(answer=ANSWER)  # back: the retry by time gets through
        sr = wait_for_report(stack.orthanc, scenario.current_study_uid, timeout=180)
        gpu_worker_maps = Path(f"/proc/{stack.processes['worker-gpu1'].pid}/maps").read_text()
        (job,) = jobs_of(stack, scenario.current_study_uid)
    finally:
        stack.stop()
    assert len(served.proxy.requests) == 1 and "image_url" in json.dumps(served.proxy.requests[0])
    # The thin gpu worker: no torch library mapped into the process that ran the comparison.
    assert "libtorch" not in gpu_worker_maps
    assert job.result["vlm_served_model"] == served.server.served_model
    assert job.result["vlm_server_version"] == "server=uvicorn"
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_valid_dicom(path)
    parameters = set(text_values(sr, "Algorithm Parameters"))  # TID 4019, under each measurement group
    assert {f"vlm_served_model={served.server.served_model}", "vlm_server_version=server=uvicorn",
            "vlm_backend=openai"} <= parameters
    texts = " ".join(text_values(sr))
    assert "vlm_output_unusable" not in texts and "New left mid zone nodule." in texts
