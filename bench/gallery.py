"""Web gallery latency and Discord's candidate pick with many pictures, trained and untrained.

    python bench/gallery.py [--pictures 5000,20000,100000] [--labels 1000] [--repeat 20]

For each size, fills a temporary database with N scored pictures in 4 sources (one small file
shared by all, distinct rows, one face each, a random perceptual hash), L labels and posts of 2%
of them on Discord, serves the gallery on 127.0.0.1 and times each page (median and 95th
percentile over --repeat requests, in milliseconds): *For you* (first, a middle and the last
page; a Picture page opened from deep in it), *Rated* (page 1, one rating of one source, the
last page by its number and from the "more →" link of the page before it; a Picture page opened
from that page), *Compare*, *Model*, *Sources*, ``/api/stats``; then Discord's pick of the next post (``scorer.ranking.pick`` with near-duplicate
skipping, as a posting cycle calls it) and the near-duplicate lookup of a new picture. Every
figure is taken twice: with the model untrained (ranked by popularity percentile within each
source, half the page exploration) and trained (by score, exploration from the most uncertain).
Prints a Markdown block to paste into bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from bot.config import load_config
from bot.web import Gallery, rated_token
from scorer.ranking import pick
from scorer.registry import ensure_active_model
from storage import AsyncStore, Store
from storage.media import ImageInfo, inspect, store_media
from storage.store import now, rated_key


def fill(cfg, n: int, labels: int) -> str:
    """The database with ``n`` scored pictures; returns the active model's version."""
    store = Store.open(cfg.db_path)
    model = ensure_active_model(store, cfg.scorer, cfg.models_path)
    buf = io.BytesIO()
    Image.new("RGB", (1200, 900), (120, 80, 200)).save(buf, "JPEG")
    info, _ = inspect(buf.getvalue())
    rel = store_media(cfg.media_path, buf.getvalue(), info)
    stamp = now()
    rnd = random.Random(0)
    with store.db.conn:
        for s in range(4):
            store.upsert_source(f"source{s}", "booru", {"enabled": False, "options": {}}, origin="cli")
        store.db.conn.executemany(
            "INSERT INTO images (source_id, external_id, author, tags, rating, popularity, status, sha256, phash, "
            "width, height, format, media_path, score, uncertainty, model_version, created_at) "
            "VALUES (?, ?, ?, ?, 'general', ?, 'scored', ?, ?, 1200, 900, 'jpeg', ?, ?, ?, ?, ?)",
            [(1 + i % 4, str(i), f"artist{i % 50}", json.dumps(["a", "b"]), i % 997, f"{i:064x}",
              f"{rnd.getrandbits(64):016x}", rel, 1 + (i * 7919 % 400) / 100, (i % 13) / 50, model["version"],
              stamp) for i in range(n)])
        store.db.conn.executemany(
            "INSERT INTO faces (image_id, detector, x1, y1, x2, y2, confidence) VALUES (?, 'animeface', 100, 100, "
            "300, 300, 0.9)", [(i + 1,) for i in range(n)])
        store.db.conn.executemany(
            "INSERT INTO labels (image_id, user, value, origin, created_at) VALUES (?, 'owner', ?, 'web', ?)",
            [(i + 1, 1 + i % 5, stamp) for i in range(labels)])
        store.db.conn.executemany(
            "INSERT INTO posts (image_id, channel, channel_id, message_id, status, created_at, sent_at) "
            "VALUES (?, 'discord', '1', ?, 'sent', ?, ?)",
            [(i, str(i), stamp, stamp) for i in range(labels + 1, n + 1, 50)])
    store.close()
    return model["version"]


def set_trained(cfg, version: str, trained: bool) -> None:
    with Store.open(cfg.db_path) as store, store.db.conn:
        store.db.execute("UPDATE models SET metrics = ? WHERE version = ?",
                         ['{"val": {"pearson": 0.5, "rmse": 0.9}}' if trained else None, version])


