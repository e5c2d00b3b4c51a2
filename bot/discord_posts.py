"""Posting to Discord: the posting cycle, one post, and settling posts left unconfirmed.

A cycle asks the ranking (``scorer.ranking.pick``, followed characters boosted) for the best
unposted pictures this channel accepts (``bot.posting.route``: NSFW only to the NSFW channel,
blocked tags nowhere; ``block_reason``: blocked characters nowhere, by recognition or the
source's character tags, and a picture with a face not identified yet waits; checked again just
before sending) and posts each as an embed with the picture attached (shrunk below the upload
limit), the characters in it, and the rating reactions added as buttons.

Posting never posts a picture twice: a ``posts`` row with status ``intent`` is written before
the message is sent, and the message id after. An intent left by a crash or an unanswered send is
reconciled before the next cycle: the channel's recent messages are searched for the picture's
footer (``picture #ID``); found, the post is recorded as sent, otherwise it is marked failed (the
picture becomes a candidate again).
"""
from __future__ import annotations

import asyncio
import io
import logging
import random
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone

import aiohttp
import discord

from bot.config import Config
from bot.manage import web_link
from bot.posting import Reactions, block_reason, character_summary, emoji_key, fit_upload, route
from scorer.ranking import Pick, pick

log = logging.getLogger("tastefeed.discord")

CHANNEL = "discord"
FOOTER = re.compile(r"picture #(\d+)")
SETTING_PAUSED = "discord.paused"
SETTING_LAST_CYCLE = "discord.last_cycle"


async def get_channel(client: discord.Client, channel_id: int):
    """A channel from the client's cache, else fetched."""
    channel = client.get_channel(channel_id)
    if channel is None:
        channel = await client.fetch_channel(channel_id)
    return channel


def score_colour(score: float | None) -> discord.Colour:
    if score is None:
        return discord.Colour.light_grey()
    t = max(0.0, min(1.0, (score - 1) / 4))
    return discord.Colour.from_rgb(int(220 * (1 - t)), int(60 + 140 * t), 90)


def build_embed(image: dict, *, faces: int, source: str, exploration: bool, reason: str,
                filename: str, characters: str = "", cold: bool = False) -> discord.Embed:
    """The post's embed; ``cold`` (picked while the model is untrained or has too few ratings):
    the score field shows the popularity that ranked it, not the untrained model's number."""
    score = None if cold else image.get("score")
    title = image.get("title") or f"Picture #{image['id']}"
    desc = None
    if exploration:
        desc = ("🔍 **Exploration**: a random pick; ratings across the whole range teach the model the most."
                if cold else "🔍 **Exploration**: the model is unsure about this one; your rating teaches it the most.")
    link = web_link(image.get("page_url"))
    embed = discord.Embed(title=title[:256], url=link, description=desc, colour=score_colour(score))
    if cold:
        popularity = image.get("popularity")
        embed.add_field(name="Score", value="not yet trained" + ("" if popularity is None else
                                                                 f" (popularity {popularity:g})"))
    else:
        embed.add_field(name="Score", value="n/a" if score is None else f"{score:.2f} / 5"
                        + (f" (± {image['uncertainty']:.2f})" if image.get("uncertainty") else ""))
    embed.add_field(name="Faces", value=str(faces))
    if characters:
        embed.add_field(name="Characters", value=characters[:1024])
    embed.add_field(name="Source", value=source or "?")
    if image.get("author"):
        embed.add_field(name="Author", value=str(image["author"])[:1024])
    if link:
        embed.add_field(name="Original", value=f"[open]({link})")
    embed.set_image(url=f"attachment://{filename}")
    embed.set_footer(text=f"tastefeed · picture #{image['id']} · {reason} · model {image.get('model_version')}")
    return embed


class Poster:
    """Posting cycles and posts; ``client()`` is the current discord.py client, ``ready`` is set
    while it is connected; ``after_posts()`` runs at the end of each cycle (``bot.discord_compare``:
    the comparison post, when due)."""

    def __init__(self, cfg: Config, store, reactions: Reactions, client: Callable[[], discord.Client | None],
                 ready: asyncio.Event, after_posts: Callable[[], Awaitable[object]] | None = None):
        self.cfg = cfg
        self.after_posts = after_posts  # run after each cycle's posts (the comparison post when due)
        self.d = cfg.discord
        self.store = store            # storage.writer.AsyncStore
        self.reactions = reactions
        self._client = client
        self.ready = ready
        self._cycle_lock = asyncio.Lock()
        self.rng = random.Random()

    def _accept(self, row: dict) -> bool:
        return route(row, self.d.channel_id, self.d.nsfw_channel_id, self.d.blocklist) is not None

    def _pick(self, store, n: int) -> list[Pick]:
        """``pick`` on the writer thread's store: this channel's routes, no blocked character,
        followed characters boosted."""
        chars = self.cfg.characters

        def accept(row: dict) -> bool:
            return self._accept(row) and block_reason(store, row, chars.block) is None

        return pick(store, self.cfg.ranking, self.cfg.train.min_labels, n, channel=CHANNEL, rng=self.rng,
                    accept=accept, near_distance=self.d.near_duplicate_distance, follow=chars.follow,
                    follow_boost=chars.follow_boost)

    async def post_cycle(self, n: int | None = None, *, reason: str = "schedule") -> list[int]:
        """Post up to ``n`` (default ``posts_per_cycle``) pictures; returns the message ids sent."""
        async with self._cycle_lock:
            if not self.ready.is_set() or self._client() is None:
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
            picks: list[Pick] = await self.store.call(self._pick, n)
            sent = []
            for p in picks:
                if p.reason == "score" and (p.image.get("score") or 0) < self.d.min_score:
                    continue  # candidates come best first: the rest are lower still
                message_id = await self.post(p, reason=reason)
                if message_id is not None:
                    sent.append(message_id)
            if not picks:
                log.info("Discord: nothing new to post")
            if self.after_posts is not None:
                await self.after_posts()
            return sent

    async def _channel(self, channel_id: int):
        return await get_channel(self._client(), channel_id)

    async def post(self, p: Pick, *, reason: str = "schedule") -> int | None:
        image = p.image
        channel_id = route(image, self.d.channel_id, self.d.nsfw_channel_id, self.d.blocklist)
        if channel_id is None:
            return None
        blocked = await self.store.call(block_reason, image, self.cfg.characters.block)
        if blocked:
            log.info("Discord: picture %d not posted: %s", image["id"], blocked)
            return None
        faces = await self.store.faces_of(image["id"])
        who = list((await self.store.face_characters([f["id"] for f in faces])).values())
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
        source = await self.store.source_name(image["source_id"]) if image.get("source_id") else None
        embed = build_embed(image, faces=len(faces), source=source or "?", exploration=p.exploration,
                            reason=p.reason, filename=upload.filename, characters=character_summary(who),
                            cold=p.cold)
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
                    if message.author.id != self._client().user.id:
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
