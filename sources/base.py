"""The one interface every source implements, and the errors they raise.

A source is told its saved cursor and how many new items it may return; it answers with the new
items (oldest first) and the cursor to save. Items beyond the cap are not lost: the returned cursor
stops just after the last item returned, so the next poll picks up the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from storage.store import NewItem as Item  # one definition of a candidate picture

__all__ = ["Item", "Poll", "Source", "SourceError", "TransientError", "RateLimited", "AuthError",
           "BadPayload", "normalize_rating", "remember", "number"]


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


class Source:
    """A source of one kind. ``Options`` is a dataclass of the kind's config keys, with an optional
    ``check()`` returning ``(key, problem)`` or None. A field that may also come from the
    environment says so in its metadata: ``{"env": "NAME"}`` (``{field}`` in the name stands for
    that field's value in capitals), plus ``"secret": True`` for credentials that must never be
    logged. Sources never read the environment themselves: the configuration loader fills such
    fields when they are empty (before ``check()``) and registers secrets for masking."""
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


def number(value) -> float | None:
    """A site's count (likes, score) as a float, or None when it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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

