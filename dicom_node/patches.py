"""Fixes for library bugs that take a worker down when the broker goes away.

Applied explicitly, once, by `dicom-node worker` (``apply()``); nothing here runs on import.
Each fix names the versions it was written against and is skipped, with a warning, on others:
re-check the bug before widening the range.

kombu (Redis transport), tested on 5.7.0
    A worker with a task in flight (acknowledged late, so the message is "unacked") loses Redis.
    Celery's consumer calls ``Connection.collect()`` and then ``Connection.close()``. Closing the
    channel inside ``collect()`` fails half-way on the dead socket (a ``ConnectionError``, which
    ``collect`` swallows), so the channel stays open; ``collect()`` then detaches the transport
    (``transport.client = None``). ``close()`` closes the channel again, which tries to put the
    unacked message back and builds a new Redis pool from ``transport.client``:
    ``AttributeError: 'NoneType' object has no attribute 'hostname'`` in
    ``kombu.transport.redis.Channel._connparams``. That is not a connection error, so Celery logs
    "Unrecoverable error" and the worker shuts down instead of reconnecting.
    Fix: a detached transport raises a Redis ``ConnectionError``, which every caller on this path
    already treats as "the broker is gone" (the message stays in Redis's unacked set and is
    redelivered after the visibility timeout, as for any worker that lost its connection).

celery (consumer bootsteps), tested on 5.7.0
    After a connection loss the consumer sets ``c.connection = None`` before stopping its steps;
    ``ConsumerStep._close`` then passes ``None`` to ``kombu.common.ignore_errors``, and a channel
    close failing on the dead socket turns into ``AttributeError: 'NoneType' object has no
    attribute 'connection_errors'`` ("Error on restarting Gossip"). Not fatal, but it skips the
    remaining channels and logs a traceback on every outage.
    Fix: fall back to ``c.conninfo`` (same transport, same error classes) for the error classes.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

KOMBU_TESTED = ((5, 7), (5, 8))  # [from, to): major.minor versions the fix was checked against
CELERY_TESTED = ((5, 7), (5, 8))

_applied: list[str] = []


def _version(module) -> tuple[int, int]:
    major, minor = module.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _in_range(module, tested: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    low, high = tested
    return low <= _version(module) < high


def _patch_kombu_redis_detached_transport() -> bool:
    import kombu
    from kombu.transport import redis as kombu_redis

    if not _in_range(kombu, KOMBU_TESTED):
        log.warning("kombu %s: the detached-transport fix (tested on 5.7) is not applied; check "
                    "kombu.transport.redis.Channel._connparams still dereferences transport.client",
                    kombu.__version__)
        return False
    if kombu_redis.redis is None:  # redis-py not installed: no Redis transport to fix
        return False
    original = kombu_redis.Channel._connparams
    if getattr(original, "_dicom_node_patch", False):
        return True

    def _connparams(self, asynchronous=False):
        if self.connection.client is None:
            raise kombu_redis.redis.exceptions.ConnectionError(
                "the broker connection was already closed (kombu transport detached)")
        return original(self, asynchronous=asynchronous)

    _connparams._dicom_node_patch = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams
    return True


def _patch_celery_consumer_step_close() -> bool:
    import celery
    from celery import bootsteps
    from kombu.common import ignore_errors

    if not _in_range(celery, CELERY_TESTED):
        log.warning("celery %s: the ConsumerStep._close fix (tested on 5.7) is not applied", celery.__version__)
        return False
    original = bootsteps.ConsumerStep._close
    if getattr(original, "_dicom_node_patch", False):
        return True

    def _close(self, c, cancel_consumers=True):
        conn = c.connection or c.conninfo  # c.connection is None after a connection loss
        channels = set()
        for consumer in self.consumers or []:
            if cancel_consumers:
                ignore_errors(conn, consumer.cancel)
            if consumer.channel:
                channels.add(consumer.channel)
        for channel in channels:
            ignore_errors(conn, channel.close)

    _close._dicom_node_patch = True  # type: ignore[attr-defined]
    bootsteps.ConsumerStep._close = _close
    return True


def apply() -> list[str]:
    """Apply every fix whose library version matches; returns the names applied (idempotent)."""
    for name, fix in (("kombu-redis-detached-transport", _patch_kombu_redis_detached_transport),
                      ("celery-consumer-step-close", _patch_celery_consumer_step_close)):
        if name not in _applied and fix():
            _applied.append(name)
    return list(_applied)
