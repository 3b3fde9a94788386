"""Prometheus collectors read from the index at scrape time, so every process (and every SCP
replica) reports the same numbers: rows by kind, jobs by state, and a histogram per stage.

Stages run in the workers, not here; their durations are in the job rows (timings: started and
finished of each stage's last attempt), so the histogram is built from those rows. It counts
every finished stage in the index; a job that is run again replaces its earlier observation.
"""

from __future__ import annotations

import json
import threading
import time

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import select

from ..index import Index, jobs
from ..pipeline.jobs import STAGES, JobStore

STAGE_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class IndexCollector:
    def __init__(self, index: Index) -> None:
        self.index = index

    def collect(self):
        gauge = GaugeMetricFamily("dicom_node_index", "Rows in the node's index", labels=["kind"])
        for kind, value in self.index.counts().items():
            gauge.add_metric([kind], value)
        yield gauge
        states = GaugeMetricFamily("dicom_node_jobs", "Pipeline jobs by state", labels=["state"])
        for state, value in JobStore(self.index).counts().items():
            states.add_metric([state], value)
        yield states


def stage_observations(index: Index) -> dict[str, list[float]]:
    durations: dict[str, list[float]] = {stage: [] for stage in STAGES}
    with index.engine.connect() as conn:
        for (raw,) in conn.execute(select(jobs.c.timings)):
            for stage, timing in json.loads(raw or "{}").items():
                started, finished = timing.get("started"), timing.get("finished")
                if stage in durations and started is not None and finished is not None and finished >= started:
                    durations[stage].append(finished - started)
    return durations


class StageHistogramCollector:
    """dicom_node_stage_seconds{stage=...}; cached briefly, as every scrape reads every job row."""

    def __init__(self, index: Index, cache_seconds: float = 10.0) -> None:
        self.index = index
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, list[float]]] | None = None

    def _observations(self) -> dict[str, list[float]]:
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            observed = stage_observations(self.index)
            self._cached = (time.monotonic(), observed)
            return observed

    def collect(self):
        family = HistogramMetricFamily("dicom_node_stage_seconds", "Duration of each pipeline stage's last attempt, per job",
                                       labels=["stage"])
        for stage, values in self._observations().items():
            buckets = [(_bucket(bound), sum(1 for v in values if v <= bound)) for bound in STAGE_BUCKETS]
            buckets.append(("+Inf", len(values)))
            family.add_metric([stage], buckets, sum(values))
        yield family


def _bucket(bound: float) -> str:
    return repr(float(bound))
