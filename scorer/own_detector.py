"""The owner's own YOLO face detectors, trained on the box set (storage/boxes.py).

Each trained detector is a version folder under the data folder's ``detectors/``::

    data/detectors/d20261203-151500/weights.pt     the trained ultralytics model
    data/detectors/d20261203-151500/metrics.json   how it did on the held-out verified pictures
    data/detectors/ACTIVE                          the version in use (absent: the configured detector)

While a version is active it replaces the configured ``[detector]`` (``detector use VERSION``;
``detector use config`` goes back); everything else in ``[detector]`` (sizes, margin, workers)
still applies. A version folder without ``weights.pt`` (a training run that did not finish) is
not a version.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from scorer.detect import DetectorConfig
from storage.paths import DataPaths

WEIGHTS = "weights.pt"
METRICS = "metrics.json"
ACTIVE = "ACTIVE"
PREFIX = "own:"        # detector names of own versions in proposals and reports: "own:VERSION"
CONFIG = "config"      # images.detector_version before the configured detector was named (see tag)


def versions(paths: DataPaths) -> list[str]:
    """Finished versions, oldest first."""
    root = paths.detectors
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / WEIGHTS).is_file())


def weights_of(paths: DataPaths, version: str) -> Path:
    return paths.detectors / version / WEIGHTS


def metrics_of(paths: DataPaths, version: str) -> dict:
    """A version's recorded metrics ({} when it has none)."""
    try:
        return json.loads((paths.detectors / version / METRICS).read_text())
    except (OSError, ValueError):
        return {}


def active_version(paths: DataPaths) -> str | None:
    """The own version in use, or None (the configured detector is used). A recorded version
    whose weights are gone counts as none."""
    try:
        version = (paths.detectors / ACTIVE).read_text().strip()
    except OSError:
        return None
    return version if version and weights_of(paths, version).is_file() else None


def set_active(paths: DataPaths, version: str | None) -> None:
    """Make ``version`` the detector in use (None: back to the configured one); written
    atomically. ValueError for a version that does not exist."""
    target = paths.detectors / ACTIVE
    if version is None:
        target.unlink(missing_ok=True)
        return
    if version not in versions(paths):
        known = ", ".join(versions(paths)) or f"none yet in {paths.detectors} (python main.py detector train)"
        raise ValueError(f"no detector version {version!r} (versions: {known})")
    tmp = target.with_name(ACTIVE + ".tmp")
    tmp.write_text(version + "\n")
    os.replace(tmp, target)


def effective_detector(cfg: DetectorConfig, paths: DataPaths) -> DetectorConfig:
    """The ``[detector]`` settings actually in use: the configured ones, with the active own
    version (if any) as a ``yolo`` detector in place of the configured one, at the operating
    confidence its training chose (``confidence`` in its metrics; else ``min_confidence``)."""
    version = active_version(paths)
    if version is None:
        return cfg
    return replace(cfg, name="yolo", weights=str(weights_of(paths, version)),
                   min_confidence=operating_confidence(paths, version, cfg.min_confidence))


MIN_CONFIDENCE = 0.1     # an own detector never runs below this: a weak one finds nothing, not hundreds of boxes
MIN_USABLE_MAP50 = 0.1   # `detector use` refuses a version below this held-out mAP50 (unless --force)


def operating_confidence(paths: DataPaths, version: str, default: float) -> float:
    """The confidence an own version runs at: the one its training chose on the held-out
    pictures (``confidence`` in its metrics; else ``default``), never below
    :data:`MIN_CONFIDENCE`."""
    confidence = metrics_of(paths, version).get("confidence")
    if not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
        confidence = default
    return max(MIN_CONFIDENCE, float(confidence))


def unusable_reason(paths: DataPaths, version: str) -> str | None:
    """Why a version is not fit for use (its held-out mAP50 under :data:`MIN_USABLE_MAP50`), or None."""
    m = metrics_of(paths, version)
    map50 = m.get("mAP50")
    if isinstance(map50, (int, float)) and map50 < MIN_USABLE_MAP50:
        return (f"{version} finds almost no face right on the held-out pictures (mAP50 {map50:.3f}, "
                f"precision {m.get('precision', 0) or 0:.3f}, recall {m.get('recall', 0) or 0:.3f}); verify more "
                "pictures on the Boxes page and train longer (--epochs), or add --force to use it anyway")
    return None


def tag(paths: DataPaths, detector: DetectorConfig) -> str:
    """What the detector in use is called in ``images.detector_version`` (migration m011): the
    active own version as ``own:VERSION``, else the configured ``detector`` as ``config:NAME``
    (``config:yolo:FILE@FINGERPRINT`` for a weights file, :func:`_weights_id`), so that changing
    ``detector.name`` (or the yolo weights) in the config is a switch too. Pictures stored before the configured
    detector was named carry ``config`` (or NULL): the daemon takes them as detected by the
    configured detector it starts with (``Store.adopt_detector_tag``)."""
    version = active_version(paths)
    if version:
        return PREFIX + version
    return f"{CONFIG}:{detector.name}" + (f":{_weights_id(detector.weights)}" if detector.name == "yolo" else "")


def _weights_id(weights: str) -> str:
    """A yolo weights file as a tag part: its name and a short fingerprint of where it is, its size
    and when it was written (ultralytics names every run's weights ``best.pt``; a file copied
    over the old one is another detector too)."""
    import hashlib

    path = Path(weights)
    try:
        st = path.stat()
    except OSError:
        return path.name
    mark = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return f"{path.name}@{hashlib.sha1(mark).hexdigest()[:8]}"

