"""X (Twitter) source through tweepy's asynchronous client (API v2, app-only bearer token).

Kinds: a user's posts (``user``: the handle is resolved to an id once and kept in the cursor),
a list's posts (``list_id``) or a recent search (``query``). Photos come through the
``attachments.media_keys`` expansion with ``media.fields`` url, preview_image_url, variants
and type; animated GIFs and videos are recorded with their preview image and not scored unless
``videos = true``.

X bills every post read, so reads are capped: ``max_reads_per_poll`` and ``max_reads_per_day``
(UTC days; a user lookup counts as one read). When the day's budget is spent the source reads
nothing until the next UTC day, and ``sources list`` shows the reads used today.

Cursors: ``since_id`` for user posts and search (if a poll stops at its cap mid-way, the
pagination token is kept and the next poll finishes that round before moving ``since_id``);
list posts have no ``since_id``, so the ids handled are remembered (the last 2,000). The first
poll reads only the newest page. Retweets are skipped unless ``retweets = true``; then, and for a
quote post without media of its own (``quotes = true``), the original post's id names the item,
so the same picture is not fetched twice. 401/403 become one clear message and an unhealthy
source (the daemon waits ``daemon.backoff_max`` before trying again); a 429 pauses this source
until ``x-rate-limit-reset`` (read by the same bounded parser as every source's, within the
daemon's backoff limits), never the others.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from sources.base import (AuthError, BadPayload, Item, Poll, RateLimited, Source, SourceError, TransientError,
                          listing, mapping, number, remember, skip_post, text, whole_number)
from sources.http import parse_reset

log = logging.getLogger(__name__)

TWITTER = "https://api.twitter.com"
EXPANSIONS = ["attachments.media_keys", "author_id", "referenced_tweets.id", "referenced_tweets.id.author_id"]
MEDIA_FIELDS = ["media_key", "type", "url", "preview_image_url", "variants", "width", "height"]
TWEET_FIELDS = ["created_at", "author_id", "attachments", "referenced_tweets", "public_metrics",
                "possibly_sensitive", "entities"]
MIN_RESULTS = {"user": 5, "list": 1, "query": 10}


@dataclass
class XOptions:
    user: str = ""                # a handle (without @)
    list_id: str = ""             # or a list's id
    query: str = ""               # or a recent-search query, e.g. "from:artist has:images"
    # or X_BEARER_TOKEN; never logged
    bearer_token: str = field(default="", metadata={"env": "X_BEARER_TOKEN", "secret": True})
    retweets: bool = False        # also take pictures from retweets (the original's id dedups)
    quotes: bool = True           # a quote post without its own media: take the quoted post's
    videos: bool = False          # score GIFs/videos by their preview image (else recorded, not scored)
    max_reads_per_poll: int = 20  # posts read per poll (X bills each read)
    max_reads_per_day: int = 200  # posts read per UTC day, all polls together
    api_url: str = TWITTER        # the API's address (a proxy, or a local server in tests)

    def kind_of(self) -> str:
        return "user" if self.user else "list" if self.list_id else "query"

    def check(self):
        if sum(bool(v) for v in (self.user, self.list_id, self.query)) != 1:
            return "user", "set one of user (a handle), list_id or query"
        if not self.bearer_token:
            return "bearer_token", ("X needs an app bearer token (bearer_token or X_BEARER_TOKEN); reading posts "
                                    "needs a paid X API plan (pay-per-use). Without one, follow X accounts "
                                    "through an RSS bridge with an rss source (see the README)")
        low = MIN_RESULTS[self.kind_of()]
        if self.max_reads_per_poll < low or self.max_reads_per_poll > 1000:
            return "max_reads_per_poll", f"expected {low} to 1000 (X returns at least {low} posts a request)"
        if self.max_reads_per_day < self.max_reads_per_poll:
            return "max_reads_per_day", "expected at least max_reads_per_poll"
        if not self.api_url.startswith(("http://", "https://")):
            return "api_url", f"expected an http(s) URL, got {self.api_url!r}"
        return None


class _ApiSession:
    """What tweepy needs of a session (``request``), sending its https://api.twitter.com
    requests to ``api_url`` instead (the same address unless configured)."""

    def __init__(self, api_url: str, timeout: float):
        self.api = api_url.rstrip("/")
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    @contextlib.asynccontextmanager
    async def request(self, method, url, **kwargs):
        url = str(url)
        if url.startswith(TWITTER):
            url = self.api + url[len(TWITTER):]
        async with self.session.request(method, url, **kwargs) as response:
            yield _Response(response)

    async def close(self) -> None:
        await self.session.close()


class _Response:
    """A response as tweepy sees it, except ``x-rate-limit-reset``: that is read here by
    ``sources.http.parse_reset`` (bounded, never an error) into ``retry_after``, and hidden from
    tweepy, which would raise on a value that is not a whole number and trust any other."""

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self.retry_after = parse_reset(response.headers.get("x-rate-limit-reset"))
        headers = CIMultiDict(response.headers)
        headers.popall("x-rate-limit-reset", None)
        self.headers = CIMultiDictProxy(headers)

    def __getattr__(self, name):
        return getattr(self._response, name)


def today() -> str:
    return datetime.now(timezone.utc).date().isoformat()


class XSource(Source):
    kind = "x"
    Options = XOptions

    def __init__(self, name, options, http=None):
        super().__init__(name, options, http)
        self._capped_day = None

    def describe(self) -> str:
        o = self.options
        what = f"@{o.user.lstrip('@')}" if o.user else f"list {o.list_id}" if o.list_id else f"search {o.query!r}"
        return f"x {what} (at most {o.max_reads_per_poll} reads a poll, {o.max_reads_per_day} a day)"

    async def poll(self, cursor: dict, limit: int) -> Poll:
        import tweepy.asynchronous
        o = self.options
        cursor = dict(cursor)
        day = today()
        if cursor.get("reads_day") != day:
            cursor["reads_day"], cursor["reads"] = day, 0
        low = MIN_RESULTS[o.kind_of()]
        budget = min(o.max_reads_per_poll, o.max_reads_per_day - cursor["reads"])
        if budget < low:
            if self._capped_day != day:
                log.warning("source %s: %d of %d reads used today: the daily read cap is reached, reading "
                            "resumes tomorrow (UTC)", self.name, cursor["reads"], o.max_reads_per_day)
                self._capped_day = day
            return Poll(items=[], cursor=cursor)
        client = tweepy.asynchronous.AsyncClient(bearer_token=o.bearer_token, return_type=dict)
        session = _ApiSession(o.api_url, getattr(self.http, "timeout", 30.0))
        client.session = session
        try:
            return await self._poll(client, cursor, limit, budget, low)
        except tweepy.TooManyRequests as e:
            wait = getattr(e.response, "retry_after", None)
            raise RateLimited("X rate limit reached" + (f"; this source waits {wait:.0f}s" if wait else ""),
                              wait) from None
        except tweepy.Unauthorized:
            raise AuthError("X refused the bearer token (401 Unauthorized): check X_BEARER_TOKEN or "
                            "bearer_token") from None
        except tweepy.Forbidden as e:
            raise AuthError("X refused to read posts (403 Forbidden): this app's access level cannot read "
                            "them; X bills each post read, so reading needs a paid plan (pay-per-use). X said: "
                            f"{_detail(e)}") from None
        except tweepy.TwitterServerError as e:
            raise TransientError(f"X server error {e.response.status}") from None
        except tweepy.HTTPException as e:
            raise SourceError(f"X answered {e.response.status}: {_detail(e)}") from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TransientError(f"cannot reach X: {type(e).__name__}: {e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # tweepy parses the body as JSON
            raise BadPayload(f"malformed JSON from X: {e}") from None
        finally:
            await session.close()

    async def _poll(self, client, cursor: dict, limit: int, budget: int, low: int) -> Poll:
        o = self.options
        kind = o.kind_of()
        if kind == "user" and (cursor.get("user") != o.user.lstrip("@") or not cursor.get("user_id")):
            found = await client.get_user(username=o.user.lstrip("@"))
            cursor["reads"] += 1
            budget -= 1
            if not isinstance(found, dict) or not mapping(found.get("data")).get("id"):
                raise SourceError(f"X user @{o.user.lstrip('@')} not found: {_errors(found)}")
            cursor["user"], cursor["user_id"] = o.user.lstrip("@"), str(found["data"]["id"])
        common = {"expansions": EXPANSIONS, "media_fields": MEDIA_FIELDS, "tweet_fields": TWEET_FIELDS,
                  "user_fields": ["username"]}
        round_ = cursor.get("round") or {}
        token = round_.get("token")
        since = cursor.get("since_id")
        seen = cursor.get("seen", [])
        tweets, includes = [], {"media": [], "users": [], "tweets": []}
        newest = round_.get("newest")
        finished = True
        while budget >= low and len(tweets) < limit:
            n = max(low, min(100, budget, max(limit - len(tweets), low)))
            if kind == "user":
                params = dict(common, max_results=n, exclude=[] if o.retweets else ["retweets"])
                if since:
                    params["since_id"] = since
                if token:
                    params["pagination_token"] = token
                page = await client.get_users_tweets(cursor["user_id"], **params)
            elif kind == "list":
                params = dict(common, max_results=n)
                if token:
                    params["pagination_token"] = token
                page = await client.get_list_tweets(o.list_id, **params)
            else:
                query = o.query if o.retweets or "is:retweet" in o.query else f"{o.query} -is:retweet"
                params = dict(common, max_results=n)
                if since:
                    params["since_id"] = since
                if token:
                    params["next_token"] = token
                page = await client.search_recent_tweets(query, **params)
            if not isinstance(page, dict):
                raise BadPayload("unexpected answer from X (expected a JSON object)")
            data = page.get("data") or []
            if not isinstance(data, list):
                raise BadPayload("unexpected answer from X (data is not a list)")
            cursor["reads"] += len(data)
            budget -= len(data)
            for key in includes:
                includes[key] += [x for x in listing(mapping(page.get("includes")).get(key)) if isinstance(x, dict)]
            meta = mapping(page.get("meta"))
            if newest is None and whole_number(meta.get("newest_id")) is not None:
                newest = str(whole_number(meta["newest_id"]))
            met_seen = kind == "list" and any(str(t.get("id")) in seen for t in data if isinstance(t, dict))
            tweets += data
            token = meta.get("next_token") if isinstance(meta.get("next_token"), str) else None
            first = not seen if kind == "list" else not since
            if not token or not data or met_seen or first:  # the first poll reads the newest page only;
                # a page without posts ends the round (a server that keeps sending its token must not loop)
                token = None
                break
            if budget < low or len(tweets) >= limit:
                finished = False
                break
        items, handled = self._items(tweets, includes, seen)
        if kind == "list":
            cursor["seen"] = remember(seen, handled, keep=2000)
        elif finished or not token:
            cursor.pop("round", None)
            if newest:
                cursor["since_id"] = str(max(int(newest), whole_number(since) or 0))
        else:
            cursor["round"] = {"token": token, "newest": newest}
        return Poll(items=items, cursor=cursor, more=not finished)

    def _items(self, tweets: list, includes: dict, seen: list) -> tuple[list[Item], list[str]]:
        media = _by_key(includes["media"], "media_key")
        users = _by_key(includes["users"], "id")
        refs = {t["id"]: t for t in includes["tweets"] if whole_number(t.get("id")) is not None}
        items, handled, done = [], [], set(seen)
        for tweet in sorted((t for t in tweets if _valid(t, self.name)), key=lambda t: whole_number(t["id"])):
            handled.append(str(tweet["id"]))
            try:
                items += self._tweet_items(tweet, media, users, refs, done)
            except Exception as e:  # noqa: BLE001 - one post that cannot be read never stalls the page
                skip_post(self.name, tweet["id"], e, what="a malformed post")
        return items, handled

    def _tweet_items(self, tweet: dict, media: dict, users: dict, refs: dict, done: set) -> list[Item]:
        o = self.options
        source = tweet
        kinds = {r["type"]: r.get("id") for r in listing(tweet.get("referenced_tweets"))
                 if isinstance(r, dict) and isinstance(r.get("type"), str) and isinstance(r.get("id"), (str, int))}
        if "retweeted" in kinds:
            if not o.retweets:
                return []
            source = refs.get(kinds["retweeted"]) or tweet
        keys = listing(mapping(source.get("attachments")).get("media_keys"))
        if not keys and "quoted" in kinds and o.quotes and kinds["quoted"] in refs:
            source = refs[kinds["quoted"]]
            keys = listing(mapping(source.get("attachments")).get("media_keys"))
        sid = str(source.get("id"))
        if sid in done:
            return []
        done.add(sid)
        author = source.get("author_id")
        user = text(mapping(users.get(author) if isinstance(author, (str, int)) else None).get("username"))
        items = []
        for key in keys:
            m = media.get(key) if isinstance(key, str) else None
            if not m:
                continue
            video = m.get("type") in ("animated_gif", "video")
            url = m.get("preview_image_url") if video else m.get("url")
            if not url:
                continue
            items.append(Item(
                external_id=f"{sid}/{key}", media_url=url,
                page_url=f"https://x.com/{user or 'i'}/status/{sid}", author=user,
                title=text(source.get("text"), 200),
                rating="questionable" if source.get("possibly_sensitive") else None,
                popularity=number(mapping(source.get("public_metrics")).get("like_count")),
                posted_at=source.get("created_at"),
                skip=f"{m.get('type')} (x videos = false): preview kept, not scored" if video and not o.videos
                else None))
        return items


def _by_key(objects: list[dict], key: str) -> dict:
    """Included media or users by their key; those without a usable key are left out."""
    return {o[key]: o for o in objects if isinstance(o.get(key), (str, int)) and not isinstance(o.get(key), bool)}


def _valid(tweet, name: str) -> bool:
    if isinstance(tweet, dict) and whole_number(tweet.get("id")) is not None:
        return True
    skip_post(name, tweet.get("id") if isinstance(tweet, dict) else tweet, "no numeric id", what="a malformed post")
    return False


def _detail(e) -> str:
    j = getattr(e, "response_json", None) or {}
    return str(j.get("detail") or j.get("title") or (e.api_messages[0] if getattr(e, "api_messages", None) else e))


def _errors(payload) -> str:
    errors = payload.get("errors") if isinstance(payload, dict) else None
    return (errors[0].get("detail") if errors and isinstance(errors[0], dict) else None) or "no such user"

