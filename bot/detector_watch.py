"""The detector watcher: follow a switch of the face detector, then detect stored pictures again.

Every 30 s :class:`DetectorWatcher` reads which detector is in use (``data/detectors/ACTIVE``,
scorer/own_detector.py: the owner's own version, or the configured ``[detector]``), as
bot/model_watch.py does for models. On a switch (``detector use``, a promotion by ``detector train``
under ``detector.auto``) it builds the new detector — new detection worker processes, or the yolo
detector in the scoring thread (it releases the GIL) — swaps it into the pipeline and closes the
old workers. New pictures are detected by the new detector from then on.

Then, in the background, the stored pictures found by another detector (``images.detector_version``,
storage/redetect.py) are detected again, a batch at a time, by the same workers the pipeline
uses (the event loop only awaits them), their faces replaced (the owner's labels and names
carried to the new faces) and the pictures marked for rescoring; the model watcher rescores them
(bot/model_watch.py). The column makes it resumable: after a restart the daemon goes on where it
stopped, and a later switch ends a run early and starts over for the new detector.

The run logs what it does: a line when it starts (how many pictures), a progress line after a
batch at most every :data:`PROGRESS_SECONDS` ("re-detecting with detector own:v2: 8/22
pictures"), and a line when it ends — done, with how many pictures got new faces and how many
were skipped (unreadable media, a failed detection), or stopped early by another switch or a stop.
"""
from __future__ import annotations

import asyncio
import logging
import time

from bot.config import Config
from scorer import own_detector
from scorer.detect import make_detector
from scorer.detect_pool import DetectionFailed, DetectionPool
from storage.media import BadImage, load_media

log = logging.getLogger("tastefeed.daemon")

CHECK_SECONDS = 30
BATCH = 8          # pictures detected again at a time
PROGRESS_SECONDS = 10   # at most one progress line this often


