"""The model registry: which model file scores pictures now.

Models are files under ``<data>/models`` listed in the ``models`` table; exactly one is active.
Before any training, an untrained model (random or ImageNet-initialised backbone, per
``scorer.pretrained``) is created once, saved and registered, so every prediction names a real,
reproducible model version.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from scorer.model import ModelError, Scorer, build_model, save_model

log = logging.getLogger(__name__)


def initial_version(arch: str, pretrained: str, prefix: str = "") -> str:
    """The version name of an untrained network: ``resnet18-random-init``, ``…-imagenet-init``."""
    init = "random" if pretrained in ("", "none") else ("imagenet" if pretrained == "imagenet" else "file")
    return f"{prefix}{arch}-{init}-init"


def new_version(exists: Callable[[str], object], arch: str, prefix: str = "") -> str:
    """A fresh version name for a trained network (``resnet18-20261123-160400``, ``-2`` … when
    ``exists(name)`` says the name is taken)."""
    base = f"{prefix}{arch}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    version, n = base, 1
    while exists(version) is not None:
        n += 1
        version = f"{base}-{n}"
    return version


def ensure_active_model(store, scorer_cfg, models_dir: str | Path) -> dict:
    """The active model row, creating and registering the untrained one if there is none."""
    row = store.active_model()
    if row is not None:
        return row
    version = initial_version(scorer_cfg.arch, scorer_cfg.pretrained)
    models_dir = Path(models_dir)
    path = models_dir / f"{version}.pt"
    existing = store.get_model(version)
    if existing is None or not path.exists():
        torch.manual_seed(0)
        net = build_model(scorer_cfg.arch, scorer_cfg.pretrained)
        save_model(net, path, arch=scorer_cfg.arch, image_size=scorer_cfg.image_size, version=version)
    store.register_model(version, scorer_cfg.arch, path.name, activate=True,
                         notes="untrained: scores carry no taste until `main.py train` has run")
    log.warning("no trained model yet: scoring with an untrained %s (%s); import ratings and run "
                "`python main.py train` to learn your taste", scorer_cfg.arch, version)
    return store.active_model()


def untrained_scorer(scorer_cfg, *, margin: float) -> Scorer:
    """The untrained model :func:`ensure_active_model` would create, kept in memory: for a
    command that must write nothing (``score`` before any data folder exists). ``margin``: the
    crop margin (``detector.margin``), as for :func:`load_scorer`."""
    torch.manual_seed(0)
    net = build_model(scorer_cfg.arch, scorer_cfg.pretrained)
    return Scorer(net, arch=scorer_cfg.arch, version=initial_version(scorer_cfg.arch, scorer_cfg.pretrained),
                  image_size=scorer_cfg.image_size, device=scorer_cfg.device, batch_size=inference_batch(scorer_cfg),
                  tta=scorer_cfg.tta, backbone=configured_backbone(scorer_cfg), whole=scorer_cfg.whole, margin=margin)


_BACKBONES: dict[tuple, object] = {}


def configured_backbone(scorer_cfg):
    """The feature backbone ``scorer.backbone`` names (None for ``none``), loaded once per process
    (every model version shares it)."""
    from scorer.backbones import load_backbone

    spec = scorer_cfg.backbone
    if spec in ("", "none"):
        return None
    key = (spec, scorer_cfg.backbone_weights, scorer_cfg.backbone_output, scorer_cfg.backbone_preprocess,
           scorer_cfg.backbone_size, scorer_cfg.device, scorer_cfg.batch_size)
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(spec, weights=scorer_cfg.backbone_weights, output=scorer_cfg.backbone_output,
                                        onnx_preprocess=scorer_cfg.backbone_preprocess,
                                        image_size=scorer_cfg.backbone_size or None, device=scorer_cfg.device,
                                        batch_size=inference_batch(scorer_cfg))
    return _BACKBONES[key]


CPU_INFERENCE_BATCH = 8   # crops per forward pass on a CPU


def inference_batch(scorer_cfg) -> int:
    """Crops per forward pass when scoring: ``scorer.batch_size`` on a GPU; on a CPU at most
    :data:`CPU_INFERENCE_BATCH`, because larger batches are no faster there and hold about
    2 MiB of activations per crop more (32 crops: +250 MiB at the daemon's peak, measured in
    bench/RESULTS.md)."""
    from scorer.model import pick_device

    size = scorer_cfg.batch_size
    return size if pick_device(scorer_cfg.device).type != "cpu" else min(size, CPU_INFERENCE_BATCH)


def load_scorer(row: dict, scorer_cfg, models_dir: str | Path, *, margin: float) -> Scorer:
    """The model of registry row ``row``, with the configured feature backbone; ``margin``: the
    crop margin (``detector.margin``) its crops are cut with, which names the cached crop
    features it reads and writes (``scorer/features.py`` ``crop_source``)."""
    path = Path(models_dir) / row["path"]
    if not path.exists():
        raise ModelError(f"model file {path} of version {row['version']} is missing")
    return Scorer.load(path, device=scorer_cfg.device, batch_size=inference_batch(scorer_cfg), tta=scorer_cfg.tta,
                       backbone=configured_backbone(scorer_cfg), whole=scorer_cfg.whole, margin=margin)


def use_model(store, scorer_cfg, models_dir: str | Path, version: str, *, margin: float) -> dict:
    """Make ``version`` the active model (rollback), after checking that its file loads (at crop
    margin ``margin``, ``detector.margin``, as the daemon will load it: a head fitted at that
    margin is its own, not one fitted on crops this configuration does not cut)."""
    row = store.get_model(version)
    if row is None:
        known = ", ".join(r["version"] for r in store.list_models()) or "none"
        raise ModelError(f"no model {version!r} (known: {known})")
    load_scorer(row, scorer_cfg, models_dir, margin=margin)     # only that it loads
    store.activate_model(version)
    log.info("active model is now %s", version)
    return store.get_model(version)
