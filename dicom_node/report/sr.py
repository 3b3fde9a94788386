"""The node's answer as a Comprehensive 3D SR with TID 1500 (Measurement Report), per the IHE AI Results profile.

Content tree:

    Imaging Measurement Report (TID 1500)
      Language, observer context (device: the algorithm), Procedure Reported
      Imaging Measurements           one Measurement Group (TID 1410 / 1501) per finding:
        Tracking Identifier + UID      stable across re-analyses (study + zone + finding kind)
        Finding, Finding Site          SNOMED CT codes
        Algorithm Identification       TID 4019 (name, version, parameters)
        Area / Long axis / Volume / Signal change   UCUM units, each citing current and prior image
        Image Region (SCOORD)          the region's outline on the current image
        Description of Change          SNOMED CT (see codes.py for the table)
        Finding (TEXT), Comment (TEXT) the model's words and evidence
      Qualitative Evaluations        impression, comparison interval, prior study date and accession,
                                     or why there was no comparison (no prior / sanity-gate refusal)
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForRegion,
    TextContentItem,
    TimePointContext,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import generate_uid

from inference.types import ChangeRegion, ComparisonResult, Timepoint
from inference.vlm.schema import VLMResult

from .. import identity
from ..refs import ImageRef, StudyRef
from . import codes
from .reading import DEVICE, FINDING, Reading, ReadingFinding, _tracking_uid, build_reading
from .settings import ReportSettings

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class ReportInput:
    current_dataset: Dataset  # one current image (header only is fine): patient/study modules are copied from it
    current: StudyRef
    priors: list[StudyRef]  # empty: "no prior available" SR
    comparison: ComparisonResult  # refused=True: sanity-gate refusal SR (reasons from sanity_flags)
    vlm: VLMResult | None
    model_name: str
    model_version: str
    algorithm_parameters: dict[str, str]
    input_key: str  # hash of (study uid + instance set + model version): basis for the SR SOP Instance UID
    predecessor: ImageRef | None = None  # earlier SR of the same study (re-analysis)
    instance_number: int = 1  # Instance Number of the SR (e.g. 1 + the number of earlier reports)
    slice_refs: list[ImageRef] = field(default_factory=list)  # volumes: the current image of each slice, in analysis order
    # The one merge of regions and model findings (the pipeline's report stage makes it once and sends
    # the same to the RIS); None: made here from comparison and vlm (offline use, tests).
    reading: Reading | None = None
    prior_headers: list[Dataset] = field(default_factory=list)  # headers of the prior images compared (Image Library)

    def the_reading(self) -> Reading:
        return self.reading or build_reading(self.current.study_uid, self.comparison, self.vlm)


# --- deterministic UIDs -----------------------------------------------------------------------


def _uid(*parts: str) -> str:
    return generate_uid(prefix=identity.UID_ROOT, entropy_srcs=[str(p) for p in parts])


def sr_sop_instance_uid(input_key: str) -> str:
    return _uid("sr", input_key)


def sr_series_uid(study_uid: str, model_name: str) -> str:
    return _uid("sr-series", study_uid, model_name)


def overlay_sop_instance_uid(input_key: str) -> str:
    return _uid("sc", input_key)


def overlay_series_uid(study_uid: str, model_name: str) -> str:
    return _uid("sc-series", study_uid, model_name)


def device_uid(model_name: str, model_version: str) -> str:
    """The algorithm as a device: a new UID whenever the model or the node's software changes."""
    return _uid("device", model_name, model_version, identity.SOFTWARE_VERSION)


def tracking_uid(study_uid: str, zone: str, kind: str, ordinal: int = 0) -> str:
    """Stable across re-analyses of the same study: depends on where and what, never on the run."""
    return _tracking_uid(study_uid, zone, kind, ordinal)


def _status_code(f: ReadingFinding):
    table = codes.DEVICE_CODES if f.category == DEVICE else codes.CHANGE_CODES
    return table.get(f.status, codes.UNDETERMINED)


