"""Logging set-up with secret redaction.

Every secret the configuration knows about (tokens, API keys) is registered here (by
``bot.config.fill_from_env``), and a filter on the root handler replaces it with ``***`` in every
log record, whatever logger or library emits it.
"""
from __future__ import annotations

import logging
import sys

_SECRETS: set[str] = set()


def register_secret(value: str | None) -> None:
    """Never let ``value`` appear in a log line (values shorter than 4 characters are ignored)."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            message = record.getMessage()
            clean = redact(message)
            if record.exc_info:
                formatted = logging.Formatter().formatException(record.exc_info)
                record.exc_text = redact(formatted)
            if clean != message:
                record.msg, record.args = clean, None
        return True


def setup_logging(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_tastefeed", False):
            root.removeHandler(old)
    handler._tastefeed = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO.
    for name in ("apscheduler", "discord", "PIL", "urllib3", "matplotlib"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
