"""Comparisons ("which of these two do you prefer?"): the store on a real SQLite file, the pair
choice, the gallery's Compare page, the Discord A/B post and import-labels of winner,loser CSVs."""
from __future__ import annotations

import re

import pytest

from scorer.pairs import choose_pair, p_wrong
from storage import AsyncStore, Store
from tests.helpers import cli, make_config, picture, seed
from tests.test_web import same_origin, web_config


def row(i: int, score: float | None, uncertainty: float | None = None) -> dict:
    return {"id": i, "score": score, "uncertainty": uncertainty}


# ---- the pair choice ---------------------------------------------------------------------------
def test_choose_pair_prefers_close_scores_with_high_uncertainty():
    rows = [row(1, 4.0, 0.05), row(2, 3.9, 0.05), row(3, 3.0, 0.6), row(4, 3.2, 0.6), row(5, 1.0, 0.05)]
    a, b = choose_pair(rows, set())
    assert {a["id"], b["id"]} == {3, 4}                  # 0.2 apart but unsure beats 0.1 apart and sure
    assert p_wrong(rows[2], rows[3]) > p_wrong(rows[0], rows[1]) > p_wrong(rows[0], rows[4])
    assert p_wrong(row(1, 3.0, 0.2), row(2, 3.0, 0.2)) == pytest.approx(0.5)
    # without uncertainties: the closest scores
    a, b = choose_pair([row(1, 4.0), row(2, 2.0), row(3, 2.1), row(4, 1.0)], set())
    assert {a["id"], b["id"]} == {2, 3}
    # equal scores: the more uncertain pair
    a, b = choose_pair([row(1, 3.0, 0.1), row(2, 3.0, 0.1), row(3, 3.0, 0.9), row(4, 3.0, 0.8)], set())
    assert {a["id"], b["id"]} == {3, 4}


def test_choose_pair_skips_compared_pairs_and_needs_two_scored_rows():
    rows = [row(1, 3.0, 0.5), row(2, 3.0, 0.5), row(3, 3.5, 0.5)]
    a, b = choose_pair(rows, {frozenset({1, 2})})
    assert {a["id"], b["id"]} in ({1, 3}, {2, 3})
    assert choose_pair(rows, {frozenset({1, 2}), frozenset({1, 3}), frozenset({2, 3})}) is None
    assert choose_pair([row(1, 3.0, 0.5)], set()) is None
    assert choose_pair([], set()) is None
    assert choose_pair([row(1, 3.0), row(2, None)], set()) is None     # a row without a score is no candidate


# ---- the store -----------------------------------------------------------------------------------
def test_comparisons_are_stored_counted_undone_and_refused_when_they_make_no_sense(tmp_path):
    cfg = make_config(tmp_path)
    a, b, c = seed(cfg, [{"popularity": 1}, {"popularity": 2}, {"popularity": 3}])
    store = Store.open(cfg.db_path)
    first = store.add_comparison(a, b, origin="gallery")
    again = store.add_comparison(a, b, origin="gallery")          # more evidence, kept
    third = store.add_comparison(c, a, origin="import", user="someone", ref="pairs.csv:2")
    assert len({first, again, third}) == 3
    assert [(r["winner_id"], r["loser_id"], r["origin"]) for r in store.comparisons()] == \
        [(a, b, "gallery"), (a, b, "gallery"), (c, a, "import")]
    assert set(store.comparisons()[0]) >= {"winner_id", "loser_id", "created_at", "origin"}
    assert store.comparison_count() == 3
    assert store.comparison_by_ref("import", "pairs.csv:2")["id"] == third
    assert store.comparison_by_ref("import", "pairs.csv:2", user="owner") is None
    for bad, message in [((a, a), "cannot be compared with itself"), ((a, 999), "no picture #999"),
                         ((998, a), "no picture #998")]:
        with pytest.raises(ValueError, match=message):
            store.add_comparison(*bad, origin="gallery")
    with pytest.raises(ValueError, match="unknown comparison origin"):
        store.add_comparison(a, b, origin="web")
    assert store.last_comparison("gallery")["id"] == again
    assert store.remove_comparison(again) and not store.remove_comparison(again)
    assert store.last_comparison("gallery")["id"] == first
    assert store.comparison_count() == 2 and store.get_comparison(again)["removed_at"] is not None
    assert store.compared_pairs() == {frozenset({a, b}), frozenset({a, c})}
    store.close()
    # it survives reopening the file
    with Store.open(cfg.db_path) as store:
        assert [r["id"] for r in store.comparisons()] == [first, third]


