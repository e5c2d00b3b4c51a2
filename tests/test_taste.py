"""The taste model's two speeds: features cached once per face and source, the taste head
fitted in seconds from them (CLI and daemon), promoted only when better, rescoring without
decoding a picture, and a kill during a refit that loses nothing."""
from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time

import aiohttp
import pytest
from PIL import Image, ImageDraw

from bot.config import load_config
from bot.daemon import Daemon
from scorer import features as features_module
from scorer import rescore as rescore_module
from scorer.analyze import build_analyzer
from scorer.dataset import split_of
from scorer.import_labels import RatingRow, import_labels
from scorer.registry import load_scorer
from scorer.train import train_from_store
from storage import Store
from tests.helpers import MAIN, wait_for, write_config


def themed(seed: int, warm: bool, size=(96, 96)) -> bytes:
    """A synthetic picture whose colours are warm (reds, oranges) or cool (blues, greens): the
    owner of these tests loves warm pictures."""
    rnd = random.Random(seed)

    def colour():
        return ((rnd.randrange(170, 256), rnd.randrange(40, 140), rnd.randrange(0, 60)) if warm else
                (rnd.randrange(0, 60), rnd.randrange(60, 180), rnd.randrange(150, 256)))
    im = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(im)
    for _ in range(8):
        x, y = rnd.randrange(size[0]), rnd.randrange(size[1])
        draw.ellipse([x, y, x + rnd.randrange(10, 40), y + rnd.randrange(10, 40)], fill=colour())
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def taste_config(root, extra: str = "", train: str = ""):
    body = f'''data_dir = "{root / 'data'}"
[download]
allow_private = ["127.0.0.1"]
[scorer]
image_size = 32
batch_size = 16
device = "cpu"
backbone_size = 64
[train]
min_labels = 8
val_share = 0.3
refit_delay = 1
{train}
[daemon]
stop_timeout = 5
[web]
port = 0
[[sources]]
name = "inbox"
kind = "folder"
interval = 0.3
path = "{root / 'inbox'}"
settle = 0.1
{extra}'''
    (root / "inbox").mkdir(exist_ok=True)
    return load_config(write_config(root, body))


def import_rated(cfg, root, n: int = 24, *, offset: int = 0) -> list[RatingRow]:
    """``n`` pictures, half warm (rated 5), half cool (rated 1), imported as face crops."""
    rows = []
    for i in range(offset, offset + n):
        warm = i % 2 == 0
        path = root / f"p{i}.png"
        path.write_bytes(themed(i, warm))
        rows.append(RatingRow(f"p{i}.png", path, 5 if warm else 1, f"p{i}.png"))
    with Store.open(cfg.db_path) as store:
        report = import_labels(store, build_analyzer(store, cfg.detector, cfg.scorer, cfg.paths), rows,
                               cfg.media_path, crops=True, progress=False)
    assert report.labels_added == n and not report.errors, report
    return rows


def train(cfg, store, **kw):
    return train_from_store(store, cfg.paths, cfg.scorer, cfg.train, margin=cfg.detector.margin,
                            max_pixels=cfg.download.max_pixels, progress=False, **kw)


