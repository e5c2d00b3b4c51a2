"""Detecting stored pictures again after a detector switch (``images.detector_version``, m011).

Each scored picture records the detector that found its faces: ``own:VERSION`` for the owner's
own detector, ``config:NAME`` for the configured one (``scorer/own_detector.py`` ``tag``;
``config`` or NULL from before it was named, which :meth:`RedetectMethods.adopt_detector_tag`
renames at the daemon's start). When another detector comes into use (``detector use``, a
promotion, or another ``detector.name`` in the config at a restart), the pictures found by a
different one are *candidates*: the daemon detects them again (bot/detector_watch.py) and stores the new faces
with :meth:`RedetectMethods.record_redetection`, which marks them for rescoring. The column makes
the work resumable: a restart finds the pictures still to do.

Only scored pictures are detected again. Not: pictures skipped for having no face
(``detector.no_face = "skip"``), pictures imported as face crops (their box is the picture),
pictures whose media was pruned, and pictures already posted (they keep what they were posted
with, as rescoring keeps their scores).

Nothing the owner gave is lost: labels (which reference a face, ON DELETE SET NULL) and given
character names (``face_names``, ON DELETE CASCADE) of a replaced face move to the new face that
overlaps it most (IoU at least :data:`CARRY_IOU`); a label with no such face stays on the picture
(its ``face_id`` NULL), as every label of a picture does. :class:`RedetectMethods` is mixed into
:class:`storage.store.Store`; it uses only ``self.db``.
"""
from __future__ import annotations

from scorer.box_metrics import iou
from storage.records import CROP, SCORED, Face

CARRY_IOU = 0.3
CONFIG = "config"

# The two parameters: candidates(tag). A picture stored before the configured detector was named
# (``config`` or NULL) counts as found by the configured one in use, if one is.
_CANDIDATES = (f"FROM images WHERE status = '{SCORED}' AND media_path IS NOT NULL "
               f"AND media_pruned_at IS NULL AND COALESCE(NULLIF(detector_version, '{CONFIG}'), ?) != ? "
               f"AND id NOT IN (SELECT image_id FROM faces WHERE detector = '{CROP}') "
               "AND id NOT IN (SELECT image_id FROM posts WHERE status = 'sent')")


def candidates(tag: str) -> list[str]:
    """The parameters of ``_CANDIDATES`` for the detector ``tag`` in use."""
    return [tag if tag.startswith(CONFIG + ":") else CONFIG, tag]


class RedetectMethods:
    db: object  # sqlite_utils.Database, set by Store

    def redetect_candidates(self, tag: str, limit: int, after_id: int = 0) -> list[dict]:
        """Pictures whose faces another detector than ``tag`` found, oldest id first (id, media_path)."""
        return [dict(r) for r in self.db.query(
            f"SELECT id, media_path {_CANDIDATES} AND id > ? ORDER BY id LIMIT ?",
            [*candidates(tag), int(after_id), int(limit)])]

    def adopt_detector_tag(self, tag: str) -> int:
        """Name the detector of the scored pictures stored before configured detectors were named
        (``config`` or NULL): ``tag``, the configured detector the daemon starts with (the best
        guess: nothing said it changed). Returns how many were named."""
        with self.db.conn:
            return self.db.execute(f"UPDATE images SET detector_version = ? WHERE status = '{SCORED}' "
                                   "AND COALESCE(detector_version, ?) = ?", [tag, CONFIG, CONFIG]).rowcount

    def count_redetect_candidates(self, tag: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) {_CANDIDATES}", candidates(tag)).fetchone()[0]

    def record_redetection(self, image_id: int, faces: list[Face], tag: str) -> bool:
        """Replace a picture's faces with the detector ``tag``'s, keeping the owner's labels and
        character names on the new faces that overlap the old ones; the picture is marked for
        rescoring (``model_version`` NULL: its score stays until then). False when the picture is
        no candidate any more (posted, pruned, gone, already done)."""
        with self.db.conn:
            row = self.db.execute(f"SELECT id {_CANDIDATES} AND id = ?", [*candidates(tag), int(image_id)]).fetchone()
            if row is None:
                return False
            old = {r[0]: (r[1], r[2], r[3], r[4]) for r in self.db.execute(
                "SELECT id, x1, y1, x2, y2 FROM faces WHERE image_id = ?", [image_id])}
            labels = list(self.db.execute("SELECT id, face_id FROM labels WHERE image_id = ? AND face_id IS NOT NULL",
                                          [image_id]))
            names = list(self.db.execute(
                "SELECT face_id, character_id, origin, weak, created_at FROM face_names WHERE face_id IN "
                "(SELECT id FROM faces WHERE image_id = ?)", [image_id]))
            self.db.execute("DELETE FROM faces WHERE image_id = ?", [image_id])   # predictions, names go with them
            new = {}
            for f in faces:
                cur = self.db.execute(
                    "INSERT INTO faces (image_id, detector, x1, y1, x2, y2, confidence) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [image_id, f.detector, f.x1, f.y1, f.x2, f.y2, f.confidence])
                new[cur.lastrowid] = (f.x1, f.y1, f.x2, f.y2)

            def heir(old_id):
                box = old.get(old_id)
                if box is None or not new:
                    return None
                best = max(new, key=lambda k: iou(box, new[k]))
                return best if iou(box, new[best]) >= CARRY_IOU else None

            for label_id, face_id in labels:         # SET NULL already happened; point it at the heir
                self.db.execute("UPDATE labels SET face_id = ? WHERE id = ?", [heir(face_id), label_id])
            taken = set()
            for face_id, character_id, origin, weak, created in names:
                target = heir(face_id)
                if target is not None and target not in taken:
                    taken.add(target)
                    self.db.execute("INSERT INTO face_names (face_id, character_id, origin, weak, created_at) "
                                    "VALUES (?, ?, ?, ?, ?)", [target, character_id, origin, weak, created])
            self.db.execute("UPDATE images SET detector_version = ?, model_version = NULL WHERE id = ?",
                            [tag, image_id])
        return True

    def mark_redetected(self, image_id: int, tag: str) -> None:
        """Count a picture as done for ``tag`` without new faces (its media cannot be read)."""
        with self.db.conn:
            self.db.execute("UPDATE images SET detector_version = ? WHERE id = ?", [tag, int(image_id)])
