"""Logging: JSON lines for the box's journal, readable lines for a person at a console.

Every record carries the request id of the callback or API call it belongs to (a context variable, which asyncio
copies into the tasks a request starts, so the id follows a WeChat message from its callback to its delivery).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid

from aiohttp import web

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage(), "request_id": request_id.get()}
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        rid = request_id.get()
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        line += f" [{rid}]" if rid != "-" else ""
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(style: str = "auto", level: int = logging.INFO) -> None:
    """style: "json", "console", or "auto" (console on a terminal, JSON otherwise, as under systemd)."""
    if style == "auto":
        style = "console" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if style == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    """A short id per request; a caller's X-Request-Id is kept when it looks sane."""
    given = request.headers.get("X-Request-Id", "")
    rid = given if given.isascii() and 0 < len(given) <= 64 and given.replace("-", "").isalnum() else \
        uuid.uuid4().hex[:12]
    token = request_id.set(rid)
    try:
        response = await handler(request)
        response.headers["X-Request-Id"] = rid
        return response
    finally:
        request_id.reset(token)