def test_features_are_computed_once_per_face_and_source(tmp_path, monkeypatch):
    cfg = taste_config(tmp_path)
    import_rated(cfg, tmp_path, 10)
    with Store.open(cfg.db_path) as store:
        scorer = load_scorer(store.active_model(), cfg.scorer, cfg.models_path, margin=cfg.detector.margin)
        faces = store.execute("SELECT faces.*, images.media_path FROM faces JOIN images ON images.id = faces.image_id")
        counts = store.feature_counts()
        # the import cached every block the daemon caches: backbone, whole picture, colour, network
        assert set(counts) == set(scorer.extractor.sources.values()) and set(counts.values()) == {len(faces)}
        assert len(store.face_features([faces[0]["id"]], [scorer.extractor.sources["backbone"]])
                   [faces[0]["id"]][scorer.extractor.sources["backbone"]]) == scorer.extractor.backbone.dim

        from storage import media
        decoded = []
        real = media.load_media
        monkeypatch.setattr(media, "load_media", lambda *a, **k: decoded.append(a[1]) or real(*a, **k))
        got = features_module.ensure_features(store, scorer.extractor, faces, cfg.media_path, margin=0.2)
        assert decoded == [] and len(got) == len(faces)
        # a new network version is a new source: only it is computed, each picture decoded once
        monkeypatch.undo()
        seen = []
        real_load = media.load_media
        monkeypatch.setattr(media, "load_media", lambda *a, **k: seen.append(a[1]) or real_load(*a, **k))
        scorer.extractor.sources["net"] = "net:another-network"
        features_module.ensure_features(store, scorer.extractor, faces, cfg.media_path, margin=0.2)
        assert sorted(seen) == sorted({f["media_path"] for f in faces})
        assert store.feature_counts()["net:another-network"] == len(faces)
        assert store.feature_counts()[scorer.extractor.sources["backbone"]] == len(faces)


def test_crop_features_of_another_margin_are_cached_apart_and_a_head_fitted_at_the_old_one_waits(tmp_path,
                                                                                                  monkeypatch, caplog):
    """detector.margin changes the crops: their features are cached under other sources (the
    whole-picture block, which does not depend on it, is shared), a head fitted at the old margin
    is left out, and the daemon's retiring drops the old margin's vectors."""
    import numpy as np

    from scorer.detect import DetectorConfig
    from scorer.model import AppliedHead, Scorer
    from scorer.registry import ensure_active_model
    from storage import media
    from tests.helpers import make_config, seed

    assert DetectorConfig().margin == features_module.DEFAULT_MARGIN
    cfg = make_config(tmp_path)
    seed(cfg, [{"popularity": i} for i in range(3)])
    with Store.open(cfg.db_path) as store:
        row = ensure_active_model(store, cfg.scorer, cfg.models_path)
        plain = load_scorer(row, cfg.scorer, cfg.models_path, margin=0.2)
        wide = load_scorer(row, cfg.scorer, cfg.models_path, margin=0.5)
        a, b = plain.extractor.sources, wide.extractor.sources
        assert a["whole"] == b["whole"] and "@" not in "".join(a.values())          # the default: plain names
        for block in ("backbone", "colour", "net"):
            assert b[block] == a[block] + "@m50"
        faces = store.execute("SELECT faces.*, images.media_path FROM faces JOIN images ON images.id = faces.image_id")
        old = features_module.ensure_features(store, plain.extractor, faces, cfg.media_path, margin=0.2)
        decoded = []
        real = media.load_media
        monkeypatch.setattr(media, "load_media", lambda *a, **k: decoded.append(a[1]) or real(*a, **k))
        new = features_module.ensure_features(store, wide.extractor, faces, cfg.media_path, margin=0.5)
        assert sorted(decoded) == sorted(f["media_path"] for f in faces)             # not the old crops' vectors
        for f in faces:
            assert not np.allclose(new[f["id"]][b["backbone"]], old[f["id"]][a["backbone"]])
            cached = store.face_features([f["id"]], [a["whole"]])[f["id"]][a["whole"]]
            assert np.array_equal(new[f["id"]][b["whole"]], cached)                  # read, not computed again
        counts = store.feature_counts()
        assert counts[a["backbone"]] == counts[b["backbone"]] == counts[a["whole"]] == len(faces)
        with pytest.raises(ValueError, match="margin"):                             # crops cut at one, named another
            features_module.ensure_features(store, plain.extractor, faces, cfg.media_path, margin=0.5)
        fitted = AppliedHead(object(), {k: v for k, v in a.items() if k != "net"})
        kw = dict(arch=plain.arch, version="head-x", image_size=plain.image_size, device="cpu",
                  backbone=plain.extractor.backbone, head=fitted)
        assert Scorer(plain.net, margin=0.2, **kw).head is fitted
        assert Scorer(plain.net, margin=0.5, **kw).head is None                   # fitted on other crops: left out
        said = caplog.text                                                          # why, and how to refit
        assert f"computes {', '.join(sorted([b['backbone'], b['colour']]))}: detector.margin" in said, said
        assert "until the head is refitted: python main.py train" in said, said
        gone = store.retire_feature_sources(set(b.values()))
        assert set(gone) == {a["backbone"], a["colour"], a["net"]}
        assert set(store.feature_counts()) == set(b.values())


