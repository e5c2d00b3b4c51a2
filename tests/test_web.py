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

import numpy as np
import pytest

from bot.config import load_config
from bot.web import Gallery
from scorer.registry import ensure_active_model
from storage import Store
from tests.helpers import MAIN, cli, make_config, picture, seed, write_config


def web_config(tmp_path, web: str = "", ranking: str = "cold_exploration = 0.0\nexploration = 0.0", more: str = ""):
    return make_config(tmp_path, f"\n[web]\nport = 0\npage_size = 10\n{web}\n[ranking]\n{ranking}\n{more}")


IDENTITY = "[characters]\nimage_size = 32\nembedding_dim = 16\n"   # a small, quick identity embedder


def same_origin(client) -> dict:
    return {"Origin": f"http://127.0.0.1:{client.port}"}


def card_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<article class="card[^"]*" data-id="(\d+)"', html)]


def explore_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<article class="card explore" data-id="(\d+)"', html)]


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


async def test_every_template_is_compiled_as_the_gallery_starts(tmp_path, gallery, monkeypatch):
    """The first view of each page after a start does not compile its template (15-40 ms)."""
    from bot.web import templates
    templates.cache_clear()                       # as in a fresh process
    cfg = web_config(tmp_path)
    [image_id] = seed(cfg, [{"popularity": 1}])
    client = await gallery(cfg)

    def unread(*args):
        raise AssertionError("a template was read after the start")
    monkeypatch.setattr(templates().loader, "get_source", unread)
    for path in ("/", f"/picture/{image_id}", "/rated", "/compare", "/boxes", "/model", "/sources", "/nowhere"):
        assert (await client.get(path)).status in (200, 404), path


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
    assert len(re.findall(r'class="card explore"', html)) == 3 and html.count(">explore</span>") == 3
    assert card_ids(html)[0] not in explore_ids(html)      # the best stays on top


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
    assert len(routes) == 10, routes  # /picture(/refetch), /media, /thumb, /face, /rate, /undo, /faces/…/(un)name, /compare/undo
    for huge in ("99999999999999999999", str(2 ** 63), str(2 ** 64 + 1), "0" * 30 + "1"):
        for method, pattern in routes:
            path = re.sub(r"\{(id|label)[^}]*\}", huge, pattern)
            resp = await client.request(method, path, json={"value": 3}, headers=same_origin(client))
            assert resp.status == 404, (method, path, resp.status)
    for query in ("/?page=99999999999999999999", "/rated?page=99999999999999999999"):
        assert (await client.get(query)).status in (200, 400), query
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text
    assert (await client.get(f"/picture/{image_id}")).status == 200     # real ids still work


