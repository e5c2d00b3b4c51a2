"""How well a face detector finds the verified boxes: IoU matching, precision-recall curves, AP.

Plain functions on plain boxes (``(x1, y1, x2, y2)`` tuples), used by ``detector train`` (the
held-out mAP of a new version), ``detector eval`` (every detector on the same held-out pictures)
and the promotion rule of ``detector.auto`` (:func:`promotion`).

- :func:`match`: a picture's predicted boxes, best first, each matched greedily to the unmatched
  true box it overlaps most (IoU at least the threshold): a true positive, else a false positive.
- :func:`pr_curve`: the matches of all pictures, ranked by confidence: precision and recall at
  each rank (the curve a detector traces as its confidence threshold goes down).
- :func:`average_precision`: the area under the curve's precision envelope (all points, as VOC
  2010+ and COCO do, without COCO's 101-point sampling); mAP50 is AP at IoU 0.5, mAP50-95 the
  mean AP over IoU 0.50, 0.55, ..., 0.95 (one class: a face).
- :func:`recall_at_precision`: the most recall a curve reaches at a precision of at least ``p``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

Box = tuple[float, float, float, float]
IOU_STEPS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))   # 0.50 ... 0.95


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(preds: list[tuple[Box, float]], truths: list[Box], threshold: float = 0.5) -> list[tuple[float, bool]]:
    """``(confidence, true positive)`` for each predicted ``(box, confidence)`` of one picture.
    Predictions are taken best first; each takes the unmatched true box it overlaps most, if that
    IoU is at least ``threshold``; a true box is matched once (a second box on the same face is a
    false positive)."""
    free = list(range(len(truths)))
    out = []
    for box, conf in sorted(preds, key=lambda p: -p[1]):
        best, best_iou = None, threshold
        for k in free:
            v = iou(box, truths[k])
            if v >= best_iou:
                best, best_iou = k, v
        if best is not None:
            free.remove(best)
        out.append((float(conf), best is not None))
    return out


@dataclass
class Curve:
    """A precision-recall curve: one point per prediction, by falling confidence."""
    precision: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    n_true: int = 0


def pr_curve(matches: list[tuple[float, bool]], n_true: int) -> Curve:
    """The curve of all pictures' :func:`match` results, ``n_true`` true boxes in all."""
    tp = fp = 0
    curve = Curve(n_true=n_true)
    for conf, hit in sorted(matches, key=lambda m: -m[0]):
        tp, fp = tp + hit, fp + (not hit)
        curve.precision.append(tp / (tp + fp))
        curve.recall.append(tp / n_true if n_true else 0.0)
        curve.confidence.append(conf)
    return curve


def average_precision(curve: Curve) -> float:
    """Area under the precision envelope (precision made non-increasing in recall), all points.
    0 when there is no true box or no prediction."""
    if not curve.n_true or not curve.precision:
        return 0.0
    precision = [*curve.precision, 0.0]
    recall = [*curve.recall, curve.recall[-1]]
    for i in range(len(precision) - 2, -1, -1):          # the envelope: best precision at this recall or more
        precision[i] = max(precision[i], precision[i + 1])
    ap, last = 0.0, 0.0
    for p, r in zip(precision, recall):
        if r > last:
            ap += (r - last) * p
            last = r
    return ap


def recall_at_precision(curve: Curve, p: float) -> float:
    """The most recall the curve reaches at a precision of at least ``p`` (0 if never)."""
    return max((r for prec, r in zip(curve.precision, curve.recall) if prec >= p - 1e-9), default=0.0)


@dataclass
class Scores:
    """A detector's results on a set of pictures with true boxes."""
    curve: Curve                      # at IoU 0.5, every box the detector gave
    map50: float
    map50_95: float
    precision: float | None           # at its own confidence threshold (None: it found nothing)
    recall: float
    pictures: int
    true_boxes: int

    def as_dict(self) -> dict:
        def r(x):
            return None if x is None else round(x, 4)
        return {"mAP50": r(self.map50), "mAP50-95": r(self.map50_95), "precision": r(self.precision),
                "recall": r(self.recall), "pictures": self.pictures, "true_boxes": self.true_boxes}


def score(pictures: list[tuple[list[tuple[Box, float]], list[Box]]], min_confidence: float = 0.0) -> Scores:
    """:class:`Scores` of ``(predictions, true boxes)`` pairs, one per picture. Precision and
    recall are those at ``min_confidence`` (the detector's operating point); the curve and the APs
    use every prediction."""
    n_true = sum(len(t) for _, t in pictures)
    aps = []
    curve = Curve(n_true=n_true)
    for thr in IOU_STEPS:
        c = pr_curve([m for preds, truths in pictures for m in match(preds, truths, thr)], n_true)
        aps.append(average_precision(c))
        if thr == 0.5:
            curve = c
    kept = [m for preds, truths in pictures for m in match([p for p in preds if p[1] >= min_confidence], truths)]
    tp = sum(hit for _, hit in kept)
    return Scores(curve=curve, map50=aps[0], map50_95=sum(aps) / len(aps),
                  precision=tp / len(kept) if kept else None, recall=tp / n_true if n_true else 0.0,
                  pictures=len(pictures), true_boxes=n_true)


def promotion(new: Scores, active: Scores) -> tuple[bool, str]:
    """Whether a new detector should replace the active one, and why (``detector.auto``).

    The rule: *recall at equal precision*. The active detector works at its operating point
    (precision P, recall R at its confidence threshold, on the held-out pictures); the new one is
    better when, somewhere on its precision-recall curve, it reaches precision P or more with a
    recall above R. An active detector that found nothing has P = 0 and R = 0: any new one that
    finds a face beats it. No held-out true box: nothing to decide on, not promoted."""
    if not active.true_boxes or not new.true_boxes:
        return False, "no held-out verified face to compare on"
    p = active.precision or 0.0
    r_new = recall_at_precision(new.curve, p)
    head = f"recall {r_new:.3f} at precision >= {p:.3f} vs the active detector's {active.recall:.3f}"
    if r_new > active.recall:
        return True, head
    return False, head
