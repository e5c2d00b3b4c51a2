"""Face detection: one interface, five detectors.

``detector.detect(picture) -> list[Face]`` with boxes in the picture's own pixels and a 0-1
confidence. Every detector downscales large pictures to ``max_side`` first (speed) and maps the
boxes back; with a time cap, pictures predicted to be slow are detected at half that size
(:meth:`Detector.side_for`).

- ``animeface``: the compiled nvxs anime-face detector from the ``animeface`` package (offline).
- ``lbp``: nagadomi's LBP anime-face cascade for OpenCV (``lbpcascade_animeface.xml``, a file
  given by path, ``detector.cascade``): about 4x less CPU than animeface, releases the GIL.
- ``animeface+lbp``: both, boxes merged (:func:`merge_faces`), where recall matters more than CPU.
- ``opencv``: the frontal-face Haar cascade that ships inside opencv, for photographs.
- ``yolo``: an ultralytics YOLO model from a local ``.pt``/``.onnx`` file (offline); ultralytics
  is the optional ``yolo`` extra (``pip install -e ".[yolo]"``), imported only by this detector.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from storage.records import Face

log = logging.getLogger(__name__)

class DetectorError(Exception):
    """The detector cannot be set up; the message says why."""


def _downscale(im: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    scale = min(1.0, max_side / max(im.size))
    if scale < 1.0:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    return im, scale


def _box(x, y, w, h, scale, size, confidence, name) -> Face:
    W, H = size
    x1 = max(0, min(W, int(round(x / scale))))
    y1 = max(0, min(H, int(round(y / scale))))
    x2 = max(0, min(W, int(round((x + w) / scale))))
    y2 = max(0, min(H, int(round((y + h) / scale))))
    return Face(x1, y1, x2, y2, float(confidence), name)


class Detector:
    """Downscale, detect, map back, filter; and the per-picture time cap.

    The time cap (``time_cap`` seconds, 0 = off) is predictive, because a running detection
    cannot be stopped in-process (animeface holds the GIL in one C call): every detection
    updates an estimate of this detector's seconds per megapixel (its wall time over the
    megapixels it searched, a moving average), and a picture whose predicted time at ``max_side``
    exceeds the cap is detected at half ``max_side`` instead. A picture that ran past the cap is
    not detected again (its faces are already found); it raises the estimate, so the next
    pictures of its size go straight to the smaller size. A hard cap (stopping a worker process
    that runs too long) belongs to whoever runs the worker: it can call ``detect(im,
    side=detector.fallback_side)`` again for that picture.
    """
    name = "base"

    def __init__(self, *, min_confidence: float = 0.5, min_size: int = 24, max_side: int = 1600,
                 time_cap: float = 0.0):
        self.min_confidence = min_confidence
        self.min_size = min_size
        self.max_side = max_side
        self.time_cap = time_cap
        self.seconds_per_mpix: float | None = None  # learnt from this detector's own detections
        self.last_seconds = 0.0                     # wall time of the last detection

    @property
    def fallback_side(self) -> int:
        """The detection size for pictures over the time cap: half ``max_side``."""
        return max(1, self.max_side // 2)

    def side_for(self, size: tuple[int, int]) -> int:
        """The detection size for a picture of ``size``: ``max_side``, or :attr:`fallback_side`
        when its predicted detection time at ``max_side`` is over the time cap."""
        if not self.time_cap or self.seconds_per_mpix is None:
            return self.max_side
        scale = min(1.0, self.max_side / max(size))
        predicted = self.seconds_per_mpix * size[0] * size[1] * scale * scale / 1e6
        return self.fallback_side if predicted > self.time_cap else self.max_side

    def detect(self, im: Image.Image, side: int | None = None) -> list[Face]:
        """Faces in ``im``, best first; detected at ``side`` (default: :meth:`side_for`)."""
        small, scale = _downscale(im, side or self.side_for(im.size))
        start = time.perf_counter()
        found = self._detect(small, scale, im.size)
        self._learn(time.perf_counter() - start, small.width * small.height)
        return self._best_first(found)

    def detect_many(self, ims: list[Image.Image]) -> list[list[Face]]:
        """Faces in each of ``ims`` (as :meth:`detect`). A detector that can search several
        pictures in one pass (:attr:`batched`: yolo, on a GPU above all) does so; the others
        detect them one after the other. The time cap's estimate learns from the whole pass."""
        if not self.batched or len(ims) < 2:
            return [self.detect(im) for im in ims]
        smalls = [_downscale(im, self.side_for(im.size)) for im in ims]
        start = time.perf_counter()
        found = self._detect_batch([s for s, _ in smalls], [scale for _, scale in smalls], [im.size for im in ims])
        self._learn(time.perf_counter() - start, sum(s.width * s.height for s, _ in smalls))
        return [self._best_first(faces) for faces in found]

    batched = False   # True: _detect_batch searches several pictures in one pass
    decode_device = None   # a torch device: pictures are decoded there for detect_tensors (yolo on a GPU)

    @property
    def batch_size(self) -> int:
        """How many pictures a caller should hand :meth:`detect_many` at once: 1 for a detector
        that searches one at a time."""
        return 1

    def _detect_batch(self, ims: list[Image.Image], scales: list[float],
                      sizes: list[tuple[int, int]]) -> list[list[Face]]:
        return [self._detect(im, scale, size) for im, scale, size in zip(ims, scales, sizes)]

    def _best_first(self, faces: list[Face]) -> list[Face]:
        """The faces :meth:`_keep` keeps, best first (what every detect method returns)."""
        return sorted(self._keep(faces), key=lambda f: -f.confidence)

    def _keep(self, faces: list[Face]) -> list[Face]:
        """The faces at or above ``min_confidence`` and ``min_size``."""
        return [f for f in faces if f.confidence >= self.min_confidence and min(f.width, f.height) >= self.min_size]

    def _learn(self, seconds: float, pixels: int) -> None:
        self.last_seconds = seconds
        if self.time_cap and seconds > self.time_cap:
            log.info("face detection took %.1f s, over detector.time_cap (%g s), at %.1f megapixels",
                     seconds, self.time_cap, pixels / 1e6)
        rate = seconds / max(pixels / 1e6, 0.01)
        old = self.seconds_per_mpix
        self.seconds_per_mpix = rate if old is None else 0.7 * old + 0.3 * rate

    def _detect(self, im: Image.Image, scale: float, size: tuple[int, int]) -> list[Face]:
        raise NotImplementedError


