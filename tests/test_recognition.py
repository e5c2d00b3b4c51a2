"""Recognition in the daemon: faces identified in the scoring stage, stored faces identified again
(in the background, resumably) after a new identity embedder is promoted or names change, and a
failing recognition that never stops scoring."""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime

import pytest
import torch
from PIL import Image

from bot.daemon import Daemon
from bot.manage import format_stats, stats
from scorer.characters import build_recognizer, embed_named, ensure_active_embedder, identify_stored, load_embedder
from scorer.identity import build_embedder, save_embedder
from storage import Store
from storage.media import inspect, store_media
from storage.records import CROP, Face
from storage.writer import AsyncStore
from tests.helpers import cli, make_config, picture, shared, wait_for

CHARS = "\n[characters]\nimage_size = 32\nembedding_dim = 32\nbatch_size = 4\n"


def shifted_copy(src, dst) -> None:
    """The picture cropped by a few pixels: other bytes and perceptual hash (not a duplicate),
    the same face."""
    im = Image.open(src).convert("RGB")
    im.crop((40, 30, im.width, im.height)).save(dst, "JPEG", quality=92)


def register_embedder(cfg, version: str, *, seed: int, write: bool = True, **kw) -> None:
    """An embedder version file (unless ``write`` is false) registered and made active, as
    ``characters train`` promotes one."""
    if write:
        torch.manual_seed(seed)
        net = build_embedder("resnet18", embedding_dim=32)
        save_embedder(net, cfg.models_path / f"{version}.pt", arch="resnet18", image_size=32, version=version)
    with Store.open(cfg.db_path) as store:
        store.register_identity_model(version, "resnet18", f"{version}.pt", activate=True, **kw)


async def test_the_daemon_recognises_faces_while_scoring_and_again_after_a_promotion(tmp_path, caplog):
    alice = shared("illustrations", "grapeot_112032.jpg")
    cfg = make_config(tmp_path, CHARS)
    (tmp_path / "alice.jpg").write_bytes(alice.read_bytes())
    enrolled = await asyncio.to_thread(cli, tmp_path, "characters", "add", "Alice", "alice.jpg")
    assert enrolled.returncode == 0, enrolled.stderr
    caplog.set_level(logging.INFO)
    daemon = Daemon(cfg)
    await daemon.start()
    store = daemon.store
    try:
        first = (await store.active_identity_model())["version"]
        shifted_copy(alice, tmp_path / "inbox" / "copy.jpg")
        (tmp_path / "inbox" / "plain.jpg").write_bytes(picture(3))      # no face: scored as a whole

        async def identified():
            rows = await store.execute(
                "SELECT faces.id, faces.image_id, images.scored_at, face_identity.created_at FROM face_identity "
                "JOIN faces "
                "ON faces.id = face_identity.face_id JOIN images ON images.id = faces.image_id "
                "WHERE images.title = 'copy.jpg' AND face_identity.model_version = ?", [first])
            return rows
        [copy] = await wait_for(identified, timeout=30)
        # in the scoring stage, right after the analysis (not by the background run, every 30 s)
        assert (datetime.fromisoformat(copy["created_at"]) - datetime.fromisoformat(copy["scored_at"])).total_seconds() < 5
        who = await store.face_characters([copy["id"]])
        assert who[copy["id"]]["character"] == "Alice" and who[copy["id"]]["named_by"] is None
        assert who[copy["id"]]["similarity"] > 0.9
        assert await store.picture_characters([copy["image_id"]]) == {copy["image_id"]: ["Alice"]}
        plain = await wait_for(lambda: store.execute("SELECT id FROM images WHERE title = 'plain.jpg' "
                                                     "AND status = 'scored'"))
        [whole] = await store.faces_of(plain[0]["id"])
        assert whole["detector"] == "whole"
        assert await store.face_characters([whole["id"]]) == {}       # a whole picture is not a face
        assert daemon.stats["identified"] >= 1

        # A new embedder is promoted: stored faces are embedded and identified again, in the background.
        await asyncio.to_thread(register_embedder, cfg, "identity-test-2", seed=1,
                                metrics={"val_top1": 0.9, "open_set": {"f1": 0.8}}, threshold=0.5)
        await daemon.recognition.check()
        named = [f["id"] for f in await store.named_faces()]
        summary = format_stats(await store.call(stats))
        assert ("characters: 1 (1 example(s)); identity embedder identity-test-2 — validation top-1 0.900, "
                "open-set F1 0.800, unknown below 0.500") in summary

        async def reembedded():
            done = await store.identities("identity-test-2", [copy["id"]])
            return done and await store.embeddings("identity-test-2", named)
        await wait_for(reembedded, timeout=30)
        await asyncio.wait(daemon.recognition.running(), timeout=30)
        who = await store.face_characters([copy["id"]])
        assert who[copy["id"]]["character"] == "Alice"
        assert set(await store.embeddings(first, [copy["id"]])) == {copy["id"]}   # the old version's stay
        assert await store.faces_to_identify("identity-test-2", (await store.enrolment_stamp())[1], 100) == []

        # An active embedder whose file is missing: one line, and scoring goes on.
        await asyncio.to_thread(register_embedder, cfg, "identity-gone", seed=2, write=False)
        for i in range(3):
            (tmp_path / "inbox" / f"later{i}.jpg").write_bytes(picture(10 + i))
            await wait_for(lambda i=i: store.execute(
                f"SELECT id FROM images WHERE title = 'later{i}.jpg' AND status = 'scored'"))
        await daemon.recognition.check()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "identity model file" in errors[0] and "identity-gone" in errors[0], errors
    finally:
        await daemon.stop()


