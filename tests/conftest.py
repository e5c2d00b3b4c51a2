"""Shared fixtures; plain helpers are in ``tests/helpers.py``."""
from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer


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

