"""The learning loop: importing ratings, training, evaluation, the registry, rescoring, ranking."""
import asyncio
import csv
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from bot.config import load_config
from scorer import dataset
from scorer.analyze import build_analyzer
from scorer.dataset import build_examples, split_of
from scorer.evaluate import better, evaluate_version, metrics
from scorer.import_labels import import_labels, read_rating_rows
from scorer.ranking import is_cold, pick
from scorer.registry import ensure_active_model, load_scorer, use_model
from scorer.rescore import rescore_all
from scorer.train import TrainError, train_from_store, train_lock
from storage import AsyncStore, Store
from tests.helpers import MAIN, cli, picture, shared, wait_for, write_config


def learn_config(root, extra: str = ""):
    body = f'''data_dir = "{root / 'data'}"
[scorer]
image_size = 32
batch_size = 64
backbone_size = 64
device = "cpu"
[train]
min_labels = 20
val_share = 0.3
epochs = 25
patience = 25
{extra}'''
    return load_config(write_config(root, body))


def train(cfg, store, **kwargs):
    """``train_from_store`` with the settings of ``cfg``, as ``main.py train --full`` calls it
    (the network too; tests/test_taste.py covers the head alone)."""
    kwargs.setdefault("full", True)
    return train_from_store(store, cfg.paths, cfg.scorer, cfg.train, margin=cfg.detector.margin,
                            max_pixels=cfg.download.max_pixels, **kwargs)


