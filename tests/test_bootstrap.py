"""Bootstrap proposals for the owner's own detector (scorer/bootstrap.py): merging several
detectors' boxes on synthetic known boxes, the picture's certainty, which pictures are picked, the
``detector bootstrap`` command on a real SQLite store (scripted detectors, and once the real ones
on ../shared/data), and the second round: an active own detector checked against verified boxes."""
from __future__ import annotations

import shutil

import pytest

from scorer import bootstrap
from scorer.bootstrap import (NO_FACE_CERTAINTY, f1_score, merge_boxes, pick_pictures, picture_certainty,
                              run_bootstrap)
from scorer.detect import LBP_URL
from storage import Store
from storage.boxes import Box
from storage.records import Face
from tests.fake_detectors import Scripted
from tests.helpers import cli, make_config, seed, shared


def face(x1, y1, x2, y2, c=0.9, name="x"):
    return Face(x1, y1, x2, y2, c, name)


# ---- merging -----------------------------------------------------------------------------------
def test_boxes_two_detectors_agree_on_are_one_sure_box_and_single_ones_stay_unsure():
    boxes = merge_boxes({
        "animeface": [face(10, 10, 50, 50, 0.9), face(200, 10, 240, 50, 0.8)],
        "lbp": [face(14, 12, 54, 52, 0.7)],                       # IoU with animeface's first: 0.72
        "haar": [face(100, 100, 140, 140, 0.6)],
    }, threshold=0.3)
    assert len(boxes) == 3
    sure = boxes[0]
    assert sure.sure and sure.origin == "animeface,lbp" and sure.xyxy == (12, 11, 52, 51)   # the mean box
    assert sure.confidence == pytest.approx(0.5 + 0.5 * 0.8)
    single = {b.origin: b for b in boxes[1:]}
    assert set(single) == {"animeface", "haar"} and not any(b.sure for b in single.values())
    assert single["animeface"].confidence == pytest.approx(0.4) and single["haar"].confidence == pytest.approx(0.3)
    assert all(b.confidence <= 0.5 < sure.confidence for b in single.values())


def test_three_detectors_make_one_box_and_one_detectors_two_boxes_never_merge():
    boxes = merge_boxes({"a": [face(0, 0, 40, 40), face(4, 4, 44, 44, 0.8)],      # two faces of one detector
                         "b": [face(2, 2, 42, 42, 0.7)], "c": [face(1, 1, 41, 41, 0.6)]})
    assert [(b.origin, b.sure) for b in boxes] == [("a,b,c", True), ("a", False)]
    # below the threshold they stay apart, both unsure
    apart = merge_boxes({"a": [face(0, 0, 40, 40)], "b": [face(30, 30, 70, 70)]}, threshold=0.3)
    assert len(apart) == 2 and not any(b.sure for b in apart)
    assert merge_boxes({"a": [face(5, 5, 5, 40)], "b": []}) == []                 # empty boxes are left out


def test_certainty_is_high_when_all_boxes_are_sure_and_low_with_an_unsure_one():
    all_sure = merge_boxes({"a": [face(0, 0, 40, 40, 0.9)], "b": [face(1, 1, 41, 41, 0.9)]})
    mixed = merge_boxes({"a": [face(0, 0, 40, 40, 0.9), face(100, 0, 140, 40, 0.9)], "b": [face(1, 1, 41, 41, 0.9)]})
    lonely = merge_boxes({"a": [face(0, 0, 40, 40, 0.6)], "b": []})
    order = [picture_certainty(b) for b in (all_sure, [], mixed, lonely)]
    assert order == sorted(order, reverse=True) and order[0] > NO_FACE_CERTAINTY == order[1] >= order[2] > order[3]
    assert order[0] == pytest.approx(0.95) and order[2] == pytest.approx(0.45) and order[3] == pytest.approx(0.3)


