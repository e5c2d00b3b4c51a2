"""Test helpers shared by the test modules: synthetic pictures, configs, seeded databases, the
command line run in-process, and the real data in ../shared (fixtures are in ``conftest.py``)."""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import pwd
import random
import select
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "main.py"  # for the tests where the process itself is under test
SHARED = ROOT.parent / "shared" / "data"


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


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(body)
    return path


def make_config(tmp_path, sources: str = "", **extra):
    """A small, fast config: data in tmp_path/data, a folder source on tmp_path/inbox, ``sources``
    (more TOML) appended."""
    from bot.config import load_config

    inbox = tmp_path / "inbox"
    body = f'''data_dir = "{tmp_path / 'data'}"
[download]
allow_private = ["127.0.0.1"]
timeout = 5
[scorer]
image_size = 64
batch_size = 8
backbone_size = 64
[daemon]
stop_timeout = 5
backoff_max = 60
unhealthy_after = {extra.get("unhealthy_after", 3)}
[[sources]]
name = "inbox"
kind = "folder"
interval = 0.5
path = "{inbox}"
settle = 0.2
{sources}'''
    # The gallery (on whenever Discord is off) takes a free port, never the default 8080, which
    # anything else on the machine may hold.
    if "[web]" not in body:
        body += "\n[web]\nport = 0\n"
    elif "port =" not in body.split("[web]", 1)[1].split("\n[", 1)[0]:
        body = body.replace("[web]\n", "[web]\nport = 0\n", 1)
    return load_config(write_config(tmp_path, body))


async def wait_for(predicate, timeout=10.0):
    """Await ``predicate()`` every 0.2 s until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met in time")


def seed(cfg, specs: list[dict], *, trained: bool = False, source: str = "booru-test") -> list[int]:
    """Scored pictures from a booru-like source, as the daemon would have stored them; with
    ``trained``, by a model registered as trained (so the ranking is by score, not cold).
    Each spec: popularity, and optionally score, uncertainty, faces, rating, tags, size (200×160)."""
    from scorer.registry import ensure_active_model
    from storage import Store
    from storage.media import inspect, store_media
    from storage.records import Face

    with Store.open(cfg.db_path) as store:
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
            data = picture(1000 + i, size=spec.get("size", (200, 160)))
            info, _ = inspect(data)
            rel = store_media(cfg.media_path, data, info)
            [image_id] = store.save_poll(sid, [{
                "external_id": f"post{i}", "page_url": f"https://booru.example/posts/{i}", "author": f"artist{i}",
                "title": f"post {i}", "tags": spec.get("tags", []), "rating": spec.get("rating", "general"),
                "popularity": spec["popularity"]}], {})
            store.record_download(image_id, info, rel, near_distance=-1)
            faces = [Face(20 + 90 * k, 20, 90 + 90 * k, 100, 0.9, "animeface",
                                spec.get("score", 3.0) - k / 10, 0.1) for k in range(spec.get("faces", 1))]
            store.record_analysis(image_id, faces, spec.get("score", 3.0), spec.get("uncertainty", 0.1),
                                  model["version"])
            ids.append(image_id)
    return ids


RATINGS = {None, "general", "sensitive", "questionable", "explicit"}


def assert_clean(item) -> None:
    """Every field of a source's item has its declared type (what the database write, the
    downloader and the gallery rely on)."""
    import math
    assert isinstance(item.external_id, str) and item.external_id.strip()
    item.external_id.encode("utf-8")
    for name in ("media_url", "page_url", "local_path", "author", "title", "site_md5", "posted_at", "skip"):
        value = getattr(item, name)
        assert value is None or isinstance(value, str), (name, value)
        if isinstance(value, str):
            value.encode("utf-8")  # no lone surrogates: SQLite could not store them
    for name in ("media_url", "page_url"):
        value = getattr(item, name)
        assert value is None or value.startswith(("http://", "https://")), (name, value)
    assert isinstance(item.tags, list) and all(isinstance(t, str) and t for t in item.tags)
    assert item.rating in RATINGS
    assert item.popularity is None or (isinstance(item.popularity, float) and math.isfinite(item.popularity))
    if item.posted_at is not None:
        assert item.posted_at.endswith("+00:00")


# ---- the command line, in-process ------------------------------------------------------------
@dataclass
class Result:
    """What a command-line run gave: named like :class:`subprocess.CompletedProcess`."""
    returncode: int
    stdout: str
    stderr: str


def cli(cwd, *args) -> Result:
    """Run ``main.py ARGS...`` in this process, in the folder ``cwd``, capturing its output.

    Logging set up by the command is undone afterwards. From a running event loop call it in a
    thread (``await asyncio.to_thread(cli, ...)``): commands run their own loop."""
    from bot.cli import main

    out, err = io.StringIO(), io.StringIO()
    handlers, levels = list(logging.root.handlers), _logger_levels()
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help, bad arguments
                code = e.code if isinstance(e.code, int) else 1
    finally:
        for handler in logging.root.handlers[:]:
            if handler not in handlers:
                logging.root.removeHandler(handler)
        for name, logger in _loggers().items():
            logger.setLevel(levels.get(name, logging.NOTSET))
    return Result(code, out.getvalue(), err.getvalue())


def _loggers() -> dict[str, logging.Logger]:
    loggers = {name: logger for name, logger in logging.root.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)}
    return {"": logging.root, **loggers}


def _logger_levels() -> dict[str, int]:
    return {name: logger.level for name, logger in _loggers().items()}


# ---- file permissions that hold for root too ---------------------------------------------------
@contextlib.contextmanager
def open_folder():
    """A temporary folder every user can reach (pytest's tmp_path is private to its user)."""
    folder = Path(tempfile.mkdtemp(prefix="tastefeed-test-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for p in [folder, *folder.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(folder)


def make_read_only(folder: Path) -> None:
    """Make ``folder`` and the files in it read-only to their owner, the user that
    :func:`unprivileged` runs as (as root: ``nobody``, who then owns them)."""
    uid, gid = _unprivileged_ids()
    for p in [folder, *folder.iterdir()]:
        if os.geteuid() == 0:
            os.chown(p, uid, gid)
        p.chmod(0o555 if p.is_dir() else 0o444)


def _unprivileged_ids() -> tuple[int, int]:
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    try:
        return tuple(pwd.getpwnam("nobody")[2:4])  # type: ignore[return-value]
    except KeyError:
        return 65534, 65534


def unprivileged(fn, timeout: float = 60.0) -> str:
    """``fn()`` (returning a str) run where file permissions apply: in this process, or, as root
    (who ignores them), in a forked child that switched to the user ``nobody``. ``fn`` must only
    touch modules imported already and files that user can reach (not pytest's tmp_path)."""
    if os.geteuid() != 0:
        return fn()
    uid, gid = _unprivileged_ids()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            os.chdir("/")  # the working folder may be out of that user's reach
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.write(w, fn().encode())
            code = 0
        except BaseException as e:  # noqa: BLE001 -- reported to the parent, which fails the test
            os.write(w, f"the unprivileged child failed: {e!r}".encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        out = pipe.read().decode() if ready else "the unprivileged child timed out"
    os.waitpid(pid, 0)
    return out


# ---- browser tests ---------------------------------------------------------------------------
# Headless Chromium from the system (no download), driven by playwright: the ``browser`` and
# ``live_gallery`` fixtures in conftest.py use these.
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
