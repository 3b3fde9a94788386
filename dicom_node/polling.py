"""A background thread that repeats one pass at a fixed interval until stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class PollingThread(threading.Thread):
    """Runs `work()` every `interval` seconds; a failing pass is logged and the next one runs,
    so a database or broker hiccup never stops the loop for good."""

    def __init__(self, name: str, interval: float, work: Callable[[], object]) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.work = work
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.work()
            except Exception:
                log.exception("%s.pass_failed", self.name)

    def stop(self) -> None:
        self._stop_event.set()
