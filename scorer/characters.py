"""Characters end to end: the identity embedder registry, naming faces (import by folder, enrol
a few examples), embedding them, and identifying the faces of pictures.

The identity embedders have their own registry (``identity_models``), like the taste models'
(``scorer/registry.py``): before any training an untrained embedder (random or ImageNet backbone,
per ``characters.pretrained``) is created once and registered, so every embedding names a real
version. Enrolling (``characters add``) embeds the new examples with the active embedder and stores
them: the :class:`~scorer.identity.Recognizer` built from the store uses them at once, no training.

Pictures are stored as ``import-labels`` stores them (media by hash, status ``importing`` until the
analyzer has detected and scored their faces); a picture with exactly one face names that face
(with ``crops``, the whole picture is the face). ``store`` is a sync Store, except in the last
section: recognising stored faces (:func:`recognize_faces`, :func:`identify_stored`) takes an
async store (``storage.writer.AsyncStore``), as ``scorer/rescore.py`` does, so the daemon's
writes stay on its writer thread while crops are embedded in a worker thread.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scorer.analyze import face_crop
from scorer.identity import Embedder, Recognizer, build_embedder, save_embedder
from scorer.import_labels import analyse_imported, take_picture
from scorer.model import ModelError
from scorer.registry import initial_version
from storage.characters import check_name
from storage.media import BadImage, decode_image, load_media
from storage.records import CROP, WHOLE_PICTURE, Face

log = logging.getLogger(__name__)


# ---- the registry ----------------------------------------------------------------------------
def ensure_active_embedder(store, icfg, models_dir: str | Path) -> dict:
    """The active identity embedder's row, creating and registering the untrained one if none."""
    row = store.active_identity_model()
    if row is not None:
        return row
    version = initial_version(icfg.arch, icfg.pretrained, prefix="identity-")
    path = Path(models_dir) / f"{version}.pt"
    if store.get_identity_model(version) is None or not path.exists():
        torch.manual_seed(icfg.seed)
        net = build_embedder(icfg.arch, icfg.pretrained, icfg.embedding_dim)
        save_embedder(net, path, arch=icfg.arch, image_size=icfg.image_size, version=version)
    store.register_identity_model(version, icfg.arch, path.name, activate=True,
                                  notes="untrained: run `main.py characters train` for a better embedder")
    return store.active_identity_model()


def untrained(row: dict) -> bool:
    return not row["metrics"]


def load_embedder(row: dict, icfg, models_dir: str | Path) -> Embedder:
    path = Path(models_dir) / row["path"]
    if not path.exists():
        raise ModelError(f"identity model file {path} of version {row['version']} is missing")
    return Embedder.load(path, device=icfg.device, batch_size=icfg.batch_size)


def use_embedder(store, icfg, models_dir: str | Path, media_root: str | Path, version: str, *, margin: float,
                 max_pixels: int = 90_000_000, loader=load_embedder) -> dict:
    """Make ``version`` the active identity embedder (rollback), after checking that its file
    loads (``loader(row, icfg, models_dir)``), and embed the named faces it has not embedded yet,
    so recognition uses them at once. ModelError (one line) for an unknown version or a bad file."""
    row = store.get_identity_model(version)
    if row is None:
        known = ", ".join(r["version"] for r in store.list_identity_models()) or "none"
        raise ModelError(f"no identity embedder {version!r} (known: {known})")
    embedder = loader(row, icfg, models_dir)
    store.activate_identity_model(version)
    embed_named(store, embedder, media_root, margin=margin, max_pixels=max_pixels)
    log.info("active identity embedder is now %s", version)
    return store.get_identity_model(version)


def build_recognizer(store, row: dict, icfg) -> Recognizer:
    """The enrolled examples of the embedder ``row``; its calibrated threshold, or one calibrated
    now on the examples themselves (leave-one-out). With the untrained embedder, whose random
    features tell little apart, a face also counts its similarity to a character's nearest
    example, so an enrolled picture (or a near copy) is recognised at once."""
    return with_threshold(Recognizer.from_store(store, row["version"], k=icfg.k, nearest=untrained(row)), row, icfg)


def with_threshold(rec: Recognizer, row: dict, icfg) -> Recognizer:
    """``rec`` with the embedder ``row``'s calibrated threshold, else one calibrated now on the
    enrolled examples (see :func:`build_recognizer`)."""
    if row.get("threshold") is not None:
        rec.threshold = row["threshold"]
    else:
        rec.calibrate_self(icfg.threshold_precision)
    return rec