def _crop_face(store, media, seed: int) -> int:
    data = picture(seed)
    info, _ = inspect(data)
    image_id = store.add_imported_image(store.import_source_id(), f"p{seed}.jpg", info, store_media(media, data, info))
    store.record_analysis(image_id, [Face.whole(info.width, info.height, CROP).scored(3.0, None)], 3.0, None, "m")
    return store.faces_of(image_id)[0]["id"]


def test_identifying_stored_faces_resumes_where_it_stopped_and_redoes_what_a_new_name_makes_stale(tmp_path):
    cfg = make_config(tmp_path, CHARS)
    with Store.open(cfg.db_path) as store:
        store.register_model("m", "resnet18", "m.pt", activate=True)
        faces = [_crop_face(store, cfg.media_path, s) for s in range(7)]
        alice = store.character_id("Alice", create=True)
        store.name_face(faces[0], alice, origin="enrol")
        row = ensure_active_embedder(store, cfg.characters, cfg.models_path)
        embedder = load_embedder(row, cfg.characters, cfg.models_path)
        embed_named(store, embedder, cfg.media_path, margin=0.2)
        recognizer = build_recognizer(store, row, cfg.characters)
        since = store.enrolment_stamp()[1]
    unnamed = faces[1:]

    async def run(stop_after=None):
        astore = await AsyncStore(cfg.db_path).open()
        batches = []
        try:
            n = await identify_stored(astore, embedder, recognizer, since=since, media_root=cfg.media_path,
                                      margin=0.2, batch_size=2, on_batch=batches.append,
                                      should_stop=lambda: stop_after is not None and len(batches) >= stop_after)
        finally:
            await astore.close()
        return n, batches

    assert asyncio.run(run(stop_after=1)) == (2, [2])            # interrupted after one batch
    assert asyncio.run(run()) == (4, [2, 2])                     # the rest, not the first two again
    assert asyncio.run(run()) == (0, [])
    with Store.open(cfg.db_path) as store:
        assert set(store.identities(embedder.version, unnamed)) == set(unnamed)
        assert faces[0] not in store.identities(embedder.version, faces)   # named: its name counts
        store.name_face(faces[1], store.character_id("Bob", create=True), origin="gallery")
        since = store.enrolment_stamp()[1]
        stale = [f["id"] for f in store.faces_to_identify(embedder.version, since, 100)]
    assert stale == faces[2:]                      # results older than the newest name are stale
    assert asyncio.run(run())[0] == 5


