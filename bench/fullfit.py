"""Benchmark: how fast the full network fine-tune (``main.py train --full``) runs on a CPU, and
where an epoch's time goes (issue 14: aim ≤ 120 s per 1,000 labels).

Loads the face crops of ``../shared/data/animeface-10`` straight into uint8 arrays (no
database), holds out the fixed validation share of ``train/`` (by content hash, as ``main.py
train`` does), then

  1. ``--profile N``: times N epochs of a copy of ``fit()``'s loop, step by step (augment,
     forward, backward + optimizer step, EMA update, validation pass, best-state copy);
  2. runs ``fit()`` itself to early stopping and reports seconds per epoch per 1,000 crops,
     seconds per 1,000 labels, and the network's test Pearson (flip TTA), as
     ``bench/learning.py`` measures it.

    OMP_NUM_THREADS=1 python bench/fullfit.py --profile 2          # breakdown, then a full fit
    OMP_NUM_THREADS=1 python bench/fullfit.py --no-fit --profile 3 --set batch_size=64
    OMP_NUM_THREADS=1 python bench/fullfit.py --set epochs=40 --json before.json

Torch runs with ``--threads`` threads (default 1): on a shared machine compare variants by
alternating runs, not one after another. Figures are in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import platform
import sys
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from scorer.dataset import split_of  # noqa: E402
from scorer.evaluate import metrics  # noqa: E402
from scorer.model import build_model, resize_crop  # noqa: E402
from scorer.settings import ScorerConfig, TrainConfig  # noqa: E402
from scorer.train import fit, predict, train_step_inputs  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "animeface-10"


def load(folder: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 crops (N, size, size, 3), ratings, content hashes) of ``folder``'s rows of ratings.csv."""
    rows = [(r["path"], float(r["rating"])) for r in csv.DictReader(open(DATA / "ratings.csv"))
            if r["path"].startswith(folder + "/")]
    arrays, keys = [], []
    for rel, _ in rows:
        data = (DATA / rel).read_bytes()
        keys.append(hashlib.sha256(data).hexdigest())
        arrays.append(resize_crop(Image.open(BytesIO(data)), size))
    return np.stack(arrays), np.array([r for _, r in rows], np.float32), keys


def profile(net, x_train, y_train, x_val, y_val, tcfg: TrainConfig, epochs: int) -> dict:
    """Seconds per epoch spent in each part of ``fit()``'s loop (a copy of it with timers)."""
    import copy

    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    xt = torch.from_numpy(np.ascontiguousarray(x_train)).permute(0, 3, 1, 2)
    yt = torch.tensor(y_train)
    bs = min(tcfg.batch_size, len(xt))
    steps = math.ceil(len(xt) / bs)
    opt = torch.optim.AdamW(net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    ema = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tcfg.ema), use_buffers=True)
    parts = dict.fromkeys(("augment", "forward", "backward+step", "ema", "validation", "best copy"), 0.0)
    started = time.perf_counter()
    for _ in range(epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(len(xt)))
        for step in range(steps):
            idx = order[step * bs:(step + 1) * bs]
            if len(idx) < 2:
                continue
            t = time.perf_counter()
            x, y = train_step_inputs(xt[idx], yt[idx], tcfg, rng)
            t, parts["augment"] = time.perf_counter(), parts["augment"] + time.perf_counter() - t
            loss = F.mse_loss(net(x), y)
            t, parts["forward"] = time.perf_counter(), parts["forward"] + time.perf_counter() - t
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t, parts["backward+step"] = time.perf_counter(), parts["backward+step"] + time.perf_counter() - t
            ema.update_parameters(net)
            parts["ema"] += time.perf_counter() - t
        t = time.perf_counter()
        predict(ema.module, x_val, torch.device("cpu"))
        t, parts["validation"] = time.perf_counter(), parts["validation"] + time.perf_counter() - t
        copy.deepcopy(ema.module.state_dict())
        parts["best copy"] += time.perf_counter() - t
    total = time.perf_counter() - started
    out = {k: round(v / epochs, 2) for k, v in parts.items()}
    out["other"] = round(total / epochs - sum(out.values()), 2)
    out["epoch"] = round(total / epochs, 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="first time N epochs part by part")
    p.add_argument("--no-fit", action="store_true", help="only the breakdown, no full fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [train] key, e.g. --set epochs=20")
    p.add_argument("--json", help="append the result (one JSON line) to this file")
    args = p.parse_args()
    if not DATA.exists():
        print(f"{DATA} not present: nothing to benchmark", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    tcfg, scfg = TrainConfig(seed=args.seed), ScorerConfig()
    for pair in args.set:
        key, value = pair.split("=", 1)
        setattr(tcfg, key, type(getattr(tcfg, key))(value))
    x, y, keys = load("train", scfg.image_size)
    test_x, test_y, _ = load("test", scfg.image_size)
    val = np.array([split_of(k, tcfg.val_share) == "val" for k in keys])
    n_train = int((~val).sum())
    print(f"{len(x)} labelled crops ({n_train} train, {int(val.sum())} validation), {len(test_x)} test; "
          f"{scfg.arch} {scfg.image_size}px, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {' '.join(args.set) or 'defaults'}", flush=True)
    result = {"set": args.set, "seed": args.seed, "threads": args.threads, "labels": len(x)}
    if args.profile:
        torch.manual_seed(tcfg.seed)
        parts = profile(build_model(scfg.arch), x[~val], y[~val], x[val], y[val], tcfg, args.profile)
        per_1000 = round(parts["epoch"] / n_train * 1000, 2)
        print(f"one epoch ({n_train} crops): " + ", ".join(f"{k} {v}s" for k, v in parts.items())
              + f"; {per_1000}s per 1,000 crops", flush=True)
        result.update(breakdown=parts, epoch_seconds_per_1000_crops=per_1000)
    if not args.no_fit:
        torch.manual_seed(tcfg.seed)
        net = build_model(scfg.arch)
        started = time.monotonic()
        fitted = fit(net, x[~val], y[~val], x[val], y[val], tcfg, torch.device("cpu"), progress=False)
        seconds = time.monotonic() - started
        m = metrics(predict(fitted.net, test_x, torch.device("cpu"), tta=True), test_y)
        epochs = len(fitted.history)
        result.update(test_pearson=m["pearson"], test_mae=m["mae"], epochs_run=epochs, best_epoch=fitted.best_epoch,
                      seconds=round(seconds, 1), seconds_per_1000_labels=round(seconds / len(x) * 1000, 1),
                      epoch_seconds_per_1000_crops=round(seconds / epochs / n_train * 1000, 2),
                      history=[(h["epoch"], h["val_loss"], h["seconds"]) for h in fitted.history])
        print(f"fit: {epochs} epochs (best {fitted.best_epoch}), {seconds:.0f}s = "
              f"{result['seconds_per_1000_labels']}s per 1,000 labels, "
              f"{result['epoch_seconds_per_1000_crops']}s per epoch per 1,000 crops; "
              f"test Pearson {m['pearson']}, MAE {m['mae']}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
