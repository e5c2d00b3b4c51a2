import xml.etree.ElementTree as ET

from PIL import Image

from scorer.detect import AnimeFaceDetector, OpenCVDetector, animeface_raw, crop_face
from storage.records import Face
from tests.helpers import shared


def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_animeface_finds_faces_in_most_illustrations():
    files = sorted(shared("illustrations").glob("*.jpg"))
    det = AnimeFaceDetector(max_side=1024)
    found = {}
    for path in files:
        im = Image.open(path).convert("RGB")
        faces = det.detect(im)
        for f in faces:
            assert 0 <= f.x1 < f.x2 <= im.width and 0 <= f.y1 < f.y2 <= im.height
            assert 0.5 <= f.confidence <= 1.0 and f.detector == "animeface"
        found[path.name] = len(faces)
    assert sum(1 for n in found.values() if n) >= 0.8 * len(files), found


def test_animeface_shim_works_with_this_pillow_where_the_package_call_does_not():
    import PIL
    import animeface
    im = Image.open(sorted(shared("illustrations").glob("grapeot_*.jpg"))[0]).convert("RGB")
    assert len(animeface_raw(im)) >= 1
    if int(PIL.__version__.split(".")[0]) >= 12:
        assert animeface.detect(im) == []  # the upstream call is broken here; ours is not


def test_animeface_on_pictures_without_faces():
    det = AnimeFaceDetector()
    assert det.detect(Image.new("RGB", (200, 150), "white")) == []
    assert det.detect(Image.new("RGB", (1, 1))) == []


def test_opencv_matches_most_labelled_photo_faces():
    root = shared("photo-faces")
    det = OpenCVDetector(min_confidence=0.0, min_size=16)
    total = hit = 0
    for node in ET.parse(root / "testing.xml").getroot().iter("image"):
        im = Image.open(root / node.get("file")).convert("RGB")
        faces = [(f.x1, f.y1, f.x2, f.y2) for f in det.detect(im)]
        for b in node.iter("box"):
            left, top, w, h = (int(b.get(k)) for k in ("left", "top", "width", "height"))
            total += 1
            hit += any(iou((left, top, left + w, top + h), f) >= 0.3 for f in faces)
    assert total > 0 and hit >= 0.8 * total, (hit, total)


def test_detector_boxes_map_back_after_downscaling():
    im = Image.open(sorted(shared("illustrations").glob("grapeot_*.jpg"))[0]).convert("RGB")
    big = im.resize((im.width * 3, im.height * 3))
    small_faces = AnimeFaceDetector(max_side=4000).detect(im)
    big_faces = AnimeFaceDetector(max_side=im.width).detect(big)
    assert small_faces and big_faces
    a, b = small_faces[0], big_faces[0]
    assert iou((a.x1 * 3, a.y1 * 3, a.x2 * 3, a.y2 * 3), (b.x1, b.y1, b.x2, b.y2)) > 0.7


def test_crop_adds_margin_squares_and_clips():
    im = Image.new("RGB", (100, 100))
    crop = crop_face(im, Face(40, 40, 60, 60, 1.0, "t"), margin=0.5)
    assert crop.size == (40, 40)
    # A 60 px square around (10, 15), clipped at the top left; one around (95, 90) at the bottom right.
    edge = crop_face(im, Face(0, 0, 20, 30, 1.0, "t"), margin=0.5)
    assert edge.size == (40, 45)
    corner = crop_face(im, Face(90, 80, 100, 100, 1.0, "t"), margin=0.5)
    assert corner.size == (25, 30)
