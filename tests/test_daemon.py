import asyncio
import shutil
import time

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
        hits.append(time.monotonic())
        return web.Response(status=429, headers={"Retry-After": "1"})

    cfg = make_config(tmp_path, await booru_answering(serve, limited, name="busy", interval=30))
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await wait_for(lambda: _hits(hits, 2), timeout=8)
        assert 1.0 <= hits[1] - hits[0] <= 4.5  # Retry-After (1s) + jitter, not the 30s interval
        row = await daemon.store.get_source("busy")
        assert "rate limited (429)" in row["last_error"]
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
