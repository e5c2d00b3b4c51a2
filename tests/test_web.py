"""The web gallery: server tests with aiohttp's test client, browser tests in headless Chromium."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.config import load_config
from bot.web import Gallery
from scorer.registry import ensure_active_model
from storage import AsyncStore, Store
from tests.helpers import MAIN, cli, make_config, picture, seed, write_config

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def web_config(tmp_path, web: str = "", ranking: str = "cold_exploration = 0.0\nexploration = 0.0"):
    return make_config(tmp_path, f"\n[web]\nport = 0\npage_size = 10\n{web}\n[ranking]\n{ranking}\n")


@pytest.fixture
async def gallery(tmp_path):
    """(client, cfg, sync store) for a gallery over a database the test seeds first."""
    clients = []

    async def start(cfg):
        store = AsyncStore(cfg.db_path)
        await store.open()
        client = TestClient(TestServer(Gallery(cfg, store).app(), host="127.0.0.1"))
        await client.start_server()
        clients.append((client, store))
        return client

    yield start
    for client, store in clients:
        await client.close()
        await store.close()


def same_origin(client) -> dict:
    return {"Origin": f"http://127.0.0.1:{client.port}"}


def card_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<article class="card[^"]*" data-id="(\d+)"', html)]


# ---- server --------------------------------------------------------------------------------
async def test_beyond_loopback_every_request_needs_the_token_kept_in_a_strict_cookie(tmp_path, gallery):
    cfg = web_config(tmp_path, 'host = "0.0.0.0"\ntoken = "s3cret-gallery-token"')
    [image_id] = seed(cfg, [{"popularity": 1}])
    client = await gallery(cfg)
    for path in ("/", f"/picture/{image_id}", f"/thumb/{image_id}", "/static/app.js", "/api/stats"):
        assert (await client.get(path)).status == 401, path
    assert (await client.get("/?token=wrong")).status == 401
    resp = await client.get("/rated?token=s3cret-gallery-token", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/rated"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert (await client.get("/")).status == 200          # the cookie from now on
    resp = await client.post(f"/rate/{image_id}", json={"value": 4})
    assert resp.status == 403                               # no Origin: refused even with the token
    resp = await client.post(f"/rate/{image_id}", json={"value": 4}, headers=same_origin(client))
    assert resp.status == 200 and (await resp.json())["value"] == 4
    client.session.cookie_jar.clear()
    assert (await client.post(f"/rate/{image_id}", json={"value": 1}, headers=same_origin(client))).status == 401
    store = Store.open(cfg.db_path)
    assert store.current_label(image_id) == 4


async def test_cross_site_posts_and_foreign_hosts_are_refused(tmp_path, gallery):
    cfg = web_config(tmp_path)
    [image_id] = seed(cfg, [{"popularity": 1}])
    client = await gallery(cfg)
    store = Store.open(cfg.db_path)
    refused = [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
               {"Referer": "http://evil.example/page"}, {}]
    for headers in refused:
        resp = await client.post(f"/rate/{image_id}", json={"value": 5}, headers=headers)
        assert resp.status == 403, headers
    assert (await client.get(f"/rate/{image_id}")).status == 405  # changes are POSTs only
    assert store.labels_of(image_id) == []
    assert (await client.get("/", headers={"Host": "attacker.example:8080"})).status == 421  # DNS rebinding
    resp = await client.post(f"/rate/{image_id}", data={"value": "5"}, headers=same_origin(client),
                             allow_redirects=False)
    assert resp.status == 303                               # a plain form post goes back
    [label] = store.labels_of(image_id)
    assert (label["value"], label["origin"], label["user"]) == (5, "web", "owner")
    assert [r["value"] for r in store.training_rows()] == [5]  # training uses gallery labels
    for bad in ({"value": 9}, {"value": "x"}, {}):
        assert (await client.post(f"/rate/{image_id}", json=bad, headers=same_origin(client))).status == 400
    assert (await client.post("/rate/999", json={"value": 3}, headers=same_origin(client))).status == 404


async def test_for_you_pages_through_unrated_pictures_best_first_and_marks_exploration(tmp_path, gallery):
    cfg = web_config(tmp_path)
    ids = seed(cfg, [{"popularity": p} for p in range(25)])
    client = await gallery(cfg)
    pages = []
    for n in (1, 2, 3):
        resp = await client.get(f"/?page={n}")
        assert resp.status == 200
        pages.append(card_ids(await resp.text()))
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sum(pages, []) == list(reversed(ids))            # most popular first, each once
    assert "page 1 of 3" in await (await client.get("/")).text()
    assert card_ids(await (await client.get("/?page=4")).text()) == []
    assert (await client.get("/?page=x")).status == 400
    # Rated pictures leave the page.
    await client.post(f"/rate/{ids[-1]}", json={"value": 2}, headers=same_origin(client))
    assert ids[-1] not in card_ids(await (await client.get("/")).text())
    # Exploration picks are marked.
    cfg.ranking.cold_exploration = 0.3
    html = await (await client.get("/")).text()
    assert len(re.findall(r'class="card explore"', html)) == 3 and html.count("exploration</span>") == 3


async def test_thumbnails_are_made_once_and_cached(tmp_path, gallery):
    cfg = web_config(tmp_path)
    [image_id] = seed(cfg, [{"popularity": 1}])
    client = await gallery(cfg)
    first = await client.get(f"/thumb/{image_id}")
    assert first.status == 200 and first.headers["Content-Type"] == "image/jpeg"
    [cached] = list(cfg.thumbs_path.rglob("*.jpg"))
    stamp = cached.stat().st_mtime_ns
    again = await client.get(f"/thumb/{image_id}")
    assert await again.read() == await first.read() and cached.stat().st_mtime_ns == stamp
    full = await client.get(f"/media/{image_id}")
    assert full.headers["Content-Type"] == "image/jpeg" and len(await full.read()) > 1000
    assert (await client.get("/thumb/999")).status == 404


async def test_rated_filters_by_rating_and_source_and_undo_takes_a_label_back(tmp_path, gallery):
    cfg = web_config(tmp_path)
    a = seed(cfg, [{"popularity": 1}, {"popularity": 2}], source="alpha")
    b = seed(cfg, [{"popularity": 3}], source="beta")
    client = await gallery(cfg)
    for image_id, value in [(a[0], 5), (a[1], 2), (b[0], 5), (a[1], 3)]:
        await client.post(f"/rate/{image_id}", json={"value": value}, headers=same_origin(client))
    rated = await (await client.get("/rated")).text()
    assert card_ids(rated) == [a[1], b[0], a[0]]            # newest label first, one card a picture
    assert card_ids(await (await client.get("/rated?rating=5")).text()) == [b[0], a[0]]
    assert card_ids(await (await client.get("/rated?rating=5&source=alpha")).text()) == [a[0]]
    assert (await client.get("/rated?rating=7")).status == 400
    label = int(re.search(rf'data-id="{a[1]}" data-label="(\d+)"', rated).group(1))
    resp = await client.post(f"/undo/{label}", headers=same_origin(client) | {"Accept": "application/json"})
    assert (await resp.json())["current"] == 2              # the earlier rating counts again
    store = Store.open(cfg.db_path)
    assert store.current_label(a[1]) == 2 and len(store.labels_of(a[1])) == 2


async def test_model_page_shows_metrics_and_rolls_back(tmp_path, gallery):
    cfg = web_config(tmp_path)
    store = Store.open(cfg.db_path)
    first = ensure_active_model(store, cfg.scorer, cfg.models_path)
    store.register_model("v2", first["arch"], first["path"],
                         metrics={"val": {"pearson": 0.812, "mae": 0.5, "n": 40}}, activate=True)
    (cfg.eval_path / "v2").mkdir(parents=True)
    (cfg.eval_path / "v2" / "by_rating.png").write_bytes(picture(1, fmt="PNG"))
    client = await gallery(cfg)
    html = await (await client.get("/model")).text()
    assert "Active: <strong>v2</strong>" in html and "0.81" in html and "/eval/v2/by_rating.png" in html
    assert (await client.get("/eval/v2/by_rating.png")).status == 200
    assert (await client.get("/eval/v2/..%2F..%2Ftastefeed.db")).status == 404
    resp = await client.post("/model/use", data={"version": first["version"]}, headers=same_origin(client))
    assert resp.status == 200 and store.active_model()["version"] == first["version"]
    resp = await client.post("/model/use", data={"version": "nope"}, headers=same_origin(client))
    assert "no model &#39;nope&#39;" in await resp.text()


async def test_sources_page_adds_pauses_and_removes(tmp_path, gallery):
    cfg = web_config(tmp_path)
    client = await gallery(cfg)
    store = Store.open(cfg.db_path)
    resp = await client.post("/sources/add", data={"name": "feed", "kind": "rss",
                                                   "options": "url=http://127.0.0.1:9/f.xml interval=600"},
                             headers=same_origin(client))
    assert "added source feed" in await resp.text()
    assert store.get_source("feed")["config"]["interval"] == 600
    resp = await client.post("/sources/add", data={"name": "bad", "kind": "rss", "options": ""},
                             headers=same_origin(client))
    assert "not added" in await resp.text() and store.get_source("bad") is None
    await client.post("/sources/feed/pause", headers=same_origin(client))
    assert store.get_setting("sources.paused") == ["feed"]
    assert re.search(r"<td>feed</td>.*?<td>paused</td>", await (await client.get("/sources")).text(), re.S)
    await client.post("/sources/feed/resume", headers=same_origin(client))
    assert store.get_setting("sources.paused") == []
    await client.post("/sources/feed/remove", headers=same_origin(client))
    assert store.get_source("feed") is None


async def test_ids_too_large_for_sqlite_are_404_on_every_route(tmp_path, gallery, caplog):
    cfg = web_config(tmp_path)
    [image_id] = seed(cfg, [{"popularity": 1}])
    client = await gallery(cfg)
    app = Gallery(cfg, None).app()
    routes = [(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None
              and re.search(r"\{(id|label)\b", r.resource.canonical)]
    assert len(routes) == 5, routes               # /picture, /media, /thumb, /rate, /undo
    for huge in ("99999999999999999999", str(2 ** 63), str(2 ** 64 + 1), "0" * 30 + "1"):
        for method, pattern in routes:
            path = re.sub(r"\{(id|label)[^}]*\}", huge, pattern)
            resp = await client.request(method, path, json={"value": 3}, headers=same_origin(client))
            assert resp.status == 404, (method, path, resp.status)
    for query in ("/?page=99999999999999999999", "/rated?page=99999999999999999999"):
        assert (await client.get(query)).status in (200, 400), query
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text
    assert (await client.get(f"/picture/{image_id}")).status == 200     # real ids still work


@pytest.mark.parametrize("referer, back", [
    ("/rated?rating=5", "/rated?rating=5"),
    ("/?page=2", "/?page=2"),
    ("//evil.example/x", None),
    ("/\\evil.example/x", None),
    ("/\\/evil.example/x", None),
    ("/%5Cevil.example", "/%5Cevil.example"),
    ("http://evil.example/rated", None),
    ("https://127.0.0.1:1/rated", None),
    ("javascript:alert(1)", None),
    ("", None),
])
async def test_a_rating_goes_back_only_to_a_page_of_this_gallery(tmp_path, gallery, referer, back):
    cfg = web_config(tmp_path)
    [image_id] = seed(cfg, [{"popularity": 1}])
    client = await gallery(cfg)
    origin = f"http://127.0.0.1:{client.port}"
    if referer.startswith("/"):
        referer = origin + referer
    headers = {"Origin": origin, "Referer": referer} if referer else {"Origin": origin}
    resp = await client.post(f"/rate/{image_id}", data={"value": "4"}, headers=headers, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == (back or f"/picture/{image_id}")
    [label] = Store.open(cfg.db_path).labels_of(image_id)
    resp = await client.post(f"/undo/{label['id']}", headers=headers, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == (back or "/rated")


@pytest.mark.parametrize("page_url, linked", [
    ("https://booru.example/posts/1", True), ("http://booru.example/posts/1", True),
    ("javascript:alert(document.cookie)", False), ("JavaScript:alert(1)", False),
    (" javascript:alert(1)", False), ("java\tscript:alert(1)", False),
    ("data:text/html,<script>alert(1)</script>", False), ("vbscript:msgbox", False),
    ("//evil.example/x", False), ("file:///etc/passwd", False), ("http:alert(1)", False)])
async def test_page_links_from_sources_are_links_only_for_http_and_https(tmp_path, gallery, page_url, linked):
    from bot.discord_posts import build_embed
    cfg = web_config(tmp_path)
    [image_id] = seed(cfg, [{"popularity": 1}])
    with Store.open(cfg.db_path) as store:
        with store.db.conn:
            store.db.execute("UPDATE images SET page_url = ? WHERE id = ?", [page_url, image_id])
        image = store.get_image(image_id)
    client = await gallery(cfg)
    html = await (await client.get(f"/picture/{image_id}")).text()
    assert ("original page</a>" in html) is linked
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert all(h.startswith(("/", "?", "http://", "https://")) for h in hrefs), hrefs
    embed = build_embed(image, faces=1, source="feed", exploration=False, reason="top", filename="p.jpg")
    assert (embed.url == page_url) if linked else embed.url is None
    assert any(f.name == "Original" for f in embed.fields) is linked


def test_non_loopback_without_a_token_is_a_config_error(tmp_path, monkeypatch):
    from bot.config import ConfigError
    monkeypatch.delenv("TASTEFEED_WEB_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="web.token: the gallery listens on '0.0.0.0'"):
        load_config(write_config(tmp_path, '[web]\nhost = "0.0.0.0"\n'))


# ---- in a browser: the whole loop, from `main.py run` to `main.py train` ------------------------
def _browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    return pytest.importorskip("playwright.async_api")


@pytest.mark.slow
async def test_in_a_browser_pictures_in_the_inbox_are_rated_by_click_and_key_and_train_uses_the_labels(tmp_path):
    pw = _browser()
    (tmp_path / "inbox").mkdir()
    for i in range(14):
        (tmp_path / "inbox" / f"p{i:02d}.jpg").write_bytes(picture(300 + i, size=(180, 140)))
    config = write_config(tmp_path, f'data_dir = "{tmp_path / "data"}"\n[web]\nport = 0\n'
                                    '[ranking]\ncold_exploration = 0.0\n[train]\nmin_labels = 12\nval_share = 0.3\nepochs = 2\n'
                                    '[scorer]\nimage_size = 32\n')
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DISCORD_TOKEN", None)
    proc = subprocess.Popen([sys.executable, str(MAIN), "--config", str(config), "run"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            m = re.match(r"tastefeed: gallery at (http://\S+)", line)
            url = m.group(1) if m else None
        assert url, "main.py run printed no gallery address"
        store = Store.open(tmp_path / "data" / "tastefeed.db")
        deadline = time.monotonic() + 120
        while store.status_counts().get("scored", 0) < 14 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        async with pw.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            await page.goto(url)
            cards = page.locator("article.card")
            assert await cards.count() == 14
            await page.screenshot(path=str(tmp_path / "for-you.png"))
            ids = [int(await cards.nth(i).get_attribute("data-id")) for i in range(14)]
            # A click rates the first card, the focus moves on, and keys rate the following ones.
            await cards.nth(0).locator("form.rate button[value='5']").click()
            await page.wait_for_selector(f"article.card[data-id='{ids[0]}'].rated")
            assert await cards.nth(1).evaluate("c => c.classList.contains('focused')")
            for i, key in enumerate("1234512345123", start=1):
                await page.keyboard.press(key)
                await page.wait_for_selector(f"article.card[data-id='{ids[i]}'].rated")
            await page.keyboard.press("ArrowLeft")
            await page.keyboard.press("ArrowLeft")
            assert await cards.nth(11).evaluate("c => c.classList.contains('focused')")
            labels = {r["image_id"]: (r["value"], r["origin"]) for r in store.execute("SELECT * FROM labels")}
            assert labels == {ids[0]: (5, "web"), **{ids[i]: (int(k), "web") for i, k in
                                                     enumerate("1234512345123", start=1)}}
            for name, path in [("picture", f"picture/{ids[0]}"), ("rated", "rated"), ("model", "model"),
                               ("sources", "sources")]:
                await page.goto(url + path)
                await page.screenshot(path=str(tmp_path / f"{name}.png"))
            # The picture page draws a box for each detected face, where the face is.
            [two_faces] = seed(load_config(config), [{"popularity": 1, "faces": 2}])
            await page.goto(url + f"picture/{two_faces}")
            boxes = page.locator("svg.faces rect.face")
            assert await boxes.count() == 2
            img = await page.locator("#full").bounding_box()
            box = await boxes.nth(1).bounding_box()
            scale = img["width"] / 200
            assert abs(box["x"] - img["x"] - 110 * scale) < 5 and abs(box["width"] - 70 * scale) < 5  # +stroke
            await page.screenshot(path=str(tmp_path / "picture-faces.png"))
            await page.goto(url + f"picture/{ids[0]}")  # synthetic shapes: no face, scored whole, no box
            assert await page.locator("svg.faces rect.face").count() == 0
            await browser.close()
        assert all((tmp_path / f"{n}.png").stat().st_size > 5000
                   for n in ("for-you", "picture", "rated", "model", "sources"))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    # `main.py train` learns from the labels given in the browser.
    out = await asyncio.to_thread(cli, tmp_path, "--config", config, "train", "--no-promote")
    assert out.returncode == 0, out.stdout + out.stderr
    [model] = [m for m in Store.open(tmp_path / "data" / "tastefeed.db").list_models() if m["metrics"]]
    assert model["data_size"] == 14 and json.loads(model["metrics"])["val"]["n"] > 0
    shutil.rmtree(tmp_path / "data" / "cache", ignore_errors=True)
