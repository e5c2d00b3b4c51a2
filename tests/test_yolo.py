"""The YOLO detector with a tiny model trained here on synthetic data (no downloads).

ultralytics is the optional ``yolo`` extra (``.[dev]`` installs it): without it the tests that
need it are skipped, and the detector fails with one line naming the extra."""
import os
import random
import sys

import pytest
from PIL import Image, ImageDraw

from scorer.detect import DetectorError, YoloDetector, prepare_ultralytics
from tests.helpers import cli, picture


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    pytest.importorskip("ultralytics", reason="the yolo extra is not installed (pip install -e \".[yolo]\")")
    root = tmp_path_factory.mktemp("yolo")
    prepare_ultralytics(root / "config")
    rnd = random.Random(0)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(6):
            im = Image.new("RGB", (64, 64), (200, 200, 200))
            x, y, s = rnd.randrange(4, 30), rnd.randrange(4, 30), rnd.randrange(16, 30)
            ImageDraw.Draw(im).ellipse([x, y, x + s, y + s], fill=(240, 190, 160), outline=(0, 0, 0))
            im.save(root / split / "images" / f"{i}.jpg")
            (root / split / "labels" / f"{i}.txt").write_text(
                f"0 {(x + s / 2) / 64:.4f} {(y + s / 2) / 64:.4f} {s / 64:.4f} {s / 64:.4f}\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: train/images\nval: val/images\nnames:\n  0: face\n")
    from ultralytics import YOLO
    model = YOLO("yolov8n.yaml")
    model.train(data=str(root / "data.yaml"), epochs=1, imgsz=64, batch=6, device="cpu", workers=0,
                amp=False, plots=False, val=False, project=str(root / "runs"), name="t", verbose=False,
                exist_ok=True)
    weights = root / "runs" / "t" / "weights" / "last.pt"
    assert weights.exists()
    return weights


@pytest.mark.slow
def test_yolo_detector_loads_local_weights_and_returns_boxes(tiny_weights, tmp_path):
    det = YoloDetector(str(tiny_weights), config_dir=tmp_path, min_confidence=0.0, min_size=1)
    im = Image.new("RGB", (128, 96), (200, 200, 200))
    ImageDraw.Draw(im).ellipse([40, 30, 90, 80], fill=(240, 190, 160), outline=(0, 0, 0))
    faces = det.detect(im)
    assert faces  # an untrained-ish model still proposes low-confidence boxes at conf ~0
    for f in faces:
        assert f.detector == "yolo" and 0 <= f.confidence <= 1
        assert 0 <= f.x1 <= f.x2 <= 128 and 0 <= f.y1 <= f.y2 <= 96
    assert os.environ["YOLO_OFFLINE"] == "1"


