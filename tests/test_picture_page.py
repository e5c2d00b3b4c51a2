"""The gallery's Picture page: face crops, the face list, labels over the picture, previous/next."""
from __future__ import annotations

import io
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bot.web_nav import neighbours
from storage import Store
from storage.media import inspect, load_media, store_media
from storage.prune import prune, thumbnails_of
from storage.records import Face
from tests.helpers import make_config, picture, seed
from tests.test_web import card_ids, same_origin

SHOTS = Path("/tmp/shots-U3")


def config(tmp_path, more: str = ""):
    return make_config(tmp_path, "\n[web]\nport = 0\npage_size = 10\n[ranking]\ncold_exploration = 0.0\n"
                                 f"exploration = 0.0\n{more}")


def with_faces(cfg, size: tuple[int, int], boxes: list[tuple[int, int, int, int]], seed_no: int = 7) -> int:
    """A stored picture of ``size`` with a face at each box (scores 4.0, 3.9, ...), as the daemon stores it."""
    from scorer.registry import ensure_active_model
    with Store.open(cfg.db_path) as store:
        model = ensure_active_model(store, cfg.scorer, cfg.models_path)
        sid = store.upsert_source("many", "booru", {"enabled": False, "interval": 60, "options": {}}, origin="cli")
        data = faces_picture(size, boxes, seed_no)
        info, _ = inspect(data)
        [image_id] = store.save_poll(sid, [{"external_id": f"many{seed_no}", "title": "many faces",
                                            "popularity": 1}], {})
        store.record_download(image_id, info, store_media(cfg.media_path, data, info), near_distance=-1)
        faces = [Face(*box, 0.9, "animeface", 4.0 - k / 10, 0.05 + k / 100) for k, box in enumerate(boxes)]
        store.record_analysis(image_id, faces, 4.0, 0.05, model["version"])
    return image_id


def faces_picture(size: tuple[int, int], boxes: list[tuple[int, int, int, int]], seed_no: int) -> bytes:
    """A synthetic picture with a distinct coloured "face" (an ellipse with eyes) in each box."""
    im = Image.open(io.BytesIO(picture(seed_no, size=size)))
    draw = ImageDraw.Draw(im)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        hue = (k * 67) % 360
        draw.ellipse([x1 + 2, y1 + 2, x2 - 2, y2 - 2], fill=f"hsl({hue}, 70%, 60%)", outline="black", width=2)
        w, h = x2 - x1, y2 - y1
        for ex in (x1 + w * 0.33, x1 + w * 0.67):
            draw.ellipse([ex - w * 0.07, y1 + h * 0.35, ex + w * 0.07, y1 + h * 0.5], fill="black")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def label_rects(page) -> tuple[dict, list[dict]]:
    """The picture's rectangle and each face label's, read at one moment (the page may scroll)."""
    return page.evaluate("""() => {
      const r = (el) => { const b = el.getBoundingClientRect(); return {x: b.x, y: b.y, width: b.width, height: b.height}; };
      return [r(document.getElementById('full')), [...document.querySelectorAll('.faces a.face-label')].map(r)];
    }""")


def jpeg_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# ---- face crops ------------------------------------------------------------------------------
async def test_a_face_crop_is_the_box_with_the_margin_bounded_cached_and_404_for_a_bad_id(tmp_path, gallery):
    cfg = config(tmp_path)
    [image_id] = seed(cfg, [{"popularity": 1, "faces": 2}])            # 200x160, boxes (20,20)-(90,100), (110,20)-(180,100)
    store = Store.open(cfg.db_path)
    f1, f2 = (f["id"] for f in store.faces_of(image_id))
    client = await gallery(cfg)
    resp = await client.get(f"/face/{f1}")
    assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
    first = await resp.read()
    # margin 0.2 of the 80 px side: a 112 px square around the box's centre (55, 60), clipped at the left
    assert jpeg_size(first) == (111, 112)
    expected = load_media(cfg.media_path, store.get_image(image_id)["media_path"]).crop((0, 4, 111, 116))
    got = np.asarray(Image.open(io.BytesIO(first)).convert("RGB"), dtype=float)
    assert np.abs(got - np.asarray(expected, dtype=float)).mean() < 8  # the same pixels (JPEG aside)
    [cached] = [p for p in cfg.thumbs_path.rglob("*.jpg")]
    stamp = cached.stat().st_mtime_ns
    assert await (await client.get(f"/face/{f1}")).read() == first and cached.stat().st_mtime_ns == stamp
    cfg.detector.margin = 0.5                                          # another margin, another crop
    assert jpeg_size(await (await client.get(f"/face/{f1}")).read()) == (135, 140)
    # a face as big as the picture: the crop is clipped to it and scaled down to 160 px at most
    with store.db.conn:
        store.db.execute("UPDATE faces SET x1 = 0, y1 = 0, x2 = 200, y2 = 160 WHERE id = ?", [f2])
    assert jpeg_size(await (await client.get(f"/face/{f2}")).read()) == (160, 128)
    with store.db.conn:                                                # no face found: the whole picture
        store.db.execute("UPDATE faces SET detector = 'whole', x1 = 0, y1 = 0, x2 = 200, y2 = 160 WHERE id = ?", [f1])
    assert jpeg_size(await (await client.get(f"/face/{f1}")).read()) == (160, 128)
    for bad in ("/face/999999", "/face/abc", "/face/" + "9" * 30):
        assert (await client.get(bad)).status == 404, bad
    # the crops are thumbnails of the picture: pruning its media takes them too
    assert len(thumbnails_of(cfg.thumbs_path, store.get_image(image_id)["media_path"])) == 4


