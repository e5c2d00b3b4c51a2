"""Rescoring stored pictures with a newly promoted model.

Pictures keep the faces found when they arrived; only the crops are scored again (no detection),
in batches, oldest first. Pictures already posted keep the score they were posted with. One
loop, :func:`rescore_all`, serves both callers: the daemon runs it in the background after a
promotion (``bot.model_watch.ModelWatcher.rescore``), ``main.py rescore`` in the foreground with
a progress bar. It takes an async store (``storage.writer.AsyncStore``), so every write happens
on the single writer thread, while the scoring itself runs in a worker thread.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scorer.analyze import aggregate, face_crop
from storage.records import Face
from storage.media import BadImage, load_media

log = logging.getLogger(__name__)


@dataclass
class Rescored:
    image_id: int
    face_scores: dict[int, tuple[float, float | None]]
    score: float
    uncertainty: float | None
    features: dict[int, dict] = field(default_factory=dict)   # vectors computed on the way, to store


def score_stored(scorer, media_root: str | Path, rows: list[dict], faces: dict[int, list[dict]], *,
                 margin: float, how: str = "max", max_pixels: int = 90_000_000,
                 cached: dict[int, dict] | None = None) -> list[Rescored]:
    """New scores for stored pictures (``rows`` with id and media_path) from their stored faces:
    from the faces' ``cached`` vectors (face id -> {source: vector}) where they hold what the
    scorer needs, else from the picture (decoded once; every vector the daemon caches is then
    computed and returned in :attr:`Rescored.features`)."""
    cached = cached or {}
    need = scorer.needed_sources()
    vectors: dict[int, dict] = {}
    owners: list[tuple[int, int]] = []
    computed: dict[int, dict[int, dict]] = {}
    for row in rows:
        stored = faces.get(row["id"]) or []
        if not stored:
            continue
        if all(need <= set(cached.get(f["id"], {})) for f in stored):
            for f in stored:
                vectors[f["id"]] = cached[f["id"]]
                owners.append((row["id"], f["id"]))
            continue
        try:
            im = load_media(media_root, row["media_path"], max_pixels=max_pixels)
        except (OSError, BadImage) as e:
            log.warning("image %d: stored picture unreadable, not rescored: %s", row["id"], e)
            continue
        crops = [face_crop(im, Face.from_row(f), margin) for f in stored]
        new = scorer.features(crops, [im] * len(crops))
        for f, v in zip(stored, new):
            vectors[f["id"]] = {**cached.get(f["id"], {}), **v}
            computed.setdefault(row["id"], {})[f["id"]] = v
            owners.append((row["id"], f["id"]))
    if not owners:
        return []
    scores, spreads = scorer.predict_features([vectors[fid] for _, fid in owners])
    per: dict[int, dict[int, tuple[float, float | None]]] = {}
    for (image_id, face_id), s, u in zip(owners, scores, spreads):
        per.setdefault(image_id, {})[face_id] = (s, u)
    out = []
    for image_id, fs in per.items():
        score, unc = aggregate(list(fs.values()), how)
        out.append(Rescored(image_id, fs, score, unc, computed.get(image_id, {})))
    return out


async def rescore_all(store, scorer, *, media_root: str | Path, margin: float, how: str, max_pixels: int,
                      batch_size: int, should_stop: Callable[[], bool] = lambda: False,
                      progress: bool | None = False, on_batch: Callable[[int], None] | None = None) -> int:
    """Rescore every unposted scored picture not yet scored by ``scorer``; returns how many.

    ``store`` is an async store (``storage.writer.AsyncStore``). Batches are scored until none is
    left or ``should_stop()`` is true: from cached features where the faces have them (a head
    refit rescores thousands of pictures in seconds), else from the pictures (``batch_size`` at a
    time). ``on_batch(n)`` hears each batch's count once it is saved. ``progress``: a progress bar
    on stderr (None: only on a terminal).
    """
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    total = await store.count_rescore_candidates(scorer.version) if show else None
    bar = tqdm(total=total, desc="rescoring", unit="pic", file=sys.stderr, disable=not show)
    done, after = 0, 0
    need = scorer.needed_sources()
    try:
        while not should_stop():
            rows = await store.rescore_candidates(scorer.version, max(batch_size, CACHED_BATCH), after)
            if not rows:
                break
            faces = await store.faces_for([r["id"] for r in rows])
            cached = await store.face_features([f["id"] for fs in faces.values() for f in fs],
                                               set(scorer.extractor.sources.values()) | need)
            # a batch of pictures whose faces all have the vectors is scored at once; a batch with
            # pictures to decode is cut to batch_size (score_stored takes each picture either way)
            if not all(need <= set(cached.get(f["id"], {})) for r in rows for f in faces[r["id"]]):
                rows = rows[:batch_size]
            after = rows[-1]["id"]
            results = await asyncio.to_thread(score_stored, scorer, media_root, rows, faces, margin=margin,
                                              how=how, max_pixels=max_pixels, cached=cached)
            await store.record_rescores(results, scorer.version)
            done += len(results)
            if on_batch is not None:
                on_batch(len(results))
            bar.update(len(rows))
    finally:
        bar.close()
    return done


CACHED_BATCH = 256     # pictures rescored at once from cached features
