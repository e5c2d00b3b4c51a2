"""Shared test helpers: synthetic pictures, local HTTP servers, the real data in ../shared."""
from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image, ImageDraw

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(*parts: str) -> Path:
    """A path in ../shared/data, or skip the test when that data is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def picture(seed: int = 0, size=(160, 120), fmt: str = "JPEG") -> bytes:
    """A distinct synthetic picture (random shapes), as encoded bytes."""
    rnd = random.Random(seed)
    im = Image.new("RGB", size, tuple(rnd.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = rnd.randrange(size[0]), rnd.randrange(size[1])
        draw.rectangle([x, y, x + rnd.randrange(10, 60), y + rnd.randrange(10, 60)],
                       fill=tuple(rnd.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
async def serve():
    """Start aiohttp apps on 127.0.0.1: ``base = await serve(app)``; closed after the test."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


def seed(cfg, specs: list[dict], *, trained: bool = False, source: str = "booru-test") -> list[int]:
    """Scored pictures from a booru-like source, as the daemon would have stored them; with
    ``trained``, by a model registered as trained (so the ranking is by score, not cold).
    Each spec: popularity, and optionally score, uncertainty, faces, rating, tags."""
    from scorer.registry import ensure_active_model
    from storage import Store
    from storage.media import inspect, store_media
    from storage.store import FaceRecord

    store = Store.open(cfg.db_path)
    model = ensure_active_model(store, cfg.scorer, cfg.models_path)
    if trained:  # metrics mark a model trained
        with store.db.conn:
            store.db.execute("UPDATE models SET metrics = ? WHERE version = ?",
                             ['{"val": {"pearson": 0.5}}', model["version"]])
    sid = store.upsert_source(source, "booru", {"enabled": False, "interval": 60, "options": {}},
                              origin="cli")
    ids = []
    start = store.execute("SELECT COUNT(*) AS n FROM images")[0]["n"]
    for i, spec in enumerate(specs, start):
        data = picture(1000 + i, size=(200, 160))
        info, _ = inspect(data)
        rel = store_media(cfg.media_path, data, info)
        [image_id] = store.save_poll(sid, [{
            "external_id": f"post{i}", "page_url": f"https://booru.example/posts/{i}", "author": f"artist{i}",
            "title": f"post {i}", "tags": spec.get("tags", []), "rating": spec.get("rating", "general"),
            "popularity": spec["popularity"]}], {})
        store.record_download(image_id, info, rel, near_distance=-1)
        faces = [FaceRecord(20 + 90 * k, 20, 90 + 90 * k, 100, 0.9, "animeface", spec.get("score", 3.0) - k / 10,
                            0.1) for k in range(spec.get("faces", 1))]
        store.record_analysis(image_id, faces, spec.get("score", 3.0), spec.get("uncertainty", 0.1),
                              model["version"])
        ids.append(image_id)
    store.close()
    return ids


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(body)
    return path