# ---- animeface -------------------------------------------------------------------------------
class _PillowImaging(ctypes.Structure):
    """The ``ImagingMemoryInstance`` layout of Pillow <= 11, which the animeface wheel was built for.

    animeface's C extension casts the object it is given to Pillow's private ``ImagingObject`` and
    reads ``mode`` (a ``char[7]`` until Pillow 11), ``xsize``, ``ysize`` and the row pointers.
    Pillow 12 turned ``mode`` into an enum, shifting every field, so the extension sees a garbage
    size and finds nothing. A ctypes object's first field after the Python object header is the
    pointer to its own buffer — exactly where the extension reads the ``Imaging`` pointer — so
    passing this structure, filled from our own RGBA buffer, works with any Pillow version.
    """
    _fields_ = [("mode", ctypes.c_char * 7), ("type", ctypes.c_int), ("depth", ctypes.c_int),
                ("bands", ctypes.c_int), ("xsize", ctypes.c_int), ("ysize", ctypes.c_int),
                ("palette", ctypes.c_void_p), ("image8", ctypes.c_void_p), ("image32", ctypes.c_void_p),
                ("image", ctypes.c_void_p), ("block", ctypes.c_void_p), ("blocks", ctypes.c_void_p),
                ("pixelsize", ctypes.c_int), ("linesize", ctypes.c_int), ("destroy", ctypes.c_void_p)]


def animeface_raw(im: Image.Image) -> list[dict]:
    """Run the animeface extension on ``im``; a list of its result dicts."""
    try:
        from animeface import _nvxs
    except ImportError as e:  # pragma: no cover - the package is a dependency
        raise DetectorError(f"the animeface package is not installed: {e}") from None
    rgba = im.convert("RGBA")
    w, h = rgba.size
    line = w * 4
    buf = ctypes.create_string_buffer(rgba.tobytes(), line * h)
    base = ctypes.addressof(buf)
    rows = (ctypes.c_void_p * h)(*[base + y * line for y in range(h)])
    imaging = _PillowImaging(mode=b"RGB", type=0, depth=8, bands=3, xsize=w, ysize=h,
                             image=ctypes.addressof(rows), image32=ctypes.addressof(rows),
                             block=base, pixelsize=4, linesize=line)
    return _nvxs.detect(imaging)