async def test_a_pruned_pictures_face_crop_is_the_placeholder(tmp_path, gallery):
    cfg = config(tmp_path, "[storage]\nmax_media_gb = 0.000001\nkeep_days = 0\n")
    [image_id] = seed(cfg, [{"popularity": 1}])
    store = Store.open(cfg.db_path)
    [face] = store.faces_of(image_id)
    client = await gallery(cfg)
    assert (await client.get(f"/face/{face['id']}")).status == 200     # cached before the pruning
    old = (datetime.now(timezone.utc) - timedelta(days=30)).isoformat(timespec="milliseconds")
    with store.db.conn:
        store.db.execute("UPDATE images SET created_at = ?", [old])
    report = prune(store, cfg.paths, cfg.storage)
    assert report.pictures == 1 and report.thumbs == 1                 # the crop went with the media
    resp = await client.get(f"/face/{face['id']}")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("image/svg+xml")
    assert "media pruned" in await resp.text()
    html = await (await client.get(f"/picture/{image_id}")).text()
    assert f'src="/face/{face["id"]}"' in html and "Media pruned" in html


# ---- the face list -----------------------------------------------------------------------------
async def test_the_face_list_shows_crops_scores_and_characters_numbered_best_first(tmp_path, gallery):
    cfg = config(tmp_path)
    image_id = with_faces(cfg, (400, 300), [(10, 10, 60, 60), (100, 10, 150, 60), (200, 10, 250, 60),
                                            (300, 10, 350, 60)])
    store = Store.open(cfg.db_path)
    f1, f2, f3, f4 = (f["id"] for f in store.faces_of(image_id))
    with store.db.conn:                                                # face 3 scores best: it is number 1
        store.db.execute("UPDATE predictions SET score = 4.5, uncertainty = 0.21 WHERE face_id = ?", [f3])
    store.name_face(f1, store.character_id("Hatsune Miku", create=True), origin="import")
    rin = store.character_id("Kagamine Rin", create=True)
    store.register_identity_model("e1", "resnet18", "e1.pt", activate=True)
    store.save_identities("e1", {f2: (rin, 0.81), f3: (None, 0.2)})
    client = await gallery(cfg)
    html = await (await client.get(f"/picture/{image_id}")).text()
    facelist = html[html.index('<ol class="facelist">'):html.index("</ol>")]
    assert [int(i) for i in re.findall(r'<li id="face-(\d+)"', facelist)] == [f3, f1, f2, f4]
    entries = re.split(r'<li id="face-\d+"', facelist)[1:]
    for n, (entry, face, score, spread, who) in enumerate(zip(entries, (f3, f1, f2, f4), ("4.50", "4.00", "3.90", "3.70"),
                                                              ("0.21", "0.05", "0.06", "0.08"),
                                                              ('<span class="who unknown">unknown</span>',
                                                               '<span class="who named">Hatsune Miku</span> <span class="hint">named (import)',
                                                               '<span class="who recognised">Kagamine Rin</span> <span class="hint">recognised, similarity 0.81',
                                                               "not recognised yet")), start=1):
        assert f'<img class="face-crop" src="/face/{face}"' in entry
        assert f'<span class="face-no">{n}</span>' in entry
        assert re.search(rf"score\s+<strong>{score}</strong> <span class=\"hint\">± {spread}</span>", entry), entry
        assert who in entry, (n, entry)
    assert not re.search(r"\(\d+, \d+\)–\(\d+, \d+\)", html)         # no raw coordinates
    # the labels on the picture carry the same numbers, and the character
    labels = re.findall(r'<a class="face-label[^"]*" href="#face-(\d+)"[^>]*>\s*<b>(\d+)</b>(?:<span class="who[^"]*">([^<]*))?',
                        html)
    assert labels == [(str(f3), "1", "unknown"), (str(f1), "2", "Hatsune Miku"), (str(f2), "3", "Kagamine Rin"),
                      (str(f4), "4", "")]
    boxes = re.findall(r'<a class="face[^-"]*" href="#face-(\d+)"[^>]*\s+style="left:([\d.]+)%;top:([\d.]+)%;'
                       r'width:([\d.]+)%;height:([\d.]+)%"', html)
    assert boxes[0] == (str(f3), "50.000", "3.333", "12.500", "16.667")   # (200,10)-(250,60) of 400x300


