"""Image sources, one module per kind, all behind :class:`sources.base.Source`.

To add a kind: write ``sources/<kind>.py`` with a Source subclass (its ``Options`` dataclass
holds the kind's config keys), register it below, and document its keys in config.example.toml.
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


def make_source(name: str, kind: str, options: dict[str, Any], http=None) -> Source:
    cls = SOURCE_KINDS[kind]
    known = {f.name for f in dataclasses.fields(cls.Options)}
    return cls(name, cls.Options(**{k: v for k, v in options.items() if k in known}), http)


__all__ = ["SOURCE_KINDS", "make_source", "Source", "Item", "Poll", "SourceError", "TransientError",
           "RateLimited", "AuthError", "BadPayload"]
