"""The local web gallery: the same recommendations and labels as Discord, in a browser.

An aiohttp app served by the daemon (``[web]``: 127.0.0.1:8080 by default). Pages: *For you*
(unrated pictures, best first, exploration picks marked, rate with a click or the keys 1-5),
*Picture* (face boxes and scores, labels), *Rated* (with undo), *Model* (metrics, plots,
rollback) and *Sources* (health, add, remove, pause).

Security:
- Bound to anything but loopback, every request needs the secret token (``web.token`` or
  ``TASTEFEED_WEB_TOKEN``): open the gallery once with ``?token=...`` and it is kept in a cookie
  (HttpOnly, SameSite=Strict); otherwise 401. A token set for a loopback gallery is enforced too.
- On loopback, the Host header must name this machine (no DNS rebinding).
- State changes are POSTs only, and a POST must come from the gallery's own pages: its Origin
  (or Sec-Fetch-Site, or Referer) must match, or it is refused with 403.

A click is stored exactly like a Discord reaction: a label in the same table, origin ``web``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import jinja2
from aiohttp import web

from bot.config import Config, is_loopback
from bot.manage import (PAUSED_SOURCES, ManageError, add_source, parse_pairs, pause_source, picture_data,
                        remove_source, source_state, stats)
from scorer.ranking import is_cold
from storage.media import thumbnail

log = logging.getLogger("tastefeed.web")

CHANNEL = "web"
USER = "owner"
COOKIE = "tastefeed_token"
HERE = Path(__file__).parent


# ---- page data (plain functions on a sync Store, run on the daemon's writer thread) -----------
def for_you(store, cfg: Config, page: int, size: int) -> dict:
    """One page of unrated pictures: best first (popularity while cold), with the exploration
    share of each page taken from the least certain (cold: a fixed shuffle) and marked."""
    cold = is_cold(store, cfg)
    share = cfg.ranking.cold_exploration if cold else cfg.ranking.exploration
    n_explore = round(size * share)
    explore = store.ranked_candidates(CHANNEL, "shuffled" if cold else "uncertain", n_explore,
                                      offset=page * n_explore) if n_explore else []
    main = store.ranked_candidates(CHANNEL, "popularity" if cold else "score", size - len(explore),
                                   exclude=[r["id"] for r in explore], offset=page * (size - n_explore))
    for r in explore:
        r["exploration"] = True
    cards = list(main)
    step = max(1, size // max(1, len(explore)))
    for i, r in enumerate(explore):  # spread exploration picks through the page
        cards.insert(min(len(cards), i * step + step - 1), r)
    total = store.count_candidates(CHANNEL)
    return {"cards": _cards(store, cards), "cold": cold, "total": total, "page": page,
            "pages": max(1, math.ceil(total / size))}


def _cards(store, rows: list[dict]) -> list[dict]:
    names = {r["id"]: r["name"] for r in store.list_sources()}
    out = []
    for r in rows:
        out.append(dict(r, source_name=r.get("source_name") or names.get(r.get("source_id"), "?"),
                        exploration=bool(r.get("exploration"))))
    return out


def model_data(store, cfg: Config) -> dict:
    models = []
    for r in reversed(store.list_models()):
        m = json.loads(r["metrics"]) if r["metrics"] else {}
        plots = sorted(p.name for p in (cfg.eval_path / r["version"]).glob("*.png"))
        models.append(dict(r, val=m.get("val") or {}, trained=bool(m), plots=plots))
    active = next((m for m in models if m["active"]), None)
    return {"models": models, "active": active, "labels": store.label_count()}


def sources_data(store) -> dict:
    paused = set(store.get_setting(PAUSED_SOURCES, []))
    rows = [dict(r, state=source_state(r, paused), paused=r["name"] in paused)
            for r in store.list_sources() if r["kind"] != "import"]
    return {"sources": rows}


# ---- the app --------------------------------------------------------------------------------
class Gallery:
    """The gallery; ``model_changed`` and ``sources_changed`` tell a running daemon at once."""

    def __init__(self, cfg: Config, store, model_changed: Callable[[], Awaitable[None]] | None = None,
                 sources_changed: Callable[[], Awaitable[None]] | None = None):
        self.cfg = cfg
        self.store = store            # storage.writer.AsyncStore
        self.model_changed = model_changed
        self.sources_changed = sources_changed
        self.runner: web.AppRunner | None = None
        self.url: str | None = None
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                      autoescape=True, undefined=jinja2.StrictUndefined)
        self.env.filters["score"] = lambda v: "n/a" if v is None or isinstance(v, jinja2.Undefined) else f"{v:.2f}"
        self.env.globals["query"] = lambda **kw: "?" + urlencode({k: v for k, v in kw.items() if v not in (None, "")})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard], client_max_size=1024 * 1024)
        r = app.router
        r.add_get("/", self.page_for_you)
        r.add_get("/picture/{id:\\d+}", self.page_picture)
        r.add_get("/rated", self.page_rated)
        r.add_get("/model", self.page_model)
        r.add_get("/sources", self.page_sources)
        r.add_get("/media/{id:\\d+}", self.media)
        r.add_get("/thumb/{id:\\d+}", self.thumb)
        r.add_get("/eval/{version}/{name}", self.eval_plot)
        r.add_get("/api/stats", self.api_stats)
        r.add_post("/rate/{id:\\d+}", self.rate)
        r.add_post("/undo/{label:\\d+}", self.undo)
        r.add_post("/model/use", self.use_model)
        r.add_post("/model/evaluate", self.evaluate)
        r.add_post("/sources/add", self.source_add)
        r.add_post("/sources/{name}/remove", self.source_remove)
        r.add_post("/sources/{name}/pause", self.source_pause)
        r.add_post("/sources/{name}/resume", self.source_pause)
        r.add_static("/static", HERE / "static")
        return app

    async def start(self) -> str:
        """Listen on ``web.host:web.port``; returns the address (port 0 picks a free one)."""
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.web.host, self.cfg.web.port)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            self.runner = None
            raise OSError(f"the gallery cannot listen on {self.cfg.web.host}:{self.cfg.web.port}: "
                          f"{e.strerror or e} (set web.port, or web.enabled = \"off\")") from None
        port = site._server.sockets[0].getsockname()[1]
        host = self.cfg.web.host if ":" not in self.cfg.web.host else f"[{self.cfg.web.host}]"
        self.url = f"http://{host if host not in ('0.0.0.0', '[::]') else 'localhost'}:{port}/"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # ---- security ----------------------------------------------------------------------------
    def _token_needed(self) -> bool:
        return bool(self.cfg.web.token) or not self.cfg.web.loopback()

    @web.middleware
    async def guard(self, request: web.Request, handler):
        if self.cfg.web.loopback() and not _local_host(request.host):
            return web.Response(status=421, text="This gallery answers only to localhost addresses.\n")
        if self._token_needed():
            token = self.cfg.web.token
            given = request.query.get("token")
            if given is not None:
                if not hmac.compare_digest(given.encode(), token.encode()):
                    return web.Response(status=401, text="Wrong token.\n")
                target = request.rel_url.with_query([(k, v) for k, v in request.query.items() if k != "token"])
                resp = web.Response(status=303, headers={"Location": str(target)})
                resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/",
                                max_age=400 * 24 * 3600)
                return resp
            cookie = request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(cookie.encode(), token.encode()):
                return web.Response(status=401, text="This gallery needs its token: open it once with "
                                                     "?token=... (web.token or TASTEFEED_WEB_TOKEN).\n")
        if request.method not in ("GET", "HEAD") and not _same_origin(request):
            return web.Response(status=403, text="Cross-site request refused.\n")
        return await handler(request)

    # ---- rendering ---------------------------------------------------------------------------
    def render(self, name: str, request: web.Request, **ctx) -> web.Response:
        html = self.env.get_template(name).render(path=request.path, **ctx)
        return web.Response(text=html, content_type="text/html",
                            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                     "Referrer-Policy": "same-origin"})

    def _page(self, request: web.Request) -> int:
        try:
            return max(0, int(request.query.get("page", "1")) - 1)
        except ValueError:
            raise web.HTTPBadRequest(text="page: expected a number\n") from None

    async def page_for_you(self, request):
        page = self._page(request)
        data = await self.store.call(for_you, self.cfg, page, self.cfg.web.page_size)
        return self.render("for_you.html", request, **data)

    async def page_picture(self, request):
        data = await self.store.call(picture_data, int(request.match_info["id"]))
        if data is None:
            raise web.HTTPNotFound(text="No such picture.\n")
        return self.render("picture.html", request, **data)

    async def page_rated(self, request):
        page = self._page(request)
        value = request.query.get("rating") or None
        if value is not None and value not in "12345":
            raise web.HTTPBadRequest(text="rating: expected 1 to 5\n")
        source = request.query.get("source") or None
        size = self.cfg.web.page_size
        rows, total = await self.store.rated(value=int(value) if value else None, source=source, limit=size,
                                             offset=page * size)
        sources = [r["name"] for r in await self.store.list_sources()]
        return self.render("rated.html", request, cards=await self.store.call(_cards, rows), total=total,
                           page=page, pages=max(1, math.ceil(total / size)), rating=value or "",
                           source=source or "", sources=sources)

    async def page_model(self, request):
        data = await self.store.call(model_data, self.cfg)
        return self.render("model.html", request, message=request.query.get("message", ""), **data)

    async def page_sources(self, request):
        from sources import SOURCE_KINDS
        data = await self.store.call(sources_data)
        return self.render("sources.html", request, kinds=sorted(SOURCE_KINDS),
                           message=request.query.get("message", ""), **data)

    async def api_stats(self, request):
        return web.json_response(await self.store.call(stats, CHANNEL))

    # ---- files -------------------------------------------------------------------------------
    async def _image(self, request) -> dict:
        image = await self.store.get_image(int(request.match_info["id"]))
        if image is None or not image.get("media_path"):
            raise web.HTTPNotFound(text="No such picture.\n")
        return image

    async def media(self, request):
        image = await self._image(request)
        path = self.cfg.media_path / image["media_path"]
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Type": ctype, "Cache-Control": "private, max-age=86400"})

    async def thumb(self, request):
        image = await self._image(request)
        try:
            path = await asyncio.to_thread(thumbnail, self.cfg.media_path, image["media_path"], self.cfg.thumbs_path,
                                           self.cfg.web.thumb_size, max_pixels=self.cfg.download.max_pixels)
        except Exception as e:  # noqa: BLE001 - a damaged file: no thumbnail, the page still works
            log.warning("thumbnail of picture %d: %s", image["id"], e)
            raise web.HTTPNotFound(text="No thumbnail.\n") from None
        return web.FileResponse(path, headers={"Content-Type": "image/jpeg",
                                               "Cache-Control": "private, max-age=86400"})

    async def eval_plot(self, request):
        version, name = request.match_info["version"], request.match_info["name"]
        root = self.cfg.eval_path.resolve()
        path = (root / version / name).resolve()
        if root not in path.parents or path.suffix != ".png" or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    # ---- actions -----------------------------------------------------------------------------
    async def _form(self, request) -> dict:
        if request.content_type == "application/json":
            try:
                data = await request.json()
            except ValueError:
                raise web.HTTPBadRequest(text="expected JSON\n") from None
            return data if isinstance(data, dict) else {}
        return dict(await request.post())

    @staticmethod
    def _done(request, data: dict, back: str) -> web.Response:
        if "application/json" in request.headers.get("Accept", "") or request.content_type == "application/json":
            return web.json_response(data)
        raise web.HTTPSeeOther(back)

    @staticmethod
    def _back(request, default: str) -> str:
        ref = request.headers.get("Referer")
        return urlsplit(ref)._replace(scheme="", netloc="").geturl() if ref else default

    async def rate(self, request):
        image_id = int(request.match_info["id"])
        form = await self._form(request)
        try:
            value = int(form.get("value"))
            if not 1 <= value <= 5:
                raise ValueError
        except (TypeError, ValueError):
            raise web.HTTPBadRequest(text="value: expected a rating from 1 to 5\n") from None
        if await self.store.get_image(image_id) is None:
            raise web.HTTPNotFound(text="No such picture.\n")
        await self.store.add_label(image_id, value, origin=CHANNEL, user=USER)
        log.info("label: picture %d rated %d in the gallery", image_id, value)
        return self._done(request, {"ok": True, "image_id": image_id, "value": value},
                          self._back(request, f"/picture/{image_id}"))

    async def undo(self, request):
        label = await self.store.undo_label(int(request.match_info["label"]))
        if label is None:
            raise web.HTTPNotFound(text="No such label.\n")
        log.info("label: rating %d of picture %d taken back in the gallery", label["value"], label["image_id"])
        current = await self.store.current_label(label["image_id"])
        return self._done(request, {"ok": True, "image_id": label["image_id"], "current": current},
                          self._back(request, "/rated"))

    async def use_model(self, request):
        from scorer.model import ModelError
        from scorer.registry import use_model
        version = str((await self._form(request)).get("version", ""))
        try:
            await self.store.call(lambda s: use_model(s, self.cfg, version))
        except ModelError as e:
            return self._done(request, {"ok": False, "error": str(e)}, "/model?" + urlencode({"message": str(e)}))
        if self.model_changed is not None:
            await self.model_changed()
        return self._done(request, {"ok": True, "version": version},
                          "/model?" + urlencode({"message": f"now using {version}"}))

    async def evaluate(self, request):
        from scorer.evaluate import evaluate_version
        from storage import Store
        version = str((await self._form(request)).get("version", "")) or None

        def run():
            store = Store.open(self.cfg.db_path)
            try:
                return evaluate_version(self.cfg, store, version, progress=False)
            finally:
                store.close()
        try:
            m, paths, row = await asyncio.to_thread(run)
            message = f"evaluated {row['version']} on {m.get('n', 0)} validation picture(s)"
        except Exception as e:  # noqa: BLE001
            message = f"evaluation failed: {e}"
        return self._done(request, {"message": message}, "/model?" + urlencode({"message": message}))

    async def source_add(self, request):
        import shlex
        form = await self._form(request)
        name, kind = str(form.get("name", "")).strip(), str(form.get("kind", "")).strip()
        try:
            if not name:
                raise ManageError("a source needs a name")
            pairs = parse_pairs(shlex.split(str(form.get("options", ""))))
            src = await self.store.call(lambda s: add_source(s, self.cfg, name, kind, pairs))
            message = f"added source {src.name}; it is polled within 15 s"
        except (ManageError, ValueError) as e:
            message = f"not added: {e}"
        return self._done(request, {"message": message}, "/sources?" + urlencode({"message": message}))

    async def source_remove(self, request):
        name = request.match_info["name"]
        try:
            await self.store.call(lambda s: remove_source(s, self.cfg, name))
            message = f"removed source {name}; its pictures are kept"
        except ManageError as e:
            message = f"not removed: {e}"
        return self._done(request, {"message": message}, "/sources?" + urlencode({"message": message}))

    async def source_pause(self, request):
        name = request.match_info["name"]
        paused = request.path.endswith("/pause")
        try:
            await self.store.call(lambda s: pause_source(s, name, paused))
            message = f"source {name} {'paused' if paused else 'resumed'}"
        except ManageError as e:
            message = str(e)
        if self.sources_changed is not None:
            await self.sources_changed()
        return self._done(request, {"message": message}, "/sources?" + urlencode({"message": message}))


def _local_host(host: str | None) -> bool:
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback(name.strip("[]"))


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin:
        return origin != "null" and urlsplit(origin).netloc == request.host
    site = request.headers.get("Sec-Fetch-Site")
    if site:
        return site in ("same-origin", "none")
    referer = request.headers.get("Referer")
    return bool(referer) and urlsplit(referer).netloc == request.host
