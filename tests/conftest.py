"""Shared fixtures; plain helpers are in ``tests/helpers.py``."""
from __future__ import annotations

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
