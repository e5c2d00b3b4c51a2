"""Exporting ratings as a ``path,rating`` CSV (and comparisons as ``winner,loser``) that
``import-labels`` reads back unchanged.

Each row names the stored media file of a picture. By default that is the file's absolute path
in this data folder: importing the CSV into another data folder on this machine reads the
pictures from here. With ``copy``, the pictures are copied into a folder beside the CSV
(``<name>-pictures/``, named by their hash) and the rows name them relative to the CSV, so the
CSV and that folder can be moved anywhere together.

Only each picture's current rating (its newest one not taken back) is written, unless
``all_labels``: then every rating not taken back, oldest first, so that an import (which keeps the
last row of a picture as its current rating) ends with the same current ratings.
"""
from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from storage.store import Store


@dataclass
class ExportReport:
    ratings: int = 0
    comparisons: int | None = None    # None: comparisons were not exported
    copied: int = 0                   # pictures copied beside the CSV
    problems: list[str] = field(default_factory=list)   # rows left out, and why

    def summary(self) -> str:
        return (f"{self.ratings} rating(s)" + (f", {self.comparisons} comparison(s)" if self.comparisons is not None else "")
                + (f", {self.copied} picture(s) copied" if self.copied else "")
                + (f"; {len(self.problems)} left out" if self.problems else ""))


def export_labels(store, media_root: str | Path, csv_path: str | Path, *, all_labels: bool = False,
                  copy: bool = False, comparisons_path: str | Path | None = None) -> ExportReport:
    """Write the ratings of ``store`` to ``csv_path`` (and its comparisons to ``comparisons_path``);
    a picture whose media file is missing is left out with one line in ``report.problems``."""
    csv_path = Path(csv_path)
    report = ExportReport()
    pictures = Pictures(Path(media_root), csv_path, copy, report)
    where = "labels.removed_at IS NULL" if all_labels else Store._LATEST   # the label that counts
    rows = store.db.execute(
        "SELECT labels.image_id, labels.value, images.media_path FROM labels "
        f"JOIN images ON images.id = labels.image_id WHERE {where} ORDER BY labels.created_at, labels.id").fetchall()
    out = []
    for image_id, value, media_path in rows:
        path = pictures.path(image_id, media_path)
        if path is not None:
            out.append((path, value))
    _write_csv(csv_path, ("path", "rating"), out)
    report.ratings = len(out)
    if comparisons_path is not None:
        pairs = store.db.execute(
            "SELECT c.winner_id, w.media_path, c.loser_id, l.media_path FROM comparisons AS c "
            "JOIN images AS w ON w.id = c.winner_id JOIN images AS l ON l.id = c.loser_id "
            "WHERE c.removed_at IS NULL ORDER BY c.created_at, c.id").fetchall()
        base = Path(comparisons_path).resolve().parent   # import-labels reads a CSV's paths from its folder

        def here(path: str) -> str:
            return Path(os.path.relpath(pictures.base / path, base)).as_posix() if pictures.folder else path
        out = []
        for winner_id, winner_media, loser_id, loser_media in pairs:
            winner, loser = pictures.path(winner_id, winner_media), pictures.path(loser_id, loser_media)
            if winner is not None and loser is not None:
                out.append((here(winner), here(loser)))
        _write_csv(Path(comparisons_path), ("winner", "loser"), out)
        report.comparisons = len(out)
    return report


class Pictures:
    """The path a CSV row gives a picture: its media file's absolute path, or (``copy``) its copy
    beside the CSV, relative to the CSV's folder."""

    def __init__(self, media_root: Path, csv_path: Path, copy: bool, report: ExportReport):
        self.media_root = media_root.resolve()
        self.base = csv_path.resolve().parent
        self.folder = csv_path.resolve().with_name(f"{csv_path.stem}-pictures") if copy else None
        self.report = report
        self.known: dict[int, str | None] = {}

    def path(self, image_id: int, media_path: str | None) -> str | None:
        if image_id not in self.known:
            self.known[image_id] = self._path(image_id, media_path)
        return self.known[image_id]

    def _path(self, image_id: int, media_path: str | None) -> str | None:
        source = self.media_root / media_path if media_path else None
        if source is None or not source.is_file():
            self.report.problems.append(f"picture #{image_id}: its media file "
                                        f"{'is not stored' if source is None else f'{source} is missing'}")
            return None
        if self.folder is None:
            return str(source)
        target = self.folder / source.name
        if not target.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(source, staged)
            os.replace(staged, target)
            self.report.copied += 1
        return target.relative_to(self.base).as_posix()


def _write_csv(path: Path, header: tuple[str, str], rows: list[tuple]) -> None:
    """Write the CSV whole or not at all (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(staged, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
