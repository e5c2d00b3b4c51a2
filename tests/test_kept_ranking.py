"""100,000 pictures stay instant (storage/ranking.py, scorer/ranking.py feed_page): the ranking
read along indexes matches one computed from scratch through rescoring, rating, posting and
deletion; keyset paging over 100,000 generated rows shows each picture once; kept counts follow
every change; the near-duplicate lookup finds what a full comparison finds."""
from __future__ import annotations

import bisect
import collections
import json
import random

import pytest

from scorer.ranking import Cursor, Feed, feed_page
from scorer.registry import ensure_active_model
from storage import Store
from storage.media import PhashIndex
from storage.ranking import key
from storage.records import Face
from storage.store import now
from tests.helpers import make_config


def scratch(store: Store, channel: str, order: str) -> list[int]:
    """The candidates in ``order``, computed in Python from the raw rows (the old way: the
    popularity percentile recomputed from scratch within each source)."""
    rows = [dict(r) for r in store.db.query("SELECT * FROM images")]
    posted = {r[0] for r in store.db.execute("SELECT image_id FROM posts WHERE channel = ? AND status != 'failed'",
                                             [channel])}
    labelled = {r[0] for r in store.db.execute("SELECT image_id FROM labels WHERE removed_at IS NULL")}
    population: dict = {}
    for r in rows:
        if r["status"] == "scored" and r["duplicate_of"] is None and r["popularity"] is not None:
            population.setdefault(r["source_id"], []).append(r["popularity"])
    for pops in population.values():
        pops.sort()
    for r in rows:
        pops = population.get(r["source_id"], [])
        r["pop_rank"] = (None if r["popularity"] is None or r["status"] != "scored" else
                         (bisect.bisect_left(pops, r["popularity"]) / (len(pops) - 1) if len(pops) > 1 else 0.0))
    cands = [r for r in rows if r["status"] == "scored" and r["duplicate_of"] is None
             and r["media_pruned_at"] is None and r["id"] not in posted and r["id"] not in labelled]
    return [r["id"] for r in sorted(cands, key=lambda r: key(order, r), reverse=order != "shuffled")]


def kept(store: Store, channel: str, order: str) -> list[int]:
    return [r["id"] for r in store.ranked_candidates(channel, order, 10 ** 6)]


@pytest.fixture
def store(tmp_path):
    cfg = make_config(tmp_path)
    with Store.open(cfg.db_path) as s:
        s.model = ensure_active_model(s, cfg.scorer, cfg.models_path)["version"]
        s.sources = [s.upsert_source(f"s{k}", "booru", {"enabled": False, "options": {}}, origin="cli")
                     for k in range(3)]
        yield s


def add_scored(store: Store, rnd: random.Random, n: int) -> list[int]:
    """``n`` pictures stored and scored the way the daemon does it (record_analysis)."""
    ids = []
    for _ in range(n):
        i = store.db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM images").fetchone()[0]
        [image_id] = store.save_poll(rnd.choice(store.sources), [{
            "external_id": f"p{i}", "popularity": rnd.choice([None, rnd.randrange(0, 50), rnd.random() * 900])}], {})
        with store.db.conn:
            store.db.execute("UPDATE images SET status = 'downloaded', sha256 = ?, media_path = 'x.jpg' WHERE id = ?",
                             [f"{image_id:064x}", image_id])
        score = rnd.choice([1 + 4 * rnd.random(), 3.0])          # ties too
        store.record_analysis(image_id, [Face(1, 1, 9, 9, 0.9, "animeface", score, 0.1)], score,
                              rnd.choice([None, round(rnd.random(), 1)]), store.model)
        ids.append(image_id)
    return ids


ORDERS = ("score", "popularity", "uncertain", "recent", "shuffled")


def assert_same(store: Store) -> None:
    for channel in ("web", "discord"):
        for order in ORDERS:
            assert kept(store, channel, order) == scratch(store, channel, order), (channel, order)
        assert store.count_candidates(channel) == len(scratch(store, channel, "recent"))


