"""The Celery application: Redis broker, queues "io" and "gpu", tasks acknowledged late."""

from __future__ import annotations

from celery import Celery

from ..config import Settings, load_settings

IO_QUEUE = "io"
GPU_QUEUE = "gpu"
# Redis emulates priorities with one list per step; 0 is served first. Urgent studies jump
# every queue; among routine ones, later stages go first, so started jobs finish before new
# ones begin (lower latency per study at the same throughput).
STAGE_PRIORITY = {"priors": 6, "compare": 5, "report": 4, "deliver": 3, "notify": 3}
URGENT_PRIORITY = 0


def priority_for(stage: str, study_priority: str) -> int:
    return URGENT_PRIORITY if study_priority == "urgent" else STAGE_PRIORITY[stage]

app = Celery("dicom_node", include=["dicom_node.pipeline.tasks"])


def configure(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        # Workers outlive the broker: retry connecting forever (at start and after a loss; the
        # default gives up after 100 attempts), also after a channel error (a Redis failing over
        # answers READONLY). Liveness is the heartbeat (pipeline/worker.py), not broker reachability.
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_channel_error_retry=True,
        broker_connection_timeout=5,
        # Redis has no AMQP heartbeats (broker_heartbeat does not apply); dead or half-open
        # connections are found by socket timeouts, TCP keepalive and kombu's health checks.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            "priority_steps": list(range(10)),
            "queue_order_strategy": "priority",
            "socket_timeout": 30,  # a command on a dead connection fails instead of blocking forever
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 10,  # an overdue BRPOP/pub-sub connection is dropped and reopened
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        redis_socket_timeout=30,
        redis_socket_connect_timeout=5,
        redis_socket_keepalive=True,
        redis_backend_health_check_interval=10,
        # A task storing its state while Redis restarts waits for it (about 4 minutes at most)
        # instead of failing: a STARTED state that cannot be stored would fail the task unrun.
        result_backend_always_retry=True,
        result_backend_max_retries=30,
        result_backend_max_sleep_between_retries_ms=10000,
        # On a connection loss, running tasks finish; their ack cannot reach Redis, so the message
        # is redelivered after the visibility timeout (a stage already done is not repeated).
        worker_cancel_long_running_tasks_on_connection_loss=False,
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