# ---- previous / next -----------------------------------------------------------------------------
def steps(html: str) -> tuple[str | None, str | None]:
    prev = re.search(r'<a rel="prev" href="([^"]*)"', html)
    nxt = re.search(r'<a rel="next" href="([^"]*)"', html)
    return (prev.group(1).replace("&amp;", "&") if prev else None, nxt.group(1).replace("&amp;", "&") if nxt else None)


def test_neighbours_are_found_around_the_position_and_fill_a_place_left_empty():
    pages = [[1, 2, 3], [4, 5, 6], [7]]
    ids = lambda n: pages[n] if n < len(pages) else []  # noqa: E731
    assert [(s.id, s.at) if s else None for s in neighbours(4, 3, 3, ids)] == [(3, 2), (5, 4)]
    assert [(s.id, s.at) if s else None for s in neighbours(1, 0, 3, ids)] == [None, (2, 1)]
    assert [(s.id, s.at) if s else None for s in neighbours(7, 6, 3, ids)] == [(6, 5), None]
    assert [(s.id, s.at) if s else None for s in neighbours(5, 6, 3, ids)] == [(4, 3), (6, 5)]  # moved: found anyway
    # gone from the list (rated): the one now at its position comes next
    assert [(s.id, s.at) if s else None for s in neighbours(99, 4, 3, ids)] == [(4, 3), (5, 4)]


async def test_previous_and_next_follow_the_list_the_picture_was_opened_from(tmp_path, gallery):
    cfg = config(tmp_path)
    ids = seed(cfg, [{"popularity": p} for p in range(25)])
    order = list(reversed(ids))                                        # For you: most popular first
    client = await gallery(cfg)
    # opened from nowhere: by id
    assert steps(await (await client.get(f"/picture/{ids[5]}")).text()) == (f"/picture/{ids[4]}", f"/picture/{ids[6]}")
    assert steps(await (await client.get(f"/picture/{ids[0]}")).text()) == (None, f"/picture/{ids[1]}")
    assert steps(await (await client.get(f"/picture/{ids[5]}?from=evil&at=x")).text())[1] == f"/picture/{ids[6]}"
    # For you: the cards link with their position; the last card of a page leads to the next page
    page2 = await (await client.get("/?page=2")).text()
    link = re.search(rf'href="(/picture/{order[10]}[^"]*)"', page2).group(1).replace("&amp;", "&")
    assert link == f"/picture/{order[10]}?from=for-you&at=10"
    html = await (await client.get(link)).text()
    assert steps(html) == (f"/picture/{order[9]}?from=for-you&at=9", f"/picture/{order[11]}?from=for-you&at=11")
    assert '<a class="back" href="/?page=2">For you</a>' in html
    # rated there, it leaves For you: its page now leads on to the picture that took its place
    await client.post(f"/rate/{order[10]}", json={"value": 3}, headers=same_origin(client))
    assert steps(await (await client.get(link)).text()) == (f"/picture/{order[9]}?from=for-you&at=9",
                                                            f"/picture/{order[11]}?from=for-you&at=10")
    # Rated, filtered: the neighbours are those of the filtered list, the filter kept in the links
    for i, value in [(ids[0], 5), (ids[1], 2), (ids[2], 5), (ids[3], 5)]:
        await client.post(f"/rate/{i}", json={"value": value}, headers=same_origin(client))
    rated = await (await client.get("/rated?rating=5")).text()
    assert card_ids(rated) == [ids[3], ids[2], ids[0]]
    link = re.search(rf'href="(/picture/{ids[2]}[^"]*)"', rated).group(1).replace("&amp;", "&")
    assert link == f"/picture/{ids[2]}?from=rated&rating=5&at=1"
    html = await (await client.get(link)).text()
    assert steps(html) == (f"/picture/{ids[3]}?from=rated&rating=5&at=0", f"/picture/{ids[0]}?from=rated&rating=5&at=2")
    assert '<a class="back" href="/rated?rating=5">Rated</a>' in html