class DetectorWatcher:
    def __init__(self, cfg: Config, store, pipeline, models, stopping: asyncio.Event, stats: dict):
        self.cfg = cfg
        self.store = store            # storage.writer.AsyncStore
        self.pipeline = pipeline      # bot.pipeline.Pipeline: its analyzer and detection pool are swapped
        self.models = models          # bot.model_watch.ModelWatcher: rescoring after re-detection
        self.stopping = stopping
        self.stats = stats
        self.tag = own_detector.CONFIG
        self._task: asyncio.Task | None = None
        self._failed: str | None = None
        stats.setdefault("redetected", 0)

    async def start(self, scheduler, tag: str) -> None:
        """``tag``: the detector the daemon started with (own_detector.tag). Checks every 30 s and
        resumes re-detection left by a stop."""
        self.tag = self.pipeline.detector_tag = tag
        scheduler.add_job(self.check, "interval", seconds=CHECK_SECONDS, id="check-detector",
                          max_instances=1, coalesce=True)
        self._start_redetection()

    def running(self) -> list[asyncio.Task]:
        return [self._task] if self._task is not None else []

    # ---- the switch ----------------------------------------------------------------------
    async def check(self) -> bool:
        """Switch to the detector in use if it changed; True when it did."""
        tag = await asyncio.to_thread(own_detector.tag, self.cfg.paths, self.cfg.detector)
        if tag in (self.tag, self._failed) or self.stopping.is_set():
            return False
        dcfg = own_detector.effective_detector(self.cfg.detector, self.cfg.paths)
        try:
            detector = await asyncio.to_thread(make_detector, dcfg, self.cfg.data_path)
        except Exception as e:  # noqa: BLE001 - a bad weights file must not stop the daemon
            log.error("cannot switch the face detector to %s, still detecting with %s: %s", tag, self.tag, e)
            self._failed = tag        # said once; tried again after another switch
            return False
        pool = None if dcfg.name == "yolo" else DetectionPool.from_config(dcfg, self.cfg.data_path)
        old = self.pipeline.detection
        analyzer = self.pipeline.analyzer
        analyzer.detector, analyzer.detector_tag = detector, tag
        self.pipeline.detection = pool
        self.tag = self.pipeline.detector_tag = tag
        self._failed = None
        if old is not None:
            await old.close()          # a batch in flight on it stays downloaded and is detected again
        log.info("face detector switched to %s (%s)%s; detecting the stored pictures again in the background",
                 tag, dcfg.name, f" in {pool.workers} worker process(es)" if pool else "")
        self._start_redetection()
        return True

    def _start_redetection(self) -> None:
        if self._task is not None and not self._task.done():
            return   # it notices the new tag itself and starts over
        self._task = asyncio.create_task(self.redetect(), name="redetect")

    # ---- detecting stored pictures again --------------------------------------------------
    async def redetect(self) -> int:
        """Detect again every stored picture another detector found, until none is left, a stop,
        or another switch (then it goes on for the new detector). Returns how many."""
        done = 0
        try:
            while not self.stopping.is_set():
                tag = self.tag
                done += await self._run(tag)
                if tag == self.tag:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.error("detecting stored pictures again stopped: %s: %s", type(e).__name__, e)
        return done

    async def _run(self, tag: str) -> int:
        total = await self.store.count_redetect_candidates(tag)
        if not total or self.stopping.is_set() or tag != self.tag:
            return 0
        log.info("re-detecting %d stored picture(s) with detector %s in the background", total, tag)
        started = said = time.monotonic()
        done, skipped, seen, after, finished = 0, 0, 0, 0, False
        while not self.stopping.is_set() and tag == self.tag:
            rows = await self.store.redetect_candidates(tag, BATCH, after)
            if not rows:
                finished = True
                break
            after = rows[-1]["id"]
            pictures, kept = [], []
            for row in rows:
                try:
                    im = await asyncio.to_thread(load_media, self.cfg.media_path, row["media_path"],
                                                 max_pixels=self.cfg.download.max_pixels)
                except (OSError, BadImage) as e:
                    log.warning("image %d: not detected again (%s)", row["id"], e)
                    await self.store.mark_redetected(row["id"], tag)
                    skipped += 1
                    continue
                pictures.append(im)
                kept.append(row)
            found = await self._detect(pictures)
            if self.stopping.is_set() or tag != self.tag:
                break   # detected by a pool that is closing or retired: the rows stay to do
            for row, faces in zip(kept, found):
                if isinstance(faces, DetectionFailed):
                    log.warning("image %d: not detected again: %s", row["id"], faces)
                    await self.store.mark_redetected(row["id"], tag)
                    skipped += 1
                    continue
                if await self.store.record_redetection(row["id"], faces, tag):
                    done += 1
                    self.stats["redetected"] += 1
            seen += len(rows)
            if time.monotonic() - said >= PROGRESS_SECONDS:
                said = time.monotonic()
                log.info("re-detecting with detector %s: %d/%d pictures", tag, seen, max(total, seen))
            await self.models.check_model(quiet=True)     # rescore what was detected again (its count: debug)
        seconds = time.monotonic() - started
        if finished:
            log.info("re-detection with detector %s done: %d picture(s) detected again, %d skipped, in %.0f s; "
                     "rescoring them", tag, done, skipped, seconds)
        else:
            log.info("re-detection with detector %s stopped at %d/%d pictures (%s); %s", tag, seen,
                     max(total, seen), "the daemon is stopping" if self.stopping.is_set() else f"now {self.tag}",
                     "the rest resumes after a restart" if self.stopping.is_set() else "starting over")
        return done

    async def _detect(self, pictures) -> list:
        pool = self.pipeline.detection
        if pool is not None:
            return await pool.detect_all(pictures)
        analyzer = self.pipeline.analyzer
        return await asyncio.to_thread(analyzer.detect_many, pictures)   # yolo: one pass
