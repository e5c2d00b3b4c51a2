import asyncio
import shutil
import time
from datetime import datetime, timezone

import pytest
from aiohttp import web

from bot.daemon import Daemon
from storage import Store
from tests.fakes import FakeBooru
from tests.helpers import SHARED, make_config, picture, wait_for


async def booru_answering(serve, handler, *, name: str, interval: float) -> str:
    """Serve ``handler`` as a Danbooru /posts.json; return the [[sources]] table for it."""
    app = web.Application()
    app.router.add_get("/posts.json", handler)
    base = await serve(app)
    return f'''
[[sources]]
name = "{name}"
kind = "booru"
url = "{base}"
interval = {interval}
'''


async def test_picture_dropped_into_inbox_is_stored_with_faces_and_score(tmp_path):
    cfg = make_config(tmp_path)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        real = sorted(SHARED.glob("illustrations/grapeot_*.jpg"))
        if real:
            shutil.copy(real[0], tmp_path / "inbox" / "art.jpg")
        else:
            (tmp_path / "inbox" / "art.jpg").write_bytes(picture(1))
        started = time.monotonic()

        async def scored():
            rows = await daemon.store.execute("SELECT * FROM images WHERE status = 'scored'")
            return rows
        (row,) = await wait_for(scored, timeout=10)
        assert time.monotonic() - started < 10
        faces = await daemon.store.faces_of(row["id"])
        assert faces and all(f["score"] is not None for f in faces)
        assert 1 <= row["score"] <= 5 and row["model_version"] == "resnet18-random-init"
        if real:
            assert faces[0]["detector"] == "animeface"
        assert (cfg.media_path / row["media_path"]).exists()
    finally:
        await daemon.stop()
    # everything survives the stop
    store = Store.open(cfg.db_path)
    assert store.status_counts() == {"scored": 1}


async def test_remote_source_bad_downloads_and_duplicates_do_not_stop_the_daemon(tmp_path, serve):
    fake = FakeBooru(0)
    base_ref = [""]
    app = fake.app(base_ref)

    async def html_as_image(request):
        return web.Response(text="<html>blocked</html>", content_type="text/html")

    async def lying(request):
        return web.Response(body=b"<html>not really</html>", content_type="image/jpeg")

    async def truncated(request):
        return web.Response(body=picture(5)[:300], content_type="image/jpeg")

    async def posts(request):
        base = base_ref[0]
        urls = [f"{base}/img/1.jpg", f"{base}/html", f"{base}/lying", f"{base}/truncated",
                f"{base}/img/1.jpg", f"{base}/img/2.jpg"]
        return web.json_response([{"id": i + 1, "rating": "g", "file_url": u, "tag_string": "a",
                                   "md5": "0" * 32, "score": 1} for i, u in enumerate(urls)])

    app.router.add_get("/html", html_as_image)
    app.router.add_get("/lying", lying)
    app.router.add_get("/truncated", truncated)
    app.router.add_get("/api/posts.json", posts)
    base_ref[0] = base = await serve(app)
    cfg = make_config(tmp_path, f'''
[[sources]]
name = "booru"
kind = "booru"
api = "danbooru"
url = "{base}/api"
interval = 60
''')
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        async def settled():
            counts = await daemon.store.status_counts()
            return counts if sum(counts.values()) == 6 and not counts.get("pending") \
                and not counts.get("downloaded") else None
        counts = await wait_for(settled, timeout=20)
        assert counts == {"scored": 2, "failed": 3, "duplicate": 1}
        errors = {r["media_url"].rsplit("/", 1)[-1]: r["error"] for r in
                  await daemon.store.execute("SELECT media_url, error FROM images WHERE status = 'failed'")}
        assert "text/html, not a picture" in errors["html"]
        assert "HTML" in errors["lying"]
        assert "truncated" in errors["truncated"]
        (tmp_path / "inbox" / "late.png").write_bytes(picture(7, fmt="PNG"))  # still alive
        await wait_for(lambda: _count(daemon, "scored", 3))
    finally:
        await daemon.stop()


async def _count(daemon, status, n):
    return (await daemon.store.status_counts()).get(status, 0) >= n


