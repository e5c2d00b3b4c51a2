"""Local fakes of the X API v2, the Bluesky AppView and a Mastodon server, answering with payloads
shaped like the real ones (fields, expansions, paging, errors and rate-limit headers)."""
from __future__ import annotations

import time

from aiohttp import web

X_FORBIDDEN = {"client_id": "123", "detail": "When authenticating requests to the Twitter API v2 endpoints, "
               "you must use keys and tokens from a Twitter developer App that is attached to a Project.",
               "registration_url": "https://developer.twitter.com/en/docs/projects/overview",
               "title": "Client Forbidden", "required_enrollment": "Appropriate Level of API Access",
               "reason": "client-not-enrolled", "type": "https://api.twitter.com/2/problems/client-forbidden"}


class FakeX:
    def __init__(self, token: str = "x-bearer-token-123"):
        self.token = token
        self.users = {"artist": "1001", "other": "1002"}
        self.tweets: dict[int, dict] = {}
        self.media: dict[str, dict] = {}
        self.lists: dict[str, list[int]] = {}
        self.next_id = 1_800_000_000_000_000_000
        self.requests: list[tuple[str, dict]] = []
        self.lookups = 0
        self.reads = 0
        self.status: int | None = None          # answer every request with this status (401, 403)
        self.limited_until: float | None = None
        self.malformed = False

    def tweet(self, author: str = "artist", *, photos: int = 0, video: bool = False, retweet_of: int | None = None,
              quote_of: int | None = None, sensitive: bool = False, text: str = "a post") -> int:
        self.next_id += 1000
        tid = self.next_id
        t = {"id": str(tid), "text": text, "author_id": self.users[author], "edit_history_tweet_ids": [str(tid)],
             "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "possibly_sensitive": sensitive,
             "public_metrics": {"retweet_count": 1, "reply_count": 0, "like_count": tid % 97, "quote_count": 0}}
        keys = []
        for i in range(photos):
            key = f"3_{tid + i}"
            self.media[key] = {"media_key": key, "type": "photo", "width": 1200, "height": 900,
                               "url": f"https://pbs.twimg.com/media/{tid}_{i}.jpg"}
            keys.append(key)
        if video:
            key = f"7_{tid}"
            self.media[key] = {"media_key": key, "type": "video", "width": 1280, "height": 720,
                               "preview_image_url": f"https://pbs.twimg.com/ext_tw_video_thumb/{tid}/pu/img/p.jpg",
                               "variants": [{"bit_rate": 2176000, "content_type": "video/mp4",
                                             "url": f"https://video.twimg.com/{tid}.mp4"}]}
            keys.append(key)
        if keys:
            t["attachments"] = {"media_keys": keys}
        if retweet_of:
            t["referenced_tweets"] = [{"type": "retweeted", "id": str(retweet_of)}]
            t["text"] = "RT " + self.tweets[retweet_of]["text"]
        if quote_of:
            t["referenced_tweets"] = [{"type": "quoted", "id": str(quote_of)}]
        self.tweets[tid] = t
        return tid

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/2/users/by/username/{username}", self.user_by_name)
        app.router.add_get("/2/users/{id}/tweets", self.user_tweets)
        app.router.add_get("/2/lists/{id}/tweets", self.list_tweets)
        app.router.add_get("/2/tweets/search/recent", self.search)
        return app

    @web.middleware
    async def _guard(self, request, handler):
        self.requests.append((request.path, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {self.token}" or self.status == 401:
            return web.json_response({"title": "Unauthorized", "type": "about:blank", "status": 401,
                                      "detail": "Unauthorized"}, status=401)
        if self.status == 403:
            return web.json_response(X_FORBIDDEN, status=403)
        if self.limited_until and time.time() < self.limited_until:
            return web.json_response({"title": "Too Many Requests", "detail": "Too Many Requests", "type": "about:blank",
                                      "status": 429}, status=429,
                                     headers={"x-rate-limit-limit": "900", "x-rate-limit-remaining": "0",
                                              "x-rate-limit-reset": str(int(self.limited_until))})
        return await handler(request)

    async def user_by_name(self, request):
        self.lookups += 1
        name = request.match_info["username"]
        if name not in self.users:
            return web.json_response({"errors": [{"value": name, "detail": f"Could not find user with username: "
                                                  f"[{name}].", "title": "Not Found Error", "type": "about:blank"}]})
        return web.json_response({"data": {"id": self.users[name], "name": name.title(), "username": name}})

    def _page(self, request, ids: list[int], lo: int) -> web.Response:
        q = request.query
        n = int(q.get("max_results", 10))
        if not lo <= n <= 100:
            return web.json_response({"errors": [{"message": f"The `max_results` query parameter value [{n}] is "
                                                  f"not between {lo} and 100"}], "title": "Invalid Request",
                                      "detail": "One or more parameters to your request was invalid.",
                                      "type": "https://api.twitter.com/2/problems/invalid-request"}, status=400)
        ids = sorted(ids, reverse=True)  # newest first
        if "since_id" in q:
            ids = [i for i in ids if i > int(q["since_id"])]
        start = int((q.get("pagination_token") or q.get("next_token") or "tok0")[3:])
        page = ids[start:start + n]
        self.reads += len(page)
        tweets = [self.tweets[i] for i in page]
        if self.malformed:
            tweets = tweets + [{"text": "a post without an id"}]
        meta = {"result_count": len(page)}
        if page:
            meta.update(newest_id=str(page[0]), oldest_id=str(page[-1]))
        if start + n < len(ids):
            meta["next_token"] = f"tok{start + n}"
        refs = {int(r["id"]) for t in tweets for r in t.get("referenced_tweets", [])}
        ref_tweets = [self.tweets[i] for i in sorted(refs) if i in self.tweets]
        keys = {k for t in tweets + ref_tweets for k in t.get("attachments", {}).get("media_keys", [])}
        authors = {t.get("author_id") for t in tweets + ref_tweets}
        body = {"data": tweets, "meta": meta,
                "includes": {"media": [self.media[k] for k in sorted(keys)],
                             "users": [{"id": uid, "name": n_.title(), "username": n_}
                                       for n_, uid in self.users.items() if uid in authors],
                             "tweets": ref_tweets}}
        if not tweets:
            body = {"meta": {"result_count": 0}}
        return web.json_response(body)

    async def user_tweets(self, request):
        uid = request.match_info["id"]
        exclude = request.query.get("exclude", "")
        ids = [i for i, t in self.tweets.items() if t["author_id"] == uid
               and not ("retweets" in exclude and any(r["type"] == "retweeted" for r in t.get("referenced_tweets", [])))]
        return self._page(request, ids, 5)

    async def list_tweets(self, request):
        return self._page(request, self.lists.get(request.match_info["id"], []), 1)

    async def search(self, request):
        query = request.query["query"]
        ids = [i for i, t in self.tweets.items()
               if not ("-is:retweet" in query and any(r["type"] == "retweeted" for r in t.get("referenced_tweets", [])))]
        return self._page(request, ids, 10)


class FakeBluesky:
    def __init__(self):
        self.posts: list[dict] = []     # newest last
        self.entries: list[dict] = []   # feed entries (post views, reposts), newest last
        self.requests: list[dict] = []
        self.malformed = False
        self.n = 0

    def post(self, handle: str = "artist.bsky.social", images: int = 1, *, repost: bool = False,
             labels: list[str] | None = None, quote_media: bool = False) -> str:
        self.n += 1
        did = f"did:plc:{handle.split('.')[0]}"
        uri = f"at://{did}/app.bsky.feed.post/3k{self.n:05d}"
        imgs = [{"thumb": f"https://cdn.bsky.app/img/feed_thumbnail/plain/{did}/baf{self.n}x{i}@jpeg",
                 "fullsize": f"https://cdn.bsky.app/img/feed_fullsize/plain/{did}/baf{self.n}x{i}@jpeg",
                 "alt": "", "aspectRatio": {"height": 900, "width": 1200}} for i in range(images)]
        embed = {"$type": "app.bsky.embed.images#view", "images": imgs}
        if quote_media:
            embed = {"$type": "app.bsky.embed.recordWithMedia#view", "media": embed,
                     "record": {"record": {"$type": "app.bsky.embed.record#viewRecord", "uri": "at://x/y/z"}}}
        post = {"uri": uri, "cid": f"bafyrei{self.n}", "indexedAt": "2026-11-23T08:00:00.000Z",
                "author": {"did": did, "handle": handle, "displayName": handle.split(".")[0].title(), "labels": []},
                "record": {"$type": "app.bsky.feed.post", "createdAt": "2026-11-23T08:00:00.000Z",
                           "text": f"drawing {self.n}", "langs": ["en"]},
                "replyCount": 0, "repostCount": 2, "likeCount": 10 * self.n, "quoteCount": 0,
                "labels": [{"src": did, "uri": uri, "val": v, "cts": "2026-11-23T08:00:00.000Z"} for v in labels or []]}
        if images:
            post["embed"] = embed
        entry = {"post": post}
        if repost:
            entry["reason"] = {"$type": "app.bsky.feed.defs#reasonRepost",
                               "by": {"did": "did:plc:me", "handle": "me.bsky.social"},
                               "indexedAt": "2026-11-23T08:00:00.000Z"}
        self.entries.append(entry)
        return uri

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/xrpc/app.bsky.feed.getAuthorFeed", self.feed)
        app.router.add_get("/xrpc/app.bsky.feed.getFeed", self.feed)
        return app

    async def feed(self, request):
        self.requests.append(dict(request.query, path=request.path))
        if "getAuthorFeed" in request.path and not request.query.get("actor"):
            return web.json_response({"error": "InvalidRequest", "message": "Error: Params must have the property "
                                      "\"actor\""}, status=400)
        limit = int(request.query.get("limit", 50))
        start = int(request.query.get("cursor", 0))
        entries = list(reversed(self.entries))[start:start + limit]
        if self.malformed:
            entries = [{"post": {"cid": "no-uri"}}, "junk"] + entries
        body = {"feed": entries}
        if start + limit < len(self.entries):
            body["cursor"] = str(start + limit)
        return web.json_response(body)


class FakeMastodon:
    def __init__(self, token: str | None = None):
        self.token = token
        self.statuses: dict[int, dict] = {}
        self.accounts = {"artist": {"id": "109", "username": "artist", "acct": "artist",
                                    "url": "https://example.social/@artist"}}
        self.requests: list[tuple[str, dict]] = []
        self.lookups = 0
        self.next_id = 110_000_000_000_000_000

    def status(self, *, images: int = 1, video: bool = False, sensitive: bool = False, reblog_of: int | None = None,
               tags=("art",)) -> int:
        self.next_id += 1_000_000
        sid = self.next_id
        acct = self.accounts["artist"]
        media = [{"id": str(sid + i), "type": "image", "url": f"https://files.example.social/media/{sid}_{i}.png",
                  "preview_url": f"https://files.example.social/small/{sid}_{i}.png", "remote_url": None,
                  "description": None, "blurhash": "UBL_:rOpGG-oBUNG,qRj2so|=eE1w^n4S5NH",
                  "meta": {"original": {"width": 1200, "height": 900}}} for i in range(images)]
        if video:
            media.append({"id": str(sid + 9), "type": "video", "url": f"https://files.example.social/{sid}.mp4",
                          "preview_url": f"https://files.example.social/{sid}.png"})
        s = {"id": str(sid), "created_at": "2026-11-23T08:00:00.000Z", "sensitive": sensitive, "spoiler_text": "",
             "visibility": "public", "uri": f"https://example.social/users/artist/statuses/{sid}",
             "url": f"https://example.social/@artist/{sid}", "content": f"<p>drawing <b>{sid}</b></p>",
             "account": acct, "media_attachments": media, "tags": [{"name": t, "url": ""} for t in tags],
             "favourites_count": sid % 50, "reblogs_count": 0, "replies_count": 0, "reblog": None}
        if reblog_of:
            s.update(reblog=self.statuses[reblog_of], media_attachments=[], content="")
        self.statuses[sid] = s
        return sid

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/api/v1/accounts/lookup", self.lookup)
        app.router.add_get("/api/v1/accounts/{id}/statuses", self.account_statuses)
        app.router.add_get("/api/v1/timelines/tag/{tag}", self.tag)
        return app

    @web.middleware
    async def _guard(self, request, handler):
        self.requests.append((request.path, dict(request.query)))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "This API requires an authenticated user"}, status=401)
        return await handler(request)

    async def lookup(self, request):
        self.lookups += 1
        acct = self.accounts.get(request.query.get("acct", "").split("@")[0])
        return web.json_response(acct) if acct else web.json_response({"error": "Record not found"}, status=404)

    def _page(self, request, ids: list[int]) -> web.Response:
        q = request.query
        limit = min(int(q.get("limit", 20)), 40)
        if q.get("only_media") == "true":
            ids = [i for i in ids if self.statuses[i]["media_attachments"]
                   or (self.statuses[i]["reblog"] or {}).get("media_attachments")]
        ids = sorted(ids)
        if "min_id" in q:   # the statuses just after min_id, returned newest first
            ids = [i for i in ids if i > int(q["min_id"])][:limit]
        else:
            ids = ids[-limit:]
        return web.json_response([self.statuses[i] for i in reversed(ids)])

    async def account_statuses(self, request):
        ids = [i for i, s in self.statuses.items() if s["account"]["id"] == request.match_info["id"]]
        if request.query.get("exclude_reblogs") == "true":
            ids = [i for i in ids if self.statuses[i]["reblog"] is None]
        return self._page(request, ids)

    async def tag(self, request):
        tag = request.match_info["tag"]
        return self._page(request, [i for i, s in self.statuses.items()
                                    if any(t["name"] == tag for t in s["tags"])])
