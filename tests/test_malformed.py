"""Hostile and odd input from sources: malformed posts, older API dialects, broken feeds and text
that tries to forge log lines. Each test names the gap it closes (issue 12, items 1, 3 and 4)."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time

import pytest
from aiohttp import web

from bot.daemon import Daemon
from bot.logs import setup_logging
from sources import BadPayload, make_source
from sources.base import Item, Poll, Source, clean_item
from sources.http import Http
from tests.fake_social import FakeBluesky, FakeMastodon, FakeX
from tests.fakes import FakeHttp
from tests.helpers import assert_clean, make_config, picture, wait_for

# A post as Danbooru 1.x (and sites still running it) answers: tags instead of tag_string, a
# relative file_url, and Ruby's JSON form of a time (the one that stalled a source in the trial).
DANBOORU_1X_POST = {
    "id": 11, "tags": "1girl solo smile", "created_at": {"json_class": "Time", "s": 1678977249, "n": 42631000},
    "creator_id": 1, "author": "uploader", "change": 100, "source": "", "score": 5,
    "md5": "d41d8cd98f00b204e9800998ecf8427e", "file_size": 1000, "file_url": "/data/ab.jpg",
    "preview_url": "/data/preview/ab.jpg", "preview_width": 150, "preview_height": 113,
    "sample_url": "/data/ab.jpg", "sample_width": 160, "sample_height": 120, "rating": "s",
    "has_children": False, "status": "active", "width": 160, "height": 120, "parent_id": None,
    "has_comments": False, "has_notes": False,
}


def danbooru_post(i: int, base: str) -> dict:
    return {"id": i, "created_at": "2026-11-01T10:00:00.000-05:00", "score": i, "md5": f"{i:032x}",
            "rating": "g", "tag_string": "1girl smile", "tag_string_artist": f"artist_{i}",
            "file_url": f"{base}/img/{i}.jpg"}


# ---- item 1: one malformed post never stalls a source -----------------------------------------
async def test_danbooru_1x_post_in_a_page_stalls_nothing_through_the_daemon(tmp_path, serve):
    """The trial's payload: ten posts, one of them Danbooru 1.x with a Ruby time object. Before,
    the database write failed for the page, the cursor stayed and the source went unhealthy."""
    base_ref = [""]

    async def posts(request):
        if request.query.get("page", "").startswith("a"):
            return web.json_response([])
        base = base_ref[0]
        return web.json_response([danbooru_post(i, base) for i in range(10, 0, -1) if i != 7]
                                 + [dict(DANBOORU_1X_POST, id=7)])

    async def image(request):
        return web.Response(body=picture(int(request.match_info["n"])), content_type="image/jpeg")

    async def data(request):
        return web.Response(body=picture(70), content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/posts.json", posts)
    app.router.add_get("/img/{n}.jpg", image)
    app.router.add_get("/data/ab.jpg", data)
    base_ref[0] = base = await serve(app)
    cfg = make_config(tmp_path, f'''
[[sources]]
name = "old"
kind = "booru"
url = "{base}"
interval = 60
''', unhealthy_after=1)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        async def stored():
            rows = await daemon.store.execute(
                "SELECT i.* FROM images i JOIN sources s ON s.id = i.source_id WHERE s.name = 'old'")
            return rows if len(rows) == 10 else None
        rows = await wait_for(stored)
        row = await daemon.store.get_source("old")
        assert row["cursor"] == {"last_id": 10}
        assert row["healthy"] and not row["last_error"] and row["failures"] == 0
        old = next(r for r in rows if r["external_id"] == "7")
        assert old["posted_at"] == "2023-03-16T14:34:09.042631+00:00"
        assert old["media_url"] == f"{base}/data/ab.jpg"   # relative file_url, joined with the site
        assert json.loads(old["tags"]) == ["1girl", "solo", "smile"] and old["rating"] == "general"
        assert next(r for r in rows if r["external_id"] == "1")["posted_at"] == "2026-11-01T15:00:00+00:00"
    finally:
        await daemon.stop()


def test_clean_item_gives_every_field_its_declared_type(caplog):
    raw = Item(external_id=1234, media_url=" https://a.example/x.jpg ", page_url="javascript:alert(1)",
               author={"name": "x"}, title="  a title\ud800  ", tags={"artist": ["me"], "general": ["a", "b c", 5]},
               rating="Q", popularity={"total": 17}, site_md5=["x"],
               posted_at={"json_class": "Time", "s": 1678977249, "n": 42631000})
    item = clean_item(raw, "src")
    assert_clean(item)
    assert (item.external_id, item.media_url, item.page_url, item.author) == (
        "1234", "https://a.example/x.jpg", None, None)
    assert item.title == "a title\ufffd" and item.tags == ["me", "a", "b c", "5"]
    assert item.rating == "questionable" and item.popularity == 17.0 and item.site_md5 is None
    assert item.posted_at == "2023-03-16T14:34:09.042631+00:00"
    assert clean_item(item, "src") == item  # cleaning twice changes nothing

    cases = [  # posted_at as sites send it
        ("2023-03-16 13:54:09 -0400", "2023-03-16T17:54:09+00:00"),          # Moebooru / MyImouto
        ("Sat Nov 01 10:00:00 -0500 2026", "2026-11-01T15:00:00+00:00"),     # Gelbooru
        ("2026-11-23T08:00:00.000Z", "2026-11-23T08:00:00+00:00"),
        (1678977249, "2023-03-16T14:34:09+00:00"), (1678977249000, "2023-03-16T14:34:09+00:00"),
        ("1678977249", "2023-03-16T14:34:09+00:00"), ({"s": 1678977249}, "2023-03-16T14:34:09+00:00"),
        ("yesterday", None), (float("inf"), None), (10 ** 30, None), (True, None), ([], None),
        ("9999-12-31T23:59:59-05:00", None),
    ]
    for value, expected in cases:
        assert clean_item(Item(external_id="x", posted_at=value), "src").posted_at == expected, value
    for value, expected in [("12", 12.0), (3, 3.0), ("nan", None), (float("inf"), None), (10 ** 400, None),
                            (True, None), ({"total": "4"}, 4.0), ({"up": 1}, None)]:
        assert clean_item(Item(external_id="x", popularity=value), "src").popularity == expected, value
    assert clean_item(Item(external_id="x", tags="a  b\tc"), "src").tags == ["a", "b", "c"]
    assert clean_item(Item(external_id="x", title="t" * 5000), "src").title == "t" * 500
    assert clean_item(Item(external_id="x", media_url="ftp://a/b.jpg"), "src").media_url is None
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for bad in (None, True, 1.5, {"a": 1}, "", "  "):
            assert clean_item(Item(external_id=bad, page_url="https://a.example/p/1"), "src") is None
    assert len(caplog.records) == 6
    assert all("source src: skipped post" in r.getMessage() for r in caplog.records)


async def test_a_file_name_that_is_not_utf8_skips_that_file_not_the_folder(tmp_path, caplog):
    """Before, its path (with surrogate escapes) made the database write fail for the whole poll."""
    import os
    from storage import Store
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "good.jpg").write_bytes(picture(1))
    with open(os.path.join(os.fsencode(inbox), b"bad\xff.jpg"), "wb") as f:
        f.write(picture(2))
    old = time.time() - 10
    for p in inbox.iterdir():
        os.utime(p, (old, old))
    src = make_source("in", "folder", {"path": str(inbox)})
    with caplog.at_level(logging.WARNING):
        poll = await src.poll({}, 10)
    assert [i.title for i in poll.items] == ["good.jpg"]
    assert len(caplog.records) == 1 and "not valid UTF-8" in caplog.records[0].getMessage()
    with Store.open(tmp_path / "t.db") as store:
        sid = store.upsert_source("in", "folder", {})
        assert len(store.save_poll(sid, poll.items, poll.cursor)) == 1
        assert (await src.poll(store.get_source("in")["cursor"], 10)).items == []  # and not tried again


class _Raw(Source):
    """A source kind as a newcomer might write it: raw values straight from the site."""
    kind = "raw"
    Options = dict

    async def poll(self, cursor, limit):
        return Poll(items=[Item(external_id=5, media_url="https://a.example/1.jpg", posted_at={"s": 1},
                                popularity="9", tags="x y"),
                           Item(external_id={"no": "id"}, media_url="https://a.example/2.jpg")],
                    cursor={"n": 1})


async def test_every_source_kind_gets_its_items_cleaned(caplog):
    """The cleaning lives in the Source base class, so a new kind cannot forget it."""
    with caplog.at_level(logging.WARNING):
        poll = await _Raw("new", {}).poll({}, 10)
    (item,) = poll.items
    assert_clean(item)
    assert (item.external_id, item.posted_at, item.popularity, item.tags) == (
        "5", "1970-01-01T00:00:01+00:00", 9.0, ["x", "y"])
    assert poll.cursor == {"n": 1}
    assert [r.getMessage() for r in caplog.records] == ["source new: skipped post {'no': 'id'}: no readable id"]


BASE = "https://booru.example"


@pytest.mark.parametrize("api, payload, expected", [
    ("danbooru", [DANBOORU_1X_POST],
     {"external_id": "11", "media_url": f"{BASE}/data/ab.jpg", "page_url": f"{BASE}/post/show/11", "characters": [],
      "tags": ["1girl", "solo", "smile"], "rating": "general", "popularity": 5.0,
      "posted_at": "2023-03-16T14:34:09.042631+00:00", "site_md5": "d41d8cd98f00b204e9800998ecf8427e"}),
    ("moebooru", [{"id": 12, "tags": "sky cloud", "created_at": "2023-03-16 13:54:09 -0400", "author": "me",
                   "file_url": "/image/12.png", "rating": "s", "score": "3"}],        # MyImouto
     {"external_id": "12", "media_url": f"{BASE}/image/12.png", "tags": ["sky", "cloud"], "author": "me",
      "rating": "general", "popularity": 3.0, "posted_at": "2023-03-16T17:54:09+00:00"}),
    ("moebooru", [{"id": 13, "tags": "sky", "created_at": 1678977249, "file_url": "https://x.example/13.jpg",
                   "rating": "q"}],
     {"external_id": "13", "rating": "questionable", "posted_at": "2023-03-16T14:34:09+00:00"}),
    ("gelbooru", {"@attributes": {"limit": "100", "offset": "0", "count": "1"},
                  "post": {"id": "14", "score": "7", "file_url": "https://img.example/14.jpg", "tags": "a b",
                           "rating": "safe", "md5": "abc", "created_at": "Sat Nov 01 10:00:00 -0500 2026",
                           "owner": "o"}},
     {"external_id": "14", "media_url": "https://img.example/14.jpg", "popularity": 7.0, "rating": "general",
      "tags": ["a", "b"], "posted_at": "2026-11-01T15:00:00+00:00", "author": "o"}),
    ("danbooru", {"posts": [{"id": 15, "created_at": "2026-11-01T10:00:00.000-05:00",
                             "file": {"url": "https://static.example/15.png", "md5": "f" * 32},
                             "tags": {"general": ["a", "b"], "artist": ["painter"], "species": [],
                                      "character": ["renamon"]},
                             "score": {"up": 9, "down": -1, "total": 8}, "rating": "s"}]},     # e621
     {"external_id": "15", "media_url": "https://static.example/15.png", "tags": ["a", "b", "painter", "renamon"],
      "author": "painter", "popularity": 8.0, "rating": "general", "site_md5": "f" * 32,
      "page_url": f"{BASE}/posts/15", "characters": ["renamon"]}),
    ("gelbooru", {"@attributes": {"count": 1},                      # fields=tag_info for the page, types by number
                  "post": [{"id": 16, "file_url": "https://img.example/16.jpg", "tags": "solo reimu"}],
                  "tag_info": [{"name": "solo", "type": 0}, {"name": "reimu", "type": 4}, "junk"]},
     {"external_id": "16", "tags": ["solo", "reimu"], "characters": ["reimu"]}),
    ("moebooru", {"posts": [{"id": 17, "tags": "sky marisa", "file_url": "https://x.example/17.jpg"}],
                  "pools": [], "tags": {"sky": "general", "marisa": "character"}},    # api_version=2
     {"external_id": "17", "characters": ["marisa"]}),
    ("moebooru", [{"id": 18, "tags": "sky marisa", "file_url": "https://x.example/18.jpg"}],  # no types: none
     {"external_id": "18", "characters": []}),
])
async def test_older_and_other_booru_dialects_work(api, payload, expected):
    src = make_source("b", "booru", {"api": api, "url": BASE, "ratings": []}, FakeHttp(payload))
    poll = await src.poll({}, 10)
    (item,) = poll.items
    assert_clean(item)
    assert {k: getattr(item, k) for k in expected} == expected
    assert poll.cursor == {"last_id": int(expected["external_id"])}


async def test_booru_unknown_answer_shape_is_one_clear_message():
    src = make_source("b", "booru", {"url": BASE}, FakeHttp({"data": {"items": []}}))
    with pytest.raises(BadPayload, match="unexpected Danbooru answer from https://booru.example"):
        await src.poll({}, 10)


async def test_one_bad_booru_post_is_skipped_with_one_line_and_the_page_goes_on(caplog):
    good = [danbooru_post(i, BASE) for i in (1, 2, 3)]
    bad = [dict(danbooru_post(4, BASE), file_url=5),                # .startswith on a number, before
           dict(danbooru_post(5, BASE), file_url={"a": "b"}, large_file_url=["x"]),
           {"id": float("inf"), "file_url": f"{BASE}/i.jpg"},        # int(inf): OverflowError, before
           {"id": True, "file_url": f"{BASE}/t.jpg"},
           {"id": "6x", "file_url": f"{BASE}/6.jpg"},
           {"id": "999999999999999999999999999999", "file_url": f"{BASE}/h.jpg"},  # would move the cursor
           {"id": 1e29, "file_url": f"{BASE}/f.jpg"},                              # past every real post
           dict(danbooru_post(8, BASE), tag_string=None, score=[1], md5=7, rating={"r": 1},
                created_at="not a date", tag_string_artist=9)]
    for api, body in [("danbooru", good + bad), ("moebooru", good + bad),
                      ("gelbooru", {"post": good + bad})]:
        caplog.clear()
        src = make_source("b", "booru", {"api": api, "url": BASE, "ratings": []}, FakeHttp(body))
        with caplog.at_level(logging.WARNING):
            poll = await src.poll({"last_id": 0}, 100)
        for item in poll.items:
            assert_clean(item)
        assert [i.external_id for i in poll.items] == ["1", "2", "3", "8"], api
        assert poll.cursor == {"last_id": 8}
        assert len(caplog.records) == 7, [r.getMessage() for r in caplog.records]
        assert all(r.getMessage().startswith("source b: skipped post") for r in caplog.records)


@pytest.fixture
async def http():
    async with Http(timeout=5, allow_private=["127.0.0.1"]) as client:
        yield client


async def test_mastodon_statuses_with_odd_fields_are_cleaned_or_skipped(serve, http, caplog):
    fake = FakeMastodon()
    ok = fake.status(images=1)
    odd = fake.status(images=1)
    fake.statuses[odd].update(created_at={"json_class": "Time", "s": 1678977249}, content=5, account="junk",
                              tags=[{"name": "art"}, 5, {"name": 7}], favourites_count="many", url="javascript:alert(1)")
    broken = fake.status(images=1)
    fake.statuses[broken]["media_attachments"][0]["url"] = ["not", "a", "url"]
    weird = fake.status(images=1)
    fake.statuses[weird]["id"] = float("inf")
    base = await serve(fake.app())
    src = make_source("m", "mastodon", {"url": base, "hashtag": "art"}, http)
    with caplog.at_level(logging.WARNING):
        poll = await src.poll({}, 50)
    for item in poll.items:
        assert_clean(item)
    items = {i.external_id.split("/")[0]: i for i in poll.items}
    assert set(items) == {str(ok), str(odd), str(broken)}
    assert items[str(broken)].media_url is None      # no usable picture URL: the download reports it
    o = items[str(odd)]
    assert (o.author, o.title, o.tags, o.popularity, o.page_url, o.posted_at) == (
        None, "5", ["art", "7"], None, f"https://example.social/users/artist/statuses/{odd}",
        "2023-03-16T14:34:09+00:00")
    assert poll.cursor["last_id"] == str(broken)
    assert len(caplog.records) == 1 and "skipped" in caplog.records[0].getMessage()


async def test_bluesky_posts_with_odd_fields_are_cleaned_or_skipped(serve, http, caplog):
    fake = FakeBluesky()
    fake.post()
    odd = fake.post()
    bad = fake.post()
    for entry in fake.entries:
        post = entry["post"]
        if post["uri"] == odd:
            post.update(author="junk", record={"text": 5, "createdAt": 1678977249}, likeCount={"n": 1})
        if post["uri"] == bad:
            post["embed"] = ["not", "an", "embed"]
    fake.entries.append({"post": {"uri": "at://did:plc:x/app.bsky.feed.post/3z", "embed": "junk",
                                  "author": {"handle": 5}}, "reason": "junk"})
    fake.entries.append({"post": {"cid": "no uri"}})
    base = await serve(fake.app())
    src = make_source("b", "bluesky", {"actor": "artist.bsky.social", "url": base}, http)
    with caplog.at_level(logging.WARNING):
        poll = await src.poll({}, 50)
    for item in poll.items:
        assert_clean(item)
    assert len(poll.items) == 2
    o = next(i for i in poll.items if i.external_id.startswith(odd))
    assert (o.author, o.title, o.popularity, o.posted_at, o.page_url) == (
        None, "5", None, "2023-03-16T14:34:09+00:00", None)
    assert len(poll.cursor["seen"]) == 4
    assert len(caplog.records) == 1 and "skipped" in caplog.records[0].getMessage()


async def test_x_posts_with_odd_fields_are_cleaned_or_skipped(serve, http, caplog):
    from bot.config import parse_source
    fake = FakeX()
    ok = fake.tweet(photos=1)
    odd = fake.tweet(photos=1)
    fake.tweets[odd].update(created_at=1678977249, text=["x"], public_metrics={"like_count": "lots"},
                            referenced_tweets=[{"type": ["unhashable"], "id": "1"}])
    junk = fake.tweet(photos=1)
    fake.media[f"3_{junk}"]["media_key"] = ["unhashable"]
    fake.malformed = True                                   # and a post without an id
    base = await serve(fake.app())
    opts = parse_source({"name": "x", "kind": "x", "bearer_token": fake.token, "api_url": base,
                         "user": "artist"}, "x").options
    src = make_source("x", "x", opts, http)
    with caplog.at_level(logging.WARNING):
        poll = await src.poll({}, 50)
    for item in poll.items:
        assert_clean(item)
    ids = {i.external_id.split("/")[0] for i in poll.items}
    assert ids == {str(ok), str(odd)}
    o = next(i for i in poll.items if i.external_id.startswith(str(odd)))
    assert (o.title, o.popularity, o.posted_at) == (None, None, "2023-03-16T14:34:09+00:00")
    assert poll.cursor["since_id"] == str(junk)
    assert len(caplog.records) == 1 and "skipped" in caplog.records[0].getMessage()


# ---- item 3: malformed feeds are reported ------------------------------------------------------
FEED_HEAD = '<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>'


async def test_not_well_formed_feed_that_yields_nothing_is_bad_payload():
    """Before, a broken document whose entries had titles but no pictures passed as an empty feed."""
    broken = FEED_HEAD + "<item><title>Post 1</title><link>https://a.example/1</link></item><item><ti"
    src = make_source("f", "rss", {"url": "https://a.example/feed"}, FakeHttp(broken.encode(), "application/rss+xml"))
    with pytest.raises(BadPayload, match=r"^malformed feed from https://a.example/feed: .*unclosed token"):
        await src.poll({}, 10)


@pytest.mark.parametrize("body, ctype", [(FEED_HEAD + "</channel></rss>", "application/rss+xml"),
                                         (FEED_HEAD + "</channel></rss>", "text/html"),
                                         (FEED_HEAD + "<item><title>text only</title></item></channel></rss>",
                                          "application/rss+xml")])
async def test_well_formed_feed_without_pictures_is_fine(body, ctype):
    src = make_source("f", "rss", {"url": "https://a.example/feed"}, FakeHttp(body.encode(), ctype))
    assert (await src.poll({}, 10)).items == []


async def test_feed_entries_with_only_pictures_get_a_stable_identity():
    """Before, an entry with pictures but no id, link or title was dropped without a word."""
    doc = (FEED_HEAD + '<item><enclosure url="https://a.example/2.jpg" type="image/jpeg"/>'
           '<description>&lt;img src="https://a.example/1.jpg"&gt;</description></item></channel></rss>')
    src = make_source("f", "rss", {"url": "https://a.example/feed"}, FakeHttp(doc.encode(), "application/rss+xml"))
    poll = await src.poll({}, 10)
    assert [i.media_url for i in poll.items] == ["https://a.example/2.jpg", "https://a.example/1.jpg"]
    ids = [i.external_id for i in poll.items]
    assert all(i.startswith("img:") for i in ids) and len(set(ids)) == 2
    assert [i.external_id for i in (await src.poll({}, 10)).items] == ids       # stable across polls
    assert (await src.poll(poll.cursor, 10)).items == []                          # and remembered


async def test_broken_feed_counts_toward_unhealthy_with_one_log_line(tmp_path, serve, caplog):
    async def feed(request):
        return web.Response(text=FEED_HEAD + "<item><title>a &amp b</title></item>", content_type="application/rss+xml")
    app = web.Application()
    app.router.add_get("/feed", feed)
    base = await serve(app)
    cfg = make_config(tmp_path, f'''
[[sources]]
name = "broken"
kind = "rss"
url = "{base}/feed"
interval = 60
''', unhealthy_after=1)
    daemon = Daemon(cfg)
    with caplog.at_level(logging.WARNING, logger="tastefeed.daemon"):
        await daemon.start()
        try:
            async def unhealthy():
                row = await daemon.store.get_source("broken")
                return row if not row["healthy"] else None
            row = await wait_for(unhealthy)
        finally:
            await daemon.stop()
    assert row["last_error"].startswith(f"malformed feed from {base}/feed: ")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("source broken:")]
    assert len(lines) == 1 and "malformed feed" in lines[0] and "\n" not in lines[0]


# ---- item 4: logs cannot be forged ------------------------------------------------------------
@pytest.fixture
def log_stream():
    """setup_logging writing to a buffer; the loggers it touched are restored afterwards."""
    names = ["", "apscheduler", "discord", "PIL", "urllib3", "matplotlib"]
    levels = {name: logging.getLogger(name).level for name in names}
    handlers = list(logging.root.handlers)
    stream = io.StringIO()
    setup_logging("INFO", stream)
    yield stream
    for handler in logging.root.handlers[:]:
        if handler not in handlers:
            logging.root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


OURS = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


def forged(text: str) -> list[str]:
    """Lines that neither start as ours do (time, level, logger) nor belong to a traceback."""
    out, in_traceback = [], False
    for line in text.splitlines():
        if OURS.match(line):
            in_traceback = False
        elif line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif not in_traceback:
            out.append(line)
    return out


def test_log_messages_escape_control_characters_but_keep_tracebacks(log_stream):
    log = logging.getLogger("tastefeed.test")
    log.warning("title %s", "a\nERROR forged\r\x1b[31mred\x00\x85\u2028end\ttab")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed on %r", "x\ny")
    out = log_stream.getvalue()
    assert "title a\\nERROR forged\\r\\x1b[31mred\\x00\\x85\\u2028end\\ttab\n" in out
    assert "failed on 'x\\ny'\nTraceback (most recent call last):\n" in out   # the traceback stays multi-line
    assert forged(out) == []


async def test_feed_title_cannot_forge_a_log_line_through_the_daemon(tmp_path, serve, log_stream):
    async def feed(request):
        return web.Response(content_type="application/rss+xml", text=(
            FEED_HEAD + "<item><title>Post&#10;2026-01-01 00:00:00 ERROR forged: pwned&#13;</title><guid>1</guid>"
            f'<enclosure url="{base}/img/1.jpg" type="image/jpeg"/></item></channel></rss>'))

    async def image(request):
        return web.Response(body=picture(1), content_type="image/jpeg")
    app = web.Application()
    app.router.add_get("/feed", feed)
    app.router.add_get("/img/1.jpg", image)
    base = await serve(app)
    cfg = make_config(tmp_path, f'''
[[sources]]
name = "feed"
kind = "rss"
url = "{base}/feed"
interval = 60
''')
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        async def scored():
            return "image 1 (Post" in log_stream.getvalue()
        await wait_for(scored, timeout=20)
    finally:
        await daemon.stop()
    out = log_stream.getvalue()
    assert "Post\\n2026-01-01 00:00:00 ERROR forged: pwned" in out   # the title is logged, escaped
    assert forged(out) == []
    assert not any(line.startswith("2026-01-01 00:00:00 ERROR") for line in out.splitlines())


# ---- item 8: what the property tests (tests/test_properties.py) found, each pinned down --------
async def test_x_answer_that_is_not_json_is_bad_payload(serve, http):
    """Before, tweepy's JSONDecodeError escaped the poll as an unexpected exception."""
    async def truncated(request):
        return web.Response(body=b'{"data": [', content_type="application/json")
    app = web.Application()
    app.router.add_get("/2/users/{id}/tweets", truncated)
    base = await serve(app)
    src = make_source("x", "x", {"bearer_token": "t" * 10, "user": "a", "api_url": base}, http)
    with pytest.raises(BadPayload, match="malformed JSON from X"):
        await src.poll({"user": "a", "user_id": "1"}, 10)