# ---- embedding stored faces ------------------------------------------------------------------
def embed_crops(embedder: Embedder, faces: list[dict], media_root: str | Path, *, margin: float,
                max_pixels: int = 90_000_000) -> dict[int, np.ndarray]:
    """face id -> embedding of stored faces (rows with ``id``, box, ``detector``, ``media_path``);
    the faces of a picture that cannot be read are left out (one warning)."""
    by_picture: dict[str, list[dict]] = {}
    for f in faces:
        by_picture.setdefault(f["media_path"], []).append(f)
    ids, crops = [], []
    for media_path, rows in by_picture.items():
        try:
            im = load_media(media_root, media_path, max_pixels=max_pixels)
        except (OSError, BadImage) as e:
            log.warning("characters: stored picture %s unreadable: %s", media_path, e)
            continue
        for f in rows:
            ids.append(f["id"])
            crops.append(face_crop(im, Face.from_row(f), margin))
    return dict(zip(ids, embedder.embed(crops))) if crops else {}


def embed_faces(store, embedder: Embedder, faces: list[dict], media_root: str | Path, *, margin: float,
                max_pixels: int = 90_000_000) -> int:
    """Embed stored faces (rows with ``id``, ``image_id``, box, ``detector``, ``media_path``) that
    have no embedding of this version yet; return how many were embedded."""
    have = store.embeddings(embedder.version, [f["id"] for f in faces])
    vectors = embed_crops(embedder, [f for f in faces if f["id"] not in have], media_root, margin=margin,
                          max_pixels=max_pixels)
    if vectors:
        store.save_embeddings(embedder.version, vectors)
    return len(vectors)


def embed_named(store, embedder: Embedder, media_root, *, margin: float, max_pixels: int = 90_000_000) -> int:
    """Embed every named face the embedder has not embedded yet (after enrolling or promotion)."""
    return embed_faces(store, embedder, store.named_faces(), media_root, margin=margin, max_pixels=max_pixels)


# ---- naming faces ----------------------------------------------------------------------------
@dataclass
class NameReport:
    pictures: int = 0
    new_pictures: int = 0
    named: int = 0
    characters: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)   # one line each: not named, and why

    def summary(self) -> str:
        return (f"{self.pictures} picture(s) ({self.new_pictures} new): {self.named} face(s) named as "
                f"{len(self.characters)} character(s); {len(self.problems)} picture(s) not named")


