"""Bootstrap face boxes for the owner's own detector: ``python main.py detector bootstrap [--limit N]``.

Stored pictures that are not in the box set yet (``storage/boxes.py``) are picked for variety
(:func:`pick_pictures`: round robin over the sources, and within a source over picture sizes),
every detector at hand looks for faces in them, and their boxes are merged into *proposals*
that the owner checks on the gallery's Boxes page:

- the detectors (:func:`bootstrap_detectors`): ``animeface``; nagadomi's LBP anime-face cascade
  (``lbp``, from ``detector.cascade``; without it, one line says where to get the file);
  OpenCV's Haar frontal-face cascade (``haar``, for photographs); and the owner's own YOLO
  detector when one is active (``own:VERSION``, ``scorer/own_detector.py``). Each detects at
  ``detector.max_side`` (no time cap: proposals should not depend on how busy the machine was),
  keeping ``detector.min_confidence`` and ``detector.min_size``.
- merging (:func:`merge_boxes`, pure): boxes of *different* detectors whose IoU is above
  ``detector.merge_iou`` (0.3 by default: the same face framed by two detectors overlaps 0.4-0.9)
  are one face, its box the mean of theirs. A face found by two detectors or more is **sure**,
  confidence ``0.5 + 0.5 x`` their mean confidence (above 0.5); a face only one detector found is
  kept but **unsure**, confidence ``0.5 x`` its detector's (0.5 at most).
- a picture's **certainty** (:func:`picture_certainty`, 0..1): the confidence of its least
  certain box, so a picture with any unsure box (where the detectors disagree) is at most 0.5
  and one whose boxes are all sure is above 0.5; a picture where no detector found anything is
  0.5 (they agree, but they all miss faces). The Boxes page shows the least certain first.

**The second round** (issue 18, point 5): when an own detector is active, bootstrap also runs it
alone on every verified picture it has not checked yet (those whose last proposal is not its
own), whatever ``--limit`` (which counts new pictures only): its boxes are stored as proposals
beside the verified ones with ``disagreement = 1 - F1`` (:func:`f1_score`, boxes matched one to
one at IoU 0.5), so the pictures where it disagrees with the owner come first on the Boxes page.
A picture it agrees with fully (disagreement 0) does not come back for review.

Works beside a running daemon (its own :class:`storage.Store`, one short transaction per
picture); a picture whose media is missing or unreadable costs one line, and the rest go on.
"""
from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scorer import box_metrics
from scorer.box_metrics import iou
from scorer.detect import LBP_URL, Detector, DetectorError
from storage.boxes import Box

SURE_FLOOR = 0.5           # a sure box's confidence is above this, an unsure one's at most this
NO_FACE_CERTAINTY = 0.5    # the certainty of a picture where no detector found a face
MATCH_IOU = 0.5            # a proposed box matches a verified one at this IoU (F1, disagreement)
SIZE_BUCKETS = (600, 1200, 2400)   # longest side (pixels): small, medium, large, huge pictures
HAAR = "haar"              # the proposals' name of OpenCV's Haar frontal-face cascade


# ---- merging (pure) ----------------------------------------------------------------------------
def _xyxy(f) -> tuple[float, float, float, float]:
    return float(f.x1), float(f.y1), float(f.x2), float(f.y2)


@dataclass
class _Cluster:
    members: list[tuple[str, object]] = field(default_factory=list)   # (detector name, face)

    @property
    def names(self) -> set[str]:
        return {n for n, _ in self.members}

    @property
    def box(self) -> tuple[float, float, float, float]:
        boxes = [_xyxy(f) for _, f in self.members]
        return tuple(sum(b[i] for b in boxes) / len(boxes) for i in range(4))


