"""The local web gallery: the same recommendations and labels as Discord, in a browser.

An aiohttp app served by the daemon (``[web]``: 127.0.0.1:8080 by default). Pages: *For you*
(unrated pictures, best first, exploration picks marked, rate with a click or the keys 1-5),
*Picture* (face boxes with numbered labels, face crops with scores and characters, name a face
by clicking it, labels, previous/next in the list it was opened from: ``bot.web_nav``), *Rated*
(with undo), *Compare* (which of two pictures you prefer: the pair the model is least sure how to
order, keys ← → and ↓, undo last), *Boxes* (the face boxes proposed for the owner's own
detector, least certain first: drag to draw, click to delete, Enter to accept: :func:`boxes_data`),
*Model* (metrics with what each means, plots, rollback, a training run's progress and "Train
now"; the identity embedder's too) and *Sources* (health,
add, remove, pause, "Poll now", "Reload" the config); ``GET /healthz`` is the daemon's health report
(``bot.health``). For you and Rated filter by character (``?character=NAME``), and
each card shows its characters as chips. A picture whose media was pruned (``storage/prune.py``)
shows a placeholder and a "Fetch again" button instead of a broken image.

This module is the app, its pages and its files; who may use it (token, Host check, same-origin
POSTs) is ``bot.web_guard``, and what the buttons do (rate, undo, name a face, switch model,
sources, compare) is ``bot.web_actions``. A click is stored exactly like a Discord reaction: a
label in the same table, origin ``web``; a comparison goes to ``comparisons``, origin ``gallery``.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import mimetypes
import os
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from bot.config import Config
from bot.health import database_report
from bot.manage import PAUSED_SOURCES, character_stats, picture_data, source_state, stats, web_link
from bot.web_actions import COMPARE_ORIGIN, USER, GalleryActions
from bot.web_guard import HEALTHZ, guard
from bot.web_nav import Origin, Step, neighbours
from scorer.detect import crop_box
from scorer.ranking import Cursor, Feed, exploration_share, feed_page, is_cold, is_trained
from scorer.progress import read_progress
from storage.media import thumbnail
from storage.records import WHOLE, Face
from storage.ranking import pack, unpack
from storage.store import rated_key

log = logging.getLogger("tastefeed.web")

CHANNEL = "web"
HERE = Path(__file__).parent
FACE_CROP_SIZE = 160              # the Picture page's face crops (pixels, longest side), cached like thumbnails
FILE_PATHS = ("/media/", "/thumb/", "/face/", "/eval/", "/static/", "/api/", "/favicon.ico", HEALTHZ)  # plain-text 404s
MAX_PAGE = 10 ** 9                # a page beyond is empty (and its offset still fits SQLite)
# what stands for a picture whose media was pruned (storage/prune.py)
PRUNED_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="320" height="240" viewBox="0 0 320 240">'
              '<rect width="320" height="240" fill="#ddd"/><text x="160" y="115" font-family="sans-serif" '
              'font-size="22" text-anchor="middle" fill="#555">media pruned</text><text x="160" y="145" '
              'font-family="sans-serif" font-size="14" text-anchor="middle" fill="#777">open the picture '
              'to fetch it again</text></svg>')


@functools.cache
def templates() -> jinja2.Environment:
    """The pages' templates, one environment for the process (each template is compiled once)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["score"] = lambda v: "n/a" if v is None or isinstance(v, jinja2.Undefined) else f"{v:.2f}"
    env.filters["number"] = lambda v: f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"
    env.filters["web_link"] = web_link   # a page link from a source: http(s) only, else None
    env.filters["when"] = relative_time
    env.filters["duration"] = duration
    env.globals["query"] = lambda **kw: "?" + urlencode({k: v for k, v in kw.items() if v not in (None, "")})
    return env


async def compile_templates(app=None) -> None:
    """Compile every template as the gallery starts (in a thread, not on the event loop), so that
    the first view of each page after a start does not pay for it (15-40 ms a page)."""
    env = templates()
    await asyncio.to_thread(lambda: [env.get_template(name) for name in env.list_templates(extensions=["html"])])


