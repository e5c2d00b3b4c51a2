"""Backups of a data folder, taken while the daemon runs, and putting one back.

A backup is a folder::

    manifest.json       what it holds: when, schema version, counts, files and sizes, version
    tastefeed.db        the database (one file, no journal), checked with PRAGMA integrity_check
    models/             every model file (half-written ``.tmp`` files are left out)
    media/              with ``media``: the pictures, as in ``<data>/media``

The database is copied with SQLite's online backup API in one step, which reads a single
snapshot: the daemon's writer thread goes on writing meanwhile (WAL journal), and the copy holds
exactly what was committed when it started. Model files come after it, so every model the copy's
registry names was already written (a model file is written before its row). Media files never
change once written (they are named by their hash), so copying them late is safe.

A backup is written under a temporary name beside the destination and renamed when complete:
a folder with the destination's name is always a whole backup.

:func:`restore` puts one back into a data folder where no daemon runs (it holds the daemon lock
meanwhile, so none can start), keeping the database it replaces as
``tastefeed.db.before-restore-<time>``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from storage.db import SCHEMA_VERSION, StorageError, migrations, open_db
from storage.lock import DaemonLock, DaemonRunning
from storage.paths import DataPaths

MANIFEST = "manifest.json"
DB_NAME = "tastefeed.db"
FORMAT = 1                 # the manifest's own format
SCHEDULED_PREFIX = "tastefeed-"   # scheduled backups: tastefeed-YYYYMMDD-HHMMSS[-N]
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


class BackupError(StorageError):
    """A backup or restore that cannot be done; the message says why, in one line."""


@dataclass
class Part:
    """Files of one kind in a backup: how many, and their bytes."""
    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


@dataclass
class Manifest:
    created_at: str
    schema_version: int
    tastefeed_version: str
    images: int                       # picture rows
    labels: int                       # labelled pictures (their current label)
    comparisons: int
    database: Part
    models: Part
    media: Part | None                # None: the media were not copied
    model_files: list[dict] = field(default_factory=list)   # {"path", "bytes"}
    data_dir: str = ""                # the folder it was taken from
    format: int = FORMAT

    @property
    def total_bytes(self) -> int:
        return self.database.bytes + self.models.bytes + (self.media.bytes if self.media else 0)

    def to_json(self) -> dict:
        return {"format": self.format, "created_at": self.created_at, "tastefeed_version": self.tastefeed_version,
                "schema_version": self.schema_version, "data_dir": self.data_dir,
                "counts": {"images": self.images, "labels": self.labels, "comparisons": self.comparisons},
                "files": {"database": vars(self.database), "models": vars(self.models),
                          "media": vars(self.media) if self.media else None},
                "model_files": self.model_files}

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        files, counts = data["files"], data["counts"]
        return cls(created_at=str(data["created_at"]), schema_version=int(data["schema_version"]),
                   tastefeed_version=str(data.get("tastefeed_version", "?")), images=int(counts["images"]),
                   labels=int(counts["labels"]), comparisons=int(counts["comparisons"]),
                   database=Part(**files["database"]), models=Part(**files["models"]),
                   media=Part(**files["media"]) if files.get("media") else None,
                   model_files=list(data.get("model_files", [])), data_dir=str(data.get("data_dir", "")),
                   format=int(data["format"]))

    def summary(self) -> str:
        media = f", {self.media.count} media file(s) ({human(self.media.bytes)})" if self.media else ", no media"
        return (f"database ({human(self.database.bytes)}, schema {self.schema_version}: {self.images} picture(s), "
                f"{self.labels} labelled, {self.comparisons} comparison(s)), "
                f"{self.models.count} model file(s) ({human(self.models.bytes)}){media}; "
                f"{human(self.total_bytes)} in all")


def human(n: int) -> str:
    """A byte count for people: ``532 B``, ``4.2 MB``, ``1.3 GB``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def tastefeed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("tastefeed")
    except PackageNotFoundError:
        return "unknown"


