"""Identity sharpens taste: the identity head (kernel ridge from identity embeddings to ratings),
its blend with the network, the model file that carries it, and the fallback without it."""
from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
from PIL import Image

from scorer.evaluate import metrics
from scorer.identity_head import IdentityHead, choose_blend, fit_head
from tests.helpers import picture


def _characters(rng, n_chars: int, per: int, dim: int = 32, noise: float = 0.12):
    """Faces of ``n_chars`` characters (unit embeddings around a centre each), random colour
    statistics, and ratings: the character's mean rating plus noise, 1-5."""
    centres = rng.normal(size=(n_chars, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    who = np.repeat(np.arange(n_chars), per)
    e = centres[who] + rng.normal(scale=noise, size=(len(who), dim))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    means = np.linspace(1.3, 4.7, n_chars)[rng.permutation(n_chars)]
    ratings = np.clip(np.round(means[who] + rng.normal(scale=0.5, size=len(who))), 1, 5)
    stats = rng.uniform(size=(len(who), 5))
    return e.astype(np.float32), stats.astype(np.float32), ratings, who


def test_head_carries_a_characters_ratings_to_its_new_faces():
    rng = np.random.default_rng(0)
    e, s, y, who = _characters(rng, 6, 40)
    test = rng.random(len(y)) < 0.3
    started = time.monotonic()
    head = fit_head(e[~test], s[~test], y[~test], embedder="emb-1", embedder_file="emb-1.pt")
    assert time.monotonic() - started < 10
    pred = head.predict(e[test], s[test])
    m = metrics(pred, y[test])
    assert m["pearson"] > 0.85 and m["mae"] < 0.6, m
    assert ((pred >= 1) & (pred <= 5)).all()
    # knowing nothing of identity (the training mean) is far worse
    assert m["mae"] < 0.6 * np.abs(y[test] - y[~test].mean()).mean()
    # a face unlike every rated one gets the mean rating: the network decides for it
    far, far_novelty = head.predict_with_novelty(_far_from(e, rng), s[:1])
    assert abs(float(far[0]) - head.mean) < 0.5
    # and is what the head knows least: its novelty is near the head's typical error, a rated face's 0
    _, known = head.predict_with_novelty(e[~test][:5], s[~test][:5])
    assert np.allclose(known, 0, atol=1e-4) and far_novelty[0] > 0.8 * head.loo_rmse
    assert (head.predict_with_novelty(e[test], s[test])[1] < far_novelty[0]).all()


def _far_from(e: np.ndarray, rng) -> np.ndarray:
    """A unit vector whose cosine to every row of ``e`` is low."""
    for _ in range(1000):
        v = rng.normal(size=(1, e.shape[1]))
        v /= np.linalg.norm(v)
        if (e @ v.T).max() < 0.2:
            return v.astype(np.float32)
    raise AssertionError("no far vector found")


def test_blend_uses_the_head_only_when_it_helps():
    rng = np.random.default_rng(1)
    y = rng.integers(1, 6, 200).astype(float)
    good = y + rng.normal(scale=0.3, size=200)
    noise = rng.uniform(1, 5, 200)
    assert choose_blend(network=noise, head=good, ratings=y) >= 0.9
    assert choose_blend(network=good, head=noise, ratings=y) == 0.0
    # two half-right predictors: the blend is in between and better than either
    a, b = y + rng.normal(scale=0.8, size=200), y + rng.normal(scale=0.8, size=200)
    w = choose_blend(a, b, y)
    assert 0.3 <= w <= 0.7
    assert (((1 - w) * a + w * b - y) ** 2).mean() < min(((a - y) ** 2).mean(), ((b - y) ** 2).mean())


def test_head_round_trips_through_its_state():
    rng = np.random.default_rng(2)
    e, s, y, _ = _characters(rng, 3, 10, dim=8)
    head = fit_head(e, s, y, embedder="emb", embedder_file="emb.pt")
    head.blend = 0.4
    again = IdentityHead.from_state(head.to_state())
    assert (again.embedder, again.embedder_file, again.blend) == ("emb", "emb.pt", 0.4)
    assert np.allclose(again.predict(e, s), head.predict(e, s))
    with pytest.raises(ValueError, match="at least two"):
        fit_head(e[:1], s[:1], y[:1], embedder="emb", embedder_file="emb.pt")


# ---- the model file --------------------------------------------------------------------------
def _crops(seeds) -> list[Image.Image]:
    return [Image.open(io.BytesIO(picture(s))).convert("RGB") for s in seeds]


def test_model_with_identity_head_saves_loads_and_scores_the_blend(tmp_path, caplog):
    import torch

    from scorer.identity import Embedder, build_embedder, save_embedder
    from scorer.model import Scorer, build_model, colour_stats_arrays, resize_crop, save_model

    torch.manual_seed(0)
    save_embedder(build_embedder("resnet18", embedding_dim=16), tmp_path / "emb-1.pt", arch="resnet18",
                  image_size=32, version="emb-1")
    embedder = Embedder.load(tmp_path / "emb-1.pt", device="cpu")
    crops = _crops(range(12))
    arrays = [resize_crop(c, 32) for c in crops]
    head = fit_head(embedder.embed(crops), colour_stats_arrays(arrays), np.arange(12) % 5 + 1,
                    embedder="emb-1", embedder_file="emb-1.pt")
    head.blend = 0.5
    net = build_model("resnet18")
    save_model(net, tmp_path / "m.pt", arch="resnet18", image_size=32, version="m", identity=head)

    scorer = Scorer.load(tmp_path / "m.pt", device="cpu")
    assert scorer.identity is not None and scorer.embedder.version == "emb-1"
    scores, spreads = scorer.predict(crops)
    network, network_spreads = scorer.network_arrays(arrays)
    expected = 0.5 * np.array(network) + 0.5 * head.predict(embedder.embed(crops), colour_stats_arrays(arrays))
    assert np.allclose(scores, expected, atol=1e-4)
    _, novelty = head.predict_with_novelty(embedder.embed(crops), colour_stats_arrays(arrays))
    assert np.allclose(spreads, 0.5 * np.array(network_spreads) + 0.5 * novelty, atol=1e-5)
    assert not np.allclose(scores, network, atol=1e-3)     # the head changed the scores

    # the embedder's file gone: the network scores alone, with a warning
    (tmp_path / "emb-1.pt").rename(tmp_path / "elsewhere.pt")
    with caplog.at_level(logging.WARNING):
        alone = Scorer.load(tmp_path / "m.pt", device="cpu")
    assert alone.identity is None and "scoring with the network alone" in caplog.text
    assert np.allclose(alone.predict(crops)[0], network, atol=1e-5)

    # a model file without a head is the network alone
    save_model(net, tmp_path / "plain.pt", arch="resnet18", image_size=32, version="plain")
    plain = Scorer.load(tmp_path / "plain.pt", device="cpu")
    assert plain.identity is None and np.allclose(plain.predict(crops)[0], network, atol=1e-5)


def test_embedder_of_another_size_gets_crops_at_its_size(tmp_path):
    import torch

    from scorer.identity import Embedder, build_embedder, save_embedder
    from scorer.model import Scorer, build_model, colour_stats_arrays, resize_crop, save_model

    torch.manual_seed(0)
    save_embedder(build_embedder("resnet18", embedding_dim=8), tmp_path / "e.pt", arch="resnet18",
                  image_size=48, version="e")
    embedder = Embedder.load(tmp_path / "e.pt", device="cpu")
    crops = _crops(range(6))
    head = fit_head(embedder.embed(crops), colour_stats_arrays([resize_crop(c, 32) for c in crops]),
                    np.array([1, 5, 1, 5, 1, 5]), embedder="e", embedder_file="e.pt")
    head.blend = 1.0
    save_model(build_model("resnet18"), tmp_path / "m.pt", arch="resnet18", image_size=32, version="m",
               identity=head)
    scorer = Scorer.load(tmp_path / "m.pt", device="cpu")
    stats = colour_stats_arrays([resize_crop(c, 32) for c in crops])
    assert np.allclose(scorer.predict(crops)[0], head.predict(embedder.embed(crops), stats), atol=1e-4)


def test_train_identity_config(tmp_path):
    from bot.config import ConfigError, load_config
    from tests.helpers import write_config

    assert load_config(cwd="/nonexistent").train.identity is True
    assert load_config("config.example.toml").train.identity is True
    assert load_config(write_config(tmp_path, "[train]\nidentity = false\n")).train.identity is False
    with pytest.raises(ConfigError, match="train.identity: expected true or false"):
        load_config(write_config(tmp_path, '[train]\nidentity = "yes"\n'))


# ---- training with the head ------------------------------------------------------------------
MEANS = {"low": 1.4, "midlow": 2.3, "midhigh": 3.7, "high": 4.6}


def _variant(character: int, k: int) -> Image.Image:
    """Picture ``k`` of a synthetic character: the character's own picture, shifted a little, with
    noise (near copies look alike, as pictures of one character do to the embedder)."""
    rng = np.random.default_rng(1000 * character + k)
    base = np.asarray(Image.open(io.BytesIO(picture(character))).convert("RGB"), dtype=np.int16)
    dx, dy = rng.integers(-6, 7, 2)
    shifted = np.roll(base, (dy, dx), axis=(0, 1)) + rng.normal(scale=12, size=base.shape)
    return Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8))


