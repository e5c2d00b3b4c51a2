"""Comparisons ("which of these two do you prefer?"): the store on a real SQLite file, the pair
choice, the gallery's Compare page, the Discord A/B post and import-labels of winner,loser CSVs."""
from __future__ import annotations

import pytest

from scorer.pairs import choose_pair, p_wrong
from storage import AsyncStore, Store
from tests.helpers import make_config, seed


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
