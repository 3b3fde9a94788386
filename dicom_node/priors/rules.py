"""Prior selection rules: pure functions over typed study/series records (no network, no database).

Each rule either passes a candidate or names why it is dropped; the first failing rule is
the one `dicom-node priors` prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import date, timedelta

from .. import identity
from ..ingest import NON_IMAGE_MODALITIES
from .model import CandidateDecision, SeriesRecord, StudyRecord
from .settings import PriorSettings

REPORT_MODALITIES = frozenset({"SR", "DOC"})
_VIEW_ALIASES = {"LATERAL": "LAT", "LL": "LAT", "RL": "LAT", "LLD": "LAT", "RLD": "LAT", "L": "LAT"}
_PLANE_WORDS = {"AX": "AXIAL", "AXIAL": "AXIAL", "TRA": "AXIAL", "TRANSVERSE": "AXIAL",
                "COR": "CORONAL", "CORONAL": "CORONAL", "SAG": "SAGITTAL", "SAGITTAL": "SAGITTAL"}


@dataclass(frozen=True)
class Choice:
    study: StudyRecord
    role: str  # recent | baseline
    rule: str


def parse_date(value: str) -> date | None:
    value = (value or "").strip()
    if not re.fullmatch(r"\d{8}", value):
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def lookback_start(current_date: date, settings: PriorSettings) -> date:
    return current_date - timedelta(days=round(settings.lookback_years * 365.25))


def modality_key(modality: str, settings: PriorSettings) -> str:
    modality = modality.upper()
    for group in settings.modality_groups:
        if modality in group:
            return group[0]
    return modality


def region(body_part: str, settings: PriorSettings) -> str:
    body_part = body_part.strip().upper().replace(" ", "")
    return settings.body_part_regions.get(body_part, body_part)


def normalise_view(view: str) -> str:
    view = view.strip().upper()
    return _VIEW_ALIASES.get(view, view)


def normalise_laterality(value: str) -> str:
    value = value.strip().upper()
    return value if value in ("L", "R", "B") else ""


def plane_from_orientation(iop) -> str:
    """AXIAL/CORONAL/SAGITTAL from ImageOrientationPatient (the slice normal's main axis)."""
    try:
        r = [float(v) for v in iop]
    except (TypeError, ValueError):
        return ""
    if len(r) != 6:
        return ""
    normal = (r[1] * r[5] - r[2] * r[4], r[2] * r[3] - r[0] * r[5], r[0] * r[4] - r[1] * r[3])
    axis = max(range(3), key=lambda i: abs(normal[i]))
    return ("SAGITTAL", "CORONAL", "AXIAL")[axis]


def plane_from_description(description: str) -> str:
    for word in re.split(r"[^A-Z]+", description.upper()):
        if word in _PLANE_WORDS:
            return _PLANE_WORDS[word]
    return ""


def similarity(a: str, b: str) -> float:
    """Token overlap (Jaccard) of two descriptions; 0 when either is empty."""
    ta = set(re.findall(r"[A-Z0-9]+", a.upper()))
    tb = set(re.findall(r"[A-Z0-9]+", b.upper()))
    return len(ta & tb) / len(ta | tb) if ta and tb else 0.0


def is_node_result(series: SeriesRecord) -> bool:
    """The node's own result objects (its SR, its overlay): never a prior, never a report to read."""
    return series.manufacturer == identity.MANUFACTURER or series.description in (
        identity.RESULT_SERIES_DESCRIPTION,
        identity.OVERLAY_SERIES_DESCRIPTION,
    )


def is_image_series(series: SeriesRecord) -> bool:
    return bool(series.modality) and series.modality not in NON_IMAGE_MODALITIES and not is_node_result(series)


def is_report_series(series: SeriesRecord) -> bool:
    return series.modality in REPORT_MODALITIES and not is_node_result(series)


# --- study level (C-FIND STUDY answers) -----------------------------------------------------


def patient_rule(current: StudyRecord, cand: StudyRecord, settings: PriorSettings) -> str | None:
    if cand.patient_id.strip() != current.patient_id.strip():
        return "other patient: PatientID differs"
    if current.issuer and cand.issuer and cand.issuer != current.issuer:
        return f"other patient: IssuerOfPatientID {cand.issuer!r}, current study {current.issuer!r}"
    if current.issuer and not cand.issuer and not settings.accept_missing_issuer:
        return "patient not certain: prior has no IssuerOfPatientID, current study has one (accept_missing_issuer=false)"
    if current.birth_date and cand.birth_date and current.birth_date != cand.birth_date:
        return "other patient: PatientBirthDate differs under the same PatientID"
    return None


def ambiguous_issuers(current: StudyRecord, candidates: list[StudyRecord]) -> str | None:
    """The current study names no issuer but the archive has this PatientID under several issuers."""
    if current.issuer:
        return None
    issuers = sorted({c.issuer for c in candidates if c.issuer})
    if len(issuers) > 1:
        return f"ambiguous PatientID: the archive uses it for issuers {', '.join(issuers)} and the current study names none"
    return None


def study_rule(current: StudyRecord, cand: StudyRecord, settings: PriorSettings) -> str | None:
    """Why a study-level candidate is dropped, or None. The current study must have a valid date."""
    if cand.study_uid == current.study_uid:
        return "the current study itself"
    reason = patient_rule(current, cand, settings)
    if reason:
        return reason
    current_date = parse_date(current.study_date)
    cand_date = parse_date(cand.study_date)
    if cand_date is None:
        return f"malformed archive answer: StudyDate {cand.study_date!r} is not a date"
    if current_date is None:
        return f"current study has no valid StudyDate ({current.study_date!r}): priors cannot be ordered"
    if cand_date > current_date:
        return "not earlier: after the current study"
    if cand_date == current_date:
        if not (cand.when[1] and current.when[1]):
            return "not strictly earlier: same day and StudyTime unknown"
        if cand.when[1] >= current.when[1]:
            return "not earlier: same day, same time or later"
    if cand_date < lookback_start(current_date, settings):
        return f"outside the lookback window ({settings.lookback_years:g} years)"
    if settings.match_modality and cand.modalities:
        wanted = {modality_key(m, settings) for m in current_modalities(current)}
        offered = {modality_key(m, settings) for m in cand.modalities}
        if wanted and not wanted & offered:
            return f"modality differs: {'/'.join(sorted(cand.modalities))}, current {'/'.join(sorted(current_modalities(current)))}"
    return None


def current_modalities(current: StudyRecord) -> set[str]:
    if current.series:
        found = {s.modality for s in current.series if is_image_series(s)}
        if found:
            return found
    return {m for m in current.modalities if m not in NON_IMAGE_MODALITIES}


# --- series level (C-FIND SERIES answers) ---------------------------------------------------


def matching_series(current: StudyRecord, cand: StudyRecord, settings: PriorSettings) -> tuple[list[SeriesRecord], str | None]:
    """The prior's image series that pass the modality/body part/view/laterality rules, or why none does."""
    assert cand.series is not None, "series-level query first"
    images = [s for s in cand.series if is_image_series(s)]
    if not images:
        if any(is_node_result(s) for s in cand.series):
            return [], "only the node's own result objects"
        return [], "no image series (reports or other non-image objects only)"
    current_images = [s for s in (current.series or ()) if is_image_series(s)]
    if settings.match_modality:
        wanted = {modality_key(m, settings) for m in current_modalities(current)}
        kept = [s for s in images if modality_key(s.modality, settings) in wanted] if wanted else images
        if not kept:
            current_names = "/".join(sorted(current_modalities(current)))
            return [], f"modality differs: {'/'.join(sorted({s.modality for s in images}))}, current {current_names}"
        images = kept
    if settings.match_body_part:
        wanted = {region(s.body_part, settings) for s in current_images if s.body_part}
        known = [s for s in images if s.body_part]
        if wanted and known:
            kept = [s for s in images if not s.body_part or region(s.body_part, settings) in wanted]
            if not kept:
                parts = "/".join(sorted({s.body_part for s in known}))
                return [], f"body part differs: {parts}, current {'/'.join(sorted(wanted))}"
            images = kept
    projection = bool(current_modalities(current) & set(settings.projection_modalities))
    if settings.match_view and projection:
        wanted = {normalise_view(v) for s in current_images for v in s.views if v}
        if wanted and any(s.views for s in images):
            kept = [s for s in images if not s.views or {normalise_view(v) for v in s.views} & wanted]
            if not kept:
                views = "/".join(sorted({v for s in images for v in s.views}))
                return [], f"view differs: {views}, current {'/'.join(sorted(wanted))}"
            images = kept
    if settings.match_laterality:
        wanted = {normalise_laterality(v) for s in current_images for v in s.lateralities} - {""}
        if wanted and any(_lateralities(s) for s in images):
            kept = [s for s in images if not _lateralities(s) or _laterality_match(_lateralities(s), wanted)]
            if not kept:
                sides = "/".join(sorted({v for s in images for v in _lateralities(s)}))
                return [], f"laterality differs: {sides}, current {'/'.join(sorted(wanted))}"
            images = kept
    return images, None


def _lateralities(series: SeriesRecord) -> set[str]:
    return {normalise_laterality(v) for v in series.lateralities} - {""}


def _laterality_match(prior: set[str], current: set[str]) -> bool:
    return bool(prior & current) or "B" in prior or "B" in current


def series_score(current_series: SeriesRecord, prior_series: SeriesRecord, settings: PriorSettings) -> float:
    """How well a prior series matches one current series (higher is better)."""
    score = 0.0
    if modality_key(current_series.modality, settings) == modality_key(prior_series.modality, settings):
        score += 8
    if current_series.body_part and region(current_series.body_part, settings) == region(prior_series.body_part, settings):
        score += 4
    cur_views = {normalise_view(v) for v in current_series.views}
    if cur_views and cur_views & {normalise_view(v) for v in prior_series.views}:
        score += 4
    cur_sides = _lateralities(current_series)
    if cur_sides and _laterality_match(_lateralities(prior_series), cur_sides) and _lateralities(prior_series):
        score += 2
    cur_plane = current_series.plane or plane_from_description(current_series.description)
    prior_plane = prior_series.plane or plane_from_description(prior_series.description)
    if cur_plane and cur_plane == prior_plane:
        score += 2
    return score + similarity(current_series.description, prior_series.description)


def choose_series(current: StudyRecord, matching: list[SeriesRecord], settings: PriorSettings) -> list[SeriesRecord]:
    """For each current image series, the prior series that matches it best (view/plane/body part)."""
    current_images = [s for s in (current.series or ()) if is_image_series(s)]
    if not current_images:
        return list(matching)
    chosen: dict[str, SeriesRecord] = {}
    for cur in current_images:
        best = max(matching, key=lambda s: (series_score(cur, s, settings), -_number(s)), default=None)
        if best is not None:
            chosen.setdefault(best.series_uid, best)
    return list(chosen.values())


def report_series(cand: StudyRecord) -> list[SeriesRecord]:
    return [s for s in (cand.series or ()) if is_report_series(s)]


def _number(series: SeriesRecord) -> int:
    try:
        return int(series.number)
    except ValueError:
        return 0


# --- ranking -------------------------------------------------------------------------------


def rank(current: StudyRecord, survivors: list[StudyRecord], settings: PriorSettings) -> tuple[list[Choice], dict[str, str]]:
    """The most recent N (plus optionally the oldest as baseline); the rest with the reason they lost."""
    def key(c: StudyRecord):
        return (c.study_date, similarity(c.description, current.description), c.when[1])

    ordered = sorted(survivors, key=key, reverse=True)
    n = settings.max_priors
    chosen = [Choice(c, "recent", f"kept: most recent matching prior ({i + 1} of {n})") for i, c in enumerate(ordered[:n])]
    dropped = {c.study_uid: f"older than the {n} most recent matching prior(s)" for c in ordered[n:]}
    if settings.include_baseline and len(ordered) > n:
        oldest = ordered[-1]
        chosen.append(Choice(oldest, "baseline", "kept: baseline (oldest matching prior in the lookback window)"))
        dropped.pop(oldest.study_uid)
    return chosen, dropped


def decision(cand: StudyRecord, kept: bool, rule: str) -> CandidateDecision:
    return CandidateDecision(
        study_uid=cand.study_uid,
        study_date=cand.study_date,
        modality="/".join(sorted(cand.modalities)) or "/".join(sorted({s.modality for s in cand.series or ()})),
        description=cand.description,
        kept=kept,
        rule=rule,
        archive=cand.archive,
        accession_number=cand.accession_number,
    )


def with_series(cand: StudyRecord, series: list[SeriesRecord]) -> StudyRecord:
    modalities = cand.modalities or frozenset(s.modality for s in series if s.modality)
    return replace(cand, series=tuple(series), modalities=modalities)
