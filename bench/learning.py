"""Benchmark: how well, and how fast, the taste model learns from ratings.

Trains on ``../shared/data/animeface-10/train`` (face crops with the simulated owner's ratings in
``ratings.csv``) with the same loop and defaults as ``main.py train`` (the validation share of
the training pictures, chosen by hash, drives early stopping), then measures on ``test/``:
Pearson, Spearman, MAE, RMSE, top-10% precision, and training time per 1,000 labels. Repeats
with 50, 100, 200, 400 and all training labels for the learning curve.

    python bench/learning.py                      # CPU, the defaults of [train] and [scorer]
    python bench/learning.py --device cuda --json results.json
    python bench/learning.py --sizes all --epochs 10   # a quick look

With ``--features FILE.npz`` it benchmarks the taste head (``scorer/head.py``) instead, on
cached features: the file holds ``ratings`` (n,), ``split`` ("train"/"test") and one (n, d) array
per feature block present (``backbone``, ``identity``, ``colour``, ``whole``). Sizes default to
25,50,100,200,400,all with 3 seeds. ``--pairs K`` adds K comparisons per run among training rows
not rated in that run, simulated from their ratings (the higher-rated picture wins; ties skipped).

    OMP_NUM_THREADS=1 python bench/learning.py --features feats.npz --out head.json
    python bench/learning.py --features feats.npz --blocks backbone,colour

Figures are recorded in bench/RESULTS.md with the machine they ran on.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import stats  # noqa: E402

from scorer.dataset import split_of  # noqa: E402
from scorer.evaluate import format_metrics, metrics  # noqa: E402
from scorer.model import build_model, pick_device, resize_crop  # noqa: E402
from scorer.settings import ScorerConfig, TrainConfig  # noqa: E402
from scorer.train import fit, predict  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "animeface-10"


def load(rows: list[tuple[str, int]], size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    arrays, ratings, keys = [], [], []
    for rel, rating in rows:
        data = (DATA / rel).read_bytes()
        keys.append(hashlib.sha256(data).hexdigest())
        from io import BytesIO
        arrays.append(resize_crop(Image.open(BytesIO(data)), size))
        ratings.append(rating)
    return np.stack(arrays), np.array(ratings, dtype=np.float32), keys


def subset(rows, n, seed=0):
    """``n`` training rows, the same share of each rating as the whole (a user's first ratings)."""
    if n >= len(rows):
        return rows
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    return [rows[i] for i in sorted(order[:n])]


def run(train_rows, test_arrays, test_y, tcfg: TrainConfig, scfg: ScorerConfig, device) -> dict:
    """Train the network on ``train_rows`` and measure it on the test crops."""
    x, y, keys = load(train_rows, scfg.image_size)
    val = np.array([split_of(k, tcfg.val_share) == "val" for k in keys])
    if val.sum() < 2:  # tiny subsets: keep at least two pictures to stop on
        val[:2] = True
    torch.manual_seed(tcfg.seed)
    net = build_model(scfg.arch, scfg.pretrained)
    started = time.monotonic()
    result = fit(net, x[~val], y[~val], x[val], y[val], tcfg, device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - started
    pred = predict(result.net, test_arrays, device, tta=True)
    m = metrics(pred, test_y)
    m.update(labels=len(train_rows), n_train=int((~val).sum()), n_val=int(val.sum()),
             epochs=len(result.history), best_epoch=result.best_epoch, train_seconds=round(seconds, 1),
             seconds_per_1000_labels=round(seconds / len(train_rows) * 1000, 1),
             seconds_per_epoch_per_1000=round(seconds / len(result.history) / len(train_rows) * 1000, 2))
    return m


def simulated_pairs(feats, rows: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` followed by other training rows, and ``k`` comparisons among those others (never
    rated in this run): the owner prefers the picture they rated higher; ties are not asked."""
    rng = np.random.default_rng(1000 + seed)
    others = np.setdiff1d(np.flatnonzero(feats["split"] == "train"), rows)
    a, b = rng.choice(others, (2, 4 * k))
    y = feats["ratings"]
    a, b = a[y[a] != y[b]][:k], b[y[a] != y[b]][:k]
    used = np.unique(np.concatenate([a, b]))
    order = np.concatenate([rows, used])
    index = {r: i for i, r in enumerate(order)}
    win = np.where(y[a] > y[b], a, b)
    lose = np.where(y[a] > y[b], b, a)
    return order, np.array([(index[w], index[lo]) for w, lo in zip(win, lose)]).reshape(-1, 2)


def head_run(feats, blocks: list[str], rows: np.ndarray, seed: int, pairs: int = 0) -> dict:
    """Fit the taste head on training ``rows`` of the feature file (and ``pairs`` simulated
    comparisons among other training rows) and measure it on its test rows."""
    from scorer.head import fit_head

    test = feats["split"] == "test"
    y = feats["ratings"].astype(float)
    order, compared = simulated_pairs(feats, rows, pairs, seed) if pairs else (rows, None)
    ratings = np.where(np.isin(order, rows), y[order], np.nan)
    started = time.monotonic()
    head = fit_head({b: feats[b][order] for b in blocks}, ratings, pairs=compared, seed=seed)
    seconds = time.monotonic() - started
    pred, unc = head.predict({b: feats[b][test] for b in blocks})
    m = metrics(pred, y[test])
    err = np.abs(pred - y[test])
    m.update(labels=len(rows), seed=seed, fit_seconds=round(seconds, 3),
             uncertainty_error_spearman=round(float(stats.spearmanr(unc, err)[0]), 3),
             head=head.describe())
    return m


def head_benchmark(args) -> int:
    """The taste head's learning curve on cached features (``--features``)."""
    feats = np.load(args.features)
    present = [b for b in ("backbone", "identity", "colour", "whole") if b in feats.files]
    blocks = args.blocks.split(",") if args.blocks else present
    train = np.flatnonzero(feats["split"] == "train")
    print(f"{len(train)} training and {int((feats['split'] == 'test').sum())} test rows; blocks "
          f"{', '.join(blocks)} ({', '.join(str(feats[b].shape[1]) for b in blocks)} dims); "
          f"{platform.processor() or platform.machine()}", flush=True)
    results, curve = [], []
    for size in (args.sizes or "25,50,100,200,400,all").split(","):
        n = len(train) if size == "all" else int(size)
        runs = []
        for seed in range((args.seeds or 3) if n < len(train) else 1):
            rows = train if n >= len(train) else np.sort(np.random.default_rng(seed).permutation(train)[:n])
            runs.append(head_run(feats, blocks, rows, seed, args.pairs))
        results += runs
        row = {k: round(float(np.mean([r[k] for r in runs])), 4)
               for k in ("pearson", "spearman", "mae", "rmse", "topk_precision", "fit_seconds",
                         "uncertainty_error_spearman")}
        row.update(labels=n, seeds=len(runs), pearson_by_seed=[r["pearson"] for r in runs])
        curve.append(row)
        print(f"{n:4d} labels: Pearson {row['pearson']:.3f} {row['pearson_by_seed']}  Spearman "
              f"{row['spearman']:.3f}  MAE {row['mae']:.3f}  top-10% {row['topk_precision']:.3f}  fit "
              f"{row['fit_seconds']:.2f}s  unc~err {row['uncertainty_error_spearman']:.2f}  | "
              f"{runs[-1]['head']}", flush=True)
    everything = np.arange(len(feats["ratings"]))  # refit time on every rated row of the file
    timing = head_run(feats, blocks, everything, 0)["fit_seconds"]
    per_1000 = round(timing / len(everything) * 1000, 2)
    print(f"refit on all {len(everything)} rows: {timing:.2f}s, {per_1000}s per 1,000 labels", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "features": str(args.features), "blocks": blocks, "pairs": args.pairs,
            "machine": f"{platform.processor() or platform.machine()}, OMP_NUM_THREADS="
                       f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
            "curve": curve, "refit_seconds_per_1000_labels": per_1000, "runs": results}, indent=1, default=str))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--sizes", help="numbers of training labels (default: 50,100,200,400,all; with "
                   "--features 25,50,100,200,400,all)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--image-size", type=int, help="override scorer.image_size")
    p.add_argument("--arch", help="override scorer.arch")
    p.add_argument("--seeds", type=int, help="repeat each size with this many seeds (default 1; with --features 3)")
    p.add_argument("--json", "--out", help="write the results here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [train] key, e.g. --set mixup=0")
    p.add_argument("--data", help="the animeface-10 folder (default: ../shared/data/animeface-10)")
    p.add_argument("--features", help="benchmark the taste head on these cached features (.npz) instead")
    p.add_argument("--blocks", help="with --features: the feature blocks to use (default: all in the file)")
    p.add_argument("--pairs", type=int, default=0,
                   help="with --features: also this many comparisons among unrated training rows (simulated "
                        "from their ratings)")
    args = p.parse_args()
    if args.features:
        return head_benchmark(args)
    if args.data:
        global DATA
        DATA = Path(args.data)
    if not DATA.exists():
        print(f"{DATA} not present: nothing to benchmark", file=sys.stderr)
        return 0
    tcfg, scfg = TrainConfig(), ScorerConfig()
    if args.epochs:
        tcfg.epochs = args.epochs
    if args.image_size:
        scfg.image_size = args.image_size
    if args.arch:
        scfg.arch = args.arch
    for pair in args.set:
        key, value = pair.split("=", 1)
        setattr(tcfg, key, type(getattr(tcfg, key))(value))
    device = pick_device(args.device)
    rows = [(r["path"], int(r["rating"])) for r in csv.DictReader(open(DATA / "ratings.csv"))]
    train_rows = [r for r in rows if r[0].startswith("train/")]
    test_rows = [r for r in rows if r[0].startswith("test/")]
    test_x, test_y, _ = load(test_rows, scfg.image_size)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
               + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    print(f"{len(train_rows)} training and {len(test_rows)} test crops; {scfg.arch} {scfg.image_size}px on "
          f"{device} ({machine}); torch {torch.__version__}")
    results = []
    for size in (args.sizes or "50,100,200,400,all").split(","):
        n = len(train_rows) if size == "all" else int(size)
        for seed in range(args.seeds or 1):
            tcfg.seed = seed
            m = run(subset(train_rows, n, seed), test_x, test_y, tcfg, scfg, device)
            m["seed"] = seed
            results.append(m)
            print(f"{m['labels']:4d} labels: {format_metrics(m)}  | {m['train_seconds']}s, "
                  f"{m['seconds_per_1000_labels']}s per 1000 labels, {m['epochs']} epochs", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "machine": machine, "arch": scfg.arch,
                                               "image_size": scfg.image_size, "epochs": tcfg.epochs,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