async def test_failing_source_backs_off_and_turns_unhealthy_without_blocking_others(tmp_path, serve):
    hits = {"n": 0}

    async def broken(request):
        hits["n"] += 1
        return web.Response(status=503)

    source = await booru_answering(serve, broken, name="down", interval=0.5)
    cfg = make_config(tmp_path, source, unhealthy_after=1)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        async def unhealthy():
            row = await daemon.store.get_source("down")
            return row if not row["healthy"] else None
        row = await wait_for(unhealthy)
        assert "server error 503" in row["last_error"]
        (tmp_path / "inbox" / "a.jpg").write_bytes(picture(3))
        await wait_for(lambda: _count(daemon, "scored", 1))
        await asyncio.sleep(2)
        assert hits["n"] == 1  # backed off (>= 8s), not polled every 0.5s
    finally:
        await daemon.stop()


async def test_rate_limit_retry_after_is_honoured(tmp_path, serve):
    hits = []

    async def limited(request):
        hits.append(time.time())
        return web.Response(status=429, headers={"Retry-After": "40"})

    cfg = make_config(tmp_path, await booru_answering(serve, limited, name="busy", interval=30))
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        row = await wait_for(lambda: _source_where(daemon, "busy", lambda r: r["failures"] >= 1))
        assert "rate limited (429)" in row["last_error"]
        # Retry-After (40s) + jitter: longer than this failure's backoff (24-36s), under backoff_max (60s)
        assert 39.5 <= _seconds_after(row["next_poll_at"], hits[0]) <= 43.5
        await asyncio.sleep(2)
        assert len(hits) == 1
    finally:
        await daemon.stop()


async def _source_where(daemon, name, predicate):
    row = await daemon.store.get_source(name)
    return row if row is not None and predicate(row) else None


def _seconds_after(iso: str, then: float) -> float:
    return datetime.fromisoformat(iso).timestamp() - then


# What hostile servers answered with a 429, and the wait that follows it: at least the source's own
# backoff (first failure, interval 0.5: 10s * 0.8-1.2) and at most daemon.backoff_max (60s here).
BACKOFF, BACKOFF_MAX = (7.5, 13.5), (59.0, 61.5)
HOSTILE_429 = {
    "minus": ({"Retry-After": "-5"}, BACKOFF),
    "zero": ({"Retry-After": "0"}, BACKOFF),
    "nan": ({"Retry-After": "nan"}, BACKOFF),
    "garbage": ({"Retry-After": "after lunch"}, BACKOFF),
    "inf": ({"Retry-After": "inf"}, BACKOFF_MAX),
    "huge": ({"Retry-After": "1e20"}, BACKOFF_MAX),
    "year": ({"Retry-After": "31536000"}, BACKOFF_MAX),
    "y2099": ({"Retry-After": "Thu, 01 Jan 2099 00:00:00 GMT"}, BACKOFF_MAX),
    "reset-inf": ({"X-RateLimit-Reset": "inf"}, BACKOFF_MAX),
    "reset-2099": ({"X-RateLimit-Reset": "4070908800"}, BACKOFF_MAX),
    "reset-minus": ({"RateLimit-Reset": "-5"}, BACKOFF),
}


async def test_hostile_rate_limit_delays_are_bounded_by_the_backoff_and_backoff_max(tmp_path, serve):
    hits: dict[str, list[float]] = {name: [] for name in HOSTILE_429}

    async def limited(request):
        name = request.match_info["name"]
        hits[name].append(time.time())
        return web.Response(status=429, headers=HOSTILE_429[name][0])

    app = web.Application()
    app.router.add_get("/{name}/posts.json", limited)
    base = await serve(app)
    cfg = make_config(tmp_path, "".join(f'''
[[sources]]
name = "{name}"
kind = "booru"
url = "{base}/{name}"
interval = 0.5
''' for name in HOSTILE_429))
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        for name in HOSTILE_429:
            await wait_for(lambda name=name: _source_where(daemon, name, lambda r: r["failures"] >= 1), timeout=15)
        await asyncio.sleep(4)  # without a backoff, a 0.5s source would have been polled again
        for name, (_, (low, high)) in HOSTILE_429.items():
            row = await daemon.store.get_source(name)
            assert len(hits[name]) == 1, (name, len(hits[name]))
            assert row["failures"] == 1 and row["healthy"], name
            assert row["last_error"].startswith("rate limited (429)"), (name, row["last_error"])
            assert low <= _seconds_after(row["next_poll_at"], hits[name][0]) <= high, (name, row["next_poll_at"])
            job = daemon.scheduler.get_job(f"poll:{name}")
            assert job.next_run_time == datetime.fromisoformat(row["next_poll_at"]), name
    finally:
        await daemon.stop()


