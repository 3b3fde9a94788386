"""The distributed pipeline: outbox dispatcher, job records, Celery tasks."""
