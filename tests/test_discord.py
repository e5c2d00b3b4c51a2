"""The Discord bot, for real: discord.py's own client inside the daemon, against tests/fake_discord.py
(REST through ``discord.http.Route.BASE``, the gateway through ``DiscordWebSocket.DEFAULT_GATEWAY``),
with a real SQLite file. Nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import io
import logging
import re

import discord
import pytest
import yarl
from PIL import Image

from bot.daemon import Daemon
from bot.discord_bot import DiscordBot
from bot.posting import Reactions, fit_upload, route
from storage import Store
from storage.media import inspect, store_media
from tests.fake_discord import FakeDiscord
from tests.helpers import make_config, picture, seed, wait_for

FIVE = "5\ufe0f\u20e3"
FOUR = "4\ufe0f\u20e3"
THREE = "3\ufe0f\u20e3"
HEART = "\u2764\ufe0f"
BUTTONS = [f"{i}\ufe0f\u20e3" for i in range(1, 6)]


@pytest.fixture
async def fake(serve, monkeypatch):
    fake = FakeDiscord()
    fake.base = await serve(fake.app())
    monkeypatch.setattr(discord.http.Route, "BASE", fake.base + "/api/v10")
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        yarl.URL(fake.base.replace("http", "ws", 1) + "/gateway"))
    return fake


def discord_config(tmp_path, fake: FakeDiscord, **kw):
    opts = {"posts_per_cycle": 2, "interval": 3600, "nsfw_channel_id": 0, "blocklist": [],
            "cold_exploration": 0.0, "catch_up_hours": 72}
    opts.update(kw)
    blocklist = ", ".join(f'"{t}"' for t in opts["blocklist"])
    extra = f'''
[discord]
token = "{fake.token}"
channel_id = {fake.channel_id}
nsfw_channel_id = {opts["nsfw_channel_id"]}
owner_ids = [{fake.owner_id}]
interval = {opts["interval"]}
posts_per_cycle = {opts["posts_per_cycle"]}
blocklist = [{blocklist}]
catch_up_hours = {opts["catch_up_hours"]}
min_score = {opts.get("min_score", 0.0)}
compare_every = {opts.get("compare_every", 0)}
[ranking]
cold_exploration = {opts["cold_exploration"]}
exploration = 0.0
[train]
min_labels = 0
''' + opts.get("extra", "")
    return make_config(tmp_path, extra)


def footer_id(message: dict) -> int:
    return int(re.search(r"picture #(\d+)", message["embeds"][0]["footer"]["text"]).group(1))


async def started(cfg) -> Daemon:
    daemon = Daemon(cfg)
    await daemon.start()
    return daemon


def open_store(cfg) -> Store:
    return Store.open(cfg.db_path)


async def messages(fake, channel_id, n):
    async def enough():
        return len(fake.messages_in(channel_id)) >= n and fake.messages_in(channel_id)
    return await wait_for(enough, timeout=20)


# ---- posting ---------------------------------------------------------------------------------
async def test_scheduled_cycles_post_the_best_pictures_with_attachment_embed_and_reactions(tmp_path, fake):
    cfg = discord_config(tmp_path, fake, interval=1.5)
    ids = seed(cfg, [{"popularity": p} for p in (10, 50, 30, 40, 20)])
    daemon = await started(cfg)
    try:
        first = await messages(fake, fake.channel_id, 2)
        assert [footer_id(m) for m in first[:2]] == [ids[1], ids[3]]  # most popular first (cold start)
        msg = first[0]
        upload = fake.uploads[int(msg["id"])][0]
        assert Image.open(io.BytesIO(upload.data)).size == (200, 160)
        embed = msg["embeds"][0]
        assert embed["image"]["url"] == f"attachment://{upload.filename}"
        assert embed["url"] == "https://booru.example/posts/1"
        fields = {f["name"]: f["value"] for f in embed["fields"]}
        assert fields["Faces"] == "1" and fields["Source"] == "booru-test" and fields["Author"] == "artist1"
        assert fields["Score"] == "not yet trained (popularity 50)"   # cold: what ranked it, not 3.00
        await wait_for(lambda: _async(all(fake.reactions.get(int(m["id"]), {}).get(e) == [fake.bot_id]
                                          for m in first[:2] for e in BUTTONS)))
        # The next scheduled cycle posts the next two, and nothing twice.
        later = await messages(fake, fake.channel_id, 4)
        assert [footer_id(m) for m in later[2:4]] == [ids[2], ids[4]]
        store = open_store(cfg)
        posts = store.execute("SELECT * FROM posts ORDER BY id")
        assert [(p["image_id"], p["status"], p["message_id"]) for p in posts] == \
            [(footer_id(m), "sent", m["id"]) for m in later[:4]]
        assert not any(p["exploration"] for p in posts)
        assert not fake.unknown
    finally:
        await daemon.stop()


async def _async(value):
    return value


async def test_nsfw_goes_only_to_the_nsfw_channel_blocked_tags_nowhere_exploration_is_marked(tmp_path, fake):
    cfg = discord_config(tmp_path, fake, nsfw_channel_id=fake.nsfw_channel_id, blocklist=["Gore"],
                         posts_per_cycle=5, cold_exploration=1.0)
    ids = seed(cfg, [{"popularity": 10}, {"popularity": 50, "rating": "explicit"},
                     {"popularity": 40, "rating": "questionable"}, {"popularity": 45, "tags": ["gore", "x"]},
                     {"popularity": 5}])
    daemon = await started(cfg)
    try:
        nsfw = await messages(fake, fake.nsfw_channel_id, 2)
        safe = await messages(fake, fake.channel_id, 2)
        await asyncio.sleep(1)
        assert sorted(footer_id(m) for m in nsfw) == [ids[1], ids[2]]
        assert sorted(footer_id(m) for m in fake.messages_in(fake.channel_id)) == [ids[0], ids[4]]
        assert "Exploration" in safe[0]["embeds"][0]["description"]
        store = open_store(cfg)
        assert {p["image_id"] for p in store.execute("SELECT * FROM posts WHERE exploration = 1")} == \
            {ids[0], ids[1], ids[2], ids[4]}
        assert not store.execute("SELECT * FROM posts WHERE image_id = ?", [ids[3]])
    finally:
        await daemon.stop()


def test_routing_reactions_and_upload_shrinking(tmp_path):
    assert route({"rating": "explicit"}, 1, 0, []) is None          # no NSFW channel: not posted
    assert route({"rating": "explicit"}, 1, 2, []) == 2
    assert route({"rating": "general", "tags": ["Spoiler"]}, 1, 2, ["spoiler"]) is None
    assert route({"rating": None}, 1, 2, []) == 1                    # folder and RSS pictures: no rating
    r = Reactions({"1\ufe0f\u20e3": 1, "\u2764\ufe0f": 5, "5\ufe0f\u20e3": 5, "thumbsup_custom": 4})
    assert r.value_of("\u2764") == 5 and r.value_of("\u2764\ufe0f") == 5  # with or without VS16
    assert r.value_of("<:thumbsup_custom:123>", "thumbsup_custom") == 4
    assert r.value_of("\U0001f600") is None
    assert r.buttons() == ["1\ufe0f\u20e3", "thumbsup_custom", "\u2764\ufe0f"]
    # A picture over the upload limit becomes a smaller JPEG that still decodes.
    im = Image.effect_noise((1600, 1200), 60).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    info, _ = inspect(buf.getvalue())
    rel = store_media(tmp_path, buf.getvalue(), info)
    assert len(buf.getvalue()) > 300_000
    small = fit_upload(tmp_path, rel, 300_000, name="x")
    assert len(small.data) <= 300_000 and small.filename == "x.jpg"
    assert Image.open(io.BytesIO(small.data)).format == "JPEG"
    same = fit_upload(tmp_path, rel, 50_000_000, name="x")
    assert same.data == buf.getvalue() and same.filename == "x.png"


async def test_with_a_trained_model_pictures_below_min_score_wait(tmp_path, fake):
    cfg = discord_config(tmp_path, fake, posts_per_cycle=3, min_score=3.0)
    ids = seed(cfg, [{"popularity": 1, "score": 2.0}, {"popularity": 2, "score": 4.5},
                     {"popularity": 3, "score": 2.9}, {"popularity": 0, "score": 3.2}], trained=True)
    daemon = await started(cfg)
    try:
        await messages(fake, fake.channel_id, 2)
        assert await daemon.discord.posts.post_cycle() == []
        assert [footer_id(m) for m in fake.messages_in(fake.channel_id)] == [ids[1], ids[3]]  # by score
    finally:
        await daemon.stop()


# ---- reactions -------------------------------------------------------------------------------
async def test_owner_reactions_become_labels_others_do_not_removal_takes_them_back(tmp_path, fake, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = discord_config(tmp_path, fake, posts_per_cycle=1)
    [image_id] = seed(cfg, [{"popularity": 1}])
    daemon = await started(cfg)
    store = open_store(cfg)
    try:
        [msg] = await messages(fake, fake.channel_id, 1)
        mid = int(msg["id"])
        await wait_for(lambda: _async(len(fake.reactions.get(mid, {})) == 5))

        async def label_is(value):
            async def check():
                return store.current_label(image_id) == value
            await wait_for(check)

        await fake.react(mid, FIVE, fake.stranger_id)
        await fake.react(mid, FOUR, fake.owner_id)
        await label_is(4)
        labels = store.labels_of(image_id)
        assert [(lb["value"], lb["user"], lb["origin"]) for lb in labels] == [(4, str(fake.owner_id), "discord")]
        assert [r["value"] for r in store.training_rows()] == [4]  # training sees it at once
        await fake.react(mid, HEART, fake.owner_id)          # the latest reaction wins
        await label_is(5)
        await fake.unreact(mid, HEART, fake.owner_id)        # taking it back: the 4 counts again
        await label_is(4)
        await fake.unreact(mid, FOUR, fake.owner_id)
        await label_is(None)
        assert store.training_rows() == [] and store.label_count() == 0
        assert [lb["removed_at"] is not None for lb in store.labels_of(image_id)] == [True, True]
        await fake.unreact(mid, FIVE, fake.stranger_id)
        await fake.react(mid, THREE, fake.stranger_id)
        await asyncio.sleep(0.5)
        assert store.current_label(image_id) is None
    finally:
        await daemon.stop()
    assert fake.token not in caplog.text


# ---- never post twice ------------------------------------------------------------------------
async def test_a_crash_between_send_and_record_posts_nothing_twice(tmp_path, fake):
    cfg = discord_config(tmp_path, fake, posts_per_cycle=1)
    ids = seed(cfg, [{"popularity": p} for p in (30, 20, 10)])
    fake.hold_message_posts = True
    daemon = await started(cfg)
    try:
        await messages(fake, fake.channel_id, 1)  # sent, but the answer never arrives
    finally:
        await daemon.stop()
    fake.release()
    store = open_store(cfg)
    assert [(p["image_id"], p["status"]) for p in store.execute("SELECT * FROM posts")] == [(ids[0], "intent")]
    # Also an intent whose message was never created (a crash just before the send).
    store.post_intent(ids[1], "discord", str(fake.channel_id))
    daemon = await started(cfg)
    try:
        await wait_for(lambda: _async(not store.posts_with_status("discord", "intent")))  # reconciled on start
        # The restart does not start a cycle early (the last one was under an hour ago): run one now.
        assert len(await daemon.discord.posts.post_cycle()) == 1
        msgs = fake.messages_in(fake.channel_id)
        assert [footer_id(m) for m in msgs] == [ids[0], ids[1]]   # picture 0 once; picture 1 posted now
        posts = store.execute("SELECT image_id, status, message_id FROM posts ORDER BY id")
        assert posts == [{"image_id": ids[0], "status": "sent", "message_id": msgs[0]["id"]},
                         {"image_id": ids[1], "status": "failed", "message_id": None},
                         {"image_id": ids[1], "status": "sent", "message_id": msgs[1]["id"]}]
        # The recovered post got its rating reactions, so a tap still rates it.
        await wait_for(lambda: _async(len(fake.reactions.get(int(msgs[0]["id"]), {})) == 5))
    finally:
        await daemon.stop()


# ---- catch-up --------------------------------------------------------------------------------
async def test_catch_up_records_reactions_given_and_taken_back_while_down(tmp_path, fake):
    cfg = discord_config(tmp_path, fake, posts_per_cycle=2)
    ids = seed(cfg, [{"popularity": p} for p in (30, 20, 10)])
    daemon = await started(cfg)
    store = open_store(cfg)
    try:
        first, second = (await messages(fake, fake.channel_id, 2))[:2]
        await fake.react(int(first["id"]), THREE, fake.owner_id)
        await wait_for(lambda: _async(store.current_label(ids[0]) == 3))
    finally:
        await daemon.stop()
    # While the bot is down:
    await fake.unreact(int(first["id"]), THREE, fake.owner_id, live=False)
    await fake.react(int(second["id"]), FIVE, fake.owner_id, live=False)
    await fake.react(int(second["id"]), FOUR, fake.stranger_id, live=False)
    for _ in range(2):  # a second restart finds nothing new
        daemon = await started(cfg)
        try:
            await wait_for(lambda: _async(store.current_label(ids[1]) == 5 and store.current_label(ids[0]) is None))
            await asyncio.sleep(0.5)
        finally:
            await daemon.stop()
        rows = store.execute("SELECT image_id, value, user, removed_at IS NOT NULL AS removed FROM labels ORDER BY id")
        assert rows == [{"image_id": ids[0], "value": 3, "user": str(fake.owner_id), "removed": 1},
                        {"image_id": ids[1], "value": 5, "user": str(fake.owner_id), "removed": 0}]
    assert len(fake.command_syncs) == 1  # commands registered once, not on every start


# ---- commands --------------------------------------------------------------------------------
async def test_slash_commands_answer_the_owner_and_refuse_everyone_else(tmp_path, fake):
    cfg = discord_config(tmp_path, fake, posts_per_cycle=1)
    ids = seed(cfg, [{"popularity": p} for p in (50, 40, 30, 20)])
    daemon = await started(cfg)
    store = open_store(cfg)

    async def reply(iid, n=1):
        return await wait_for(lambda: _async(len(fake.replies_to(iid)) >= n and fake.replies_to(iid)))

    try:
        [msg] = await messages(fake, fake.channel_id, 1)
        for name in ("pause", "top", "stats", "train"):
            [refusal] = await reply(await fake.command(name, fake.stranger_id))
            assert refusal["type"] == 4 and refusal["data"]["flags"] & 64
            assert "only this bot's owner" in refusal["data"]["content"]
        assert store.get_setting("discord.paused") is None and len(fake.messages_in(fake.channel_id)) == 1

        [ok] = await reply(await fake.command("pause", fake.owner_id))
        assert "paused" in ok["data"]["content"] and store.get_setting("discord.paused") is True
        assert await daemon.discord.posts.post_cycle() == []  # scheduled cycles wait while paused
        replies = await reply(await fake.command("top", fake.owner_id, [{"name": "n", "type": 4, "value": 2}]), 2)
        assert "Posted 2" in replies[1]["content"]             # /top posts even while paused
        assert [footer_id(m) for m in fake.messages_in(fake.channel_id)] == ids[:3]
        await reply(await fake.command("resume", fake.owner_id))
        assert store.get_setting("discord.paused") is False

        [stats] = await reply(await fake.command("stats", fake.owner_id))
        assert "labels: 0 picture(s)" in stats["data"]["content"] and "untrained" in stats["data"]["content"]
        assert "\nevent loop lag: p50 " in stats["data"]["content"]      # the daemon's loop lag, one line
        assert (await daemon.health())["discord"] == "connected"

        link = f"https://discord.com/channels/{fake.guild_id}/{fake.channel_id}/{msg['id']}"
        why = (await reply(await fake.command("why", fake.owner_id, [{"name": "picture", "type": 3,
                                                                      "value": link}]), 2))[1]
        assert f"Picture #{ids[0]}" in why["content"] and "face 1: animeface face" in why["content"]
        assert Image.open(io.BytesIO(why["files"][0].data)).format == "PNG"

        add = [{"name": "add", "type": 1, "options": [
            {"name": "name", "type": 3, "value": "feed"}, {"name": "kind", "type": 3, "value": "rss"},
            {"name": "options", "type": 3, "value": "url=http://127.0.0.1:9/feed.xml interval=600"}]}]
        [added] = await reply(await fake.command("source", fake.owner_id, add))
        assert "Added source feed" in added["data"]["content"]
        assert store.get_source("feed")["config"]["interval"] == 600
        [listed] = await reply(await fake.command("source", fake.owner_id, [{"name": "list", "type": 1}]))
        assert "feed  [rss, cli]" in listed["data"]["content"]
        bad = [{"name": "add", "type": 1, "options": [
            {"name": "name", "type": 3, "value": "x"}, {"name": "kind", "type": 3, "value": "rss"}]}]
        [refused] = await reply(await fake.command("source", fake.owner_id, bad))
        assert "Not added" in refused["data"]["content"] and "url" in refused["data"]["content"]
        rm = [{"name": "remove", "type": 1, "options": [{"name": "name", "type": 3, "value": "feed"}]}]
        await reply(await fake.command("source", fake.owner_id, rm))
        assert store.get_source("feed") is None

        [train] = await reply(await fake.command("train", fake.owner_id))
        assert "Training started" in train["data"]["content"] and daemon.models.retrainer.running
    finally:
        await daemon.stop()
    assert not fake.unknown


# ---- off and outages -------------------------------------------------------------------------
async def test_without_a_token_discord_is_off_and_says_so_once(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    caplog.set_level(logging.INFO)
    daemon = await started(make_config(tmp_path))
    try:
        assert daemon.discord is None
    finally:
        await daemon.stop()
    assert [r.getMessage() for r in caplog.records if "Discord" in r.getMessage()] == \
        ["Discord: off (no token (set DISCORD_TOKEN or discord.token))"]


async def test_a_discord_outage_never_stops_scoring_and_the_bot_connects_when_it_is_back(
        tmp_path, fake, serve, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(DiscordBot, "RETRY_FIRST", 0.5)
    monkeypatch.setattr(discord.http.Route, "BASE", "http://127.0.0.1:9/api/v10")  # nothing listens there
    cfg = discord_config(tmp_path, fake, posts_per_cycle=1)
    daemon = await started(cfg)
    try:
        (tmp_path / "inbox").mkdir(exist_ok=True)
        (tmp_path / "inbox" / "new.jpg").write_bytes(picture(7))
        store = open_store(cfg)
        await wait_for(lambda: _async(store.status_counts().get("scored") == 1), timeout=30)
        assert "Discord: cannot connect" in caplog.text
        monkeypatch.setattr(discord.http.Route, "BASE", fake.base + "/api/v10")  # Discord is back
        await messages(fake, fake.channel_id, 1)
    finally:
        await daemon.stop()


async def test_a_refused_token_turns_discord_off_with_one_message(tmp_path, fake, caplog):
    caplog.set_level(logging.INFO)
    fake.token = "another-token.x.y"
    cfg = discord_config(tmp_path, fake)
    fake.token = "the-real-token.a.b"
    daemon = await started(cfg)
    try:
        await wait_for(lambda: _async(daemon._discord_task.done()))
    finally:
        await daemon.stop()
    assert "Discord: the token was refused" in caplog.text
    assert "another-token.x.y" not in caplog.text


# ---- characters --------------------------------------------------------------------------------
def text_of(reply: dict) -> str:
    """The text of an interaction reply (an immediate answer or a follow-up)."""
    return reply.get("content") or reply.get("data", {}).get("content") or ""


async def answer(fake, name: str, uid: int, options: list[dict] | None = None, n: int = 1) -> str:
    """The text of the ``n``-th reply to a slash command (2 when it is deferred first)."""
    iid = await fake.command(name, uid, options)
    replies = await wait_for(lambda: _async(len(fake.replies_to(iid)) >= n and fake.replies_to(iid)))
    return text_of(replies[n - 1])


def name_options(picture: str, character: str, face: int | None = None) -> list[dict]:
    options = [{"name": "picture", "type": 3, "value": picture}, {"name": "character", "type": 3, "value": character}]
    return options + ([{"name": "face", "type": 4, "value": face}] if face is not None else [])


def give_characters(cfg, names: dict[int, str], seen: dict[int, tuple[str | None, float]]) -> str:
    """Name the first face of some pictures and store recognition results for others, as the
    daemon's recognition would (named first, so none of it is stale); the active embedder's version."""
    from scorer.characters import ensure_active_embedder

    with Store.open(cfg.db_path) as store:
        version = ensure_active_embedder(store, cfg.characters, cfg.models_path)["version"]
        first = {i: store.faces_of(i)[0]["id"] for i in [*names, *seen]}
        for image_id, name in names.items():
            store.name_face(first[image_id], store.character_id(name, create=True), origin="gallery")
        store.save_identities(version, {first[i]: (None if n is None else store.character_id(n, create=True), sim)
                                        for i, (n, sim) in seen.items()})
    return version


CHARACTERS = "\n[characters]\nimage_size = 32\nembedding_dim = 32\n"


async def test_followed_characters_are_boosted_blocked_ones_never_posted_and_posts_say_who(tmp_path, fake):
    cfg = discord_config(tmp_path, fake, posts_per_cycle=3, extra=CHARACTERS + 'follow = ["miku"]\n'
                         'follow_boost = 0.5\nblock = ["Rin"]\n')
    ids = seed(cfg, [{"popularity": 1, "score": s} for s in (4.0, 3.3, 3.5, 3.6, 2.0, 3.0)], trained=True)
    blocked, followed, unknown, plain, seen, seen_rin = ids
    give_characters(cfg, {blocked: "Rin", followed: "Miku"},
                    {unknown: (None, 0.31), plain: (None, 0.2), seen: ("Miku", 0.8), seen_rin: ("Rin", 0.9)})
    daemon = await started(cfg)
    try:
        first = await messages(fake, fake.channel_id, 3)
        # Miku's 3.3 ranks as 3.8: above 3.6 and 3.5; Rin's 4.0 is never posted
        assert [footer_id(m) for m in first] == [followed, plain, unknown]
        fields = [{f["name"]: f["value"] for f in m["embeds"][0]["fields"]} for m in first]
        assert fields[0]["Characters"] == "Miku (named)"
        assert "Characters" not in fields[1] and "Characters" not in fields[2]     # unknown faces only
        assert await daemon.discord.posts.post_cycle(5, reason="command")
        later = fake.messages_in(fake.channel_id)
        assert [footer_id(m) for m in later[3:]] == [seen]                          # 2.0 (+0.5), not Rin
        assert {f["name"]: f["value"] for f in later[3]["embeds"][0]["fields"]}["Characters"] == "Miku (0.80)"
        store = open_store(cfg)
        assert not store.execute("SELECT * FROM posts WHERE image_id IN (?, ?)", [blocked, seen_rin])

        why = await answer(fake, "why", fake.owner_id, [{"name": "picture", "type": 3, "value": f"#{seen}"}], n=2)
        assert "face 1: animeface face at (20, 20)-(90, 100), score 2.00, Miku (0.80)" in why
        why = await answer(fake, "why", fake.owner_id, [{"name": "picture", "type": 3, "value": f"#{followed}"}], n=2)
        assert "score 3.30, Miku (named)" in why
    finally:
        await daemon.stop()


async def test_name_names_a_face_for_the_owner_only_and_recognition_uses_it_at_once(tmp_path, fake):
    cfg = discord_config(tmp_path, fake, posts_per_cycle=1, extra=CHARACTERS)
    one, two = seed(cfg, [{"popularity": 10, "faces": 1}, {"popularity": 5, "faces": 2}])
    daemon = await started(cfg)
    store = open_store(cfg)
    try:
        [msg] = await messages(fake, fake.channel_id, 1)
        assert footer_id(msg) == one
        refused = await answer(fake, "name", fake.stranger_id, name_options(f"#{one}", "Alice"))
        assert "only this bot's owner" in refused and store.list_characters() == []

        link = f"https://discord.com/channels/{fake.guild_id}/{fake.channel_id}/{msg['id']}"
        done = await answer(fake, "name", fake.owner_id, name_options(link, "Alice 🎀"), n=2)
        assert done == f"Named the face of picture #{one} at (20, 20)-(90, 100) as Alice 🎀 (a new character)."
        [face] = store.faces_of(one)
        assert store.face_name(face["id"])["name"] == "Alice 🎀" and store.face_name(face["id"])["origin"] == "discord"
        version = store.active_identity_model()["version"]
        assert set(store.embeddings(version, [face["id"]])) == {face["id"]}    # embedded: recognised from now on
        assert daemon.recognition.recognizer is not None and len(daemon.recognition.recognizer) == 1

        several = await answer(fake, "name", fake.owner_id, name_options(f"#{two}", "Bob"), n=2)
        assert several == (f"Not named: picture #{two} has 2 faces: say which with face "
                           "(1-2, numbered as /why numbers them)")
        second = await answer(fake, "name", fake.owner_id, name_options(f"#{two}", "Bob", face=2), n=2)
        assert "as Bob (a new character)" in second and "(110, 20)-(180, 100)" in second
        faces = store.faces_of(two)                      # face 2 in /why: the lower score
        assert store.face_name(faces[1]["id"])["name"] == "Bob" and store.face_name(faces[0]["id"]) is None
        again = await answer(fake, "name", fake.owner_id, name_options(f"#{two}", "Alice 🎀", face=1), n=2)
        assert again.endswith("as Alice 🎀.")

        for options, message in [(name_options(f"#{one}", "a/b"), "Not named: character name 'a/b': no slashes allowed"),
                                 (name_options(f"#{one}", "  "), "Not named: a character name cannot be empty"),
                                 (name_options(f"#{two}", "Bob", face=3), f"picture #{two} has 2 face(s): face 3 does not exist"),
                                 (name_options("#9999", "Bob"), "No picture found for '#9999'.")]:
            assert message in await answer(fake, "name", fake.owner_id, options, n=1 if "No picture" in message else 2)
        assert sorted(r["name"] for r in store.list_characters()) == ["Alice 🎀", "Bob"]

        stats = await answer(fake, "stats", fake.owner_id)
        assert f"characters: 2 (3 example(s)); identity embedder {version} — untrained" in stats
    finally:
        await daemon.stop()
    assert not fake.unknown


async def test_why_stays_within_discords_message_limit_with_many_long_named_faces(tmp_path):
    from bot.discord_commands import MESSAGE_LIMIT, OwnerCommands
    from storage.writer import AsyncStore

    cfg = make_config(tmp_path, CHARACTERS)
    [image_id] = seed(cfg, [{"popularity": 1, "faces": 30}])
    with Store.open(cfg.db_path) as store:
        for k, face in enumerate(store.faces_of(image_id)):
            store.name_face(face["id"], store.character_id(f"{k:02d} " + "ä" * 97, create=True), origin="gallery")
    astore = await AsyncStore(cfg.db_path).open()
    try:
        text, _ = await OwnerCommands(cfg, astore, post_cycle=None).explain(image_id)
    finally:
        await astore.close()
    shown = text.count("\nface ")
    assert len(text) <= MESSAGE_LIMIT and 5 < shown < 30
    assert f"... and {30 - shown} more face(s)" in text
    assert text.startswith(f"Picture #{image_id}: score") and "https://booru.example/posts/" in text


# ---- comparisons -------------------------------------------------------------------------------
A, B = "\U0001f170\ufe0f", "\U0001f171\ufe0f"


def compare_ids(message: dict) -> list[int]:
    """The pictures (A, B) of a comparison post, from its embeds' footers."""
    return [int(re.search(r"compare [AB]: #(\d+)", e["footer"]["text"]).group(1)) for e in message["embeds"]]