def test_kept_ranking_matches_a_ranking_from_scratch_through_every_change(store):
    rnd = random.Random(3)
    ids = add_scored(store, rnd, 45)
    assert_same(store)
    # rescoring (a new model's scores and uncertainties)
    for i in ids[::2]:
        store.record_rescore(i, {}, 1 + 4 * rnd.random(), rnd.random(), store.model)
    assert_same(store)
    # rating, and taking a rating back
    for i in ids[1:10]:
        store.add_label(i, rnd.randint(1, 5), origin="web")
    store.remove_label(ids[1], origin="web", user="owner")
    assert_same(store)
    # posting (only that channel loses it), a failed post (not posted)
    store.post_sent(store.post_intent(ids[20], "discord", "1"), "m1")
    store.post_failed(store.post_intent(ids[21], "discord", "1"), "boom")
    store.post_intent(ids[22], "web", None)
    assert_same(store)
    # deletion, a duplicate, a pruned picture
    with store.db.conn:
        store.db.execute("DELETE FROM images WHERE id = ?", [ids[30]])
        store.db.execute("UPDATE images SET duplicate_of = ? WHERE id = ?", [ids[0], ids[31]])
        store.db.execute("UPDATE images SET media_pruned_at = ? WHERE id = ?", [now(), ids[32]])
    store.refresh_popularity()           # a deletion changes the source's population: recomputed
    assert_same(store)
    # more pictures scored: each gets its percentile as it comes in
    add_scored(store, rnd, 10)
    assert_same(store)


def test_popularity_percentiles_are_kept_one_by_one_and_recomputed_before_they_drift(store):
    rnd = random.Random(5)
    with store.db.conn:
        store.db.execute("DELETE FROM sources WHERE id != ?", [store.sources[0]])
    store.sources = store.sources[:1]
    add_scored(store, rnd, 200)
    query = "SELECT id, pop_rank FROM images WHERE popularity IS NOT NULL"
    before = {r["id"]: r["pop_rank"] for r in store.db.query(query)}
    store.refresh_popularity()
    after = {r["id"]: r["pop_rank"] for r in store.db.query(query)}
    drift = [abs(before[i] - after[i]) for i in after]
    assert len(drift) > 100 and max(drift) <= 0.06   # at most a twentieth of a source came in since a recompute
    assert sorted(after, key=after.get) == sorted(after, key=lambda i: (after[i], i))


def fill(store: Store, n: int, rnd: random.Random) -> None:
    with store.db.conn:
        store.db.conn.executemany(
            "INSERT INTO images (source_id, external_id, popularity, status, sha256, media_path, score, uncertainty, "
            "model_version, created_at) VALUES (?, ?, ?, 'scored', ?, 'x.jpg', ?, ?, ?, ?)",
            [(store.sources[i % 3], str(i), rnd.choice([None, rnd.randrange(1000)]), f"{i:064x}",
              round(1 + 4 * rnd.random(), 2), rnd.choice([None, round(rnd.random(), 2)]), store.model, now())
             for i in range(n)])
    store.refresh_popularity()


@pytest.mark.parametrize("best,explore,share", [("score", "uncertain", 0.2), ("popularity", "shuffled", 0.5)])
def test_keyset_paging_over_100000_rows_shows_each_picture_once(store, best, explore, share):
    rnd = random.Random(7)
    fill(store, 100_000, rnd)
    for i in range(1, 3001, 3):                   # some rated, some posted: not candidates
        store.db.execute("INSERT INTO labels (image_id, user, value, origin, created_at) VALUES (?, 'owner', 3, "
                         "'web', ?)", [i, now()])
    store.db.conn.commit()
    total = store.count_candidates("web")
    assert total == 99_000
    feed = Feed("web", best, explore, share, 1000)
    seen, cursor, page, explored, more = [], Cursor(), 0, 0, True
    while more:
        placed, cursor, more = feed_page(store, feed, page, Cursor.from_token(cursor.token(feed), feed))
        assert len(placed) == feed.size or not more
        explored += sum(e for _, e in placed)
        seen += [r["id"] for r, _ in placed]
        page += 1
    assert page == 99
    assert len(seen) == len(set(seen)) == total                     # every candidate once
    assert set(seen) == set(scratch(store, "web", "recent"))
    assert abs(explored / total - share) < 0.01
    # A page asked for by number (no cursor) is the same page, laid out from the start.
    fresh = Store.open(store.path)
    try:
        placed, _, _ = feed_page(fresh, feed, 57)
        assert [r["id"] for r, _ in placed] == seen[57 * feed.size:58 * feed.size]
    finally:
        fresh.close()


