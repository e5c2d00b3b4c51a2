"""Safe upgrades: a database built at every earlier schema version (by the migrations
themselves), filled with rows in every table, upgrades to the latest with nothing lost; a
migration that fails is rolled back, named, and leaves the database as it was."""
from __future__ import annotations

import json
import sqlite3

import pytest
import sqlite_utils
from sqlite_utils.migrations import Migrations

from storage import Store
from storage.db import SCHEMA_VERSION, StorageError, migrate_db, migrations, open_db, schema_state
from tests.helpers import cli

NAMES = [m.name for m in migrations._migrations]
JSON_LISTS = {"tags", "characters"}
JSON_OBJECTS = {"config", "cursor", "metrics"}


def build_at(path, version: int) -> sqlite_utils.Database:
    """A database with the first ``version`` migrations applied, as that release created it."""
    db = sqlite_utils.Database(sqlite3.connect(str(path)))
    db.execute("PRAGMA foreign_keys = ON")
    migrations.apply(db, stop_before=NAMES[version] if version < len(NAMES) else None)
    assert schema_state(db)[0] == version
    return db


def tables(db) -> list[str]:
    """Every table, parents before the tables that reference them."""
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                      "AND name NOT LIKE '\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite%'")]
    deps = {t: {fk[2] for fk in db.execute(f"PRAGMA foreign_key_list({t})")} - {t} for t in names}
    ordered: list[str] = []
    while len(ordered) < len(names):
        for t in sorted(names):
            if t not in ordered and deps[t] <= set(ordered):
                ordered.append(t)
    return ordered


def value(table: str, column: dict, i: int, fks: dict):
    """Row ``i``'s (1-3) value for a column: valid for every constraint and for the JSON the
    code reads, different per row, table and column."""
    name, kind = column["name"], (column["type"] or "").upper()
    if table == "comparisons" and name == "loser_id":
        return i % 3 + 1                     # never the winner
    if name in fks:
        parent, target = fks[name]
        if parent == table:
            return None                      # a self reference (duplicate_of)
        return f"v{i}" if target == "version" else i
    if column["pk"] and kind == "INTEGER":
        return i
    if name in JSON_LISTS:
        return json.dumps([f"{table}-{i}"])
    if name in JSON_OBJECTS or (table == "settings" and name == "value"):
        return json.dumps({"row": i})
    if name == "version" or name == "model_version":
        return f"v{i}"
    if name == "removed_at":
        return None                          # labels and comparisons still in force
    if name.endswith("_at"):
        return f"2026-0{i}-01T00:00:00.000+00:00"
    if name == "status":
        return "scored" if table == "images" else "sent"
    if kind == "INTEGER":
        return i
    if kind == "REAL":
        return i + 0.25
    if kind == "BLOB":
        return bytes([i]) * 8
    return f"{table}.{name}.{i}"


def fill(db) -> dict[str, list[tuple]]:
    """Three rows in every table; returns each table's rows as inserted (its columns at this version)."""
    written = {}
    for table in tables(db):
        columns = [dict(zip(("cid", "name", "type", "notnull", "default", "pk"), c))
                   for c in db.execute(f"PRAGMA table_info({table})")]
        fks = {fk[3]: (fk[2], fk[4]) for fk in db.execute(f"PRAGMA foreign_key_list({table})")}
        names = [c["name"] for c in columns]
        rows = [tuple(value(table, c, i, fks) for c in columns) for i in (1, 2, 3)]
        with db.conn:
            db.conn.executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES "
                                f"({', '.join('?' * len(names))})", rows)
        written[table] = (names, rows)
    return written


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_a_database_from_each_earlier_version_upgrades_with_nothing_lost(tmp_path, version):
    path = tmp_path / "old.db"
    old = build_at(path, version)
    written = fill(old)
    old.conn.close()

    with Store.open(path) as store:            # what every command does on start: migrate
        db = store.db
        assert schema_state(db) == (SCHEMA_VERSION, [])
        for table, (names, rows) in written.items():
            got = [tuple(r) for r in db.execute(f"SELECT {', '.join(names)} FROM {table} ORDER BY rowid")]
            assert got == rows, table
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        # the upgraded database works with today's code
        assert sum(store.status_counts().values()) == 3
        assert store.label_count() == 3


def test_a_failing_migration_is_rolled_back_named_and_leaves_the_data(tmp_path):
    path = tmp_path / "t.db"
    db = build_at(path, SCHEMA_VERSION)
    fill(db)
    labels = db.execute("SELECT * FROM labels ORDER BY id").fetchall()

    broken = Migrations("tastefeed")
    broken._migrations = list(migrations._migrations)

    @broken()
    def m999_broken(db):
        db.execute("UPDATE labels SET value = 1")
        db.execute("ALTER TABLE labels ADD COLUMN half_done TEXT")
        raise ValueError("disk on fire")

    with pytest.raises(StorageError) as e:
        migrate_db(db, path, broken)
    message = str(e.value)
    assert "m999_broken" in message and "disk on fire" in message and f"schema version {SCHEMA_VERSION}" in message
    assert db.execute("SELECT * FROM labels ORDER BY id").fetchall() == labels
    assert "half_done" not in {c[1] for c in db.execute("PRAGMA table_info(labels)")}
    assert schema_state(db, broken) == (SCHEMA_VERSION, ["m999_broken"])


def test_open_db_reports_a_failing_migration_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "t.db"
    build_at(path, SCHEMA_VERSION - 1).conn.close()
    last = migrations._migrations[-1]

    def fails(db):
        raise sqlite3.OperationalError("no such table: nowhere")
    monkeypatch.setattr(last, "fn", fails)
    with pytest.raises(StorageError) as e:
        open_db(path)
    assert last.name in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    db = open_db(path)                          # a fixed release upgrades the same file
    assert schema_state(db) == (SCHEMA_VERSION, [])


def test_doctor_reports_the_schema_version_and_pending_migrations(tmp_path):
    (tmp_path / "config.toml").write_text(f'data_dir = "{tmp_path / "data"}"\n')
    (tmp_path / "data").mkdir()
    build_at(tmp_path / "data" / "tastefeed.db", SCHEMA_VERSION - 2).conn.close()
    out = cli(tmp_path, "doctor").stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("schema"))
    assert f"version {SCHEMA_VERSION - 2}" in line and NAMES[-1] in line and NAMES[-2] in line, out
    out = cli(tmp_path, "doctor").stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("schema"))
    assert f"version {SCHEMA_VERSION}" in line and "up to date" in line, out
