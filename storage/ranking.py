"""The candidates to show next, in the orders the ranking asks for, kept cheap at 100,000 pictures.

A *candidate* is a scored picture that is not a duplicate, still has its media, is not posted
(or being posted) on the channel asked about and is not labelled. Each order is a key the
database keeps an index for (partial indexes of migration ``m010_kept_ranking`` over the stored
scored pictures), so a page of the best candidates is read by walking an index, never by
sorting all of them:

- ``score``: the active model's score, best first (then newest);
- ``popularity``: ``images.pop_rank``, the picture's popularity as a percentile among the scored
  pictures of its source (so sources with large numbers do not crowd out the rest), kept by
  :meth:`RankingMethods.keep_popularity` as pictures are scored; pictures without a popularity
  come after, newest first;
- ``uncertain``: the model's uncertainty, most uncertain first; ``recent``: newest first;
- ``shuffled``: a fixed pseudo-random order of the ids; ``random``: that order from a random point.

Keyset paging: ``beyond`` takes (order, cursor) pairs and returns only candidates strictly after
every cursor in its order; a cursor is the :func:`key` of the last row taken. Two orders read
that way from the same set never repeat a picture, which is what *For you* pages need
(bot/web.py). Counts of candidates are kept until the database changes (this connection's
writes or another process's: SQLite's ``data_version``).

:class:`RankingMethods` is mixed into :class:`storage.store.Store`; it uses only ``self.db``.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from storage.characters import PICTURES_OF_CHARACTER, name_key
from storage.records import SCORED

# The pictures the ranking indexes cover (the same words as the indexes' WHERE, so SQLite uses them).
STORED_SCORED = f"status = '{SCORED}' AND duplicate_of IS NULL AND media_pruned_at IS NULL"
SHUFFLE = "((id * 2654435761) % 4294967291)"
SHUFFLE_MOD = 4294967291
SPREAD = 64          # random picks: steps taken from a random key (see _random_candidates)


@dataclass(frozen=True)
class Order:
    keys: tuple[str, ...]      # SQL expressions, compared as a row value
    desc: bool                 # every key descending (or every key ascending)

    def sql(self) -> str:
        return ", ".join(f"{k} {'DESC' if self.desc else 'ASC'}" for k in self.keys)

    def after(self) -> str:
        """A condition strictly after a cursor in this order; its parameters come from
        :meth:`after_params`. Written as ``k1 <= ? AND (...)`` rather than a row value so that
        SQLite seeks the index to the cursor instead of scanning it from the start."""
        op, op_eq = ("<", "<=") if self.desc else (">", ">=")
        first = self.keys[0]
        if len(self.keys) == 1:
            return f"{first} {op} ?"
        rest = f"({', '.join(self.keys[1:])}) {op} ({', '.join('?' * (len(self.keys) - 1))})"
        return f"{first} {op_eq} ? AND ({first} {op} ? OR {rest})"

    def after_params(self, cursor: tuple) -> list:
        cursor = list(cursor)
        return cursor[:1] if len(cursor) == 1 else [cursor[0], cursor[0], *cursor[1:]]


ORDERS = {
    "score": Order(("COALESCE(score, -1e9)", "id"), desc=True),
    "popularity": Order(("COALESCE(pop_rank, -1.0)", "COALESCE(popularity, 0)", "id"), desc=True),
    "uncertain": Order(("COALESCE(uncertainty, -1.0)", "id"), desc=True),
    "recent": Order(("id",), desc=True),
    "shuffled": Order((SHUFFLE, "id"), desc=False),
}


def key(order: str, row: dict) -> tuple:
    """A row's cursor in ``order`` (the values of the order's keys, as SQL computes them)."""
    if order == "score":
        return (-1e9 if row["score"] is None else row["score"], row["id"])
    if order == "popularity":
        return (-1.0 if row.get("pop_rank") is None else row["pop_rank"],
                0 if row["popularity"] is None else row["popularity"], row["id"])
    if order == "uncertain":
        return (-1.0 if row["uncertainty"] is None else row["uncertainty"], row["id"])
    if order == "recent":
        return (row["id"],)
    if order == "shuffled":
        return ((row["id"] * 2654435761) % SHUFFLE_MOD, row["id"])
    raise ValueError(f"unknown order {order!r}")


POPULATION = f"status = '{SCORED}' AND duplicate_of IS NULL AND popularity IS NOT NULL"


def ranking_indexes() -> list[str]:
    """The CREATE INDEX statements of the kept ranking (migration m010 has a frozen copy; a test
    checks they are the same)."""
    return [f"CREATE INDEX images_rank_{name} ON images({order.sql()}) WHERE {STORED_SCORED}"
            for name, order in ORDERS.items() if name != "recent"] + [
        f"CREATE INDEX images_popularity ON images(source_id, popularity) WHERE {POPULATION}"]


class RankingMethods:
    db: object  # sqlite_utils.Database, set by Store
    _candidate_counts: dict
    _popularity_added: dict

    def _candidates(self, channel: str, order: str | None = None) -> tuple[str, list]:
        """The FROM and WHERE of ``channel``'s candidates; with ``order``, read along its index
        (SQLite would otherwise pick the status index and sort every candidate)."""
        indexed = f" INDEXED BY images_rank_{order}" if order in ORDERS and order != "recent" else ""
        return (f"FROM images{indexed} WHERE {STORED_SCORED} "
                "AND id NOT IN (SELECT image_id FROM posts WHERE channel = ? AND status != 'failed') "
                "AND id NOT IN (SELECT image_id FROM labels WHERE removed_at IS NULL)", [channel])

    def ranked_candidates(self, channel: str, order: str, limit: int, exclude: Iterable[int] = (),
                          character: str | None = None, *, follow: Iterable[str] = (),
                          follow_boost: float = 0.0, beyond: Iterable[tuple[str, tuple]] = (),
                          light: bool = False) -> list[dict]:
        """Up to ``limit`` candidates on ``channel``, best first by ``order`` (see the module
        docstring), not those in ``exclude``; with ``character``, only pictures with a face of
        that character; with ``beyond``, only those strictly after each (order, cursor). A
        picture with a character in ``follow`` ranks as if its score were ``follow_boost``
        higher (by popularity: its percentile ``follow_boost / 4`` higher, a quarter because
        scores span 1-5). ``light``: only the columns the orders' keys need, as plain dicts (for
        walking many rows)."""
        if order == "random":
            return self._random_candidates(channel, limit, exclude, character)
        spec = ORDERS[order]
        base, params = self._candidates(channel, order)
        exclude = [int(i) for i in exclude]
        where = ""
        if exclude:
            where += f" AND id NOT IN ({','.join('?' * len(exclude))})"
            params += exclude
        if character:
            where += f" AND id IN ({PICTURES_OF_CHARACTER})"
            params.append(character)
        for other, cursor in beyond:
            if cursor is not None:
                where += " AND " + ORDERS[other].after()
                params += ORDERS[other].after_params(cursor)
        wanted = {name_key(n) for n in follow} if follow_boost and order in ("score", "popularity") else set()
        followed = [cid for cid, name in self.character_names().items() if name_key(name) in wanted]
        if light and not followed:
            return list(self.db.query(f"SELECT id, score, uncertainty, popularity, pop_rank {base}{where} "
                                      f"ORDER BY {spec.sql()} LIMIT ?", [*params, limit]))
        select = f"SELECT * {base}{where}"
        if not followed:
            return [self._image_row(r) for r in self.db.query(f"{select} ORDER BY {spec.sql()} LIMIT ?",
                                                               [*params, limit])]
        # Followed characters: the best of the followed pictures and of the others (each read
        # along the index), merged by the boosted key.
        of_followed = ("SELECT image_id FROM face_characters WHERE character_id IN "
                       f"({','.join('?' * len(followed))})")
        rows = [self._image_row(r) for r in self.db.query(
            f"{select} AND id IN ({of_followed}) ORDER BY {spec.sql()} LIMIT ?", [*params, *followed, limit])]
        boosted = {r["id"] for r in rows}
        rows += [self._image_row(r) for r in self.db.query(
            f"{select} AND id NOT IN ({of_followed}) ORDER BY {spec.sql()} LIMIT ?", [*params, *followed, limit])]
        bonus = follow_boost / 4 if order == "popularity" else follow_boost

        def boosted_key(row):
            k = key(order, row)
            if order == "popularity" and row.get("pop_rank") is None:
                return k          # without a popularity a picture stays after those with one, followed or not
            return (k[0] + (bonus if row["id"] in boosted else 0), *k[1:])
        return sorted(rows, key=boosted_key, reverse=True)[:limit]

    def _random_candidates(self, channel, limit, exclude, character) -> list[dict]:
        """``limit`` candidates from a random place in the shuffled order, wrapping round: random
        picks without sorting every candidate by RANDOM(). A random key alone would favour the
        pictures after large gaps between keys (ids far apart); a random step after it evens
        that out."""
        exclude = list(exclude)
        total = self.count_candidates(channel, character)
        if not total:
            return []
        base, params = self._candidates(channel, "shuffled")
        skip = ""
        if character:
            skip += f" AND id IN ({PICTURES_OF_CHARACTER})"
            params.append(character)
        # A random key, then a random step of up to SPREAD candidates from it: the chance of each
        # candidate is the mean of SPREAD gaps between keys (near uniform) at the cost of a seek
        # and SPREAD steps (an offset drawn over all of them would walk half the index).
        key_start = random.randrange(SHUFFLE_MOD)
        step = random.randrange(min(SPREAD, total))
        start = self.db.execute(f"SELECT {SHUFFLE}, id {base}{skip} AND {SHUFFLE} >= ? "
                                f"ORDER BY {ORDERS['shuffled'].sql()} LIMIT 1 OFFSET ?",
                                [*params, key_start, step]).fetchone()
        if start is None:              # ran off the end: go on from the start
            left = self.db.execute(f"SELECT COUNT(*) FROM (SELECT 1 {base}{skip} AND {SHUFFLE} >= ? LIMIT ?)",
                                   [*params, key_start, SPREAD]).fetchone()[0]
            start = self.db.execute(f"SELECT {SHUFFLE}, id {base}{skip} ORDER BY {ORDERS['shuffled'].sql()} "
                                    "LIMIT 1 OFFSET ?", [*params, (step - left) % total]).fetchone()
        cursor = [("shuffled", (start[0], start[1] - 1))] if start else []
        rows = self.ranked_candidates(channel, "shuffled", limit, exclude, character, beyond=cursor)
        if len(rows) < limit:
            rows += self.ranked_candidates(channel, "shuffled", limit - len(rows), [*exclude, *(r["id"] for r in rows)],
                                           character)
        return rows

    def count_candidates(self, channel: str, character: str | None = None) -> int:
        """How many candidates there are on ``channel`` (of one character): kept until the
        database changes."""
        version = (self.db.execute("PRAGMA data_version").fetchone()[0], self.db.conn.total_changes)
        cache = self._candidate_counts
        hit = cache.get((channel, character))
        if hit is not None and hit[0] == version:
            return hit[1]
        base, params = self._candidates(channel, "score")
        if character:
            base += f" AND id IN ({PICTURES_OF_CHARACTER})"
            params.append(character)
        n = self.db.execute(f"SELECT COUNT(*) {base}", params).fetchone()[0]
        if len(cache) > 256:
            cache.clear()
        cache[(channel, character)] = (version, n)
        return n

    # ---- the kept popularity percentiles ---------------------------------------------------
    def keep_popularity(self, image_id: int) -> None:
        """Give a newly scored picture its popularity percentile within its source (counted
        along the index, not recomputed for all); once a twentieth of a source's pictures came
        in that way, the whole source is recomputed (:meth:`refresh_popularity`), so the others'
        percentiles never drift far. Runs inside the caller's transaction."""
        row = self.db.execute("SELECT source_id, popularity FROM images WHERE id = ?", [image_id]).fetchone()
        if row is None or row[1] is None:
            return
        source_id, popularity = row
        population = f"source_id IS ? AND {POPULATION}"
        below, total = self.db.execute(
            f"SELECT COALESCE(SUM(popularity < ?), 0), COUNT(*) FROM images WHERE {population}",
            [popularity, source_id]).fetchone()
        added = self._popularity_added
        added[source_id] = added.get(source_id, 0) + 1
        if added[source_id] >= max(1, total // 20):
            self.refresh_popularity(source_id, commit=False)
            return
        self.db.execute("UPDATE images SET pop_rank = ? WHERE id = ?",
                        [below / (total - 1) if total > 1 else 0.0, image_id])

    def refresh_popularity(self, source_id: int | None = None, *, commit: bool = True) -> None:
        """Recompute the popularity percentiles of one source's scored pictures (all sources:
        ``source_id`` None) from scratch: PERCENT_RANK of its popularity among them."""
        sources = ([source_id] if source_id is not None else
                   [r[0] for r in self.db.execute("SELECT DISTINCT source_id FROM images")])

        def run():
            for sid in sources:
                ranks = self.db.execute(
                    "SELECT PERCENT_RANK() OVER (ORDER BY popularity), id FROM images INDEXED BY images_popularity "
                    f"WHERE source_id IS ? AND {POPULATION}", [sid]).fetchall()
                self.db.conn.executemany("UPDATE images SET pop_rank = ? WHERE id = ?", ranks)
                self._popularity_added[sid] = 0
        if commit:
            with self.db.conn:
                run()
        else:
            run()
