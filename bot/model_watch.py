"""The model watcher: switch to a newly active model, rescore, and start retraining when due.

Every 30 s :class:`ModelWatcher` compares the registry's active model with the one scoring now;
a promotion (a finished training run) or ``models use`` (from the CLI, the gallery) makes it load
the new model (in a worker thread) and swap it into the analyzer, then rescore the unposted
pictures in the background (``scorer.rescore.rescore_all``; a later switch ends that run early).

Retraining runs in a child process (:class:`bot.retrain.Retrainer`), one run at a time: on the
``train.schedule`` crontab, once ``train.after_new_labels`` labels arrived since the last trained
model (a failed run makes that trigger wait an hour), or when asked (Discord's ``/train``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from bot.config import Config
from bot.retrain import Retrainer
from scorer.analyze import Analyzer
from scorer.registry import load_scorer
from scorer.rescore import rescore_all

log = logging.getLogger("tastefeed.daemon")


class ModelWatcher:
    def __init__(self, cfg: Config, store, scheduler: AsyncIOScheduler, stopping: asyncio.Event, stats: dict):
        self.cfg = cfg
        self.store = store            # storage.writer.AsyncStore
        self.scheduler = scheduler
        self.stopping = stopping
        self.stats = stats
        self.analyzer: Analyzer | None = None
        self.retrainer = Retrainer(cfg)
        self._rescore_task: asyncio.Task | None = None
        self._retrain_not_before = 0.0
        self._retired_for: str | None = None   # the model whose sources the cache was last trimmed to

    async def start(self, analyzer: Analyzer) -> None:
        """Schedule the model check and the retraining triggers, then check once now."""
        self.analyzer = analyzer
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

    def running(self) -> list[asyncio.Task]:
        """Background work a stop waits for (a rescoring run)."""
        return [self._rescore_task] if self._rescore_task is not None else []

    async def stop(self) -> None:
        await self.retrainer.stop()

    # ---- retraining ------------------------------------------------------------------------
    async def retrain(self, reason: str) -> bool:
        """Start a training run in a child process (not if one is going or we are stopping)."""
        if self.stopping.is_set():
            return False
        return self.retrainer.start(reason, on_done=self._retrained)

    async def _retrained(self, code: int) -> None:
        if code != 0:
            self._retrain_not_before = time.monotonic() + 3600  # label-triggered runs wait an hour
        elif not self.stopping.is_set():
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

    # ---- switching and rescoring -----------------------------------------------------------
    async def check_model(self, *, quiet: bool = False) -> None:
        """Switch to the active model if it changed (a promotion or `models use`), then rescore;
        ``quiet``: the rescore's count goes to the debug log (re-detection calls this after each
        few pictures and says how far it is itself)."""
        try:
            row = await self.store.active_model()
        except Exception as e:  # noqa: BLE001
            log.error("cannot read the active model: %s", e)
            return
        if row is None or self.analyzer is None:
            return
        if row["version"] != self.analyzer.scorer.version:
            try:
                scorer = await asyncio.to_thread(load_scorer, row, self.cfg.scorer, self.cfg.models_path,
                                                 margin=self.cfg.detector.margin)
            except Exception as e:  # noqa: BLE001 - a bad file must not stop the daemon
                log.error("cannot load the active model %s, still scoring with %s: %s", row["version"],
                          self.analyzer.scorer.version, e)
                return
            self.analyzer.scorer = scorer
            log.info("now scoring with model %s", scorer.version)
            quiet = False     # a switch: its rescore of every unposted picture is said at info
        if self._retired_for != self.analyzer.scorer.version:
            await self.retire_features()
        if self._rescore_task is None or self._rescore_task.done():
            self._rescore_task = asyncio.create_task(self.rescore(quiet=quiet), name="rescore")

    async def retire_features(self) -> None:
        """Drop cached vectors the current model's extractor no longer computes (a replaced
        network's scores, a changed backbone's features), so the cache does not grow with every
        full training run."""
        scorer = self.analyzer.scorer
        try:
            gone = await self.store.retire_feature_sources(set(scorer.extractor.sources.values()))
        except Exception as e:  # noqa: BLE001
            log.error("cannot drop retired cached features: %s", e)
            return
        self._retired_for = scorer.version
        if gone:
            log.info("dropped cached features of retired models: %s",
                     ", ".join(f"{source} ({n})" for source, n in sorted(gone.items())))

    async def rescore(self, *, quiet: bool = False) -> int:
        """Rescore unposted pictures with the current model, in batches, until none is left."""
        scorer = self.analyzer.scorer
        done = 0

        def saved(n: int) -> None:
            nonlocal done
            done += n
            self.stats["rescored"] += n

        try:
            await rescore_all(self.store, scorer, media_root=self.cfg.media_path, margin=self.cfg.detector.margin,
                              how=self.cfg.scorer.aggregate, max_pixels=self.cfg.download.max_pixels,
                              batch_size=self.cfg.scorer.batch_size, on_batch=saved,
                              should_stop=lambda: self.stopping.is_set() or self.analyzer.scorer is not scorer)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.error("rescoring stopped: %s: %s", type(e).__name__, e)
        if done:
            log.log(logging.DEBUG if quiet else logging.INFO, "rescored %d picture(s) with model %s",
                    done, scorer.version)
        return done
