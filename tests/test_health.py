"""Health: the event-loop lag monitor, ``GET /healthz`` in each state, who may read it, and
``python main.py status`` for a running, a stopped and a never-started daemon."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bot.daemon import Daemon
from bot.health import LoopMonitor, judge
from bot.manage import format_stats
from bot.web import Gallery
from storage import AsyncStore
from tests.helpers import cli, make_config, picture, seed, wait_for

WEB = '\n[web]\nenabled = "on"\nport = 0\n'


async def _block_the_loop(seconds: float) -> None:
    """A coroutine that holds the event loop without yielding, as a blocking call would."""
    time.sleep(seconds)


async def test_a_blocked_loop_is_measured_and_warned_about_once_per_ten_seconds(caplog):
    stats: dict = {}
    monitor = LoopMonitor(stats)
    caplog.set_level(logging.WARNING, logger="tastefeed.health")
    monitor.start()
    try:
        await asyncio.sleep(0.5)
        assert stats["loop_lag_ms"]["max"] < 250                # an idle loop wakes on time
        await _block_the_loop(0.4)
        await asyncio.sleep(0.3)
        lag = stats["loop_lag_ms"]
        # the block began somewhere in the monitor's 100 ms sleep: it woke 300-400 ms late
        assert 290 <= lag["max"] < 1000 and lag["p50"] < 100 and lag["samples"] >= 5
        await _block_the_loop(0.4)                              # again, within 10 s: not logged again
        await asyncio.sleep(0.3)
    finally:
        await monitor.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "tastefeed.health"]
    assert len(warnings) == 1, warnings
    logged = re.match(r"event loop lag (\d+) ms: something held the loop", warnings[0])
    assert logged and 290 <= int(logged[1]) < 1000, warnings
    # the lag shows in /stats as one line
    summary = format_stats({"labelled_pictures": 0, "label_rows": 0, "model": None, "model_trained": False,
                            "val": {}, "queues": {}, "sources": {"total": 0, "unhealthy": []},
                            "loop_lag_ms": stats["loop_lag_ms"]})
    assert sum(line.startswith("event loop lag: p50 ") for line in summary) == 1


def test_the_window_keeps_the_last_minute_only():
    monitor = LoopMonitor({})
    monitor.record(900.0, at=0.0)
    for i in range(1, 100):
        monitor.record(1.0, at=float(i))
    assert monitor.figures()["max"] == 1.0 and monitor.figures()["samples"] == 61


def test_the_rules_for_each_status():
    healthy = {"loop_lag_ms": {"p99": 20.0}, "sources": [{"name": "a", "state": "ok", "last_error": None}],
               "discord": "connected", "downloads_paused": None, "disk_free_gb": 50.0}
    assert judge(healthy, 1.0) == ("ok", [])
    for change, reason in [
            ({"loop_lag_ms": {"p99": 1500.0}}, "event loop lag p99 1500 ms > 1000 ms"),
            ({"sources": [{"name": "a", "state": "UNHEALTHY", "last_error": "HTTP 401"}]},
             "source a is unhealthy: HTTP 401"),
            ({"discord": "disconnected"}, "Discord is set up but not connected"),
            ({"disk_free_gb": 0.5}, "disk free 0.5 GB < storage.min_free_gb 1"),
            ({"downloads_paused": "low disk"}, "downloads paused: low disk")]:
        assert judge({**healthy, **change}, 1.0) == ("degraded", [reason]), change
    paused = [{"name": "a", "state": "paused", "last_error": "HTTP 401"}]   # paused or off: not counted
    assert judge({**healthy, "sources": paused, "discord": "off"}, 1.0) == ("ok", [])
    assert judge({**healthy, "loop_lag_ms": {"p99": 6000.0}}, 1.0) == \
        ("failing", ["event loop lag p99 6000 ms > 5000 ms"])
    assert judge({**healthy, "disk_free_gb": 0.5}, 1.0, "locked")[0] == "failing"


async def _healthz(url: str, **headers) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "healthz", headers=headers) as resp:
            return resp.status, await resp.json()


REPORT_KEYS = ["status", "reasons", "loop_lag_ms", "queues", "pending", "downloaded", "failed", "last_scored_at",
               "sources", "discord", "disk_free_gb", "downloads_paused", "model", "detector", "to_detect_again",
               "uptime_s"]


def test_the_readme_explains_every_field_of_the_report():
    """The README's Health table names each /healthz field (`detector` and `to_detect_again` were missing)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Health\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([a-z_]+)`", row)}
    assert set(REPORT_KEYS) <= named, sorted(set(REPORT_KEYS) - named)


