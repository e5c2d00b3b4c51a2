"""Discord's slash commands, answered only for the owners: the command side of the bot.

The bot's commands live here, apart from the connection (``bot.discord_bot``), as discord.py's
examples keep commands in an extension: :class:`OwnerTree` refuses anyone but an owner (an
ephemeral "Sorry"), :class:`OwnerCommands` adds ``/top``, ``/stats``, ``/pause``, ``/resume``,
``/source list|add|remove``, ``/why``, ``/name``, ``/compare`` and ``/train`` to a tree, and :func:`sync_commands`
registers them with Discord only when they changed. Every answer is ephemeral.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable

import discord
from discord import app_commands

from bot.config import Config
from bot.discord_posts import CHANNEL, SETTING_PAUSED
from bot.manage import (ManageError, add_source, format_stats, name_picture_face, parse_pairs, picture_data,
                        remove_source, source_lines, stats)
from bot.posting import describe_character, face_sheet, numbered_faces
from storage.characters import CharacterNameError

log = logging.getLogger("tastefeed.discord")

LINK = re.compile(r"discord(?:app)?\.com/channels/(\d+|@me)/(\d+)/(\d+)")
SETTING_COMMANDS = "discord.commands_hash"
TOP_MAX = 10


MESSAGE_LIMIT = 2000   # characters in one Discord message


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


async def sync_commands(tree: app_commands.CommandTree, store, guild_id: int | None) -> None:
    """Sync the command tree only when the commands (or their guild) changed: Discord rate-limits it."""
    guild = discord.Object(id=guild_id) if guild_id else None
    if guild is not None:
        tree.copy_global_to(guild=guild)
    payload = [c.to_dict(tree) for c in tree.get_commands(guild=guild)]
    digest = hashlib.sha256(json.dumps([guild_id, tree.client.application_id, payload],
                                       sort_keys=True).encode()).hexdigest()
    if await store.get_setting(SETTING_COMMANDS) == digest:
        return
    try:
        await tree.sync(guild=guild)
    except discord.HTTPException as e:
        log.warning("Discord: cannot register the slash commands (%s); they are retried next start", e)
        return
    await store.set_setting(SETTING_COMMANDS, digest)
    log.info("Discord: slash commands registered %s", f"in server {guild_id}" if guild else
             "globally (they can take up to an hour to appear; set discord.guild_id for instant)")


class OwnerCommands:
    """The slash commands. ``post_cycle(n, reason=...)`` posts now (``bot.discord_posts``);
    ``request_retrain(reason)`` starts a training run (None: /train says it is not available);
    ``names_changed()`` makes recognition use a face named by /name at once (the daemon's
    ``bot.recognition.Recognition.names_changed``; None: recognition picks it up on its own);
    ``post_comparison(reason)`` posts two pictures to compare now (``bot.discord_compare``; None:
    /compare says it is not available); ``live`` is the daemon's ``stats`` (/stats shows its
    event-loop lag)."""

    def __init__(self, cfg: Config, store, post_cycle: Callable[..., Awaitable[list[int]]],
                 request_retrain: Callable[[str], Awaitable[bool]] | None = None,
                 names_changed: Callable[[], Awaitable[object]] | None = None,
                 post_comparison: Callable[[str], Awaitable[int | None]] | None = None,
                 live: dict | None = None):
        self.cfg = cfg
        self.d = cfg.discord
        self.store = store            # storage.writer.AsyncStore
        self.post_cycle = post_cycle
        self.request_retrain = request_retrain
        self.names_changed = names_changed
        self.post_comparison = post_comparison
        self.live = live

    def register(self, tree: app_commands.CommandTree) -> None:
        """Add the commands to ``tree``."""
        @tree.command(name="top", description="Post the current best pictures now")
        @app_commands.describe(n="how many (1-10)")
        async def top(interaction: discord.Interaction, n: app_commands.Range[int, 1, TOP_MAX] = 1):
            await interaction.response.defer(thinking=True, ephemeral=True)
            sent = await self.post_cycle(n, reason="command")
            await interaction.followup.send(f"Posted {len(sent)} picture(s)." if sent else "Nothing new to post.",
                                            ephemeral=True)

        @tree.command(name="stats", description="Labels, model quality, queues and source health")
        async def stats_(interaction: discord.Interaction):
            data = await self.store.call(lambda s: stats(s, CHANNEL, self.live))
            lines = format_stats(data)
            paused = await self.store.get_setting(SETTING_PAUSED, False)
            lines.append("posting: " + ("paused" if paused else f"every {self.d.interval:g}s, "
                                        f"{self.d.posts_per_cycle} per cycle"))
            await interaction.response.send_message("\n".join(lines), ephemeral=True)

        @tree.command(name="pause", description="Pause scheduled posting")
        async def pause(interaction: discord.Interaction):
            await self.store.set_setting(SETTING_PAUSED, True)
            log.info("Discord: posting paused by %s", interaction.user.id)
            await interaction.response.send_message("Posting paused. /resume to resume.", ephemeral=True)

        @tree.command(name="resume", description="Resume scheduled posting")
        async def resume(interaction: discord.Interaction):
            await self.store.set_setting(SETTING_PAUSED, False)
            log.info("Discord: posting resumed by %s", interaction.user.id)
            await interaction.response.send_message("Posting resumed.", ephemeral=True)

        source = app_commands.Group(name="source", description="Add, list or remove sources")

        @source.command(name="list", description="Each source's health, last and next poll")
        async def source_list(interaction: discord.Interaction):
            lines = await self.store.call(source_lines)
            text = "\n".join(lines) or "no sources"
            await interaction.response.send_message(f"```\n{text[:1900]}\n```", ephemeral=True)

        @source.command(name="add", description="Add a source, e.g. kind=booru options: api=danbooru tags=\"x y\"")
        @app_commands.describe(name="a name for it", kind="folder, rss, booru, ...",
                               options="key=value pairs separated by spaces (quote values with spaces)")
        async def source_add(interaction: discord.Interaction, name: str, kind: str, options: str = ""):
            import shlex
            try:
                pairs = parse_pairs(shlex.split(options))
                src = await self.store.call(lambda s: add_source(s, self.cfg, name, kind, pairs))
            except (ManageError, ValueError) as e:
                await interaction.response.send_message(f"Not added: {e}", ephemeral=True)
                return
            await interaction.response.send_message(f"Added source {src.name} ({src.kind}); polled within 15s.",
                                                    ephemeral=True)

        @source.command(name="remove", description="Remove a source added at run time")
        async def source_remove(interaction: discord.Interaction, name: str):
            try:
                await self.store.call(lambda s: remove_source(s, self.cfg, name))
            except ManageError as e:
                await interaction.response.send_message(f"Not removed: {e}", ephemeral=True)
                return
            await interaction.response.send_message(f"Removed source {name}; its pictures are kept.", ephemeral=True)

        tree.add_command(source)

        @tree.command(name="why", description="The faces of a picture and the score of each")
        @app_commands.describe(picture="a message link, a message id, or a picture id like #12")
        async def why(interaction: discord.Interaction, picture: str):
            image_id = await self.resolve_picture(picture)
            if image_id is None:
                await interaction.response.send_message(f"No picture found for {picture!r}.", ephemeral=True)
                return
            await interaction.response.defer(thinking=True, ephemeral=True)
            text, sheet = await self.explain(image_id)
            files = [discord.File(io.BytesIO(sheet), f"faces-{image_id}.png")] if sheet else []
            await interaction.followup.send(text, files=files, ephemeral=True)

        @tree.command(name="name", description="Name the character of a face in a picture")
        @app_commands.describe(picture="a message link, a message id, or a picture id like #12",
                               character="the character's name (new or known)",
                               face="which face, numbered as /why numbers them (needed when there are several)")
        async def name_(interaction: discord.Interaction, picture: str, character: str,
                        face: app_commands.Range[int, 1, 1000] | None = None):
            image_id = await self.resolve_picture(picture)
            if image_id is None:
                await interaction.response.send_message(f"No picture found for {picture!r}.", ephemeral=True)
                return
            await interaction.response.defer(thinking=True, ephemeral=True)   # the store may be busy: answer first
            try:
                row, created = await self.store.call(name_picture_face, image_id, character, face, origin="discord")
            except (ManageError, CharacterNameError) as e:
                await interaction.followup.send(f"Not named: {e}", ephemeral=True)
                return
            name = (await self.store.face_name(row["id"]))["name"]
            log.info("Discord: face %d of picture %d named %r by %s", row["id"], image_id, name, interaction.user.id)
            note = ""
            if self.names_changed is not None:
                try:
                    await self.names_changed()   # embedded with the active embedder: recognised from now on
                except Exception as e:  # noqa: BLE001 - the name is stored; recognition catches up later
                    note = f" (recognition will use it later: {e})"
            await interaction.followup.send(
                f"Named the face of picture #{image_id} at ({row['x1']}, {row['y1']})-({row['x2']}, {row['y2']}) "
                f"as {name}" + (" (a new character)" if created else "") + "." + note, ephemeral=True)

        @tree.command(name="compare", description="Post two pictures to compare now (react 🅰️ or 🅱️)")
        async def compare(interaction: discord.Interaction):
            if self.post_comparison is None:
                await interaction.response.send_message("Comparisons are not available here.", ephemeral=True)
                return
            await interaction.response.defer(thinking=True, ephemeral=True)
            sent = await self.post_comparison("command")
            await interaction.followup.send("Posted two pictures: react 🅰️ or 🅱️ for the one you prefer."
                                            if sent else "No pair of pictures to compare.", ephemeral=True)

        @tree.command(name="train", description="Start a training run on all labels now")
        async def train(interaction: discord.Interaction):
            if self.request_retrain is None:
                await interaction.response.send_message("Training is not available here.", ephemeral=True)
                return
            started = await self.request_retrain(f"/train by {interaction.user.id}")
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
        image, faces, current, who = data["image"], data["faces"], data["current"], data["characters"]
        score = "n/a" if image.get("score") is None else f"{image['score']:.2f}"
        lines = [f"Picture #{image_id}: score {score} by model {image.get('model_version')} "
                 f"({self.cfg.scorer.aggregate} of {len(faces)} face(s))"]
        ordered = numbered_faces(faces)
        for i, f in enumerate(ordered, 1):
            kind = "whole picture" if f["detector"] in ("whole", "crop") else f"{f['detector']} face"
            s = "n/a" if f["score"] is None else f"{f['score']:.2f}"
            character = f", {describe_character(who[f['id']])}" if f["id"] in who else ""
            lines.append(f"face {i}: {kind} at ({f['x1']}, {f['y1']})-({f['x2']}, {f['y2']}), score {s}{character}")
        tail = ([f"your rating: {current}"] if current is not None else []) + (
            [image["page_url"]] if image.get("page_url") else [])
        while len(lines) > 1 and len("\n".join(lines + tail)) > MESSAGE_LIMIT - 40:
            lines.pop()           # many faces with long names: the message stays within Discord's limit
        if len(lines) - 1 < len(ordered):
            lines.append(f"... and {len(ordered) - len(lines) + 1} more face(s)")
        lines += tail
        sheet = None
        if faces and image.get("media_path") and image.get("media_pruned_at"):
            lines.append("(face crops unavailable: the media was pruned; fetch it again in the gallery)")
        elif faces and image.get("media_path"):
            try:
                sheet = await asyncio.to_thread(face_sheet, self.cfg.media_path, image["media_path"], ordered,
                                                margin=self.cfg.detector.margin,
                                                max_pixels=self.cfg.download.max_pixels)
            except Exception as e:  # noqa: BLE001
                lines.append(f"(face crops unavailable: {e})")
        return "\n".join(lines), sheet