def stats(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


async def timed(client, path: str, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        resp = await client.get(path)
        await resp.read()
        assert resp.status == 200, (path, resp.status)
        times.append((time.perf_counter() - t) * 1000)
    return stats(times)


def timed_sync(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return stats(times)


async def measure(cfg, n: int, labels: int, repeat: int) -> list[tuple[str, float, float]]:
    rows = []
    store = AsyncStore(cfg.db_path)
    await store.open()
    client = TestClient(TestServer(Gallery(cfg, store).app(), host="127.0.0.1"))
    await client.start_server()
    size = cfg.web.page_size
    candidates = n - labels          # the gallery's (posts on Discord stay candidates there)
    last = max(1, -(-candidates // size))
    deep = (last - 1) * size
    rated_last = (labels - 1) // size                 # Rated's last page, by number and from "more →"
    with Store.open(cfg.db_path) as sync:
        before_last = sync.rated(limit=1, offset=rated_last * size - 1, count=False)[0] if rated_last else []
        first_last = sync.rated(limit=1, offset=rated_last * size, count=False)[0]
    after = rated_token(rated_key(before_last[0])) if before_last else ""
    rated_pic = f"/picture/{first_last[0]['id']}?from=rated&at={rated_last * size}" if first_last else "/rated"
    for name, path in [("For you, page 1", "/"), ("For you, page 2", "/?page=2"),
                       (f"For you, page {last // 2} (middle)", f"/?page={last // 2}"),
                       (f"For you, page {last} (the last)", f"/?page={last}"),
                       ("Picture opened from the last For you page", f"/picture/{n - 3}?from=for-you&at={deep}"),
                       ("Rated, page 1", "/rated"), ("Rated, rating 5 of one source", "/rated?rating=5&source=source1"),
                       ("Rated, last page by number", f"/rated?page={rated_last + 1}"),
                       ("Rated, last page from more →", f"/rated?page={rated_last + 1}&after={after}"),
                       ("Picture opened from Rated's last page", rated_pic),
                       ("Compare", "/compare"), ("Model", "/model"), ("Sources", "/sources"),
                       ("/api/stats", "/api/stats")]:
        rows.append((name, *await timed(client, path, repeat)))
    await client.close()
    await store.close()
    # The last page by its number right after a start: laid out from the nearest page start the
    # closed store saved (every eighth page's; none: from the first page, reading only the
    # orders' keys along their indexes).
    times = []
    for _ in range(max(3, repeat // 4)):
        fresh = AsyncStore(cfg.db_path)
        await fresh.open()
        cold = TestClient(TestServer(Gallery(cfg, fresh).app(), host="127.0.0.1"))
        await cold.start_server()
        times += [(await timed(cold, f"/?page={last}", 1))[0]]
        await cold.close()
        await fresh.close()
    rows.append((f"For you, page {last} (the last) by number after a start", *stats(times)))
    with Store.open(cfg.db_path) as sync:
        rnd = random.Random(1)
        rows.append(("Discord: pick the next post", *timed_sync(
            lambda: pick(sync, cfg.ranking, cfg.train.min_labels, 1, channel="discord", rng=rnd,
                         near_distance=cfg.discord.near_duplicate_distance), repeat)))
        info = ImageInfo(sha256="f" * 64, phash=f"{rnd.getrandbits(64):016x}", width=1, height=1, format="jpeg",
                         bytes=1)
        sync.find_duplicate(info, cfg.download.near_duplicate_distance)      # the first builds its index
        rows.append(("Near-duplicate lookup of a new picture", *timed_sync(
            lambda: sync.find_duplicate(info, cfg.download.near_duplicate_distance), repeat)))
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pictures", default="5000", help="sizes, comma separated (e.g. 5000,20000,100000)")
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    sizes = [int(s) for s in args.pictures.split(",")]
    table: dict[str, dict[tuple[int, str], tuple[float, float]]] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.toml").write_text(f'data_dir = "{tmp}/data"\n[web]\nport = 0\n')
            cfg = load_config(Path(tmp) / "config.toml")
            t = time.perf_counter()
            version = fill(cfg, n, args.labels)
            print(f"filled {n} pictures, {args.labels} labels in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            for state in ("untrained", "trained"):
                set_trained(cfg, version, state == "trained")
                for name, med, p95 in await measure(cfg, n, args.labels, args.repeat):
                    key = name.split(", page ")[0] + (", last page by number after a start" if "after a start" in name
                                                      else ", last page" if "(the last)" in name else
                                                      ", middle page" if "(middle)" in name else
                                                      ", page " + name.split(", page ")[1] if ", page " in name else "")
                    table.setdefault(key, {})[(n, state)] = (med, p95)
                print(f"  measured {state}", file=sys.stderr)
    cols = [(n, s) for n in sizes for s in ("untrained", "trained")]
    print(f"### Gallery pages and Discord's pick ({args.labels} labels, {cfg.web.page_size} per page; "
          "median / p95 ms)\n")
    print(f"Machine: {platform.machine()}, {platform.processor() or platform.system()}, "
          f"Python {platform.python_version()}\n")
    print("| | " + " | ".join(f"{n:,} {s}" for n, s in cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for key, cells in table.items():
        print(f"| {key} | " + " | ".join("{:.1f} / {:.1f}".format(*cells[c]) if c in cells else "" for c in cols)
              + " |")


if __name__ == "__main__":
    asyncio.run(main())
