"""Benchmark: how well, and how fast, the identity embedder tells characters apart.

On ``../shared/data/animeface-10`` (face crops, ``train/<character>/`` and ``test/<character>/``),
with the same loop and defaults as ``main.py characters train`` (``[characters]``):

- **closed set**: train on every character's ``train/`` crops (a hash-chosen validation share
  drives early stopping), enrol all of them, identify ``test/``: top-1 accuracy, per character.
- **open set, leave characters out**: train on the first characters only; enrol all their
  ``train/`` crops and 5 crops of each of the next ones (never trained on); leave the last ones
  out entirely (unknown). Identify every ``test/`` crop: a face is right when it gets its own
  character, or *unknown* for a character never enrolled. The unknown threshold is calibrated as
  ``characters train`` does, on the validation crops of the trained characters (with impostors) to
  ``characters.threshold_precision``. Precision (right among the faces given a name), recall
  (known faces given their own name) and F1.
- **speed**: time per 1,000 faces to embed (crops already decoded and resized) and to identify
  (the recognizer over the enrolled examples), on this machine.

    OMP_NUM_THREADS=1 python bench/characters.py --epochs 15
    python bench/characters.py --device cuda --json out.json

Figures are recorded in bench/RESULTS.md with the machine they ran on.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from scorer.dataset import split_of  # noqa: E402
from scorer.identity import Embedder, Recognizer, build_embedder, calibrate_threshold  # noqa: E402
from scorer.identity_train import fit_identity  # noqa: E402
from scorer.model import pick_device, resize_crop  # noqa: E402
from scorer.settings import IdentityConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "animeface-10"


def load(split: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(crops, character index, character names, content hashes) of ``DATA/split``."""
    names = sorted(p.name for p in (DATA / split).iterdir() if p.is_dir())
    arrays, labels, keys = [], [], []
    for i, name in enumerate(names):
        for path in sorted((DATA / split / name).iterdir()):
            data = path.read_bytes()
            arrays.append(resize_crop(Image.open(BytesIO(data)), size))
            labels.append(i)
            keys.append(hashlib.sha256(data).hexdigest())
    return np.stack(arrays), np.array(labels), names, keys


def train(icfg: IdentityConfig, x, y, keys, device, epochs) -> tuple[Embedder, dict]:
    """An embedder trained on (x, y) with the hash-chosen validation share held out."""
    val = np.array([split_of(k, icfg.val_share) == "val" for k in keys])
    classes = np.unique(y)
    index = {c: i for i, c in enumerate(classes)}
    yi = np.array([index[c] for c in y])
    torch.manual_seed(icfg.seed)
    net = build_embedder(icfg.arch, icfg.pretrained, icfg.embedding_dim)
    t0 = time.monotonic()
    fit = fit_identity(net, x[~val], yi[~val], x[val], yi[val], icfg, device, epochs=epochs, progress=False)
    seconds = time.monotonic() - t0
    emb = Embedder(fit.net, arch=icfg.arch, version="bench", image_size=icfg.image_size, device=str(device),
                   batch_size=256)
    return emb, {"train_seconds": round(seconds, 1), "epochs_run": len(fit.history), "best_epoch": fit.best_epoch,
                 "val_top1": round(fit.best_top1, 4), "n_train": int((~val).sum()), "n_val": int(val.sum()),
                 "val_mask": val}


def closed_set(icfg, device, epochs) -> dict:
    x, y, names, keys = load("train", icfg.image_size)
    xt, yt, _, _ = load("test", icfg.image_size)
    emb, info = train(icfg, x, y, keys, device, epochs)
    info.pop("val_mask")
    rec = Recognizer(emb.embed_arrays(list(x)), y, k=icfg.k)
    t0 = time.monotonic()
    q = emb.embed_arrays(list(xt))
    embed_s = time.monotonic() - t0
    t0 = time.monotonic()
    best, _ = rec.scores(q)
    identify_s = time.monotonic() - t0
    pred = rec.characters[best]
    per = {names[c]: round(float((pred[yt == c] == c).mean()), 3) for c in np.unique(yt)}
    return {"top1": round(float((pred == yt).mean()), 4), "per_character": per, "n_test": len(yt), **info,
            "embed_ms_per_1000": round(embed_s / len(yt) * 1e6, 0),
            "identify_ms_per_1000": round(identify_s / len(yt) * 1e6, 0), "enrolled": len(y)}


