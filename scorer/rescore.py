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
from dataclasses import dataclass
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


def score_stored(scorer, media_root: str | Path, rows: list[dict], faces: dict[int, list[dict]], *,
                 margin: float, how: str = "max", max_pixels: int = 90_000_000) -> list[Rescored]:
    """New scores for stored pictures (``rows`` with id and media_path) from their stored faces."""
    crops, owners = [], []
    for row in rows:
        stored = faces.get(row["id"]) or []
        if not stored:
            continue
        try:
            im = load_media(media_root, row["media_path"], max_pixels=max_pixels)
        except (OSError, BadImage) as e:
            log.warning("image %d: stored picture unreadable, not rescored: %s", row["id"], e)
            continue
        for f in stored:
            face = Face.from_row(f)
            crops.append(face_crop(im, face, margin))
            owners.append((row["id"], f["id"]))
    if not crops:
        return []
    scores, spreads = scorer.predict(crops)
    per: dict[int, dict[int, tuple[float, float | None]]] = {}
    for (image_id, face_id), s, u in zip(owners, scores, spreads):
        per.setdefault(image_id, {})[face_id] = (s, u)
    out = []
    for image_id, fs in per.items():
        score, unc = aggregate(list(fs.values()), how)
        out.append(Rescored(image_id, fs, score, unc))
    return out


async def rescore_all(store, scorer, *, media_root: str | Path, margin: float, how: str, max_pixels: int,
                      batch_size: int, should_stop: Callable[[], bool] = lambda: False,
                      progress: bool | None = False, on_batch: Callable[[int], None] | None = None) -> int:
    """Rescore every unposted scored picture not yet scored by ``scorer``; returns how many.

    ``store`` is an async store (``storage.writer.AsyncStore``). Batches of ``batch_size`` are
    scored until none is left or ``should_stop()`` is true; ``on_batch(n)`` hears each batch's
    count once it is saved. ``progress``: a progress bar on stderr (None: only on a terminal).
    """
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    total = await store.count_rescore_candidates(scorer.version) if show else None
    bar = tqdm(total=total, desc="rescoring", unit="pic", file=sys.stderr, disable=not show)
    done, after = 0, 0
    try:
        while not should_stop():
            rows = await store.rescore_candidates(scorer.version, batch_size, after)
            if not rows:
                break
            after = rows[-1]["id"]
            faces = await store.faces_for([r["id"] for r in rows])
            results = await asyncio.to_thread(score_stored, scorer, media_root, rows, faces, margin=margin,
                                              how=how, max_pixels=max_pixels)
            for r in results:
                await store.record_rescore(r.image_id, r.face_scores, r.score, r.uncertainty, scorer.version)
            done += len(results)
            if on_batch is not None:
                on_batch(len(results))
            bar.update(len(rows))
    finally:
        bar.close()
    return done