# ---- taking a backup ---------------------------------------------------------------------------
def backup(paths: DataPaths, dest: str | Path, *, media: bool = False, progress: bool | None = None,
           cancel: Callable[[], bool] | None = None) -> Manifest:
    """Copy the data folder's database, model files and (with ``media``) media files into the new
    folder ``dest``, consistently while a daemon may be writing; return its manifest.

    ``dest`` must not exist or be an empty folder. ``cancel()`` true between two files stops the
    backup (BackupError), leaving nothing behind."""
    dest = Path(dest)
    if not paths.db.is_file():
        raise BackupError(f"no database at {paths.db}: nothing to back up")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not an empty folder: choose a new one")
    for inner in (paths.models, paths.media):
        if _inside(dest, inner):
            raise BackupError(f"{dest} is inside {inner}, which the backup copies: choose another folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        taken = datetime.now(timezone.utc).isoformat(timespec="microseconds")   # the snapshot's time
        manifest = _copy_database(paths.db, tmp / DB_NAME)
        manifest.created_at = taken
        manifest.data_dir = str(paths.root.resolve())
        manifest.models, manifest.model_files = _copy_models(paths.models, tmp / "models", cancel)
        if media:
            manifest.media = _copy_tree(paths.media, tmp / "media", cancel, progress=progress, desc="media")
        _write_json(tmp / MANIFEST, manifest.to_json())
        _fsync_dir(tmp)
        try:
            os.rename(tmp, dest)      # onto an empty folder too (POSIX)
        except OSError as e:
            raise BackupError(f"{dest}: cannot create it: {e.strerror}") from None
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _copy_database(src: Path, dst: Path) -> Manifest:
    """The online backup of ``src`` into ``dst`` (one snapshot), as a single file, checked."""
    try:
        source = sqlite3.connect(str(src), timeout=30)   # read only here; a WAL reader never blocks the writer
    except sqlite3.Error as e:
        raise BackupError(f"{src}: cannot open: {e}") from None
    try:
        target = sqlite3.connect(str(dst))
        try:
            source.execute("PRAGMA busy_timeout = 30000")
            source.backup(target)             # all pages in one step: one consistent snapshot
            target.execute("PRAGMA journal_mode = DELETE")   # one self-contained file
        finally:
            target.close()
    except sqlite3.Error as e:
        raise BackupError(f"{src}: cannot copy the database: {e}") from None
    finally:
        source.close()
    _fsync(dst)
    return _describe_database(dst)


def _describe_database(path: Path) -> Manifest:
    """Check a database copy (integrity, schema version) and count what it holds."""
    problem = integrity_problem(path)
    if problem:
        raise BackupError(f"{path}: the copy fails its integrity check: {problem}")
    images, labels, comparisons = counts(path)
    version, _ = schema_version(path)
    return Manifest(created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                    schema_version=version, tastefeed_version=tastefeed_version(), images=images,
                    labels=labels, comparisons=comparisons, database=Part(1, path.stat().st_size),
                    models=Part(), media=None)


def counts(path: Path) -> tuple[int, int, int]:
    """(pictures, labelled pictures, comparisons) in the database at ``path``, read only."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        def count(sql: str) -> int:
            try:
                return conn.execute(sql).fetchone()[0]
            except sqlite3.OperationalError:    # an old schema without the table
                return 0
        return (count("SELECT COUNT(*) FROM images"),
                count("SELECT COUNT(DISTINCT image_id) FROM labels WHERE removed_at IS NULL"),
                count("SELECT COUNT(*) FROM comparisons WHERE removed_at IS NULL"))
    finally:
        conn.close()


def integrity_problem(path: Path) -> str | None:
    """None when ``PRAGMA integrity_check`` passes on the database at ``path``, else its first
    complaint (or why the file cannot be read)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as e:
        return str(e)
    return None if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:3])


def schema_version(path: Path) -> tuple[int, list[str]]:
    """The schema version of the database at ``path`` (how many of tastefeed's migrations it
    has), and the applied migrations this code does not know (a newer tastefeed's)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute(
            f"SELECT name FROM {migrations.migrations_table} WHERE migration_set = ? ORDER BY rowid",
            [migrations.name])]
    except sqlite3.OperationalError:
        names = []                      # no migration applied yet
    finally:
        conn.close()
    known = {m.name for m in migrations._migrations}
    return len(names), [n for n in names if n not in known]


def _is_temporary(path: Path) -> bool:
    """A half-written file (``.<name>.<pid>.tmp``, ``.tmp-XXXX``, ``x.tmp.npy``) never copied."""
    name = path.name
    return name.endswith(".tmp") or name.startswith(".tmp-") or ".tmp." in name


def _files(root: Path) -> Iterator[tuple[Path, int]]:
    """Every regular file under ``root`` (temporary ones left out) with its size, sorted."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _is_temporary(path):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if path.is_file():
                yield path, st.st_size


