"""Structured logs for the server: one JSON object per line, or ``key=value`` text.

Fields passed with ``logger.info(..., extra={"model": ..., "code": ...})`` become keys of the JSON
object (or ``key=value`` pairs after the text message), so log pipelines can filter by model,
status code or request id without parsing messages.
"""
from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["LOG_FORMATS", "JsonFormatter", "TextFormatter", "configure_logging"]

LOG_FORMATS = ("text", "json")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extra(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "message": ..., **extra}``; tracebacks under ``exc_info``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_extra(record))
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """The usual text line, then the extra fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _extra(record)
        if not fields:
            return line
        head, sep, tail = line.partition("\n")
        pairs = " ".join(f"{k}={v!r}" if isinstance(v, str) and (" " in v or not v) else f"{k}={v}"
                         for k, v in fields.items())
        return f"{head} [{pairs}]{sep}{tail}"


def configure_logging(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Send the root logger to ``stream`` (stderr) at ``level`` in ``fmt`` ("text" or "json").

    Like ``logging.basicConfig``: when the root logger already has handlers (an embedding
    application, a test runner), they are left alone and only the level is set.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    root = logging.getLogger()
    root.setLevel(level)
    if root.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