def open_set(icfg, device, epochs, n_trained: int, n_enrolled: int, shots: int, seed: int = 0) -> dict:
    x, y, names, keys = load("train", icfg.image_size)
    xt, yt, _, _ = load("test", icfg.image_size)
    order = np.random.default_rng(seed).permutation(len(names))
    trained, enrolled_only = order[:n_trained], order[n_trained:n_trained + n_enrolled]
    unknown = order[n_trained + n_enrolled:]
    on = np.isin(y, trained)
    emb, info = train(icfg, x[on], y[on], [k for k, o in zip(keys, on) if o], device, epochs)
    val = info.pop("val_mask")
    # the threshold, as `characters train` calibrates it: validation crops against the training crops
    xs_tr, ys_tr, xs_va, ys_va = x[on][~val], y[on][~val], x[on][val], y[on][val]
    e_tr, qv = emb.embed_arrays(list(xs_tr)), emb.embed_arrays(list(xs_va))

    def calibrated(nearest: bool) -> float:
        cal = Recognizer(e_tr, ys_tr, k=icfg.k, nearest=nearest)
        best, sims = cal.scores(qv)
        imp = cal.impostor_similarities(qv, ys_va)
        return calibrate_threshold(np.r_[sims, imp], np.r_[cal.characters[best] == ys_va, [False] * len(imp)],
                                   icfg.threshold_precision)

    threshold = calibrated(False)
    rng = np.random.default_rng(seed + 1)
    enrol_idx = list(np.nonzero(on)[0])
    for c in enrolled_only:
        mine = np.nonzero(y == c)[0]
        enrol_idx += list(rng.choice(mine, size=min(shots, len(mine)), replace=False))
    e_enrol = emb.embed_arrays(list(x[enrol_idx]))
    rec = Recognizer(e_enrol, y[enrol_idx], k=icfg.k, threshold=threshold)
    queries = emb.embed_arrays(list(xt))
    known = ~np.isin(yt, unknown)
    new = np.isin(yt, enrolled_only)

    def figures(got) -> dict:
        pred = np.array([-1 if c is None else c for c, _ in got])
        named = pred >= 0
        right = named & (pred == yt)
        precision = right.sum() / max(named.sum(), 1)
        recall = right.sum() / max(known.sum(), 1)
        return {"precision": round(float(precision), 4), "recall": round(float(recall), 4),
                "f1": round(float(2 * precision * recall / max(precision + recall, 1e-9)), 4),
                "unknown_rejected": round(float((pred[~known] < 0).mean()), 4) if (~known).any() else None,
                "recall_new_characters": round(float(right[new].sum() / max(new.sum(), 1)), 4),
                "precision_new_characters": round(float(
                    right[new].sum() / max((named & np.isin(pred, enrolled_only)).sum(), 1)), 4)}

    out = {**figures(rec.identify(queries)), "threshold": round(threshold, 4)}
    # the other calibration: on the enrolled examples themselves, leaving each out in turn
    loo = rec.calibrate_self(icfg.threshold_precision)
    out["enrolled_loo"] = {**figures(rec.identify(queries)), "threshold": round(loo, 4)}
    # a character's similarity also from its nearest example (as with the untrained embedder)
    with_nearest = Recognizer(e_enrol, y[enrol_idx], k=icfg.k, threshold=calibrated(True), nearest=True)
    out["with_nearest"] = {**figures(with_nearest.identify(queries)), "threshold": round(with_nearest.threshold, 4)}
    return {**out, "trained": [names[c] for c in trained], "enrolled_5": [names[c] for c in enrolled_only],
            "never_enrolled": [names[c] for c in unknown], "n_test": len(yt), **info}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, help="override characters.epochs")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--trained", type=int, default=6, help="open set: characters trained on")
    ap.add_argument("--enrolled", type=int, default=2, help="open set: characters enrolled from --shots crops")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a [characters] setting, e.g. --set margin=0.3")
    ap.add_argument("--seed", type=int, default=0, help="open set: which characters are held out")
    ap.add_argument("--skip", choices=["closed", "open"], action="append", default=[])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not DATA.exists():
        print(f"{DATA} not present", file=sys.stderr)
        return 1
    icfg = IdentityConfig(device=args.device)
    if args.image_size:
        icfg = dataclasses.replace(icfg, image_size=args.image_size)
    for pair in args.set:
        key, _, value = pair.partition("=")
        kind = type(getattr(icfg, key))
        icfg = dataclasses.replace(icfg, **{key: kind(value)})
    device = pick_device(args.device)
    out = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
                      f"{device}", "config": {k: v for k, v in dataclasses.asdict(icfg).items()},
           "epochs": args.epochs or icfg.epochs}
    if "closed" not in args.skip:
        out["closed"] = closed_set(icfg, device, args.epochs)
        c = out["closed"]
        print(f"closed set: top-1 {c['top1']} on {c['n_test']} test crops (validation {c['val_top1']}, "
              f"{c['epochs_run']} epochs, {c['train_seconds']} s); embed {c['embed_ms_per_1000']} ms and "
              f"identify {c['identify_ms_per_1000']} ms per 1,000 faces", flush=True)
        print(f"  per character: {c['per_character']}", flush=True)
    if "open" not in args.skip:
        out["open"] = o = open_set(icfg, device, args.epochs, args.trained, args.enrolled, args.shots, args.seed)
        print(f"open set: precision {o['precision']} recall {o['recall']} F1 {o['f1']} (threshold {o['threshold']}; "
              f"never-enrolled faces rejected {o['unknown_rejected']}; new characters from {args.shots} examples: "
              f"precision {o['precision_new_characters']} recall {o['recall_new_characters']}; "
              f"{o['epochs_run']} epochs, {o['train_seconds']} s)", flush=True)
        v = o["enrolled_loo"]
        print(f"  threshold calibrated on the enrolled examples instead (leave-one-out, {v['threshold']}): "
              f"precision {v['precision']} recall {v['recall']} F1 {v['f1']}; never-enrolled rejected "
              f"{v['unknown_rejected']}; new characters: precision {v['precision_new_characters']} "
              f"recall {v['recall_new_characters']}", flush=True)
        v = o["with_nearest"]
        print(f"  nearest examples counted too (threshold {v['threshold']}): precision {v['precision']} recall {v['recall']} "
              f"F1 {v['f1']}; never-enrolled rejected {v['unknown_rejected']}; new characters: precision "
              f"{v['precision_new_characters']} recall {v['recall_new_characters']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