# ---- characters ---------------------------------------------------------------------------------
async def test_naming_a_face_stores_it_from_the_gallery_and_recognition_uses_it_at_once(tmp_path, gallery):
    from scorer.analyze import face_crop
    from scorer.characters import build_recognizer, load_embedder
    from storage.media import load_media
    from storage.records import Face
    cfg = web_config(tmp_path, more=IDENTITY)
    [image_id] = seed(cfg, [{"popularity": 1, "faces": 2}])
    store = Store.open(cfg.db_path)
    f1, f2 = (f["id"] for f in store.faces_of(image_id))
    client = await gallery(cfg)
    html = await (await client.get(f"/picture/{image_id}")).text()
    assert f'action="/faces/{f1}/name"' in html and f'href="#face-{f2}"' in html
    assert html.count("not recognised yet") == 2

    resp = await client.post(f"/faces/{f1}/name", json={"name": "  Hatsune Miku "}, headers=same_origin(client))
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    row = store.active_identity_model()             # the first naming creates the untrained embedder
    assert answer["character"] == "Hatsune Miku" and answer["embedded_by"] == row["version"]
    named = store.face_name(f1)
    assert (named["name"], named["origin"], named["weak"]) == ("Hatsune Miku", "gallery", 0)
    [vector] = store.embeddings(row["version"], [f1]).values()
    assert vector.shape == (16,) and abs(float(np.linalg.norm(vector)) - 1) < 0.01
    # recognition counts the named face as an example at once: that face, embedded afresh, is her
    recognizer = build_recognizer(store, row, cfg.characters)
    assert len(recognizer) == 1
    crop = face_crop(load_media(cfg.media_path, store.face_with_media(f1)["media_path"]),
                     Face.from_row(store.face_with_media(f1)), cfg.detector.margin)
    [(cid, sim)] = recognizer.identify(load_embedder(row, cfg.characters, cfg.models_path).embed([crop]))
    assert cid == store.character_id("Hatsune Miku") and sim > 0.99

    html = await (await client.get(f"/picture/{image_id}")).text()
    assert re.search(r'<span class="who">Hatsune Miku</span></a>', html)               # its label on the picture
    assert re.search(r'<span class="who named">Hatsune Miku</span> <span class="hint">named \(gallery\)', html)
    assert 'class="chip" href="/?character=Hatsune+Miku"' in html
    assert '<option value="Hatsune Miku">' in html                                    # the datalist

    # a plain form (no script) names the other face and goes back to the picture
    resp = await client.post(f"/faces/{f2}/name", data={"name": "Rin 🍊"}, headers=same_origin(client),
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == f"/picture/{image_id}"
    assert store.face_name(f2)["name"] == "Rin 🍊" and store.embeddings(row["version"], [f2])
    # renaming replaces; clearing a name takes it back ("not this one")
    await client.post(f"/faces/{f1}/name", json={"name": "Rin 🍊"}, headers=same_origin(client))
    assert {r["name"]: r["examples"] for r in store.list_characters()} == {"Hatsune Miku": 0, "Rin 🍊": 2}
    resp = await client.post(f"/faces/{f1}/unname", headers=same_origin(client) | {"Accept": "application/json"})
    assert resp.status == 200 and store.face_name(f1) is None and store.face_name(f2) is not None
    assert (await client.post(f"/faces/{f1}/unname", headers=same_origin(client))).status == 404


async def test_bad_names_foreign_faces_and_cross_site_posts_name_nothing(tmp_path, gallery):
    cfg = web_config(tmp_path, more=IDENTITY)
    [image_id] = seed(cfg, [{"popularity": 1}])
    store = Store.open(cfg.db_path)
    [face] = store.faces_of(image_id)
    client = await gallery(cfg)
    for bad, message in [("", "a character name cannot be empty"), ("   ", "cannot be empty"),
                         ("Miku/Rin", "character name 'Miku/Rin': no slashes allowed"),
                         ("a\\b", "no slashes allowed"), ("a\nb", "no control characters allowed"),
                         ("x" * 101, "too long (101 characters, at most 100)"), (5, "expected the character's name"),
                         (None, "expected the character's name")]:
        resp = await client.post(f"/faces/{face['id']}/name", json={"name": bad}, headers=same_origin(client))
        text = await resp.text()
        assert resp.status == 400 and message in text and text.count("\n") == 1, (bad, text)
    resp = await client.post(f"/faces/{face['id']}/name", data={"name": "a/b"}, headers=same_origin(client))
    assert resp.status == 400 and "no slashes allowed" in await resp.text()
    assert (await client.post("/faces/999999/name", json={"name": "Miku"}, headers=same_origin(client))).status == 404
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {}):
        resp = await client.post(f"/faces/{face['id']}/name", data={"name": "Miku"}, headers=headers)
        assert resp.status == 403, headers
    assert (await client.get(f"/faces/{face['id']}/name")).status == 405
    store.name_face(face["id"], store.character_id("Miku", create=True), origin="import")
    assert (await client.post(f"/faces/{face['id']}/unname", headers={"Origin": "http://evil.example"})).status == 403
    assert store.face_name(face["id"])["origin"] == "import"
    assert [r["name"] for r in store.list_characters()] == ["Miku"]
    assert store.list_identity_models() == []          # nothing was embedded either
    with store.db.conn:                                # a picture in which no face was found
        store.db.execute("UPDATE faces SET detector = 'whole' WHERE id = ?", [face["id"]])
    resp = await client.post(f"/faces/{face['id']}/name", json={"name": "Rin"}, headers=same_origin(client))
    assert resp.status == 400 and "the whole picture cannot be named" in await resp.text()
    assert "name-face" not in await (await client.get(f"/picture/{image_id}")).text()