async def test_healthz_of_a_running_daemon_ok_degraded_and_failing(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, WEB)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        (tmp_path / "inbox" / "a.jpg").write_bytes(picture(1))

        async def scored():
            status, report = await _healthz(daemon.gallery_url)
            return (status, report) if report["last_scored_at"] else None
        status, report = await wait_for(scored)
        assert status == 200 and report["status"] == "ok" and report["reasons"] == []
        assert list(report) == REPORT_KEYS
        assert report["detector"] == "animeface" and report["to_detect_again"] == 0
        assert report["loop_lag_ms"]["samples"] > 0 and report["queues"] == {"download": 0, "score": 0}
        assert (report["pending"], report["failed"], report["discord"]) == (0, 0, "off")
        assert report["model"] == "resnet18-random-init" and report["uptime_s"] > 0
        assert report["disk_free_gb"] > 0 and report["downloads_paused"] is None
        [inbox] = report["sources"]
        assert (inbox["name"], inbox["state"], inbox["healthy"], inbox["last_error"]) == ("inbox", "ok", True, None)
        assert inbox["next_poll"]
        async with aiohttp.ClientSession() as session:    # /api/stats carries the loop lag too
            async with session.get(daemon.gallery_url + "api/stats") as resp:
                assert (await resp.json())["loop_lag_ms"]["samples"] > 0
        # the daemon writes where its gallery is, for `status`
        state = json.loads((cfg.data_path / "daemon.json").read_text())
        assert state["pid"] == os.getpid() and state["gallery"] == daemon.gallery_url

        daemon.stats["downloads_paused"] = "low disk: 0.4 GB free < storage.min_free_gb 1.0"
        status, report = await _healthz(daemon.gallery_url)
        assert status == 200 and report["status"] == "degraded"
        assert report["reasons"] == ["downloads paused: low disk: 0.4 GB free < storage.min_free_gb 1.0"]

        def unreadable(path, tag=None):
            raise sqlite3.DatabaseError("database disk image is malformed")
        monkeypatch.setattr("bot.health.read_database", unreadable)
        status, report = await _healthz(daemon.gallery_url)
        assert status == 503 and report["status"] == "failing"
        assert report["reasons"][0] == "the database cannot be read: database disk image is malformed"
        assert report["reasons"][1].startswith("downloads paused")
        assert report["pending"] is None and report["sources"] == []
    finally:
        await daemon.stop()
    assert not (cfg.data_path / "daemon.json").exists()


