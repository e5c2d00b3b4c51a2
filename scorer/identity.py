"""Who is in a face: the identity embedder and the recognizer.

The embedder is a torchvision backbone (as the taste model's, ``scorer/model.py``) followed by a
linear projection to ``embedding_dim`` and L2 normalisation: faces of one character lie close
together on the unit sphere. It is trained with an ArcFace head (``scorer/identity_train.py``);
the head is thrown away afterwards, so characters never seen in training can be enrolled from a
few examples: their embeddings are stored and recognition uses them at once.

The :class:`Recognizer` holds the enrolled examples (face embeddings with character ids). A face
gets the character whose prototype (mean embedding, normalised) is nearest, combined with votes of
its ``k`` nearest examples; its similarity is the cosine to that prototype (with ``nearest``, the
cosine to the character's nearest example when higher: an enrolled picture itself then scores 1,
but so do impostors close to any one example; which gives the better open-set F1 on
animeface-10 depends on the margin, see bench/RESULTS.md). Below ``threshold`` it
is unknown. :func:`calibrate_threshold` picks the threshold reaching a target precision on
held-out examples, counting as wrong both misidentified faces and impostors (a held-out face
scored against the other characters only, as if its own were never enrolled); without held-out
examples the recognizer calibrates on its own examples, leaving each one out in turn.

A model file (``.pt``) holds ``{"kind": "identity", "arch", "image_size", "embedding_dim",
"version", "format", "state_dict"}``.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from scorer.model import (ARCHS, MEAN, STD, ModelError, _load_backbone_weights, _strip_head, pick_device,
                          resize_crop, to_tensor)

log = logging.getLogger(__name__)

FORMAT = 1
KIND = "identity"
DEFAULT_THRESHOLD = 0.5   # with too few examples to calibrate on
VOTE_WEIGHT = 0.05        # how much the k-NN votes (a share, 0-1) add to a character's similarity
VOTE_SHARPNESS = 30.0     # vote weights exp(sharpness * (similarity - the nearest's))


class IdentityNet(nn.Module):
    """Backbone -> linear -> L2-normalised embedding. Input: RGB in 0-1 (NCHW)."""

    def __init__(self, backbone: nn.Module, features: int, embedding_dim: int):
        super().__init__()
        self.backbone = backbone
        self.project = nn.Sequential(nn.BatchNorm1d(features), nn.Linear(features, embedding_dim))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.project(self.backbone((x - self.mean) / self.std)), dim=1)


def build_embedder(arch: str = "resnet18", pretrained: str = "none", embedding_dim: int = 128) -> IdentityNet:
    import torchvision

    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r} (expected one of {', '.join(ARCHS)})")
    net = torchvision.models.get_model(arch, weights=None)
    if pretrained and pretrained != "none":
        log.info("%s identity backbone initialised from %s", arch, _load_backbone_weights(arch, net, pretrained))
    backbone, features = _strip_head(arch, net)
    return IdentityNet(backbone, features, embedding_dim)


def save_embedder(net: IdentityNet, path: str | Path, *, arch: str, image_size: int, version: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: the daemon and the gallery may create the first embedder at the same time
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    torch.save({"kind": KIND, "arch": arch, "image_size": image_size,
                "embedding_dim": net.project[1].out_features, "version": version, "format": FORMAT,
                "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}, tmp)
    tmp.replace(path)


class Embedder:
    """A loaded identity embedder ready for batched inference."""

    def __init__(self, net: IdentityNet, *, arch: str, version: str, image_size: int = 64,
                 device: str = "auto", batch_size: int = 64):
        self.device = pick_device(device)
        self.net = net.to(self.device).eval()
        self.arch, self.version, self.image_size, self.batch_size = arch, version, image_size, batch_size
        self.dim = net.project[1].out_features

    @classmethod
    def load(cls, path: str | Path, **kw) -> "Embedder":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("kind") != KIND or ckpt.get("format") != FORMAT:
                raise ModelError(f"{path} is not an identity embedder of this tastefeed; train a new one")
            net = build_embedder(ckpt["arch"], embedding_dim=ckpt["embedding_dim"])
            net.load_state_dict(ckpt["state_dict"])
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - missing, truncated or foreign files
            raise ModelError(f"cannot load identity model file {path}: {e}") from None
        kw.setdefault("image_size", ckpt["image_size"])
        return cls(net, arch=ckpt["arch"], version=ckpt["version"], **kw)

    def embed(self, crops: list[Image.Image]) -> np.ndarray:
        """(N, dim) float32 L2-normalised embeddings of face crops (PIL)."""
        return self.embed_arrays([resize_crop(c, self.image_size) for c in crops])

    @torch.inference_mode()
    def embed_arrays(self, arrays) -> np.ndarray:
        """Like :meth:`embed` for crops already resized to ``image_size`` (uint8 HWC arrays); the
        embedding of a crop and of its mirror image are averaged."""
        out = []
        for start in range(0, len(arrays), self.batch_size):
            x = to_tensor(np.stack(arrays[start:start + self.batch_size])).to(self.device)
            y = self.net(x) + self.net(x.flip(3))
            out.append(nn.functional.normalize(y, dim=1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


# ---- recognition -----------------------------------------------------------------------------
def calibrate_threshold(similarities, correct, target_precision: float = 0.9,
                        default: float = DEFAULT_THRESHOLD) -> float:
    """A similarity threshold at which the faces accepted (similarity >= threshold) are right at
    least ``target_precision`` of the time, accepting as many as possible: halfway between the
    last accepted similarity and the next lower one. With no examples, ``default``; if no threshold
    reaches the precision, one above every similarity. ``correct`` is False both for a wrong
    character and for a face whose character is not enrolled (an impostor)."""
    sims = np.asarray(similarities, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if len(sims) == 0:
        return default
    order = np.argsort(-sims, kind="stable")
    sims, ok = sims[order], ok[order]
    precision = np.cumsum(ok) / np.arange(1, len(ok) + 1)
    # only cut between distinct similarities
    last_of_value = np.r_[sims[1:] != sims[:-1], True]
    good = np.nonzero((precision >= target_precision) & last_of_value)[0]
    if len(good) == 0:
        return float(min(sims[0] + 1e-6, 1.0 + 1e-6))
    cut = good[-1]
    # halfway to the next lower similarity: a new face just below the last accepted one is not rejected
    return float((sims[cut] + sims[cut + 1]) / 2) if cut + 1 < len(sims) else float(sims[cut])


class Recognizer:
    """Enrolled examples -> (character id or None, similarity) for each embedding."""

    def __init__(self, embeddings: np.ndarray, character_ids, *, k: int = 5, threshold: float | None = None,
                 nearest: bool = False):
        self.nearest = nearest        # a character's similarity may come from its nearest example
        self.labels = np.asarray(list(character_ids), dtype=np.int64)
        self.examples = np.asarray(embeddings, dtype=np.float32)
        if self.examples.ndim != 2:
            self.examples = self.examples.reshape(len(self.labels), -1)
        self.k = k
        self.characters = np.unique(self.labels)
        self.prototypes = np.stack([self._normalise(self.examples[self.labels == c].mean(0))
                                    for c in self.characters]) if len(self.characters) else self.examples[:0]
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold

    @classmethod
    def from_store(cls, store, version: str, *, k: int = 5, nearest: bool = False) -> "Recognizer":
        rows = store.enrolled(version)
        dim = len(rows[0][2]) if rows else 1
        return cls(np.stack([r[2] for r in rows]) if rows else np.zeros((0, dim), np.float32),
                   [r[1] for r in rows], k=k, nearest=nearest)

    @staticmethod
    def _normalise(v: np.ndarray) -> np.ndarray:
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def __len__(self) -> int:
        return len(self.labels)

    def scores(self, embeddings: np.ndarray, *, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(best character index into ``characters``, similarity) per embedding.

        A character's similarity is the cosine to its prototype (with ``nearest``, or to its
        nearest example when higher); the choice adds a small share of the k nearest examples' votes (weighted towards
        the nearest), which decides between near-equal characters. ``exclude_self`` leaves example
        i out for row i (leave-one-out over the enrolled examples themselves)."""
        e = np.asarray(embeddings, dtype=np.float32)
        proto = e @ self.prototypes.T                                  # (n, C)
        near = e @ self.examples.T                                     # (n, N)
        if exclude_self:
            np.fill_diagonal(near, -np.inf)
            # the prototype without the example itself
            counts = np.array([(self.labels == c).sum() for c in self.characters], dtype=np.float32)
            col = np.searchsorted(self.characters, self.labels)
            sums = self.prototypes * 0
            for j, c in enumerate(self.characters):
                sums[j] = self.examples[self.labels == c].sum(0)
            for i in range(len(e)):
                j = col[i]
                if counts[j] <= 1:
                    proto[i, j] = -1.0
                    continue
                p = self._normalise(sums[j] - self.examples[i])
                proto[i, j] = float(e[i] @ p)
        # a character's similarity: to its prototype or to its nearest example, whichever is higher
        sim = proto.copy()
        for j, c in enumerate(self.characters):
            if self.nearest:
                sim[:, j] = np.maximum(sim[:, j], near[:, self.labels == c].max(1))
        # k-NN votes, weighted towards the nearest: a share per character that breaks near-ties
        k = max(1, min(self.k, near.shape[1] - (1 if exclude_self else 0)))
        votes = np.zeros_like(proto)
        idx = np.argpartition(-near, k - 1, axis=1)[:, :k]
        col_of = np.searchsorted(self.characters, self.labels)
        for i in range(len(e)):
            weights = np.exp(VOTE_SHARPNESS * (near[i, idx[i]] - near[i, idx[i]].max()))
            np.add.at(votes[i], col_of[idx[i]], weights / weights.sum())
        best = np.argmax(sim + VOTE_WEIGHT * votes, axis=1)
        return best, sim[np.arange(len(e)), best]

    def impostor_similarities(self, embeddings: np.ndarray, character_ids) -> np.ndarray:
        """For each embedding, its best similarity to a character other than its own: what it
        would score if its own character were not enrolled."""
        e = np.asarray(embeddings, dtype=np.float32)
        own = np.asarray(list(character_ids))
        best = np.full(len(e), -1.0, dtype=np.float32)
        near = e @ self.examples.T
        for j, c in enumerate(self.characters):
            others = own != c
            if others.any():
                sim = e[others] @ self.prototypes[j]
                if self.nearest:
                    sim = np.maximum(sim, near[np.ix_(others, self.labels == c)].max(1))
                best[others] = np.maximum(best[others], sim)
        return best

    def identify(self, embeddings: np.ndarray) -> list[tuple[int | None, float]]:
        """(character id, or None when unknown or nothing is enrolled; similarity) per embedding."""
        if not len(self.characters):
            return [(None, 0.0) for _ in range(len(embeddings))]
        best, sims = self.scores(embeddings)
        return [(int(self.characters[b]) if s >= self.threshold else None, float(s)) for b, s in zip(best, sims)]

    def calibrate_self(self, target_precision: float = 0.9) -> float:
        """Set (and return) the threshold calibrated leaving each enrolled example out in turn;
        with fewer than two characters of two or more examples, the default threshold."""
        counts = np.array([(self.labels == c).sum() for c in self.characters])
        if (counts >= 2).sum() < 2:
            self.threshold = DEFAULT_THRESHOLD
            return self.threshold
        best, sims = self.scores(self.examples, exclude_self=True)
        correct = self.characters[best] == self.labels
        keep = counts[np.searchsorted(self.characters, self.labels)] >= 2
        impostors = self.impostor_similarities(self.examples, self.labels)
        self.threshold = calibrate_threshold(np.r_[sims[keep], impostors], np.r_[correct[keep], [False] * len(impostors)],
                                             target_precision)
        return self.threshold
