"""The node's HTTP service: the operations UI and JSON API (web/app.py), served by uvicorn in a
thread of the SCP process. This module keeps the process-wide counters (web/status.py builds /status)."""

from __future__ import annotations

import logging
import os
import threading
import time

from prometheus_client import CollectorRegistry, Counter, multiprocess

from .config import Settings
from .index import Index
from .logs import log_event

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
INSTANCES = Counter("dicom_node_instances_total", "C-STORE requests answered, by outcome", ["outcome"], registry=REGISTRY)
ASSOCIATIONS = Counter("dicom_node_associations_total", "Associations, by result", ["result"], registry=REGISTRY)


def exposition_registry() -> CollectorRegistry:
    """What /metrics shows of the counters above: this process's, or with several SCP processes
    (`serve` set PROMETHEUS_MULTIPROC_DIR, scp_processes.share_metrics) every process's, summed
    from their files by prometheus_client."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


class StatusServer:
    """uvicorn serving the web app until stop(). `settings` None: the defaults (no token, so
    loopback only), for callers that only pass an address."""

    def __init__(self, index: Index, host: str, port: int, settings: Settings | None = None) -> None:
        import uvicorn

        from .web.app import create_app
        from .web.auth import TokenSource, bind_host

        settings = settings or Settings(http_host=host, http_port=port)
        self.tokens = TokenSource(settings.http_token_file)
        self.host, warning = bind_host(host, self.tokens.configured)
        self.port = port
        self.warning = warning
        self.app = create_app(settings, index, self.tokens, exposition_registry())
        config = uvicorn.Config(self.app, host=self.host, port=port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="status-http", daemon=True)

    def start(self, timeout: float = 15.0) -> None:
        if self.warning:
            log_event(log, logging.WARNING, "http.loopback_only", reason=self.warning)
        elif not self.tokens.configured:
            log_event(log, logging.INFO, "http.no_token", reason="no http_token_file configured: loopback only, no token asked")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP service did not start on {self.host}:{self.port} (port in use?)")
            time.sleep(0.02)
        log_event(log, logging.INFO, "http.listening", url=f"http://{self.host}:{self.port}/",
                  token_required=self.tokens.configured)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.readiness.close()
