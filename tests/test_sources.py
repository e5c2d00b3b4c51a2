import os
import time

import pytest
from aiohttp import web

from bot.config import build_source
from sources import BadPayload, SourceError, make_source
from sources.base import normalize_rating
from sources.http import Http
from storage import Store
from tests.helpers import picture
from tests.fakes import FakeBooru, atom_feed, rss_feed


@pytest.fixture
async def http():
    async with Http(timeout=5, allow_private=["127.0.0.1"]) as client:
        yield client


# ---- folder ------------------------------------------------------------------------------
async def test_folder_finds_new_and_changed_files_in_subfolders(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "a.jpg").write_bytes(picture(1))
    (inbox / "sub" / "b.png").write_bytes(picture(2, fmt="PNG"))
    (inbox / "notes.txt").write_text("not a picture")
    (inbox / ".hidden.jpg").write_bytes(picture(3))
    old = time.time() - 10
    for p in inbox.rglob("*"):
        os.utime(p, (old, old))
    src = make_source("in", "folder", {"path": str(inbox), "settle": 0.5})
    poll = await src.poll({}, 10)
    assert sorted(i.title for i in poll.items) == ["a.jpg", "b.png"]
    assert all(os.path.isabs(i.local_path) for i in poll.items)
    assert (await src.poll(poll.cursor, 10)).items == []
    (inbox / "a.jpg").write_bytes(picture(4))  # changed content
    os.utime(inbox / "a.jpg", (old + 5, old + 5))
    again = await src.poll(poll.cursor, 10)
    assert [i.title for i in again.items] == ["a.jpg"]
    assert again.items[0].external_id != poll.items[0].external_id


