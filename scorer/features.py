"""The taste head's inputs, computed once per face and cached in the database.

For each face the :class:`FeatureExtractor` computes these *blocks* (the name the head knows a
block by, then the *source* it is cached under, see ``storage/features.py``):

    backbone   ``<backbone version>``         the frozen feature backbone's features of the crop
    whole      ``whole:<backbone version>``   the same backbone's features of the whole picture,
                                              downscaled (hair, clothes, background; off with
                                              ``scorer.whole = false``)
    colour     ``colour``                     the crop's colour statistics (how vivid it is)
    identity   ``identity:<embedder version>`` the identity embedder's embedding (when the head
                                              was fitted with one)
    net        ``net:<network version>``      the taste network's (score, flip spread): blended
                                              with the head's score, not one of its inputs

The crop blocks (backbone, colour, net) depend on the crop, so on ``detector.margin``: at any
margin but the default 0.2 their sources carry it, ``@m<percent>`` (``<backbone version>@m30``,
``colour@m30``, ``net:<version>@m30``; :func:`crop_source`), and vectors of two margins never
mix. After a margin change the cache fills again at the new one; a taste head fitted at the
old one is left out until it is refitted (``scorer/model.py``), and the daemon drops the old
vectors as it does a retired model's. The whole-picture block does not depend on the margin;
identity embeddings are kept per embedder version (``storage/characters.py``).

:func:`ensure_features` returns the cached vectors of stored faces and computes (and stores) the
missing ones, decoding each picture once; so a refit of the head, a rescoring after it, and an
evaluation read vectors, not pictures.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from storage.records import Face

log = logging.getLogger(__name__)

COLOUR = "colour"
COLOUR_SIZE = 64      # colour statistics are taken at this size (any size gives nearly the same)
DEFAULT_MARGIN = 0.2  # detector.margin's default: crop sources computed at it keep their plain names


def crop_source(source: str, margin: float) -> str:
    """The name a crop block's ``source`` is cached under at crop margin ``margin``: unchanged at
    :data:`DEFAULT_MARGIN`, else with ``@m<margin in percent>`` appended."""
    percent = round(float(margin) * 100)
    return source if percent == round(DEFAULT_MARGIN * 100) else f"{source}@m{percent}"


@dataclass
class FeatureExtractor:
    """Computes the blocks of face crops. ``backbone``: a :class:`scorer.backbones.Backbone` (or
    None: no backbone blocks); ``network``: a callable taking crops (PIL) and returning (scores,
    spreads), with ``network_version`` naming it; ``embedder``: an identity embedder or None;
    ``margin``: the crop margin (``detector.margin``) the crops it is given were cut with, which
    names the crop blocks' sources (:func:`crop_source`)."""
    backbone: object | None = None
    whole: bool = True
    network: object | None = None
    network_version: str | None = None
    embedder: object | None = None
    margin: float = DEFAULT_MARGIN
    sources: dict[str, str] = field(init=False)

    def __post_init__(self):
        self.sources = {}
        if self.backbone is not None:
            self.sources["backbone"] = crop_source(self.backbone.version, self.margin)
            if self.whole:
                self.sources["whole"] = "whole:" + self.backbone.version
        self.sources["colour"] = crop_source(COLOUR, self.margin)
        if self.embedder is not None:
            self.sources["identity"] = "identity:" + self.embedder.version
        if self.network is not None:
            self.sources["net"] = crop_source("net:" + self.network_version, self.margin)

    def compute(self, crops: list[Image.Image], pictures: list[Image.Image] | None = None,
                only: set[str] | None = None) -> list[dict[str, np.ndarray]]:
        """Each crop's blocks as {source: vector}; ``pictures``: the whole picture each crop comes
        from (the whole block is left out without it); ``only``: just these sources."""
        from scorer.analyze import slim
        from scorer.model import colour_stats_arrays, resize_crop

        out: list[dict[str, np.ndarray]] = [{} for _ in crops]
        if not crops:
            return out

        def wanted(block: str) -> bool:
            source = self.sources.get(block)
            return source is not None and (only is None or source in only)

        def put(block, vectors):
            for d, v in zip(out, vectors):
                d[self.sources[block]] = np.asarray(v, np.float32)

        crop_vectors = None
        if wanted("backbone"):
            crop_vectors = self.backbone.features_of(crops)
            put("backbone", crop_vectors)
        if wanted("whole") and pictures is not None:
            # each picture once; a crop that is its whole picture (no face found, an imported
            # crop) reuses the crop's vector
            unique: dict[int, int] = {}
            ims = []
            reuse = {}
            for i, (c, p) in enumerate(zip(crops, pictures)):
                if crop_vectors is not None and c is p:
                    reuse[id(p)] = crop_vectors[i]
            for p in pictures:
                if id(p) not in unique and id(p) not in reuse:
                    unique[id(p)] = len(ims)
                    ims.append(slim(p))     # what the daemon keeps of a picture (scorer.analyze)
            vectors = self.backbone.features_of(ims) if ims else []
            put("whole", [reuse[id(p)] if id(p) in reuse else vectors[unique[id(p)]] for p in pictures])
        if wanted("colour"):
            put("colour", colour_stats_arrays([resize_crop(c, COLOUR_SIZE) for c in crops]))
        if wanted("identity"):
            size = self.embedder.image_size
            put("identity", self.embedder.embed_arrays([resize_crop(c, size) for c in crops]))
        if wanted("net"):
            scores, spreads = self.network(crops)
            put("net", [[s, 0.0 if u is None else u] for s, u in zip(scores, spreads)])
        return out