def test_paging_on_while_pictures_are_rated_shows_every_other_picture_once(store):
    """Ratings between pages take pictures off the feed before the cursor: the next page still
    starts where the last one ended, and "more" goes on until nothing is left."""
    rnd = random.Random(9)
    fill(store, 100, rnd)
    feed = Feed("web", "score", "uncertain", 0.2, 10)
    seen, rated, cursor, page, more = [], [], Cursor(), 0, True
    while more:
        placed, cursor, more = feed_page(store, feed, page, cursor)
        ids = [r["id"] for r, _ in placed]
        seen += ids
        for i in ids[:5]:                     # rate half of what each page shows
            store.add_label(i, 3, origin="web")
            rated.append(i)
        page += 1
    assert len(seen) == len(set(seen)) == 100 and page == 10


def test_a_bad_or_foreign_cursor_token_is_no_cursor():
    trained = Feed("web", "score", "uncertain", 0.2, 30, model="m2")
    cold = Feed("web", "popularity", "shuffled", 0.5, 30, model="m1")
    good = Cursor((3.5, 7), None)
    assert Cursor.from_token(good.token(trained), trained) == good
    assert Cursor.from_token(Cursor((0.5, 10, 7), (1234, 7)).token(cold), cold) == Cursor((0.5, 10, 7), (1234, 7))
    for token in ("", "x", "W10", "WyJhIiwxXQ",
                  Cursor((0.5, 10, 7), None).token(cold),          # a cold feed's cursor, now trained
                  good.token(Feed("web", "score", "uncertain", 0.2, 30, model="m1")),   # another model
                  Cursor((True, 1), None).token(trained), Cursor((3.5,), None).token(trained),
                  Cursor((3.5, 2 ** 70), None).token(trained), Cursor((float("nan"), 1), None).token(trained)):
        assert Cursor.from_token(token, trained) is None, token
    assert Feed("web", "score", "uncertain", 0.1, 30) == Feed("web", "score", "uncertain", 0.3, 30)   # share moves


def test_kept_counts_follow_this_connections_and_other_processes_changes(store):
    rnd = random.Random(1)
    ids = add_scored(store, rnd, 12)
    assert store.count_candidates("web") == 12
    store.add_label(ids[0], 4, origin="web")
    assert store.count_candidates("web") == 11
    other = Store.open(store.path)                       # another process (the CLI) rates one
    try:
        other.add_label(ids[1], 2, origin="cli")
    finally:
        other.close()
    assert store.count_candidates("web") == 10
    assert store.count_candidates("discord") == 10
    assert store.rating_spread() == 1.0                  # 4 and 2: kept, and following each change
    store.add_label(ids[2], 4, origin="web")
    assert store.rating_spread() == (8 / 9) ** 0.5
    other = Store.open(store.path)
    try:
        other.add_label(ids[2], 5, origin="cli")         # its rating changed elsewhere: 4, 2, 5
    finally:
        other.close()
    assert store.rating_spread() == (14 / 9) ** 0.5 and store.count_candidates("web") == 9


def test_near_duplicate_lookup_finds_the_closest_like_a_full_comparison():
    rnd = random.Random(2)
    hashes = {i: rnd.getrandbits(64) for i in range(1, 3000)}
    index = PhashIndex(list(hashes.items())[:1000])
    for i, h in list(hashes.items())[1000:]:
        index.add(i, h)                                   # grows past its first capacity
    assert len(index) == len(hashes)
    for _ in range(300):
        base = rnd.choice(list(hashes.values()))
        target = base ^ sum(1 << b for b in rnd.sample(range(64), rnd.randrange(0, 9)))
        for d in (0, 4, 8):
            exclude = rnd.choice([None, *list(hashes)[:5]])
            close = sorted(((h ^ target).bit_count(), i) for i, h in hashes.items()
                           if (h ^ target).bit_count() <= d and i != exclude)
            assert index.nearest(target, d, exclude) == (close[0][1] if close else None)
    assert PhashIndex().nearest(5, 64) is None


def test_random_picks_are_candidates_spread_over_all_of_them(store):
    rnd = random.Random(4)
    ids = add_scored(store, rnd, 40)
    store.add_label(ids[0], 5, origin="web")
    firsts = [store.ranked_candidates("web", "random", 3)[0]["id"] for _ in range(400)]
    assert ids[0] not in firsts and len(set(firsts)) > 25
    assert len({r["id"] for r in store.ranked_candidates("web", "random", 39)}) == 39
    assert json.dumps(store.ranked_candidates("web", "random", 50)[0]["tags"]) == "[]"


