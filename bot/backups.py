"""Scheduled backups in the daemon: ``backup.schedule`` (a crontab line, local time) takes a backup
into ``backup.dest`` (``<data_dir>/backups`` when empty) and keeps the newest ``backup.keep``.

The copy (:func:`storage.backup.scheduled_backup`) runs in a worker thread, never on the event
loop, with its own read-only use of the database, so polling, scoring and rating go on meanwhile.
Each backup writes one log line; a stop of the daemon ends a backup midway (nothing is left of it).
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from apscheduler.triggers.cron import CronTrigger

from bot.config import Config
from storage.backup import BackupError, human, scheduled_backup

log = logging.getLogger("tastefeed.daemon")


class BackupJob:
    def __init__(self, cfg: Config, stopping: asyncio.Event):
        self.cfg = cfg
        self.stopping = stopping
        self._task: asyncio.Task | None = None

    def start(self, scheduler) -> None:
        """Schedule the backups (nothing when ``backup.schedule`` is empty)."""
        schedule = self.cfg.backup.schedule
        if not schedule:
            return
        trigger = CronTrigger.from_crontab(schedule)
        scheduler.add_job(self.run, trigger, id="backup-schedule", max_instances=1, coalesce=True)
        log.info("backups on schedule %r (local time) into %s, keeping %d, next at %s", schedule,
                 self.cfg.backup.dest_path(self.cfg.data_path), self.cfg.backup.keep,
                 trigger.get_next_fire_time(None, datetime.now(trigger.timezone)))

    def running(self) -> list[asyncio.Task]:
        """A backup in progress (a stop waits for it to notice and end)."""
        return [self._task] if self._task is not None and not self._task.done() else []

    async def run(self) -> bool:
        """Take one scheduled backup now; True when it was written."""
        if self.stopping.is_set():
            return False
        self._task = asyncio.current_task()
        b = self.cfg.backup
        started = time.monotonic()
        try:
            dest, manifest, removed = await asyncio.to_thread(
                scheduled_backup, self.cfg.paths, b.dest_path(self.cfg.data_path), keep=b.keep, media=b.media,
                cancel=self.stopping.is_set)
        except Exception as e:  # noqa: BLE001 -- one line, and the next scheduled backup tries again
            log.error("backup: failed: %s", e if isinstance(e, (BackupError, OSError)) else repr(e))
            return False
        media = f", {manifest.media.count} media file(s)" if manifest.media else ""
        log.info("backup: wrote %s in %.1fs (%d picture(s), %d labelled, %d model file(s)%s; %s)%s", dest,
                 time.monotonic() - started, manifest.images, manifest.labels, manifest.models.count, media,
                 human(manifest.total_bytes), f"; removed {len(removed)} older backup(s)" if removed else "")
        return True
