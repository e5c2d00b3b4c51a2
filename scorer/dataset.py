"""Training examples from the labels, a stable validation split, and the crop cache.

Each labelled picture gives one example per face (or its largest face, ``train.faces``), with the
picture's latest rating as the target. Whether a picture is used for validation depends only on
a hash of its content, so the split is the same in every run, a picture never moves between the
two sides when new labels arrive, and each rating gets about the same share of validation pictures.

Face crops are decoded from the stored media once, resized to the model's input size and kept as
``.npy`` files under ``<data>/cache/crops-<size>-m<margin>/``; training then works on one uint8
array in memory, so no epoch (and no later run) decodes an original picture again.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scorer.analyze import face_crop
from storage.records import WHOLE, Face
from scorer.model import resize_crop
from storage.media import BadImage, load_media

log = logging.getLogger(__name__)


@dataclass
class Example:
    image_id: int
    sha256: str
    media_path: str
    face: Face
    rating: float
    split: str          # train | val
    face_id: int | None = None   # the stored face's id


def split_of(sha256: str, val_share: float) -> str:
    """'val' for a fixed share of pictures, chosen by their content hash; otherwise 'train'."""
    h = int(hashlib.sha256(f"tastefeed-split:{sha256}".encode()).hexdigest()[:8], 16) / 2 ** 32
    return "val" if h < val_share else "train"


def build_examples(rows: list[dict], *, faces: str = "all", val_share: float = 0.15) -> list[Example]:
    """Examples from :meth:`Store.training_rows`; pictures without a stored face are left out."""
    out = []
    for row in rows:
        if not row["faces"] or not row["media_path"] or not row["sha256"]:
            continue
        chosen = row["faces"]
        if faces == "largest":
            chosen = [max(chosen, key=lambda f: (f["x2"] - f["x1"]) * (f["y2"] - f["y1"]))]
        split = split_of(row["sha256"], val_share)
        for f in chosen:
            face = Face.from_row(f)
            out.append(Example(row["image_id"], row["sha256"], row["media_path"], face,
                               float(row["value"]), split, f.get("id")))
    return out


class CropCache:
    """Resized face crops on disk, one ``.npy`` per (picture, box, margin, size)."""

    def __init__(self, root: str | Path, size: int, margin: float):
        self.size, self.margin = size, margin
        self.dir = Path(root) / f"crops-{size}-m{round(margin * 100)}"
        self.decoded = 0       # pictures decoded by this cache object (the rest came from disk)

    def _path(self, ex: Example) -> Path:
        f = ex.face
        box = "whole" if f.detector in WHOLE else f"{f.x1}-{f.y1}-{f.x2}-{f.y2}"
        return self.dir / ex.sha256[:2] / f"{ex.sha256}-{box}.npy"

    def arrays(self, examples: list[Example], media_root: str | Path, *, max_pixels: int = 90_000_000,
               progress: bool | None = None) -> tuple[np.ndarray, list[Example]]:
        """uint8 crops (N, size, size, 3) of the examples whose picture could be read, and those examples."""
        from tqdm import tqdm

        out: list[np.ndarray | None] = [None] * len(examples)
        missing: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            path = self._path(ex)
            try:
                arr = np.load(path)
                if arr.shape == (self.size, self.size, 3) and arr.dtype == np.uint8:
                    out[i] = arr
                    continue
            except (OSError, ValueError):
                pass
            missing.setdefault(ex.media_path, []).append(i)
        if missing:
            bar = tqdm(missing.items(), desc="caching crops", unit="pic", file=sys.stderr,
                       disable=(not sys.stderr.isatty()) if progress is None else not progress)
            for media_path, indices in bar:
                try:
                    im = load_media(media_root, media_path, max_pixels=max_pixels)
                except (OSError, BadImage) as e:
                    log.warning("training: stored picture %s unreadable, left out: %s", media_path, e)
                    continue
                self.decoded += 1
                for i in indices:
                    arr = resize_crop(face_crop(im, examples[i].face, self.margin), self.size)
                    path = self._path(examples[i])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp.npy")
                    np.save(tmp, arr)
                    tmp.replace(path)
                    out[i] = arr
        kept = [i for i, a in enumerate(out) if a is not None]
        if not kept:
            return np.zeros((0, self.size, self.size, 3), np.uint8), []
        return np.stack([out[i] for i in kept]), [examples[i] for i in kept]
