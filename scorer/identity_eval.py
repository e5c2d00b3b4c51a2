"""How well an identity embedder tells characters apart (``python main.py characters eval``).

On the named faces, split as ``characters train`` splits them (:func:`scorer.identity_train.named_examples`,
with the validation share the embedder was trained with): the training faces are enrolled, the
validation faces are identified.

- **closed set**: every validation face's character is enrolled; top-1 accuracy, per character,
  and a confusion matrix (``confusion.png``; the ``TOP_N`` characters with the most validation
  faces, the rest pooled as "other").
- **open set**: the characters are dealt into ``UNKNOWN_FOLDS`` groups (by a hash of the name);
  each group in turn is left out of the enrolled set, and its faces (all of them) are identified
  with the validation faces of the others. A face is right when it gets its own character;
  precision (right among the faces given a name), recall (known faces given their own name),
  F1 and the share of unknown faces rejected, summed over the folds. The threshold is the one
  recognition uses: the embedder's calibrated threshold, or (the untrained embedder) one
  calibrated on each fold's enrolled examples, leaving each out in turn. ``similarity.png``:
  the similarity distributions of known and unknown faces, with the threshold.

The figures are written to ``metrics.json`` beside the plots and merged into the embedder's
stored metrics (``closed_set``, ``open_set``, ``per_character``), where ``characters list``, the
Model page and ``/stats`` read them; the untrained embedder's are only written to the file (its
metrics stay empty: that is what marks it untrained).
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from scorer.identity import Embedder, Recognizer
from scorer.identity_train import named_examples, per_character

UNKNOWN_FOLDS = 3     # open set: each character is held out as unknown in one of this many folds
TOP_N = 20            # characters drawn in the confusion matrix (the rest pooled as "other")


class EvalError(ValueError):
    """Nothing to evaluate on; the message says why and what to do, in one line."""


@dataclass
class IdentityEval:
    version: str
    metrics: dict
    plots: list[Path] = field(default_factory=list)
    metrics_path: Path | None = None
    stored: bool = False          # merged into the embedder's stored metrics


def embed_with_progress(embedder: Embedder, arrays: np.ndarray, *, progress: bool | None = None,
                        chunk: int = 256) -> np.ndarray:
    """:meth:`Embedder.embed_arrays` in chunks, with a progress bar (on a terminal, or if asked)."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(arrays), desc="embedding", unit="face", file=sys.stderr,
              disable=(not sys.stderr.isatty()) if progress is None else not progress) as bar:
        for start in range(0, len(arrays), chunk):
            out.append(embedder.embed_arrays(list(arrays[start:start + chunk])))
            bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)


def fold_of(name: str, folds: int) -> int:
    """The open-set fold in which a character is held out (stable: a hash of its name)."""
    return int(hashlib.sha256(f"tastefeed-fold:{name}".encode()).hexdigest()[:8], 16) % folds


def closed_set(emb: np.ndarray, labels: np.ndarray, train: np.ndarray, *, k: int, nearest: bool) -> dict:
    """Top-1 of the validation faces (``~train``) with the training faces enrolled; the predictions
    (``pred``, ``true``) for the confusion matrix."""
    rec = Recognizer(emb[train], labels[train], k=k, nearest=nearest)
    best, _ = rec.scores(emb[~train])
    pred, true = rec.characters[best], labels[~train]
    correct = pred == true
    return {"top1": round(float(correct.mean()), 4), "n": int(len(true)),
            "per_character": per_character(true, correct), "pred": pred, "true": true}


