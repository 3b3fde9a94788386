"""Study assembly: decide when a study has stopped arriving and queue it for analysis.

All state lives in the index (last_received_at, state), so a restart re-arms every
study that was receiving: nothing depends on in-memory timers.
"""

from __future__ import annotations

import logging
import time

from .config import Settings
from .index import Index, OutboxRow, StudyActivity
from .logs import log_event
from .polling import PollingThread

log = logging.getLogger(__name__)


def is_due(study: StudyActivity, settings: Settings, now: float) -> bool:
    rule = settings.rule_for(study.modality)
    if rule.force_complete_seconds is not None and now - study.first_received_at >= rule.force_complete_seconds:
        return True  # a study that never completes its series must still be analysed eventually
    idle = rule.idle_seconds if rule.idle_seconds is not None else settings.study_idle_seconds
    if now - study.last_received_at < idle:
        return False
    return rule.required_series is None or study.series_count >= rule.required_series


def complete_due_studies(index: Index, settings: Settings, now: float | None = None) -> list[OutboxRow]:
    now = time.time() if now is None else now
    queued = []
    for study in index.receiving_studies():
        if not is_due(study, settings, now):
            continue
        row = index.complete_study(study.study_uid, now)
        log_event(
            log,
            logging.INFO,
            "study.complete",
            study_uid=study.study_uid,
            series=study.series_count,
            queued=row is not None,
            reason=row.reason if row else "nothing new to analyse",
        )
        if row is not None:
            queued.append(row)
    return queued


class Assembler(PollingThread):
    """Polls the index; one pass is cheap (one query over receiving studies)."""

    def __init__(self, index: Index, settings: Settings) -> None:
        super().__init__("study-assembler", settings.assembly_poll_seconds, lambda: complete_due_studies(index, settings))
