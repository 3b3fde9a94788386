"""HTTP status API beside the SCP: /healthz, /status (JSON) and /metrics (Prometheus)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .index import Index
from .logs import log_event

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
INSTANCES = Counter("dicom_node_instances_total", "C-STORE requests answered, by outcome", ["outcome"], registry=REGISTRY)
ASSOCIATIONS = Counter("dicom_node_associations_total", "Associations, by result", ["result"], registry=REGISTRY)


class _IndexCollector:
    """Gauges read from the index at scrape time, so every process sees the same numbers."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def collect(self):
        counts = self.index.counts()
        gauge = GaugeMetricFamily("dicom_node_index", "Rows in the node's index", labels=["kind"])
        for kind, value in counts.items():
            gauge.add_metric([kind], value)
        yield gauge
        jobs = GaugeMetricFamily("dicom_node_jobs", "Pipeline jobs by state", labels=["state"])
        for state, value in job_counts(self.index).items():
            jobs.add_metric([state], value)
        yield jobs


def job_counts(index: Index) -> dict[str, int]:
    from .pipeline.jobs import JobStore

    return JobStore(index).counts()


def status_document(index: Index, limit: int = 20) -> dict:
    from .pipeline.jobs import JobStore
    from .report.delivery import delivery_counts

    return {
        "deliveries": delivery_counts(index),
        "counts": index.counts(),
        "jobs_by_state": job_counts(index),
        "recent_jobs": [job.__dict__ for job in JobStore(index).list(limit)],
        "outbox_pending": [row.__dict__ for row in index.outbox_rows(pending_only=True)],
        "recent_associations": index.recent_associations(limit),
    }


class StatusServer:
    def __init__(self, index: Index, host: str, port: int) -> None:
        # Process-wide counters live in REGISTRY; the index gauges belong to this server's index.
        gauges = CollectorRegistry()
        gauges.register(_IndexCollector(index))
        self.httpd = ThreadingHTTPServer((host, port), _handler(index, gauges))
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="status-http", daemon=True)

    def start(self) -> None:
        self.thread.start()
        host, port = self.httpd.server_address[:2]
        log_event(log, logging.INFO, "http.listening", url=f"http://{host}:{port}/status")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(index: Index, gauges: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            try:
                if self.path == "/healthz":
                    self._send(200, "application/json", b'{"ok": true}')
                elif self.path == "/status":
                    self._send(200, "application/json", json.dumps(status_document(index), default=str, indent=2).encode())
                elif self.path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY) + generate_latest(gauges))
                else:
                    self._send(404, "application/json", b'{"error": "not found: try /status, /metrics, /healthz"}')
            except Exception as exc:  # the status page must never take the node down
                log.exception("http.error")
                self._send(500, "application/json", json.dumps({"error": str(exc)}).encode())

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # access logs would repeat every scrape
            pass

    return Handler