async def test_for_you_and_rated_filter_by_character_with_paging_and_cards_show_chips(tmp_path, gallery):
    cfg = web_config(tmp_path)
    ids = seed(cfg, [{"popularity": p} for p in range(25)])
    store = Store.open(cfg.db_path)
    face = {i: store.faces_of(i)[0]["id"] for i in ids}
    miku_ids = ids[::2]                                # 13 named
    miku = store.character_id("Miku", create=True)
    for i in miku_ids:
        store.name_face(face[i], miku, origin="import")
    # recognised by the active identity embedder (not named): Rin; one face recognised as unknown
    rin = store.character_id("Rin", create=True)
    store.register_identity_model("e1", "resnet18", "e1.pt", activate=True)
    store.save_identities("e1", {face[ids[1]]: (rin, 0.8), face[ids[3]]: (rin, 0.7), face[ids[5]]: (None, 0.2)})
    store.save_identities("e0", {face[ids[7]]: (rin, 0.9)})          # not the active embedder: ignored
    client = await gallery(cfg)

    pages = [card_ids(await (await client.get(f"/?character=Miku&page={n}")).text()) for n in (1, 2, 3)]
    assert pages == [list(reversed(miku_ids))[:10], list(reversed(miku_ids))[10:], []]  # most popular first
    html = await (await client.get("/?character=Miku")).text()
    assert "13 unrated picture(s) of Miku" in html and "page 1 of 2" in html
    more = re.search(r'href="\?page=2&amp;character=Miku&amp;after=([\w-]+)">more', html)  # paging keeps the filter
    assert more and card_ids(await (await client.get(f"/?page=2&character=Miku&after={more[1]}")).text()) == pages[1]
    assert 'name="character" list="character-names" value="Miku"' in html
    assert card_ids(await (await client.get("/?character=Rin")).text()) == [ids[3], ids[1]]
    assert card_ids(await (await client.get("/?character=Nobody")).text()) == []
    everything = await (await client.get("/")).text()
    assert len(card_ids(everything)) == 10 and "page 1 of 3" in everything
    chips = dict(re.findall(r'data-id="(\d+)".*?(?:<p class="chips">(.*?)</p>|</article>)', everything, re.S))
    assert 'class="chip" href="?character=Miku"' in chips[str(ids[24])]
    assert not chips[str(ids[23])]
    assert 'class="chip" href="?character=Rin"' in await (await client.get("/?character=Rin")).text()

    for n, i in enumerate(ids[:15]):                                       # 8 of them Miku
        await client.post(f"/rate/{i}", json={"value": 5 if n % 3 else 2}, headers=same_origin(client))
    rated_miku = [i for i in reversed(ids[:15]) if i in miku_ids]
    assert card_ids(await (await client.get("/rated?character=Miku")).text()) == rated_miku
    assert card_ids(await (await client.get("/rated?character=Miku&rating=2")).text()) == \
        [i for n, i in reversed(list(enumerate(ids[:15]))) if i in miku_ids and not n % 3]
    assert card_ids(await (await client.get("/rated?character=Rin&source=booru-test")).text()) == [ids[3], ids[1]]
    assert card_ids(await (await client.get("/rated?character=Rin&source=other")).text()) == []
    rated = await (await client.get("/rated?rating=5")).text()
    assert 'class="chip" href="?character=Miku&amp;rating=5"' in rated
    assert "5 unrated picture(s) of Miku" in await (await client.get("/?character=Miku")).text()
    # paging of Rated with the filter: 13 Miku pictures rated, 10 a page
    for i in miku_ids:
        await client.post(f"/rate/{i}", json={"value": 4}, headers=same_origin(client))
    first, second = [await (await client.get(f"/rated?character=Miku&page={n}")).text() for n in (1, 2)]
    assert len(card_ids(first)) == 10 and len(card_ids(second)) == 3
    assert set(card_ids(first) + card_ids(second)) == set(miku_ids)
    more = re.search(r'href="\?page=2&amp;character=Miku&amp;after=([\w-]+)">more', first)   # keyset: after the last card
    assert more and card_ids(await (await client.get(f"/rated?page=2&character=Miku&after={more[1]}")).text()) == \
        card_ids(second)


async def test_rated_more_goes_on_after_the_last_card_while_pictures_are_rated(tmp_path, gallery):
    cfg = web_config(tmp_path)
    ids = seed(cfg, [{"popularity": p} for p in range(25)])
    client = await gallery(cfg)
    for i in ids[:20]:
        await client.post(f"/rate/{i}", json={"value": 3}, headers=same_origin(client))
    first = await (await client.get("/rated")).text()
    assert card_ids(first) == list(reversed(ids[10:20]))
    more = re.search(r'href="\?page=2&amp;after=([\w-]+)">more', first)
    for i in ids[20:23]:                                  # rated meanwhile: they go on top
        await client.post(f"/rate/{i}", json={"value": 4}, headers=same_origin(client))
    assert card_ids(await (await client.get(f"/rated?page=2&after={more[1]}")).text()) == list(reversed(ids[:10]))
    by_number = card_ids(await (await client.get("/rated?page=2")).text())      # (by number: shifted by 3)
    assert by_number == list(reversed(ids[3:13]))
    for bad in ("x", "W10", "WyJhIiwxLjVd", "WyJhIiwxXQ" * 3):                  # malformed: read by its number
        assert card_ids(await (await client.get(f"/rated?page=2&after={bad}")).text()) == by_number, bad


