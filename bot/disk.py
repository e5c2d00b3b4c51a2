"""Disk use in the daemon: downloads pause on low disk, media is pruned, a pruned picture is
fetched again on demand.

- **Low disk** (``storage.min_free_gb``, 0 = off): before each download the free space of the
  data folder's filesystem (:func:`free_bytes`, one ``statvfs``) is compared with the minimum.
  Below it, downloads pause: one log line, ``stats["downloads_paused"]`` holds the reason (the
  health check reads it), the items stay ``pending``. Every ``CHECK_SECONDS`` the space is
  probed again; once it is back, downloads resume by themselves with one log line.
- **Pruning** (``storage/prune.py``): hourly, once at start, after downloads when the media is
  over ``storage.max_media_gb`` (at most once a minute), and when the disk runs low; in a worker
  thread with its own database connection, never on the event loop, one run at a time.
- **Fetching again** (:func:`refetch`): a pruned picture's bytes from its source (its
  ``media_url`` through the shared HTTP client, or its ``local_path``), stored only when they are
  the same bytes as before (same SHA-256), and the pruned mark cleared.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from bot.config import Config
from storage.prune import GB, human

log = logging.getLogger("tastefeed.disk")


def free_bytes(path: str | Path) -> int:
    """Free bytes (for an unprivileged user) on the filesystem holding ``path``: the probe of
    the low-disk check (tests replace it to simulate a full disk)."""
    return shutil.disk_usage(path).free


def low_disk_reason(cfg: Config) -> str | None:
    """Why downloads must wait (``low disk: 0.4 GB free < storage.min_free_gb 1.0``), or None
    when there is room (or the check is off)."""
    minimum = cfg.storage.min_free_gb
    if minimum <= 0:
        return None
    try:
        free = free_bytes(cfg.data_path)
    except OSError as e:
        log.debug("free space of %s unknown: %s", cfg.data_path, e)
        return None
    if free >= minimum * GB:
        return None
    return f"low disk: {free / GB:.1f} GB free < storage.min_free_gb {minimum:g}"


class DiskKeeper:
    """The daemon's disk guard: pauses downloads on low disk, prunes media in the background."""

    CHECK_SECONDS = 30            # low disk: how often the free space is probed again
    PRUNE_SECONDS = 3600          # how often the rules are applied
    PRUNE_GAP_SECONDS = 60        # at most this often because downloads passed max_media_gb

    def __init__(self, cfg: Config, stopping: asyncio.Event, stats: dict):
        self.cfg = cfg
        self.stopping = stopping
        self.stats = stats
        stats.setdefault("downloads_paused", None)
        stats.setdefault("pruned", 0)
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task | None = None
        self._last_prune = 0.0        # time.monotonic() of the last prune's start
        self._due = False             # a prune was asked for (over the limit, low disk)
        self._media: int | None = None   # media bytes held, as of the last prune plus downloads
        self._warned_full = False
        self.last_report = None       # storage.prune.PruneReport of the last run

    @property
    def rules(self) -> bool:
        """Whether media is pruned at all (a size limit or an age)."""
        return self.cfg.storage.max_media_gb > 0 or self.cfg.storage.keep_days > 0

    async def start(self, scheduler) -> None:
        """Probe the disk every ``CHECK_SECONDS``, and now; prune once now."""
        self._due = self.rules
        scheduler.add_job(self.check, "interval", seconds=self.CHECK_SECONDS, id="check-disk",
                          max_instances=1, coalesce=True)
        await self.check()

    def running(self) -> list[asyncio.Task]:
        """Background work a stop waits for (a prune in progress)."""
        return [self._task] if self._task is not None else []

    # ---- low disk -----------------------------------------------------------------------------
    def probe(self) -> bool:
        """Check the free space now; on a change, pause or resume downloads (one log line each).
        True when downloads may go on."""
        reason = low_disk_reason(self.cfg)
        paused = self.stats.get("downloads_paused")
        if reason is None:
            if paused:
                log.info("downloads resumed: free space is back over storage.min_free_gb %g",
                         self.cfg.storage.min_free_gb)
                self.stats["downloads_paused"] = None
            self._room.set()
            return True
        self.stats["downloads_paused"] = reason
        if not paused:
            log.warning("downloads paused: %s; pending pictures wait (checked again every %gs)",
                        reason, self.CHECK_SECONDS)
            self._room.clear()
            self._due = self._due or self.rules
        return False

    async def room_to_download(self) -> bool:
        """Wait until the disk has room for a download (at once when it has); False when the
        daemon stops meanwhile."""
        while not self.stopping.is_set():
            if self.probe():
                return True
            room = asyncio.ensure_future(self._room.wait())
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({room, stop}, return_when=asyncio.FIRST_COMPLETED)
            room.cancel()
            stop.cancel()
        return False

    def downloaded(self, nbytes: int) -> None:
        """A picture of ``nbytes`` was stored: prune soon when that passes ``max_media_gb``."""
        if self._media is None:
            return
        self._media += nbytes
        limit = self.cfg.storage.max_media_gb
        if limit > 0 and self._media > limit * GB and time.monotonic() >= self._last_prune + self.PRUNE_GAP_SECONDS:
            self._due = True
            self._start_prune()

    # ---- pruning ------------------------------------------------------------------------------
    async def check(self) -> None:
        """The periodic job: probe the free space, and start a prune when one is due."""
        if self.stopping.is_set():
            return
        self.probe()
        if self.rules and time.monotonic() >= self._last_prune + self.PRUNE_SECONDS:
            self._due = True
        if self._due:
            self._start_prune()

    def _start_prune(self) -> None:
        if self.stopping.is_set() or (self._task is not None and not self._task.done()):
            return
        self._due = False
        self._last_prune = time.monotonic()
        self._task = asyncio.create_task(self.prune(), name="prune")

    async def prune(self):
        """Apply the ``[storage]`` rules now, in a worker thread; the report (None on failure)."""
        try:
            report = await asyncio.to_thread(run_prune, self.cfg)
        except Exception as e:  # noqa: BLE001 - the next run tries again
            log.error("pruning failed: %s: %s", type(e).__name__, e)
            return None
        self.last_report = report
        self._media = report.media_bytes
        self.stats["pruned"] += report.pictures
        if report.files or report.thumbs:
            log.info("disk: %s", report.summary())
        if report.over_limit and not self._warned_full:
            log.warning("disk: media %s is over storage.max_media_gb %g, and nothing more may be pruned "
                        "(the rest is rated, compared, posted, named, box-verified or not scored yet)",
                        human(report.media_bytes), self.cfg.storage.max_media_gb)
        self._warned_full = report.over_limit
        return report


