"""Comparison against normal references: the analysis, the compare CLI, the compare stage's step, the SR."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import Settings
from dicom_node.index import Index
from dicom_node.references import Library
from dicom_node.references.settings import ReferenceSettings
from dicom_node.references.stage import with_references
from dicom_node.report import ReportSettings
from dicom_node.report.sr import build_sr
from inference.pixels import image_from_dataset
from inference.reference_phantoms import make_normal_library, make_query
from inference.references import compare_with_references
from inference.types import ComparisonResult
from tests.report.conftest import make_input
from tests.report.test_sr import evidence_uids, groups, values, walk
from tests.support.validation import assert_valid_dicom

SIZE = 384
NODULE_MM = 22.0  # well above the benchmark's 12 mm floor: these tests are about plumbing, not the limit


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Library:
    root = tmp_path_factory.mktemp("refs")
    paths = []
    for i, ds in enumerate(make_normal_library(8, SIZE)):
        paths.append(root / "in" / f"{i}.dcm")
        paths[-1].parent.mkdir(exist_ok=True)
        ds.save_as(paths[-1], enforce_file_format=True)
    lib = Library(root / "lib")
    assert len(lib.add(paths, attested_normal=True).added) == 8
    return lib


def _hit(region, truth) -> bool:
    r, c = truth.center
    return region.bbox[0] <= r <= region.bbox[2] and region.bbox[1] <= c <= region.bbox[3]


def test_nodule_is_present_beyond_normal_variation_and_normal_query_is_clean(library):
    from inference.pixels import load_image

    refs = [load_image(library.path_of(r)) for r in library.records()[:5]]
    q = make_query(3, NODULE_MM, SIZE)
    result = compare_with_references(image_from_dataset(q.dataset), refs)
    assert result.mode == "reference" and result.no_prior and len(result.references) == 5
    assert all(u.registered for u in result.references)
    hits = [r for r in result.regions if _hit(r, q.nodule)]
    assert hits and hits[0].status == "present" and hits[0].kind == "increase"
    assert hits[0].longest_diameter_mm == pytest.approx(NODULE_MM, rel=0.5)
    assert "normal reference(s) of other people" in result.summary
    normal = compare_with_references(image_from_dataset(make_query(4, None, SIZE).dataset), refs)
    # False regions on normal queries are the open problem (benchmarks/reference_accuracy.py counts them);
    # here: few, and each weaker than a real nodule's.
    assert len(normal.regions) <= 2
    assert all(r.confidence * r.area_mm2 < hits[0].confidence * hits[0].area_mm2 for r in normal.regions)


def _write(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_compare_cli_against_library(library, tmp_path, monkeypatch):
    monkeypatch.setenv("DICOM_NODE_DATABASE_URL", f"sqlite:///{tmp_path / 'index.db'}")
    q = make_query(3, NODULE_MM, SIZE).dataset
    out = CliRunner().invoke(app, ["compare", str(_write(q, tmp_path / "q.dcm")), "--references", str(library.root), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["mode"] == "reference" and len(doc["references"]) == 5
    assert all(u["why"].startswith("same DX CHEST PA") and u["sop_instance_uid"].startswith("2.25.") for u in doc["references"])
    assert any(r["status"] == "present" for r in doc["regions"])
    # each use is audited, against the patient's study, naming the reference and why
    rows = Index(f"sqlite:///{tmp_path / 'index.db'}").phi_accesses(study_uid=str(q.StudyInstanceUID))
    used = [r for r in rows if r["action"] == "reference_used"]
    assert len(used) == 5 and all("thumbnail similarity" in r["detail"] for r in used)

    lat = make_query(5, None, SIZE).dataset
    lat.ViewPosition = "LATERAL"
    text = CliRunner().invoke(app, ["compare", str(_write(lat, tmp_path / "lat.dcm")), "--references", str(library.root)])
    assert text.exit_code == 0
    assert "No normal reference used: no DX CHEST reference of view LAT (the library has PA)" in text.output

    empty = CliRunner().invoke(app, ["compare", str(tmp_path / "q.dcm"), "--references", str(tmp_path / "nowhere")])
    assert empty.exit_code == 2 and "not a reference library" in empty.output


def _rt(tmp_path, library_dir: Path, **refs):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'index.db'}",
                        references=ReferenceSettings(library_dir=library_dir, **refs))
    return SimpleNamespace(settings=settings, index=Index(settings.database_url))


def test_stage_step_runs_only_without_usable_prior(library, tmp_path):
    q = make_query(3, NODULE_MM, SIZE).dataset
    path = _write(q, tmp_path / "q.dcm")
    image = image_from_dataset(q, str(path))
    job = SimpleNamespace(job_key="job-1", study_uid=str(q.StudyInstanceUID))
    rt = _rt(tmp_path, library.root)
    compared = ComparisonResult(summary="1 region(s) of change", prior_source="prior.dcm")
    assert with_references(rt, job, image, compared, str(path)) is compared  # a usable prior: nothing to add

    no_prior = ComparisonResult(no_prior=True, summary="No prior image: nothing to compare with.")
    result = with_references(rt, job, image, no_prior, str(path))
    assert result.mode == "reference" and any(_hit(r, make_query(3, NODULE_MM, SIZE).nodule) for r in result.regions)
    assert len([r for r in rt.index.phi_accesses(study_uid=job.study_uid) if r["action"] == "reference_used"]) == 5

    off = with_references(_rt(tmp_path, library.root, enabled=False), job, image, no_prior, str(path))
    assert off is no_prior
    empty = with_references(_rt(tmp_path, tmp_path / "empty-lib"), job, image, no_prior, str(path))
    assert empty.mode == "prior" and empty.summary.endswith("No normal reference used: the reference library is empty.")


def test_sr_says_normal_references_and_cites_them(library, tmp_path):
    from inference.pixels import load_image
    from inference.types import ReferenceUse

    q = make_query(3, NODULE_MM, SIZE).dataset
    records = library.records()[:5]
    uses = [ReferenceUse(r.file, f"matched by view, rank {k}", r.sop_instance_uid, r.sop_class_uid, r.series_uid, r.study_uid)
            for k, r in enumerate(records, 1)]
    result = compare_with_references(image_from_dataset(q), [load_image(library.path_of(r)) for r in records], uses)
    sr = build_sr(make_input(q, None, result), ReportSettings())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert_valid_dicom(tmp_path / "sr.dcm")
    tree = [(n, v) for _, n, v, _ in walk(sr.ContentSequence)]
    comments = [v for n, v in tree if n == "Comment"]
    assert any("compared against 5 normal reference image(s) of other people" in c and "not against the patient's prior" in c
               for c in comments)
    assert sum(c.startswith("Normal reference 2.25.") for c in comments) == 5
    assert evidence_uids(sr, "PertinentOtherEvidenceSequence") == {r.sop_instance_uid for r in records}
    found = groups(sr)
    assert found and all(values(g, "Description of Change") == ["52101004"] for g in found)  # Present, never New


def test_a_reference_that_does_not_register_is_left_out_and_said_so():
    import numpy as np

    from inference.types import ImageInput

    q = image_from_dataset(make_query(1, None, 256).dataset)
    noise = ImageInput(np.random.default_rng(0).random((256, 256), dtype=np.float32) * 4000, q.spacing_mm,
                       modality="DX", body_part="CHEST", view="PA", source="noise.dcm")
    result = compare_with_references(q, [noise])
    assert [u.registered for u in result.references] == [False]
    assert result.refused and result.regions == []
    assert [f.code for f in result.sanity_flags] == ["references_unregistered"]
    assert "read alone" in result.summary
