"""A local fake of Discord for tests: the REST routes tastefeed uses and a gateway websocket.

The real discord.py client talks to it: point ``discord.http.Route.BASE`` at ``server.api`` and
the gateway URL comes from ``GET /gateway/bot``. REST answers are JSON with the content type
exactly ``application/json`` (discord.py only parses that). The gateway speaks the real protocol:
HELLO, IDENTIFY (token checked), READY, GUILD_CREATE, heartbeats and ACKs, RESUME, then whatever
the test dispatches (``MESSAGE_REACTION_ADD``/``REMOVE``, ``INTERACTION_CREATE``).

State is kept like Discord keeps it (channels, messages with attachments, embeds and reactions)
and survives client restarts, so a test can stop the bot, react "while it is down" and start it
again. ``requests`` records every REST call; ``unknown`` the ones this fake does not serve.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

from aiohttp import web

DISCORD_EPOCH = 1420070400000
_counter = itertools.count(1)


def snowflake() -> int:
    """A real-looking snowflake: milliseconds since the Discord epoch, then a counter."""
    return ((int(time.time() * 1000) - DISCORD_EPOCH) << 22) | (next(_counter) % 4096)


def user(uid: int, name: str, bot: bool = False) -> dict:
    return {"id": str(uid), "username": name, "discriminator": "0", "global_name": name, "avatar": None,
            "bot": bot, "public_flags": 0, "flags": 0}


def json_response(data, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


def error(status: int, message: str, code: int = 0) -> web.Response:
    return json_response({"message": message, "code": code}, status)


@dataclass
class Upload:
    filename: str
    data: bytes
    content_type: str


async def read_body(request: web.Request) -> tuple[dict, list[Upload]]:
    """A JSON body, or discord.py's multipart form: ``payload_json`` plus ``files[n]``."""
    if not request.content_type.startswith("multipart/"):
        return await request.json(), []
    payload, uploads = {}, []
    async for part in await request.multipart():
        if part.name == "payload_json":
            payload = json.loads(await part.text())
        else:
            uploads.append(Upload(part.filename, bytes(await part.read()), part.headers.get("Content-Type", "")))
    return payload, uploads


