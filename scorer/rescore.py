"""Rescoring stored pictures with a newly promoted model.

Pictures keep the faces found when they arrived; only the crops are scored again (no detection),
in batches, oldest first. Pictures already posted keep the score they were posted with. The
daemon runs this in the background after a promotion (``Daemon.rescore``); ``main.py rescore``
runs it in the foreground.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from scorer.analyze import aggregate, face_crop
from scorer.detect import Face
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
            face = Face(f["x1"], f["y1"], f["x2"], f["y2"], f["confidence"], f["detector"])
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


def rescore_all(store, scorer, media_root: str | Path, *, margin: float, how: str = "max",
                max_pixels: int = 90_000_000, batch_size: int = 64, progress: bool | None = None) -> int:
    """Rescore every unposted scored picture not yet scored by ``scorer`` (sync Store)."""
    from tqdm import tqdm

    total = store.count_rescore_candidates(scorer.version)
    bar = tqdm(total=total, desc="rescoring", unit="pic", file=sys.stderr,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    done, after = 0, 0
    while True:
        rows = store.rescore_candidates(scorer.version, batch_size, after)
        if not rows:
            break
        after = rows[-1]["id"]
        results = score_stored(scorer, media_root, rows, store.faces_for([r["id"] for r in rows]),
                               margin=margin, how=how, max_pixels=max_pixels)
        for r in results:
            store.record_rescore(r.image_id, r.face_scores, r.score, r.uncertainty, scorer.version)
        done += len(results)
        bar.update(len(rows))
    bar.close()
    return done