def test_head_learns_in_seconds_rescores_from_cache_and_is_promoted_only_when_better(tmp_path, monkeypatch):
    cfg = taste_config(tmp_path)
    import_rated(cfg, tmp_path, 24)
    with Store.open(cfg.db_path) as store:
        started = time.monotonic()
        out = train(cfg, store)
        assert time.monotonic() - started < 30
        assert out.promoted and out.version.startswith("head-") and out.head["used"]
        assert out.head["blend"] == 1.0                    # the untrained network has no say
        assert out.metrics["pearson"] > 0.8, out.metrics
        active = store.active_model()
        assert active["version"] == out.version
        assert (cfg.models_path / active["path"]).stat().st_size < 2_000_000   # names the network, no copy

        # Unlabelled pictures: a warm one ranks above a cool one, scored from cached features only.
        fresh = []
        for i, warm in ((100, True), (101, False)):
            (tmp_path / "inbox" / f"n{i}.png").write_bytes(themed(i, warm))
        analyzer = build_analyzer(store, cfg.detector, cfg.scorer, cfg.paths)
        for i in (100, 101):
            im = Image.open(tmp_path / "inbox" / f"n{i}.png")
            fresh.append(analyzer.analyze([im])[0].score)
        assert fresh[0] > fresh[1] + 1, fresh

        from tests.test_learning import rescore_now
        monkeypatch.setattr(rescore_module, "load_media", lambda *a, **k: pytest.fail("decoded a picture"))
        scorer = load_scorer(active, cfg.scorer, cfg.models_path, margin=cfg.detector.margin)
        assert rescore_now(cfg, scorer) == 24
        scores = store.execute("SELECT images.score, labels.value FROM images JOIN labels ON labels.image_id = images.id")
        warm = [r["score"] for r in scores if r["value"] == 5]
        cool = [r["score"] for r in scores if r["value"] == 1]
        assert min(warm) > max(cool)
        monkeypatch.undo()

        # The training pictures' ratings turned upside down (the validation ones kept): the refitted
        # head is worse on validation, so the daemon's refit is neither used nor written.
        files = set(cfg.models_path.iterdir())
        rows = store.execute("SELECT labels.id, labels.value, images.sha256 FROM labels "
                             "JOIN images ON images.id = labels.image_id")
        flipped = [r for r in rows if split_of(r["sha256"], cfg.train.val_share) == "train"]
        assert flipped and len(flipped) < len(rows)
        with store.db.conn:
            for r in flipped:
                store.db.execute("UPDATE labels SET value = ? WHERE id = ?", [6 - r["value"], r["id"]])
        worse = train(cfg, store, keep=False)               # as the daemon refits
        assert not worse.promoted and "kept, not used" in worse.reason
        assert store.active_model()["version"] == out.version
        assert set(cfg.models_path.iterdir()) == files and store.get_model(worse.version) is None
        by_hand = train(cfg, store)                         # `main.py train`: registered, not used
        assert not by_hand.promoted and store.get_model(by_hand.version)["active"] == 0


async def _post_rating(session, base, image_id, value):
    async with session.post(f"{base}/rate/{image_id}", json={"value": value}, headers={"Origin": base}) as resp:
        assert resp.status == 200, await resp.text()