async def test_model_page_shows_the_identity_embedder_and_rolls_it_back(tmp_path, gallery):
    from scorer.characters import ensure_active_embedder
    from scorer.identity import build_embedder, save_embedder
    cfg = web_config(tmp_path, more=IDENTITY)
    ids = seed(cfg, [{"popularity": 1}, {"popularity": 2}])
    store = Store.open(cfg.db_path)
    first = ensure_active_embedder(store, cfg.characters, cfg.models_path)
    faces = [store.faces_of(i)[0]["id"] for i in ids]
    for f, name in zip(faces, ("Miku", "Rin")):
        store.name_face(f, store.character_id(name, create=True), origin="import")
    save_embedder(build_embedder("resnet18", embedding_dim=16), cfg.models_path / "identity-v2.pt", arch="resnet18",
                  image_size=32, version="identity-v2")
    metrics = {"val_top1": 0.9312, "val": {"top1": 0.9312, "threshold": 0.52, "n": 40},
               "open_set": {"precision": 0.87, "recall": 0.51, "f1": 0.643},
               "per_character": {"Miku": 1.0, "Rin": 0.5}, "history": [{"epoch": 1}], "characters": 2}
    store.register_identity_model("identity-v2", "resnet18", "identity-v2.pt", data_size=2, metrics=metrics,
                                  threshold=0.52, activate=True)
    client = await gallery(cfg)
    html = await (await client.get("/model")).text()
    section = html[html.index('<h2 id="identity">'):]
    assert '<strong class="identity-active">identity-v2</strong>' in section
    assert "2 character(s), 2 named face(s)" in section
    for key, value in [("val_top1", "0.931"), ("val.threshold", "0.520"), ("open_set.f1", "0.643"),
                       ("open_set.precision", "0.870"), ("per_character.Rin", "0.500"), ("characters", "2")]:
        assert f"<tr><th>{key}</th><td>{value}</td></tr>" in section, key
    assert "<th>history" not in section and "epoch" not in section
    assert section.count("Use this one") == 1 and f'value="{first["version"]}"' in section

    resp = await client.post("/model/identity/use", data={"version": first["version"]}, headers=same_origin(client))
    assert resp.status == 200 and f"identity embedder now {first['version']}" in await resp.text()
    assert store.active_identity_model()["version"] == first["version"]
    assert set(store.embeddings(first["version"], faces)) == set(faces)   # the named faces, embedded by it
    resp = await client.post("/model/identity/use", data={"version": "nope"}, headers=same_origin(client))
    assert "no identity embedder &#39;nope&#39;" in await resp.text()
    assert store.active_identity_model()["version"] == first["version"]
    (cfg.models_path / "identity-v2.pt").write_bytes(b"not a model")
    resp = await client.post("/model/identity/use", data={"version": "identity-v2"}, headers=same_origin(client))
    assert "cannot load identity model file" in await resp.text()
    assert store.active_identity_model()["version"] == first["version"]
    resp = await client.post("/model/identity/use", data={"version": "identity-v2"},
                             headers={"Origin": "http://evil.example"})
    assert resp.status == 403


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
    assert all(h.startswith(("/", "?", "#", "http://", "https://")) for h in hrefs), hrefs
    embed = build_embed(image, faces=1, source="feed", exploration=False, reason="top", filename="p.jpg")
    assert (embed.url == page_url) if linked else embed.url is None
    assert any(f.name == "Original" for f in embed.fields) is linked


