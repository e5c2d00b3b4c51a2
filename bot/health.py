"""Health: how late the event loop wakes, and the report that ``/healthz`` and ``status`` print.

- :class:`LoopMonitor` runs on the daemon's event loop: it sleeps 100 ms, measures how much later
  than asked it woke (the *lag*: time the loop spent on something that did not yield), keeps the
  lags of the last minute, puts p50/p99/max into ``daemon.stats["loop_lag_ms"]`` and logs one
  warning line when a lag exceeds 250 ms (at most one line per 10 s, counting the ones it held back).
- :func:`live_report` (the gallery's ``GET /healthz``) and :func:`status_report` (``python main.py
  status``, for a running or stopped daemon) build the same JSON report; :func:`judge` applies the
  rules below to it.

The rules (README "Health"):

- ``failing`` when the database cannot be read, or the loop lag's p99 over the last minute is
  above 5 s;
- ``degraded`` when a source is UNHEALTHY, Discord is set up but not connected, downloads are
  paused (``stats["downloads_paused"]``), the data folder's disk has less free than
  ``storage.min_free_gb``, or the loop lag's p99 is above 1 s;
- else ``ok``. ``status`` says ``stopped`` when no daemon runs (the reasons still list what the
  database shows).

The database is read on a short-lived read-only connection (``mode=ro``) with indexed queries
only, so the report is quick, never waits behind the daemon's writer thread and never creates
the database. The daemon writes ``<data>/daemon.json`` (pid, gallery address) on start and
removes it on stop, so that ``status`` can find the gallery to ask.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import sqlite3
import time
import urllib.error
import urllib.request
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from bot.config import Config
from bot.manage import PAUSED_SOURCES, format_lag, source_state

log = logging.getLogger("tastefeed.health")

LAG_INTERVAL = 0.1        # seconds between the monitor's wake-ups
LAG_WINDOW = 60.0         # seconds of lags kept for p50/p99/max
LAG_WARN_MS = 250.0       # a lag above this is logged ...
LAG_WARN_EVERY = 10.0     # ... at most once per this many seconds
DEGRADED_LAG_MS = 1000.0  # p99 above this: degraded
FAILING_LAG_MS = 5000.0   # p99 above this: failing
READ_TIMEOUT = 2.0        # seconds the report waits for the database before calling it unreadable
STATE_FILE = "daemon.json"
FETCH_TIMEOUT = 5.0       # seconds `status` waits for the daemon's /healthz


# ---- event-loop lag --------------------------------------------------------------------------
class LoopMonitor:
    """Measure the event loop's lag; ``figures()`` (also kept in ``stats["loop_lag_ms"]``, once
    a second) gives p50/p99/max in ms over the last ``window`` seconds and the sample count."""

    def __init__(self, stats: dict, *, interval: float = LAG_INTERVAL, window: float = LAG_WINDOW,
                 warn_ms: float = LAG_WARN_MS, warn_every: float = LAG_WARN_EVERY):
        self.stats = stats
        self.interval, self.window, self.warn_ms, self.warn_every = interval, window, warn_ms, warn_every
        self.lags: deque[tuple[float, float]] = deque()   # (monotonic time, lag ms)
        self._task: asyncio.Task | None = None
        self._last_warning = -math.inf
        self._held_back = 0          # lags over warn_ms not logged since the last warning
        self._published = -math.inf

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=1)
            self._task = None

    async def _run(self) -> None:
        while True:
            asked = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            woke = time.monotonic()
            self.record(max(0.0, (woke - asked) * 1000), woke)

    def record(self, lag_ms: float, at: float) -> None:
        """One measured lag: kept in the window, warned about when over the threshold."""
        self.lags.append((at, lag_ms))
        while self.lags and self.lags[0][0] < at - self.window:
            self.lags.popleft()
        if lag_ms > self.warn_ms:
            if at - self._last_warning >= self.warn_every:
                more = f"; {self._held_back} more over {self.warn_ms:g} ms since the last warning" \
                    if self._held_back else ""
                log.warning("event loop lag %.0f ms: something held the loop without yielding "
                            "(p99 over the last minute %.0f ms%s)", lag_ms, self.figures()["p99"], more)
                self._last_warning, self._held_back = at, 0
            else:
                self._held_back += 1
        if at - self._published >= 1.0 or lag_ms > self.warn_ms:
            self.stats["loop_lag_ms"] = self.figures()
            self._published = at

    def figures(self) -> dict:
        values = sorted(lag for _, lag in self.lags)
        if not values:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0, "samples": 0, "window_s": self.window}
        return {"p50": round(_rank(values, 0.50), 1), "p99": round(_rank(values, 0.99), 1),
                "max": round(values[-1], 1), "samples": len(values), "window_s": self.window}


def _rank(values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` of sorted ``values``."""
    return values[max(0, math.ceil(q * len(values)) - 1)]


