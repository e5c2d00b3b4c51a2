"""Faces found and CPU per picture for each anime detector: animeface, lbp, animeface+lbp.

    python bench/detectors.py [--rounds 2] [--shots /tmp/shots] [--data DIR] [--cascade PATH]

On ../shared/data/illustrations. The detectors run in alternating order, one picture at a time
(round r starts with detector r mod 3), so a load that comes and goes on a shared machine falls on
all of them alike. CPU is the process's CPU time (OpenCV's own threads included); wall is the
elapsed time. The time cap is off for these rows (each detector at ``max_side``); one pass at half
``max_side`` shows what the cap's smaller size costs in faces; a last pass runs each detector with
the default cap, after one pass to learn its speed, and counts the pictures sent to half size. ``--shots`` draws every detector's boxes on the pictures (animeface red, lbp
blue) for checking by eye. Prints a Markdown block for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw

from scorer.detect import DetectorConfig, make_detector

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NAMES = ("animeface", "lbp", "animeface+lbp")
COLOURS = {"animeface": "red", "lbp": "blue"}


def timed(det, im, side=None):
    c0, w0 = time.process_time(), time.perf_counter()
    faces = det.detect(im, side)
    return faces, time.process_time() - c0, time.perf_counter() - w0


def draw(im, faces, path):
    out = im.copy()
    pen = ImageDraw.Draw(out)
    for f in faces:
        pen.rectangle([f.x1, f.y1, f.x2 - 1, f.y2 - 1], outline=COLOURS.get(f.detector, "yellow"),
                      width=max(2, im.width // 300))
    out.thumbnail((1200, 1200))
    out.save(path, quality=85)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shots", help="folder to draw the boxes into")
    ap.add_argument("--data", default=str(SHARED), help="the shared data folder (default: ../shared/data)")
    ap.add_argument("--cascade", help="lbpcascade_animeface.xml (default: in the data folder)")
    args = ap.parse_args()
    data = Path(args.data)
    args.cascade = args.cascade or str(data / "lbpcascade_animeface.xml")
    files = sorted((data / "illustrations").glob("*.jpg"))
    if not files:
        sys.exit(f"no pictures in {data / 'illustrations'}")
    pics = [(p.name, Image.open(p).convert("RGB")) for p in files]
    dets = {n: make_detector(DetectorConfig(name=n, cascade=args.cascade, time_cap=0)) for n in NAMES}
    cpu = {n: [] for n in NAMES}
    wall = {n: [] for n in NAMES}
    found = {n: {} for n in NAMES}
    for r in range(args.rounds):
        order = NAMES[r % 3:] + NAMES[:r % 3]
        for name, im in pics:
            for n in order:
                faces, c, w = timed(dets[n], im)
                cpu[n].append(c)
                wall[n].append(w)
                found[n][name] = faces
    if args.shots:
        shots = Path(args.shots)
        shots.mkdir(parents=True, exist_ok=True)
        for name, im in pics:
            for n in NAMES:
                draw(im, found[n][name], shots / f"{Path(name).stem}.{n}.jpg")

    half = {}
    for n in NAMES:  # what the cap's smaller size costs in faces and saves in CPU
        det = dets[n]
        runs = [timed(det, im, det.fallback_side) for _, im in pics]
        half[n] = (sum(len(f) for f, _, _ in runs), statistics.mean(c for _, c, _ in runs), det.fallback_side)

    capped = {}
    for n in NAMES:
        det = make_detector(DetectorConfig(name=n, cascade=args.cascade))
        for _, im in pics:  # learn the speed
            det.detect(im)
        halved, total_cpu, faces = 0, 0.0, 0
        for _, im in pics:
            halved += det.side_for(im.size) < det.max_side
            got, c, _ = timed(det, im)
            total_cpu += c
            faces += len(got)
        capped[n] = (halved, faces, total_cpu / len(pics), det.time_cap)

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"{len(pics)} pictures, {args.rounds} alternating rounds, max_side {DetectorConfig().max_side}.\n")
    print("| detector | faces (all pictures) | CPU ms/pic median | CPU ms/pic mean | wall ms/pic mean |")
    print("| --- | --- | --- | --- | --- |")
    for n in NAMES:
        total = sum(len(v) for v in found[n].values())
        print(f"| {n} | {total} | {statistics.median(cpu[n]) * 1000:.0f} | {statistics.mean(cpu[n]) * 1000:.0f} "
              f"| {statistics.mean(wall[n]) * 1000:.0f} |")
    print("\nPer picture (faces): " + "; ".join(
        f"{name}: " + "/".join(str(len(found[n][name])) for n in NAMES) for name, _ in pics))
    print("\n| detector at half max_side (the cap's smaller size) | side | faces | CPU ms/pic mean |")
    print("| --- | --- | --- | --- |")
    for n, (faces, mean_cpu, side) in half.items():
        print(f"| {n} | {side} | {faces} | {mean_cpu * 1000:.0f} |")
    print("\n| detector, time cap on | cap (s) | pictures at half size | faces | CPU ms/pic mean |")
    print("| --- | --- | --- | --- | --- |")
    for n, (halved, faces, mean_cpu, cap) in capped.items():
        print(f"| {n} | {cap:g} | {halved} of {len(pics)} | {faces} | {mean_cpu * 1000:.0f} |")


if __name__ == "__main__":
    main()