def _finding_code(f: ReadingFinding):
    if f.category == DEVICE:
        return codes.DEVICE
    return codes.finding_type(f.label) if f.category == FINDING else codes.IMAGING_FINDING


# --- building -----------------------------------------------------------------------------------


def _ref_dataset(ref: ImageRef) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = ref.sop_class_uid
    ds.SOPInstanceUID = ref.sop_instance_uid
    ds.SeriesInstanceUID = ref.series_uid
    ds.StudyInstanceUID = ref.study_uid
    return ds


def _region_image(inp: ReportInput, region: ChangeRegion | None = None) -> ImageRef:
    """The current image a region was measured on: its key slice for volumes, else the current image."""
    if region is not None and region.key_slice is not None and 0 <= region.key_slice < len(inp.slice_refs):
        return inp.slice_refs[region.key_slice]
    ds = inp.current_dataset
    return ImageRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID))


def _prior_image(inp: ReportInput) -> ImageRef | None:
    """The prior image actually compared (ComparisonResult.prior_source), else the first prior instance."""
    all_prior = [ref for study in inp.priors for ref in study.instances]
    for ref in all_prior:
        if ref.sop_instance_uid == inp.comparison.prior_source:
            return ref
    return all_prior[0] if all_prior else None


def _compared_prior_study(inp: ReportInput) -> StudyRef | None:
    prior = _prior_image(inp)
    for study in inp.priors:
        if prior is not None and study.study_uid == prior.study_uid:
            return study
    return inp.priors[0] if inp.priors else None


def _algorithm(inp: ReportInput) -> AlgorithmIdentification:
    params = [f"{k}={v}" for k, v in sorted(inp.algorithm_parameters.items())] or None
    return AlgorithmIdentification(name=inp.model_name, version=inp.model_version, parameters=params)


def _image_of(inp: ReportInput, sop_instance_uid: str) -> ImageRef | None:
    for ref in [*inp.current.instances, *(r for p in inp.priors for r in p.instances)]:
        if ref.sop_instance_uid == sop_instance_uid:
            return ref
    return None


def _outline(points, bbox, max_points: int) -> np.ndarray:
    """Closed outline in (column, row) image coordinates: the contour when known, else the box."""
    if len(points) >= 3:
        pts = np.asarray(points, dtype=float)[:, ::-1] + 0.5  # pixel centres
        if len(pts) > max_points - 1:
            pts = pts[np.linspace(0, len(pts) - 1, max_points - 1).astype(int)]
    else:
        r0, c0, r1, c1 = bbox
        pts = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1]], dtype=float)
    return np.vstack([pts, pts[:1]])


def _time_point(tp: Timepoint, order: int, count: int) -> TimePointContext:
    """TID 1502: the study date, its place in the series, and whether it is the baseline (the oldest)."""
    return TimePointContext(
        time_point=tp.date.isoformat() if tp.date else f"time point {order}",
        time_point_type=codes.BASELINE if order == 1 and count > 1 else None,
        time_point_order=order,
    )


def _group(inp: ReportInput, item: ReadingFinding, settings: ReportSettings) -> list:
    """One measurement group per time point of the finding (those where it is present, and always the
    current one, which carries the change description), all under the finding's Tracking UID."""
    region = item.region
    timepoints = list(region.timepoints) if region is not None else []
    if not timepoints:
        return [_one_group(inp, item, settings, None, None, 1, 1)]
    groups = []
    for order, tp in enumerate(timepoints, 1):
        is_current = order == len(timepoints)
        if tp.present or is_current:
            groups.append(_one_group(inp, item, settings, tp, is_current, order, len(timepoints)))
    return groups


