"""Event-loop lag and gallery latency while the daemon ingests pictures, with face detection in
worker processes (the daemon's way) or in a thread (the way before issue 17), in alternating runs.

    python bench/ingest_lag.py [--pictures 10] [--pairs 2] [--workers 1] [--folder DIR]

Each run starts a daemon on a fresh temporary data folder with the gallery on 127.0.0.1, drops
the N smallest of ../shared/data/illustrations (synthetic pictures when absent) into its inbox and,
until all are scored, a separate process (a client in the daemon's own process would wait out
the same stalls unseen) asks the gallery's *For you* page every 0.2 s. It reports the loop lag the
daemon measures itself (bot/health.py, every 0.1 s) and the page times during ingestion, and
pictures/s from the first picture seen to the last scored. Prints a Markdown block for
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.config import load_config
from bot.daemon import Daemon

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "illustrations"
PROBE = """import sys, time, urllib.request
while True:
    t = time.monotonic()
    urllib.request.urlopen(sys.argv[1], timeout=60).read()
    print((time.monotonic() - t) * 1000, flush=True)
    time.sleep(0.2)
"""


def pictures(n: int, folder: Path) -> list[bytes]:
    files = sorted(folder.glob("*.jpg"), key=lambda p: p.stat().st_size)[:n]
    if files:
        return [f.read_bytes() for f in files]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers import picture
    return [picture(i, (800, 600)) for i in range(n)]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def one_run(data: list[bytes], mode: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "inbox").mkdir()
        (tmp / "config.toml").write_text(f'''data_dir = "{tmp / 'data'}"
[detector]
workers = {workers}
[web]
enabled = "on"
port = 0
[[sources]]
name = "inbox"
kind = "folder"
interval = 0.5
path = "{tmp / 'inbox'}"
settle = 0.2
''')
        daemon = Daemon(load_config(tmp / "config.toml"))
        await daemon.start()
        if mode == "thread":      # before: the analyzer detects in the scoring thread
            daemon.pipeline.detection = None
        else:                     # the worker processes are started before measuring
            from PIL import Image
            await daemon.detection.detect(Image.new("RGB", (64, 64)))
        probe = await asyncio.create_subprocess_exec(sys.executable, "-c", PROBE, daemon.gallery_url,
                                                     stdout=asyncio.subprocess.PIPE)
        try:
            for i, body in enumerate(data):
                (tmp / "inbox" / f"{i}.jpg").write_bytes(body)
            started = time.monotonic()
            first = None
            while True:
                counts = await daemon.store.status_counts()
                if first is None and sum(counts.values()):
                    first = time.monotonic()
                if counts.get("scored", 0) + counts.get("failed", 0) >= len(data):
                    break
                await asyncio.sleep(0.2)
            took = time.monotonic() - (first or started)
            lags = [lag for at, lag in daemon.loop_monitor.lags if at >= started]
        finally:
            probe.kill()
            out, _ = await probe.communicate()
            await daemon.stop()
        pages = [float(line) for line in out.decode().split()]
    return {"mode": mode, "lag_p50": pct(lags, 0.5), "lag_p99": pct(lags, 0.99), "lag_max": max(lags),
            "page_p50": pct(pages, 0.5), "page_p95": pct(pages, 0.95), "page_max": max(pages),
            "pps": len(data) / took}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pictures", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--folder", type=Path, default=SHARED, help="where the illustrations are")
    args = ap.parse_args()
    data = pictures(args.pictures, args.folder)
    rows = []
    for _ in range(args.pairs):
        for mode in ("thread", "processes"):
            rows.append(await one_run(data, mode, args.workers))
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{len(data)} pictures ({'illustrations' if args.folder.exists() else 'synthetic'}), "
          f"detector.workers = {args.workers}, runs alternating thread/processes\n")
    print("| detection in | loop lag p50 / p99 / max (ms) | For you p50 / p95 / max (ms) | pictures/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['lag_p50']:.0f} / {r['lag_p99']:.0f} / {r['lag_max']:.0f} | "
              f"{r['page_p50']:.0f} / {r['page_p95']:.0f} / {r['page_max']:.0f} | {r['pps']:.2f} |")
    for mode in ("thread", "processes"):
        mine = [r for r in rows if r["mode"] == mode]
        print(f"\n{mode}: median over runs: lag p99 {statistics.median(r['lag_p99'] for r in mine):.0f} ms, "
              f"For you p95 {statistics.median(r['page_p95'] for r in mine):.0f} ms, "
              f"{statistics.median(r['pps'] for r in mine):.2f} pictures/s", end="")
    print()


if __name__ == "__main__":
    asyncio.run(main())
