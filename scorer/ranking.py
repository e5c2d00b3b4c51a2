"""Which pictures to show next: by the model's score, or by popularity while the model is cold.

Cold start: while no trained model is active, or fewer than ``train.min_labels`` pictures are
labelled, the model's scores mean little. Pictures are then ranked by their source's own
popularity signal (booru score, likes), as a percentile within that source so that sources with
large numbers do not crowd out the rest; pictures without one come after, newest first. The
exploration share is ``ranking.cold_exploration`` (default 0.5) instead of ``ranking.exploration``
(0.2): more random picks gather ratings across the whole range, which is what training needs.

Exploration: of the pictures actually shown (a page of the gallery, a Discord posting cycle;
not the page size or the number asked for), ``share`` are exploration picks
(:func:`exploration_slots`): the share rounded to the nearest whole number (in a Discord cycle,
rounded up or down at random, so 0.2 of 1 post explores one time in five), never the first of
several pictures, and spread after it at an even rhythm, so the best predicted stay on top and
the others stay in strict rank order. With a trained model they are pictures the model is least
sure about (the taste head's uncertainty blended with the network's mirror-image spread; one of
the ten most uncertain at random), and their share falls as the model gets sure
(:func:`exploration_share`); while cold, uniform random candidates. They are marked
``exploration`` so posts and cards can say so. Candidates are scored, unposted (on that
channel), unlabelled and not duplicates; ``accept`` filters them further (content rating, tag
blocklist, blocked characters) and ``near_distance`` skips pictures whose perceptual hash is
that close to one already posted on the channel. Pictures of followed characters
(``characters.follow``) rank as if their score were ``characters.follow_boost`` higher (see
``Store.ranked_candidates``).

Until a trained model is active (:func:`is_trained`: its registry row has metrics) its scores
carry no taste: the gallery, ``score`` and Discord posts say "not yet trained" (or show the
popularity that ranks the picture) instead of the number.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable

BATCH = 10
MAX_SCANNED = 2000    # candidates looked at for one pick before giving up (all filtered out)


@dataclass
class Pick:
    image: dict
    reason: str           # score | popularity | recent | explore
    exploration: bool
    cold: bool = False    # picked while cold: the model's score means nothing yet


@dataclass
class RankingConfig:
    """The ``[ranking]`` table."""
    exploration: float = 0.2              # share of picks made to learn (uncertain pictures), not by score
    cold_exploration: float = 0.5         # the share while the model is untrained (cold start)

    def check(self):
        for key in ("exploration", "cold_exploration"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                return key, f"expected a number from 0 to 1, got {value!r}"
        return None


def is_trained(store) -> bool:
    """A trained model is active (a training run or head refit registered it with metrics); until
    then its scores are the untrained network's and mean nothing."""
    active = store.active_model()
    return bool(active and active.get("metrics"))


def is_cold(store, min_labels: int) -> bool:
    """No trained model is active, or fewer than ``min_labels`` (``train.min_labels``) pictures are
    labelled."""
    return not is_trained(store) or store.label_count() < min_labels


def exploration_share(store, ranking: RankingConfig, cold: bool) -> float:
    """The share of picks that explore: ``ranking.cold_exploration`` while cold; then
    ``ranking.exploration`` scaled by how unsure the model still is, its validation RMSE over the
    spread of your ratings (1: no better than always guessing your average; 0.25 at least), so
    exploration falls as the model gets sure."""
    if cold:
        return ranking.cold_exploration
    import json

    active = store.active_model() or {}
    try:
        rmse = (json.loads(active.get("metrics") or "{}").get("val") or {}).get("rmse")
    except ValueError:
        rmse = None
    spread = store.rating_spread()
    if not rmse or not spread:
        return ranking.exploration
    return ranking.exploration * min(1.0, max(MIN_EXPLORATION_FACTOR, rmse / spread))


MIN_EXPLORATION_FACTOR = 0.25


def exploration_slots(shown: int, share: float, rng: random.Random | None = None) -> list[bool]:
    """Which of ``shown`` pictures (best first) are exploration picks, position by position.

    There are ``round(share * shown)`` of them (with ``rng``, the fraction is rounded up or down
    at random instead, so that cycles of a few posts explore ``share`` of them in the long run).
    The first of several pictures is never one (unless ``share`` is 1): it stays the best
    predicted. They are spread evenly after it, counted from the end: 10 shown at 0.5 explore the
    2nd, 4th, ... 10th; at 0.2 the 5th and 10th; 3 at 0.5 the 2nd and 3rd."""
    if shown <= 0:
        return []
    if share >= 1:
        return [True] * shown
    exact = shown * share
    if rng is None:
        count = round(exact)
    else:
        whole = math.floor(exact)
        count = whole + (rng.random() < exact - whole)
    if shown > 1:
        count = min(count, shown - 1)
    slots = [False] * shown
    for j in range(count):
        slots[shown - 1 - math.floor(j * shown / count)] = True
    return slots


