"""Cached face features: what the taste head learns from, computed once per face and source
(table of migration ``m007_features``).

A *source* names where a vector came from, so a new backbone or network never mixes with an old
one's features:

    ``<backbone version>``          the feature backbone's features of the face crop
    ``whole:<backbone version>``    the same backbone's features of the whole picture (downscaled)
    ``colour``                      the crop's colour statistics (``scorer.model.colour_stats``)
    ``net:<model version>``         the taste network's own (score, flip spread) of the crop
    ``identity:<embedder version>`` the identity embedding: stored in ``face_embeddings``, where
                                    recognition reads it (so a face is embedded once)

The crop sources (the backbone's, ``colour`` and ``net:``) carry the crop margin when it is not
the default 0.2: ``<backbone version>@m30`` for ``detector.margin = 0.3`` (``scorer/features.py``
``crop_source``), so crops of two margins never mix.

Identity embeddings live beside them in ``face_embeddings`` (per identity embedder version, see
``storage/characters.py``). Vectors are stored as float16 bytes. A face's rows go when the face
goes (``ON DELETE CASCADE``); :meth:`FeatureMethods.retire_feature_sources` removes the rows of
sources the active model no longer uses (the daemon calls it when it switches models).

:class:`FeatureMethods` is mixed into :class:`storage.store.Store`; it uses only ``self.db``.
"""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from storage.characters import from_blob, to_blob

IDENTITY = "identity:"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class FeatureMethods:
    db: object  # sqlite_utils.Database, set by Store

    def save_face_features(self, features: dict[int, dict[str, object]], *, commit: bool = True) -> None:
        """Store vectors: face id -> {source: vector}. Replaces a face's earlier vector of a source.
        ``commit=False`` runs inside the caller's transaction."""
        stamp = _now()
        rows, identity = [], []
        for fid, blocks in features.items():
            for source, v in blocks.items():
                if v is None:
                    continue
                if source.startswith(IDENTITY):
                    identity.append((fid, source[len(IDENTITY):], to_blob(v), stamp))
                else:
                    rows.append((fid, source, to_blob(v), stamp))

        def write():
            self.db.conn.executemany("INSERT OR REPLACE INTO face_features (face_id, source, vector, created_at) "
                                     "VALUES (?, ?, ?, ?)", rows)
            self.db.conn.executemany("INSERT OR REPLACE INTO face_embeddings (face_id, model_version, vector, "
                                     "created_at) VALUES (?, ?, ?, ?)", identity)
        if commit:
            with self.db.conn:
                write()
        else:
            write()

    def face_features(self, face_ids, sources) -> dict[int, dict[str, np.ndarray]]:
        """Stored vectors of ``face_ids`` for ``sources``: face id -> {source: float32 vector}
        (a face or source with no row is absent)."""
        face_ids, sources = list(face_ids), list(sources)
        out: dict[int, dict[str, np.ndarray]] = {}
        for source in [s for s in sources if s.startswith(IDENTITY)]:
            for fid, v in self.embeddings(source[len(IDENTITY):], face_ids).items():
                out.setdefault(fid, {})[source] = v
        sources = [s for s in sources if not s.startswith(IDENTITY)]
        if not face_ids or not sources:
            return out
        marks = ",".join("?" * len(sources))
        for start in range(0, len(face_ids), 500):
            chunk = face_ids[start:start + 500]
            for fid, source, blob in self.db.execute(
                    f"SELECT face_id, source, vector FROM face_features WHERE source IN ({marks}) "
                    f"AND face_id IN ({','.join('?' * len(chunk))})", sources + chunk):
                out.setdefault(fid, {})[source] = from_blob(blob)
        return out

    def feature_counts(self) -> dict[str, int]:
        """How many faces have a vector of each source."""
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT source, COUNT(*) FROM face_features GROUP BY source ORDER BY source")}

    def retire_feature_sources(self, keep: set[str]) -> dict[str, int]:
        """Remove the vectors of every source not in ``keep`` (those of a retired network or
        backbone: the active model's sources are what the daemon computes); returns how many of
        each. A model switched back to later has its vectors computed again when it rescores."""
        gone = {}
        with self.db.conn:
            for (source,) in self.db.execute("SELECT DISTINCT source FROM face_features").fetchall():
                if source not in keep:
                    gone[source] = self.db.execute("DELETE FROM face_features WHERE source = ?",
                                                   [source]).rowcount
        return gone
