"""Honest rankings: the exploration share is of what is shown and never tops it, the rest keep
their rank order, and an untrained model's scores are not shown as if they meant something
(gallery cards, the Model page, `score`, Discord posts). Also the gallery's small things: the
favicon, HTML 404 pages with the navigation, Rated cards and imported pictures."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from bot.discord_compare import compare_embed
from bot.discord_posts import build_embed
from scorer.ranking import RankingConfig, exploration_slots, interleave, pick
from storage import Store
from tests.helpers import cli, make_config, picture, seed

SHOTS = Path("/tmp/shots-U1")


def web_config(tmp_path, page_size: int = 30, ranking: str = "", more: str = ""):
    return make_config(tmp_path, f"\n[web]\npage_size = {page_size}\n[ranking]\n{ranking}\n{more}")


def cards(html: str) -> list[tuple[int, bool]]:
    """(picture id, marked explore) of each card, in page order."""
    return [(int(i), bool(e)) for e, i in re.findall(r'<article class="card( explore)?" data-id="(\d+)"', html)]


def same_origin(client) -> dict:
    return {"Origin": f"http://127.0.0.1:{client.port}"}


# ---- the rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 0.9])
def test_exploration_is_a_share_of_what_is_shown_never_on_top_spread_evenly(share):
    for shown in range(0, 41):
        slots = exploration_slots(shown, share)
        assert len(slots) == shown
        expected = round(share * shown)
        if shown > 1:
            expected = min(expected, shown - 1)     # the first of several is the best, always
            assert not slots[0]
        assert sum(slots) == expected, (shown, share)
        where = [i for i, s in enumerate(slots) if s]
        if len(where) > 1:                          # an even rhythm: gaps differ by one at most
            gaps = [b - a for a, b in zip(where, where[1:])]
            assert max(gaps) - min(gaps) <= 1, (shown, share, where)
    assert exploration_slots(10, 0.5) == [False, True] * 5
    assert exploration_slots(10, 0.2) == [False] * 4 + [True] + [False] * 4 + [True]
    assert exploration_slots(3, 0.5) == [False, True, True]
    assert exploration_slots(4, 1.0) == [True] * 4           # everything explores: asked for
    # Posting cycles round at random, so a few posts at a time explore the share in the long run.
    rng = random.Random(0)
    runs = [exploration_slots(3, 0.2, rng) for _ in range(2000)]
    assert all(not r[0] for r in runs)
    assert 0.17 < sum(map(sum, runs)) / 6000 < 0.23


def test_interleave_keeps_the_best_in_order_and_each_picture_once():
    best = [{"id": i} for i in (9, 8, 7, 6, 5, 4)]
    explore = [{"id": i} for i in (4, 8, 1)]                  # 8 is among the best too
    out = interleave([False, True, False, True, False, True], best, explore)
    assert [(r["id"], e) for r, e in out] == [(9, False), (4, True), (8, False), (1, True), (7, False), (6, False)]
    # Nothing left to explore: the slot goes to the next best, unmarked; the best run out: it ends.
    out = interleave([False, True, True, False], [{"id": 1}, {"id": 2}], [{"id": 1}])
    assert [(r["id"], e) for r, e in out] == [(1, False), (2, False)]


# ---- For you ---------------------------------------------------------------------------------
async def test_for_you_with_few_pictures_explores_a_share_of_them_after_the_best(tmp_path, gallery):
    cfg = web_config(tmp_path)                                 # a page of 30, only 10 pictures
    ids = seed(cfg, [{"popularity": p or None, "score": 3 + p / 100} for p in range(10)])  # the first: none
    client = await gallery(cfg)
    html = await (await client.get("/")).text()
    shown = cards(html)
    # Cold (untrained): half of what is shown explores, not half of the page size (15: all of them).
    assert len(shown) == 10 and [e for _, e in shown] == [False, True] * 5
    ranked = [i for i, e in shown if not e]
    by_popularity = list(reversed(ids))
    assert ranked == [i for i in by_popularity if i in ranked]          # strict order
    assert shown[0][0] == by_popularity[0]                              # the most popular on top
    assert "the model is not trained yet, so they are ranked by" in html
    assert "popularity 9</span>" in html and ">not yet trained</span>" in html   # no popularity: says so
    assert ">3.0" not in html and "3.09" not in html                   # no untrained number on cards
    assert html.count(">explore</span>") == 5 and "🔍" not in html

    # Trained: the share of exploration (0.2) of the 10 shown, the first four the four best by score.
    with Store.open(cfg.db_path) as store, store.db.conn:
        store.db.execute("UPDATE models SET metrics = ?", ['{"val": {"pearson": 0.5}}'])
        store.db.execute("UPDATE images SET score = 5 - id / 10.0, uncertainty = id / 10.0")
    cfg.train.min_labels = 0
    html = await (await client.get("/")).text()
    shown = cards(html)
    by_score = sorted(ids)                                      # score falls as the id rises
    assert [e for _, e in shown] == [False] * 4 + [True] + [False] * 4 + [True]
    assert [i for i, _ in shown[:4]] == by_score[:4]
    ranked = [i for i, e in shown if not e]
    assert ranked == sorted(ranked)                             # the rest in score order
    assert {i for i, e in shown if e} == set(by_score[-2:])     # the two least certain
    assert "4.90" in html and "not yet trained" not in html and "best predicted first" in html


async def test_paging_cuts_one_sequence_each_picture_once(tmp_path, gallery):
    cfg = web_config(tmp_path, page_size=10, ranking="cold_exploration = 0.3")
    ids = seed(cfg, [{"popularity": p} for p in range(25)])
    client = await gallery(cfg)
    pages = [cards(await (await client.get(f"/?page={n}")).text()) for n in (1, 2, 3)]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sorted(i for p in pages for i, _ in p) == sorted(ids)
    assert [sum(e for _, e in p) for p in pages] == [3, 3, 2]   # round(0.3 * 5) = 2 on the last
    assert not any(p[0][1] for p in pages)
    assert cards(await (await client.get("/?page=9")).text()) == []


def test_discord_picks_follow_the_same_rule(tmp_path):
    cfg = make_config(tmp_path, "\n[ranking]\ncold_exploration = 0.5\n")
    ids = seed(cfg, [{"popularity": p} for p in range(10)])
    store = Store.open(cfg.db_path)
    for _ in range(20):   # asked for 30, 10 there: 5 explore (not 15, i.e. all), never the first
        picks = pick(store, cfg.ranking, cfg.train.min_labels, 30, channel="discord")
        assert [p.exploration for p in picks] == exploration_slots(10, 0.5)
        assert picks[0].image["id"] == ids[-1] and all(p.cold for p in picks)
        ranked = [p.image["id"] for p in picks if not p.exploration]
        assert ranked == sorted(ranked, reverse=True)
    one = pick(store, RankingConfig(cold_exploration=0.5), cfg.train.min_labels, 1, channel="discord")
    assert len(one) == 1
    # A cold post shows the popularity that ranked it, not the untrained model's number.
    embed = build_embed(dict(picks[0].image, score=3.46), faces=1, source="feed", exploration=False,
                        reason="popularity", filename="p.jpg", cold=True).to_dict()
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Score"] == "not yet trained (popularity 9)"
    embed = build_embed(dict(picks[0].image, score=3.46), faces=1, source="feed", exploration=False,
                        reason="score", filename="p.jpg").to_dict()
    assert {f["name"]: f["value"] for f in embed["fields"]}["Score"].startswith("3.46 / 5")
    # The A/B comparison post says the same.
    image = dict(picks[0].image, score=3.46)
    for trained, says in [(False, "not yet trained"), (True, "3.46 / 5")]:
        embed = compare_embed(image, "A", source="feed", filename="a.jpg", trained=trained).to_dict()
        assert {f["name"]: f["value"] for f in embed["fields"]}["Score"].startswith(says)


# ---- untrained, said so ----------------------------------------------------------------------------
def test_score_says_the_model_is_not_trained_and_json_keeps_the_number_marked(tmp_path):
    (tmp_path / "a.jpg").write_bytes(picture(2))
    out = cli(tmp_path, "score", "a.jpg")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("a.jpg: no face, not trained yet (whole picture)\n")
    assert "The model is not trained yet" in out.stdout and "rate at least 50 pictures (you have 0)" in out.stdout
    assert not re.search(r"score \d", out.stdout)
    out = cli(tmp_path, "score", "--json", "a.jpg")
    [result] = json.loads(out.stdout)
    assert result["trained"] is False and 1 <= result["score"] <= 5
    # Once a trained model is active, the score is printed.
    from scorer.registry import ensure_active_model
    from scorer.settings import ScorerConfig

    assert not (tmp_path / "data").exists()          # score wrote nothing
    with Store.open(tmp_path / "data" / "tastefeed.db") as store:
        ensure_active_model(store, ScorerConfig(), tmp_path / "data" / "models")
        with store.db.conn:
            store.db.execute("UPDATE models SET metrics = ?", ['{"val": {"pearson": 0.5}}'])
    out = cli(tmp_path, "score", "a.jpg")
    assert re.match(r"a\.jpg: no face, score \d\.\d\d \(whole picture\)\n"
                    r"faces found by the detector animeface \(configured in \[detector\]\)\n$", out.stdout), out.stdout
    assert json.loads(cli(tmp_path, "score", "--json", "a.jpg").stdout)[0]["trained"] is True


async def test_after_an_import_the_model_page_and_rated_cards_tell_the_real_state(tmp_path, gallery):
    cfg = web_config(tmp_path, more="[train]\nmin_labels = 3\n")
    rated = tmp_path / "rated"
    for i, value in enumerate([1, 3, 4, 5]):
        (rated / str(value)).mkdir(parents=True, exist_ok=True)
        (rated / str(value) / f"p{i}.jpg").write_bytes(picture(40 + i))
    out = cli(tmp_path, "import-labels", rated)
    assert out.returncode == 0, out.stdout + out.stderr
    client = await gallery(cfg)
    html = await (await client.get("/model")).text()
    note = re.sub(r"\s+", " ", re.search(r'<p class="untrained-note">(.*?)</p>', html, re.S).group(1))
    assert "4 rated, enough to train" in note and "rate at least" not in html
    assert "the daemon fits the taste head within a minute" in note
    # The daemon's fit ran and made nothing (its mark is past the ratings): train by hand.
    with Store.open(cfg.db_path) as store:
        store.set_setting("head_refit_mark", "9999")
    html = await (await client.get("/model")).text()
    assert "last automatic fit made no model: run <code>python main.py train</code>" in html
    # Too few: how many of how many.
    cfg.train.min_labels = 50
    html = await (await client.get("/model")).text()
    assert "4 rating(s) of the 50 training needs" in html
    # Rated: the owner's rating is the number that stands out; imported pictures read "imported".
    html = await (await client.get("/rated")).text()
    metas = re.findall(r'<div class="meta">(.*?)</div>', html, re.S)
    assert len(metas) == 4
    for meta in metas:
        assert re.search(r'<span class="label" title="your rating">★ [1-5]</span>', meta)
        assert meta.index('class="label"') < meta.index('class="predicted"')
        assert "model not trained yet" in meta and '<span class="src">imported</span>' in meta
    assert "import · import" not in html
    [first] = re.findall(r'<article class="card rated-card" data-id="(\d+)"', html)[:1]
    page = await (await client.get(f"/picture/{first}")).text()
    assert re.search(r"<h2>Source</h2>\s*<p>imported", page)


async def test_rated_card_of_a_trained_model_shows_the_prediction_second(tmp_path, gallery):
    cfg = web_config(tmp_path)
    [a] = seed(cfg, [{"popularity": 1, "score": 3.46}], trained=True)
    client = await gallery(cfg)
    await client.post(f"/rate/{a}", json={"value": 2}, headers=same_origin(client))
    html = await (await client.get("/rated")).text()
    assert re.search(r'★ 2</span>\s*<span class="predicted"[^>]*>predicted 3.46</span>', html)
    assert '<span class="src">booru-test · web</span>' in html
    css = (Path(__file__).parents[1] / "bot" / "static" / "style.css").read_text()
    assert re.search(r"\.rated-card \.label \{[^}]*font-size: 1\.5em", css)


# ---- favicon and 404 -------------------------------------------------------------------------
async def test_favicon_is_served_and_linked_and_404_pages_have_the_navigation(tmp_path, gallery):
    cfg = web_config(tmp_path)
    seed(cfg, [{"popularity": 1}])
    client = await gallery(cfg)
    html = await (await client.get("/")).text()
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in html
    for path in ("/static/favicon.svg", "/favicon.ico"):
        resp = await client.get(path)
        assert resp.status == 200 and resp.headers["Content-Type"] == "image/svg+xml", path
        assert (await resp.text()).startswith("<svg")
    for path, says in [("/nothere", "There is no page at /nothere."), ("/picture/999", "No picture #999"),
                       ("/picture/abc", "There is no page at /picture/abc."),
                       ("/rated/x/y", "There is no page at /rated/x/y.")]:
        resp = await client.get(path)
        assert resp.status == 404 and resp.content_type == "text/html", path
        page = await resp.text()
        assert "<nav>" in page and 'href="/rated"' in page and says in page, path
    # Files and the API keep a short plain 404.
    for path in ("/thumb/999", "/media/999", "/static/nothere.css"):
        resp = await client.get(path)
        assert resp.status == 404 and resp.content_type != "text/html", path


# ---- in a browser ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("width", [390, 1366])
async def test_in_a_browser_for_you_marks_and_orders_ten_pictures(tmp_path, width, browser, live_gallery):

    cfg = web_config(tmp_path)
    ids = seed(cfg, [{"popularity": p + 1, "score": 3 + p / 100} for p in range(10)])
    by_popularity = list(reversed(ids))
    url = await live_gallery(cfg)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = await browser.new_page(viewport={"width": width, "height": 900})

    async def shown():
        await page.goto(url)
        cards = page.locator("article.card")
        out = []
        for i in range(await cards.count()):
            card = cards.nth(i)
            badge = card.locator(".badge")
            marked = await badge.count() == 1
            if marked:   # a text badge, drawn inside its card, no emoji font needed
                assert (await badge.text_content()).strip() == "explore"
                b, c = await badge.bounding_box(), await card.bounding_box()
                assert c["x"] <= b["x"] and b["x"] + b["width"] <= c["x"] + c["width"]
            out.append((int(await card.get_attribute("data-id")), marked,
                        (await card.locator(".score").text_content()).strip()))
        return out

    cold = await shown()
    await page.screenshot(path=str(SHOTS / f"for-you-cold-{width}.png"), full_page=True)
    assert [m for _, m, _ in cold] == [False, True] * 5
    assert cold[0][0] == by_popularity[0] and cold[0][2] == "popularity 10"
    ranked = [i for i, m, _ in cold if not m]
    assert ranked == [i for i in by_popularity if i in ranked]
    # The cards read top to bottom (and left to right) in that order.
    boxes = [await page.locator("article.card").nth(i).bounding_box() for i in range(10)]
    assert [(b["y"], b["x"]) for b in boxes] == sorted((b["y"], b["x"]) for b in boxes)
    assert await page.evaluate("document.documentElement.scrollWidth") <= width

    # Trained: the share (0.2) of the ten, after the four best; scores shown.
    with Store.open(cfg.db_path) as store, store.db.conn:
        store.db.execute("UPDATE models SET metrics = ?", ['{"val": {"pearson": 0.5}}'])
        store.db.execute("UPDATE images SET score = 5 - id / 10.0, uncertainty = id / 10.0")
    cfg.train.min_labels = 0
    trained = await shown()
    await page.screenshot(path=str(SHOTS / f"for-you-trained-{width}.png"), full_page=True)
    assert [m for _, m, _ in trained] == [False] * 4 + [True] + [False] * 4 + [True]
    assert [i for i, _, _ in trained[:4]] == sorted(ids)[:4]
    scores = [float(s) for _, m, s in trained if not m]
    assert scores == sorted(scores, reverse=True)

    # Rated: the owner's rating stands out, the prediction is second.
    await page.locator("article.card").nth(0).locator("form.rate button[value='4']").click()
    await page.wait_for_selector("article.card.rated")
    await page.goto(url + "rated")
    size = await page.evaluate("""() => ['.label', '.predicted'].map(s =>
        parseFloat(getComputedStyle(document.querySelector('.rated-card ' + s)).fontSize))""")
    assert size[0] > 1.5 * size[1]
    await page.screenshot(path=str(SHOTS / f"rated-{width}.png"))
    resp = await page.goto(url + "picture/99999")
    assert resp.status == 404 and await page.locator("nav a").count() == 6
    await page.screenshot(path=str(SHOTS / f"not-found-{width}.png"))