def merge_boxes(found: Mapping[str, Sequence], threshold: float = 0.3) -> list[Box]:
    """One box per face from several detectors' boxes (``found``: detector name -> its faces,
    anything with ``x1, y1, x2, y2, confidence``). Boxes are taken most confident first; each
    joins the face (of those it overlaps with IoU above ``threshold`` and that no box of the same
    detector joined yet) it overlaps most, else starts a face of its own; two boxes of one
    detector are never one face. A face's box is the mean of its boxes, its ``origin`` the
    detectors that found it (comma separated, sorted); found by two or more it is ``sure`` with
    confidence ``0.5 + 0.5 * mean confidence``, else unsure with ``0.5 * confidence``. Empty
    boxes are left out. Most confident first."""
    items = [(name, f) for name, faces in found.items() for f in faces if f.x2 > f.x1 and f.y2 > f.y1]
    items.sort(key=lambda t: (-float(t[1].confidence), t[0]))
    clusters: list[_Cluster] = []
    for name, face in items:
        best, best_iou = None, threshold
        for c in clusters:
            if name in c.names:
                continue
            v = iou(c.box, _xyxy(face))
            if v > best_iou:
                best, best_iou = c, v
        if best is None:
            best = _Cluster()
            clusters.append(best)
        best.members.append((name, face))
    boxes = []
    for c in clusters:
        x1, y1, x2, y2 = (round(v) for v in c.box)
        if x2 <= x1 or y2 <= y1:
            continue
        mean = sum(min(1.0, max(0.0, float(f.confidence))) for _, f in c.members) / len(c.members)
        sure = len(c.names) >= 2
        boxes.append(Box(x1, y1, x2, y2, origin=",".join(sorted(c.names)), sure=sure,
                         confidence=SURE_FLOOR + (1 - SURE_FLOOR) * mean if sure else SURE_FLOOR * mean))
    return sorted(boxes, key=lambda b: -b.confidence)


def picture_certainty(boxes: Sequence[Box]) -> float:
    """How sure a picture's merged proposals are (0..1): its least certain box's confidence
    (at most 0.5 as soon as one box is unsure), or :data:`NO_FACE_CERTAINTY` without boxes."""
    if not boxes:
        return NO_FACE_CERTAINTY
    return min(b.confidence for b in boxes)


def f1_score(proposed: Sequence, truth: Sequence, threshold: float = MATCH_IOU) -> float:
    """F1 of ``proposed`` boxes against ``truth`` boxes, matched one to one (the most confident
    proposal first, each to the unmatched true box it overlaps most, at IoU ``threshold`` or more:
    ``box_metrics.match``).
    1.0 when both are empty."""
    if not proposed and not truth:
        return 1.0
    matches = box_metrics.match([(_xyxy(p), float(getattr(p, "confidence", 1.0))) for p in proposed],
                                [_xyxy(t) for t in truth], threshold)
    return 2 * sum(hit for _, hit in matches) / (len(proposed) + len(truth))


# ---- which pictures ----------------------------------------------------------------------------
def _spread_key(image_id: int) -> int:
    """A fixed, well-mixed order of pictures (so runs repeat, and neighbours by id are apart)."""
    return int(hashlib.sha256(f"bootstrap:{image_id}".encode()).hexdigest()[:12], 16)


def _bucket(width, height) -> int:
    side = max(int(width or 0), int(height or 0))
    return sum(side >= s for s in SIZE_BUCKETS)


def _round_robin(groups: Iterable[list]) -> list:
    """The first of each group, then the second of each, and so on."""
    groups = [list(g) for g in groups if g]
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def pick_pictures(store, limit: int, exclude: Iterable[int] = ()) -> list[dict]:
    """Up to ``limit`` stored pictures (rows: id, source_id, media_path, width, height) for
    proposals, not in ``exclude``: downloaded ones whose media is there (not pruned, not a
    duplicate, not failed), taken in turn from each source, and within a source in turn from
    each size (:data:`SIZE_BUCKETS`), in a fixed mixed order."""
    exclude = set(int(i) for i in exclude)
    rows = [dict(r) for r in store.db.query(
        "SELECT id, source_id, media_path, width, height FROM images WHERE media_path IS NOT NULL "
        "AND media_pruned_at IS NULL AND status NOT IN ('duplicate', 'near_duplicate', 'failed') "
        "AND width > 0 AND height > 0")]
    by_source: dict = {}
    for r in rows:
        if r["id"] not in exclude:
            by_source.setdefault(r["source_id"], {}).setdefault(_bucket(r["width"], r["height"]), []).append(r)
    per_source = []
    for source in sorted(by_source, key=lambda s: (s is None, s or 0)):
        buckets = [sorted(b, key=lambda r: _spread_key(r["id"])) for _, b in sorted(by_source[source].items())]
        per_source.append(_round_robin(buckets))
    return _round_robin(per_source)[:max(0, int(limit))]


