"""Characters in the database: names, the faces named as them, identity embeddings, recognition
results and the identity embedders' registry (tables of migration ``m004_characters``).

A character is a name. A face becomes a labelled example of it through ``face_names`` (with the
origin of the name and whether it is weak, i.e. inferred rather than given). Identity embeddings
are stored per face and embedder version as float16 bytes; recognition writes one row per face
and version in ``face_identity`` (``character_id`` NULL: unknown).

:class:`CharacterMethods` is mixed into :class:`storage.store.Store`; it uses only ``self.db``.
"""
from __future__ import annotations

import json
import logging
import unicodedata
from datetime import datetime, timezone

import numpy as np

from storage.records import WHOLE, WHOLE_PICTURE

log = logging.getLogger("tastefeed.characters")

NAMES_CHANGED = "names_changed_at"   # settings key: when a name was last taken back
NAME_ORIGINS = ("import", "enrol", "booru", "gallery", "discord")
MAX_NAME = 100

# The pictures with a face of the character named by the parameter (given name, else the active
# embedder's recognition: the ``face_characters`` view), for ``images.id IN (...)`` filters.
PICTURES_OF_CHARACTER = ("SELECT face_characters.image_id FROM face_characters JOIN characters "
                         "ON characters.id = face_characters.character_id WHERE characters.name = ?")


class CharacterNameError(ValueError):
    """A character name that cannot be stored; the message says why, in one line."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def name_key(name: str) -> str:
    """What makes two names the same character: Unicode-compatible forms, case, underscores and
    runs of spaces aside (``Hatsune Miku``, ``hatsune_miku`` and ``HATSUNE  MIKU`` are one)."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().replace("_", " ").split())


def check_name(name: str) -> str:
    """The name, trimmed, or :class:`CharacterNameError`: non-empty, at most 100 characters, no
    slashes, control or invisible format characters (emoji and any script are fine; the joiner
    inside emoji sequences too)."""
    clean = (name or "").strip()
    if not clean:
        raise CharacterNameError("a character name cannot be empty")
    if len(clean) > MAX_NAME:
        raise CharacterNameError(f"character name {clean[:20]!r}...: too long ({len(clean)} characters, "
                                 f"at most {MAX_NAME})")
    if "/" in clean or "\\" in clean:
        raise CharacterNameError(f"character name {clean!r}: no slashes allowed")
    if any(unicodedata.category(c) in ("Cc", "Cs") or c in "\u2028\u2029" for c in clean):
        raise CharacterNameError(f"character name {clean!r}: no control characters allowed")
    if any(unicodedata.category(c) == "Cf" and c != "\u200d" for c in clean):
        raise CharacterNameError(f"character name {clean!r}: no invisible format characters (such as "
                                 "zero-width spaces or direction marks) allowed")
    return clean


def to_blob(vector) -> bytes:
    return np.asarray(vector, dtype=np.float16).tobytes()


def from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float16).astype(np.float32)


