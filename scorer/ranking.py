"""Which pictures to show next: by the model's score, or by popularity while the model is cold.

Cold start: while no trained model is active, or fewer than ``train.min_labels`` pictures are
labelled, the model's scores mean little. Pictures are then ranked by their source's own
popularity signal (booru score, likes), as a percentile within that source so that sources with
large numbers do not crowd out the rest; pictures without one come after, newest first. The
exploration share is ``ranking.cold_exploration`` (default 0.5) instead of ``ranking.exploration``
(0.1): more random picks gather ratings across the whole range, which is what training needs.

Exploration picks are uniform random candidates, marked ``exploration`` so posts can say so.
Candidates are scored, unposted (on that channel), unlabelled and not duplicates.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass


@dataclass
class Pick:
    image: dict
    reason: str           # score | popularity | recent | explore
    exploration: bool


def is_cold(store, cfg) -> bool:
    active = store.active_model()
    return not (active and active.get("metrics")) or store.label_count() < cfg.train.min_labels


def pick(store, cfg, n: int = 1, *, channel: str = "discord", rng: random.Random | None = None) -> list[Pick]:
    """Up to ``n`` pictures to show next on ``channel`` (``store`` is a sync Store)."""
    rng = rng or random.Random()
    cold = is_cold(store, cfg)
    share = cfg.ranking.cold_exploration if cold else cfg.ranking.exploration
    picks: list[Pick] = []
    chosen: set[int] = set()
    for _ in range(n):
        explore = rng.random() < share
        rows = store.ranked_candidates(channel, "random" if explore else ("popularity" if cold else "score"),
                                       1, exclude=chosen)
        if not rows:
            break
        row = rows[0]
        if explore:
            reason = "explore"
        elif cold:
            reason = "popularity" if row.get("popularity") is not None else "recent"
        else:
            reason = "score"
        row["tags"] = json.loads(row["tags"] or "[]") if isinstance(row.get("tags"), str) else row.get("tags")
        picks.append(Pick(row, reason, explore))
        chosen.add(row["id"])
    return picks
