"""All reads and writes of the database, as plain methods on one connection.

A :class:`Store` belongs to the thread that opened it (sqlite-utils 4: one connection per thread).
The daemon uses it through :class:`storage.writer.AsyncStore`, which runs every call on a single
writer thread; the command line uses it directly, as a context manager that closes it::

    with Store.open(path) as store:
        store.status_counts()
"""
from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import sqlite_utils

from storage.boxes import BoxMethods
from storage.characters import PICTURES_OF_CHARACTER, CharacterMethods
from storage.comparisons import ComparisonMethods
from storage.db import open_db
from storage.features import FeatureMethods
from storage.media import ImageInfo, PhashIndex
from storage.ranking import Order, RankingMethods
from storage.redetect import RedetectMethods
from storage.records import (DOWNLOADED, DUPLICATE, FAILED, IMPORTING, NEAR_DUPLICATE, PENDING, SCORED,
                             SKIPPED, Face)

log = logging.getLogger("tastefeed.store")

# stored pictures (the bytes are in the media folder), as an SQL list
_STORED = f"('{DOWNLOADED}', '{SCORED}', '{SKIPPED}')"


# Rated pictures, newest label first (Store.rated); a row's position in it is rated_key(row).
RATED = Order(("labels.created_at", "labels.id"), desc=True)


def rated_key(row: dict) -> tuple[str, int]:
    return (row["labelled_at"], row["label_id"])


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class NewItem:
    """A picture a source found, before download (mirrors ``sources.base.Item``)."""
    external_id: str
    media_url: str | None = None
    local_path: str | None = None
    page_url: str | None = None
    author: str | None = None
    title: str | None = None
    tags: list[str] = field(default_factory=list)
    characters: list[str] = field(default_factory=list)  # characters the site's tags name (booru)
    rating: str | None = None
    popularity: float | None = None
    site_md5: str | None = None
    posted_at: str | None = None
    skip: str | None = None        # recorded but not downloaded or scored, and why (e.g. a video)


