"""The distributed pipeline: job rows (the source of truth), stages, artifacts, Celery tasks, the coordinator."""
