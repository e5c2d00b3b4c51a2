"""Logging set-up with secret redaction and escaping.

Every secret the configuration knows about (tokens, API keys) is registered here (by
``bot.config.fill_from_env``), and a filter on the root handler replaces it with ``***`` in every
log record, whatever logger or library emits it.

Log messages carry text from outside (titles, authors, tags, URLs, servers' error bodies), so the
handler's formatter escapes newlines and other control characters in every message: one record is
one line, and no title can start a line that looks like ours. Tracebacks keep their lines.
"""
from __future__ import annotations

import logging
import re
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


# C0 and C1 control characters, DEL, and Unicode's line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with control characters written as escapes (a newline becomes ``\\n``)."""
    return _CONTROLS.sub(lambda m: _NAMED.get(m.group(), m.group().encode("unicode_escape").decode("ascii")), text)


class EscapingFormatter(logging.Formatter):
    """Formats a record with control characters in its message escaped; the traceback (which
    our code writes, not a server) keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def setup_logging(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
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
