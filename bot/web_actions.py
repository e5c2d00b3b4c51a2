"""The web gallery's actions: the POST handlers that change something.

Rate a picture and undo a rating (a click is stored exactly like a Discord reaction: a label in
the same table, origin ``web``), say which of two pictures is better, skip a pair or undo the last
comparison (table ``comparisons``, origin ``gallery``), name a face as a character or take its name back, switch the
active model, evaluate one or start a training run ("Train now": ``train --full`` in the daemon's
retrainer), switch the identity embedder, add, remove, pause, resume and poll sources ("Poll
now"), reload the config file, fetch a pruned picture again, accept or skip a picture's face boxes
(the Boxes page: :meth:`GalleryActions.boxes`, boxes read by :func:`parse_boxes`). Each answers JSON to the page's script (``Accept: application/json``) and otherwise
redirects back with a message (``?message=``, or ``?error=`` for one that failed, which the
pages show in an error style; a refused "add source" shows the page again with what was typed).
Only POSTs reach these, and only from the gallery's own
pages (``bot.web_guard``). A running daemon hears of a model switch (``model_changed``) and of
source changes (``sources_changed``) at once instead of within its next check, and of named faces
or a switched identity embedder (``characters_changed``).

A named face is embedded at once with the active identity embedder (loaded once per version and
kept), so recognition counts it as an example right away; the torch work runs on a worker
thread with its own database connection, never on the event loop or the daemon's writer thread.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode, urlsplit, urlunsplit

from aiohttp import web

from bot.config import Config
from bot.manage import ManageError, add_source, parse_pairs, pause_source, remove_source
from storage.characters import CharacterNameError, check_name
from storage.records import ORIGIN_WEB, WHOLE_PICTURE

log = logging.getLogger("tastefeed.web")

USER = "owner"
NAME_ORIGIN = "gallery"           # face_names.origin of a face named in the gallery
COMPARE_ORIGIN = "gallery"        # comparisons.origin of a comparison made in the gallery
MAX_ID = 10 ** 18                 # ids fit SQLite's integers: a larger one is no picture
MAX_BOXES = 100                   # face boxes one accepted picture may have


def _picture_id(value) -> int:
    """A picture id from a form field, or ValueError."""
    text = str(value if value is not None else "").strip()
    if not text.isdigit() or not 0 < int(text) < MAX_ID:
        raise ValueError(text)
    return int(text)


def parse_boxes(value, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The Boxes page's boxes: a list (or its JSON text) of ``{"x1", "y1", "x2", "y2"}`` objects
    (or ``[x1, y1, x2, y2]`` lists) in the picture's pixels, ``width`` x ``height``. Each is
    rounded and clipped to the picture; ValueError (its message for the owner) for anything else:
    not a list, more than :data:`MAX_BOXES`, a value that is not a finite number, a box with
    ``x2 <= x1`` or ``y2 <= y1``, or one with nothing left inside the picture."""
    if isinstance(value, str):
        try:
            value = json.loads(value or "[]")
        except ValueError:
            raise ValueError("expected a JSON list of boxes") from None
    if not isinstance(value, list):
        raise ValueError("expected a list of boxes")
    if len(value) > MAX_BOXES:
        raise ValueError(f"at most {MAX_BOXES} boxes, got {len(value)}")
    out = []
    for n, box in enumerate(value, 1):
        coords = [box.get(k) for k in ("x1", "y1", "x2", "y2")] if isinstance(box, dict) else box
        if not isinstance(coords, list) or len(coords) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in coords):
            raise ValueError(f"box {n}: expected x1, y1, x2, y2 as numbers")
        x1, y1, x2, y2 = coords
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"box {n}: expected x1 < x2 and y1 < y2, got ({x1}, {y1}, {x2}, {y2})")
        x1, x2 = (min(width, max(0, round(v))) for v in (x1, x2))
        y1, y2 = (min(height, max(0, round(v))) for v in (y1, y2))
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"box {n}: less than a pixel of it is inside the picture ({width} x {height})")
        out.append((x1, y1, x2, y2))
    return out


