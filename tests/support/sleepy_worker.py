"""`dicom-node` with one extra task, so a test can break the broker while a task runs.

Run as ``python -m tests.support.sleepy_worker worker --queues io ...``: the real command line,
with ``tests.sleep(seconds)`` registered on the pipeline's Celery app (the pool's processes are
forked after this import, so they know it too). With TESTS_CRASH_CONSUMER=1 a consumer bootstep
raises when the consumer starts: an error Celery cannot recover from ("Unrecoverable error").
"""

from __future__ import annotations

import os
import time

from celery import bootsteps

from dicom_node.cli import app as cli
from dicom_node.pipeline.app import app


@app.task(name="tests.sleep")
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


class CrashOnStart(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c) -> None:
        raise RuntimeError("consumer crashed on purpose (TESTS_CRASH_CONSUMER)")


if os.environ.get("TESTS_CRASH_CONSUMER"):
    app.steps["consumer"].add(CrashOnStart)

if __name__ == "__main__":
    cli()
