"""Structured logging: one line per event, no patient identifiers in clear text at INFO."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_EVENT_FIELDS = "event_fields"


def phi_hash(value: str | None) -> str:
    """The keyed pseudonym of a patient identifier (`KEY_ID:hex`, see pseudonyms.py), so logs and
    audit rows can be correlated without PHI and without being reversible by trying every ID."""
    from .pseudonyms import active

    return active().pseudonym(value)


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log `event` with key/value fields (rendered as JSON or `key=value`)."""
    logger.log(level, event, extra={_EVENT_FIELDS: fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(getattr(record, _EVENT_FIELDS, {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _EVENT_FIELDS, {})
        text = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO; its own events are audited by us instead.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
