"""The taste model: a network predicting 1-5 from a face crop, and the taste head on cached
features (``scorer/head.py``, ``scorer/features.py``) that refits in seconds.

The network (a torchvision backbone with a one-output head) maps its output ``z`` to
``1 + 4 * sigmoid(z)``, so predictions always lie in 1-5; it is trained by ``train --full``.
A model file (``.pt``) holds ``{"arch", "image_size", "version", "format"}`` and either the
network's ``state_dict`` or, for a head refitted on another model's network, ``network_file``
and ``network_version`` naming that model's file; and ``head`` once a taste head is fitted:
:class:`Scorer` then blends the network's score with the head's.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)

FORMAT = 3  # 2: network (+ identity head); 3: network or a reference to one, + taste head
ARCHS = ("resnet18", "resnet34", "resnet50", "alexnet")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class ModelError(Exception):
    """The model cannot be built or loaded; the message says why."""


def colour_stats(x: torch.Tensor) -> torch.Tensor:
    """Per-picture colour statistics of RGB input in 0-1: HSV saturation and value, their product
    ("vividness"), and their spreads. Vividness is often part of taste, and a small network trained
    from scratch learns such global statistics slowly, so they are handed to the head directly."""
    high = x.max(dim=1).values
    low = x.min(dim=1).values
    sat = (high - low) / (high + 1e-6)
    return torch.stack([sat.mean((1, 2)), high.mean((1, 2)), (sat * high).mean((1, 2)),
                        sat.std((1, 2)), high.std((1, 2))], dim=1)


N_STATS = 5


def colour_stats_arrays(arrays) -> np.ndarray:
    """:func:`colour_stats` of uint8 HWC crops, as an (N, N_STATS) float32 array."""
    if not len(arrays):
        return np.zeros((0, N_STATS), np.float32)
    with torch.inference_mode():
        return colour_stats(to_tensor(np.stack(list(arrays)))).numpy().astype(np.float32)


class RatingNet(nn.Module):
    """Backbone features plus colour statistics -> one linear output -> ``1 + 4 * sigmoid``.

    Input: RGB in 0-1 (NCHW); the ImageNet normalisation happens inside.
    """

    def __init__(self, backbone: nn.Module, features: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features + N_STATS, 1)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone((x - self.mean) / self.std)
        z = self.head(torch.cat([feats, colour_stats(x)], dim=1)).squeeze(-1)
        return 1.0 + 4.0 * torch.sigmoid(z)

    def tail_parameters(self) -> list[nn.Parameter]:
        """The last block and the head: what trains while the early layers are frozen."""
        last = getattr(self.backbone, "layer4", None) or self.backbone.classifier
        return list(last.parameters()) + list(self.head.parameters())


def _strip_head(arch: str, net: nn.Module) -> tuple[nn.Module, int]:
    """Replace a torchvision classifier's last linear layer by an identity, so the network
    returns its penultimate features; return it and their length."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{arch} has no final linear layer to take penultimate features from")
    name, last = linears[-1]
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return net, last.in_features


def _load_backbone_weights(arch: str, net: nn.Module, pretrained: str, setting: str = "scorer.pretrained") -> str:
    """Load ImageNet weights into ``net`` (before its head is replaced); return a description.
    ``pretrained``: imagenet (torchvision's, downloaded once) or a weights file's path; ``setting``:
    the configuration key named in the error messages."""
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - URLError, socket errors, hash errors
            raise ModelError(
                f"cannot download ImageNet weights for {arch} ({type(e).__name__}: {e}); offline, "
                f"download {weights.url} elsewhere and set {setting} to the file's path") from None
        source = f"ImageNet weights {weights}"
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise ModelError(f"{setting}: no weights file at {pretrained!r} "
                             "(expected none, imagenet, or a path to torchvision weights)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot read weights file {pretrained}: {e}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        source = f"weights file {path.name}"
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) // 2:
        raise ModelError(f"{source} does not fit {arch} ({len(usable)} of {len(own)} tensors match)")
    net.load_state_dict(usable, strict=False)
    return source


def build_model(arch: str = "resnet18", pretrained: str = "none") -> RatingNet:
    """A fresh rating network; ``pretrained`` is none, imagenet, or a torchvision weights file."""
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r} (expected one of {', '.join(ARCHS)})")
    net = torchvision.models.get_model(arch, weights=None)
    if pretrained and pretrained != "none":
        described = _load_backbone_weights(arch, net, pretrained)
        log.info("%s backbone initialised from %s", arch, described)
    return RatingNet(*_strip_head(arch, net))


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU, whichever exists (or the one asked for)."""
    if preference != "auto":
        if preference.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"scorer.device = {preference!r} but CUDA is not available here")
        if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError("scorer.device = 'mps' but MPS is not available here")
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resize_crop(crop: Image.Image, size: int) -> np.ndarray:
    """A crop as a ``size`` x ``size`` RGB uint8 array (HWC); training and inference both use it."""
    return np.asarray(crop.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def to_tensor(arrays: np.ndarray) -> torch.Tensor:
    """uint8 NHWC arrays -> float NCHW in 0-1, the network's input."""
    return torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


