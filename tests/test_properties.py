"""Property-based tests (hypothesis) for everything that parses input from outside: feed documents,
booru / X / Bluesky / Mastodon answers, rate-limit headers, the configuration file, and the items
and log lines made from them.

Whatever arrives, each raises nothing but its module's own error type (``SourceError`` for
sources, ``ConfigError`` for the config), and what a source returns is clean (every field in its
declared type), storable and its cursor JSON. The strategies mix plausible values (real field
names, URLs, times as sites send them) with arbitrary JSON, so the examples reach deep into the
parsers instead of stopping at the first type check.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import types
import typing
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

import bot.logs
from bot.config import Config, ConfigError, load_config
from bot.logs import EscapingFormatter, escape_controls
from sources import SOURCE_KINDS, SourceError, make_source
from sources.base import Item, clean_item
from sources.http import parse_reset, parse_retry_after, retry_after
from storage import Store
from tests.fakes import FakeHttp
from tests.helpers import assert_clean

# feedparser warns about its own updated_parsed fallback whenever a generated entry has only <updated>.
pytestmark = pytest.mark.filterwarnings("ignore:To avoid breaking existing software:DeprecationWarning")

# PROPERTY_EXAMPLES=5000 pytest tests/test_properties.py searches longer (the suite's runs stay quick).
QUICK = settings(max_examples=int(os.environ.get("PROPERTY_EXAMPLES", 400)), deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---- strategies ---------------------------------------------------------------------------------
odd_text = st.sampled_from(["", " ", "\ud800", "a\udfffb", "\x00", "line\nERROR forged", "\u2028", "é", "0",
                            "1e400", "NaN", "-1", "9" * 40])
scalars = (st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70) | st.floats()
           | st.text(max_size=12) | odd_text)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)


def maybe(plausible):
    """Plausible values mostly, or anything JSON can carry."""
    return st.one_of(plausible, plausible, plausible, json_values)


def obj(**fields):
    """A JSON object whose keys are each present or not."""
    return st.fixed_dictionaries({}, optional=fields)


def record(core: dict, **fields):
    """A JSON object with the ``core`` keys (the ones a parser needs to go on) and others or not."""
    return st.fixed_dictionaries(core, optional=fields)


def answer(plausible):
    """A server's answer: mostly the expected shape, sometimes any JSON or any bytes."""
    return st.one_of(*[plausible] * 6, json_values, st.binary(max_size=50))


def some(strategy, most: int = 5):
    """A non-empty list (empty lists stop the parsers before the interesting part)."""
    return st.lists(strategy, min_size=1, max_size=most)


ids = maybe(st.integers(min_value=0, max_value=10 ** 6) | st.integers(min_value=0, max_value=10 ** 6).map(str)
            | st.sampled_from([float("inf"), float("nan"), 1.5, -3, True, "12a", " 7 "]))
urls = maybe(st.sampled_from(["https://a.example/1.jpg", "http://a.example/p/2", "/data/x.jpg", "data/y.png",
                              "//cdn.example/2.png", "javascript:alert(1)", "http://[::1", "ftp://a/b", "",
                              "https://a.example/\nx", "https://" + "a" * 5000]) | st.text(max_size=20))
times = maybe(st.sampled_from(["2026-11-01T10:00:00.000-05:00", "2023-03-16 13:54:09 -0400",
                               "Sat Nov 01 10:00:00 -0500 2026", "Sat, 01 Nov 2026 10:00:00 GMT", "1678977249",
                               "9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00", "2026-02-30"])
              | st.integers() | st.floats()
              | st.fixed_dictionaries({"json_class": st.just("Time"), "s": maybe(st.integers()),
                                       "n": maybe(st.integers())}))
numbers = maybe(st.integers() | st.floats() | st.sampled_from(["12", " 3.5", "inf", "1e999", "x"])
                | st.fixed_dictionaries({"total": maybe(st.integers())}))
tag_values = maybe(st.text(max_size=30) | st.lists(maybe(st.text(max_size=8)), max_size=4)
                   | st.dictionaries(st.sampled_from(["general", "artist", "species"]),
                                     maybe(st.lists(st.text(max_size=8), max_size=3)), max_size=3))
ratings = maybe(st.sampled_from(["g", "s", "q", "e", "safe", "general", "explicit", "Q", "x"]))


