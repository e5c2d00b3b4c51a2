"""The daemon: poll sources on a schedule, download what they find, detect faces and score.

Three stages, each decoupled from the next:

    APScheduler poll jobs --(rows in SQLite)--> download workers --(rows)--> scoring worker

The database is the source of truth: a poll stores new items (status ``pending``) together with
the source's new cursor in one transaction; a downloaded picture becomes ``downloaded``; a scored
one ``scored``. Between stages, bounded asyncio queues hold only image ids and are refilled from
the database by a feeder, so memory stays bounded, a slow model never blocks polling (polls only
write rows), and after a crash or stop the work simply resumes from the rows' status.
"""
from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from bot.config import Config, build_source
from bot.manage import PAUSED_SOURCES, sync_config_sources
from bot.retrain import Retrainer
from scorer.analyze import Analyzer, build_analyzer
from scorer.registry import load_scorer
from scorer.rescore import score_stored
from sources import AuthError, RateLimited, SourceError, TransientError
from sources.http import Http, TooLarge, short_url
from storage.media import BadImage, inspect, load_media, store_media
from storage.store import FaceRecord
from storage.writer import AsyncStore

log = logging.getLogger("tastefeed.daemon")

ACCEPTED_CONTENT_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.store = AsyncStore(cfg.db_path)
        self.http = Http.from_config(cfg.download)
        self.scheduler: AsyncIOScheduler | None = None
        self.analyzer: Analyzer | None = None
        self.sources: dict[str, object] = {}
        self._source_configs: dict[str, tuple] = {}
        self.download_queue: asyncio.Queue[int] = asyncio.Queue(cfg.download.queue_size)
        self.score_queue: asyncio.Queue[int] = asyncio.Queue(cfg.daemon.score_queue_size)
        self._download_wake = asyncio.Event()
        self._score_wake = asyncio.Event()
        self._in_download: set[int] = set()
        self._in_score: set[int] = set()
        self._retry_at: dict[int, float] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._polls: set[asyncio.Task] = set()
        self.started = asyncio.Event()
        self.stats = {"polls": 0, "downloaded": 0, "scored": 0, "failed": 0, "rescored": 0}
        self.retrainer = Retrainer(cfg)
        self._rescore_task: asyncio.Task | None = None
        self._retrain_not_before = 0.0
        self.discord = None           # bot.discord_bot.DiscordBot when a token is configured
        self.gallery = None           # bot.web.Gallery when the web gallery is on
        self.gallery_url: str | None = None
        self._discord_task: asyncio.Task | None = None

    # ---- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        Path(self.cfg.data_dir).mkdir(parents=True, exist_ok=True)
        self.cfg.media_path.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        for name in await self.store.call(sync_config_sources, self.cfg):
            log.info("source %s: removed (no longer in the config)", name)
        self.analyzer = await self.store.call(lambda s: build_analyzer(s, self.cfg.detector, self.cfg.scorer, self.cfg.paths))
        log.info("scoring with model %s on %s, detector %s", self.analyzer.scorer.version,
                 self.analyzer.scorer.device, self.analyzer.detector.name)
        self.scheduler = AsyncIOScheduler(timezone=timezone.utc)
        self.scheduler.start()
        await self.refresh_sources()
        self.scheduler.add_job(self.refresh_sources, "interval", seconds=15, id="refresh-sources",
                               max_instances=1, coalesce=True)
        self.scheduler.add_job(self.check_model, "interval", seconds=30, id="check-model",
                               max_instances=1, coalesce=True)
        train = self.cfg.train
        if train.schedule:
            trigger = CronTrigger.from_crontab(train.schedule)
            self.scheduler.add_job(self.retrain, trigger, args=["schedule " + train.schedule],
                                   id="retrain-schedule", max_instances=1, coalesce=True)
            log.info("retraining on schedule %r (local time), next at %s", train.schedule,
                     trigger.get_next_fire_time(None, datetime.now(trigger.timezone)))
        if train.after_new_labels:
            self.scheduler.add_job(self.check_new_labels, "interval", seconds=60, id="retrain-labels",
                                   max_instances=1, coalesce=True)
        await self.check_model()  # pictures left unrescored by a stop or by `models use`
        self._tasks = [
            asyncio.create_task(self._feeder(self.download_queue, "pending", self._in_download,
                                             self._download_wake), name="download-feeder"),
            asyncio.create_task(self._feeder(self.score_queue, "downloaded", self._in_score,
                                             self._score_wake), name="score-feeder"),
            *[asyncio.create_task(self._download_worker(), name=f"download-{i}")
              for i in range(self.cfg.download.workers)],
            asyncio.create_task(self._score_worker(), name="scorer"),
        ]
        self.start_discord()
        await self.start_gallery()
        self.started.set()

    async def start_gallery(self) -> None:
        if not self.cfg.web_on():
            log.info("web gallery: off (web.enabled = %r%s)", self.cfg.web.enabled,
                     ", Discord is set up" if self.cfg.web.enabled == "auto" else "")
            return
        from bot.web import Gallery

        gallery = Gallery(self.cfg, self.store, daemon=self)
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

        self.discord = DiscordBot(self.cfg, self.store, daemon=self)
        self._discord_task = asyncio.create_task(self.discord.run(), name="discord")

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: finishing work in flight (up to %gs)", self.cfg.daemon.stop_timeout)
            self._stop.set()

    async def stop(self) -> None:
        self.request_stop()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        await self.retrainer.stop()
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
        rescoring = [self._rescore_task] if self._rescore_task is not None else []
        pending = [t for t in self._tasks + list(self._polls) + rescoring if not t.done()]
        if pending:
            done, still = await asyncio.wait(pending, timeout=self.cfg.daemon.stop_timeout)
            for task in still:
                task.cancel()  # abandoned safely: its rows keep their status and resume next start
            if still:
                await asyncio.wait(still, timeout=5)
        await self.http.close()
        await self.store.close()
        log.info("stopped")

    async def run(self, announce=None) -> None:
        """Start, call ``announce(self)``, run until SIGINT/SIGTERM, stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
                pass
        await self.start()
        if announce is not None:
            announce(self)
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    # ---- learning loop ---------------------------------------------------------------------
    async def retrain(self, reason: str) -> bool:
        """Start a training run in a child process (not if one is going or we are stopping)."""
        if self._stop.is_set():
            return False
        return self.retrainer.start(reason, on_done=self._retrained)

    async def _retrained(self, code: int) -> None:
        if code != 0:
            self._retrain_not_before = time.monotonic() + 3600  # label-triggered runs wait an hour
        elif not self._stop.is_set():
            await self.check_model()

    async def check_new_labels(self) -> None:
        """Retrain once ``train.after_new_labels`` labels arrived since the last trained model."""
        if self.retrainer.running or time.monotonic() < self._retrain_not_before:
            return
        try:
            since = await self.store.latest_training_at()
            new = await self.store.label_count(since or "")
        except Exception as e:  # noqa: BLE001
            log.error("cannot count new labels: %s", e)
            return
        if new >= self.cfg.train.after_new_labels:
            await self.retrain(f"{new} new label(s) since the last training")

    async def check_model(self) -> None:
        """Switch to the active model if it changed (a promotion or `models use`), then rescore."""
        try:
            row = await self.store.active_model()
        except Exception as e:  # noqa: BLE001
            log.error("cannot read the active model: %s", e)
            return
        if row is None or self.analyzer is None:
            return
        if row["version"] != self.analyzer.scorer.version:
            try:
                scorer = await asyncio.to_thread(load_scorer, row, self.cfg.scorer, self.cfg.models_path)
            except Exception as e:  # noqa: BLE001 - a bad file must not stop the daemon
                log.error("cannot load the active model %s, still scoring with %s: %s", row["version"],
                          self.analyzer.scorer.version, e)
                return
            self.analyzer.scorer = scorer
            log.info("now scoring with model %s", scorer.version)
        if self._rescore_task is None or self._rescore_task.done():
            self._rescore_task = asyncio.create_task(self.rescore(), name="rescore")

    async def rescore(self, batch_size: int = 32) -> int:
        """Rescore unposted pictures with the current model, in batches, until none is left."""
        scorer = self.analyzer.scorer
        done, after = 0, 0
        try:
            while not self._stop.is_set() and self.analyzer.scorer is scorer:
                rows = await self.store.rescore_candidates(scorer.version, batch_size, after)
                if not rows:
                    break
                after = rows[-1]["id"]
                faces = await self.store.faces_for([r["id"] for r in rows])
                results = await asyncio.to_thread(
                    score_stored, scorer, self.cfg.media_path, rows, faces, margin=self.cfg.detector.margin,
                    how=self.cfg.scorer.aggregate, max_pixels=self.cfg.download.max_pixels)
                for r in results:
                    await self.store.record_rescore(r.image_id, r.face_scores, r.score, r.uncertainty,
                                                    scorer.version)
                done += len(results)
                self.stats["rescored"] += len(results)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.error("rescoring stopped: %s: %s", type(e).__name__, e)
        if done:
            log.info("rescored %d picture(s) with model %s", done, scorer.version)
        return done

    # ---- sources -------------------------------------------------------------------------
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
            if row["next_poll_at"]:
                stored = datetime.fromisoformat(row["next_poll_at"])
                if stored > first:  # honour a backoff that was running before a restart
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
            await self._poll_source(name)
        except asyncio.CancelledError:
            pass  # stopping: the poll is abandoned before its transaction, nothing is half-saved
        finally:
            self._polls.discard(task)

    async def _poll_source(self, name: str) -> None:
        if self._stop.is_set() or name not in self.sources:
            return
        source = self.sources[name]
        try:
            row = await self.store.get_source(name)
        except Exception as e:  # noqa: BLE001
            log.error("source %s: cannot read its state: %s", name, e)
            return
        if row is None:
            return
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
                self._download_wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure is logged and backed off, never fatal
            await self._poll_failed(name, row, interval, e)

    async def _poll_failed(self, name: str, row: dict, interval: float, error: Exception) -> None:
        failures = row["failures"] + 1
        if isinstance(error, asyncio.TimeoutError):
            error = TransientError("poll timed out")
        if isinstance(error, RateLimited) and error.retry_after is not None:
            delay = error.retry_after + random.uniform(0, 2)
        elif isinstance(error, AuthError):
            delay = self.cfg.daemon.backoff_max
        else:
            base = max(interval, 10.0) * 2 ** (failures - 1)
            delay = min(self.cfg.daemon.backoff_max, base) * random.uniform(0.8, 1.2)
        message = str(error) if isinstance(error, SourceError) else f"{type(error).__name__}: {error}"
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
        job = self.scheduler.get_job(f"poll:{name}") if self.scheduler else None
        if job is not None:
            job.modify(next_run_time=next_at)

    # ---- stages --------------------------------------------------------------------------
    async def _take(self, queue: asyncio.Queue):
        """The next id from ``queue``, or None once a stop is requested."""
        if self._stop.is_set():
            return None
        getter = asyncio.ensure_future(queue.get())
        stopper = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            stopper.cancel()
            return getter.result()
        getter.cancel()
        return None

    async def _feeder(self, queue: asyncio.Queue, status: str, in_flight: set[int], wake: asyncio.Event):
        while not self._stop.is_set():
            wake.clear()
            room = queue.maxsize - queue.qsize()
            if room > 0:
                now = time.monotonic()
                waiting = {i for i, t in self._retry_at.items() if t > now}
                try:
                    ids = await self.store.ids_with_status(status, room, in_flight | waiting)
                except Exception as e:  # noqa: BLE001
                    log.error("cannot read the %s queue from the database: %s", status, e)
                    ids = []
                for image_id in ids:
                    in_flight.add(image_id)
                    queue.put_nowait(image_id)
            try:
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    async def _download_worker(self) -> None:
        while True:
            image_id = await self._take(self.download_queue)
            if image_id is None:
                return
            try:
                await self.download(image_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                log.error("image %d: download step failed: %s: %s", image_id, type(e).__name__, e)
            finally:
                self._in_download.discard(image_id)
                self._download_wake.set()

    async def _fetch(self, row: dict) -> bytes:
        limit = self.cfg.download.max_bytes
        if row["local_path"]:
            path = Path(row["local_path"])
            size = path.stat().st_size
            if size > limit:
                raise TooLarge(f"{path.name} is {size} bytes, over the {limit}-byte limit")
            return await asyncio.to_thread(path.read_bytes)
        if not row["media_url"]:
            raise BadImage("the source gave no picture URL")
        resp = await self.http.get(row["media_url"], headers={"Accept": "image/*"})
        ctype = resp.headers.get("Content-Type", "").lower()
        if ctype and not ctype.startswith(ACCEPTED_CONTENT_TYPES):
            raise BadImage(f"{short_url(row['media_url'])} is {ctype.split(';')[0]}, not a picture")
        return resp.body

    async def download(self, image_id: int) -> str:
        row = await self.store.get_image(image_id)
        if row is None or row["status"] != "pending":
            return "gone"
        where = row["local_path"] or short_url(row["media_url"] or "")
        try:
            data = await self._fetch(row)
            info, _ = await asyncio.to_thread(inspect, data, max_pixels=self.cfg.download.max_pixels)
            rel = await asyncio.to_thread(store_media, self.cfg.media_path, data, info)
            status, dup_of = await self.store.record_download(
                image_id, info, rel, self.cfg.download.near_duplicate_distance)
        except TransientError as e:
            status = await self.store.mark_failed(image_id, str(e), retry=True)
            if status == "pending":
                self._retry_at[image_id] = time.monotonic() + 30 * random.uniform(0.8, 1.2)
            log.warning("image %d (%s): %s%s", image_id, where, e, "; will retry" if status == "pending" else "")
            self.stats["failed"] += status == "failed"
            return status
        except (SourceError, BadImage, OSError) as e:
            message = str(e) if not isinstance(e, OSError) else f"cannot read file: {e.strerror or e}"
            await self.store.mark_failed(image_id, message)
            log.warning("image %d (%s): skipped: %s", image_id, where, message)
            self.stats["failed"] += 1
            return "failed"
        self._retry_at.pop(image_id, None)
        self.stats["downloaded"] += 1
        if status == "downloaded":
            self._score_wake.set()
        else:
            log.info("image %d (%s): %s of image %d, not scored again", image_id, where,
                     status.replace("_", "-"), dup_of)
        return status

    async def _score_worker(self) -> None:
        batch_size = self.cfg.scorer.batch_size
        while True:
            first = await self._take(self.score_queue)
            if first is None:
                return
            batch = [first]
            while len(batch) < batch_size and not self.score_queue.empty():
                batch.append(self.score_queue.get_nowait())
            try:
                await self.score(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                log.error("scoring a batch of %d failed: %s: %s", len(batch), type(e).__name__, e)
            finally:
                for image_id in batch:
                    self._in_score.discard(image_id)
                self._score_wake.set()

    async def score(self, image_ids: list[int]) -> None:
        pictures, rows = [], []
        for image_id in image_ids:
            row = await self.store.get_image(image_id)
            if row is None or row["status"] != "downloaded":
                continue
            try:
                im = await asyncio.to_thread(load_media, self.cfg.media_path, row["media_path"],
                                             max_pixels=self.cfg.download.max_pixels)
            except (OSError, BadImage) as e:
                await self.store.mark_failed(image_id, f"stored picture unreadable: {e}")
                log.warning("image %d: stored picture unreadable: %s", image_id, e)
                continue
            pictures.append(im)
            rows.append(row)
        if not pictures:
            return
        analyzer = self.analyzer
        analyses = await asyncio.to_thread(analyzer.analyze, pictures)
        version = analyzer.scorer.version
        for row, res in zip(rows, analyses):
            faces = [FaceRecord.from_scored(f) for f in res.faces]
            await self.store.record_analysis(row["id"], faces, res.score, res.uncertainty, version,
                                             skipped=res.skipped)
            self.stats["scored"] += 1
            name = row["title"] or row["external_id"]
            if res.skipped:
                log.info("image %d (%s): no face, skipped", row["id"], name)
            else:
                log.info("image %d (%s): %d face(s), score %.2f", row["id"], name,
                         0 if res.whole else len(res.faces), res.score)
