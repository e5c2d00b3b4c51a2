"""Where things live under the data folder (``data_dir``): the database, media files, models,
the crop cache, evaluation plots and gallery thumbnails.

Both the scorer and the bot need these paths, so they are defined once here, in the lowest layer;
the configuration hands a :class:`DataPaths` to whatever needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataPaths:
    root: Path          # the data folder itself

    @property
    def db(self) -> Path:
        return self.root / "tastefeed.db"

    @property
    def media(self) -> Path:
        return self.root / "media"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def thumbs(self) -> Path:
        return self.root / "thumbs"

    @property
    def detectors(self) -> Path:
        """The owner's own trained detectors (scorer/own_detector.py)."""
        return self.root / "detectors"