def run_poll(source, cursor: dict, limit: int):
    """One poll; a SourceError is an answer (None), anything else fails the test. A poll that
    does not finish within 5 s fails it too (a server must not keep a poll going forever)."""
    try:
        return asyncio.run(asyncio.wait_for(source.poll(dict(cursor), limit), 5))
    except SourceError:
        return None


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with Store.open(tmp_path_factory.mktemp("props") / "t.db") as s:
        yield s


def check_poll(poll, store: Store) -> None:
    """A poll's items are clean and storable, and its cursor is plain JSON."""
    if poll is None:
        return
    for item in poll.items:
        assert_clean(item)
    json.dumps(poll.cursor, allow_nan=False)
    sid = store.upsert_source("prop", "booru", {})
    store.save_poll(sid, poll.items, poll.cursor)


# ---- items -------------------------------------------------------------------------------------
anything = maybe(st.text() | odd_text | st.integers(min_value=-10 ** 400, max_value=10 ** 400))


@QUICK
@given(st.builds(Item, external_id=maybe(ids), media_url=urls, local_path=anything, page_url=urls,
                 author=anything, title=anything, tags=tag_values, rating=ratings, popularity=numbers,
                 site_md5=anything, posted_at=times, skip=anything))
def test_any_item_is_cleaned_or_skipped(item):
    cleaned = clean_item(item, "prop")
    if cleaned is not None:
        assert_clean(cleaned)
        assert clean_item(cleaned, "prop") == cleaned


# ---- feeds -------------------------------------------------------------------------------------
def _feed(entries: list[dict], atom: bool, escape: bool) -> bytes:
    from xml.sax.saxutils import escape as esc
    quote = (lambda s: esc(s, {'"': "&quot;"})) if escape else (lambda s: s)
    parts = []
    for e in entries:
        if atom:
            body = "".join(f"<{k}>{quote(e[k])}</{k}>" for k in ("title", "id", "updated") if k in e)
            body += "".join(f'<link href="{quote(e[k])}"/>' for k in ("link",) if k in e)
            body += "".join(f'<media:thumbnail url="{quote(e[k])}"/>' for k in ("img",) if k in e)
            parts.append(f"<entry>{body}</entry>")
        else:
            body = "".join(f"<{k}>{quote(e[k])}</{k}>" for k in ("title", "link", "guid", "pubDate", "category",
                                                                   "author") if k in e)
            body += "".join(f'<enclosure url="{quote(e[k])}" type="image/jpeg"/>' for k in ("enclosure",) if k in e)
            body += "".join(f"<description>{esc(quote(e[k]))}</description>" for k in ("description",) if k in e)
            parts.append(f"<item>{body}</item>")
    if atom:
        doc = ('<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom" '
               'xmlns:media="http://search.yahoo.com/mrss/"><title>t</title>' + "".join(parts) + "</feed>")
    else:
        doc = '<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>' + "".join(parts) + "</channel></rss>"
    return doc.encode("utf-8", "surrogatepass")


feed_text = st.text(max_size=25) | odd_text
feed_urls = st.sampled_from(["https://a.example/1.jpg", "/rel/2.jpg", "javascript:x", "http://[::1/x", ""]) | feed_text
feed_entries = st.lists(st.fixed_dictionaries({}, optional={
    "title": feed_text, "link": feed_urls, "guid": feed_text, "id": feed_text, "pubDate": times.map(str),
    "updated": times.map(str), "category": feed_text, "author": feed_text, "enclosure": feed_urls, "img": feed_urls,
    "description": feed_urls.map(lambda u: f'<p><img src="{u}"></p>')}), max_size=4)
