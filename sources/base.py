"""The one interface every source implements, the errors they raise, and the cleaning of what
sites send.

A source is told its saved cursor and how many new items it may return; it answers with the new
items (oldest first) and the cursor to save. Items beyond the cap are not lost: the returned cursor
stops just after the last item returned, so the next poll picks up the rest.

Whatever a site sends, every item a poll returns has its fields in their declared types
(:func:`clean_item`, applied to every source kind by :class:`Source` itself): a field that cannot
be read is dropped, and a post whose id cannot be read is skipped with one log line. Sources
use the same small helpers (:func:`text`, :func:`url`, :func:`tags`, :func:`number`,
:func:`whole_number`, :func:`timestamp`, :func:`mapping`, :func:`listing`) where they read a
post, and skip one post that cannot be read at all with :func:`skip_post`, never the page.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar
from urllib.parse import urlsplit

from storage.store import NewItem as Item  # one definition of a candidate picture

__all__ = ["Item", "Poll", "Source", "SourceError", "TransientError", "RateLimited", "AuthError",
           "BadPayload", "BadPost", "normalize_rating", "remember", "number", "clean_item", "skip_post",
           "text", "url", "tags", "timestamp", "whole_number", "mapping", "listing"]

log = logging.getLogger(__name__)


@dataclass
class Poll:
    items: list[Item]
    cursor: dict[str, Any]
    more: bool = False          # True when items were left for the next poll


class SourceError(Exception):
    """A poll failed; the message is one line for the user."""


class TransientError(SourceError):
    """Timeouts, connection failures and 5xx: retried with backoff."""


class RateLimited(TransientError):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class AuthError(SourceError):
    """401/403: the credentials are wrong or lack access; retrying soon will not help."""


class BadPayload(SourceError):
    """The server answered with something that is not the expected JSON or feed."""


class BadPost(ValueError):
    """One post cannot be read (the message says why); it is skipped, not the page."""


class Source:
    """A source of one kind. ``Options`` is a dataclass of the kind's config keys, with an optional
    ``check()`` returning ``(key, problem)`` or None. A field that may also come from the
    environment says so in its metadata: ``{"env": "NAME"}`` (``{field}`` in the name stands for
    that field's value in capitals), plus ``"secret": True`` for credentials that must never be
    logged. Sources never read the environment themselves: the configuration loader fills such
    fields when they are empty (before ``check()``) and registers secrets for masking.

    A subclass's ``poll`` is wrapped when the class is defined so that the items it returns pass
    through :func:`clean_item`: no source kind can hand the database a value of the wrong type."""
    kind: ClassVar[str]
    Options: ClassVar[type]
    remote: ClassVar[bool] = True   # items are fetched over HTTP (False: local files)

    def __init__(self, name: str, options: Any, http=None):
        self.name = name
        self.options = options
        self.http = http

    async def poll(self, cursor: dict[str, Any], limit: int) -> Poll:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        poll = cls.__dict__.get("poll")
        if poll is not None and not getattr(poll, "cleans_items", False):
            cls.poll = _cleaning(poll)


def _cleaning(poll):
    """``poll`` with its items passed through :func:`clean_item` (unreadable posts dropped)."""
    @functools.wraps(poll)
    async def cleaned(self, cursor, limit):
        result = await poll(self, cursor, limit)
        result.items = [item for item in (clean_item(i, self.name, remote=self.remote) for i in result.items)
                        if item is not None]
        return result
    cleaned.cleans_items = True
    return cleaned


# ---- reading what sites send -----------------------------------------------------------------
MAX_TEXT = 500          # authors, titles
MAX_TAG = 200           # one tag
MAX_TAGS = 1000         # tags of one item
MAX_URL = 4096
_SURROGATES = re.compile("[\ud800-\udfff]")       # from JSON "\ud800" escapes; SQLite cannot store them
_CONTROLS = re.compile("[\x00-\x1f\x7f]")


def _str(value) -> str | None:
    """A string (or a whole number) as valid UTF-8 text; anything else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            value = str(value)
        except ValueError:  # more digits than Python will print
            return None
    if not isinstance(value, str):
        return None
    return _SURROGATES.sub("\ufffd", value)


def text(value, limit: int | None = MAX_TEXT) -> str | None:
    """An author, title or tag: a string (or a whole number), stripped, at most ``limit``
    characters; None when empty or not text."""
    value = _str(value)
    if value is None:
        return None
    value = value.strip()[:limit].rstrip()
    return value or None


def url(value, *, remote: bool = True) -> str | None:
    """A link or picture address: an http(s) URL with a host (any string for local sources);
    None for anything else (``javascript:`` links, control characters, other types)."""
    value = text(value, None)
    if value is None or len(value) > MAX_URL or _CONTROLS.search(value):
        return None
    if remote:
        try:
            parts = urlsplit(value)
        except ValueError:
            return None
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            return None
    return value


def tags(value) -> list[str]:
    """Tags from a list, a space-separated string, or a dict of lists (e621's tag groups)."""
    if isinstance(value, str):
        parts = value.split()
    elif isinstance(value, list):
        parts = value
    elif isinstance(value, dict):
        parts = [t for group in value.values()
                 for t in (group if isinstance(group, list) else group.split() if isinstance(group, str) else [])]
    else:
        return []
    out: dict[str, None] = {}  # in order, without repeats
    for part in parts:
        tag = text(part, MAX_TAG)
        if tag:
            out[tag] = None
            if len(out) >= MAX_TAGS:
                break
    return list(out)


def number(value) -> float | None:
    """A site's count (likes, score) as a finite float: from a number, a numeric string or
    e621's ``{"total": n}``; None when it is missing or not a number."""
    if isinstance(value, dict):
        value = value.get("total")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        n = float(value)
    except (ValueError, OverflowError):
        return None
    return n if math.isfinite(n) else None


MAX_ID = 2 ** 63 - 1   # larger "ids" are not believed (snowflake ids of X and Mastodon fit)


def whole_number(value) -> int | None:
    """A post id as sites send it (a number, or a string of digits, at most ``MAX_ID``), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        value = int(value) if value.is_integer() else None
    elif isinstance(value, str):
        value = value.strip()
        value = int(value) if value.isascii() and value.isdigit() and len(value) <= 30 else None
    if isinstance(value, int) and 0 <= value <= MAX_ID:
        return value
    return None


def _epoch(seconds: float) -> datetime:
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("not a time")
    if seconds > 1e11:  # milliseconds
        seconds /= 1000
    return datetime.fromtimestamp(seconds, timezone.utc)


_TIME_FORMATS = ("%a %b %d %H:%M:%S %z %Y",)     # Gelbooru: "Sat Nov 01 10:00:00 -0500 2026"


def _when(value) -> datetime | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return _epoch(value)
    if isinstance(value, dict):  # Ruby's JSON time (Danbooru 1.x): {"json_class": "Time", "s": ..., "n": ...}
        seconds, nanos = value.get("s"), value.get("n", 0)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            return None
        when = _epoch(seconds)
        if isinstance(nanos, int) and not isinstance(nanos, bool) and 0 <= nanos < 10 ** 9:
            when += timedelta(microseconds=nanos // 1000)
        return when
    if not isinstance(value, str) or len(value) > 64:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return _epoch(float(value))
    try:
        return datetime.fromisoformat(value)  # ISO 8601; also Moebooru's "2023-03-16 13:54:09 -0400"
    except ValueError:
        pass
    for fmt in _TIME_FORMATS:
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            pass
    import email.utils
    return email.utils.parsedate_to_datetime(value)  # RFC 2822 (raises ValueError when it is not)


def timestamp(value) -> str | None:
    """When a post was made, as an ISO 8601 UTC string: from ISO strings, epoch seconds or
    milliseconds, Ruby JSON time objects, Moebooru and Gelbooru time strings; None when unreadable."""
    try:
        when = _when(value)
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.astimezone(timezone.utc).isoformat()
    except (ValueError, TypeError, OverflowError, OSError):
        return None


def mapping(value) -> dict:
    """``value`` when it is a dict (a JSON object), else an empty one."""
    return value if isinstance(value, dict) else {}


def listing(value) -> list:
    """``value`` when it is a list (a JSON array), else an empty one."""
    return value if isinstance(value, list) else []


def post_label(value) -> str:
    """How a log line names a post: its id (or what stood for it), shortened."""
    label = value if isinstance(value, str) else repr(value)
    return label if len(label) <= 80 else label[:77] + "..."


def skip_post(source: str, post, reason, what: str = "post") -> None:
    """The one log line for a post that is skipped; ``reason`` is a message or the exception."""
    if isinstance(reason, BaseException):
        reason = str(reason) if isinstance(reason, BadPost) else f"{type(reason).__name__}: {reason}"
    log.warning("source %s: skipped %s %s: %s", source, what, post_label(post), reason)


def clean_item(item: Item, source: str, *, remote: bool = True) -> Item | None:
    """``item`` with every field in its declared type, or None (logged) when its id is unreadable.

    external_id: a non-empty string (from a string or a whole number); media_url and page_url:
    http(s) URLs for remote sources; author, title: stripped text of at most 500 characters;
    tags, characters: lists of strings; rating: general/sensitive/questionable/explicit; popularity: a
    finite float; posted_at: ISO 8601 UTC. A field that cannot be read becomes None (or [])."""
    external_id = item.external_id
    if isinstance(external_id, int) and not isinstance(external_id, bool):
        external_id = _str(external_id)
    elif isinstance(external_id, str):
        external_id = _str(external_id) if external_id.strip() else None
    else:
        external_id = None
    local_path = item.local_path if isinstance(item.local_path, str) else None
    if external_id is None or (local_path and _SURROGATES.search(local_path)):
        named = item.external_id
        if named is None or (isinstance(named, str) and not named.strip()):
            named = f"at {url(item.page_url) or url(item.media_url) or local_path or '?'}"
        skip_post(source, named, "no readable id" if external_id is None else "its file name is not valid UTF-8")
        return None
    rating = item.rating if isinstance(item.rating, str) else None
    return Item(
        external_id=external_id, media_url=url(item.media_url, remote=remote), local_path=local_path,
        page_url=url(item.page_url, remote=remote), author=text(item.author), title=text(item.title),
        tags=tags(item.tags), characters=tags(item.characters), rating=normalize_rating(rating) if rating else None,
        popularity=number(item.popularity), site_md5=text(item.site_md5, 128),
        posted_at=timestamp(item.posted_at), skip=text(item.skip, 1000))


def remember(seen: list, new: list, keep: int = 1000) -> list:
    """A bounded list of recently handled ids (for feeds that have no "since" parameter)."""
    known = set(seen)
    return (list(seen) + [i for i in new if i not in known])[-keep:]


_RATINGS = {
    "g": "general", "general": "general", "safe": "general", "s": "general",
    "sensitive": "sensitive",
    "q": "questionable", "questionable": "questionable",
    "e": "explicit", "explicit": "explicit",
}


def normalize_rating(value: str | None, *, s_means: str = "general") -> str | None:
    """Map a site's rating to general | sensitive | questionable | explicit.

    Danbooru's 's' is 'sensitive'; on Moebooru and old Gelbooru 's' is 'safe' (general).
    """
    if value is None:
        return None
    v = str(value).strip().lower()
    if v == "s":
        return s_means
    return _RATINGS.get(v)

