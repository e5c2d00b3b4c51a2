"""Training the identity embedder on the named faces: ArcFace (additive angular margin) metric
learning, in the plain loop style of ``scorer/train.py``.

    named faces (``face_names``)   ->  hash split per face into train / validation
    crops from the crop cache      ->  uint8 arrays in memory
    fit_identity(): AdamW, one-cycle learning rate, flips, rotations, shifts, brightness/contrast
           jitter, Gaussian blur, optional MixUp of two names; an ArcFace head over the training
           characters; early stopping on validation top-1 (nearest class centre)
    evaluate_embedder(): top-1 of the recognizer (prototypes + k-NN) with the training faces
           enrolled, and the unknown threshold calibrated on the validation faces
    compare with the active embedder on the same split -> register; promote if not worse

The ArcFace head is dropped after training: only the embedder is saved, so characters never
trained on are enrolled from their examples' embeddings.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scorer.dataset import CropCache, Example, split_of
from scorer.identity import Embedder, IdentityNet, Recognizer, build_embedder, calibrate_threshold, save_embedder
from scorer.model import ModelError, pick_device, to_tensor
from scorer.registry import new_version
from scorer.train import TrainError, augment
from storage.records import Face

log = logging.getLogger("tastefeed.characters")


class ArcFace(nn.Module):
    """Logits ``s * cos(theta + m)`` for the true class and ``s * cos(theta)`` for the others."""

    def __init__(self, dim: int, classes: int, *, margin: float = 0.4, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin, self.scale = margin, scale

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return emb @ F.normalize(self.weight, dim=1).T

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(emb).clamp(-1 + 1e-7, 1 - 1e-7)
        m = self.margin
        target = torch.cos(torch.acos(cos) + m)
        # past pi - m the angle plus margin wraps around: fall back to a linear penalty
        target = torch.where(cos > math.cos(math.pi - m), target, cos - math.sin(math.pi - m) * m)
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        return self.scale * torch.where(onehot, target, cos)


def blur(x: torch.Tensor, share: float) -> torch.Tensor:
    """Blur a random ``share`` of the batch (Gaussian, sigma 0.5-1.5)."""
    from torchvision.transforms.functional import gaussian_blur

    if share <= 0:
        return x
    pick = torch.rand(len(x), device=x.device) < share
    if pick.any():
        x = x.clone()
        x[pick] = gaussian_blur(x[pick], kernel_size=5, sigma=0.5 + float(torch.rand(1)))
    return x


@dataclass
class IdentityFit:
    net: IdentityNet
    history: list[dict]
    best_epoch: int
    best_top1: float
    seconds: float


def fit_identity(net: IdentityNet, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                 y_val: np.ndarray, icfg, device: torch.device, *, epochs: int | None = None,
                 progress: bool | None = None) -> IdentityFit:
    """Train ``net`` on uint8 crops (N, S, S, 3) and class indices 0..C-1; keep the weights of the
    best validation top-1 (by nearest class centre of the ArcFace head)."""
    from tqdm import tqdm

    torch.manual_seed(icfg.seed)
    rng = np.random.default_rng(icfg.seed)
    epochs = epochs or icfg.epochs
    classes = int(y_train.max()) + 1
    net = net.to(device)
    head = ArcFace(net.project[1].out_features, classes, margin=icfg.margin, scale=icfg.scale).to(device)
    xt = torch.from_numpy(np.ascontiguousarray(x_train)).permute(0, 3, 1, 2).to(device)
    yt = torch.as_tensor(y_train, dtype=torch.long, device=device)
    bs = min(icfg.batch_size, len(xt))
    steps = math.ceil(len(xt) / bs)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=icfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=icfg.lr, total_steps=max(epochs * steps, 20),
                                                pct_start=0.2)
    best_top1, best_state, best_epoch, stale = -1.0, None, 0, 0
    history: list[dict] = []
    started = time.monotonic()
    bar = tqdm(range(1, epochs + 1), desc="training identity", unit="epoch", file=sys.stderr,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    for epoch in bar:
        net.train()
        head.train()
        order = torch.from_numpy(rng.permutation(len(xt))).to(device)
        total, seen = 0.0, 0
        for step in range(steps):
            idx = order[step * bs:(step + 1) * bs]
            if len(idx) < 2:
                continue  # batch norm needs two
            x = blur(augment(xt[idx].float().div_(255), icfg.rotation, icfg.color_jitter), icfg.blur)
            y = yt[idx]
            if icfg.mixup > 0:
                lam = float(rng.beta(icfg.mixup, icfg.mixup))
                perm = torch.randperm(len(idx), device=device)
                emb = net(lam * x + (1 - lam) * x[perm])
                loss = lam * F.cross_entropy(head(emb, y), y) + (1 - lam) * F.cross_entropy(head(emb, y[perm]), y[perm])
            else:
                loss = F.cross_entropy(head(net(x), y), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        top1 = _centre_top1(net, head, x_val, y_val, device)
        record = {"epoch": epoch, "train_loss": round(total / max(seen, 1), 4), "val_top1": round(top1, 4)}
        history.append(record)
        improved = top1 > best_top1
        if improved:
            best_top1, best_epoch, stale = top1, epoch, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            stale += 1
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", top1=f"{top1:.3f}")
        log.info("epoch %d/%d: train loss %.3f, validation top-1 %.3f%s", epoch, epochs, record["train_loss"],
                 top1, " *" if improved else "")
        if stale >= icfg.patience and epoch >= epochs // 2:
            log.info("early stop: no better validation top-1 in %d epochs (best: epoch %d)", stale, best_epoch)
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    return IdentityFit(net.eval(), history, best_epoch, best_top1, time.monotonic() - started)


@torch.inference_mode()
def _centre_top1(net, head, x_val, y_val, device) -> float:
    """Share of validation crops whose nearest ArcFace class centre is their own class; only
    classes the head knows count (a validation-only character cannot be right here)."""
    known = y_val >= 0
    if not known.any():
        return 0.0
    net.eval()
    hits = 0
    xs, ys = x_val[known], y_val[known]
    for start in range(0, len(xs), 256):
        x = to_tensor(xs[start:start + 256]).to(device)
        pred = head.cosine(net(x)).argmax(1).cpu().numpy()
        hits += int((pred == ys[start:start + 256]).sum())
    return hits / len(xs)


def evaluate_embedder(embedder: Embedder, x_enrol: np.ndarray, y_enrol, x_query: np.ndarray, y_query, *,
                      k: int = 5, target_precision: float = 0.9) -> dict:
    """Top-1 of the recognizer with ``x_enrol`` enrolled, on ``x_query`` (closed set: every query
    character is enrolled), and the threshold reaching ``target_precision`` on those queries and
    on the same queries as impostors (scored against the other characters only)."""
    rec = Recognizer(embedder.embed_arrays(list(x_enrol)), list(y_enrol), k=k)
    query = embedder.embed_arrays(list(x_query))
    best, sims = rec.scores(query)
    correct = rec.characters[best] == np.asarray(y_query)
    impostors = rec.impostor_similarities(query, y_query)
    threshold = calibrate_threshold(np.r_[sims, impostors], np.r_[correct, [False] * len(impostors)],
                                    target_precision)
    accepted = sims >= threshold
    return {"top1": round(float(correct.mean()), 4) if len(correct) else 0.0,
            "threshold": round(threshold, 4), "n": int(len(correct)),
            "recall_at_threshold": round(float((accepted & correct).mean()), 4) if len(correct) else 0.0,
            "per_character": per_character(y_query, correct)}


def per_character(labels, correct) -> dict:
    """label -> ``{"n", "accuracy"}``: how many of its faces were queried, and the share right."""
    labels, correct = np.asarray(labels), np.asarray(correct, dtype=bool)
    return {c.item(): {"n": int((labels == c).sum()), "accuracy": round(float(correct[labels == c].mean()), 4)}
            for c in np.unique(labels)}


# ---- from the named faces to a registered embedder -------------------------------------------
@dataclass
class IdentityOutcome:
    version: str
    promoted: bool
    metrics: dict
    threshold: float
    n_train: int
    n_val: int
    n_characters: int
    seconds: float
    reason: str
    history: list[dict] = field(default_factory=list)


def named_examples(store, val_share: float) -> list[Example]:
    """One example per named face; ``rating`` holds the character id. Each character with two or
    more faces keeps at least one for training."""
    out: list[Example] = []
    for r in store.named_faces():
        if not r["media_path"] or not r["sha256"]:
            continue
        split = split_of(f"{r['sha256']}-{r['x1']}-{r['y1']}-{r['x2']}-{r['y2']}", val_share)
        out.append(Example(r["image_id"], r["sha256"], r["media_path"], Face.from_row(r), r["character_id"], split))
    by_char: dict[int, list[Example]] = {}
    for e in out:
        by_char.setdefault(int(e.rating), []).append(e)
    for examples in by_char.values():
        if all(e.split == "val" for e in examples):
            examples[0].split = "train"
    return out


def train_identity(store, paths, icfg, *, margin: float, max_pixels: int = 90_000_000,
                   epochs: int | None = None, promote: bool = True, progress: bool | None = None) -> IdentityOutcome:
    """Train on all named faces, compare with the active embedder, register, promote if not worse;
    a promoted embedder embeds the named faces at once (recognition uses it right away)."""
    from scorer.characters import embed_named, load_embedder, untrained

    started = time.monotonic()
    device = pick_device(icfg.device)
    examples = named_examples(store, icfg.val_share)
    cache = CropCache(paths.cache, icfg.image_size, margin)
    arrays, kept = cache.arrays(examples, paths.media, max_pixels=max_pixels, progress=progress)
    chars = sorted({int(e.rating) for e in kept if e.split == "train"})
    if len(chars) < 2:
        raise TrainError(f"{len(chars)} character(s) with named faces; training needs 2 or more "
                         "(python main.py characters import DIR)")
    index = {c: i for i, c in enumerate(chars)}
    tr = [i for i, e in enumerate(kept) if e.split == "train"]
    va = [i for i, e in enumerate(kept) if e.split == "val"]
    if len(va) < 2:
        raise TrainError(f"{len(va)} validation face(s): too few to validate; name more faces "
                         "or raise characters.val_share")
    y_tr = np.array([index[int(kept[i].rating)] for i in tr])
    y_va = np.array([index.get(int(kept[i].rating), -1) for i in va])
    torch.manual_seed(icfg.seed)
    net = build_embedder(icfg.arch, icfg.pretrained, icfg.embedding_dim)
    log.info("training the identity embedder %s (%dpx) on %s: %d faces of %d characters, validating on %d",
             icfg.arch, icfg.image_size, device, len(tr), len(chars), len(va))
    result = fit_identity(net, arrays[tr], y_tr, arrays[va], y_va, icfg, device, epochs=epochs, progress=progress)
    version = new_version(store.get_identity_model, icfg.arch, prefix="identity-")
    embedder = Embedder(result.net, arch=icfg.arch, version=version, image_size=icfg.image_size,
                        device=str(device), batch_size=icfg.batch_size)
    ids_tr = [int(kept[i].rating) for i in tr]
    ids_va = [int(kept[i].rating) for i in va]
    new = evaluate_embedder(embedder, arrays[tr], ids_tr, arrays[va], ids_va, k=icfg.k,
                            target_precision=icfg.threshold_precision)
    active = store.active_identity_model()
    baseline = None
    if active is not None and not untrained(active):
        try:
            old = load_embedder(active, icfg, paths.models)
            if old.image_size == icfg.image_size:
                baseline = evaluate_embedder(old, arrays[tr], ids_tr, arrays[va], ids_va, k=icfg.k,
                                             target_precision=icfg.threshold_precision)
        except ModelError as e:
            log.warning("cannot evaluate the active embedder %s (%s)", active["version"], e)
    wins = baseline is None or new["top1"] >= baseline["top1"]
    promoted = promote and wins
    if not promote:
        reason = "not promoted (--no-promote)"
    elif baseline is None:
        reason = "promoted: first trained identity embedder"
    elif wins:
        reason = f"promoted: validation top-1 {new['top1']} is not below {baseline['top1']} of {active['version']}"
    else:
        reason = f"kept, not used: validation top-1 {new['top1']} is below {baseline['top1']} of {active['version']}"
    seconds = time.monotonic() - started
    names = store.character_names()
    new["per_character"] = {names.get(c, str(c)): v for c, v in new["per_character"].items()}
    if baseline is not None:
        baseline.pop("per_character", None)
    record = {"val_top1": new["top1"], "val": new, "per_character": new["per_character"],
              "val_share": icfg.val_share, "baseline": baseline,
              "baseline_version": active["version"] if active else None, "history": result.history,
              "best_epoch": result.best_epoch, "image_size": icfg.image_size, "n_train": len(tr), "n_val": len(va),
              "characters": len(chars), "seconds": round(seconds, 1), "device": str(device)}
    path = paths.models / f"{version}.pt"
    save_embedder(result.net, path, arch=icfg.arch, image_size=icfg.image_size, version=version)
    store.register_identity_model(version, icfg.arch, path.name, data_size=len(kept), metrics=record,
                                  threshold=new["threshold"], activate=promoted, notes=reason)
    if promoted:
        embed_named(store, embedder, paths.media, margin=margin, max_pixels=max_pixels)
    log.info("identity model %s: %s", version, reason)
    return IdentityOutcome(version, promoted, record, new["threshold"], len(tr), len(va), len(chars), seconds,
                           reason, result.history)
