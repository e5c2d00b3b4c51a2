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
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scorer.dataset import CropCache, build_examples
from scorer.evaluate import better, metrics, per_picture
from scorer.features import blocks_of, ensure_features
from scorer.model import FORMAT, AppliedHead, ModelError, RatingNet, Scorer, build_model, pick_device, save_model, to_tensor
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


def train_step_inputs(x: torch.Tensor, y: torch.Tensor, tcfg, rng: np.random.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch from uint8 crops (NCHW) and their ratings: augmented (:func:`augment`),
    then mixed (MixUp: pictures and ratings blended with a shuffled copy, Beta(mixup, mixup))."""
    x = augment(x.float().div_(255), tcfg.rotation, tcfg.color_jitter)
    if tcfg.mixup > 0:
        lam = float(rng.beta(tcfg.mixup, tcfg.mixup))
        perm = torch.randperm(len(x), device=x.device)
        x = lam * x + (1 - lam) * x[perm]
        y = lam * y + (1 - lam) * y[perm]
    return x, y


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
        progress: bool | None = None, on_epoch=None) -> FitResult:
    """Train ``net`` on uint8 crops (N, S, S, 3) and ratings; return the best averaged weights.
    ``on_epoch(epoch, epochs, seconds)`` is called after each epoch (the progress file)."""
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
            x, y = train_step_inputs(xt[idx], yt[idx], tcfg, rng)
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
        if on_epoch is not None:
            on_epoch(epoch, epochs, time.monotonic() - t0)
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
    head: dict | None = None              # the taste head (blocks, blend, ...), or why there is none
    network: dict | None = None           # validation metrics of the network alone


def _is_trained(row: dict | None) -> bool:
    return bool(row and row.get("metrics"))


def load_training_data(store, tcfg: TrainConfig, paths: DataPaths, image_size: int, *, margin: float,
                       max_pixels: int, progress: bool | None = None):
    """(train arrays, train examples, val arrays, val examples, crop cache) of the labelled faces,
    the crops at ``image_size`` (for fitting the network)."""
    ex_tr, ex_val = training_examples(store, tcfg)
    cache = CropCache(paths.cache, image_size, margin)
    arrays, kept = cache.arrays(ex_tr + ex_val, paths.media, max_pixels=max_pixels, progress=progress)
    train_idx = [i for i, e in enumerate(kept) if e.split == "train"]
    val_idx = [i for i, e in enumerate(kept) if e.split == "val"]
    if len(train_idx) < 2 or len(val_idx) < 2:
        raise TrainError(f"{len(train_idx)} training and {len(val_idx)} validation crop(s): too few to "
                         "train and validate; add labels or raise train.val_share")
    return (arrays[train_idx], [kept[i] for i in train_idx], arrays[val_idx], [kept[i] for i in val_idx],
            cache)


def training_examples(store, tcfg: TrainConfig) -> tuple[list, list]:
    """(training examples, validation examples): one per labelled face (``scorer/dataset.py``);
    TrainError when there are too few labelled pictures."""
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
    return [e for e in examples if e.split == "train"], [e for e in examples if e.split == "val"]


def _face_rows(examples) -> list[dict]:
    return [{"id": e.face_id, "image_id": e.image_id, "media_path": e.media_path, **dataclasses.asdict(e.face)}
            for e in examples if e.face_id is not None]


def feature_predictions(scorer: Scorer, store, examples, paths: DataPaths, *, margin: float, max_pixels: int,
                        how: str = "max", progress: bool | None = False) -> tuple[np.ndarray, np.ndarray]:
    """(picture predictions, picture ratings) of ``scorer`` on ``examples``, from the faces'
    cached features (the missing ones computed once and stored)."""
    vectors = ensure_features(store, scorer.extractor, _face_rows(examples), paths.media, margin=margin,
                              max_pixels=max_pixels, sources=scorer.needed_sources(), progress=progress)
    kept = [e for e in examples if e.face_id in vectors]
    if not kept:
        return np.zeros(0), np.zeros(0)
    scores, _ = scorer.predict_features([vectors[e.face_id] for e in kept])
    _, pred, true = per_picture([e.image_id for e in kept], scores, [e.rating for e in kept], how)
    return pred, true


# ---- the taste head --------------------------------------------------------------------------
BLENDS = tuple(np.round(np.linspace(0, 1, 21), 2))


def choose_blend(network: np.ndarray, head: np.ndarray, ratings: np.ndarray, blends=BLENDS) -> float:
    """The head's weight (0-1) against the network with the least squared error on validation
    faces; on a tie the larger weight (the head refits in seconds, the network does not)."""
    network, head, y = (np.asarray(a, np.float64) for a in (network, head, ratings))
    errors = np.array([float((((1 - w) * network + w * head - y) ** 2).mean()) for w in blends])
    best = np.flatnonzero(errors <= errors.min() + 1e-12)
    return float(blends[int(best[-1])])


def comparison_rows(store, val_share: float) -> list[tuple[int, int]]:
    """The owner's comparisons, as (winner face id, loser face id), leaving out any that involves
    a validation picture (which must stay unseen); each picture stands for itself by its
    best-scored face."""
    from scorer.dataset import split_of

    best: dict[int, int | None] = {}

    def face(image_id: int) -> int | None:
        if image_id not in best:
            row = store.get_image(image_id)
            faces = store.faces_of(image_id) if row and row.get("sha256") else []
            usable = faces and split_of(row["sha256"], val_share) == "train"
            best[image_id] = max(faces, key=lambda f: f["score"] or 0)["id"] if usable else None
        return best[image_id]

    out = []
    for c in store.comparisons():
        w, lo = face(c["winner_id"]), face(c["loser_id"])
        if w is not None and lo is not None:
            out.append((w, lo))
    return out


def head_extractor(store, paths: DataPaths, scfg: ScorerConfig, tcfg: TrainConfig, icfg: IdentityConfig | None,
                   base: Scorer):
    """The extractor a new head is fitted with: ``base``'s (backbone, whole picture, colour,
    network), plus the active identity embedder when there is one (``train.identity``); and a
    report of the identity block."""
    from scorer.characters import load_embedder
    from scorer.features import FeatureExtractor

    ex = base.extractor
    embedder, report = None, {"used": False, "reason": "off (train.identity = false)"}
    if tcfg.identity:
        row = store.active_identity_model()
        if row is None:
            report = {"used": False, "reason": "no identity embedder (see `main.py characters train`)"}
        else:
            try:
                embedder = load_embedder(row, icfg or IdentityConfig(), paths.models)
                report = {"used": True, "embedder": row["version"], "embedder_file": row["path"],
                          "untrained_embedder": not row["metrics"]}
            except ModelError as e:
                log.warning("identity block left out: %s", e)
                report = {"used": False, "reason": str(e)}
    return FeatureExtractor(ex.backbone, ex.whole, ex.network, ex.network_version, embedder, ex.margin), report


def fit_taste_head(store, paths: DataPaths, scfg: ScorerConfig, tcfg: TrainConfig, base: Scorer, version: str,
                   ex_tr, ex_val, *, margin: float, max_pixels: int, icfg: IdentityConfig | None = None,
                   progress: bool | None = False, network_trained: bool = True) -> tuple[Scorer, dict]:
    """A scorer with ``base``'s network and a taste head fitted on the training faces' cached
    features (and the comparisons between training pictures), its blend with the network chosen
    on the validation faces (the head alone when the network was never trained); and a report. The head is left out (``base``'s network alone) when
    fewer than two training faces have features."""
    from scorer.head import fit_head

    started = time.monotonic()
    extractor, identity = head_extractor(store, paths, scfg, tcfg, icfg, base)
    sources = {b: s for b, s in extractor.sources.items() if b != "net"}
    vectors = ensure_features(store, extractor, _face_rows(ex_tr + ex_val), paths.media, margin=margin,
                              max_pixels=max_pixels, progress=progress)
    tr = [e for e in ex_tr if e.face_id in vectors]
    val = [e for e in ex_val if e.face_id in vectors]
    report: dict = {"identity": identity, "faces_train": len(tr), "faces_val": len(val)}
    if len(tr) < 2 or len(val) < 2:
        return base, {**report, "used": False, "reason": "too few labelled faces with features"}
    rows = [vectors[e.face_id] for e in tr]
    ratings = [e.rating for e in tr]
    index = {e.face_id: i for i, e in enumerate(tr)}
    pairs = []
    for w, lo in comparison_rows(store, tcfg.val_share):
        for fid in (w, lo):
            if fid not in index:
                got = ensure_features(store, extractor, [store_face(store, fid)], paths.media, margin=margin,
                                      max_pixels=max_pixels)
                if fid in got:
                    index[fid] = len(rows)
                    rows.append(got[fid])
                    ratings.append(np.nan)
        if w in index and lo in index:
            pairs.append((index[w], index[lo]))
    head = fit_head(blocks_of(rows, sources), np.array(ratings, np.float64),
                    pairs=np.array(pairs, np.int64).reshape(-1, 2) if pairs else None, seed=tcfg.seed)
    val_vectors = [vectors[e.face_id] for e in val]
    head_val, _ = head.predict(blocks_of(val_vectors, sources))
    net = extractor.sources["net"]
    network_val = np.array([v[net][0] for v in val_vectors], np.float32)
    blend = (choose_blend(network_val, head_val, np.array([e.rating for e in val], np.float32))
             if network_trained else 1.0)
    applied = AppliedHead(head, sources, blend, identity.get("embedder_file") if identity["used"] else None,
                          describe_backbone(base.extractor.backbone))
    scorer = Scorer(base.net, arch=base.arch, version=version, image_size=base.image_size, device=str(base.device),
                    batch_size=base.batch_size, tta=base.tta, head=applied, backbone=base.extractor.backbone,
                    whole=base.extractor.whole, embedder=extractor.embedder, network_version=base.network_version,
                    margin=base.extractor.margin)
    scorer.network_file = base.network_file
    report.update({"used": True, **applied.describe(), "pairs": len(pairs),
                   "seconds": round(time.monotonic() - started, 2)})
    log.info("taste head: blocks %s, blend %.2f with the network, %d faces, %d comparisons (%.1fs)",
             ", ".join(sorted(sources)), blend, len(tr), len(pairs), report["seconds"])
    return scorer, report


def store_face(store, face_id: int) -> dict:
    row = store.execute("SELECT faces.*, images.media_path FROM faces JOIN images ON images.id = faces.image_id "
                        "WHERE faces.id = ?", [face_id])
    return row[0] if row else {"id": face_id, "image_id": None, "media_path": None}


def describe_backbone(backbone) -> dict | None:
    if backbone is None:
        return None
    from scorer.backbones import describe

    return describe(backbone)


def train_from_store(store, paths: DataPaths, scfg: ScorerConfig, tcfg: TrainConfig, *, margin: float,
                     max_pixels: int, epochs: int | None = None, promote: bool = True,
                     progress: bool | None = None, icfg: IdentityConfig | None = None,
                     full: bool = False, keep: bool = True) -> TrainOutcome:
    """Fit the taste head on all labels (and with ``full``, the network first), compare with the
    active model on the validation pictures, register, promote if better.

    Without ``full`` the new model keeps the active model's network and only the head is fitted,
    from cached features: seconds, not minutes; its file names the network's file instead of
    copying it. A model that is not promoted is registered all the same (``models use`` can
    switch to it), unless ``keep`` is false (the daemon's automatic refits: only promoted heads
    are written). ``margin`` is the crop
    margin (``detector.margin``), ``max_pixels`` the decoding guard (``download.max_pixels``),
    ``icfg`` the ``[characters]`` settings (the identity embedder's device and batch size).
    The run's progress and outcome go to ``<data>/train-progress.json`` (``scorer.progress``)."""
    from scorer.progress import TrainProgress

    shown = TrainProgress(paths.root, "full" if full else "head")
    try:
        out = _train_from_store(store, paths, scfg, tcfg, margin=margin, max_pixels=max_pixels, epochs=epochs,
                                promote=promote, progress=progress, icfg=icfg, full=full, keep=keep, shown=shown)
    except BaseException as e:
        shown.finish(False, "interrupted" if isinstance(e, KeyboardInterrupt) else str(e) or type(e).__name__)
        raise
    shown.finish(True, f"model {out.version}: {out.reason}")
    return out


def _train_from_store(store, paths: DataPaths, scfg: ScorerConfig, tcfg: TrainConfig, *, margin: float,
                      max_pixels: int, epochs: int | None, promote: bool, progress: bool | None,
                      icfg: IdentityConfig | None, full: bool, keep: bool, shown) -> TrainOutcome:
    from scorer.registry import configured_backbone, ensure_active_model, load_scorer

    started = time.monotonic()
    clear_temporary_files(paths.models)
    active = ensure_active_model(store, scfg, paths.models)
    try:
        current = load_scorer(active, scfg, paths.models, margin=margin)
    except ModelError as e:
        if not full:
            raise TrainError(f"cannot load the active model {active['version']} ({e}); "
                             "train the network too with `train --full`") from None
        current = None
    history, best_epoch, net_seconds, warm = [], 0, 0.0, False
    if full:
        arch, size = scfg.arch, scfg.image_size
        device = pick_device(scfg.device)
        net = None
        # Warm only from a network that was itself trained (a head refit's network may be the
        # untrained starting one: its registry row has no metrics).
        trained_network = current is not None and _is_trained(store.get_model(current.network_version or ""))
        if tcfg.warm_start and trained_network and current.arch == arch and current.image_size == size:
            net, warm = copy.deepcopy(current.net).cpu(), True
            log.info("fine-tuning the active model's network (%s)", current.network_version)
        if net is None:
            torch.manual_seed(tcfg.seed)
            net = build_model(arch, scfg.pretrained)
        learned_start = warm or scfg.pretrained not in ("", "none")
        shown.stage("loading the labelled crops")
        x_tr, ex_tr, x_val, ex_val, _ = load_training_data(store, tcfg, paths, size, margin=margin,
                                                           max_pixels=max_pixels, progress=progress)
        y_tr = np.array([e.rating for e in ex_tr], dtype=np.float32)
        y_val = np.array([e.rating for e in ex_val], dtype=np.float32)
        log.info("training the network %s (%dpx) on %s: %d crops, validating on %d crops", arch, size, device,
                 len(ex_tr), len(ex_val))
        shown.stage("training the network")
        result = fit(net, x_tr, y_tr, x_val, y_val, tcfg, device,
                     freeze_epochs=tcfg.freeze_epochs if learned_start else 0, epochs=epochs, progress=progress,
                     on_epoch=shown.epoch)
        history, best_epoch, net_seconds = result.history, result.best_epoch, result.seconds
        version = new_version(store.get_model, arch)
        base = Scorer(result.net, arch=arch, version=version, image_size=size, device=str(device),
                      batch_size=scfg.batch_size, tta=scfg.tta, backbone=configured_backbone(scfg), whole=scfg.whole,
                      margin=margin)
        base.network_file = f"{version}.pt"
    else:
        ex_tr, ex_val = training_examples(store, tcfg)
        version = new_version(store.get_model, "head")
        base = Scorer(current.net, arch=current.arch, version=version, image_size=current.image_size,
                      device=scfg.device, batch_size=scfg.batch_size, tta=scfg.tta,
                      backbone=configured_backbone(scfg), whole=scfg.whole, network_version=current.network_version,
                      margin=margin)
        base.network_file = current.network_file
    n_train_pics, n_val_pics = len({e.image_id for e in ex_tr}), len({e.image_id for e in ex_val})
    how = scfg.aggregate
    shown.stage("fitting the taste head")
    network = metrics(*feature_predictions(base, store, ex_val, paths, margin=margin, max_pixels=max_pixels,
                                           how=how, progress=progress))
    network_trained = full or _is_trained(store.get_model(base.network_version or ""))
    scorer, head = fit_taste_head(store, paths, scfg, tcfg, base, version, ex_tr, ex_val, margin=margin,
                                  network_trained=network_trained,
                                  max_pixels=max_pixels, icfg=icfg, progress=progress)
    new = metrics(*feature_predictions(scorer, store, ex_val, paths, margin=margin, max_pixels=max_pixels, how=how,
                                       progress=progress))
    baseline = None
    shown.stage("comparing with the active model")
    if current is not None and _is_trained(active):
        baseline = metrics(*feature_predictions(current, store, ex_val, paths, margin=margin, max_pixels=max_pixels,
                                                how=how, progress=progress))
    # A full run must beat the active model; a head refit (the same network, every label so far)
    # must not be worse than it by more than train.refit_tolerance, so one more label takes
    # effect even when it leaves the validation pictures' Pearson where it was.
    margin = tcfg.promote_margin if full else -tcfg.refit_tolerance
    wins = better(new, baseline, margin)
    promoted = promote and wins
    if not promote:
        reason = "not promoted (--no-promote)"
    elif wins:
        reason = "promoted: " + ("first trained model" if baseline is None else
                                 f"validation Pearson {new['pearson']} against {baseline['pearson']} of "
                                 f"{active['version']}")
    else:
        reason = (f"kept, not used: validation Pearson {new['pearson']} does not "
                  + ("beat " if full else f"come within {tcfg.refit_tolerance} of ")
                  + f"{None if baseline is None else baseline['pearson']} of {active['version']}")
    seconds = time.monotonic() - started
    record = {"val": new, "baseline": baseline, "baseline_version": active["version"] if baseline else None,
              "history": history, "best_epoch": best_epoch, "image_size": scorer.image_size,
              "n_train": n_train_pics, "n_val": n_val_pics, "crops_train": len(ex_tr), "crops_val": len(ex_val),
              "train_seconds": round(net_seconds, 1), "seconds": round(seconds, 1), "device": str(scorer.device),
              "warm_start": warm, "val_share": tcfg.val_share, "format": FORMAT, "kind": "full" if full else "head",
              "network_version": scorer.network_version, "head": head, "identity": head.get("identity"),
              "val_network": network}
    if full or promoted or keep:
        path = paths.models / f"{version}.pt"
        if full:
            save_model(scorer.net, path, arch=scorer.arch, image_size=scorer.image_size, version=version,
                       head=scorer.head)
        else:
            save_model(None, path, arch=scorer.arch, image_size=scorer.image_size, version=version,
                       head=scorer.head, network=(scorer.network_file, scorer.network_version))
        store.register_model(version, scorer.arch, path.name, data_size=n_train_pics + n_val_pics, metrics=record,
                             activate=promoted, notes=reason)
        if not full:
            prune_head_files(store, paths)
    log.info("model %s: %s", version, reason)
    return TrainOutcome(version, promoted, new, record["baseline_version"], baseline, n_train_pics, n_val_pics,
                        seconds, reason, history, head, network)


KEEP_HEAD_FILES = 5


TEMPORARY_FILE = re.compile(r"^\.[^/]+?\.(\d+)(?:\.\d+)?\.tmp$")


def clear_temporary_files(models_dir: Path) -> int:
    """Remove model files left half-written by a killed run (``.<name>.<pid>.tmp``, or
    ``.<name>.<pid>.<thread>.tmp``, of a process that is gone); returns how many. Other files
    are left alone."""
    gone = 0
    for path in Path(models_dir).glob(".*.tmp"):
        match = TEMPORARY_FILE.match(path.name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue          # its writer still runs
        except (ProcessLookupError, OverflowError):
            pass
        except PermissionError:
            continue
        path.unlink(missing_ok=True)
        gone += 1
    return gone


def prune_head_files(store, paths: DataPaths, keep: int = KEEP_HEAD_FILES) -> int:
    """Delete the files of head refits beyond the newest ``keep`` (never the active model's, nor
    a network another file names); their registry rows stay, with their metrics."""
    rows = [r for r in store.list_models() if r["version"].startswith("head-") and not r["active"]]
    rows.sort(key=lambda r: r["created_at"], reverse=True)
    gone = 0
    for r in rows[keep:]:
        path = paths.models / r["path"]
        if path.exists():
            path.unlink()
            gone += 1
    return gone
