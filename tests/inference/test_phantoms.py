"""The generator writes proper DICOM with settable patient/study attributes and consistent truth."""

from __future__ import annotations

from datetime import date

import numpy as np
import pydicom
import pytest

from inference.phantoms import CHEST_CHANGES, PatientInfo, make_chest_pair, make_ct_pair


def test_datasets_save_and_reread_with_patient_attributes(tmp_path):
    info = PatientInfo(patient_id="P42", patient_name="Doe^Jane", current_date=date(2025, 3, 4),
                       prior_date=date(2024, 2, 3), current_accession="A2", prior_accession="A1")
    pair = make_chest_pair(1, "new_nodule", 128, patient=info)
    for ds, when, acc in ((pair.current, "20250304", "A2"), (pair.prior, "20240203", "A1")):
        p = tmp_path / f"{acc}.dcm"
        ds.save_as(p, enforce_file_format=True)
        back = pydicom.dcmread(p)
        assert back.PatientID == "P42" and str(back.PatientName) == "Doe^Jane"
        assert back.StudyDate == when and back.AccessionNumber == acc
        assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
        assert back.pixel_array.shape == (128, 128)
    uids = {pair.current.StudyInstanceUID, pair.prior.StudyInstanceUID,
            pair.current.SOPInstanceUID, pair.prior.SOPInstanceUID}
    assert len(uids) == 4


def test_same_seed_same_uids_and_pixels_different_seed_differs():
    a = make_chest_pair(9, "stable", 96)
    b = make_chest_pair(9, "stable", 96)
    c = make_chest_pair(10, "stable", 96)
    assert a.current.SOPInstanceUID == b.current.SOPInstanceUID
    assert np.array_equal(a.prior.pixel_array, b.prior.pixel_array)
    assert a.current.SOPInstanceUID != c.current.SOPInstanceUID


@pytest.mark.parametrize("change", CHEST_CHANGES)
def test_truth_is_where_the_pixels_changed(change):
    pair = make_chest_pair(2, change, 256, reposition=False, exposure_jitter=False)
    diff = pair.current.pixel_array.astype(float) - pair.prior.pixel_array.astype(float)
    if change == "stable":
        assert pair.truth.regions == []
        assert np.abs(diff).mean() < 12  # noise only
        return
    (t,) = pair.truth.regions
    r0, c0, r1, c1 = t.bbox
    inside = np.abs(diff[r0:r1, c0:c1]).mean()
    outside = np.abs(diff).mean()
    assert inside > 2 * outside
    assert t.status in ("new", "worsened", "improved", "resolved") and "zone" in t.zone


def test_ct_pair_is_a_series_of_slices():
    pair = make_ct_pair(1, "growing_nodule", shape=(10, 64, 64))
    assert len(pair.current) == 10 and len({d.SeriesInstanceUID for d in pair.current}) == 1
    assert pair.current[0].Modality == "CT" and pair.current[0].RescaleIntercept == -1024
    assert pair.truth.regions[0].status == "worsened"
