"""Soak test: the real daemon against a hostile local server, killed and restarted, rated throughout.

    python bench/soak.py --minutes 15 --kills 6          # the recorded run (bench/RESULTS.md)
    python bench/soak.py --minutes 2 --kills 3 --json    # what tests/test_soak.py runs

A local aiohttp server plays a Danbooru-style booru and an RSS feed whose posts arrive over time,
each with its own generated picture. It injects the faults a real source can throw at us:

- on the feed requests: 500, 503, 429 with hostile ``Retry-After``/reset values (negative, 0,
  ``inf``, ``1e20``, a year, a date in 2099), timeouts, truncated JSON, broken XML, an HTML page;
- in the posts: older API dialects (Danbooru 1.x ``created_at`` objects, ids and scores as
  strings, tag lists), a post with no picture URL, a post with an ``javascript:`` page link;
- on the pictures: HTML served as JPEG, truncated and zero-byte files, a 20000x20000 PNG, a gzip
  bomb, redirects to a refused address (spelt as integer, hex and octal IPv4 literals), a 503 on
  the first try of some good pictures.

Meanwhile ``python main.py run`` is killed with SIGKILL at random moments and started again, and
ratings are posted to the gallery. At the end the faults stop, the daemon catches up and is
stopped with SIGINT, and the report says: items served vs stored (lost, duplicated, good ones
never scored), ratings acknowledged vs stored, ``PRAGMA integrity_check``, unexpected exits, peak
RSS, connections toward the refused address, tracebacks, and log lines per fault kind.

Traffic goes only to 127.0.0.1 (the server, the gallery) and 127.0.0.2 (a trap that counts any
connection toward the refused address; the daemon must never open one).
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
TRAP_HOST = "127.0.0.2"

FEED_FAULTS = ["500", "503", "429", "timeout", "truncated", "html"]
HOSTILE_DELAYS = ["-5", "0", "inf", "1e20", "nan", "31536000", "Wed, 01 Jan 2099 00:00:00 GMT", "3", "abc"]
PICTURE_FAULTS = ["html_as_jpeg", "truncated", "zero_byte", "huge", "gzip_bomb", "redirect_refused"]
REFUSED_SPELLINGS = ["{ip}", "2130706434", "0x7f000002", "0177.0.0.2", "127.2"]


# ---- pictures -----------------------------------------------------------------------------------
def picture(n: int, size: int = 96) -> bytes:
    """A distinct PNG for item ``n``: a grid of random colours seeded by ``n``."""
    from PIL import Image
    rng = random.Random(n * 7919 + 13)
    cells = 6
    im = Image.new("RGB", (cells, cells))
    im.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(cells * cells)])
    buf = io.BytesIO()
    im.resize((size, size), Image.NEAREST).save(buf, "PNG")
    return buf.getvalue()


def huge_png(side: int = 20000) -> bytes:
    """A small file that claims ``side`` x ``side`` pixels (1-bit, all zero: compresses to ~50 KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def gzip_bomb(megabytes: int = 200) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as f:
        block = b"\x00" * (1 << 20)
        for _ in range(megabytes):
            f.write(block)
    return out.getvalue()


# ---- the hostile server ---------------------------------------------------------------------------
@dataclass
class Post:
    n: int                        # global item number (distinct picture)
    source: str                   # "booru" | "feed"
    external_id: str
    created: float
    picture: str = "good"         # "good", "good_retry" or one of PICTURE_FAULTS
    dialect: str = "modern"


@dataclass
class ServerLog:
    served: dict[str, set[int]] = field(default_factory=lambda: {"booru": set(), "feed": set()})  # post numbers
    feed_faults: Counter = field(default_factory=Counter)
    picture_faults: Counter = field(default_factory=Counter)
    picture_requests: Counter = field(default_factory=Counter)


class HostileServer:
    def __init__(self, *, seed: int, item_every: float, fault_rate: float, timeout_s: float):
        self.rng = random.Random(seed)
        self.item_every = item_every
        self.fault_rate = fault_rate
        self.timeout_s = timeout_s
        self.faults_on = True
        self.adding = True
        self.posts: list[Post] = []
        self.log = ServerLog()
        self.port = 0
        self.trap_port = 0
        self.started = time.time()
        self._pictures: dict[int, bytes] = {}
        self._huge = huge_png()
        self._bomb = gzip_bomb()
        self._runner: web.AppRunner | None = None

    # items arrive over time, alternating between the two sources
    def _grow(self) -> None:
        if not self.adding:
            return
        due = int((time.time() - self.started) / self.item_every)
        while len(self.posts) < due:
            n = len(self.posts)
            source = "booru" if n % 3 else "feed"
            roll = self.rng.random()
            if roll < 0.15:
                kind = self.rng.choice(PICTURE_FAULTS)
            elif roll < 0.22:
                kind = "good_retry"
            else:
                kind = "good"
            dialect = self.rng.choice(["modern", "modern", "danbooru1", "strings", "nopage", "javascript"])
            ext = str(1000 + n) if source == "booru" else f"tag:soak,2026:{n}"
            self.posts.append(Post(n, source, ext, time.time(), kind, dialect))

    def _fault(self) -> str | None:
        if self.faults_on and self.rng.random() < self.fault_rate:
            return self.rng.choice(FEED_FAULTS)
        return None

    async def _feed_fault(self, kind: str, what: str) -> web.StreamResponse:
        self.log.feed_faults[f"{what}:{kind}"] += 1
        if kind in ("500", "503"):
            return web.Response(status=int(kind), text="<html>server error</html>", content_type="text/html")
        if kind == "429":
            header = self.rng.choice(["Retry-After", "X-RateLimit-Reset", "RateLimit-Reset"])
            return web.Response(status=429, text="slow down", headers={header: self.rng.choice(HOSTILE_DELAYS)})
        if kind == "timeout":
            await asyncio.sleep(self.timeout_s + 5)
            return web.Response(text="late")
        if kind == "html":
            return web.Response(text="<html><body>Cloudflare says hello</body></html>", content_type="text/html")
        return web.Response(status=500)

    def _url(self, p: Post) -> str:
        return f"http://127.0.0.1:{self.port}/img/{p.n}.png"

    def _booru_post(self, p: Post) -> dict:
        pid = int(p.external_id)
        post = {"id": pid, "file_url": self._url(p), "md5": f"{p.n:032x}", "rating": "g", "score": p.n % 50,
                "tag_string": f"soak item_{p.n} 1girl", "tag_string_artist": f"artist_{p.n % 7}",
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(p.created))}
        if p.dialect == "danbooru1":
            post["created_at"] = {"json_class": "Time", "s": int(p.created), "n": 42631000}
            post["tags"] = post.pop("tag_string")
        elif p.dialect == "strings":
            post["id"], post["score"] = str(pid), str(p.n % 50)
        return post

    async def posts_json(self, request: web.Request) -> web.StreamResponse:
        self._grow()
        fault = self._fault()
        if fault and fault != "truncated":
            return await self._feed_fault(fault, "booru")
        limit = int(request.query.get("limit", "20"))
        page = request.query.get("page", "")
        after = int(page[1:]) if page.startswith("a") else None
        posts = [p for p in self.posts if p.source == "booru"]
        if after is not None:
            posts = [p for p in posts if int(p.external_id) > after][:limit]
        else:
            posts = posts[-limit:]
        body = json.dumps([self._booru_post(p) for p in reversed(posts)])
        if fault == "truncated":
            self.log.feed_faults["booru:truncated"] += 1
            return web.Response(text=body[: max(1, len(body) // 2)], content_type="application/json")
        self.log.served["booru"].update(p.n for p in posts)
        return web.Response(text=body, content_type="application/json")

    async def feed_xml(self, request: web.Request) -> web.StreamResponse:
        self._grow()
        fault = self._fault()
        if fault and fault != "truncated":
            return await self._feed_fault(fault, "feed")
        posts = [p for p in self.posts if p.source == "feed"][-30:]
        entries = []
        for p in reversed(posts):
            link = f"http://127.0.0.1:{self.port}/post/{p.n}"
            if p.dialect == "javascript":
                link = "javascript:alert(1)"
            title = f"item {p.n}" if p.dialect != "strings" else f"item {p.n}&#10;ERROR forged line"
            if p.dialect == "nopage":  # no id, no link, no title: only the picture names it
                entries.append(f'<item><description>&lt;img src="{self._url(p)}"&gt;</description></item>')
                continue
            entries.append(f"<item><title>{title}</title><link>{link}</link><guid>{p.external_id}</guid>"
                           f'<enclosure url="{self._url(p)}" type="image/png" length="1"/></item>')
        body = ('<?xml version="1.0"?><rss version="2.0"><channel><title>soak</title>'
                f"<link>http://127.0.0.1:{self.port}/</link>{''.join(entries)}</channel></rss>")
        if fault == "truncated":
            self.log.feed_faults["feed:broken_xml"] += 1
            return web.Response(text=body[: max(1, len(body) // 2)] + "<<&&", content_type="application/rss+xml")
        self.log.served["feed"].update(p.n for p in posts)
        return web.Response(text=body, content_type="application/rss+xml")

    async def image(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        if n >= len(self.posts):
            raise web.HTTPNotFound()
        p = self.posts[n]
        self.log.picture_requests[n] += 1
        kind = p.picture
        if kind != "good":
            self.log.picture_faults[kind] += 1
        if kind == "good_retry" and self.log.picture_requests[n] == 1:
            return web.Response(status=503, text="busy")
        if kind == "html_as_jpeg":
            return web.Response(body=b"<html><body>not a picture</body></html>", content_type="image/jpeg")
        if kind == "truncated":
            data = self._picture(n)
            return web.Response(body=data[: len(data) // 2], content_type="image/png")
        if kind == "zero_byte":
            return web.Response(body=b"", content_type="image/png")
        if kind == "huge":
            return web.Response(body=self._huge, content_type="image/png")
        if kind == "gzip_bomb":
            return web.Response(body=self._bomb, headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})
        if kind == "redirect_refused":
            host = self.rng.choice(REFUSED_SPELLINGS).format(ip=TRAP_HOST)
            raise web.HTTPFound(f"http://{host}:{self.trap_port}/stolen.png")
        return web.Response(body=self._picture(n), content_type="image/png")

    def _picture(self, n: int) -> bytes:
        if n not in self._pictures:
            self._pictures[n] = picture(n)
        return self._pictures[n]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/posts.json", self.posts_json)
        app.router.add_get("/feed.xml", self.feed_xml)
        app.router.add_get("/img/{n:\\d+}.png", self.image)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Trap:
    """Listens on the refused address and counts every connection the daemon opens to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind((TRAP_HOST, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()


# ---- the daemon under test --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(work: Path, server_port: int, web_port: int, timeout_s: float) -> Path:
    path = work / "soak.toml"
    path.write_text(f"""
data_dir = "{work / 'data'}"

[download]
allow_private = ["127.0.0.1"]     # the hostile server; 127.0.0.2 stays refused
timeout = {timeout_s}
max_bytes = 20000000
near_duplicate_distance = -1      # every generated picture is distinct; do not link look-alikes

[daemon]
backoff_max = 20
stop_timeout = 5

[web]
enabled = "on"
port = {web_port}

[[sources]]
name = "booru"
kind = "booru"
api = "danbooru"
url = "http://127.0.0.1:{server_port}"
interval = 2
ratings = []

[[sources]]
name = "feed"
kind = "rss"
url = "http://127.0.0.1:{server_port}/feed.xml"
interval = 2
""")
    return path


class DaemonRunner:
    def __init__(self, config: Path, work: Path):
        self.config = config
        self.log_path = work / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0
        self.unexpected_exits: list[int] = []
        self.peak_rss = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.log_path, "a") as log:
            log.write(f"---- soak: start {self.starts + 1} ----\n")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(self.config), "run"],
                                     cwd=self.config.parent, env=env, stdin=subprocess.DEVNULL,
                                     stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT)
        self.starts += 1

    def check(self) -> None:
        """Note an exit we did not cause, and start again."""
        if self.proc is not None and self.proc.poll() is not None:
            self.unexpected_exits.append(self.proc.returncode)
            self.start()

    def sample_rss(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            import psutil
            p = psutil.Process(self.proc.pid)
            rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
        except Exception:  # noqa: BLE001 - it may exit between the calls
            return
        self.peak_rss = max(self.peak_rss, rss)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


class Rater:
    """Rates scored pictures through the gallery, as a person would, and keeps what was acknowledged."""

    def __init__(self, db: Path, web_port: int, seed: int):
        self.db = db
        self.base = f"http://127.0.0.1:{web_port}"
        self.rng = random.Random(seed)
        self.acknowledged: dict[int, int] = {}
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)

    def _candidates(self) -> list[int]:
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=2)
            try:
                ids = [r[0] for r in con.execute("SELECT id FROM images WHERE status = 'scored'")]
            finally:
                con.close()
        except sqlite3.Error:
            return []
        return [i for i in ids if i not in self.acknowledged]

    def _run(self):
        while not self._stop.wait(self.rng.uniform(0.2, 0.8)):
            ids = self._candidates()
            if not ids:
                continue
            image_id, value = self.rng.choice(ids), self.rng.randint(1, 5)
            req = urllib.request.Request(
                f"{self.base}/rate/{image_id}", data=json.dumps({"value": value}).encode(), method="POST",
                headers={"Content-Type": "application/json", "Accept": "application/json", "Origin": self.base})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200 and json.loads(resp.read()).get("ok"):
                        self.acknowledged[image_id] = value
            except (urllib.error.URLError, OSError, ValueError):
                self.refused += 1  # the daemon is down (killed) or restarting: not acknowledged


# ---- the run -----------------------------------------------------------------------------------------
POLL_FAILURE = re.compile(r"source (booru|feed): (.*); next try in")
FAILURE_KINDS = [  # how each kind of failed poll reads in the log
    ("timeout", r"timed out"),
    ("429", r"rate limited|\b429\b"),
    ("5xx", r"server error|\b50\d\b"),
    ("malformed", r"malformed|not well-formed|unexpected .* answer|not JSON|expected"),
]


def log_summary(lines: list[str], server: HostileServer) -> dict:
    """Failed polls by the kind their log line names, and for each kind of bad picture how many were
    logged (a line naming its URL) with an example line."""
    polls = Counter()
    examples: dict[str, str] = {}
    for ln in lines:
        m = POLL_FAILURE.search(ln)
        if not m:
            continue
        kind = next((k for k, pat in FAILURE_KINDS if re.search(pat, m.group(2), re.I)), "other")
        polls[kind] += 1
        examples.setdefault(kind, ln.split(" ", 2)[-1][:160])
    pictures = {}
    for kind in PICTURE_FAULTS:
        posts = [p for p in server.posts if p.picture == kind and server.log.picture_requests[p.n]]
        logged = [next((ln for ln in lines if f"/img/{p.n}.png" in ln), None) for p in posts]
        pictures[kind] = {"fetched": len(posts), "logged": sum(ln is not None for ln in logged),
                          "example": next((ln.split(" ", 2)[-1][:160] for ln in logged if ln), None)}
    return {"failed_polls": dict(polls), "failed_poll_examples": examples, "bad_pictures": pictures}


def analyse(server: HostileServer, daemon: DaemonRunner, rater: Rater, trap: Trap, db: Path,
            minutes: float) -> dict:
    con = sqlite3.connect(db)
    rows = con.execute("SELECT status, media_url FROM images").fetchall()
    integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    labels = Counter((r[0], r[1]) for r in con.execute(
        "SELECT image_id, value FROM labels WHERE origin = 'web' AND removed_at IS NULL"))
    con.close()

    # every post has its own picture URL (/img/N.png), whatever id its source gives it
    picture = re.compile(rf"^http://127\.0\.0\.1:{server.port}/img/(\d+)\.png$")
    stored: Counter = Counter()
    status: dict[int, str] = {}
    for st, url in rows:
        m = picture.match(url or "")
        if m:
            stored[int(m.group(1))] += 1
            status[int(m.group(1))] = st
    posts = {p.n: p for p in server.posts}
    served = {n for ids in server.log.served.values() for n in ids}
    lost = sorted(served - set(stored))
    duplicated = sorted(n for n, c in stored.items() if c > 1)
    good = [n for n in served if posts[n].picture in ("good", "good_retry")]
    never_scored = sorted(n for n in good if status.get(n) != "scored")
    bad = [n for n in served if posts[n].picture in PICTURE_FAULTS]
    bad_scored = sorted(n for n in bad if status.get(n) == "scored")
    ratings_lost = sorted(i for i, v in rater.acknowledged.items() if labels[(i, v)] < 1)

    text = daemon.log_path.read_text(errors="replace")
    lines = text.splitlines()
    return {
        "minutes": minutes,
        "items": {"served": len(served), "stored": len(set(stored) & served), "lost": len(lost),
                  "duplicated": len(duplicated), "good": len(good),
                  "good_scored": len(good) - len(never_scored), "never_scored": len(never_scored),
                  "bad_pictures": len(bad), "bad_scored": len(bad_scored),
                  "examples": {"lost": lost[:5], "duplicated": duplicated[:5], "never_scored": never_scored[:5]}},
        "ratings": {"acknowledged": len(rater.acknowledged), "stored": len(rater.acknowledged) - len(ratings_lost),
                    "lost": len(ratings_lost), "refused_while_down": rater.refused},
        "integrity_check": integrity,
        "daemon": {"starts": daemon.starts, "kills": daemon.kills, "unexpected_exits": daemon.unexpected_exits,
                   "peak_rss_mb": round(daemon.peak_rss / 2 ** 20)},
        "refused_address_connections": trap.connections,
        "faults_served": {"feeds": dict(sorted(server.log.feed_faults.items())),
                          "pictures": dict(sorted(server.log.picture_faults.items()))},
        "log": {"lines": len(lines), "warnings": sum(" WARNING " in ln for ln in lines),
                "errors": sum(" ERROR " in ln for ln in lines),
                "tracebacks": sum(ln.startswith("Traceback") for ln in lines),
                "forged_lines": sum(ln.startswith("ERROR forged") for ln in lines),
                **log_summary(lines, server)},
    }


def ok(report: dict) -> bool:
    return (report["items"]["lost"] == 0 and report["items"]["duplicated"] == 0
            and report["items"]["never_scored"] == 0 and report["ratings"]["lost"] == 0
            and report["integrity_check"] == "ok" and not report["daemon"]["unexpected_exits"]
            and report["refused_address_connections"] == 0 and report["log"]["tracebacks"] == 0
            and report["log"]["forged_lines"] == 0
            and all(v["logged"] == v["fetched"] for v in report["log"]["bad_pictures"].values()))


async def soak(minutes: float, kills: int, seed: int, work: Path, *, item_every: float | None = None,
               fault_rate: float = 0.3, drain_s: float = 180.0, progress=print) -> dict:
    rng = random.Random(seed)
    timeout_s = 3.0
    item_every = item_every or max(0.5, minutes * 60 / 450)
    server = HostileServer(seed=seed, item_every=item_every, fault_rate=fault_rate, timeout_s=timeout_s)
    trap = Trap()
    server.trap_port = trap.port
    await server.start()
    web_port = free_port()
    config = write_config(work, server.port, web_port, timeout_s)
    db = work / "data" / "tastefeed.db"
    daemon = DaemonRunner(config, work)
    rater = Rater(db, web_port, seed)
    duration = minutes * 60
    kill_at = sorted(rng.uniform(0.1, 0.95) * duration for _ in range(kills))
    t0 = time.monotonic()
    daemon.start()
    rater.start()
    try:
        while (elapsed := time.monotonic() - t0) < duration:
            await asyncio.sleep(0.5)
            daemon.sample_rss()
            daemon.check()
            if kill_at and elapsed >= kill_at[0]:
                kill_at.pop(0)
                daemon.kill()
                progress(f"soak: {elapsed:5.0f}s kill {daemon.kills}, {len(server.posts)} items so far")
                await asyncio.sleep(rng.uniform(0, 2))
                daemon.start()
        # catch up: no new items, no more faults; wait until every served item is handled
        server.adding = False
        server.faults_on = False
        progress(f"soak: {duration:5.0f}s faults off, catching up ({len(server.posts)} items)")
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            await asyncio.sleep(2)
            daemon.sample_rss()
            daemon.check()
            if _caught_up(db, server):
                break
        rater.close()
        code = daemon.stop()
        if code != 0:
            daemon.unexpected_exits.append(code)
    finally:
        rater.close()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        await server.stop()
        trap.close()
    return analyse(server, daemon, rater, trap, db, minutes)


def _caught_up(db: Path, server: HostileServer) -> bool:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        try:
            busy = con.execute("SELECT COUNT(*) FROM images WHERE status IN ('pending', 'downloaded')").fetchone()[0]
            count = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return False
    served = sum(len(v) for v in server.log.served.values())
    every = len(server.posts)
    return busy == 0 and count >= every and served >= every


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fault-rate", type=float, default=0.3, help="share of feed requests that fail")
    ap.add_argument("--work", help="folder for the daemon's data and log (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tastefeed-soak-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(soak(args.minutes, args.kills, args.seed, work, fault_rate=args.fault_rate,
                                  progress=lambda m: print(m, file=sys.stderr)))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if ok(report) else 1


def format_report(r: dict) -> str:
    i, ra, d = r["items"], r["ratings"], r["daemon"]
    return "\n".join([
        f"soak: {r['minutes']:g} min, {d['kills']} kills (SIGKILL), {d['starts']} starts",
        f"items: {i['served']} served, {i['stored']} stored, {i['lost']} lost, {i['duplicated']} duplicated",
        f"good pictures: {i['good']}, scored {i['good_scored']}, never scored {i['never_scored']}; "
        f"bad pictures {i['bad_pictures']} (scored by mistake: {i['bad_scored']})",
        f"ratings: {ra['acknowledged']} acknowledged, {ra['stored']} stored, {ra['lost']} lost "
        f"({ra['refused_while_down']} refused while the daemon was down)",
        f"integrity_check: {r['integrity_check']}; unexpected exits: {d['unexpected_exits'] or 0}; "
        f"peak RSS {d['peak_rss_mb']} MB; connections toward the refused address: "
        f"{r['refused_address_connections']}",
        f"faults served: {json.dumps(r['faults_served'])}",
        f"log: {json.dumps(r['log'])}",
        "OK" if ok(r) else "FAILED",
    ])


if __name__ == "__main__":
    sys.exit(main())