async def test_a_retry_time_stored_far_ahead_is_capped_at_backoff_max_on_restart(tmp_path, serve):
    hits = []

    async def down(request):
        hits.append(request.path)
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/{name}/posts.json", down)
    base = await serve(app)
    names = ("y2099", "unreadable", "naive")
    cfg = make_config(tmp_path, "".join(f'''
[[sources]]
name = "{name}"
kind = "booru"
url = "{base}/{name}"
interval = 30
''' for name in names))
    from bot.manage import sync_config_sources
    with Store.open(cfg.db_path) as store:
        sync_config_sources(store, cfg)
        for name, stored in zip(names, ("2099-01-01T00:00:00+00:00", "not a time", "2099-01-01T00:00:00")):
            with store.db.conn:
                store.db.execute("UPDATE sources SET next_poll_at = ?, failures = 4 WHERE name = ?", [stored, name])
    daemon = Daemon(cfg)
    started = datetime.now(timezone.utc)
    await daemon.start()
    try:
        jobs = {name: daemon.scheduler.get_job(f"poll:{name}") for name in names}
        for name in ("y2099", "naive"):
            wait = (jobs[name].next_run_time - started).total_seconds()
            assert 59 <= wait <= 62, (name, wait)       # daemon.backoff_max, not 2099
        await wait_for(lambda: _source_where(daemon, "unreadable", lambda r: r["failures"] >= 5))
        await asyncio.sleep(1)
        assert hits == ["/unreadable/posts.json"]
    finally:
        await daemon.stop()


async def test_a_failure_count_too_large_for_the_backoff_formula_still_records_the_failure(tmp_path, serve):
    hits = []

    async def down(request):
        hits.append(time.time())
        return web.Response(status=503)

    cfg = make_config(tmp_path, await booru_answering(serve, down, name="dead", interval=0.5))
    from bot.manage import sync_config_sources
    with Store.open(cfg.db_path) as store:
        sync_config_sources(store, cfg)
        with store.db.conn:
            store.db.execute("UPDATE sources SET failures = 5000 WHERE name = 'dead'")
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        row = await wait_for(lambda: _source_where(daemon, "dead", lambda r: r["failures"] > 5000))
        assert "server error 503" in row["last_error"] and not row["healthy"]
        assert 47 <= _seconds_after(row["next_poll_at"], hits[0]) <= 61   # backoff_max * 0.8-1, never more
        await asyncio.sleep(2)
        assert len(hits) == 1
    finally:
        await daemon.stop()


async def _hits(hits, n):
    return len(hits) >= n


async def test_work_left_pending_by_a_stop_resumes_on_restart(tmp_path):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.db_path)
    sid = store.upsert_source("inbox", "folder", {"interval": 0.5, "options": {"path": str(tmp_path / "inbox")}})
    (tmp_path / "x.jpg").write_bytes(picture(11))
    from storage.store import NewItem
    store.save_poll(sid, [NewItem(external_id="x", local_path=str(tmp_path / "x.jpg"))], {})
    store.close()
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await wait_for(lambda: _count(daemon, "scored", 1))
    finally:
        await daemon.stop()


class _SlowAnalyzer:
    """An analyzer that waits before analysing, to widen a race on purpose."""

    def __init__(self, inner, wait: float, fail: bool = False):
        self.inner, self.wait, self.fail = inner, wait, fail
        self.scorer = inner.scorer

    def analyze(self, pictures, found=None):
        time.sleep(self.wait)
        if self.fail:
            raise RuntimeError("the import was killed")
        return self.inner.analyze(pictures, found)


