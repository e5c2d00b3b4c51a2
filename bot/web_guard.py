"""Who may use the web gallery: the token, the Host header and same-origin state changes.

- Bound to anything but loopback, every request needs the secret token (``web.token`` or
  ``TASTEFEED_WEB_TOKEN``): open the gallery once with ``?token=...`` and it is kept in a cookie
  (HttpOnly, SameSite=Strict); scripts may send it as ``Authorization: Bearer <token>`` (a
  header no other site can make a browser send); otherwise 401. A token set for a loopback
  gallery is enforced too.
- ``GET /healthz`` needs no token when it comes from this machine (the peer's address is loopback
  and the Host header names this machine, so a web page that rebinds its name to 127.0.0.1
  cannot read it); from anywhere else it needs the token like every other page.
- On loopback, the Host header must name this machine (no DNS rebinding).
- State changes are POSTs only, and a POST must come from the gallery's own pages: its Origin
  (or Sec-Fetch-Site, or Referer) must match, or it is refused with 403.

:func:`guard` makes the aiohttp middleware that checks all three before any handler runs.
"""
from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

from bot.config import WebConfig, is_loopback

COOKIE = "tastefeed_token"
HEALTHZ = "/healthz"


def token_needed(cfg: WebConfig) -> bool:
    return bool(cfg.token) or not cfg.loopback()


def guard(cfg: WebConfig):
    """The middleware for a gallery with the ``[web]`` settings ``cfg`` (read on every request)."""

    @web.middleware
    async def check(request: web.Request, handler):
        if cfg.loopback() and not _local_host(request.host):
            return web.Response(status=421, text="This gallery answers only to localhost addresses.\n")
        if token_needed(cfg) and not _local_health_check(request):
            token = cfg.token
            bearer = request.headers.get("Authorization", "")
            if bearer.startswith("Bearer "):
                if not hmac.compare_digest(bearer[7:].strip().encode(), token.encode()):
                    return web.Response(status=401, text="Wrong token.\n")
                return await _same_origin_or_refuse(request, handler)
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
        return await _same_origin_or_refuse(request, handler)

    return check


async def _same_origin_or_refuse(request: web.Request, handler):
    if request.method not in ("GET", "HEAD") and not _same_origin(request):
        return web.Response(status=403, text="Cross-site request refused.\n")
    return await handler(request)


def _local_health_check(request: web.Request) -> bool:
    """``GET /healthz`` from this machine: a loopback peer naming this machine in Host."""
    if request.path != HEALTHZ or request.method not in ("GET", "HEAD") or not _local_host(request.host):
        return False
    try:
        peer = ipaddress.ip_address((request.remote or "").split("%")[0])
    except ValueError:
        return False
    return (getattr(peer, "ipv4_mapped", None) or peer).is_loopback


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
