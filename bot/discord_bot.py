"""Discord: post the best pictures, turn the owner's reactions into labels, owner-only commands.

:class:`DiscordBot` runs inside the daemon's event loop (``async with client: await
client.start(token)``); a Discord outage never stops polling or scoring, and reconnects are
discord.py's. If the first login fails for network reasons it is retried with a growing delay;
a refused token turns Discord off with one message. Once connected it settles unconfirmed posts,
catches up on reactions and runs the posting cycle every ``discord.interval``.

This module is the connection and the schedule; the work is done by:

- ``bot.discord_posts``: the posting cycle, one post, reconciling posts left unconfirmed;
- ``bot.discord_reactions``: owners' reactions to labels, live and caught up after a restart;
- ``bot.discord_compare``: the two-picture comparison posts and the owners' 🅰️/🅱️ answers;
- ``bot.discord_commands``: the slash commands and the owner check.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone

import aiohttp
import discord

from bot.config import Config
from bot.discord_commands import OwnerCommands, OwnerTree, sync_commands
from bot.discord_compare import ComparePosts
from bot.discord_posts import SETTING_LAST_CYCLE, Poster
from bot.discord_reactions import ReactionLabels
from bot.posting import Reactions

log = logging.getLogger("tastefeed.discord")


class _Client(discord.Client):
    def __init__(self, bot: "DiscordBot"):
        super().__init__(intents=discord.Intents.default())
        self.bot = bot
        self.tree = OwnerTree(self, bot.owners)
        bot.commands.register(self.tree)

    async def setup_hook(self) -> None:
        await sync_commands(self.tree, self.bot.store, self.bot.d.guild_id)

    async def on_ready(self) -> None:
        await self.bot.on_ready()

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.bot.reactions.on_reaction(payload, added=True)
        await self.bot.compare.on_reaction(payload, added=True)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.bot.reactions.on_reaction(payload, added=False)
        await self.bot.compare.on_reaction(payload, added=False)


class DiscordBot:
    RETRY_FIRST = 5.0                 # seconds before retrying a failed login; doubles up to 10 minutes

    def __init__(self, cfg: Config, store, request_retrain: Callable[[str], Awaitable[bool]] | None = None,
                 names_changed: Callable[[], Awaitable[object]] | None = None, live: dict | None = None):
        self.cfg = cfg
        self.d = cfg.discord
        self.store = store            # storage.writer.AsyncStore
        self.owners = {int(o) for o in self.d.owner_ids}
        self.client: _Client | None = None
        self.ready = asyncio.Event()
        self.stopped = False
        self._tasks: set[asyncio.Task] = set()
        self._next_cycle: asyncio.TimerHandle | None = None
        emoji = Reactions(self.d.reactions)   # which emoji is which rating
        self.compare = ComparePosts(cfg, store, self.owners, client=lambda: self.client, ready=self.ready)
        self.posts = Poster(cfg, store, emoji, client=lambda: self.client, ready=self.ready,
                            after_posts=self.compare.after_posts)
        self.reactions = ReactionLabels(self.d, store, self.owners, emoji, client=lambda: self.client)
        self.commands = OwnerCommands(cfg, store, self.posts.post_cycle, request_retrain, names_changed,
                                      post_comparison=self.compare.post, live=live)

    # ---- connection ------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect and stay connected until :meth:`close`; never raises."""
        delay = self.RETRY_FIRST
        while not self.stopped:
            self.client = _Client(self)
            try:
                async with self.client:
                    await self.client.start(self.d.token, reconnect=True)
                if self.stopped:
                    return
            except discord.LoginFailure:
                log.error("Discord: the token was refused (401 Unauthorized). Discord is off until the "
                          "token is fixed (DISCORD_TOKEN or discord.token) and tastefeed restarted; "
                          "polling and scoring go on")
                return
            except discord.PrivilegedIntentsRequired:
                log.error("Discord: the gateway asked for privileged intents; Discord is off")
                return
            except asyncio.CancelledError:
                raise
            except (OSError, aiohttp.ClientError, asyncio.TimeoutError, discord.GatewayNotFound,
                    discord.HTTPException, discord.ConnectionClosed) as e:
                if self.stopped:
                    return
                log.warning("Discord: cannot connect (%s: %s); retrying in %.0fs, polling and scoring go on",
                            type(e).__name__, e, delay)
            except Exception as e:  # noqa: BLE001 - never take the daemon down
                if self.stopped:
                    return
                log.error("Discord: stopped unexpectedly (%s: %s); retrying in %.0fs", type(e).__name__, e, delay)
            finally:
                if self.ready.is_set():  # it was connected: the next failure starts the delays afresh
                    delay = self.RETRY_FIRST
                self.ready.clear()
            await asyncio.sleep(delay * random.uniform(0.9, 1.1))
            delay = min(delay * 2, 600)

    async def close(self) -> None:
        self.stopped = True
        if self._next_cycle is not None:
            self._next_cycle.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.client is not None and not self.client.is_closed():
            await self.client.close()

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def on_ready(self) -> None:
        log.info("Discord: connected as %s, posting to channel %s", self.client.user, self.d.channel_id)
        first = not self.ready.is_set()
        self.ready.set()
        if first:
            self._spawn(self._after_connect(), "discord-start")

    async def _after_connect(self) -> None:
        await self.posts.reconcile()
        await self.reactions.catch_up()
        await self.compare.catch_up()
        last = await self.store.get_setting(SETTING_LAST_CYCLE)
        wait = 0.0
        if last:
            due = datetime.fromisoformat(last) + timedelta(seconds=self.d.interval)
            wait = max(0.0, (due - datetime.now(timezone.utc)).total_seconds())
        self._schedule_cycle(wait)

    def _schedule_cycle(self, delay: float) -> None:
        if self.stopped:
            return
        loop = asyncio.get_running_loop()
        self._next_cycle = loop.call_later(delay, lambda: self._spawn(self._scheduled_cycle(), "discord-cycle"))

    async def _scheduled_cycle(self) -> None:
        try:
            await self.posts.post_cycle()
        finally:
            self._schedule_cycle(self.d.interval)