def _copy_models(src: Path, dst: Path, cancel) -> tuple[Part, list[dict]]:
    part = _copy_tree(src, dst, cancel, progress=False, desc="models")
    files = [{"path": p.relative_to(dst).as_posix(), "bytes": size} for p, size in _files(dst)]
    return part, files


def _copy_tree(src: Path, dst: Path, cancel, *, progress: bool | None, desc: str,
               skip_existing: bool = False) -> Part:
    """Copy the files under ``src`` to the same places under ``dst``; a file that vanished
    meanwhile (a pruned model or picture) is left out. With ``skip_existing``, a file already at
    its place is kept (media files are named by their content)."""
    from tqdm import tqdm

    todo = list(_files(src))
    part = Part()
    dst.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=sum(size for _, size in todo), desc=desc, unit="B", unit_scale=True, file=sys.stderr,
              disable=not show or not todo) as bar:
        for path, size in todo:
            if cancel is not None and cancel():
                raise BackupError("stopped before the copy was complete")
            target = dst / path.relative_to(src)
            if skip_existing and target.exists():
                bar.update(size)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")   # never seen half-written
            try:
                shutil.copy2(path, staged)
                os.replace(staged, target)
            except FileNotFoundError:
                staged.unlink(missing_ok=True)
                if path.exists():
                    raise
                continue
            except OSError as e:
                staged.unlink(missing_ok=True)
                raise BackupError(f"{path}: cannot copy it: {e.strerror}") from None
            part.add(target.stat().st_size)
            bar.update(size)
    return part


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- checking and restoring ----------------------------------------------------------------------
def check_backup(src: str | Path) -> Manifest:
    """The manifest of the backup in ``src`` after checking it: a complete backup, a database that
    passes ``integrity_check``, a schema this code knows (an older one is upgraded on open)."""
    src = Path(src)
    if not src.is_dir():
        raise BackupError(f"{src}: no such backup folder")
    try:
        data = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
        manifest = Manifest.from_json(data)
    except FileNotFoundError:
        raise BackupError(f"{src}: not a tastefeed backup (no {MANIFEST}; an unfinished backup has none)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackupError(f"{src}/{MANIFEST}: cannot read it: {e}") from None
    if manifest.format > FORMAT:
        raise BackupError(f"{src}: a backup of a newer tastefeed (manifest format {manifest.format}): upgrade first")
    db = src / DB_NAME
    if not db.is_file():
        raise BackupError(f"{src}: the backup has no {DB_NAME}")
    problem = integrity_problem(db)
    if problem:
        raise BackupError(f"{db}: fails its integrity check: {problem}")
    version, unknown = schema_version(db)
    version = max(version, manifest.schema_version)
    if unknown or version > SCHEMA_VERSION:
        raise BackupError(f"{src}: its database has schema version {version}, newer than this tastefeed knows "
                          f"({SCHEMA_VERSION}): upgrade tastefeed ({manifest.tastefeed_version} or later) first")
    return manifest


@dataclass
class RestoreReport:
    manifest: Manifest
    kept_as: Path | None              # where the replaced database was put aside
    models: Part
    media: Part


def restore(paths: DataPaths, src: str | Path, *, progress: bool | None = None,
            manifest: Manifest | None = None) -> RestoreReport:
    """Put the backup in ``src`` back into the data folder ``paths``: its database replaces the
    current one (kept aside as ``tastefeed.db.before-restore-<time>``), its model files are
    copied in, and its media files missing here (media files are named by their content).
    Refused while a daemon runs on the data folder. ``manifest``: what :func:`check_backup`
    gave for ``src`` already (else it is checked here)."""
    src = Path(src)
    manifest = manifest or check_backup(src)
    paths.root.mkdir(parents=True, exist_ok=True)
    try:
        lock = DaemonLock(paths.root).acquire()    # no daemon runs, and none starts meanwhile
    except DaemonRunning as e:
        raise BackupError(f"{e}: stop it before restoring") from None
    try:
        # files first (they only add), the database last: a failure midway leaves it as it was
        models = _copy_tree(src / "models", paths.models, None, progress=False, desc="models")
        media = _copy_tree(src / "media", paths.media, None, progress=progress, desc="media", skip_existing=True)
        staged = paths.db.with_name(f".{paths.db.name}.restore-{os.getpid()}.tmp")
        try:
            shutil.copyfile(src / DB_NAME, staged)
            _fsync(staged)
            kept_as = _put_aside(paths.db)
            os.replace(staged, paths.db)
        finally:
            staged.unlink(missing_ok=True)
        open_db(paths.db).close()                  # WAL journal, and migrations of an older schema
    finally:
        lock.release()
    return RestoreReport(manifest, kept_as, models, media)


def _put_aside(db: Path) -> Path | None:
    """Move the database at ``db`` (and any journal of it) to ``<db>.before-restore-<time>``,
    its WAL merged first; None when there is none."""
    if not db.exists():
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)   # never applied to the restored file
        return None
    try:
        conn = sqlite3.connect(str(db), timeout=30)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    except sqlite3.Error:
        pass                     # a damaged database is kept aside as it is, journal and all
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = db.with_name(f"{db.name}.before-restore-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = db.with_name(f"{db.name}.before-restore-{stamp}-{n}")
    os.replace(db, aside)
    for suffix in ("-wal", "-shm"):      # SQLite pairs X with X-wal: keep them together
        journal = Path(f"{db}{suffix}")
        if journal.exists():
            os.replace(journal, Path(f"{aside}{suffix}"))
    return aside


# ---- scheduled backups ---------------------------------------------------------------------------
def scheduled_backup(paths: DataPaths, dest_root: str | Path, *, keep: int, media: bool = False,
                     cancel: Callable[[], bool] | None = None) -> tuple[Path, Manifest, list[Path]]:
    """A backup into ``dest_root/tastefeed-<UTC time>``, then the oldest scheduled backups there
    beyond ``keep`` removed (and folders that backups killed midway left behind). Returns (the
    new backup, its manifest, the backups removed)."""
    root = Path(dest_root)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    dest, n = root / f"{SCHEDULED_PREFIX}{stamp}", 1
    while dest.exists():
        n += 1
        dest = root / f"{SCHEDULED_PREFIX}{stamp}-{n}"
    manifest = backup(paths, dest, media=media, progress=False, cancel=cancel)
    return dest, manifest, prune_backups(root, keep, paths.root)


SCHEDULED_NAME = re.compile(rf"^{SCHEDULED_PREFIX}\d{{8}}-\d{{6}}(-\d+)?$")


def scheduled_backups(root: Path, data_dir: str | Path | None = None) -> list[Path]:
    """The complete scheduled backups in ``root`` (named as :func:`scheduled_backup` names
    them; with ``data_dir``, only those taken from that data folder), oldest first. A backup
    made by hand, or by another installation sharing the folder, is never one of them."""
    found = []
    for path in Path(root).glob(f"{SCHEDULED_PREFIX}*"):
        if not SCHEDULED_NAME.match(path.name):
            continue
        try:
            data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            created, source = data["created_at"], data.get("data_dir", "")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue                     # not a backup of ours: left alone
        if data_dir is not None and str(source) != str(Path(data_dir).resolve()):
            continue
        found.append((str(created), path.name, path))
    return [p for _, _, p in sorted(found)]


def prune_backups(root: Path, keep: int, data_dir: str | Path | None = None) -> list[Path]:
    """Remove the oldest scheduled backups in ``root`` (of ``data_dir`` when given) beyond the
    newest ``keep``, and partial folders of backups whose process is gone; returns the backups
    removed."""
    for path in Path(root).glob(f".{SCHEDULED_PREFIX}*.partial-*"):
        match = _PARTIAL.match(path.name)
        if match and not _alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
    backups = scheduled_backups(root, data_dir)
    gone = backups[:max(0, len(backups) - keep)]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