@dataclass
class FakeDiscord:
    token: str = "fake-token.Abc123.secret"
    guild_id: int = field(default_factory=snowflake)
    channel_id: int = field(default_factory=snowflake)
    nsfw_channel_id: int = field(default_factory=snowflake)
    bot_id: int = field(default_factory=snowflake)
    app_id: int = field(default_factory=snowflake)
    owner_id: int = field(default_factory=snowflake)
    stranger_id: int = field(default_factory=snowflake)
    filesize_limit: int = 10 * 1024 * 1024

    def __post_init__(self):
        self.base = ""
        self.messages: dict[int, dict] = {}            # id -> message payload (without reactions)
        self.uploads: dict[int, list[Upload]] = {}     # message id -> its files
        self.reactions: dict[int, dict[str, list[int]]] = {}  # message id -> emoji -> user ids, in order
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.interaction_replies: list[dict] = []      # callbacks and follow-ups
        self.command_syncs: list[list[dict]] = []
        self.sockets: list[web.WebSocketResponse] = []
        self.identified = asyncio.Event()
        self.hold_message_posts = False                # create the message, hold the answer until release()
        self._release = asyncio.Event()
        self.seq = 0
        self.sessions: set[str] = set()
        self.channels = {
            self.channel_id: self._channel(self.channel_id, "recommendations", nsfw=False),
            self.nsfw_channel_id: self._channel(self.nsfw_channel_id, "after-dark", nsfw=True),
        }

    # ---- payloads ------------------------------------------------------------------------
    def _channel(self, cid: int, name: str, nsfw: bool) -> dict:
        return {"id": str(cid), "type": 0, "guild_id": str(self.guild_id), "name": name, "position": 0,
                "permission_overwrites": [], "nsfw": nsfw, "topic": None, "last_message_id": None,
                "rate_limit_per_user": 0, "parent_id": None, "flags": 0}

    @property
    def bot_user(self) -> dict:
        return user(self.bot_id, "tastefeed", bot=True)

    def member(self, uid: int, name: str) -> dict:
        return {"user": user(uid, name), "roles": [], "joined_at": "2026-01-01T00:00:00+00:00", "deaf": False,
                "mute": False, "flags": 0, "pending": False, "nick": None, "avatar": None,
                "communication_disabled_until": None, "premium_since": None, "permissions": "2248473465835073"}

    def guild(self) -> dict:
        return {"id": str(self.guild_id), "name": "Home", "icon": None, "owner_id": str(self.owner_id),
                "afk_timeout": 300, "verification_level": 0, "default_message_notifications": 0,
                "explicit_content_filter": 0, "features": [], "mfa_level": 0, "premium_tier": 0,
                "system_channel_id": None, "system_channel_flags": 0, "preferred_locale": "en-US",
                "nsfw_level": 0, "premium_progress_bar_enabled": False, "large": False, "member_count": 3,
                "joined_at": "2026-01-01T00:00:00+00:00", "unavailable": False,
                "roles": [{"id": str(self.guild_id), "name": "@everyone", "permissions": "2248473465835073",
                           "position": 0, "color": 0, "hoist": False, "managed": False, "mentionable": False,
                           "flags": 0}],
                "emojis": [], "stickers": [], "threads": [], "stage_instances": [], "guild_scheduled_events": [],
                "voice_states": [], "presences": [], "soundboard_sounds": [],
                "members": [self.member(self.bot_id, "tastefeed") | {"user": self.bot_user}],
                "channels": [{k: v for k, v in c.items() if k != "guild_id"} for c in self.channels.values()]}

    def message_payload(self, mid: int) -> dict:
        msg = dict(self.messages[mid])
        reactions = []
        for emoji, users in self.reactions.get(mid, {}).items():
            if users:
                reactions.append({"emoji": {"id": None, "name": emoji}, "count": len(users),
                                  "count_details": {"burst": 0, "normal": len(users)}, "burst_colors": [],
                                  "me": self.bot_id in users, "me_burst": False, "burst_me": False,
                                  "burst_count": 0})
        if reactions:
            msg["reactions"] = reactions
        return msg

    def messages_in(self, channel_id: int) -> list[dict]:
        return [self.message_payload(m) for m in sorted(self.messages)
                if int(self.messages[m]["channel_id"]) == channel_id]

    # ---- the app -------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024 * 1024)
        r = app.router
        v = "/api/v10"
        r.add_get(f"{v}/users/@me", self.get_me)
        r.add_get(f"{v}/oauth2/applications/@me", self.get_application)
        r.add_get(f"{v}/gateway/bot", self.get_gateway)
        r.add_get(f"{v}/gateway", self.get_gateway)
        r.add_get(f"{v}/channels/{{cid}}", self.get_channel)
        r.add_post(f"{v}/channels/{{cid}}/messages", self.create_message)
        r.add_get(f"{v}/channels/{{cid}}/messages", self.list_messages)
        r.add_get(f"{v}/channels/{{cid}}/messages/{{mid}}", self.get_message)
        r.add_put(f"{v}/channels/{{cid}}/messages/{{mid}}/reactions/{{emoji}}/@me", self.add_own_reaction)
        r.add_get(f"{v}/channels/{{cid}}/messages/{{mid}}/reactions/{{emoji}}", self.reaction_users)
        r.add_post(f"{v}/interactions/{{iid}}/{{itoken}}/callback", self.interaction_callback)
        r.add_post(f"{v}/webhooks/{{app}}/{{itoken}}", self.followup)
        r.add_put(f"{v}/applications/{{app}}/commands", self.sync_commands)
        r.add_put(f"{v}/applications/{{app}}/guilds/{{gid}}/commands", self.sync_commands)
        r.add_get("/gateway", self.gateway)
        r.add_route("*", "/{tail:.*}", self.not_found)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler):
        self.requests.append((request.method, request.path))
        if request.path.startswith("/api/") and request.headers.get("Authorization") != f"Bot {self.token}" \
                and "/interactions/" not in request.path and "/webhooks/" not in request.path:
            return error(401, "401: Unauthorized")
        return await handler(request)

    async def not_found(self, request: web.Request) -> web.Response:
        self.unknown.append((request.method, request.path))
        return error(404, "404: Not Found")

    async def get_me(self, request):
        return json_response(self.bot_user | {"verified": True, "mfa_enabled": False, "locale": "en-US"})

    async def get_application(self, request):
        return json_response({"id": str(self.app_id), "name": "tastefeed", "description": "", "icon": None,
                              "bot_public": False, "bot_require_code_grant": False, "verify_key": "00" * 32,
                              "owner": user(self.owner_id, "owner"), "flags": 0, "team": None,
                              "summary": "", "interactions_endpoint_url": None, "tags": []})

    async def get_gateway(self, request):
        return json_response({"url": self.base.replace("http", "ws", 1) + "/gateway", "shards": 1,
                              "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0,
                                                      "max_concurrency": 1}})

    async def get_channel(self, request):
        channel = self.channels.get(int(request.match_info["cid"]))
        return json_response(channel) if channel else error(404, "Unknown Channel", 10003)

    async def create_message(self, request: web.Request):
        cid = int(request.match_info["cid"])
        if cid not in self.channels:
            return error(404, "Unknown Channel", 10003)
        payload, uploads = await read_body(request)
        mid = snowflake()
        attachments = [{"id": str(snowflake()), "filename": u.filename, "size": len(u.data),
                        "url": f"{self.base}/attachments/{mid}/{u.filename}",
                        "proxy_url": f"{self.base}/attachments/{mid}/{u.filename}", "content_type": u.content_type}
                       for u in uploads]
        self.messages[mid] = {
            "id": str(mid), "channel_id": str(cid), "guild_id": str(self.guild_id), "author": self.bot_user,
            "content": payload.get("content") or "", "timestamp": "2026-11-23T00:00:00+00:00",
            "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
            "mention_roles": [], "attachments": attachments, "embeds": payload.get("embeds") or [],
            "pinned": False, "type": 0, "flags": 0, "components": []}
        self.uploads[mid] = uploads
        await self.dispatch("MESSAGE_CREATE", self.message_payload(mid))
        if self.hold_message_posts:
            await self._release.wait()  # the message exists; the sender is gone before the answer comes
        return json_response(self.message_payload(mid))

    async def list_messages(self, request):
        cid = int(request.match_info["cid"])
        limit = int(request.query.get("limit", 50))
        msgs = self.messages_in(cid)
        if "after" in request.query:
            after = int(request.query["after"])
            msgs = [m for m in msgs if int(m["id"]) > after][:limit]
        elif "before" in request.query:
            before = int(request.query["before"])
            msgs = [m for m in msgs if int(m["id"]) < before][-limit:]
        else:
            msgs = msgs[-limit:]
        return json_response(list(reversed(msgs)))  # newest first, like Discord

    async def get_message(self, request):
        mid = int(request.match_info["mid"])
        if mid not in self.messages:
            return error(404, "Unknown Message", 10008)
        return json_response(self.message_payload(mid))

    async def add_own_reaction(self, request):
        mid = int(request.match_info["mid"])
        if mid not in self.messages:
            return error(404, "Unknown Message", 10008)
        await self.react(mid, unquote(request.match_info["emoji"]), self.bot_id)
        return web.Response(status=204)

    async def reaction_users(self, request):
        mid = int(request.match_info["mid"])
        emoji = unquote(request.match_info["emoji"])
        ids = self.reactions.get(mid, {}).get(emoji, [])
        after = int(request.query.get("after", 0))
        limit = int(request.query.get("limit", 25))
        names = {self.bot_id: "tastefeed", self.owner_id: "owner", self.stranger_id: "stranger"}
        return json_response([user(u, names.get(u, "someone"), bot=u == self.bot_id)
                              for u in sorted(ids) if u > after][:limit])

    async def interaction_callback(self, request):
        body, _ = await read_body(request)
        self.interaction_replies.append({"kind": "callback", "interaction": request.match_info["iid"], **body})
        data = body.get("data") or {}
        return json_response({"interaction": {"id": request.match_info["iid"], "type": 2,
                                              "response_message_id": str(snowflake()),
                                              "response_message_loading": body["type"] == 5,
                                              "response_message_ephemeral": bool(data.get("flags", 0) & 64)},
                              "resource": None})

    async def followup(self, request: web.Request):
        body, files = await read_body(request)
        self.interaction_replies.append({"kind": "followup", "files": files, "_token": request.match_info["itoken"],
                                         **body})
        mid = snowflake()
        return json_response({"id": str(mid), "channel_id": str(self.channel_id), "author": self.bot_user,
                              "content": body.get("content", ""), "timestamp": "2026-11-23T00:00:00+00:00",
                              "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
                              "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0,
                              "flags": body.get("flags", 0), "webhook_id": str(self.app_id)})

    async def sync_commands(self, request):
        commands = await request.json()
        self.command_syncs.append(commands)
        return json_response([c | {"id": str(snowflake()), "application_id": str(self.app_id), "version": "1",
                                   "default_member_permissions": None, "type": c.get("type", 1)}
                              for c in commands])

    # ---- the gateway ---------------------------------------------------------------------
    async def gateway(self, request: web.Request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
        async for msg in ws:
            if msg.type != web.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            op = data["op"]
            if op == 1:
                await ws.send_json({"op": 11, "d": None, "s": None, "t": None})
            elif op == 2:
                if data["d"]["token"] != self.token:
                    await ws.close(code=4004, message=b"Authentication failed.")
                    break
                session = f"session-{snowflake()}"
                self.sessions.add(session)
                self.sockets.append(ws)
                await self._send(ws, "READY", {
                    "v": 10, "user": self.bot_user, "guilds": [{"id": str(self.guild_id), "unavailable": True}],
                    "session_id": session, "resume_gateway_url": self.base.replace("http", "ws", 1) + "/gateway",
                    "shard": [0, 1], "application": {"id": str(self.app_id), "flags": 0},
                    "private_channels": [], "relationships": [], "presences": [], "guild_join_requests": [],
                    "geo_ordered_rtc_regions": [], "user_settings": {}})
                await self._send(ws, "GUILD_CREATE", self.guild())
                self.identified.set()
            elif op == 6:
                if data["d"]["session_id"] in self.sessions:
                    self.sockets.append(ws)
                    await self._send(ws, "RESUMED", {})
                else:
                    await ws.send_json({"op": 9, "d": False, "s": None, "t": None})
        if ws in self.sockets:
            self.sockets.remove(ws)
        return ws

    async def _send(self, ws, event: str, data: dict) -> None:
        self.seq += 1
        await ws.send_json({"op": 0, "t": event, "s": self.seq, "d": data})

    async def dispatch(self, event: str, data: dict) -> None:
        for ws in list(self.sockets):
            if not ws.closed:
                await self._send(ws, event, data)

    def release(self) -> None:
        self.hold_message_posts = False
        self._release.set()

    async def close_sockets(self) -> None:
        for ws in list(self.sockets):
            await ws.close()
        self.sockets.clear()
        self.identified.clear()

    # ---- what people do ------------------------------------------------------------------
    async def react(self, mid: int, emoji: str, uid: int, *, live: bool = True) -> None:
        users = self.reactions.setdefault(mid, {}).setdefault(emoji, [])
        if uid in users:
            return
        users.append(uid)
        if live:
            msg = self.messages[mid]
            await self.dispatch("MESSAGE_REACTION_ADD", {
                "user_id": str(uid), "channel_id": msg["channel_id"], "message_id": str(mid),
                "guild_id": str(self.guild_id), "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0,
                "member": self.member(uid, "someone"), "message_author_id": str(self.bot_id)})

    async def unreact(self, mid: int, emoji: str, uid: int, *, live: bool = True) -> None:
        users = self.reactions.get(mid, {}).get(emoji, [])
        if uid not in users:
            return
        users.remove(uid)
        if live:
            msg = self.messages[mid]
            await self.dispatch("MESSAGE_REACTION_REMOVE", {
                "user_id": str(uid), "channel_id": msg["channel_id"], "message_id": str(mid),
                "guild_id": str(self.guild_id), "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0})

    async def command(self, name: str, uid: int, options: list[dict] | None = None) -> str:
        """Send a slash command as ``uid``; returns the interaction id."""
        iid = str(snowflake())
        await self.dispatch("INTERACTION_CREATE", {
            "id": iid, "application_id": str(self.app_id), "type": 2, "token": f"itoken-{iid}", "version": 1,
            "guild_id": str(self.guild_id), "channel_id": str(self.channel_id),
            "channel": self._channel(self.channel_id, "recommendations", nsfw=False),
            "member": self.member(uid, "someone"), "app_permissions": "2248473465835073", "locale": "en-US",
            "guild_locale": "en-US", "entitlements": [], "authorizing_integration_owners": {"0": str(self.guild_id)},
            "context": 0, "attachment_size_limit": self.filesize_limit,
            "data": {"id": str(snowflake()), "name": name, "type": 1, "options": options or []}})
        return iid

    def replies_to(self, iid: str) -> list[dict]:
        token = f"itoken-{iid}"
        out = [r for r in self.interaction_replies if r.get("interaction") == iid]
        out += [r for r in self.interaction_replies if r["kind"] == "followup" and r.get("_token") == token]
        return out
