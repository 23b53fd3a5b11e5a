"""Process-wide logging set-up. Library code only calls ``logging.getLogger(__name__)``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time, so a replaced (or captured and since
    closed) stderr never leaves the process logging into a dead stream."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # noqa: ANN201 - the StreamHandler attribute, looked up per record
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers in deployments."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str | None = None, json_lines: bool | None = None) -> None:
    """Configures the root logger (stderr; ``HW_LOG_LEVEL``, ``HW_LOG_JSON``). Calling it again
    replaces the handler it installed before and leaves handlers others installed alone."""
    level = (level or os.environ.get("HW_LOG_LEVEL") or "INFO").upper()
    if json_lines is None:
        json_lines = os.environ.get("HW_LOG_JSON", "").lower() in ("1", "true", "yes")
    handler = _StderrHandler()
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S")
        fmt.converter = time.localtime
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _StderrHandler)] + [handler]
    root.setLevel(level)
    for noisy in ("kafka", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
