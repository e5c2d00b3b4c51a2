"""Face detection in worker processes (scorer/detect_pool.py): the daemon's loop stays responsive
while a detector holds the GIL, the workers find the same faces as in-process detection, and a
worker that dies is replaced without hanging the daemon or leaving processes behind."""
from __future__ import annotations

import asyncio
import functools
import io
import os
import signal
import subprocess
import sys
import time

from PIL import Image

from bot.daemon import Daemon
from scorer.detect import DetectorConfig, make_detector
from scorer.detect_pool import DetectionFailed, DetectionPool, faces_or_whole
from tests.fake_detectors import HANG, POISON, Crasher, GilHog, Hanger, SlowWhenLarge
from tests.helpers import ROOT, SHARED, make_config, picture, wait_for

def _image(seed: int, size=(160, 120)) -> Image.Image:
    return Image.open(io.BytesIO(picture(seed, size))).convert("RGB")


async def test_the_loop_stays_responsive_while_a_gil_holding_detector_runs(tmp_path):
    cfg = make_config(tmp_path)
    daemon = Daemon(cfg)
    await daemon.start()
    daemon.detection = daemon.pipeline.detection = DetectionPool(functools.partial(GilHog, 1.0))
    lags: list[float] = []
    try:
        await daemon.detection.detect(_image(0))   # the worker is started before measuring
        for i in range(3):
            (tmp_path / "inbox" / f"{i}.jpg").write_bytes(picture(i))
        started = time.monotonic()

        async def all_scored():
            while True:
                rows = await daemon.store.execute("SELECT id FROM images WHERE status = 'scored'")
                if len(rows) == 3:
                    return
                asked = time.monotonic() + 0.05
                await asyncio.sleep(0.05)
                lags.append(time.monotonic() - asked)
        await asyncio.wait_for(all_scored(), timeout=30)
        took = time.monotonic() - started
        faces = await daemon.store.execute("SELECT DISTINCT detector FROM faces")
        measured = [lag for at, lag in daemon.loop_monitor.lags if at >= started]   # the daemon's own probe
    finally:
        await daemon.stop()
    assert [f["detector"] for f in faces] == ["hog"]
    assert took >= 3                                # three seconds of GIL held in the worker...
    assert max(lags) < 0.3, max(lags)               # ...and the loop never waited for it
    assert len(measured) > 20 and max(measured) < 300, measured


async def test_workers_find_the_same_faces_as_in_process_detection():
    real = sorted((SHARED / "illustrations").glob("*.jpg"), key=lambda p: p.stat().st_size)[:4]
    pictures = [Image.open(p).convert("RGB") for p in real] or [_image(i, (400, 300)) for i in range(4)]
    cfg = DetectorConfig(workers=2)
    serial = [faces_or_whole(make_detector(cfg).detect(im), im, cfg.no_face) for im in pictures]
    pool = DetectionPool.from_config(cfg, "data")
    try:
        parallel = await pool.detect_all(pictures)
    finally:
        await pool.close()
    assert parallel == serial
    if real:
        assert any(f.detector == "animeface" for faces in serial for f in faces)


async def test_a_worker_killed_mid_picture_is_replaced_and_the_picture_tried_again():
    pool = DetectionPool(functools.partial(GilHog, 2.0))
    try:
        await pool.detect(_image(0))
        (first,) = pool.pids()
        task = asyncio.ensure_future(pool.detect(_image(1)))
        await asyncio.sleep(0.5)
        os.kill(first, signal.SIGKILL)
        faces = await asyncio.wait_for(task, timeout=20)
        assert [f.detector for f in faces] == ["hog"] and pool.restarts == 1
        assert pool.pids() and first not in pool.pids()
    finally:
        await pool.close()


async def test_a_picture_that_kills_its_worker_fails_alone_and_nothing_hangs():
    pool = DetectionPool(functools.partial(Crasher, 0.2))
    try:
        found = await asyncio.wait_for(
            pool.detect_all([_image(0), _image(1, POISON), _image(2)]), timeout=30)
        assert [f.detector for f in found[0]] == ["hog"] and [f.detector for f in found[2]] == ["hog"]
        assert isinstance(found[1], DetectionFailed) and "crashed on this picture twice" in str(found[1])
        assert [f.detector for f in await pool.detect(_image(3))] == ["hog"]    # a new worker goes on
        pids = pool.pids()
    finally:
        await pool.close()
    assert pids and not any(_alive(pid) for pid in pids)    # closed: no worker left


