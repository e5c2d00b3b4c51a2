"""Which two pictures to compare next: the pair the model is least sure how to order.

With predicted scores ``s`` and uncertainties ``u`` (a spread, read as a standard deviation), the
chance that the model orders a pair the wrong way round is

    P(wrong) = Phi(-|s_a - s_b| / sqrt(u_a^2 + u_b^2 + eps))

(Phi: the standard normal distribution function): close scores and large uncertainties make it
near 1/2, where the owner's answer teaches the most. :func:`choose_pair` is a plain function of
rows, so the store (``Store.compare_pair``) and the tests share it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

EPS = 1e-6            # keeps the spread positive when neither picture has an uncertainty


def separation(a: dict, b: dict) -> float:
    """``|s_a - s_b| / sqrt(u_a^2 + u_b^2 + eps)`` of rows with ``score`` and ``uncertainty``
    (None meaning 0): the smaller, the likelier the model has the pair the wrong way round (it
    ranks pairs where P(wrong) itself is too small for a float)."""
    ua, ub = a.get("uncertainty") or 0.0, b.get("uncertainty") or 0.0
    return abs(a["score"] - b["score"]) / math.sqrt(ua * ua + ub * ub + EPS)


def p_wrong(a: dict, b: dict) -> float:
    """The chance that the model orders ``a`` and ``b`` the wrong way round: Phi(-separation)."""
    return 0.5 * math.erfc(separation(a, b) / math.sqrt(2))


def choose_pair(rows: Iterable[dict], compared: set[frozenset]) -> tuple[dict, dict] | None:
    """The pair of ``rows`` (each with ``id``, ``score``, ``uncertainty``) the model is least sure
    how to order, skipping pairs in ``compared`` (``frozenset({id_a, id_b})``) and rows without a
    score; among equally unsure pairs, the one with the larger summed uncertainty, then the first in
    ``rows``' order. None when no pair is left (fewer than two rows)."""
    rows = [r for r in rows if r.get("score") is not None]
    best, best_key = None, None
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["id"] == b["id"] or frozenset((a["id"], b["id"])) in compared:
                continue
            key = (-separation(a, b), (a.get("uncertainty") or 0.0) + (b.get("uncertainty") or 0.0))
            if best_key is None or key > best_key:
                best, best_key = (a, b), key
    return best
