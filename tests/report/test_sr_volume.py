"""A CT volume's region is reported on the slice it was measured on."""

from __future__ import annotations

import inference
from dicom_node.report import ImageRef, ReportInput, ReportSettings, StudyRef, build_sr
from inference.phantoms import make_ct_pair
from inference.pixels import volume_from_datasets
from tests.support.validation import assert_valid_dicom


def _ref(ds) -> ImageRef:
    return ImageRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID))


def test_ct_region_scoord_references_its_key_slice(tmp_path):
    pair = make_ct_pair(4, "new_nodule")
    current = volume_from_datasets(pair.current, [str(ds.SOPInstanceUID) for ds in pair.current])
    prior = volume_from_datasets(pair.prior, [str(ds.SOPInstanceUID) for ds in pair.prior])
    result = inference.compare(current, [prior])
    [region] = [r for r in result.regions if r.status == "new"]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in pair.current}
    slice_refs = [_ref(by_uid[uid]) for uid in current.slice_sources]
    first = pair.current[0]
    inp = ReportInput(
        current_dataset=first,
        current=StudyRef(str(first.StudyInstanceUID), str(first.StudyDate), instances=[_ref(ds) for ds in pair.current]),
        priors=[StudyRef(str(pair.prior[0].StudyInstanceUID), str(pair.prior[0].StudyDate), instances=[_ref(ds) for ds in pair.prior])],
        comparison=result, vlm=None, model_name="engine", model_version="1", algorithm_parameters={},
        input_key="ct-test", slice_refs=slice_refs,
    )
    sr = build_sr(inp, ReportSettings())
    referenced = set()

    def walk(items):
        for item in items:
            if item.ValueType == "SCOORD":
                referenced.update(str(i.ReferencedSOPInstanceUID) for i in item.ContentSequence[0].ReferencedSOPSequence)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert referenced == {slice_refs[region.key_slice].sop_instance_uid}
    assert region.key_slice != 0  # the first slice would have been the wrong answer
    path = tmp_path / "ct-sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_valid_dicom(path)
