"""Importing existing ratings: a folder with subfolders ``1``..``5``, or a CSV of ``path,rating``;
and comparisons: a CSV whose header is ``winner,loser``.

Every picture is stored like a fetched one (media file by hash, faces detected and scored by the
analyzer, which is why this lives in the scorer and not in storage), then its rating is recorded
as a label with origin ``import``. Importing the same ratings again adds nothing: pictures are
found by their hash and an unchanged label is not written twice. Bad rows (missing file, not a
picture, rating not 1-5) are reported with their line number and skipped, in line order, and
the counts add up: every row read is added, unchanged, rated again in a later row or skipped.
When one import rates the same picture twice, the later row's rating is the one imported (a
different rating is warned about). A comparison row
stores both pictures the same way and becomes a comparison (origin ``import``, ref ``FILE:ROW``),
once: importing the file again adds nothing.

A new picture is stored with status ``importing`` until its analysis is recorded, so a daemon
running meanwhile never takes it (its faces stay the ones the import gave it, e.g. ``crop``);
pictures an interrupted import left ``importing`` are analysed by the next import of them.
"""
from __future__ import annotations

import csv
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from storage.records import ANALYSED, CROP, ORIGIN_IMPORT, Face
from storage.media import BadImage, inspect, store_media

log = logging.getLogger(__name__)

RATING_FOLDERS = ("1", "2", "3", "4", "5")


@dataclass
class RatingRow:
    where: str          # "ratings.csv:12" or "3/picture.jpg", for messages
    path: Path
    rating: int
    ref: str            # names the picture in its list, whatever its rating: the label's ref
    order: int = 0      # its place in the list (a CSV's line number), which orders the messages


@dataclass
class ComparisonRow:
    where: str          # "pairs.csv:12", for messages
    winner: Path
    loser: Path
    ref: str            # the comparison's ref: FILE:ROW
    order: int = 0      # its line number


@dataclass(frozen=True)
class Problem:
    """One message of an import, at ``order`` among its rows: a row ``skipped`` (``row``: it
    counts as a skipped row; a folder that is not a rating does not), or a ``warning``."""
    order: int
    message: str
    kind: str = "skipped"
    row: bool = True

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class ImportReport:
    rows: int = 0                       # rows read, bad ones included
    new_pictures: int = 0               # distinct pictures stored by this import
    known_pictures: int = 0             # distinct pictures that were stored already
    labels_added: int = 0
    labels_unchanged: int = 0
    rated_again: int = 0                # rows whose picture a later row rates (that one is imported)
    problems: list[Problem] = field(default_factory=list)
    comparisons: bool = False           # an import of winner,loser pairs
    comparisons_added: int = 0
    comparisons_unchanged: int = 0
    seen: set[int] = field(default_factory=set, repr=False)     # image ids counted in the pictures

    def problem(self, row, message: str) -> None:
        """``row`` is skipped: ``message`` says why (after its place, ``where``)."""
        self.problems.append(Problem(row.order, f"{row.where}: {message}"))

    def add_read_problems(self, problems: list[Problem]) -> None:
        """The problems found reading the rows (:func:`read_rating_rows`): the bad rows count too."""
        self.problems += problems
        self.rows += sum(1 for p in problems if p.row)

    @property
    def skipped(self) -> int:
        """Rows skipped (a comparison whose two pictures both fail is one row)."""
        return len({p.order for p in self.problems if p.row})

    @property
    def errors(self) -> list[str]:
        """The skipped rows' messages, in line order."""
        return [p.message for p in self.lines() if p.kind == "skipped"]

    def lines(self) -> list[Problem]:
        """Every message in line order (stable: a row's messages keep theirs)."""
        return sorted(self.problems, key=lambda p: p.order)

    def summary(self) -> str:
        done = (f"{self.comparisons_added} comparison(s) added, {self.comparisons_unchanged} imported already"
                if self.comparisons else f"{self.labels_added} label(s) added, {self.labels_unchanged} unchanged"
                + (f", {self.rated_again} rated again in a later row" if self.rated_again else ""))
        return (f"{self.rows} row(s): {done}, {self.skipped} bad row(s) skipped; "
                f"{self.new_pictures} new picture(s), {self.known_pictures} already stored")


def _rating(text: str) -> int | None:
    """A rating 1-5 written as a whole number (``4``, or ``4.0`` as spreadsheets write it)."""
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return int(value) if value.is_integer() and 1 <= value <= 5 else None


def read_rating_rows(source: str | Path) -> tuple[list[RatingRow], list[Problem]]:
    """The (path, rating) rows of a ratings folder or CSV file, and the problems found."""
    source = Path(source)
    if source.is_dir():
        return _folder_rows(source)
    if source.is_file():
        return _csv_rows(source)
    raise FileNotFoundError(f"{source}: no such folder or file")