class Store(BoxMethods, CharacterMethods, ComparisonMethods, FeatureMethods, RankingMethods, RedetectMethods):
    def __init__(self, db: sqlite_utils.Database, path: Path | None = None):
        self.db = db
        self.path = path
        self._phash_index: PhashIndex | None = None
        self._candidate_counts: dict = {}      # storage/ranking.py kept(): counts kept until the database changes
        self._popularity_added: dict = {}      # storage/ranking.py: percentiles given one by one, per source
        self._page_starts: dict | None = None  # storage/ranking.py: where feed pages start (saved on close)
        self._page_starts_changed = False

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        return cls(open_db(path), Path(path))

    def close(self) -> None:
        try:
            self.save_page_starts()
        except sqlite3.Error as e:     # a cache: losing it costs one slow page later, never the close
            log.warning("could not keep the feed page starts: %s", e)
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- sources -------------------------------------------------------------------------
    def upsert_source(self, name: str, kind: str, config: dict, origin: str = "config") -> int:
        row = self.get_source(name)
        with self.db.conn:
            if row is None:
                cur = self.db.execute(
                    "INSERT INTO sources (name, kind, config, origin, created_at) VALUES (?, ?, ?, ?, ?)",
                    [name, kind, json.dumps(config, sort_keys=True), origin, now()])
                return cur.lastrowid
            if row["kind"] != kind:
                # A new kind under an old name: the old cursor means nothing to it.
                self.db.execute("UPDATE sources SET cursor = '{}' WHERE id = ?", [row["id"]])
            self.db.execute("UPDATE sources SET kind = ?, config = ?, origin = ? WHERE id = ?",
                            [kind, json.dumps(config, sort_keys=True), origin, row["id"]])
            return row["id"]

    def get_source(self, name: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM sources WHERE name = ?", [name]))
        return self._source_row(rows[0]) if rows else None

    def list_sources(self) -> list[dict]:
        return [self._source_row(r) for r in self.db.query("SELECT * FROM sources ORDER BY name")]

    @staticmethod
    def _source_row(row: dict) -> dict:
        row = dict(row)
        row["config"] = json.loads(row["config"])
        row["cursor"] = json.loads(row["cursor"] or "{}")
        return row

    def source_name(self, source_id: int) -> str | None:
        row = self.db.execute("SELECT name FROM sources WHERE id = ?", [source_id]).fetchone()
        return row[0] if row else None

    def remove_source(self, name: str) -> bool:
        with self.db.conn:
            cur = self.db.execute("DELETE FROM sources WHERE name = ?", [name])
        return cur.rowcount > 0

    def source_polled(self, source_id: int, *, error: str | None, next_poll_at: str | None,
                      unhealthy_after: int = 3, force_unhealthy: bool = False) -> dict:
        """Record the outcome of a poll: success resets failures; errors count up to unhealthy."""
        with self.db.conn:
            if error is None:
                self.db.execute(
                    "UPDATE sources SET healthy = 1, failures = 0, last_error = NULL, last_poll_at = ?, "
                    "last_success_at = ?, next_poll_at = ? WHERE id = ?",
                    [now(), now(), next_poll_at, source_id])
            else:
                self.db.execute(
                    "UPDATE sources SET failures = failures + 1, last_error = ?, last_poll_at = ?, "
                    "next_poll_at = ?, healthy = CASE WHEN ? OR failures + 1 >= ? THEN 0 ELSE healthy END "
                    "WHERE id = ?",
                    [error, now(), next_poll_at, int(force_unhealthy), unhealthy_after, source_id])
        return self._source_row(next(self.db.query("SELECT * FROM sources WHERE id = ?", [source_id])))

    # ---- polling -------------------------------------------------------------------------
    def save_poll(self, source_id: int, items: Iterable[NewItem | dict], cursor: dict) -> list[int]:
        """Store new items and the new cursor in one transaction; return the new image ids.

        Items already known for this source (same external id) are ignored, so a poll that is
        repeated after a crash adds nothing twice.
        """
        new_ids: list[int] = []
        stamp = now()
        with self.db.conn:
            for item in items:
                d = asdict(item) if isinstance(item, NewItem) else dict(item)
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO images (source_id, external_id, page_url, media_url, local_path, "
                    "author, title, tags, characters, rating, popularity, site_md5, posted_at, status, error, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [source_id, d["external_id"], d.get("page_url"), d.get("media_url"), d.get("local_path"),
                     d.get("author"), d.get("title"), json.dumps(d.get("tags") or []),
                     json.dumps(d.get("characters") or []), d.get("rating"),
                     d.get("popularity"), d.get("site_md5"), d.get("posted_at"),
                     SKIPPED if d.get("skip") else PENDING, d.get("skip"), stamp])
                if cur.rowcount:
                    new_ids.append(cur.lastrowid)
            self.db.execute(
                "UPDATE sources SET cursor = ?, items_fetched = items_fetched + ? WHERE id = ?",
                [json.dumps(cursor, sort_keys=True), len(new_ids), source_id])
        return new_ids

    # ---- download stage ------------------------------------------------------------------
    def ids_with_status(self, status: str, limit: int, exclude: Iterable[int] = ()) -> list[int]:
        exclude = list(exclude)
        skip = f"AND id NOT IN ({','.join('?' * len(exclude))})" if exclude else ""
        return [r["id"] for r in self.db.query(
            f"SELECT id FROM images WHERE status = ? {skip} ORDER BY id LIMIT ?",
            [status, *exclude, limit])]

    def get_image(self, image_id: int) -> dict | None:
        rows = list(self.db.query("SELECT * FROM images WHERE id = ?", [image_id]))
        if not rows:
            return None
        return self._image_row(rows[0])

    def adjacent_images(self, image_id: int) -> tuple[int | None, int | None]:
        """The downloaded pictures just before and after ``image_id`` by id (None at either end)."""
        prev = self.db.execute("SELECT MAX(id) FROM images WHERE id < ? AND media_path IS NOT NULL",
                               [image_id]).fetchone()[0]
        nxt = self.db.execute("SELECT MIN(id) FROM images WHERE id > ? AND media_path IS NOT NULL",
                              [image_id]).fetchone()[0]
        return prev, nxt

    @staticmethod
    def _image_row(row) -> dict:
        """A row of ``images`` as a dict, its JSON tags decoded."""
        row = dict(row)
        row["tags"] = json.loads(row["tags"] or "[]")
        if "characters" in row:
            row["characters"] = json.loads(row["characters"] or "[]")
        return row

    def mark_failed(self, image_id: int, error: str, *, retry: bool = False, max_attempts: int = 3) -> str:
        """Record a failed download; transient errors stay pending until ``max_attempts``."""
        with self.db.conn:
            self.db.execute("UPDATE images SET attempts = attempts + 1, error = ? WHERE id = ?",
                            [error, image_id])
            attempts = self.db.execute("SELECT attempts FROM images WHERE id = ?", [image_id]).fetchone()[0]
            status = PENDING if retry and attempts < max_attempts else FAILED
            self.db.execute("UPDATE images SET status = ? WHERE id = ?", [status, image_id])
        return status

    def _phashes(self) -> "PhashIndex":
        if self._phash_index is None:
            self._phash_index = PhashIndex(
                (r[0], int(r[1], 16)) for r in self.db.execute(
                    "SELECT id, phash FROM images WHERE phash IS NOT NULL AND duplicate_of IS NULL "
                    f"AND status IN {_STORED}"))
        return self._phash_index

    def find_duplicate(self, info: ImageInfo, near_distance: int, exclude: int | None = None
                       ) -> tuple[str, int] | None:
        """('duplicate', id) for the same bytes, ('near_duplicate', id) for a close phash, or None."""
        for r in self.db.query(
                "SELECT id FROM images WHERE sha256 = ? AND duplicate_of IS NULL AND id != ? "
                f"AND status IN {_STORED} ORDER BY id LIMIT 1",
                [info.sha256, exclude or -1]):
            return DUPLICATE, r["id"]
        if near_distance >= 0:
            found = self._phashes().nearest(int(info.phash, 16), near_distance, exclude)
            if found is not None:
                return NEAR_DUPLICATE, found
        return None

    def record_download(self, image_id: int, info: ImageInfo, media_path: str,
                        near_distance: int = 4) -> tuple[str, int | None]:
        """Store the fingerprint of a downloaded picture; return (status, duplicate_of).

        status is 'downloaded' (new, to be scored), 'duplicate' (same bytes stored already) or
        'near_duplicate' (perceptual hash within ``near_distance`` of a stored picture).
        """
        dup = self.find_duplicate(info, near_distance, exclude=image_id)
        status, dup_of = (DOWNLOADED, None) if dup is None else dup
        with self.db.conn:
            self.db.execute(
                "UPDATE images SET status = ?, duplicate_of = ?, error = NULL, sha256 = ?, phash = ?, "
                "width = ?, height = ?, format = ?, bytes = ?, media_path = ?, fetched_at = ? WHERE id = ?",
                [status, dup_of, info.sha256, info.phash, info.width, info.height, info.format,
                 info.bytes, media_path, now(), image_id])
            self._media_stored(info.sha256)
        if status == DOWNLOADED:
            self._phashes().add(image_id, int(info.phash, 16))
        return status, dup_of

    def _media_stored(self, sha256: str) -> None:
        """The file with these bytes is in the media folder (again): pictures whose media was
        pruned (``storage/prune.py``) have it back. Inside the caller's transaction."""
        self.db.execute("UPDATE images SET media_pruned_at = NULL, fetched_at = ? WHERE sha256 = ? "
                        "AND media_pruned_at IS NOT NULL", [now(), sha256])

    def media_restored(self, sha256: str) -> int:
        """Clear the pruned mark of the pictures with these bytes, once the file is stored again
        (a fetch from the source, an import of the same file); returns how many."""
        with self.db.conn:
            # fetched again now: its age for storage.keep_days starts again, so the next prune
            # does not take it straight back
            cur = self.db.execute("UPDATE images SET media_pruned_at = NULL, fetched_at = ? WHERE sha256 = ? "
                                  "AND media_pruned_at IS NOT NULL", [now(), sha256])
        return cur.rowcount

    # ---- scoring stage -------------------------------------------------------------------
    def record_analysis(self, image_id: int, faces: list[Face], score: float | None,
                        uncertainty: float | None, model_version: str, *, skipped: bool = False,
                        expect: str | None = None, features: list[dict] | None = None,
                        detector_version: str | None = None) -> bool:
        """Replace the picture's faces and store this model's predictions, in one transaction.
        With ``expect``, only while the picture's status is still that (the daemon's scorer passes
        ``downloaded``, so a picture an import claimed meanwhile keeps the import's analysis);
        False when nothing was written. ``features``: each face's cached features ({source:
        vector}, in the order of ``faces``; see ``storage/features.py``). ``detector_version``:
        the detector that found the faces (``images.detector_version``; None: the configured one)."""
        stamp = now()
        with self.db.conn:
            if expect is not None:
                row = self.db.execute("SELECT status FROM images WHERE id = ?", [image_id]).fetchone()
                if row is None or row[0] != expect:
                    return False
            self.db.execute("DELETE FROM faces WHERE image_id = ?", [image_id])
            self.db.execute("DELETE FROM predictions WHERE image_id = ? AND model_version = ?",
                            [image_id, model_version])
            for i, f in enumerate(faces):
                cur = self.db.execute(
                    "INSERT INTO faces (image_id, detector, x1, y1, x2, y2, confidence) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [image_id, f.detector, f.x1, f.y1, f.x2, f.y2, f.confidence])
                if features is not None and i < len(features) and features[i]:
                    self.save_face_features({cur.lastrowid: features[i]}, commit=False)
                self.db.execute(
                    "INSERT INTO predictions (image_id, face_id, model_version, score, uncertainty, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [image_id, cur.lastrowid, model_version, f.score, f.uncertainty, stamp])
            if score is not None:
                self.db.execute(
                    "INSERT INTO predictions (image_id, face_id, model_version, score, uncertainty, created_at) "
                    "VALUES (?, NULL, ?, ?, ?, ?)", [image_id, model_version, score, uncertainty, stamp])
            self.db.execute(
                "UPDATE images SET status = ?, score = ?, uncertainty = ?, model_version = ?, scored_at = ?, "
                "detector_version = ? WHERE id = ?",
                [SKIPPED if skipped else SCORED, score, uncertainty, model_version, stamp, detector_version, image_id])
            if not skipped:
                self.keep_popularity(image_id)
        return True

    def faces_of(self, image_id: int, model_version: str | None = None) -> list[dict]:
        return list(self.db.query(
            "SELECT faces.*, predictions.score, predictions.uncertainty FROM faces "
            "LEFT JOIN predictions ON predictions.face_id = faces.id "
            "AND predictions.model_version = COALESCE(?, (SELECT model_version FROM images WHERE id = ?)) "
            "WHERE faces.image_id = ? ORDER BY faces.id", [model_version, image_id, image_id]))

    def record_rescore(self, image_id: int, face_scores: dict[int, tuple[float, float | None]],
                       score: float, uncertainty: float | None, model_version: str, *,
                       features: dict[int, dict] | None = None) -> None:
        """Store a new model's predictions for a picture's stored faces (no re-detection). Only
        unposted pictures are rescored: their predictions by earlier models go (a head refitted
        every few labels would otherwise pile them up); a posted picture keeps the scores it was
        posted with."""
        with self.db.conn:
            self._rescore(image_id, face_scores, score, uncertainty, model_version, features, now())

    def _rescore(self, image_id, face_scores, score, uncertainty, model_version, features, stamp) -> None:
        self.db.execute("DELETE FROM predictions WHERE image_id = ? AND (model_version = ? OR NOT EXISTS "
                        "(SELECT 1 FROM posts WHERE posts.image_id = ? AND status = 'sent'))",
                        [image_id, model_version, image_id])
        self.db.conn.executemany(
            "INSERT INTO predictions (image_id, face_id, model_version, score, uncertainty, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(image_id, face_id, model_version, s, u, stamp) for face_id, (s, u) in face_scores.items()]
            + [(image_id, None, model_version, score, uncertainty, stamp)])
        if features:
            self.save_face_features(features, commit=False)
        self.db.execute("UPDATE images SET score = ?, uncertainty = ?, model_version = ?, scored_at = ? "
                        "WHERE id = ?", [score, uncertainty, model_version, stamp, image_id])

    def record_rescores(self, results, model_version: str) -> None:
        """:meth:`record_rescore` of several ``scorer.rescore.Rescored`` results, in one transaction."""
        stamp = now()
        with self.db.conn:
            for r in results:
                self._rescore(r.image_id, r.face_scores, r.score, r.uncertainty, model_version, r.features, stamp)

    def rescore_candidates(self, model_version: str, limit: int, after_id: int = 0) -> list[dict]:
        """Scored pictures not yet scored by ``model_version`` and never posted, oldest id first
        (not those whose media was pruned: they keep their scores until fetched again)."""
        return [dict(r) for r in self.db.query(
            f"SELECT id, media_path FROM images WHERE status = '{SCORED}' AND id > ? AND media_pruned_at IS NULL "
            "AND (model_version IS NULL OR model_version != ?) "
            "AND id NOT IN (SELECT image_id FROM posts WHERE status = 'sent') ORDER BY id LIMIT ?",
            [after_id, model_version, limit])]

    def faces_for(self, image_ids: list[int]) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {i: [] for i in image_ids}
        if image_ids:
            for f in self.db.query(f"SELECT * FROM faces WHERE image_id IN ({','.join('?' * len(image_ids))}) "
                                   "ORDER BY id", list(image_ids)):
                out[f["image_id"]].append(dict(f))
        return out

    def count_rescore_candidates(self, model_version: str) -> int:
        return self.db.execute(
            f"SELECT COUNT(*) FROM images WHERE status = '{SCORED}' AND media_pruned_at IS NULL "
            "AND (model_version IS NULL OR model_version != ?) "
            "AND id NOT IN (SELECT image_id FROM posts WHERE status = 'sent')", [model_version]).fetchone()[0]

    # ---- imports and labels --------------------------------------------------------------
    IMPORT_SOURCE = "import"              # the pseudo-source of import-labels (kind "import")

    def import_source_id(self) -> int:
        """The pseudo-source that owns imported pictures (never polled)."""
        row = self.get_source(self.IMPORT_SOURCE)
        if row is not None and row["kind"] == "import":
            return row["id"]
        if row is not None:
            raise ValueError(f"a source named {self.IMPORT_SOURCE!r} exists already; rename it to import labels")
        return self.upsert_source(self.IMPORT_SOURCE, "import", {"enabled": False, "interval": 0}, origin="import")

    def image_by_sha256(self, sha256: str) -> dict | None:
        """The stored picture with these bytes (the original, not a duplicate row), if any; also
        one an import stored and did not analyse (status ``importing``, left by a crash)."""
        rows = list(self.db.query(
            "SELECT * FROM images WHERE sha256 = ? AND duplicate_of IS NULL "
            f"AND status IN ('{DOWNLOADED}', '{IMPORTING}', '{SCORED}', '{SKIPPED}') ORDER BY id LIMIT 1", [sha256]))
        return dict(rows[0]) if rows else None

    def claim_for_import(self, image_id: int) -> bool:
        """Take a stored, not yet analysed picture (e.g. one the daemon fetched with the same bytes)
        for an import: status ``importing``, so the daemon's scorer leaves it to the import."""
        with self.db.conn:
            cur = self.db.execute(f"UPDATE images SET status = '{IMPORTING}' WHERE id = ? "
                                  f"AND status IN ('{DOWNLOADED}', '{IMPORTING}')", [image_id])
        return cur.rowcount > 0

    def add_imported_image(self, source_id: int, local_path: str, info: ImageInfo, media_path: str) -> int:
        """A picture read from disk by import-labels, stored with status ``importing``: no stage
        of a daemon running meanwhile takes it, so it keeps the analysis the import records for
        it (``record_analysis``: ``scored`` or ``skipped``), e.g. as a crop, not detected faces."""
        with self.db.conn:
            self.db.execute(
                "INSERT OR IGNORE INTO images (source_id, external_id, local_path, title, created_at) "
                "VALUES (?, ?, ?, ?, ?)", [source_id, info.sha256, local_path, Path(local_path).name, now()])
            image_id = self.db.execute("SELECT id FROM images WHERE source_id = ? AND external_id = ?",
                                       [source_id, info.sha256]).fetchone()[0]
            self.db.execute(
                f"UPDATE images SET status = '{IMPORTING}', error = NULL, sha256 = ?, phash = ?, width = ?, "
                "height = ?, format = ?, bytes = ?, media_path = ?, fetched_at = ? WHERE id = ?",
                [info.sha256, info.phash, info.width, info.height, info.format, info.bytes, media_path,
                 now(), image_id])
            self._media_stored(info.sha256)
        return image_id

    def add_label(self, image_id: int, value: int, *, origin: str, user: str = "owner",
                  ref: str | None = None, face_id: int | None = None) -> bool:
        """Record a rating; False (nothing written) if it repeats the latest label with this
        origin and ref (e.g. the same CSV row or Discord reaction) for the picture.

        Labels are never overwritten: a changed rating adds a row, and the newest counts.
        """
        if not 1 <= int(value) <= 5:
            raise ValueError(f"a rating is 1 to 5, got {value!r}")
        with self.db.conn:
            last = self.db.execute(
                "SELECT value FROM labels WHERE image_id = ? AND user = ? AND face_id IS ? AND origin = ? "
                "AND ref IS ? AND removed_at IS NULL ORDER BY created_at DESC, id DESC LIMIT 1",
                [image_id, user, face_id, origin, ref]).fetchone()
            if last is not None and last[0] == int(value):
                return False
            self.db.execute(
                "INSERT INTO labels (image_id, face_id, user, value, origin, ref, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", [image_id, face_id, user, int(value), origin, ref, now()])
        return True

    def remove_label(self, image_id: int, *, origin: str, user: str, ref: str | None = None) -> int:
        """Take back labels (a removed reaction, an undo): the rows stay, marked removed, and the
        picture's previous label, if any, counts again. Returns how many were removed."""
        with self.db.conn:
            cur = self.db.execute(
                "UPDATE labels SET removed_at = ? WHERE image_id = ? AND origin = ? AND user = ? "
                "AND ref IS ? AND removed_at IS NULL", [now(), image_id, origin, user, ref])
        return cur.rowcount

    def labels_with_ref_prefix(self, origin: str, prefix: str) -> list[dict]:
        """Active labels whose ref starts with ``prefix`` (e.g. all reactions on one message)."""
        return [dict(r) for r in self.db.query(
            "SELECT * FROM labels WHERE origin = ? AND substr(ref, 1, ?) = ? AND removed_at IS NULL "
            "ORDER BY id", [origin, len(prefix), prefix])]

    def labels_of(self, image_id: int) -> list[dict]:
        """Every label of a picture, removed ones included (``removed_at`` set), oldest first."""
        return [dict(r) for r in self.db.query(
            "SELECT * FROM labels WHERE image_id = ? ORDER BY created_at, id", [image_id])]

    def current_label(self, image_id: int) -> int | None:
        row = self.db.execute("SELECT value FROM labels WHERE image_id = ? AND removed_at IS NULL "
                              "ORDER BY created_at DESC, id DESC LIMIT 1", [image_id]).fetchone()
        return row[0] if row else None

    def undo_label(self, label_id: int) -> dict | None:
        """Take back one label (by id); the picture's previous label, if any, counts again."""
        with self.db.conn:
            self.db.execute("UPDATE labels SET removed_at = ? WHERE id = ? AND removed_at IS NULL", [now(), label_id])
        rows = list(self.db.query("SELECT * FROM labels WHERE id = ?", [label_id]))
        return dict(rows[0]) if rows else None

    # The label that counts for a picture: its newest one not taken back.
    _LATEST = ("labels.id = (SELECT id FROM labels AS l2 WHERE l2.image_id = labels.image_id "
               "AND l2.removed_at IS NULL ORDER BY l2.created_at DESC, l2.id DESC LIMIT 1)")
    _CURRENT = ("FROM labels JOIN images ON images.id = labels.image_id "
                "LEFT JOIN sources ON sources.id = images.source_id WHERE " + _LATEST)

    def rated(self, *, value: int | None = None, source: str | None = None, character: str | None = None,
              limit: int = 30, offset: int = 0, after: tuple[str, int] | None = None,
              count: bool = True) -> tuple[list[dict], int | None]:
        """Pictures with their current label, newest label first, optionally of one rating,
        source or character (a face of it); returns (rows, total). ``after``: only those after
        that position (a row's :func:`rated_key`: keyset paging, read along the labels' time
        index, instead of ``offset``); ``count`` False: no total (None), only the rows."""
        where, params = "", []
        if character:
            where += f" AND images.id IN ({PICTURES_OF_CHARACTER})"
            params.append(character)
        if value is not None:
            where += " AND labels.value = ?"
            params.append(value)
        if source:
            where += " AND sources.name = ?"
            params.append(source)
        total = self.db.execute(f"SELECT COUNT(*) {self._CURRENT}{where}", params).fetchone()[0] if count else None
        select = (f"SELECT images.*, sources.name AS source_name, labels.id AS label_id, labels.value AS label, "
                  f"labels.origin AS label_origin, labels.created_at AS labelled_at {self._CURRENT}{where}")
        if after is None:
            rows = self.db.query(f"{select} ORDER BY {RATED.sql()} LIMIT ? OFFSET ?", [*params, limit, offset])
        else:
            rows = self._along(select, params, RATED, after, limit)    # ties in time stepped over
        return [self._image_row(r) for r in rows], total

    def label_count(self, since: str | None = None) -> int:
        """Labelled pictures (all labels, or labels written after ``since``); removed ones do not count."""
        if since is None:
            return self.db.execute(
                "SELECT COUNT(DISTINCT image_id) FROM labels WHERE removed_at IS NULL").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM labels WHERE created_at > ? AND removed_at IS NULL",
                               [since]).fetchone()[0]

    def rating_spread(self) -> float | None:
        """The standard deviation of the latest ratings (None below two labelled pictures); kept
        until the database changes (every trained For you page asks: 13 ms with 10,000 ratings)."""
        def spread() -> float | None:
            values = [r[0] for r in self.db.execute(f"SELECT labels.value FROM labels WHERE {self._LATEST}")]
            if len(values) < 2:
                return None
            mean = sum(values) / len(values)
            return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        return self.kept(("rating spread",), spread)

    def training_rows(self) -> list[dict]:
        """Each labelled, analysed picture with its latest rating and its faces.

        A label naming a face (``face_id``) trains that face alone; otherwise the picture's faces.
        """
        rows = [dict(r) for r in self.db.query(
            "SELECT images.id AS image_id, images.sha256, images.media_path, images.status, "
            "labels.value, labels.face_id FROM labels JOIN images ON images.id = labels.image_id "
            f"WHERE {self._LATEST} ORDER BY images.id")]
        faces: dict[int, list[dict]] = {}
        for f in self.db.query("SELECT * FROM faces WHERE image_id IN (SELECT image_id FROM labels WHERE removed_at IS NULL) "
                               "ORDER BY id"):
            faces.setdefault(f["image_id"], []).append(dict(f))
        for r in rows:
            r["faces"] = [f for f in faces.get(r["image_id"], [])
                          if r["face_id"] is None or f["id"] == r["face_id"]]
        return rows

    # ---- models --------------------------------------------------------------------------
    def active_model(self) -> dict | None:
        rows = list(self.db.query("SELECT * FROM models WHERE active = 1 LIMIT 1"))
        return dict(rows[0]) if rows else None

    def get_model(self, version: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM models WHERE version = ?", [version]))
        return dict(rows[0]) if rows else None

    def register_model(self, version: str, arch: str, path: str, *, data_size: int = 0,
                       metrics: dict | None = None, activate: bool = False, notes: str | None = None) -> None:
        with self.db.conn:
            self.db.execute(
                "INSERT OR REPLACE INTO models (version, arch, path, created_at, data_size, metrics, active, notes) "
                "VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                [version, arch, path, now(), data_size, json.dumps(metrics) if metrics else None, notes])
            if activate:
                self.db.execute("UPDATE models SET active = (version = ?)", [version])

    def activate_model(self, version: str) -> bool:
        with self.db.conn:
            if self.get_model(version) is None:
                return False
            self.db.execute("UPDATE models SET active = (version = ?)", [version])
        return True

    def latest_training_at(self) -> str | None:
        """When the newest fully trained model was registered (untrained ones have no metrics;
        head refits, ``head-…``, do not count: they are not the scheduled training)."""
        return self.db.execute("SELECT MAX(created_at) FROM models WHERE metrics IS NOT NULL "
                               "AND version NOT LIKE 'head-%'").fetchone()[0]

    def list_models(self) -> list[dict]:
        return [dict(r) for r in self.db.query("SELECT * FROM models ORDER BY created_at")]

    # ---- posts ---------------------------------------------------------------------------
    def post_intent(self, image_id: int, channel: str, channel_id: str | None, *, exploration: bool = False,
                    reason: str | None = None) -> int:
        """Record that a picture is about to be sent (before the send, so a crash cannot repost it)."""
        with self.db.conn:
            cur = self.db.execute(
                "INSERT INTO posts (image_id, channel, channel_id, status, exploration, reason, created_at) "
                "VALUES (?, ?, ?, 'intent', ?, ?, ?)",
                [image_id, channel, channel_id, int(exploration), reason, now()])
        return cur.lastrowid

    def post_sent(self, post_id: int, message_id: str) -> None:
        with self.db.conn:
            self.db.execute("UPDATE posts SET status = 'sent', message_id = ?, sent_at = ?, error = NULL "
                            "WHERE id = ?", [str(message_id), now(), post_id])

    def post_failed(self, post_id: int, error: str) -> None:
        """The picture was not sent: it becomes a candidate again."""
        with self.db.conn:
            self.db.execute("UPDATE posts SET status = 'failed', error = ? WHERE id = ?", [error, post_id])

    def posts_with_status(self, channel: str, status: str) -> list[dict]:
        return [dict(r) for r in self.db.query(
            "SELECT * FROM posts WHERE channel = ? AND status = ? ORDER BY id", [channel, status])]

    def post_by_message(self, channel: str, message_id: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM posts WHERE channel = ? AND message_id = ? LIMIT 1",
                                  [channel, str(message_id)]))
        return dict(rows[0]) if rows else None

    def recent_posts(self, channel: str, since: str) -> list[dict]:
        """Posts sent on ``channel`` since ``since`` (ISO time), oldest first."""
        return [dict(r) for r in self.db.query(
            "SELECT * FROM posts WHERE channel = ? AND status = 'sent' AND sent_at >= ? ORDER BY id",
            [channel, since])]

    def posted_phashes(self, channel: str) -> list[int]:
        """Perceptual hashes of the pictures posted (or being posted) on ``channel``."""
        return [int(r["phash"], 16) for r in self.db.query(
            "SELECT DISTINCT images.phash FROM posts JOIN images ON images.id = posts.image_id "
            "WHERE posts.channel = ? AND posts.status != 'failed' AND images.phash IS NOT NULL", [channel])]

    def post_counts(self, channel: str) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self.db.query(
            "SELECT status, COUNT(*) AS n FROM posts WHERE channel = ? GROUP BY status", [channel])}

    # ---- settings (small state changed at run time, e.g. posting paused) -----------------------
    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        with self.db.conn:
            self.db.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value", [key, json.dumps(value)])

    # ---- summaries -----------------------------------------------------------------------
    def status_counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self.db.query(
            "SELECT status, COUNT(*) AS n FROM images GROUP BY status")}

    def execute(self, sql: str, params: Any = ()) -> list[dict]:
        """A read query, for tests and the doctor command."""
        return [dict(r) for r in self.db.query(sql, params)]
