"""The rating model: a torchvision backbone with a one-output head predicting 1-5.

The head's output ``z`` is mapped to ``1 + 4 * sigmoid(z)``, so predictions always lie in 1-5.
A model file (``.pt``) holds ``{"arch", "image_size", "version", "format", "state_dict"}``, and
``identity`` when the model has an identity head (``scorer/identity_head.py``): the face's identity
embedding then sharpens the network's score, see :class:`Scorer`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)

FORMAT = 2  # 2: backbone + colour statistics head
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


def save_model(net: RatingNet, path: str | Path, *, arch: str, image_size: int, version: str,
               identity=None) -> None:
    """Write the model file (under a temporary name, then renamed); ``identity``: its identity
    head (:class:`scorer.identity_head.IdentityHead`), if any."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    ckpt = {"arch": arch, "image_size": image_size, "version": version, "format": FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    if identity is not None:
        ckpt["identity"] = identity.to_state()
    torch.save(ckpt, tmp)
    tmp.replace(path)


def load_identity(ckpt: dict, models_dir: Path, *, device: str, batch_size: int):
    """(identity head, its embedder) of a model file's checkpoint, or (None, None) when it has no
    head, or when the embedder it was fitted on cannot be loaded (then the network scores alone)."""
    from scorer.identity import Embedder
    from scorer.identity_head import IdentityHead

    if not ckpt.get("identity"):
        return None, None
    head = IdentityHead.from_state(ckpt["identity"])
    path = models_dir / head.embedder_file
    if not path.exists():
        log.warning("model %s: identity embedder file %s is missing; scoring with the network alone",
                    ckpt.get("version"), path)
        return None, None
    try:
        embedder = Embedder.load(path, device=device, batch_size=batch_size)
    except ModelError as e:
        log.warning("model %s: %s; scoring with the network alone", ckpt.get("version"), e)
        return None, None
    return head, embedder


class Scorer:
    """A loaded model ready for batched inference.

    With an identity head (``identity``, and ``embedder``: the identity embedder it was fitted
    on), a face's score is the network's blended with the head's prediction from the face's
    identity embedding and colour statistics; its uncertainty (None without flip TTA) is the
    network's flip spread blended with the head's novelty (how unlike every rated face it is).
    """

    def __init__(self, net: RatingNet, *, arch: str, version: str, image_size: int = 64,
                 device: str = "auto", batch_size: int = 32, tta: bool = True, identity=None, embedder=None):
        self.device = pick_device(device)
        self.net = net.to(self.device).eval()
        self.arch, self.version, self.image_size = arch, version, image_size
        self.batch_size, self.tta = batch_size, tta
        self.identity, self.embedder = (identity, embedder) if identity is not None and embedder is not None \
            else (None, None)

    @classmethod
    def load(cls, path: str | Path, **kw) -> "Scorer":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("format") != FORMAT:
                raise ModelError(f"model file {path} is from an older tastefeed (format "
                                 f"{ckpt.get('format', 1)}); train a new model")
            net = build_model(ckpt["arch"])
            net.load_state_dict(ckpt["state_dict"])
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - missing, truncated or foreign files
            raise ModelError(f"cannot load model file {path}: {e}") from None
        kw.setdefault("image_size", ckpt.get("image_size", 64))
        head, embedder = load_identity(ckpt, Path(path).parent, device=kw.get("device", "auto"),
                                       batch_size=kw.get("batch_size", 32))
        return cls(net, arch=ckpt["arch"], version=ckpt["version"], identity=head, embedder=embedder, **kw)

    def predict(self, crops: list[Image.Image]) -> tuple[list[float], list[float | None]]:
        """Scores (1-5) and uncertainties for face crops (PIL), in batches of ``batch_size``."""
        arrays = [resize_crop(c, self.image_size) for c in crops]
        if self.identity is None or self.embedder.image_size == self.image_size:
            return self.predict_arrays(arrays)
        return self.predict_arrays(arrays, [resize_crop(c, self.embedder.image_size) for c in crops])

    def predict_arrays(self, arrays, identity_arrays=None) -> tuple[list[float], list[float | None]]:
        """Like :meth:`predict` for crops already resized to ``image_size`` (uint8 HWC arrays);
        ``identity_arrays``: the same crops at the embedder's size, when it differs."""
        scores, spreads = self.network_arrays(arrays)
        if self.identity is None or not len(arrays):
            return scores, spreads
        if identity_arrays is None:
            size = self.embedder.image_size
            identity_arrays = arrays if size == self.image_size else \
                [np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in arrays]
        head, novelty = self.identity.predict_with_novelty(self.embedder.embed_arrays(list(identity_arrays)),
                                                           colour_stats_arrays(arrays))
        blended = self.identity.combine([0.0 if u is None else u for u in spreads], novelty)
        return ([float(v) for v in self.identity.combine(scores, head)],
                [None if u is None else float(b) for u, b in zip(spreads, blended)])

    @torch.inference_mode()
    def network_arrays(self, arrays) -> tuple[list[float], list[float | None]]:
        """The network's own scores and flip spreads (no identity head) for resized crops."""
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
