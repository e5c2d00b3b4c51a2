"""The download → score pipeline: workers that take image ids from the database and move them on.

    feeder --(ids of ``pending`` rows)--> download workers --(rows ``downloaded``)-->
    feeder --(ids of ``downloaded`` rows)--> scoring worker --(rows ``scored``)

Bounded asyncio queues hold only image ids and are refilled from the database by a feeder, so
memory stays bounded, a slow model never blocks polling, and after a crash or stop the work
resumes from the rows' status. Before each download the disk is checked (``bot.disk``: on low
disk the download workers wait, the items stay ``pending``). Downloading and decoding run in worker threads; the scoring
worker takes the ids waiting in its queue as one batch (up to ``scorer.batch_size``), has its
faces found in the detection worker processes (``scorer.detect_pool``: the detector holds the GIL
and would stall the event loop in a thread; the yolo detector, which releases it, runs in the
scoring thread instead), and scores them in a worker thread; then the faces of the batch are identified
(``bot.recognition.Recognition.recognize_pictures``: who is in them, when characters are
named). Every write goes through the single writer thread.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

from bot.config import Config
from scorer.analyze import Analyzer
from bot.memory import trim
from scorer.detect_pool import DetectionFailed, DetectionPool
from sources import SourceError, TransientError
from sources.http import Http, TooLarge, short_url
from storage.media import BadImage, decode_on_device, inspect, load_media, store_media
from storage.records import DOWNLOADED, FAILED, PENDING

log = logging.getLogger("tastefeed.daemon")

ACCEPTED_CONTENT_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
SCORE_TRIES = 3             # a picture whose scoring raised this many times (its own failures) is marked failed
SCORE_RETRY_SECONDS = 30.0  # wait before its next try, doubling with each failure ...
SCORE_RETRY_MAX = 900.0     # ... up to this


async def fetch_bytes(http: Http, row: dict, limit: int) -> bytes:
    """The bytes of a picture row: its ``local_path`` (a folder source) read from disk, else its
    ``media_url`` through the shared client; at most ``limit`` bytes. Raises SourceError,
    BadImage (no URL, not a picture's content type) or OSError (an unreadable file)."""
    if row["local_path"]:
        path = Path(row["local_path"])
        size = path.stat().st_size
        if size > limit:
            raise TooLarge(f"{path.name} is {size} bytes, over the {limit}-byte limit")
        return await asyncio.to_thread(path.read_bytes)
    if not row["media_url"]:
        raise BadImage("the source gave no picture URL")
    resp = await http.get(row["media_url"], headers={"Accept": "image/*"})
    ctype = resp.headers.get("Content-Type", "").lower()
    if ctype and not ctype.startswith(ACCEPTED_CONTENT_TYPES):
        raise BadImage(f"{short_url(row['media_url'])} is {ctype.split(';')[0]}, not a picture")
    return resp.body


class Pipeline:
    def __init__(self, cfg: Config, store, http: Http, stopping: asyncio.Event, stats: dict, *,
                 recognition=None, disk=None):
        self.cfg = cfg
        self.disk = disk                # bot.disk.DiskKeeper (None: no low-disk pause)
        self.recognition = recognition  # bot.recognition.Recognition (None: faces are not identified)
        self.store = store            # storage.writer.AsyncStore
        self.http = http
        self.stopping = stopping
        self.stats = stats
        self.analyzer: Analyzer | None = None
        self.detection: DetectionPool | None = None   # None: the analyzer detects in its thread
        self.detector_tag: str = "config"   # the detector in use (images.detector_version; bot/detector_watch.py)
        self.download_queue: asyncio.Queue[int] = asyncio.Queue(cfg.download.queue_size)
        self.score_queue: asyncio.Queue[int] = asyncio.Queue(cfg.daemon.score_queue_size)
        self._download_wake = asyncio.Event()
        self._score_wake = asyncio.Event()
        self._in_download: set[int] = set()
        self._in_score: set[int] = set()
        self._retry_at: dict[int, float] = {}
        self._score_failures: dict[int, tuple[int, int, int]] = {}   # image id -> (its own failures,
        #                                         failures, stats["scored"] at the last one)
        self._tasks: list[asyncio.Task] = []

    def start(self, analyzer: Analyzer, detection: DetectionPool | None = None) -> None:
        """Start the feeders and workers; they run until ``stopping`` is set."""
        self.analyzer, self.detection = analyzer, detection
        self._tasks = [
            asyncio.create_task(self._feeder(self.download_queue, PENDING, self._in_download,
                                             self._download_wake), name="download-feeder"),
            asyncio.create_task(self._feeder(self.score_queue, DOWNLOADED, self._in_score,
                                             self._score_wake), name="score-feeder"),
            *[asyncio.create_task(self._download_worker(), name=f"download-{i}")
              for i in range(self.cfg.download.workers)],
            asyncio.create_task(self._score_worker(), name="scorer"),
        ]

    def running(self) -> list[asyncio.Task]:
        """The feeders and workers (a stop waits for them to finish their item)."""
        return list(self._tasks)

    def wake_downloads(self) -> None:
        """New ``pending`` rows were stored: look for them now rather than within a second."""
        self._download_wake.set()

    async def _take(self, queue: asyncio.Queue):
        """The next id from ``queue``, or None once a stop is requested."""
        if self.stopping.is_set():
            return None
        getter = asyncio.ensure_future(queue.get())
        stopper = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            stopper.cancel()
            return getter.result()
        getter.cancel()
        return None

    async def _feeder(self, queue: asyncio.Queue, status: str, in_flight: set[int], wake: asyncio.Event):
        while not self.stopping.is_set():
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

    # ---- download ------------------------------------------------------------------------
    async def _download_worker(self) -> None:
        while True:
            image_id = await self._take(self.download_queue)
            if image_id is None:
                return
            try:
                if self.disk is not None and not await self.disk.room_to_download():
                    return  # stopping while the disk was full: the picture stays pending
                await self.download(image_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                log.error("image %d: download step failed: %s: %s", image_id, type(e).__name__, e)
            finally:
                self._in_download.discard(image_id)
                self._download_wake.set()

    async def download(self, image_id: int) -> str:
        row = await self.store.get_image(image_id)
        if row is None or row["status"] != PENDING:
            return "gone"
        where = row["local_path"] or short_url(row["media_url"] or "")
        try:
            data = await fetch_bytes(self.http, row, self.cfg.download.max_bytes)
            info, _ = await asyncio.to_thread(inspect, data, max_pixels=self.cfg.download.max_pixels, picture=False)
            rel = await asyncio.to_thread(store_media, self.cfg.media_path, data, info)
            status, dup_of = await self.store.record_download(
                image_id, info, rel, self.cfg.download.near_duplicate_distance)
        except TransientError as e:
            status = await self.store.mark_failed(image_id, str(e), retry=True)
            if status == PENDING:
                self._retry_at[image_id] = time.monotonic() + 30 * random.uniform(0.8, 1.2)
            log.warning("image %d (%s): %s%s", image_id, where, e, "; will retry" if status == PENDING else "")
            self.stats["failed"] += status == FAILED
            return status
        except (SourceError, BadImage, OSError) as e:
            message = str(e) if not isinstance(e, OSError) else f"cannot read file: {e.strerror or e}"
            await self.store.mark_failed(image_id, message)
            log.warning("image %d (%s): skipped: %s", image_id, where, message)
            self.stats["failed"] += 1
            return FAILED
        self._retry_at.pop(image_id, None)
        self.stats["downloaded"] += 1
        if self.disk is not None:
            self.disk.downloaded(info.bytes)
        if status == DOWNLOADED:
            self._score_wake.set()
        else:
            log.info("image %d (%s): %s of image %d, not scored again", image_id, where,
                     status.replace("_", "-"), dup_of)
        return status

    # ---- score ---------------------------------------------------------------------------
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
                for image_id in batch:
                    self._score_failures.pop(image_id, None)
                    self._retry_at.pop(image_id, None)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                log.error("scoring a batch of %d failed: %s: %s", len(batch), type(e).__name__, e)
                try:
                    await self._after_failure(batch, e)
                except asyncio.CancelledError:
                    raise
                except Exception as e2:  # noqa: BLE001 - the database itself failing, say: tried again later
                    log.error("scoring the batch's pictures one by one failed too: %s: %s", type(e2).__name__, e2)
            finally:
                for image_id in batch:
                    self._in_score.discard(image_id)
                self._score_wake.set()

    async def _after_failure(self, batch: list[int], error: Exception) -> None:
        """A batch whose scoring raised: each picture is scored again alone, so that one bad
        picture cannot hold back the others. One that fails alone is tried again later
        (``SCORE_RETRY_SECONDS``, doubling, at most ``SCORE_RETRY_MAX``), and is marked failed,
        with the reason, once ``SCORE_TRIES`` failures were its own: its first, and each after
        which other pictures were scored meanwhile. A failure every picture shares (the GPU's
        memory taken by a training run, say) therefore only delays them, however long it lasts."""
        for image_id in batch:
            if len(batch) > 1:
                if self.stopping.is_set():
                    return
                try:
                    await self.score([image_id])
                    self._score_failures.pop(image_id, None)
                    self._retry_at.pop(image_id, None)
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001
                    error = e
            own, tries, seen = self._score_failures.get(image_id, (0, 0, -1))
            scored = self.stats["scored"]
            own += own == 0 or scored > seen      # others were scored since its last failure: its own
            tries += 1
            if own >= SCORE_TRIES:
                self._score_failures.pop(image_id, None)
                self._retry_at.pop(image_id, None)
                reason = f"scoring failed {own} times: {type(error).__name__}: {error}"
                await self.store.mark_failed(image_id, reason)
                log.warning("image %d: %s", image_id, reason)
                self.stats["failed"] += 1
            else:
                self._score_failures[image_id] = (own, tries, scored)
                wait = min(SCORE_RETRY_MAX, SCORE_RETRY_SECONDS * 2 ** (tries - 1))
                self._retry_at[image_id] = time.monotonic() + wait

    async def _unreadable(self, image_id: int, e: Exception) -> None:
        await self.store.mark_failed(image_id, f"stored picture unreadable: {e}")
        log.warning("image %d: stored picture unreadable: %s", image_id, e)

    async def _decode_on_device(self, loaded: list[tuple[dict, bytes]], device) -> list[tuple[dict, object]]:
        """(row, bytes) pairs decoded on ``device`` together (``storage.media.decode_on_device``);
        a picture that cannot be is marked failed."""
        decoded = await asyncio.to_thread(decode_on_device, [data for _, data in loaded], device,
                                          max_pixels=self.cfg.download.max_pixels)
        kept = []
        for (row, _), t in zip(loaded, decoded):
            if isinstance(t, BadImage):
                await self._unreadable(row["id"], t)
            else:
                kept.append((row, t))
        return kept

    async def score(self, image_ids: list[int]) -> None:
        """Detect and score a batch: each picture is read, detected and reduced to its face crops
        and a slimmed copy (``Analyzer.prepare``) a few at a time, so the batch never holds every
        full-size picture at once; then all its crops are scored together. Detection runs in the
        detection workers, one picture per worker; without them (yolo) in a thread, several
        pictures in one pass (``Analyzer.detection_batch``: a GPU's batch)."""
        analyzer = self.analyzer
        tag = self.detector_tag   # before detecting: a switch meanwhile leaves the picture to detect again
        pool = self.detection
        stopped = False

        async def load(image_id: int, decode: bool = True):
            """(row, decoded picture; its bytes when not ``decode``), or None: gone, stopping, or
            unreadable (marked failed)."""
            nonlocal stopped
            row = await self.store.get_image(image_id)
            if row is None or row["status"] != DOWNLOADED:
                return None
            if self.stopping.is_set():
                stopped = True           # stopping: it stays downloaded for the next start
                return None
            try:
                if decode:
                    im = await asyncio.to_thread(load_media, self.cfg.media_path, row["media_path"],
                                                 max_pixels=self.cfg.download.max_pixels)
                else:
                    im = await asyncio.to_thread((self.cfg.media_path / row["media_path"]).read_bytes)
            except (OSError, BadImage) as e:
                await self._unreadable(image_id, e)
                return None
            return row, im

        if pool is None:
            results = []
            chunk = max(1, analyzer.detection_batch)
            detector = analyzer.detector      # a switch meanwhile: the batch keeps the detector it started with
            device = detector.decode_device     # yolo on a GPU: decoded there
            for at in range(0, len(image_ids), chunk):
                ids = image_ids[at:at + chunk]
                loaded = await asyncio.gather(*(load(i, device is None) for i in ids), return_exceptions=True)
                results += [r for r in loaded if isinstance(r, BaseException)]
                loaded = [r for r in loaded if r is not None and not isinstance(r, BaseException)]
                if loaded and device is not None:
                    loaded = await self._decode_on_device(loaded, device)
                if loaded:
                    pictures = [im for _, im in loaded]
                    if device is None:
                        found = await asyncio.to_thread(analyzer.detect_many, pictures)
                        prepare = analyzer.prepare
                    else:
                        found = await asyncio.to_thread(analyzer.detect_tensors, pictures, detector)
                        prepare = analyzer.prepare_tensor
                    prepared = await asyncio.to_thread(list, map(prepare, pictures, found))
                    results += [(row, p) for (row, _), p in zip(loaded, prepared)]
                    del pictures, loaded
                if stopped:
                    break
        else:
            reading = asyncio.Semaphore(pool.workers + 1)   # full-size pictures in memory at once

            async def one(image_id: int):
                nonlocal stopped
                async with reading:
                    got = await load(image_id)
                    if got is None:
                        return None
                    row, im = got
                    faces = (await pool.detect_all([im]))[0]
                    if isinstance(faces, DetectionFailed):
                        if self.stopping.is_set() or pool is not self.detection:
                            stopped = True   # its workers were stopped under it (a stop, a detector switch):
                            return None      # the batch stays downloaded
                        await self.store.mark_failed(row["id"], str(faces))
                        log.warning("image %d: %s", row["id"], faces)
                        self.stats["failed"] += 1
                        return None
                    return row, await asyncio.to_thread(analyzer.prepare, im, faces)

            results = await asyncio.gather(*(one(i) for i in image_ids), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:       # every picture's task has ended: the batch fails as one (logged by the caller)
            raise errors[0]
        done = [r for r in results if r is not None]
        if stopped or not done:
            return
        rows = [row for row, _ in done]
        analyses = await asyncio.to_thread(analyzer.analyze_prepared, [p for _, p in done])
        del done
        await asyncio.to_thread(trim)      # the batch's pictures and activations go back (bot/memory.py)
        version = analyzer.scorer.version
        active = await self.store.active_model()
        trained = bool(active and active.get("metrics"))     # untrained scores mean nothing: not logged
        for row, res in zip(rows, analyses):
            if not await self.store.record_analysis(row["id"], res.faces, res.score, res.uncertainty, version,
                                                    skipped=res.skipped, expect=DOWNLOADED,
                                                    features=res.features, detector_version=tag):
                continue  # an import took the picture meanwhile: its analysis stands
            await self.store.name_from_tags(row["id"])  # booru: one character tag, one face -> a weak name
            self.stats["scored"] += 1
            name = row["title"] or row["external_id"]
            if res.skipped:
                log.info("image %d (%s): no face, skipped", row["id"], name)
            else:
                log.info("image %d (%s): %d face(s), %s", row["id"], name, 0 if res.whole else len(res.faces),
                         f"score {res.score:.2f}" if trained else "not trained yet")
        if self.recognition is not None:  # who is in the faces (never raises)
            await self.recognition.recognize_pictures([row["id"] for row in rows])
