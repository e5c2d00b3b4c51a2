"""One picture in, faces and scores out: detect, crop with a margin, score in one batch.

The picture's score is the max (or mean, per config) over its faces. A picture with no face is
scored as a whole or skipped (``detector.no_face``); a picture imported as a face crop
(``import-labels --crops``) has one box, detector ``crop``, covering all of it.

Memory: only the face crops and the picture at most ``WHOLE_SIDE`` pixels a side (:func:`slim`,
all the whole-picture branch and a whole-picture box need: the networks see 224 px or less) are
kept once a picture is detected (:meth:`Analyzer.prepare`), so a batch of large pictures being
scored does not hold every full-size picture at once.

``build_analyzer`` puts together the configured detector and the active model (creating the
untrained one first if the registry is empty), as the daemon, ``score`` and ``import-labels`` use it.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from scorer.detect import Detector, DetectorConfig, crop_box, crop_face, make_detector
from scorer.detect_pool import faces_or_whole
from scorer.model import Scorer
from scorer.own_detector import effective_detector
from scorer.own_detector import tag as own_detector_tag
from scorer.registry import ensure_active_model, load_scorer, untrained_scorer
from scorer.settings import ScorerConfig
from storage.paths import DataPaths
from storage.records import WHOLE, Face


WHOLE_SIDE = 512     # the whole picture is kept (and seen by the scorer) at most this size


def slim(im: Image.Image) -> Image.Image:
    """The picture at most :data:`WHOLE_SIDE` pixels a side (itself when it is that small): what
    the whole-picture branch and a whole-picture box are computed from, everywhere."""
    if max(im.size) <= WHOLE_SIDE:
        return im
    scale = WHOLE_SIDE / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)


@dataclass
class Prepared:
    """A detected picture reduced to what scoring needs: its faces, each face's crop and the
    slimmed picture (a whole-picture box's crop is that same object)."""
    faces: list[Face]
    crops: list[Image.Image]
    whole: Image.Image


@dataclass
class Analysis:
    faces: list[Face] = field(default_factory=list)   # scored
    score: float | None = None
    uncertainty: float | None = None
    skipped: bool = False       # no face and no_face = "skip"
    whole: bool = False         # scored on the whole picture
    features: list[dict] = field(default_factory=list)  # each face's cached features (source -> vector)

    def as_dict(self) -> dict:
        return {
            "faces": [{"box": [f.x1, f.y1, f.x2, f.y2], "detector": f.detector,
                       "confidence": round(f.confidence, 4), "score": round(f.score, 4),
                       "uncertainty": None if f.uncertainty is None else round(f.uncertainty, 4)}
                      for f in self.faces],
            "score": None if self.score is None else round(self.score, 4),
            "uncertainty": None if self.uncertainty is None else round(self.uncertainty, 4),
            "skipped": self.skipped, "whole_image": self.whole,
        }


class Analyzer:
    def __init__(self, detector: Detector, scorer: Scorer, *, margin: float = 0.2,
                 no_face: str = "whole", aggregate: str = "max"):
        self.detector, self.scorer = detector, scorer
        self.margin, self.no_face, self.aggregate = margin, no_face, aggregate
        self.detector_tag = "config"   # images.detector_version of what it detects (scorer/own_detector.py tag)

    def detect(self, im: Image.Image) -> list[Face]:
        return faces_or_whole(self.detector.detect(im), im, self.no_face)

    def detect_many(self, pictures: list[Image.Image]) -> list[list[Face]]:
        """:meth:`detect` for several pictures, in one pass where the detector can (yolo)."""
        return [faces_or_whole(faces, im, self.no_face)
                for im, faces in zip(pictures, self.detector.detect_many(pictures))]

    def detect_tensors(self, pictures: list, detector: Detector | None = None) -> list[list[Face]]:
        """:meth:`detect_many` for pictures decoded on the detector's device (the GPU path:
        ``YoloDetector.detect_tensors``). ``detector``: the one they were decoded for (default:
        the analyzer's), so that a detector switch meanwhile does not hand them to one that
        cannot take them (the pictures then carry the old detector's tag and are detected again)."""
        found = (detector or self.detector).detect_tensors(pictures)
        return [faces or ([Face.whole(int(t.shape[2]), int(t.shape[1]))] if self.no_face == "whole" else [])
                for t, faces in zip(pictures, found)]

    def prepare_tensor(self, picture, faces: list[Face]) -> Prepared:
        """:meth:`prepare` for a picture decoded on the device: its face crops are cut there and
        only they and the slimmed picture come over to the CPU."""
        import torch.nn.functional as F

        h, w = int(picture.shape[1]), int(picture.shape[2])

        def to_pil(t) -> Image.Image:
            return Image.fromarray(t.permute(1, 2, 0).contiguous().cpu().numpy())

        scale = min(1.0, WHOLE_SIDE / max(w, h))
        small = picture if scale == 1.0 else F.interpolate(
            picture[None].float(), size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
            antialias=True, align_corners=False)[0].round_().clamp_(0, 255).byte()
        whole = to_pil(small)
        crops = []
        for f in faces:
            box = None if f.detector in WHOLE else crop_box(f, self.margin, w, h)
            crops.append(whole if box is None else to_pil(picture[:, box[1]:box[3], box[0]:box[2]]))
        return Prepared(faces, crops, whole)

    @property
    def detection_batch(self) -> int:
        """Pictures to detect in one pass in-process: :data:`scorer.detect.Detector.batch_size`
        (1 unless the detector searches several at once)."""
        return self.detector.batch_size

    def prepare(self, im: Image.Image, faces: list[Face]) -> Prepared:
        """What scoring needs of a detected picture (the full picture can then go)."""
        whole = slim(im)
        return Prepared(faces, [whole if f.detector in WHOLE else crop_face(im, f, self.margin) for f in faces],
                        whole)

    def analyze(self, pictures: list[Image.Image], found: list[list[Face]] | None = None) -> list[Analysis]:
        """Analyse several pictures, scoring all their crops in shared batches.

        ``found`` gives the faces instead of detecting them (e.g. pictures that are face crops).
        """
        found = self.detect_many(pictures) if found is None else found
        return self.analyze_prepared([self.prepare(im, faces) for im, faces in zip(pictures, found)])

    def analyze_prepared(self, prepared: list[Prepared]) -> list[Analysis]:
        """Score pictures reduced by :meth:`prepare`, all their crops in shared batches."""
        crops = [c for p in prepared for c in p.crops]
        wholes = [p.whole for p in prepared for _ in p.crops]
        features = self.scorer.features(crops, wholes) if crops else []
        scores, spreads = self.scorer.predict_features(features)
        results = [Analysis() for _ in prepared]
        k = 0
        for i, p in enumerate(prepared):
            for face in p.faces:
                results[i].faces.append(face.scored(scores[k], spreads[k]))
                results[i].features.append(features[k])
                k += 1
        for res in results:
            if not res.faces:
                res.skipped = True
                continue
            res.whole = res.faces[0].detector in WHOLE
            res.score, res.uncertainty = aggregate([(f.score, f.uncertainty) for f in res.faces], self.aggregate)
        return results


def build_analyzer(store, detector: DetectorConfig, scorer: ScorerConfig, paths: DataPaths) -> Analyzer:
    """Detector plus the active model (created untrained if none); ``store`` is a sync Store, or
    None where nothing may be written (``score`` before any data folder exists): then the
    untrained model is kept in memory. The detector is the one in use: the owner's own active
    version in place of the configured one (scorer/own_detector.py). It comes first: it fails faster."""
    tag = own_detector_tag(paths, detector)
    detector = effective_detector(detector, paths)
    if store is None:
        found = make_detector(detector, Path(tempfile.gettempdir()) / "tastefeed")
        model = untrained_scorer(scorer, margin=detector.margin)
    else:
        found = make_detector(detector, paths.root)
        model = load_scorer(ensure_active_model(store, scorer, paths.models), scorer, paths.models,
                            margin=detector.margin)
    analyzer = Analyzer(found, model, margin=detector.margin, no_face=detector.no_face, aggregate=scorer.aggregate)
    analyzer.detector_tag = tag
    return analyzer


def face_crop(im: Image.Image, face: Face, margin: float) -> Image.Image:
    """The crop the model sees for a face (the picture, :func:`slim`, for whole-picture boxes)."""
    return slim(im) if face.detector in WHOLE else crop_face(im, face, margin)


def aggregate(scored: list[tuple[float, float | None]], how: str = "max") -> tuple[float, float | None]:
    """A picture's (score, uncertainty) from its faces': the best face's, or the mean."""
    if how == "mean":
        us = [u for _, u in scored if u is not None]
        return sum(s for s, _ in scored) / len(scored), (sum(us) / len(us) if us else None)
    return max(scored, key=lambda su: su[0])
