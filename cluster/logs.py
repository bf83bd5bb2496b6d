"""One log format for every daemon, on stderr, never payloads.

`json` (the default): one JSON object per line with `ts` (UTC, ISO 8601), `level`,
`logger`, `event` (what happened: `request.end`, `fleet.ejected`, ... or `log` for a
plain message), `msg`, and the record's structured fields (`request_id`, `node_id`,
`reason`, counts and timings) where the call site gives them with `extra=fields(...)`.
`text`: the same messages as `time LEVEL logger message` lines, for a person at a terminal.

Neither ever holds a prompt, a completion or an exception's message (it may quote them):
exceptions are written as their type and traceback only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback

FIELDS = "sf"  # the LogRecord attribute that carries a call site's structured fields


def fields(**values) -> dict:
    """`log.info(..., extra=fields(event="request.end", request_id=rid, ...))`; empty
    values are left out of the line."""
    return {FIELDS: values}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": "log",
        }
        for key, value in (getattr(record, FIELDS, None) or {}).items():
            if value not in ("", None, [], ()):
                line[key] = value
        line["msg"] = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            line["exception"] = without_text(record.exc_info[1])
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return without_text(ei[1]) if ei and ei[1] is not None else ""


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Third-party libraries can log request payloads at DEBUG; keep them quiet.
    for name in ("grpc", "httpx", "transformers", "huggingface_hub", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


def without_text(exc: BaseException) -> str:
    """An exception for the log without its message, which may quote request content
    (a tokenizer or template error): the type and where it was raised, nothing else."""
    return f"{type(exc).__name__}\n{''.join(traceback.format_tb(exc.__traceback__))}"