def _ratings_folder(root, seeds) -> None:
    for i in seeds:
        folder = root / str(1 + i % 5)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"crop{i}.jpg").write_bytes(picture(100 + i))


async def test_an_import_beside_a_running_daemon_keeps_its_crops(tmp_path):
    from scorer.analyze import build_analyzer
    from scorer.import_labels import import_labels, read_rating_rows
    from tests.helpers import cli

    cfg = make_config(tmp_path)
    daemon = Daemon(cfg)
    await daemon.start()
    # the daemon analyses slowly: had it taken an imported picture, it would record its faces last
    daemon.pipeline.analyzer = _SlowAnalyzer(daemon.pipeline.analyzer, 3)

    def import_with(folder, wait, fail=False):
        with Store.open(cfg.db_path) as store:
            analyzer = _SlowAnalyzer(build_analyzer(store, cfg.detector, cfg.scorer, cfg.paths), wait, fail)
            rows, _ = read_rating_rows(folder)
            return import_labels(store, analyzer, rows, cfg.media_path, crops=True, progress=False)

    try:
        # an import whose analysis starts after the daemon looked for work (every second)
        _ratings_folder(tmp_path / "a", range(0, 4))
        report = await asyncio.to_thread(import_with, tmp_path / "a", 1.5)
        assert report.new_pictures == 4 and report.labels_added == 4
        # an import killed between storing its pictures and recording their analysis
        _ratings_folder(tmp_path / "b", range(4, 7))
        try:
            await asyncio.to_thread(import_with, tmp_path / "b", 0, True)
        except RuntimeError:
            pass
        await asyncio.sleep(2.5)
        left = await daemon.store.execute("SELECT status FROM images WHERE status != 'scored'")
        assert [r["status"] for r in left] == ["importing"] * 3      # kept aside, not analysed by the daemon
        # the next import of the same files (and new ones), through the command line
        _ratings_folder(tmp_path / "all", range(0, 10))
        out = await asyncio.to_thread(cli, tmp_path, "import-labels", tmp_path / "all", "--crops")
        assert out.returncode == 0, out.stderr
        assert "6 new picture(s), 4 already stored" in out.stdout
        await asyncio.sleep(1.5)
        images = await daemon.store.execute("SELECT id, status FROM images")
        assert len(images) == 10 and {r["status"] for r in images} == {"scored"}
        for r in images:
            faces = await daemon.store.faces_of(r["id"])
            assert [f["detector"] for f in faces] == ["crop"], r
        assert daemon.stats["scored"] == 0
        labels = await daemon.store.execute("SELECT COUNT(*) AS n FROM labels WHERE removed_at IS NULL")
        assert labels[0]["n"] == 14     # 4 from the first import, then one per file of the last
    finally:
        await daemon.stop()


def _canvas(crops) -> bytes:
    """A JPEG with each face crop pasted side by side (the detector finds one face per crop)."""
    import io

    from PIL import Image

    im = Image.new("RGB", (400, 300), "white")
    for k, path in enumerate(crops):
        im.paste(Image.open(path).convert("RGB").resize((160, 160)), (20 + 200 * k, 60))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


async def test_booru_character_tag_names_the_lone_face_weakly(tmp_path, serve):
    from tests.helpers import shared

    crops = sorted(shared("animeface-10", "train", "000_hatsune_miku").glob("*.png"))[:5]
    fake = FakeBooru(5)
    fake.characters = {1: ["hatsune_miku"], 2: ["hatsune_miku", "kagamine_rin"], 3: ["hatsune_miku"],
                       4: ["saber_(fate/stay_night)"]}
    fake.images = {1: _canvas(crops[:1]), 2: _canvas(crops[1:2]), 3: _canvas(crops[2:4]), 4: _canvas(crops[3:4])}
    base_ref = [""]
    base_ref[0] = base = await serve(fake.app(base_ref))
    cfg = make_config(tmp_path, f'''
[[sources]]
name = "booru"
kind = "booru"
url = "{base}"
ratings = []
interval = 60
''')
    (tmp_path / "inbox").mkdir(exist_ok=True)
    (tmp_path / "inbox" / "local.jpg").write_bytes(_canvas(crops[4:5]))  # a folder picture: no tags
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await wait_for(lambda: _count(daemon, "scored", 6), timeout=40)
        rows = await daemon.store.execute("SELECT id, external_id FROM images")
        faces = {r["external_id"]: await daemon.store.faces_of(r["id"]) for r in rows}
        assert [len(faces[p]) for p in ("1", "2", "3", "4")] == [1, 1, 2, 1]   # what the detector found
        names = {p: [await daemon.store.face_name(f["id"]) for f in fs] for p, fs in faces.items()}
        [given] = names.pop("1")
        assert (given["name"], given["origin"], given["weak"]) == ("hatsune_miku", "booru", 1)
        assert all(n is None for ns in names.values() for n in ns), names   # two characters, two faces,
        # a tag that cannot be a name, post 5 without character tags, the folder picture
    finally:
        await daemon.stop()