def _one_group(inp: ReportInput, item: ReadingFinding, settings: ReportSettings, tp: Timepoint | None,
               is_current: bool | None, order: int, count: int):
    region = item.region
    algorithm = _algorithm(inp)
    site = codes.finding_site(item.zone)
    if tp is None or is_current:
        image = _region_image(inp, region)  # volumes: the key slice
    else:
        image = _image_of(inp, tp.sop_instance_uid) or _prior_image(inp)
    measurements: list[Measurement] = []
    outline = None
    if tp is not None and tp.present and image is not None:
        sources = [SourceImageForMeasurement(image.sop_class_uid, image.sop_instance_uid)]
        values = [(codes.LONG_AXIS, tp.long_axis_mm, codes.MM), (codes.SHORT_AXIS, tp.short_axis_mm, codes.MM),
                  (codes.AREA, tp.area_mm2, codes.MM2), (codes.VOLUME, tp.volume_mm3, codes.MM3)]
        measurements = [Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm,
                                    referenced_images=sources) for name, value, unit in values if value is not None]
        if tp.contour:
            outline = _outline(tp.contour, region.bbox, settings.max_polygon_points)
        elif is_current:
            outline = _outline(region.contour, region.bbox, settings.max_polygon_points)
    elif tp is None and region is not None:  # no time points (e.g. an older artifact): the region of change
        image = _region_image(inp, region)
        prior_img = _prior_image(inp)
        sources = [SourceImageForMeasurement(image.sop_class_uid, image.sop_instance_uid)]
        if prior_img is not None:
            sources.append(SourceImageForMeasurement(prior_img.sop_class_uid, prior_img.sop_instance_uid))
        values = [(codes.AREA, region.area_mm2, codes.MM2), (codes.LONG_AXIS, region.longest_diameter_mm, codes.MM),
                  (codes.VOLUME, region.volume_mm3, codes.MM3)]
        measurements = [Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm,
                                    referenced_images=sources) for name, value, unit in values if value is not None]
        outline = _outline(region.contour, region.bbox, settings.max_polygon_points)
    evaluations = [QualitativeEvaluation(codes.DESCRIPTION_OF_CHANGE, _status_code(item))] if tp is None or is_current else None
    common = dict(
        tracking_identifier=TrackingIdentifier(uid=item.tracking_uid, identifier=item.tracking_id),
        finding_type=_finding_code(item),
        algorithm_id=algorithm,
        finding_sites=[site] if site is not None else None,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        time_point_context=_time_point(tp, order, count) if tp is not None else None,
    )
    if outline is not None and image is not None:
        image_region = ImageRegion(graphic_type="POLYLINE", graphic_data=outline,
                                   source_image=SourceImageForRegion(image.sop_class_uid, image.sop_instance_uid))
        group = PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=image_region, **common)
    else:
        group = MeasurementsAndQualitativeEvaluations(**common)
    if tp is not None and not is_current:
        return group
    texts = [(codes.FINDING, _finding_sentence(item))]
    if item.evidence:
        texts.append((codes.COMMENT, item.evidence))
    for name, value in texts:
        group[0].ContentSequence.append(
            TextContentItem(name=name, value=_clip(value), relationship_type=RelationshipTypeValues.CONTAINS)
        )
    return group


def _finding_sentence(item: ReadingFinding) -> str:
    """'Focal opacity in the right upper zone, worsened: 16 x 14 mm (202 mm2) now; 9 x 8 mm on 2024-01-10.'"""
    text = f"{item.label[:1].upper()}{item.label[1:]} in the {item.zone}, {item.status}"
    region = item.region
    if region is not None and region.timepoints:
        from inference.pipeline import trajectory_text

        text += f": {trajectory_text(region)}"
        if region.trend and len(region.timepoints) > 2:
            text += f"; trend since {region.timepoints[0].date or 'the oldest prior'}: {region.trend}"
    return text + "."


