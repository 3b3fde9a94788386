"""A lesion keeps its Tracking UID across reports: from this node's earlier SR (or reading) of a prior
study, and from another vendor's TID 1500 SR, matched at the same registered place."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from highdicom.sr import (
    ImageRegion,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
    PersonObserverIdentifyingAttributes,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes

import inference
from dicom_node.report import ReportSettings, build_sr
from dicom_node.report.reading import build_reading
from dicom_node.report.tracking import from_reading, from_sr
from inference.phantoms import make_chest_history
from inference.pixels import image_from_dataset

from .conftest import make_input
from .test_sr import groups, values


@pytest.fixture(scope="module")
def history():
    """A nodule growing over three yearly visits; the node reported visit 1 (against visit 0) last year."""
    h = make_chest_history(4, "growing", visits=3, size=384)
    images = [image_from_dataset(ds, f"v{i}") for i, ds in enumerate(h.visits)]
    last_year = inference.compare(images[1], [images[0]], with_overlay=False)
    now = inference.compare(images[2], [images[1], images[0]], with_overlay=False)
    return h, last_year, now


def _nodule(result, truth):
    r0, c0, r1, c1 = truth.bbox
    return [r for r in result.regions if r0 - 3 <= (r.bbox[0] + r.bbox[2]) / 2 <= r1 + 3
            and c0 - 3 <= (r.bbox[1] + r.bbox[3]) / 2 <= c1 + 3][0]


def test_the_nodule_keeps_its_tracking_uid_from_last_years_report(history, tmp_path):
    h, last_year, now = history
    visits = h.visits
    first = build_reading(str(visits[1].StudyInstanceUID), last_year, None)
    first_sr = build_sr(_input(visits[1], [visits[0]], last_year, first), ReportSettings())
    [old] = [f for f in first.findings if f.region is not None and f.region.bbox == _nodule(last_year, h.truth.regions[0]).bbox]

    for earlier in (from_sr(first_sr), from_reading(first)):  # from the SR in the PACS, or the node's own reading
        reading = build_reading(str(visits[2].StudyInstanceUID), now, None, tracked=earlier)
        [finding] = [f for f in reading.findings if f.region is _nodule(now, h.truth.regions[0])]
        assert finding.tracking_uid == old.tracking_uid and finding.tracking_id == old.tracking_id
    # without the earlier report the UID would be this study's own
    fresh = build_reading(str(visits[2].StudyInstanceUID), now, None)
    assert [f.tracking_uid for f in fresh.findings if f.region is _nodule(now, h.truth.regions[0])] != [old.tracking_uid]

    # in the SR: every time point's group of the nodule carries that one UID
    sr = build_sr(_input(visits[2], [visits[1], visits[0]], now,
                         build_reading(str(visits[2].StudyInstanceUID), now, None, tracked=from_sr(first_sr))),
                  ReportSettings())
    uids = [values(g, "Tracking Unique Identifier")[0] for g in groups(sr)]
    assert uids.count(old.tracking_uid) == 3  # baseline, last year, now


def test_another_vendors_tid1500_sr_is_followed(history):
    h, _, now = history
    visits = h.visits
    region = _nodule(now, h.truth.regions[0])
    last_year = region.timepoints[1]  # where the nodule was on last year's image
    outline = np.asarray(last_year.contour, float)[:, ::-1] + 0.5
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid="1.2.826.0.1.3680043.10.999.1", identifier="Lesion 1"),
        referenced_region=ImageRegion(graphic_type="POLYLINE", graphic_data=np.vstack([outline, outline[:1]]),
                                      source_image=SourceImageForRegion(visits[1].SOPClassUID, visits[1].SOPInstanceUID)),
        finding_type=codes.SCT.Nodule,
    )
    observer = ObservationContext(observer_person_context=ObserverContext(
        codes.DCM.Person, PersonObserverIdentifyingAttributes(name="Other^Reader")))
    other = hd.sr.Comprehensive3DSR(
        evidence=[visits[1]], content=MeasurementReport(observer, codes.LN.CTUnspecifiedBodyRegion, [group]),
        series_instance_uid=hd.UID(), series_number=50, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Other vendor")
    earlier = from_sr(other)
    assert [(e.tracking_uid, e.sop_instance_uid) for e in earlier] == [("1.2.826.0.1.3680043.10.999.1", visits[1].SOPInstanceUID)]
    reading = build_reading(str(visits[2].StudyInstanceUID), now, None, tracked=earlier)
    [finding] = [f for f in reading.findings if f.region is region]
    assert (finding.tracking_uid, finding.tracking_id) == ("1.2.826.0.1.3680043.10.999.1", "Lesion 1")
    # an earlier finding somewhere else is not taken
    far = [e.__class__(e.tracking_uid, e.tracking_id, e.sop_instance_uid, (e.centre[0] + 80, e.centre[1]), e.extent_px)
           for e in earlier]
    moved = build_reading(str(visits[2].StudyInstanceUID), now, None, tracked=far)
    assert [f.tracking_uid for f in moved.findings if f.region is region] != ["1.2.826.0.1.3680043.10.999.1"]


def _input(current, priors, result, reading):
    from dataclasses import replace

    from .conftest import study_ref

    inp = make_input(current, priors[0], result)
    return replace(inp, priors=[study_ref(p) for p in priors], prior_headers=list(priors), reading=reading)
