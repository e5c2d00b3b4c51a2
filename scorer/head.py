"""The taste head: a small model on cached features that refits in about a second.

A face (or a whole picture) arrives as feature *blocks*, any subset of :data:`BLOCKS`: the taste
backbone's pooled features, the identity embedding, the colour statistics, the whole picture's
backbone features. The head is a kernel ridge regression on them, fitted in closed form with
numpy (no torch, no child process):

    features   z_b = (x_b - mean_b) / std_b / sqrt(d_b) * sqrt(g_b)   per block b, concatenated
    kernel     k(a, b) = exp(-|z_a - z_b|^2) = exp(-sum_b g_b |.|^2)  (``kind = "ridge"``: z_a . z_b)
    fit        alpha = (K + lam I)^-1 (y - mean(y))      predict  mean(y) + k(x, examples) @ alpha

Each block's weight ``g_b`` (0 drops the block) and ``lam`` are chosen by exact leave-one-out
error (one eigendecomposition per kernel on at most ``SELECT_ON`` rated rows, every ``lam`` at
once) by a coordinate search; a linear kernel (plain ridge) on the same features is a candidate
too. Then:

- **Ordinal calibration.** The owner's ratings are integers 1-5; an isotonic (monotone) map from
  the leave-one-out predictions to the ratings is kept when it lowers the cross-fitted error of
  those predictions (``describe()["calibration"]``).
- **Comparisons.** ``pairs`` (winner, loser) add a Bradley-Terry term to the ratings' squared error,
  ``sum (f_i - y_i)^2 + PAIR_WEIGHT * sum log(1 + exp(-PAIR_SCALE (f_w - f_l))) + lam a'Ka``,
  minimised over the dual weights by Newton's method; rows that only appear in comparisons are
  examples too.
- **Uncertainty.** The kernel's own predictive variance (the Gaussian-process reading of kernel
  ridge, comparisons entering through their curvature): ``sigma^2 (1 + (k(x,x) - q(x)) / lam)``,
  ``sigma^2`` the leave-one-out error, ``q(x) = k_x' (K + lam W^-1)^-1 k_x`` kept as a low-rank
  factor. A face like a rated one gets about ``sigma``; one unlike all of them more.

Unlabelled faces are not used: standardising on them, projecting the backbone on principal
components fitted on them, Laplacian regularisation over them and pseudo-labels from confident
predictions were measured on animeface-10 and none helped (bench/RESULTS.md, *Taste head*).

The examples' features are stored as float16 (the head keeps its examples, as kernel methods do);
``to_state`` gives tensors and plain values for ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.linalg import cho_factor, cho_solve

BLOCKS = ("backbone", "identity", "colour", "whole")
SELECT_ON = 500                        # rated rows the hyperparameters are chosen on (a seeded sample)
MIN_SELECT = 10                        # fewer rated rows: default hyperparameters, no search
LAMS = tuple(float(v) for v in np.geomspace(0.01, 30.0, 15))
DEFAULT_LAM = 1.0                      # with few rows: predictions stay near the mean
STEPS = ((0.0, 1 / 3, 3.0), (0.5, 2.0))  # coordinate search: a block's weight times these
PAIR_WEIGHT = 1.0                      # a comparison's weight next to a rating's squared error
PAIR_SCALE = 2.0                       # a score gap of one rating point = 88% chance to be preferred
NEWTON_STEPS = 20                      # at most; it usually stops after 4-8
RANK = 128                             # rank of the stored predictive-variance factor
CAL_FOLDS = 5


@dataclass
class Block:
    """How one feature block becomes part of the kernel's input: ``(x - mean) * scale``, times
    ``sqrt(weight)``."""
    name: str
    mean: np.ndarray
    scale: np.ndarray
    weight: float = 1.0

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) - self.mean) * (self.scale * np.float32(np.sqrt(self.weight)))


@dataclass
class TasteHead:
    """A fitted head; arrays are float32 numpy (``examples`` hold float16-exact values)."""
    blocks: list[Block]
    kind: str                      # "kernel" (RBF) or "ridge" (linear)
    examples: np.ndarray           # (n, D) the training rows' features, as the kernel sees them
    alpha: np.ndarray              # (n,) dual weights
    mean: float                    # mean rating (the prediction far from every example)
    lam: float
    noise: float                   # leave-one-out RMSE (rating units); sigma above
    var_factor: np.ndarray         # (n, r) q(x) = |k(x, examples) @ var_factor|^2
    calibration: np.ndarray        # (2, m) isotonic map knots (raw score, rating); empty: none
    info: dict = field(default_factory=dict)

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def features(self, blocks: dict[str, np.ndarray]) -> np.ndarray:
        missing = [b.name for b in self.blocks if b.name not in blocks]
        if missing:
            raise ValueError(f"the taste head was fitted with the feature block(s) {', '.join(missing)}, "
                             f"missing here (given: {', '.join(sorted(blocks)) or 'none'})")
        parts = [b.transform(_rows(blocks[b.name], b.name, len(b.mean))) for b in self.blocks]
        if len({len(p) for p in parts}) > 1:
            raise ValueError("the taste head's feature blocks have different numbers of rows")
        return np.concatenate(parts, axis=1)

    def raw(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uncalibrated scores, kernel rows) for transformed features ``z``."""
        k = _kernel(z, self.examples, self.kind)
        return self.mean + k @ self.alpha, k

    def predict(self, blocks: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(scores 1-5, uncertainty): the uncertainty is a predictive standard deviation in rating
        units, larger for rows unlike every example."""
        z = self.features(blocks)
        score, k = self.raw(z)
        if self.calibration.size:
            score = np.interp(score, self.calibration[0], self.calibration[1])
        kxx = np.ones(len(z), np.float32) if self.kind == "kernel" else (z * z).sum(1)
        q = ((k @ self.var_factor) ** 2).sum(1) if self.var_factor.size else np.zeros(len(z), np.float32)
        var = self.noise ** 2 * (1.0 + np.maximum(kxx - q, 0.0) / self.lam)
        return (np.clip(score, 1.0, 5.0).astype(np.float32), np.sqrt(var).astype(np.float32))

    # ---- in the model file ------------------------------------------------------------------
    def to_state(self) -> dict:
        """A dict of tensors and plain values, loadable with ``torch.load(weights_only=True)``."""
        import torch

        def t(a, dtype=np.float32):
            return torch.from_numpy(np.ascontiguousarray(a, dtype))

        return {"kind": self.kind, "mean": float(self.mean), "lam": float(self.lam), "noise": float(self.noise),
                "blocks": [{"name": b.name, "mean": t(b.mean), "scale": t(b.scale), "weight": float(b.weight)}
                           for b in self.blocks],
                "examples": t(self.examples, np.float16), "alpha": t(self.alpha),
                "var_factor": t(self.var_factor, np.float16), "calibration": t(self.calibration),
                "info": self.info}

    @classmethod
    def from_state(cls, state: dict) -> "TasteHead":
        def a(x):
            return x.numpy().astype(np.float32)

        blocks = [Block(b["name"], a(b["mean"]), a(b["scale"]), float(b["weight"]))
                  for b in state["blocks"]]
        return cls(blocks, state["kind"], a(state["examples"]), a(state["alpha"]), float(state["mean"]),
                   float(state["lam"]), float(state["noise"]), a(state["var_factor"]), a(state["calibration"]),
                   dict(state.get("info") or {}))

    def describe(self) -> dict:
        """What the registry records about the head: kind, hyperparameters, examples, CV metrics."""
        return {"kind": self.kind, "blocks": {b.name: round(b.weight, 4) for b in self.blocks},
                "lam": round(self.lam, 4), "examples": len(self.examples), **self.info}


def _rows(x, name: str, d: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"feature block {name!r} should be (rows, {d}), not {x.shape}")
    return x


def _half(a: np.ndarray) -> np.ndarray:
    """float32 values that float16 stores exactly (what the state file keeps)."""
    return np.asarray(a).astype(np.float16).astype(np.float32)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d2, 0.0)


def _kernel(a: np.ndarray, b: np.ndarray, kind: str) -> np.ndarray:
    return np.exp(-_sq_dists(a, b)) if kind == "kernel" else a @ b.T


def _block(name: str, x: np.ndarray) -> Block:
    """Each dimension standardised on the training rows, then all of them scaled so that one
    row's squared distance to another averages about 2 whatever the block's width."""
    std = x.std(0)
    width = max(int((std > 1e-6).sum()), 1)
    scale = np.where(std > 1e-6, 1.0 / np.maximum(std, 1e-6), 0.0) / np.sqrt(width)
    return Block(name, x.mean(0).astype(np.float32), scale.astype(np.float32))


# ---- choosing the hyperparameters ---------------------------------------------------------------
def _loo(kernel: np.ndarray, yc: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(best leave-one-out RMSE, its lam, the leave-one-out predictions) over ``LAMS``: exact for
    kernel ridge, one eigendecomposition for every lam."""
    vals, vecs = np.linalg.eigh(kernel)
    proj = vecs.T @ yc
    sq = vecs ** 2
    best = None
    for lam in LAMS:
        inv = 1.0 / (np.maximum(vals, 0.0) + lam)
        resid = (vecs @ (inv * proj)) / (sq @ inv)     # alpha_i / [(K + lam I)^-1]_ii
        rmse = float(np.sqrt((resid ** 2).mean()))
        if best is None or rmse < best[0]:
            best = (rmse, lam, yc - resid)
    return best


def _search(dists: dict[str, np.ndarray], z: dict[str, np.ndarray], yc: np.ndarray) -> dict:
    """Block weights, kernel kind and lam by leave-one-out error: a coordinate search over each
    block's weight (the RBF kernel), then the linear kernel with the same weights."""
    names = list(dists)
    cache: dict[tuple, tuple] = {}

    def score(weights: dict[str, float]) -> tuple:
        key = tuple(round(weights[n], 6) for n in names)
        if key not in cache:
            if not any(key):
                cache[key] = (float(np.sqrt((yc ** 2).mean())), DEFAULT_LAM, np.zeros_like(yc))
            else:
                cache[key] = _loo(np.exp(-sum(weights[n] * dists[n] for n in names)), yc)
        return cache[key]

    weights = {n: 0.5 / len(names) for n in names}
    best = score(weights)
    for steps in STEPS:
        for n in names:
            base = weights[n] or 0.5 / len(names)
            for step in steps:
                trial = dict(weights, **{n: base * step})
                result = score(trial)
                if result[0] < best[0] - 1e-9:
                    weights, best = trial, result
    chosen = {"kind": "kernel", "weights": weights, "rmse": best[0], "lam": best[1], "loo": best[2],
              "candidates": len(cache)}
    active = [n for n in names if weights[n] > 0]
    if active:
        zl = np.concatenate([z[n] * np.sqrt(weights[n]) for n in active], axis=1)
        linear = _loo(zl @ zl.T, yc)
        chosen["linear_rmse"] = round(linear[0], 4)
        if linear[0] < best[0]:
            chosen.update(kind="ridge", rmse=linear[0], lam=linear[1], loo=linear[2])
    return chosen


# ---- ordinal calibration ----------------------------------------------------------------------
def _isotonic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Knots (2, m) of the least-squares non-decreasing map from x to y (pool adjacent violators)."""
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    values, weights, ends = [], [], []
    for i, v in enumerate(ys):
        values.append(float(v))
        weights.append(1.0)
        ends.append(i)
        while len(values) > 1 and values[-2] > values[-1]:
            w = weights[-2] + weights[-1]
            v = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            values[-2:], weights[-2:], ends[-2:] = [v], [w], [ends[-1]]
    starts = [0] + [e + 1 for e in ends[:-1]]
    kx, ky = [], []
    for s, e, v in zip(starts, ends, values):  # each block's first and last x, at its value
        kx += [xs[s], xs[e]]
        ky += [v, v]
    return np.array([kx, ky], np.float32)


def _calibration(pred: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    """The isotonic map from leave-one-out predictions to ratings, kept only when its cross-fitted
    squared error beats the raw predictions'."""
    folds = np.random.default_rng(seed).permutation(len(y)) % CAL_FOLDS
    out = np.empty_like(pred)
    for f in range(CAL_FOLDS):
        knots = _isotonic(pred[folds != f], y[folds != f])
        out[folds == f] = np.interp(pred[folds == f], knots[0], knots[1])
    raw, cal = float(np.sqrt(((pred - y) ** 2).mean())), float(np.sqrt(((out - y) ** 2).mean()))
    info = {"cv_rmse_raw": round(raw, 4), "cv_rmse_isotonic": round(cal, 4)}
    if cal < raw:
        return _isotonic(pred, y), dict(info, calibration="isotonic")
    return np.zeros((2, 0), np.float32), dict(info, calibration="none")


# ---- fitting -------------------------------------------------------------------------------------
def _fit_dual(kernel: np.ndarray, yc: np.ndarray, rated: np.ndarray, pairs: np.ndarray,
              lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(dual weights, curvature per row): kernel ridge in closed form without pairs; with pairs,
    Newton's method on squared error + Bradley-Terry loss + lam a'Ka (convex)."""
    n = len(yc)
    r = rated.astype(np.float64)
    alpha = np.zeros(n)
    if rated.any():
        idx = np.flatnonzero(rated)
        alpha[idx] = cho_solve(cho_factor(kernel[np.ix_(idx, idx)] + lam * np.eye(len(idx))), yc[idx])
    if not len(pairs):
        return alpha, r
    w, lo = pairs[:, 0], pairs[:, 1]

    def objective(a):
        f = kernel @ a
        gap = PAIR_SCALE * (f[w] - f[lo])
        return (r * (f - yc) ** 2).sum() + PAIR_WEIGHT * np.logaddexp(0.0, -gap).sum() + lam * a @ f, f, gap

    value, f, gap = objective(alpha)
    rows = np.concatenate([w, lo, w, lo])
    cols = np.concatenate([w, lo, lo, w])
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(gap))                   # sigmoid(-gap): chance the pair is ordered wrongly
        g = 2 * r * (f - yc)
        np.add.at(g, w, -PAIR_WEIGHT * PAIR_SCALE * p)
        np.add.at(g, lo, PAIR_WEIGHT * PAIR_SCALE * p)
        c = PAIR_WEIGHT * PAIR_SCALE ** 2 * p * (1 - p)
        h = sparse.diags(2 * r) + sparse.coo_matrix((np.concatenate([c, c, -c, -c]), (rows, cols)), (n, n))
        system = np.asarray(h.tocsr() @ kernel)
        system[np.diag_indices(n)] += 2 * lam
        step = np.linalg.solve(system, -(g + 2 * lam * alpha))
        t = 1.0
        while t > 1e-4:
            trial = objective(alpha + t * step)
            if trial[0] <= value:
                break
            t /= 2
        if t <= 1e-4:
            break
        done = value - trial[0] < 1e-6 * max(value, 1.0)
        alpha, (value, f, gap) = alpha + t * step, trial
        if done:
            break
    return alpha, h.diagonal() / 2


def _var_factor(kernel: np.ndarray, curvature: np.ndarray, lam: float, seed: int) -> np.ndarray:
    """U with ``|k_x @ U|^2 = k_x' (K + lam W^-1)^-1 k_x`` (W the rows' curvature: 1 for a rating),
    from the leading eigenvectors of W^1/2 K W^1/2 (exact when there are few examples)."""
    s = np.sqrt(np.maximum(curvature, 0.0))
    kw = s[:, None] * kernel * s[None, :]
    n = len(kw)
    if n <= 2 * RANK:
        vals, vecs = np.linalg.eigh(kw)
    else:  # randomized range finder with two power iterations
        q = np.random.default_rng(seed).standard_normal((n, RANK + 16))
        for _ in range(3):
            q, _ = np.linalg.qr(kw @ q)
        vals, small = np.linalg.eigh(q.T @ kw @ q)
        vecs = q @ small
        vals, vecs = vals[-RANK:], vecs[:, -RANK:]
    return _half(s[:, None] * vecs / np.sqrt(np.maximum(vals, 0.0) + lam))


def _check(blocks: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    unknown = [b for b in blocks if b not in BLOCKS]
    if unknown:
        raise ValueError(f"unknown feature block(s) {', '.join(unknown)}; known: {', '.join(BLOCKS)}")
    out = {b: np.asarray(blocks[b], np.float32) for b in BLOCKS if b in blocks}
    for name, x in out.items():
        if x.ndim != 2 or len(x) != n:
            raise ValueError(f"feature block {name!r} should be ({n} rows, d), not {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"feature block {name!r} has values that are not finite")
    return out


def fit_head(blocks: dict[str, np.ndarray], ratings: np.ndarray, *, pairs: np.ndarray | None = None,
             seed: int = 0, max_examples: int = 3000) -> TasteHead:
    """Fit the head on training rows: ``blocks`` name -> (n, d) features, ``ratings`` (n,) with NaN
    for rows that only appear in comparisons, ``pairs`` (k, 2) row indices (winner, loser).
    The most recent ``max_examples`` rows with a rating or a comparison are kept."""
    y_all = np.asarray(ratings, np.float64).reshape(-1)
    blocks = _check(blocks, len(y_all))
    if not blocks:
        raise ValueError(f"the taste head needs at least one feature block of {', '.join(BLOCKS)}")
    pairs = np.zeros((0, 2), np.int64) if pairs is None else np.asarray(pairs, np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(y_all)):
        raise ValueError("a comparison names a row that is not among the training rows")
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    used = np.isfinite(y_all)
    used[pairs.ravel()] = True
    keep = np.flatnonzero(used)[-max_examples:]
    if not len(keep):
        raise ValueError("the taste head needs at least one rating or comparison")
    where = np.full(len(y_all), -1)
    where[keep] = np.arange(len(keep))
    pairs = where[pairs]
    pairs = pairs[(pairs >= 0).all(1)]
    y = y_all[keep]
    rated = np.isfinite(y)
    mean = float(y[rated].mean()) if rated.any() else 3.0
    yc = np.where(rated, y - mean, 0.0)
    x = {n: b[keep] for n, b in blocks.items()}

    prepared = {n: _block(n, x[n]) for n in x}
    z = {n: prepared[n].transform(x[n]) for n in x}

    idx = np.flatnonzero(rated)
    info = {"n_rated": int(rated.sum()), "n_pairs": int(len(pairs))}
    calibration = np.zeros((2, 0), np.float32)
    if len(idx) >= MIN_SELECT:
        sample = np.sort(np.random.default_rng(seed).permutation(idx)[:SELECT_ON])
        dists = {n: _sq_dists(z[n][sample], z[n][sample]).astype(np.float64) for n in z}
        chosen = _search(dists, {n: z[n][sample] for n in z}, yc[sample])
        weights, kind, lam, noise = chosen["weights"], chosen["kind"], chosen["lam"], chosen["rmse"]
        loo = chosen["loo"] + mean
        calibration, cal_info = _calibration(loo, y[sample], seed)
        yt = y[sample]
        info.update(cal_info, cv="exact leave-one-out", cv_rows=len(sample), cv_rmse=round(noise, 4),
                    cv_mae=round(float(np.abs(loo - yt).mean()), 4),
                    cv_pearson=round(float(np.corrcoef(loo, yt)[0, 1]) if loo.std() > 0 else 0.0, 4),
                    candidates=chosen["candidates"], linear_cv_rmse=chosen.get("linear_rmse"))
    else:
        weights = {n: 0.5 / len(z) for n in z}
        kind, lam = "kernel", DEFAULT_LAM
        noise = float(np.sqrt((yc[rated] ** 2).mean())) if len(idx) > 1 else 1.0
        info.update(calibration="none", cv="none (too few ratings)")
    noise = max(noise, 0.05)
    for n, b in prepared.items():
        b.weight = float(weights[n])
    head_blocks = [prepared[n] for n in x]
    examples = np.concatenate([b.transform(x[b.name]) for b in head_blocks], axis=1)
    examples = _half(examples)
    kernel = _kernel(examples, examples, kind).astype(np.float64)
    alpha, curvature = _fit_dual(kernel, yc, rated, pairs, lam)
    return TasteHead(head_blocks, kind, examples, alpha.astype(np.float32), mean, float(lam), float(noise),
                     _var_factor(kernel, curvature, lam, seed), calibration, info)
