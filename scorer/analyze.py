"""One picture in, faces and scores out: detect, crop with a margin, score in one batch.

The picture's score is the max (or mean, per config) over its faces. A picture with no face is
scored as a whole or skipped (``detector.no_face``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from scorer.detect import Detector, Face, crop_face
from scorer.model import Scorer


@dataclass
class FaceScore:
    face: Face
    score: float
    uncertainty: float | None


@dataclass
class Analysis:
    faces: list[FaceScore] = field(default_factory=list)
    score: float | None = None
    uncertainty: float | None = None
    skipped: bool = False       # no face and no_face = "skip"
    whole: bool = False         # scored on the whole picture

    def as_dict(self) -> dict:
        return {
            "faces": [{"box": [f.face.x1, f.face.y1, f.face.x2, f.face.y2], "detector": f.face.detector,
                       "confidence": round(f.face.confidence, 4), "score": round(f.score, 4),
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

    def detect(self, im: Image.Image) -> list[Face]:
        faces = self.detector.detect(im)
        if not faces and self.no_face == "whole":
            faces = [Face(0, 0, im.width, im.height, 1.0, "whole")]
        return faces

    def analyze(self, pictures: list[Image.Image]) -> list[Analysis]:
        """Analyse several pictures, scoring all their crops in shared batches."""
        found = [self.detect(im) for im in pictures]
        crops, owners = [], []
        for i, (im, faces) in enumerate(zip(pictures, found)):
            for face in faces:
                crops.append(im if face.detector == "whole" else crop_face(im, face, self.margin))
                owners.append(i)
        scores, spreads = self.scorer.predict(crops) if crops else ([], [])
        results = [Analysis() for _ in pictures]
        k = 0
        for i, faces in enumerate(found):
            for face in faces:
                results[i].faces.append(FaceScore(face, scores[k], spreads[k]))
                k += 1
        for res, faces in zip(results, found):
            if not res.faces:
                res.skipped = True
                continue
            res.whole = res.faces[0].face.detector == "whole"
            if self.aggregate == "mean":
                res.score = sum(f.score for f in res.faces) / len(res.faces)
                us = [f.uncertainty for f in res.faces if f.uncertainty is not None]
                res.uncertainty = sum(us) / len(us) if us else None
            else:
                best = max(res.faces, key=lambda f: f.score)
                res.score, res.uncertainty = best.score, best.uncertainty
        return results
