"""Log output: lines for people (``--log-format text``) or JSON objects, one a line, for
log pipelines (``json``): time, level, logger, message, and every field a call passes in
``extra`` (the controller's push line: versions, types, gateways, duration)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# what every LogRecord has: anything else on a record came from ``extra``
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra field that is not JSON (a Path, an enum) is still shown
        return json.dumps(doc, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """The root logger's handler, on stderr, in ``fmt`` (one of FORMATS); as
    ``logging.basicConfig``, nothing if the root logger has handlers already."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
