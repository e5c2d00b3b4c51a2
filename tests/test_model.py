import pytest
import torch
import torchvision
from PIL import Image

from scorer.model import ModelError, Scorer, build_model, pick_device, save_model
from scorer.registry import ensure_active_model, load_scorer
from scorer.settings import ScorerConfig
from storage import Store
from tests.helpers import picture


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "alexnet"])
def test_architectures_predict_one_rating_in_range(arch):
    net = build_model(arch).eval()
    size = 64 if arch != "alexnet" else 96
    with torch.no_grad():
        y = net(torch.rand(3, 3, size, size))
    assert y.shape == (3,)
    assert torch.all((y >= 1) & (y <= 5))


def test_unknown_architecture_is_refused():
    with pytest.raises(ModelError, match="unknown architecture 'vgg99'"):
        build_model("vgg99")


def test_pretrained_from_local_weights_file(tmp_path):
    torch.manual_seed(1)
    donor = torchvision.models.resnet18(weights=None)
    torch.save(donor.state_dict(), tmp_path / "resnet18.pth")
    net = build_model("resnet18", str(tmp_path / "resnet18.pth"))
    assert torch.equal(net.backbone.conv1.weight, donor.conv1.weight)
    assert net.head.out_features == 1
    with pytest.raises(ModelError, match="no weights file"):
        build_model("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ModelError, match="does not fit alexnet"):
        build_model("alexnet", str(tmp_path / "resnet18.pth"))


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            pick_device("cuda")


def test_batched_scores_equal_one_at_a_time(tmp_path):
    torch.manual_seed(0)
    save_model(build_model("resnet18"), tmp_path / "m.pt", arch="resnet18", image_size=64, version="v1")
    crops = [Image.open(__import__("io").BytesIO(picture(i))) for i in range(5)]
    batched = Scorer.load(tmp_path / "m.pt", device="cpu", batch_size=4)
    single = Scorer.load(tmp_path / "m.pt", device="cpu", batch_size=1)
    s1, u1 = batched.predict(crops)
    s2, u2 = single.predict(crops)
    assert batched.version == "v1" and len(s1) == 5
    assert s1 == pytest.approx(s2, abs=1e-4) and u1 == pytest.approx(u2, abs=1e-4)
    assert all(u > 0 for u in u1)  # half the gap to the mirror image: these pictures are not symmetric
    assert batched.predict([Image.new("RGB", (64, 64), "gray")])[1] == [pytest.approx(0, abs=1e-6)]
    assert len(set(round(s, 5) for s in s1)) > 1  # different pictures, different scores


def test_damaged_model_file_gives_clear_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load model file"):
        Scorer.load(tmp_path / "bad.pt")
    torch.save({"arch": "resnet18", "version": "old", "state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(ModelError, match="older tastefeed"):
        Scorer.load(tmp_path / "old.pt")


def test_colour_statistics_reach_the_head():
    """Two pictures differing only in saturation get different scores from the same weights."""
    torch.manual_seed(0)
    net = build_model("resnet18").eval()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.weight[0, -3] = 5.0  # the vividness statistic alone
        grey = torch.full((1, 3, 32, 32), 0.5)
        vivid = grey.clone()
        vivid[:, 0] = 0.9
        vivid[:, 2] = 0.1
        assert net(vivid).item() > net(grey).item() + 1


def test_untrained_model_is_created_once_and_reused(tmp_path, caplog):
    store = Store.open(tmp_path / "t.db")
    cfg = ScorerConfig(image_size=64)
    row = ensure_active_model(store, cfg, tmp_path / "models")
    assert row["version"] == "resnet18-random-init" and row["active"] == 1
    assert "no trained model yet" in caplog.text
    mtime = (tmp_path / "models" / row["path"]).stat().st_mtime_ns
    again = ensure_active_model(store, cfg, tmp_path / "models")
    assert again["version"] == row["version"]
    assert (tmp_path / "models" / row["path"]).stat().st_mtime_ns == mtime
    scorer = load_scorer(again, cfg, tmp_path / "models", margin=0.2)
    assert scorer.version == row["version"]