def test_f1_matches_boxes_one_to_one_at_iou_half():
    truth = [Box(0, 0, 40, 40), Box(100, 0, 140, 40)]
    assert f1_score([], []) == 1.0
    assert f1_score([Box(1, 1, 41, 41), Box(101, 1, 141, 41)], truth) == 1.0
    assert f1_score([Box(1, 1, 41, 41)], truth) == pytest.approx(2 / 3)                 # one missed
    assert f1_score([Box(1, 1, 41, 41), Box(2, 2, 42, 42)], truth[:1]) == pytest.approx(2 / 3)  # a duplicate
    assert f1_score([Box(30, 30, 70, 70)], truth[:1]) == 0.0                            # IoU below 0.5
    assert f1_score([], truth) == 0.0


# ---- which pictures ----------------------------------------------------------------------------
def test_pictures_are_picked_in_turn_from_each_source_and_size_and_not_twice(tmp_path):
    cfg = make_config(tmp_path)
    small, large = (200, 160), (700, 500)
    a = seed(cfg, [{"popularity": i, "size": small} for i in range(4)] + [{"popularity": 9, "size": large}],
             source="a")
    b = seed(cfg, [{"popularity": i, "size": small} for i in range(3)], source="b")
    with Store.open(cfg.db_path) as store:
        picked = [r["id"] for r in pick_pictures(store, 4)]
        assert len(picked) == 4 and sum(i in a for i in picked) == 2 and sum(i in b for i in picked) == 2
        assert a[4] in picked                                        # the one large picture of source a
        assert picked == [r["id"] for r in pick_pictures(store, 4)]  # a fixed order
        store.propose_boxes(picked[0], [], proposed_by="x", certainty=0.5)
        assert picked[0] not in [r["id"] for r in pick_pictures(store, 100, exclude=store.box_picture_ids())]
        store.db.execute("UPDATE images SET media_pruned_at = '2026-01-01' WHERE id = ?", [b[0]])
        assert b[0] not in [r["id"] for r in pick_pictures(store, 100)]
        assert len(pick_pictures(store, 100)) == 7


# ---- the command -------------------------------------------------------------------------------
SIZES = [(200, 160), (210, 160), (220, 160), (230, 160), (240, 160)]


@pytest.fixture
def scripted(monkeypatch):
    """Three scripted detectors in place of the real ones: on the first size two agree on a face
    and one sees another; on the second one detector alone; the third nothing; the fourth breaks
    the third detector."""
    dets = [("animeface", Scripted("animeface", {SIZES[0]: [(20, 20, 80, 80, 0.9)], SIZES[1]: [(30, 30, 90, 90, 0.7)],
                                                 SIZES[3]: [(20, 20, 80, 80, 0.9)]})),
            ("lbp", Scripted("lbp", {SIZES[0]: [(22, 22, 82, 82, 0.8), (120, 20, 170, 70, 0.6)],
                                     SIZES[3]: [(22, 22, 82, 82, 0.8)]})),
            ("haar", Scripted("haar"))]

    class Breaks(Scripted):
        def _detect(self, im, scale, size):
            if size == SIZES[3]:
                raise RuntimeError("cascade exploded")
            return super()._detect(im, scale, size)
    dets[2] = ("haar", Breaks("haar"))
    monkeypatch.setattr(bootstrap, "bootstrap_detectors", lambda cfg, say=print: list(dets))
    return dets


