"""Image sources, one module per kind, all behind :class:`sources.base.Source`.

To add a kind: write ``sources/<kind>.py`` with a Source subclass (its ``Options`` dataclass
holds the kind's config keys; credentials name their environment variable in the field's metadata,
see :class:`sources.base.Source`), register it below, and document its keys in config.example.toml.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from sources.base import AuthError, BadPayload, Item, Poll, RateLimited, Source, SourceError, TransientError
from sources.bluesky import BlueskySource
from sources.booru import BooruSource
from sources.folder import FolderSource
from sources.mastodon import MastodonSource
from sources.rss import RssSource
from sources.x import XSource

SOURCE_KINDS: dict[str, type[Source]] = {
    FolderSource.kind: FolderSource,
    RssSource.kind: RssSource,
    BooruSource.kind: BooruSource,
    XSource.kind: XSource,
    BlueskySource.kind: BlueskySource,
    MastodonSource.kind: MastodonSource,
}


def make_options(kind: str, options: dict[str, Any]):
    """The kind's ``Options`` from a dict of (already validated) keys; unknown keys are dropped."""
    cls = SOURCE_KINDS[kind].Options
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in known})


def make_source(name: str, kind: str, options: dict[str, Any], http=None) -> Source:
    """A source from its options as written (nothing is read from the environment here)."""
    return SOURCE_KINDS[kind](name, make_options(kind, options), http)


__all__ = ["SOURCE_KINDS", "make_source", "make_options", "Source", "Item", "Poll", "SourceError", "TransientError",
           "RateLimited", "AuthError", "BadPayload"]
