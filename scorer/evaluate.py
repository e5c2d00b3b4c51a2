"""Model quality: correlation, errors and top-k precision, per picture; and the plots.

Metrics are computed per picture: a picture's prediction is the max (or mean) of its faces', as
when the daemon ranks pictures. ``topk_precision`` is the share of the pictures the model ranks in
its top 10% that the owner rated 4 or 5.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

TOP_SHARE = 0.10
LIKED = 4


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def metrics(pred, true) -> dict:
    """Pearson, Spearman, MAE, RMSE and top-10% precision of predictions against ratings."""
    pred = np.asarray(pred, dtype=float)
    true = np.asarray(true, dtype=float)
    n = len(pred)
    out: dict = {"n": n, "pearson": None, "spearman": None, "mae": None, "rmse": None,
                 "topk_precision": None, "topk": 0, "liked_share": None}
    if n == 0:
        return out
    err = pred - true
    out["mae"] = _finite(np.abs(err).mean())
    out["rmse"] = _finite(np.sqrt((err ** 2).mean()))
    if n >= 3 and pred.std() > 0 and true.std() > 0:
        out["pearson"] = _finite(stats.pearsonr(pred, true)[0])
        out["spearman"] = _finite(stats.spearmanr(pred, true)[0])
    k = max(1, int(round(n * TOP_SHARE)))
    top = np.argsort(-pred, kind="stable")[:k]
    out["topk"] = k
    out["topk_precision"] = _finite((true[top] >= LIKED).mean())
    out["liked_share"] = _finite((true >= LIKED).mean())  # what a random pick would reach
    return out


def per_picture(image_ids, face_preds, ratings, how: str = "max") -> tuple[list[int], np.ndarray, np.ndarray]:
    """Face-level predictions -> (picture ids, picture predictions, picture ratings)."""
    preds: dict[int, list[float]] = defaultdict(list)
    rating: dict[int, float] = {}
    for i, p, r in zip(image_ids, face_preds, ratings):
        preds[i].append(float(p))
        rating[i] = float(r)
    ids = sorted(preds)
    agg = np.mean if how == "mean" else np.max
    return ids, np.array([agg(preds[i]) for i in ids]), np.array([rating[i] for i in ids])


def better(new: dict, old: dict | None, margin: float = 0.0) -> bool:
    """Whether ``new`` beats ``old`` on validation Pearson (by more than ``margin``)."""
    if new.get("pearson") is None:
        return False
    if not old or old.get("pearson") is None:
        return True
    return new["pearson"] > old["pearson"] + margin


def format_metrics(m: dict) -> str:
    def f(key):
        return "n/a" if m.get(key) is None else f"{m[key]:.3f}"
    return (f"Pearson {f('pearson')}  Spearman {f('spearman')}  MAE {f('mae')}  RMSE {f('rmse')}  "
            f"top-{TOP_SHARE:.0%} precision {f('topk_precision')} (of {m.get('topk', 0)}; "
            f"base rate {f('liked_share')})  n={m.get('n', 0)}")


# The gallery's dark theme (bot/static/style.css), so the plots sit on its pages.
BACKGROUND, PANEL, TEXT, DIM, GRID = "#15171c", "#20232b", "#e6e6e6", "#8a8f98", "#2d313b"
COLOURS = ["#f0a040", "#5aa9e6", "#6cc070", "#e06c9f", "#b39ddb"]
STYLE = {"figure.facecolor": BACKGROUND, "savefig.facecolor": BACKGROUND, "axes.facecolor": PANEL,
         "axes.edgecolor": DIM, "axes.labelcolor": TEXT, "axes.titlecolor": TEXT, "text.color": TEXT,
         "xtick.color": TEXT, "ytick.color": TEXT, "grid.color": GRID, "axes.grid": True, "grid.linewidth": 0.6,
         "legend.facecolor": PANEL, "legend.edgecolor": GRID, "legend.labelcolor": TEXT, "font.size": 10,
         "axes.titlesize": 11, "figure.titlesize": 12}


def dark_style():
    """A context in which new matplotlib figures take the gallery's dark style (the figure keeps
    it when drawn and saved later)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler
    return plt.rc_context(dict(STYLE, **{"axes.prop_cycle": cycler(color=COLOURS)}))


