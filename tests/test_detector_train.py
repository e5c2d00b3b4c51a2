"""The owner's own YOLO face detector: training on verified boxes, evaluation, switching
(scorer/detector_train.py, scorer/box_metrics.py), and the daemon following a switch
(bot/detector_watch.py). Training runs are tiny (synthetic faces at imgsz 64, a few epochs)."""
from __future__ import annotations

import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw, ImageFilter

from storage.boxes import Box


def face_picture(rnd: random.Random, size=(128, 128)) -> tuple[bytes, list[tuple[int, int, int, int]]]:
    """A noisy background with one or two drawn faces (skin ellipse, two eyes, a mouth) at known
    places; the JPEG bytes and the faces' boxes."""
    w, h = size
    im = Image.new("RGB", size, tuple(rnd.randrange(40, 120) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(8):      # clutter
        x, y = rnd.randrange(w), rnd.randrange(h)
        draw.rectangle([x, y, x + rnd.randrange(5, 30), y + rnd.randrange(5, 30)],
                       fill=tuple(rnd.randrange(0, 256) for _ in range(3)))
    boxes = []
    for _ in range(rnd.choice((1, 1, 2))):
        s = rnd.randrange(30, 50)
        for _try in range(20):
            x, y = rnd.randrange(0, w - s), rnd.randrange(0, h - s)
            if all(x + s <= b[0] or b[2] <= x or y + s <= b[1] or b[3] <= y for b in boxes):
                break
        else:
            continue
        draw.ellipse([x, y, x + s, y + s], fill=(250, 205, 170), outline=(60, 30, 20), width=2)
        e = s // 6
        for ex in (x + s // 3, x + 2 * s // 3):
            draw.ellipse([ex - e, y + s // 3, ex + e, y + s // 3 + 2 * e], fill=(30, 60, 160))
        draw.arc([x + s // 3, y + s // 2, x + 2 * s // 3, y + 4 * s // 5], 20, 160, fill=(150, 40, 40), width=2)
        boxes.append((x, y, x + s, y + s))
    im = im.filter(ImageFilter.GaussianBlur(0.5))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue(), boxes


def store_face_pictures(cfg, n: int, seed: int = 0, verify: bool = True) -> dict[int, list[tuple]]:
    """``n`` synthetic face pictures stored as the daemon stores pictures (scored, with a
    whole-picture box), each verified with its true boxes; image id -> boxes."""
    from scorer.registry import ensure_active_model
    from storage import Store
    from storage.media import inspect, store_media
    from storage.records import Face

    rnd = random.Random(seed)
    out = {}
    with Store.open(cfg.db_path) as store:
        model = ensure_active_model(store, cfg.scorer, cfg.models_path)
        sid = store.upsert_source("synthetic", "booru", {"enabled": False, "interval": 60, "options": {}},
                                  origin="cli")
        for i in range(n):
            data, boxes = face_picture(rnd)
            info, _ = inspect(data)
            rel = store_media(cfg.media_path, data, info)
            [image_id] = store.save_poll(sid, [{"external_id": f"s{seed}-{i}", "page_url": f"https://x.example/{i}",
                                                "author": "a", "title": f"synthetic {i}", "tags": [],
                                                "rating": "general", "popularity": i}], {})
            store.record_download(image_id, info, rel, near_distance=-1)
            store.record_analysis(image_id, [Face(0, 0, info.width, info.height, 1.0, "whole", 3.0, 0.1)], 3.0, 0.1,
                                  model["version"])
            if verify:
                store.verify_boxes(image_id, [Box(*b) for b in boxes])
            out[image_id] = boxes
    return out


# ---- matching, curves, AP (hand-made boxes) ----------------------------------------------------
def test_match_takes_predictions_best_first_and_each_true_box_once():
    from scorer.box_metrics import iou, match

    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == 50 / 150
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0 and iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    truths = [(0, 0, 10, 10), (20, 0, 30, 10)]
    preds = [((0, 0, 10, 10), 0.5),            # exact, but ranked second
             ((1, 0, 11, 10), 0.9),            # IoU .82 with the first face: takes it
             ((21, 0, 31, 10), 0.7),           # the second face
             ((50, 50, 60, 60), 0.8)]          # nowhere
    assert match(preds, truths) == [(0.9, True), (0.8, False), (0.7, True), (0.5, False)]
    assert match(preds, truths, threshold=0.9) == [(0.9, False), (0.8, False), (0.7, False), (0.5, True)]
    assert match([], truths) == [] and match(preds[:1], []) == [(0.5, False)]


def test_pr_curve_and_average_precision():
    from scorer.box_metrics import Curve, average_precision, pr_curve, recall_at_precision

    curve = pr_curve([(0.9, True), (0.8, False), (0.7, True), (0.5, False)], n_true=4)
    assert curve.precision == [1.0, 0.5, 2 / 3, 0.5] and curve.recall == [0.25, 0.25, 0.5, 0.5]
    assert curve.confidence == [0.9, 0.8, 0.7, 0.5]
    # envelope: precision 1 up to recall .25, 2/3 up to .5, nothing after
    assert abs(average_precision(curve) - (0.25 * 1 + 0.25 * 2 / 3)) < 1e-9
    assert average_precision(pr_curve([(0.9, True), (0.1, True)], 2)) == 1.0
    assert average_precision(pr_curve([], 3)) == 0.0 and average_precision(Curve()) == 0.0
    assert recall_at_precision(curve, 0.6) == 0.5 and recall_at_precision(curve, 0.9) == 0.25
    assert recall_at_precision(curve, 1.01) == 0.0


def test_score_reports_the_operating_point_and_map_over_iou_steps():
    from scorer.box_metrics import score

    pictures = [([((0, 0, 10, 10), 0.9), ((40, 40, 50, 50), 0.3)], [(0, 0, 10, 10)]),
                ([((0, 0, 10, 12), 0.6)], [(0, 0, 10, 10), (30, 30, 40, 40)])]
    s = score(pictures, min_confidence=0.5)
    assert s.pictures == 2 and s.true_boxes == 3
    assert s.precision == 1.0 and abs(s.recall - 2 / 3) < 1e-9        # the .3 box is under the threshold
    assert abs(s.map50 - 2 / 3) < 1e-9                                 # both hits rank first
    assert s.map50 > s.map50_95 > 0                                    # the 10x12 box fails IoU .85 and up
    assert score([([], [(0, 0, 5, 5)])]).precision is None


def test_promotion_is_recall_at_the_active_detectors_precision():
    from scorer.box_metrics import Scores, pr_curve, promotion

    def scores(matches, n_true, precision, recall):
        return Scores(pr_curve(matches, n_true), 0, 0, precision, recall, 3, n_true)

    active = scores([(0.9, True), (0.8, False)], 4, precision=0.5, recall=0.25)
    better = scores([(0.9, True), (0.8, True), (0.7, False), (0.6, True), (0.5, False)], 4, None, 0)
    ok, why = promotion(better, active)
    assert ok and "recall 0.750 at precision >= 0.500" in why
    # more recall only at a lower precision than the active one's: not better
    sloppy = scores([(0.9, False), (0.8, False), (0.7, True), (0.6, False), (0.5, True), (0.4, True)], 4, None, 0)
    ok, why = promotion(sloppy, scores([(0.9, True), (0.8, True), (0.7, False)], 4, 2 / 3, 0.5))
    assert not ok and "recall 0.000 at precision >= 0.667" in why
    equal = scores([(0.9, True), (0.8, False)], 4, None, 0)
    assert not promotion(equal, active)[0]                    # as good is not better
    nothing = scores([], 4, None, 0.0)                        # an active detector that finds nothing
    assert promotion(better, nothing)[0]
    assert promotion(better, scores([], 0, None, 0.0)) == (False, "no held-out verified face to compare on")


def test_operating_confidence_is_best_f1_or_most_recall_at_a_precision():
    from scorer.box_metrics import pr_curve
    from scorer.detector_train import at_confidence, operating_confidence

    curve = pr_curve([(0.9, True), (0.8, True), (0.7, False), (0.6, True), (0.2, False)], 3)
    assert operating_confidence(curve) == 0.6            # P .75 R 1: best F1
    assert operating_confidence(curve, precision=0.9) == 0.8
    assert at_confidence(curve, 0.8) == (1.0, 2 / 3) and at_confidence(curve, 0.95) == (None, 0.0)
    assert operating_confidence(pr_curve([], 2)) == 0.25


# ---- dataset and refusals (no training) -------------------------------------------------------
def test_yolo_labels_are_normalised_and_the_dataset_links_the_media(tmp_path):
    from scorer.detector_train import Sample, write_dataset, yolo_label

    (tmp_path / "a.jpg").write_bytes(b"x")
    s = Sample(7, tmp_path / "a.jpg", 200, 100, [(10, 20, 50, 60), (150, 0, 250, 40)])
    assert yolo_label(s) == "0 0.150000 0.400000 0.200000 0.400000\n0 0.875000 0.200000 0.250000 0.400000\n"
    assert yolo_label(Sample(8, s.path, 10, 10, [])) == ""
    data = write_dataset(tmp_path / "ds", [s], [Sample(9, s.path, 10, 10, [])])
    assert (tmp_path / "ds" / "train" / "images" / "7.jpg").resolve() == s.path.resolve()
    assert (tmp_path / "ds" / "train" / "labels" / "7.txt").read_text() == yolo_label(s)
    assert (tmp_path / "ds" / "val" / "labels" / "9.txt").read_text() == ""
    assert "train: train/images" in data.read_text() and "0: face" in data.read_text()


def test_train_with_too_few_verified_pictures_says_how_to_get_them(tmp_path):
    from tests.helpers import cli, make_config

    cfg = make_config(tmp_path)
    store_face_pictures(cfg, 4)
    out = cli(tmp_path, "detector", "train", "--epochs", "1")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: too few verified pictures to train a detector: ")
    assert "detector bootstrap" in out.stderr and "Boxes page" in out.stderr and out.stderr.count("\n") == 1
    assert not (cfg.paths.detectors / "ACTIVE").exists()
    fresh = tmp_path / "fresh"                      # before any data folder: refused, none created
    fresh.mkdir()
    for command in (["train"], ["eval"], ["list"]):
        out = cli(fresh, "detector", *command)
        assert out.returncode == (0 if command == ["list"] else 1) and out.stderr.count("\n") <= 1, out
    assert sorted(p.name for p in fresh.iterdir()) == []


def test_detector_use_and_list(tmp_path):
    from dataclasses import replace

    from scorer import own_detector
    from tests.helpers import cli, make_config

    cfg = make_config(tmp_path)
    out = cli(tmp_path, "detector", "use", "d1")
    assert out.returncode == 1 and out.stderr == ("error: no detector version 'd1' (versions: none yet in "
                                                  f"{cfg.paths.detectors} (python main.py detector train))\n")
    assert not cfg.paths.detectors.exists()                       # a failed use writes nothing
    version = cfg.paths.detectors / "d20260101-000000"
    version.mkdir(parents=True)
    (version / "weights.pt").write_bytes(b"w")
    (version / "metrics.json").write_text('{"mAP50": 0.8, "mAP50-95": 0.4, "confidence": 0.3, "model": "yolov8n.yaml"}')
    listing = cli(tmp_path, "detector", "list").stdout
    assert listing.splitlines()[0].startswith("* config  animeface") and "  d20260101-000000  yolov8n.yaml" in listing
    assert "mAP50 0.800 mAP50-95 0.400" in listing
    out = cli(tmp_path, "detector", "use", "d20260101-000000")
    assert out.returncode == 0 and "detector in use: d20260101-000000" in out.stdout
    assert own_detector.active_version(cfg.paths) == "d20260101-000000"
    assert cli(tmp_path, "detector", "list").stdout.splitlines()[1].startswith("* d20260101-000000")
    eff = own_detector.effective_detector(cfg.detector, cfg.paths)
    assert eff.name == "yolo" and eff.min_confidence == 0.3 and eff.weights.endswith("d20260101-000000/weights.pt")
    assert own_detector.tag(cfg.paths, cfg.detector) == "own:d20260101-000000"
    doctor = [line for line in cli(tmp_path, "doctor").stdout.splitlines() if line.startswith("detector")]
    assert len(doctor) == 1 and "FAIL" in doctor[0] and "d20260101-000000" in doctor[0]   # checks the one in use
    assert cli(tmp_path, "detector", "use", "config").returncode == 0
    assert own_detector.active_version(cfg.paths) is None
    assert own_detector.tag(cfg.paths, cfg.detector) == f"config:{cfg.detector.name}"
    assert own_detector.tag(cfg.paths, replace(cfg.detector, name="yolo", weights="/w/best.pt")) == "config:yolo:best.pt"
    runs = [tmp_path / "runs" / run / "best.pt" for run in ("train", "train2")]   # ultralytics' names
    for i, w in enumerate(runs):
        w.parent.mkdir(parents=True)
        w.write_bytes(b"weights" * (i + 1))
    first, second = (own_detector.tag(cfg.paths, replace(cfg.detector, name="yolo", weights=str(w))) for w in runs)
    assert first.startswith("config:yolo:best.pt@") and second.startswith("config:yolo:best.pt@") and first != second
    assert own_detector.tag(cfg.paths, replace(cfg.detector, name="yolo", weights=str(runs[0]))) == first  # stable
    # A version that finds almost nothing right is refused (its boxes would replace every face)
    weak = cfg.paths.detectors / "d20260102-000000"
    weak.mkdir()
    (weak / "weights.pt").write_bytes(b"w")
    (weak / "metrics.json").write_text('{"mAP50": 0.0, "precision": 0.005, "recall": 0.079, "confidence": 0.0033}')
    out = cli(tmp_path, "detector", "use", "d20260102-000000")
    assert out.returncode == 1 and "finds almost no face right on the held-out pictures (mAP50 0.000" in out.stderr
    assert "--force" in out.stderr and own_detector.active_version(cfg.paths) is None
    assert cli(tmp_path, "detector", "use", "d20260102-000000", "--force").returncode == 0
    assert own_detector.effective_detector(cfg.detector, cfg.paths).min_confidence == own_detector.MIN_CONFIDENCE


def test_leftovers_of_killed_runs_are_removed_but_a_live_runs_folder_stays(tmp_path):
    import os

    from scorer.detector_train import clean_leftovers
    from storage.paths import DataPaths

    paths = DataPaths(tmp_path)
    dead = paths.detectors / ".train-d1-999999999"
    live = paths.detectors / f".train-d2-{os.getpid()}"
    for d in (dead, live):
        (d / "run").mkdir(parents=True)
    assert clean_leftovers(paths) == [dead.name]
    assert not dead.exists() and live.exists()


def test_config_keys_auto_and_train_proposals(tmp_path):
    from bot.config import ConfigError, load_config
    from tests.helpers import write_config

    cfg = load_config(write_config(tmp_path, "[detector]\nauto = true\ntrain_proposals = 0.9\n"))
    assert cfg.detector.auto is True and cfg.detector.train_proposals == 0.9
    with pytest.raises(ConfigError, match="detector.train_proposals"):
        load_config(write_config(tmp_path, "[detector]\ntrain_proposals = 2\n"))


# ---- re-detection in the store (storage/redetect.py) --------------------------------------------
def test_redetection_replaces_faces_keeps_labels_and_names_and_marks_for_rescoring(tmp_path):
    from storage import Store
    from storage.records import Face
    from tests.helpers import make_config, seed

    cfg = make_config(tmp_path)
    a, b, c, d, e = seed(cfg, [{"popularity": i, "faces": 2} for i in range(5)])  # faces (20,20,90,100), (110,20,180,100)
    with Store.open(cfg.db_path) as store:
        fa = [f["id"] for f in store.faces_of(a)]
        store.add_label(a, 5, origin="gallery", face_id=fa[0])
        store.add_label(a, 2, origin="gallery", ref="second", face_id=fa[1])
        store.name_face(fa[0], store.character_id("Miku", create=True), origin="gallery")
        with store.db.conn:          # c was imported as a crop, d is posted, e skipped: not detected again
            store.db.execute("UPDATE faces SET detector = 'crop' WHERE image_id = ?", [c])
            store.db.execute("UPDATE images SET status = 'skipped' WHERE id = ?", [e])
        post = store.post_intent(d, "discord", "1")
        store.post_sent(post, "m1")
        assert [r["id"] for r in store.redetect_candidates("own:v1", 10)] == [a, b]
        assert store.count_redetect_candidates("config") == 0          # NULL: the configured detector found them
        new = [Face(22, 18, 92, 98, 0.8, "yolo"), Face(0, 120, 30, 150, 0.6, "yolo")]
        assert store.record_redetection(a, new, "own:v1")
        faces = store.faces_of(a)
        assert [(f["x1"], f["detector"]) for f in faces] == [(22, "yolo"), (0, "yolo")]
        labels = store.execute("SELECT value, face_id FROM labels WHERE image_id = ? ORDER BY id", [a])
        assert [(r["value"], r["face_id"]) for r in labels] == [(5, faces[0]["id"]), (2, None)]   # both kept
        names = store.execute("SELECT face_id FROM face_names")
        assert [r["face_id"] for r in names] == [faces[0]["id"]]
        row = store.get_image(a)
        assert row["detector_version"] == "own:v1" and row["model_version"] is None and row["score"] == 3.0
        assert [r["id"] for r in store.rescore_candidates("resnet18-random-init", 10)] == [a]
        assert not store.record_redetection(a, new, "own:v1")            # done already
        assert [r["id"] for r in store.redetect_candidates("own:v1", 10)] == [b]
        assert [r["id"] for r in store.redetect_candidates("own:v1", 10, after_id=b)] == []
        store.mark_redetected(b, "own:v1")
        assert store.count_redetect_candidates("own:v1") == 0
        assert store.count_redetect_candidates("config") == 2            # switching back: a and b again
        # Pictures stored before the configured detector was named are adopted by the one a
        # daemon starts with; another configured detector then finds them candidates.
        with store.db.conn:
            store.db.execute("UPDATE images SET detector_version = NULL WHERE id = ?", [a])
            store.db.execute("UPDATE images SET detector_version = 'config' WHERE id = ?", [b])
        assert store.count_redetect_candidates("config:animeface") == 0  # not adopted yet: the configured ones
        assert store.count_redetect_candidates("own:v1") == 2             # (status says so before a start too)
        assert store.adopt_detector_tag("config:animeface") == 4          # a, b, and c and d (never candidates)
        assert store.count_redetect_candidates("config:animeface") == 0
        assert [r["id"] for r in store.redetect_candidates("config:lbp", 10)] == [a, b]
        assert store.adopt_detector_tag("config:lbp") == 0               # nothing left unnamed


# ---- training (slow: a tiny YOLO on synthetic faces) --------------------------------------------
EPOCHS, IMGSZ, PICTURES = 30, 96, 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run through ``train_detector``, with every network connection refused
    and recorded."""
    pytest.importorskip("ultralytics", reason="the yolo extra is not installed")
    from scorer.detector_train import train_detector
    from tests.helpers import make_config

    root = tmp_path_factory.mktemp("own")
    cfg = make_config(root)
    truths = store_face_pictures(cfg, PICTURES)
    attempts, lines = [], []

    def refuse(sock, address, *a, **kw):
        attempts.append(address)
        raise OSError("no network in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.chdir(root)                                  # ultralytics would drop downloaded weights here
        metrics = train_detector(cfg, epochs=EPOCHS, imgsz=IMGSZ, progress=False, say=lines.append)
    return SimpleNamespace(cfg=cfg, root=root, metrics=metrics, lines=lines, attempts=attempts, truths=truths)


def copy_of(trained, tmp_path, auto: bool = False):
    """A config on a copy of the trained data folder (so a test can switch detectors freely)."""
    from tests.helpers import make_config

    shutil.copytree(trained.cfg.data_path, tmp_path / "data", symlinks=True)
    cfg = make_config(tmp_path)
    if auto:
        from dataclasses import replace
        cfg.detector = replace(cfg.detector, auto=True)
    return cfg


@pytest.mark.slow
def test_a_tiny_training_run_finds_the_held_out_faces_offline(trained):
    from scorer import own_detector

    m, cfg = trained.metrics, trained.cfg
    version = m["version"]
    assert own_detector.versions(cfg.paths) == [version]
    assert sorted(p.name for p in (cfg.paths.detectors / version).iterdir()) == ["metrics.json", "weights.pt"]
    assert not [p for p in cfg.paths.detectors.iterdir() if p.name.startswith(".train-")]
    assert m["mAP50"] > 0.2 and m["mAP50-95"] > 0.05, m            # clearly above zero on held-out pictures
    assert m["heldout_pictures"] >= 2 and m["train_pictures"] + m["heldout_pictures"] == PICTURES
    assert m["epochs"] == EPOCHS and m["imgsz"] == IMGSZ and m["model"] == "yolov8n.yaml"
    assert own_detector.metrics_of(cfg.paths, version)["mAP50"] == m["mAP50"]
    assert any(f"held-out mAP50 {m['mAP50']:.3f}, mAP50-95 {m['mAP50-95']:.3f}" in line for line in trained.lines)
    assert trained.lines[-1].startswith(f"to use it: python main.py detector use {version}")
    assert own_detector.active_version(cfg.paths) is None                  # without detector.auto: not used
    labels = sorted((cfg.paths.detectors / "dataset" / "train" / "labels").glob("*.txt"))
    assert len(labels) == m["train_pictures"]
    for line in labels[0].read_text().splitlines():
        assert all(0 <= float(v) <= 1 for v in line.split()[1:])
    # nothing was downloaded: no connection tried, offline mode on, no stock weights fetched anywhere
    assert trained.attempts == [] and os.environ["YOLO_OFFLINE"] == "1"
    assert not [p for p in trained.root.rglob("*.pt") if p.name != "weights.pt" and "models" not in p.parts]
    assert not [p for p in trained.root.rglob("yolo*") if p.suffix in (".pt", ".onnx")]


@pytest.mark.slow
def test_eval_compares_with_the_bootstrap_detectors_and_plots_their_curves(trained, tmp_path):
    from tests.helpers import cli

    cfg = copy_of(trained, tmp_path)
    out = cli(tmp_path, "detector", "eval")
    assert out.returncode == 0, out.stderr
    table = out.stdout.splitlines()
    assert table[0].split() == ["detector", "precision", "recall", "mAP50", "mAP50-95", "ms/picture"]
    names = [line.split()[0] for line in table[1:] if line and not line.startswith(("own:", "precision")) or
             line.startswith("own:")]
    assert f"own:{trained.metrics['version']}" in names and "animeface" in names and "opencv" in names
    own = next(line for line in table if line.startswith("own:")).split()
    assert float(own[3]) == pytest.approx(trained.metrics["mAP50"], abs=0.02)
    png = next(line for line in table if line.startswith("precision-recall curves: ")).split(": ", 1)[1]
    assert png.startswith(str(cfg.eval_path / "detectors")) and open(png, "rb").read(4) == b"\x89PNG"


@pytest.mark.slow
def test_auto_promotes_only_a_detector_that_beats_the_active_one(trained, tmp_path, monkeypatch):
    """The same trained weights come out of two more "runs" (training itself stubbed): against the
    configured animeface, which finds none of the synthetic faces, the first is promoted; the
    second ties with it, the active one, and is kept but not used."""
    from scorer import detector_train, own_detector

    cfg = copy_of(trained, tmp_path, auto=True)
    first = own_detector.weights_of(cfg.paths, trained.metrics["version"])

    def no_training(data_yaml, out, **kw):
        (out / "run" / "weights").mkdir(parents=True)
        return shutil.copyfile(first, out / "run" / "weights" / "last.pt")

    monkeypatch.setattr(detector_train, "train_yolo", no_training)
    said = []
    won = detector_train.train_detector(cfg, epochs=1, imgsz=IMGSZ, progress=False, say=said.append)
    assert won["promoted"] and own_detector.active_version(cfg.paths) == won["version"]
    assert "(animeface)" in won["reason"] and said[-1].startswith(f"now in use: {won['version']}")
    tied = detector_train.train_detector(cfg, epochs=1, imgsz=IMGSZ, progress=False, say=said.append)
    assert not tied["promoted"] and own_detector.active_version(cfg.paths) == won["version"]
    assert f"(own:{won['version']})" in tied["reason"]
    assert said[-1].startswith(f"kept, not used: {tied['version']} does not beat the active detector: recall ")
    assert tied["version"] in own_detector.versions(cfg.paths)


@pytest.mark.slow
def test_a_training_run_killed_half_way_leaves_the_detector_in_use(trained, tmp_path):
    from scorer import own_detector
    from scorer.detector_train import clean_leftovers
    from tests.helpers import MAIN, cli

    cfg = copy_of(trained, tmp_path)
    version = trained.metrics["version"]
    own_detector.set_active(cfg.paths, version)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(MAIN), "detector", "train", "--epochs", "300", "--imgsz", "64"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not list(cfg.paths.detectors.glob(".train-*/run/weights")):   # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.3)
        time.sleep(2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert own_detector.versions(cfg.paths) == [version]                 # no half version
    assert own_detector.active_version(cfg.paths) == version            # still in use
    assert cli(tmp_path, "detector", "list").stdout.splitlines()[1].startswith(f"* {version}")
    assert len(clean_leftovers(cfg.paths)) == 1                          # the next run tidies up
    assert sorted(p.name for p in cfg.paths.detectors.iterdir()) == sorted(["ACTIVE", "dataset", version])


@pytest.mark.slow
async def test_the_daemon_follows_a_switch_and_detects_stored_pictures_again(trained, tmp_path):
    import asyncio

    from bot.daemon import Daemon
    from scorer import own_detector
    from storage import Store
    from tests.helpers import wait_for

    cfg = copy_of(trained, tmp_path)
    version = trained.metrics["version"]
    tag = own_detector.PREFIX + version
    with Store.open(cfg.db_path) as store:
        ids = sorted(trained.truths)
        labelled = ids[0]
        store.add_label(labelled, 4, origin="gallery", face_id=store.faces_of(labelled)[0]["id"])
        model = store.active_model()["version"]

    async def all_done():
        rows = await daemon.store.execute("SELECT detector_version, model_version FROM images")
        return all(r["detector_version"] == tag and r["model_version"] == model for r in rows)

    daemon = Daemon(cfg)
    await daemon.start()
    try:
        assert daemon.detection is not None                          # animeface, in worker processes
        old = daemon.detection
        own_detector.set_active(cfg.paths, version)
        assert await daemon.detectors.check()                        # what the 30 s check does
        assert daemon.detection is None and old.closed               # yolo detects in the scoring thread
        await wait_for(all_done, timeout=120)                        # detected again, then rescored
        assert daemon.stats["redetected"] == PICTURES
    finally:
        await daemon.stop()
    with Store.open(cfg.db_path) as store:
        found = store.execute("SELECT COUNT(*) AS n FROM faces WHERE detector = 'yolo'")[0]["n"]
        assert found >= PICTURES // 2                                 # the own detector's faces now
        labels = store.execute("SELECT image_id, value FROM labels")
        assert [(r["image_id"], r["value"]) for r in labels] == [(labelled, 4)]   # the label is kept
        with store.db.conn:          # a stop half way: some pictures still carry the old detector
            store.db.execute("UPDATE images SET detector_version = NULL WHERE id IN (?, ?)", ids[:2])
    daemon = Daemon(cfg)
    await daemon.start()             # starts with the active own version and resumes
    try:
        assert daemon.analyzer.detector.name == "yolo" and daemon.detection is None
        await wait_for(all_done, timeout=60)
    finally:
        await daemon.stop()
    await asyncio.sleep(0)


async def test_a_switch_to_a_broken_version_keeps_the_detector_in_use_and_says_so_once(tmp_path, caplog):
    import asyncio
    import logging

    from bot.detector_watch import DetectorWatcher
    from scorer import own_detector
    from tests.helpers import make_config

    cfg = make_config(tmp_path)
    version = cfg.paths.detectors / "d1"
    version.mkdir(parents=True)
    (version / "weights.pt").write_bytes(b"not a model")
    own_detector.set_active(cfg.paths, "d1")
    analyzer = SimpleNamespace(detector="animeface", detector_tag="config")
    pipeline = SimpleNamespace(detection=None, analyzer=analyzer, detector_tag="config")
    watcher = DetectorWatcher(cfg, None, pipeline, None, asyncio.Event(), {})
    caplog.set_level(logging.ERROR, "tastefeed.daemon")
    assert not await watcher.check()
    assert analyzer.detector == "animeface" and watcher.tag == pipeline.detector_tag == "config"
    assert "cannot switch the face detector to own:d1, still detecting with config: " in caplog.text
    caplog.clear()
    assert not await watcher.check() and caplog.text == ""          # said once, not every 30 s


async def test_detecting_stored_pictures_again_logs_its_progress_and_the_counts(tmp_path, caplog, monkeypatch):
    """Re-detection after a switch says when it starts, how far it is after a batch (at most every
    PROGRESS_SECONDS) and what it did when done: a long run is not silent."""
    import asyncio
    import logging

    from bot import detector_watch
    from bot.detector_watch import DetectorWatcher
    from storage import AsyncStore
    from storage.records import Face
    from tests.helpers import make_config, seed

    cfg = make_config(tmp_path)
    ids = seed(cfg, [{"popularity": i} for i in range(5)])
    monkeypatch.setattr(detector_watch, "BATCH", 2)
    monkeypatch.setattr(detector_watch, "PROGRESS_SECONDS", 0)          # a line after every batch
    rescored = []

    def said():
        return [r.getMessage() for r in caplog.records if r.name == "tastefeed.daemon"]

    async def check_model(**kw):
        rescored.append(kw)

    def detect(im):
        return [Face(5, 5, 40, 40, 0.8, "yolo")]

    analyzer = SimpleNamespace(detect=detect, detect_many=lambda ims: [detect(im) for im in ims])
    pipeline = SimpleNamespace(detection=None, analyzer=analyzer, detector_tag="own:v2")
    store = await AsyncStore(cfg.db_path).open()
    try:
        [gone] = await store.execute("SELECT media_path FROM images WHERE id = ?", [ids[-1]])
        (cfg.media_path / gone["media_path"]).unlink()                    # unreadable: skipped
        watcher = DetectorWatcher(cfg, store, pipeline, SimpleNamespace(check_model=check_model),
                                  asyncio.Event(), {"redetected": 0})
        watcher.tag = "own:v2"
        caplog.set_level(logging.INFO, "tastefeed.daemon")
        assert await watcher.redetect() == 4
        lines = said()
        assert lines[0] == "re-detecting 5 stored picture(s) with detector own:v2 in the background"
        progress = [line for line in lines if line.startswith("re-detecting with detector own:v2: ")]
        assert progress == [f"re-detecting with detector own:v2: {n}/5 pictures" for n in (2, 4, 5)]
        assert lines[-1].startswith("re-detection with detector own:v2 done: 4 picture(s) detected again, "
                                    "1 skipped, in ")
        assert rescored == [{"quiet": True}] * 3 and await store.count_redetect_candidates("own:v2") == 0
        caplog.clear()
        monkeypatch.setattr(detector_watch, "PROGRESS_SECONDS", 3600)   # the default rate: no line per batch
        watcher.tag = "config"
        assert await watcher.redetect() == 4
        lines = said()
        assert lines[0] == "re-detecting 5 stored picture(s) with detector config in the background"
        assert not any(line.startswith("re-detecting with detector") for line in lines)
        assert lines[-1].startswith("re-detection with detector config done: 4 picture(s) detected again, ")
        caplog.clear()
        assert await watcher.redetect() == 0 and said() == []      # nothing to do: nothing said
    finally:
        await store.close()


def test_ultralytics_does_not_change_how_a_corrupt_picture_is_refused(tmp_path):
    """ultralytics replaces PIL.Image.open with one that tries to install pi-heif for a file
    Pillow cannot identify; the yolo detector's set-up undoes that."""
    pytest.importorskip("ultralytics", reason="the yolo extra is not installed")
    from scorer.detect import yolo_class
    from storage.media import BadImage, inspect

    yolo_class(tmp_path)
    import PIL.Image
    assert PIL.Image.open.__module__ == "PIL.Image"
    with pytest.raises(BadImage):
        inspect(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)


async def test_a_model_switch_noticed_by_re_detection_logs_its_rescore_at_info(tmp_path, monkeypatch, caplog):
    """Re-detection's check_model(quiet=True) that finds another active model (a promotion,
    `models use`) switches to it: that rescore of every unposted picture is said at info."""
    import asyncio
    import logging
    import types

    from bot import model_watch
    from tests.helpers import make_config

    scorers = {v: types.SimpleNamespace(version=v) for v in ("v1", "v2")}
    monkeypatch.setattr(model_watch, "load_scorer", lambda row, *a, **k: scorers[row["version"]])

    async def rescore_all(store, scorer, *, on_batch, **kw):
        on_batch(5)
        return 5
    monkeypatch.setattr(model_watch, "rescore_all", rescore_all)

    class FakeStore:
        active = "v1"

        async def active_model(self):
            return {"version": self.active}

    cfg = make_config(tmp_path)
    watcher = model_watch.ModelWatcher(cfg, FakeStore(), None, asyncio.Event(), {"rescored": 0})
    watcher.analyzer = types.SimpleNamespace(scorer=scorers["v1"])
    watcher._retired_for = "v1"

    async def retired():
        watcher._retired_for = watcher.analyzer.scorer.version
    monkeypatch.setattr(watcher, "retire_features", retired)
    caplog.set_level(logging.DEBUG, logger="tastefeed")

    def rescored(level):
        return [r for r in caplog.records if r.getMessage().startswith("rescored 5") and r.levelno == level]

    await watcher.check_model(quiet=True)            # the same model: re-detection's own rescore
    await watcher._rescore_task
    assert rescored(logging.DEBUG) and not rescored(logging.INFO)
    caplog.clear()
    watcher.store.active = "v2"                       # a promotion meanwhile
    await watcher.check_model(quiet=True)
    await watcher._rescore_task
    assert watcher.analyzer.scorer.version == "v2" and rescored(logging.INFO)