class GalleryActions:
    """The handlers of the gallery's POSTs (``Gallery.app`` routes them)."""

    def __init__(self, cfg: Config, store, model_changed: Callable[[], Awaitable[None]] | None = None,
                 sources_changed: Callable[[], Awaitable[None]] | None = None,
                 characters_changed: Callable[[], Awaitable[None]] | None = None, http=None,
                 poll_now: Callable[[str], Awaitable[tuple[bool, str]]] | None = None,
                 reload: Callable[[], Awaitable] | None = None, train_now: Callable[[], Awaitable[bool]] | None = None,
                 sources_page: Callable[..., Awaitable[web.Response]] | None = None):
        self.cfg = cfg
        self.store = store            # storage.writer.AsyncStore
        self.http = http              # sources.http.Http, the daemon's shared client (None: one per fetch)
        self.model_changed = model_changed
        self.sources_changed = sources_changed
        self.characters_changed = characters_changed
        self.poll_now = poll_now          # the daemon's SourcePoller.poll_now
        self.reload = reload              # the daemon's Daemon.reload
        self.train_now = train_now        # starts `train --full` in the daemon's retrainer; False if one runs
        self.sources_page = sources_page  # Gallery.sources_page: the page again after a refused add
        self.skipped: set[frozenset] = set()   # pairs skipped on the Compare page (until a restart)
        self._embedders: dict = {}    # identity model version -> scorer.identity.Embedder
        self._embed_lock = threading.Lock()

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
    def _said(request, ok: bool, message: str, page: str, **data) -> web.Response:
        """Answer with ``message``: JSON ``{"ok", "message"}`` to a script, else back to ``page``
        with it as ``?message=`` (or ``?error=`` when ``ok`` is false)."""
        return GalleryActions._done(request, {"ok": ok, "message": message, **data},
                                    f"{page}?" + urlencode({"message" if ok else "error": message}))

    @staticmethod
    def _back(request, default: str) -> str:
        """Back to the page the form was on (its Referer) when that is a page of this gallery (an
        http(s) URL with this request's host, whose path is not ``//host`` and holds no backslash,
        space or control character, which browsers may read as ``//host``); else ``default``."""
        ref = request.headers.get("Referer") or ""
        try:
            parts = urlsplit(ref)
        except ValueError:
            return default
        if parts.scheme not in ("http", "https") or parts.netloc != request.host:
            return default
        back = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        if not back.startswith("/") or back.startswith("//") or any(c == "\\" or c <= " " or c == "\x7f"
                                                                    for c in back):
            return default
        return back

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
        await self.store.add_label(image_id, value, origin=ORIGIN_WEB, user=USER)
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

    # ---- disk --------------------------------------------------------------------------------
    async def refetch(self, request):
        """The "Fetch again" button: a pruned picture's media from its source (``bot.disk.refetch``)."""
        from bot.disk import RefetchError, refetch
        from sources.http import Http
        image_id = int(request.match_info["id"])
        if await self.store.get_image(image_id) is None:
            raise web.HTTPNotFound(text="No such picture.\n")
        try:
            if self.http is not None:
                await refetch(self.cfg, self.store, self.http, image_id)
            else:
                async with Http.from_config(self.cfg.download) as http:
                    await refetch(self.cfg, self.store, http, image_id)
            ok, message = True, "fetched again"
        except RefetchError as e:
            log.warning("image %d: not fetched again: %s", image_id, e)
            ok, message = False, f"not fetched again: {e}"
        return self._done(request, {"ok": ok, "image_id": image_id, "message": message},
                          f"/picture/{image_id}?" + urlencode({"message": message}))

    # ---- comparisons -------------------------------------------------------------------------
    async def compare(self, request):
        """The Compare page's answer: ``a`` and ``b`` (the pair shown) and ``winner`` (one of
        them), or ``skip`` (the pair is not offered again until a restart); then the next pair."""
        form = await self._form(request)
        try:
            a, b = _picture_id(form.get("a")), _picture_id(form.get("b"))
        except ValueError:
            raise web.HTTPBadRequest(text="a, b: expected the ids of the two pictures shown\n") from None
        if form.get("skip"):
            self.skipped.add(frozenset((a, b)))
            log.info("comparison: pictures %d and %d skipped in the gallery", a, b)
            return self._done(request, {"ok": True, "skipped": [a, b]}, "/compare")
        try:
            winner = _picture_id(form.get("winner"))
            if a == b or winner not in (a, b):
                raise ValueError
        except ValueError:
            raise web.HTTPBadRequest(text="winner: expected one of the two pictures shown\n") from None
        loser = b if winner == a else a
        try:
            cid = await self.store.add_comparison(winner, loser, origin=COMPARE_ORIGIN, user=USER)
        except ValueError as e:
            raise web.HTTPNotFound(text=f"{e}\n") from None
        log.info("comparison: picture %d preferred to picture %d in the gallery", winner, loser)
        return self._done(request, {"ok": True, "id": cid, "winner": winner, "loser": loser}, "/compare")

    async def compare_undo(self, request):
        cid = int(request.match_info["id"])
        row = await self.store.get_comparison(cid)
        if row is None or not await self.store.remove_comparison(cid):
            raise web.HTTPNotFound(text="No such comparison (or taken back already).\n")
        log.info("comparison: picture %d over picture %d taken back in the gallery", row["winner_id"], row["loser_id"])
        return self._done(request, {"ok": True, "id": cid}, "/compare")

    # ---- face boxes for the owner's own detector ---------------------------------------------
    async def boxes(self, request):
        """The Boxes page's answer: ``id`` (the picture shown) and ``boxes`` (:func:`parse_boxes`),
        which become its verified boxes (none: verified with no face); or ``skip`` (it goes to the
        back of the review queue, storage/boxes.py). A box kept as proposed (or as verified) keeps its origin
        (the detectors that found it); a drawn or moved one is the owner's. Then the next picture."""
        from storage.boxes import OWNER, Box
        form = await self._form(request)
        try:
            image_id = _picture_id(form.get("id"))
        except ValueError:
            raise web.HTTPBadRequest(text="id: expected the id of the picture shown\n") from None
        if form.get("skip"):
            if not await self.store.skip_box_picture(image_id):
                raise web.HTTPNotFound(text="No such picture in the box set.\n")
            log.info("boxes: picture %d skipped in the gallery", image_id)
            return self._done(request, {"ok": True, "skipped": image_id}, "/boxes")
        image = await self.store.get_image(image_id)
        if image is None:
            raise web.HTTPNotFound(text="No such picture.\n")
        if not image.get("width") or not image.get("height"):
            raise web.HTTPBadRequest(text="This picture's size is unknown: its boxes cannot be checked.\n")
        try:
            coords = parse_boxes(form.get("boxes", "[]"), image["width"], image["height"])
        except ValueError as e:
            raise web.HTTPBadRequest(text=f"boxes: {e}\n") from None
        current = await self.store.box_picture(image_id)
        known = {b.xyxy: b.origin for b in (current.verified + current.proposed)} if current else {}
        boxes = [Box(*xyxy, origin=known.get(xyxy, OWNER)) for xyxy in coords]
        await self.store.verify_boxes(image_id, boxes)
        log.info("boxes: picture %d verified in the gallery with %d face box(es)", image_id, len(boxes))
        return self._done(request, {"ok": True, "image_id": image_id, "boxes": len(boxes)}, "/boxes")

    # ---- characters --------------------------------------------------------------------------
    def _embedder(self, row: dict, icfg, models_dir):
        """The identity embedder of ``row``, loaded once (the last version used is kept);
        called with ``_embed_lock`` held."""
        from scorer.characters import load_embedder
        if row["version"] not in self._embedders:
            self._embedders = {row["version"]: load_embedder(row, icfg, models_dir)}
        return self._embedders[row["version"]]

    def _embed_face(self, face: dict) -> str:
        """Embed a named face with the active identity embedder (created if none); its version.
        Runs on a worker thread with its own connection."""
        from scorer.characters import embed_faces, ensure_active_embedder
        from storage import Store
        with Store.open(self.cfg.db_path) as store, self._embed_lock:
            row = ensure_active_embedder(store, self.cfg.characters, self.cfg.models_path)
            embed_faces(store, self._embedder(row, self.cfg.characters, self.cfg.models_path), [face],
                        self.cfg.media_path, margin=self.cfg.detector.margin, max_pixels=self.cfg.download.max_pixels)
            return row["version"]

    async def name_face(self, request):
        face_id = int(request.match_info["id"])
        name = (await self._form(request)).get("name")
        try:
            if not isinstance(name, str):
                raise CharacterNameError("name: expected the character's name")
            name = check_name(name)
        except CharacterNameError as e:
            raise web.HTTPBadRequest(text=f"{e}\n") from None
        face = await self.store.face_with_media(face_id)
        if face is None:
            raise web.HTTPNotFound(text="No such face.\n")
        if face["detector"] == WHOLE_PICTURE:
            raise web.HTTPBadRequest(text="No face was found in this picture: the whole picture cannot be named.\n")
        await self.store.call(lambda s: s.name_face(face_id, s.character_id(name, create=True), origin=NAME_ORIGIN))
        log.info("characters: face %d of picture %d named in the gallery", face_id, face["image_id"])
        message = f"face named {name}"
        try:
            version = await asyncio.to_thread(self._embed_face, face)
        except Exception as e:  # noqa: BLE001 - the name is stored; the next embedding pass takes it
            log.warning("characters: face %d named but not embedded: %s", face_id, e)
            version, message = None, f"face named {name}; not embedded yet: {e}"
        if self.characters_changed is not None:
            await self.characters_changed()
        return self._done(request, {"ok": True, "face_id": face_id, "image_id": face["image_id"], "character": name,
                                    "embedded_by": version, "message": message},
                          self._back(request, f"/picture/{face['image_id']}"))

    async def unname_face(self, request):
        face_id = int(request.match_info["id"])
        face = await self.store.face_with_media(face_id)
        if face is None or not await self.store.unname_face(face_id):
            raise web.HTTPNotFound(text="No such named face.\n")
        log.info("characters: the name of face %d taken back in the gallery", face_id)
        if self.characters_changed is not None:
            await self.characters_changed()
        return self._done(request, {"ok": True, "face_id": face_id, "image_id": face["image_id"]},
                          self._back(request, f"/picture/{face['image_id']}"))

    async def use_identity_model(self, request):
        from scorer.characters import use_embedder
        from scorer.model import ModelError
        from storage import Store
        version = str((await self._form(request)).get("version", ""))
        cfg = self.cfg

        def run():
            with Store.open(cfg.db_path) as store, self._embed_lock:
                use_embedder(store, cfg.characters, cfg.models_path, cfg.media_path, version,
                             margin=cfg.detector.margin, max_pixels=cfg.download.max_pixels, loader=self._embedder)
        try:
            await asyncio.to_thread(run)
        except ModelError as e:
            return self._done(request, {"ok": False, "error": str(e)}, "/model?" + urlencode({"message": str(e)}))
        if self.characters_changed is not None:
            await self.characters_changed()
        message = f"identity embedder now {version}"
        return self._done(request, {"ok": True, "version": version, "message": message},
                          "/model?" + urlencode({"message": message}))

    async def use_model(self, request):
        from scorer.model import ModelError
        from scorer.registry import use_model
        version = str((await self._form(request)).get("version", ""))
        try:
            await self.store.call(lambda s: use_model(s, self.cfg.scorer, self.cfg.models_path, version,
                                                      margin=self.cfg.detector.margin))
        except ModelError as e:
            return self._done(request, {"ok": False, "error": str(e)}, "/model?" + urlencode({"message": str(e)}))
        if self.model_changed is not None:
            await self.model_changed()
        return self._done(request, {"ok": True, "version": version},
                          "/model?" + urlencode({"message": f"now using {version}"}))

    async def evaluate(self, request):
        from bot.web import train_hint
        from scorer.evaluate import evaluate_version
        from storage import Store
        version = str((await self._form(request)).get("version", "")) or None
        row = await self.store.call(lambda s: s.get_model(version) if version else s.active_model())
        if row is not None and not row.get("metrics"):
            labels = await self.store.label_count()
            return self._said(request, False, f"{row['version']} is not trained, so there is nothing to evaluate: "
                              + train_hint(labels, self.cfg.train.min_labels), "/model")

        def run():
            store = Store.open(self.cfg.db_path)
            try:
                return evaluate_version(store, self.cfg.paths, self.cfg.scorer, self.cfg.train, version,
                                        margin=self.cfg.detector.margin,
                                        max_pixels=self.cfg.download.max_pixels, progress=False)
            finally:
                store.close()
        try:
            m, paths, row = await asyncio.to_thread(run)
        except Exception as e:  # noqa: BLE001
            return self._said(request, False, f"evaluation failed: {e}", "/model")
        if not m.get("n"):
            return self._said(request, False, f"{row['version']} has no validation pictures to be evaluated on: "
                              "rate more pictures (about one in five is kept for validation)", "/model")
        return self._said(request, True, f"evaluated {row['version']} on {m['n']} validation picture(s); "
                          "the plots are below", "/model")

    async def train(self, request):
        """"Train now": a full training run (``train --full``: the network, then the taste head;
        minutes) in the daemon's retrainer; its progress shows on the Model page."""
        from scorer.progress import read_progress
        if self.train_now is None:
            return self._said(request, False, "training from the gallery needs the running daemon; "
                              "run `python main.py train --full`", "/model")
        labels = await self.store.label_count()
        if labels < self.cfg.train.min_labels:
            return self._said(request, False, f"not started: rate at least {self.cfg.train.min_labels} pictures "
                              f"first (you have {labels})", "/model")
        running = await asyncio.to_thread(read_progress, self.cfg.data_path)
        if (running and running.get("state") == "running") or not await self.train_now():
            return self._said(request, False, "a training run is going already: its progress is shown here", "/model")
        log.info("training: started from the gallery")
        return self._said(request, True, "training started (train --full: the network, then the taste head; "
                          "minutes); its progress is shown here", "/model")

    async def source_add(self, request):
        import shlex
        form = await self._form(request)
        name, kind = str(form.get("name", "")).strip(), str(form.get("kind", "")).strip()
        try:
            if not name:
                raise ManageError("a source needs a name")
            pairs = parse_pairs(shlex.split(str(form.get("options", ""))))
            src = await self.store.call(lambda s: add_source(s, self.cfg, name, kind, pairs))
            message = f"added source {src.name}; it is polled in a moment"
        except (ManageError, ValueError) as e:
            error = f"not added: {e}"
            wants_json = "application/json" in request.headers.get("Accept", "") \
                or request.content_type == "application/json"
            if wants_json or self.sources_page is None:
                return self._said(request, False, error, "/sources")
            values = {k: str(form.get(k, "")) for k in ("name", "kind", "options")}
            return await self.sources_page(request, error=error, form=values, status=400)
        if self.sources_changed is not None:
            await self.sources_changed()
        return self._said(request, True, message, "/sources")

    async def source_remove(self, request):
        name = request.match_info["name"]
        try:
            await self.store.call(lambda s: remove_source(s, self.cfg, name))
        except ManageError as e:
            return self._said(request, False, f"not removed: {e}", "/sources")
        return self._said(request, True, f"removed source {name}; its pictures are kept", "/sources")

    async def source_pause(self, request):
        name = request.match_info["name"]
        paused = request.path.endswith("/pause")
        try:
            await self.store.call(lambda s: pause_source(s, name, paused))
        except ManageError as e:
            return self._said(request, False, str(e), "/sources")
        if self.sources_changed is not None:
            await self.sources_changed()
        return self._said(request, True, f"source {name} {'paused' if paused else 'resumed'}", "/sources")

    async def source_poll(self, request):
        """"Poll now": poll the source at once, whatever its backoff; a success makes it healthy."""
        name = request.match_info["name"]
        if self.poll_now is None:
            return self._said(request, False, "polling from the gallery needs the running daemon", "/sources")
        ok, what = await self.poll_now(name)
        log.info("source %s: polled from the gallery: %s", name, what)
        return self._said(request, ok, f"polled {name}: {what}" if ok else f"poll of {name} failed: {what}",
                          "/sources")

    async def reload_config(self, request):
        """"Reload": re-read the config file (``Daemon.reload``, as on SIGHUP)."""
        if self.reload is None:
            return self._said(request, False, "reloading needs the running daemon; restart it instead", "/sources")
        done = await self.reload()
        return self._said(request, done.ok, done.message, "/sources", restart=done.restart)
