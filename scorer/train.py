"""Training the rating model on the owner's labels: one plain loop, in the style of torchvision's
reference scripts.

    examples (latest label per picture, its faces)  ->  hash split into train / validation
    crops decoded once into the crop cache          ->  uint8 arrays in memory
    fit(): AdamW, one-cycle learning rate, flips, small rotations and shifts, brightness/contrast
           jitter, MixUp for regression, weight averaging (EMA), early stopping on validation loss
           (counted from the start, acted on only in the second half of the schedule)
    identity head (when an identity embedder exists, ``train.identity``): a kernel ridge from the
           faces' identity embeddings (stored per face and embedder version) and colour statistics
           to the rating, fitted in seconds; its blend with the network chosen on validation
    compare with the active model on the same validation pictures -> promote only if better

A run writes nothing until it has finished: the model file is written under a temporary name and
renamed, then registered (and maybe activated) in one transaction. A crash or kill part way leaves
the active model, the labels and the registry as they were. ``train_lock`` makes sure only one run
(from the command line or the daemon) trains at a time.
"""
from __future__ import annotations

import copy
import dataclasses
import fcntl
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scorer.dataset import CropCache, build_examples
from scorer.evaluate import better, metrics, picture_predictions
from scorer.identity_head import fit_blended
from scorer.model import (FORMAT, ModelError, RatingNet, Scorer, build_model, colour_stats_arrays, pick_device,
                          save_model, to_tensor)
from scorer.registry import new_version
from scorer.settings import IdentityConfig, ScorerConfig, TrainConfig
from storage.paths import DataPaths

log = logging.getLogger("tastefeed.train")


class TrainError(Exception):
    """Training cannot run (too few labels, another run in progress, ...); the message says why."""


@contextmanager
def train_lock(data_path: str | Path):
    """Hold ``<data>/train.lock`` for the duration of a run; raise TrainError if another holds it."""
    path = Path(data_path) / "train.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise TrainError(f"another training run is in progress (pid {holder})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock; a killed process releases it too


# ---- the loop --------------------------------------------------------------------------------
@dataclass
class FitResult:
    net: RatingNet
    history: list[dict]
    best_epoch: int
    seconds: float