def save_model(net: RatingNet | None, path: str | Path, *, arch: str, image_size: int, version: str,
               head: "AppliedHead | None" = None, network: tuple[str, str] | None = None) -> None:
    """Write the model file (under a temporary name, then renamed). ``net``: the network's
    weights, or None with ``network`` = (its model file name, its version) for a head refitted on
    another model's network (a small file that names the network's); ``head``: the taste head."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ckpt = {"arch": arch, "image_size": image_size, "version": version, "format": FORMAT}
    if net is not None:
        ckpt["state_dict"] = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    else:
        ckpt["network_file"], ckpt["network_version"] = network
    if head is not None:
        ckpt["head"] = head.to_state()
    torch.save(ckpt, tmp)
    tmp.replace(path)


@dataclass
class AppliedHead:
    """The taste head (:class:`scorer.head.TasteHead`) as a model uses it: ``sources`` maps each
    block it was fitted on to the cached source (``scorer/features.py``); the taste score is
    ``(1 - blend) * network + blend * head``; ``embedder_file``: the identity embedder's file
    (beside the model's) when the head uses the identity block."""
    head: object
    sources: dict[str, str]
    blend: float = 1.0
    embedder_file: str | None = None
    backbone: dict | None = None       # scorer.backbones.describe() of the backbone it was fitted on

    def to_state(self) -> dict:
        return {"state": self.head.to_state(), "sources": dict(self.sources), "blend": float(self.blend),
                "embedder_file": self.embedder_file, "backbone": self.backbone}

    @classmethod
    def from_state(cls, state: dict) -> "AppliedHead":
        from scorer.head import TasteHead

        return cls(TasteHead.from_state(state["state"]), dict(state["sources"]), float(state["blend"]),
                   state.get("embedder_file"), state.get("backbone"))

    def describe(self) -> dict:
        return {**self.head.describe(), "blend": round(self.blend, 3), "blocks": sorted(self.sources)}


_NETWORKS_LOCK = threading.Lock()
_NETWORKS: dict[tuple, dict] = {}      # (file, mtime) -> state dict: many head versions share one network


def _network_state(path: Path) -> dict:
    key = (str(path), path.stat().st_mtime_ns)
    with _NETWORKS_LOCK:      # the daemon's refit thread and its model watcher load models at once
        state = _NETWORKS.get(key)
        if state is None:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if "state_dict" not in ckpt:
                raise ModelError(f"model file {path} holds no network weights")
            state = ckpt["state_dict"]
            _NETWORKS.clear()
            _NETWORKS[key] = state
        return state


class Scorer:
    """A loaded taste model ready for batched inference: the network (``net``) and, once one is
    fitted, the taste head on cached features (``head``, an :class:`AppliedHead`).

    A face's score is the network's blended with the head's; its uncertainty is the network's
    flip spread (None without flip TTA) blended with the head's predictive uncertainty. The
    :attr:`extractor` computes every block the daemon caches for a face (``scorer/features.py``),
    whether or not the head uses it yet, so the next refit needs no picture decoded; ``margin``
    (``detector.margin``, the margin its crops are cut with) names the crop blocks' sources.
    """

    def __init__(self, net: RatingNet, *, arch: str, version: str, image_size: int = 64,
                 device: str = "auto", batch_size: int = 32, tta: bool = True, head: AppliedHead | None = None,
                 backbone=None, whole: bool = True, embedder=None, network_version: str | None = None,
                 margin: float = 0.2):
        from scorer.features import FeatureExtractor

        self.device = pick_device(device)
        self.net = net.to(self.device).eval()
        self.arch, self.version, self.image_size = arch, version, image_size
        self.batch_size, self.tta = batch_size, tta
        self.network_version = network_version or version
        self.network_file: str | None = None     # the model file holding the network's weights
        self.head = head
        self.head_left_out: list[str] = []    # the sources of a head set aside (fitted on other features)
        self.extractor = FeatureExtractor(backbone, whole, self.network_crops, self.network_version,
                                          embedder if head is not None and "identity" in head.sources else None,
                                          margin=margin)
        if head is not None:
            missing = {b: s for b, s in head.sources.items() if self.extractor.sources.get(b) != s}
            if missing:
                now = sorted(s for s in (self.extractor.sources.get(b) for b in missing) if s)
                log.warning("model %s: its taste head was fitted on %s, which this configuration does not "
                            "compute (it computes %s: detector.margin or the [scorer] backbone changed); "
                            "scoring with the network alone until the head is refitted: python main.py train "
                            "(a running daemon refits it by itself unless train.refit is off)", version,
                            ", ".join(sorted(missing.values())), ", ".join(now) or "none of them")
                self.head, self.head_left_out = None, sorted(missing.values())

    @classmethod
    def load(cls, path: str | Path, *, backbone=None, whole: bool = True, **kw) -> "Scorer":
        """The model in file ``path``; ``backbone``: the configured feature backbone (its head
        is used only when it was fitted on that backbone's features)."""
        path = Path(path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("format") not in (2, FORMAT):
                raise ModelError(f"model file {path} is from an older tastefeed (format "
                                 f"{ckpt.get('format', 1)}); train a new model")
            net = build_model(ckpt["arch"])
            if "network_file" in ckpt:
                net.load_state_dict(_network_state(path.parent / ckpt["network_file"]))
            else:
                net.load_state_dict(ckpt["state_dict"])
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - missing, truncated or foreign files
            raise ModelError(f"cannot load model file {path}: {e}") from None
        kw.setdefault("image_size", ckpt.get("image_size", 64))
        head = embedder = None
        if ckpt.get("head"):
            head = AppliedHead.from_state(ckpt["head"])
            if "identity" in head.sources:
                embedder = _head_embedder(head, path.parent, ckpt["version"], kw)
                if embedder is None:
                    head = None
        elif ckpt.get("identity"):
            log.warning("model %s: its identity head is from an older tastefeed; the taste head replaces it "
                        "at the next refit", ckpt["version"])
        scorer = cls(net, arch=ckpt["arch"], version=ckpt["version"], head=head, backbone=backbone, whole=whole,
                     embedder=embedder, network_version=ckpt.get("network_version"), **kw)
        scorer.network_file = ckpt.get("network_file", path.name)
        return scorer

    # ---- features ---------------------------------------------------------------------------
    def needed_sources(self) -> set[str]:
        """The cached sources :meth:`predict_features` reads."""
        need = set(self.head.sources.values()) if self.head is not None else set()
        if self.head is None or self.head.blend < 1:
            need.add(self.extractor.sources["net"])
        return need

    def features(self, crops: list[Image.Image], pictures: list[Image.Image] | None = None
                 ) -> list[dict[str, np.ndarray]]:
        """Every block the daemon caches for these crops ({source: vector} per crop)."""
        return self.extractor.compute(crops, pictures)

    def predict(self, crops: list[Image.Image], pictures: list[Image.Image] | None = None
                ) -> tuple[list[float], list[float | None]]:
        """Scores (1-5) and uncertainties of face crops (PIL); ``pictures``: the whole picture of
        each crop (for the head's whole-picture block; the crop stands in without it)."""
        if not crops:
            return [], []
        pictures = pictures if pictures is not None else crops
        return self.predict_features(self.extractor.compute(crops, pictures, only=self.needed_sources()))

    def predict_features(self, vectors: list[dict[str, np.ndarray]]) -> tuple[list[float], list[float | None]]:
        """Scores and uncertainties from cached vectors ({source: vector} per face, holding
        :meth:`needed_sources`): no picture is decoded."""
        from scorer.features import blocks_of

        if not vectors:
            return [], []
        net = self.extractor.sources["net"]
        if self.head is None:
            return ([float(v[net][0]) for v in vectors],
                    [float(v[net][1]) if self.tta else None for v in vectors])
        head, spread = self.head.head.predict(blocks_of(vectors, self.head.sources))
        b = self.head.blend
        if b >= 1:
            return [float(x) for x in head], [float(u) for u in spread]
        nets = np.array([v[net] for v in vectors], np.float32)
        return ([float(x) for x in (1 - b) * nets[:, 0] + b * head],
                [float(x) for x in (1 - b) * nets[:, 1] + b * spread])

    # ---- the network ------------------------------------------------------------------------
    def network_crops(self, crops: list[Image.Image]) -> tuple[list[float], list[float | None]]:
        """The network's own scores and flip spreads of face crops (PIL)."""
        return self.network_arrays([resize_crop(c, self.image_size) for c in crops])

    @torch.inference_mode()
    def network_arrays(self, arrays) -> tuple[list[float], list[float | None]]:
        """The network's own scores and flip spreads (no head) for crops resized to image_size."""
        scores: list[float] = []
        spreads: list[float | None] = []
        for start in range(0, len(arrays), self.batch_size):
            x = to_tensor(np.stack(arrays[start:start + self.batch_size])).to(self.device)
            y = self.net(x)
            if self.tta:
                y2 = self.net(torch.flip(x, dims=[3]))
                scores.extend(((y + y2) / 2).float().cpu().tolist())
                spreads.extend(((y - y2).abs() / 2).float().cpu().tolist())
            else:
                scores.extend(y.float().cpu().tolist())
                spreads.extend([None] * len(y))
        return scores, spreads


def _head_embedder(head: AppliedHead, models_dir: Path, version: str, kw: dict):
    """The identity embedder a head was fitted with, or None (then the head is not used)."""
    from scorer.identity import Embedder

    path = models_dir / (head.embedder_file or "")
    if not head.embedder_file or not path.exists():
        log.warning("model %s: identity embedder file %s is missing; scoring with the network alone", version, path)
        return None
    try:
        return Embedder.load(path, device=kw.get("device", "auto"), batch_size=kw.get("batch_size", 32))
    except ModelError as e:
        log.warning("model %s: %s; scoring with the network alone", version, e)
        return None
