"""Ratings from Discord reactions: each rating reaction of an owner on a post is one label.

Reactions are read from raw gateway events, so messages not in the cache count too. Each rating
reaction of an owner is one label (origin ``discord``, user = the owner's id, ref =
``MESSAGE_ID/EMOJI``); the newest label of a picture counts, and removing a reaction takes its
label back. On start, reactions given while the bot was down (posts of the last
``catch_up_hours``) are read and recorded without duplicates.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import aiohttp
import discord

from bot.config import DiscordConfig
from bot.discord_posts import CHANNEL, get_channel
from bot.posting import Reactions, emoji_key
from storage.records import ORIGIN_DISCORD

log = logging.getLogger("tastefeed.discord")


class ReactionLabels:
    """Owners' reactions to labels, live and caught up; ``client()`` is the current client."""

    def __init__(self, d: DiscordConfig, store, owners: set[int], reactions: Reactions,
                 client: Callable[[], discord.Client | None]):
        self.d = d
        self.store = store            # storage.writer.AsyncStore
        self.owners = owners
        self.reactions = reactions
        self._client = client

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
                if await self.store.add_label(post["image_id"], value, origin=ORIGIN_DISCORD, user=str(payload.user_id),
                                              ref=ref):
                    log.info("label: picture %d rated %d by %s (%s)", post["image_id"], value, payload.user_id,
                             payload.emoji)
            elif await self.store.remove_label(post["image_id"], origin=ORIGIN_DISCORD, user=str(payload.user_id),
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
                channel = await get_channel(self._client(), int(post["channel_id"]))
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
            stored = await self.store.labels_with_ref_prefix(ORIGIN_DISCORD, prefix)
            for label in stored:
                key = (label["user"], label["ref"][len(prefix):])
                if key not in present:
                    changed += await self.store.remove_label(post["image_id"], origin=ORIGIN_DISCORD, user=label["user"],
                                                             ref=label["ref"])
            for (user, emoji), value in present.items():
                changed += await self.store.add_label(post["image_id"], value, origin=ORIGIN_DISCORD, user=user,
                                                      ref=prefix + emoji)
        if changed:
            log.info("Discord: %d reaction(s) given or taken back while away recorded", changed)
        return changed