# ---- the facts ---------------------------------------------------------------------------------
def read_database(db_path: Path, detector_tag: str | None = None) -> dict:
    """Counts, the last scored picture, the sources and the model, from a read-only connection
    (indexed queries only); with ``detector_tag`` (the detector in use, ``scorer.own_detector.tag``)
    also how many stored pictures wait to be detected again by it (the one query that reads every
    scored picture). Raises (sqlite3.Error,
    OSError) when the database cannot be read."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"{db_path}: no database")
    conn = sqlite3.connect(f"file:{quote(str(db_path.resolve()))}?mode=ro", uri=True, timeout=1.0)
    try:
        conn.row_factory = sqlite3.Row

        def count(status: str) -> int:
            return conn.execute("SELECT COUNT(*) FROM images WHERE status = ?", [status]).fetchone()[0]

        last = conn.execute("SELECT scored_at FROM images WHERE id = (SELECT MAX(id) FROM images "
                            "WHERE status IN ('scored', 'skipped'))").fetchone()
        model = conn.execute("SELECT version FROM models WHERE active = 1 LIMIT 1").fetchone()
        paused_row = conn.execute("SELECT value FROM settings WHERE key = ?", [PAUSED_SOURCES]).fetchone()
        paused = set(json.loads(paused_row[0])) if paused_row else set()
        sources = []
        for r in conn.execute("SELECT * FROM sources WHERE kind != 'import' ORDER BY name"):
            row = dict(r, config=json.loads(r["config"]))
            sources.append({"name": r["name"], "kind": r["kind"], "state": source_state(row, paused),
                            "healthy": bool(r["healthy"]), "failures": r["failures"],
                            "last_error": r["last_error"], "last_poll": r["last_poll_at"],
                            "next_poll": r["next_poll_at"]})
        again = None
        if detector_tag is not None:
            from storage.redetect import _CANDIDATES, candidates
            try:
                again = conn.execute(f"SELECT COUNT(*) {_CANDIDATES}", candidates(detector_tag)).fetchone()[0]
            except sqlite3.OperationalError:     # a database from before m011 (not upgraded yet)
                again = None
        return {"pending": count("pending"), "downloaded": count("downloaded"), "failed": count("failed"),
                "last_scored_at": last[0] if last else None, "sources": sources,
                "model": model[0] if model else None, "to_detect_again": again}
    finally:
        conn.close()


def disk_free_gb(path: Path) -> float | None:
    """Free space (GB, 10^9 bytes) on the disk holding ``path``; None when it cannot be told."""
    try:
        return round(shutil.disk_usage(path).free / 1e9, 2)
    except OSError:
        return None


def judge(report: dict, min_free_gb: float, store_error: str | None = None) -> tuple[str, list[str]]:
    """``(status, reasons)`` by the rules of the module docstring; the failing reasons first."""
    failing, degraded = [], []
    if store_error:
        failing.append(f"the database cannot be read: {store_error}")
    p99 = (report.get("loop_lag_ms") or {}).get("p99", 0.0)
    if p99 > FAILING_LAG_MS:
        failing.append(f"event loop lag p99 {p99:.0f} ms > {FAILING_LAG_MS:.0f} ms")
    elif p99 > DEGRADED_LAG_MS:
        degraded.append(f"event loop lag p99 {p99:.0f} ms > {DEGRADED_LAG_MS:.0f} ms")
    for s in report.get("sources") or []:
        if s["state"] == "UNHEALTHY":
            degraded.append(f"source {s['name']} is unhealthy" + (f": {s['last_error']}" if s["last_error"] else ""))
    if report.get("discord") == "disconnected":
        degraded.append("Discord is set up but not connected")
    if report.get("downloads_paused"):
        degraded.append(f"downloads paused: {report['downloads_paused']}")
    free = report.get("disk_free_gb")
    if free is not None and free < min_free_gb:
        degraded.append(f"disk free {free:g} GB < storage.min_free_gb {min_free_gb:g}")
    return ("failing" if failing else "degraded" if degraded else "ok"), failing + degraded


def _report(cfg: Config, *, store_error: str | None, database: dict, **live) -> dict:
    """The report's fields in their documented order; ``live`` holds what only a running daemon
    knows (loop lag, queues, Discord, downloads paused, uptime)."""
    report = {"status": None, "reasons": [], "loop_lag_ms": live.get("loop_lag_ms"),
              "queues": live.get("queues"), "pending": database.get("pending"),
              "downloaded": database.get("downloaded"), "failed": database.get("failed"),
              "last_scored_at": database.get("last_scored_at"), "sources": database.get("sources", []),
              "discord": live.get("discord", "off" if cfg.discord.off_reason() else "unknown"),
              "disk_free_gb": disk_free_gb(cfg.data_path), "downloads_paused": live.get("downloads_paused"),
              "model": database.get("model"), "detector": detector_in_use(cfg),
              "to_detect_again": database.get("to_detect_again"), "uptime_s": live.get("uptime_s")}
    report["status"], report["reasons"] = judge(report, cfg.storage.min_free_gb, store_error)
    return report


def detector_in_use(cfg: Config) -> str:
    """The face detector in use: ``own:VERSION`` (the owner's own, ``detector use``) or the
    configured one's name."""
    from scorer.own_detector import active_version

    version = active_version(cfg.paths)
    return f"own:{version}" if version else cfg.detector.name


def _read(cfg: Config) -> tuple[dict, str | None]:
    from scorer.own_detector import tag

    try:
        return read_database(cfg.db_path, tag(cfg.paths, cfg.detector)), None
    except Exception as e:  # noqa: BLE001 - whatever keeps the database from being read is "failing"
        return {}, _one_line(e)


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def database_report(cfg: Config) -> dict:
    """The report from the database alone (no daemon, or one whose gallery is off)."""
    database, error = _read(cfg)
    return _report(cfg, store_error=error, database=database)


async def live_report(daemon) -> dict:
    """The running daemon's report (``GET /healthz``): the database read off the loop, within
    :data:`READ_TIMEOUT`, and the daemon's own figures."""
    try:
        database, error = await asyncio.wait_for(asyncio.to_thread(_read, daemon.cfg), READ_TIMEOUT)
    except asyncio.TimeoutError:
        database, error = {}, f"no answer within {READ_TIMEOUT:g} s"
    pipeline = daemon.pipeline
    bot = daemon.discord
    return _report(
        daemon.cfg, store_error=error, database=database,
        loop_lag_ms=daemon.stats.get("loop_lag_ms"),
        queues={"download": pipeline.download_queue.qsize(), "score": pipeline.score_queue.qsize()},
        discord="off" if bot is None else "connected" if bot.ready.is_set() else "disconnected",
        downloads_paused=daemon.stats.get("downloads_paused"),
        uptime_s=round(time.monotonic() - daemon.started_at, 1) if daemon.started_at else None)


# ---- the daemon's state file and `status` ------------------------------------------------------
def write_state(data_path: Path, gallery_url: str | None) -> None:
    """``<data>/daemon.json``: this process's pid, the gallery's address (None: off) and the start
    time, written whole (a temporary file renamed)."""
    path = Path(data_path) / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "gallery": gallery_url,
                               "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    os.replace(tmp, path)


def remove_state(data_path: Path) -> None:
    Path(data_path, STATE_FILE).unlink(missing_ok=True)


def read_state(data_path: Path) -> dict:
    try:
        state = json.loads(Path(data_path, STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def fetch_healthz(url: str, token: str = "") -> dict:
    """The report a gallery answers at ``url``healthz (503 included: a failing report); raises
    OSError (urllib's errors among them) or ValueError when there is none."""
    request = urllib.request.Request(url.rstrip("/") + "/healthz", headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if e.code != 503:
            raise
        return json.loads(e.read())


def status_report(cfg: Config) -> dict:
    """What ``python main.py status`` reports: the running daemon's /healthz when its gallery is
    on, else the database's figures. Adds ``running``, ``pid`` and ``from`` (healthz, database or
    nothing); a daemon that does not run has status ``stopped``. Reads only: nothing is created."""
    from storage.lock import daemon_pid

    data = Path(cfg.data_path)
    if not data.is_dir():
        return {"status": "stopped", "reasons": [f"no data folder {data.resolve()} (no daemon has run with this config)"],
                "running": False, "pid": None, "from": None}
    pid = daemon_pid(data)
    running = pid is not None
    pid = pid if pid and pid > 0 else None
    state = read_state(data) if running else {}
    note = None
    if state.get("gallery") and state.get("pid") == pid:
        try:
            report = fetch_healthz(state["gallery"], cfg.web.token)
            return {**report, "running": True, "pid": pid, "from": "healthz", "gallery": state["gallery"]}
        except (OSError, ValueError) as e:
            note = f"its gallery {state['gallery']} did not answer /healthz: {_one_line(e)}"
    report = database_report(cfg)
    if note:
        report["reasons"].append(note)
        if report["status"] == "ok":
            report["status"] = "degraded"
    if not running:
        report["status"] = "stopped"
    return {**report, "running": running, "pid": pid, "from": "database"}


def format_report(r: dict) -> list[str]:
    """``status``'s lines for a report from :func:`status_report`."""
    if r["running"]:
        who = f"running (pid {r['pid']})" if r["pid"] else "running"
        if r.get("uptime_s") is not None:
            who += f", up {_duration(r['uptime_s'])}"
    else:
        who = "not running"
    source = {"healthz": f"; figures from its /healthz at {r.get('gallery')}",
              "database": "; figures from the database"}.get(r["from"], "")
    lines = [f"daemon: {who}{source}", f"status: {r['status']}"]
    lines += [f"  - {reason}" for reason in r["reasons"]]
    if r["from"] is None:
        return lines
    if r.get("loop_lag_ms"):
        lines.append(format_lag(r["loop_lag_ms"]))
    queues = f"queues: download {r['queues']['download']}, score {r['queues']['score']}; " if r.get("queues") else ""
    if r.get("pending") is not None:
        lines.append(f"{queues}pending {r['pending']} (to download), downloaded {r['downloaded']} (to score), "
                     f"failed {r['failed']}")
    lines.append(f"last scored: {r.get('last_scored_at') or 'never'}")
    lines.append(f"model: {r.get('model') or 'none yet'}")
    if r.get("detector"):
        again = r.get("to_detect_again")
        lines.append(f"detector: {r['detector']}" + (f"; {again} stored picture(s) to detect again with it"
                                                      if again else ""))
    lines.append(f"Discord: {r.get('discord')}")
    if r.get("disk_free_gb") is not None:
        lines.append(f"disk free: {r['disk_free_gb']:g} GB")
    if r.get("downloads_paused"):
        lines.append(f"downloads: paused ({r['downloads_paused']})")
    for s in r.get("sources") or []:
        lines.append(f"source {s['name']}: {s['state']}, last poll {s['last_poll'] or '-'}, "
                     f"next {s['next_poll'] or '-'}" + (f", last error: {s['last_error']}" if s["last_error"] else ""))
    return lines


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    return f"{days}d {h}h" if days else f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"
