"""Comparisons in the database: "which of these two do you prefer?" answers, the second kind of
label (tables of migration ``m006_comparisons``).

A comparison is a (winner, loser) pair of pictures with where it came from (``gallery``,
``discord``, ``import``), who gave it and a ref (``MESSAGE_ID/EMOJI`` for a reaction,
``FILE:ROW`` for an imported row). The same pair given again is more evidence and is stored
again. One taken back (an undo, a removed reaction) keeps its row, marked ``removed_at``, and no
read counts it. ``compare_posts`` maps the two-picture Discord posts to their pair, so reactions
count after a restart too.

:class:`ComparisonMethods` is mixed into :class:`storage.store.Store`; it uses only ``self.db``
and the store's candidate query (``ranked_candidates``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timezone

from scorer.pairs import choose_pair

COMPARISON_ORIGINS = ("gallery", "discord", "import")
PAIR_POOL = 200       # candidates compare_pair chooses among: the most uncertain ones


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ComparisonMethods:
    db: object  # sqlite_utils.Database, set by Store

    def add_comparison(self, winner_id: int, loser_id: int, *, origin: str, user: str = "owner",
                       ref: str | None = None) -> int:
        """Record that ``winner_id`` was preferred to ``loser_id``; returns the comparison's id.
        ValueError for a picture compared with itself, an unknown picture or origin."""
        if origin not in COMPARISON_ORIGINS:
            raise ValueError(f"unknown comparison origin {origin!r} (expected one of {', '.join(COMPARISON_ORIGINS)})")
        winner_id, loser_id = int(winner_id), int(loser_id)
        if winner_id == loser_id:
            raise ValueError(f"picture #{winner_id} cannot be compared with itself")
        with self.db.conn:
            known = {r[0] for r in self.db.execute("SELECT id FROM images WHERE id IN (?, ?)", [winner_id, loser_id])}
            missing = [i for i in (winner_id, loser_id) if i not in known]
            if missing:
                raise ValueError(f"no picture #{missing[0]}")
            return self.db.execute(
                "INSERT INTO comparisons (winner_id, loser_id, origin, user, ref, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [winner_id, loser_id, origin, user, ref, _now()]).lastrowid

    def remove_comparison(self, comparison_id: int) -> bool:
        """Take a comparison back (undo): its row stays, marked removed. False if there was none
        to take back."""
        with self.db.conn:
            cur = self.db.execute("UPDATE comparisons SET removed_at = ? WHERE id = ? AND removed_at IS NULL",
                                  [_now(), int(comparison_id)])
        return cur.rowcount > 0

    def comparisons(self) -> list[dict]:
        """Every comparison not taken back, oldest first: ``id``, ``winner_id``, ``loser_id``,
        ``created_at``, ``origin``, ``user`` (the training pairs)."""
        return [dict(r) for r in self.db.query(
            "SELECT id, winner_id, loser_id, created_at, origin, user FROM comparisons "
            "WHERE removed_at IS NULL ORDER BY created_at, id")]

    def comparison_count(self, since: str | None = None) -> int:
        """Comparisons not taken back (all, or those written after ``since``)."""
        if since is None:
            return self.db.execute("SELECT COUNT(*) FROM comparisons WHERE removed_at IS NULL").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM comparisons WHERE removed_at IS NULL AND created_at > ?",
                               [since]).fetchone()[0]

    def get_comparison(self, comparison_id: int) -> dict | None:
        rows = list(self.db.query("SELECT * FROM comparisons WHERE id = ?", [int(comparison_id)]))
        return dict(rows[0]) if rows else None

    def comparison_by_ref(self, origin: str, ref: str, user: str | None = None) -> dict | None:
        """The comparison not taken back with this origin and ref (and user, if given), if any:
        the same reaction or imported row is recorded once."""
        sql = "SELECT * FROM comparisons WHERE origin = ? AND ref = ? AND removed_at IS NULL"
        params = [origin, ref]
        if user is not None:
            sql += " AND user = ?"
            params.append(user)
        rows = list(self.db.query(sql + " ORDER BY id DESC LIMIT 1", params))
        return dict(rows[0]) if rows else None

    def last_comparison(self, origin: str, user: str | None = None) -> dict | None:
        """The newest comparison not taken back from ``origin`` (and ``user``): what "undo last"
        takes back."""
        sql, params = "SELECT * FROM comparisons WHERE origin = ? AND removed_at IS NULL", [origin]
        if user is not None:
            sql += " AND user = ?"
            params.append(user)
        rows = list(self.db.query(sql + " ORDER BY created_at DESC, id DESC LIMIT 1", params))
        return dict(rows[0]) if rows else None

    def compared_pairs(self) -> set[frozenset]:
        """The pairs compared already (not taken back) or posted to be compared, as
        ``frozenset({id_a, id_b})``."""
        return {frozenset(r) for r in self.db.execute(
            "SELECT winner_id, loser_id FROM comparisons WHERE removed_at IS NULL "
            "UNION SELECT a_id, b_id FROM compare_posts")}

    def compare_pair(self, channel: str = "gallery", *, skip: Iterable[frozenset] = (),
                     accept: Callable[[dict], bool] | None = None) -> tuple[dict, dict] | None:
        """The two pictures to compare next on ``channel``: of the candidates (scored, not
        labelled, not a duplicate, not posted on ``channel``: ``ranked_candidates``), the
        ``PAIR_POOL`` most uncertain (by score when none has an uncertainty), those ``accept``
        takes, the pair the model is least sure how to order (``scorer.pairs.choose_pair``),
        leaving out pairs compared or posted already and those in ``skip``. None when no pair is
        left."""
        rows = self.ranked_candidates(channel, "uncertain", PAIR_POOL)
        if not any(r.get("uncertainty") for r in rows):
            rows = self.ranked_candidates(channel, "score", PAIR_POOL)
        if accept is not None:
            rows = [r for r in rows if accept(r)]
        return choose_pair(rows, self.compared_pairs() | set(skip))

    # ---- two-picture Discord posts -------------------------------------------------------------
    def add_compare_post(self, a_id: int, b_id: int, channel: str, channel_id: str | None, message_id: str) -> int:
        """Remember which pair a sent two-picture message asks about."""
        with self.db.conn:
            return self.db.execute(
                "INSERT INTO compare_posts (a_id, b_id, channel, channel_id, message_id, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", [a_id, b_id, channel, channel_id, str(message_id), _now()]).lastrowid

    def compare_post_by_message(self, channel: str, message_id: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM compare_posts WHERE channel = ? AND message_id = ? LIMIT 1",
                                  [channel, str(message_id)]))
        return dict(rows[0]) if rows else None

    def recent_compare_posts(self, channel: str, since: str) -> list[dict]:
        """Two-picture posts on ``channel`` since ``since`` (ISO time), oldest first."""
        return [dict(r) for r in self.db.query(
            "SELECT * FROM compare_posts WHERE channel = ? AND created_at >= ? ORDER BY id", [channel, since])]

    def posts_since_compare_post(self, channel: str) -> int:
        """Pictures posted on ``channel`` since its last two-picture post (all, if none yet)."""
        return self.db.execute(
            "SELECT COUNT(*) FROM posts WHERE channel = ? AND status = 'sent' AND sent_at > "
            "COALESCE((SELECT MAX(created_at) FROM compare_posts WHERE channel = ?), '')",
            [channel, channel]).fetchone()[0]