def read_character_folder(root: str | Path) -> list[tuple[str, Path]]:
    """(character name, picture path) of ``root/<name>/...``; ValueError (one line) for a missing
    or empty folder or a bad folder name."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = check_name(folder.name)
        rows += [(name, p) for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    if not rows:
        raise ValueError(f"{root}: no pictures found (expected {root}/<character name>/<pictures>)")
    return rows


def name_pictures(store, analyzer, embedder: Embedder | None, rows: list[tuple[str, Path]], media_root, *,
                  origin: str, crops: bool = False, max_pixels: int = 90_000_000, batch_size: int = 32,
                  progress: bool | None = None) -> NameReport:
    """Store each picture (analysed like an imported one) and name its face as the character:
    a picture with exactly one face names it; with ``crops`` the whole picture is the face.
    The named faces are then embedded with ``embedder`` (if given), ready for recognition."""
    from tqdm import tqdm

    report = NameReport(pictures=len(rows))
    source_id = store.import_source_id()
    ids = {name: store.character_id(name, create=True) for name in {n for n, _ in rows}}
    bar = tqdm(total=len(rows), desc="naming", unit="pic", file=sys.stderr,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        stored: list[tuple[str, Path, int]] = []
        todo: dict[int, object] = {}
        for name, path in batch:
            try:
                image_id, im = take_picture(store, source_id, path, media_root, max_pixels=max_pixels)
            except OSError as e:
                report.problems.append(f"{path}: cannot read: {e.strerror or e}")
                continue
            except BadImage as e:
                report.problems.append(f"{path}: {e}")
                continue
            if im is not None:
                if image_id not in todo:
                    report.new_pictures += 1
                todo[image_id] = im
            stored.append((name, path, image_id))
        analyse_imported(store, analyzer, todo, crops=crops)
        for name, path, image_id in stored:
            faces = store.faces_of(image_id)
            # with crops the whole picture is the face: also one stored earlier without --crops
            real = faces if crops and len(faces) == 1 else [f for f in faces if f["detector"] != WHOLE_PICTURE]
            if len(real) != 1:
                report.problems.append(f"{path}: {'no face found' if not real else f'{len(real)} faces'}, "
                                       "not named (use --crops if the picture is a face crop)")
                continue
            store.name_face(real[0]["id"], ids[name], origin=origin)
            report.named += 1
            report.characters.add(name)
        bar.update(len(batch))
    bar.close()
    if embedder is not None:
        embed_named(store, embedder, media_root, margin=analyzer.margin, max_pixels=max_pixels)
    return report


# ---- identifying -----------------------------------------------------------------------------
def identify_pictures(paths: list[Path], detector, embedder: Embedder, recognizer: Recognizer,
                      names: dict[int, str], *, margin: float, crops: bool = False,
                      max_pixels: int = 90_000_000) -> list[dict]:
    """``{"path", "faces": [{"box", "character", "similarity"}]}`` per picture, or
    ``{"path", "error"}`` for one that cannot be read. ``detector`` finds the faces (with
    ``crops``, the whole picture is the face); a picture with no face has an empty list."""
    out = []
    for path in paths:
        try:
            im = decode_image(Path(path).read_bytes(), max_pixels=max_pixels)
        except OSError as e:
            out.append({"path": str(path), "error": f"cannot read: {e.strerror or e}"})
            continue
        except BadImage as e:
            out.append({"path": str(path), "error": str(e)})
            continue
        faces = [Face.whole(im.width, im.height, CROP)] if crops else detector.detect(im)
        entry = {"path": str(path), "faces": []}
        if faces:
            vectors = embedder.embed([face_crop(im, f, margin) for f in faces])
            for f, (cid, sim) in zip(faces, recognizer.identify(vectors)):
                entry["faces"].append({"box": [f.x1, f.y1, f.x2, f.y2],
                                       "character": None if cid is None else names.get(cid),
                                       "similarity": round(float(sim), 4)})
        out.append(entry)
    return out


# ---- recognising stored faces (async store) --------------------------------------------------
async def embed_stored(store, embedder: Embedder, faces: list[dict], media_root: str | Path, *, margin: float,
                       max_pixels: int = 90_000_000) -> dict[int, np.ndarray]:
    """face id -> this embedder's embedding of stored faces (rows as for :func:`embed_faces`),
    embedding in a worker thread, and storing, those it has not embedded yet. ``store`` is an
    async store."""
    if not faces:
        return {}
    vectors = await store.embeddings(embedder.version, [f["id"] for f in faces])
    todo = [f for f in faces if f["id"] not in vectors]
    if todo:
        new = await asyncio.to_thread(embed_crops, embedder, todo, media_root, margin=margin, max_pixels=max_pixels)
        if new:
            await store.save_embeddings(embedder.version, new)
        vectors.update(new)
    return vectors


async def recognize_faces(store, embedder: Embedder, recognizer: Recognizer, faces: list[dict],
                          media_root: str | Path, *, margin: float,
                          max_pixels: int = 90_000_000) -> dict[int, tuple[int | None, float]]:
    """Embed (:func:`embed_stored`) and identify stored faces, storing the results; returns face
    id -> (character id or None for unknown, similarity). A face whose picture cannot be read is
    stored as unknown with similarity 0 (not returned), so it is not read again and again (one
    warning), only when the stored results are next redone. ``store`` is an async store."""
    vectors = await embed_stored(store, embedder, faces, media_root, margin=margin, max_pixels=max_pixels)
    unreadable = {f["id"]: (None, 0.0) for f in faces if f["id"] not in vectors}
    if unreadable:
        await store.save_identities(embedder.version, unreadable)
    if not vectors:
        return {}
    ids = list(vectors)
    found = await asyncio.to_thread(recognizer.identify, np.stack([vectors[i] for i in ids]))
    results = dict(zip(ids, found))
    await store.save_identities(embedder.version, results)
    return results


async def identify_stored(store, embedder: Embedder, recognizer: Recognizer, *, since: str | None,
                          media_root: str | Path, margin: float, max_pixels: int = 90_000_000,
                          batch_size: int = 64, should_stop: Callable[[], bool] = lambda: False,
                          on_batch: Callable[[int], None] | None = None) -> int:
    """Identify every stored, unnamed face that has no result of this embedder made at or after
    ``since`` (the newest name's time), in batches by face id, embedding those it has not
    embedded (after a promotion, all of them); returns how many were identified. Everything it
    did is stored per batch, so an interrupted run resumes where it stopped."""
    done, after = 0, 0
    while not should_stop():
        faces = await store.faces_to_identify(embedder.version, since, batch_size, after)
        if not faces:
            break
        after = faces[-1]["id"]
        results = await recognize_faces(store, embedder, recognizer, faces, media_root, margin=margin,
                                        max_pixels=max_pixels)
        done += len(results)
        if on_batch is not None:
            on_batch(len(results))
    return done