async def test_x_pages_without_posts_but_with_a_next_token_end_the_round(serve, http):
    """Before, a server answering an empty page with a next_token kept the poll looping for ever."""
    hits = []

    async def empty(request):
        hits.append(request.query.get("pagination_token"))
        return web.json_response({"meta": {"result_count": 0, "next_token": "again"}})
    app = web.Application()
    app.router.add_get("/2/users/{id}/tweets", empty)
    base = await serve(app)
    src = make_source("x", "x", {"bearer_token": "t" * 10, "user": "a", "api_url": base}, http)
    poll = await asyncio.wait_for(src.poll({"user": "a", "user_id": "1", "since_id": "5"}, 10), 10)
    assert poll.items == [] and len(hits) == 1 and poll.cursor["since_id"] == "5" and "round" not in poll.cursor


@pytest.mark.parametrize("body, message", [
    (b'data_dir = "\x80"\n', "not valid TOML: not UTF-8 text (byte 12)"),
    (b'[[sources]]\nname = "b"\nkind = "booru"\nurl = "http://["\n', "sources[0].url: expected an http(s) URL"),
])
def test_config_files_that_used_to_raise_other_errors(tmp_path, body, message):
    from bot.config import ConfigError, load_config
    path = tmp_path / "config.toml"
    path.write_bytes(body)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