def test_the_migration_creates_the_indexes_the_ranking_reads():
    from storage.db import M010_INDEXES
    from storage.ranking import ranking_indexes
    assert list(M010_INDEXES) == ranking_indexes()


def test_followed_pictures_without_popularity_stay_after_those_with_one(store):
    rnd = random.Random(11)
    ids = add_scored(store, rnd, 30)
    miku = store.character_id("Miku", create=True)
    unpopular = [i for i in ids if store.get_image(i)["popularity"] is None]
    for i in unpopular:
        store.name_face(store.faces_of(i)[0]["id"], miku, origin="import")
    rows = store.ranked_candidates("web", "popularity", 100, follow=["Miku"], follow_boost=8.0)
    with_pop = [r["id"] for r in rows if r["popularity"] is not None]
    assert [r["id"] for r in rows][:len(with_pop)] == with_pop and unpopular


def test_random_picks_are_near_uniform_even_with_ids_far_apart(store):
    # Sparse ids leave uneven gaps between shuffle keys: a random key alone would pick the
    # pictures after large gaps many times more often than the others.
    rnd = random.Random(12)
    ids = sorted(rnd.sample(range(1, 2000), 100))
    with store.db.conn:
        store.db.conn.executemany(
            "INSERT INTO images (id, source_id, external_id, status, sha256, media_path, score, model_version, "
            "created_at) VALUES (?, ?, ?, 'scored', ?, 'x.jpg', 3, ?, ?)",
            [(i, store.sources[0], str(i), f"{i:064x}", store.model, now()) for i in ids])
    counts = collections.Counter(store.ranked_candidates("web", "random", 1)[0]["id"] for _ in range(5000))
    spread = sorted(counts.get(i, 0) for i in ids)                  # 50 each if uniform
    assert spread[10] > 30 and spread[90] < 70 and spread[0] > 15, spread


def tied(store: Store, n: int, rnd: random.Random) -> None:
    """``n`` scored pictures whose orders are full of ties: no popularity at all (every
    percentile and popularity the same), 40 distinct scores and 5 uncertainties."""
    with store.db.conn:
        store.db.conn.executemany(
            "INSERT INTO images (source_id, external_id, status, sha256, media_path, score, uncertainty, "
            "model_version, created_at) VALUES (?, ?, 'scored', ?, 'x.jpg', ?, ?, ?, ?)",
            [(store.sources[i % 3], str(i), f"{i:064x}", 1 + rnd.randrange(40) / 10, rnd.randrange(5) / 10,
              store.model, now()) for i in range(n)])
    store.refresh_popularity()


def layout(store: Store, feed: Feed) -> list[tuple[int, bool]]:
    """The whole feed laid out from the candidates in Python (each page: the next ``size`` of the
    ranked order and as many of the exploration order not placed yet, interleaved)."""
    from scorer.ranking import interleave
    best, explore = scratch(store, feed.channel, feed.best), scratch(store, feed.channel, feed.explore)
    placed: set[int] = set()
    out = []
    while True:
        left_best = [{"id": i} for i in best if i not in placed][:feed.size]
        if not left_best:
            return out
        left_explore = [{"id": i} for i in explore if i not in placed][:len(left_best)]
        page = interleave(feed.slots(len(left_best)), left_best, left_explore)
        placed |= {r["id"] for r, _ in page}
        out += [(r["id"], e) for r, e in page]


def walk(store: Store, feed: Feed) -> list[tuple[int, bool]]:
    seen, cursor, page, more = [], Cursor(), 0, True
    while more:
        placed, cursor, more = feed_page(store, feed, page, cursor)
        seen += [(r["id"], e) for r, e in placed]
        page += 1
    return seen


@pytest.mark.parametrize("best,explore,share", [("score", "uncertain", 0.2), ("popularity", "shuffled", 0.5)])
def test_pages_read_along_either_orders_index_are_the_feed_laid_out_from_scratch(store, monkeypatch, best,
                                                                                 explore, share):
    """Each order is read after its cursor as ranges of its index (ties on the first keys
    included), or, when few pictures are left after the other order's cursor, along that
    order's index and sorted: either way the same pages."""
    tied(store, 1500, random.Random(13))
    for i in range(1, 200, 7):
        store.add_label(i, 3, origin="web")
    feed = Feed("web", best, explore, share, 25)
    expected = layout(store, feed)
    assert len(expected) == store.count_candidates("web")
    for short_tail in (0, 10 ** 9, 200):          # never, always, deep in the feed
        monkeypatch.setattr("storage.ranking.SHORT_TAIL", short_tail)
        assert walk(store, feed) == expected, short_tail
    for order in ORDERS:                          # one order after a cursor, at ties
        everything = scratch(store, "web", order)
        for at in (0, 1, 500, 501, len(everything) - 2):
            cursor = key(order, store.get_image(everything[at]) | {"pop_rank": None})
            got = [r["id"] for r in store.ranked_candidates("web", order, 40, beyond=[(order, cursor)])]
            assert got == everything[at + 1:at + 41], (order, at)


