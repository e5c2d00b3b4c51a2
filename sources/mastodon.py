"""Mastodon source: an account's statuses or a hashtag timeline, pictures only.

``GET /api/v1/accounts/:id/statuses`` (the account looked up once by ``acct`` and its id kept in
the cursor) or ``GET /api/v1/timelines/tag/:tag``, both with ``only_media=true``. The cursor is
the id of the newest status handled: each poll asks with ``min_id`` for the statuses just after
it (Mastodon returns the oldest of those first in id order), so a restart neither repeats nor
skips; if a poll stops at its cap, the next continues from there (``min_id`` pages forward
without gaps, so ``max_id`` is not needed). The first poll takes the newest page (no back-fill).
Media of type
``image`` become items; boosts are skipped unless ``reblogs = true`` and then dedup by the
original status. A status marked sensitive is rated ``questionable`` (kept off the SFW channel).
Servers that need it get ``access_token`` (or ``MASTODON_ACCESS_TOKEN``) as a bearer token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from sources.base import (BadPayload, Item, Poll, Source, SourceError, listing, mapping, number, skip_post, text, url,
                          whole_number)


@dataclass
class MastodonOptions:
    url: str = ""                 # the server, e.g. https://mastodon.social
    account: str = ""             # an account: user (on that server) or user@other.server
    hashtag: str = ""             # or a hashtag timeline (without #)
    # for servers that require one (or MASTODON_ACCESS_TOKEN); never logged
    access_token: str = field(default="", metadata={"env": "MASTODON_ACCESS_TOKEN", "secret": True})
    reblogs: bool = False         # also take boosted statuses (the original's id dedups)
    page_size: int = 40           # statuses per request (1-40)

    def check(self):
        if not self.url.startswith(("http://", "https://")):
            return "url", f"expected the server's http(s) URL, got {self.url!r}"
        if bool(self.account) == bool(self.hashtag):
            return "account", "set either account (user or user@server) or hashtag"
        if not 1 <= self.page_size <= 40:
            return "page_size", f"expected 1 to 40, got {self.page_size}"
        return None


class MastodonSource(Source):
    kind = "mastodon"
    Options = MastodonOptions

    def __init__(self, name, options, http=None):
        super().__init__(name, options, http)
        self.base = options.url.rstrip("/")
        self.token = options.access_token

    def describe(self) -> str:
        what = f"account {self.options.account.lstrip('@')}" if self.options.account else f"#{self.options.hashtag}"
        return f"mastodon {self.base} {what}"

    async def _get(self, path: str, params: dict):
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return (await self.http.get(self.base + path, params=params, headers=headers)).json()

    async def _timeline_path(self, cursor: dict) -> str:
        if self.options.hashtag:
            return f"/api/v1/timelines/tag/{quote(self.options.hashtag.lstrip('#'), safe='')}"
        acct = self.options.account.lstrip("@")
        if cursor.get("acct") != acct or not cursor.get("account_id"):
            found = await self._get("/api/v1/accounts/lookup", {"acct": acct})
            if not isinstance(found, dict) or not found.get("id"):
                raise SourceError(f"account {acct!r} not found on {self.base}")
            cursor["acct"], cursor["account_id"] = acct, str(found["id"])
        return f"/api/v1/accounts/{cursor['account_id']}/statuses"

    async def poll(self, cursor: dict, limit: int) -> Poll:
        cursor = dict(cursor)
        path = await self._timeline_path(cursor)
        params = {"only_media": "true", "limit": str(self.options.page_size)}
        if self.options.account and not self.options.reblogs:
            params["exclude_reblogs"] = "true"
        last = cursor.get("last_id")
        if last:
            params["min_id"] = last
        statuses = await self._get(path, params)
        if not isinstance(statuses, list):
            raise BadPayload(f"unexpected answer from {self.base}{path} (expected a list of statuses)")
        statuses = [s for s in statuses if _valid(s, self.name)]
        statuses.sort(key=lambda s: whole_number(s["id"]))  # oldest first
        items, newest = [], last
        for status in statuses:
            original = status.get("reblog")
            if original is not None and not self.options.reblogs:
                newest = str(status["id"])
                continue
            original = original if isinstance(original, dict) else status
            try:
                status_items = self._items(original)
            except Exception as e:  # noqa: BLE001 - one status that cannot be read never stalls the page
                skip_post(self.name, status["id"], e, what="a malformed status")
                status_items = []
            if items and len(items) + len(status_items) > limit:
                break
            newest = str(status["id"])
            items += status_items
        if newest:
            cursor["last_id"] = newest
        stopped_early = bool(statuses) and newest != str(statuses[-1]["id"])
        more = stopped_early or len(statuses) >= self.options.page_size
        return Poll(items=items, cursor=cursor, more=more)

    @staticmethod
    def _items(status: dict) -> list[Item]:
        """One item per picture of a status."""
        media = [m for m in listing(status.get("media_attachments"))
                 if isinstance(m, dict) and m.get("type") == "image" and m.get("url")]
        return [Item(
            external_id=f"{status.get('id')}/{m.get('id')}", media_url=m["url"],
            page_url=url(status.get("url")) or status.get("uri"), author=mapping(status.get("account")).get("acct"),
            title=_text(status), tags=[t.get("name") for t in listing(status.get("tags"))
                                       if isinstance(t, dict) and t.get("name")],
            rating="questionable" if status.get("sensitive") else None,
            popularity=number(status.get("favourites_count")), posted_at=status.get("created_at")) for m in media]


def _valid(status, name: str) -> bool:
    if isinstance(status, dict) and whole_number(status.get("id")) is not None:
        return True
    skip_post(name, status.get("id") if isinstance(status, dict) else status, "no numeric id", what="a malformed status")
    return False


def _text(status: dict) -> str | None:
    import re
    content = re.sub(r"<[^>]+>", " ", text(status.get("content"), None) or "")
    return text(" ".join(content.split()), 200)

