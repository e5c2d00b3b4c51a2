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
(bot/web.py). An order is read after its own cursor as a few seeks of its index
(:meth:`Order.ranges`: ties on its first keys are stepped over, not through), and the other
order's cursor filters; deep in a feed, when fewer than ``SHORT_TAIL`` pictures are left after
the other order's cursor, those are read along that order's index and sorted instead (each
order's own tail is then mostly pictures the other one placed already). Counts of candidates
are kept until the database changes (this connection's writes or another process's: SQLite's
``data_version``). Where each feed page starts is kept too (:meth:`RankingMethods.keep_page_start`;
every eighth page's start is saved in the settings when the store closes, so that a page asked
for by its number after a restart is not laid out from the first page).

:class:`RankingMethods` is mixed into :class:`storage.store.Store`; it uses only ``self.db``.
"""
from __future__ import annotations

import base64
import json
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
SHORT_TAIL = 1000    # read along another order's index when fewer pictures are left after its cursor
PAGE_STARTS_KEPT = 4096          # feed page starts a store keeps (pages of the feeds seen)
PAGE_STARTS = "page_starts"      # the setting that keeps them over a restart ...
PAGE_STARTS_SAVED_EVERY = 8      # ... every eighth page's (a page between is laid out from one of them)


@dataclass(frozen=True)
class Order:
    keys: tuple[str, ...]      # SQL expressions, compared as a row value
    desc: bool                 # every key descending (or every key ascending)

    def sql(self) -> str:
        return ", ".join(f"{k} {'DESC' if self.desc else 'ASC'}" for k in self.keys)

    def after(self) -> str:
        """A condition strictly after a cursor in this order, as a filter (its parameters: the
        cursor's values); reading along this order's own index uses :meth:`ranges` instead."""
        return f"({', '.join(self.keys)}) {'<' if self.desc else '>'} ({', '.join('?' * len(self.keys))})"

    def ranges(self, cursor: tuple) -> list[tuple[str, list, str]]:
        """The rows strictly after ``cursor`` as ranges of this order's index, in order: (WHERE
        condition, its parameters, ORDER BY). Range i keeps the first i keys equal to the
        cursor's and the next one strictly after it, from the most keys kept to none. Each is one
        seek of the index: a single condition on the keys as a row value (or ``k1 <= ?``) would
        seek on the first key only and step through every row tied with the cursor's there (all
        pictures without a popularity, say). Each range is ordered by its free keys only (SQLite
        would sort the range otherwise, not seeing that the equal keys are constant)."""
        op, way = ("<", "DESC") if self.desc else (">", "ASC")
        return [(" AND ".join([*(f"{k} = ?" for k in self.keys[:i]), f"{self.keys[i]} {op} ?"]),
                 list(cursor[:i + 1]), ", ".join(f"{k} {way}" for k in self.keys[i:]))
                for i in reversed(range(len(self.keys)))]


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


def pack(value) -> str:
    """A JSON value as a short string for a page's address (a keyset cursor)."""
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def unpack(token: str):
    """The value of :func:`pack`; ValueError for anything else."""
    try:
        return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (TypeError, UnicodeDecodeError) as e:
        raise ValueError(str(e)) from None


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
    _page_starts: dict | None
    _page_starts_changed: bool

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
        wanted = {name_key(n) for n in follow} if follow_boost and order in ("score", "popularity") else set()
        followed = [cid for cid, name in self.character_names().items() if name_key(name) in wanted]
        cursors = [(o, tuple(c)) for o, c in beyond if c is not None]
        own = next((c for o, c in cursors if o == order), None)   # read as ranges of the order's index
        via = None if followed else self._short_tail([(o, c) for o, c in cursors if o != order])
        base, params = self._candidates(channel, via[0] if via else order)
        exclude = [int(i) for i in exclude]
        where = ""
        if exclude:
            where += f" AND id NOT IN ({','.join('?' * len(exclude))})"
            params += exclude
        if character:
            where += f" AND id IN ({PICTURES_OF_CHARACTER})"
            params.append(character)
        for other, cursor in cursors:
            if (other, cursor) != via and (other, cursor) != (order, own):
                where += f" AND {ORDERS[other].after()}"
                params += list(cursor)
        columns = "id, score, uncertainty, popularity, pop_rank" if light and not followed else "*"
        if via:
            # Fewer than SHORT_TAIL pictures are left after another order's cursor: every
            # candidate is among them, so read those (along that order's index) and sort them,
            # rather than step through this order's index past the pictures that order placed.
            if own is not None:
                where += f" AND {spec.after()}"
                params += list(own)
            rows = []
            for condition, values, _ in ORDERS[via[0]].ranges(via[1]):
                rows += self.db.query(f"SELECT {columns} {base}{where} AND {condition}", [*params, *values])
            rows = sorted(rows, key=lambda r: key(order, r), reverse=spec.desc)[:limit]
            return rows if columns != "*" else [self._image_row(r) for r in rows]
        if columns != "*":
            return self._along(f"SELECT {columns} {base}{where}", params, spec, own, limit)
        select = f"SELECT * {base}{where}"
        if not followed:
            return [self._image_row(r) for r in self._along(select, params, spec, own, limit)]
        # Followed characters: the best of the followed pictures and of the others (each read
        # along the index), merged by the boosted key.
        of_followed = ("SELECT image_id FROM face_characters WHERE character_id IN "
                       f"({','.join('?' * len(followed))})")
        rows = [self._image_row(r) for r in self._along(f"{select} AND id IN ({of_followed})",
                                                        [*params, *followed], spec, own, limit)]
        boosted = {r["id"] for r in rows}
        rows += [self._image_row(r) for r in self._along(f"{select} AND id NOT IN ({of_followed})",
                                                         [*params, *followed], spec, own, limit)]
        bonus = follow_boost / 4 if order == "popularity" else follow_boost

        def boosted_key(row):
            k = key(order, row)
            if order == "popularity" and row.get("pop_rank") is None:
                return k          # without a popularity a picture stays after those with one, followed or not
            return (k[0] + (bonus if row["id"] in boosted else 0), *k[1:])
        return sorted(rows, key=boosted_key, reverse=True)[:limit]

    def _along(self, select: str, params: list, spec: Order, cursor: tuple | None, limit: int) -> list[dict]:
        """Up to ``limit`` rows of ``select`` (a query ending in its WHERE conditions) in
        ``spec``'s order, only those strictly after ``cursor`` (None: from the start), reading
        the ranges of :meth:`Order.ranges` one after another until there are enough."""
        if cursor is None:
            return list(self.db.query(f"{select} ORDER BY {spec.sql()} LIMIT ?", [*params, limit]))
        rows: list[dict] = []
        for condition, values, order_by in spec.ranges(cursor):
            rows += self.db.query(f"{select} AND {condition} ORDER BY {order_by} LIMIT ?",
                                  [*params, *values, limit - len(rows)])
            if len(rows) >= limit:
                break
        return rows

    def _short_tail(self, cursors: list[tuple[str, tuple]]) -> tuple[str, tuple] | None:
        """The (order, cursor) of ``cursors`` with the fewest stored scored pictures after it, if
        fewer than SHORT_TAIL (counted along its index, at most SHORT_TAIL steps each)."""
        best = None
        for order, cursor in cursors:
            if order not in ORDERS or order == "recent":
                continue
            n = 0
            for condition, values, _ in ORDERS[order].ranges(cursor):
                n += self.db.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM images INDEXED BY images_rank_{order} "
                                     f"WHERE {STORED_SCORED} AND {condition} LIMIT ?)",
                                     [*values, SHORT_TAIL - n]).fetchone()[0]
                if n >= SHORT_TAIL:
                    break
            if n < SHORT_TAIL and (best is None or n < best[0]):
                best = (n, (order, cursor))
        return best[1] if best else None

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
        database changes. All of them are counted as the stored scored pictures (along their
        index) less those posted on the channel or labelled: a few thousand lookups rather than
        two for each of 100,000 pictures."""
        def count() -> int:
            if character:
                base, params = self._candidates(channel, "score")
                return self.db.execute(f"SELECT COUNT(*) {base} AND id IN ({PICTURES_OF_CHARACTER})",
                                       [*params, character]).fetchone()[0]
            return self.db.execute(
                f"SELECT (SELECT COUNT(*) FROM images INDEXED BY images_rank_score WHERE {STORED_SCORED}) - "
                f"(SELECT COUNT(*) FROM images WHERE {STORED_SCORED} AND id IN (SELECT image_id FROM posts "
                "WHERE channel = ? AND status != 'failed' UNION SELECT image_id FROM labels WHERE removed_at IS NULL))",
                [channel]).fetchone()[0]
        return self.kept(("candidates", channel, character), count)

    def kept(self, key: tuple, compute):
        """``compute()``, kept under ``key`` until the database changes (this connection's writes
        or another process's: SQLite's ``data_version``)."""
        version = (self.db.execute("PRAGMA data_version").fetchone()[0], self.db.conn.total_changes)
        cache = self._candidate_counts
        hit = cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        value = compute()
        if len(cache) > 256:
            cache.clear()
        cache[key] = (version, value)
        return value

    # ---- where feed pages start ---------------------------------------------------------------
    def _kept_starts(self) -> dict[tuple[str, int], str]:
        """(feed, page) -> the cursor where that page starts (scorer/ranking.py ``feed_page``:
        opaque strings here), read from the settings the first time: the starts kept before the
        last close."""
        if self._page_starts is None:
            saved = self.get_setting(PAGE_STARTS, {})
            self._page_starts = {}
            if isinstance(saved, dict):
                for feed, pages in saved.items():
                    if isinstance(pages, dict):
                        self._page_starts.update(((feed, int(p)), c) for p, c in pages.items()
                                                 if p.isdigit() and isinstance(c, str))
        return self._page_starts

    def kept_page_start(self, feed: str, page: int) -> str | None:
        return self._kept_starts().get((feed, page))

    def nearest_page_start(self, feed: str, page: int) -> tuple[int, str | None]:
        """The kept start of ``feed`` nearest before ``page``, as (its page, its cursor); (0, None)
        when none is kept."""
        kept = self._kept_starts()
        known = max((p for (f, p) in kept if f == feed and p < page), default=0)
        return known, kept.get((feed, known))

    def keep_page_start(self, feed: str, page: int, cursor: str) -> None:
        """Keep where a feed page starts, in memory (at most PAGE_STARTS_KEPT: then they start
        over); :meth:`save_page_starts` writes them when the store closes."""
        kept = self._kept_starts()
        if kept.get((feed, page)) == cursor:
            return
        if len(kept) >= PAGE_STARTS_KEPT:
            kept.clear()
        kept[(feed, page)] = cursor
        self._page_starts_changed = True

    def save_page_starts(self) -> None:
        """Write the kept starts of every PAGE_STARTS_SAVED_EVERY-th page into the settings (if
        any changed since they were read), so that a page asked for by its number after a restart
        is laid out from at most a few pages before it, not from the first page. One write when
        the store closes, none while pages are shown."""
        if not self._page_starts_changed:
            return
        saved: dict[str, dict[str, str]] = {}
        for (feed, page), cursor in self._kept_starts().items():
            if page % PAGE_STARTS_SAVED_EVERY == 0:
                saved.setdefault(feed, {})[str(page)] = cursor
        self.set_setting(PAGE_STARTS, saved)
        self._page_starts_changed = False

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
