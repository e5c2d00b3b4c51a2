"""Logging set-up with secret redaction and escaping.

Every secret the configuration knows about (tokens, API keys) is registered here (by
``bot.config.fill_from_env``), and a filter on the root handler replaces it with ``***`` in every
log record, whatever logger or library emits it.

Log messages carry text from outside (titles, authors, tags, URLs, servers' error bodies), so the
handler's formatter escapes newlines and other control characters in every message: one record is
one line, and no title can start a line that looks like ours. Tracebacks keep their lines.

Under journald (standard error is the stream named by ``$JOURNAL_STREAM``) lines carry no
timestamp, since the journal stamps each one, and start with the syslog priority (``<3>``) that
journald reads, so ``journalctl -p warning`` works. ``log.file`` adds a rotating log file, with
timestamps. Every handler gets the same masking filter and escaping formatter, and drops the
known-harmless third-party lines (:class:`QuietFilter`).
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

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


MISSED_OK = timedelta(minutes=1)   # a scheduled job this late is not worth a line


class QuietFilter(logging.Filter):
    """Drops third-party lines known to be harmless here: discord.py's voice warnings (the bot
    never joins a voice channel, so PyNaCl and davey are not needed) and APScheduler's "Run time
    of job ... was missed by" when the miss is under :data:`MISSED_OK` (a busy moment of the
    event loop; the job runs at its next time). A longer miss is still logged."""

    VOICE = ("PyNaCl is not installed, voice will NOT be supported",
             "davey is not installed, voice will NOT be supported")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("discord") and record.msg in self.VOICE:
            return False
        if record.name.startswith("apscheduler") and str(record.msg).startswith("Run time of job"):
            late = record.args[-1] if isinstance(record.args, tuple) and record.args else None
            return not (isinstance(late, timedelta) and late < MISSED_OK)
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


STAMPED = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
# syslog priorities by level: journald takes a leading "<N>" as the line's priority.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(EscapingFormatter):
    """No timestamp (journald adds one); the syslog priority first."""

    def __init__(self):
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def under_journald(stream) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM`` is
    ``device:inode`` of it; a child whose standard error was redirected inherits the variable, so
    it is checked against the stream itself)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):   # a StringIO, a closed stream
        return False
    return bool(value) and value == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str = "INFO", stream=None, *, file: str = "", max_mb: float = 10.0, keep: int = 5) -> None:
    """Log at ``level`` to ``stream`` (standard error), and to ``file`` (rotated at ``max_mb``,
    ``keep`` old files) when given; replaces what an earlier call set up. OSError when the file
    cannot be opened."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if under_journald(stream) else EscapingFormatter(STAMPED, DATEFMT))
    handlers = [handler]
    if file:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(file, maxBytes=int(max_mb * 1024 * 1024),
                                                        backupCount=keep, encoding="utf-8")
        rotating.setFormatter(EscapingFormatter(STAMPED, DATEFMT))
        handlers.append(rotating)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_tastefeed", False):
            root.removeHandler(old)
            old.close()
    for new in handlers:
        new.addFilter(QuietFilter())
        new.addFilter(RedactingFilter())
        new._tastefeed = True  # type: ignore[attr-defined]
        root.addHandler(new)
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO.
    for name in ("apscheduler", "discord", "PIL", "urllib3", "matplotlib"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