async def test_folder_waits_for_files_still_being_written_and_caps_without_loss(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    old = time.time() - 10
    for i in range(5):
        (inbox / f"{i}.jpg").write_bytes(picture(i))
        os.utime(inbox / f"{i}.jpg", (old + i, old + i))
    (inbox / "fresh.jpg").write_bytes(picture(9))  # just written: not settled
    src = make_source("in", "folder", {"path": str(inbox), "settle": 5})
    first = await src.poll({}, 3)
    assert [i.title for i in first.items] == ["0.jpg", "1.jpg", "2.jpg"] and first.more
    second = await src.poll(first.cursor, 3)
    assert [i.title for i in second.items] == ["3.jpg", "4.jpg"]
    assert second.more  # fresh.jpg waits


async def test_folder_missing_is_created_or_reported(tmp_path):
    src = make_source("in", "folder", {"path": str(tmp_path / "new")})
    assert (await src.poll({}, 5)).items == [] and (tmp_path / "new").is_dir()
    src = make_source("in", "folder", {"path": str(tmp_path / "gone"), "create": False})
    with pytest.raises(SourceError, match="does not exist"):
        await src.poll({}, 5)


# ---- rss ---------------------------------------------------------------------------------
def feed_app(state):
    async def feed(request):
        state["hits"] += 1
        if state.get("etag") and request.headers.get("If-None-Match") == state["etag"]:
            state["not_modified"] += 1
            return web.Response(status=304)
        headers = {"ETag": state["etag"]} if state.get("etag") else {}
        return web.Response(text=state["body"](state["base"]), content_type=state.get("ctype", "application/rss+xml"),
                            headers=headers)
    app = web.Application()
    app.router.add_get("/feed", feed)
    return app


async def test_rss_pictures_from_enclosures_media_and_html(serve, http):
    state = {"hits": 0, "not_modified": 0, "etag": '"v1"', "body": lambda b: rss_feed(b, [1, 2])}
    state["base"] = base = await serve(feed_app(state))
    src = make_source("f", "rss", {"url": f"{base}/feed"}, http)
    poll = await src.poll({}, 50)
    urls = [i.media_url for i in poll.items]
    assert urls == [f"{base}/img/1.jpg", f"{base}/img/100.jpg", f"{base}/img/101.jpg",
                    f"{base}/img/2.jpg", f"{base}/img/200.jpg", f"{base}/img/201.jpg"]
    first = poll.items[0]
    assert first.page_url == f"{base}/post/1" and first.tags == ["tag1"] and first.posted_at.startswith("2026-11-01")
    assert "Artist 1" in first.author
    assert poll.cursor["etag"] == '"v1"'
    again = await src.poll(poll.cursor, 50)  # unchanged feed: 304, nothing new
    assert again.items == [] and state["not_modified"] == 1


async def test_rss_cap_leaves_rest_for_next_poll_despite_etag(serve, http):
    state = {"hits": 0, "not_modified": 0, "etag": '"v1"', "body": lambda b: rss_feed(b, [1, 2, 3])}
    state["base"] = base = await serve(feed_app(state))
    src = make_source("f", "rss", {"url": f"{base}/feed"}, http)
    seen, cursor = [], {}
    for _ in range(4):
        poll = await src.poll(cursor, 4)
        seen += [i.external_id for i in poll.items]
        cursor = poll.cursor
    assert len(seen) == 9 and len(set(seen)) == 9


async def test_atom_feed_with_thumbnails(serve, http):
    state = {"hits": 0, "not_modified": 0, "body": lambda b: atom_feed(b, [5]), "ctype": "application/atom+xml"}
    state["base"] = base = await serve(feed_app(state))
    poll = await make_source("a", "rss", {"url": f"{base}/feed"}, http).poll({}, 10)
    assert [i.media_url for i in poll.items] == [f"{base}/img/5.jpg", f"{base}/img/502.jpg"]
    assert poll.items[0].author == "Painter 5" and poll.items[0].page_url == f"{base}/e/5"


@pytest.mark.parametrize("body", ["<html><body>Login required</body></html>", "<rss><channel><item>", "{}"])
async def test_malformed_feeds_are_reported(serve, http, body):
    state = {"hits": 0, "not_modified": 0, "body": lambda b: body}
    state["base"] = base = await serve(feed_app(state))
    with pytest.raises(BadPayload):
        await make_source("f", "rss", {"url": f"{base}/feed"}, http).poll({}, 10)


# ---- booru -------------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["danbooru", "gelbooru", "moebooru"])
async def test_booru_resumes_from_cursor_across_restarts(serve, http, tmp_path, api):
    fake = FakeBooru(10)
    base_ref = [""]
    base_ref[0] = base = await serve(fake.app(base_ref))
    options = {"api": api, "url": base, "tags": "smile", "ratings": []}
    store = Store.open(tmp_path / "t.db")
    sid = store.upsert_source("b", "booru", {"options": options})

    async def poll_once(limit):
        src = make_source("b", "booru", options, http)  # a fresh object each time: a restart
        poll = await src.poll(store.get_source("b")["cursor"], limit)
        store.save_poll(sid, poll.items, poll.cursor)
        return [int(i.external_id) for i in poll.items], poll.more

    assert (await poll_once(4))[0] == [7, 8, 9, 10]  # first poll: the newest posts
    fake.add(7)                                      # posts 11..17 appear
    assert await poll_once(4) == ([11, 12, 13, 14], True)
    assert (await poll_once(4))[0] == [15, 16, 17]
    assert (await poll_once(4))[0] == []
    stored = [int(r["external_id"]) for r in store.execute("SELECT external_id FROM images ORDER BY id")]
    assert stored == [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]


async def test_danbooru_item_fields_auth_and_rating_filter(serve, http, monkeypatch):
    fake = FakeBooru(4)
    fake.ratings = {2: "q", 3: "e", 4: "s"}
    base_ref = [""]
    base_ref[0] = base = await serve(fake.app(base_ref))
    monkeypatch.setenv("DANBOORU_LOGIN", "me")
    monkeypatch.setenv("DANBOORU_API_KEY", "key-from-env")
    src = build_source("d", "booru", {"api": "danbooru", "url": base, "tags": "smile"}, http)  # reads the env
    poll = await src.poll({}, 10)
    assert [i.external_id for i in poll.items] == ["1", "4"]  # general + sensitive kept by default
    item = poll.items[0]
    assert item.media_url == f"{base}/img/1.jpg" and item.page_url == f"{base}/posts/1"
    assert item.author == "artist_1" and item.tags == ["1girl", "solo", "smile"]
    assert item.rating == "general" and item.popularity == 3 and item.site_md5 == f"{1:032x}"
    assert poll.items[1].rating == "sensitive"
    assert fake.requests[-1]["login"] == "me" and fake.requests[-1]["api_key"] == "key-from-env"
    assert poll.cursor == {"last_id": 4}  # filtered posts still move the cursor


@pytest.mark.parametrize("api", ["danbooru", "gelbooru", "moebooru"])
async def test_booru_character_tags_per_dialect(serve, http, api):
    fake = FakeBooru(3)
    fake.characters = {1: ["hatsune_miku"], 2: ["hatsune_miku", "kagamine_rin"]}
    base_ref = [""]
    base_ref[0] = base = await serve(fake.app(base_ref))
    poll = await make_source("b", "booru", {"api": api, "url": base, "ratings": []}, http).poll({}, 10)
    got = {i.external_id: (i.characters, i.tags) for i in poll.items}
    assert {k: v[0] for k, v in got.items()} == {"1": ["hatsune_miku"], "2": ["hatsune_miku", "kagamine_rin"],
                                                 "3": []}
    assert "hatsune_miku" in got["1"][1]                  # still a tag too
    asked = fake.requests[-1]
    if api == "gelbooru":
        assert asked["fields"] == "tag_info"
    if api == "moebooru":
        assert asked["api_version"] == "2" and asked["include_tags"] == "1"


async def test_gelbooru_sends_key_and_user_id_and_handles_empty_answer(serve, http):
    fake = FakeBooru(0)
    base_ref = [""]
    base_ref[0] = base = await serve(fake.app(base_ref))
    src = make_source("g", "booru", {"api": "gelbooru", "url": base, "api_key": "k" * 10, "user_id": "42"}, http)
    assert (await src.poll({}, 10)).items == []
    assert fake.requests[-1]["api_key"] == "k" * 10 and fake.requests[-1]["user_id"] == "42"


async def test_booru_malformed_answers(serve, http):
    async def html(request):
        return web.Response(text="<html>Cloudflare</html>", content_type="text/html")
    async def wrong(request):
        return web.json_response({"success": False, "message": "You cannot search for more than 2 tags"})
    async def odd(request):
        return web.json_response([{"no": "id"}, "junk", {"id": 5, "file_url": "http://x/5.jpg", "rating": "g"}])
    app = web.Application()
    app.router.add_get("/html/posts.json", html)
    app.router.add_get("/wrong/posts.json", wrong)
    app.router.add_get("/odd/posts.json", odd)
    base = await serve(app)
    with pytest.raises(SourceError, match="malformed JSON"):
        await make_source("x", "booru", {"url": f"{base}/html"}, http).poll({}, 5)
    with pytest.raises(SourceError, match="more than 2 tags"):
        await make_source("x", "booru", {"url": f"{base}/wrong"}, http).poll({}, 5)
    poll = await make_source("x", "booru", {"url": f"{base}/odd"}, http).poll({}, 5)
    assert [i.external_id for i in poll.items] == ["5"]


def test_rating_normalisation():
    assert normalize_rating("s", s_means="sensitive") == "sensitive"
    assert normalize_rating("s") == "general"
    assert normalize_rating("explicit") == "explicit" and normalize_rating("q") == "questionable"
    assert normalize_rating(None) is None
