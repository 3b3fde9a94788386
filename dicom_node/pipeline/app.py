"""The Celery application: Redis broker, queues "io" and "gpu", tasks acknowledged late."""

from __future__ import annotations

from celery import Celery

from ..config import Settings, load_settings

IO_QUEUE = "io"
GPU_QUEUE = "gpu"
# Redis emulates priorities with one list per step; 0 is served first. Urgent studies jump
# every queue; among routine ones, later stages go first, so started jobs finish before new
# ones begin (lower latency per study at the same throughput).
STAGE_PRIORITY = {"priors": 6, "compare": 5, "deliver": 3, "notify": 3}
URGENT_PRIORITY = 0


def priority_for(stage: str, study_priority: str) -> int:
    return URGENT_PRIORITY if study_priority == "urgent" else STAGE_PRIORITY[stage]

app = Celery("dicom_node", include=["dicom_node.pipeline.tasks"])


def configure(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            "priority_steps": list(range(10)),
            "queue_order_strategy": "priority",
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        task_default_queue=IO_QUEUE,
        task_default_priority=STAGE_PRIORITY["priors"],
        # A task is acknowledged only when it finished; a worker that dies mid-task gives it back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_expires=7 * 24 * 3600,
        worker_max_memory_per_child=settings.worker_max_memory_mb * 1024,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


configure()