def test_follow_and_block_are_validated(tmp_path):
    from bot.config import ConfigError, load_config
    from tests.helpers import write_config

    cfg = load_config(write_config(tmp_path, '[characters]\nfollow = [" Miku "]\nblock = ["Rin 🍊"]\n'))
    assert cfg.characters.follow == ["Miku"] and cfg.characters.block == ["Rin 🍊"]
    assert cfg.characters.follow_boost == 0.5
    for body, message in [('follow = ["a/b"]', "characters.follow: character name 'a/b': no slashes allowed"),
                          ('block = [""]', "characters.block: a character name cannot be empty"),
                          ('follow = ["Miku"]\nblock = ["miku"]', "'miku' is both followed and blocked"),
                          ("follow_boost = -1", "characters.follow_boost: expected 0 or more")]:
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, f"[characters]\n{body}\n"))


def test_character_summary_and_face_numbering():
    from bot.posting import blocked_character, character_summary, describe_character, numbered_faces

    named = {"character": "Miku", "similarity": 1.0, "named_by": "discord", "weak": False}
    seen = {"character": "Miku", "similarity": 0.7, "named_by": None, "weak": False}
    rin = {"character": "Rin", "similarity": 0.834, "named_by": None, "weak": False}
    unknown = {"character": None, "similarity": 0.41, "named_by": None, "weak": False}
    weak = {"character": "Len", "similarity": 1.0, "named_by": "booru", "weak": True}
    assert character_summary([seen, rin, unknown, named]) == "Miku (named), Rin (0.83)"
    assert character_summary([unknown]) == "" and character_summary([]) == ""
    assert describe_character(unknown) == "unknown (0.41)" and describe_character(weak) == "Len (named, weak)"
    assert blocked_character(["Miku", "Rin"], ["rin"]) == "rin" and blocked_character(["Miku"], ["Rin"]) is None
    faces = [{"id": 1, "score": 2.0}, {"id": 2, "score": None}, {"id": 3, "score": 4.5}]
    assert [f["id"] for f in numbered_faces(faces)] == [3, 1, 2]


def test_characters_recognize_identifies_stored_faces_from_the_command_line(tmp_path):
    from bot.manage import ManageError, name_picture_face

    cfg = make_config(tmp_path, CHARS)
    assert "no face is named yet" in cli(tmp_path, "characters", "recognize").stderr
    (tmp_path / "alice.jpg").write_bytes(picture(1))
    assert cli(tmp_path, "characters", "add", "Alice", "alice.jpg", "--crops").returncode == 0
    with Store.open(cfg.db_path) as store:
        store.register_model("m", "resnet18", "m.pt")
        near = Image.open(tmp_path / "alice.jpg")
        near.save(tmp_path / "near.jpg", "JPEG", quality=80)             # other bytes, the same face
        data = (tmp_path / "near.jpg").read_bytes()
        info, _ = inspect(data)
        image_id = store.add_imported_image(store.import_source_id(), "near.jpg", info,
                                            store_media(cfg.media_path, data, info))
        store.record_analysis(image_id, [Face.whole(info.width, info.height, CROP).scored(3.0, None)], 3.0, None, "m")
        others = [_crop_face(store, cfg.media_path, s) for s in (5, 6)]
        whole = _crop_face(store, cfg.media_path, 7)
        store.db.execute("UPDATE faces SET detector = 'whole' WHERE id = ?", [whole])  # no face found in it
        with pytest.raises(ManageError, match="has no face"):
            name_picture_face(store, store.execute("SELECT image_id FROM faces WHERE id = ?", [whole])[0]["image_id"],
                              "Bob", None, origin="discord")
    out = cli(tmp_path, "characters", "recognize")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "identified 3 stored face(s) with identity-resnet18-random-init"
    with Store.open(cfg.db_path) as store:
        assert store.picture_characters([image_id]) == {image_id: ["Alice"]}
        assert set(store.face_characters(others)) == set(others) and store.face_characters([whole]) == {}
    assert cli(tmp_path, "characters", "recognize").stdout.strip().startswith("identified 0 stored face(s)")


