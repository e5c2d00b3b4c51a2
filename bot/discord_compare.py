"""Comparisons in Discord: one message with two pictures, A and B, answered with 🅰️ or 🅱️.

With ``discord.compare_every = N`` (0: off), once N pictures have been posted since the last
comparison, the posting cycle ends with one comparison post (``/compare`` posts one at once). The
pair is the one the model is least sure how to order (``Store.compare_pair``) among the pictures
this channel may show (no NSFW, no blocked tag or character: ``bot.posting``). The message has an
embed per picture, each with its picture attached, and the bot's 🅰️ and 🅱️ reactions as buttons;
which pair a message asks about is stored (``compare_posts``), so a reaction after a restart
still counts.

An owner's 🅰️ (🅱️) records A (B) preferred to the other (origin ``discord``, user = the owner's
id, ref = ``MESSAGE_ID/EMOJI``); anyone else's reaction is ignored, and removing the reaction takes
the comparison back. Both reactions record both answers, which cancel out. On start, reactions
given or taken back while the bot was down (posts of the last ``catch_up_hours``) are caught up.
"""
from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import aiohttp
import discord

from bot.config import Config
from bot.discord_posts import CHANNEL, get_channel, score_colour
from bot.manage import web_link
from bot.posting import block_reason, emoji_key, fit_upload, route
from scorer.ranking import is_trained

log = logging.getLogger("tastefeed.discord")

A = "\U0001f170\ufe0f"        # 🅰️
B = "\U0001f171\ufe0f"        # 🅱️
SIDES = {emoji_key(A): 0, emoji_key(B): 1}
ORIGIN = "discord"            # comparisons.origin


def compare_embed(image: dict, side: str, *, source: str, filename: str, trained: bool = True) -> discord.Embed:
    """The embed of one side (``A`` or ``B``) of a comparison post; an untrained model's score is
    not shown (``trained`` false: "not yet trained")."""
    emoji = A if side == "A" else B
    score = image.get("score") if trained else None
    title = f"{emoji} {image.get('title') or 'Picture'}"
    link = web_link(image.get("page_url"))
    embed = discord.Embed(title=title[:256], url=link, colour=score_colour(score))
    embed.add_field(name="Score", value="not yet trained" if not trained else "n/a" if score is None else
                    f"{score:.2f} / 5" + (f" (± {image['uncertainty']:.2f})" if image.get("uncertainty") else ""))
    embed.add_field(name="Source", value=source or "?")
    if image.get("author"):
        embed.add_field(name="Author", value=str(image["author"])[:1024])
    embed.set_image(url=f"attachment://{filename}")
    embed.set_footer(text=f"tastefeed · compare {side}: #{image['id']}")
    return embed


