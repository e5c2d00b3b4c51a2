"""Discord: post the best pictures, turn the owner's reactions into labels, owner-only commands.

:class:`DiscordBot` runs inside the daemon's event loop (``async with client: await
client.start(token)``); a Discord outage never stops polling or scoring, and reconnects are
discord.py's. If the first login fails for network reasons it is retried with a growing delay;
a refused token turns Discord off with one message.

Posting never posts a picture twice: a ``posts`` row with status ``intent`` is written before
the message is sent, and the message id after. An intent left by a crash or an unanswered send is
reconciled before the next cycle: the channel's recent messages are searched for the picture's
footer (``picture #ID``); found, the post is recorded as sent, otherwise it is marked failed (the
picture becomes a candidate again).

Reactions are read from raw gateway events, so messages not in the cache count too. Each rating
reaction of an owner is one label (origin ``discord``, user = the owner's id, ref =
``MESSAGE_ID/EMOJI``); the newest label of a picture counts, and removing a reaction takes its
label back. On start, reactions given while the bot was down (posts of the last
``catch_up_hours``) are read and recorded without duplicates.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone

import aiohttp
import discord
from discord import app_commands

from bot.config import Config
from bot.manage import (ManageError, add_source, format_stats, parse_pairs, picture_data, remove_source,
                        source_lines, stats)
from bot.posting import Reactions, emoji_key, face_sheet, fit_upload, route
from scorer.ranking import Pick, pick

log = logging.getLogger("tastefeed.discord")

CHANNEL = "discord"
FOOTER = re.compile(r"picture #(\d+)")
LINK = re.compile(r"discord(?:app)?\.com/channels/(\d+|@me)/(\d+)/(\d+)")
SETTING_PAUSED = "discord.paused"
SETTING_LAST_CYCLE = "discord.last_cycle"
SETTING_COMMANDS = "discord.commands_hash"
TOP_MAX = 10


def score_colour(score: float | None) -> discord.Colour:
    if score is None:
        return discord.Colour.light_grey()
    t = max(0.0, min(1.0, (score - 1) / 4))
    return discord.Colour.from_rgb(int(220 * (1 - t)), int(60 + 140 * t), 90)


def build_embed(image: dict, *, faces: int, source: str, exploration: bool, reason: str,
                filename: str) -> discord.Embed:
    score = image.get("score")
    title = image.get("title") or f"Picture #{image['id']}"
    desc = ("🔍 **Exploration**: the model is unsure about this one; your rating teaches it the most."
            if exploration else None)
    embed = discord.Embed(title=title[:256], url=image.get("page_url") or None, description=desc,
                          colour=score_colour(score))
    embed.add_field(name="Score", value="n/a" if score is None else f"{score:.2f} / 5"
                    + (f" (± {image['uncertainty']:.2f})" if image.get("uncertainty") else ""))
    embed.add_field(name="Faces", value=str(faces))
    embed.add_field(name="Source", value=source or "?")
    if image.get("author"):
        embed.add_field(name="Author", value=str(image["author"])[:1024])
    if image.get("page_url"):
        embed.add_field(name="Original", value=f"[open]({image['page_url']})")
    embed.set_image(url=f"attachment://{filename}")
    embed.set_footer(text=f"tastefeed · picture #{image['id']} · {reason} · model {image.get('model_version')}")
    return embed


class OwnerTree(app_commands.CommandTree):
    """Slash commands answer only the owners; anyone else gets an ephemeral refusal."""

    def __init__(self, client: discord.Client, owners: set[int]):
        super().__init__(client)
        self.owners = owners

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id in self.owners:
            return True
        log.info("command /%s from %s refused (not an owner)",
                 interaction.command.qualified_name if interaction.command else "?", interaction.user.id)
        await interaction.response.send_message("Sorry, only this bot's owner can use its commands.",
                                                ephemeral=True)
        return False

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("command /%s failed: %s", interaction.command.qualified_name if interaction.command else "?",
                  getattr(error, "original", error))
        text = f"That failed: {getattr(error, 'original', error)}"
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            pass


class _Client(discord.Client):
    def __init__(self, bot: "DiscordBot"):
        super().__init__(intents=discord.Intents.default())
        self.bot = bot
        self.tree = OwnerTree(self, bot.owners)
        bot.add_commands(self.tree)

    async def setup_hook(self) -> None:
        await self.bot.sync_commands(self.tree)

    async def on_ready(self) -> None:
        await self.bot.on_ready()

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.bot.on_reaction(payload, added=True)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.bot.on_reaction(payload, added=False)


class DiscordBot:
    RETRY_FIRST = 5.0                 # seconds before retrying a failed login; doubles up to 10 minutes

    def __init__(self, cfg: Config, store, request_retrain: Callable[[str], Awaitable[bool]] | None = None):
        self.cfg = cfg
        self.d = cfg.discord
        self.store = store            # storage.writer.AsyncStore
        self.request_retrain = request_retrain  # starts a training run (/train); None in tools
        self.owners = {int(o) for o in self.d.owner_ids}
        self.reactions = Reactions(self.d.reactions)
        self.client: _Client | None = None
        self.ready = asyncio.Event()
        self.stopped = False
        self._cycle_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._next_cycle: asyncio.TimerHandle | None = None
        self.rng = random.Random()

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
        await self.reconcile()
        await self.catch_up()
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
            await self.post_cycle()
        finally:
            self._schedule_cycle(self.d.interval)

    # ---- command registration --------------------------------------------------------------
    async def sync_commands(self, tree: app_commands.CommandTree) -> None:
        """Sync the command tree only when the commands (or their guild) changed: Discord rate-limits it."""
        guild = discord.Object(id=self.d.guild_id) if self.d.guild_id else None
        if guild is not None:
            tree.copy_global_to(guild=guild)
        payload = [c.to_dict(tree) for c in tree.get_commands(guild=guild)]
        digest = hashlib.sha256(json.dumps([self.d.guild_id, tree.client.application_id, payload],
                                           sort_keys=True).encode()).hexdigest()
        if await self.store.get_setting(SETTING_COMMANDS) == digest:
            return
        try:
            await tree.sync(guild=guild)
        except discord.HTTPException as e:
            log.warning("Discord: cannot register the slash commands (%s); they are retried next start", e)
            return
        await self.store.set_setting(SETTING_COMMANDS, digest)
        log.info("Discord: slash commands registered %s", f"in server {self.d.guild_id}" if guild else
                 "globally (they can take up to an hour to appear; set discord.guild_id for instant)")

    # ---- posting ---------------------------------------------------------------------------
    def _accept(self, row: dict) -> bool:
        return route(row, self.d.channel_id, self.d.nsfw_channel_id, self.d.blocklist) is not None

    async def post_cycle(self, n: int | None = None, *, reason: str = "schedule") -> list[int]:
        """Post up to ``n`` (default ``posts_per_cycle``) pictures; returns the message ids sent."""
        async with self._cycle_lock:
            if not self.ready.is_set() or self.client is None:
                log.info("Discord: not connected, posting cycle skipped")
                return []
            if reason == "schedule":
                if await self.store.get_setting(SETTING_PAUSED, False):
                    log.info("Discord: posting is paused (/resume to resume)")
                    return []
                await self.store.set_setting(SETTING_LAST_CYCLE, datetime.now(timezone.utc).isoformat())
            if not await self.reconcile():
                log.warning("Discord: earlier posts are still unconfirmed; posting cycle skipped")
                return []
            n = n or self.d.posts_per_cycle
            picks: list[Pick] = await self.store.call(
                lambda s: pick(s, self.cfg, n, channel=CHANNEL, rng=self.rng, accept=self._accept,
                               near_distance=self.d.near_duplicate_distance))
            sent = []
            for p in picks:
                if p.reason == "score" and (p.image.get("score") or 0) < self.d.min_score:
                    continue  # candidates come best first: the rest are lower still
                message_id = await self.post(p, reason=reason)
                if message_id is not None:
                    sent.append(message_id)
            if not picks:
                log.info("Discord: nothing new to post")
            return sent

    async def _channel(self, channel_id: int):
        channel = self.client.get_channel(channel_id)
        if channel is None:
            channel = await self.client.fetch_channel(channel_id)
        return channel

    async def post(self, p: Pick, *, reason: str = "schedule") -> int | None:
        image = p.image
        channel_id = route(image, self.d.channel_id, self.d.nsfw_channel_id, self.d.blocklist)
        if channel_id is None:
            return None
        try:
            channel = await self._channel(channel_id)
        except (discord.HTTPException, discord.InvalidData) as e:
            log.error("Discord: cannot reach channel %s: %s", channel_id, e)
            return None
        guild_limit = getattr(getattr(channel, "guild", None), "filesize_limit", self.d.max_upload_bytes)
        limit = min(self.d.max_upload_bytes, guild_limit)
        try:
            upload = await asyncio.to_thread(fit_upload, self.cfg.media_path, image["media_path"], limit,
                                             max_pixels=self.cfg.download.max_pixels, name=f"tastefeed-{image['id']}")
        except Exception as e:  # noqa: BLE001 - an unreadable file: note it and move on
            post_id = await self.store.post_intent(image["id"], CHANNEL, str(channel_id), exploration=p.exploration,
                                                   reason=p.reason)
            await self.store.post_failed(post_id, f"cannot prepare the picture: {e}")
            log.warning("Discord: picture %d cannot be prepared: %s", image["id"], e)
            return None
        faces = await self.store.faces_of(image["id"])
        source = await self.store.source_name(image["source_id"]) if image.get("source_id") else None
        embed = build_embed(image, faces=len(faces), source=source or "?", exploration=p.exploration,
                            reason=p.reason, filename=upload.filename)
        post_id = await self.store.post_intent(image["id"], CHANNEL, str(channel_id), exploration=p.exploration,
                                               reason=p.reason if reason == "schedule" else f"{p.reason} ({reason})")
        try:
            message = await channel.send(embed=embed, file=discord.File(io.BytesIO(upload.data), upload.filename))
        except discord.HTTPException as e:
            if e.status >= 500 or e.status == 429:  # the message may or may not exist: reconcile decides
                log.warning("Discord: sending picture %d got %s; will check before posting again", image["id"], e)
            else:
                await self.store.post_failed(post_id, f"{e.status} {e.text}")
                log.error("Discord: picture %d not posted: %s", image["id"], e)
            return None
        except (OSError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.warning("Discord: sending picture %d: %s; will check before posting again", image["id"], e)
            return None
        await self.store.post_sent(post_id, str(message.id))
        log.info("Discord: posted picture %d (score %s%s) as message %s", image["id"],
                 "n/a" if image.get("score") is None else f"{image['score']:.2f}",
                 ", exploration" if p.exploration else "", message.id)
        await self._add_buttons(message)
        return message.id

    async def _add_buttons(self, message: discord.Message) -> None:
        have = {emoji_key(str(r.emoji)) for r in getattr(message, "reactions", []) if r.me}
        for emoji in self.reactions.buttons():
            if emoji_key(emoji) in have:
                continue
            try:
                await message.add_reaction(emoji)
            except discord.HTTPException as e:
                log.warning("Discord: cannot add reaction %s to message %s: %s", emoji, message.id, e)
                return

    async def reconcile(self) -> bool:
        """Settle posts left as ``intent``; True when none is left unsettled."""
        intents = await self.store.posts_with_status(CHANNEL, "intent")
        settled = True
        for post in intents:
            try:
                channel = await self._channel(int(post["channel_id"]))
                since = datetime.fromisoformat(post["created_at"]) - timedelta(minutes=1)
                found = None
                async for message in channel.history(limit=200, after=since):
                    if message.author.id != self.client.user.id:
                        continue
                    for embed in message.embeds:
                        m = FOOTER.search(embed.footer.text or "") if embed.footer else None
                        if m and int(m.group(1)) == post["image_id"]:
                            found = message
                            break
                    if found:
                        break
            except (discord.HTTPException, OSError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("Discord: cannot check unconfirmed post of picture %d yet: %s", post["image_id"], e)
                settled = False
                continue
            if found is not None:
                await self.store.post_sent(post["id"], str(found.id))
                log.info("Discord: picture %d had been posted (message %s) before an interruption; recorded",
                         post["image_id"], found.id)
                await self._add_buttons(found)
            else:
                await self.store.post_failed(post["id"], "interrupted before it was sent")
                log.info("Discord: picture %d was not posted before an interruption; it can be posted again",
                         post["image_id"])
        return settled

    # ---- reactions -------------------------------------------------------------------------
    async def on_reaction(self, payload: discord.RawReactionActionEvent, *, added: bool) -> None:
        if payload.user_id not in self.owners:
            return
        emoji = emoji_key(str(payload.emoji))
        value = self.reactions.value_of(str(payload.emoji), payload.emoji.name)
        if value is None:
            return
        post = await self.store.post_by_message(CHANNEL, str(payload.message_id))
        if post is None and added:
            await asyncio.sleep(1.0)  # a reaction faster than the post's own record
            post = await self.store.post_by_message(CHANNEL, str(payload.message_id))
        if post is None:
            return
        ref = f"{payload.message_id}/{emoji}"
        try:
            if added:
                if await self.store.add_label(post["image_id"], value, origin="discord", user=str(payload.user_id),
                                              ref=ref):
                    log.info("label: picture %d rated %d by %s (%s)", post["image_id"], value, payload.user_id,
                             payload.emoji)
            elif await self.store.remove_label(post["image_id"], origin="discord", user=str(payload.user_id),
                                               ref=ref):
                log.info("label: rating %d of picture %d taken back by %s", value, post["image_id"],
                         payload.user_id)
        except Exception as e:  # noqa: BLE001
            log.error("label for picture %d not stored: %s", post["image_id"], e)

    async def catch_up(self) -> int:
        """Record reactions given (or taken back) while the bot was down; returns labels changed."""
        since = (datetime.now(timezone.utc) - timedelta(hours=self.d.catch_up_hours)).isoformat()
        posts = await self.store.recent_posts(CHANNEL, since)
        changed = 0
        for post in posts:
            try:
                channel = await self._channel(int(post["channel_id"]))
                message = await channel.fetch_message(int(post["message_id"]))
                present: dict[tuple[str, str], int] = {}
                for reaction in message.reactions:
                    value = self.reactions.value_of(str(reaction.emoji), getattr(reaction.emoji, "name", None))
                    if value is None or (reaction.count <= 1 and reaction.me):
                        continue
                    async for user in reaction.users():
                        if user.id in self.owners:
                            present[(str(user.id), emoji_key(str(reaction.emoji)))] = value
            except discord.NotFound:
                continue  # the message was deleted
            except (discord.HTTPException, OSError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("Discord: catch-up stopped at message %s: %s", post["message_id"], e)
                break
            prefix = f"{post['message_id']}/"
            stored = await self.store.labels_with_ref_prefix("discord", prefix)
            for label in stored:
                key = (label["user"], label["ref"][len(prefix):])
                if key not in present:
                    changed += await self.store.remove_label(post["image_id"], origin="discord", user=label["user"],
                                                             ref=label["ref"])
            for (user, emoji), value in present.items():
                changed += await self.store.add_label(post["image_id"], value, origin="discord", user=user,
                                                      ref=prefix + emoji)
        if changed:
            log.info("Discord: %d reaction(s) given or taken back while away recorded", changed)
        return changed

    # ---- slash commands --------------------------------------------------------------------
    def add_commands(self, tree: app_commands.CommandTree) -> None:
        bot = self

        @tree.command(name="top", description="Post the current best pictures now")
        @app_commands.describe(n="how many (1-10)")
        async def top(interaction: discord.Interaction, n: app_commands.Range[int, 1, TOP_MAX] = 1):
            await interaction.response.defer(thinking=True, ephemeral=True)
            sent = await bot.post_cycle(n, reason="command")
            await interaction.followup.send(f"Posted {len(sent)} picture(s)." if sent else "Nothing new to post.",
                                            ephemeral=True)

        @tree.command(name="stats", description="Labels, model quality, queues and source health")
        async def stats_(interaction: discord.Interaction):
            data = await bot.store.call(lambda s: stats(s, CHANNEL))
            lines = format_stats(data)
            paused = await bot.store.get_setting(SETTING_PAUSED, False)
            lines.append("posting: " + ("paused" if paused else f"every {bot.d.interval:g}s, "
                                        f"{bot.d.posts_per_cycle} per cycle"))
            await interaction.response.send_message("\n".join(lines), ephemeral=True)

        @tree.command(name="pause", description="Pause scheduled posting")
        async def pause(interaction: discord.Interaction):
            await bot.store.set_setting(SETTING_PAUSED, True)
            log.info("Discord: posting paused by %s", interaction.user.id)
            await interaction.response.send_message("Posting paused. /resume to resume.", ephemeral=True)

        @tree.command(name="resume", description="Resume scheduled posting")
        async def resume(interaction: discord.Interaction):
            await bot.store.set_setting(SETTING_PAUSED, False)
            log.info("Discord: posting resumed by %s", interaction.user.id)
            await interaction.response.send_message("Posting resumed.", ephemeral=True)

        source = app_commands.Group(name="source", description="Add, list or remove sources")

        @source.command(name="list", description="Each source's health, last and next poll")
        async def source_list(interaction: discord.Interaction):
            lines = await bot.store.call(source_lines)
            text = "\n".join(lines) or "no sources"
            await interaction.response.send_message(f"```\n{text[:1900]}\n```", ephemeral=True)

        @source.command(name="add", description="Add a source, e.g. kind=booru options: api=danbooru tags=\"x y\"")
        @app_commands.describe(name="a name for it", kind="folder, rss, booru, ...",
                               options="key=value pairs separated by spaces (quote values with spaces)")
        async def source_add(interaction: discord.Interaction, name: str, kind: str, options: str = ""):
            import shlex
            try:
                pairs = parse_pairs(shlex.split(options))
                src = await bot.store.call(lambda s: add_source(s, bot.cfg, name, kind, pairs))
            except (ManageError, ValueError) as e:
                await interaction.response.send_message(f"Not added: {e}", ephemeral=True)
                return
            await interaction.response.send_message(f"Added source {src.name} ({src.kind}); polled within 15s.",
                                                    ephemeral=True)

        @source.command(name="remove", description="Remove a source added at run time")
        async def source_remove(interaction: discord.Interaction, name: str):
            try:
                await bot.store.call(lambda s: remove_source(s, bot.cfg, name))
            except ManageError as e:
                await interaction.response.send_message(f"Not removed: {e}", ephemeral=True)
                return
            await interaction.response.send_message(f"Removed source {name}; its pictures are kept.", ephemeral=True)

        tree.add_command(source)

        @tree.command(name="why", description="The faces of a picture and the score of each")
        @app_commands.describe(picture="a message link, a message id, or a picture id like #12")
        async def why(interaction: discord.Interaction, picture: str):
            image_id = await bot.resolve_picture(picture)
            if image_id is None:
                await interaction.response.send_message(f"No picture found for {picture!r}.", ephemeral=True)
                return
            await interaction.response.defer(thinking=True, ephemeral=True)
            text, sheet = await bot.explain(image_id)
            files = [discord.File(io.BytesIO(sheet), f"faces-{image_id}.png")] if sheet else []
            await interaction.followup.send(text, files=files, ephemeral=True)

        @tree.command(name="train", description="Start a training run on all labels now")
        async def train(interaction: discord.Interaction):
            if bot.request_retrain is None:
                await interaction.response.send_message("Training is not available here.", ephemeral=True)
                return
            started = await bot.request_retrain(f"/train by {interaction.user.id}")
            await interaction.response.send_message(
                "Training started; the new model is used if it beats the current one." if started else
                "A training run is already in progress.", ephemeral=True)

    async def resolve_picture(self, text: str) -> int | None:
        text = text.strip()
        m = LINK.search(text)
        if m:
            post = await self.store.post_by_message(CHANNEL, m.group(3))
            return post["image_id"] if post else None
        digits = text.lstrip("#")
        if not digits.isdigit():
            return None
        if not text.startswith("#"):
            post = await self.store.post_by_message(CHANNEL, digits)
            if post:
                return post["image_id"]
        return int(digits) if await self.store.get_image(int(digits)) else None

    async def explain(self, image_id: int) -> tuple[str, bytes | None]:
        data = await self.store.call(picture_data, image_id)
        image, faces, current = data["image"], data["faces"], data["current"]
        score = "n/a" if image.get("score") is None else f"{image['score']:.2f}"
        lines = [f"Picture #{image_id}: score {score} by model {image.get('model_version')} "
                 f"({self.cfg.scorer.aggregate} of {len(faces)} face(s))"]
        ordered = sorted(faces, key=lambda f: -(f["score"] if f["score"] is not None else -1))
        for i, f in enumerate(ordered, 1):
            kind = "whole picture" if f["detector"] in ("whole", "crop") else f"{f['detector']} face"
            s = "n/a" if f["score"] is None else f"{f['score']:.2f}"
            lines.append(f"face {i}: {kind} at ({f['x1']}, {f['y1']})-({f['x2']}, {f['y2']}), score {s}")
        if current is not None:
            lines.append(f"your rating: {current}")
        if image.get("page_url"):
            lines.append(image["page_url"])
        sheet = None
        if faces and image.get("media_path"):
            try:
                sheet = await asyncio.to_thread(face_sheet, self.cfg.media_path, image["media_path"], ordered,
                                                margin=self.cfg.detector.margin,
                                                max_pixels=self.cfg.download.max_pixels)
            except Exception as e:  # noqa: BLE001
                lines.append(f"(face crops unavailable: {e})")
        return "\n".join(lines), sheet