# ---- page data (plain functions on a sync Store, run on the daemon's writer thread) -----------
def for_you(store, cfg: Config, page: int, size: int, character: str | None = None, after: str | None = None) -> dict:
    """One page of unrated pictures (of one character, if given): best first (popularity while
    cold), with the exploration share of the cards on the page taken from the least certain
    (cold: a fixed shuffle), marked and placed after the best (``scorer.ranking``'s
    :func:`exploration_slots`). Every page is cut from one sequence (each full page before it
    laid out the same way), so paging shows each picture once; a page is read from the cursor
    the previous page's "more" link carries (``after``; keyset paging, :func:`feed_page`), or
    from the store's kept cursor of that page number."""
    state = model_state(store, cfg)
    total = store.count_candidates(CHANNEL, character)
    cards, next_after, more = [], "", False
    if total:
        feed = _feed(store, cfg, state, size, character)
        placed, end, more = feed_page(store, feed, page, Cursor.from_token(after, feed) if after else None)
        cards = [dict(row, exploration=explored) for row, explored in placed]
        next_after = end.token(feed)
    # Pictures rated or arrived meanwhile move the page count: it is what is left, at least.
    pages = max(math.ceil(total / size), page + 2) if more else page + 1 if cards else max(1, math.ceil(total / size))
    return {"cards": _cards(store, cards), "model_state": state, "cold": state["cold"], "total": total,
            "page": page, "pages": pages, "next_after": next_after, **character_choices(store, character)}


def _feed(store, cfg: Config, state: dict, size: int, character: str | None) -> Feed:
    return Feed(CHANNEL, "popularity" if state["cold"] else "score", "shuffled" if state["cold"] else "uncertain",
                exploration_share(store, cfg.ranking, state["cold"]), size, character,
                (store.active_model() or {}).get("version"))


def model_state(store, cfg: Config) -> dict:
    """What the cards say of a picture's rank: ``trained`` (a trained model is active) and
    ``cold`` (ranked by popularity: untrained, or fewer than ``train.min_labels`` ratings)."""
    return {"trained": is_trained(store), "cold": is_cold(store, cfg.train.min_labels)}


def _cards(store, rows: list[dict]) -> list[dict]:
    """Rows as cards: ``source_name`` ("imported" for a picture of ``import-labels``), ``origin``
    (for a rated card: where the rating came from, unless that says "imported" again),
    ``exploration`` and the picture's ``characters``."""
    sources = {r["id"]: r for r in store.list_sources()}
    characters = store.picture_characters([r["id"] for r in rows])
    out = []
    for r in rows:
        source = sources.get(r.get("source_id")) or {}
        imported = source.get("kind") == "import"
        name = "imported" if imported else r.get("source_name") or source.get("name", "?")
        origin = r.get("label_origin")
        out.append(dict(r, source_name=name, origin="" if imported and origin == "import" else origin or "",
                        exploration=bool(r.get("exploration")), characters=characters.get(r["id"], [])))
    return out


def character_choices(store, character: str | None) -> dict:
    """The character filter's value and the known names (for the pages' datalist)."""
    return {"character": character or "", "character_names": list(store.character_names().values())}


def picture_page(store, cfg: Config, image_id: int, origin: Origin | None = None) -> dict | None:
    """``picture_data`` with each face's character (``face["who"]``: ``{"character",
    "similarity", "named_by", "weak"}`` or None), numbered as ``/why`` and ``/name`` number them
    (best score first), the picture's character names, and the previous and next pictures of the
    list it was opened from (``bot.web_nav``)."""
    from bot.posting import numbered_faces  # (imports the scorer: only when a picture is shown)
    data = picture_data(store, image_id)
    if data is None:
        return None
    who = data["characters"]          # picture_data's face id -> character entry
    data["faces"] = [dict(f, who=who.get(f["id"])) for f in numbered_faces(data["faces"])]
    data["characters"] = store.picture_characters([image_id])[image_id]
    source = store.get_source(data["source"]) if data["source"] else None
    if source and source["kind"] == "import":
        data["source"] = "imported"   # the pseudo-source of import-labels, as on the cards
    return dict(data, trained=is_trained(store), nav=picture_nav(store, cfg, image_id, origin or Origin()),
                **character_choices(store, None))