def _folder_rows(root: Path) -> tuple[list[RatingRow], list[Problem]]:
    rows, problems = [], []
    subfolders = sorted(p for p in root.iterdir() if p.is_dir())
    if not any(p.name in RATING_FOLDERS for p in subfolders):
        problems.append(Problem(0, f"{root}: no subfolder named 1, 2, 3, 4 or 5 (one per rating)", "warning", False))
    for folder in subfolders:
        if folder.name not in RATING_FOLDERS:
            problems.append(Problem(len(rows), f"{folder.name}/: not a rating (expected folders 1 to 5)", row=False))
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                inner = path.relative_to(folder).as_posix()
                rows.append(RatingRow(str(path.relative_to(root)), path, int(folder.name), f"{root.name}/{inner}",
                                      len(rows) + 1))
    return rows, problems


def _csv_rows(path: Path) -> tuple[list[RatingRow], list[Problem]]:
    rows, problems = [], []
    for number, cells in enumerate(_read_csv(path), 1):
        where = f"{path.name}:{number}"
        if not cells or all(not c.strip() for c in cells):
            continue
        if number == 1 and len(cells) >= 2 and cells[1].strip().lower() in ("rating", "score", "label"):
            continue  # header
        if len(cells) < 2 or not cells[0].strip():
            problems.append(Problem(number, f"{where}: expected 'path,rating', got {','.join(cells)!r}"))
            continue
        rating = _rating(cells[1])
        if rating is None:
            problems.append(Problem(number, f"{where}: rating {cells[1].strip()!r} is not a whole number from 1 to 5"))
            continue
        file = Path(cells[0].strip())
        rows.append(RatingRow(where, file if file.is_absolute() else path.parent / file, rating,
                              f"{path.name}:{cells[0].strip()}", number))
    return rows, problems