# ---- in a browser --------------------------------------------------------------------------------
EDGE_FACES = [(0, 0, 90, 90), (95, 0, 185, 90), (190, 0, 280, 90),        # a row along the top edge
              (1110, 0, 1200, 90),                                         # the top right corner
              (0, 700, 100, 800), (1100, 700, 1200, 800),                  # the bottom corners
              (500, 350, 560, 410), (565, 350, 625, 410), (630, 350, 690, 410),  # a tight cluster
              (500, 415, 560, 475), (565, 415, 625, 475), (630, 415, 690, 475),
              (1150, 380, 1200, 430)]                                      # on the right edge


def rect_inside(inner: dict, outer: dict, slack: float = 0.5) -> bool:
    return (inner["x"] >= outer["x"] - slack and inner["y"] >= outer["y"] - slack
            and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + slack
            and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + slack)


def rects_overlap(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])


@pytest.mark.slow
async def test_in_a_browser_face_labels_stay_inside_the_picture_apart_and_labels_follow_a_rating(
        tmp_path, browser, live_gallery):
    cfg = config(tmp_path)
    image_id = with_faces(cfg, (1200, 800), EDGE_FACES)
    after = with_faces(cfg, (300, 200), [(10, 10, 60, 60)], seed_no=8)
    store = Store.open(cfg.db_path)
    faces = [f["id"] for f in store.faces_of(image_id)]
    for face, name in zip(faces, ("Hatsune Miku", "Kagamine Rin", "a character with a very long name indeed",
                                  "Megurine Luka", "Kaito")):
        store.name_face(face, store.character_id(name, create=True), origin="import")
    SHOTS.mkdir(parents=True, exist_ok=True)
    url = await live_gallery(cfg)
    for width, height in ((390, 844), (1366, 900)):
        page = await browser.new_page(viewport={"width": width, "height": height})
        await page.goto(url + f"picture/{image_id}")
        await page.wait_for_function("document.getElementById('full').complete")
        labels = page.locator(".faces a.face-label")
        assert await labels.count() == len(EDGE_FACES)
        img, rects = await label_rects(page)
        for i, r in enumerate(rects):
            assert r["width"] > 10 and rect_inside(r, img), (width, i, r, img)
            for j in range(i):
                assert not rects_overlap(r, rects[j]), (width, i, j, r, rects[j])
        # the numbers match the list; at desktop width every name fits
        assert await labels.nth(0).locator("b").inner_text() == "1"
        if width == 1366:
            assert await page.locator(".faces a.face-label.short").count() == 0
        # the crops show, not broken
        assert await page.evaluate("[...document.querySelectorAll('img.face-crop')].every("
                                   "i => i.complete && i.naturalWidth > 0)")
        await page.evaluate("window.scrollTo(0, 0)")
        await page.screenshot(path=str(SHOTS / f"picture-{width}.png"), full_page=True)
        await page.locator("#full").screenshot(path=str(SHOTS / f"picture-{width}-labels.png"))
        # a rating shows in the labels list at once, without a reload
        await page.evaluate("window.notReloaded = true")
        await page.locator("form.rate button[value='4']").click()
        await page.wait_for_selector("ul.labels li:has-text('4 by owner')")
        assert await page.evaluate("window.notReloaded === true")
        # resized, the labels are placed again: still inside and apart
        await page.set_viewport_size({"width": 700 if width == 390 else 1000, "height": 800})
        await page.wait_for_timeout(200)
        img, rects = await label_rects(page)
        assert all(rect_inside(r, img) for r in rects)
        assert not any(rects_overlap(a, b) for i, a in enumerate(rects) for b in rects[:i])
        await page.close()
    # ] opens the next picture, [ the previous one (by id here)
    page = await browser.new_page(viewport={"width": 1366, "height": 900})
    await page.goto(url + f"picture/{image_id}")
    await page.keyboard.press("]")
    await page.wait_for_url(f"**/picture/{after}")
    await page.keyboard.press("[")
    await page.wait_for_url(f"**/picture/{image_id}")