def run_prune(cfg: Config, *, dry_run: bool = False):
    """:func:`storage.prune.prune` with ``cfg``'s rules, on a connection of its own (for a
    worker thread or the command line)."""
    from storage import Store
    from storage.prune import prune

    with Store.open(cfg.db_path) as store:
        return prune(store, cfg.paths, cfg.storage, dry_run=dry_run)


class RefetchError(Exception):
    """A pruned picture cannot be fetched again; the message says why, in one line."""


async def refetch(cfg: Config, store, http, image_id: int) -> dict:
    """Fetch a pruned picture's media again from its source and clear its pruned mark; returns
    the picture's row. ``store`` is an async store (``storage.writer.AsyncStore``), ``http`` the
    shared client (``sources.http.Http``). Raises :class:`RefetchError`."""
    from bot.pipeline import fetch_bytes
    from sources import SourceError
    from storage.media import BadImage, inspect, store_media

    row = await store.get_image(image_id)
    if row is None:
        raise RefetchError("no such picture")
    if not row.get("media_pruned_at"):
        raise RefetchError("its media was not pruned")
    if not row.get("media_url") and not row.get("local_path"):
        raise RefetchError("its source gave no address to fetch it from")
    try:
        data = await fetch_bytes(http, row, cfg.download.max_bytes)
        info, _ = await asyncio.to_thread(inspect, data, max_pixels=cfg.download.max_pixels)
    except (SourceError, BadImage) as e:
        raise RefetchError(str(e)) from None
    except OSError as e:
        raise RefetchError(f"cannot read {row['local_path']}: {e.strerror or e}") from None
    if info.sha256 != row["sha256"]:
        raise RefetchError("the source now gives a different picture than the one stored and scored")
    await asyncio.to_thread(store_media, cfg.media_path, data, info)
    await store.media_restored(info.sha256)
    log.info("image %d: media fetched again (%s)", image_id, human(len(data)))
    return await store.get_image(image_id)
