"""Opening the database and its versioned schema migrations (sqlite-utils ``Migrations``).

Each migration is applied once, in order, inside a transaction, and recorded in
``_sqlite_migrations``; add new ones at the end, never edit an applied one.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils
from sqlite_utils.migrations import Migrations


class StorageError(Exception):
    """The database cannot be opened or written; the message says why."""


migrations = Migrations("tastefeed")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db.execute("""
    CREATE TABLE sources (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        config TEXT NOT NULL,               -- JSON: interval, enabled, max_items, options
        origin TEXT NOT NULL DEFAULT 'config',  -- config | cli
        cursor TEXT NOT NULL DEFAULT '{}',  -- JSON, the source's own resume point
        healthy INTEGER NOT NULL DEFAULT 1,
        failures INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        last_poll_at TEXT,
        last_success_at TEXT,
        next_poll_at TEXT,
        items_fetched INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    )""")
    db.execute("""
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        source_id INTEGER REFERENCES sources(id) ON DELETE SET NULL,
        external_id TEXT NOT NULL,
        page_url TEXT,
        media_url TEXT,
        local_path TEXT,
        author TEXT,
        title TEXT,
        tags TEXT NOT NULL DEFAULT '[]',    -- JSON list
        rating TEXT,                        -- general | sensitive | questionable | explicit
        popularity REAL,                    -- the site's own score / likes
        site_md5 TEXT,
        posted_at TEXT,
        status TEXT NOT NULL DEFAULT 'pending',
            -- pending -> downloaded -> scored | skipped ; failed ; duplicate ; near_duplicate
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        sha256 TEXT,
        phash TEXT,
        width INTEGER,
        height INTEGER,
        format TEXT,
        bytes INTEGER,
        media_path TEXT,                    -- relative to the media folder
        duplicate_of INTEGER REFERENCES images(id),
        score REAL,                         -- latest image score of the active model
        uncertainty REAL,
        model_version TEXT,
        created_at TEXT NOT NULL,
        fetched_at TEXT,
        scored_at TEXT
    )""")
    db.execute("CREATE UNIQUE INDEX images_source_external ON images(source_id, external_id)")
    db.execute("CREATE INDEX images_status ON images(status)")
    db.execute("CREATE INDEX images_sha256 ON images(sha256)")
    db.execute("CREATE INDEX images_score ON images(score)")
    db.execute("""
    CREATE TABLE faces (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        detector TEXT NOT NULL,             -- animeface | opencv | yolo | whole
        x1 INTEGER NOT NULL, y1 INTEGER NOT NULL, x2 INTEGER NOT NULL, y2 INTEGER NOT NULL,
        confidence REAL NOT NULL
    )""")
    db.execute("CREATE INDEX faces_image ON faces(image_id)")
    db.execute("""
    CREATE TABLE models (
        version TEXT PRIMARY KEY,
        arch TEXT NOT NULL,
        path TEXT NOT NULL,                 -- relative to the models folder
        created_at TEXT NOT NULL,
        data_size INTEGER NOT NULL DEFAULT 0,
        metrics TEXT,                       -- JSON
        active INTEGER NOT NULL DEFAULT 0,
        notes TEXT
    )""")
    db.execute("""
    CREATE TABLE predictions (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        face_id INTEGER REFERENCES faces(id) ON DELETE CASCADE,   -- NULL: the image's own score
        model_version TEXT NOT NULL REFERENCES models(version),
        score REAL NOT NULL,
        uncertainty REAL,
        created_at TEXT NOT NULL
    )""")
    db.execute("CREATE INDEX predictions_image ON predictions(image_id, model_version)")
    db.execute("""
    CREATE TABLE labels (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        face_id INTEGER REFERENCES faces(id) ON DELETE SET NULL,
        user TEXT NOT NULL,
        value INTEGER NOT NULL CHECK (value BETWEEN 1 AND 5),
        origin TEXT NOT NULL,               -- import | discord | web | cli
        ref TEXT,                           -- e.g. the Discord message id
        created_at TEXT NOT NULL
    )""")
    db.execute("CREATE INDEX labels_image ON labels(image_id)")
    db.execute("""
    CREATE TABLE posts (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        channel TEXT NOT NULL,              -- discord | web
        channel_id TEXT,
        message_id TEXT,
        status TEXT NOT NULL,               -- intent | sent | failed
        exploration INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        sent_at TEXT
    )""")
    db.execute("CREATE INDEX posts_image ON posts(image_id)")



@migrations()
def m002_labels_by_time(db: sqlite_utils.Database) -> None:
    db.execute("CREATE INDEX labels_created ON labels(created_at)")
    db.execute("CREATE INDEX predictions_face ON predictions(face_id)")


@migrations()
def m003_discord(db: sqlite_utils.Database) -> None:
    # A label the owner took back (a removed reaction, an undo) keeps its row, marked removed:
    # every read of labels ignores removed ones, and the history stays.
    db.execute("ALTER TABLE labels ADD COLUMN removed_at TEXT")
    db.execute("CREATE INDEX labels_ref ON labels(ref)")
    db.execute("ALTER TABLE posts ADD COLUMN reason TEXT")     # score | popularity | recent | explore | command
    db.execute("ALTER TABLE posts ADD COLUMN error TEXT")
    db.execute("CREATE INDEX posts_message ON posts(message_id)")
    db.execute("CREATE INDEX posts_status ON posts(channel, status)")
    db.execute("""
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL                 -- JSON
    )""")



@migrations()
def m004_characters(db: sqlite_utils.Database) -> None:
    # Characters and the faces named as them (the labelled examples), identity embeddings per
    # embedder version, recognition results, and the identity embedders' own registry.
    db.execute("""
    CREATE TABLE characters (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    )""")
    db.execute("""
    CREATE TABLE face_names (
        face_id INTEGER PRIMARY KEY REFERENCES faces(id) ON DELETE CASCADE,
        character_id INTEGER NOT NULL REFERENCES characters(id) ON DELETE CASCADE,
        origin TEXT NOT NULL,               -- import | enrol | booru | gallery | discord
        weak INTEGER NOT NULL DEFAULT 0,    -- 1: inferred (e.g. one booru character tag), not given
        created_at TEXT NOT NULL
    )""")
    db.execute("CREATE INDEX face_names_character ON face_names(character_id)")
    db.execute("""
    CREATE TABLE face_embeddings (
        face_id INTEGER NOT NULL REFERENCES faces(id) ON DELETE CASCADE,
        model_version TEXT NOT NULL,        -- identity_models.version
        vector BLOB NOT NULL,               -- float16, L2-normalised
        created_at TEXT NOT NULL,
        PRIMARY KEY (face_id, model_version)
    )""")
    db.execute("""
    CREATE TABLE face_identity (
        face_id INTEGER NOT NULL REFERENCES faces(id) ON DELETE CASCADE,
        model_version TEXT NOT NULL,
        character_id INTEGER REFERENCES characters(id) ON DELETE SET NULL,  -- NULL: unknown
        similarity REAL NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (face_id, model_version)
    )""")
    db.execute("CREATE INDEX face_identity_character ON face_identity(character_id)")
    db.execute("""
    CREATE TABLE identity_models (
        version TEXT PRIMARY KEY,
        arch TEXT NOT NULL,
        path TEXT NOT NULL,                 -- relative to the models folder
        created_at TEXT NOT NULL,
        data_size INTEGER NOT NULL DEFAULT 0,
        metrics TEXT,                       -- JSON; NULL: untrained
        threshold REAL,                     -- calibrated similarity below which a face is unknown
        active INTEGER NOT NULL DEFAULT 0,
        notes TEXT
    )""")

@migrations()
def m005_character_tags(db: sqlite_utils.Database) -> None:
    # The characters a source's own tags name (booru character tags), and the character of every
    # face: its given name (face_names) if any, else the active identity embedder's recognition.
    db.execute("ALTER TABLE images ADD COLUMN characters TEXT NOT NULL DEFAULT '[]'")  # JSON list
    db.execute("""
    CREATE VIEW face_characters AS
    SELECT faces.id AS face_id, faces.image_id,
           COALESCE(face_names.character_id, face_identity.character_id) AS character_id,
           CASE WHEN face_names.face_id IS NOT NULL THEN 1.0 ELSE face_identity.similarity END AS similarity,
           face_names.origin AS named_by,             -- NULL: recognised, not named
           COALESCE(face_names.weak, 0) AS weak
    FROM faces
    LEFT JOIN face_names ON face_names.face_id = faces.id
    LEFT JOIN face_identity ON face_identity.face_id = faces.id
         AND face_identity.model_version = (SELECT version FROM identity_models WHERE active = 1)
    """)


@migrations()
def m006_comparisons(db: sqlite_utils.Database) -> None:
    # Pairwise comparisons ("which of these two do you prefer?"), a second kind of label; one
    # taken back (an undo, a removed reaction) keeps its row, marked removed, as labels do.
    db.execute("""
    CREATE TABLE comparisons (
        id INTEGER PRIMARY KEY,
        winner_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        loser_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        origin TEXT NOT NULL,               -- gallery | discord | import
        user TEXT NOT NULL,
        ref TEXT,                           -- e.g. MESSAGE_ID/EMOJI (Discord), FILE:ROW (import)
        created_at TEXT NOT NULL,
        removed_at TEXT,
        CHECK (winner_id != loser_id)
    )""")
    db.execute("CREATE INDEX comparisons_created ON comparisons(created_at)")
    db.execute("CREATE INDEX comparisons_ref ON comparisons(ref)")
    # The two-picture Discord posts (A and B) that reactions answer: message -> pair, kept so a
    # reaction after a restart still counts.
    db.execute("""
    CREATE TABLE compare_posts (
        id INTEGER PRIMARY KEY,
        a_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        b_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        channel TEXT NOT NULL,              -- discord
        channel_id TEXT,
        message_id TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""")
    db.execute("CREATE INDEX compare_posts_message ON compare_posts(message_id)")


@migrations()
def m007_features(db: sqlite_utils.Database) -> None:
    # Cached features of each face per source (a feature backbone's version, the whole picture's
    # features, colour statistics, a taste network's own outputs): the taste head refits from
    # these in seconds, without decoding a picture (storage/features.py).
    db.execute("""
    CREATE TABLE face_features (
        face_id INTEGER NOT NULL REFERENCES faces(id) ON DELETE CASCADE,
        source TEXT NOT NULL,
        vector BLOB NOT NULL,               -- float16
        created_at TEXT NOT NULL,
        PRIMARY KEY (face_id, source)
    )""")
    db.execute("CREATE INDEX face_features_source ON face_features(source)")


@migrations()
def m008_media_pruned(db: sqlite_utils.Database) -> None:
    # Bounded disk (storage/prune.py): the media file of an old, unrated, unposted picture may be
    # removed; its row, faces, scores and cached features stay, and this says when it went. A
    # fetch from its source (or the same bytes stored again) clears it.
    db.execute("ALTER TABLE images ADD COLUMN media_pruned_at TEXT")


@migrations()
def m009_detector_boxes(db: sqlite_utils.Database) -> None:
    # Face boxes for training the owner's own YOLO detector (storage/boxes.py), kept apart from
    # the detections used for scoring (faces). A picture is *proposed* (boxes from the bootstrap
    # detectors, not checked) until the owner accepts it in the gallery's Boxes page: then it is
    # *verified* and its boxes are the truth. A verified picture can get proposals again (a newly
    # promoted detector's): its verified boxes stay, and the disagreement puts it back in review.
    db.execute("""
    CREATE TABLE box_pictures (
        image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
        state TEXT NOT NULL,                -- proposed | verified
        certainty REAL NOT NULL DEFAULT 0,  -- 0..1, how sure the proposals are (least sure reviewed first)
        disagreement REAL NOT NULL DEFAULT 0,  -- 0..1, proposals against verified boxes (reviewed first)
        proposed_by TEXT,                   -- the detectors that proposed, e.g. "animeface+lbp+haar"
        proposed_at TEXT,
        verified_at TEXT,
        holdout INTEGER NOT NULL DEFAULT 0  -- 1: held out of training, for evaluation
    )""")
    db.execute("CREATE INDEX box_pictures_review ON box_pictures(state, disagreement DESC, certainty)")
    db.execute("""
    CREATE TABLE boxes (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES box_pictures(image_id) ON DELETE CASCADE,
        kind TEXT NOT NULL,                 -- proposed | verified
        x1 INTEGER NOT NULL, y1 INTEGER NOT NULL, x2 INTEGER NOT NULL, y2 INTEGER NOT NULL,
        origin TEXT NOT NULL,               -- detectors that found it ("animeface,lbp") | owner
        confidence REAL NOT NULL,           -- 0..1
        sure INTEGER NOT NULL DEFAULT 0     -- 1: found by two detectors or more
    )""")
    db.execute("CREATE INDEX boxes_image ON boxes(image_id, kind)")


@migrations()
def m010_kept_ranking(db: sqlite_utils.Database) -> None:
    # 100,000 pictures stay instant (storage/ranking.py): each order of the ranking has a partial
    # index over the stored scored pictures, so a page is read along an index instead of sorting
    # every candidate; the popularity percentile within a source is kept in a column.
    db.execute("ALTER TABLE images ADD COLUMN pop_rank REAL")
    db.execute("UPDATE images SET pop_rank = ranked.r FROM (SELECT id, PERCENT_RANK() OVER "
               "(PARTITION BY source_id ORDER BY popularity) AS r FROM images WHERE status = 'scored' "
               "AND duplicate_of IS NULL AND popularity IS NOT NULL) AS ranked WHERE images.id = ranked.id")
    for sql in M010_INDEXES:
        db.execute(sql)


# m010's indexes, frozen here (storage/ranking.py ranking_indexes() says the same; a test checks it).
_SCORED = "WHERE status = 'scored' AND duplicate_of IS NULL AND media_pruned_at IS NULL"
M010_INDEXES = (
    f"CREATE INDEX images_rank_score ON images(COALESCE(score, -1e9) DESC, id DESC) {_SCORED}",
    "CREATE INDEX images_rank_popularity ON images(COALESCE(pop_rank, -1.0) DESC, COALESCE(popularity, 0) DESC, "
    f"id DESC) {_SCORED}",
    f"CREATE INDEX images_rank_uncertain ON images(COALESCE(uncertainty, -1.0) DESC, id DESC) {_SCORED}",
    f"CREATE INDEX images_rank_shuffled ON images(((id * 2654435761) % 4294967291) ASC, id ASC) {_SCORED}",
    "CREATE INDEX images_popularity ON images(source_id, popularity) WHERE status = 'scored' "
    "AND duplicate_of IS NULL AND popularity IS NOT NULL",
)


@migrations()
def m011_detector_version(db: sqlite_utils.Database) -> None:
    # Which detector found each picture's faces: "own:VERSION" (the owner's own detector,
    # scorer/own_detector.py), NULL for the configured one. After a switch, pictures found by
    # another detector are detected again in the background (bot/detector_watch.py), and a
    # restart resumes from this column.
    db.execute("ALTER TABLE images ADD COLUMN detector_version TEXT")


@migrations()
def m012_box_skips(db: sqlite_utils.Database) -> None:
    # Skipping a picture on the gallery's Boxes page sends it to the back of the review queue
    # (storage/boxes.py): skip_order counts the skips (1, 2, ...: later skips higher), NULL while
    # it is not skipped. It comes back once every picture not skipped was seen, the longest
    # skipped first, and a restart keeps the order.
    db.execute("ALTER TABLE box_pictures ADD COLUMN skip_order INTEGER")


SCHEMA_VERSION = len(migrations._migrations)


def schema_state(db: sqlite_utils.Database, migration_set: Migrations = migrations) -> tuple[int, list[str]]:
    """(the database's schema version: how many migrations are applied, the pending ones' names)."""
    return len(migration_set.applied(db)), [m.name for m in migration_set.pending(db)]


def migrate_db(db: sqlite_utils.Database, path: str | Path, migration_set: Migrations = migrations) -> list[str]:
    """Apply the pending migrations one at a time, each in its own transaction; returns their
    names. A migration that fails is rolled back, leaving the database at the version before it
    (every earlier migration of this run stays applied: each is complete), and raises
    StorageError naming it and why."""
    done = []
    names = [m.name for m in migration_set._migrations]
    for migration in migration_set.pending(db):
        later = names[names.index(migration.name) + 1:]
        try:
            migration_set.apply(db, stop_before=later[:1] or None)
        except Exception as e:  # noqa: BLE001 - any failure: say which migration, keep the data
            version = len(migration_set.applied(db))
            raise StorageError(f"{path}: upgrading the database failed in migration {migration.name}: "
                               f"{type(e).__name__}: {e}; it was rolled back and the database is as it "
                               f"was at schema version {version}") from None
        done.append(migration.name)
    return done


def open_db(path: str | Path, *, migrate: bool = True) -> sqlite_utils.Database:
    """Open (creating if needed) the database: WAL journal, foreign keys on, migrations applied."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30, check_same_thread=True)
        db = sqlite_utils.Database(conn)
        db.execute("PRAGMA busy_timeout = 30000")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and path.exists():
            # A read-only file or folder cannot switch to WAL: say so rather than fail later.
            raise StorageError(f"{path}: cannot use WAL journal mode (journal_mode={mode}); "
                               "is the file or its folder read-only?")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = NORMAL")
        if migrate:
            migrate_db(db, path)
    except StorageError:
        raise
    except sqlite3.OperationalError as e:
        raise StorageError(f"{path}: {e} (is the file read-only, locked by another program, "
                           "or its folder missing?)") from None
    except sqlite3.DatabaseError as e:
        raise StorageError(f"{path}: not a tastefeed database or damaged: {e}") from None
    except OSError as e:
        raise StorageError(f"{path}: {e.strerror}") from None
    return db