class AnimeFaceDetector(Detector):
    name = "animeface"

    def _detect(self, im, scale, size):
        faces = []
        for r in animeface_raw(im):
            box = r.get("face_box") or r.get("face_pos")
            if isinstance(box[0], (tuple, list)):  # old ((x, y), (w, h)) form
                box = (*box[0], *box[1])
            x, y, w, h = box
            faces.append(_box(x, y, w, h, scale, size, r["likelihood"], self.name))
        return faces


# ---- opencv ----------------------------------------------------------------------------------
class OpenCVDetector(Detector):
    """Haar cascade (frontal faces); the confidence is the sigmoid of the cascade's level weight."""
    name = "opencv"

    def __init__(self, cascade: str | None = None, **kw):
        super().__init__(**kw)
        import cv2
        path = cascade or os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        self._cv2 = cv2
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise DetectorError(f"cannot load the OpenCV cascade {path}")

    def _detect(self, im, scale, size):
        import numpy as np
        cv2 = self._cv2
        gray = cv2.equalizeHist(np.asarray(im.convert("L")))
        rects, _levels, weights = self.cascade.detectMultiScale3(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(max(8, int(self.min_size * scale)),) * 2,
            outputRejectLevels=True)
        faces = []
        for (x, y, w, h), weight in zip(rects, weights):
            conf = 1.0 / (1.0 + math.exp(-float(np.ravel(weight)[0])))
            faces.append(_box(x, y, w, h, scale, size, conf, self.name))
        return faces


# ---- lbp (nagadomi's anime-face cascade) ------------------------------------------------------
LBP_URL = "https://github.com/nagadomi/lbpcascade_animeface"


class LBPDetector(OpenCVDetector):
    """nagadomi's LBP anime-face cascade (``lbpcascade_animeface.xml``, MIT, not shipped with
    opencv: download it from :data:`LBP_URL`), run like the Haar cascade; OpenCV releases the GIL
    while it searches."""
    name = "lbp"

    def __init__(self, cascade: str, **kw):
        path = Path(cascade) if cascade else None
        if path is None or not path.is_file():
            raise DetectorError(f"the LBP cascade file {cascade or '(detector.cascade is empty)'} is missing: "
                                f"download lbpcascade_animeface.xml from {LBP_URL} and set detector.cascade "
                                "to its path")
        try:
            super().__init__(str(path), **kw)
        except Exception:  # noqa: BLE001 - cv2.error, or DetectorError for an empty cascade
            raise DetectorError(f"{path} is not an OpenCV cascade file: expected lbpcascade_animeface.xml "
                                f"from {LBP_URL}") from None


