"""Who is in the faces the daemon stores: recognition in the scoring stage, and stored faces
identified again in the background whenever the active identity embedder or the names change.

:class:`Recognition` keeps the active identity embedder (``scorer.characters``) and a recognizer
built from the enrolled (named) faces. It is off, costing nothing, until some face is named. Its
recognizer is rebuilt when it is stale, a cheap check made for every scored batch, every 30 s and
right after ``/name`` or naming in the gallery (names from tags and imports are taken in within
``REBUILD_SECONDS``, so a stream of them does not rebuild it for every batch): the active embedder changed (``characters train`` promoted one,
``characters use`` rolled back) or the names did (``characters add``/``import``, the gallery,
Discord's ``/name``, booru weak labels: their count or newest time, ``Store.enrolment_stamp``).
A rebuild first embeds the named faces the embedder has not embedded yet, so the recognizer
knows every name, then starts the background run (:func:`scorer.characters.identify_stored`):
every stored, unnamed face without a result of this embedder newer than the newest name is
embedded where needed (after a promotion, all of them) and identified, in batches, named faces
first. Each batch is stored as it is done, so a stop or crash only pauses it; a later change
ends the run and starts the next. New names (booru weak labels can bring one per scored post)
make the stored results stale at most once every ``NAMES_REFRESH_SECONDS`` (10 minutes) for one
embedder, unless the owner named or unnamed a face: in between, new faces are identified with the newest names and the stored ones wait
for the next refresh, so a stream of names never rewrites every stored result again and again.
A new embedder is used on every stored face at once. Embedding and identifying run in worker threads, every write
on the daemon's writer thread; a failure logs one line and never stops scoring.
"""
from __future__ import annotations

import asyncio
import logging
import time

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bot.config import Config
from scorer.characters import (embed_stored, ensure_active_embedder, identify_stored, load_embedder,
                               recognize_faces, untrained, with_threshold)
from scorer.identity import Embedder, Recognizer

log = logging.getLogger("tastefeed.daemon")