async def test_a_second_daemon_on_the_same_data_folder_is_refused_naming_the_first(tmp_path):
    import os
    import subprocess
    import sys

    from storage.lock import daemon_pid
    from tests.helpers import MAIN

    cfg = make_config(tmp_path)
    assert daemon_pid(cfg.data_path) is None
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        assert daemon_pid(cfg.data_path) == os.getpid()
        second = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(MAIN), "--config", str(tmp_path / "config.toml"), "run"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.stdout == "" and second.stderr.count("\n") == 1   # one line, nothing else
        assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0] and "already running" in errors[0], \
            second.stderr
        # commands other than `run` still work beside the daemon
        status = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(MAIN), "--config", str(tmp_path / "config.toml"), "models", "list"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
    finally:
        await daemon.stop()
    assert daemon_pid(cfg.data_path) is None          # released on stop
    again = Daemon(cfg)
    await again.start()                                # and the folder can be used again
    await again.stop()


def test_a_look_at_the_lock_does_not_stop_a_daemon_from_starting(tmp_path):
    import fcntl
    import threading

    from storage.lock import DaemonLock

    (tmp_path / "daemon.lock").write_text("")
    looker = open(tmp_path / "daemon.lock")
    fcntl.flock(looker, fcntl.LOCK_SH | fcntl.LOCK_NB)         # what `status` does for a moment
    threading.Timer(0.3, lambda: (fcntl.flock(looker, fcntl.LOCK_UN), looker.close())).start()
    lock = DaemonLock(tmp_path).acquire()                       # waits the look out
    assert (tmp_path / "daemon.lock").read_text().strip() == str(__import__("os").getpid())
    lock.release()


def _in_process_daemon(tmp_path, monkeypatch, detector, sizes, fmt=lambda i: "PNG") -> Daemon:
    """A daemon detecting in its own process with ``detector`` (as with yolo: no detection
    workers), its inbox holding one distinct noise picture of each of ``sizes`` (``fmt(i)``: the
    i-th picture's format)."""
    import io
    import random

    from PIL import Image

    import bot.daemon
    import scorer.analyze

    monkeypatch.setattr(scorer.analyze, "make_detector", lambda *a, **k: detector)
    monkeypatch.setattr(bot.daemon.DetectionPool, "from_config", classmethod(lambda cls, *a, **k: None))
    cfg = make_config(tmp_path)
    (tmp_path / "inbox").mkdir(exist_ok=True)
    for i, size in enumerate(sizes):
        buf = io.BytesIO()
        Image.frombytes("RGB", size, random.Random(i).randbytes(size[0] * size[1] * 3)).save(buf, fmt(i))
        (tmp_path / "inbox" / f"p{i}.{fmt(i).lower()}").write_bytes(buf.getvalue())
    return Daemon(cfg)