def test_yolo_missing_or_wrong_weights(tmp_path):
    with pytest.raises(DetectorError, match="not found"):
        YoloDetector(str(tmp_path / "none.pt"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(DetectorError, match=r"\.pt or \.onnx"):
        YoloDetector(str(tmp_path / "w.txt"))


def test_without_ultralytics_the_yolo_detector_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics", None)       # as if the yolo extra were not installed
    (tmp_path / "w.pt").write_bytes(b"weights")
    with pytest.raises(DetectorError) as e:
        YoloDetector(str(tmp_path / "w.pt"), config_dir=tmp_path / "ultra")
    assert str(e.value).startswith("the yolo detector needs ultralytics, which is not installed: "
                                   'pip install -e ".[yolo]"') and "\n" not in str(e.value)
    assert not (tmp_path / "ultra").exists()                    # nothing was written first
    (tmp_path / "config.toml").write_text('[detector]\nname = "yolo"\nweights = "w.pt"\n')
    (tmp_path / "a.jpg").write_bytes(picture(1))
    out = cli(tmp_path, "score", "a.jpg")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == f"error: {e.value}\n"
    doctor = cli(tmp_path, "doctor")
    assert doctor.returncode == 1
    assert [line for line in doctor.stdout.splitlines() if line.startswith("detector")] == \
        [f"detector      FAIL  {e.value}"]


@pytest.mark.slow
def test_yolo_detects_several_pictures_in_one_pass_finding_what_it_finds_one_at_a_time(tiny_weights, tmp_path):
    from scorer.box_metrics import iou

    def box(f):
        return (f.x1, f.y1, f.x2, f.y2)

    det = YoloDetector(str(tiny_weights), config_dir=tmp_path, min_confidence=0.0, min_size=1)
    pictures = []
    for i, size in enumerate(((128, 96), (96, 128), (200, 200), (64, 64))):
        im = Image.new("RGB", size, (200, 200, 200))
        ImageDraw.Draw(im).ellipse([10 + i, 12, 50 + i, 52], fill=(240, 190, 160), outline=(0, 0, 0))
        pictures.append(im)
    calls = []
    predict = det.model.predict
    det.model.predict = lambda source, **kw: calls.append(len(source)) or predict(source, **kw)
    together = det.detect_many(pictures)
    assert calls == [4]                                        # one pass for the four
    alone = [det.detect(im) for im in pictures]
    assert calls == [4, 1, 1, 1, 1]
    for im, a, b in zip(pictures, together, alone):
        # the same pictures letterboxed to one shape: its best box is the same as alone
        assert a and b and all(f.detector == "yolo" and 0 <= f.x1 <= f.x2 <= im.width for f in a)
        assert iou(box(a[0]), box(b[0])) >= 0.8 and abs(a[0].confidence - b[0].confidence) < 0.05


@pytest.mark.slow
def test_yolo_on_pictures_decoded_on_the_device_finds_and_crops_what_the_pillow_path_does(tiny_weights, tmp_path):
    """The GPU path (decode on the device, letterbox there, crop there), run on the CPU device:
    the same best box as ultralytics' own letterboxing of the picture, and the same crops."""
    import io

    import numpy as np
    import torch

    from scorer.analyze import Analyzer
    from scorer.box_metrics import iou
    from storage.media import decode_on_device

    det = YoloDetector(str(tiny_weights), config_dir=tmp_path, min_confidence=0.0, min_size=1)
    assert det.decode_device is None                          # on a CPU: Pillow and detect_many
    det._decode_device = torch.device("cpu")
    datas = []
    for i, size in enumerate(((128, 96), (96, 128), (700, 300))):
        im = Image.new("RGB", size, (255, 255, 255) if i == 2 else (200, 200, 200))  # white: a resize overshoots 255
        ImageDraw.Draw(im).ellipse([10 + i, 12, 50 + i, 52], fill=(240, 190, 160), outline=(0, 0, 0))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        datas.append(buf.getvalue())
    tensors = decode_on_device(datas, det.decode_device)
    pictures = [Image.open(io.BytesIO(d)).convert("RGB") for d in datas]
    analyzer = Analyzer(det, scorer=None, margin=0.2)
    seen = []
    predict = det.model.predict
    det.model.predict = lambda source, **kw: seen.append(source) or predict(source, **kw)
    on_device = analyzer.detect_tensors(tensors)
    (batch,) = seen                                           # one pass, in ultralytics' 0-1 range
    assert batch.shape[0] == 3 and 0 <= float(batch.min()) and float(batch.max()) <= 1
    with_pillow = [det.detect(im) for im in pictures]
    for im, a, b in zip(pictures, on_device, with_pillow):
        assert a and all(f.detector == "yolo" and 0 <= f.x1 <= f.x2 <= im.width and 0 <= f.y1 <= f.y2 <= im.height
                         for f in a)
        assert iou((a[0].x1, a[0].y1, a[0].x2, a[0].y2), (b[0].x1, b[0].y1, b[0].x2, b[0].y2)) >= 0.8
    for t, im, faces in zip(tensors, pictures, with_pillow):
        got, want = analyzer.prepare_tensor(t, faces[:3]), analyzer.prepare(im, faces[:3])
        assert [c.size for c in got.crops] == [c.size for c in want.crops]
        assert all(np.array_equal(np.asarray(c), np.asarray(w)) for c, w in zip(got.crops, want.crops))
        assert got.whole.size == want.whole.size
        assert np.abs(np.asarray(got.whole, dtype=int) - np.asarray(want.whole, dtype=int)).mean() < 3


@pytest.mark.slow
def test_yolo_on_the_device_with_no_picture_left_finds_nothing_without_an_error(tiny_weights, tmp_path):
    """Every picture of a batch can be refused by decode_on_device (bench/pipeline.py passes on
    what is left): detecting none is no faces, not an IndexError."""
    from scorer.analyze import Analyzer

    det = YoloDetector(str(tiny_weights), config_dir=tmp_path, min_confidence=0.0, min_size=1)
    det._decode_device = "cpu"
    assert det.detect_tensors([]) == []
    assert Analyzer(det, scorer=None).detect_tensors([]) == []


@pytest.mark.slow
def test_yolo_on_the_device_maps_boxes_back_from_the_letterbox_to_each_pictures_pixels(tiny_weights, tmp_path):
    """detect_tensors letterboxes each picture (scaled, centred on gray) and maps the model's
    boxes back: with a stand-in model that boxes the white patch it sees in its input, each
    picture's face is the patch drawn on it, whatever its shape (the tiny model's own boxes cover
    whole pictures, so they could not show a wrong offset or scale)."""
    import torch
    from types import SimpleNamespace

    det = YoloDetector(str(tiny_weights), config_dir=tmp_path, min_confidence=0.5, min_size=1)
    det.model.overrides["imgsz"] = 640
    patches = {(1000, 400): (700, 100, 900, 300), (300, 900): (40, 600, 200, 800), (200, 150): (20, 30, 120, 100),
               (640, 640): (0, 0, 50, 60)}
    pictures = []
    for (w, h), (x1, y1, x2, y2) in patches.items():
        t = torch.zeros((3, h, w), dtype=torch.uint8)
        t[:, y1:y2, x1:x2] = 255
        pictures.append(t)

    def white_patch(batch, **kw):
        assert batch.shape[1:] == (3, 640, 640) and kw["imgsz"] == 640
        results = []
        for img in batch:
            ys, xs = torch.nonzero(img.min(0).values > 0.9, as_tuple=True)
            box = [[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]]
            results.append(SimpleNamespace(boxes=SimpleNamespace(xyxy=torch.tensor(box), conf=torch.tensor([0.9]))))
        return results

    det.model.predict = white_patch
    found = det.detect_tensors(pictures)
    for (size, patch), faces in zip(patches.items(), found):
        (face,) = faces
        assert face.detector == "yolo" and face.confidence == pytest.approx(0.9)
        tolerance = max(size) / 640 + 1                # one letterbox pixel, in the picture's pixels
        assert all(abs(a - b) <= tolerance for a, b in zip((face.x1, face.y1, face.x2, face.y2), patch)), (size, face)


@pytest.mark.slow
def test_yolo_onnx_exported_at_its_own_size_runs_on_the_device_path(tiny_weights, tmp_path):
    """An .onnx file takes only the size it was exported at (not 640): the device path
    letterboxes to that size, from the first batch on, as the Pillow path does."""
    import shutil

    import torch
    from ultralytics import YOLO

    exported = YOLO(str(tiny_weights)).export(format="onnx", imgsz=96, dynamic=False, verbose=False)
    onnx = tmp_path / "face.onnx"
    shutil.copy(exported, onnx)
    det = YoloDetector(str(onnx), config_dir=tmp_path, min_confidence=0.0, min_size=1)
    det._decode_device = torch.device("cpu")
    pictures = [torch.full((3, h, w), 200, dtype=torch.uint8) for w, h in ((128, 96), (300, 700))]
    found = det.detect_tensors(pictures)                        # the first call: nothing set up yet
    assert len(found) == 2 and all(faces for faces in found)
    for t, faces in zip(pictures, found):
        assert all(0 <= f.x1 <= f.x2 <= t.shape[2] and 0 <= f.y1 <= f.y2 <= t.shape[1] for f in faces)
    assert len(det.detect_tensors(pictures)) == 2


@pytest.mark.slow
def test_the_first_yolo_import_in_a_data_folder_prints_no_ultralytics_settings_banner(tmp_path):
    """ultralytics' first import with a new config folder printed 'Creating new Ultralytics Settings
    ... file' and advice about its own `yolo settings` command into the daemon's log; its warnings
    still show."""
    import subprocess

    pytest.importorskip("ultralytics", reason="the yolo extra is not installed (pip install -e \".[yolo]\")")
    code = ("import logging; from scorer.detect import yolo_class; yolo_class(r'%s'); "
            "logging.getLogger('ultralytics').warning('a warning of its own')" % (tmp_path / "ultralytics"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    said = out.stdout + out.stderr
    assert (tmp_path / "ultralytics" / "Ultralytics" / "settings.json").exists()   # the file is still made
    assert "Ultralytics Settings" not in said and "yolo settings" not in said, said
    assert "a warning of its own" in said, said
