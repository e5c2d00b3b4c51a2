"""Fake face detectors for the detection worker tests (tests/test_detect_pool.py), in a module of
their own: a worker process imports it to build them, and it imports nothing heavy (no torch)."""
from __future__ import annotations

import ctypes
import os
import signal

from scorer.detect import Detector
from storage.records import Face

POISON = (77, 77)   # a picture of this size kills its worker (see Crasher)


class GilHog(Detector):
    """A detector that holds the GIL for ``seconds`` per picture, as the animeface C extension
    does, then finds one face. A pure-Python loop would not do: the interpreter hands the GIL to
    other threads every few milliseconds. A C function called through ``ctypes.PyDLL`` keeps it
    (a plain ``ctypes.CDLL`` call, like ``time.sleep``, releases it)."""
    name = "hog"

    def __init__(self, seconds: float = 1.0, **kw):
        super().__init__(**kw)
        self.seconds = seconds

    def _detect(self, im, scale, size):
        ctypes.PyDLL(None).usleep(int(self.seconds * 1e6))
        return [Face(0, 0, 40, 40, 0.9, self.name)]


class Crasher(GilHog):
    """A GilHog whose worker process dies on a POISON-sized picture."""

    def _detect(self, im, scale, size):
        if size == POISON:
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._detect(im, scale, size)


HANG = (78, 78)     # a picture of this size never finishes (see Hanger)


class Hanger(GilHog):
    """A GilHog that never returns on a HANG-sized picture, as a stuck detector would."""

    def _detect(self, im, scale, size):
        if size == HANG:
            import time
            time.sleep(3600)
        return super()._detect(im, scale, size)


class Scripted(Detector):
    """A detector that finds the boxes it was given for pictures of a size: ``boxes[(w, h)]``, a
    list of (x1, y1, x2, y2, confidence) in the picture's pixels (none for other sizes); with
    ``fail`` it raises on every picture instead, as a detector breaking on one might."""

    def __init__(self, name: str, boxes: dict | None = None, fail: bool = False, **kw):
        super().__init__(**kw)
        self.name = name
        self.boxes = boxes or {}
        self.fail = fail
        self.seen: list[tuple[int, int]] = []

    def _detect(self, im, scale, size):
        self.seen.append(size)
        if self.fail:
            raise RuntimeError("scripted failure")
        return [Face(x1, y1, x2, y2, c, self.name) for x1, y1, x2, y2, c in self.boxes.get(size, [])]


class SlowWhenLarge(GilHog):
    """A GilHog that never finishes on pictures it is asked to search above ``limit`` pixels a
    side (and ``always`` on a HANG-sized picture, at any size), as animeface crawls on a huge
    picture full of faces."""

    def __init__(self, seconds: float = 0.05, limit: int = 100, **kw):
        super().__init__(seconds, **kw)
        self.limit = limit

    def _detect(self, im, scale, size):
        if max(im.size) > self.limit or size == HANG:
            import time
            time.sleep(3600)
        return super()._detect(im, scale, size)


class Batched(Scripted):
    """A :class:`Scripted` detector that searches several pictures in one pass (as yolo does),
    ``batch`` at a time, recording how many pictures each pass took."""
    batched = True

    def __init__(self, name: str, boxes: dict | None = None, batch: int = 4, **kw):
        super().__init__(name, boxes, **kw)
        self.batch = batch
        self.passes: list[int] = []

    @property
    def batch_size(self) -> int:
        return self.batch

    def _detect_batch(self, ims, scales, sizes):
        self.passes.append(len(ims))
        return super()._detect_batch(ims, scales, sizes)


class OnDevice(Batched):
    """A :class:`Batched` detector that takes pictures decoded on a torch device (the CPU here),
    as yolo on a GPU does (``decode_device``, ``detect_tensors``), recording each pass's size."""

    def __init__(self, name: str, boxes: dict | None = None, batch: int = 4, **kw):
        super().__init__(name, boxes, batch, **kw)
        import torch
        self.decode_device = torch.device("cpu")
        self.tensor_passes: list[int] = []

    def detect_tensors(self, pictures):
        self.tensor_passes.append(len(pictures))
        sizes = [(int(t.shape[2]), int(t.shape[1])) for t in pictures]
        return [self._keep(self._detect(None, 1.0, size)) for size in sizes]
