"""The box set for training the owner's own detector (storage/boxes.py) on a real SQLite file:
proposals, the owner's verification, the review order, the fixed held-out split."""
from __future__ import annotations

import pytest

from storage import Store
from storage.boxes import Box, is_holdout
from tests.helpers import make_config, seed


@pytest.fixture
def store(tmp_path):
    cfg = make_config(tmp_path)
    ids = seed(cfg, [{"popularity": i} for i in range(6)])
    with Store.open(cfg.db_path) as s:
        s.ids = ids
        yield s


def test_proposals_then_verification_replace_boxes_and_keep_kinds_apart(store):
    a, b = store.ids[:2]
    store.propose_boxes(a, [Box(10, 10, 50, 60, origin="animeface,lbp", confidence=0.9, sure=True),
                            Box(70, 10, 90, 30, origin="lbp", confidence=0.4)], proposed_by="animeface+lbp",
                        certainty=0.4)
    pic = store.box_picture(a)
    assert pic.state == "proposed" and pic.verified == [] and pic.width == 200
    assert [(p.xyxy, p.origin, p.sure) for p in pic.proposed] == [((10, 10, 50, 60), "animeface,lbp", True),
                                                                   ((70, 10, 90, 30), "lbp", False)]
    store.propose_boxes(a, [Box(11, 11, 51, 61)], proposed_by="animeface", certainty=0.6)  # a new round replaces
    assert [p.xyxy for p in store.box_picture(a).proposed] == [(11, 11, 51, 61)]
    store.verify_boxes(a, [Box(12, 10, 52, 60)])
    pic = store.box_picture(a)
    assert pic.state == "verified" and pic.proposed == [] and [v.xyxy for v in pic.verified] == [(12, 10, 52, 60)]
    assert pic.verified[0].origin == "owner" and pic.holdout == is_holdout(a)
    store.verify_boxes(b, [])                                   # a picture with no face is verified too
    assert store.box_picture(b).state == "verified" and store.box_picture(b).verified == []
    assert store.box_picture(store.ids[2]) is None
    with pytest.raises(ValueError, match="no picture #9999"):
        store.propose_boxes(9999, [], proposed_by="x", certainty=0)
    with pytest.raises(ValueError, match="empty box"):
        Box(5, 5, 5, 9)


def test_review_queue_puts_disagreements_first_then_least_certain(store):
    a, b, c, d = store.ids[:4]
    store.propose_boxes(a, [], proposed_by="x", certainty=0.8)
    store.propose_boxes(b, [], proposed_by="x", certainty=0.2)
    store.verify_boxes(c, [Box(1, 1, 20, 20)])
    store.verify_boxes(d, [Box(1, 1, 20, 20)])
    assert [p.image_id for p in store.box_review_queue(10)] == [b, a]       # verified ones are done
    store.propose_boxes(c, [Box(100, 1, 120, 20, origin="own:v1")], proposed_by="own:v1", certainty=0.5,
                        disagreement=0.7)
    queue = store.box_review_queue(10)
    assert [p.image_id for p in queue] == [c, b, a]
    assert queue[0].state == "verified" and [v.xyxy for v in queue[0].verified] == [(1, 1, 20, 20)]
    assert [p.xyxy for p in queue[0].proposed] == [(100, 1, 120, 20)]
    assert store.box_counts() == {"proposed": 2, "verified": 2, "holdout": int(is_holdout(c)) + int(is_holdout(d)),
                                  "to_review": 3, "boxes": 2}
    store.verify_boxes(c, [Box(1, 1, 20, 20), Box(100, 1, 120, 20)])       # accepting clears the disagreement
    assert [p.image_id for p in store.box_review_queue(10)] == [b, a]
    assert [p.image_id for p in store.proposed_box_pictures(min_certainty=0.5)] == [a]
    assert store.box_picture_ids() == {a, b, c, d}