@pytest.mark.parametrize("on_device", [False, True], ids=["pillow", "decoded-on-device"])
async def test_without_detection_workers_pictures_are_detected_several_in_one_pass(tmp_path, monkeypatch, on_device):
    """The in-process path (yolo: no detection workers) hands the detector several pictures at a
    time (``Analyzer.detection_batch``), and each picture gets its own faces; with a detector on
    a GPU (``decode_device``; the CPU device here) the pictures are decoded onto it and detected
    and cropped there."""
    import threading

    from tests.fake_detectors import Batched, OnDevice

    sizes = [(200 + 10 * i, 150) for i in range(7)]
    boxes = {size: [(20, 20, 80 + i, 90, 0.9)] for i, size in enumerate(sizes)}
    first = threading.Event()

    class Slow(OnDevice if on_device else Batched):
        def _detect_batch(self, ims, scales, sizes):
            self.wait_once()
            return super()._detect_batch(ims, scales, sizes)

        def _detect(self, im, scale, size):
            self.wait_once()
            return super()._detect(im, scale, size)

        def detect_tensors(self, pictures):
            self.wait_once()
            return super().detect_tensors(pictures)

        def wait_once(self):
            if not first.is_set():       # the first pass waits: the others pile up behind it
                first.set()
                time.sleep(1.5)

    det = Slow("batched", boxes, batch=4, min_size=1)
    # the device path decodes JPEGs together, other formats with Pillow
    daemon = _in_process_daemon(tmp_path, monkeypatch, det, sizes, lambda i: "JPEG" if i % 2 else "PNG")
    await daemon.start()
    try:
        assert daemon.detection is None
        await wait_for(lambda: _count(daemon, "scored", len(sizes)), timeout=30)
        rows = await daemon.store.execute("SELECT * FROM images WHERE status = 'scored'")
        assert len(rows) == len(sizes)
        for row in rows:
            (face,) = await daemon.store.faces_of(row["id"])
            i = sizes.index((row["width"], row["height"]))
            assert (face["x1"], face["y1"], face["x2"], face["y2"], face["detector"]) == (20, 20, 80 + i, 90, "batched")
        passes = det.tensor_passes if on_device else det.passes
        assert passes and max(passes) > 1 and all(n <= 4 for n in passes)   # several at once, never over the batch
        assert not on_device or det.passes == []
        assert all(row["score"] is not None for row in rows)
    finally:
        await daemon.stop()


async def test_a_detector_switch_during_a_device_pass_leaves_no_batch_failed(tmp_path, monkeypatch, caplog):
    """A batch decoded for a detector on a GPU keeps that detector when the owner switches to
    one that takes no decoded tensors meanwhile: nothing fails, every picture is scored."""
    import logging

    caplog.set_level(logging.INFO)
    from tests.fake_detectors import OnDevice, Scripted

    sizes = [(200 + 10 * i, 150) for i in range(4)]
    boxes = {size: [(20, 20, 80 + i, 90, 0.9)] for i, size in enumerate(sizes)}
    holder = []

    import bot.pipeline
    decode = bot.pipeline.decode_on_device

    def decode_then_switch(*args, **kw):
        decoded = decode(*args, **kw)
        holder[0].analyzer.detector = Scripted("batched", boxes, min_size=1)   # the switch, mid-batch
        return decoded

    monkeypatch.setattr(bot.pipeline, "decode_on_device", decode_then_switch)
    det = OnDevice("batched", boxes, batch=4, min_size=1)
    daemon = _in_process_daemon(tmp_path, monkeypatch, det, sizes, lambda i: "JPEG")
    holder.append(daemon)
    await daemon.start()
    try:
        await wait_for(lambda: _count(daemon, "scored", len(sizes)), timeout=30)
        assert det.tensor_passes                                     # the device path ran, and was switched under
        assert not [r for r in caplog.records if "scoring a batch" in r.getMessage()]
        assert "1 face(s), not trained yet" in caplog.text and "score " not in caplog.text   # untrained: no score
    finally:
        await daemon.stop()


def _noise_picture(path, size, seed) -> None:
    import io
    import random

    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3)).save(buf, "PNG")
    path.write_bytes(buf.getvalue())


