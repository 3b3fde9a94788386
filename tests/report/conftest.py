"""Fixtures for SR writing and delivery: real phantom comparisons, validators, Orthanc."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydicom.dataset import Dataset

import inference
from inference.phantoms import make_chest_pair
from inference.pixels import image_from_dataset
from inference.types import ComparisonResult
from inference.vlm.schema import DeviceFinding, Finding, VLMResult
from dicom_node.index import Index
from dicom_node.report import ImageRef, ReportInput, ReportSettings, StudyRef
from tests.support.orthanc import Orthanc

# 256 px is the smallest phantom the sanity gate accepts (smaller ones have implausible pixel spacing).
SIZE = 256
CHANGES = {  # phantom change -> expected status of its one region
    "new_nodule": "new", "growing_nodule": "worsened", "shrinking_nodule": "improved",
    "resolved_nodule": "resolved", "stable": "stable",
}


def ref(ds: Dataset) -> ImageRef:
    return ImageRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID))


def study_ref(ds: Dataset) -> StudyRef:
    return StudyRef(str(ds.StudyInstanceUID), str(ds.StudyDate), str(ds.AccessionNumber), str(ds.StudyDescription), [ref(ds)])


@dataclass
class Case:
    name: str
    current: Dataset
    prior: Dataset | None
    inp: ReportInput


def make_input(current: Dataset, prior: Dataset | None, comparison: ComparisonResult, vlm: VLMResult | None = None,
               model_version: str = "1.0", predecessor: ImageRef | None = None, key_suffix: str = "") -> ReportInput:
    return ReportInput(
        current_dataset=current,
        current=study_ref(current),
        priors=[study_ref(prior)] if prior is not None else [],
        comparison=comparison,
        vlm=vlm,
        model_name="tiny-test-model",
        model_version=model_version,
        algorithm_parameters={"z_threshold": "3.0", "registration": "affine"},
        input_key=f"{current.StudyInstanceUID}|{current.SOPInstanceUID}|{model_version}{key_suffix}",
        predecessor=predecessor,
        prior_headers=[prior] if prior is not None else [],
    )


def compared(change: str, seed: int = 3, size: int = SIZE) -> tuple[Dataset, Dataset, ComparisonResult]:
    pair = make_chest_pair(seed, change, size=size)
    result = inference.compare(image_from_dataset(pair.current), [image_from_dataset(pair.prior)])
    return pair.current, pair.prior, result


def vlm_for(result: ComparisonResult) -> VLMResult:
    """What a model would say about a comparison: one finding per measured region, and a device."""
    findings = [Finding(finding="pulmonary nodule", region=r.zone, change=r.status, severity="moderate",
                        evidence=f"opacity in the {r.zone}, {r.status} compared with the prior", confidence=0.8)
                for r in result.regions]
    return VLMResult(findings=findings, devices=[DeviceFinding("central venous catheter", "unchanged")],
                     impression="Comparison with the prior study: " + (result.summary or "no change"), model="tiny")


@pytest.fixture(scope="session")
def cases() -> dict[str, Case]:
    """One report input per change type, plus the sanity-gate refusal and no-prior cases."""
    out: dict[str, Case] = {}
    for change in CHANGES:
        cur, pri, result = compared(change)
        out[change] = Case(change, cur, pri, make_input(cur, pri, result, vlm_for(result)))
    cur, pri, result = compared("new_nodule", size=128)  # 128 px: implausible spacing, the gate refuses
    assert result.refused
    out["refused"] = Case("refused", cur, pri, make_input(cur, pri, result))
    cur = make_chest_pair(9, "new_nodule", size=SIZE).current
    out["no_prior"] = Case("no_prior", cur, None, make_input(cur, None, ComparisonResult(no_prior=True)))
    return out


@pytest.fixture
def index(tmp_path) -> Index:
    return Index(f"sqlite:///{tmp_path / 'index.db'}")


@pytest.fixture
def orthanc(tmp_path) -> Orthanc:
    pacs = Orthanc(tmp_path / "orthanc", aet="PACS").start()
    yield pacs
    pacs.stop()


def settings_for(*destinations: dict, **overrides) -> ReportSettings:
    values = dict(destinations=list(destinations), backoff_base_seconds=1.0, backoff_max_seconds=8.0)
    values.update(overrides)
    return ReportSettings(**values)


def pacs_destination(pacs: Orthanc, **overrides) -> dict:
    values = dict(name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port, timeout_seconds=5)
    values.update(overrides)
    return values

