"""Pipeline throughput: decode -> detect -> crop -> score, batched vs one picture at a time,
and the daemon's memory: idle (started, nothing to do) and at its peak while it ingests a folder
of pictures.

    python bench/pipeline.py [--device auto|cpu|cuda] [--repeat 2] [--daemon-pictures 40]
    python bench/pipeline.py --daemon-only      # only the daemon's memory (the real `main.py run`)
    python bench/pipeline.py --device cuda --yolo W.pt --no-daemon   # the GPU path with a YOLO detector
    python bench/pipeline.py --writer 2000 / --fingerprint   # the CPU-side ceilings of the GPU path
    python bench/pipeline.py --device cuda --yolo W.pt --daemon-yolo --daemon-only --daemon-pictures 2000
                                                # the real daemon detecting with YOLO, end to end

The daemon part runs ``main.py run`` in its own process and samples the memory of it and its
detection workers together (proportional set size). ``--yolo`` adds the device-batched path, the
daemon's own code for yolo on a GPU: JPEG decoding on the device (nvJPEG), YOLO on a letterboxed
batch, crops cut there and scored in batches, the next batch's bytes read by threads meanwhile;
on a CPU it runs too (the same path with the CPU as the device).

Uses ../shared/data/illustrations (falls back to synthetic pictures) and prints a Markdown block
to paste into bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from scorer.analyze import Analyzer
from scorer.detect import DetectorConfig, make_detector
from scorer.model import Scorer, build_model, save_model
from scorer.settings import ScorerConfig
from storage.media import decode_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "illustrations"


def pictures() -> list[bytes]:
    files = sorted(SHARED.glob("*.jpg"))
    if files:
        return [f.read_bytes() for f in files]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import picture
    return [picture(i, size=(1024, 768)) for i in range(10)]


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory (MiB) of a process and all its descendants (the daemon's worker and
    training processes), from /proc; 0 where /proc is missing."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        total = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
        children = " ".join(p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/children"))
    except (OSError, StopIteration):
        return 0.0
    return total + sum(rss_mib(child) for child in children.split())


def pss_mib(pid: int | str = "self") -> dict[str, float]:
    """Proportional memory (MiB, shared pages divided among the processes sharing them) of a
    process and each of its descendants, keyed "pid name": what they use together, without
    counting twice what forked workers share with the daemon."""
    out = {}
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        out[f"{pid} {name}"] = next(int(line.split()[1]) for line in rollup.splitlines()
                                    if line.startswith("Pss:")) / 1024
        children = " ".join(p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/children"))
    except (OSError, StopIteration):
        return out
    for child in children.split():
        out.update(pss_mib(child))
    return out


def footprint_mib(pid: int) -> tuple[float, dict[str, float]]:
    """The daemon's physical memory with its workers, counted once: the daemon's resident memory
    (all its pages, the libraries included) plus each descendant's private memory (a spawned
    worker shares little but the same library files, already counted in the daemon's). Unlike
    PSS it does not shrink when other processes on the machine map the same libraries."""
    def private(p) -> float:
        rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        return sum(int(line.split()[1]) for line in rollup.splitlines()
                   if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024
    parts = {}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        parts[f"{pid} daemon (resident)"] = next(int(line.split()[1]) for line in status.splitlines()
                                                 if line.startswith("VmRSS:")) / 1024
        todo = " ".join(p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/children")).split()
        while todo:
            child = todo.pop()
            try:
                parts[f"{child} {Path(f'/proc/{child}/comm').read_text().strip()} (private)"] = private(child)
                todo += " ".join(p.read_text() for p in Path(f"/proc/{child}/task").glob("*/children")).split()
            except OSError:
                pass
    except (OSError, StopIteration):
        pass
    return sum(parts.values()), parts


def run_daemon(cfg_path: Path, work: Path, n: int):
    """Start ``main.py run``, measure it idle, move the pictures into its inbox, sample its memory
    every 0.2 s until all are done, stop it. Returns (seconds, statuses, idle RSS, idle PSS, peak)."""
    import sqlite3
    import subprocess

    main_py = Path(__file__).resolve().parents[1] / "main.py"
    log = open(work / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, str(main_py), "run", "--config", str(cfg_path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        deadline = time.monotonic() + 120
        while "web gallery:" not in (work / "daemon.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start:\n" + (work / "daemon.log").read_text())
            time.sleep(0.2)
        time.sleep(3)                     # started, nothing to do yet: its idle memory
        idle, idle_pss = footprint_mib(proc.pid)[0], sum(pss_mib(proc.pid).values())
        for path in sorted((work / "incoming").iterdir()):
            path.rename(work / "inbox" / path.name)
        t0 = time.perf_counter()
        peak = {"rss": 0.0, "pss": 0.0, "parts": {}, "foot": 0.0, "foot_parts": {}}
        db = sqlite3.connect(f"file:{work / 'data' / 'tastefeed.db'}?mode=ro", uri=True)
        while True:
            rss, parts = rss_mib(proc.pid), pss_mib(proc.pid)
            peak["rss"] = max(peak["rss"], rss)
            foot, foot_parts = footprint_mib(proc.pid)
            if foot > peak["foot"]:
                peak["foot"], peak["foot_parts"] = foot, foot_parts
            if sum(parts.values()) > peak["pss"]:
                peak["pss"], peak["parts"] = sum(parts.values()), parts
            counts = dict(db.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall())
            if sum(v for k, v in counts.items() if k not in ("pending", "downloaded")) >= n:
                break
            if time.perf_counter() - t0 > 1800:
                raise SystemExit(f"the daemon did not finish: {counts}")
            time.sleep(0.2)
        elapsed = time.perf_counter() - t0
        db.close()
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    return elapsed, counts, idle, idle_pss, peak


def device_batched(data: list[bytes], weights: str, device: str, scorer: Scorer, *, batch: int, imgsz: int,
                   repeat: int, workers: int) -> tuple:
    """The GPU path, end to end, through the daemon's own functions (bot/pipeline.py's in-process
    path with yolo on a GPU): JPEG bytes decoded together on the device
    (``storage.media.decode_on_device``: torchvision's nvJPEG ``decode_jpeg``), letterboxed there
    and detected by YOLO as one batch (``YoloDetector.detect_tensors``), the faces cropped there
    (``Analyzer.prepare_tensor``) and scored in batches (``Analyzer.analyze_prepared``); the next
    batch's bytes are read by ``workers`` threads while the device works (the download stage's
    part). On a CPU it runs too: the same path with the CPU as the device.
    Returns (pictures/s, decode ms/pic, detect ms/pic, crop+score ms/pic, crops/s, device)."""
    from concurrent.futures import ThreadPoolExecutor

    from scorer.detect import YoloDetector
    from scorer.model import pick_device
    from storage.media import BadImage, decode_on_device

    dev = pick_device(device)
    det = YoloDetector(weights, config_dir=Path(tempfile.gettempdir()) / "tastefeed-bench-ultralytics",
                       min_confidence=0.25)
    det._decode_device = dev                  # the device path, whichever device was asked for
    det.model.overrides["imgsz"] = imgsz
    analyzer = Analyzer(det, scorer)

    pool = ThreadPoolExecutor(workers)
    batches = [data[i:i + batch] for _ in range(repeat) for i in range(0, len(data), batch)]
    ahead = pool.submit(lambda b: [bytes(r) for r in b], batches[0])
    t_decode = t_detect = t_score = 0.0
    n_faces = n_pics = 0
    start = time.perf_counter()
    for k in range(len(batches)):
        raws = ahead.result()
        if k + 1 < len(batches):
            ahead = pool.submit(lambda b: [bytes(r) for r in b], batches[k + 1])
        t0 = time.perf_counter()
        tensors = [t for t in decode_on_device(raws, dev) if not isinstance(t, BadImage)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        found = analyzer.detect_tensors(tensors)
        t2 = time.perf_counter()
        prepared = [analyzer.prepare_tensor(t, faces) for t, faces in zip(tensors, found)]
        analyzer.analyze_prepared(prepared)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        t_decode, t_detect, t_score = t_decode + t1 - t0, t_detect + t2 - t1, t_score + t3 - t2
        n_faces += sum(len(p.crops) for p in prepared)
        n_pics += len(raws)
    total = time.perf_counter() - start
    pool.shutdown()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    return (n_pics / total, t_decode / n_pics * 1000, t_detect / n_pics * 1000, t_score / n_pics * 1000,
            n_faces / max(t_score, 1e-9), name)


def writer_ceiling(n: int, faces: int = 2) -> float:
    """Pictures/s the daemon's bookkeeping alone sustains, whatever the device: per picture, what
    ``Pipeline.score`` does around the model (read its row, write its faces, scores and cached
    features in one transaction, name it from its tags) through the single writer thread, on a
    real database file. The GPU path cannot go faster than this."""
    import asyncio
    import random

    import numpy as np

    from storage import AsyncStore, Store
    from storage.media import ImageInfo
    from storage.records import DOWNLOADED, Face

    tmp = Path(tempfile.mkdtemp())
    db = tmp / "t.db"
    rnd = random.Random(0)
    from scorer.registry import ensure_active_model

    with Store.open(db) as store:
        version = ensure_active_model(store, ScorerConfig(), tmp / "models")["version"]
        sid = store.upsert_source("bench", "booru", {"enabled": False, "interval": 60, "options": {}}, origin="cli")
        ids = store.save_poll(sid, [{"external_id": f"p{i}", "page_url": f"https://x.example/{i}", "title": f"p{i}",
                                     "tags": ["a", "b"], "popularity": i} for i in range(n)], {})
        for i in ids:
            info = ImageInfo(f"{i:064x}", f"{rnd.getrandbits(64):016x}", 1200, 900, "jpeg", 300_000)
            store.record_download(i, info, f"x/{i}.jpg", near_distance=-1)
    vec = {"efficientnet_lite0-x-160px": np.random.rand(472).astype(np.float32),
           "whole:efficientnet_lite0-x-160px": np.random.rand(472).astype(np.float32),
           "colour": np.random.rand(9).astype(np.float32), "net:x": np.random.rand(2).astype(np.float32)}

    async def run() -> float:
        store = await AsyncStore(db).open()
        try:
            start = time.perf_counter()
            for i in ids:
                row = await store.get_image(i)
                assert row["status"] == DOWNLOADED
                found = [Face(10 + 100 * k, 10, 90 + 100 * k, 90, 0.9, "yolo", 3.0, 0.1) for k in range(faces)]
                await store.record_analysis(i, found, 3.0, 0.1, version, expect=DOWNLOADED,
                                            features=[vec] * faces, detector_version="config:yolo")
                await store.name_from_tags(i)
            return n / (time.perf_counter() - start)
        finally:
            await store.close()
    try:
        return asyncio.run(run())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_rows(rows: list, args, data: list) -> None:
    cpu = platform.processor() or platform.machine()
    devices = sorted({r[6] for r in rows}) or [args.device]
    print(f"Machine: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"device {', '.join(devices)}; scorer at {args.image_size} px; {len(data)} pictures\n")
    print("| mode | pictures/s | decode ms/pic | detect ms/pic | crop+score ms/pic | face crops/s (scoring) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, ips, dec, det_ms, sc, fps, _ in rows:
        print(f"| {label} | {ips:.2f} | {dec:.1f} | {det_ms:.1f} | {sc:.1f} | {fps:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--daemon-pictures", type=int, default=40)
    ap.add_argument("--image-size", type=int, default=ScorerConfig().image_size,
                    help="scorer input size (default: the scorer.image_size default)")
    ap.add_argument("--daemon-only", action="store_true", help="skip the throughput part: measure only the daemon")
    ap.add_argument("--yolo", default="", help="YOLO weights (.pt): also measure the device-batched path "
                                               "(decode_jpeg + YOLO + scoring on --device)")
    ap.add_argument("--yolo-batch", type=int, default=64)
    ap.add_argument("--yolo-imgsz", type=int, default=640)
    ap.add_argument("--yolo-repeat", type=int, default=20, help="passes over the pictures for the YOLO path")
    ap.add_argument("--no-daemon", action="store_true", help="skip the daemon's memory part")
    ap.add_argument("--fingerprint", action="store_true",
                    help="only the download stage's check and fingerprint of each picture, full and reduced decode")
    ap.add_argument("--writer", type=int, default=0, metavar="N",
                    help="only the bookkeeping ceiling: N pictures' database writes as the daemon does them")
    ap.add_argument("--daemon-yolo", action="store_true",
                    help="the daemon part detects with the --yolo weights (on a GPU: its device path, end to end)")
    args = ap.parse_args()
    if args.fingerprint:
        from storage.media import inspect
        data = pictures()
        for label, picture in (("full decode (before)", True), ("reduced JPEG decode (after)", False)) * 2:
            start = time.perf_counter()
            for raw in data:
                inspect(raw, picture=picture)
            print(f"download stage's fingerprint, {label}: {(time.perf_counter() - start) / len(data) * 1000:.1f} "
                  f"ms per picture ({len(data)} pictures)")
        return
    if args.writer:
        print(f"The daemon's bookkeeping alone (row read, faces + scores + features written, tags), "
              f"{args.writer} pictures with 2 faces each: {writer_ceiling(args.writer):.0f} pictures/s")
        return
    data = pictures()
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    save_model(build_model("resnet18"), tmp / "m.pt", arch="resnet18", image_size=args.image_size, version="bench")
    det = make_detector(DetectorConfig())
    rows = []
    for label, batch in () if args.daemon_only else (("one at a time", 1), ("batched (32)", 32)):
        scorer = Scorer.load(tmp / "m.pt", device=args.device, batch_size=32, tta=True)
        analyzer = Analyzer(det, scorer)
        t_decode = t_detect = t_score = 0.0
        n_faces = 0
        start = time.perf_counter()
        for _ in range(args.repeat):
            for i in range(0, len(data), batch):
                t0 = time.perf_counter()
                ims = [decode_image(d) for d in data[i:i + batch]]
                t1 = time.perf_counter()
                found = [analyzer.detect(im) for im in ims]
                t2 = time.perf_counter()
                from scorer.detect import crop_face
                crops = [im if f.detector == "whole" else crop_face(im, f, 0.2)
                         for im, fs in zip(ims, found) for f in fs]
                scorer.predict(crops)
                if scorer.device.type == "cuda":
                    torch.cuda.synchronize()
                t3 = time.perf_counter()
                t_decode += t1 - t0
                t_detect += t2 - t1
                t_score += t3 - t2
                n_faces += len(crops)
        total = time.perf_counter() - start
        n = len(data) * args.repeat
        rows.append((label, n / total, t_decode / n * 1000, t_detect / n * 1000, t_score / n * 1000,
                     n_faces / max(t_score, 1e-9), str(scorer.device)))

    if args.yolo and not args.daemon_only:
        scorer = Scorer.load(tmp / "m.pt", device=args.device, batch_size=256, tta=True)
        ips, dec, det_ms, sc, fps, name = device_batched(data, args.yolo, args.device, scorer, batch=args.yolo_batch,
                                                         imgsz=args.yolo_imgsz, repeat=args.yolo_repeat, workers=8)
        rows.append((f"YOLO, device-batched ({args.yolo_batch}, {args.yolo_imgsz} px)", ips, dec, det_ms, sc, fps, name))
    if args.no_daemon:
        print_rows(rows, args, data)
        return
    # The daemon's memory while it ingests a folder: the real `main.py run` in its own process
    # (so that nothing of this benchmark is counted), sampled with its detection workers.
    work = tmp / "daemon"
    (work / "inbox").mkdir(parents=True)
    (work / "incoming").mkdir()
    cfg_path = work / "config.toml"
    cfg_path.write_text(f'data_dir = "{work / "data"}"\n[scorer]\ndevice = "{args.device}"\n'
                        '[download]\nnear_duplicate_distance = -1\n[web]\nport = 0\n'
                        f'[[sources]]\nname = "inbox"\nkind = "folder"\ninterval = 1\npath = "{work / "inbox"}"\n'
                        'settle = 0\n'
                        + (f'[detector]\nname = "yolo"\nweights = "{Path(args.yolo).resolve()}"\n'
                           if args.yolo and args.daemon_yolo else ''))
    for i in range(args.daemon_pictures):   # distinct bytes; near-duplicates are scored too (distance -1)
        (work / "incoming" / f"{i}.jpg").write_bytes(data[i % len(data)] + i.to_bytes(4, "big"))
    elapsed, counts, idle, idle_pss, sampled = run_daemon(cfg_path, work, args.daemon_pictures)
    shutil.rmtree(tmp, ignore_errors=True)

    print_rows(rows, args, data)
    detector = f"yolo {Path(args.yolo).name}" if args.yolo and args.daemon_yolo else "animeface"
    print(f"\nDaemon (`main.py run` in its own process, detector {detector}): {args.daemon_pictures} pictures dropped in the inbox were "
          f"ingested in {elapsed:.1f}s ({args.daemon_pictures / elapsed:.2f}/s, statuses {counts}).")
    print(f"\nMemory of the daemon and its workers together (the daemon's resident memory plus each child's "
          f"private memory), sampled every 0.2 s: idle **{idle:.0f} MiB** once started, peak **{sampled['foot']:.0f} "
          f"MiB** while ingesting (" + ", ".join(f"{k} {v:.0f}" for k, v in sampled["foot_parts"].items()) + ").")
    print(f"\nFor comparison, proportional memory (PSS: shared pages divided among every process mapping them, "
          f"on the whole machine): peak {sampled['pss']:.0f} MiB (idle {idle_pss:.0f} MiB), "
          f"{sampled['rss']:.0f} MiB summed resident (shared pages counted in each process). At the peak: "
          + ", ".join(f"{k} {v:.0f}" for k, v in sampled["parts"].items()) + " MiB.")


if __name__ == "__main__":
    main()
