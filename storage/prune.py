"""Bounded disk: which media files may go, and the thumbnail cache's size (``[storage]``).

Only the *media file* of a picture is pruned; its row, faces, scores and cached features stay,
and ``images.media_pruned_at`` records when the file went (the gallery then shows a note, and the
picture can be fetched again from its source: ``bot.disk.refetch``). A file may go only when
every picture stored in it (the same bytes from several sources are one file) is:

- finished: scored, skipped, a duplicate or failed; never one still waiting to be downloaded,
  scored or imported;
- unrated: no label at all, not even one taken back (a label row means the owner saw it);
- not compared: in no comparison (taken back or not) and in no Discord comparison post;
- not posted: no post sent or being sent (a failed post does not count);
- not named by the owner: no face with a name given by hand (those are the identity embedder's
  examples); a weak name from a booru tag does not keep it;
- not verified in the box set (``storage/boxes.py``): the owner's checked face boxes are the own
  detector's training and evaluation pictures; merely proposed ones may go.

The rules (:func:`plan`): with ``keep_days`` (0 = keep forever), such files whose newest
picture was stored more than ``keep_days`` ago go; with ``max_media_gb`` (0 = no limit), while
the media the database knows of (each file once, pruned ones left out) is over the limit, such
files go oldest first. :func:`prune` applies both and trims the thumbnail cache to
``max_thumbs_mb``, least recently used first (a thumbnail's mtime is its last use); with
``dry_run`` it only says what it would free. Sizes: 1 GB = 10^9 bytes, 1 MB = 10^6 bytes.

Plain functions on a :class:`storage.store.Store` (the command line's, or a worker thread's own
connection in the daemon: never the event loop).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from storage.records import DUPLICATE, FAILED, NEAR_DUPLICATE, SCORED, SKIPPED

log = logging.getLogger("tastefeed.prune")

GB, MB = 10 ** 9, 10 ** 6
FINISHED = (SCORED, SKIPPED, DUPLICATE, NEAR_DUPLICATE, FAILED)
BATCH = 200                       # files marked per transaction

# A picture whose media must stay (SQL condition on a row of ``images``).
_KEEP = (f"(status NOT IN ({', '.join(repr(s) for s in FINISHED)}) "
         "OR id IN (SELECT image_id FROM labels) "
         "OR id IN (SELECT winner_id FROM comparisons) OR id IN (SELECT loser_id FROM comparisons) "
         "OR id IN (SELECT a_id FROM compare_posts) OR id IN (SELECT b_id FROM compare_posts) "
         "OR id IN (SELECT image_id FROM posts WHERE status != 'failed') "
         "OR id IN (SELECT faces.image_id FROM faces JOIN face_names ON face_names.face_id = faces.id "
         "WHERE face_names.weak = 0) "
         "OR id IN (SELECT image_id FROM box_pictures WHERE state = 'verified'))")


@dataclass
class MediaFile:
    """One media file that may be pruned."""
    media_path: str               # relative to the media folder
    bytes: int
    newest: str                   # when its newest picture was stored (fetched_at, else created_at; ISO, UTC)
    pictures: int                 # pictures (rows) stored in it


@dataclass
class PruneReport:
    """What a prune did (or, ``dry_run``, would do)."""
    dry_run: bool = False
    pictures: int = 0             # pictures whose media went
    files: int = 0
    bytes: int = 0
    thumbs: int = 0               # thumbnails removed (of pruned pictures, and to fit max_thumbs_mb)
    thumb_bytes: int = 0
    media_bytes: int = 0          # media held afterwards (as the database knows it)
    thumbs_left: int = 0          # bytes of the thumbnail cache afterwards
    over_limit: bool = False      # still over max_media_gb: nothing more may be pruned
    paths: list[str] = field(default_factory=list)   # media files pruned (relative)

    def summary(self) -> str:
        """One line, e.g. ``pruned the media of 3 picture(s) (3 file(s), 1.2 MB) and 4 thumbnail(s)
        (56.0 KB); media now 9.8 GB, thumbnails 12.0 MB``."""
        verb = "would prune" if self.dry_run else "pruned"
        now = "would be" if self.dry_run else "now"
        if not self.files and not self.thumbs:
            done = "nothing to prune"
        else:
            done = (f"{verb} the media of {self.pictures} picture(s) ({self.files} file(s), "
                    f"{human(self.bytes)}) and {self.thumbs} thumbnail(s) ({human(self.thumb_bytes)})")
        return f"{done}; media {now} {human(self.media_bytes)}, thumbnails {human(self.thumbs_left)}"


def human(n: int | float) -> str:
    """Bytes in decimal units: ``512 B``, ``56.0 KB``, ``1.2 MB``, ``412 MB`` (no decimal from 100 on)."""
    for unit, size in (("GB", GB), ("MB", MB), ("KB", 10 ** 3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def media_bytes(store) -> int:
    """Bytes of the media files the database holds, each file once, pruned ones left out."""
    return store.db.execute(
        "SELECT COALESCE(SUM(size), 0) FROM (SELECT MAX(COALESCE(bytes, 0)) AS size FROM images "
        "WHERE media_path IS NOT NULL GROUP BY media_path HAVING SUM(media_pruned_at IS NULL) > 0)").fetchone()[0]


def prunable(store) -> list[MediaFile]:
    """The media files that may be pruned (see the module docstring), oldest first."""
    return [MediaFile(r[0], r[1], r[2], r[3]) for r in store.db.execute(
        "SELECT media_path, MAX(COALESCE(bytes, 0)), MAX(COALESCE(fetched_at, created_at)), COUNT(*) FROM images "
        "WHERE media_path IS NOT NULL GROUP BY media_path "
        f"HAVING SUM(media_pruned_at IS NULL) > 0 AND SUM({_KEEP}) = 0 "
        "ORDER BY MAX(COALESCE(fetched_at, created_at)), media_path")]


def plan(store, max_media_gb: float, keep_days: float, now: datetime | None = None) -> tuple[list[MediaFile], int]:
    """(the files to prune, oldest first; the media bytes held before): those older than
    ``keep_days``, then the oldest others while the media is over ``max_media_gb``."""
    held = media_bytes(store)
    if max_media_gb <= 0 and keep_days <= 0:
        return [], held
    files = prunable(store)
    chosen: list[MediaFile] = []
    if keep_days > 0:
        now = now or datetime.now(timezone.utc)
        cutoff = (now - timedelta(days=keep_days)).isoformat(timespec="milliseconds")
        chosen = [f for f in files if f.newest < cutoff]
    if max_media_gb > 0:
        limit = max_media_gb * GB
        left = held - sum(f.bytes for f in chosen)
        taken = {f.media_path for f in chosen}
        for f in files:
            if left <= limit:
                break
            if f.media_path not in taken:
                chosen.append(f)
                left -= f.bytes
    return chosen, held


def mark_pruned(store, paths: list[str], when: str | None = None) -> tuple[list[str], int]:
    """Mark the pictures stored in ``paths`` as pruned, each file only if it may still go (the
    rules checked again inside one write transaction: a label given since :func:`plan` keeps
    it). Returns (the paths marked, the pictures marked); their files are then to be removed."""
    when = when or datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    marked: list[str] = []
    pictures = 0
    conn = store.db.conn
    for start in range(0, len(paths), BATCH):
        batch = paths[start:start + BATCH]
        marks = ",".join("?" * len(batch))
        conn.execute("BEGIN IMMEDIATE")
        try:
            kept = {r[0] for r in conn.execute(
                f"SELECT DISTINCT media_path FROM images WHERE media_path IN ({marks}) AND {_KEEP}", batch)}
            go = [p for p in batch if p not in kept]
            if go:
                cur = conn.execute(f"UPDATE images SET media_pruned_at = ? WHERE media_path IN "
                                   f"({','.join('?' * len(go))}) AND media_pruned_at IS NULL", [when, *go])
                pictures += cur.rowcount
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        marked += go
    return marked, pictures


def thumbnails_of(thumbs_root: str | Path, media_path: str) -> list[Path]:
    """The cached thumbnails (any size, face crops too) of one media file (``storage.media.thumbnail``
    names: the file's hash, then the crop's box if any)."""
    root = Path(thumbs_root)
    if not root.is_dir():
        return []
    stem = Path(media_path).stem
    return [p for p in root.glob(f"*/{media_path[:6]}/{stem}*.jpg")
            if p.is_file() and p.stem.split("-", 1)[0] == stem]


def trim_thumbnails(thumbs_root: str | Path, max_bytes: float, *, skip: set[Path] = frozenset(),
                    dry_run: bool = False) -> tuple[int, int, int]:
    """Remove the least recently used thumbnails (oldest mtime first) until the cache holds at
    most ``max_bytes``; files in ``skip`` are counted as gone already. Returns (removed, bytes
    removed, bytes left)."""
    root = Path(thumbs_root)
    files = []
    for p in root.rglob("*") if root.is_dir() else ():
        if p in skip or p.name.startswith(".tmp-"):
            continue
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file():
            files.append((st.st_mtime, str(p), st.st_size, p))
    total = sum(f[2] for f in files)
    removed = freed = 0
    for _, _, size, path in sorted(files):
        if total <= max_bytes:
            break
        if not dry_run:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("thumbnail %s not removed: %s", path, e.strerror or e)
                continue
        total -= size
        removed += 1
        freed += size
    return removed, freed, total


def _mark_missing_again(store, paths, media_paths: list[str]) -> None:
    """A download of the same bytes between marking a file pruned and removing it cleared the
    mark while the file was still there: mark those pictures pruned again, so that the gallery
    offers to fetch them again instead of showing a broken picture."""
    missing = [m for m in media_paths if not (paths.media / m).exists()]
    stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    for i in range(0, len(missing), 500):
        chunk = missing[i:i + 500]
        with store.db.conn:
            store.db.execute(f"UPDATE images SET media_pruned_at = ? WHERE media_pruned_at IS NULL AND media_path IN "
                             f"({','.join('?' * len(chunk))})", [stamp, *chunk])


def prune(store, paths, storage, *, dry_run: bool = False, now: datetime | None = None) -> PruneReport:
    """Apply the ``[storage]`` rules (``storage``: ``bot.config.StorageConfig``) to the data
    folder ``paths`` (``storage.paths.DataPaths``): prune media files, remove their thumbnails,
    trim the thumbnail cache. ``dry_run``: change nothing, say what would be freed."""
    report = PruneReport(dry_run=dry_run)
    chosen, held = plan(store, storage.max_media_gb, storage.keep_days, now)
    if dry_run:
        gone = chosen
        report.pictures = sum(f.pictures for f in chosen)
    else:
        marked, report.pictures = mark_pruned(store, [f.media_path for f in chosen])
        keep = set(marked)
        gone = [f for f in chosen if f.media_path in keep]
    stale: set[Path] = set()
    for f in gone:
        if not dry_run:
            try:
                (paths.media / f.media_path).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:  # marked pruned all the same: the gallery offers to fetch it again
                log.warning("media file %s not removed: %s", f.media_path, e.strerror or e)
        for thumb in thumbnails_of(paths.thumbs, f.media_path):
            try:
                size = thumb.stat().st_size
                if not dry_run:
                    thumb.unlink()
            except OSError:
                continue
            stale.add(thumb)
            report.thumbs += 1
            report.thumb_bytes += size
        report.files += 1
        report.bytes += f.bytes
        report.paths.append(f.media_path)
    if not dry_run:
        _mark_missing_again(store, paths, [f.media_path for f in gone])
    removed, freed, report.thumbs_left = trim_thumbnails(paths.thumbs, storage.max_thumbs_mb * MB, skip=stale,
                                                         dry_run=dry_run)
    report.thumbs += removed
    report.thumb_bytes += freed
    report.media_bytes = held - report.bytes
    report.over_limit = storage.max_media_gb > 0 and report.media_bytes > storage.max_media_gb * GB
    return report
