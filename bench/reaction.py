"""Benchmark: from a rating to a changed ranking, and `train` on every AnimeFace rating.

    OMP_NUM_THREADS=1 python bench/reaction.py [--json out.json]

1. Imports every crop of ``../shared/data/animeface-10`` with its rating (``import-labels
   --crops``: detection skipped, each crop's features computed and cached) and times it, then
   times ``main.py train`` (the taste head on all the ratings) — the issue's "train on all
   animeface-10 ratings in under 2 minutes".
2. A second data folder: the ``train/`` crops imported with their ratings and the head trained;
   the ``test/`` crops dropped into the inbox of a running daemon (``main.py run``, the default
   configuration but a free port) as unrated candidates. Once they are scored, the top card of
   *For you* is rated 1 in the gallery (``POST /rate``), and the benchmark times how long until
   the daemon's refitted head is active and *For you* has changed (the reaction-to-ranking
   latency; ``train.refit_delay`` is part of it), repeated ``--reactions`` times.

Prints the figures (and writes them with ``--json``) for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "animeface-10"


def run(cwd: Path, *args: str) -> tuple[float, str]:
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"main.py {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return time.monotonic() - started, out.stdout


def ratings(split: str | None) -> list[tuple[Path, str]]:
    rows = list(csv.DictReader(open(DATA / "ratings.csv")))
    return [(DATA / r["path"], r["rating"]) for r in rows if split is None or r["path"].startswith(split + "/")]


def write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "rating"])
        w.writerows([[str(p), r] for p, r in rows])


def config(root: Path) -> Path:
    path = root / "config.toml"
    path.write_text(f'data_dir = "{root / "data"}"\n[web]\nport = 0\n[[sources]]\nname = "inbox"\n'
                    f'kind = "folder"\npath = "{root / "inbox"}"\ninterval = 2\n')
    return path


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


def post_rating(base: str, image_id: int, value: int) -> None:
    req = urllib.request.Request(f"{base}rate/{image_id}", data=json.dumps({"value": value}).encode(),
                                 headers={"Content-Type": "application/json", "Origin": base.rstrip("/")})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


def cards(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<article class="card[^"]*" data-id="(\d+)"', html)]


def active_version(db: Path) -> str:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT version FROM models WHERE active = 1").fetchone()[0]
    finally:
        con.close()


def settled(db: Path) -> int:
    """Pictures the daemon has finished with (scored, or set aside as duplicates, failed, skipped)."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM images WHERE status NOT IN ('pending', 'downloaded', "
                           "'importing')").fetchone()[0]
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--reactions", type=int, default=3)
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} is missing")
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"}
    work = Path(tempfile.mkdtemp(prefix="tastefeed-reaction-"))
    try:
        # 1. all ratings: import, then train
        every = work / "all"
        every.mkdir()
        config(every)
        write_csv(every / "ratings.csv", ratings(None))
        out["import_all_s"], _ = run(every, "import-labels", "ratings.csv", "--crops")
        out["train_all_s"], text = run(every, "train")
        out["train_all_output"] = text.strip().splitlines()[:3]
        print(f"import-labels --crops of {len(ratings(None))} crops: {out['import_all_s']:.0f} s; "
              f"train: {out['train_all_s']:.1f} s")

        # 2. a running daemon: a rating in the gallery -> a new ranking
        live = work / "live"
        (live / "inbox").mkdir(parents=True)
        cfg = config(live)
        write_csv(live / "ratings.csv", ratings("train"))
        run(live, "import-labels", "ratings.csv", "--crops")
        run(live, "train")
        candidates = ratings("test")
        for i, (path, _) in enumerate(candidates):
            shutil.copy(path, live / "inbox" / f"{i:04d}.png")
        db = live / "data" / "tastefeed.db"
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(cfg), "run"], cwd=live,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            base = None
            for line in proc.stdout:
                m = re.search(r"web gallery: (http://\S+)", line)
                if m:
                    base = m.group(1).rstrip("/") + "/"
                    break
            started = time.monotonic()
            total = len(ratings("train")) + len(candidates)
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain its log
            while settled(db) < total:
                time.sleep(1)
                if time.monotonic() - started > 1800:
                    sys.exit("the daemon did not score the candidates in 30 minutes")
            out["daemon_scoring_s"] = round(time.monotonic() - started, 1)
            time.sleep(5)  # let the rescoring after start settle
            latencies = []
            for _ in range(args.reactions):
                before, version = cards(get(base)), active_version(db)
                rated = time.monotonic()
                post_rating(base, before[0], 1)
                while True:
                    time.sleep(0.5)
                    now = cards(get(base))
                    if active_version(db) != version and now[:10] != [c for c in before if c != before[0]][:10]:
                        break
                    if time.monotonic() - rated > 300:
                        sys.exit("the ranking did not change within 5 minutes")
                latencies.append(round(time.monotonic() - rated, 1))
                print(f"rating -> new head active and For you changed: {latencies[-1]} s")
            out["reaction_s"] = latencies
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
