"""Train, evaluate and switch the owner's own YOLO face detector (``python main.py detector ...``).

- ``detector train``: the verified box set (storage/boxes.py) written in YOLO format under
  ``data/detectors/dataset/`` (pictures linked from the media folder, one label file each: class 0,
  centre and size as shares of the picture), training = verified pictures not held out, plus the
  proposed pictures at least ``detector.train_proposals`` certain (0, the default: none), val = the
  held-out verified ones. ultralytics YOLO is built from its yaml (``yolov8n.yaml``, ``yolo11n.yaml``:
  no weights are downloaded; offline as ``scorer.detect.prepare_ultralytics`` sets it up; ``amp``
  off, ``plots`` off, no data-loader processes on CPU; CUDA when present), one progress bar tick per
  epoch. It trains in a hidden folder ``data/detectors/.train-<version>-<pid>/`` that becomes
  ``data/detectors/<version>/`` (``weights.pt``, ``metrics.json``) only once everything is done,
  by one rename: a run killed half way leaves no version and the detector in use unchanged (its
  leftover folder is removed by the next run).
- ``metrics.json``: mAP50 and mAP50-95 on the held-out pictures (computed by scorer/box_metrics.py,
  as ``detector eval`` computes them for every detector), precision and recall at the version's
  operating confidence ``confidence`` (the one it runs with once in use: the best-F1 point of its
  held-out curve, or under ``detector.auto`` the point that gives the most recall at the active
  detector's precision), pictures used, epochs, imgsz, model, seconds.
- ``detector.auto``: the new version is used only when it beats the active detector (the configured
  one, or the own version in use) by :func:`scorer.box_metrics.promotion`: *recall at equal
  precision* on the held-out pictures, both detectors run on them now.
- ``detector eval``: the own detector (active, else the newest) and each bootstrap detector at
  hand (animeface; lbp when ``detector.cascade`` is set; opencv) on the same held-out pictures:
  precision and recall at their operating confidence, mAP50, mAP50-95 (from confidence-ranked
  boxes), milliseconds per picture; a table and a PNG of their precision-recall curves under
  ``data/eval/detectors/``.
- ``detector use VERSION|config`` and ``detector list`` (scorer/own_detector.py keeps the versions
  and the ``ACTIVE`` file; a running daemon notices a switch, bot/detector_watch.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from scorer import box_metrics, own_detector
from scorer.detect import DetectorConfig, DetectorError, make_detector
from scorer.progress import pid_alive

MIN_TRAIN = 8          # verified training pictures a run needs at least
MIN_HELDOUT = 2        # and held-out verified pictures to measure it on
DEFAULT_EPOCHS = 50
DATASET = "dataset"    # data/detectors/dataset: the last run's dataset, in YOLO format
TMP_PREFIX = ".train-"
BOOTSTRAP = ("animeface", "lbp", "opencv")


class DetectorTrainError(Exception):
    """A detector command that cannot go on; the message says why (printed as one line)."""


@dataclass
class Sample:
    """A picture of the box set as training and evaluation read it."""
    image_id: int
    path: Path              # the media file
    width: int
    height: int
    boxes: list[tuple[int, int, int, int]]


def samples(pictures, media_root: str | Path, kind: str = "verified") -> list[Sample]:
    """:class:`Sample` of each ``storage.boxes.BoxPicture`` whose media file is still there, with
    its ``verified`` or ``proposed`` boxes."""
    out = []
    for p in pictures:
        if not p.media_path or not p.width or not p.height:
            continue
        path = Path(media_root) / p.media_path
        if path.is_file():
            out.append(Sample(p.image_id, path.resolve(), p.width, p.height,
                              [b.xyxy for b in getattr(p, kind)]))
    return out


def yolo_label(sample: Sample) -> str:
    """The sample's YOLO label file: ``0 cx cy w h`` per box, shares of the picture's size."""
    lines = []
    for x1, y1, x2, y2 in sample.boxes:
        x1, x2 = max(0, x1), min(sample.width, x2)
        y1, y2 = max(0, y1), min(sample.height, y2)
        if x2 <= x1 or y2 <= y1:
            continue
        lines.append(f"0 {(x1 + x2) / 2 / sample.width:.6f} {(y1 + y2) / 2 / sample.height:.6f} "
                     f"{(x2 - x1) / sample.width:.6f} {(y2 - y1) / sample.height:.6f}")
    return "".join(line + "\n" for line in lines)


def write_dataset(root: Path, train: list[Sample], val: list[Sample]) -> Path:
    """Write (replace) a YOLO dataset in ``root``: ``{train,val}/images`` (links to the media files,
    copies where links cannot be made), ``{train,val}/labels``, and ``data.yaml``; returns its path."""
    if root.exists():
        shutil.rmtree(root)
    for split, items in (("train", train), ("val", val)):
        images, labels = root / split / "images", root / split / "labels"
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for s in items:
            target = images / f"{s.image_id}{s.path.suffix.lower() or '.jpg'}"
            try:
                target.symlink_to(s.path)
            except OSError:
                shutil.copyfile(s.path, target)
            (labels / f"{s.image_id}.txt").write_text(yolo_label(s))
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: train/images\nval: val/images\nnames:\n  0: face\n")
    return data


def new_version(paths) -> str:
    """A version name from the time (UTC), e.g. ``d20261203-151500`` (``-2``... when taken)."""
    base = "d" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while (paths.detectors / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def clean_leftovers(paths) -> list[str]:
    """Remove the folders of training runs that were killed (their process is gone)."""
    gone = []
    if not paths.detectors.is_dir():
        return gone
    for d in paths.detectors.iterdir():
        if d.is_dir() and d.name.startswith(TMP_PREFIX):
            pid = d.name.rsplit("-", 1)[-1]
            if pid.isdigit() and pid_alive(int(pid)):
                continue
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    return gone


# ---- running a detector on held-out pictures -------------------------------------------------
def detect_samples(detector, items: list[Sample], max_pixels: int = 90_000_000):
    """``([(predictions, true boxes)] per picture, seconds per picture)``: the detector's boxes
    with their confidences on each picture."""
    from storage.media import decode_image

    pairs, seconds = [], 0.0
    for s in items:
        im = decode_image(s.path.read_bytes(), max_pixels=max_pixels)
        start = time.perf_counter()
        faces = detector.detect(im)
        seconds += time.perf_counter() - start
        pairs.append(([((f.x1, f.y1, f.x2, f.y2), f.confidence) for f in faces], s.boxes))
    return pairs, seconds / max(1, len(items))


def curve_config(cfg: DetectorConfig) -> DetectorConfig:
    """``cfg`` keeping every box it could ever run with: the whole precision-recall curve from
    confidence 0 up (an own version's from ``own_detector.MIN_CONFIDENCE``, the least it runs
    at, so its curve promises nothing it cannot do in use); no time cap."""
    return replace(cfg, min_confidence=confidence_floor(cfg), time_cap=0.0)


def confidence_floor(cfg: DetectorConfig) -> float:
    """The least confidence the detector ``cfg`` names can run at: an own version's floor
    (its weights are in a folder of the data folder's ``detectors/``), else 0."""
    if cfg.name == "yolo" and cfg.weights and Path(cfg.weights).parent.parent.name == "detectors":
        return own_detector.MIN_CONFIDENCE
    return 0.0


def measure(cfg: DetectorConfig, items: list[Sample], data_dir: Path, max_pixels: int = 90_000_000):
    """``(Scores, seconds per picture)`` of the detector ``cfg`` names on ``items``; precision and
    recall at ``cfg.min_confidence``."""
    det = make_detector(curve_config(cfg), data_dir)
    det.detect(_warm_picture())                      # the first call loads things: not timed
    pairs, per = detect_samples(det, items, max_pixels)
    return box_metrics.score(pairs, cfg.min_confidence), per


def _warm_picture():
    from PIL import Image
    return Image.new("RGB", (64, 64), (128, 128, 128))


def operating_confidence(curve: box_metrics.Curve, precision: float | None = None) -> float:
    """The confidence a version runs with: the point of its held-out curve with the most recall at
    ``precision`` or more (given), else the best-F1 point; 0.25 when the curve is empty; never
    below ``own_detector.MIN_CONFIDENCE`` (its curve starts there: :func:`curve_config`)."""
    best, best_key = 0.25, None
    for p, r, c in zip(curve.precision, curve.recall, curve.confidence):
        if precision is not None:
            key = (r, p) if p >= precision - 1e-9 else None
        else:
            key = (2 * p * r / (p + r) if p + r else 0.0, r)
        if key is not None and (best_key is None or key > best_key):
            best, best_key = c, key
    return max(own_detector.MIN_CONFIDENCE, math.floor(best * 1e4) / 1e4)   # down: the chosen point stays in


# ---- train -----------------------------------------------------------------------------------
def training_data(store, cfg) -> tuple[list[Sample], list[Sample], int]:
    """(training samples, held-out samples, how many of the training ones are confident proposals).
    DetectorTrainError when there are too few verified pictures."""
    train = samples(store.verified_box_pictures(holdout=False), cfg.media_path)
    val = samples(store.verified_box_pictures(holdout=True), cfg.media_path)
    if len(train) < MIN_TRAIN or len(val) < MIN_HELDOUT:
        raise DetectorTrainError(_too_few(len(train), len(val)))
    extra = []
    if cfg.detector.train_proposals > 0:
        extra = samples(store.proposed_box_pictures(cfg.detector.train_proposals), cfg.media_path, "proposed")
    return train + extra, val, len(extra)


def batch_size(pictures: int) -> int:
    """Pictures per step: 16, fewer for a small set so that an epoch still has several steps
    (ultralytics warms up over the first 100 steps at least)."""
    return max(2, min(16, pictures // 6))


def _too_few(train: int, val: int) -> str:
    return (f"too few verified pictures to train a detector: {train} for training and {val} held out, "
            f"at least {MIN_TRAIN} and {MIN_HELDOUT} are needed (about {5 * max(MIN_TRAIN, 4 * MIN_HELDOUT) // 4} "
            "verified in all; one in five is held out): propose boxes with `python main.py detector bootstrap`, "
            "then check and accept them on the gallery's Boxes page")


def device() -> str:
    import torch
    return "0" if torch.cuda.is_available() else "cpu"


def train_yolo(data_yaml: Path, out: Path, *, model: str, epochs: int, imgsz: int, batch: int, config_dir: Path,
               progress: bool = True, on_epoch=None) -> Path:
    """Train ultralytics YOLO from ``model`` (a yaml: built from scratch, nothing downloaded) into
    ``out``; returns the last weights. A tqdm bar moves once per epoch; ``on_epoch(trainer)`` is
    called after each (bench/detector.py times them)."""
    os.environ.setdefault("YOLO_VERBOSE", "False")    # its own per-batch bars and logs: ours is per epoch
    from tqdm import tqdm

    from scorer.detect import yolo_class

    if not model.endswith((".yaml", ".yml")):
        raise DetectorTrainError(f"--model must be an ultralytics model yaml such as yolov8n.yaml or yolo11n.yaml "
                                 f"(training starts from scratch; no weights are downloaded), got {model!r}")
    YOLO = yolo_class(config_dir)
    try:
        net = YOLO(model, task="detect")
    except Exception as e:  # noqa: BLE001 - an unknown yaml raises FileNotFoundError or others
        raise DetectorTrainError(f"cannot build the model {model!r}: {e}") from None
    dev = device()
    bar = tqdm(total=epochs, desc="training the detector", unit="epoch", file=sys.stderr,
               disable=not progress)

    def epoch_end(trainer):
        loss = getattr(trainer, "tloss", None)
        try:
            bar.set_postfix(loss=f"{float(loss.sum()):.3f}")
        except (AttributeError, TypeError, ValueError):
            pass
        bar.update(1)
        if on_epoch is not None:
            on_epoch(trainer)

    net.add_callback("on_train_epoch_end", epoch_end)
    quiet = logging.getLogger("ultralytics")      # also when ultralytics was imported before YOLO_VERBOSE
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        net.train(data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, device=dev,
                  workers=0 if dev == "cpu" else min(4, os.cpu_count() or 1), amp=False, plots=False,
                  val=False, project=str(out), name="run", exist_ok=True, verbose=False, patience=0)
    finally:
        bar.close()
        quiet.setLevel(level)
    weights = out / "run" / "weights" / "last.pt"
    if not weights.is_file():
        raise DetectorTrainError("training ended without weights (see the log above)")
    return weights


def train_detector(cfg, *, epochs: int | None = None, model: str = "yolov8n.yaml", imgsz: int = 640,
                   progress: bool = True, say=print) -> dict:
    """``detector train``: dataset, training, held-out metrics, a new version (and, under
    ``detector.auto``, its promotion). Returns the version's metrics with ``version``,
    ``promoted`` and ``reason``."""
    from scorer import threads
    from storage import Store

    epochs = epochs or DEFAULT_EPOCHS
    if epochs <= 0 or imgsz < 32:
        raise DetectorTrainError(f"--epochs must be positive and --imgsz at least 32, got {epochs} and {imgsz}")
    paths = cfg.paths
    if not cfg.db_path.exists():      # no data folder yet: refuse without creating one
        raise DetectorTrainError(_too_few(0, 0))
    with Store.open(cfg.db_path) as store:
        train, val, proposals = training_data(store, cfg)
    threads.apply(cfg.scorer.threads)
    paths.detectors.mkdir(parents=True, exist_ok=True)
    clean_leftovers(paths)
    data_yaml = write_dataset(paths.detectors / DATASET, train, val)
    version = new_version(paths)
    tmp = paths.detectors / f"{TMP_PREFIX}{version}-{os.getpid()}"
    say(f"training detector {version} ({model}, imgsz {imgsz}, {epochs} epochs) on {len(train)} pictures"
        + (f" ({proposals} of them confident proposals)" if proposals else "") + f"; {len(val)} held out")
    start = time.monotonic()
    try:
        weights = train_yolo(data_yaml, tmp, model=model, epochs=epochs, imgsz=imgsz, batch=batch_size(len(train)),
                             config_dir=paths.root / "ultralytics", progress=progress)
        seconds = time.monotonic() - start
        shutil.copyfile(weights, tmp / own_detector.WEIGHTS)
        own_cfg = replace(cfg.detector, name="yolo", weights=str(tmp / own_detector.WEIGHTS))
        scores, per = measure(own_cfg, val, paths.root, cfg.download.max_pixels)
        metrics = {"version": version, "model": model, "imgsz": imgsz, "epochs": epochs,
                   "train_pictures": len(train), "proposal_pictures": proposals, "heldout_pictures": len(val),
                   "seconds": round(seconds, 1), "ms_per_picture": round(per * 1000, 1),
                   "device": "cuda" if device() != "cpu" else "cpu",
                   "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        promoted, reason, confidence = False, "", operating_confidence(scores.curve)
        if cfg.detector.auto:
            active = own_detector.effective_detector(cfg.detector, paths)
            name = _label(active, paths)
            try:
                active_scores, _ = measure(active, val, paths.root, cfg.download.max_pixels)
            except DetectorError as e:
                promoted, reason = True, f"the active detector {name} cannot run ({e})"
            else:
                promoted, reason = box_metrics.promotion(scores, active_scores)
                reason = f"{reason} ({name})"
                if promoted:
                    confidence = operating_confidence(scores.curve, active_scores.precision or 0.0)
        precision, recall = at_confidence(scores.curve, confidence)
        metrics.update(confidence=confidence, precision=_round(precision), recall=_round(recall),
                       **{k: v for k, v in scores.as_dict().items() if k in ("mAP50", "mAP50-95", "true_boxes")})
        (tmp / own_detector.METRICS).write_text(json.dumps(metrics, indent=1))
        shutil.rmtree(tmp / "run", ignore_errors=True)
        os.replace(tmp, paths.detectors / version)         # the version exists from here on, whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"detector {version}: held-out mAP50 {metrics['mAP50']:.3f}, mAP50-95 {metrics['mAP50-95']:.3f} "
        f"({len(val)} pictures, {scores.true_boxes} faces); at confidence {confidence:g}: precision "
        f"{_fmt(metrics['precision'])}, recall {_fmt(metrics['recall'])}; trained in {seconds:.0f} s")
    if cfg.detector.auto:
        if promoted:
            own_detector.set_active(paths, version)
            say(f"now in use: {version} ({reason}); a running daemon switches within a minute and "
                "re-detects the stored pictures")
        else:
            say(f"kept, not used: {version} does not beat the active detector: {reason}. "
                f"To use it anyway: python main.py detector use {version}")
    else:
        say(f"to use it: python main.py detector use {version}   (compare first: python main.py detector eval)")
    return {**metrics, "promoted": promoted, "reason": reason}


def at_confidence(curve: box_metrics.Curve, confidence: float) -> tuple[float | None, float]:
    """(precision, recall) of the boxes at ``confidence`` or more, read off the curve (precision
    None when there is none)."""
    kept = [i for i, c in enumerate(curve.confidence) if c >= confidence]
    return (curve.precision[kept[-1]], curve.recall[kept[-1]]) if kept else (None, 0.0)


def _round(x):
    return None if x is None else round(x, 4)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _label(cfg: DetectorConfig, paths) -> str:
    version = own_detector.active_version(paths)
    if cfg.name == "yolo" and version and Path(cfg.weights) == own_detector.weights_of(paths, version):
        return own_detector.PREFIX + version
    return cfg.name


# ---- the CLI ---------------------------------------------------------------------------------
def cli_train(cfg, args) -> int:
    try:
        train_detector(cfg, epochs=args.epochs, model=args.model, imgsz=args.imgsz)
    except KeyboardInterrupt:
        print("interrupted; no new detector, the one in use is unchanged", file=sys.stderr)
        raise
    return 0


def cli_use(cfg, args) -> int:
    paths = cfg.paths
    if args.version == "config":
        own_detector.set_active(paths, None)
        print(f"detector in use: the configured one ({cfg.detector.name}); a running daemon switches within "
              "30 s and re-detects the stored pictures")
        return 0
    reason = own_detector.unusable_reason(paths, args.version) if args.version in own_detector.versions(paths) else None
    if reason and not getattr(args, "force", False):
        raise DetectorTrainError(reason)
    try:
        own_detector.set_active(paths, args.version)
    except ValueError as e:
        raise DetectorTrainError(str(e)) from None
    print(f"detector in use: {args.version}; a running daemon switches within 30 s and re-detects the "
          "stored pictures ('detector use config' goes back)")
    return 0


def cli_list(cfg, args) -> int:
    paths = cfg.paths
    active = own_detector.active_version(paths)
    print(f"{'*' if active is None else ' '} config  {cfg.detector.name} (the [detector] configured)")
    found = own_detector.versions(paths)
    for v in found:
        m = own_detector.metrics_of(paths, v)
        print(f"{'*' if v == active else ' '} {v}  {m.get('model', '?')} imgsz {m.get('imgsz', '?')}  "
              f"{m.get('epochs', '?')} epochs on {m.get('train_pictures', '?')} pictures  held-out "
              f"({m.get('heldout_pictures', '?')}): mAP50 {_num(m.get('mAP50'))} mAP50-95 {_num(m.get('mAP50-95'))} "
              f"precision {_num(m.get('precision'))} recall {_num(m.get('recall'))} at confidence "
              f"{m.get('confidence', '?')}")
    if not found:
        print("  no own detector yet: python main.py detector train")
    return 0


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def candidates(cfg) -> list[tuple[str, DetectorConfig]]:
    """The detectors ``detector eval`` compares: the own one (active, else the newest version), the
    configured one when it is none of the others, animeface, lbp (with ``detector.cascade``), opencv."""
    paths = cfg.paths
    out = []
    version = own_detector.active_version(paths) or (own_detector.versions(paths) or [None])[-1]
    if version:
        conf = own_detector.operating_confidence(paths, version, cfg.detector.min_confidence)
        out.append((own_detector.PREFIX + version, replace(cfg.detector, name="yolo", min_confidence=conf,
                                                           weights=str(own_detector.weights_of(paths, version)))))
    names = [n for n in BOOTSTRAP if n != "lbp" or cfg.detector.cascade]
    if cfg.detector.name not in names:
        names.insert(0, cfg.detector.name)
    out += [(n, replace(cfg.detector, name=n)) for n in names]
    return out


def evaluate_detectors(cfg, say=print) -> tuple[list[dict], Path]:
    """``detector eval``: each of :func:`candidates` on the held-out verified pictures; the rows of
    the table and the PNG of the curves."""
    from storage import Store

    val = []
    if cfg.db_path.exists():          # no data folder yet: nothing to evaluate, and none is created
        with Store.open(cfg.db_path) as store:
            val = samples(store.verified_box_pictures(holdout=True), cfg.media_path)
    if not val:
        raise DetectorTrainError("no held-out verified pictures to evaluate on: propose boxes with "
                                 "`python main.py detector bootstrap` and accept them on the gallery's Boxes page "
                                 "(one verified picture in five is held out)")
    rows = []
    for name, dcfg in candidates(cfg):
        try:
            scores, per = measure(dcfg, val, cfg.paths.root, cfg.download.max_pixels)
        except DetectorError as e:
            say(f"{name}: not evaluated: {e}")
            continue
        rows.append({"detector": name, **scores.as_dict(), "ms_per_picture": round(per * 1000, 1),
                     "confidence": dcfg.min_confidence, "curve": scores.curve})
    out = cfg.eval_path / "detectors" / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    png = plot_curves(rows, out / "precision-recall.png",
                      title=f"{len(val)} held-out verified pictures, {sum(len(s.boxes) for s in val)} faces")
    return rows, png


def format_table(rows: list[dict]) -> str:
    head = f"{'detector':<22} {'precision':>9} {'recall':>7} {'mAP50':>6} {'mAP50-95':>8} {'ms/picture':>10}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['detector']:<22} {_fmt(r['precision']):>9} {_fmt(r['recall']):>7} {_fmt(r['mAP50']):>6} "
                     f"{_fmt(r['mAP50-95']):>8} {r['ms_per_picture']:>10.1f}")
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: Path, title: str = "") -> Path:
    """A PNG of each detector's precision-recall curve (IoU 0.5), its operating point marked."""
    import matplotlib

    from scorer.evaluate import dark_style
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    with dark_style():
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        for r in rows:
            c = r["curve"]
            line, = ax.plot([0.0, *c.recall], [1.0, *c.precision] if c.precision else [1.0], lw=1.6,
                            label=f"{r['detector']} (AP50 {r['mAP50']:.2f})")
            if r["precision"] is not None:
                ax.plot([r["recall"]], [r["precision"]], "o", color=line.get_color())
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"face detectors: precision-recall at IoU 0.5\n{title}", fontsize=10)
        ax.legend(loc="lower left", fontsize=8)
        fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15)
        plt.close(fig)
    return path


def cli_eval(cfg, args) -> int:
    rows, png = evaluate_detectors(cfg)
    print(format_table(rows))
    own = next((r for r in rows if r["detector"].startswith(own_detector.PREFIX)), None)
    anime = next((r for r in rows if r["detector"] == "animeface"), None)
    if own and anime and own["ms_per_picture"] > 0:
        print(f"{own['detector']} is {anime['ms_per_picture'] / own['ms_per_picture']:.1f}x the speed of animeface; "
              f"recall {_fmt(own['recall'])} vs {_fmt(anime['recall'])}")
    print(f"precision-recall curves: {png}")
    return 0