def test_bootstrap_stores_merged_proposals_and_goes_on_past_missing_and_corrupt_pictures(tmp_path, scripted):
    cfg = make_config(tmp_path)
    ids = seed(cfg, [{"popularity": i, "size": s} for i, s in enumerate(SIZES)])
    with Store.open(cfg.db_path) as store:
        paths = {i: store.get_image(i)["media_path"] for i in ids}
        extra = seed(cfg, [{"popularity": 1, "size": (250, 160)}, {"popularity": 1, "size": (260, 160)}])
        paths.update({i: store.get_image(i)["media_path"] for i in extra})
    (cfg.media_path / paths[extra[0]]).unlink()                                  # missing
    (cfg.media_path / paths[extra[1]]).write_bytes(b"not a picture at all")      # corrupt
    out = cli(tmp_path, "--config", tmp_path / "config.toml", "detector", "bootstrap", "--limit", "50")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"picture #{extra[0]}: skipped: its media file is missing" in lines
    assert any(line.startswith(f"picture #{extra[1]}: skipped: ") for line in lines)
    assert f"picture #{ids[3]}: haar failed on it: cascade exploded" in lines
    summary = next(line for line in lines if line.startswith("proposed boxes for"))
    assert summary.startswith("proposed boxes for 5 picture(s) with animeface+lbp+haar: 4 box(es), 50% sure, "
                              "2 picture(s) without a face; ")
    assert "s per picture" in summary and "2 skipped (media missing or unreadable" in summary
    with Store.open(cfg.db_path) as store:
        pics = {i: store.box_picture(i) for i in ids}
        first = pics[ids[0]]
        assert first.state == "proposed" and first.proposed_by == "animeface+lbp+haar"
        assert [(b.xyxy, b.origin, b.sure) for b in first.proposed] == [((21, 21, 81, 81), "animeface,lbp", True),
                                                                        ((120, 20, 170, 70), "lbp", False)]
        assert first.certainty == pytest.approx(0.3)
        assert pics[ids[1]].certainty == pytest.approx(0.35) and pics[ids[2]].proposed == []
        assert pics[ids[3]].proposed[0].sure                # the broken detector did not stop the others
        assert store.box_picture(extra[0]) is None and store.box_picture(extra[1]) is None
        queue = [p.image_id for p in store.box_review_queue(10)]
        assert queue == [ids[0], ids[1], ids[2], ids[4], ids[3]]   # least certain first
    # A second run passes over the pictures already proposed.
    again = cli(tmp_path, "--config", tmp_path / "config.toml", "detector", "bootstrap", "--limit", "50")
    assert "proposed boxes for 0 picture(s)" in again.stdout and again.returncode == 0


def test_bootstrap_without_a_database_or_with_a_bad_limit_says_so(tmp_path):
    make_config(tmp_path)
    out = cli(tmp_path, "--config", tmp_path / "config.toml", "detector", "bootstrap")
    assert out.returncode == 1 and out.stderr.startswith("error: no database at ")
    out = cli(tmp_path, "--config", tmp_path / "config.toml", "detector", "bootstrap", "--limit", "-3")
    assert out.returncode == 2 and "--limit" in out.stderr
    assert not (tmp_path / "data").exists()


def test_without_a_cascade_the_lbp_detector_is_left_out_with_where_to_get_it(tmp_path):
    cfg = make_config(tmp_path)
    said = []
    names = [n for n, _ in bootstrap.bootstrap_detectors(cfg, said.append)]
    assert names == ["animeface", "haar"]
    assert len(said) == 1 and said[0].startswith("lbp: not used: detector.cascade is not set") and LBP_URL in said[0]


