"""Learning from each reaction within a minute: the taste head refits inside the daemon.

Every few seconds :class:`Learner` counts the owner's new labels and comparisons since the last
refit. After ``train.refit_after`` of them (default 5), or ``train.refit_delay`` seconds after the
newest one (default 30), it fits a new taste head on the cached features of every labelled face
(``scorer.train.train_from_store`` without ``full``: seconds, no picture decoded once the features
are cached, no child process) in a worker thread with its own database connection. The new head
goes through the same promotion check as a full training run (never worse on the fixed
validation split); when it is promoted, the model watcher switches to it at once and rescores
the unposted pictures from their cached features, so the next pick reflects the reaction.

A model whose taste head was set aside at load (fitted on features the configuration no longer
computes: ``detector.margin`` or the feature backbone changed) gets a refit at once, without
waiting for a new label, so the daemon does not score with the network alone until the next
rating.

A refit waits while a full training run holds ``train.lock`` (it takes its turn after). A kill
at any point loses nothing: the model file is written under a temporary name and registered in
one transaction, after which the model is complete.
"""
from __future__ import annotations

import asyncio
import logging
import time

from bot.config import Config

log = logging.getLogger("tastefeed.learning")

CHECK_SECONDS = 5
RETRY_SECONDS = 300   # after a refit failed unexpectedly


class Learner:
    def __init__(self, cfg: Config, store, models, stopping: asyncio.Event, stats: dict):
        self.cfg = cfg
        self.store = store            # storage.writer.AsyncStore
        self.models = models          # bot.model_watch.ModelWatcher
        self.stopping = stopping
        self.stats = stats
        self.mark: str | None = None  # created_at of the newest label or comparison the last refit saw
        self.last: dict | None = None  # the last refit's outcome, for /stats and the Model page
        self._task: asyncio.Task | None = None
        self._failed_at = 0.0
        self._left_out_tried: str | None = None   # the model whose left-out head a refit was started for
        self._left_out_said: str | None = None
        stats.setdefault("refits", 0)

    async def start(self, scheduler) -> None:
        if not self.cfg.train.refit:
            log.info("taste head refits: off (train.refit = false)")
            return
        self.mark = await self.store.get_setting(MARK)
        scheduler.add_job(self.check, "interval", seconds=CHECK_SECONDS, id="refit-head", max_instances=1,
                          coalesce=True)

    def running(self) -> list[asyncio.Task]:
        return [self._task] if self._task is not None else []

    async def check(self) -> bool:
        """Start a refit when enough new labels arrived, or the newest is old enough; True if started."""
        if self.stopping.is_set() or (self._task is not None and not self._task.done()):
            return False
        if self.models.retrainer.running or time.monotonic() < self._failed_at + RETRY_SECONDS:
            return False
        try:
            new, newest = await self.store.call(new_feedback, self.mark)
        except Exception as e:  # noqa: BLE001
            log.error("cannot count new labels: %s", e)
            return False
        scorer = getattr(self.models.analyzer, "scorer", None)
        left_out = bool(getattr(scorer, "head_left_out", None)) and scorer.version != self._left_out_tried
        if left_out:     # its head was fitted on features this configuration no longer computes
            self._left_out_tried = scorer.version      # (detector.margin, the backbone): once per model
            if self._left_out_said != scorer.version:  # said once, not at every wait for a training run
                self._left_out_said = scorer.version
                log.info("model %s: its taste head is left out (fitted on %s): refitting it on the labels so far",
                         scorer.version, ", ".join(scorer.head_left_out))
            self._task = asyncio.create_task(self.refit(newest or self.mark, new), name="refit-head")
            return True
        if not new:
            return False
        age = _age_seconds(newest)
        if new < self.cfg.train.refit_after and age < self.cfg.train.refit_delay:
            return False
        self._task = asyncio.create_task(self.refit(newest, new), name="refit-head")
        return True

    async def refit(self, newest: str, new: int) -> dict | None:
        """Fit a new head now (in a worker thread); switch to it when it is promoted."""
        started = time.monotonic()
        log.info("refitting the taste head: %d new label(s) or comparison(s)", new)
        try:
            outcome = await asyncio.to_thread(refit_head, self.cfg)
        except Exception as e:  # noqa: BLE001 - a failed refit leaves the active model in use
            from scorer.train import TrainError

            if isinstance(e, TrainError):
                log.info("taste head not refitted: %s", e)
                self.mark = newest   # e.g. too few labels: wait for the next one
                await self.store.set_setting(MARK, newest)
            else:                    # the same labels are tried again after a pause
                log.error("taste head refit failed: %s: %s (retrying in %d s)", type(e).__name__, e, RETRY_SECONDS)
                self._failed_at = time.monotonic()
                self._left_out_tried = None   # a left-out head too
            return None
        if outcome is None:      # a training run holds the lock: try again at the next check
            self._left_out_tried = None       # (a left-out head too, not only at the next rating)
            return None
        self.mark = newest
        await self.store.set_setting(MARK, newest)
        self.stats["refits"] += 1
        self.last = {"version": outcome.version, "promoted": outcome.promoted, "reason": outcome.reason,
                     "pearson": outcome.metrics.get("pearson"), "seconds": round(time.monotonic() - started, 2)}
        log.info("taste head %s in %.1fs: %s", outcome.version, self.last["seconds"], outcome.reason)
        if outcome.promoted and not self.stopping.is_set():
            await self.models.check_model()
        return self.last


MARK = "head_refit_mark"


def new_feedback(store, since: str | None) -> tuple[int, str | None]:
    """(labels and comparisons given or taken back after ``since``, the newest such time)."""
    since = since or ""
    n, newest = 0, None
    for table in ("labels", "comparisons"):
        for column in ("created_at", "removed_at"):
            m, last = store.db.execute(f"SELECT COUNT(*), MAX({column}) FROM {table} WHERE {column} > ?",
                                       [since]).fetchone()
            n += m
            newest = max(filter(None, [newest, last]), default=None)
    return n, newest


def _age_seconds(stamp: str | None) -> float:
    from datetime import datetime, timezone

    if not stamp:
        return 0.0
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(stamp)).total_seconds()
    except ValueError:
        return 0.0


def refit_head(cfg: Config):
    """One head refit with its own database connection (runs in a worker thread)."""
    from scorer.train import TrainError, train_from_store, train_lock
    from storage import Store

    with Store.open(cfg.db_path) as store:
        try:
            lock = train_lock(cfg.data_path)
            lock.__enter__()
        except TrainError as e:
            log.info("taste head refit waits: %s", e)
            return None
        try:
            return train_from_store(store, cfg.paths, cfg.scorer, cfg.train, margin=cfg.detector.margin,
                                    max_pixels=cfg.download.max_pixels, icfg=cfg.characters, progress=False,
                                    keep=False)
        finally:
            lock.__exit__(None, None, None)
