"""The rating model: a torchvision backbone with a one-output head predicting 1-5.

The head's output ``z`` is mapped to ``1 + 4 * sigmoid(z)``, so predictions always lie in 1-5.
A model file (``.pt``) holds ``{"arch", "image_size", "version", "state_dict"}``.
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

ARCHS = ("resnet18", "resnet34", "resnet50", "alexnet")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class ModelError(Exception):
    """The model cannot be built or loaded; the message says why."""


class RatingNet(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 + 4.0 * torch.sigmoid(self.backbone(x).squeeze(-1))


def _replace_head(arch: str, net: nn.Module) -> nn.Module:
    if arch.startswith("resnet"):
        net.fc = nn.Linear(net.fc.in_features, 1)
    elif arch == "alexnet":
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, 1)
    return net


def _load_backbone_weights(arch: str, net: nn.Module, pretrained: str) -> str:
    """Load ImageNet weights into ``net`` (before its head is replaced); return a description."""
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - URLError, socket errors, hash errors
            raise ModelError(
                f"cannot download ImageNet weights for {arch} ({type(e).__name__}: {e}); offline, "
                f"download {weights.url} elsewhere and set scorer.pretrained to the file's path") from None
        source = f"ImageNet weights {weights}"
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise ModelError(f"scorer.pretrained: no weights file at {pretrained!r} "
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
    return RatingNet(_replace_head(arch, net))


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


def preprocess(crops: list[Image.Image], size: int) -> torch.Tensor:
    """Resize to ``size``x``size``, scale to 0-1 and normalise with ImageNet statistics (NCHW)."""
    arrays = [np.asarray(c.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
              for c in crops]
    batch = (np.stack(arrays) / 255.0 - MEAN) / STD
    return torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())


def save_model(net: RatingNet, path: str | Path, *, arch: str, image_size: int, version: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"arch": arch, "image_size": image_size, "version": version,
                "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}, tmp)
    tmp.replace(path)


class Scorer:
    """A loaded model ready for batched inference."""

    def __init__(self, net: RatingNet, *, arch: str, version: str, image_size: int = 224,
                 device: str = "auto", batch_size: int = 32, tta: bool = True):
        self.device = pick_device(device)
        self.net = net.to(self.device).eval()
        self.arch, self.version, self.image_size = arch, version, image_size
        self.batch_size, self.tta = batch_size, tta

    @classmethod
    def load(cls, path: str | Path, **kw) -> "Scorer":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            net = build_model(ckpt["arch"])
            net.load_state_dict(ckpt["state_dict"])
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - missing, truncated or foreign files
            raise ModelError(f"cannot load model file {path}: {e}") from None
        kw.setdefault("image_size", ckpt.get("image_size", 224))
        return cls(net, arch=ckpt["arch"], version=ckpt["version"], **kw)

    @torch.inference_mode()
    def predict(self, crops: list[Image.Image]) -> tuple[list[float], list[float | None]]:
        """Scores (1-5) and uncertainties for face crops, in batches of ``batch_size``."""
        scores: list[float] = []
        spreads: list[float | None] = []
        for start in range(0, len(crops), self.batch_size):
            x = preprocess(crops[start:start + self.batch_size], self.image_size).to(self.device)
            y = self.net(x)
            if self.tta:
                y2 = self.net(torch.flip(x, dims=[3]))
                scores.extend(((y + y2) / 2).float().cpu().tolist())
                spreads.extend(((y - y2).abs() / 2).float().cpu().tolist())
            else:
                scores.extend(y.float().cpu().tolist())
                spreads.extend([None] * len(y))
        return scores, spreads