def pruned_count(store, exclude: Iterable[int] = ()) -> int:
    """Stored pictures passed over because their media was pruned (not in ``exclude``)."""
    exclude = set(int(i) for i in exclude)
    ids = [r[0] for r in store.db.execute("SELECT id FROM images WHERE media_pruned_at IS NOT NULL")]
    return sum(i not in exclude for i in ids)


# ---- the detectors -----------------------------------------------------------------------------
def own_detector(cfg, version: str, **common) -> Detector:
    """The owner's own YOLO detector ``version`` (its ``weights.pt``), at the confidence it runs
    at in the daemon, so its boxes here are the ones it would find there."""
    from scorer.detect import YoloDetector
    from scorer.own_detector import operating_confidence, weights_of

    common = dict(common, min_confidence=operating_confidence(cfg.paths, version, common["min_confidence"]))
    return YoloDetector(str(weights_of(cfg.paths, version)), config_dir=cfg.data_path / "ultralytics", **common)


def bootstrap_detectors(cfg, say: Callable[[str], None] = print) -> list[tuple[str, Detector]]:
    """(name, detector) of every detector at hand: animeface, lbp (with ``detector.cascade``),
    haar, and ``own:VERSION`` when an own detector is active. One that cannot be set up is left
    out with one line through ``say`` saying why."""
    from PIL import Image

    from scorer.detect import AnimeFaceDetector, LBPDetector, OpenCVDetector, animeface_raw
    from scorer.own_detector import PREFIX, active_version

    d = cfg.detector
    common = dict(min_confidence=d.min_confidence, min_size=d.min_size, max_side=d.max_side, time_cap=0.0)
    out: list[tuple[str, Detector]] = []

    def add(name: str, build: Callable[[], Detector]) -> None:
        try:
            out.append((name, build()))
        except (DetectorError, ImportError, OSError) as e:
            say(f"{name}: not used: {e}")

    def animeface() -> Detector:
        animeface_raw(Image.new("RGB", (32, 32)))       # the extension loads (DetectorError if not)
        return AnimeFaceDetector(**common)

    add("animeface", animeface)
    if d.cascade:
        add("lbp", lambda: LBPDetector(d.cascade, **common))
    else:
        say(f"lbp: not used: detector.cascade is not set (download lbpcascade_animeface.xml from {LBP_URL} "
            "and set detector.cascade to its path)")
    add(HAAR, lambda: OpenCVDetector(**common))
    version = active_version(cfg.paths)
    if version is not None:
        add(PREFIX + version, lambda: own_detector(cfg, version, **common))
    return out


# ---- the run -----------------------------------------------------------------------------------
@dataclass
class Summary:
    pictures: int = 0          # new pictures given proposals
    boxes: int = 0
    sure: int = 0
    no_face: int = 0
    skipped: int = 0           # media missing or unreadable (or the own detector failed on a verified one)
    seconds: float = 0.0       # detection time, all pictures
    checked: int = 0           # verified pictures the own detector checked
    disagreeing: int = 0       # ... of which it disagrees with (disagreement > 0)
    pruned: int = 0            # pictures passed over: media pruned

    def line(self, detectors: str) -> str:
        n = self.pictures + self.checked
        per = f"{self.seconds / n:.2f} s per picture" if n else "no picture detected"
        sure = f"{100 * self.sure / self.boxes:.0f}% sure" if self.boxes else "none sure"
        text = (f"proposed boxes for {self.pictures} picture(s) with {detectors}: {self.boxes} box(es), {sure}, "
                f"{self.no_face} picture(s) without a face; {per}")
        if self.checked:
            text += f"; checked {self.checked} verified picture(s), {self.disagreeing} disagree"
        if self.skipped:
            text += f"; {self.skipped} skipped (media missing or unreadable, or the detector failed)"
        if self.pruned:
            text += f"; {self.pruned} passed over (media pruned)"
        return text


def _detect(name: str, det: Detector, im, side: int, image_id: int, say) -> list | None:
    """The detector's faces in the picture, or None (said in one line) when it fails on it."""
    try:
        return det.detect(im, side=side)
    except Exception as e:  # noqa: BLE001 - one detector failing on one picture must not stop the run
        say(f"picture #{image_id}: {name} failed on it: {e}")
        return None


