"""Local servers shaped like the real APIs (Danbooru, Gelbooru dapi, Moebooru, RSS/Atom), and
an in-memory stand-in for the HTTP client."""
from __future__ import annotations

import json
import re

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sources.http import Response

from tests.helpers import picture


class FakeHttp:
    """What sources need of :class:`sources.http.Http`: ``get`` answering one fixed body (bytes,
    or anything else as JSON; NaN and infinities as Python's json writes them)."""

    def __init__(self, body, content_type: str = "application/json"):
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
        self.content_type = content_type
        self.urls: list[str] = []

    async def get(self, url, *, params=None, headers=None, **kw):
        self.urls.append(url)
        return Response(url, 200, CIMultiDictProxy(CIMultiDict({"Content-Type": self.content_type})), self.body)


class FakeBooru:
    """Posts 1..n; each API's list endpoint with its own paging rules and tag types (Danbooru's
    ``tag_string_character``, Gelbooru's ``fields=tag_info``, Moebooru's ``api_version=2`` with
    ``include_tags=1``, each only when asked, as the sites do); pictures under /img/ (``images``
    overrides a post's picture bytes)."""

    def __init__(self, n: int = 10):
        self.posts = list(range(1, n + 1))
        self.requests: list[dict] = []
        self.ratings = {}      # id -> site rating letter/word
        self.characters = {}   # id -> the post's character tags
        self.images = {}       # id -> picture bytes (default: a synthetic picture)

    def _tags(self, i: int, general: str) -> str:
        return " ".join([*general.split(), *self.characters.get(i, [])])

    def _types(self, ids, general: str) -> dict[str, str]:
        """Each tag of these posts -> its Moebooru/Gelbooru type name."""
        return {t: "character" if t in self.characters.get(i, []) else "general"
                for i in ids for t in self._tags(i, general).split()}

    def add(self, count: int) -> None:
        start = self.posts[-1] + 1 if self.posts else 1
        self.posts.extend(range(start, start + count))

    def _select(self, tags: str, limit: int, after: int | None, ascending: bool) -> list[int]:
        m = re.search(r"id:>(\d+)", tags or "")
        if m:
            after = int(m.group(1))
        ids = [p for p in self.posts if after is None or p > after]
        if after is not None:  # the posts just after the cursor
            ids = sorted(ids)[:limit]
            return ids if ascending else sorted(ids, reverse=True)
        return sorted(ids, reverse=True)[:limit]

    def app(self, base_ref: list[str]) -> web.Application:
        app = web.Application()

        async def danbooru(request):
            q = request.query
            self.requests.append(dict(q))
            page = q.get("page", "")
            after = int(page[1:]) if page.startswith("a") else None
            ids = self._select(q.get("tags", ""), int(q.get("limit", 20)), after, ascending=False)
            return web.json_response([{
                "id": i, "created_at": "2026-11-01T10:00:00.000-05:00", "score": i * 3, "fav_count": i,
                "md5": f"{i:032x}", "file_ext": "jpg", "rating": self.ratings.get(i, "g"),
                "image_width": 160, "image_height": 120, "tag_string": self._tags(i, "1girl solo smile"),
                "tag_string_artist": f"artist_{i}", "tag_string_character": " ".join(self.characters.get(i, [])),
                "tag_string_general": "1girl solo smile", "file_url": f"{base_ref[0]}/img/{i}.jpg",
                "large_file_url": f"{base_ref[0]}/img/{i}.jpg", "preview_file_url": f"{base_ref[0]}/img/{i}.jpg",
            } for i in ids])

        async def gelbooru(request):
            q = request.query
            self.requests.append(dict(q))
            assert q["page"] == "dapi" and q["s"] == "post" and q["q"] == "index" and q["json"] == "1"
            tags = q.get("tags", "")
            ids = self._select(tags, int(q.get("limit", 100)), None, ascending="sort:id:asc" in tags)
            posts = [{"id": i, "created_at": "Sat Nov 01 10:00:00 -0500 2026", "score": i, "width": 160,
                      "height": 120, "md5": f"{i:032x}", "directory": "ab/cd", "image": f"{i}.jpg",
                      "rating": self.ratings.get(i, "general"), "source": "", "tags": self._tags(i, "1girl smile"),
                      "file_url": f"{base_ref[0]}/img/{i}.jpg", "owner": f"owner{i}"} for i in ids]
            if q.get("fields") == "tag_info":
                for post in posts:
                    post["tag_info"] = [{"tag": t, "count": 100, "type": kind}
                                        for t, kind in self._types([post["id"]], "1girl smile").items()]
            return web.json_response({"@attributes": {"limit": 100, "offset": 0, "count": len(self.posts)},
                                      **({"post": posts} if posts else {})})

        async def moebooru(request):
            q = request.query
            self.requests.append(dict(q))
            tags = q.get("tags", "")
            ids = self._select(tags, int(q.get("limit", 40)), None, ascending="order:id" in tags)
            posts = [{
                "id": i, "tags": self._tags(i, "landscape sky"), "created_at": 1761980000 + i, "author": f"user{i}",
                "source": "", "score": i * 2, "md5": f"{i:032x}", "file_size": 1000,
                "file_url": f"{base_ref[0]}/img/{i}.jpg", "sample_url": f"{base_ref[0]}/img/{i}.jpg",
                "rating": self.ratings.get(i, "s"), "width": 160, "height": 120} for i in ids]
            if q.get("api_version") == "2" and q.get("include_tags") == "1":
                types = self._types(ids, "landscape sky")
                return web.json_response({"posts": posts, "pools": [], "pool_posts": [], "tags": types})
            return web.json_response(posts)

        async def image(request):
            i = int(request.match_info["id"])
            return web.Response(body=self.images.get(i) or picture(i), content_type="image/jpeg")

        app.router.add_get("/posts.json", danbooru)
        app.router.add_get("/index.php", gelbooru)
        app.router.add_get("/post.json", moebooru)
        app.router.add_get("/img/{id}.jpg", image)
        return app