def plot_figures(pred, true, history: list[dict] | None, title: str = "") -> dict:
    """The evaluation figures (file name -> matplotlib Figure), in the gallery's dark style, laid
    out so titles, labels and legends stay inside the figure and no legend covers a curve
    (the learning curve's legend is below the axes). Draw or save them in :func:`dark_style`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = np.asarray(pred, dtype=float)
    true = np.asarray(true, dtype=float)
    under = f"\n{title}" if title else ""
    figs = {}
    with dark_style():
        # Predicted scores of the pictures of each rating: a box and the pictures as points.
        fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
        groups = [pred[np.round(true) == r] for r in range(1, 6)]
        shown = [g if len(g) else np.array([np.nan]) for g in groups]
        ax.boxplot(shown, positions=range(1, 6), widths=0.5, showfliers=False,
                   medianprops={"color": COLOURS[0], "linewidth": 2}, boxprops={"color": DIM},
                   whiskerprops={"color": DIM}, capprops={"color": DIM})
        jitter = np.random.default_rng(0)
        for r, g in enumerate(groups, start=1):
            ax.scatter(r + jitter.uniform(-0.15, 0.15, len(g)), g, s=9, alpha=0.55, color=COLOURS[1], zorder=3)
        ax.plot([0.6, 5.4], [0.6, 5.4], ls="--", lw=0.8, color=DIM)
        ax.set_xticks(range(1, 6), [f"{r}\nn={len(g)}" for r, g in enumerate(groups, start=1)])
        ax.set_xlim(0.5, 5.5)
        ax.set_xlabel("your rating")
        ax.set_ylabel("predicted score")
        ax.set_title("Predicted scores by your rating" + under)
        figs["by_rating.png"] = fig

        fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(true))
        ax.scatter(true + jitter, pred, s=10, alpha=0.55, color=COLOURS[1])
        ax.plot([1, 5], [1, 5], ls="--", lw=0.8, color=DIM)
        ax.set_xlim(0.5, 5.5)
        ax.set_ylim(0.5, 5.5)
        ax.set_xlabel("your rating")
        ax.set_ylabel("predicted score")
        m = metrics(pred, true)
        shown = {k: "n/a" if m[k] is None else f"{m[k]:.3f}" for k in ("pearson", "mae")}
        ax.set_title(f"Predicted against your rating: Pearson {shown['pearson']}, MAE {shown['mae']}" + under)
        figs["pred_vs_true.png"] = fig

        if history:
            fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
            epochs = [h["epoch"] for h in history]
            ax.plot(epochs, [h["train_loss"] for h in history], color=COLOURS[0], label="train loss (MSE, mixed)")
            ax.plot(epochs, [h["val_loss"] for h in history], color=COLOURS[1], label="validation loss (MSE)")
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss")
            ax2 = ax.twinx()
            ax2.grid(False)
            ax2.plot(epochs, [h.get("val_pearson") or 0 for h in history], color=COLOURS[2],
                     label="validation Pearson")
            ax2.set_ylabel("Pearson")
            lines, labels = ax.get_legend_handles_labels()
            lines2, labels2 = ax2.get_legend_handles_labels()
            fig.legend(lines + lines2, labels + labels2, loc="outside lower center", ncols=3, fontsize=9)
            ax.set_title("Learning curve" + under)
            figs["learning_curve.png"] = fig
    return figs


def plot_evaluation(pred, true, history: list[dict] | None, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write by_rating.png, pred_vs_true.png and (with a history) learning_curve.png (in the
    gallery's dark style; see :func:`plot_figures`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with dark_style():   # ticks added when drawn take the style too
        for name, fig in plot_figures(pred, true, history, title).items():
            paths.append(out_dir / name)
            fig.savefig(paths[-1], dpi=100, bbox_inches="tight", pad_inches=0.15)
            plt.close(fig)
    return paths


def evaluate_version(store, paths, scfg, tcfg, version: str | None = None, out_dir: str | Path | None = None,
                     *, margin: float, max_pixels: int,
                     progress: bool | None = None) -> tuple[dict, list[Path], dict]:
    """Metrics and plots of a registered model (default: the active one) on the validation split.

    ``paths`` is a :class:`storage.paths.DataPaths`, ``scfg`` and ``tcfg`` the scorer and train
    settings, ``margin`` the crop margin (``detector.margin``) and ``max_pixels`` the decoding guard.
    Returns (metrics, plot paths, the model's row). Plots go to ``<data>/eval/<version>/``.
    """
    import json

    from scorer.dataset import build_examples
    from scorer.model import ModelError
    from scorer.registry import load_scorer

    row = store.get_model(version) if version else store.active_model()
    if row is None:
        raise ModelError(f"no model {version!r} (see `python main.py models list`)" if version
                         else "no active model yet: run `python main.py train`")
    scorer = load_scorer(row, scfg, paths.models, margin=margin)
    recorded = json.loads(row["metrics"]) if row["metrics"] else {}
    val_share = recorded.get("val_share", tcfg.val_share)
    examples = [e for e in build_examples(store.training_rows(), faces=tcfg.faces, val_share=val_share)
                if e.split == "val"]
    from scorer.train import feature_predictions

    pred, true = feature_predictions(scorer, store, examples, paths, margin=margin, max_pixels=max_pixels,
                                     how=scfg.aggregate, progress=progress)
    m = metrics(pred, true)
    out = Path(out_dir) if out_dir else paths.eval / row["version"]
    plots = plot_evaluation(pred, true, recorded.get("history"), out, title=row["version"]) if len(pred) else []
    return m, plots, row