def open_set(emb: np.ndarray, labels: np.ndarray, train: np.ndarray, names: dict[int, str], *, k: int,
             nearest: bool, threshold: float | None, target_precision: float, folds: int = UNKNOWN_FOLDS) -> dict:
    """Precision, recall and F1 with each fold's characters left out of the enrolled set (see the
    module docstring); the similarities of known and unknown faces for the plot."""
    chars = np.unique(labels)
    folds = max(2, min(folds, len(chars)))
    fold = {c: fold_of(names.get(int(c), str(c)), folds) for c in chars}
    # a fold that would hold out nothing, or everything, borrows characters round-robin
    groups = [[c for c in chars if fold[c] == f] for f in range(folds)]
    if any(not g for g in groups) or any(len(g) == len(chars) for g in groups):
        groups = [list(chars[f::folds]) for f in range(folds)]
    named = right = known_n = unknown_n = rejected = 0
    sims_known, sims_unknown, ok_known, thresholds = [], [], [], []
    for out in groups:
        unknown = np.isin(labels, out)
        enrol = train & ~unknown
        if not enrol.any():
            continue
        rec = Recognizer(emb[enrol], labels[enrol], k=k, nearest=nearest)
        if threshold is not None:
            rec.threshold = threshold
        else:
            rec.calibrate_self(target_precision)
        thresholds.append(rec.threshold)
        query = (~train & ~unknown) | unknown
        got = rec.identify(emb[query])
        pred = np.array([-1 if c is None else c for c, _ in got])
        is_unknown = unknown[query]
        true = labels[query]
        named += int((pred >= 0).sum())
        right += int(((pred == true) & ~is_unknown).sum())
        known_n += int((~is_unknown).sum())
        unknown_n += int(is_unknown.sum())
        rejected += int((pred[is_unknown] < 0).sum())
        best, best_sims = rec.scores(emb[query])     # the best character, accepted or not
        sims_known += list(best_sims[~is_unknown])
        ok_known += list(rec.characters[best][~is_unknown] == true[~is_unknown])
        sims_unknown += list(best_sims[is_unknown])
    precision = right / named if named else 0.0
    recall = right / known_n if known_n else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "unknown_rejected": round(rejected / unknown_n, 4) if unknown_n else None,
            "threshold": round(float(np.mean(thresholds)), 4) if thresholds else None,   # the folds' mean
            "thresholds": [round(float(t), 4) for t in thresholds],
            "threshold_from": "embedder" if threshold is not None else "enrolled examples (leave-one-out)",
            "folds": len(thresholds), "n_known": known_n, "n_unknown": unknown_n,
            "sims_known": np.array(sims_known), "ok_known": np.array(ok_known, dtype=bool),
            "sims_unknown": np.array(sims_unknown)}


# ---- plots -------------------------------------------------------------------------------------
def plot_confusion(pred, true, names: dict[int, str], path: Path, *, title: str = "", top_n: int = TOP_N) -> Path:
    """Rows: true character, columns: predicted; each row as shares of its faces (counts written
    in the cells). The ``top_n`` characters with the most faces; the rest pooled as "other"."""
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False   # names are text: "$x$" is not a formula   # names are text: "$x$" is not a formula
    import matplotlib.pyplot as plt

    pred, true = np.asarray(pred), np.asarray(true)
    counts = {c: int((true == c).sum()) for c in np.unique(true)}
    shown = sorted(counts, key=lambda c: (-counts[c], names.get(int(c), "")))[:top_n]
    other = len(counts) > len(shown) or bool(np.setdiff1d(pred, shown).size)
    index = {c: i for i, c in enumerate(shown)}
    size = len(shown) + other

    def at(c):
        return index.get(c, len(shown))

    matrix = np.zeros((size, size), dtype=int)
    for t, p in zip(true, pred):
        matrix[at(t), at(p)] += 1
    labels = [names.get(int(c), str(c)) for c in shown] + (["other"] if other else [])
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = max(4.5, 0.45 * size + 2.5)
    from scorer.evaluate import dark_style
    with dark_style():
        fig, ax = plt.subplots(figsize=(side + 1, side), layout="constrained")
        ax.grid(False)
        im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(size), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(size), labels, fontsize=8)
        ax.set_xlabel("predicted character")
        ax.set_ylabel("true character")
        if size <= 30:
            for i in range(size):
                for j in range(size):
                    if matrix[i, j]:
                        ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if shares[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true character's faces")
        ax.set_title(f"Confusion matrix {title}".strip(), fontsize=10)
        fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path


def plot_similarities(op: dict, path: Path, *, title: str = "") -> Path:
    """Histograms of the best similarity of known faces (right and wrong character) and of
    unknown faces (their character not enrolled), with the threshold."""
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False   # names are text: "$x$" is not a formula   # names are text: "$x$" is not a formula
    import matplotlib.pyplot as plt

    from scorer.evaluate import TEXT, dark_style
    with dark_style():
        fig, ax = plt.subplots(figsize=(7, 4.4), layout="constrained")
        known, ok, unknown = op["sims_known"], op["ok_known"], op["sims_unknown"]
        every = np.r_[known, unknown, op["thresholds"]]
        lo, hi = (float(every.min()), float(every.max())) if len(every) else (0.0, 1.0)
        pad = max(hi - lo, 0.01) * 0.05
        bins = np.linspace(lo - pad, hi + pad, 41)
        ax.hist(known[ok], bins=bins, alpha=0.6, color="tab:green", label=f"known, right character (n={int(ok.sum())})")
        if (~ok).any():
            ax.hist(known[~ok], bins=bins, alpha=0.6, color="tab:orange",
                    label=f"known, wrong character (n={int((~ok).sum())})")
        ax.hist(unknown, bins=bins, alpha=0.5, color="tab:red", label=f"unknown: not enrolled (n={len(unknown)})")
        for i, t in enumerate(sorted(set(op["thresholds"]))):   # one per fold when calibrated per fold
            ax.axvline(t, color=TEXT, ls="--", lw=1,
                       label=None if i else "threshold" + (" (per fold)" if len(set(op["thresholds"])) > 1 else ""))
        ax.set_xlabel("similarity to the best character")
        ax.set_ylabel("faces")
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)
        ax.set_title(f"Known vs unknown faces {title}\nprecision {op['precision']:.2f}, recall {op['recall']:.2f}, "
                     f"F1 {op['f1']:.2f}", fontsize=10)
        fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path