def _read_csv(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read as CSV: {e}") from None


def is_comparison_csv(source: str | Path) -> bool:
    """Whether ``source`` is a CSV file of comparisons: its header is ``winner,loser``."""
    source = Path(source)
    if not source.is_file():
        return False
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return [c.strip().lower() for c in header[:2]] == ["winner", "loser"]


def read_comparison_rows(path: str | Path) -> tuple[list[ComparisonRow], list[Problem]]:
    """The (winner, loser) rows of a comparisons CSV (header ``winner,loser``; paths relative to
    the CSV), and the problems found."""
    path = Path(path)
    rows, problems = [], []
    for number, cells in enumerate(_read_csv(path), 1):
        where = f"{path.name}:{number}"
        if number == 1 or not cells or all(not c.strip() for c in cells):
            continue  # the header, or an empty line
        if len(cells) < 2 or not cells[0].strip() or not cells[1].strip():
            problems.append(Problem(number, f"{where}: expected 'winner,loser', got {','.join(cells)!r}"))
            continue
        winner, loser = (Path(c.strip()) for c in cells[:2])
        rows.append(ComparisonRow(where, winner if winner.is_absolute() else path.parent / winner,
                                  loser if loser.is_absolute() else path.parent / loser, where, number))
    return rows, problems


def import_labels(store, analyzer, rows: list[RatingRow], media_root: str | Path, *, crops: bool = False,
                  max_pixels: int = 90_000_000, batch_size: int = 32, progress: bool | None = None,
                  origin: str = ORIGIN_IMPORT) -> ImportReport:
    """Store the pictures of ``rows``, analyse new ones, and record their ratings as labels.

    ``store`` is a sync Store; ``analyzer`` a :class:`scorer.analyze.Analyzer`. With ``crops``,
    each picture is taken as one face crop and not run through the detector.
    """
    report = ImportReport(rows=len(rows))
    last: dict[int, RatingRow] = {}     # image id -> its last row, whose rating is imported
    for batch, image_ids in take_pictures(store, analyzer, rows, [lambda r: r.path], media_root, report,
                                          crops=crops, max_pixels=max_pixels, batch_size=batch_size,
                                          progress=progress):
        for row, (image_id,) in zip(batch, image_ids):
            if image_id is None:
                continue
            earlier = last.get(image_id)
            if earlier is not None:
                report.rated_again += 1
                if earlier.rating != row.rating:
                    report.problems.append(Problem(
                        row.order, f"{row.where}: the same picture as {earlier.where}, rated {earlier.rating} there "
                        f"and {row.rating} here: the later rating, {row.rating}, is imported", "warning", row=False))
            last[image_id] = row
    for image_id, row in last.items():
        if store.add_label(image_id, row.rating, origin=origin, ref=row.ref):
            report.labels_added += 1
        else:
            report.labels_unchanged += 1
    return report


def import_comparisons(store, analyzer, rows: list[ComparisonRow], media_root: str | Path, *, crops: bool = False,
                       max_pixels: int = 90_000_000, batch_size: int = 32,
                       progress: bool | None = None) -> ImportReport:
    """Store the pictures of ``rows`` (winner,loser pairs) as :func:`import_labels` does, and
    record each pair as a comparison (origin ``import``, ref ``FILE:ROW``); a row imported
    already (its ref) adds nothing. A row with a picture that cannot be read, or the same picture
    twice, is reported and skipped."""
    report = ImportReport(rows=len(rows), comparisons=True)
    for batch, image_ids in take_pictures(store, analyzer, rows, [lambda r: r.winner, lambda r: r.loser],
                                          media_root, report, crops=crops, max_pixels=max_pixels,
                                          batch_size=batch_size, progress=progress):
        for row, (winner, loser) in zip(batch, image_ids):
            if winner is None or loser is None:
                continue
            if winner == loser:
                report.problem(row, "winner and loser are the same picture")
            elif store.comparison_by_ref(ORIGIN_IMPORT, row.ref) is not None:
                report.comparisons_unchanged += 1
            else:
                store.add_comparison(winner, loser, origin=ORIGIN_IMPORT, ref=row.ref)
                report.comparisons_added += 1
    return report


def take_pictures(store, analyzer, rows: list, paths: list, media_root: str | Path, report: ImportReport, *,
                  crops: bool, max_pixels: int, batch_size: int, progress: bool | None):
    """The pictures of an import, taken in and analysed a batch of rows at a time: yields (the
    batch's rows, for each row the image ids of its pictures, ``paths`` being the functions that
    give a row's picture paths). A picture that cannot be read is None, with one line in
    ``report.problems`` (``where: ...``); new and known pictures are counted in ``report``, each
    picture once however many rows name it."""
    from tqdm import tqdm

    source_id = store.import_source_id()
    bar = tqdm(total=len(rows), desc="importing", unit="row", file=sys.stderr,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        image_ids: list[tuple[int | None, ...]] = []
        todo: dict[int, object] = {}          # image id -> decoded picture, to analyse
        for row in batch:
            ids = []
            for path_of in paths:
                path = path_of(row)
                try:
                    image_id, im = take_picture(store, source_id, path, media_root, max_pixels=max_pixels)
                except OSError as e:
                    report.problem(row, f"cannot read {path}: {e.strerror or e}")
                    ids.append(None)
                    continue
                except BadImage as e:
                    report.problem(row, f"{path.name}: {e}")
                    ids.append(None)
                    continue
                if image_id not in report.seen:
                    report.seen.add(image_id)
                    if im is None:
                        report.known_pictures += 1
                    else:
                        report.new_pictures += 1
                if im is not None:
                    todo[image_id] = im
                ids.append(image_id)
            image_ids.append(tuple(ids))
        analyse_imported(store, analyzer, todo, crops=crops)
        yield batch, image_ids
        bar.update(len(batch))
    bar.close()


def take_picture(store, source_id: int, path: Path, media_root: str | Path, *,
                 max_pixels: int = 90_000_000) -> tuple[int, Image.Image | None]:
    """Store the picture at ``path`` for an import: (its image id, the decoded picture to analyse,
    or None when it is analysed already). A new picture waits as ``importing``; one the daemon
    fetched first with the same bytes is claimed, so the daemon's scorer leaves it to the import;
    one whose media was pruned gets its file back. Raises OSError (unreadable file) or BadImage (not a picture)."""
    data = path.read_bytes()
    info, im = inspect(data, max_pixels=max_pixels)
    known = store.image_by_sha256(info.sha256)
    if known is not None and known["status"] in ANALYSED:
        if known.get("media_pruned_at"):  # its media was pruned: the import brings it back
            store_media(media_root, data, info)
            store.media_restored(info.sha256)
        return known["id"], None
    rel = store_media(media_root, data, info)
    if known is not None:
        store.claim_for_import(known["id"])
        return known["id"], im
    return store.add_imported_image(source_id, str(path), info, rel), im


def analyse_imported(store, analyzer, todo: dict[int, Image.Image], *, crops: bool) -> None:
    """Detect (or, with ``crops``, take each picture as one face) and score the pictures an import
    took, and record their analysis."""
    if not todo:
        return
    pictures = list(todo.values())
    found = [[Face.whole(im.width, im.height, CROP)] for im in pictures] if crops else None
    for image_id, res in zip(todo, analyzer.analyze(pictures, found)):
        store.record_analysis(image_id, res.faces, res.score, res.uncertainty, analyzer.scorer.version,
                              skipped=res.skipped, features=res.features,
                              detector_version=None if crops else getattr(analyzer, "detector_tag", None))