def augment(x: torch.Tensor, rotation: float, jitter: float) -> torch.Tensor:
    """Random horizontal flip, rotation (degrees), 8% shifts, 10% zoom and brightness/contrast
    jitter of a batch in 0-1 (NCHW). Saturation and hue are never changed."""
    n, dev = len(x), x.device
    flip = torch.rand(n, device=dev) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    angle = (torch.rand(n, device=dev) * 2 - 1) * math.radians(rotation)
    scale = 1 + (torch.rand(n, device=dev) * 2 - 1) * 0.1
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, :, 2] = (torch.rand(n, 2, device=dev) * 2 - 1) * 0.08
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    if jitter > 0:
        bright = 1 + (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * jitter
        contrast = 1 + (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * jitter
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean) * bright
    return x.clamp(0, 1)


@torch.inference_mode()
def predict(net: torch.nn.Module, arrays: np.ndarray, device: torch.device, *, batch_size: int = 256,
            tta: bool = False) -> np.ndarray:
    net.eval()
    out = []
    for start in range(0, len(arrays), batch_size):
        x = to_tensor(arrays[start:start + batch_size]).to(device)
        y = net(x)
        if tta:
            y = (y + net(x.flip(3))) / 2
        out.append(y.float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def fit(net: RatingNet, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
        tcfg, device: torch.device, *, freeze_epochs: int = 0, epochs: int | None = None,
        progress: bool | None = None) -> FitResult:
    """Train ``net`` on uint8 crops (N, S, S, 3) and ratings; return the best averaged weights."""
    from tqdm import tqdm

    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    epochs = epochs or tcfg.epochs
    net = net.to(device)
    xt = torch.from_numpy(np.ascontiguousarray(x_train)).permute(0, 3, 1, 2).to(device)  # uint8 stays small
    yt = torch.tensor(y_train, dtype=torch.float32, device=device)
    bs = min(tcfg.batch_size, len(xt))
    steps = math.ceil(len(xt) / bs)
    opt = torch.optim.AdamW(net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tcfg.lr, total_steps=max(epochs * steps, 20),
                                                pct_start=0.25)
    ema = (torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tcfg.ema), use_buffers=True)
        if tcfg.ema > 0 else None)
    tail = {id(p) for p in net.tail_parameters()}
    best_loss, best_state, best_epoch, stale = math.inf, None, 0, 0
    history: list[dict] = []
    started = time.monotonic()
    for epoch in range(1, epochs + 1):
        frozen = epoch <= freeze_epochs
        for p in net.parameters():
            p.requires_grad_(not frozen or id(p) in tail)
        net.train()
        t0 = time.monotonic()
        order = torch.from_numpy(rng.permutation(len(xt))).to(device)
        total, seen = 0.0, 0
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{epochs}" + (" (early layers frozen)" if frozen else ""),
                   unit="batch", leave=False, file=sys.stderr,
                   disable=(not sys.stderr.isatty()) if progress is None else not progress)
        for step in bar:
            idx = order[step * bs:(step + 1) * bs]
            if len(idx) < 2:
                continue  # batch norm needs two
            x = augment(xt[idx].float().div_(255), tcfg.rotation, tcfg.color_jitter)
            y = yt[idx]
            if tcfg.mixup > 0:
                lam = float(rng.beta(tcfg.mixup, tcfg.mixup))
                perm = torch.randperm(len(idx), device=device)
                x = lam * x + (1 - lam) * x[perm]
                y = lam * y + (1 - lam) * y[perm]
            loss = F.mse_loss(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(net)
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / max(seen, 1):.3f}")
        model = ema.module if ema is not None else net
        pred = predict(model, x_val, device)
        val_loss = float(((pred - y_val) ** 2).mean())
        m = metrics(pred, y_val)
        record = {"epoch": epoch, "train_loss": round(total / max(seen, 1), 4), "val_loss": round(val_loss, 4),
                  "val_pearson": m["pearson"], "lr": opt.param_groups[0]["lr"],
                  "seconds": round(time.monotonic() - t0, 2)}
        history.append(record)
        improved = val_loss < best_loss - 1e-4
        if improved:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        log.info("epoch %d/%d: train loss %.3f, validation loss %.3f, Pearson %s%s (%.1fs)", epoch, epochs,
                 record["train_loss"], val_loss, "n/a" if m["pearson"] is None else f"{m['pearson']:.3f}",
                 " *" if improved else "", record["seconds"])
        if stale >= tcfg.patience and epoch >= epochs // 2:  # not while the learning rate is still high
            log.info("early stop: no better validation loss in %d epochs (best: epoch %d)", stale, best_epoch)
            break
    final = copy.deepcopy(ema.module if ema is not None else net)
    if best_state is not None:
        final.load_state_dict(best_state)
    return FitResult(final.eval(), history, best_epoch, time.monotonic() - started)


# ---- from the labels to a registered model ---------------------------------------------------
@dataclass
class TrainOutcome:
    version: str
    promoted: bool
    metrics: dict
    baseline_version: str | None
    baseline: dict | None
    n_train: int
    n_val: int
    seconds: float
    reason: str
    history: list[dict] = field(default_factory=list)
    identity: dict | None = None          # the identity head, or why there is none
    network: dict | None = None           # validation metrics of the network alone


def _is_trained(row: dict | None) -> bool:
    return bool(row and row.get("metrics"))


def validation_metrics(scorer: Scorer, examples, cache_root, media_root, margin, how, max_pixels) -> dict:
    """Picture-level metrics of ``scorer`` on validation ``examples`` (crops at its own size)."""
    return metrics(*picture_predictions(scorer, examples, cache_root, media_root, margin, how, max_pixels))


def load_training_data(store, tcfg: TrainConfig, paths: DataPaths, image_size: int, *, margin: float,
                       max_pixels: int, progress: bool | None = None):
    """(train arrays, train examples, val arrays, val examples) from the labels in ``store``."""
    rows = store.training_rows()
    examples = build_examples(rows, faces=tcfg.faces, val_share=tcfg.val_share)
    pictures = {e.image_id for e in examples}
    unanalysed = len(rows) - len(pictures)
    if unanalysed:
        log.info("%d labelled picture(s) have no stored face yet (not analysed, or no face); left out", unanalysed)
    if len(pictures) < max(tcfg.min_labels, 4):
        raise TrainError(f"only {len(pictures)} labelled picture(s) with faces; training needs "
                         f"{max(tcfg.min_labels, 4)} (train.min_labels). Import ratings with "
                         "`python main.py import-labels`, or rate pictures in Discord or the gallery")
    cache = CropCache(paths.cache, image_size, margin)
    arrays, kept = cache.arrays(examples, paths.media, max_pixels=max_pixels, progress=progress)
    train_idx = [i for i, e in enumerate(kept) if e.split == "train"]
    val_idx = [i for i, e in enumerate(kept) if e.split == "val"]
    if len(train_idx) < 2 or len(val_idx) < 2:
        raise TrainError(f"{len(train_idx)} training and {len(val_idx)} validation crop(s): too few to "
                         "train and validate; add labels or raise train.val_share")
    return (arrays[train_idx], [kept[i] for i in train_idx], arrays[val_idx], [kept[i] for i in val_idx],
            cache)