RSS = """<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0" xmlns:media="http://search.yahoo.com/mrss/">
<channel><title>Art feed</title><link>{base}/</link><description>d</description>
{items}
</channel></rss>"""

RSS_ITEM = """<item><title>Post {i}</title><link>{base}/post/{i}</link><guid>{base}/post/{i}</guid>
<author>artist{i}@example.org (Artist {i})</author><category>tag{i}</category>
<pubDate>Sat, 01 Nov 2026 10:{i:02d}:00 GMT</pubDate>
<enclosure url="{base}/img/{i}.jpg" length="1000" type="image/jpeg"/>
<media:content url="{base}/img/{i}00.jpg" medium="image"/>
<description><![CDATA[<p>look <img src="/img/{i}01.jpg"></p>]]></description>
</item>"""

ATOM = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:media="http://search.yahoo.com/mrss/">
<title>Atom art</title><id>urn:feed</id><updated>2026-11-01T10:00:00Z</updated>
{entries}
</feed>"""

ATOM_ENTRY = """<entry><title>Entry {i}</title><id>urn:entry:{i}</id><link href="{base}/e/{i}"/>
<updated>2026-11-01T10:{i:02d}:00Z</updated><author><name>Painter {i}</name></author>
<media:thumbnail url="{base}/img/{i}.jpg"/>
<content type="html">&lt;img src="{base}/img/{i}02.jpg"&gt;</content></entry>"""


def rss_feed(base: str, ids) -> str:
    return RSS.format(base=base, items="\n".join(RSS_ITEM.format(base=base, i=i) for i in sorted(ids, reverse=True)))


def atom_feed(base: str, ids) -> str:
    return ATOM.format(entries="\n".join(ATOM_ENTRY.format(base=base, i=i) for i in sorted(ids, reverse=True)))