def test_a_skipped_picture_goes_to_the_back_of_the_queue_and_stays_there_after_a_restart(store):
    a, b, c, d = store.ids[:4]
    store.propose_boxes(a, [], proposed_by="x", certainty=0.1)
    store.propose_boxes(b, [], proposed_by="x", certainty=0.2)
    store.propose_boxes(c, [], proposed_by="x", certainty=0.3)

    def queue(s=store):
        return [p.image_id for p in s.box_review_queue(10)]

    assert queue() == [a, b, c]
    assert store.skip_box_picture(a)
    assert queue() == [b, c, a]                      # the back of the queue, not gone
    assert store.skip_box_picture(b)
    assert queue() == [c, a, b]                      # skipped ones come back in the order they were skipped
    assert not store.skip_box_picture(d)             # not in the box set: nothing to skip
    assert not store.skip_box_picture(9999)
    path = store.path
    store.close()
    with Store.open(path) as again:                  # a restart keeps the order
        assert queue(again) == [c, a, b]
        again.skip_box_picture(c)
        assert queue(again) == [a, b, c]             # every other one was seen: a comes back first
        again.verify_boxes(d, [Box(1, 1, 20, 20)])
        again.propose_boxes(d, [], proposed_by="own:v1", certainty=0.5, disagreement=0.4)
        again.skip_box_picture(d)
        assert queue(again) == [a, b, c, d]
        again.propose_boxes(d, [], proposed_by="own:v2", certainty=0.5, disagreement=0.6)
        assert queue(again) == [d, a, b, c]          # a new detector's proposals: to the front again
        again.skip_box_picture(a)
        again.verify_boxes(a, [])                    # accepting ends the skip (it leaves the queue)
        assert queue(again) == [d, b, c] and again.box_picture(a).state == "verified"


def test_holdout_split_is_fixed_by_id_and_about_one_in_five(store):
    assert [is_holdout(i) for i in range(1000)] == [is_holdout(i) for i in range(1000)]
    assert 150 < sum(is_holdout(i) for i in range(1000)) < 250
    for i in store.ids:
        store.verify_boxes(i, [Box(1, 1, 9, 9)])
    held = {p.image_id for p in store.verified_box_pictures(holdout=True)}
    train = {p.image_id for p in store.verified_box_pictures(holdout=False)}
    assert held == {i for i in store.ids if is_holdout(i)} and train == set(store.ids) - held
    assert [p.image_id for p in store.verified_box_pictures()] == sorted(store.ids)


def test_deleting_a_picture_removes_its_boxes(store):
    a = store.ids[0]
    store.verify_boxes(a, [Box(1, 1, 9, 9)])
    with store.db.conn:
        store.db.execute("DELETE FROM images WHERE id = ?", [a])
    assert store.box_picture(a) is None
    assert store.db.execute("SELECT COUNT(*) FROM boxes").fetchone()[0] == 0


def test_own_detector_versions_and_the_active_one(tmp_path):
    from scorer.detect import DetectorConfig
    from scorer.own_detector import active_version, effective_detector, set_active, versions, weights_of
    from storage.paths import DataPaths
    paths = DataPaths(tmp_path / "data")
    cfg = DetectorConfig(name="animeface", max_side=900)
    assert versions(paths) == [] and active_version(paths) is None and effective_detector(cfg, paths) == cfg
    (paths.detectors / "d2").mkdir(parents=True)                 # a run that did not finish: no weights
    (paths.detectors / "d1").mkdir()
    weights_of(paths, "d1").write_bytes(b"pt")
    assert versions(paths) == ["d1"]
    with pytest.raises(ValueError, match="no detector version 'd2'"):
        set_active(paths, "d2")
    set_active(paths, "d1")
    eff = effective_detector(cfg, paths)
    assert active_version(paths) == "d1" and eff.name == "yolo" and eff.weights == str(weights_of(paths, "d1"))
    assert eff.max_side == 900
    weights_of(paths, "d1").unlink()                            # weights gone: back to the configured one
    assert active_version(paths) is None
    weights_of(paths, "d1").write_bytes(b"pt")
    set_active(paths, None)
    assert active_version(paths) is None
