"""The owner's own YOLO face detector on this machine: training time and inference against animeface.

    python bench/detector.py [--epochs 40] [--imgsz 320] [--time-epochs 2] [--out DIR] [--data DIR]

1. A box set of real pictures, stored as verified in a fresh data folder (a real Store): the 10
   illustrations of ../shared/data/illustrations with the boxes in :data:`ILLUSTRATION_BOXES`
   (animeface+lbp's merged boxes, checked by eye on the drawn pictures: 4 false boxes removed, one
   missed face added; small background faces may still be missing), and the 9 photographs of
   ../shared/data/photo-faces with their true boxes (training.xml, testing.xml). The held-out split
   is storage/boxes.py's (one in five, by picture id).
2. Training time per epoch per 100 pictures at ``imgsz`` 320 and 640: the training pictures repeated
   to 100, ``--time-epochs`` epochs each (the first epoch also builds the label cache).
3. ``detector train`` on the training pictures (``--epochs`` at ``--imgsz``), then ``detector eval``'s
   comparison on the held-out pictures, and inference time per picture of the own detector and
   animeface on all the verified pictures (each detector warmed up first; wall time, one at a time).

Prints a Markdown block for bench/RESULTS.md. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# animeface+lbp's boxes on the shared illustrations (max_side 1600), checked by eye on the drawn
# pictures. Removed: grapeot_57032 (376, 229, 449, 302), a knee and a ferret; xavier_test_1
# (759, 668, 825, 734), a bow, and (1234, 1364, 1328, 1458), a skirt; xavier_test_5
# (1045, 321, 1125, 401), flowers. Added: grapeot_57032 (410, 157, 457, 210), the girl in the hat
# (drawn by eye). grapeot_164032 shows a girl from behind: no face.
ILLUSTRATION_BOXES = {
    "grapeot_112032.jpg": [(231, 80, 311, 160)],
    "grapeot_119032.jpg": [(261, 110, 341, 190)],
    "grapeot_164032.jpg": [],
    "grapeot_204032.jpg": [(126, 63, 253, 190)],
    "grapeot_57032.jpg": [(291, 256, 338, 303), (76, 104, 132, 160), (156, 173, 211, 228), (410, 157, 457, 210)],
    "xavier_test_1.jpg": [(1574, 613, 1738, 777), (313, 201, 492, 380), (1231, 872, 1411, 1052),
                          (1617, 122, 1813, 318), (857, 711, 1053, 907), (146, 1030, 342, 1225),
                          (447, 872, 627, 1052), (1594, 1005, 1790, 1201), (627, 403, 806, 582),
                          (55, 74, 205, 224), (1052, 403, 1231, 582), (111, 560, 290, 739),
                          (1233, 242, 1383, 392)],
    "xavier_test_2.jpg": [(1389, 278, 1706, 595), (397, 290, 687, 579)],
    "xavier_test_3.jpg": [(1192, 553, 1534, 894), (566, 416, 954, 804), (1686, 255, 2094, 664)],
    "xavier_test_4.jpg": [(1674, 197, 1806, 329), (676, 780, 752, 856), (971, 657, 1047, 733), (0, 235, 189, 424),
                          (1167, 698, 1251, 781), (1524, 455, 1597, 528), (1366, 555, 1412, 601)],
    "xavier_test_5.jpg": [(834, 75, 986, 227)],
}


def photo_boxes(folder: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    out = {}
    for name in ("training.xml", "testing.xml"):
        for image in ET.parse(folder / name).getroot().iter("image"):
            out[image.get("file")] = [(int(b.get("left")), int(b.get("top")), int(b.get("left")) + int(b.get("width")),
                                       int(b.get("top")) + int(b.get("height"))) for b in image.iter("box")]
    return out


def store_verified(cfg, pictures: list[tuple[Path, list]]) -> list[int]:
    from scorer.registry import ensure_active_model
    from storage import Store
    from storage.boxes import Box
    from storage.media import inspect, store_media
    from storage.records import Face

    ids = []
    with Store.open(cfg.db_path) as store:
        model = ensure_active_model(store, cfg.scorer, cfg.models_path)
        sid = store.upsert_source("bench", "booru", {"enabled": False, "interval": 60, "options": {}}, origin="cli")
        for k, (path, boxes) in enumerate(pictures):
            data = path.read_bytes()
            info, _ = inspect(data)
            rel = store_media(cfg.media_path, data, info)
            [image_id] = store.save_poll(sid, [{"external_id": path.name, "page_url": f"https://bench.example/{k}", "author": "bench",
                                                "title": path.name, "tags": [], "rating": None, "popularity": k}], {})
            store.record_download(image_id, info, rel, near_distance=-1)
            store.record_analysis(image_id, [Face(0, 0, info.width, info.height, 1.0, "whole", 3.0, 0.1)], 3.0, 0.1,
                                  model["version"])
            store.verify_boxes(image_id, [Box(*b) for b in boxes
                                          if min(b[2], info.width) > max(0, b[0]) and min(b[3], info.height) > max(0, b[1])])
            ids.append(image_id)
    return ids


def epoch_times(cfg, train, val, imgsz: int, epochs: int, out: Path) -> list[float]:
    """Seconds of each epoch on ``train`` repeated to 100 pictures."""
    from scorer.detector_train import Sample, batch_size, train_yolo, write_dataset

    hundred = [Sample(100000 + k, s.path, s.width, s.height, s.boxes) for k, s in
               enumerate((train * (100 // len(train) + 1))[:100])]
    data = write_dataset(out / f"hundred-{imgsz}", hundred, val)
    marks = [time.perf_counter()]
    train_yolo(data, out / f"timing-{imgsz}", model="yolov8n.yaml", epochs=epochs, imgsz=imgsz,
               batch=batch_size(len(hundred)), config_dir=cfg.paths.root / "ultralytics", progress=False,
               on_epoch=lambda _t: marks.append(time.perf_counter()))
    return [b - a for a, b in zip(marks, marks[1:])]


def per_picture(dcfg, items, data_dir, max_pixels) -> float:
    from scorer.detect import make_detector
    from scorer.detector_train import detect_samples

    det = make_detector(dcfg, data_dir)
    detect_samples(det, items[:2], max_pixels)          # warm up
    return detect_samples(det, items, max_pixels)[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40, help="epochs of the detector trained for the comparison")
    ap.add_argument("--imgsz", type=int, default=320, help="its training size")
    ap.add_argument("--time-epochs", type=int, default=2, help="epochs timed at imgsz 320 and 640 (0: no timing)")
    ap.add_argument("--out", help="work folder (default: a temporary one)")
    ap.add_argument("--data", default=str(SHARED))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from bot.config import load_config
    from scorer import own_detector
    from scorer.detector_train import evaluate_detectors, format_table, samples, train_detector
    from storage import Store

    data = Path(args.data)
    pictures = [(data / "illustrations" / n, b) for n, b in ILLUSTRATION_BOXES.items()]
    pictures += [(data / "photo-faces" / n, b) for n, b in sorted(photo_boxes(data / "photo-faces").items())]
    pictures = [(p, b) for p, b in pictures if p.is_file()]
    if not pictures:
        sys.exit(f"no pictures under {data}")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-detector-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(f'data_dir = "{out / "data"}"\n[detector]\ncascade = '
                                     f'"{data / "lbpcascade_animeface.xml"}"\n')
    cfg = load_config(out / "config.toml")
    store_verified(cfg, pictures)
    with Store.open(cfg.db_path) as store:
        train = samples(store.verified_box_pictures(holdout=False), cfg.media_path)
        val = samples(store.verified_box_pictures(holdout=True), cfg.media_path)
        titles = {r["id"]: r["title"] for r in store.execute("SELECT id, title FROM images")}
    n_faces = lambda items: sum(len(s.boxes) for s in items)  # noqa: E731
    held_out = ", ".join(titles[s.image_id] for s in val)
    print(f"verified: {len(train)} training pictures ({n_faces(train)} faces), {len(val)} held out "
          f"({n_faces(val)} faces): {held_out}", file=sys.stderr)

    timing = {}
    for imgsz in (320, 640) if args.time_epochs else ():
        t = epoch_times(cfg, train, val, imgsz, args.time_epochs, out)
        timing[imgsz] = t
        print(f"imgsz {imgsz}: epochs of 100 pictures took {[round(x, 1) for x in t]} s", file=sys.stderr)

    m = train_detector(cfg, epochs=args.epochs, imgsz=args.imgsz, progress=False,
                       say=lambda s: print(s, file=sys.stderr))
    own_detector.set_active(cfg.paths, m["version"])
    rows, png = evaluate_detectors(cfg, say=lambda s: print(s, file=sys.stderr))
    everything = samples(Store.open(cfg.db_path).verified_box_pictures(), cfg.media_path)
    own_cfg = own_detector.effective_detector(cfg.detector, cfg.paths)
    speed = {"own": per_picture(own_cfg, everything, cfg.paths.root, cfg.download.max_pixels),
             "animeface": per_picture(replace(cfg.detector, name="animeface", time_cap=0), everything,
                                      cfg.paths.root, cfg.download.max_pixels)}

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, no GPU, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; work folder {out}\n")
    print(f"Verified pictures: {len(train) + len(val)} ({n_faces(train) + n_faces(val)} faces): "
          f"{len(train)} for training, {len(val)} held out ({n_faces(val)} faces: {held_out}).\n")
    print("| imgsz | seconds per epoch per 100 pictures (each epoch) |\n| --- | --- |")
    for imgsz, t in timing.items():
        print(f"| {imgsz} | {', '.join(f'{x:.1f}' for x in t)} |")
    print(f"\nOwn detector {m['version']}: yolov8n, imgsz {args.imgsz}, {args.epochs} epochs on {m['train_pictures']} "
          f"pictures in {m['seconds']:.0f} s; held-out mAP50 {m['mAP50']}, mAP50-95 {m['mAP50-95']}.\n")
    print("Held-out comparison (`detector eval`):\n\n```\n" + format_table(rows) + "\n```\n")
    print(f"Inference on all {len(everything)} verified pictures, wall ms per picture: own "
          f"{speed['own'] * 1000:.1f}, animeface {speed['animeface'] * 1000:.1f} "
          f"({speed['animeface'] / max(speed['own'], 1e-9):.1f}x). PR curves: {png}")


if __name__ == "__main__":
    main()
