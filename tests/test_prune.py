"""Bounded disk: which media is pruned (and which never), the gallery and re-fetching of a pruned
picture, the thumbnail cache, ``prune --dry-run``, and downloads pausing on low disk."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime, timedelta, timezone

import numpy as np
from aiohttp import web

import bot.disk
from bot.daemon import Daemon
from bot.disk import DiskKeeper, RefetchError, refetch
from sources.http import Http
from storage import AsyncStore, Store
from storage.boxes import Box
from storage.media import inspect, thumbnail
from storage.prune import media_bytes, prune
from tests.helpers import cli, make_config, picture, seed, wait_for

STORAGE = "\n[storage]\nmax_media_gb = {gb}\nkeep_days = {days}\nmax_thumbs_mb = {thumbs_mb}\n"
TINY = 0.000001                     # 1,000 bytes: every picture is over it


def config(tmp_path, gb=0.0, days=0.0, thumbs_mb=500.0, more=""):
    return make_config(tmp_path, STORAGE.format(gb=gb, days=days, thumbs_mb=thumbs_mb) + more)


def age(cfg, image_ids, days: float) -> None:
    """Make pictures look stored ``days`` ago."""
    stamp = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat(timespec="milliseconds")
    with Store.open(cfg.db_path) as store, store.db.conn:
        store.db.execute(f"UPDATE images SET created_at = ?, fetched_at = ? WHERE id IN "
                         f"({','.join('?' * len(image_ids))})", [stamp, stamp, *image_ids])


def run_prune(cfg, dry_run=False):
    with Store.open(cfg.db_path) as store:
        return prune(store, cfg.paths, cfg.storage, dry_run=dry_run)


def pruned_ids(cfg) -> set[int]:
    with Store.open(cfg.db_path) as store:
        return {r["id"] for r in store.execute("SELECT id FROM images WHERE media_pruned_at IS NOT NULL")}


def media_of(cfg, image_id):
    with Store.open(cfg.db_path) as store:
        return cfg.media_path / store.get_image(image_id)["media_path"]


def test_only_old_unrated_unposted_finished_pictures_lose_their_media(tmp_path):
    cfg = config(tmp_path, gb=TINY)
    ids = seed(cfg, [{"popularity": i} for i in range(14)])
    (labelled, taken_back, winner, loser, sent, sending, failed_post, named, weak, waiting, plain1, plain2,
     verified, proposed) = ids
    with Store.open(cfg.db_path) as store:
        store.verify_boxes(verified, [Box(1, 1, 40, 40)])     # the own detector's truth: kept
        store.propose_boxes(proposed, [Box(1, 1, 40, 40)], proposed_by="animeface", certainty=0.3)
        store.add_label(labelled, 4, origin="web")
        store.add_label(taken_back, 2, origin="web")
        store.remove_label(taken_back, origin="web", user="owner")
        store.add_comparison(winner, loser, origin="gallery", user="owner")
        store.post_sent(store.post_intent(sent, "discord", "1"), "m1")
        store.post_intent(sending, "discord", "1")
        store.post_failed(store.post_intent(failed_post, "discord", "1"), "HTTP 500")
        for image_id, weak_name in ((named, False), (weak, True)):
            face = store.faces_of(image_id)[0]["id"]
            store.name_face(face, store.character_id("Miku", create=True), origin="booru" if weak_name else "gallery",
                            weak=weak_name)
        with store.db.conn:   # downloaded, not scored yet
            store.db.execute("UPDATE images SET status = 'downloaded' WHERE id = ?", [waiting])
        before = {i: (store.faces_of(i), store.get_image(i)["score"]) for i in ids}
        store.save_face_features({before[plain1][0][0]["id"]: {"net": np.ones(4, np.float32)}})
    age(cfg, ids, 30)

    report = run_prune(cfg)

    assert pruned_ids(cfg) == {failed_post, weak, plain1, plain2, proposed}
    assert report.pictures == report.files == 5 and report.bytes > 0 and report.over_limit
    for image_id in ids:
        assert media_of(cfg, image_id).exists() == (image_id not in {failed_post, weak, plain1, plain2, proposed})
    with Store.open(cfg.db_path) as store:   # rows, faces, scores and cached features stay
        for image_id in ids:
            assert (store.faces_of(image_id), store.get_image(image_id)["score"]) == before[image_id]
        assert store.face_features([before[plain1][0][0]["id"]], {"net"})
        # a pruned picture is nobody's candidate any more: nothing to show or send
        candidates = {r["id"] for r in store.ranked_candidates("discord", "score", 50)}
        assert candidates.isdisjoint({failed_post, weak, plain1, plain2, proposed})
        assert {r["id"] for r in store.rescore_candidates("another-model", 50)} == \
            {labelled, taken_back, winner, loser, sending, named, verified}   # (a sent one keeps its scores)
    again = run_prune(cfg)                     # nothing more may go
    assert again.files == 0 and again.over_limit


def test_size_limit_prunes_oldest_first_until_under_it_and_keep_days_by_age(tmp_path):
    cfg = config(tmp_path)
    a, b, c = ids = seed(cfg, [{"popularity": 1}, {"popularity": 2}, {"popularity": 3}])
    for image_id, days in zip(ids, (9, 6, 1)):
        age(cfg, [image_id], days)
    with Store.open(cfg.db_path) as store:
        sizes = {i: store.get_image(i)["bytes"] for i in ids}
        assert media_bytes(store) == sum(sizes.values())

    cfg.storage.max_media_gb = (sizes[b] + sizes[c]) / 1e9    # the oldest alone is enough
    report = run_prune(cfg)
    assert pruned_ids(cfg) == {a} and report.bytes == sizes[a] and not report.over_limit
    assert report.media_bytes == sizes[b] + sizes[c]
    assert run_prune(cfg).files == 0

    cfg.storage.max_media_gb = 0.0
    cfg.storage.keep_days = 7                                   # b is 6 days old: kept
    assert run_prune(cfg).files == 0 and pruned_ids(cfg) == {a}
    cfg.storage.keep_days = 5
    assert run_prune(cfg).pictures == 1 and pruned_ids(cfg) == {a, b}
    assert media_of(cfg, c).exists() and not media_of(cfg, b).exists()


def test_a_file_shared_by_pictures_goes_only_when_every_one_of_them_may_go(tmp_path):
    cfg = config(tmp_path, gb=TINY)
    [first] = seed(cfg, [{"popularity": 1}])
    with Store.open(cfg.db_path) as store:   # the same bytes from another source: a duplicate row
        row = store.get_image(first)
        info, _ = inspect(media_of(cfg, first).read_bytes())
        sid = store.upsert_source("other", "booru", {"enabled": False, "interval": 60}, origin="cli")
        [dup] = store.save_poll(sid, [{"external_id": "x1"}], {})
        assert store.record_download(dup, info, row["media_path"]) == ("duplicate", first)
        store.add_label(dup, 5, origin="discord")
    age(cfg, [first, dup], 30)
    assert run_prune(cfg).files == 0 and media_of(cfg, first).exists()


def test_the_same_bytes_stored_again_clear_the_pruned_mark(tmp_path):
    cfg = config(tmp_path, gb=TINY)
    [first] = seed(cfg, [{"popularity": 1}])
    data = media_of(cfg, first).read_bytes()
    run_prune(cfg)
    assert pruned_ids(cfg) == {first}
    from storage.media import store_media
    with Store.open(cfg.db_path) as store:   # another source brings the same picture
        info, _ = inspect(data)
        rel = store_media(cfg.media_path, data, info)
        sid = store.upsert_source("other", "booru", {"enabled": False, "interval": 60}, origin="cli")
        [again] = store.save_poll(sid, [{"external_id": "x1"}], {})
        assert store.record_download(again, info, rel)[0] == "duplicate"
    assert pruned_ids(cfg) == set() and media_of(cfg, first).exists()


async def test_gallery_shows_a_pruned_picture_and_fetches_it_again_from_its_source(tmp_path, gallery, serve):
    cfg = config(tmp_path, gb=TINY)
    kept, gone, changed = seed(cfg, [{"popularity": 1}, {"popularity": 2}, {"popularity": 3}])
    served = {"gone": media_of(cfg, gone).read_bytes(), "changed": picture(77)}
    hits = []

    async def image(request):
        hits.append(request.match_info["name"])
        return web.Response(body=served[request.match_info["name"]], content_type="image/jpeg")
    app = web.Application()
    app.router.add_get("/img/{name}.jpg", image)
    base = await serve(app)
    with Store.open(cfg.db_path) as store, store.db.conn:
        store.db.execute("UPDATE images SET media_url = ? WHERE id = ?", [f"{base}/img/gone.jpg", gone])
        store.db.execute("UPDATE images SET media_url = ? WHERE id = ?", [f"{base}/img/changed.jpg", changed])
    with Store.open(cfg.db_path) as store:
        store.add_label(kept, 3, origin="web")
    client = await gallery(cfg)
    assert (await client.get(f"/thumb/{gone}")).content_type == "image/jpeg"   # cached before the prune
    assert f'href="/picture/{gone}?from=for-you' in await (await client.get("/")).text()
    run_prune(cfg)
    assert pruned_ids(cfg) == {gone, changed}

    page = await client.get(f"/picture/{gone}")
    assert page.status == 200
    html = await page.text()
    assert "Media pruned" in html and f'action="/picture/{gone}/refetch"' in html and f'src="/media/{gone}"' not in html
    for url in (f"/thumb/{gone}", f"/media/{gone}"):
        resp = await client.get(url)
        assert resp.status == 200 and resp.content_type == "image/svg+xml" and "media pruned" in await resp.text()
    assert f'href="/picture/{gone}?from=for-you' not in await (await client.get("/")).text()   # no longer on For you

    origin = {"Origin": f"http://127.0.0.1:{client.port}"}
    resp = await client.post(f"/picture/{gone}/refetch", headers=origin | {"Accept": "application/json"})
    assert await resp.json() == {"ok": True, "image_id": gone, "message": "fetched again"}
    assert hits == ["gone"] and media_of(cfg, gone).read_bytes() == served["gone"]
    assert pruned_ids(cfg) == {changed}
    assert (await client.get(f"/thumb/{gone}")).content_type == "image/jpeg"
    assert f'src="/media/{gone}"' in await (await client.get(f"/picture/{gone}")).text()

    # the source now serves other bytes: not stored under the old picture's scores
    resp = await client.post(f"/picture/{changed}/refetch", headers=origin)
    assert resp.status == 200 and "not fetched again" in await resp.text()
    assert changed in pruned_ids(cfg) and not media_of(cfg, changed).exists()
    assert (await client.post(f"/picture/{gone}/refetch")).status == 403               # the same guard as every POST


async def test_refetch_reads_a_folder_source_file_again_and_says_why_not(tmp_path):
    cfg = config(tmp_path, gb=TINY)
    [image_id] = seed(cfg, [{"popularity": 1}])
    original = tmp_path / "inbox-copy.jpg"
    original.write_bytes(media_of(cfg, image_id).read_bytes())
    with Store.open(cfg.db_path) as store, store.db.conn:
        store.db.execute("UPDATE images SET local_path = ? WHERE id = ?", [str(original), image_id])
    store = await AsyncStore(cfg.db_path).open()
    try:
        async with Http.from_config(cfg.download) as http:
            try:
                await refetch(cfg, store, http, image_id)
                raise AssertionError("refetched a picture that was not pruned")
            except RefetchError as e:
                assert str(e) == "its media was not pruned"
            run_prune(cfg)
            assert not media_of(cfg, image_id).exists()
            row = await refetch(cfg, store, http, image_id)
            assert row["media_pruned_at"] is None and media_of(cfg, image_id).exists()
            run_prune(cfg)
            original.unlink()
            try:
                await refetch(cfg, store, http, image_id)
                raise AssertionError("refetched from a missing file")
            except RefetchError as e:
                assert "cannot read" in str(e) and "No such file" in str(e)
    finally:
        await store.close()


def test_thumbnail_cache_is_trimmed_least_recently_used_first(tmp_path):
    cfg = config(tmp_path, thumbs_mb=0.0025)                      # 2,500 bytes
    folder = cfg.thumbs_path / "256" / "ab" / "cd"
    folder.mkdir(parents=True)
    now = time.time()
    for i in range(4):
        p = folder / f"{i}.jpg"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (now - 1000 * (4 - i), now - 1000 * (4 - i)))   # 0.jpg used longest ago
    report = run_prune(cfg, dry_run=True)
    assert (report.thumbs, report.thumb_bytes) == (2, 2000) and len(list(folder.iterdir())) == 4
    report = run_prune(cfg)
    assert (report.thumbs, report.thumb_bytes, report.thumbs_left) == (2, 2000, 2000)
    assert sorted(p.name for p in folder.iterdir()) == ["2.jpg", "3.jpg"]


def test_serving_a_thumbnail_marks_it_used(tmp_path):
    cfg = config(tmp_path)
    [image_id] = seed(cfg, [{"popularity": 1}])
    with Store.open(cfg.db_path) as store:
        rel = store.get_image(image_id)["media_path"]
    path = thumbnail(cfg.media_path, rel, cfg.thumbs_path, 128)
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert thumbnail(cfg.media_path, rel, cfg.thumbs_path, 128) == path
    assert time.time() - path.stat().st_mtime < 60


def test_prune_command_dry_run_changes_nothing_and_says_what_it_would_free(tmp_path):
    cfg = config(tmp_path, days=3)
    ids = seed(cfg, [{"popularity": 1}, {"popularity": 2}, {"popularity": 3}])
    age(cfg, ids[:2], 10)
    files = sorted(p for p in cfg.media_path.rglob("*") if p.is_file())

    out = cli(tmp_path, "prune", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("would prune the media of 2 picture(s) (2 file(s), ")
    assert sorted(p for p in cfg.media_path.rglob("*") if p.is_file()) == files and pruned_ids(cfg) == set()

    out = cli(tmp_path, "prune")
    assert out.returncode == 0 and out.stdout.startswith("pruned the media of 2 picture(s) (2 file(s), ")
    assert pruned_ids(cfg) == set(ids[:2]) and len([p for p in cfg.media_path.rglob("*") if p.is_file()]) == 1
    assert cli(tmp_path, "prune").stdout.startswith("nothing to prune; media now ")


def test_prune_command_says_when_no_rule_is_set(tmp_path):
    config(tmp_path)
    out = cli(tmp_path, "prune", "--dry-run")
    assert out.returncode == 0 and "media is never pruned: set storage.max_media_gb or storage.keep_days" in out.stdout


async def test_low_disk_pauses_downloads_and_they_resume_by_themselves(tmp_path, monkeypatch, caplog):
    free = {"bytes": 50 * 10 ** 9}
    monkeypatch.setattr(bot.disk, "free_bytes", lambda path: free["bytes"])
    monkeypatch.setattr(DiskKeeper, "CHECK_SECONDS", 0.2)
    caplog.set_level(logging.INFO, logger="tastefeed.disk")
    cfg = config(tmp_path, more="min_free_gb = 2.0\n")
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        assert daemon.stats["downloads_paused"] is None
        free["bytes"] = 4 * 10 ** 8
        reason = await wait_for(lambda: _async(daemon.stats["downloads_paused"]))
        assert reason == "low disk: 0.4 GB free < storage.min_free_gb 2"
        for i in range(3):
            (tmp_path / "inbox" / f"p{i}.png").write_bytes(picture(40 + i, fmt="PNG"))

        async def pending():
            return (await daemon.store.status_counts()).get("pending") == 3
        await wait_for(pending)
        await asyncio.sleep(1.5)                                   # several checks while paused
        assert await daemon.store.status_counts() == {"pending": 3}  # waiting, nothing failed
        assert not any(cfg.media_path.rglob("*.png"))

        free["bytes"] = 3 * 10 ** 9

        async def scored():
            return (await daemon.store.status_counts()).get("scored") == 3
        await wait_for(scored, timeout=20)
        assert daemon.stats["downloads_paused"] is None
    finally:
        await daemon.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "tastefeed.disk"]
    assert len([m for m in lines if m.startswith("downloads paused: low disk: 0.4 GB free")]) == 1
    assert len([m for m in lines if m.startswith("downloads resumed")]) == 1


async def test_the_daemon_prunes_in_the_background(tmp_path):
    cfg = config(tmp_path, days=1)
    old, new = seed(cfg, [{"popularity": 1}, {"popularity": 2}])
    age(cfg, [old], 5)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        async def pruned():
            return daemon.stats["pruned"] == 1
        await wait_for(pruned)
    finally:
        await daemon.stop()
    assert pruned_ids(cfg) == {old} and media_of(cfg, new).exists()


async def _async(value):
    return value


async def test_a_picture_fetched_again_is_not_pruned_again_at_once(tmp_path):
    cfg = config(tmp_path, days=1)
    [image_id] = seed(cfg, [{"popularity": 1}])
    original = tmp_path / "inbox-copy.jpg"
    original.write_bytes(media_of(cfg, image_id).read_bytes())
    with Store.open(cfg.db_path) as store, store.db.conn:
        store.db.execute("UPDATE images SET local_path = ? WHERE id = ?", [str(original), image_id])
    age(cfg, [image_id], 5)
    run_prune(cfg)
    assert pruned_ids(cfg) == {image_id}
    store = await AsyncStore(cfg.db_path).open()
    try:
        async with Http.from_config(cfg.download) as http:
            await refetch(cfg, store, http, image_id)
    finally:
        await store.close()
    run_prune(cfg)                        # its keep_days count again from the fetch
    assert pruned_ids(cfg) == set() and media_of(cfg, image_id).exists()


def test_bytes_stored_again_while_a_prune_removes_the_file_are_marked_pruned_again(tmp_path, monkeypatch):
    import storage.prune as prune_module

    cfg = config(tmp_path, gb=TINY)
    [image_id] = seed(cfg, [{"popularity": 1}])
    real = prune_module.mark_pruned

    def mark_then_download(store, media_paths, *a, **k):
        out = real(store, media_paths, *a, **k)
        sha = store.get_image(image_id)["sha256"]
        store.media_restored(sha)          # the same bytes downloaded: the file is still there
        return out
    monkeypatch.setattr(prune_module, "mark_pruned", mark_then_download)
    run_prune(cfg)
    assert not media_of(cfg, image_id).exists() and pruned_ids(cfg) == {image_id}