class CharacterMethods:
    db: object  # sqlite_utils.Database, set by Store

    # ---- characters and names ----------------------------------------------------------------
    def character_id(self, name: str, *, create: bool = False) -> int | None:
        """The id of the character called ``name`` (validated; the same character whatever the
        case, underscores or spacing: :func:`name_key`); created if asked."""
        name = check_name(name)
        row = self.db.execute("SELECT id FROM characters WHERE name = ?", [name]).fetchone()
        if row is None:
            key = name_key(name)
            row = next(((cid,) for cid, known in self.character_names().items() if name_key(known) == key), None)
        if row is not None or not create:
            return row[0] if row else None
        with self.db.conn:
            return self.db.execute("INSERT INTO characters (name, created_at) VALUES (?, ?)",
                                   [name, _now()]).lastrowid

    def character_names(self) -> dict[int, str]:
        return {r[0]: r[1] for r in self.db.execute("SELECT id, name FROM characters ORDER BY name")}

    def list_characters(self) -> list[dict]:
        """Every character with its number of named faces (examples), by name."""
        return [dict(r) for r in self.db.query(
            "SELECT characters.id, characters.name, COUNT(face_names.face_id) AS examples, "
            "SUM(COALESCE(face_names.weak, 0)) AS weak FROM characters "
            "LEFT JOIN face_names ON face_names.character_id = characters.id "
            "GROUP BY characters.id ORDER BY characters.name")]

    def name_face(self, face_id: int, character_id: int, *, origin: str, weak: bool = False) -> None:
        """Name a face (replacing an earlier name of it)."""
        if origin not in NAME_ORIGINS:
            raise ValueError(f"unknown name origin {origin!r} (expected one of {', '.join(NAME_ORIGINS)})")
        with self.db.conn:
            self.db.execute("INSERT OR REPLACE INTO face_names (face_id, character_id, origin, weak, created_at) "
                            "VALUES (?, ?, ?, ?, ?)", [face_id, character_id, origin, int(weak), _now()])

    def unname_face(self, face_id: int) -> bool:
        """Take a face's given name away (recognition speaks for it again); False if it had none."""
        with self.db.conn:
            if not self.db.execute("DELETE FROM face_names WHERE face_id = ?", [face_id]).rowcount:
                return False
            # a name taken back makes the results it led to stale too (see enrolment_stamp)
            self.db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                            [NAMES_CHANGED, json.dumps(_now())])
        return True

    def face_with_media(self, face_id: int) -> dict | None:
        """A stored face (box, detector, ``image_id``) with its picture's ``media_path``."""
        rows = list(self.db.query("SELECT faces.*, images.media_path FROM faces JOIN images "
                                  "ON images.id = faces.image_id WHERE faces.id = ?", [face_id]))
        return dict(rows[0]) if rows else None

    def name_from_tags(self, image_id: int) -> str | None:
        """A weak name from the source's character tags (booru): a picture whose tags name exactly
        one character and which has exactly one real face (not the whole picture or a crop) gets
        that face named as the character (origin ``booru``, weak), unless the face is named
        already. Returns the name given, or None. A tag that cannot be a name (a slash, ...) is
        skipped, logged at debug level."""
        row = self.db.execute("SELECT characters FROM images WHERE id = ?", [image_id]).fetchone()
        try:
            names = json.loads(row[0] or "[]") if row else []
        except ValueError:
            return None
        if not isinstance(names, list) or len(names) != 1 or not isinstance(names[0], str):
            return None
        faces = [r[0] for r in self.db.execute(
            f"SELECT id FROM faces WHERE image_id = ? AND detector NOT IN ({','.join('?' * len(WHOLE))})",
            [image_id, *WHOLE])]
        if len(faces) != 1 or self.face_name(faces[0]) is not None:
            return None
        try:
            name = check_name(names[0])
        except CharacterNameError as e:
            log.debug("image %d: character tag not used as a name: %s", image_id, e)
            return None
        self.name_face(faces[0], self.character_id(name, create=True), origin="booru", weak=True)
        log.info("image %d: its face named %s from the source's character tag (weak)", image_id, name)
        return name

    def face_name(self, face_id: int) -> dict | None:
        rows = list(self.db.query(
            "SELECT face_names.*, characters.name FROM face_names JOIN characters "
            "ON characters.id = face_names.character_id WHERE face_id = ?", [face_id]))
        return dict(rows[0]) if rows else None

    def named_faces(self, *, include_weak: bool = True) -> list[dict]:
        """Every named face with its box, picture and character: the identity training set (not
        the faces of pictures whose media was pruned: weak names only, see ``storage/prune.py``)."""
        return [dict(r) for r in self.db.query(
            "SELECT faces.*, images.media_path, images.sha256, face_names.character_id, characters.name, face_names.origin, "
            "face_names.weak FROM face_names JOIN faces ON faces.id = face_names.face_id "
            "JOIN images ON images.id = faces.image_id JOIN characters ON characters.id = face_names.character_id "
            "WHERE images.media_pruned_at IS NULL " + ("" if include_weak else "AND face_names.weak = 0 ")
            + "ORDER BY faces.id")]

    # ---- embeddings ----------------------------------------------------------------------------
    def save_embeddings(self, model_version: str, vectors: dict[int, object]) -> None:
        """Store face embeddings (face id -> vector) of one embedder version, as float16."""
        stamp = _now()
        with self.db.conn:
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO face_embeddings (face_id, model_version, vector, created_at) "
                "VALUES (?, ?, ?, ?)", [(fid, model_version, to_blob(v), stamp) for fid, v in vectors.items()])

    def embeddings(self, model_version: str, face_ids=None) -> dict[int, np.ndarray]:
        """Stored embeddings of one version (of ``face_ids``, or all) as float32 arrays."""
        sql, params = "SELECT face_id, vector FROM face_embeddings WHERE model_version = ?", [model_version]
        if face_ids is not None:
            face_ids = list(face_ids)
            if not face_ids:
                return {}
            sql += f" AND face_id IN ({','.join('?' * len(face_ids))})"
            params += face_ids
        return {r[0]: from_blob(r[1]) for r in self.db.execute(sql, params)}

    def enrolled(self, model_version: str) -> list[tuple[int, int, np.ndarray]]:
        """(face id, character id, embedding) of every named face embedded by this version."""
        return [(r[0], r[1], from_blob(r[2])) for r in self.db.execute(
            "SELECT face_names.face_id, face_names.character_id, face_embeddings.vector FROM face_names "
            "JOIN face_embeddings ON face_embeddings.face_id = face_names.face_id "
            "AND face_embeddings.model_version = ? ORDER BY face_names.face_id", [model_version])]

    # ---- recognition results -------------------------------------------------------------------
    def save_identities(self, model_version: str, results: dict[int, tuple[int | None, float]]) -> None:
        """Recognition results: face id -> (character id or None for unknown, similarity)."""
        stamp = _now()
        with self.db.conn:
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO face_identity (face_id, model_version, character_id, similarity, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(fid, model_version, cid, float(sim), stamp) for fid, (cid, sim) in results.items()])

    def identities(self, model_version: str, face_ids) -> dict[int, tuple[str | None, float]]:
        """face id -> (character name or None, similarity) of one embedder version."""
        face_ids = list(face_ids)
        if not face_ids:
            return {}
        return {r[0]: (r[1], r[2]) for r in self.db.execute(
            "SELECT face_identity.face_id, characters.name, face_identity.similarity FROM face_identity "
            "LEFT JOIN characters ON characters.id = face_identity.character_id WHERE model_version = ? "
            f"AND face_id IN ({','.join('?' * len(face_ids))})", [model_version, *face_ids])}

    def enrolment_stamp(self) -> tuple[int, str | None]:
        """(number of named faces, time of the newest name or of the last name taken back): it
        changes whenever a face is named, renamed or unnamed (the CLI, the gallery, Discord, booru
        tags), so a recognizer built from the names knows cheaply when it is stale."""
        n, newest = self.db.execute("SELECT COUNT(*), MAX(created_at) FROM face_names").fetchone()
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", [NAMES_CHANGED]).fetchone()
        taken_back = json.loads(row[0]) if row else None
        return n, max(t for t in (newest, taken_back, "") if t is not None) or None

    def faces_to_identify(self, model_version: str, since: str | None, limit: int, after_id: int = 0) -> list[dict]:
        """Unnamed faces of stored pictures (detected boxes and imported crops, not whole pictures
        in which no face was found) with no recognition result of ``model_version`` made at or after
        ``since`` (the newest name's time: older results are stale), by id, after ``after_id``;
        each row has the picture's ``media_path``."""
        return [dict(r) for r in self.db.query(
            "SELECT faces.*, images.media_path FROM faces JOIN images ON images.id = faces.image_id "
            "LEFT JOIN face_identity ON face_identity.face_id = faces.id AND face_identity.model_version = ? "
            "WHERE faces.id > ? AND faces.detector != ? AND images.media_path IS NOT NULL AND images.media_pruned_at IS NULL "
            "AND faces.id NOT IN (SELECT face_id FROM face_names) "
            "AND (face_identity.face_id IS NULL OR face_identity.created_at < ?) ORDER BY faces.id LIMIT ?",
            [model_version, after_id, WHOLE_PICTURE, since or "", limit])]

    def faces_of_pictures(self, image_ids) -> list[dict]:
        """The unnamed faces (not whole pictures) of these pictures with their ``media_path``, by id."""
        image_ids = list(image_ids)
        if not image_ids:
            return []
        return [dict(r) for r in self.db.query(
            "SELECT faces.*, images.media_path FROM faces JOIN images ON images.id = faces.image_id "
            f"WHERE faces.image_id IN ({','.join('?' * len(image_ids))}) AND faces.detector != ? "
            "AND images.media_path IS NOT NULL AND images.media_pruned_at IS NULL "
            "AND faces.id NOT IN (SELECT face_id FROM face_names) ORDER BY faces.id", [*image_ids, WHOLE_PICTURE])]

    # ---- who is in a picture ---------------------------------------------------------------------
    def face_characters(self, face_ids) -> dict[int, dict]:
        """face id -> ``{"character", "similarity", "named_by", "weak"}`` of faces that have a
        character (given name, else the active embedder's recognition; ``character`` None:
        recognised as unknown). A face neither named nor recognised yet is absent."""
        face_ids = list(face_ids)
        if not face_ids:
            return {}
        return {r["face_id"]: {"character": r["name"], "similarity": r["similarity"], "named_by": r["named_by"],
                               "weak": bool(r["weak"])} for r in self.db.query(
            "SELECT face_characters.*, characters.name FROM face_characters "
            "LEFT JOIN characters ON characters.id = face_characters.character_id "
            f"WHERE face_characters.face_id IN ({','.join('?' * len(face_ids))}) "
            "AND (face_characters.character_id IS NOT NULL OR face_characters.similarity IS NOT NULL)",
            face_ids)}

    def unrecognised_faces(self, image_id: int) -> int:
        """How many real faces of the picture (not a whole picture) have neither a name nor a
        result of the active embedder yet (say, after a promotion, until the background run)."""
        return self.db.execute(
            "SELECT COUNT(*) FROM face_characters JOIN faces ON faces.id = face_characters.face_id "
            "WHERE face_characters.image_id = ? AND faces.detector != ? AND face_characters.character_id IS NULL "
            "AND face_characters.similarity IS NULL", [image_id, WHOLE_PICTURE]).fetchone()[0]

    def picture_characters(self, image_ids) -> dict[int, list[str]]:
        """image id -> the distinct character names of its faces (named or recognised), by name."""
        image_ids = list(image_ids)
        out: dict[int, list[str]] = {i: [] for i in image_ids}
        if image_ids:
            for r in self.db.execute(
                    "SELECT DISTINCT face_characters.image_id, characters.name FROM face_characters "
                    "JOIN characters ON characters.id = face_characters.character_id "
                    f"WHERE face_characters.image_id IN ({','.join('?' * len(image_ids))}) ORDER BY characters.name",
                    image_ids):
                out[r[0]].append(r[1])
        return out

    # ---- identity embedders -------------------------------------------------------------------
    def register_identity_model(self, version: str, arch: str, path: str, *, data_size: int = 0,
                                metrics: dict | None = None, threshold: float | None = None,
                                activate: bool = False, notes: str | None = None) -> None:
        with self.db.conn:
            self.db.execute(
                "INSERT OR REPLACE INTO identity_models (version, arch, path, created_at, data_size, metrics, "
                "threshold, active, notes) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                [version, arch, path, _now(), data_size, json.dumps(metrics) if metrics else None, threshold,
                 notes])
            if activate:
                self.db.execute("UPDATE identity_models SET active = (version = ?)", [version])

    def update_identity_metrics(self, version: str, metrics: dict) -> bool:
        """Merge ``metrics`` into the stored metrics of an embedder version (its keys replace
        those of the same name); False when there is no such version."""
        with self.db.conn:
            row = self.db.execute("SELECT metrics FROM identity_models WHERE version = ?", [version]).fetchone()
            if row is None:
                return False
            merged = {**(json.loads(row[0]) if row[0] else {}), **metrics}
            self.db.execute("UPDATE identity_models SET metrics = ? WHERE version = ?", [json.dumps(merged), version])
        return True

    def active_identity_model(self) -> dict | None:
        rows = list(self.db.query("SELECT * FROM identity_models WHERE active = 1 LIMIT 1"))
        return dict(rows[0]) if rows else None

    def get_identity_model(self, version: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM identity_models WHERE version = ?", [version]))
        return dict(rows[0]) if rows else None

    def activate_identity_model(self, version: str) -> bool:
        with self.db.conn:
            if self.get_identity_model(version) is None:
                return False
            self.db.execute("UPDATE identity_models SET active = (version = ?)", [version])
        return True

    def list_identity_models(self) -> list[dict]:
        return [dict(r) for r in self.db.query("SELECT * FROM identity_models ORDER BY created_at")]