# ---- the identity head -----------------------------------------------------------------------
def identity_features(store, embedder, examples, arrays: np.ndarray, media_root, *, margin: float,
                      max_pixels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(identity embeddings, colour statistics, indices into ``examples``) of the examples whose
    face has an embedding: stored ones are read (``face_embeddings``, per embedder version), the
    others computed once with :func:`scorer.characters.embed_faces` and stored."""
    from scorer.characters import embed_faces

    rows = [{"id": e.face_id, "image_id": e.image_id, "media_path": e.media_path, **dataclasses.asdict(e.face)}
            for e in examples if e.face_id is not None]
    embed_faces(store, embedder, rows, media_root, margin=margin, max_pixels=max_pixels)
    stored = store.embeddings(embedder.version, [r["id"] for r in rows])
    keep = np.array([i for i, e in enumerate(examples) if e.face_id in stored], dtype=np.int64)
    vectors = (np.stack([stored[examples[i].face_id] for i in keep]) if len(keep)
               else np.zeros((0, embedder.dim), np.float32))
    return vectors, colour_stats_arrays(arrays[keep]), keep


def fit_identity_head(store, paths: DataPaths, icfg: IdentityConfig, net: RatingNet, device, scfg: ScorerConfig,
                      train: tuple, val: tuple, *, margin: float, max_pixels: int):
    """(head and its embedder, report): the identity head on the training faces, its blend with
    ``net`` chosen on the validation faces; (None, report saying why) without an identity
    embedder, or when the head does not help (blend 0). ``train`` and ``val``: (arrays, examples,
    ratings)."""
    from scorer.characters import load_embedder

    row = store.active_identity_model()
    if row is None:
        return None, {"used": False, "reason": "no identity embedder (see `main.py characters train`)"}
    try:
        embedder = load_embedder(row, icfg, paths.models)
    except ModelError as e:
        log.warning("identity head left out: %s", e)
        return None, {"used": False, "reason": str(e)}
    started = time.monotonic()
    (x_tr, ex_tr, y_tr), (x_val, ex_val, y_val) = train, val
    e_tr, s_tr, k_tr = identity_features(store, embedder, ex_tr, x_tr, paths.media, margin=margin,
                                         max_pixels=max_pixels)
    e_val, s_val, k_val = identity_features(store, embedder, ex_val, x_val, paths.media, margin=margin,
                                            max_pixels=max_pixels)
    if len(k_tr) < 2 or len(k_val) < 2:
        return None, {"used": False, "reason": "too few faces with an identity embedding"}
    head = fit_blended((e_tr, s_tr, y_tr[k_tr]), (e_val, s_val, y_val[k_val]),
                       predict(net, x_val[k_val], device, tta=scfg.tta), embedder=row["version"],
                       embedder_file=row["path"])
    report = {"used": head.blend > 0, **head.describe(), "untrained_embedder": not row["metrics"],
              "seconds": round(time.monotonic() - started, 1)}
    if head.blend == 0:
        report["reason"] = "the head did not improve the validation error (blend 0)"
    log.info("identity head on %s: blend %.2f, kernel gamma %s, colour weight %s, lambda %s (%d faces, %.1fs)",
             row["version"], head.blend, head.gamma, head.stats_weight, head.lam, len(k_tr), report["seconds"])
    return ((head, embedder) if head.blend > 0 else None), report


def train_from_store(store, paths: DataPaths, scfg: ScorerConfig, tcfg: TrainConfig, *, margin: float,
                     max_pixels: int, epochs: int | None = None, promote: bool = True,
                     progress: bool | None = None, icfg: IdentityConfig | None = None) -> TrainOutcome:
    """Train on all labels, compare with the active model, register, promote if better.

    ``margin`` is the crop margin (``detector.margin``), ``max_pixels`` the decoding guard
    (``download.max_pixels``), ``icfg`` the ``[characters]`` settings (the identity embedder's
    device and batch size)."""
    from scorer.registry import load_scorer

    started = time.monotonic()
    arch, size = scfg.arch, scfg.image_size
    device = pick_device(scfg.device)
    active = store.active_model()
    net, warm = None, False
    if tcfg.warm_start and _is_trained(active) and active["arch"] == arch:
        try:
            current = load_scorer(active, scfg, paths.models)
            if current.image_size == size:
                net, warm = copy.deepcopy(current.net).cpu(), True
                log.info("fine-tuning the active model %s", active["version"])
        except ModelError as e:
            log.warning("cannot warm-start from %s (%s); starting fresh", active["version"], e)
    if net is None:
        torch.manual_seed(tcfg.seed)
        net = build_model(arch, scfg.pretrained)
    learned_start = warm or scfg.pretrained not in ("", "none")
    x_tr, ex_tr, x_val, ex_val, cache = load_training_data(store, tcfg, paths, size, margin=margin,
                                                           max_pixels=max_pixels, progress=progress)
    y_tr = np.array([e.rating for e in ex_tr], dtype=np.float32)
    y_val = np.array([e.rating for e in ex_val], dtype=np.float32)
    n_train_pics, n_val_pics = len({e.image_id for e in ex_tr}), len({e.image_id for e in ex_val})
    log.info("training %s (%dpx) on %s: %d crops from %d pictures, validating on %d crops from %d pictures",
             arch, size, device, len(ex_tr), n_train_pics, len(ex_val), n_val_pics)
    result = fit(net, x_tr, y_tr, x_val, y_val, tcfg, device,
                 freeze_epochs=tcfg.freeze_epochs if learned_start else 0, epochs=epochs, progress=progress)
    version = new_version(store.get_model, arch)
    scorer = Scorer(result.net, arch=arch, version=version, image_size=size, device=str(device),
                    batch_size=scfg.batch_size, tta=scfg.tta)
    how = scfg.aggregate
    network = new = validation_metrics(scorer, ex_val, paths.cache, paths.media, margin, how, max_pixels)
    identity, head = {"used": False, "reason": "off (train.identity = false)"}, None
    if tcfg.identity:
        fitted, identity = fit_identity_head(store, paths, icfg or IdentityConfig(), result.net, device, scfg,
                                             (x_tr, ex_tr, y_tr), (x_val, ex_val, y_val), margin=margin,
                                             max_pixels=max_pixels)
        if fitted is not None:
            head, embedder = fitted
            scorer = Scorer(result.net, arch=arch, version=version, image_size=size, device=str(device),
                            batch_size=scfg.batch_size, tta=scfg.tta, identity=head, embedder=embedder)
            new = validation_metrics(scorer, ex_val, paths.cache, paths.media, margin, how, max_pixels)
    baseline = None
    if active is not None:
        try:
            old = load_scorer(active, scfg, paths.models)
            baseline = validation_metrics(old, ex_val, paths.cache, paths.media, margin, how, max_pixels)
        except ModelError as e:
            log.warning("cannot evaluate the active model %s (%s); comparing with nothing", active["version"], e)
    wins = better(new, baseline, tcfg.promote_margin)
    promoted = promote and wins
    if not promote:
        reason = "not promoted (--no-promote)"
    elif wins:
        reason = "promoted: " + ("first trained model" if not _is_trained(active) or baseline is None else
                                 f"validation Pearson {new['pearson']} beats {baseline['pearson']} of {active['version']}")
    else:
        reason = (f"kept, not used: validation Pearson {new['pearson']} does not beat "
                  f"{None if baseline is None else baseline['pearson']} of {active['version']}")
    seconds = time.monotonic() - started
    record = {"val": new, "baseline": baseline, "baseline_version": active["version"] if active else None,
              "history": result.history, "best_epoch": result.best_epoch, "image_size": size,
              "n_train": n_train_pics, "n_val": n_val_pics, "crops_train": len(ex_tr), "crops_val": len(ex_val),
              "train_seconds": round(result.seconds, 1), "seconds": round(seconds, 1), "device": str(device),
              "warm_start": warm, "val_share": tcfg.val_share, "format": FORMAT,
              "identity": identity, "val_network": network}
    path = paths.models / f"{version}.pt"
    save_model(result.net, path, arch=arch, image_size=size, version=version, identity=head)
    store.register_model(version, arch, path.name, data_size=n_train_pics + n_val_pics, metrics=record,
                         activate=promoted, notes=reason)
    log.info("model %s: %s", version, reason)
    return TrainOutcome(version, promoted, new, record["baseline_version"], baseline, n_train_pics, n_val_pics,
                        seconds, reason, result.history, identity, network)
