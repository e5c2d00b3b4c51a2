"""X (tweepy), Bluesky and Mastodon sources, each with its real client code against a local fake
of the API (tests/fake_social.py)."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from bot.config import ConfigError, load_config, parse_source
from bot.daemon import Daemon
from bot.manage import source_lines
from sources import AuthError, BadPayload, RateLimited, make_source
from sources.http import Http
from storage import Store
from tests.fake_social import FakeBluesky, FakeMastodon, FakeX
from tests.helpers import cli, make_config, wait_for, write_config


@pytest.fixture
async def http():
    async with Http(timeout=5, allow_private=["127.0.0.1"]) as client:
        yield client


def answer(body, **kw):
    """An aiohttp handler that always answers ``body`` as JSON."""
    from aiohttp import web

    async def handler(request):
        return web.json_response(body, **kw)
    return handler


def roundtrip(cursor: dict) -> dict:
    """What a restart sees: the cursor as stored in SQLite."""
    return json.loads(json.dumps(cursor))


async def x_source(serve, fake: FakeX, http, **options):
    base = await serve(fake.app())
    opts = {"bearer_token": fake.token, "api_url": base, **options}
    src = parse_source({"name": "x", "kind": "x", **opts}, "x")
    return make_source("x", "x", src.options, http)


# ---- X ---------------------------------------------------------------------------------------
async def test_x_user_posts_with_photos_become_candidates_once(serve, http):
    fake = FakeX()
    old = fake.tweet(photos=1)
    one = fake.tweet(photos=1, sensitive=True)
    fake.tweet()                                        # text only
    two = fake.tweet(photos=2)
    vid = fake.tweet(video=True)
    others = fake.tweet("other", photos=1)
    fake.tweet(retweet_of=others)                       # a retweet: skipped by default
    quote = fake.tweet(quote_of=others)                 # a quote without media: the quoted post's picture
    src = await x_source(serve, fake, http, user="artist", max_reads_per_poll=20)
    poll = await src.poll({}, 50)
    items = {i.external_id: i for i in poll.items}
    assert set(items) == {f"{old}/3_{old}", f"{one}/3_{one}", f"{two}/3_{two}", f"{two}/3_{two + 1}",
                          f"{vid}/7_{vid}", f"{others}/3_{others}"}
    photo = items[f"{two}/3_{two}"]
    assert (photo.author, photo.page_url, photo.media_url) == (
        "artist", f"https://x.com/artist/status/{two}", f"https://pbs.twimg.com/media/{two}_0.jpg")
    assert items[f"{one}/3_{one}"].rating == "questionable" and photo.rating is None
    video = items[f"{vid}/7_{vid}"]
    assert video.media_url.endswith("/p.jpg") and "not scored" in video.skip
    assert items[f"{others}/3_{others}"].author == "other"   # the quoted original, by its own id
    assert [int(i.external_id.split("/")[0]) for i in poll.items] == sorted(
        int(i.external_id.split("/")[0]) for i in poll.items)  # oldest first
    assert poll.cursor["since_id"] == str(quote) and poll.cursor["user_id"] == "1001"
    # Nothing twice across polls and restarts; the handle is looked up once.
    again = await src.poll(roundtrip(poll.cursor), 50)
    assert again.items == [] and fake.lookups == 1
    new = fake.tweet(photos=1)
    restarted = await x_source(serve, fake, http, user="artist", max_reads_per_poll=20)
    later = await restarted.poll(roundtrip(again.cursor), 50)
    assert [i.external_id for i in later.items] == [f"{new}/3_{new}"] and fake.lookups == 1
    assert fake.requests[-1][1]["since_id"] == str(quote) and fake.requests[-1][1]["exclude"] == "retweets"
    assert later.cursor["reads"] == fake.reads + fake.lookups


async def test_x_retweets_when_enabled_dedup_by_the_original_and_lists_remember_ids(serve, http):
    fake = FakeX()
    original = fake.tweet("other", photos=1)
    fake.lists["77"] = [original, fake.tweet(retweet_of=original), fake.tweet(photos=1)]
    src = await x_source(serve, fake, http, list_id="77", retweets=True, max_reads_per_poll=10)
    poll = await src.poll({}, 50)
    ids = [i.external_id for i in poll.items]
    assert ids.count(f"{original}/3_{original}") == 1 and len(ids) == 2
    assert (await src.poll(roundtrip(poll.cursor), 50)).items == []  # no since_id on lists: stored ids
    fake.lists["77"].append(fake.tweet(photos=1))
    assert len((await src.poll(roundtrip(poll.cursor), 50)).items) == 1


async def test_x_search_pages_within_the_per_poll_cap_without_losing_posts(serve, http):
    fake = FakeX()
    fake.tweet(photos=1)
    src = await x_source(serve, fake, http, query="from:artist has:images", max_reads_per_poll=10)
    cursor = (await src.poll({}, 50)).cursor
    assert "-is:retweet" in fake.requests[-1][1]["query"]
    new = [fake.tweet(photos=1) for _ in range(25)]
    got = []
    for _ in range(4):
        poll = await src.poll(roundtrip(cursor), 50)
        cursor = poll.cursor
        got += [int(i.external_id.split("/")[0]) for i in poll.items]
        assert len(poll.items) <= 10
    assert sorted(got) == new and len(set(got)) == 25       # all of them, each once, at most 10 a poll


async def test_x_daily_read_cap_stops_reading_and_resumes_the_next_day(serve, http, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    fake = FakeX()
    for _ in range(12):
        fake.tweet(photos=1)
    src = await x_source(serve, fake, http, user="artist", max_reads_per_poll=10, max_reads_per_day=12)
    poll = await src.poll({}, 50)
    assert poll.cursor["reads"] == 10 and len(poll.items) == 9   # the lookup and 9 posts: 10 a poll
    for _ in range(12):
        fake.tweet(photos=1)
    requests = len(fake.requests)
    capped = await src.poll(roundtrip(poll.cursor), 50)
    capped = await src.poll(roundtrip(capped.cursor), 50)
    assert capped.items == [] and len(fake.requests) == requests    # nothing read, nothing billed
    assert caplog.text.count("daily read cap is reached") == 1
    monkeypatch.setattr("sources.x.today", lambda: "2999-01-01")
    resumed = await src.poll(roundtrip(capped.cursor), 50)
    assert len(resumed.items) == 10 and resumed.cursor["reads"] == 10


@pytest.mark.parametrize("status, message", [
    (401, "X refused the bearer token (401 Unauthorized)"),
    (403, "X refused to read posts (403 Forbidden): this app's access level cannot read them"),
])
async def test_x_401_403_are_one_clear_message(serve, http, status, message):
    fake = FakeX()
    fake.status = status
    src = await x_source(serve, fake, http, user="artist")
    with pytest.raises(AuthError, match=message.replace("(", r"\(").replace(")", r"\)")):
        await src.poll({}, 10)


async def test_x_malformed_payloads_are_skipped_with_a_log_line(serve, http, caplog):
    caplog.set_level(logging.WARNING)
    fake = FakeX()
    fake.tweet(photos=1)
    fake.malformed = True
    src = await x_source(serve, fake, http, user="artist")
    poll = await src.poll({}, 10)
    assert len(poll.items) == 1 and "skipped a malformed post" in caplog.text


@pytest.mark.parametrize("reset, expected", [
    ("inf", "max"), ("1e20", "max"), ("4070908800", "max"), ("99999999999999999999999", "max"),
    ("2099-01-01T00:00:00Z", "max"), ("-5", 0.0), ("0", 0.0), ("nan", None), ("garbage", None), ("", None)])
async def test_x_rate_limit_reset_goes_through_the_clamped_parser(serve, http, reset, expected):
    from aiohttp import web

    from sources.http import MAX_SERVER_DELAY

    async def limited(request):
        return web.json_response({"title": "Too Many Requests", "detail": "Too Many Requests", "status": 429},
                                 status=429, headers={"x-rate-limit-reset": reset})
    app = web.Application()
    app.router.add_get("/2/users/by/username/{name}", limited)
    base = await serve(app)
    src = make_source("x", "x", parse_source({"name": "x", "kind": "x", "bearer_token": "t", "api_url": base,
                                              "user": "artist"}, "x").options, http)
    with pytest.raises(RateLimited) as e:
        await src.poll({}, 10)
    assert e.value.retry_after == (MAX_SERVER_DELAY if expected == "max" else expected)
    assert "X rate limit reached" in str(e.value)


def test_x_config_explains_the_token_and_the_caps(monkeypatch):
    monkeypatch.delenv("X_BEARER_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="needs a paid X API plan"):
        parse_source({"name": "x", "kind": "x", "user": "a"}, "x")
    with pytest.raises(ConfigError, match="max_reads_per_poll: expected 10 to 1000"):
        parse_source({"name": "x", "kind": "x", "query": "a", "bearer_token": "t", "max_reads_per_poll": 5}, "x")
    with pytest.raises(ConfigError, match="set one of user"):
        parse_source({"name": "x", "kind": "x", "user": "a", "query": "b", "bearer_token": "t"}, "x")


async def test_x_in_the_daemon_401_marks_unhealthy_at_once_and_429_pauses_only_that_source(tmp_path, serve):
    fake, sky = FakeX(), FakeBluesky()
    fake.tweet(photos=1)
    sky.post()
    x_base, sky_base = await serve(fake.app()), await serve(sky.app())
    cfg = make_config(tmp_path, f'''
[[sources]]
name = "x-artist"
kind = "x"
interval = 0.5
user = "artist"
bearer_token = "{fake.token}"
api_url = "{x_base}"
[[sources]]
name = "sky"
kind = "bluesky"
interval = 0.5
actor = "artist.bsky.social"
url = "{sky_base}"
''')
    fake.limited_until = time.time() + 3
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        row = await wait_for(lambda: _row(daemon, "x-artist", lambda r: r["last_error"]))
        assert "X rate limit reached" in row["last_error"] and row["healthy"]
        limited_polls = len([r for r in fake.requests])
        sky_polls = len(sky.requests)
        await asyncio.sleep(1.5)
        assert len(sky.requests) >= sky_polls + 2           # the other source goes on
        assert len(fake.requests) == limited_polls          # X waits for its reset
        # X waits for its reset, but never less than its backoff (8-12s for a first failure)
        await wait_for(lambda: _row(daemon, "x-artist", lambda r: r["last_error"] is None), timeout=20)
        fake.status = 401
        row = await wait_for(lambda: _row(daemon, "x-artist", lambda r: not r["healthy"]), timeout=10)
        assert "X refused the bearer token (401 Unauthorized)" in row["last_error"]
        hits = len(fake.requests)
        await asyncio.sleep(1.5)
        assert len(fake.requests) == hits                   # no tight retry loop
        lines = "\n".join(await daemon.store.call(source_lines))
        assert "x-artist  [x, config]  UNHEALTHY" in lines and "reads today 2/200" in lines
    finally:
        await daemon.stop()
    assert fake.token not in "".join(str(r) for r in fake.requests)


async def _row(daemon, name, predicate):
    row = await daemon.store.get_source(name)
    return row if row and predicate(row) else None


async def test_sources_test_polls_x_once_and_prints_what_it_would_fetch(tmp_path, serve):
    fake = FakeX()
    tid = fake.tweet(photos=1)
    base = await serve(fake.app())
    config = write_config(tmp_path, f'''data_dir = "{tmp_path / 'data'}"
[[sources]]
name = "x-artist"
kind = "x"
user = "artist"
bearer_token = "{fake.token}"
api_url = "{base}"
''')
    result = await asyncio.to_thread(cli, tmp_path, "--config", config, "sources", "test", "x-artist")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"{tid}/3_{tid}: https://pbs.twimg.com/media/{tid}_0.jpg  by artist" in result.stdout
    assert fake.token not in out
    assert not (tmp_path / "data" / "tastefeed.db").exists() or not Store.open(
        tmp_path / "data" / "tastefeed.db").execute("SELECT * FROM images")


# ---- Bluesky ---------------------------------------------------------------------------------
async def test_bluesky_actor_feed_pages_with_cursor_and_dedups_by_uri(serve, http, caplog):
    caplog.set_level(logging.WARNING)
    sky = FakeBluesky()
    first = sky.post(images=2)
    sky.post(images=0)
    sky.post(repost=True)
    adult = sky.post(labels=["nudity"])
    base = await serve(sky.app())
    src = make_source("sky", "bluesky", {"actor": "artist.bsky.social", "url": base, "page_size": 2,
                                         "max_pages": 5, "reposts": False}, http)
    poll = await src.poll({}, 50)              # first poll: the newest page only
    assert [i.external_id for i in poll.items] == [f"{adult}#0"] and poll.items[0].rating == "questionable"
    assert sky.requests[0]["filter"] == "posts_with_media" and sky.requests[0]["actor"] == "artist.bsky.social"
    new = [sky.post(images=1) for _ in range(5)]
    sky.malformed = True
    later = await src.poll(roundtrip(poll.cursor), 50)
    assert [i.external_id for i in later.items] == [f"{u}#0" for u in new]  # oldest first, across pages
    assert "skipped a malformed feed entry" in caplog.text
    item = later.items[0]
    handle_rkey = new[0].rsplit("/", 1)[-1]
    assert (item.author, item.page_url) == ("artist.bsky.social",
                                            f"https://bsky.app/profile/artist.bsky.social/post/{handle_rkey}")
    assert item.media_url.startswith("https://cdn.bsky.app/img/feed_fullsize/")
    assert (await src.poll(roundtrip(later.cursor), 50)).items == []
    assert first not in json.dumps(poll.cursor)  # older history is not back-filled


async def test_bluesky_custom_feed_and_quotes_with_media(serve, http):
    sky = FakeBluesky()
    uri = sky.post(quote_media=True)
    base = await serve(sky.app())
    src = make_source("f", "bluesky", {"feed": "at://did:plc:x/app.bsky.feed.generator/art", "url": base}, http)
    poll = await src.poll({}, 10)
    assert [i.external_id for i in poll.items] == [f"{uri}#0"]
    assert sky.requests[0]["path"].endswith("getFeed") and sky.requests[0]["feed"].startswith("at://")


async def test_bluesky_malformed_answer_is_reported(serve, http):
    from aiohttp import web
    app = web.Application()
    app.router.add_get("/xrpc/app.bsky.feed.getAuthorFeed", answer({"posts": 3}))
    base = await serve(app)
    src = make_source("sky", "bluesky", {"actor": "a.bsky.social", "url": base}, http)
    with pytest.raises(BadPayload, match="expected a feed"):
        await src.poll({}, 10)


# ---- Mastodon --------------------------------------------------------------------------------
async def test_mastodon_account_statuses_min_id_paging_and_media_types(serve, http):
    masto = FakeMastodon(token="masto-token-abc")
    old = masto.status()
    base = await serve(masto.app())
    opts = {"url": base, "account": "@artist", "page_size": 3}
    with pytest.raises(AuthError):                      # this server requires a token
        await make_source("m", "mastodon", opts, http).poll({}, 10)
    src = make_source("m", "mastodon", dict(opts, access_token="masto-token-abc"), http)
    poll = await src.poll({}, 10)
    assert [i.external_id for i in poll.items] == [f"{old}/{old}"]
    item = poll.items[0]
    assert (item.author, item.page_url, item.tags, item.title) == (
        "artist", f"https://example.social/@artist/{old}", ["art"], f"drawing {old}")
    both = masto.status(images=2, video=True, sensitive=True)
    masto.status(reblog_of=old)                         # a boost: skipped
    rest = [masto.status() for _ in range(4)]
    capped = await src.poll(roundtrip(poll.cursor), 2)
    assert [i.external_id for i in capped.items] == [f"{both}/{both}", f"{both}/{both + 1}"]
    assert capped.items[0].rating == "questionable" and capped.more
    assert masto.requests[-1][1]["min_id"] == str(old) and masto.requests[-1][1]["only_media"] == "true"
    got = []
    cursor = capped.cursor
    for _ in range(3):
        p = await src.poll(roundtrip(cursor), 3)
        cursor = p.cursor
        got += [i.external_id for i in p.items]
    assert got == [f"{s}/{s}" for s in rest] and masto.lookups == 1


async def test_mastodon_hashtag_and_boosts_when_enabled(serve, http):
    masto = FakeMastodon()
    original = masto.status(tags=("cats",))
    masto.status(reblog_of=original)
    base = await serve(masto.app())
    src = make_source("t", "mastodon", {"url": base, "hashtag": "cats", "reblogs": True}, http)
    poll = await src.poll({}, 10)
    assert [i.external_id for i in poll.items] == [f"{original}/{original}"]  # the boost dedups to it
    assert masto.requests[-1][0] == "/api/v1/timelines/tag/cats"


async def test_mastodon_malformed_statuses_are_skipped(serve, http, caplog):
    from aiohttp import web
    caplog.set_level(logging.WARNING)
    app = web.Application()
    app.router.add_get("/api/v1/timelines/tag/x", answer([{"content": "no id"}]))
    app.router.add_get("/api/v1/timelines/tag/y", answer({"error": "?"}))
    base = await serve(app)
    poll = await make_source("t", "mastodon", {"url": base, "hashtag": "x"}, http).poll({}, 10)
    assert poll.items == [] and "skipped a malformed status" in caplog.text
    with pytest.raises(BadPayload):
        await make_source("t", "mastodon", {"url": base, "hashtag": "y"}, http).poll({}, 10)


def test_example_config_shows_each_new_source():
    text = open("config.example.toml").read()
    for kind in ("x", "bluesky", "mastodon"):
        assert f'# kind = "{kind}"' in text
    assert load_config("config.example.toml").sources[0].kind == "folder"


async def test_rate_limit_reset_headers_pause_a_source(serve, http):
    from aiohttp import web
    app = web.Application()
    app.router.add_get("/xrpc/app.bsky.feed.getAuthorFeed", answer(
        {"error": "RateLimitExceeded"}, status=429, headers={"ratelimit-reset": str(int(time.time()) + 60)}))
    base = await serve(app)
    with pytest.raises(RateLimited) as e:
        await make_source("s", "bluesky", {"actor": "a", "url": base}, http).poll({}, 10)
    assert 55 <= e.value.retry_after <= 61
