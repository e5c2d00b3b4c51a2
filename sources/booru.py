"""Booru source: Danbooru, Gelbooru-style ``dapi`` sites (Gelbooru, Safebooru) and Moebooru
(yande.re, konachan), one class for the three APIs.

The cursor is the highest post id handled. Each poll asks for the posts just after it, oldest
first and at most the cap, so a restart neither re-fetches nor skips posts. The first poll starts
from the newest posts (no back-fill of the site's history). The site's md5 and score are kept
(the score is the popularity signal used before the model has learned anything).

Older and related dialects are read too: Danbooru 1.x (``tags`` instead of ``tag_string``, Ruby
time objects, relative ``file_url``), e621-style answers (``{"posts": [...]}``, ``file.url``, tag
groups, ``score.total``), Moebooru variants such as MyImouto (times as epoch numbers or strings)
and Gelbooru 0.2 (XML attributes as JSON, one post as a bare object, numbers as strings). A post
that cannot be read is skipped with one log line; the rest of the page is taken and the cursor moves.

Character tags (``Item.characters``, weak labels for naming faces) come from each dialect's tag
types, never from an extra request: Danbooru 2's ``tag_string_character``; e621's
``tags.character`` group; Gelbooru's ``fields=tag_info`` (per post, or for the page, a list of
``{"tag", "type"}``; sites that ignore the parameter, such as older Gelbooru 0.2 and Safebooru,
give no characters); Moebooru's ``api_version=2&include_tags=1`` (``{"posts": [...], "tags":
{name: type}}``; variants that ignore it answer a bare list and give no characters). Danbooru 1.x
posts carry no tag types: no characters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urljoin, urlsplit

from sources.base import (BadPayload, BadPost, Item, Poll, Source, SourceError, listing, mapping, normalize_rating,
                          number, skip_post, tags, whole_number)

# Booru post ids are counters (Danbooru is near 10 million); a larger one would move the cursor past
# every real post to come, so that post is skipped instead.
MAX_POST_ID = 2 ** 40

# A character tag's type: Moebooru and Gelbooru name it, or number it (0 general, 1 artist,
# 3 copyright, 4 character).
CHARACTER_TYPES = ("character", 4, "4")

DEFAULT_URLS = {"danbooru": "https://danbooru.donmai.us", "gelbooru": "https://gelbooru.com",
                "moebooru": "https://yande.re"}


@dataclass
class BooruOptions:
    api: Literal["danbooru", "gelbooru", "moebooru"] = "danbooru"
    url: str = ""                 # site root; default per api (danbooru.donmai.us, gelbooru.com, yande.re)
    tags: str = ""                # the site's own tag search
    ratings: list[str] = field(default_factory=lambda: ["general", "sensitive"])
    # Credentials, each also from the environment ({api} in capitals: DANBOORU_LOGIN, ...):
    # Danbooru / Moebooru login; Danbooru/Gelbooru API key or Moebooru password hash (never logged);
    # Gelbooru user id.
    login: str = field(default="", metadata={"env": "{api}_LOGIN"})
    api_key: str = field(default="", metadata={"env": "{api}_API_KEY", "secret": True})
    user_id: str = field(default="", metadata={"env": "{api}_USER_ID"})
    page_size: int = 100

    def check(self):
        allowed = {"general", "sensitive", "questionable", "explicit"}
        bad = [r for r in self.ratings if r not in allowed]
        if bad:
            return "ratings", f"expected ratings from {sorted(allowed)}, got {bad[0]!r}"
        if self.url and not self.url.startswith(("http://", "https://")):
            return "url", f"expected an http(s) URL, got {self.url!r}"
        if not 1 <= self.page_size <= 1000:
            return "page_size", f"expected 1 to 1000, got {self.page_size}"
        try:
            host = urlsplit(self.url or DEFAULT_URLS[self.api]).hostname or ""
        except ValueError:  # e.g. "http://[" (a broken IPv6 literal)
            return "url", f"expected an http(s) URL, got {self.url!r}"
        if self.api == "gelbooru" and host.endswith("gelbooru.com") and not (self.api_key and self.user_id):
            return "api_key", ("Gelbooru needs api_key and user_id (from your account options page), "
                               "in the config or as GELBOORU_API_KEY and GELBOORU_USER_ID")
        return None


class BooruSource(Source):
    kind = "booru"
    Options = BooruOptions

    def __init__(self, name, options, http=None):
        super().__init__(name, options, http)
        self.base = (options.url or DEFAULT_URLS[options.api]).rstrip("/")

    def describe(self) -> str:
        return f"{self.options.api} {self.base} tags={self.options.tags!r}"

    async def poll(self, cursor: dict, limit: int) -> Poll:
        after = cursor.get("last_id")
        limit = max(1, min(limit, self.options.page_size))
        url, params = getattr(self, f"_request_{self.options.api}")(after, limit)
        resp = await self.http.get(url, params=params, headers={"Accept": "application/json"})
        payload = resp.json()
        posts, types = getattr(self, f"_posts_{self.options.api}")(payload)
        items, ids = [], []
        build = getattr(self, f"_item_{self.options.api}")
        for post in posts:
            pid = whole_number(post.get("id"))
            if pid is None or pid > MAX_POST_ID:
                skip_post(self.name, post.get("id"), "no numeric id" if pid is None else "an id no booru has")
                continue
            if after is not None and pid <= after:
                continue  # a site that ignored id:> must not make us go back
            ids.append(pid)
            try:
                item = build(post, pid, types)
            except Exception as e:  # noqa: BLE001 - one post that cannot be read never stalls the page
                skip_post(self.name, pid, e)
                continue
            if item is None:
                continue
            if self.options.ratings and item.rating not in self.options.ratings:
                continue
            items.append((pid, item))
        items.sort(key=lambda pair: pair[0])
        new_cursor = dict(cursor)
        if ids:
            new_cursor["last_id"] = max(ids)
        return Poll(items=[item for _, item in items], cursor=new_cursor, more=len(posts) >= limit)

    def _media(self, *candidates) -> str | None:
        """The first picture address given, absolute (relative ones are on this site); None when
        the post has none (deleted, banned or restricted)."""
        value = next((c for c in candidates if c not in (None, "")), None)
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadPost(f"its file_url is not a URL ({str(value)[:60]})")
        value = value.strip()
        if not value:
            return None
        media = "https:" + value if value.startswith("//") else urljoin(self.base + "/", value)
        if urlsplit(media).scheme not in ("http", "https"):
            raise BadPost(f"its file_url is not an http(s) URL ({value[:60]})")
        return media

    # ---- Danbooru ------------------------------------------------------------------------
    def _request_danbooru(self, after, limit):
        params = {"limit": str(limit)}
        if self.options.tags:
            params["tags"] = self.options.tags
        if after is not None:
            params["page"] = f"a{after}"
        if self.options.login and self.options.api_key:
            params["login"], params["api_key"] = self.options.login, self.options.api_key
        return f"{self.base}/posts.json", params

    def _posts_danbooru(self, payload):
        if isinstance(payload, dict) and payload.get("success") is False:
            raise SourceError(f"Danbooru said: {payload.get('message') or payload.get('error')}")
        if isinstance(payload, dict) and isinstance(payload.get("posts"), list):
            payload = payload["posts"]  # e621-style
        if not isinstance(payload, list):
            raise BadPayload(f"unexpected Danbooru answer from {self.base} (expected a list of posts)")
        return [p for p in payload if isinstance(p, dict)], {}

    def _item_danbooru(self, post, pid, types):
        file = mapping(post.get("file"))  # e621: {"url": ..., "md5": ...}
        media = self._media(post.get("file_url"), post.get("large_file_url"), file.get("url"))
        if not media:
            return None  # deleted, banned or restricted post
        if "tag_string" in post:  # Danbooru 2
            author, page, s_means = post.get("tag_string_artist"), f"{self.base}/posts/{pid}", "sensitive"
            post_tags, characters = tags(post.get("tag_string")), tags(post.get("tag_string_character"))
        elif isinstance(post.get("tags"), dict):  # e621: tag groups; "s" is safe
            artists = tags(post["tags"].get("artist"))
            author, page, s_means = " ".join(artists) or None, f"{self.base}/posts/{pid}", "general"
            post_tags, characters = tags(post["tags"]), tags(post["tags"].get("character"))
        else:  # Danbooru 1.x: "tags" and the uploader; "s" is safe; no tag types
            author, page, s_means = post.get("author"), f"{self.base}/post/show/{pid}", "general"
            post_tags, characters = tags(post.get("tags")), []
        return Item(
            external_id=str(pid), media_url=media, page_url=page, author=author or None, tags=post_tags,
            characters=characters,
            rating=normalize_rating(post.get("rating"), s_means=s_means), popularity=number(post.get("score")),
            site_md5=post.get("md5") or file.get("md5"), posted_at=post.get("created_at"))

    # ---- Gelbooru dapi -------------------------------------------------------------------
    def _request_gelbooru(self, after, limit):
        tags = self.options.tags
        if after is not None:
            tags = f"{tags} id:>{after} sort:id:asc".strip()
        params = {"page": "dapi", "s": "post", "q": "index", "json": "1", "limit": str(limit), "fields": "tag_info"}
        if tags:
            params["tags"] = tags
        if self.options.api_key and self.options.user_id:
            params["api_key"], params["user_id"] = self.options.api_key, self.options.user_id
        return f"{self.base}/index.php", params

    def _posts_gelbooru(self, payload):
        if isinstance(payload, dict) and payload.get("success") is False:
            raise SourceError(f"Gelbooru said: {payload.get('message') or payload.get('error')}")
        types = {}
        if isinstance(payload, dict):
            posts = payload.get("post", [])
            if isinstance(posts, dict):
                posts = [posts]
            types = tag_types(payload.get("tag_info"))  # fields=tag_info for the whole page
        else:
            posts = payload
        if payload in ("", None):
            posts = []
        if not isinstance(posts, list):
            raise BadPayload(f"unexpected dapi answer from {self.base} (expected posts)")
        return [p for p in posts if isinstance(p, dict)], types

    def _item_gelbooru(self, post, pid, types):
        media = post.get("file_url")
        if not media and post.get("directory") and post.get("image"):
            media = f"{self.base}/images/{post['directory']}/{post['image']}"
        media = self._media(media)
        if not media:
            return None
        post_tags = tags(post.get("tags"))
        return Item(
            external_id=str(pid), media_url=media, page_url=f"{self.base}/index.php?page=post&s=view&id={pid}",
            author=post.get("owner") or None, tags=post_tags,
            characters=character_tags(post_tags, {**types, **tag_types(post.get("tag_info"))}),
            rating=normalize_rating(post.get("rating"), s_means="general"),
            popularity=number(post.get("score")), site_md5=post.get("md5") or post.get("hash"),
            posted_at=post.get("created_at"))

    # ---- Moebooru ------------------------------------------------------------------------
    def _request_moebooru(self, after, limit):
        tags = self.options.tags
        if after is not None:
            tags = f"{tags} id:>{after} order:id".strip()
        params = {"limit": str(limit), "api_version": "2", "include_tags": "1"}  # tag types for characters
        if tags:
            params["tags"] = tags
        if self.options.login and self.options.api_key:
            params["login"], params["password_hash"] = self.options.login, self.options.api_key
        return f"{self.base}/post.json", params

    def _posts_moebooru(self, payload):
        types = {}
        if isinstance(payload, dict) and isinstance(payload.get("posts"), list):
            types = tag_types(payload.get("tags"))  # api_version=2: {"posts", "pools", "tags": {name: type}}
            payload = payload["posts"]
        if not isinstance(payload, list):
            raise BadPayload(f"unexpected Moebooru answer from {self.base} (expected a list of posts)")
        return [p for p in payload if isinstance(p, dict)], types

    def _item_moebooru(self, post, pid, types):
        media = self._media(post.get("file_url"), post.get("jpeg_url"), post.get("sample_url"))
        if not media:
            return None
        post_tags = tags(post.get("tags"))
        return Item(  # created_at: epoch seconds (yande.re) or a time string (MyImouto); read by clean_item
            external_id=str(pid), media_url=media, page_url=f"{self.base}/post/show/{pid}",
            author=post.get("author") or None, tags=post_tags, characters=character_tags(post_tags, types),
            rating=normalize_rating(post.get("rating"), s_means="general"),
            popularity=number(post.get("score")), site_md5=post.get("md5"), posted_at=post.get("created_at"))


# ---- tag types -----------------------------------------------------------------------------
def tag_types(value) -> dict[str, object]:
    """tag -> its type, from a Moebooru ``tags`` map (``{name: type}``) or a Gelbooru ``tag_info``
    list (``[{"tag" or "name": ..., "type": ...}]``); anything else gives none."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(k, str)}
    out = {}
    for entry in listing(value):
        entry = mapping(entry)
        name = entry.get("tag", entry.get("name"))
        if isinstance(name, str):
            out[name] = entry.get("type")
    return out


def character_tags(post_tags: list[str], types: dict[str, object]) -> list[str]:
    """The post's tags whose type is character."""
    return [t for t in post_tags if not isinstance(types.get(t), bool) and types.get(t) in CHARACTER_TYPES]