def test_non_loopback_without_a_token_is_a_config_error(tmp_path, monkeypatch):
    from bot.config import ConfigError
    monkeypatch.delenv("TASTEFEED_WEB_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="web.token: the gallery listens on '0.0.0.0'"):
        load_config(write_config(tmp_path, '[web]\nhost = "0.0.0.0"\n'))


# ---- in a browser: the whole loop, from `main.py run` to `main.py train` ------------------------
@pytest.mark.slow
async def test_in_a_browser_pictures_in_the_inbox_are_rated_by_click_and_key_and_train_uses_the_labels(
        tmp_path, browser):
    (tmp_path / "inbox").mkdir()
    for i in range(14):
        (tmp_path / "inbox" / f"p{i:02d}.jpg").write_bytes(picture(300 + i, size=(180, 140)))
    config = write_config(tmp_path, f'data_dir = "{tmp_path / "data"}"\n[web]\nport = 0\n'
                                    '[ranking]\ncold_exploration = 0.0\n[train]\nmin_labels = 12\nval_share = 0.3\nepochs = 2\n'
                                    'refit = false\n'   # only `train` below makes a model (a refit races it)
                                    '[scorer]\nimage_size = 32\nbackbone_size = 64\n')
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
        boxes = page.locator(".faces a.face")
        assert await boxes.count() == 2
        img = await page.locator("#full").bounding_box()
        box = await boxes.nth(1).bounding_box()
        scale = img["width"] / 200
        assert abs(box["x"] - img["x"] - 110 * scale) < 5 and abs(box["width"] - 70 * scale) < 5  # +stroke
        await page.screenshot(path=str(tmp_path / "picture-faces.png"))
        await page.goto(url + f"picture/{ids[0]}")  # synthetic shapes: no face, scored whole, no box
        assert await page.locator(".faces a.face").count() == 0
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


@pytest.mark.slow
async def test_in_a_browser_a_face_is_named_by_clicking_its_box_and_typing(tmp_path, browser, live_gallery):
    cfg = web_config(tmp_path, more=IDENTITY)
    [image_id] = seed(cfg, [{"popularity": 1, "faces": 2}])
    store = Store.open(cfg.db_path)
    f1, f2 = (f["id"] for f in store.faces_of(image_id))
    store.character_id("Hatsune Miku", create=True)           # known already: offered in the datalist
    url = await live_gallery(cfg)
    page = await browser.new_page(viewport={"width": 1200, "height": 800})
    await page.goto(url + f"picture/{image_id}")
    assert await page.locator("#character-names option").count() == 1
    # From the keyboard: a box takes the focus, Enter opens its form, Escape closes it.
    await page.locator(".faces a.face").nth(0).focus()
    await page.keyboard.press("Enter")
    assert await page.evaluate("document.activeElement.getAttribute('aria-label')") == "character of face 1"
    await page.keyboard.press("Escape")
    assert not await page.locator(f"#face-{f1} form.name-face").is_visible()
    # A click on the second face's box opens its form with the focus in the name field.
    await page.locator(".faces a.face").nth(1).click()
    form = page.locator(f"#face-{f2} form.name-face")
    assert await form.is_visible()
    assert await page.evaluate("document.activeElement.getAttribute('aria-label')") == "character of face 2"
    await page.keyboard.type("Miku/Rin")                 # a bad name: the message, no reload
    await page.keyboard.press("Enter")
    await page.wait_for_selector(f"#face-{f2} .name-state:has-text('no slashes allowed')")
    await page.fill(f"#face-{f2} input[name=name]", "Kagamine Rin")
    await page.screenshot(path=str(tmp_path / "picture-naming.png"))
    await page.keyboard.press("Enter")
    await page.wait_for_selector(".faces .face-label .who:has-text('Kagamine Rin')")
    named = store.face_name(f2)
    assert (named["name"], named["origin"]) == ("Kagamine Rin", "gallery")
    assert store.embeddings(store.active_identity_model()["version"], [f2])
    assert "named (gallery)" in await page.locator(f"#face-{f2}").inner_text()
    # The list entry opens the first face's form too; a known name is picked by typing it.
    await page.locator(f"#face-{f1}").click()
    await page.keyboard.type("Hatsune Miku")
    await page.keyboard.press("Enter")
    await page.wait_for_selector(f"#face-{f1} .who.named:has-text('Hatsune Miku')")
    assert store.face_name(f1)["origin"] == "gallery"
    assert await page.locator("p.chips a.chip").all_inner_texts() == ["Hatsune Miku", "Kagamine Rin"]
    await page.screenshot(path=str(tmp_path / "picture-named.png"))
    # "Not this one": the name is taken back.
    await page.locator(f"#face-{f1} summary").click()
    await page.locator(f"#face-{f1} form.unname-face button").click()
    await page.wait_for_selector(f"#face-{f1} .who.none")
    assert store.face_name(f1) is None
    # For you filtered by a character (typed or picked in the filter field): its cards, with chips.
    await page.goto(url)
    await page.fill("form.filters input[name=character]", "Kagamine Rin")
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/?character=Kagamine+Rin")
    assert await page.locator("article.card a.chip").all_inner_texts() == ["Kagamine Rin"]
    await page.screenshot(path=str(tmp_path / "for-you-character.png"))
    await page.goto(url + "model")
    await page.screenshot(path=str(tmp_path / "model.png"), full_page=True)
    assert (tmp_path / "picture-naming.png").stat().st_size > 5000
