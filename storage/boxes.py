"""Face boxes for training the owner's own detector (tables of migration ``m009_detector_boxes``).

They are kept apart from ``faces`` (the detections the scorer uses). A picture enters with the
boxes the bootstrap detectors *proposed* (``detector bootstrap``); the owner corrects them in the
gallery's Boxes page and accepts, and the picture becomes *verified*: its boxes are the truth
training and evaluation read. A verified picture can be proposed again (by a newly promoted
detector): its verified boxes stay, the new proposals sit beside them, and their disagreement
(0..1, measured by the caller) brings it back to the front of the review queue.

Skipping a picture (the Boxes page's **s**) sends it to the back of the review queue
(``skip_order``, migration m012): it comes back once every picture not skipped was seen, the
longest skipped first, and a restart keeps that order. New proposals (a newer detector's) or
accepting it end the skip.

Verified pictures are split once, for good, into training and *held-out* pictures (about one in
five, chosen from the picture's id so the split never moves): held-out ones are only evaluated on.

Coordinates are pixels of the stored picture (``images.width`` x ``images.height``), x1 < x2 and
y1 < y2. :class:`BoxMethods` is mixed into :class:`storage.store.Store`; it uses only ``self.db``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

PROPOSED, VERIFIED = "proposed", "verified"
OWNER = "owner"          # origin of a box the owner drew or kept
HOLDOUT_SHARE = 5        # one picture in HOLDOUT_SHARE is held out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def is_holdout(image_id: int) -> bool:
    """Whether a verified picture is held out of training: fixed by its id, about one in five."""
    return int(hashlib.sha256(f"holdout:{int(image_id)}".encode()).hexdigest(), 16) % HOLDOUT_SHARE == 0


@dataclass
class Box:
    x1: int
    y1: int
    x2: int
    y2: int
    origin: str = OWNER        # the detectors that found it, comma separated, or "owner"
    confidence: float = 1.0    # 0..1
    sure: bool = False         # found by two detectors or more

    def __post_init__(self):
        self.x1, self.y1, self.x2, self.y2 = (int(round(v)) for v in (self.x1, self.y1, self.x2, self.y2))
        if self.x2 <= self.x1 or self.y2 <= self.y1:
            raise ValueError(f"an empty box: ({self.x1}, {self.y1}, {self.x2}, {self.y2})")
        self.confidence = float(min(1.0, max(0.0, self.confidence)))
        self.sure = bool(self.sure)

    @property
    def xyxy(self) -> tuple[int, int, int, int]:
        return self.x1, self.y1, self.x2, self.y2


@dataclass
class BoxPicture:
    """One picture of the box set, with both kinds of its boxes."""
    image_id: int
    state: str                 # proposed | verified
    certainty: float
    disagreement: float
    proposed_by: str | None
    holdout: bool
    media_path: str | None     # relative to the media folder
    width: int | None
    height: int | None
    proposed: list[Box]
    verified: list[Box]
    skipped: bool = False      # skipped on the Boxes page: it waits at the back of the review queue


def _box(row) -> Box:
    return Box(row["x1"], row["y1"], row["x2"], row["y2"], origin=row["origin"],
               confidence=row["confidence"], sure=bool(row["sure"]))


class BoxMethods:
    db: object  # sqlite_utils.Database, set by Store

    def propose_boxes(self, image_id: int, boxes: Iterable[Box], *, proposed_by: str, certainty: float,
                      disagreement: float = 0.0) -> None:
        """Store a detector round's proposals for a picture, replacing its earlier proposals.
        A picture not in the box set yet enters as *proposed*; a verified one stays verified, and
        ``disagreement`` (its proposals against its verified boxes, 0..1) orders its review.
        ValueError for an unknown picture."""
        image_id = int(image_id)
        boxes = list(boxes)
        stamp = _now()
        with self.db.conn:
            self._require_picture(image_id)
            state = self.db.execute("SELECT state FROM box_pictures WHERE image_id = ?", [image_id]).fetchone()
            if state is None:
                self.db.execute(
                    "INSERT INTO box_pictures (image_id, state, certainty, disagreement, proposed_by, proposed_at) "
                    "VALUES (?, ?, ?, 0, ?, ?)", [image_id, PROPOSED, float(certainty), proposed_by, stamp])
            else:
                dis = float(disagreement) if state[0] == VERIFIED else 0.0
                self.db.execute(
                    "UPDATE box_pictures SET certainty = ?, disagreement = ?, proposed_by = ?, proposed_at = ?, "
                    "skip_order = NULL WHERE image_id = ?", [float(certainty), dis, proposed_by, stamp, image_id])
            self.db.execute("DELETE FROM boxes WHERE image_id = ? AND kind = ?", [image_id, PROPOSED])
            self._insert_boxes(image_id, PROPOSED, boxes)

    def verify_boxes(self, image_id: int, boxes: Iterable[Box]) -> None:
        """The owner's accepted boxes for a picture (none: a picture with no face, still a useful
        example): they replace every box it had, and it becomes verified (its held-out split fixed
        by its id). A picture not in the box set yet enters verified. ValueError for an unknown
        picture."""
        image_id = int(image_id)
        boxes = list(boxes)
        stamp = _now()
        with self.db.conn:
            self._require_picture(image_id)
            self.db.execute(
                "INSERT INTO box_pictures (image_id, state, certainty, disagreement, verified_at, holdout) "
                "VALUES (?, ?, 1, 0, ?, ?) ON CONFLICT(image_id) DO UPDATE SET state = excluded.state, "
                "certainty = 1, disagreement = 0, verified_at = excluded.verified_at, holdout = excluded.holdout, "
                "skip_order = NULL",
                [image_id, VERIFIED, stamp, int(is_holdout(image_id))])
            self.db.execute("DELETE FROM boxes WHERE image_id = ?", [image_id])
            self._insert_boxes(image_id, VERIFIED, boxes)

    def _require_picture(self, image_id: int) -> None:
        if self.db.execute("SELECT 1 FROM images WHERE id = ?", [image_id]).fetchone() is None:
            raise ValueError(f"no picture #{image_id}")

    def _insert_boxes(self, image_id: int, kind: str, boxes: list[Box]) -> None:
        for b in boxes:
            self.db.execute(
                "INSERT INTO boxes (image_id, kind, x1, y1, x2, y2, origin, confidence, sure) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [image_id, kind, b.x1, b.y1, b.x2, b.y2, b.origin, b.confidence, int(b.sure)])

    def box_picture(self, image_id: int) -> BoxPicture | None:
        """A picture of the box set with its proposed and verified boxes, or None."""
        rows = list(self.db.query(
            "SELECT bp.*, i.media_path, i.width, i.height FROM box_pictures bp JOIN images i ON i.id = bp.image_id "
            "WHERE bp.image_id = ?", [int(image_id)]))
        if not rows:
            return None
        return self._box_pictures(rows)[0]

    def _box_pictures(self, rows: list[dict]) -> list[BoxPicture]:
        ids = [r["image_id"] for r in rows]
        boxes: dict[tuple[int, str], list[Box]] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            for b in self.db.query(f"SELECT * FROM boxes WHERE image_id IN ({','.join('?' * len(chunk))}) ORDER BY id",
                                   chunk):
                boxes.setdefault((b["image_id"], b["kind"]), []).append(_box(b))
        return [BoxPicture(image_id=r["image_id"], state=r["state"], certainty=r["certainty"],
                           disagreement=r["disagreement"], proposed_by=r["proposed_by"], holdout=bool(r["holdout"]),
                           media_path=r["media_path"], width=r["width"], height=r["height"],
                           proposed=boxes.get((r["image_id"], PROPOSED), []),
                           verified=boxes.get((r["image_id"], VERIFIED), []), skipped=r["skip_order"] is not None)
                for r in rows]

    def box_review_queue(self, limit: int = 1) -> list[BoxPicture]:
        """The pictures to review next: verified ones a newer detector disagrees with (most
        disagreement first), then proposed ones, least certain first; the skipped ones after
        all of those, the longest skipped first (:meth:`skip_box_picture`)."""
        rows = list(self.db.query(
            "SELECT bp.*, i.media_path, i.width, i.height FROM box_pictures bp JOIN images i ON i.id = bp.image_id "
            "WHERE (bp.state = ? OR bp.disagreement > 0) AND i.media_path IS NOT NULL "
            "ORDER BY bp.skip_order IS NOT NULL, bp.skip_order, bp.disagreement DESC, bp.certainty, bp.image_id "
            "LIMIT ?", [PROPOSED, int(limit)]))
        return self._box_pictures(rows)

    def skip_box_picture(self, image_id: int) -> bool:
        """Send a picture to the back of the review queue (the Boxes page's skip); False when it
        is not in the box set."""
        with self.db.conn:
            cur = self.db.execute("UPDATE box_pictures SET skip_order = (SELECT COALESCE(MAX(skip_order), 0) + 1 "
                                  "FROM box_pictures) WHERE image_id = ?", [int(image_id)])
        return cur.rowcount > 0

    def verified_box_pictures(self, holdout: bool | None = None) -> list[BoxPicture]:
        """Every verified picture with its boxes, by id: all of them, or only the held-out ones
        (``holdout=True``) or only the training ones (``False``)."""
        sql = ("SELECT bp.*, i.media_path, i.width, i.height FROM box_pictures bp JOIN images i ON i.id = bp.image_id "
               "WHERE bp.state = ?")
        params: list = [VERIFIED]
        if holdout is not None:
            sql += " AND bp.holdout = ?"
            params.append(int(holdout))
        return self._box_pictures(list(self.db.query(sql + " ORDER BY bp.image_id", params)))

    def proposed_box_pictures(self, min_certainty: float = 0.0) -> list[BoxPicture]:
        """Pictures still only proposed, with certainty at least ``min_certainty``, by id (the
        confident proposals training may add)."""
        rows = list(self.db.query(
            "SELECT bp.*, i.media_path, i.width, i.height FROM box_pictures bp JOIN images i ON i.id = bp.image_id "
            "WHERE bp.state = ? AND bp.certainty >= ? ORDER BY bp.image_id", [PROPOSED, float(min_certainty)]))
        return self._box_pictures(rows)

    def box_counts(self) -> dict[str, int]:
        """``proposed``, ``verified``, ``holdout`` (verified and held out), ``to_review`` (the
        review queue's length) and ``boxes`` (verified boxes)."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(state = ?), 0), COALESCE(SUM(state = ?), 0), "
            "COALESCE(SUM(state = ? AND holdout = 1), 0), COALESCE(SUM(state = ? OR disagreement > 0), 0) "
            "FROM box_pictures", [PROPOSED, VERIFIED, VERIFIED, PROPOSED]).fetchone()
        boxes = self.db.execute("SELECT COUNT(*) FROM boxes WHERE kind = ?", [VERIFIED]).fetchone()[0]
        return {"proposed": row[0], "verified": row[1], "holdout": row[2], "to_review": row[3], "boxes": boxes}

    def box_picture_ids(self) -> set[int]:
        """Ids of every picture in the box set (bootstrap passes over them unless asked again)."""
        return {r[0] for r in self.db.execute("SELECT image_id FROM box_pictures")}