async def test_a_picture_whose_detection_never_ends_is_given_up_and_its_worker_replaced():
    pool = DetectionPool(functools.partial(Hanger, 0.1), hang_seconds=2)
    try:
        stuck = await asyncio.wait_for(pool.detect_all([_image(1, HANG)]), timeout=30)
        assert isinstance(stuck[0], DetectionFailed) and "ran past 2 s" in str(stuck[0])
        found = await asyncio.wait_for(pool.detect_all([_image(0), _image(2)]), timeout=30)
        assert all([f.detector for f in faces] == ["hog"] for faces in found)    # a new worker goes on
        assert pool.restarts == 1
    finally:
        await pool.close()


async def test_a_picture_past_the_hard_cap_is_detected_again_smaller_and_others_wait_for_no_one():
    pool = DetectionPool(functools.partial(SlowWhenLarge, 0.05, 100, max_side=160, min_size=1), workers=1,
                         hard_cap=1.5, fallback_side=80)
    try:
        t = time.monotonic()
        # eight pictures for one worker: the cap counts detection time, not the wait for a free worker
        found = await asyncio.wait_for(pool.detect_all([_image(i, (90, 90)) for i in range(8)]), timeout=60)
        assert all([f.detector for f in faces] == ["hog"] for faces in found) and pool.overruns == 0
        slow = await asyncio.wait_for(pool.detect_all([_image(1, (150, 150)), _image(2, (90, 90))]), timeout=60)
        assert [f.detector for f in slow[0]] == ["hog"] and [f.detector for f in slow[1]] == ["hog"]
        assert pool.overruns == 1 and pool.restarts >= 1          # its worker replaced, found at 80 px
        stuck = await asyncio.wait_for(pool.detect_all([_image(3, HANG)]), timeout=60)
        assert isinstance(stuck[0], DetectionFailed) and "at full and at half size (80 px)" in str(stuck[0])
        assert time.monotonic() - t < 30
    finally:
        await pool.close()


async def test_pictures_beside_one_past_the_hard_cap_are_not_failed_with_it():
    # Stopping an overrunning worker stops the pool (ProcessPoolExecutor cannot stop one worker):
    # the pictures in flight on the other one are tried again, not counted as crashing.
    pool = DetectionPool(functools.partial(Hanger, 0.8, min_size=1), workers=2, hard_cap=1.5, fallback_side=80)
    try:
        found = await asyncio.wait_for(
            pool.detect_all([_image(0, HANG)] + [_image(i, (90 + i, 90)) for i in range(1, 6)]), timeout=120)
        assert isinstance(found[0], DetectionFailed) and "at full and at half size" in str(found[0])
        assert [type(f).__name__ for f in found[1:]] == ["list"] * 5, found
        assert all([x.detector for x in f] == ["hog"] for f in found[1:])
    finally:
        await pool.close()


def test_the_hard_cap_follows_the_time_cap():
    pool = DetectionPool.from_config(DetectorConfig(time_cap=3.0, max_side=1600), "data")
    assert (pool.hard_cap, pool.fallback_side) == (12.0, 800)
    assert DetectionPool.from_config(DetectorConfig(time_cap=0), "data").hard_cap == 0


async def test_the_daemon_fails_a_picture_that_kills_its_worker_and_scores_the_others(tmp_path):
    cfg = make_config(tmp_path)
    daemon = Daemon(cfg)
    await daemon.start()
    daemon.detection = daemon.pipeline.detection = DetectionPool(functools.partial(Crasher, 0.1))
    try:
        (tmp_path / "inbox" / "bad.jpg").write_bytes(picture(1, POISON))
        (tmp_path / "inbox" / "good.jpg").write_bytes(picture(2))

        seen: set[int] = set()

        async def settled():
            seen.update(daemon.detection.pids())
            rows = await daemon.store.execute("SELECT status, error FROM images ORDER BY status")
            return rows if [r["status"] for r in rows] == ["failed", "scored"] else None
        failed, _ = await wait_for(settled, timeout=30)
        assert "crashed on this picture twice" in failed["error"]
        seen.update(daemon.detection.pids())
    finally:
        await daemon.stop()
    assert seen and not any(_alive(pid) for pid in seen)


def test_a_worker_exits_when_its_daemon_is_killed():
    script = ("import asyncio, functools, sys, time\n"
              "from scorer.detect_pool import DetectionPool\n"
              "from PIL import Image\n"
              "from tests.fake_detectors import GilHog\n"
              "pool = DetectionPool(functools.partial(GilHog, 0.01))\n"
              "asyncio.run(pool.detect(Image.new('RGB', (64, 64))))\n"
              "print(*pool.pids(), flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        (worker,) = map(int, proc.stdout.readline().split())
        assert _alive(worker)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