def picture_nav(store, cfg: Config, image_id: int, origin: Origin) -> dict:
    """``prev`` and ``next`` (addresses of the neighbouring Picture pages, or None), ``back`` (the
    list's page, or None) and ``list`` (its name, "" for none)."""
    size = cfg.web.page_size
    if origin.name == "for-you":
        feed = _feed(store, cfg, model_state(store, cfg), size, origin.filters.get("character"))
        steps = neighbours(image_id, origin.at, size, lambda n: [  # the pages alone, as For you lays them out
            row["id"] for row, _ in feed_page(store, feed, n, check_more=False)[0]])
    elif origin.name == "rated":
        value = origin.filters.get("rating")
        steps = neighbours(image_id, origin.at, size, lambda n: [r["id"] for r in store.rated(
            value=int(value) if value in tuple("12345") else None, source=origin.filters.get("source"),
            character=origin.filters.get("character"), limit=size, offset=n * size, count=False)[0]])
    else:
        steps = tuple(Step(i, 0) if i is not None else None for i in store.adjacent_images(image_id))
    links = [f"/picture/{s.id}" + (f"?{urlencode(origin.query(s.at))}" if origin.name else "") if s else None
             for s in steps]
    return {"prev": links[0], "next": links[1], "back": origin.back(size), "list": origin.name}


def rated_token(position: tuple[str, int]) -> str:
    """A Rated row's position (``storage.store.rated_key``) as a short string for the address of
    the page after it ("more →": keyset paging, so ratings given meanwhile do not shift it)."""
    return pack(list(position))


def rated_position(token: str) -> tuple[str, int] | None:
    """The position of :func:`rated_token`, or None for anything malformed (the page is then read
    by its number)."""
    try:
        at, label = unpack(token)
    except (ValueError, TypeError):
        return None
    ok = isinstance(at, str) and isinstance(label, int) and not isinstance(label, bool) and abs(label) < 2 ** 62
    return (at, label) if ok else None


def train_hint(labels: int, min_labels: int) -> str:
    """What to do to get a trained model, given the labelled pictures there are."""
    if labels < min_labels:
        return (f"rate at least {min_labels} pictures (you have {labels}), then press Train now "
                "(or run `python main.py train`)")
    return f"you have {labels} rated pictures: press Train now (or run `python main.py train`)"


def model_data(store, cfg: Config) -> dict:
    models = []
    for r in reversed(store.list_models()):
        m = json.loads(r["metrics"]) if r["metrics"] else {}
        plots = sorted(p.name for p in (cfg.eval_path / r["version"]).glob("*.png"))
        models.append(dict(r, val=m.get("val") or {}, trained=bool(m), plots=plots, head=m.get("head") or {},
                           kind=m.get("kind"), network=m.get("network_version")))
    active = next((m for m in models if m["active"]), None)
    return {"models": models, "active": active, "labels": store.label_count(),
            "comparisons": store.comparison_count(), "next_step": training_state(store, cfg),
            **identity_data(store, cfg)}


def training_state(store, cfg: Config) -> dict:
    """What the Model page says while the active model is untrained: ``min_labels`` (ratings
    training needs), ``refit`` (the daemon fits the taste head by itself) and ``pending`` (new
    ratings or comparisons since its last fit: one is coming within a minute)."""
    from bot.learning import MARK, new_feedback

    pending, _ = new_feedback(store, store.get_setting(MARK))
    return {"min_labels": cfg.train.min_labels, "refit": cfg.train.refit, "pending": pending > 0}


