"""The daemon: poll sources on a schedule, download what they find, detect faces and score.

Three stages, each decoupled from the next:

    APScheduler poll jobs --(rows in SQLite)--> download workers --(rows)--> scoring worker

The database is the source of truth: a poll stores new items (status ``pending``) together with
the source's new cursor in one transaction; a downloaded picture becomes ``downloaded``; a scored
one ``scored``. Between stages, bounded asyncio queues hold only image ids and are refilled from
the database by a feeder, so memory stays bounded, a slow model never blocks polling (polls only
write rows), and after a crash or stop the work simply resumes from the rows' status.

:class:`Daemon` owns the life cycle and the wiring; each job is its own class:
:class:`bot.polling.SourcePoller` (poll jobs and backoff), :class:`bot.pipeline.Pipeline`
(download and scoring workers), :class:`bot.model_watch.ModelWatcher` (model switches,
rescoring, full retraining in a child process), :class:`bot.learning.Learner` (the taste head
refitted in seconds after new labels), :class:`bot.recognition.Recognition` (who is in the
faces: recognition of each scored batch, stored faces identified again when the identity
embedder or names change), :class:`bot.health.LoopMonitor` (event-loop lag, for ``/healthz``
and ``/stats``), :class:`bot.backups.BackupJob` (scheduled backups), :class:`bot.disk.DiskKeeper`
(downloads pause on low disk; media pruned by the ``[storage]`` rules in a worker thread). The
Discord bot and the web gallery get only the callables they need. Under systemd the daemon
reports ready, its status, watchdog pings and stopping (:mod:`bot.notify`). SIGHUP (and the
gallery's "Reload") re-reads the config file (:mod:`bot.reload`: sources and
``download.allow_private`` at once; other changed keys are named as needing a restart).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from datetime import timezone
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bot import notify
from bot.backups import BackupJob
from bot.config import Config, ConfigError, load_config
from bot.detector_watch import DetectorWatcher
from bot.disk import DiskKeeper
from bot.health import LoopMonitor, live_report, remove_state, write_state
from bot.manage import sync_config_sources
from bot.learning import Learner
from bot.model_watch import ModelWatcher
from bot.pipeline import Pipeline
from bot.polling import SourcePoller
from bot.recognition import Recognition
from bot.reload import Reloaded, apply_live, summary
from scorer import own_detector, threads
from scorer.analyze import Analyzer, build_analyzer
from scorer.detect_pool import DetectionPool
from sources.http import Http
from storage.lock import DaemonLock
from storage.writer import AsyncStore

log = logging.getLogger("tastefeed.daemon")


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.store = AsyncStore(cfg.db_path)
        self.http = Http.from_config(cfg.download)
        self.scheduler = AsyncIOScheduler(timezone=timezone.utc)
        self.analyzer: Analyzer | None = None
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.stats = {"polls": 0, "downloaded": 0, "scored": 0, "failed": 0, "rescored": 0, "identified": 0,
                      "downloads_paused": None}
        self.recognition = Recognition(cfg, self.store, self.stopping, self.stats)
        self.disk = DiskKeeper(cfg, self.stopping, self.stats)
        self.pipeline = Pipeline(cfg, self.store, self.http, self.stopping, self.stats,
                                 recognition=self.recognition, disk=self.disk)
        self.poller = SourcePoller(cfg, self.store, self.http, self.scheduler, self.stopping, self.stats,
                                   on_new_items=self.pipeline.wake_downloads)
        self.models = ModelWatcher(cfg, self.store, self.scheduler, self.stopping, self.stats)
        self.learner = Learner(cfg, self.store, self.models, self.stopping, self.stats)
        self.detectors = DetectorWatcher(cfg, self.store, self.pipeline, self.models, self.stopping, self.stats)
        self.backups = BackupJob(cfg, self.stopping)
        self.discord = None           # bot.discord_bot.DiscordBot when a token is configured
        self.gallery = None           # bot.web.Gallery when the web gallery is on
        self.gallery_url: str | None = None
        self._discord_task: asyncio.Task | None = None
        self.lock: DaemonLock | None = None   # one daemon per data folder (storage/lock.py)
        self._notify_tasks: list[asyncio.Task] = []   # systemd's watchdog and status (bot/notify.py)
        self.loop_monitor = LoopMonitor(self.stats)   # stats["loop_lag_ms"] (bot/health.py)
        self.started_at: float | None = None          # time.monotonic() of the start, for uptime
        self.stats["restart_needed"] = []             # config keys changed by a reload (bot/reload.py)
        self.stats["config_read_at"] = time.time()    # when the config file was last read
        self._reloads: set[asyncio.Task] = set()

    @property
    def detection(self) -> DetectionPool | None:
        """The face detection processes (None for yolo, which detects in the scoring thread); the
        pipeline's, swapped on a detector switch (bot/detector_watch.py)."""
        return self.pipeline.detection

    @detection.setter
    def detection(self, pool: DetectionPool | None) -> None:
        self.pipeline.detection = pool

    # ---- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start everything; :class:`storage.lock.DaemonRunning` when another daemon already
        runs on this data folder."""
        Path(self.cfg.data_dir).mkdir(parents=True, exist_ok=True)
        self.lock = DaemonLock(self.cfg.data_path).acquire()
        self.started_at = time.monotonic()
        self.loop_monitor.start()
        self.cfg.media_path.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        for name in await self.store.call(sync_config_sources, self.cfg):
            log.info("source %s: removed (no longer in the config)", name)
        threads.apply(self.cfg.scorer.threads)
        tag = own_detector.tag(self.cfg.paths, self.cfg.detector)   # the owner's own detector, or the configured one
        if tag.startswith(own_detector.CONFIG):            # pictures stored before the configured one was named
            await self.store.call(lambda s: s.adopt_detector_tag(tag))
        detector = own_detector.effective_detector(self.cfg.detector, self.cfg.paths)
        self.analyzer = await self.store.call(lambda s: build_analyzer(s, self.cfg.detector, self.cfg.scorer, self.cfg.paths))
        if detector.name != "yolo":   # yolo releases the GIL: it detects in the scoring thread
            self.detection = DetectionPool.from_config(detector, self.cfg.data_path)
        log.info("scoring with model %s on %s, detector %s%s", self.analyzer.scorer.version,
                 self.analyzer.scorer.device, self.analyzer.detector.name,
                 f" in {self.detection.workers} worker process(es)" if self.detection else "")
        self.scheduler.start()
        await self.poller.start()
        await self.models.start(self.analyzer)
        await self.learner.start(self.scheduler)
        await self.recognition.start(self.scheduler)
        self.backups.start(self.scheduler)
        await self.disk.start(self.scheduler)
        self.pipeline.start(self.analyzer, self.detection)
        await self.detectors.start(self.scheduler, tag)
        self.start_discord()
        await self.start_gallery()
        write_state(self.cfg.data_path, self.gallery_url)   # where `status` finds the gallery
        self.started.set()
        self._notify_tasks = notify.start(self.status_line)

    async def status_line(self) -> str:
        """One line for ``systemctl status``: what was scored, what waits, which sources work."""
        counts = await self.store.status_counts()
        sources = [s for s in await self.store.list_sources() if s["config"].get("enabled", True)]
        line = (f"scored {counts.get('scored', 0)}, pending {counts.get('pending', 0) + counts.get('downloaded', 0)}, "
                f"sources ok {sum(1 for s in sources if s['healthy'])}/{len(sources)}")
        paused = self.stats.get("downloads_paused")
        return f"{line}; downloads paused: {paused}" if paused else line

    async def health(self) -> dict:
        """The health report (``GET /healthz``; rules in ``bot.health``)."""
        return await live_report(self)

    async def reload(self) -> Reloaded:
        """Re-read the config file: apply its sources and live keys, name the keys that need a
        restart (``bot.reload``); a file with a mistake changes nothing."""
        if not self.cfg.path:
            return Reloaded(False, "running on the built-in defaults (no config file): nothing to reload")
        read_at = time.time()
        try:
            new = await asyncio.to_thread(load_config, self.cfg.path)
        except ConfigError as e:
            log.error("config not reloaded: %s", e)
            return Reloaded(False, f"not reloaded: {e}")
        applied, restart = apply_live(self.cfg, new, self.http)
        for name in await self.store.call(sync_config_sources, self.cfg):
            log.info("source %s: removed (no longer in the config)", name)
        await self.poller.refresh_sources()
        self.stats["restart_needed"] = restart
        self.stats["config_read_at"] = read_at
        message = summary(self.cfg.path, applied, restart)
        log.info("%s", message)
        return Reloaded(True, message, restart)

    def _reload_on_signal(self) -> None:
        task = asyncio.create_task(self.reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def start_gallery(self) -> None:
        if not self.cfg.web_on():
            log.info("web gallery: off (web.enabled = %r%s)", self.cfg.web.enabled,
                     ", Discord is set up" if self.cfg.web.enabled == "auto" else "")
            return
        from bot.web import Gallery

        gallery = Gallery(self.cfg, self.store, model_changed=self.models.check_model,
                          sources_changed=self.poller.refresh_sources,
                          characters_changed=self.recognition.owner_changed_names,
                          health=self.health, live=self.stats, http=self.http,
                          poll_now=self.poller.poll_now, reload=self.reload,
                          train_now=lambda: self.models.retrain("asked in the gallery"))
        try:
            self.gallery_url = await gallery.start()
        except OSError as e:
            log.error("web gallery: %s; polling and scoring go on without it", e)
            return
        self.gallery = gallery
        log.info("web gallery: %s", self.gallery_url)

    def start_discord(self) -> None:
        reason = self.cfg.discord.off_reason()
        if reason is not None:
            log.info("Discord: off (%s)", reason)
            return
        from bot.discord_bot import DiscordBot  # discord.py is imported only when it is used

        self.discord = DiscordBot(self.cfg, self.store, request_retrain=self.models.retrain,
                                  names_changed=self.recognition.names_changed, live=self.stats)
        self._discord_task = asyncio.create_task(self.discord.run(), name="discord")

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping: finishing work in flight (up to %gs)", self.cfg.daemon.stop_timeout)
            notify.send("STOPPING=1", "STATUS=stopping")
            self.stopping.set()

    async def stop(self) -> None:
        self.request_stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        await self.models.stop()
        if self.gallery is not None:
            await self.gallery.stop()
        if self.discord is not None:
            try:
                await asyncio.wait_for(self.discord.close(), timeout=10)
            except Exception as e:  # noqa: BLE001
                log.warning("Discord: did not close cleanly: %s", e)
        if self._discord_task is not None and not self._discord_task.done():
            self._discord_task.cancel()
            await asyncio.wait([self._discord_task], timeout=5)
        work = self.pipeline.running() + self.poller.running() + self.models.running() + self.recognition.running() \
            + self.learner.running() + self.backups.running() + self.disk.running() + self.detectors.running()
        pending = [t for t in work if not t.done()]
        if pending:
            done, still = await asyncio.wait(pending, timeout=self.cfg.daemon.stop_timeout)
            for task in still:
                task.cancel()  # abandoned safely: its rows keep their status and resume next start
            if still:
                await asyncio.wait(still, timeout=5)
        if self.detection is not None:
            await self.detection.close()
        await self.http.close()
        await self.store.close()
        await self.loop_monitor.stop()
        if self.lock is not None:
            remove_state(self.cfg.data_path)
            self.lock.release()
            self.lock = None
        for task in self._notify_tasks:   # the watchdog pings go on until the very end
            task.cancel()
        await asyncio.gather(*self._notify_tasks, return_exceptions=True)
        log.info("stopped")

    async def run(self, announce=None) -> None:
        """Start, call ``announce(self)``, run until SIGINT/SIGTERM, stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
                pass
        try:
            loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        except (NotImplementedError, RuntimeError, AttributeError):  # pragma: no cover - non-Unix
            pass
        await self.start()
        if announce is not None:
            announce(self)
        try:
            await self.stopping.wait()
        finally:
            await self.stop()