feed_bodies = (st.builds(_feed, feed_entries, st.booleans(), st.booleans())
               | st.builds(lambda doc, cut: doc[:cut], st.builds(_feed, feed_entries, st.booleans(), st.just(True)),
                           st.integers(min_value=0, max_value=400))
               | st.binary(max_size=300) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
content_types = st.sampled_from(["application/rss+xml", "application/atom+xml", "text/html", "application/json", "",
                                 "text/xml; charset=latin-1", "text/xml; charset=bogus"])


@QUICK
@given(body=feed_bodies, ctype=content_types, seen=st.lists(st.text(max_size=10), max_size=3),
       limit=st.integers(min_value=1, max_value=20))
def test_any_feed_document_gives_items_or_a_source_error(store, body, ctype, seen, limit):
    src = make_source("f", "rss", {"url": "https://a.example/feed"}, FakeHttp(body, ctype))
    check_poll(run_poll(src, {"seen": seen}, limit), store)


# ---- boorus ------------------------------------------------------------------------------------
booru_post = record(dict(id=ids, file_url=urls), large_file_url=urls, jpeg_url=urls, sample_url=urls,
                    file=maybe(obj(url=urls, md5=json_values)), directory=json_values, image=json_values,
                    tag_string=tag_values, tags=tag_values, tag_string_artist=json_values, author=json_values,
                    owner=json_values, rating=ratings, score=numbers, md5=json_values, hash=json_values,
                    created_at=times)
booru_payloads = answer(st.one_of(
    some(maybe(booru_post)), some(maybe(booru_post)),
    st.fixed_dictionaries({"post": maybe(some(booru_post) | booru_post)}, optional={"@attributes": json_values}),
    st.fixed_dictionaries({"posts": maybe(some(booru_post))}), obj(success=json_values, message=json_values)))


@QUICK
@given(api=st.sampled_from(["danbooru", "gelbooru", "moebooru"]), payload=booru_payloads,
       cursor=st.sampled_from([{}, {"last_id": 0}, {"last_id": 3}]), limit=st.integers(min_value=1, max_value=50))
def test_any_booru_answer_gives_items_or_a_source_error(store, api, payload, cursor, limit):
    src = make_source("b", "booru", {"api": api, "url": "https://booru.example/sub", "ratings": []},
                      FakeHttp(payload))
    check_poll(run_poll(src, cursor, limit), store)


# ---- Bluesky -----------------------------------------------------------------------------------
image_view = record({"$type": st.just("app.bsky.embed.images#view"), "images": maybe(some(maybe(record({"fullsize": urls})), 3))})
embeds = maybe(image_view | record({"$type": st.just("app.bsky.embed.recordWithMedia#view"), "media": maybe(image_view)}))
bsky_post = record(
    {"uri": maybe(st.sampled_from(["at://did:plc:a/app.bsky.feed.post/3k1", "at://did:plc:a/app.bsky.feed.post/3k2",
                                   "at://x", ""])), "embed": embeds},
    author=maybe(obj(handle=maybe(st.just("a.bsky.social")))), record=maybe(obj(text=json_values, createdAt=times)),
    likeCount=numbers, labels=maybe(st.lists(maybe(obj(val=maybe(st.just("porn")))), max_size=2)))
bsky_entries = maybe(record({"post": maybe(bsky_post)},
                            reason=maybe(st.just({"$type": "app.bsky.feed.defs#reasonRepost"}))))
bsky_payloads = answer(record({"feed": maybe(some(bsky_entries))}, cursor=maybe(st.just("c1"))))


@QUICK
@given(payload=bsky_payloads, seen=st.sampled_from([[], ["at://did:plc:a/app.bsky.feed.post/3k1"], ["x"]]),
       limit=st.integers(min_value=1, max_value=20), reposts=st.booleans())
def test_any_bluesky_answer_gives_items_or_a_source_error(store, payload, seen, limit, reposts):
    src = make_source("s", "bluesky", {"actor": "a.bsky.social", "reposts": reposts}, FakeHttp(payload))
    check_poll(run_poll(src, {"seen": seen}, limit), store)


# ---- Mastodon ----------------------------------------------------------------------------------
status_core = dict(id=ids, media_attachments=maybe(some(maybe(record(dict(type=maybe(st.just("image")), url=urls),
                                                                        id=json_values)), 3)))
status_fields = dict(url=urls, uri=urls, account=maybe(obj(acct=json_values)), content=maybe(st.just("<p>x</p>")),
                     tags=maybe(st.lists(maybe(obj(name=json_values)), max_size=3)), sensitive=json_values,
                     favourites_count=numbers, created_at=times)
status = record(status_core, reblog=maybe(record(status_core, **status_fields)), **status_fields)
mastodon_payloads = answer(some(maybe(status), 6))


@QUICK
@given(payload=mastodon_payloads, cursor=st.sampled_from([{}, {"last_id": "5"}]),
       limit=st.integers(min_value=1, max_value=20), reblogs=st.booleans())
def test_any_mastodon_answer_gives_items_or_a_source_error(store, payload, cursor, limit, reblogs):
    src = make_source("m", "mastodon", {"url": "https://social.example", "hashtag": "art", "reblogs": reblogs},
                      FakeHttp(payload))
    check_poll(run_poll(src, cursor, limit), store)


# ---- X -----------------------------------------------------------------------------------------
media_keys = maybe(st.sampled_from(["3_1", "3_2", "7_1"]))
tweet_core = dict(id=ids, attachments=maybe(obj(media_keys=maybe(some(media_keys, 3)))))
tweet_fields = dict(text=json_values, author_id=maybe(st.just("1")),
                    referenced_tweets=maybe(st.lists(maybe(obj(type=maybe(st.sampled_from(["retweeted", "quoted"])),
                                                              id=ids)), max_size=2)),
                    possibly_sensitive=json_values, public_metrics=maybe(obj(like_count=numbers)), created_at=times)
tweet = record(tweet_core, **tweet_fields)
x_media = record(dict(media_key=media_keys, url=urls), type=maybe(st.sampled_from(["photo", "video", "animated_gif"])),
                 preview_image_url=urls)
x_pages = answer(record(dict(data=maybe(some(maybe(tweet))),
                            includes=maybe(record(dict(media=maybe(some(maybe(x_media), 3))),
                                                  users=maybe(st.lists(obj(id=maybe(st.just("1")),
                                                                           username=json_values), max_size=2)),
                                                  tweets=maybe(st.lists(tweet, max_size=2))))),
                       meta=maybe(obj(newest_id=ids, next_token=maybe(st.just("tok"))))))


class FakeTweepy:
    """tweepy's AsyncClient (return_type=dict), answering every read with one page."""
    page = None

    def __init__(self, **kwargs):
        self.session = None

    async def get_user(self, **kwargs):
        return {"data": {"id": "1", "username": "artist"}}

    async def _page(self, *args, **kwargs):
        await asyncio.sleep(0)  # a real request yields to the loop (so a poll that never ends times out)
        if isinstance(self.page, bytes):  # what aiohttp's response.json() makes of a body that is not JSON
            return json.loads(self.page.decode("utf-8"))
        return json.loads(json.dumps(self.page))  # a fresh copy, as parsed from the wire

    get_users_tweets = get_list_tweets = search_recent_tweets = _page


@QUICK
@given(page=x_pages, options=st.sampled_from([{"user": "artist"}, {"list_id": "9"}, {"query": "art"},
                                              {"user": "artist", "retweets": True, "videos": True}]),
       cursor=st.sampled_from([{}, {"user": "artist", "user_id": "1", "since_id": "4"}, {"seen": ["1"]},
                               {"round": {"token": "tok", "newest": "9"}, "since_id": "2"}]),
       limit=st.integers(min_value=1, max_value=40))
def test_any_x_answer_gives_items_or_a_source_error(store, page, options, cursor, limit):
    FakeTweepy.page = page
    src = make_source("x", "x", {"bearer_token": "t" * 10, **options}, FakeHttp(b""))
    with mock.patch("tweepy.asynchronous.AsyncClient", FakeTweepy):
        check_poll(run_poll(src, cursor, limit), store)


# ---- rate-limit headers ------------------------------------------------------------------------
header_values = (st.text(max_size=40) | st.integers().map(str) | st.floats().map(str)
                 | st.sampled_from(["inf", "-inf", "nan", "1e20", "1e400", "-5", "0", "31536000",
                                    "Thu, 01 Jan 2099 00:00:00 GMT", "4102444800", "2099-01-01T00:00:00Z",
                                    "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00", "Mon, 32 Jan 2020"]))


def _delay_ok(value) -> bool:
    """None, or a finite number of seconds, not negative (an int from a clamp is fine too)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value) and value >= 0)


@QUICK
@given(header_values)
def test_any_retry_header_value_gives_a_finite_delay_or_none(value):
    assert _delay_ok(parse_retry_after(value)), value
    assert _delay_ok(parse_reset(value)), value


@QUICK
@given(st.dictionaries(st.sampled_from(["Retry-After", "RateLimit-Reset", "X-RateLimit-Reset", "X-Rate-Limit-Reset",
                                        "Other"]), header_values))
def test_any_rate_limit_headers_give_a_finite_delay_or_none(headers):
    assert _delay_ok(retry_after(CIMultiDictProxy(CIMultiDict(headers)))), headers


# ---- configuration -----------------------------------------------------------------------------
def _string(text: str) -> str:
    """A TOML basic string."""
    return '"' + "".join(c if c >= " " and c not in '"\\\x7f' else f"\\u{ord(c):04x}" for c in text) + '"'


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{_string(k)} = {_toml(v)}" for k, v in value.items()) + "}"


def _document(top: dict, tables: dict, sources: list) -> bytes:
    lines = [f"{_string(k)} = {_toml(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines.append(f"[{_string(name)}]")
        lines += [f"{_string(k)} = {_toml(v)}" for k, v in table.items()]
    for source in sources:
        lines.append("[[sources]]")
        lines += [f"{_string(k)} = {_toml(v)}" for k, v in source.items()]
    return "\n".join(lines).encode("utf-8", "surrogatepass")


special_strings = st.sampled_from(["http://[", "https://a.example", "http://127.0.0.1:1/x", "0 4 * * *",
                                   "61 * * * *", "* * * * * * *", "auto", "on", "127.0.0.1", "0.0.0.0", "::1", "",
                                   "{api}", "a\nb", "at://x", "danbooru", "inbox"])
toml_scalars = (st.booleans() | st.integers(min_value=-2 ** 63, max_value=2 ** 63 - 1) | st.floats()
                | st.text(max_size=15) | special_strings)
toml_values = st.recursive(toml_scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=2), max_leaves=6)


def _for_type(tp):
    """Values of a settings field's declared type (TOML has no null), sometimes anything else."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        plausible = st.sampled_from(args)
    elif origin in (types.UnionType, typing.Union):
        plausible = st.one_of([_for_type(a) for a in args if a is not type(None)])
    elif origin is list:
        plausible = st.lists(_for_type(args[0]), max_size=3)
    elif origin is dict:
        plausible = st.dictionaries(st.text(max_size=5), st.integers(min_value=-1, max_value=6), max_size=2)
    else:
        plausible = {str: st.text(max_size=12) | special_strings, bool: st.booleans(),
                     int: st.integers(min_value=-2 ** 63, max_value=2 ** 63 - 1),
                     float: st.floats() | st.integers(min_value=-10 ** 6, max_value=10 ** 6)}.get(tp, toml_values)
    return st.one_of(plausible, plausible, toml_values)


def _table(cls, extra: dict | None = None):
    """A TOML table for dataclass ``cls``: each of its keys present or not."""
    fields = {name: _for_type(tp) for name, tp in typing.get_type_hints(cls).items()
              if name in {f.name for f in dataclasses.fields(cls)}}
    return st.fixed_dictionaries(extra or {}, optional=fields)


def _sections():
    hints = typing.get_type_hints(Config)
    return {f.name: _table(hints[f.name]) for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def _source_tables():
    common = {"name": st.text(min_size=1, max_size=5) | st.just("inbox"), "interval": _for_type(float),
              "enabled": _for_type(bool), "max_items": _for_type(int)}
    return st.one_of([_table(cls.Options, {"kind": st.just(kind), "name": common["name"]}).flatmap(
        lambda table: st.fixed_dictionaries({k: st.just(v) for k, v in table.items()},
                                            optional={k: v for k, v in common.items() if k != "name"}))
        for kind, cls in sorted(SOURCE_KINDS.items())])


config_docs = st.builds(
    _document,
    st.fixed_dictionaries({}, optional={"data_dir": _for_type(str)}),
    st.fixed_dictionaries({}, optional=_sections()),
    st.lists(_source_tables(), max_size=2))


@QUICK
@given(config_docs | st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_config_file_loads_or_gives_a_config_error(tmp_path, body):
    path = tmp_path / "config.toml"
    path.write_bytes(body)
    with mock.patch.object(bot.logs, "_SECRETS", set()):  # random "secrets" must not mask later logs
        try:
            load_config(path)
        except ConfigError:
            pass


# ---- log lines ---------------------------------------------------------------------------------
@QUICK
@given(st.text() | odd_text, st.text(max_size=20) | odd_text)
def test_any_text_in_a_log_message_stays_on_one_line(message, argument):
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, message.replace("%", "%%") + " %s", (argument,),
                               None)
    line = EscapingFormatter("%(levelname)s %(message)s").format(record)
    assert len(line.splitlines()) == 1 and line.startswith("WARNING ")
    assert escape_controls(line) == line