def _rated_characters(root, per: int = 14):
    """Pictures of four characters rated by their character (plus noise), as a ratings CSV."""
    rng = np.random.default_rng(7)
    (root / "pics").mkdir(parents=True)
    lines = ["path,rating"]
    for c, (name, mean) in enumerate(MEANS.items()):
        for k in range(per):
            _variant(c, k).save(root / "pics" / f"{name}{k}.png")
            lines.append(f"pics/{name}{k}.png,{int(np.clip(round(mean + rng.normal(scale=0.5)), 1, 5))}")
    (root / "ratings.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_training_fits_the_head_on_identity_and_scoring_uses_it(tmp_path, monkeypatch):
    import torch

    from bot.config import load_config
    from scorer.analyze import build_analyzer
    from scorer.characters import ensure_active_embedder
    from scorer.dataset import build_examples
    from scorer.identity import Embedder
    from scorer.import_labels import import_labels, read_rating_rows
    from scorer.registry import load_scorer
    from scorer.train import train_from_store
    from storage import Store
    from tests.helpers import cli, write_config

    _rated_characters(tmp_path)
    cfg = load_config(write_config(tmp_path, f'''data_dir = "{tmp_path / 'data'}"
[scorer]
image_size = 32
device = "cpu"
[train]
min_labels = 20
val_share = 0.3
epochs = 1
warm_start = false
[characters]
image_size = 32
embedding_dim = 16
device = "cpu"
'''))
    store = Store.open(cfg.db_path)
    report = import_labels(store, build_analyzer(store, cfg.detector, cfg.scorer, cfg.paths),
                           read_rating_rows(tmp_path / "ratings.csv")[0], cfg.media_path, crops=True, progress=False)
    assert report.labels_added == 56 and not report.errors

    def train(**kw):
        return train_from_store(store, cfg.paths, cfg.scorer, cfg.train, margin=cfg.detector.margin,
                                max_pixels=cfg.download.max_pixels, progress=False, icfg=cfg.characters, **kw)

    # no identity embedder yet: the network alone, and the model file has no head
    plain = train(promote=False)
    assert plain.identity == {"used": False, "reason": "no identity embedder (see `main.py characters train`)"}
    assert "identity" not in torch.load(cfg.models_path / f"{plain.version}.pt", weights_only=True)

    # with an embedder (here the untrained one: near copies still embed close together)
    embedder_row = ensure_active_embedder(store, cfg.characters, cfg.models_path)
    embedded = []
    real_embed = Embedder.embed
    monkeypatch.setattr(Embedder, "embed", lambda self, crops: embedded.append(len(crops)) or real_embed(self, crops))
    out = train()
    assert out.identity["used"] and out.identity["embedder"] == embedder_row["version"], out.identity
    assert out.identity["blend"] > 0.3
    assert out.metrics["pearson"] > 0.8 and out.metrics["pearson"] > (out.network["pearson"] or 0), \
        (out.metrics, out.network)
    faces = {e.face_id for e in build_examples(store.training_rows())}
    assert set(store.embeddings(embedder_row["version"])) >= faces          # cached per face and version
    assert sum(embedded) == len(faces)
    row = store.get_model(out.version)
    assert '"used": true' in row["metrics"]

    # scoring (the daemon's, `score`'s and rescore's path): new pictures of a character get its taste
    scorer = load_scorer(row, cfg.scorer, cfg.models_path)
    assert scorer.identity is not None and scorer.embedder.version == embedder_row["version"]
    scores, _ = scorer.predict([_variant(c, 100 + k) for c in (0, 3) for k in range(4)])
    assert np.mean(scores[4:]) - np.mean(scores[:4]) > 1.5, scores      # "high" over "low"

    # a second run reads the stored embeddings instead of embedding the faces again
    embedded.clear()
    train(promote=False)
    assert embedded == []

    # switched off
    cfg.train.identity = False
    off = train(promote=False)
    assert off.identity["used"] is False and "train.identity = false" in off.identity["reason"]
    assert load_scorer(store.get_model(off.version), cfg.scorer, cfg.models_path).identity is None
    store.close()

    # the command line says what the head did (the config file keeps train.identity on)
    shown = cli(tmp_path, "train", "--no-promote")
    assert shown.returncode == 0, shown.stderr
    assert f"identity head on embedder {embedder_row['version']} (blend " in shown.stdout, shown.stdout
    assert "the network alone: Pearson" in shown.stdout
    listed = cli(tmp_path, "models", "list").stdout
    assert f"{out.version}  resnet18" in listed and f"identity head (blend {out.identity['blend']}, embedder " in listed
