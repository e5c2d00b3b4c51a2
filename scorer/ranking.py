"""Which pictures to show next: by the model's score, or by popularity while the model is cold.

Cold start: while no trained model is active, or fewer than ``train.min_labels`` pictures are
labelled, the model's scores mean little. Pictures are then ranked by their source's own
popularity signal (booru score, likes), as a percentile within that source so that sources with
large numbers do not crowd out the rest; pictures without one come after, newest first. The
exploration share is ``ranking.cold_exploration`` (default 0.5) instead of ``ranking.exploration``
(0.1): more random picks gather ratings across the whole range, which is what training needs.

Exploration: of ``n`` picks, ``n * share`` are exploration picks (a fraction is rounded up or down
at random, so 0.2 of 1 pick explores one time in five). With a trained model they are pictures the
model is least sure about (the taste head's uncertainty blended with the network's mirror-image
spread; one of the ten most uncertain at random), and their share falls as the model gets sure
(:func:`exploration_share`); while cold, uniform random candidates. They are marked ``exploration``
so posts can say so. Candidates are scored, unposted (on that channel), unlabelled and not
duplicates; ``accept`` filters them further (content rating, tag blocklist, blocked characters)
and ``near_distance`` skips pictures whose perceptual hash is that close to one already posted on
the channel. Pictures of followed characters (``characters.follow``) rank as if their score were
``characters.follow_boost`` higher (see ``Store.ranked_candidates``).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

BATCH = 10
MAX_SCANNED = 2000    # candidates looked at for one pick before giving up (all filtered out)


@dataclass
class Pick:
    image: dict
    reason: str           # score | popularity | recent | explore
    exploration: bool


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


def is_cold(store, min_labels: int) -> bool:
    """No trained model is active, or fewer than ``min_labels`` (``train.min_labels``) pictures are
    labelled."""
    active = store.active_model()
    return not (active and active.get("metrics")) or store.label_count() < min_labels


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


def exploration_count(n: int, share: float, rng: random.Random) -> int:
    whole = math.floor(n * share)
    return whole + (rng.random() < n * share - whole)


def pick(store, ranking: RankingConfig, min_labels: int, n: int = 1, *, channel: str = "discord",
         rng: random.Random | None = None, accept: Callable[[dict], bool] | None = None,
         near_distance: int = -1, follow: list[str] = (), follow_boost: float = 0.0) -> list[Pick]:
    """Up to ``n`` pictures to show next on ``channel`` (``store`` is a sync Store); cold while
    fewer than ``min_labels`` pictures are labelled (see :func:`is_cold`); pictures of the
    characters in ``follow`` are boosted by ``follow_boost``."""
    rng = rng or random.Random()
    cold = is_cold(store, min_labels)
    share = exploration_share(store, ranking, cold)
    explore_n = exploration_count(n, share, rng)
    slots = [True] * explore_n + [False] * (n - explore_n)
    rng.shuffle(slots)
    seen = [int(h) for h in store.posted_phashes(channel)] if near_distance >= 0 else []
    picks: list[Pick] = []
    passed: set[int] = set()  # chosen or filtered out
    boost = {"follow": list(follow), "follow_boost": follow_boost}
    for explore in slots:
        if explore:
            order = "random" if cold else "uncertain"
        else:
            order = "popularity" if cold else "score"
        row = _next(store, channel, order, passed, accept, seen, near_distance, rng if explore else None, boost)
        if row is None and explore:  # nothing to explore: fill the slot by rank
            explore, order = False, "popularity" if cold else "score"
            row = _next(store, channel, order, passed, accept, seen, near_distance, None, boost)
        if row is None:
            break
        if explore:
            reason = "explore"
        elif cold:
            reason = "popularity" if row.get("popularity") is not None else "recent"
        else:
            reason = "score"
        picks.append(Pick(row, reason, explore))
        if row.get("phash") and near_distance >= 0:
            seen.append(int(row["phash"], 16))
    return picks


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