def vm_steps(store: Store, fn) -> int:
    """How much work SQLite did for ``fn`` (virtual machine steps, in hundreds): the same on any
    machine, unlike a time."""
    steps = [0]

    def tick():
        steps[0] += 1
        return 0
    store.db.conn.set_progress_handler(tick, 100)
    try:
        fn()
    finally:
        store.db.conn.set_progress_handler(None, 100)
    return steps[0]


@pytest.mark.parametrize("best,explore,share", [("score", "uncertain", 0.2), ("popularity", "shuffled", 0.5)])
def test_the_last_pages_cost_about_what_the_first_does_whatever_the_ties(store, best, explore, share):
    """Deep in a feed each order's pictures after its cursor are mostly placed by the other order
    already, and ties on an order's first key (no popularity, few distinct uncertainties) made a
    read step from the first of the tied pictures: the last page cost hundreds of times the
    first (70 ms at 100,000 pictures); now at most some 16 times."""
    from scorer.ranking import _page_start
    tied(store, 20_000, random.Random(14))
    feed = Feed("web", best, explore, share, 30)
    pages = -(-store.count_candidates("web") // feed.size)
    first = vm_steps(store, lambda: feed_page(store, feed, 0, Cursor(), check_more=False))
    for page in (pages - 1, pages - 2, pages // 2):        # before: 47-134 times the first
        start = _page_start(store, feed, page)
        cost = vm_steps(store, lambda p=page, s=start: feed_page(store, feed, p, s, check_more=False))
        assert cost < 25 * first, (page, cost, first)


def test_page_starts_outlast_a_restart_and_showing_a_page_writes_nothing(store):
    rnd = random.Random(15)
    fill(store, 600, rnd)
    feed = Feed("web", "score", "uncertain", 0.2, 30, model=store.model)
    changes = store.db.conn.total_changes
    before = {p: [r["id"] for r, _ in feed_page(store, feed, p)[0]] for p in (11, 8)}   # by number
    assert store.db.conn.total_changes == changes                # kept in memory only: no write
    earlier = [r["id"] for r, _ in feed_page(store, feed, 0)[0]][:10]
    store.close()                                                # every 8th page's start is saved
    with Store.open(store.path) as other:                        # meanwhile, pictures before them are rated
        for i in earlier:
            other.add_label(i, 4, origin="cli")
    again = Store.open(store.path)                               # a restart
    try:
        for p in (8, 11):                                        # 8 where it started, 11 laid out from 8
            assert [r["id"] for r, _ in feed_page(again, feed, p)[0]] == before[p], p
        moved = Feed("web", "score", "uncertain", 0.2, 30, model="another")  # another model: laid out anew
        assert [r["id"] for r, _ in feed_page(again, moved, 8)[0]] != before[8]
    finally:
        again.close()
        store.db = Store.open(store.path).db                     # (the fixture closes it)


def test_rated_pages_after_a_position_are_the_pages_by_offset_even_with_ties_in_time(store):
    from storage.store import rated_key
    rnd = random.Random(16)
    ids = add_scored(store, rnd, 60)
    stamps = [now(), now(), "2026-01-01T00:00:00.000+00:00"]
    with store.db.conn:                                  # many labels given at the same moment
        store.db.conn.executemany("INSERT INTO labels (image_id, user, value, origin, created_at) VALUES "
                                  "(?, 'owner', ?, 'web', ?)", [(i, 1 + i % 5, stamps[i % 3]) for i in ids])
    for kw in ({}, {"value": 3}, {"source": "s1"}):
        everything, total = store.rated(**kw, limit=100)
        assert len(everything) == total > 0
        for at in range(0, total - 1, 4):
            rows, none = store.rated(**kw, limit=7, after=rated_key(everything[at]), count=False)
            assert none is None and [r["id"] for r in rows] == [r["id"] for r in everything[at + 1:at + 8]], (kw, at)