def interleave(slots: list[bool], best: Iterable[dict], explore: Iterable[dict]) -> list[tuple[dict, bool]]:
    """Fill ``slots`` (:func:`exploration_slots`) from two orders of the same candidates, each
    picture once: an exploration slot takes the next of ``explore`` not placed yet (none left:
    the next best, not marked), every other slot the next of ``best`` not placed yet. Returns
    (row, explored) pairs, fewer than the slots when ``best`` runs out; the ranked ones keep
    ``best``'s order."""
    best, explore = iter(best), iter(explore)
    placed: set[int] = set()

    def take(rows):
        for row in rows:
            if row["id"] not in placed:
                placed.add(row["id"])
                return row
        return None

    out = []
    for slot in slots:
        row = take(explore) if slot else None
        explored = row is not None
        row = row or take(best)
        if row is None:
            break
        out.append((row, explored))
    return out


def pick(store, ranking: RankingConfig, min_labels: int, n: int = 1, *, channel: str = "discord",
         rng: random.Random | None = None, accept: Callable[[dict], bool] | None = None,
         near_distance: int = -1, follow: list[str] = (), follow_boost: float = 0.0) -> list[Pick]:
    """Up to ``n`` pictures to show next on ``channel`` (``store`` is a sync Store), best first,
    with the exploration share of those there are placed by :func:`exploration_slots`; cold while
    fewer than ``min_labels`` pictures are labelled (see :func:`is_cold`); pictures of the
    characters in ``follow`` are boosted by ``follow_boost``."""
    rng = rng or random.Random()
    cold = is_cold(store, min_labels)
    share = exploration_share(store, ranking, cold)
    ranked = "popularity" if cold else "score"
    boost = {"follow": list(follow), "follow_boost": follow_boost}
    posted = [int(h) for h in store.posted_phashes(channel)] if near_distance >= 0 else []

    def ranked_run(explore_slots: list[bool]) -> list[Pick]:
        seen, passed, picks = list(posted), set(), []   # passed: chosen or filtered out
        for explore in explore_slots:
            order = ("random" if cold else "uncertain") if explore else ranked
            row = _next(store, channel, order, passed, accept, seen, near_distance, rng if explore else None, boost)
            if row is None and explore:  # nothing to explore: fill the slot by rank
                explore, order = False, ranked
                row = _next(store, channel, order, passed, accept, seen, near_distance, None, boost)
            if row is None:
                break
            if explore:
                reason = "explore"
            elif cold:
                reason = "popularity" if row.get("popularity") is not None else "recent"
            else:
                reason = "score"
            picks.append(Pick(row, reason, explore, cold))
            if row.get("phash") and near_distance >= 0:
                seen.append(int(row["phash"], 16))
        return picks

    # The share is of the pictures there are to show (up to n), not of n.
    best = ranked_run([False] * n)
    slots = exploration_slots(len(best), share, rng)
    return ranked_run(slots) if any(slots) else best


def _next(store, channel, order, passed, accept, seen, near_distance, rng, boost) -> dict | None:
    scanned = 0
    while scanned < MAX_SCANNED:
        rows = store.ranked_candidates(channel, order, BATCH, exclude=passed, **boost)
        if not rows:
            return None
        if rng is not None and order == "uncertain":
            rng.shuffle(rows)
        for row in rows:
            scanned += 1
            passed.add(row["id"])
            if accept is not None and not accept(row):
                continue
            if near_distance >= 0 and row.get("phash"):
                h = int(row["phash"], 16)
                if any((h ^ other).bit_count() <= near_distance for other in seen):
                    continue
            return row
    return None


# ---- pages of a feed (the gallery's For you) ------------------------------------------------
@dataclass(frozen=True)
class Feed:
    """One feed: its candidates (channel, character) and how they are laid out. The exploration
    share is not part of its identity: it moves with every rating once trained, and a page start
    kept under the old share still places the same pictures (only the layout of later pages
    follows the new share)."""
    channel: str
    best: str              # the ranked order: score | popularity
    explore: str           # the exploration order: uncertain | shuffled
    share: float = field(compare=False)   # the exploration share
    size: int = 30         # pictures per page
    character: str | None = None
    model: str | None = None   # the active model's version (its scores make the order)

    def slots(self, shown: int) -> list[bool]:
        return exploration_slots(shown, self.share)

    @property
    def key(self) -> str:
        """The feed's identity as a string (where its page starts are kept)."""
        return json.dumps([self.channel, self.size, self.character, self.best, self.explore, self.model])

    @property
    def tag(self) -> str:
        """What a cursor of this feed is only valid for: its orders and the model that scored it."""
        return f"{self.best}/{self.explore}/{self.model}"


