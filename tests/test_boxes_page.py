"""The gallery's Boxes page (bot/web.py ``boxes_data``, bot/web_actions.py ``boxes``): the review
queue's next picture with its proposed boxes, accepting (verified boxes, clipped, origins kept),
skipping, bad input and other sites refused; and in a browser: draw, delete, undo, accept by key."""
from __future__ import annotations

import re

import pytest

from bot.web_actions import MAX_BOXES, parse_boxes
from storage import Store
from storage.boxes import Box
from tests.helpers import make_config, seed
from tests.test_web import same_origin


def shown_id(html: str) -> int | None:
    m = re.search(r'<form class="boxes" method="post" action="/boxes" data-id="(\d+)"', html)
    return int(m.group(1)) if m else None


def kinds(html: str) -> list[str]:
    return re.findall(r'<div class="pbox (\w+)"', html)


@pytest.fixture
def proposed(tmp_path):
    """Three pictures (200 x 160): ``a`` least certain (a sure and an unsure proposal), ``b``
    more certain (one sure), ``c`` not in the box set."""
    cfg = make_config(tmp_path)
    a, b, c = seed(cfg, [{"popularity": i} for i in range(3)])
    with Store.open(cfg.db_path) as store:
        store.propose_boxes(a, [Box(20, 20, 80, 80, origin="animeface,lbp", confidence=0.9, sure=True),
                                Box(120, 30, 170, 80, origin="haar", confidence=0.3)],
                            proposed_by="animeface+lbp+haar", certainty=0.3)
        store.propose_boxes(b, [Box(30, 30, 90, 90, origin="animeface,lbp", confidence=0.9, sure=True)],
                            proposed_by="animeface+lbp+haar", certainty=0.9)
    return cfg, a, b, c


async def test_the_page_shows_the_least_certain_picture_with_its_boxes_and_the_counts(proposed, gallery):
    cfg, a, b, _ = proposed
    client = await gallery(cfg)
    html = await (await client.get("/boxes")).text()
    assert shown_id(html) == a and kinds(html) == ["sure", "unsure"]
    assert "2 to review · 0 verified" in html and 'href="/boxes" aria-current="page">Boxes</a>' in html
    assert 'left:10.000%;top:12.500%;width:30.000%;height:37.500%' in html     # (20, 20, 80, 80) of 200 x 160
    assert f'src="/media/{a}"' in html and "Enter or a accept" in html


async def test_the_empty_queue_says_to_run_bootstrap(tmp_path, gallery):
    cfg = make_config(tmp_path)
    seed(cfg, [{"popularity": 1}])
    client = await gallery(cfg)
    html = await (await client.get("/boxes")).text()
    assert shown_id(html) is None and "No boxes to review yet. Run <code>python main.py detector bootstrap</code>" in html


async def test_accepting_stores_verified_boxes_clipped_with_kept_origins_and_shows_the_next(proposed, gallery):
    cfg, a, b, _ = proposed
    client = await gallery(cfg)
    resp = await client.post("/boxes", json={"id": a, "boxes": [{"x1": 20, "y1": 20, "x2": 80, "y2": 80},
                                                                 {"x1": 150.4, "y1": -10, "x2": 260, "y2": 60}]},
                             headers=same_origin(client))
    assert resp.status == 200 and await resp.json() == {"ok": True, "image_id": a, "boxes": 2}
    with Store.open(cfg.db_path) as store:
        pic = store.box_picture(a)
        assert pic.state == "verified" and pic.proposed == []
        assert [(v.xyxy, v.origin) for v in pic.verified] == [((20, 20, 80, 80), "animeface,lbp"),
                                                              ((150, 0, 200, 60), "owner")]   # clipped
    assert shown_id(await (await client.get("/boxes")).text()) == b
    # an empty list: verified with no face; then the queue is empty and says what next
    assert (await client.post("/boxes", json={"id": b, "boxes": []}, headers=same_origin(client))).status == 200
    with Store.open(cfg.db_path) as store:
        assert store.box_picture(b).state == "verified" and store.box_picture(b).verified == []
    html = await (await client.get("/boxes")).text()
    assert shown_id(html) is None and "every proposed picture is verified" in html and "0 to review · 2 verified" in html


