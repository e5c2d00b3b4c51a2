"""Shared fixtures; plain helpers are in ``tests/helpers.py``."""
from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer


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



@pytest.fixture
async def gallery():
    """``client = await gallery(cfg, **hooks)``: a test client of the web gallery over ``cfg``'s
    database (seeded by the test first), given any of the daemon's hooks (poll_now, reload,
    train_now, live, ...); closed after the test."""
    from bot.web import Gallery
    from storage import AsyncStore

    clients = []

    async def start(cfg, **hooks):
        store = AsyncStore(cfg.db_path)
        await store.open()
        client = TestClient(TestServer(Gallery(cfg, store, **hooks).app(), host="127.0.0.1"))
        await client.start_server()
        clients.append((client, store))
        return client

    yield start
    for client, store in clients:
        await client.close()
        await store.close()


# ---- browser tests --------------------------------------------------------------------------------
@pytest.fixture
async def browser():
    """Headless Chromium (playwright's async API, tests/helpers.py ``CHROMIUM``), closed after the
    test; the test is skipped where Chromium or playwright is not installed. Pages:
    ``await browser.new_page(viewport=...)``."""
    from tests.helpers import BROWSER_ARGS, CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    pw = pytest.importorskip("playwright.async_api")
    async with pw.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def live_gallery():
    """``url = await live_gallery(cfg, **hooks)``: the web gallery served on a real port as the
    daemon serves it (for a browser), over ``cfg``'s database (seeded by the test first), given
    any of the daemon's hooks (poll_now, reload, train_now, live, ...); its address ends in
    ``/``. Stopped, with its database writer, after the test."""
    from bot.web import Gallery
    from storage import AsyncStore

    started = []

    async def start(cfg, **hooks) -> str:
        store = await AsyncStore(cfg.db_path).open()
        served = Gallery(cfg, store, **hooks)
        started.append((served, store))
        return await served.start()

    yield start
    for served, store in reversed(started):
        await served.stop()
        await store.close()
