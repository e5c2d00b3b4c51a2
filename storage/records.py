"""What the database holds, named once: the face record every layer shares, image statuses and
label origins.

A face is one box in a picture's pixel coordinates. The detector makes it (score still ``None``),
the analyzer scores it, the store saves it and hands it back to the scorer (rescoring, training
crops) and to the bot (face sheets): one type, no copies of its fields.

An image row moves ``pending`` (found by a source) -> ``downloaded`` (stored, waiting for the
scorer) -> ``scored`` | ``skipped``, or ends ``failed``, ``duplicate`` (the same bytes as a stored
picture) or ``near_duplicate`` (within the perceptual-hash distance of one). A picture that
``import-labels`` stores is ``importing`` until the importer records its analysis.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

# images.status
PENDING = "pending"
DOWNLOADED = "downloaded"
IMPORTING = "importing"          # stored by import-labels, analysed by it alone (no daemon stage takes it)
SCORED = "scored"
SKIPPED = "skipped"              # no face with detector.no_face = "skip", or not a picture to score (a video)
FAILED = "failed"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
ANALYSED = (SCORED, SKIPPED)     # done: the scorer has seen it

# labels.origin: where a rating came from
ORIGIN_IMPORT = "import"         # import-labels (folders or CSV)
ORIGIN_DISCORD = "discord"       # a reaction in the Discord channel
ORIGIN_WEB = "web"               # a click or key in the web gallery

# faces.detector values that are not a detector's box but the whole picture (no margin is added)
WHOLE_PICTURE = "whole"          # no face found, detector.no_face = "whole"
CROP = "crop"                    # imported as a face crop (import-labels --crops)
WHOLE = (WHOLE_PICTURE, CROP)


@dataclass(frozen=True)
class Face:
    x1: int
    y1: int
    x2: int
    y2: int
    confidence: float
    detector: str
    score: float | None = None            # None until scored
    uncertainty: float | None = None      # spread between the crop and its mirror image

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    def scored(self, score: float, uncertainty: float | None) -> Face:
        return replace(self, score=score, uncertainty=uncertainty)

    @classmethod
    def from_row(cls, row: dict) -> Face:
        """From a ``faces`` table row."""
        return cls(row["x1"], row["y1"], row["x2"], row["y2"], row["confidence"], row["detector"],
                   row.get("score"), row.get("uncertainty"))

    @classmethod
    def whole(cls, width: int, height: int, detector: str = WHOLE_PICTURE) -> Face:
        """A box covering the whole picture (no face found, or an imported crop)."""
        return cls(0, 0, width, height, 1.0, detector)