async def test_a_plain_form_post_accepts_the_boxes_as_shown(proposed, gallery):
    cfg, a, _, _ = proposed
    client = await gallery(cfg)
    html = await (await client.get("/boxes")).text()
    value = re.search(r'name="boxes" value="([^"]*)"', html).group(1)
    import html as htmllib
    resp = await client.post("/boxes", data={"id": str(a), "boxes": htmllib.unescape(value), "accept": "1"},
                             headers=same_origin(client), allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/boxes"
    with Store.open(cfg.db_path) as store:
        assert [(v.xyxy, v.origin) for v in store.box_picture(a).verified] == [((20, 20, 80, 80), "animeface,lbp"),
                                                                               ((120, 30, 170, 80), "haar")]


async def test_skipping_sends_the_picture_to_the_back_of_the_queue_even_across_a_restart(proposed, gallery):
    cfg, a, b, c = proposed
    client = await gallery(cfg)
    for skip, then in ((a, b), (b, a)):          # skipped: the next; once all were seen, the first skipped again
        resp = await client.post("/boxes", json={"id": skip, "skip": True}, headers=same_origin(client))
        assert resp.status == 200 and await resp.json() == {"ok": True, "skipped": skip}
        html = await (await client.get("/boxes")).text()
        assert shown_id(html) == then
    assert "You skipped it before" in html and "2 to review" in html
    resp = await client.post("/boxes", json={"id": c, "skip": True}, headers=same_origin(client))
    assert resp.status == 404                    # not in the box set
    restarted = await gallery(cfg)               # a new gallery (a daemon restart) keeps the order
    assert shown_id(await (await restarted.get("/boxes")).text()) == a
    with Store.open(cfg.db_path) as store:
        assert store.box_picture(a).state == "proposed"


@pytest.mark.parametrize("boxes, error", [
    ([{"x1": -50, "y1": -50, "x2": -10, "y2": -10}], "box 1: less than a pixel of it is inside the picture (200 x 160)"),
    ([{"x1": 300, "y1": 10, "x2": 400, "y2": 50}], "box 1: less than a pixel of it is inside the picture"),
    ([{"x1": 50, "y1": 10, "x2": 20, "y2": 50}], "box 1: expected x1 < x2 and y1 < y2"),
    ([[10, 10, 50, 50], {"x1": "1", "y1": 1, "x2": 9, "y2": 9}], "box 2: expected x1, y1, x2, y2 as numbers"),
    ([{"x1": True, "y1": 1, "x2": 9, "y2": 9}], "box 1: expected x1, y1, x2, y2 as numbers"),
    ([[1, 2, 3]], "box 1: expected x1, y1, x2, y2 as numbers"),
    ({"x1": 1}, "expected a list of boxes"),
    ([[1, 1, 9, 9]] * (MAX_BOXES + 1), f"at most {MAX_BOXES} boxes"),
])
async def test_bad_boxes_are_refused_and_nothing_changes(proposed, gallery, boxes, error):
    cfg, a, _, _ = proposed
    client = await gallery(cfg)
    resp = await client.post("/boxes", json={"id": a, "boxes": boxes}, headers=same_origin(client))
    assert resp.status == 400 and error in await resp.text()
    with Store.open(cfg.db_path) as store:
        assert store.box_picture(a).state == "proposed" and len(store.box_picture(a).proposed) == 2


async def test_unknown_pictures_bad_ids_and_other_sites_are_refused(proposed, gallery, tmp_path):
    cfg, a, _, c = proposed
    client = await gallery(cfg)
    assert (await client.post("/boxes", json={"id": 99999, "boxes": []}, headers=same_origin(client))).status == 404
    assert (await client.post("/boxes", json={"id": "x", "boxes": []}, headers=same_origin(client))).status == 400
    resp = await client.post("/boxes", json={"id": a, "boxes": []})                 # no Origin: not from the page
    assert resp.status == 403
    resp = await client.post("/boxes", json={"id": a, "boxes": []}, headers={"Origin": "http://evil.example"})
    assert resp.status == 403
    with Store.open(cfg.db_path) as store:
        assert store.box_picture(a).state == "proposed"
    # a picture not proposed yet may be verified from the page too (it enters verified)
    assert (await client.post("/boxes", json={"id": c, "boxes": [[1, 1, 30, 30]]},
                              headers=same_origin(client))).status == 200
    # beyond loopback the gallery needs its token: without it, nothing is stored
    cfg.web.host, cfg.web.token = "0.0.0.0", "s3cret-gallery-token"
    guarded = await gallery(cfg)
    resp = await guarded.post("/boxes", json={"id": a, "boxes": []}, headers=same_origin(guarded))
    assert resp.status == 401
    with Store.open(cfg.db_path) as store:
        assert store.box_picture(a).state == "proposed"


async def test_a_verified_picture_a_new_detector_disagrees_with_shows_both(proposed, gallery):
    cfg, a, b, _ = proposed
    with Store.open(cfg.db_path) as store:
        store.verify_boxes(b, [Box(30, 30, 90, 90, origin="animeface,lbp")])
        store.propose_boxes(b, [Box(31, 31, 91, 91, origin="own:v1", confidence=0.9),       # matches: not shown
                                Box(120, 20, 170, 70, origin="own:v1", confidence=0.8)],
                            proposed_by="own:v1", certainty=0.67, disagreement=0.33)
    client = await gallery(cfg)
    html = await (await client.get("/boxes")).text()
    assert shown_id(html) == b and kinds(html) == ["verified", "unsure"] and "own:v1</strong> disagrees" in html
    await client.post("/boxes", json={"id": b, "boxes": [[30, 30, 90, 90], [120, 20, 170, 70]]},
                      headers=same_origin(client))
    with Store.open(cfg.db_path) as store:
        pic = store.box_picture(b)
        assert pic.disagreement == 0 and [(v.xyxy, v.origin) for v in pic.verified] == [
            ((30, 30, 90, 90), "animeface,lbp"), ((120, 20, 170, 70), "own:v1")]


def test_parse_boxes_clips_rounds_and_reads_json_text():
    assert parse_boxes('[{"x1": -5, "y1": 3.6, "x2": 50.2, "y2": 999}]', 100, 80) == [(0, 4, 50, 80)]
    assert parse_boxes("", 100, 80) == [] and parse_boxes([[1, 1, 2, 2]], 100, 80) == [(1, 1, 2, 2)]
    for bad in ("not json", '[{"x1": NaN, "y1": 0, "x2": 1, "y2": 1}]', "[[1, 1, 1.2, 5]]"):
        with pytest.raises(ValueError):
            parse_boxes(bad, 100, 80)


# ---- in a browser ---------------------------------------------------------------------------------
@pytest.mark.slow
async def test_in_a_browser_a_face_is_drawn_a_proposal_deleted_and_the_boxes_accepted_with_enter(
        proposed, tmp_path, browser, live_gallery):
    cfg, a, b, _ = proposed
    url = await live_gallery(cfg)
    page = await browser.new_page(viewport={"width": 1200, "height": 800})
    await page.goto(url + "boxes")
    assert await page.locator("form.boxes").get_attribute("data-id") == str(a)
    boxes = page.locator(".box-layer .pbox")
    assert await boxes.count() == 2
    img = await page.locator("#box-picture").bounding_box()
    scale = img["width"] / 200
    actions = await page.locator("p.box-actions").bounding_box()
    assert img["y"] + img["height"] <= actions["y"] <= 800 - actions["height"]   # all in view

    async def drag(x1, y1, x2, y2):
        await page.mouse.move(img["x"] + x1 * scale, img["y"] + y1 * scale)
        await page.mouse.down()
        await page.mouse.move(img["x"] + (x1 + x2) / 2 * scale, img["y"] + (y1 + y2) / 2 * scale, steps=4)
        await page.mouse.move(img["x"] + x2 * scale, img["y"] + y2 * scale, steps=4)
        await page.mouse.up()

    await drag(100, 100, 150, 150)                      # a missing face, drawn
    await page.wait_for_selector(".box-layer .pbox.owner")
    await drag(10, 110, 40, 150)                        # another, then taken back with z
    assert await boxes.count() == 4
    await page.keyboard.press("z")
    assert await boxes.count() == 3
    await page.locator(".box-layer .pbox.unsure").click()     # the unsure proposal, deleted
    assert await boxes.count() == 2 and await page.locator(".box-layer .pbox.unsure").count() == 0
    assert await page.locator(".box-count").inner_text() == "2 box(es)"
    await page.screenshot(path=str(tmp_path / "boxes.png"))
    await page.keyboard.press("Enter")
    await page.wait_for_function(f"() => document.querySelector('form.boxes')?.dataset.id === '{b}'")
    with Store.open(cfg.db_path) as store:
        pic = store.box_picture(a)
        assert pic.state == "verified"
        (kept, drawn) = pic.verified
        assert (kept.xyxy, kept.origin) == ((20, 20, 80, 80), "animeface,lbp")
        assert drawn.origin == "owner" and all(abs(v - w) <= 2 for v, w in zip(drawn.xyxy, (100, 100, 150, 150)))
    # s skips the next one; the only one left, it comes back, marked as skipped before
    assert await page.locator(".skipped-before").count() == 0
    await page.keyboard.press("s")
    await page.wait_for_selector(".skipped-before:has-text('You skipped it before')")
    assert await page.locator("form.boxes").get_attribute("data-id") == str(b)
