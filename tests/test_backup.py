"""Backups taken while the daemon ingests, restore, export-labels round trips and scheduled backups
(storage/backup.py, storage/export.py, bot/backups.py)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import sqlite3

import pytest
import sqlite_utils

from bot.backups import BackupJob
from bot.config import ConfigError
from bot.daemon import Daemon
from storage import SCHEMA_VERSION, Store
from storage.backup import BackupError, backup, integrity_problem, restore, schema_version
from storage.db import migrations
from tests.helpers import cli, make_config, picture, seed, wait_for


def _labels(db_path) -> list[tuple]:
    """Every label row, as the database holds it."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT id, image_id, user, value, origin, ref, created_at, removed_at "
                            "FROM labels ORDER BY id").fetchall()
    finally:
        conn.close()


def _fresh(tmp_path, name: str):
    folder = tmp_path / name
    folder.mkdir()
    return make_config(folder)


# ---- backup while the daemon runs, and restore -----------------------------------------------------
async def test_a_backup_while_ingesting_holds_every_acknowledged_label_and_restores(tmp_path):
    cfg = make_config(tmp_path)
    daemon = Daemon(cfg)
    await daemon.start()
    dest = tmp_path / "backups" / "first"
    try:
        for i in range(6):
            (tmp_path / "inbox" / f"p{i}.jpg").write_bytes(picture(i))

        async def scored():
            rows = await daemon.store.execute("SELECT id FROM images WHERE status = 'scored'")
            return [r["id"] for r in rows] if len(rows) >= 6 else None
        ids = await wait_for(scored, timeout=20)

        acked: list[tuple[int, str]] = []     # (image id, ref) of every label the store acknowledged
        writing = True

        async def rate():
            n = 0
            while writing:
                image_id = ids[n % len(ids)]
                assert await daemon.store.add_label(image_id, 1 + n % 5, origin="web", ref=f"r{n}")
                acked.append((image_id, f"r{n}"))
                n += 1
                await asyncio.sleep(0)

        async def ingest():                   # pictures keep arriving during the backup
            for i in range(6, 14):
                (tmp_path / "inbox" / f"p{i}.jpg").write_bytes(picture(i))
                await asyncio.sleep(0.05)

        async def rated_some():
            return len(acked) >= 30

        rater = asyncio.create_task(rate())
        await wait_for(rated_some)
        before = set(acked)
        manifest, _ = await asyncio.gather(asyncio.to_thread(backup, cfg.paths, dest, media=True), ingest())
        writing = False
        await rater
        assert len(acked) > len(before)       # the writer went on during the backup
    finally:
        await daemon.stop()

    copy = dest / "tastefeed.db"
    assert integrity_problem(copy) is None
    held = {(image_id, ref) for _, image_id, _, _, _, ref, _, _ in _labels(copy)}
    assert before <= held                     # every label acknowledged before the backup started
    assert held <= set(acked)                 # and nothing that was never written
    data = json.loads((dest / "manifest.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["counts"]["labels"] == 6
    assert data["counts"]["images"] == manifest.images >= 6 and data["files"]["media"]["count"] >= 6
    assert data["files"]["database"]["bytes"] == copy.stat().st_size
    with Store.open(copy) as store:
        active = store.active_model()
        media = [r["media_path"] for r in store.execute("SELECT media_path FROM images WHERE status = 'scored'")]
    assert (dest / "models" / active["path"]).is_file()
    assert all((dest / "media" / m).is_file() for m in media)
    assert not [p for p in dest.parent.iterdir() if p.name != "first"]   # no partial folder left

    # restore into a fresh data folder (no database there: nothing to confirm)
    fresh = _fresh(tmp_path, "fresh")
    out = cli(tmp_path / "fresh", "restore", dest)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("backup of ") and "restored" in out.stdout
    assert _labels(fresh.db_path) == _labels(copy)
    assert all((fresh.media_path / m).is_file() for m in media)
    assert (fresh.models_path / active["path"]).is_file()
    with Store.open(fresh.db_path) as store:
        assert store.active_model()["version"] == active["version"]

    # restoring over a database asks first; without a terminal it needs --yes
    with Store.open(fresh.db_path) as store:
        store.add_label(ids[0], 5, origin="web", ref="after")
    refused = cli(tmp_path / "fresh", "restore", dest)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "needs --yes" in refused.stderr and "6 labelled" in refused.stderr
    again = cli(tmp_path / "fresh", "restore", dest, "--yes")
    assert again.returncode == 0, again.stderr
    assert _labels(fresh.db_path) == _labels(copy)
    [aside] = fresh.data_path.glob("tastefeed.db.before-restore-*")
    assert aside.name in again.stdout
    assert ("after",) in [row[5:6] for row in _labels(aside)]       # the replaced database, whole


def _database(cfg, pictures: int = 2) -> list[int]:
    ids = seed(cfg, [{"popularity": i} for i in range(pictures)])
    with Store.open(cfg.db_path) as store:
        for n, image_id in enumerate(ids):
            store.add_label(image_id, 1 + n % 5, origin="web")
    return ids


async def test_restore_is_refused_while_a_daemon_runs(tmp_path):
    cfg = make_config(tmp_path)
    _database(cfg)
    assert backup(cfg.paths, tmp_path / "b").labels == 2
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        out = await asyncio.to_thread(cli, tmp_path, "restore", tmp_path / "b", "--yes")
        assert out.returncode == 1 and out.stderr.count("\n") == 1
        assert out.stderr.startswith(f"error: a tastefeed daemon (pid {os.getpid()}) is running on ")
        assert "stop it before restoring" in out.stderr
        with pytest.raises(BackupError, match="stop it before restoring"):   # the lock itself, too
            await asyncio.to_thread(restore, cfg.paths, tmp_path / "b")
    finally:
        await daemon.stop()
    assert not list(cfg.data_path.glob("*before-restore*"))
    out = cli(tmp_path, "restore", tmp_path / "b", "--yes")
    assert out.returncode == 0, out.stderr


def test_restore_refuses_a_newer_schema_and_upgrades_an_older_one(tmp_path):
    cfg = make_config(tmp_path)
    _database(cfg)
    backup(cfg.paths, tmp_path / "newer")
    conn = sqlite3.connect(tmp_path / "newer" / "tastefeed.db")
    with conn:
        conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
                     "VALUES ('tastefeed', 'm999_from_the_future', '2099-01-01')")
    conn.close()
    before = _labels(cfg.db_path)
    out = cli(tmp_path, "restore", tmp_path / "newer", "--yes")
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert f"schema version {SCHEMA_VERSION + 1}, newer than this tastefeed knows ({SCHEMA_VERSION})" in out.stderr
    assert _labels(cfg.db_path) == before and not list(cfg.data_path.glob("*before-restore*"))

    # a backup of an older tastefeed (its database stopped before the last two migrations)
    old = _fresh(tmp_path, "old")
    old.data_path.mkdir()
    db = sqlite_utils.Database(old.db_path)
    migrations.apply(db, stop_before=migrations._migrations[-2].name)
    db.execute("INSERT INTO images (external_id, created_at) VALUES ('x', '2020-01-01')")
    db.conn.commit()
    db.close()
    manifest = backup(old.paths, tmp_path / "older")
    assert manifest.schema_version == SCHEMA_VERSION - 2 and manifest.images == 1
    out = cli(tmp_path, "restore", tmp_path / "older", "--yes")
    assert out.returncode == 0, out.stderr
    assert schema_version(cfg.db_path) == (SCHEMA_VERSION, [])
    with Store.open(cfg.db_path) as store:
        assert [r["external_id"] for r in store.execute("SELECT external_id FROM images")] == ["x"]


def test_backup_refuses_a_folder_in_use_and_a_stopped_backup_leaves_nothing(tmp_path):
    cfg = make_config(tmp_path)
    _database(cfg)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    out = cli(tmp_path, "backup", tmp_path / "full")
    assert out.returncode == 1 and out.stderr == f"error: {tmp_path / 'full'} exists and is not an empty folder: choose a new one\n"
    inside = cli(tmp_path, "backup", cfg.media_path / "b")
    assert inside.returncode == 1 and "is inside" in inside.stderr
    (tmp_path / "empty").mkdir()
    ok = cli(tmp_path, "backup", tmp_path / "empty", "--media")
    assert ok.returncode == 0, ok.stderr
    assert "passed PRAGMA integrity_check" in ok.stdout and "2 media file(s)" in ok.stdout
    (cfg.models_path / ".half.123.tmp").write_bytes(b"half")
    with pytest.raises(BackupError, match="stopped"):
        backup(cfg.paths, tmp_path / "stopped", cancel=lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir() if "stopped" in p.name) == []
    manifest = backup(cfg.paths, tmp_path / "third")
    assert ".half.123.tmp" not in [f["path"] for f in manifest.model_files] and manifest.media is None
    assert not (tmp_path / "third" / "models" / ".half.123.tmp").exists()
    nothing = cli(tmp_path / "full", "backup", tmp_path / "fourth")     # a folder without a database
    assert nothing.returncode == 1 and "nothing to back up" in nothing.stderr


# ---- export-labels -----------------------------------------------------------------------------
def _pairs(cfg) -> tuple[set, set]:
    """(picture sha256, current rating) pairs and (winner sha256, loser sha256) comparisons."""
    with Store.open(cfg.db_path) as store:
        sha = {r["id"]: r["sha256"] for r in store.execute("SELECT id, sha256 FROM images")}
        rated = {(sha[r["image_id"]], store.current_label(r["image_id"]))
                 for r in store.execute("SELECT DISTINCT image_id FROM labels WHERE removed_at IS NULL")}
        compared = {(sha[c["winner_id"]], sha[c["loser_id"]]) for c in store.comparisons()}
    return rated, compared


def test_export_labels_round_trips_through_import_labels_into_a_fresh_data_folder(tmp_path):
    cfg = make_config(tmp_path)
    ids = seed(cfg, [{"popularity": i} for i in range(5)])
    with Store.open(cfg.db_path) as store:
        store.add_label(ids[0], 2, origin="web")
        store.add_label(ids[0], 5, origin="discord", ref="m1")       # changed: the newest counts
        store.add_label(ids[1], 1, origin="web")
        store.add_label(ids[2], 4, origin="web")
        store.remove_label(ids[2], origin="web", user="owner")       # taken back: not exported
        store.add_label(ids[3], 3, origin="import", ref="x.csv:a")
        store.add_comparison(ids[0], ids[4], origin="gallery")
        gone = store.add_comparison(ids[1], ids[4], origin="gallery")
        store.remove_comparison(gone)
    rated, compared = _pairs(cfg)
    assert len(rated) == 3 and len(compared) == 1

    out = cli(tmp_path, "export-labels", "out/ratings.csv", "--comparisons", "out/pairs.csv")
    assert out.returncode == 0, out.stderr
    assert "3 rating(s), 1 comparison(s)" in out.stdout
    rows = (tmp_path / "out" / "ratings.csv").read_text().splitlines()
    assert rows[0] == "path,rating" and all(os.path.isabs(r.split(",")[0]) for r in rows[1:])
    fresh = _fresh(tmp_path, "fresh")
    for csv_file in ("ratings.csv", "pairs.csv"):
        imported = cli(tmp_path / "fresh", "import-labels", tmp_path / "out" / csv_file, "--crops")
        assert imported.returncode == 0, imported.stderr
        assert "0 bad row(s)" in imported.stdout
    assert _pairs(fresh) == (rated, compared)

    # --copy: the pictures beside the CSV, named relative to it, so both can move anywhere
    out = cli(tmp_path, "export-labels", "portable/ratings.csv", "--copy", "--all", "--comparisons",
              "portable/pairs.csv")
    assert out.returncode == 0, out.stderr
    assert "4 rating(s), 1 comparison(s), 4 picture(s) copied" in out.stdout     # --all: 2 of ids[0]
    shutil.move(tmp_path / "portable", tmp_path / "moved")
    assert all(r.startswith("ratings-pictures/") for r in (tmp_path / "moved" / "ratings.csv").read_text().splitlines()[1:])
    other = _fresh(tmp_path, "other")
    for csv_file in ("ratings.csv", "pairs.csv"):
        imported = cli(tmp_path / "other", "import-labels", tmp_path / "moved" / csv_file, "--crops")
        assert imported.returncode == 0, imported.stderr
    assert _pairs(other) == (rated, compared)
    # the comparisons' CSV in another folder than the ratings': its paths are relative to its own folder
    out = cli(tmp_path, "export-labels", "p2/ratings.csv", "--copy", "--comparisons", "p2/sub/pairs.csv")
    assert out.returncode == 0, out.stderr
    third = _fresh(tmp_path, "third")
    for csv_file in ("p2/ratings.csv", "p2/sub/pairs.csv"):
        imported = cli(tmp_path / "third", "import-labels", tmp_path / csv_file, "--crops")
        assert imported.returncode == 0, imported.stderr
    assert _pairs(third) == (rated, compared)
    again = cli(tmp_path / "fresh", "import-labels", tmp_path / "out" / "ratings.csv", "--crops")
    assert "0 label(s) added, 3 unchanged" in again.stdout          # importing it again changes nothing


# ---- scheduled backups ---------------------------------------------------------------------------
async def test_scheduled_backups_keep_only_the_newest_keep(tmp_path, caplog):
    cfg = make_config(tmp_path, '[backup]\nschedule = "0 3 * * *"\nkeep = 2\n')
    _database(cfg)
    root = cfg.data_path / "backups"
    root.mkdir()
    (root / ".tastefeed-20200101-000000.partial-999999999").mkdir()    # left by a killed backup
    (root / "mine").mkdir()                                            # not a backup: left alone
    job = BackupJob(cfg, asyncio.Event())
    with caplog.at_level(logging.INFO, logger="tastefeed.daemon"):
        for _ in range(3):
            assert await job.run()
    kept = sorted(p.name for p in root.iterdir())
    assert len(kept) == 3 and "mine" in kept and all(k.startswith("tastefeed-") for k in kept if k != "mine")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("backup: ")]
    assert len(lines) == 3 and "removed 1 older backup(s)" in lines[-1] and "2 labelled" in lines[0]
    newest = max((root / k for k in kept if k != "mine"), key=lambda p: json.loads((p / "manifest.json").read_text())["created_at"])
    assert str(newest) in lines[-1]
    # A backup made by hand under a like name, and another installation's scheduled backup in the
    # same folder (older than all of ours), are never rotated away.
    shutil.copytree(newest, root / "tastefeed-2000-05-01")
    shutil.copytree(newest, root / "tastefeed-20000101-000000")
    other = json.loads((root / "tastefeed-20000101-000000" / "manifest.json").read_text())
    other.update(data_dir="/elsewhere/data", created_at="2000-01-01T00:00:00+00:00")
    (root / "tastefeed-20000101-000000" / "manifest.json").write_text(json.dumps(other))
    assert await job.run()
    names = {p.name for p in root.iterdir()}
    assert {"tastefeed-2000-05-01", "tastefeed-20000101-000000", "mine"} <= names and len(names) == 5

    (tmp_path / "a-file").write_text("x")             # a failure is one line, and the daemon goes on
    cfg.backup = dataclasses.replace(cfg.backup, dest=str(tmp_path / "a-file"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tastefeed.daemon"):
        assert not await BackupJob(cfg, asyncio.Event()).run()
    assert [r.getMessage()[:16] for r in caplog.records] == ["backup: failed: "]

    daemon = Daemon(cfg)
    await daemon.start()
    try:
        assert daemon.scheduler.get_job("backup-schedule") is not None
    finally:
        await daemon.stop()


def test_backup_schedule_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"backup\.schedule: expected a cron expression like '0 4 \* \* \*'"):
        make_config(tmp_path, '[backup]\nschedule = "every night"\n')
    with pytest.raises(ConfigError, match=r"train\.schedule: expected a cron expression"):
        make_config(tmp_path, '[train]\nschedule = "61 * * * *"\n')