class ComparePosts:
    """Comparison posts and the owners' answers to them; ``client()`` is the current client,
    ``ready`` is set while it is connected."""

    def __init__(self, cfg: Config, store, owners: set[int], client: Callable[[], discord.Client | None],
                 ready: asyncio.Event):
        self.cfg = cfg
        self.d = cfg.discord
        self.store = store            # storage.writer.AsyncStore
        self.owners = owners
        self._client = client
        self.ready = ready
        self._lock = asyncio.Lock()

    # ---- posting -------------------------------------------------------------------------------
    def _pair(self, store) -> tuple[dict, dict] | None:
        """``compare_pair`` on the writer thread's store, among pictures this channel may show."""
        block = self.cfg.characters.block

        def accept(row: dict) -> bool:
            return (route(row, self.d.channel_id, self.d.nsfw_channel_id, self.d.blocklist) == self.d.channel_id
                    and block_reason(store, row, block) is None)

        return store.compare_pair(CHANNEL, accept=accept)

    async def after_posts(self) -> int | None:
        """Post a comparison when ``compare_every`` pictures were posted since the last one."""
        if self.d.compare_every <= 0:
            return None
        if await self.store.posts_since_compare_post(CHANNEL) < self.d.compare_every:
            return None
        return await self.post()

    async def post(self, reason: str = "schedule") -> int | None:
        """Post the pair to compare now; its message id, or None (not connected, no pair, or the
        send failed: logged)."""
        async with self._lock:
            if not self.ready.is_set() or self._client() is None:
                return None
            pair = await self.store.call(self._pair)
            if pair is None:
                log.info("Discord: no pair of pictures to compare")
                return None
            try:
                channel = await get_channel(self._client(), self.d.channel_id)
            except (discord.HTTPException, discord.InvalidData) as e:
                log.error("Discord: cannot reach channel %s: %s", self.d.channel_id, e)
                return None
            guild_limit = getattr(getattr(channel, "guild", None), "filesize_limit", self.d.max_upload_bytes)
            limit = min(self.d.max_upload_bytes, guild_limit) // 2       # two pictures in one message
            embeds, files = [], []
            trained = await self.store.call(is_trained)
            for side, image in zip("AB", pair):
                try:
                    upload = await asyncio.to_thread(fit_upload, self.cfg.media_path, image["media_path"], limit,
                                                     max_pixels=self.cfg.download.max_pixels,
                                                     name=f"tastefeed-{side.lower()}-{image['id']}")
                except Exception as e:  # noqa: BLE001 - an unreadable file: no comparison this time
                    log.warning("Discord: picture %d cannot be prepared for a comparison: %s", image["id"], e)
                    return None
                source = await self.store.source_name(image["source_id"]) if image.get("source_id") else None
                embeds.append(compare_embed(image, side, source=source or "?", filename=upload.filename,
                                            trained=trained))
                files.append(discord.File(io.BytesIO(upload.data), upload.filename))
            a, b = pair[0]["id"], pair[1]["id"]
            try:
                message = await channel.send(f"Which do you prefer? React {A} or {B}.", embeds=embeds, files=files)
            except (discord.HTTPException, OSError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("Discord: comparison of pictures %d and %d not posted: %s", a, b, e)
                return None
            await self.store.add_compare_post(a, b, CHANNEL, str(self.d.channel_id), str(message.id))
            log.info("Discord: posted pictures %d (A) and %d (B) to compare as message %s (%s)", a, b, message.id,
                     reason)
            for emoji in (A, B):
                try:
                    await message.add_reaction(emoji)
                except discord.HTTPException as e:
                    log.warning("Discord: cannot add reaction %s to message %s: %s", emoji, message.id, e)
                    break
            return message.id

    # ---- answers -------------------------------------------------------------------------------
    @staticmethod
    def _record(store, post: dict, side: int, user: str, ref: str) -> tuple[int, int] | None:
        """Store one answer once (the same reaction again adds nothing); (winner, loser) if new."""
        if store.comparison_by_ref(ORIGIN, ref, user) is not None:
            return None
        winner, loser = (post["a_id"], post["b_id"]) if side == 0 else (post["b_id"], post["a_id"])
        store.add_comparison(winner, loser, origin=ORIGIN, user=user, ref=ref)
        return winner, loser

    @staticmethod
    def _take_back(store, ref: str, user: str) -> dict | None:
        row = store.comparison_by_ref(ORIGIN, ref, user)
        if row is not None:
            store.remove_comparison(row["id"])
        return row

    async def on_reaction(self, payload: discord.RawReactionActionEvent, *, added: bool) -> None:
        if payload.user_id not in self.owners:
            return
        emoji = emoji_key(str(payload.emoji))
        side = SIDES.get(emoji)
        if side is None:
            return
        post = await self.store.compare_post_by_message(CHANNEL, str(payload.message_id))
        if post is None and added:
            await asyncio.sleep(1.0)  # a reaction faster than the post's own record
            post = await self.store.compare_post_by_message(CHANNEL, str(payload.message_id))
        if post is None:
            return
        ref, user = f"{payload.message_id}/{emoji}", str(payload.user_id)
        try:
            if added:
                done = await self.store.call(self._record, post, side, user, ref)
                if done:
                    log.info("comparison: picture %d preferred to picture %d by %s", *done, user)
            elif (row := await self.store.call(self._take_back, ref, user)) is not None:
                log.info("comparison: picture %d over picture %d taken back by %s", row["winner_id"],
                         row["loser_id"], user)
        except Exception as e:  # noqa: BLE001
            log.error("comparison of message %s not stored: %s", payload.message_id, e)

    async def catch_up(self) -> int:
        """Record answers given (or taken back) while the bot was down; returns how many changed."""
        since = (datetime.now(timezone.utc) - timedelta(hours=self.d.catch_up_hours)).isoformat()
        changed = 0
        for post in await self.store.recent_compare_posts(CHANNEL, since):
            try:
                channel = await get_channel(self._client(), int(post["channel_id"]))
                message = await channel.fetch_message(int(post["message_id"]))
                present: set[tuple[str, str]] = set()
                for reaction in message.reactions:
                    emoji = emoji_key(str(reaction.emoji))
                    if emoji not in SIDES or (reaction.count <= 1 and reaction.me):
                        continue
                    async for member in reaction.users():
                        if member.id in self.owners:
                            present.add((str(member.id), emoji))
            except discord.NotFound:
                continue  # the message was deleted
            except (discord.HTTPException, OSError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("Discord: comparison catch-up stopped at message %s: %s", post["message_id"], e)
                break
            prefix = f"{post['message_id']}/"
            for owner in self.owners:
                for emoji, side in SIDES.items():
                    user, ref = str(owner), prefix + emoji
                    if (user, emoji) in present:
                        changed += await self.store.call(self._record, post, side, user, ref) is not None
                    else:
                        changed += await self.store.call(self._take_back, ref, user) is not None
        if changed:
            log.info("Discord: %d comparison(s) given or taken back while away recorded", changed)
        return changed
