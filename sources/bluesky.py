"""Bluesky source: an actor's posts with pictures, or a custom feed, from the public AppView.

No login is needed: ``app.bsky.feed.getAuthorFeed`` (``filter=posts_with_media``) and
``app.bsky.feed.getFeed`` are public on ``https://public.api.bsky.app``. Feeds come newest first
with a ``cursor`` to page back; each poll pages back until it meets a post it has handled
(at most ``max_pages`` pages), and returns the new ones oldest first. Handled post URIs are kept
in the source's cursor (the last 1,000), so nothing is fetched twice across polls and restarts.
The first poll takes the newest page only (no back-fill). Each image of a post is one item,
at full size; reposts are skipped unless ``reposts = true`` (the original post's URI dedups).
"""
from __future__ import annotations

from dataclasses import dataclass

from sources.base import BadPayload, Item, Poll, Source, listing, mapping, number, remember, skip_post, text

IMAGE_VIEWS = ("app.bsky.embed.images#view",)
WITH_MEDIA = ("app.bsky.embed.recordWithMedia#view",)


@dataclass
class BlueskyOptions:
    actor: str = ""               # handle (artist.bsky.social) or DID
    feed: str = ""                # or a custom feed's at:// URI
    url: str = "https://public.api.bsky.app"  # the AppView
    reposts: bool = False         # also take pictures the actor reposted
    page_size: int = 50           # posts per request (1-100)
    max_pages: int = 3            # pages read back per poll to catch up

    def check(self):
        if bool(self.actor) == bool(self.feed):
            return "actor", "set either actor (a handle or DID) or feed (an at:// feed URI)"
        if self.feed and not self.feed.startswith("at://"):
            return "feed", f"expected an at:// URI, got {self.feed!r}"
        if not self.url.startswith(("http://", "https://")):
            return "url", f"expected an http(s) URL, got {self.url!r}"
        if not 1 <= self.page_size <= 100:
            return "page_size", f"expected 1 to 100, got {self.page_size}"
        if self.max_pages < 1:
            return "max_pages", f"expected 1 or more, got {self.max_pages}"
        return None


def post_images(post: dict) -> list[dict]:
    embed = mapping(post.get("embed"))
    if embed.get("$type") in WITH_MEDIA:
        embed = mapping(embed.get("media"))
    if embed.get("$type") not in IMAGE_VIEWS:
        return []
    return [im for im in listing(embed.get("images")) if isinstance(im, dict) and im.get("fullsize")]


def post_link(post: dict) -> str | None:
    uri, handle = post.get("uri", ""), text(mapping(post.get("author")).get("handle"))
    rkey = uri.rsplit("/", 1)[-1] if "/app.bsky.feed.post/" in uri else None
    return f"https://bsky.app/profile/{handle}/post/{rkey}" if handle and rkey else None


class BlueskySource(Source):
    kind = "bluesky"
    Options = BlueskyOptions

    def describe(self) -> str:
        return f"bluesky {'actor ' + self.options.actor if self.options.actor else 'feed ' + self.options.feed}"

    def _request(self, page_cursor: str | None):
        o = self.options
        base = o.url.rstrip("/") + "/xrpc/"
        if o.actor:
            url, params = base + "app.bsky.feed.getAuthorFeed", {"actor": o.actor, "filter": "posts_with_media"}
        else:
            url, params = base + "app.bsky.feed.getFeed", {"feed": o.feed}
        params["limit"] = str(o.page_size)
        if page_cursor:
            params["cursor"] = page_cursor
        return url, params

    async def poll(self, cursor: dict, limit: int) -> Poll:
        seen = cursor.get("seen", [])
        known = set(seen)
        first = not seen
        fresh: list[dict] = []     # new posts, newest first
        page_cursor, pages, met_known = None, 0, False
        while pages < self.options.max_pages and not met_known:
            url, params = self._request(page_cursor)
            payload = (await self.http.get(url, params=params, headers={"Accept": "application/json"})).json()
            if not isinstance(payload, dict) or not isinstance(payload.get("feed"), list):
                raise BadPayload(f"unexpected answer from {self.options.url} (expected a feed)")
            pages += 1
            for entry in payload["feed"]:
                post = entry.get("post") if isinstance(entry, dict) else None
                if not isinstance(post, dict) or not isinstance(post.get("uri"), str):
                    skip_post(self.name, mapping(post).get("cid") or entry, "no uri", what="a malformed feed entry")
                    continue
                if post["uri"] in known:
                    met_known = True
                    continue
                reason = mapping(entry.get("reason")).get("$type")
                if isinstance(reason, str) and reason.endswith("reasonRepost") and not self.options.reposts:
                    continue
                if all(p["uri"] != post["uri"] for p in fresh):
                    fresh.append(post)
            page_cursor = payload.get("cursor") if isinstance(payload.get("cursor"), str) else None
            if first or not page_cursor:
                break
        fresh.reverse()  # oldest first
        items, taken = [], []
        for post in fresh:
            try:
                post_items = _items(post)
            except Exception as e:  # noqa: BLE001 - one post that cannot be read never stalls the page
                skip_post(self.name, post["uri"], e, what="a malformed feed entry")
                post_items = []
            if items and len(items) + len(post_items) > limit:
                break
            taken.append(post["uri"])
            items += post_items
        more = len(taken) < len(fresh)
        return Poll(items=items, cursor=dict(cursor, seen=remember(seen, taken)), more=more)


def _items(post: dict) -> list[Item]:
    """One item per picture of a post, at full size."""
    record = mapping(post.get("record"))
    return [Item(external_id=f"{post['uri']}#{i}", media_url=im["fullsize"], page_url=post_link(post),
                 author=mapping(post.get("author")).get("handle"), title=text(record.get("text"), 200),
                 popularity=number(post.get("likeCount")), posted_at=record.get("createdAt"),
                 rating="questionable" if _adult(post) else None)
            for i, im in enumerate(post_images(post))]


def _adult(post: dict) -> bool:
    return any(lb.get("val") in ("porn", "sexual", "nudity", "graphic-media")
               for lb in listing(post.get("labels")) if isinstance(lb, dict))