async def test_a_gallery_rating_changes_the_ranking_within_the_refit_delay_without_a_training_process(tmp_path,
                                                                                                   caplog):
    import logging

    from bot.learning import MARK, new_feedback

    caplog.set_level(logging.INFO)

    cfg = taste_config(tmp_path)
    import_rated(cfg, tmp_path, 16)
    with Store.open(cfg.db_path) as store:    # a head fitted on these 16, as a daemon would have
        before = train(cfg, store).version
        store.set_setting(MARK, new_feedback(store, None)[1])
        face = store.execute("SELECT id FROM faces LIMIT 1")[0]["id"]   # a replaced network's score
        store.save_face_features({face: {"net:retired-network": [3.0, 0.1]}})
        current = set(store.feature_counts()) - {"net:retired-network"}
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        for i in range(200, 206):
            (tmp_path / "inbox" / f"q{i}.png").write_bytes(themed(i, i % 2 == 0))

        async def scored():
            rows = await daemon.store.execute("SELECT id FROM images WHERE status = 'scored' AND id NOT IN "
                                              "(SELECT image_id FROM labels)")
            return [r["id"] for r in rows] if len(rows) == 6 else None
        fresh = await wait_for(scored, timeout=60)
        assert (await daemon.store.active_model())["version"] == before   # nothing new to learn yet
        assert "face(s), score " in caplog.text                            # trained: the scores are logged
        assert set(await daemon.store.feature_counts()) == current          # the retired source dropped
        # Rate two more through the gallery: the daemon refits the head itself (16 + 2 labels).
        async with aiohttp.ClientSession() as session:
            await _post_rating(session, daemon.gallery_url.rstrip("/"), fresh[0], 5)
            await _post_rating(session, daemon.gallery_url.rstrip("/"), fresh[1], 1)

        async def refitted():
            row = await daemon.store.active_model()
            return row["version"] if row["version"] != before else None
        version = await wait_for(refitted, timeout=30)

        async def rescored():
            rows = await daemon.store.execute(
                "SELECT id, score, model_version FROM images WHERE id IN (?, ?, ?, ?)", fresh[2:])
            return rows if all(r["model_version"] == version for r in rows) else None
        rows = {r["id"]: r["score"] for r in await wait_for(rescored, timeout=30)}
        names = {r["id"]: r["media_path"] for r in await daemon.store.execute("SELECT id, media_path FROM images")}
        assert daemon.models.retrainer.runs == 0 and daemon.stats["refits"] >= 1
        warm = [s for i, s in rows.items() if _is_warm(cfg, names[i])]
        cool = [s for i, s in rows.items() if not _is_warm(cfg, names[i])]
        assert warm and cool and min(warm) > max(cool), (warm, cool)
    finally:
        await daemon.stop()


def _is_warm(cfg, media_path) -> bool:
    r, _, b = Image.open(cfg.media_path / media_path).convert("RGB").resize((1, 1)).getpixel((0, 0))
    return r > b