def test_comparison_count_since(tmp_path):
    cfg = make_config(tmp_path)
    a, b = seed(cfg, [{"popularity": 1}, {"popularity": 2}])
    with Store.open(cfg.db_path) as store:
        store.add_comparison(a, b, origin="gallery")
        stamp = store.comparisons()[0]["created_at"]
        assert store.comparison_count(stamp) == 0
        store.add_comparison(b, a, origin="gallery")
        assert store.comparison_count(stamp) in (0, 1)       # same millisecond possible
        assert store.comparison_count("2000-01-01") == 2


def test_compare_pair_picks_the_least_sure_unlabelled_pair_and_never_repeats_one(tmp_path):
    cfg = make_config(tmp_path)
    sure_hi, sure_lo, unsure1, unsure2, rated, dup = seed(cfg, [
        {"popularity": 1, "score": 4.5, "uncertainty": 0.01}, {"popularity": 1, "score": 1.5, "uncertainty": 0.01},
        {"popularity": 1, "score": 3.0, "uncertainty": 0.5}, {"popularity": 1, "score": 3.1, "uncertainty": 0.4},
        {"popularity": 1, "score": 3.05, "uncertainty": 0.6}, {"popularity": 1, "score": 3.0, "uncertainty": 0.5}])
    store = Store.open(cfg.db_path)
    store.add_label(rated, 4, origin="web")
    with store.db.conn:
        store.db.execute("UPDATE images SET duplicate_of = ? WHERE id = ?", [unsure1, dup])
    a, b = store.compare_pair()
    assert {a["id"], b["id"]} == {unsure1, unsure2}
    assert a["score"] is not None and "media_path" in a
    store.add_comparison(unsure2, unsure1, origin="gallery")
    a, b = store.compare_pair()
    assert {a["id"], b["id"]} != {unsure1, unsure2} and rated not in (a["id"], b["id"]) and dup not in (a["id"], b["id"])
    assert store.compare_pair(skip=[frozenset({a["id"], b["id"]})]) not in (None, (a, b))
    # a picture posted on the channel is no candidate there; an accept filter narrows further
    pid = store.post_intent(unsure1, "discord", "1")
    store.post_sent(pid, "123")
    assert all(unsure1 not in (p["id"] for p in pair) for pair in [store.compare_pair("discord")])
    assert store.compare_pair(accept=lambda r: r["id"] in (sure_hi, sure_lo))[0]["id"] in (sure_hi, sure_lo)
    assert store.compare_pair(accept=lambda r: r["id"] == sure_hi) is None


async def test_the_daemon_writer_thread_offers_the_same_methods(tmp_path):
    cfg = make_config(tmp_path)
    a, b = seed(cfg, [{"popularity": 1, "score": 3.0}, {"popularity": 2, "score": 3.2}])
    store = await AsyncStore(cfg.db_path).open()
    try:
        pair = await store.compare_pair("web")
        assert {p["id"] for p in pair} == {a, b}
        cid = await store.add_comparison(b, a, origin="gallery")
        assert await store.comparison_count() == 1 and await store.compare_pair("web") is None
        assert await store.remove_comparison(cid) and await store.comparisons() == []
    finally:
        await store.close()


