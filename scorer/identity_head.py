"""The identity head: what the owner rated for one picture of a character carries to the next.

The taste network (``scorer/model.py``) has to learn *who* is in a face from noisy 1-5 ratings
alone; the identity embedder (``scorer/identity.py``) already knows. The head is a kernel ridge
regression from a face's identity embedding (plus the crop's colour statistics, how vivid it is)
to the rating, fitted in closed form with numpy in about a second:

    features  f = [embedding (L2-normalised), colour statistics standardised * stats_weight]
    kernel    k(a, b) = exp(-gamma * |f_a - f_b|^2)
    fit       alpha = (K + lam * I)^-1 (y - mean(y))       predict  mean(y) + k(f, train) @ alpha

``gamma``, ``stats_weight`` and ``lam`` are chosen by exact leave-one-out error over a small grid
(one eigendecomposition per kernel, on at most ``SELECT_ON`` faces; the chosen head is then fitted
on all of them, at most ``MAX_EXAMPLES``, the most recent kept). A face far from every rated face gets the mean rating, so a
character never rated leaves the network's score to decide. The taste score is the blend
``(1 - blend) * network + blend * head``; ``blend`` is chosen on the validation split by
``choose_blend`` (0 when the head does not help). The uncertainty is blended the same way: the
network's flip spread with the head's *novelty* (how unlike every rated face a face is), so the
exploration picks still go to the faces the model knows least, even when the head decides.

The head is stored in the taste model's ``.pt`` file (key ``identity``, tensors only) with the
version and file name of the embedder it was fitted on; the training faces' features are part of
it (a kernel method keeps its examples). ``scorer/train.py`` fits it; :class:`scorer.model.Scorer`
applies it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAMMAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the embeddings' squared distances lie in 0-4
STATS_WEIGHTS = (0.0, 0.1, 0.2, 0.35)  # colour statistics next to identity
LAMS = (0.03, 0.1, 0.3, 1.0, 3.0)
SELECT_ON = 800                        # faces the hyperparameters are chosen on (a seeded sample)
MAX_EXAMPLES = 3000                    # faces the head keeps (the last ones given)
BLENDS = tuple(np.round(np.linspace(0, 1, 21), 2))


@dataclass
class IdentityHead:
    """A fitted head; arrays are float32 numpy. ``embedder`` is the identity embedder version its
    features come from, ``embedder_file`` that embedder's file name (beside the taste model's)."""
    embedder: str
    embedder_file: str
    examples: np.ndarray          # (n, d + stats) training features
    alpha: np.ndarray             # (n,) dual weights
    mean: float                   # mean training rating
    stats_mean: np.ndarray        # colour statistics standardisation
    stats_std: np.ndarray
    stats_weight: float
    gamma: float
    lam: float
    blend: float = 0.0
    loo_rmse: float | None = None

    def features(self, embeddings: np.ndarray, stats: np.ndarray) -> np.ndarray:
        return _features(embeddings, stats, self.stats_mean, self.stats_std, self.stats_weight)

    def predict(self, embeddings: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """Ratings (1-5) for faces' identity embeddings and colour statistics."""
        return self.predict_with_novelty(embeddings, stats)[0]

    def predict_with_novelty(self, embeddings: np.ndarray, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ratings, novelty): novelty is how unlike every rated face a face is, ``1 - the
        largest kernel value``, in units of the head's leave-one-out error: 0 for a copy of a
        rated face, that error for a face unlike all of them (the faces worth asking about)."""
        k = _kernel(self.features(embeddings, stats), self.examples, self.gamma)
        ratings = np.clip(self.mean + k @ self.alpha, 1.0, 5.0).astype(np.float32)
        novelty = (1.0 - k.max(1, initial=0.0)) * (self.loo_rmse or 0.0)
        return ratings, novelty.astype(np.float32)

    def combine(self, network: np.ndarray, head: np.ndarray) -> np.ndarray:
        """The taste score (or its uncertainty): the network's and the head's blended."""
        return ((1 - self.blend) * np.asarray(network, np.float32) + self.blend * np.asarray(head, np.float32))

    # ---- in the model file ------------------------------------------------------------------
    def to_state(self) -> dict:
        """A dict of tensors and plain values, loadable with ``torch.load(weights_only=True)``."""
        import torch

        return {"embedder": self.embedder, "embedder_file": self.embedder_file,
                "examples": torch.from_numpy(self.examples.astype(np.float32)),
                "alpha": torch.from_numpy(self.alpha.astype(np.float32)), "mean": float(self.mean),
                "stats_mean": torch.from_numpy(self.stats_mean.astype(np.float32)),
                "stats_std": torch.from_numpy(self.stats_std.astype(np.float32)),
                "stats_weight": float(self.stats_weight), "gamma": float(self.gamma), "lam": float(self.lam),
                "blend": float(self.blend), "loo_rmse": self.loo_rmse}

    @classmethod
    def from_state(cls, state: dict) -> "IdentityHead":
        arrays = {k: state[k].numpy().astype(np.float32) for k in ("examples", "alpha", "stats_mean", "stats_std")}
        return cls(state["embedder"], state["embedder_file"], mean=float(state["mean"]),
                   stats_weight=float(state["stats_weight"]), gamma=float(state["gamma"]), lam=float(state["lam"]),
                   blend=float(state["blend"]), loo_rmse=state.get("loo_rmse"), **arrays)

    def describe(self) -> dict:
        """What the registry records about the head."""
        return {"embedder": self.embedder, "examples": len(self.examples), "gamma": self.gamma,
                "stats_weight": self.stats_weight, "lam": self.lam, "blend": self.blend,
                "loo_rmse": None if self.loo_rmse is None else round(self.loo_rmse, 4)}


def _features(embeddings, stats, mean, std, weight) -> np.ndarray:
    e = np.asarray(embeddings, np.float32)
    s = (np.asarray(stats, np.float32) - mean) / std * weight
    return np.concatenate([e, s], axis=1)


def _kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.exp(-gamma * np.maximum(d2, 0.0))


def fit_head(embeddings: np.ndarray, stats: np.ndarray, ratings: np.ndarray, *, embedder: str,
             embedder_file: str, gammas=GAMMAS, stats_weights=STATS_WEIGHTS, lams=LAMS) -> IdentityHead:
    """Fit the head on training faces: (n, d) identity embeddings, (n, s) colour statistics,
    (n,) ratings; hyperparameters by exact leave-one-out error. Needs two faces or more."""
    e = np.asarray(embeddings, np.float64)[-MAX_EXAMPLES:]
    st = np.asarray(stats, np.float64)[-MAX_EXAMPLES:]
    y = np.asarray(ratings, np.float64)[-MAX_EXAMPLES:]
    if len(y) < 2:
        raise ValueError("the identity head needs at least two rated faces")
    mean = float(y.mean())
    yc = y - mean
    s_mean = st.mean(0)
    s_std = np.where(st.std(0) > 1e-6, st.std(0), 1.0)
    sample = np.sort(np.random.default_rng(0).permutation(len(y))[:SELECT_ON])
    best = None
    for weight in stats_weights:
        f = _features(e[sample], st[sample], s_mean, s_std, weight)
        for gamma in gammas:
            vals, vecs = np.linalg.eigh(_kernel(f, f, gamma))
            proj = vecs.T @ yc[sample]
            for lam in lams:
                inv = 1.0 / (vals + lam)
                alpha = vecs @ (inv * proj)
                diag = (vecs ** 2) @ inv            # diagonal of (K + lam I)^-1
                loo = alpha / diag                  # leave-one-out residuals (exact for kernel ridge)
                rmse = float(np.sqrt((loo ** 2).mean()))
                if best is None or rmse < best[0]:
                    best = (rmse, weight, gamma, lam)
    rmse, weight, gamma, lam = best
    f = _features(e, st, s_mean, s_std, weight)
    alpha = np.linalg.solve(_kernel(f, f, gamma) + lam * np.eye(len(f)), yc)
    return IdentityHead(embedder, embedder_file, f.astype(np.float32), alpha.astype(np.float32), mean,
                        s_mean.astype(np.float32), s_std.astype(np.float32), float(weight), float(gamma),
                        float(lam), loo_rmse=rmse)


def choose_blend(network: np.ndarray, head: np.ndarray, ratings: np.ndarray, blends=BLENDS) -> float:
    """The blend weight of the head (0-1) with the least squared error on validation faces; 0 on
    a tie, so the head is used only when it helps."""
    network, head, y = (np.asarray(a, np.float64) for a in (network, head, ratings))
    errors = [float((((1 - w) * network + w * head - y) ** 2).mean()) for w in blends]
    return float(blends[int(np.argmin(errors))])


def fit_blended(train: tuple, val: tuple, network_val: np.ndarray, *, embedder: str,
                embedder_file: str) -> IdentityHead:
    """The head fitted on the training faces and its blend with the network chosen on the
    validation faces. ``train`` and ``val``: (embeddings, colour statistics, ratings);
    ``network_val``: the network's predictions for the validation faces."""
    head = fit_head(*train, embedder=embedder, embedder_file=embedder_file)
    head.blend = choose_blend(network_val, head.predict(val[0], val[1]), val[2])
    return head
