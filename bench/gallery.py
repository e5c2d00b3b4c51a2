"""Web gallery latency with many pictures: For you, Rated and Picture pages, and thumbnails.

    python bench/gallery.py [--pictures 5000] [--labels 1000] [--repeat 20]

Fills a temporary database with N scored pictures (one small file shared by all, distinct rows)
and L labels, serves the gallery on 127.0.0.1 and times each page (median and 95th percentile
over --repeat requests, in milliseconds), and the first and cached thumbnail. Prints a Markdown
block to paste into bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from bot.config import load_config
from bot.web import Gallery
from scorer.registry import ensure_active_model
from storage import AsyncStore, Store
from storage.media import inspect, store_media
from storage.store import now


def fill(cfg, n: int, labels: int) -> None:
    store = Store.open(cfg.db_path)
    model = ensure_active_model(store, cfg.scorer, cfg.models_path)
    buf = io.BytesIO()
    Image.new("RGB", (1200, 900), (120, 80, 200)).save(buf, "JPEG")
    info, _ = inspect(buf.getvalue())
    rel = store_media(cfg.media_path, buf.getvalue(), info)
    stamp = now()
    with store.db.conn:
        for s in range(4):
            store.upsert_source(f"source{s}", "booru", {"enabled": False, "options": {}}, origin="cli")
        store.db.conn.executemany(
            "INSERT INTO images (source_id, external_id, author, tags, rating, popularity, status, sha256, width, "
            "height, format, media_path, score, uncertainty, model_version, created_at) "
            "VALUES (?, ?, ?, ?, 'general', ?, 'scored', ?, 1200, 900, 'jpeg', ?, ?, ?, ?, ?)",
            [(1 + i % 4, str(i), f"artist{i % 50}", json.dumps(["a", "b"]), i % 997, f"{i:064x}", rel,
              1 + (i * 7919 % 400) / 100, (i % 13) / 50, model["version"], stamp) for i in range(n)])
        store.db.conn.executemany(
            "INSERT INTO faces (image_id, detector, x1, y1, x2, y2, confidence) VALUES (?, 'animeface', 100, 100, "
            "300, 300, 0.9)", [(i + 1,) for i in range(n)])
        store.db.conn.executemany(
            "INSERT INTO labels (image_id, user, value, origin, created_at) VALUES (?, 'owner', ?, 'web', ?)",
            [(i + 1, 1 + i % 5, stamp) for i in range(labels)])
    store.close()


async def timed(client, path: str, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        resp = await client.get(path)
        await resp.read()
        assert resp.status == 200, (path, resp.status)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pictures", type=int, default=5000)
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.toml").write_text(f'data_dir = "{tmp}/data"\n[web]\nport = 0\n')
        cfg = load_config(Path(tmp) / "config.toml")
        t = time.perf_counter()
        fill(cfg, args.pictures, args.labels)
        print(f"filled {args.pictures} pictures, {args.labels} labels in {time.perf_counter() - t:.1f}s",
              file=sys.stderr)
        store = AsyncStore(cfg.db_path)
        await store.open()
        client = TestClient(TestServer(Gallery(cfg, store).app(), host="127.0.0.1"))
        await client.start_server()
        rows = []
        last = (args.pictures - args.labels) // cfg.web.page_size
        for name, path in [("For you, page 1", "/"), (f"For you, page {last}", f"/?page={last}"),
                           ("Rated, page 1", "/rated"), ("Rated, rating 5 of one source", "/rated?rating=5&source=source1"),
                           ("Picture", "/picture/4000"), ("Model", "/model"), ("Sources", "/sources")]:
            rows.append((name, *await timed(client, path, args.repeat)))
        t = time.perf_counter()
        await (await client.get("/thumb/1")).read()
        first = (time.perf_counter() - t) * 1000
        rows.append(("Thumbnail (cached)", *await timed(client, "/thumb/1", args.repeat)))
        await client.close()
        await store.close()
    print(f"### Gallery pages ({args.pictures} scored pictures, {args.labels} labels, {cfg.web.page_size} per page)\n")
    print(f"Machine: {platform.machine()}, {platform.processor() or platform.system()}, Python {platform.python_version()}\n")
    print("| page | median ms | p95 ms |\n| --- | ---: | ---: |")
    for name, med, p95 in rows:
        print(f"| {name} | {med:.1f} | {p95:.1f} |")
    print(f"| Thumbnail, first request (made from a 1200x900 JPEG) | {first:.1f} | |")


if __name__ == "__main__":
    asyncio.run(main())
