"""Face detection in worker processes, so that a detector holding the GIL never stalls the daemon.

The animeface C extension holds Python's GIL for its whole call (up to seconds per picture):
run in a thread, it stalls the event loop that serves the gallery and Discord's heartbeats. The
daemon therefore detects in a :class:`DetectionPool`: ``detector.workers`` processes (started with
``spawn``: no copy of the daemon's threads or torch), each building the detector once, that take
a decoded picture and send back its faces. The event loop only awaits the answer.

A worker that dies (killed, crashed in C) breaks the pool: a new one is started and each picture
that was in flight is tried again once, alone, so that one bad picture cannot fail its neighbours;
a picture that kills its worker twice raises :class:`DetectionFailed`, and so does one still
detecting after ``hang_seconds`` (its stuck worker is killed and replaced).

The hard time cap: with ``detector.time_cap`` set, a picture still detecting after
``HARD_CAP_FACTOR`` times it (12 s by default) has its worker killed and replaced and is detected
again at half ``detector.max_side`` (the predictive cap in :class:`scorer.detect.Detector` sends
most slow pictures there before they start); one that runs past the cap at that size too fails.
At most one picture per worker is handed out at a time, so the caps count detection time, not
time spent waiting for a free worker. ``close()`` stops the
workers (terminating one still busy after a short grace), and a worker whose daemon died without
closing it exits by itself within a second: no orphan processes.

``import-labels`` and ``score`` detect in-process (:meth:`scorer.analyze.Analyzer.detect`).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

from PIL import Image

from scorer.detect import Detector, DetectorConfig, make_detector
from storage.records import Face

log = logging.getLogger("tastefeed.daemon")

HANG_SECONDS = 120.0   # no picture takes this long (the slowest measured: ~7 s): its worker is stuck
HARD_CAP_FACTOR = 4.0  # a picture detecting past this many detector.time_cap is retried smaller


class DetectionFailed(Exception):
    """A picture whose detection could not finish; the message says why."""


class _Overran(Exception):
    """A detection ran past its time limit (its worker was killed)."""


class _Bystander(Exception):
    """The pool was stopped on purpose under this picture (another picture overran): not its
    fault, so it is tried again without counting a crash."""


BYSTANDER_RETRIES = 3


def faces_or_whole(faces: list[Face], im: Image.Image, no_face: str) -> list[Face]:
    """The detector's faces, or one whole-picture box when it found none and ``no_face`` is whole."""
    if not faces and no_face == "whole":
        return [Face.whole(im.width, im.height)]
    return faces


