"""Find, choose, fetch and cache the prior studies of one current study, and explain the choice."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from .. import audit
from ..config import Settings
from ..index import Index
from ..ingest import Ingestor
from ..logs import log_event, phi_hash
from . import rules
from .archive import Archive, open_archive
from .cache import evict_priors
from .model import (
    ArchiveUnavailable,
    CandidateDecision,
    PriorRetrieval,
    PriorStudy,
    SeriesRecord,
    StudyRecord,
)
from .reports import report_text

log = logging.getLogger(__name__)


@dataclass
class Chosen:
    choice: rules.Choice
    images: list[SeriesRecord]
    reports: list[SeriesRecord]
    archive: Archive


@dataclass
class Selection:
    current: StudyRecord
    decisions: list[CandidateDecision] = field(default_factory=list)
    chosen: list[Chosen] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    archives: list[Archive] = field(default_factory=list)

    def close(self) -> None:
        for archive in self.archives:
            archive.close()


# --- the current study, from the index -------------------------------------------------------


def current_study(index: Index, study_uid: str, series_uids: list[str] | None = None) -> StudyRecord:
    """The current study as a StudyRecord; its series are the analysable ones (or those named)."""
    overview = index.study_overview(study_uid)
    if overview is None:
        raise LookupError(f"study {study_uid} is not in the index")
    series = []
    for row in overview["series"]:
        if series_uids is not None and row["series_uid"] not in series_uids:
            continue
        if series_uids is None and not row["analysable_count"]:
            continue
        series.append(
            SeriesRecord(
                series_uid=row["series_uid"],
                modality=row["modality"],
                body_part=row["body_part"],
                description=row["series_description"],
                number=row["series_number"],
                views=frozenset(v.upper() for v in row["views"]),
                lateralities=frozenset(v.upper() for v in row["lateralities"]),
                plane=_plane(row["paths"]),
                instance_count=row["instance_count"],
            )
        )
    return StudyRecord(
        study_uid=study_uid,
        patient_id=overview["patient_id"],
        issuer=overview["issuer"],
        birth_date=overview["birth_date"],
        study_date=overview["study_date"],
        study_time=overview["study_time"],
        accession_number=overview["accession_number"],
        description=overview["study_description"],
        modalities=frozenset(s.modality for s in series if s.modality) or frozenset({overview["modality"]} - {""}),
        archive="local",
        series=tuple(series),
    )


def _plane(paths: list[str]) -> str:
    """Plane of a cross-sectional series from the orientation of one of its local files."""
    for path in paths[:1]:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["ImageOrientationPatient"])
        except Exception:  # noqa: BLE001 - a plane is a nicety for series matching
            return ""
        return rules.plane_from_orientation(ds.get("ImageOrientationPatient"))
    return ""


# --- selection -------------------------------------------------------------------------------


def select_priors(
    settings: Settings,
    index: Index,
    study_uid: str,
    series_uids: list[str] | None = None,
) -> Selection:
    """Query the archives (study level, then series level) and apply the selection rules.

    Raises ArchiveUnavailable when a required archive cannot be queried. The caller closes the
    returned selection's archive connections (retrieve_priors and explain_priors do).
    """
    ps = settings.priors
    current = current_study(index, study_uid, series_uids)
    selection = Selection(current)
    if not ps.enabled:
        selection.warnings.append("prior retrieval is disabled (priors.enabled=false)")
        return selection
    if not ps.archives:
        selection.warnings.append("no archive configured (priors.archives is empty)")
        return selection
    if not current.patient_id:
        selection.warnings.append("current study has no PatientID: priors cannot be searched")
        return selection
    current_date = rules.parse_date(current.study_date)
    if current_date is None:
        selection.warnings.append(f"current study has no valid StudyDate ({current.study_date!r}): priors cannot be ordered")
        return selection
    date_range = f"{rules.lookback_start(current_date, ps):%Y%m%d}-{current_date:%Y%m%d}"

    found: list[tuple[StudyRecord, Archive]] = []
    seen: dict[str, str] = {}
    decide = selection.decisions.append
    try:
        for config in ps.archives:
            archive = open_archive(config, settings, index)
            selection.archives.append(archive)
            try:
                answers = archive.find_studies(current.patient_id, current.issuer, date_range)
            except ArchiveUnavailable as exc:
                if config.required:
                    raise
                selection.warnings.append(f"{exc} (archive not required: its priors are not considered)")
                continue
            audit.record_access(index, audit.ARCHIVE_QUERY, current.study_uid, peer=config.name,
                                detail=f"{len(answers.records)} studies of the patient found", patient_id=current.patient_id)
            for problem in answers.malformed:
                selection.warnings.append(f"archive {config.name!r}: malformed C-FIND/QIDO study answer ignored: {problem}")
                decide(CandidateDecision("?", "", "", "", False, f"malformed archive answer: {problem}", config.name))
            for record in answers.records:
                if record.study_uid in seen:
                    decide(rules.decision(record, False, f"duplicate: already found in archive {seen[record.study_uid]!r}"))
                    continue
                seen[record.study_uid] = config.name
                found.append((record, archive))

        same_patient = [r for r, _ in found if r.study_uid != current.study_uid and r.patient_id.strip() == current.patient_id.strip()
                        and not (current.birth_date and r.birth_date and r.birth_date != current.birth_date)]
        ambiguity = rules.ambiguous_issuers(current, same_patient)
        if ambiguity:
            selection.warnings.append(ambiguity)

        survivors: list[tuple[StudyRecord, Archive]] = []
        for record, archive in found:
            reason = rules.study_rule(current, record, ps)
            if reason is None and ambiguity:
                reason = ambiguity
            if reason:
                decide(rules.decision(record, False, reason))
            else:
                survivors.append((record, archive))
        survivors.sort(key=lambda item: item[0].when, reverse=True)
        for record, _ in survivors[ps.max_candidates:]:
            decide(rules.decision(record, False, f"not examined: more than max_candidates={ps.max_candidates} newer candidates"))

        matching: dict[str, tuple[StudyRecord, list[SeriesRecord], Archive]] = {}
        for record, archive in survivors[: ps.max_candidates]:
            try:
                answers = archive.find_series(record.study_uid)
            except ArchiveUnavailable as exc:
                if archive.config.required:
                    raise
                selection.warnings.append(str(exc))
                decide(rules.decision(record, False, "series query failed (archive unavailable, not required)"))
                continue
            for problem in answers.malformed:
                selection.warnings.append(f"archive {archive.name!r}: malformed series answer for study {record.study_uid} ignored: {problem}")
            record = rules.with_series(record, answers.records)
            images, reason = rules.matching_series(current, record, ps)
            if reason:
                decide(rules.decision(record, False, reason))
            else:
                matching[record.study_uid] = (record, images, archive)

        chosen, lost = rules.rank(current, [m[0] for m in matching.values()], ps)
        for uid, reason in lost.items():
            decide(rules.decision(matching[uid][0], False, reason))
        for choice in chosen:
            record, images, archive = matching[choice.study.study_uid]
            decide(rules.decision(record, True, choice.rule))
            series = rules.choose_series(current, images, ps)
            reports = rules.report_series(record) if ps.retrieve_reports else []
            selection.chosen.append(Chosen(choice, series, reports, archive))
    except BaseException:
        selection.close()
        raise
    # Kept ones first, then newest first (stable sorts).
    selection.decisions.sort(key=lambda d: d.study_date, reverse=True)
    selection.decisions.sort(key=lambda d: not d.kept)
    return selection


# --- retrieval -------------------------------------------------------------------------------


def retrieve_priors(
    settings: Settings,
    index: Index,
    ingestor: Ingestor,
    study_uid: str,
    series_uids: list[str] | None = None,
) -> PriorRetrieval:
    """Choose the priors of `study_uid`, bring their matching series (and reports) into the store.

    `series_uids`: the current series being analysed (default: every analysable series).
    Raises ArchiveUnavailable (transient: retry the job later) or RetrieveRefused (configuration).
    With no prior at all the result has no_prior=True and a warning saying why.
    """
    ps = settings.priors
    selection = select_priors(settings, index, study_uid, series_uids)
    result = PriorRetrieval(study_uid, candidates=selection.decisions, warnings=list(selection.warnings))
    try:
        for chosen in selection.chosen:
            prior = _fetch(settings, index, ingestor, chosen, result.warnings)
            if prior is not None:
                result.chosen.append(prior)
    finally:
        selection.close()
    if result.update_no_prior() and not any("no prior" in w for w in result.warnings):
        result.warnings.append("no prior available: the comparison proceeds without one")
    eviction = evict_priors(index, int(ps.cache_budget_mb * 2**20), settings.storage_dir)
    result.evicted = eviction.evicted
    if eviction.over_budget:
        result.warnings.append(
            f"prior cache is over its budget ({eviction.remaining_bytes // 2**20} MiB > {ps.cache_budget_mb:g} MiB): "
            "every remaining prior is in use"
        )
    log_event(
        log, logging.INFO, "priors.retrieved", study_uid=study_uid, patient=phi_hash(selection.current.patient_id),
        chosen=[p.study_uid for p in result.chosen], candidates=len(result.candidates), warnings=len(result.warnings),
        evicted=len(result.evicted),
    )
    return result


def _fetch(settings: Settings, index: Index, ingestor: Ingestor, chosen: Chosen, warnings: list[str]) -> PriorStudy | None:
    record = chosen.choice.study
    archive = chosen.archive
    uid = record.study_uid
    local_study = index.study(uid)
    all_series = chosen.images + chosen.reports
    expected: dict[str, dict[str, str]] = {}
    try:
        for series in all_series:
            answers = archive.find_instances(uid, series.series_uid)
            for problem in answers.malformed:
                warnings.append(f"archive {archive.name!r}: malformed instance answer in series {series.series_uid}: {problem}")
            expected[series.series_uid] = dict(answers.records)
    except ArchiveUnavailable as exc:
        if archive.config.required:
            raise
        warnings.append(f"prior {uid} not retrieved: {exc}")
        return None

    local = _local_instances(index, uid)
    missing = {s: {sop for sop in sops if sop not in local} for s, sops in expected.items()}
    own_local_study = local_study is not None and not local_study["is_prior"] and not any(missing.values())
    if not own_local_study:
        # Registered before anything arrives: its arrival never queues it for analysis, and the
        # lease keeps it from eviction while the comparison runs.
        index.mark_prior(uid, lease_seconds=settings.priors.lease_seconds)
    reused = not any(missing.values())
    # Every SOP class of the prior's missing series: a C-GET association then carries them all.
    sop_classes = {sop_class for s in all_series if missing[s.series_uid] for sop_class in expected[s.series_uid].values()}
    to_retrieve = [series for series in all_series if missing[series.series_uid]]
    try:
        for series in to_retrieve:
            transfer = archive.retrieve_series(uid, series.series_uid, sop_classes, ingestor)
            warnings.extend(f"prior {uid} series {series.series_uid}: {p}" for p in transfer.problems)
    except ArchiveUnavailable as exc:
        if archive.config.required:
            raise
        warnings.append(f"prior {uid} only partly retrieved: {exc}")
    finally:
        if to_retrieve:  # audited even when the archive failed half-way: some data may have arrived
            audit.record_access(index, audit.ARCHIVE_RETRIEVE, uid, peer=archive.name, patient_id=record.patient_id,
                                detail=f"{len(to_retrieve)} series requested by {archive.config.method}")

    if not own_local_study:
        index.mark_prior(uid, lease_seconds=settings.priors.lease_seconds)  # flags the study row, now it exists
    local = _local_instances(index, uid)
    missing_count = 0
    for series in all_series:
        gone = [sop for sop in expected[series.series_uid] if sop not in local]
        if gone:
            missing_count += len(gone)
            warnings.append(
                f"partial retrieve: prior {uid} series {series.series_uid}: {len(expected[series.series_uid]) - len(gone)} "
                f"of {len(expected[series.series_uid])} instances arrived; the analysis uses what arrived"
            )

    def paths_of(series_list: list[SeriesRecord]) -> list[Path]:
        wanted = {s.series_uid: i for i, s in enumerate(series_list)}
        rows = [r for r in local.values() if r["series_uid"] in wanted]
        rows.sort(key=lambda r: (wanted[r["series_uid"]], _int(r["instance_number"]), r["path"]))
        return [Path(r["path"]) for r in rows]

    report_paths = paths_of(chosen.reports)
    texts = []
    for path in report_paths:
        text, problem = report_text(path)
        if text:
            texts.append(text)
        if problem:
            warnings.append(f"prior {uid}: {problem}")
    image_paths = paths_of(chosen.images)
    if not image_paths:
        warnings.append(f"prior {uid}: none of its chosen images arrived")
    body_parts = sorted({s.body_part for s in chosen.images if s.body_part})
    return PriorStudy(
        study_uid=uid,
        study_date=record.study_date,
        accession_number=record.accession_number,
        study_description=record.description,
        modality="/".join(sorted({s.modality for s in chosen.images})),
        body_part="/".join(body_parts),
        series_uids=[s.series_uid for s in chosen.images],
        instance_paths=image_paths,
        report_text="\n\n".join(texts) if texts else None,
        archive=archive.name,
        role=chosen.choice.role,
        report_series_uids=[s.series_uid for s in chosen.reports],
        report_paths=report_paths,
        reused_from_cache=reused,
        missing_instances=missing_count,
    )


def _local_instances(index: Index, study_uid: str) -> dict[str, dict]:
    return {row["sop_instance_uid"]: row for row in index.study_instances(study_uid) if Path(row["path"]).is_file()}


def _int(value: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def release_priors(index: Index, retrieval: PriorRetrieval) -> None:
    """Call when the comparison is done: its priors stay cached but may be evicted again."""
    for prior in retrieval.chosen:
        index.release_prior(prior.study_uid)


# --- explanation -----------------------------------------------------------------------------


def explain_priors(settings: Settings, study_uid: str, series_uids: list[str] | None = None) -> str:
    """What `dicom-node priors STUDY_UID` prints: every candidate with the rule that kept or dropped it.
    Queries the archives (C-FIND/QIDO only) and retrieves nothing."""
    index = Index(settings.database_url)
    try:
        selection = select_priors(settings, index, study_uid, series_uids)
        selection.close()
        audit.record_access(index, audit.OPERATOR_VIEW, study_uid, detail=f"{len(selection.decisions)} prior candidates shown",
                            patient_id=selection.current.patient_id)
    finally:
        index.dispose()
    return format_selection(selection)


def format_selection(selection: Selection) -> str:
    cur = selection.current
    series = ", ".join(
        f"{s.modality} {s.body_part or '-'} {'/'.join(sorted(s.views)) or '-'} {'/'.join(sorted(s.lateralities)) or ''}".strip()
        for s in cur.series or ()
    )
    lines = [
        f"current study {cur.study_uid}",
        f"  date {cur.study_date or '-'} {cur.study_time or ''}  {cur.description or '-'}  patient {phi_hash(cur.patient_id)}"
        + (f" issuer {cur.issuer}" if cur.issuer else ""),
        f"  series: {series or '-'}",
        f"candidates: {len(selection.decisions)}, chosen: {len(selection.chosen)}",
    ]
    for d in selection.decisions:
        mark = "KEPT   " if d.kept else "dropped"
        lines.append(
            f"  {mark} {d.study_date or '-':8}  {d.modality or '-':8}  {(d.description or '-')[:32]:32}  "
            f"{d.archive or '-'}  {d.study_uid}\n            {d.rule}"
        )
    for chosen in selection.chosen:
        lines.append(
            f"  series of {chosen.choice.study.study_uid}: "
            + ", ".join(f"{s.series_uid} ({s.modality} {s.description})" for s in chosen.images + chosen.reports)
        )
    if not selection.chosen:
        lines.append("no prior available: the comparison would proceed without one")
    for warning in selection.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)