def identity_data(store, cfg: Config) -> dict:
    """The identity embedders (newest first; ``metric_rows`` of each one's metrics) and how many
    characters and named faces (examples, weak ones among them) there are."""
    models = []
    for r in reversed(store.list_identity_models()):
        m = json.loads(r["metrics"]) if r["metrics"] else {}
        plots = sorted(p.name for p in (cfg.eval_path / r["version"]).glob("*.png"))
        models.append(dict(r, trained=bool(m), top1=m.get("val_top1", m.get("top1")), metrics=metric_rows(m),
                           plots=plots))
    counts = character_stats(store)
    return {"identity_models": models, "identity_active": next((m for m in models if m["active"]), None),
            "n_characters": counts["characters"], "n_examples": counts["examples"], "n_weak": counts["weak"]}


def metric_rows(metrics: dict, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """(key, shown value) of every number or word in the metrics, nested tables as ``a.b``
    (two levels deep); lists (e.g. the training history) are left out."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth < 2:
            rows += metric_rows(value, f"{name}.", depth + 1)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, float):
            rows.append((name, f"{value:.3f}"))
        elif isinstance(value, (int, str)):
            rows.append((name, str(value)))
    return rows


def compare_data(store, cfg: Config, skip: set[frozenset]) -> dict:
    """The pair to compare next (``pair``: two cards, or None when fewer than two pictures are
    left), leaving out the pairs skipped in ``skip``; the gallery's last comparison (for "undo
    last") and how many comparisons there are."""
    pair = store.compare_pair(CHANNEL, skip=skip)
    return {"pair": _cards(store, list(pair)) if pair else None, "last": store.last_comparison(COMPARE_ORIGIN, USER),
            "model_state": model_state(store, cfg),
            "n_comparisons": store.comparison_count(), "candidates": store.count_candidates(CHANNEL)}


def review_boxes(pic) -> list[dict]:
    """The boxes the Boxes page shows (and accepts as they are) for a picture of the review queue:
    its verified boxes (``kind`` "verified"), then its proposals ("sure" or "unsure"), leaving
    out a proposal that matches a verified box (IoU 0.5 or more: nothing to decide there)."""
    from scorer.bootstrap import MATCH_IOU, f1_score
    shown = [dict(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, origin=b.origin, kind="verified") for b in pic.verified]
    for b in pic.proposed:
        if not any(f1_score([b], [v], MATCH_IOU) == 1.0 for v in pic.verified):
            shown.append(dict(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, origin=b.origin, kind="sure" if b.sure else "unsure"))
    return shown


def boxes_data(store) -> dict:
    """The Boxes page: the next picture of the review queue (``storage/boxes.py``: a newer
    detector's disagreements with verified boxes first, then the least certain proposals, the
    skipped ones last); its ``image`` row, the boxes shown (:func:`review_boxes`), and the box
    set's counts."""
    queue = store.box_review_queue(1)
    pic = queue[0] if queue else None
    return {"pic": pic, "image": store.get_image(pic.image_id) if pic else None,
            "shown": review_boxes(pic) if pic else [], "counts": store.box_counts()}


def sources_data(store) -> dict:
    """The sources (not the import pseudo-source), each with its state; a paused or disabled
    source has no next poll (``next_poll_at`` None)."""
    paused = set(store.get_setting(PAUSED_SOURCES, []))
    rows = []
    for r in store.list_sources():
        if r["kind"] == "import":
            continue
        state = source_state(r, paused)
        rows.append(dict(r, state=state, paused=r["name"] in paused,
                         next_poll_at=None if state in ("paused", "disabled") else r["next_poll_at"]))
    return {"sources": rows}


def relative_time(stamp: str | None, now: datetime | None = None, *, due: bool = False) -> str:
    """A stored time (ISO, UTC) as a short distance from now: "in 2 min", "3 h ago", "now";
    "-" when absent or unreadable. With ``due`` (a time something is to happen, such as a next
    poll) a time already past reads "due now"."""
    try:
        when = datetime.fromisoformat(stamp) if stamp else None
    except (TypeError, ValueError):
        return "-"
    if when is None:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if due and seconds < 5:
        return "due now"
    size = abs(seconds)
    if size < 5:
        return "now"
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if size >= span or unit == "s":
            text = f"{int(size // span)} {unit}"
            break
    return f"in {text}" if seconds > 0 else f"{text} ago"


def duration(seconds) -> str:
    """Seconds as a short duration: "40 s", "3 min", "1 h 5 min"."""
    seconds = int(seconds or 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


# ---- the app --------------------------------------------------------------------------------
class Gallery:
    """The gallery; ``model_changed``, ``sources_changed`` and ``characters_changed`` (a face
    named, a name taken back, the identity embedder switched) tell a running daemon at once.
    ``health`` gives the ``/healthz`` report (the daemon's ``Daemon.health``; None: the report
    from the database alone), ``live`` is the daemon's ``stats`` (event-loop lag for /api/stats,
    config keys that need a restart). ``poll_now`` (``SourcePoller.poll_now``), ``reload``
    (``Daemon.reload``) and ``train_now`` (the daemon's retrainer) are the running daemon's; without
    them (a gallery alone) their buttons are not shown."""

    def __init__(self, cfg: Config, store, model_changed: Callable[[], Awaitable[None]] | None = None,
                 sources_changed: Callable[[], Awaitable[None]] | None = None,
                 characters_changed: Callable[[], Awaitable[None]] | None = None,
                 health: Callable[[], Awaitable[dict]] | None = None, live: dict | None = None,
                 http=None, poll_now: Callable[[str], Awaitable[tuple[bool, str]]] | None = None,
                 reload: Callable[[], Awaitable] | None = None, train_now: Callable[[], Awaitable[bool]] | None = None):
        self.cfg = cfg
        self.store = store            # storage.writer.AsyncStore
        self.health = health or (lambda: asyncio.to_thread(database_report, cfg))
        self.live = live
        self.actions = GalleryActions(cfg, store, model_changed, sources_changed, characters_changed, http=http,
                                      poll_now=poll_now, reload=reload, train_now=train_now,
                                      sources_page=self.sources_page)
        self.runner: web.AppRunner | None = None
        self.url: str | None = None
        self.env = templates()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[guard(self.cfg.web), self.not_found], client_max_size=1024 * 1024)
        r, a = app.router, self.actions
        # ids have at most 18 digits, so they fit SQLite's integers: a longer one is no picture (404)
        r.add_get("/", self.page_for_you)
        r.add_get("/picture/{id:\\d{1,18}}", self.page_picture)
        r.add_get("/rated", self.page_rated)
        r.add_get("/compare", self.page_compare)
        r.add_get("/boxes", self.page_boxes)
        r.add_get("/model", self.page_model)
        r.add_get("/sources", self.page_sources)
        r.add_get("/media/{id:\\d{1,18}}", self.media)
        r.add_get("/thumb/{id:\\d{1,18}}", self.thumb)
        r.add_get("/face/{id:\\d{1,18}}", self.face_crop)
        r.add_get("/eval/{version}/{name}", self.eval_plot)
        r.add_get("/api/stats", self.api_stats)
        r.add_get("/favicon.ico", self.favicon)   # for browsers that ask before reading the page's icon link
        r.add_get(HEALTHZ, self.healthz)
        r.add_post("/rate/{id:\\d{1,18}}", a.rate)
        r.add_post("/undo/{label:\\d{1,18}}", a.undo)
        r.add_post("/compare", a.compare)
        r.add_post("/compare/undo/{id:\\d{1,18}}", a.compare_undo)
        r.add_post("/boxes", a.boxes)
        r.add_post("/model/use", a.use_model)
        r.add_post("/model/evaluate", a.evaluate)
        r.add_post("/model/train", a.train)
        r.add_post("/model/identity/use", a.use_identity_model)
        r.add_post("/picture/{id:\\d{1,18}}/refetch", a.refetch)
        r.add_post("/faces/{id:\\d{1,18}}/name", a.name_face)
        r.add_post("/faces/{id:\\d{1,18}}/unname", a.unname_face)
        r.add_post("/sources/add", a.source_add)
        r.add_post("/sources/{name}/remove", a.source_remove)
        r.add_post("/sources/{name}/pause", a.source_pause)
        r.add_post("/sources/{name}/resume", a.source_pause)
        r.add_post("/sources/{name}/poll", a.source_poll)
        r.add_post("/sources/reload", a.reload_config)
        r.add_static("/static", HERE / "static")
        app.on_startup.append(compile_templates)
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

    # ---- rendering ---------------------------------------------------------------------------
    def render(self, name: str, request: web.Request, **ctx) -> web.Response:
        html = self.env.get_template(name).render(path=request.path, page_size=self.cfg.web.page_size, **ctx)
        return web.Response(text=html, content_type="text/html",
                            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                     "Referrer-Policy": "same-origin"})

    @web.middleware
    async def not_found(self, request: web.Request, handler):
        """A page that is not there (an unknown address, an unknown picture id) answers a 404
        page with the navigation; files and the API keep their short plain-text 404."""
        try:
            return await handler(request)
        except web.HTTPNotFound as e:
            if request.method not in ("GET", "HEAD") or request.path.startswith(FILE_PATHS):
                raise
            what = e.text.strip() if e.text and not e.text.startswith("404:") else f"There is no page at {request.path}."
            resp = self.render("not_found.html", request, what=what)
            resp.set_status(404)
            return resp

    def _page(self, request: web.Request) -> int:
        try:
            return min(MAX_PAGE, max(0, int(request.query.get("page", "1")) - 1))
        except ValueError:
            raise web.HTTPBadRequest(text="page: expected a number\n") from None

    async def page_for_you(self, request):
        page = self._page(request)
        data = await self.store.call(for_you, self.cfg, page, self.cfg.web.page_size,
                                     request.query.get("character") or None, request.query.get("after") or None)
        return self.render("for_you.html", request, **data)

    async def page_picture(self, request):
        data = await self.store.call(picture_page, self.cfg, int(request.match_info["id"]),
                                     Origin.from_query(request.query))
        if data is None:
            raise web.HTTPNotFound(text=f"No picture #{request.match_info['id']}: there is none with this number.\n")
        return self.render("picture.html", request, message=request.query.get("message", ""), **data)

    async def page_rated(self, request):
        page = self._page(request)
        value = request.query.get("rating") or None
        if value is not None and value not in "12345":
            raise web.HTTPBadRequest(text="rating: expected 1 to 5\n")
        source = request.query.get("source") or None
        character = request.query.get("character") or None
        size = self.cfg.web.page_size
        rows, total = await self.store.rated(value=int(value) if value else None, source=source,
                                             character=character, limit=size, offset=page * size,
                                             after=rated_position(request.query.get("after", "")) if page else None)
        sources = [r["name"] for r in await self.store.list_sources()]
        return self.render("rated.html", request, cards=await self.store.call(_cards, rows), total=total,
                           next_after=rated_token(rated_key(rows[-1])) if rows else "",
                           model_state=await self.store.call(model_state, self.cfg),
                           page=page, pages=max(1, math.ceil(total / size)), rating=value or "",
                           source=source or "", sources=sources,
                           **await self.store.call(character_choices, character))

    async def page_compare(self, request):
        data = await self.store.call(compare_data, self.cfg, set(self.actions.skipped))
        return self.render("compare.html", request, **data)

    async def page_boxes(self, request):
        data = await self.store.call(boxes_data)
        return self.render("boxes.html", request, **data)

    async def page_model(self, request):
        data = await self.store.call(model_data, self.cfg)
        return self.render("model.html", request, message=request.query.get("message", ""),
                           error=request.query.get("error", ""), can_train=self.actions.train_now is not None,
                           training=await asyncio.to_thread(read_progress, self.cfg.data_path), **data)

    async def page_sources(self, request):
        return await self.sources_page(request, message=request.query.get("message", ""),
                                       error=request.query.get("error", ""))

    async def sources_page(self, request, *, message: str = "", error: str = "", form: dict | None = None,
                           status: int = 200) -> web.Response:
        """The Sources page; ``form``: the add form's values to show again (after a refused add)."""
        from sources import SOURCE_KINDS
        data = await self.store.call(sources_data)
        live = self.live or {}
        path = self.cfg.path
        try:
            stale = bool(path) and "config_read_at" in live and os.stat(path).st_mtime > live["config_read_at"]
        except OSError:
            stale = False
        form = {"name": "", "kind": "folder", "options": "", **(form or {})}
        response = self.render("sources.html", request, kinds=sorted(SOURCE_KINDS), message=message, error=error,
                               form=form, config_path=path or "", config_stale=stale,
                               restart_needed=live.get("restart_needed") or [],
                               can_poll=self.actions.poll_now is not None, can_reload=self.actions.reload is not None,
                               **data)
        response.set_status(status)
        return response

    async def api_stats(self, request):
        return web.json_response(await self.store.call(stats, CHANNEL, self.live))

    async def healthz(self, request):
        """The health report (``bot.health``): 200 when ok or degraded, 503 when failing."""
        report = await self.health()
        return web.json_response(report, status=503 if report["status"] == "failing" else 200,
                                 headers={"Cache-Control": "no-store"})

    # ---- files -------------------------------------------------------------------------------
    async def _image(self, request) -> dict:
        image = await self.store.get_image(int(request.match_info["id"]))
        if image is None or not image.get("media_path"):
            raise web.HTTPNotFound(text="No such picture.\n")
        return image

    async def favicon(self, request):
        return web.FileResponse(HERE / "static" / "favicon.svg", headers={"Content-Type": "image/svg+xml",
                                                                          "Cache-Control": "max-age=86400"})

    @staticmethod
    def _pruned() -> web.Response:
        """What a pruned picture's media and thumbnail answer: a placeholder, not a broken image
        (not cached: once fetched again, the picture itself is served)."""
        return web.Response(text=PRUNED_SVG, content_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    async def media(self, request):
        image = await self._image(request)
        if image.get("media_pruned_at"):
            return self._pruned()
        path = self.cfg.media_path / image["media_path"]
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Type": ctype, "Cache-Control": "private, max-age=86400"})

    async def thumb(self, request):
        image = await self._image(request)
        if image.get("media_pruned_at"):
            return self._pruned()
        try:
            path = await asyncio.to_thread(thumbnail, self.cfg.media_path, image["media_path"], self.cfg.thumbs_path,
                                           self.cfg.web.thumb_size, max_pixels=self.cfg.download.max_pixels)
        except Exception as e:  # noqa: BLE001 - a damaged file: no thumbnail, the page still works
            log.warning("thumbnail of picture %d: %s", image["id"], e)
            raise web.HTTPNotFound(text="No thumbnail.\n") from None
        return web.FileResponse(path, headers={"Content-Type": "image/jpeg",
                                               "Cache-Control": "private, max-age=86400"})

    async def face_crop(self, request):
        """A face as the model saw it: its box grown by ``detector.margin``, at most
        ``FACE_CROP_SIZE`` pixels, cached with the thumbnails (a whole-picture face: the picture)."""
        face = await self.store.face_with_media(int(request.match_info["id"]))
        if face is None or not face.get("media_path"):
            raise web.HTTPNotFound(text="No such face.\n")
        image = await self.store.get_image(face["image_id"])
        if image.get("media_pruned_at"):
            return self._pruned()
        box = None if face["detector"] in WHOLE else crop_box(Face.from_row(face), self.cfg.detector.margin,
                                                              image["width"], image["height"])
        try:
            path = await asyncio.to_thread(thumbnail, self.cfg.media_path, image["media_path"], self.cfg.thumbs_path,
                                           FACE_CROP_SIZE, box=box, max_pixels=self.cfg.download.max_pixels)
        except Exception as e:  # noqa: BLE001 - a damaged file: no crop, the page still works
            log.warning("crop of face %d: %s", face["id"], e)
            raise web.HTTPNotFound(text="No face crop.\n") from None
        return web.FileResponse(path, headers={"Content-Type": "image/jpeg",
                                               "Cache-Control": "private, max-age=86400"})

    async def eval_plot(self, request):
        version, name = request.match_info["version"], request.match_info["name"]
        root = self.cfg.eval_path.resolve()
        path = (root / version / name).resolve()
        if root not in path.parents or path.suffix != ".png" or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)