# ---- reading and importing ratings ---------------------------------------------------------
def test_csv_rows_and_bad_lines_are_reported_with_line_numbers(tmp_path):
    (tmp_path / "pics").mkdir()
    for i in range(3):
        (tmp_path / "pics" / f"{i}.png").write_bytes(picture(i, fmt="PNG"))
    (tmp_path / "pics" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (tmp_path / "ratings.csv").write_text(
        "path,rating\npics/0.png,5\npics/1.png,seven\n\npics/2.png,2\njust-a-path\npics/missing.png,3\n"
        "pics/broken.jpg,4\npics/0.png,0\n")
    rows, errors = read_rating_rows(tmp_path / "ratings.csv")
    assert [(r.path.name, r.rating) for r in rows] == [("0.png", 5), ("2.png", 2), ("missing.png", 3),
                                                       ("broken.jpg", 4)]
    assert [p.message for p in errors] == ["ratings.csv:3: rating 'seven' is not a whole number from 1 to 5",
                                           "ratings.csv:6: expected 'path,rating', got 'just-a-path'",
                                           "ratings.csv:9: rating '0' is not a whole number from 1 to 5"]
    cfg = learn_config(tmp_path)
    store = Store.open(cfg.db_path)
    report = import_labels(store, build_analyzer(store, cfg.detector, cfg.scorer, cfg.paths), rows, cfg.media_path, progress=False)
    assert report.labels_added == 2 and report.new_pictures == 2
    assert any(e.startswith("ratings.csv:7: cannot read") for e in report.errors)
    assert any(e.startswith("ratings.csv:8: broken.jpg:") for e in report.errors)


def test_folder_import_is_idempotent_and_a_new_rating_adds_a_label(tmp_path):
    root = tmp_path / "rated"
    for rating in (1, 3, 5):
        (root / str(rating) / "sub").mkdir(parents=True)
        for i in range(2):
            (root / str(rating) / ("sub" if i else "") / f"p{rating}{i}.jpg").write_bytes(picture(rating * 10 + i))
    (root / "misc").mkdir()
    (root / "misc" / "x.jpg").write_bytes(picture(99))
    cfg = learn_config(tmp_path)
    store = Store.open(cfg.db_path)
    analyzer = build_analyzer(store, cfg.detector, cfg.scorer, cfg.paths)
    rows, errors = read_rating_rows(root)
    assert len(rows) == 6 and [str(p) for p in errors] == ["skipped: misc/: not a rating (expected folders 1 to 5)"]
    first = import_labels(store, analyzer, rows, cfg.media_path, progress=False)
    assert (first.new_pictures, first.labels_added) == (6, 6)
    again = import_labels(store, analyzer, read_rating_rows(root)[0], cfg.media_path, progress=False)
    assert (again.new_pictures, again.known_pictures, again.labels_added, again.labels_unchanged) == (0, 6, 0, 6)
    assert store.execute("SELECT COUNT(*) AS n FROM images")[0]["n"] == 6
    assert store.execute("SELECT COUNT(*) AS n FROM labels")[0]["n"] == 6
    assert all(r["status"] == "scored" and r["faces"] for r in store.training_rows())
    # The owner changes their mind: the picture moves from folder 3 to folder 4.
    (root / "4").mkdir()
    (root / "3" / "p30.jpg").rename(root / "4" / "p30.jpg")
    moved = import_labels(store, analyzer, read_rating_rows(root)[0], cfg.media_path, progress=False)
    assert moved.labels_added == 1
    assert store.execute("SELECT COUNT(*) AS n FROM labels")[0]["n"] == 7  # history kept
    latest = {r["image_id"]: r["value"] for r in store.training_rows()}
    image = store.execute("SELECT id FROM images WHERE title = 'p30.jpg'")[0]["id"]
    assert latest[image] == 4


def test_import_cli_reports_bad_rows_and_crops_skip_detection(tmp_path):
    (tmp_path / "a.png").write_bytes(picture(1, fmt="PNG"))
    (tmp_path / "b.png").write_bytes(picture(2, fmt="PNG"))
    (tmp_path / "r.csv").write_text("a.png,4\nb.png,9\nnope.png,2\n")
    out = cli(tmp_path, "import-labels", "r.csv", "--crops")
    assert out.returncode == 0, out.stderr
    assert "r.csv:2: rating '9'" in out.stderr and "r.csv:3: cannot read" in out.stderr
    assert "1 label(s) added" in out.stdout
    db = sqlite3.connect(tmp_path / "data" / "tastefeed.db")
    assert db.execute("SELECT detector, x1, y1 FROM faces").fetchall() == [("crop", 0, 0)]
    missing = cli(tmp_path, "import-labels", "nothing-here")
    assert missing.returncode == 1 and "no such folder or file" in missing.stderr


# ---- the validation split ------------------------------------------------------------------
def test_split_is_fixed_by_the_picture_and_roughly_stratified():
    rows = list(csv.DictReader(open(shared("animeface-10", "ratings.csv"))))
    import hashlib
    keys = [hashlib.sha256(r["path"].encode()).hexdigest() for r in rows]
    first = [split_of(k, 0.2) for k in keys]
    assert first == [split_of(k, 0.2) for k in keys]  # stable across runs
    fake_rows = [{"image_id": i, "sha256": k, "media_path": "x", "value": int(r["rating"]), "face_id": None,
                  "faces": [{"x1": 0, "y1": 0, "x2": 9, "y2": 9, "confidence": 1, "detector": "crop"}]}
                 for i, (k, r) in enumerate(zip(keys, rows))]
    subset = build_examples(fake_rows[::2], val_share=0.2)
    assert all(e.split == first[e.image_id] for e in subset)  # other labels never move a picture
    for rating in range(1, 6):
        sides = [s for s, r in zip(first, rows) if int(r["rating"]) == rating]
        assert 0.08 < sides.count("val") / len(sides) < 0.35, rating


def test_metrics_and_promotion_rule():
    true = np.array([1, 2, 3, 4, 5, 5, 4, 1, 2, 3], dtype=float)
    m = metrics(true + 0.1, true)
    assert m["pearson"] == 1.0 and m["spearman"] == 1.0 and m["mae"] == pytest.approx(0.1)
    assert m["topk"] == 1 and m["topk_precision"] == 1.0
    worst = metrics(6 - true, true)
    assert worst["pearson"] == -1.0 and worst["topk_precision"] == 0.0
    assert metrics(np.full(10, 3.0), true)["pearson"] is None
    assert better({"pearson": 0.5}, {"pearson": 0.4}) and not better({"pearson": 0.4}, {"pearson": 0.4})
    assert not better({"pearson": 0.45}, {"pearson": 0.4}, margin=0.1)
    assert better({"pearson": 0.1}, None) and not better({"pearson": None}, None)


# ---- training on real data -----------------------------------------------------------------
@pytest.fixture(scope="module")
def rated_crops(tmp_path_factory):
    """A data folder with 325 face crops of animeface-10 and their ratings imported (--crops)."""
    ratings = shared("animeface-10", "ratings.csv")
    root = tmp_path_factory.mktemp("rated")
    rows = list(csv.reader(open(ratings)))[1::3]
    with open(root / "ratings.csv", "w", newline="") as f:
        csv.writer(f).writerows([[str(ratings.parent / p), r] for p, r in rows])
    cfg = learn_config(root)
    store = Store.open(cfg.db_path)
    report = import_labels(store, build_analyzer(store, cfg.detector, cfg.scorer, cfg.paths), read_rating_rows(root / "ratings.csv")[0],
                           cfg.media_path, crops=True, progress=False)
    store.close()
    assert report.labels_added == len(rows) and not report.errors
    return root


def copy_of(rated_crops, tmp_path, extra=""):
    shutil.copytree(rated_crops / "data", tmp_path / "data")
    return learn_config(tmp_path, extra)


def shuffle_labels(store, seed=0):
    rows = store.execute("SELECT id, value FROM labels ORDER BY id")
    values = [r["value"] for r in rows]
    random.Random(seed).shuffle(values)
    with store.db.conn:
        for r, v in zip(rows, values):
            store.db.execute("UPDATE labels SET value = ? WHERE id = ?", [v, r["id"]])


@pytest.mark.slow
def test_training_learns_taste_and_reuses_cached_crops(rated_crops, tmp_path, monkeypatch):
    cfg = copy_of(rated_crops, tmp_path)
    store = Store.open(cfg.db_path)
    decodes = []
    real_load = dataset.load_media
    monkeypatch.setattr(dataset, "load_media", lambda *a, **k: decodes.append(a[1]) or real_load(*a, **k))
    out = train(cfg, store, progress=False)
    n_pictures = out.n_train + out.n_val
    assert len(decodes) == n_pictures == len(set(decodes))  # each picture decoded once over all epochs
    assert len(out.history) > 1
    assert out.promoted and store.active_model()["version"] == out.version
    assert out.metrics["pearson"] > 0.4, out.metrics
    assert out.baseline_version is None and "first trained model" in out.reason  # untrained: no baseline

    decodes.clear()
    cfg.train.warm_start = False
    cfg.train.epochs = 2
    train(cfg, store, promote=False, progress=False)
    assert decodes == []  # the second run reads the crop cache

    control_cfg = copy_of(rated_crops, tmp_path / "control")
    control = Store.open(control_cfg.db_path)
    shuffle_labels(control)
    shuffled = train(control_cfg, control, progress=False)
    assert (shuffled.metrics["pearson"] or 0) < out.metrics["pearson"] - 0.3, (shuffled.metrics, out.metrics)


@pytest.mark.slow
def test_promotion_only_on_improvement_rollback_eval_and_rescore(rated_crops, tmp_path):
    cfg = copy_of(rated_crops, tmp_path)
    store = Store.open(cfg.db_path)
    good = train(cfg, store, progress=False)
    assert good.promoted
    posted = store.execute("SELECT id FROM images ORDER BY id LIMIT 1")[0]["id"]
    with store.db.conn:
        store.db.execute("INSERT INTO posts (image_id, channel, status, created_at) VALUES (?, 'web', 'sent', '')",
                         [posted])
    # A short run from scratch on the training pictures' ratings turned upside down (the
    # validation ones kept) is worse: registered, but not used.
    cfg.train.warm_start, cfg.train.epochs = False, 1
    flip_training_ratings(store, cfg)
    worse = train(cfg, store, progress=False)
    flip_training_ratings(store, cfg)
    assert not worse.promoted and "kept, not used" in worse.reason
    assert store.active_model()["version"] == good.version
    versions = {r["version"]: r for r in store.list_models()}
    assert set(versions) == {"resnet18-random-init", good.version, worse.version}
    assert json.loads(versions[worse.version]["metrics"])["baseline_version"] == good.version

    # Rollback and forward again.
    assert use_model(store, cfg.scorer, cfg.models_path, worse.version, margin=cfg.detector.margin)["active"] == 1
    assert store.active_model()["version"] == worse.version
    use_model(store, cfg.scorer, cfg.models_path, good.version, margin=cfg.detector.margin)
    with pytest.raises(Exception, match="no model 'nope'"):
        use_model(store, cfg.scorer, cfg.models_path, "nope", margin=cfg.detector.margin)

    # Evaluation: the same numbers as training reported, and the plots.
    m, paths, row = evaluate_version(store, cfg.paths, cfg.scorer, cfg.train, margin=cfg.detector.margin,
                                     max_pixels=cfg.download.max_pixels)
    assert row["version"] == good.version and m["pearson"] == good.metrics["pearson"]
    assert [p.name for p in paths] == ["by_rating.png", "pred_vs_true.png", "learning_curve.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)

    # Rescoring: every unposted picture gets the new model's score; the posted one keeps its own.
    scorer = load_scorer(store.active_model(), cfg.scorer, cfg.models_path, margin=cfg.detector.margin)
    n = rescore_now(cfg, scorer)
    versions = {r["id"]: r["model_version"] for r in store.execute("SELECT id, model_version FROM images")}
    assert n == len(versions) - 1
    assert versions[posted] == "resnet18-random-init"
    assert {v for i, v in versions.items() if i != posted} == {good.version}
    assert rescore_now(cfg, scorer) == 0


def flip_training_ratings(store, cfg) -> None:
    """Rating r becomes 6 - r on the training side of the split (twice: as before)."""
    with store.db.conn:
        for r in store.execute("SELECT labels.id, labels.value, images.sha256 FROM labels "
                               "JOIN images ON images.id = labels.image_id"):
            if split_of(r["sha256"], cfg.train.val_share) == "train":
                store.db.execute("UPDATE labels SET value = ? WHERE id = ?", [6 - r["value"], r["id"]])


def rescore_now(cfg, scorer) -> int:
    """``rescore_all`` as ``main.py rescore`` runs it: over an AsyncStore, in its own event loop."""
    async def run():
        store = AsyncStore(cfg.db_path)
        try:
            await store.open()
            return await rescore_all(store, scorer, media_root=cfg.media_path, margin=cfg.detector.margin,
                                     how=cfg.scorer.aggregate, max_pixels=cfg.download.max_pixels,
                                     batch_size=cfg.scorer.batch_size, progress=False)
        finally:
            await store.close()
    return asyncio.run(run())


def test_too_few_labels_and_a_second_run_are_refused(tmp_path):
    cfg = learn_config(tmp_path)
    store = Store.open(cfg.db_path)
    ensure_active_model(store, cfg.scorer, cfg.models_path)
    with pytest.raises(TrainError, match="only 0 labelled picture"):
        train(cfg, store, progress=False)
    with train_lock(cfg.data_path):
        with pytest.raises(TrainError, match="another training run is in progress"):
            with train_lock(cfg.data_path):
                pass
    with train_lock(cfg.data_path):  # released
        pass


@pytest.mark.slow
def test_killed_training_leaves_the_active_model_and_labels(rated_crops, tmp_path):
    cfg = copy_of(rated_crops, tmp_path, "")
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text().replace("epochs = 25", "epochs = 200"))
    before = Store.open(cfg.db_path)
    active = before.active_model()["version"]
    labels = before.execute("SELECT * FROM labels ORDER BY id")
    models = before.list_models()
    before.close()
    proc = subprocess.Popen([sys.executable, str(MAIN), "train", "--full"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        seen.append(line)
        if "epoch 2/200" in line or time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait()
    assert any("epoch 2/200" in line for line in seen), "".join(seen)
    after = Store.open(cfg.db_path)
    assert after.active_model()["version"] == active
    assert after.execute("SELECT * FROM labels ORDER BY id") == labels
    assert [m["version"] for m in after.list_models()] == [m["version"] for m in models]
    assert after.execute("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
    assert not list((tmp_path / "data" / "models").glob("*.tmp"))
    with train_lock(cfg.data_path):  # the dead process's lock is gone
        pass


# ---- cold start ----------------------------------------------------------------------------
def test_cold_start_ranks_by_popularity_and_explores_more(tmp_path):
    cfg = learn_config(tmp_path, "")
    cfg.ranking.exploration, cfg.ranking.cold_exploration = 0.0, 0.0
    store = Store.open(cfg.db_path)
    ensure_active_model(store, cfg.scorer, cfg.models_path)
    a = store.upsert_source("a", "booru", {})
    b = store.upsert_source("b", "rss", {})
    store.save_poll(a, [{"external_id": str(i), "popularity": p} for i, p in enumerate([10, 500, 90])], {})
    store.save_poll(b, [{"external_id": str(i), "popularity": p} for i, p in enumerate([1, 3])], {})
    store.save_poll(b, [{"external_id": "none"}], {})
    with store.db.conn:  # scores that disagree with popularity
        store.db.execute("UPDATE images SET status = 'scored', score = 6 - id")
    store.refresh_popularity()   # scored behind the store's back: its kept percentiles recomputed
    ids = {(r["source_id"], r["external_id"]): r["id"] for r in store.execute("SELECT * FROM images")}
    assert is_cold(store, cfg.train.min_labels)
    picks = pick(store, cfg.ranking, cfg.train.min_labels, 6, channel="web")
    # Percentile within each source: a's 500 and b's 3 lead, whatever the raw numbers.
    assert [p.image["id"] for p in picks[:2]] in ([ids[(a, "1")], ids[(b, "1")]], [ids[(b, "1")], ids[(a, "1")]])
    assert picks[-1].image["id"] == ids[(b, "none")] and picks[-1].reason == "recent"
    assert {p.reason for p in picks[:-1]} == {"popularity"}
    # Once trained with enough labels, the model's score ranks.
    store.register_model("trained", "resnet18", "x.pt", metrics={"val": {}}, activate=True)
    cfg.train.min_labels = 0
    assert not is_cold(store, cfg.train.min_labels)
    assert [p.image["id"] for p in pick(store, cfg.ranking, cfg.train.min_labels, 2, channel="web")] == [1, 2]
    # Exploration share: cold start explores more.
    cfg.ranking.exploration, cfg.ranking.cold_exploration = 0.1, 0.6
    cfg.train.min_labels = 50
    rng = random.Random(0)
    explored = sum(p.exploration for _ in range(200)
                   for p in pick(store, cfg.ranking, cfg.train.min_labels, 1, channel="web", rng=rng))
    assert 90 < explored < 150


# ---- the daemon ----------------------------------------------------------------------------
@pytest.mark.slow
async def test_daemon_retrains_on_schedule_and_after_new_labels(rated_crops, tmp_path):
    from datetime import datetime, timezone

    from bot.daemon import Daemon

    shutil.copytree(rated_crops / "data", tmp_path / "data")
    cfg = learn_config(tmp_path, f'''schedule = "0 4 * * *"
after_new_labels = 2
refit = false
[[sources]]
name = "inbox"
kind = "folder"
interval = 0.5
path = "{tmp_path / 'inbox'}"
settle = 0.2
''')
    cfg.train.epochs = 3
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text().replace("epochs = 25", "epochs = 3"))
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        job = daemon.scheduler.get_job("retrain-schedule")
        assert job is not None and job.next_run_time.hour == 4 and job.next_run_time.minute == 0
        first = daemon.analyzer.scorer.version
        # The labels were imported before any training, so the label trigger wants a run too;
        # the schedule fires first here, and one run at a time is allowed.
        job.modify(next_run_time=datetime.now(timezone.utc))
        await wait_for(lambda: _true(daemon.models.retrainer.running), timeout=10)
        assert not await daemon.models.retrain("a second request")
        # The daemon keeps working while the child process trains.
        (tmp_path / "inbox").mkdir(exist_ok=True)
        (tmp_path / "inbox" / "new.jpg").write_bytes(picture(7))
        await wait_for(lambda: _true(daemon.stats["scored"] >= 1), timeout=30)
        assert daemon.models.retrainer.running
        await wait_for(lambda: _true(daemon.analyzer.scorer.version != first), timeout=120)
        # the child promotes the model, then prints its summary and exits: the daemon may switch first
        await wait_for(lambda: _true(daemon.models.retrainer.last_exit is not None), timeout=60)
        assert daemon.models.retrainer.last_exit == 0 and daemon.models.retrainer.runs == 1
        new = daemon.analyzer.scorer.version
        assert (await daemon.store.active_model())["version"] == new
        await wait_for(lambda: _true(daemon.stats["rescored"] > 0), timeout=60)

        # Two new labels start a run; stopping the daemon stops it, and nothing changes.
        ids = [r["id"] for r in await daemon.store.execute("SELECT id FROM images ORDER BY id LIMIT 2")]
        for image_id in ids:
            await daemon.store.add_label(image_id, 5, origin="web", ref="test")
        await daemon.models.check_new_labels()
        assert daemon.models.retrainer.running and daemon.models.retrainer.runs == 2
        await asyncio.sleep(1)
    finally:
        await daemon.stop()
    assert daemon.models.retrainer.last_exit != 0
    store = Store.open(cfg.db_path)
    assert store.active_model()["version"] == new
    assert store.execute("SELECT COUNT(*) AS n FROM labels WHERE origin = 'web'")[0]["n"] == 2


async def _true(value):
    return value


def test_exploration_picks_the_least_certain_share_of_each_batch(tmp_path):
    cfg = learn_config(tmp_path, "")
    cfg.train.min_labels = 0
    cfg.ranking.exploration = 0.5
    store = Store.open(cfg.db_path)
    ensure_active_model(store, cfg.scorer, cfg.models_path)
    store.register_model("trained", "resnet18", "x.pt", metrics={"val": {}}, activate=True)
    src = store.upsert_source("a", "booru", {})
    store.save_poll(src, [{"external_id": str(i)} for i in range(40)], {})
    with store.db.conn:  # score rises with id; the 10 least certain have low scores
        store.db.execute("UPDATE images SET status = 'scored', score = 1 + id / 10.0, "
                         "uncertainty = CASE WHEN id <= 10 THEN 0.5 + id / 100.0 ELSE 0.01 END")
    picks = pick(store, cfg.ranking, cfg.train.min_labels, 4, channel="web", rng=random.Random(1))
    explore = [p for p in picks if p.exploration]
    assert len(explore) == 2 and {p.reason for p in explore} == {"explore"}
    assert {p.image["id"] for p in explore} <= set(range(1, 11))   # among the most uncertain
    assert [p.image["id"] for p in picks if not p.exploration] == [40, 39]  # the rest by score
    # Candidates refused by `accept` or too close to a posted picture are passed over.
    cfg.ranking.exploration = 0.0
    assert [p.image["id"] for p in pick(store, cfg.ranking, cfg.train.min_labels, 2, channel="web",
                                        accept=lambda r: r["id"] % 2)] == [39, 37]
    with store.db.conn:
        store.db.execute("UPDATE images SET phash = CASE WHEN id = 40 THEN 'ffff000000000000' "
                         "WHEN id = 39 THEN 'ffff000000000001' ELSE printf('%016x', id * 7919) END")
    store.post_intent(40, "web", None)
    assert [p.image["id"] for p in pick(store, cfg.ranking, cfg.train.min_labels, 1, channel="web",
                                        near_distance=4)] == [38]
