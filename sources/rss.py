"""RSS/Atom source (feedparser).

Pictures come from image enclosures, ``media:content`` / ``media:thumbnail`` and ``<img>`` tags in
the entry's HTML. Conditional requests (ETag, If-Modified-Since) make unchanged feeds cheap. The
cursor remembers the ids of recent pictures; when a poll stops at its cap it does not save the
ETag, so the next poll fetches the feed again and takes the rest.

A document that is not well-formed XML and yields no pictures is a :class:`BadPayload` (the
daemon logs it and counts it toward unhealthy); one that is broken but still yields entries with
pictures is read for what it has. A well-formed feed with no pictures is simply empty. An entry
with pictures but no id, link or title is named by its pictures ("img:" and a hash of their URLs).
"""
from __future__ import annotations

import calendar
import hashlib
import xml.sax
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import urljoin

import feedparser

from sources.base import BadPayload, Item, Poll, Source, timestamp

SEEN_LIMIT = 2000


@dataclass
class RssOptions:
    url: str = ""
    thumbnails: bool = False      # also take media:thumbnail when an entry has a full picture

    def check(self):
        if not self.url.startswith(("http://", "https://")):
            return "url", f"expected an http(s) feed URL, got {self.url!r}"
        return None


class _ImgParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            src = dict(attrs).get("src")
            if src:
                self.srcs.append(src)


def _html_images(html: str) -> list[str]:
    parser = _ImgParser()
    try:
        parser.feed(html)
    except Exception:  # noqa: BLE001 - broken HTML yields what was parsed so far
        pass
    return parser.srcs


def entry_images(entry, base: str, thumbnails: bool = False) -> list[str]:
    """The picture URLs of one feed entry, without repeats, in document order."""
    urls: list[str] = []
    for enc in entry.get("enclosures", []):
        if str(enc.get("type", "")).startswith("image/") and enc.get("href"):
            urls.append(enc["href"])
    for media in entry.get("media_content", []):
        url = media.get("url")
        if url and (media.get("medium") == "image" or str(media.get("type", "")).startswith("image/")
                    or (not media.get("type") and not media.get("medium"))):
            urls.append(url)
    if thumbnails or not urls:
        for thumb in entry.get("media_thumbnail", []):
            if thumb.get("url"):
                urls.append(thumb["url"])
    for block in [entry.get("summary", "")] + [c.get("value", "") for c in entry.get("content", [])]:
        urls.extend(_html_images(block or ""))
    out, seen = [], set()
    for url in urls:
        try:
            full = urljoin(entry.get("link") or base, url)
        except ValueError:  # e.g. a broken IPv6 literal
            continue
        if full.startswith(("http://", "https://")) and full not in seen:
            seen.add(full)
            out.append(full)
    return out


class RssSource(Source):
    kind = "rss"
    Options = RssOptions

    def describe(self) -> str:
        return f"feed {self.options.url}"

    async def poll(self, cursor: dict, limit: int) -> Poll:
        headers = {"Accept": "application/rss+xml, application/atom+xml, application/xml;q=0.9, */*;q=0.8"}
        if cursor.get("etag"):
            headers["If-None-Match"] = cursor["etag"]
        if cursor.get("modified"):
            headers["If-Modified-Since"] = cursor["modified"]
        resp = await self.http.get(self.options.url, headers=headers, ok_statuses=(200, 304))
        if resp.status == 304:
            return Poll(items=[], cursor=dict(cursor))
        feed = feedparser.parse(resp.body, response_headers={"content-location": resp.url,
                                                           "content-type": resp.headers.get("Content-Type", "")})
        # feeds list newest first; we take oldest first
        pictures = [(entry, entry_images(entry, resp.url, self.options.thumbnails)) for entry in reversed(feed.entries)]
        if not any(urls for _, urls in pictures):
            error = feed.get("bozo_exception")
            if feed.bozo and isinstance(error, xml.sax.SAXException):
                raise BadPayload(f"malformed feed from {self.options.url}: {error}")
            if not feed.get("version") and not feed.entries:
                raise BadPayload(f"{self.options.url} is not an RSS or Atom feed")
        seen = list(cursor.get("seen", []))
        seen_set = set(seen)
        fresh: list[Item] = []
        for entry, urls in pictures:
            entry_id = entry.get("id") or entry.get("link") or entry.get("title") or _picture_id(urls)
            for url in urls:
                ext_id = f"{entry_id}|{url}"
                if ext_id in seen_set:
                    continue
                fresh.append(Item(
                    external_id=ext_id, media_url=url, page_url=entry.get("link"),
                    author=entry.get("author"), title=entry.get("title"),
                    tags=[t.get("term") for t in entry.get("tags", []) if t.get("term")],
                    posted_at=_published(entry)))
        taken = fresh[:limit]
        for item in taken:
            seen.append(item.external_id)
        new_cursor = {"seen": seen[-SEEN_LIMIT:]}
        more = len(fresh) > limit
        if not more:  # only a complete poll may skip the feed next time it is unchanged
            if resp.headers.get("ETag"):
                new_cursor["etag"] = resp.headers["ETag"]
            if resp.headers.get("Last-Modified"):
                new_cursor["modified"] = resp.headers["Last-Modified"]
        return Poll(items=taken, cursor=new_cursor, more=more)


def _picture_id(urls: list[str]) -> str:
    """A stable name for an entry that has pictures but no id, link or title."""
    return "img:" + hashlib.sha1("\n".join(sorted(urls)).encode("utf-8", "replace")).hexdigest()


def _published(entry) -> str | None:
    published = entry.get("published_parsed") or entry.get("updated_parsed")
    try:
        return timestamp(calendar.timegm(published)) if published else None
    except (TypeError, ValueError, OverflowError):
        return None