def pool_size(workers: int) -> int:
    """``detector.workers``, with 0 meaning half the CPU cores (at least 1): on a 2-core machine
    one process detects while the other core scores and serves."""
    return workers if workers > 0 else max(1, (os.cpu_count() or 2) // 2)


# ---- in the worker process ------------------------------------------------------------------
_detector: Detector | None = None
_no_face = "whole"


def _init(factory: Callable[[], Detector], no_face: str, parent: int) -> None:
    """Build the detector once per worker and watch for the daemon's death."""
    global _detector, _no_face
    _detector, _no_face = factory(), no_face
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_with_parent(parent: int) -> None:
    """Exit when the daemon is gone (killed without closing its pool): never an orphan."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _detect(im: Image.Image, side: int | None = None) -> list[Face]:
    return faces_or_whole(_detector.detect(im, side=side), im, _no_face)


# ---- in the daemon --------------------------------------------------------------------------
class DetectionPool:
    """``workers`` detection processes running ``factory()``'s detector (a picklable callable)."""

    def __init__(self, factory: Callable[[], Detector], no_face: str = "whole", workers: int = 1, *,
                 grace: float = 2.0, hang_seconds: float = HANG_SECONDS, hard_cap: float = 0.0,
                 fallback_side: int = 800):
        self.factory, self.no_face, self.workers, self.grace = factory, no_face, pool_size(workers), grace
        self.hang_seconds = hang_seconds  # a picture still detecting after this is given up on
        self.hard_cap = hard_cap          # 0: none; else past this, detected again at fallback_side
        self.fallback_side = fallback_side
        self.overruns = 0                 # pictures detected again smaller after the hard cap
        self._executor: ProcessPoolExecutor | None = None
        self._slots = asyncio.Semaphore(self.workers)   # one picture per worker at a time
        self._stopped: set[int] = set()   # ids of pools stopped on purpose (an overrun)
        self._retry = asyncio.Lock()    # pictures tried again after a crash go one at a time
        self.restarts = 0               # pools replaced after a worker died
        self.closed = False

    @classmethod
    def from_config(cls, cfg: DetectorConfig, data_dir: str | Path) -> DetectionPool:
        return cls(functools.partial(make_detector, cfg, data_dir), cfg.no_face, cfg.workers,
                   hard_cap=HARD_CAP_FACTOR * cfg.time_cap, fallback_side=max(1, cfg.max_side // 2))

    def _pool(self) -> ProcessPoolExecutor:
        if self.closed:
            raise DetectionFailed("the daemon is stopping")
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init,
                                                 initargs=(self.factory, self.no_face, os.getpid()))
        return self._executor

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self._executor is broken:
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            self.restarts += 1
            log.warning("a face detection worker died; starting a new one")

    async def _once(self, im: Image.Image, side: int | None = None, limit: float | None = None) -> list[Face]:
        async with self._slots:
            pool = self._pool()
            limit = limit or self.hang_seconds
            try:
                return await asyncio.wait_for(asyncio.wrap_future(pool.submit(_detect, im, side)), limit)
            except BrokenProcessPool:
                if id(pool) in self._stopped:
                    raise _Bystander() from None
                self._replace(pool)
                raise
            except asyncio.TimeoutError:
                # A worker stuck on this picture would hold it for good: stop the pool's workers
                # (ProcessPoolExecutor cannot stop one of them). Pictures in flight on the others
                # are bystanders: tried again, not counted as crashing.
                self._stopped.add(id(pool))
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.kill()
                self._replace(pool)
                raise _Overran(limit) from None

    async def detect(self, im: Image.Image) -> list[Face]:
        """The picture's faces (whole-picture box per ``no_face``); DetectionFailed when its
        worker died on it twice, it ran past the time limits, or the pool is closed."""
        try:
            return await self._past_bystanders(im)
        except (BrokenProcessPool, _Bystander):
            pass
        async with self._retry:
            try:
                return await self._past_bystanders(im)
            except BrokenProcessPool:
                raise DetectionFailed("face detection crashed on this picture twice (its worker process "
                                      "died); not tried again") from None
            except _Bystander:
                raise DetectionFailed("face detection was stopped under this picture again and again (other "
                                      "pictures ran past the time cap); not tried again") from None

    async def _past_bystanders(self, im: Image.Image) -> list[Face]:
        """:meth:`_capped`, tried again each time the pool is stopped under the picture for
        another one (up to BYSTANDER_RETRIES times, then _Bystander)."""
        for _ in range(BYSTANDER_RETRIES - 1):
            try:
                return await self._capped(im)
            except _Bystander:
                continue
        return await self._capped(im)

    async def _capped(self, im: Image.Image) -> list[Face]:
        if not self.hard_cap or self.hard_cap >= self.hang_seconds:
            try:
                return await self._once(im)
            except _Overran:
                raise DetectionFailed(f"face detection ran past {self.hang_seconds:g} s on this picture; "
                                      "not tried again") from None
        try:
            return await self._once(im, limit=self.hard_cap)
        except _Overran:
            self.overruns += 1
            log.info("face detection ran past %g s (%g x detector.time_cap) on a %dx%d picture: its worker "
                     "was replaced; detecting it again at %d px", self.hard_cap, HARD_CAP_FACTOR, im.width,
                     im.height, self.fallback_side)
        try:
            return await self._once(im, side=self.fallback_side, limit=self.hard_cap)
        except _Overran:
            raise DetectionFailed(f"face detection ran past {self.hard_cap:g} s on this picture, at full and "
                                  f"at half size ({self.fallback_side} px); not tried again") from None
        # (a _Bystander here goes up to detect(), which tries the picture again from the start)

    async def detect_all(self, pictures: list[Image.Image]) -> list[list[Face] | DetectionFailed]:
        """Each picture's faces, detected in parallel; a DetectionFailed in place of a picture's
        faces when it failed."""
        async def one(im):
            try:
                return await self.detect(im)
            except DetectionFailed as e:
                return e
        return list(await asyncio.gather(*(one(im) for im in pictures)))

    def pids(self) -> list[int]:
        """The worker processes' ids (none before the first picture)."""
        procs = getattr(self._executor, "_processes", None) or {}
        return [p.pid for p in list(procs.values())]

    async def close(self) -> None:
        """Stop the workers: pictures not started are dropped, a worker still busy after
        ``grace`` seconds is terminated."""
        self.closed = True
        pool, self._executor = self._executor, None
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(_reap, procs, self.grace)


def _reap(procs, grace: float) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2)
        if p.is_alive():
            p.kill()
            p.join(2)