# ---- the gallery ---------------------------------------------------------------------------------
def shown_pair(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<figure class="side (?:left|right)" data-id="(\d+)"', html)]


async def test_gallery_compare_records_the_pick_and_shows_the_next_pair(tmp_path, gallery):
    cfg = web_config(tmp_path)
    ids = seed(cfg, [{"popularity": 1, "score": s, "uncertainty": u}
                     for s, u in ((3.0, 0.5), (3.1, 0.5), (4.5, 0.01), (1.2, 0.01))])
    client = await gallery(cfg)
    store = Store.open(cfg.db_path)
    html = await (await client.get("/compare")).text()
    assert 'href="/compare" aria-current="page">Compare</a>' in html
    left, right = shown_pair(html)
    assert {left, right} == {ids[0], ids[1]}                 # the closest, least sure pair
    assert f'<img src="/media/{left}"' in html and 'name="winner" value="%d"' % right in html
    form = {"a": str(left), "b": str(right), "winner": str(right)}
    # the guard: no Origin (another site's form) is refused, nothing is stored
    assert (await client.post("/compare", data=form)).status == 403
    assert (await client.post("/compare", data=form, headers={"Origin": "http://evil.example"})).status == 403
    assert store.comparison_count() == 0
    resp = await client.post("/compare", data=form, headers=same_origin(client), allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/compare"
    [c] = store.comparisons()
    assert (c["winner_id"], c["loser_id"], c["origin"]) == (right, left, "gallery")
    html = await (await client.get("/compare")).text()
    assert set(shown_pair(html)) != {left, right} and len(shown_pair(html)) == 2     # the next pair
    assert f'action="/compare/undo/{c["id"]}"' in html and "1 comparison(s) so far" in html
    # skip: that pair is not offered again; bad answers are refused
    nxt = shown_pair(html)
    resp = await client.post("/compare", json={"a": nxt[0], "b": nxt[1], "skip": 1},
                             headers=same_origin(client))
    assert (await resp.json())["skipped"] == nxt and store.comparison_count() == 1
    assert set(shown_pair(await (await client.get("/compare")).text())) not in ({left, right}, set(nxt))
    for bad in ({"a": left, "b": right, "winner": ids[2]}, {"a": left, "b": left, "winner": left},
                {"a": "x", "b": right, "winner": right}, {"a": left, "b": "9" * 30, "winner": left},
                {"a": left, "b": right}):
        assert (await client.post("/compare", json=bad, headers=same_origin(client))).status == 400, bad
    assert (await client.post("/compare", json={"a": left, "b": 999, "winner": 999},
                              headers=same_origin(client))).status == 404
    assert store.comparison_count() == 1
    # undo last: taken back, the pair comes again
    resp = await client.post(f"/compare/undo/{c['id']}", headers=same_origin(client), allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/compare"
    assert store.comparison_count() == 0 and store.get_comparison(c["id"])["removed_at"]
    assert set(shown_pair(await (await client.get("/compare")).text())) == {left, right}
    assert (await client.post(f"/compare/undo/{c['id']}", headers=same_origin(client))).status == 404
    # the Model page and /api/stats count comparisons beside ratings
    await client.post("/compare", data=form, headers=same_origin(client))
    await client.post(f"/rate/{ids[2]}", json={"value": 5}, headers=same_origin(client))
    assert "1 rating(s), 1 comparison(s)" in await (await client.get("/model")).text()
    assert (await (await client.get("/api/stats")).json())["comparisons"] == 1


async def test_gallery_compare_beyond_loopback_needs_the_token(tmp_path, gallery):
    cfg = web_config(tmp_path, 'host = "0.0.0.0"\ntoken = "s3cret-gallery-token"')
    a, b = seed(cfg, [{"popularity": 1}, {"popularity": 2}])
    client = await gallery(cfg)
    form = {"a": str(a), "b": str(b), "winner": str(a)}
    assert (await client.get("/compare")).status == 401
    assert (await client.post("/compare", data=form, headers=same_origin(client))).status == 401
    await client.get("/compare?token=s3cret-gallery-token")
    assert (await client.post("/compare", data=form)).status == 403         # the cookie, but no Origin
    assert (await client.post("/compare", data=form, headers=same_origin(client))).status == 200
    assert [(c["winner_id"], c["loser_id"]) for c in Store.open(cfg.db_path).comparisons()] == [(a, b)]


async def test_gallery_compare_with_fewer_than_two_pictures_says_so(tmp_path, gallery):
    cfg = web_config(tmp_path)
    [only] = seed(cfg, [{"popularity": 1}])
    client = await gallery(cfg)
    html = await (await client.get("/compare")).text()
    assert shown_pair(html) == [] and "Fewer than two unrated pictures to compare" in html
    assert 'class="compare"' not in html


@pytest.mark.slow
async def test_in_a_browser_the_arrow_keys_pick_skip_and_the_pair_stacks_on_a_phone(tmp_path, browser, live_gallery):
    cfg = web_config(tmp_path)
    seed(cfg, [{"popularity": 1, "score": 3.0 + i / 10, "uncertainty": 0.3} for i in range(6)])
    store = Store.open(cfg.db_path)
    url = await live_gallery(cfg)

    async def pair(page) -> list[int]:
        return [int(await page.locator(f"figure.side.{s}").get_attribute("data-id")) for s in ("left", "right")]

    page = await browser.new_page(viewport={"width": 1200, "height": 800})
    await page.goto(url + "compare")
    left, right = await pair(page)
    box_l = await page.locator("figure.side.left").bounding_box()
    box_r = await page.locator("figure.side.right").bounding_box()
    assert abs(box_l["y"] - box_r["y"]) < 2 and box_r["x"] > box_l["x"] + box_l["width"] - 1   # side by side
    await page.screenshot(path=str(tmp_path / "compare.png"))
    async with page.expect_navigation():
        await page.keyboard.press("ArrowLeft")
    assert [(c["winner_id"], c["loser_id"]) for c in store.comparisons()] == [(left, right)]
    left2, right2 = await pair(page)
    async with page.expect_navigation():
        await page.keyboard.press("ArrowRight")
    assert [(c["winner_id"], c["loser_id"]) for c in store.comparisons()][-1] == (right2, left2)
    skipped = await pair(page)
    async with page.expect_navigation():
        await page.keyboard.press("ArrowDown")
    after_skip = await pair(page)
    assert set(after_skip) != set(skipped) and store.comparison_count() == 2
    async with page.expect_navigation():
        await page.keyboard.press("s")
    assert set(await pair(page)) != set(after_skip) and store.comparison_count() == 2
    async with page.expect_navigation():
        await page.keyboard.press("u")              # undo last: the → answer is taken back
    assert [(c["winner_id"], c["loser_id"]) for c in store.comparisons()] == [(left, right)]
    # At phone width the two pictures are stacked, and a tap on a button answers.
    phone = await browser.new_page(viewport={"width": 390, "height": 800}, is_mobile=True, has_touch=True)
    await phone.goto(url + "compare")
    box_l = await phone.locator("figure.side.left").bounding_box()
    box_r = await phone.locator("figure.side.right").bounding_box()
    assert box_r["y"] >= box_l["y"] + box_l["height"] - 1 and box_l["width"] > 300
    await phone.screenshot(path=str(tmp_path / "compare-phone.png"), full_page=True)
    b_left, b_right = await pair(phone)
    async with phone.expect_navigation():
        await phone.locator("button.pick.right").tap()
    assert [(c["winner_id"], c["loser_id"]) for c in store.comparisons()][-1] == (b_right, b_left)


# ---- import-labels ---------------------------------------------------------------------------------
def test_import_labels_takes_a_winner_loser_csv_once_and_reports_bad_rows(tmp_path):
    (tmp_path / "pics").mkdir()
    for name, seed_ in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        (tmp_path / "pics" / name).write_bytes(picture(seed_, fmt="PNG"))
    (tmp_path / "pics" / "broken.jpg").write_bytes(b"not a picture")
    (tmp_path / "pairs.csv").write_text("winner,loser\npics/a.png,pics/b.png\npics/b.png,pics/c.png\n"
                                        "pics/c.png,pics/c.png\npics/missing.png,pics/a.png\njust-one\n"
                                        "pics/broken.jpg,pics/a.png\n\npics/a.png,pics/c.png\n")
    out = cli(tmp_path, "import-labels", "pairs.csv", "--crops")
    assert out.returncode == 0, out.stderr
    assert "3 comparison(s) added, 0 imported already" in out.stdout and "3 new picture(s)" in out.stdout
    skipped = [line for line in out.stderr.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 4, out.stderr                      # one line each, and no traceback
    assert "pairs.csv:4: winner and loser are the same picture" in out.stderr
    assert "pairs.csv:5: cannot read" in out.stderr and "missing.png" in out.stderr
    assert "pairs.csv:6: expected 'winner,loser', got 'just-one'" in out.stderr
    assert "pairs.csv:7: broken.jpg:" in out.stderr and "Traceback" not in out.stderr
    assert "4 bad row(s) skipped" in out.stdout and "0 labelled picture(s) and 3 comparison(s)" in out.stdout

    again = cli(tmp_path, "import-labels", "pairs.csv", "--crops")
    assert again.returncode == 0 and "0 comparison(s) added, 3 imported already" in again.stdout
    with Store.open(tmp_path / "data" / "tastefeed.db") as store:
        title = {r["id"]: r["title"] for r in store.execute("SELECT id, title FROM images")}
        assert [(title[c["winner_id"]], title[c["loser_id"]], c["origin"]) for c in store.comparisons()] == \
            [("a.png", "b.png", "import"), ("b.png", "c.png", "import"), ("a.png", "c.png", "import")]
        assert [store.get_comparison(c["id"])["ref"] for c in store.comparisons()] == \
            ["pairs.csv:2", "pairs.csv:3", "pairs.csv:9"]
        assert store.execute("SELECT DISTINCT status FROM images") == [{"status": "scored"}]
        assert store.execute("SELECT COUNT(*) AS n FROM faces WHERE detector = 'crop'") == [{"n": 3}]
        assert store.label_count() == 0
    # a ratings CSV is still a ratings CSV
    (tmp_path / "r.csv").write_text("path,rating\npics/a.png,4\n")
    rated = cli(tmp_path, "import-labels", "r.csv", "--crops")
    assert rated.returncode == 0 and "1 label(s) added" in rated.stdout
    empty = tmp_path / "none.csv"
    empty.write_text("winner,loser\n")
    nothing = cli(tmp_path, "import-labels", str(empty))
    assert nothing.returncode == 1 and "no comparisons to import" in nothing.stderr