def _clip(text: str, limit: int = 4000) -> str:
    # UT allows more, but PACS viewers do not; a long model output is cut, never dropped.
    text = " ".join(text.split()) or "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summary_texts(inp: ReportInput) -> list[tuple[object, str]]:
    """Report-level statements for the Qualitative Evaluations container (never empty)."""
    cmp = inp.comparison
    out: list[tuple[object, str]] = []
    if cmp.refused:
        reasons = "; ".join(f"{f.code}: {f.reason}" for f in cmp.sanity_flags if f.blocking) or "no reason given"
        out.append((codes.COMMENT, f"Comparison not performed: the sanity gate refused the image pair ({reasons})."))
    elif cmp.mode == "reference":  # issue 17: no usable prior, compared with normal references instead
        used = [u for u in cmp.references if u.registered]
        out.append((codes.COMMENT, f"No usable prior study of this patient: the current study was compared against "
                                   f"{len(used)} normal reference image(s) of other people (de-identified), not against "
                                   "the patient's prior. Findings are present, atypical for normals; no change over "
                                   "time is claimed."))
        out += [(codes.COMMENT, f"Normal reference {u.sop_instance_uid}: {u.why}") for u in used]
    elif not inp.priors or cmp.no_prior:
        out.append((codes.COMMENT, "No prior study available for comparison; the current study was not compared."))
    else:
        prior = _compared_prior_study(inp)
        if prior is not None:
            out.append((codes.STUDY_DATE, _format_date(prior.study_date) or "unknown"))
            out.append((codes.ACCESSION_NUMBER, prior.accession_number or "unknown"))
            out.append((codes.COMMENT, _interval_text(inp, prior)))
    warnings = [f"{f.code}: {f.reason}" for f in cmp.sanity_flags if not f.blocking]
    if warnings:
        out.append((codes.COMMENT, "Warnings: " + "; ".join(warnings)))
    reading = inp.the_reading()
    if reading.impression:  # the same impression the RIS gets
        out.append((codes.IMPRESSION, reading.impression))
    if reading.is_revision:
        out.append((codes.COMMENT, f"Revised report (revision {reading.revision}): replaces the earlier report of this "
                                   "study after further images arrived."))
    if inp.vlm is not None:
        if inp.vlm.flags:
            out.append((codes.COMMENT, "Model output flags: " + ", ".join(inp.vlm.flags)))
        if inp.vlm.usable and inp.vlm.priority != "routine":
            out.append((codes.COMMENT, f"Priority: {inp.vlm.priority}"))
    if cmp.summary and cmp.summary != reading.impression:
        out.append((codes.COMMENT, cmp.summary))
    if not cmp.refused and inp.priors and not cmp.regions and not (inp.vlm and inp.vlm.findings):
        out.append((codes.COMMENT, "No measurable change from the prior study."))
    return out