def test_a_stream_of_new_names_refreshes_stored_results_at_most_every_ten_minutes(tmp_path, monkeypatch):
    import bot.recognition

    clock = [1000.0]
    monkeypatch.setattr(bot.recognition.time, "monotonic", lambda: clock[0])
    rec = bot.recognition.Recognition(make_config(tmp_path), None, asyncio.Event(), {})
    assert rec._stale_before(("e1", None, (1, "t1"))) == "t1"
    clock[0] += 60                                   # a weak name a minute later: stored results wait
    assert rec._stale_before(("e1", None, (2, "t2"))) == "t1"
    clock[0] += rec.NAMES_REFRESH_SECONDS            # ten minutes on: they are redone for the new names
    assert rec._stale_before(("e1", None, (3, "t3"))) == "t3"
    clock[0] += 1                                    # a new embedder is used on every stored face at once
    assert rec._stale_before(("e2", None, (3, "t3"))) == "t3"
    assert rec._stale_before(("e2", None, (4, "t4"))) == "t3"


async def test_names_from_tags_are_taken_in_within_a_minute_the_owners_at_once(tmp_path):
    import bot.recognition

    cfg = make_config(tmp_path, CHARS)
    with Store.open(cfg.db_path) as store:
        store.register_model("m", "resnet18", "m.pt", activate=True)
        f1, f2, f3 = (_crop_face(store, cfg.media_path, s) for s in (1, 2, 3))
        store.name_face(f1, store.character_id("Miku", create=True), origin="import")
    astore = await AsyncStore(cfg.db_path).open()
    rec = bot.recognition.Recognition(cfg, astore, asyncio.Event(), {})
    try:
        assert await rec.current() and len(rec.recognizer) == 1
        with Store.open(cfg.db_path) as store:             # a booru tag names another face
            store.name_face(f2, store.character_id("Rin", create=True), origin="booru", weak=True)
        assert await rec.current() and len(rec.recognizer) == 1   # not rebuilt for it at once
        rec._built_at -= rec.REBUILD_SECONDS
        assert await rec.current() and len(rec.recognizer) == 2   # a minute later it is in
        with Store.open(cfg.db_path) as store:             # the owner names one (/name, the gallery)
            store.name_face(f3, store.character_id("Len", create=True), origin="discord")
        await rec.names_changed()
        assert len(rec.recognizer) == 3 and set(rec.recognizer.characters) == set(
            (await astore.character_names()).keys())
        for task in rec.running():
            await task
    finally:
        rec.stopping.set()
        for task in rec.running():
            await task
        await astore.close()


async def test_a_face_whose_picture_is_gone_is_unknown_and_not_read_again_and_again(tmp_path, caplog):
    cfg = make_config(tmp_path, CHARS)
    with Store.open(cfg.db_path) as store:
        store.register_model("m", "resnet18", "m.pt", activate=True)
        named, lost = (_crop_face(store, cfg.media_path, s) for s in (1, 2))
        store.name_face(named, store.character_id("Miku", create=True), origin="enrol")
        row = ensure_active_embedder(store, cfg.characters, cfg.models_path)
        embedder = load_embedder(row, cfg.characters, cfg.models_path)
        embed_named(store, embedder, cfg.media_path, margin=0.2)
        recognizer = build_recognizer(store, row, cfg.characters)
        media = store.execute("SELECT media_path FROM images JOIN faces ON faces.image_id = images.id "
                              "WHERE faces.id = ?", [lost])[0]["media_path"]
        (cfg.media_path / media).unlink()
        since = store.enrolment_stamp()[1]
    astore = await AsyncStore(cfg.db_path).open()
    try:
        with caplog.at_level(logging.WARNING):
            assert await identify_stored(astore, embedder, recognizer, since=since, media_root=cfg.media_path,
                                         margin=0.2) == 0
            assert await identify_stored(astore, embedder, recognizer, since=since, media_root=cfg.media_path,
                                         margin=0.2) == 0
    finally:
        await astore.close()
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1
    with Store.open(cfg.db_path) as store:
        assert store.face_characters([lost])[lost] == {"character": None, "similarity": 0.0, "named_by": None,
                                                       "weak": False}
        assert store.faces_to_identify(embedder.version, since, 10) == []
