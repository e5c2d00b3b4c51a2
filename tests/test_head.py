"""The taste head (``scorer/head.py``): kernel ridge on cached feature blocks, chosen by exact
leave-one-out error, with comparisons, ordinal calibration, predictive uncertainty and a state
that survives ``torch.load(weights_only=True)``. Synthetic data only."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from scorer.head import BLOCKS, TasteHead, _isotonic, fit_head


def _task(rng, n: int, dim: int = 16, noise: float = 0.4):
    """Rows with a backbone block (taste depends smoothly on two directions of it) and a colour
    block (vividness adds to it); (blocks, latent taste, ratings 1-5 integers)."""
    backbone = rng.normal(size=(n, dim)).astype(np.float32)
    colour = rng.uniform(size=(n, 5)).astype(np.float32)
    latent = 3 + 1.2 * np.sin(1.5 * backbone[:, 0]) + 0.8 * backbone[:, 1] + 1.0 * (colour[:, 2] - 0.5)
    ratings = np.clip(np.round(latent + rng.normal(scale=noise, size=n)), 1, 5)
    return {"backbone": backbone, "colour": colour}, latent, ratings


def _take(blocks, rows):
    return {k: v[rows] for k, v in blocks.items()}


def test_fit_predict_shapes_range_and_better_than_the_mean():
    rng = np.random.default_rng(0)
    blocks, latent, y = _task(rng, 500)
    train, test = np.arange(400), np.arange(400, 500)
    head = fit_head(_take(blocks, train), y[train])
    score, unc = head.predict(_take(blocks, test))
    assert score.shape == unc.shape == (100,)
    assert score.dtype == unc.dtype == np.float32
    assert score.min() >= 1 and score.max() <= 5
    assert (unc > 0).all() and np.isfinite(unc).all()
    mse = ((score - y[test]) ** 2).mean()
    assert mse < 0.6 * ((y[train].mean() - y[test]) ** 2).mean()
    assert np.corrcoef(score, latent[test])[0, 1] > 0.8
    d = head.describe()
    assert d["kind"] in ("kernel", "ridge") and d["examples"] == 400 and d["n_rated"] == 400
    assert set(d["blocks"]) == {"backbone", "colour"} and d["cv_rmse"] > 0
    assert d["calibration"] in ("isotonic", "none")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9, 20])
def test_few_rows_predict_near_the_mean(n):
    rng = np.random.default_rng(n)
    blocks, _, y = _task(rng, n + 30)
    head = fit_head(_take(blocks, np.arange(n)), y[:n])
    score, unc = head.predict(_take(blocks, np.arange(n, n + 30)))
    assert np.isfinite(score).all() and (unc > 0).all()
    assert abs(float(score.mean()) - y[:n].mean()) < 0.75
    assert score.min() >= min(y[:n].min(), 4) - 1 and score.max() <= max(y[:n].max(), 2) + 1


def test_constant_ratings_and_no_labels():
    rng = np.random.default_rng(1)
    blocks, _, _ = _task(rng, 40)
    head = fit_head(_take(blocks, np.arange(30)), np.full(30, 4.0))
    score, _ = head.predict(_take(blocks, np.arange(30, 40)))
    assert np.allclose(score, 4.0, atol=1e-4)
    with pytest.raises(ValueError, match="at least one rating or comparison"):
        fit_head(blocks, np.full(40, np.nan))


def test_state_round_trip_through_torch_gives_identical_predictions():
    rng = np.random.default_rng(2)
    blocks, _, y = _task(rng, 300)
    y = np.where(np.arange(300) < 250, y, np.nan)                 # 50 rows known only by comparison
    pairs = np.array([(i, i + 1) if blocks["backbone"][i, 1] > blocks["backbone"][i + 1, 1] else (i + 1, i)
                      for i in range(250, 298, 2)])
    step_blocks, latent, _ = _task(np.random.default_rng(3), 300, noise=0.0)
    calibrated = fit_head(step_blocks, np.where(latent > 3, 5.0, 1.0))      # isotonic calibration kept
    assert calibrated.calibration.size
    for head in (fit_head(blocks, y, pairs=pairs), calibrated):
        buf = io.BytesIO()
        torch.save({"head": head.to_state()}, buf)
        buf.seek(0)
        loaded = TasteHead.from_state(torch.load(buf, weights_only=True)["head"])
        fresh = _take(_task(np.random.default_rng(4), 50)[0], slice(None))
        for a, b in zip(head.predict(fresh), loaded.predict(fresh)):
            assert np.array_equal(a, b)
        assert loaded.describe() == head.describe()
        assert head.to_state()["examples"].dtype == torch.float16


def test_isotonic_calibration_is_monotone_and_kept_only_when_it_helps():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([1.0, 3.0, 2.0, 4.0, 4.0, 5.0])
    knots = _isotonic(x, y)
    fitted = np.interp(x, knots[0], knots[1])
    assert np.allclose(fitted, [1, 2.5, 2.5, 4, 4, 5])
    # ratings that are a step of the latent taste: the monotone map sharpens the smooth kernel
    rng = np.random.default_rng(5)
    blocks, latent, _ = _task(rng, 400, noise=0.0)
    y = np.where(latent > 3, 5.0, 1.0)
    head = fit_head(blocks, y)
    d = head.describe()
    assert d["calibration"] == "isotonic" and d["cv_rmse_isotonic"] < d["cv_rmse_raw"]
    score, _ = head.predict(blocks)
    order = np.argsort(head.raw(head.features(blocks))[0])
    assert (np.diff(score[order]) >= -1e-6).all()             # the map keeps the order


def _compared(rng, rated: int, unrated: int, k: int):
    """A task whose first ``rated`` rows have ratings and the rest none, and ``k`` comparisons
    among the rest, each won by the row of higher latent taste."""
    blocks, latent, y = _task(rng, rated + unrated)
    y = np.where(np.arange(rated + unrated) < rated, y, np.nan)
    a, b = rng.choice(np.arange(rated, rated + unrated), (2, k))
    pairs = np.stack([np.where(latent[a] > latent[b], a, b), np.where(latent[a] > latent[b], b, a)], 1)
    return blocks, y, pairs[a != b]


def _won(head, blocks, pairs) -> float:
    s = head.raw(head.features(blocks))[0]
    return float((s[pairs[:, 0]] > s[pairs[:, 1]]).mean())


def test_comparisons_alone_move_winners_above_losers():
    blocks, y, pairs = _compared(np.random.default_rng(6), 40, 200, 400)
    without = fit_head(_take(blocks, np.arange(40)), y[:40])
    with_pairs = fit_head(blocks, y, pairs=pairs)
    d = with_pairs.describe()
    assert d["n_pairs"] == len(pairs) and d["examples"] == 40 + len(np.unique(pairs))
    assert _won(with_pairs, blocks, pairs) > 0.9 and _won(with_pairs, blocks, pairs) > _won(without, blocks, pairs) + 0.05
    # no ratings at all: the comparisons alone order the rows, around the middle of the scale
    only = fit_head(blocks, np.full(len(y), np.nan), pairs=pairs)
    assert _won(only, blocks, pairs) > 0.9
    assert abs(float(only.predict(blocks)[0].mean()) - 3.0) < 0.5


def test_comparisons_with_ratings_order_new_faces_better_than_ratings_alone():
    gains = []
    for seed in range(3):
        blocks, y, pairs = _compared(np.random.default_rng(20 + seed), 20, 200, 300)
        test_blocks, test_latent, _ = _task(np.random.default_rng(40 + seed), 300)
        rho = [spearmanr(h.predict(test_blocks)[0], test_latent)[0]
               for h in (fit_head(_take(blocks, np.arange(20)), y[:20]), fit_head(blocks, y, pairs=pairs))]
        gains.append(rho[1] - rho[0])
    assert np.mean(gains) > 0.1 and min(gains) > 0


def test_uncertainty_grows_away_from_the_examples_and_tracks_the_error():
    rng = np.random.default_rng(8)
    # dense where backbone[:, 0] < 0, sparse beyond: the head is surer where it saw more
    blocks, latent, y = _task(rng, 1200)
    keep = (blocks["backbone"][:, 0] < 0) | (rng.random(1200) < 0.08)
    train = np.flatnonzero(keep)[:400]
    head = fit_head(_take(blocks, train), y[train])
    test_blocks, test_latent, _ = _task(np.random.default_rng(9), 600)
    score, unc = head.predict(test_blocks)
    far = {k: v + (6.0 if k == "backbone" else 0.0) for k, v in test_blocks.items()}
    _, unc_far = head.predict(far)
    _, unc_train = head.predict(_take(blocks, train))
    assert unc_far.mean() > 1.3 * unc_train.mean()
    assert np.median(unc_far) > np.median(unc)
    error = np.abs(score - test_latent)
    assert spearmanr(unc, error)[0] > 0.2


def test_missing_or_malformed_blocks_are_named():
    rng = np.random.default_rng(10)
    blocks, _, y = _task(rng, 60)
    head = fit_head(blocks, y)
    with pytest.raises(ValueError, match="colour"):
        head.predict({"backbone": blocks["backbone"]})
    with pytest.raises(ValueError, match="backbone"):
        head.predict({"backbone": blocks["backbone"][:, :5], "colour": blocks["colour"]})
    extra = dict(blocks, identity=np.zeros((60, 8), np.float32))  # a block it was not fitted on: ignored
    assert np.array_equal(head.predict(extra)[0], head.predict(blocks)[0])
    with pytest.raises(ValueError, match="nose"):
        fit_head({"nose": blocks["backbone"]}, y)
    with pytest.raises(ValueError, match="colour"):
        fit_head({"backbone": blocks["backbone"], "colour": blocks["colour"][:10]}, y)
    with pytest.raises(ValueError, match="comparison"):
        fit_head(blocks, y, pairs=np.array([[0, 99]]))
    assert BLOCKS == ("backbone", "identity", "colour", "whole")


def test_importing_the_head_does_not_import_torch():
    code = "import sys, scorer.head; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