@pytest.mark.slow
def test_kill_during_refits_loses_nothing_and_leaves_a_usable_active_model(tmp_path):
    cfg = taste_config(tmp_path)
    import_rated(cfg, tmp_path, 24)
    with Store.open(cfg.db_path) as store:
        labels = store.execute("SELECT * FROM labels ORDER BY id")
    for delay in (0.5, 1.5, 3.0, 5.0):
        proc = subprocess.Popen([sys.executable, str(MAIN), "train"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        with Store.open(cfg.db_path) as store:
            assert store.execute("SELECT * FROM labels ORDER BY id") == labels
            assert store.execute("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
            active = store.active_model()
            load_scorer(active, cfg.scorer, cfg.models_path, margin=cfg.detector.margin)     # complete, whichever it is
    finished = subprocess.run([sys.executable, str(MAIN), "train"], cwd=tmp_path, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert not list(cfg.models_path.glob("*.tmp")) and not list(cfg.models_path.glob(".*.tmp"))  # litter cleared


def test_comparisons_import_and_train_the_head(tmp_path):
    from tests.helpers import cli

    cfg = taste_config(tmp_path)
    import_rated(cfg, tmp_path, 12)
    # 16 more pictures, never rated: the owner only said which of two they prefer (warm wins).
    lines = ["winner,loser"]
    for i in range(50, 66, 2):
        (tmp_path / f"c{i}.png").write_bytes(themed(i, True))
        (tmp_path / f"c{i + 1}.png").write_bytes(themed(i + 1, False))
        lines.append(f"c{i}.png,c{i + 1}.png")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    out = cli(tmp_path, "import-labels", "pairs.csv", "--crops")
    assert out.returncode == 0, out.stdout + out.stderr
    with Store.open(cfg.db_path) as store:
        pairs = store.comparisons()
        assert len(pairs) == 8
        sha = {r["id"]: r["sha256"] for r in store.execute("SELECT id, sha256 FROM images")}
        on_train = [p for p in pairs if split_of(sha[p["winner_id"]], cfg.train.val_share) == "train"
                    and split_of(sha[p["loser_id"]], cfg.train.val_share) == "train"]
        result = train(cfg, store)
        assert result.head["used"] and result.head["pairs"] == len(on_train) > 0
        scorer = load_scorer(store.get_model(result.version), cfg.scorer, cfg.models_path,
                             margin=cfg.detector.margin)
        faces = {f["image_id"]: f for f in store.execute("SELECT faces.*, images.media_path FROM faces "
                                                         "JOIN images ON images.id = faces.image_id")}
        vectors = features_module.ensure_features(store, scorer.extractor, list(faces.values()), cfg.media_path,
                                                  margin=cfg.detector.margin)
        scores = dict(zip(faces, scorer.predict_features([vectors[f["id"]] for f in faces.values()])[0]))
        assert all(scores[p["winner_id"]] > scores[p["loser_id"]] for p in pairs)


def test_temporary_model_files_of_dead_writers_are_cleared_and_nothing_else(tmp_path):
    from scorer.train import clear_temporary_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".head-1.pt.{dead.pid}.tmp": False,            # save_model's temporary file, writer gone
        f".embedder.pt.{dead.pid}.77.tmp": False,       # the identity embedder's (pid, thread)
        ".big.pt.99999999999999999999.tmp": False,      # a pid too large for the OS: not running
        f".head-2.pt.{os.getpid()}.tmp": True,  # its writer (this process) still runs
        ".notes.tmp": True,                             # not one of ours
        "model.pt": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert clear_temporary_files(tmp_path) == 3
    assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept}


def test_head_refits_do_not_count_as_the_last_training(tmp_path):
    with Store.open(tmp_path / "t.db") as store:
        store.register_model("full-1", "resnet18", "full-1.pt", metrics={"pearson": 0.5})
        full_at = store.latest_training_at()
        time.sleep(0.01)
        store.register_model("head-1", "resnet18", "head-1.pt", metrics={"pearson": 0.6})
        assert store.latest_training_at() == full_at


def test_full_training_warm_starts_only_from_a_trained_network(tmp_path):
    import json

    cfg = taste_config(tmp_path)
    import_rated(cfg, tmp_path, 12)
    with Store.open(cfg.db_path) as store:
        head = train(cfg, store)                      # a head on the untrained starting network
        assert head.promoted

        def warm(version):
            return json.loads(store.get_model(version)["metrics"])["warm_start"]
        first = train(cfg, store, full=True, epochs=1)
        assert not warm(first.version)                # not from the untrained network behind the head
        store.activate_model(first.version)
        assert warm(train(cfg, store, full=True, epochs=1).version)


def test_taking_a_label_or_comparison_back_counts_as_new_feedback(tmp_path):
    from bot.learning import new_feedback

    from tests.helpers import make_config, seed

    cfg = make_config(tmp_path)
    ids = seed(cfg, [{"popularity": 1}, {"popularity": 2}, {"popularity": 3}])
    with Store.open(cfg.db_path) as store:
        store.add_label(ids[0], 5, origin="gallery", user="owner")
        comparison = store.add_comparison(ids[1], ids[2], origin="gallery")
        n, mark = new_feedback(store, None)
        assert n == 2 and new_feedback(store, mark) == (0, None)
        time.sleep(0.01)
        store.remove_label(ids[0], origin="gallery", user="owner")
        n, later = new_feedback(store, mark)
        assert n == 1 and later > mark
        time.sleep(0.01)
        store.remove_comparison(comparison)
        assert new_feedback(store, later)[0] == 1


def test_models_use_loads_a_head_at_the_configured_margin_without_saying_it_is_left_out(tmp_path, caplog):
    """`models use` checks that the version loads as the daemon will load it: at detector.margin.
    A head fitted at margin 0.3 is its own there, not "fitted on crops this configuration does
    not compute" (a false warning when the check loaded it at the default 0.2)."""
    import logging

    from scorer.registry import use_model

    cfg = taste_config(tmp_path, extra="[detector]\nmargin = 0.3\n")
    import_rated(cfg, tmp_path, 24)
    with Store.open(cfg.db_path) as store:
        result = train(cfg, store)
        assert result.head["used"]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert use_model(store, cfg.scorer, cfg.models_path, result.version,
                             margin=cfg.detector.margin)["active"] == 1
        assert not [r for r in caplog.records if "taste head" in r.getMessage()]
        assert load_scorer(store.active_model(), cfg.scorer, cfg.models_path, margin=0.3).head is not None


async def test_a_head_left_out_after_a_margin_change_is_refitted_by_the_daemon_without_a_new_rating(tmp_path):
    """detector.margin changed since the head was fitted: the daemon loads the model with its head
    set aside and refits it at once on the labels so far (not at the next rating), then scores
    with the new head."""
    from bot.learning import MARK, new_feedback

    cfg = taste_config(tmp_path)
    import_rated(cfg, tmp_path, 16)
    with Store.open(cfg.db_path) as store:    # a head fitted at the default margin, every label seen
        before = train(cfg, store).version
        store.set_setting(MARK, new_feedback(store, None)[1])
    cfg = taste_config(tmp_path, "[detector]\nmargin = 0.3\n")
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        assert daemon.analyzer.scorer.version == before and daemon.analyzer.scorer.head is None

        async def refitted():
            row = await daemon.store.active_model()
            return row["version"] if row["version"] != before else None
        version = await wait_for(refitted, timeout=60)
        await wait_for(lambda: _async(daemon.analyzer.scorer.version == version), timeout=30)
        scorer = daemon.analyzer.scorer
        assert scorer.head is not None and not scorer.head_left_out
        assert all(s.endswith("@m30") for b, s in scorer.head.sources.items() if b in ("backbone", "colour"))
        assert daemon.stats["refits"] == 1
    finally:
        await daemon.stop()


async def _async(value):
    return value


async def test_a_left_out_head_whose_refit_waited_for_a_training_run_is_refitted_after_it(monkeypatch, caplog):
    """The refit for a left-out head found train.lock held (a training run): it is tried again at
    the next check, not only after the next rating (and the reason is said once, not at each)."""
    import asyncio
    import logging
    import types

    import bot.learning

    calls = []
    monkeypatch.setattr(bot.learning, "refit_head", lambda cfg: calls.append(cfg))   # None: the lock is held

    class FakeStore:
        async def call(self, fn, *args):
            return 0, None                   # no new label

        async def set_setting(self, key, value):
            pass

    scorer = types.SimpleNamespace(version="v1", head_left_out=["colour@m20"])
    models = types.SimpleNamespace(analyzer=types.SimpleNamespace(scorer=scorer),
                                   retrainer=types.SimpleNamespace(running=False))
    learner = bot.learning.Learner(types.SimpleNamespace(), FakeStore(), models, asyncio.Event(), {})
    assert await learner.check()
    await learner._task
    caplog.set_level(logging.INFO, "tastefeed.learning")
    assert await learner.check()             # the lock is free now: tried again
    await learner._task
    assert len(calls) == 2
    assert "its taste head is left out" not in caplog.text    # said at the first try only