class Recognition:
    CHECK_SECONDS = 30
    NAMES_REFRESH_SECONDS = 600   # stored faces are identified again for new names at most this often
    REBUILD_SECONDS = 60          # the recognizer takes in names from tags and imports at most this often

    def __init__(self, cfg: Config, store, stopping: asyncio.Event, stats: dict):
        self.cfg = cfg
        self.icfg = cfg.characters
        self.store = store            # storage.writer.AsyncStore
        self.stopping = stopping
        self.stats = stats
        self.embedder: Embedder | None = None
        self.recognizer: Recognizer | None = None
        self.key: tuple | None = None  # (embedder version, threshold, enrolment stamp) of the recognizer
        self._refresh = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._last_error: str | None = None
        self._refreshed: tuple[str, str, float] | None = None  # (embedder version, names stamp, when)
        self._built_at = 0.0          # time.monotonic() of the last rebuild
        self._force = False           # the owner named or unnamed a face: use it now

    async def start(self, scheduler: AsyncIOScheduler) -> None:
        """Check every 30 s, and once now (a run left unfinished by a stop resumes)."""
        scheduler.add_job(self.check, "interval", seconds=self.CHECK_SECONDS, id="check-identity",
                          max_instances=1, coalesce=True)
        await self.check()

    def running(self) -> list[asyncio.Task]:
        """Background work a stop waits for (identifying stored faces)."""
        return [self._task] if self._task is not None else []

    # ---- keeping the recognizer current ----------------------------------------------------
    async def current(self) -> bool:
        """Bring the embedder and recognizer up to date; False while no named face is enrolled
        (recognition is off)."""
        stamp = await self.store.enrolment_stamp()
        if not stamp[0]:
            self.recognizer, self.key = None, None
            return False
        row = await self.store.call(ensure_active_embedder, self.icfg, self.cfg.models_path)
        key = (row["version"], row["threshold"], tuple(stamp))
        if key == self.key or (not self._force and self.key is not None and key[:2] == self.key[:2]
                               and time.monotonic() - self._built_at < self.REBUILD_SECONDS):
            return len(self.recognizer) > 0   # new names only (booru tags): taken in within a minute
        async with self._refresh:
            if key == self.key:
                return len(self.recognizer) > 0
            if self._force:
                self._force, self._refreshed = False, None   # the owner's change: stored faces at once
            if self.embedder is None or self.embedder.version != row["version"]:
                self.embedder = await asyncio.to_thread(load_embedder, row, self.icfg, self.cfg.models_path)
                log.info("characters: recognising with identity embedder %s", row["version"])
            await embed_stored(self.store, self.embedder, await self.store.named_faces(), self.cfg.media_path,
                               margin=self.cfg.detector.margin, max_pixels=self.cfg.download.max_pixels)
            rec = await self.store.call(Recognizer.from_store, row["version"], k=self.icfg.k, nearest=untrained(row))
            self.recognizer = await asyncio.to_thread(with_threshold, rec, row, self.icfg)
            self.key, self._built_at = key, time.monotonic()
            log.info("characters: %d named face(s) of %d character(s) enrolled; unknown below similarity %.3f",
                     len(rec), len(rec.characters), self.recognizer.threshold)
        if not len(self.recognizer):
            return False
        self._start_catch_up()
        return True

    async def check(self) -> None:
        """The scheduled check: refresh if stale, and identify stored faces left to do."""
        try:
            if await self.current():
                self._start_catch_up()
            self._ok()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - recognition never stops the daemon
            self._failed("checking the identity embedder", e)

    async def names_changed(self) -> None:
        """The owner just named a face (``/name``): embed it and use it now, for stored faces
        too; raises what went wrong."""
        self._force = True
        await self.current()

    async def owner_changed_names(self) -> None:
        """The owner named or unnamed a face in the gallery: as :meth:`names_changed`, but a
        failure is logged (once), never raised."""
        self._force = True
        await self.check()

    # ---- the scoring stage -------------------------------------------------------------------
    async def recognize_pictures(self, image_ids: list[int]) -> dict[int, tuple[int | None, float]]:
        """Identify the faces of pictures just scored (face id -> (character id, similarity)); a
        failure logs one line and returns nothing."""
        try:
            if not image_ids or not await self.current():
                return {}
            embedder, recognizer = self.embedder, self.recognizer
            faces = await self.store.faces_of_pictures(image_ids)
            results = await recognize_faces(self.store, embedder, recognizer, faces, self.cfg.media_path,
                                            margin=self.cfg.detector.margin, max_pixels=self.cfg.download.max_pixels)
            self.stats["identified"] = self.stats.get("identified", 0) + len(results)
            known = [cid for cid, _ in results.values() if cid is not None]
            if known:
                names = await self.store.character_names()
                log.info("characters: %d of %d face(s) recognised: %s", len(known), len(results),
                         ", ".join(sorted({names.get(c, "?") for c in known})))
            self._ok()
            return results
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - scoring goes on without recognition
            self._failed("recognising the faces of a scored batch", e)
            return {}

    # ---- the background run -------------------------------------------------------------------
    def _start_catch_up(self) -> None:
        if self.stopping.is_set() or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.create_task(self.catch_up(), name="identify-stored")

    async def catch_up(self) -> int:
        """Identify every stored face left to do with the current recognizer, in batches, until
        none is left; a newer recognizer ends the run and starts the next."""
        total = 0
        while not self.stopping.is_set() and self.recognizer is not None and len(self.recognizer):
            key = self.key
            try:
                total += await self._identify_stored(key, self.embedder, self.recognizer)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self._failed("identifying stored faces", e)
                break
            if self.key == key:
                break
        return total

    def _stale_before(self, key: tuple) -> str:
        """The names stamp before which stored results count as stale: the current one when the
        embedder changed or the last refresh is ``NAMES_REFRESH_SECONDS`` old, else the last one."""
        version, stamp, now = key[0], key[2][1], time.monotonic()
        last = self._refreshed
        if last is None or last[0] != version or (last[1] != stamp and now - last[2] >= self.NAMES_REFRESH_SECONDS):
            self._refreshed = last = (version, stamp, now)
        return last[1]

    async def _identify_stored(self, key: tuple, embedder: Embedder, recognizer: Recognizer) -> int:
        def saved(n: int) -> None:
            self.stats["identified"] = self.stats.get("identified", 0) + n

        since = self._stale_before(key)
        done = await identify_stored(self.store, embedder, recognizer, since=since, media_root=self.cfg.media_path,
                                     margin=self.cfg.detector.margin, max_pixels=self.cfg.download.max_pixels,
                                     batch_size=self.icfg.batch_size, on_batch=saved,
                                     should_stop=lambda: self.stopping.is_set() or self.key != key)
        if done:
            log.info("characters: identified %d stored face(s) with %s", done, embedder.version)
        return done

    # ---- one line per problem ---------------------------------------------------------------
    def _failed(self, what: str, e: Exception) -> None:
        problem = f"{type(e).__name__}: {e}"
        if problem != self._last_error:   # a lasting problem (a missing model file) is said once
            log.error("characters: %s failed: %s; scoring goes on without recognition", what, problem)
        self._last_error = problem

    def _ok(self) -> None:
        if self._last_error is not None:
            log.info("characters: recognition works again")
        self._last_error = None