def _format_date(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else da


def _interval_text(inp: ReportInput, prior: StudyRef) -> str:
    current_da = inp.current.study_date or str(inp.current_dataset.get("StudyDate", ""))
    text = (f"Compared with prior study of {_format_date(prior.study_date) or 'unknown date'} "
            f"(accession {prior.accession_number or 'unknown'})")
    try:
        days = (dt.datetime.strptime(current_da, "%Y%m%d") - dt.datetime.strptime(prior.study_date, "%Y%m%d")).days
        text += f"; comparison interval {days} days."
    except ValueError:
        text += "; comparison interval unknown."
    return text


def _evidence(inp: ReportInput) -> list[Dataset]:
    seen = {str(inp.current_dataset.SOPInstanceUID)}
    evidence = [inp.current_dataset]
    # normal references (other people, de-identified UIDs) are Pertinent Other Evidence, like priors
    references = [ImageRef(u.sop_class_uid, u.sop_instance_uid, u.series_instance_uid, u.study_instance_uid)
                  for u in inp.comparison.references if u.registered and u.sop_instance_uid]
    for ref in [*inp.current.instances, *(r for p in inp.priors for r in p.instances), *references]:
        if ref.sop_instance_uid not in seen:
            seen.add(ref.sop_instance_uid)
            evidence.append(_ref_dataset(ref))
    return evidence


def _library_images(inp: ReportInput) -> list[Dataset]:
    """TID 1600 Image Library: the current image and every prior image the report refers to, from their
    headers (the compare stage keeps them), each with the attributes TID 1602 asks for."""
    out, seen = [], set()
    for header in [inp.current_dataset, *inp.prior_headers]:
        uid = str(header.get("SOPInstanceUID", ""))
        if uid and uid not in seen and "Rows" in header and "Columns" in header:
            seen.add(uid)
            out.append(header)
    return out


def _separate(items) -> None:
    for item in items:
        if getattr(item, "ValueType", "") == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        if "ContentSequence" in item:
            _separate(item.ContentSequence)


def build_sr(inp: ReportInput, settings: ReportSettings) -> Dataset:
    """The TID 1500 Comprehensive 3D SR for one analysis; same inputs, same SOP Instance UID."""
    ds = inp.current_dataset
    if str(ds.StudyInstanceUID) != inp.current.study_uid:
        raise ValueError(f"current_dataset belongs to study {ds.StudyInstanceUID}, not {inp.current.study_uid}")
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(inp.model_name, inp.model_version),
        name=f"{inp.model_name} {inp.model_version}"[:64],
        manufacturer_name=identity.MANUFACTURER,
        model_name=identity.MANUFACTURER_MODEL_NAME,
    )
    context = ObservationContext(observer_device_context=ObserverContext(dcm_codes.DCM.Device, device))
    groups = [g for item in inp.the_reading().findings for g in _group(inp, item, settings)]
    placeholder = not groups
    report = MeasurementReport(
        observation_context=context,
        procedure_reported=codes.procedure_code(str(ds.get("Modality", "")), str(ds.get("BodyPartExamined", ""))),
        imaging_measurements=groups or [MeasurementsAndQualitativeEvaluations(TrackingIdentifier(identifier="none"))],
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(codes.language_code(settings.language)),
        referenced_images=_library_images(inp),
    )
    root = report[0]
    if placeholder:  # highdicom insists on a group; a report without findings has no Imaging Measurements
        root.ContentSequence = [item for item in root.ContentSequence
                                if item.ConceptNameCodeSequence[0].CodeValue != dcm_codes.DCM.ImagingMeasurements.value]
    evaluations = ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS)
    evaluations.ContentSequence = [
        TextContentItem(name=name, value=_clip(value), relationship_type=RelationshipTypeValues.CONTAINS)
        for name, value in _summary_texts(inp)
    ]
    root.ContentSequence.append(evaluations)
    _separate(report)  # list-like containers: DCMTK's dsr2html then labels every value

    equipment = hd.ContributingEquipment(
        manufacturer=identity.MANUFACTURER,
        purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{identity.MANUFACTURER_MODEL_NAME} / {inp.model_name}"[:64],
        software_versions=[identity.SOFTWARE_VERSION, inp.model_version[:64]],
        contribution_description=f"Comparative analysis by {inp.model_name} {inp.model_version}"[:64],
    )
    equipment.DeviceUID = device_uid(inp.model_name, inp.model_version)
    sr = Comprehensive3DSR(
        evidence=_evidence(inp),
        content=report,
        series_instance_uid=sr_series_uid(inp.current.study_uid, inp.model_name),
        series_number=settings.series_number,
        sop_instance_uid=sr_sop_instance_uid(inp.input_key),
        instance_number=inp.instance_number,
        manufacturer=identity.MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=settings.institution_name or ds.get("InstitutionName") or None,
        previous_versions=[_ref_dataset(inp.predecessor)] if inp.predecessor is not None else None,
        contributing_equipment=[equipment],
        series_description=identity.RESULT_SERIES_DESCRIPTION,
        manufacturer_model_name=identity.MANUFACTURER_MODEL_NAME,
        software_versions=identity.SOFTWARE_VERSION,
    )
    sr.ContinuityOfContent = "SEPARATE"
    return sr