# ---- animeface + lbp -------------------------------------------------------------------------
def iou(a: Face, b: Face) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    ix = max(0, min(a.x2, b.x2) - max(a.x1, b.x1))
    iy = max(0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = ix * iy
    union = a.width * a.height + b.width * b.height - inter
    return inter / union if union > 0 else 0.0


def merge_faces(preferred: list[Face], others: list[Face], threshold: float) -> list[Face]:
    """The union of two detectors' faces with overlap suppression: a face of ``others`` whose IoU
    with a kept face is above ``threshold`` is dropped (the ``preferred`` one is kept); faces
    within one list are kept as their detector gave them."""
    kept = list(preferred)
    for face in sorted(others, key=lambda f: -f.confidence):
        if all(iou(face, k) <= threshold for k in kept):
            kept.append(face)
    return kept


class CombinedDetector(Detector):
    """animeface and LBP on the same downscaled picture, boxes merged by :func:`merge_faces`
    (animeface's preferred: its boxes sit on the face the model was trained with). Each box keeps
    the name of the detector that found it. The same face's two boxes overlap with IoU 0.4-0.9 on
    the shared illustrations, hence the default ``merge_iou`` of 0.3."""
    name = "animeface+lbp"

    def __init__(self, cascade: str, merge_iou: float = 0.3, **kw):
        super().__init__(**kw)
        self.lbp = LBPDetector(cascade, **kw)
        self.animeface = AnimeFaceDetector(**kw)
        self.merge_iou = merge_iou

    def _detect(self, im, scale, size):
        return merge_faces(self._keep(self.animeface._detect(im, scale, size)),
                           self._keep(self.lbp._detect(im, scale, size)), self.merge_iou)


# ---- yolo ------------------------------------------------------------------------------------
YOLO_MISSING = ('the yolo detector needs ultralytics, which is not installed: pip install -e ".[yolo]" '
                "(or choose detector.name = \"animeface\" or \"opencv\")")


def yolo_class(config_dir: str | Path):
    """ultralytics' ``YOLO`` class, set up to work offline (:func:`prepare_ultralytics`).
    ultralytics is optional (the ``yolo`` extra): when it is missing, DetectorError says how to
    install it, before anything is written."""
    if importlib.util.find_spec("ultralytics") is None:
        raise DetectorError(YOLO_MISSING)
    prepare_ultralytics(config_dir)
    try:
        from ultralytics import YOLO
    except ImportError as e:
        raise DetectorError(f'cannot import ultralytics for the yolo detector: {e} '
                            '(reinstall it: pip install -e ".[yolo]")') from None
    quiet = logging.getLogger("ultralytics")        # imported quiet (YOLO_VERBOSE: errors only): warnings count
    for handler in (quiet, *quiet.handlers):
        handler.setLevel(logging.WARNING)
    _unpatch_pillow()
    return YOLO


def _unpatch_pillow() -> None:
    """Undo ultralytics' replacement of ``PIL.Image.open``: on a file Pillow cannot identify, it
    tries to install ``pi-heif`` (a download) and raises ModuleNotFoundError instead of Pillow's
    error, so a corrupt picture stopped being refused as one (storage/media.py) once ultralytics
    was imported."""
    from PIL import Image as PILImage
    try:
        from ultralytics.utils import patches
    except ImportError:  # pragma: no cover - another ultralytics layout
        return
    original = getattr(patches, "_image_open", None)
    if original is not None and PILImage.open is getattr(patches, "image_open", None):
        PILImage.open = original


def prepare_ultralytics(config_dir: str | Path) -> None:
    """Make ultralytics work offline; must run before its first import."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    # quiet at import: its first import in a data folder printed "Creating new Ultralytics Settings
    # ... file ✅" and how to use its own `yolo settings` command into the daemon's log
    os.environ.setdefault("YOLO_VERBOSE", "False")
    settings = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    settings.mkdir(parents=True, exist_ok=True)
    # ultralytics fetches Arial fonts for its plots when they are missing; any TTF will do.
    import matplotlib
    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = settings / name
        if not target.exists() and dejavu.exists():
            target.write_bytes(dejavu.read_bytes())


class YoloDetector(Detector):
    name = "yolo"

    def __init__(self, weights: str, config_dir: str | Path = "data/ultralytics", device: str | None = None, **kw):
        super().__init__(**kw)
        path = Path(weights)
        if not path.is_file():
            raise DetectorError(f"YOLO weights {weights!r} not found: give a local .pt or .onnx file "
                                "(no weights are downloaded)")
        if path.suffix not in (".pt", ".onnx"):
            raise DetectorError(f"YOLO weights must be a .pt or .onnx file, got {path.name}")
        YOLO = yolo_class(config_dir)
        try:
            self.model = YOLO(str(path), task="detect")
        except Exception as e:  # noqa: BLE001 - ultralytics raises many kinds
            raise DetectorError(f"cannot load YOLO weights {weights}: {e}") from None
        self.device = device

    batched = True
    GPU_BATCH = 32   # pictures per pass on a GPU (each is letterboxed to 640 px: ~50 MB of input)
    CPU_BATCH = 4    # on a CPU a larger pass is barely faster and holds more full-size pictures

    @property
    def batch_size(self) -> int:
        device = str(self.device or "")
        if not device:
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return self.GPU_BATCH if device.startswith("cuda") else self.CPU_BATCH

    @property
    def decode_device(self):
        """The torch device pictures are decoded onto for :meth:`detect_tensors` (the GPU the
        model runs on), or None: decode with Pillow and :meth:`detect_many` (on a CPU)."""
        if self._decode_device is None and self.batch_size == self.GPU_BATCH:
            import torch
            self._decode_device = torch.device(self.device or "cuda")
        return self._decode_device

    _decode_device = None   # tests set "cpu" to run the GPU path on a CPU

    def detect_tensors(self, pictures: list) -> list[list[Face]]:
        """Faces in pictures already decoded on :attr:`decode_device` (uint8 RGB tensors, 3 x h x
        w, as ``storage.media.decode_on_device`` gives), in one pass: each is letterboxed there
        to the model's size (as ultralytics does with a picture, gray borders centred), so no
        full-size picture goes through the CPU; the boxes are mapped back to its pixels."""
        import torch
        import torch.nn.functional as F

        if not pictures:
            return []
        imgsz = self._input_side(pictures[0].device)
        batch = torch.full((len(pictures), 3, imgsz, imgsz), 114 / 255, device=pictures[0].device)
        places = []
        for k, t in enumerate(pictures):
            h, w = t.shape[1:]
            r = min(imgsz / h, imgsz / w)
            nh, nw = max(1, round(h * r)), max(1, round(w * r))
            top, left = (imgsz - nh) // 2, (imgsz - nw) // 2
            batch[k, :, top:top + nh, left:left + nw] = F.interpolate(
                t[None].float(), size=(nh, nw), mode="bilinear", antialias=r < 1,
                align_corners=False)[0].clamp_(0, 255) / 255   # over 1.0, ultralytics would divide by 255 again
            places.append((r, left, top, (w, h)))
        start = time.perf_counter()
        results = self.model.predict(batch, imgsz=imgsz, conf=max(0.001, self.min_confidence), verbose=False,
                                     device=batch.device)
        self.last_seconds = time.perf_counter() - start
        found = []
        for res, (r, left, top, size) in zip(results, places):
            faces = [_box(x1 - left, y1 - top, x2 - x1, y2 - y1, r, size, conf, self.name)
                     for (x1, y1, x2, y2), conf in zip(res.boxes.xyxy.tolist(), res.boxes.conf.tolist())]
            found.append(self._best_first(faces))
        return found

    def _input_side(self, device) -> int:
        """The side of the square :meth:`detect_tensors` letterboxes to: a ``.pt`` model's
        training size (its ``imgsz``), or the size an ``.onnx`` file was exported at, which takes
        no other (ultralytics reads it from the file's metadata once its predictor is set up: on
        a first, tiny picture here); 640 for an export that takes any."""
        imgsz = self.model.overrides.get("imgsz")
        if imgsz is None:
            if self.model.predictor is None:
                import numpy as np
                self.model.predict(np.zeros((32, 32, 3), np.uint8), verbose=False, device=device)
            backend = getattr(self.model.predictor, "model", None)
            if not getattr(backend, "dynamic", True):
                imgsz = getattr(backend, "imgsz", None)
        imgsz = imgsz or 640
        return int(max(imgsz) if isinstance(imgsz, (list, tuple)) else imgsz)

    def _detect(self, im, scale, size):
        return self._detect_batch([im], [scale], [size])[0]

    def _detect_batch(self, ims, scales, sizes):
        """One ``predict`` over all the pictures (ultralytics letterboxes them to one batch)."""
        results = self.model.predict(list(ims), conf=max(0.001, self.min_confidence), verbose=False,
                                     device=self.device)
        return [[_box(x1, y1, x2 - x1, y2 - y1, scale, size, conf, self.name)
                 for (x1, y1, x2, y2), conf in zip(r.boxes.xyxy.tolist(), r.boxes.conf.tolist())]
                for r, scale, size in zip(results, scales, sizes)]


DETECTORS = {"animeface": AnimeFaceDetector, "opencv": OpenCVDetector, "yolo": YoloDetector,
             "lbp": LBPDetector, "animeface+lbp": CombinedDetector}


@dataclass
class DetectorConfig:
    """The ``[detector]`` table."""
    name: Literal["animeface", "lbp", "animeface+lbp", "opencv", "yolo"] = "animeface"
    weights: str = ""                     # yolo: local .pt or .onnx file
    cascade: str = ""                     # lbp, animeface+lbp: path to lbpcascade_animeface.xml
    merge_iou: float = 0.3                # animeface+lbp: an LBP box overlapping more is a duplicate
    time_cap: float = 3.0                 # seconds; pictures predicted slower use half max_side (0: off)
    min_confidence: float = 0.5
    margin: float = 0.2                   # crop margin, as a share of the box size
    min_size: int = 24                    # smaller faces (pixels) are ignored
    max_side: int = 1600                  # pictures are downscaled to this for detection
    no_face: Literal["whole", "skip"] = "whole"  # score the whole picture, or skip it
    workers: int = 0                      # daemon's detection processes; 0: half the cores (scorer/detect_pool.py)
    auto: bool = False                    # detector train: use the new own version only when it beats the active one
    train_proposals: float = 0.0          # detector train: add proposed pictures at least this certain (0: none)

    def check(self):
        """(key, problem) for the first bad value, or None."""
        if self.workers < 0:
            return "workers", f"expected 0 (half the cores) or a positive number, got {self.workers!r}"
        if self.max_side <= 0:
            return "max_side", f"expected a positive number, got {self.max_side!r}"
        if not 0 <= self.min_confidence <= 1:
            return "min_confidence", f"expected a number from 0 to 1, got {self.min_confidence!r}"
        if not 0 <= self.margin <= 2:
            return "margin", f"expected a number from 0 to 2, got {self.margin!r}"
        if not 0 <= self.merge_iou < 1:
            return "merge_iou", f"expected a number from 0 to below 1, got {self.merge_iou!r}"
        if not 0 <= self.train_proposals <= 1:
            return "train_proposals", f"expected a certainty from 0 (off) to 1, got {self.train_proposals!r}"
        if self.time_cap < 0:
            return "time_cap", f"expected seconds (0 or more; 0 turns the cap off), got {self.time_cap!r}"
        if self.name == "yolo" and not self.weights:
            return "weights", "the yolo detector needs a local .pt or .onnx file"
        if self.name in ("lbp", "animeface+lbp") and not self.cascade:
            return "cascade", (f"the {self.name} detector needs the path of lbpcascade_animeface.xml "
                               f"(download it from {LBP_URL})")
        return None


def make_detector(cfg: DetectorConfig, data_dir: str | Path = "data") -> Detector:
    """Build the detector named by a :class:`DetectorConfig`."""
    common = dict(min_confidence=cfg.min_confidence, min_size=cfg.min_size, max_side=cfg.max_side,
                  time_cap=cfg.time_cap)
    if cfg.name == "yolo":
        return YoloDetector(cfg.weights, config_dir=Path(data_dir) / "ultralytics", **common)
    if cfg.name == "lbp":
        return LBPDetector(cfg.cascade, **common)
    if cfg.name == "animeface+lbp":
        return CombinedDetector(cfg.cascade, merge_iou=cfg.merge_iou, **common)
    if cfg.name not in DETECTORS:
        raise DetectorError(f"unknown detector {cfg.name!r}")
    return DETECTORS[cfg.name](**common)


def crop_box(face: Face, margin: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The face's box grown by ``margin`` (share of its size) on each side, made square, clipped
    to a ``width`` x ``height`` picture: (left, top, right, bottom), or None when nothing is left."""
    cx, cy = (face.x1 + face.x2) / 2, (face.y1 + face.y2) / 2
    half = max(face.width, face.height) * (1 + 2 * margin) / 2
    box = (max(0, int(cx - half)), max(0, int(cy - half)),
           min(width, int(math.ceil(cx + half))), min(height, int(math.ceil(cy + half))))
    return None if box[2] <= box[0] or box[3] <= box[1] else box


def crop_face(im: Image.Image, face: Face, margin: float) -> Image.Image:
    """The face's :func:`crop_box` of ``im`` (the whole picture when nothing is left)."""
    box = crop_box(face, margin, im.width, im.height)
    return im.copy() if box is None else im.crop(box)