# ---- from the store ----------------------------------------------------------------------------
def evaluate_identity(store, paths, icfg, *, margin: float, max_pixels: int = 90_000_000,
                      version: str | None = None, out_dir: str | Path | None = None,
                      progress: bool | None = None) -> IdentityEval:
    """Evaluate an embedder (default: the active one) on the named faces: metrics, plots and
    ``metrics.json`` in ``out_dir`` (default ``<data>/eval/<version>/``). :class:`EvalError` when
    there is nothing to evaluate on; :class:`~scorer.model.ModelError` for a missing version or file."""
    from scorer.characters import ensure_active_embedder, load_embedder, untrained
    from scorer.dataset import CropCache
    from scorer.model import ModelError

    if version:
        row = store.get_identity_model(version)
        if row is None:
            known = ", ".join(r["version"] for r in store.list_identity_models()) or "none"
            raise ModelError(f"no identity embedder {version!r} (known: {known})")
    else:
        row = ensure_active_embedder(store, icfg, paths.models)
    recorded = json.loads(row["metrics"]) if row["metrics"] else {}
    names = store.character_names()
    examples = named_examples(store, recorded.get("val_share", icfg.val_share))
    hint = "python main.py characters import DIR, or characters add NAME PICTURE..."
    if not examples:
        raise EvalError(f"no named faces to evaluate on: name faces first ({hint})")
    characters = {int(e.rating) for e in examples}
    if len(characters) < 2:
        raise EvalError(f"named faces of 1 character only ({names.get(characters.pop(), '?')}): "
                        f"evaluation needs 2 or more ({hint})")
    embedder = load_embedder(row, icfg, paths.models)
    cache = CropCache(paths.cache, embedder.image_size, margin)
    arrays, kept = cache.arrays(examples, paths.media, max_pixels=max_pixels, progress=progress)
    train = np.array([e.split == "train" for e in kept], dtype=bool)
    if train.all():
        raise EvalError(f"no validation faces among {len(kept)} named face(s): name more faces "
                        "(a share characters.val_share of them is held out)")
    labels = np.array([int(e.rating) for e in kept])
    emb = embed_with_progress(embedder, arrays, progress=progress)
    nearest = untrained(row)
    closed = closed_set(emb, labels, train, k=icfg.k, nearest=nearest)
    op = open_set(emb, labels, train, names, k=icfg.k, nearest=nearest, threshold=row.get("threshold"),
                  target_precision=icfg.threshold_precision)
    per = {names.get(c, str(c)): v for c, v in closed["per_character"].items()}
    metrics = {
        "version": row["version"], "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_enrolled": int(train.sum()), "n_val": int((~train).sum()), "characters": len(np.unique(labels)),
        "closed_set": {"top1": closed["top1"], "n": closed["n"]},
        "open_set": {k: v for k, v in op.items() if not k.startswith(("sims_", "ok_"))},
        "per_character": per}
    out = Path(out_dir) if out_dir else paths.eval / row["version"]
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_confusion(closed["pred"], closed["true"], names, out / "confusion.png", title=row["version"]),
             plot_similarities(op, out / "similarity.png", title=row["version"])]
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps({**metrics, "plots": [p.name for p in plots]}, indent=2, ensure_ascii=False))
    stored = False
    if not untrained(row):
        stored = store.update_identity_metrics(row["version"], {
            "closed_set": metrics["closed_set"], "open_set": metrics["open_set"], "per_character": per,
            "evaluated_at": metrics["evaluated_at"]})
    return IdentityEval(row["version"], metrics, plots, metrics_path, stored)