def blocks_of(vectors: list[dict[str, np.ndarray]], sources: dict[str, str]) -> dict[str, np.ndarray]:
    """Rows of {source: vector} as the head's {block: (n, d) array}, for the blocks in ``sources``
    (block -> source); KeyError when a row lacks one."""
    return {block: np.stack([v[source] for v in vectors]) for block, source in sources.items()}


def ensure_features(store, extractor: FeatureExtractor, faces: list[dict], media_root: str | Path, *,
                    margin: float, max_pixels: int = 90_000_000, sources: set[str] | None = None,
                    progress: bool | None = False) -> dict[int, dict[str, np.ndarray]]:
    """Cached vectors of stored ``faces`` (rows with ``id``, ``image_id``, ``media_path`` and the
    box) for ``sources`` (default: all of the extractor's), the missing ones computed from the
    stored pictures (each decoded once, cropped with ``margin``: the extractor's, which names
    its sources) and saved. A face whose picture cannot be read is left out of the result (one
    warning per picture)."""
    from tqdm import tqdm

    from scorer.analyze import face_crop
    from storage.media import BadImage, load_media

    if round(margin * 100) != round(extractor.margin * 100):
        raise ValueError(f"crops cut with margin {margin} would be cached as margin {extractor.margin}'s")
    wanted = set(extractor.sources.values()) if sources is None else set(sources)
    have = store.face_features([f["id"] for f in faces], wanted)
    todo: dict[str, list[dict]] = {}
    for f in faces:
        missing = wanted - set(have.get(f["id"], {}))
        if missing:
            todo.setdefault(f["media_path"], []).append(f)
    if todo:
        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(todo.items(), desc="computing features", unit="pic", file=sys.stderr, disable=not show)
        for media_path, rows in bar:
            try:
                im = load_media(media_root, media_path, max_pixels=max_pixels)
            except (OSError, BadImage) as e:
                log.warning("features: stored picture %s unreadable, its faces left out: %s", media_path, e)
                for f in rows:
                    have.pop(f["id"], None)
                continue
            crops = [face_crop(im, Face.from_row(f), margin) for f in rows]
            missing = set().union(*(wanted - set(have.get(f["id"], {})) for f in rows))
            computed = extractor.compute(crops, [im] * len(crops), only=missing)
            new = {f["id"]: {s: v for s, v in c.items() if s not in have.get(f["id"], {})}
                   for f, c in zip(rows, computed)}
            store.save_face_features(new)
            for fid, vectors in new.items():
                have.setdefault(fid, {}).update(vectors)
        bar.close()
    return {fid: v for fid, v in have.items() if wanted <= set(v)}