async def test_a_comparison_post_every_n_posts_owner_reactions_record_it_others_do_not(tmp_path, fake):
    cfg = discord_config(tmp_path, fake, posts_per_cycle=1, compare_every=1)
    ids = seed(cfg, [{"popularity": p, "score": s, "uncertainty": 0.3}
                     for p, s in ((50, 2.0), (40, 3.0), (30, 3.1), (20, 4.5))])
    daemon = await started(cfg)
    store = open_store(cfg)

    async def comparisons_are(expected):
        async def check():
            return [(c["winner_id"], c["loser_id"]) for c in store.comparisons()] == expected
        await wait_for(check)

    try:
        post, duel = await messages(fake, fake.channel_id, 2)
        assert footer_id(post) == ids[0]                      # the regular post, then the comparison
        a, b = compare_ids(duel)
        assert {a, b} == {ids[1], ids[2]}                     # the closest scores, not the posted picture
        assert "Which do you prefer?" in duel["content"] and len(fake.uploads[int(duel["id"])]) == 2
        assert [e["image"]["url"] for e in duel["embeds"]] == [f"attachment://{u.filename}"
                                                               for u in fake.uploads[int(duel["id"])]]
        assert duel["embeds"][0]["title"].startswith(A) and duel["embeds"][1]["title"].startswith(B)
        mid = int(duel["id"])
        await wait_for(lambda: _async(fake.reactions.get(mid, {}).get(A) == [fake.bot_id]
                                      and fake.reactions.get(mid, {}).get(B) == [fake.bot_id]))
        assert store.execute("SELECT a_id, b_id, message_id FROM compare_posts") == \
            [{"a_id": a, "b_id": b, "message_id": str(mid)}]
        assert store.get_setting("discord.paused") is None and not store.labels_of(a)

        await fake.react(mid, A, fake.stranger_id)            # not the owner: ignored
        await fake.react(mid, B, fake.owner_id)
        await comparisons_are([(b, a)])
        [c] = store.comparisons()
        row = store.get_comparison(c["id"])
        assert (row["origin"], row["user"], row["ref"]) == ("discord", str(fake.owner_id), f"{mid}/\U0001f171")  # 🅱️ without VS16
        await fake.unreact(mid, B, fake.owner_id)             # taking it back
        await comparisons_are([])
        await fake.react(mid, A, fake.owner_id)
        await comparisons_are([(a, b)])
        assert "1 comparison(s)" in await answer(fake, "stats", fake.owner_id)
        # /compare posts a pair now, for the owner only
        assert "only this bot's owner" in await answer(fake, "compare", fake.stranger_id)
        assert "Posted two pictures" in await answer(fake, "compare", fake.owner_id, n=2)
        third = fake.messages_in(fake.channel_id)[2]
        assert set(compare_ids(third)) not in ({a, b}, set()) and ids[0] not in compare_ids(third)
        assert store.comparison_count() == 1
    finally:
        await daemon.stop()
    # The pair of a message survives a restart: a reaction taken back while down, and one given
    # after the restart, both count.
    await fake.unreact(mid, A, fake.owner_id, live=False)
    daemon = await started(cfg)
    try:
        await comparisons_are([])
        await fake.react(mid, B, fake.owner_id)
        await comparisons_are([(b, a)])
        await asyncio.sleep(0.5)
        assert store.comparison_count() == 1
    finally:
        await daemon.stop()
    assert not fake.unknown


async def test_comparisons_are_off_by_default(tmp_path, fake):
    cfg = discord_config(tmp_path, fake, posts_per_cycle=2)
    seed(cfg, [{"popularity": p} for p in (3, 2, 1)])
    daemon = await started(cfg)
    try:
        await messages(fake, fake.channel_id, 2)
        await asyncio.sleep(1)
        assert len(fake.messages_in(fake.channel_id)) == 2
        assert open_store(cfg).execute("SELECT COUNT(*) AS n FROM compare_posts") == [{"n": 0}]
    finally:
        await daemon.stop()