async def test_an_unhealthy_source_degrades_health_and_status_shows_it_running_and_stopped(tmp_path, serve):
    async def broken(request):
        return web.Response(status=503)
    app = web.Application()
    app.router.add_get("/posts.json", broken)
    base = await serve(app)
    source = f'[[sources]]\nname = "down"\nkind = "booru"\nurl = "{base}"\ninterval = 0.5\n'
    cfg = make_config(tmp_path, source + WEB, unhealthy_after=1)
    config = tmp_path / "config.toml"
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        async def degraded():
            status, report = await _healthz(daemon.gallery_url)
            return (status, report) if report["status"] != "ok" else None
        status, report = await wait_for(degraded)
        assert status == 200 and report["status"] == "degraded"
        [reason] = report["reasons"]
        assert reason.startswith("source down is unhealthy: server error 503"), reason
        down = next(s for s in report["sources"] if s["name"] == "down")
        assert (down["state"], down["healthy"], down["failures"]) == ("UNHEALTHY", False, 1)

        running = await asyncio.to_thread(cli, tmp_path, "--config", config, "status")
        assert running.returncode == 0, running.stderr
        lines = running.stdout.splitlines()
        assert lines[0] == f"daemon: running (pid {os.getpid()}), up " + lines[0].split(", up ")[1]
        assert f"figures from its /healthz at {daemon.gallery_url}" in lines[0]
        assert lines[1] == "status: degraded" and lines[2].startswith("  - source down is unhealthy: server error 503")
        assert any(line.startswith("event loop lag: p50 ") for line in lines)
        as_json = await asyncio.to_thread(cli, tmp_path, "--config", config, "status", "--json")
        report = json.loads(as_json.stdout)
        assert (report["running"], report["pid"], report["from"], report["status"]) == \
            (True, os.getpid(), "healthz", "degraded")
    finally:
        await daemon.stop()

    stopped = await asyncio.to_thread(cli, tmp_path, "--config", config, "status")
    assert stopped.returncode == 1
    lines = stopped.stdout.splitlines()
    assert lines[:2] == ["daemon: not running; figures from the database", "status: stopped"]
    assert lines[2].startswith("  - source down is unhealthy: server error 503")
    assert "pending 0 (to download), downloaded 0 (to score), failed 0" in lines
    assert "model: resnet18-random-init" in lines and "last scored: never" in lines
    assert any(line.startswith("source down: UNHEALTHY, last poll 20") for line in lines)
    assert any(line.startswith("source inbox: ok") for line in lines)
    report = json.loads((await asyncio.to_thread(cli, tmp_path, "--config", config, "status", "--json")).stdout)
    assert (report["running"], report["pid"], report["from"], report["loop_lag_ms"]) == \
        (False, None, "database", None)


def test_status_of_a_data_folder_that_does_not_exist_creates_nothing(tmp_path):
    make_config(tmp_path)
    result = cli(tmp_path, "--config", tmp_path / "config.toml", "status")
    assert result.returncode == 1 and result.stderr == ""
    assert result.stdout.splitlines() == [
        "daemon: not running", "status: stopped",
        f"  - no data folder {tmp_path / 'data'} (no daemon has run with this config)"]
    assert not (tmp_path / "data").exists()


def _seen_from(address: str):
    """A middleware that makes every request look as if it came from ``address``."""
    @web.middleware
    async def peer(request, handler):
        return await handler(request.clone(remote=address))
    return peer


async def test_healthz_needs_no_token_from_this_machine_and_the_token_from_elsewhere(tmp_path):
    token = "s3cret-gallery-token"
    cfg = make_config(tmp_path, f'{WEB}host = "0.0.0.0"\ntoken = "{token}"\n')
    seed(cfg, [{"popularity": 1}])
    store = await AsyncStore(cfg.db_path).open()
    local = TestClient(TestServer(Gallery(cfg, store).app(), host="127.0.0.1"))
    app = Gallery(cfg, store).app()
    app.middlewares.insert(0, _seen_from("203.0.113.7"))
    remote = TestClient(TestServer(app, host="127.0.0.1"))
    await local.start_server()
    await remote.start_server()
    try:
        resp = await local.get("/healthz")
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
        assert (await local.get("/")).status == 401                 # only /healthz is open
        assert (await local.get("/healthz", headers={"Host": "rebound.example"})).status == 401
        assert (await remote.get("/healthz")).status == 401
        assert (await remote.get("/healthz", headers={"Authorization": "Bearer wrong"})).status == 401
        resp = await remote.get("/healthz", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200 and (await resp.json())["sources"]
    finally:
        await local.close()
        await remote.close()
        await store.close()