async def test_a_picture_whose_scoring_raises_is_failed_alone_after_its_tries(tmp_path, monkeypatch):
    """One picture that makes scoring raise (a detector bug on it, say) fails its batch; the
    others are scored one by one at once, and it is tried alone again later and marked failed,
    with the reason, at its third failure while other pictures are scored, not taken again for
    ever."""
    import bot.pipeline
    from tests.fake_detectors import Batched

    sizes = [(200 + 10 * i, 150) for i in range(5)]
    poison = sizes[2]

    class Breaks(Batched):
        def _detect(self, im, scale, size):
            if size == poison:
                raise RuntimeError("the detector broke on this picture")
            return super()._detect(im, scale, size)

    det = Breaks("batched", {}, batch=8, min_size=1)
    monkeypatch.setattr(bot.pipeline, "SCORE_RETRY_SECONDS", 0.3)
    daemon = _in_process_daemon(tmp_path, monkeypatch, det, sizes)
    await daemon.start()
    try:
        async def more():              # other pictures go on arriving and being scored
            for i in range(100):
                _noise_picture(tmp_path / "inbox" / f"q{i}.png", (120, 100 + i), 1000 + i)
                await asyncio.sleep(0.3)
        arriving = asyncio.create_task(more())
        await wait_for(lambda: _count(daemon, "failed", 1), timeout=30)
        arriving.cancel()
        counts = await daemon.store.status_counts()
        assert counts["failed"] == 1 and counts["scored"] >= len(sizes) - 1
        (bad,) = await daemon.store.execute("SELECT * FROM images WHERE status = 'failed'")
        assert (bad["width"], bad["height"]) == poison
        assert bad["error"] == "scoring failed 3 times: RuntimeError: the detector broke on this picture"
        tries = det.seen.count(poison)
        await asyncio.sleep(1.5)
        assert det.seen.count(poison) == tries                      # no longer taken again
        assert not daemon.pipeline._retry_at and not daemon.pipeline._score_failures   # nothing kept for it
    finally:
        await daemon.stop()


async def test_a_failure_every_picture_shares_only_delays_them_however_long(tmp_path, monkeypatch):
    """Scoring fails for every picture for a while (the GPU's memory taken by a training run,
    say): the pictures wait and are tried again, doubling the wait, and none is marked failed
    however many times it failed; once scoring works again, every one is scored."""
    import bot.pipeline
    from tests.fake_detectors import Batched

    sizes = [(200 + 10 * i, 150) for i in range(4)]
    det = Batched("batched", {}, batch=8, min_size=1)
    monkeypatch.setattr(bot.pipeline, "SCORE_RETRY_SECONDS", 0.05)
    monkeypatch.setattr(bot.pipeline, "SCORE_RETRY_MAX", 0.2)
    daemon = _in_process_daemon(tmp_path, monkeypatch, det, sizes)
    real = daemon.pipeline.__class__.score
    outage = {"failures": 0}

    async def score(self, ids):
        if outage["failures"] < 40:
            outage["failures"] += 1
            raise RuntimeError("CUDA out of memory")
        return await real(self, ids)
    monkeypatch.setattr(daemon.pipeline.__class__, "score", score)
    await daemon.start()
    try:
        await wait_for(lambda: _count(daemon, "scored", len(sizes)), timeout=60)
        assert outage["failures"] == 40                    # every picture failed several times (>= 3)
        assert await daemon.store.status_counts() == {"scored": len(sizes)}
    finally:
        await daemon.stop()


async def test_another_configured_detector_at_a_restart_detects_the_stored_pictures_again(tmp_path, caplog):
    """detector.name changed in the config between two runs: the stored pictures found by the
    old one are detected again with the new one (as after `detector use`)."""
    import logging

    caplog.set_level(logging.INFO)
    cfg = make_config(tmp_path, '[detector]\nname = "opencv"\n')
    (tmp_path / "inbox").mkdir(exist_ok=True)
    for i in range(3):
        (tmp_path / "inbox" / f"p{i}.jpg").write_bytes(picture(700 + i))
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await wait_for(lambda: _count(daemon, "scored", 3), timeout=30)
    finally:
        await daemon.stop()
    tags = {r["detector_version"] for r in Store.open(cfg.db_path).execute("SELECT detector_version FROM images")}
    assert tags == {"config:opencv"}
    cfg = make_config(tmp_path, '[detector]\nname = "animeface"\n')
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        async def redone():
            rows = await daemon.store.execute("SELECT detector_version FROM images")
            return {r["detector_version"] for r in rows} == {"config:animeface"}
        await wait_for(redone, timeout=60)
        assert "re-detecting 3 stored picture(s) with detector config:animeface" in caplog.text
    finally:
        await daemon.stop()
