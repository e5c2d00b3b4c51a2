"""Source polling: one APScheduler job per enabled source, and backoff when a poll fails.

:class:`SourcePoller` keeps the scheduler's poll jobs in step with the ``sources`` table (every
15 s it picks up sources added, changed, paused or removed meanwhile, from the CLI, Discord or
the gallery). A poll stores its new items (status ``pending``) and the source's new cursor in one
transaction, then wakes the download stage. A failed poll is never fatal: it is logged and the
source's next poll is pushed back (exponential backoff with jitter; after a 429, the server's
retry time when it is longer, but never less than that backoff nor more than
``daemon.backoff_max``; the maximum for a refused login); the next poll time is stored, so a
restart honours a backoff that was running (up to ``daemon.backoff_max`` from the restart).

:meth:`SourcePoller.poll_now` (the gallery's "Poll now") polls one source at once, whatever its
backoff: a success makes it healthy again and puts its next poll one interval away; a failure
restarts its backoff from the first step (it stays UNHEALTHY if it was). One poll of a source
runs at a time (a "Poll now" during a scheduled poll waits for it).
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bot.config import Config, build_source
from bot.manage import PAUSED_SOURCES
from sources import AuthError, RateLimited, SourceError, TransientError
from sources.http import Http

log = logging.getLogger("tastefeed.daemon")


class SourcePoller:
    def __init__(self, cfg: Config, store, http: Http, scheduler: AsyncIOScheduler, stopping: asyncio.Event,
                 stats: dict, on_new_items: Callable[[], None]):
        self.cfg = cfg
        self.store = store            # storage.writer.AsyncStore
        self.http = http
        self.scheduler = scheduler
        self.stopping = stopping
        self.stats = stats
        self.on_new_items = on_new_items
        self.sources: dict[str, object] = {}
        self._source_configs: dict[str, tuple] = {}
        self._polls: set[asyncio.Task] = set()
        self._locks: dict[str, asyncio.Lock] = {}   # one poll of a source at a time

    async def start(self) -> None:
        """Schedule the sources now, then look for changes every 15 s."""
        await self.refresh_sources()
        self.scheduler.add_job(self.refresh_sources, "interval", seconds=15, id="refresh-sources",
                               max_instances=1, coalesce=True)

    def running(self) -> list[asyncio.Task]:
        """Polls running now (a stop waits for them)."""
        return list(self._polls)

    async def refresh_sources(self) -> None:
        """Schedule a poll job per enabled source; pick up sources added or removed meanwhile."""
        try:
            rows = await self.store.list_sources()
        except Exception as e:  # noqa: BLE001 - a locked database must not stop the daemon
            log.error("cannot read the sources table: %s", e)
            return
        try:
            paused = set(await self.store.get_setting(PAUSED_SOURCES, []))
        except Exception:  # noqa: BLE001
            paused = set()
        wanted = {}
        for row in rows:
            conf = row["config"]
            if conf.get("enabled", True) and row["name"] not in paused:
                wanted[row["name"]] = (row["kind"], repr(sorted(conf.items())))
        for name in list(self._source_configs):
            if name not in wanted or wanted[name] != self._source_configs[name]:
                self.scheduler.remove_job(f"poll:{name}")
                self.sources.pop(name, None)
                del self._source_configs[name]
                if name not in wanted:
                    log.info("source %s: %s", name, "paused" if name in paused else "no longer polled")
        for row in rows:
            name = row["name"]
            if name not in wanted or name in self._source_configs:
                continue
            conf = row["config"]
            try:
                self.sources[name] = build_source(name, row["kind"], conf.get("options", {}), self.http)
            except Exception as e:  # noqa: BLE001
                log.error("source %s: cannot be set up: %s", name, e)
                continue
            interval = float(conf.get("interval", 300))
            first = datetime.now(timezone.utc)
            stored = _stored_time(row["next_poll_at"])
            if stored is not None and stored > first:  # honour a backoff that was running before a restart
                first = min(stored, first + timedelta(seconds=self.cfg.daemon.backoff_max))
            self.scheduler.add_job(self.poll_source, "interval", seconds=interval, args=[name],
                                   id=f"poll:{name}", next_run_time=first, max_instances=1,
                                   coalesce=True, misfire_grace_time=None)
            self._source_configs[name] = wanted[name]
            log.info("source %s: polling %s every %gs", name, self.sources[name].describe(), interval)

    async def poll_source(self, name: str) -> None:
        task = asyncio.current_task()
        self._polls.add(task)
        try:
            lock = self._lock(name)
            if not lock.locked():             # a "Poll now" is polling it this moment
                async with lock:
                    await self._poll_once(name, now=False)
        except asyncio.CancelledError:
            pass  # stopping: the poll is abandoned before its transaction, nothing is half-saved
        finally:
            self._polls.discard(task)

    async def poll_now(self, name: str) -> tuple[bool, str]:
        """Poll ``name`` at once, resetting its backoff (the gallery's "Poll now"); (ok, one line
        saying what happened)."""
        await self.refresh_sources()          # a source added or resumed a moment ago
        if name not in self.sources:
            row = await self.store.get_source(name)
            paused = set(await self.store.get_setting(PAUSED_SOURCES, []))
            if row is None:
                return False, f"no source named {name!r}"
            if name in paused:
                return False, f"source {name} is paused: resume it first"
            if not row["config"].get("enabled", True):
                return False, f"source {name} is disabled (enabled = false in the config)"
            return False, f"source {name} cannot be set up (see the daemon's log)"
        async with self._lock(name):
            await self.store.call(_reset_failures, name)
            task = asyncio.current_task()
            self._polls.add(task)
            try:
                return await self._poll_once(name, now=True)
            finally:
                self._polls.discard(task)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _poll_once(self, name: str, now: bool) -> tuple[bool, str]:
        """One poll of ``name``; (ok, what happened). ``now``: asked for, out of schedule (on
        success the next scheduled poll moves to one interval from now)."""
        if self.stopping.is_set() or name not in self.sources:
            return False, "the daemon is stopping" if self.stopping.is_set() else f"source {name} is not polled"
        source = self.sources[name]
        try:
            row = await self.store.get_source(name)
        except Exception as e:  # noqa: BLE001
            log.error("source %s: cannot read its state: %s", name, e)
            return False, f"cannot read its state: {e}"
        if row is None:
            return False, f"no source named {name!r}"
        conf = row["config"]
        interval = float(conf.get("interval", 300))
        cap = int(conf.get("max_items") or self.cfg.daemon.max_items_per_poll)
        self.stats["polls"] += 1
        try:
            poll = await asyncio.wait_for(source.poll(row["cursor"], cap),
                                          timeout=max(60.0, self.cfg.download.timeout * 3))
            ids = await self.store.save_poll(row["id"], poll.items[:cap], poll.cursor)
            next_at = datetime.now(timezone.utc) + timedelta(seconds=interval)
            await self.store.source_polled(row["id"], error=None, next_poll_at=next_at.isoformat())
            if not row["healthy"]:
                log.info("source %s: healthy again", name)
            if ids:
                log.info("source %s: %d new item(s)%s", name, len(ids), ", more next poll" if poll.more else "")
                self.on_new_items()
            job = self.scheduler.get_job(f"poll:{name}")
            if now and job is not None:
                job.modify(next_run_time=next_at)
            return True, f"{len(ids)} new item(s)" + (", more next poll" if poll.more else "")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure is logged and backed off, never fatal
            return False, await self._poll_failed(name, row, interval, e)

    async def _poll_failed(self, name: str, row: dict, interval: float, error: Exception) -> str:
        failures = row["failures"] + 1
        if isinstance(error, asyncio.TimeoutError):
            error = TransientError("poll timed out")
        message = str(error) if isinstance(error, SourceError) else f"{type(error).__name__}: {error}"
        try:
            delay = retry_delay(error, interval, failures, self.cfg.daemon.backoff_max)
            next_at = datetime.now(timezone.utc) + timedelta(seconds=delay)
        except Exception as e:  # noqa: BLE001 - the failure is recorded and retried whatever happens
            log.error("source %s: cannot work out its next try (%s: %s); trying again in %gs", name,
                      type(e).__name__, e, FALLBACK_DELAY)
            delay = FALLBACK_DELAY
            next_at = datetime.now(timezone.utc) + timedelta(seconds=delay)
        try:
            updated = await self.store.source_polled(
                row["id"], error=message, next_poll_at=next_at.isoformat(),
                unhealthy_after=self.cfg.daemon.unhealthy_after, force_unhealthy=isinstance(error, AuthError))
            became_unhealthy = row["healthy"] and not updated["healthy"]
        except Exception as e:  # noqa: BLE001
            log.error("source %s: cannot record its failure: %s", name, e)
            became_unhealthy = False
        log.warning("source %s: %s; next try in %.0fs%s", name, message, delay,
                    " (marked unhealthy)" if became_unhealthy else "")
        job = self.scheduler.get_job(f"poll:{name}")
        if job is not None:
            job.modify(next_run_time=next_at)
        return f"{message}; next try in {delay:.0f}s"


def _reset_failures(store, name: str) -> None:
    """Forget a source's failures in a row (its backoff starts again from the first step); its
    health is left as it is until the next poll says otherwise."""
    with store.db.conn:
        store.db.execute("UPDATE sources SET failures = 0 WHERE name = ?", [name])


FALLBACK_DELAY = 600.0   # seconds, should working out a retry time ever fail


def retry_delay(error: Exception, interval: float, failures: int, backoff_max: float) -> float:
    """Seconds until a source polled every ``interval`` s is tried again after its ``failures``-th
    failure in a row: exponential backoff from max(interval, 10 s) with jitter (the doubling stops
    at ``backoff_max``). A refused login waits ``backoff_max``. A 429 (or a 5xx with Retry-After)
    waits the server's time when that is longer, but never less than this backoff (a server
    cannot make us poll faster) nor more than ``backoff_max`` (nor silence a source longer)."""
    if isinstance(error, AuthError):
        return backoff_max
    base = max(interval, 10.0) * 2.0 ** min(failures - 1, 32)
    delay = min(backoff_max, min(backoff_max, base) * random.uniform(0.8, 1.2))
    wait = error.retry_after if isinstance(error, RateLimited) else None
    if isinstance(wait, (int, float)) and math.isfinite(wait):
        delay = min(backoff_max, max(delay, wait + random.uniform(0, 2)))
    elif isinstance(error, RateLimited):
        delay = min(backoff_max, delay)
    return delay


def _stored_time(text: str | None) -> datetime | None:
    """A stored next poll time (UTC); None when absent or unreadable."""
    try:
        when = datetime.fromisoformat(text) if text else None
    except (TypeError, ValueError):
        return None
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when