def run_bootstrap(store, cfg, detectors: list[tuple[str, Detector]], limit: int, *, progress: bool | None = None,
                  say: Callable[[str], None] | None = None) -> Summary:
    """Propose boxes for up to ``limit`` new pictures with ``detectors``; with an own detector
    among them (``own:VERSION``), check the verified pictures it has not checked yet first.
    ``store``: a sync :class:`storage.Store`. ``progress``: a bar on stderr (None: on a terminal)."""
    from tqdm import tqdm

    from scorer.own_detector import PREFIX
    from storage.media import BadImage, load_media

    show = sys.stderr.isatty() if progress is None else progress
    side = cfg.detector.max_side
    threshold = cfg.detector.merge_iou
    summary = Summary()
    own = next(((n, d) for n, d in detectors if n.startswith(PREFIX)), None)
    recheck = [p for p in store.verified_box_pictures() if p.proposed_by != own[0] and p.media_path] if own else []
    taken = store.box_picture_ids()
    new = pick_pictures(store, limit, exclude=taken)
    summary.pruned = pruned_count(store, exclude=taken)
    proposed_by = "+".join(n for n, _ in detectors)
    bar = tqdm(total=len(recheck) + len(new), desc="proposing boxes", unit="pic", file=sys.stderr, disable=not show)
    write = say or (lambda line: tqdm.write(line, file=sys.stdout))

    def load(image_id: int, rel: str):
        try:
            return load_media(cfg.media_path, rel, max_pixels=cfg.download.max_pixels)
        except (OSError, BadImage) as e:
            why = "its media file is missing" if isinstance(e, FileNotFoundError) else (
                e.strerror if isinstance(e, OSError) and e.strerror else str(e))
            write(f"picture #{image_id}: skipped: {why}")
            summary.skipped += 1
            return None

    try:
        for pic in recheck:                                   # the second round: own vs verified
            im = load(pic.image_id, pic.media_path)
            if im is not None:
                start = time.perf_counter()
                faces = _detect(own[0], own[1], im, side, pic.image_id, write)
                summary.seconds += time.perf_counter() - start
                if faces is None:                             # no answer is no disagreement
                    summary.skipped += 1
                    bar.update(1)
                    continue
                boxes = [Box(f.x1, f.y1, f.x2, f.y2, origin=own[0], confidence=f.confidence)
                         for f in faces if f.x2 > f.x1 and f.y2 > f.y1]
                dis = 1.0 - f1_score(boxes, pic.verified)
                store.propose_boxes(pic.image_id, boxes, proposed_by=own[0], certainty=1.0 - dis, disagreement=dis)
                summary.checked += 1
                summary.disagreeing += dis > 0
            bar.update(1)
        for row in new:
            im = load(row["id"], row["media_path"])
            if im is not None:
                start = time.perf_counter()
                found = {name: _detect(name, det, im, side, row["id"], write) for name, det in detectors}
                summary.seconds += time.perf_counter() - start
                boxes = merge_boxes({n: f for n, f in found.items() if f is not None}, threshold)
                store.propose_boxes(row["id"], boxes, proposed_by=proposed_by, certainty=picture_certainty(boxes))
                summary.pictures += 1
                summary.boxes += len(boxes)
                summary.sure += sum(b.sure for b in boxes)
                summary.no_face += not boxes
            bar.update(1)
    finally:
        bar.close()
    return summary


def cli_bootstrap(cfg, args) -> int:
    """``detector bootstrap [--limit N]``: propose boxes, print a summary line."""
    from storage import Store

    limit = getattr(args, "limit", 200)
    if limit is None or limit < 0:
        print("error: --limit: expected 0 or a positive number of pictures", file=sys.stderr)
        return 2
    if not Path(cfg.db_path).exists():
        print(f"error: no database at {cfg.db_path}: no stored pictures to propose boxes for yet "
              "(run the daemon first, or import-labels)", file=sys.stderr)
        return 1
    detectors = bootstrap_detectors(cfg)
    if not detectors:
        raise DetectorError("no detector could be set up to propose boxes (see the lines above)")
    with Store.open(cfg.db_path) as store:
        summary = run_bootstrap(store, cfg, detectors, limit)
        counts = store.box_counts()
    print(summary.line("+".join(n for n, _ in detectors)))
    if counts["to_review"]:
        print(f"{counts['to_review']} picture(s) to review on the gallery's Boxes page (/boxes); "
              f"{counts['verified']} verified so far")
    elif not summary.pictures and not summary.checked:
        print("no stored picture left to propose boxes for")
    return 0