@dataclass(frozen=True)
class Cursor:
    """Where a feed page starts: the key (``storage.ranking.key``) of the last picture taken so
    far from the ranked order and from the exploration order (None: none yet). Every picture at
    or before either is placed, so the rest of the feed is the candidates after both."""
    best: tuple | None = None
    explore: tuple | None = None

    def token(self, feed: Feed) -> str:
        """The cursor as a short string for a page's address (valid for ``feed`` only)."""
        from storage.ranking import pack
        return pack([feed.tag, self.best, self.explore])

    @classmethod
    def from_token(cls, token: str, feed: Feed) -> "Cursor | None":
        """The cursor of :meth:`token`, or None for anything malformed or made for another feed
        (other orders, another model: after a training run, say), so the page falls back to the
        kept start of its number."""
        from storage.ranking import ORDERS, unpack

        try:
            tag, best, explore = unpack(token)
            if tag != feed.tag:
                return None
            parts = []
            for order, k in ((feed.best, best), (feed.explore, explore)):
                if k is None:
                    parts.append(None)
                    continue
                if not isinstance(k, list) or len(k) != len(ORDERS[order].keys) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 2 ** 62 and v == v
                        for v in k):
                    return None
                parts.append(tuple(k))
            return cls(*parts)
        except (ValueError, TypeError, KeyError):
            return None


def feed_page(store, feed: Feed, page: int, start: Cursor | None = None, *, check_more: bool = True
              ) -> tuple[list[tuple[dict, bool]], Cursor, bool]:
    """Page ``page`` (from 0) of ``feed``: up to ``feed.size`` (row, explored) pairs laid out by
    :func:`interleave`, the cursor where the next page starts, and whether any picture is left
    after it. Every page is cut from one sequence, as if the whole feed were laid out from the
    start (each full page before it alike): keyset paging, reading only the rows of this page
    from each order's index. ``start``: the cursor the previous page gave (a page's address
    carries it); without one, the store's kept cursor of that page number, found by walking from
    the nearest page it knows. ``check_more``: False when only the page is wanted (the Picture
    page's neighbours): "more" is then left False."""
    total = store.count_candidates(feed.channel, feed.character)
    if start is None:
        if page * feed.size >= total:
            return [], Cursor(), False        # past the end (by number): nothing to lay out
        start = _page_start(store, feed, page)
    beyond = [(feed.best, start.best), (feed.explore, start.explore)]
    best = store.ranked_candidates(feed.channel, feed.best, feed.size, character=feed.character, beyond=beyond)
    slots = feed.slots(len(best))     # fewer than a page's worth left: the last page's layout
    explore = store.ranked_candidates(feed.channel, feed.explore, len(best), character=feed.character,
                                      beyond=beyond) if any(slots) else []
    placed = interleave(slots, best, explore)
    end = _advance(feed, start, placed)
    _keep(store, feed, page + 1, end)
    if not check_more or len(placed) < feed.size:
        more = False                    # a short page is the last one
    elif (page + 1) * feed.size < total:
        more = True                     # more candidates than pages so far (cheap; a picture arrived
    else:                               # ahead of the cursor may leave the next page empty)
        more = bool(store.ranked_candidates(feed.channel, feed.best, 1, character=feed.character,
                                            beyond=[(feed.best, end.best), (feed.explore, end.explore)], light=True))
    return placed, end, more


def _advance(feed: Feed, start: Cursor, placed: list[tuple[dict, bool]]) -> Cursor:
    from storage.ranking import key
    best, explore = start.best, start.explore
    for row, explored in placed:
        if explored:
            explore = key(feed.explore, row)
        else:
            best = key(feed.best, row)
    return Cursor(best, explore)


def _keep(store, feed: Feed, page: int, cursor: Cursor) -> None:
    store.keep_page_start(feed.key, page, cursor.token(feed))


def _page_start(store, feed: Feed, page: int) -> Cursor:
    """The kept cursor where page ``page`` starts (kept in memory and, over a restart, in the
    settings: ``Store.save_page_starts``); pages not seen yet are laid out from the nearest kept
    page before it, reading only the orders' keys, and kept on the way."""
    if page == 0:
        return Cursor()
    token = store.kept_page_start(feed.key, page)
    cursor = Cursor.from_token(token, feed) if token else None
    if cursor is not None:
        return cursor
    known, token = store.nearest_page_start(feed.key, page)
    cursor = Cursor.from_token(token, feed) if token else None
    if cursor is None:
        known, cursor = 0, Cursor()
    n = (page - known) * feed.size
    beyond = [(feed.best, cursor.best), (feed.explore, cursor.explore)]
    best = store.ranked_candidates(feed.channel, feed.best, n, character=feed.character, beyond=beyond, light=True)
    explore = store.ranked_candidates(feed.channel, feed.explore, n, character=feed.character, beyond=beyond,
                                      light=True) if any(feed.slots(feed.size)) else []
    placed = interleave(feed.slots(feed.size) * (page - known), best, explore)
    for p in range(known + 1, page + 1):
        cursor = _advance(feed, cursor, placed[(p - 1 - known) * feed.size:(p - known) * feed.size])
        _keep(store, feed, p, cursor)
    return cursor
