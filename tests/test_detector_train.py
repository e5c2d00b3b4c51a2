"""The owner's own YOLO face detector: training on verified boxes, evaluation, switching
(scorer/detector_train.py, scorer/box_metrics.py), and the daemon following a switch
(bot/detector_watch.py). Training runs are tiny (synthetic faces at imgsz 64, a few epochs)."""
from __future__ import annotations

import io
import random

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