def test_an_active_own_detector_is_checked_against_verified_boxes_and_its_disagreements_come_first(
        tmp_path, monkeypatch):
    from scorer.own_detector import set_active
    cfg = make_config(tmp_path)
    ids = seed(cfg, [{"popularity": i, "size": s} for i, s in enumerate(SIZES[:4])])
    agree, extra_face, missed, _new = ids
    (cfg.paths.detectors / "v1").mkdir(parents=True)
    (cfg.paths.detectors / "v1" / "weights.pt").write_bytes(b"fake weights")
    set_active(cfg.paths, "v1")
    own = Scripted("yolo", {SIZES[0]: [(20, 20, 80, 80, 0.9)],
                            SIZES[1]: [(20, 20, 80, 80, 0.9), (120, 20, 170, 70, 0.8)],
                            SIZES[2]: [], SIZES[3]: [(20, 20, 80, 80, 0.9)]})
    monkeypatch.setattr(bootstrap, "own_detector", lambda cfg, version, **kw: own)
    classic = Scripted("animeface", {SIZES[3]: [(22, 22, 82, 82, 0.8)]})
    with Store.open(cfg.db_path) as store:
        for i in (agree, extra_face, missed):
            store.verify_boxes(i, [Box(21, 21, 81, 81)])
        said = []
        detectors = [("animeface", classic)] + [d for d in bootstrap.bootstrap_detectors(cfg, said.append)
                                                if d[0].startswith("own:")]
        assert [n for n, _ in detectors] == ["animeface", "own:v1"]
        summary = run_bootstrap(store, cfg, detectors, limit=10, progress=False, say=said.append)
        assert (summary.checked, summary.disagreeing, summary.pictures) == (3, 2, 1)
        pics = {i: store.box_picture(i) for i in ids}
        assert pics[agree].disagreement == 0 and pics[agree].state == "verified"
        assert pics[extra_face].disagreement == pytest.approx(1 - 2 / 3)     # F1 2/3: one box too many
        assert pics[missed].disagreement == 1.0                               # found nothing: F1 0
        assert [b.origin for b in pics[extra_face].proposed] == ["own:v1", "own:v1"]
        assert [v.xyxy for v in pics[extra_face].verified] == [(21, 21, 81, 81)]   # the truth stays
        assert pics[_new].proposed_by == "animeface+own:v1" and pics[_new].proposed[0].sure   # the two agree
        queue = [p.image_id for p in store.box_review_queue(10)]
        assert queue == [missed, extra_face, _new]            # disagreements first, then the proposals
        # The same version does not check them again; accepting clears the disagreement.
        store.verify_boxes(missed, [Box(21, 21, 81, 81)])
        again = run_bootstrap(store, cfg, detectors, limit=10, progress=False, say=said.append)
        assert again.checked == 0 and [p.image_id for p in store.box_review_queue(10)] == [extra_face, _new]


def test_an_own_detector_failing_on_a_verified_picture_flags_no_disagreement(tmp_path):
    cfg = make_config(tmp_path)
    [pic] = seed(cfg, [{"popularity": 1}])
    with Store.open(cfg.db_path) as store:
        store.verify_boxes(pic, [Box(21, 21, 81, 81)])
        said = []
        summary = run_bootstrap(store, cfg, [("own:v1", Scripted("yolo", fail=True))], limit=0, progress=False,
                                say=said.append)
        assert said == [f"picture #{pic}: own:v1 failed on it: scripted failure"]
        assert (summary.checked, summary.skipped) == (0, 1)
        assert store.box_picture(pic).disagreement == 0 and store.box_review_queue(10) == []


# ---- the real detectors on real pictures ---------------------------------------------------------
def test_the_real_detectors_propose_sure_boxes_on_illustrations(tmp_path):
    from storage.media import inspect, store_media
    pictures = sorted(shared("illustrations").glob("*.jpg"))[:4]
    cascade = shared("lbpcascade_animeface.xml")
    cfg = make_config(tmp_path, f'[detector]\ncascade = "{cascade}"\nmax_side = 800\n')
    with Store.open(cfg.db_path) as store:
        sid = store.upsert_source("shared", "folder", {"enabled": False, "interval": 60, "options": {}}, origin="cli")
        for n, path in enumerate(pictures):
            info, _ = inspect(path.read_bytes())
            rel = store_media(cfg.media_path, path.read_bytes(), info)
            [image_id] = store.save_poll(sid, [{"external_id": path.name, "page_url": None, "author": None,
                                                "title": path.name, "tags": [], "rating": None,
                                                "popularity": n}], {})
            store.record_download(image_id, info, rel, near_distance=-1)
    out = cli(tmp_path, "--config", tmp_path / "config.toml", "detector", "bootstrap", "--limit", "10")
    assert out.returncode == 0, out.stderr
    assert "proposed boxes for 4 picture(s) with animeface+lbp+haar:" in out.stdout
    with Store.open(cfg.db_path) as store:
        pics = store.box_review_queue(10)
        assert len(pics) == 4
        boxes = [b for p in pics for b in p.proposed]
        assert sum(b.sure for b in boxes) >= 2 and {"animeface,lbp"} & {b.origin for b in boxes}
        for p in pics:
            for b in p.proposed:
                assert 0 <= b.x1 < b.x2 <= p.width and 0 <= b.y1 < b.y2 <= p.height
    shutil.rmtree(tmp_path / "data" / "media", ignore_errors=True)
