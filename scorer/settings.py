"""The settings of the taste model: the ``[scorer]`` table (the model that scores crops) and the
``[train]`` table (how it learns from labels).

They live here rather than in ``scorer/model.py`` and ``scorer/train.py`` because those import
torch, and reading the configuration must stay quick. Each ``check()`` returns the first bad key
and what was expected, or None; the configuration loader turns that into its one-line error.
The other scorer tables live beside their code: ``DetectorConfig`` in ``scorer/detect.py``,
``RankingConfig`` in ``scorer/ranking.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ScorerConfig:
    arch: Literal["resnet18", "resnet34", "resnet50", "alexnet"] = "resnet18"
    pretrained: str = "none"              # none | imagenet | path to a torchvision weights file
    device: str = "auto"                  # auto | cpu | cuda | cuda:N | mps
    batch_size: int = 32
    image_size: int = 64                  # crops are resized to this square (training and untrained model)
    aggregate: Literal["max", "mean"] = "max"
    tta: bool = True                      # also score the mirrored crop; spread = uncertainty
    # The frozen feature backbone the taste head is fitted on (scorer/backbones.py):
    backbone: str = "efficientnet_lite0"  # efficientnet_lite0 | a torchvision model name | path to an .onnx file
    backbone_weights: str = "imagenet"    # imagenet | none | path to a weights file (not for ONNX)
    backbone_output: str = "penultimate"  # penultimate | output (ONNX: its first output) | an ONNX tensor name
    backbone_preprocess: Literal["imagenet", "clip", "wd14"] = "imagenet"  # ONNX input preprocessing
    backbone_size: int = 0                # square input size; 0 = the backbone's own (160 Lite0, 224, or the ONNX input's)
    whole: bool = True                    # also the whole picture's backbone features (hair, clothes, background)
    threads: int = 0                      # torch threads per process; 0 = automatic (scorer/threads.py)

    def check(self):
        for key in ("batch_size", "image_size"):
            value = getattr(self, key)
            if value <= 0:
                return key, f"expected a positive number, got {value!r}"
        for key in ("backbone", "backbone_weights", "backbone_output"):
            setattr(self, key, getattr(self, key).strip())
            if not getattr(self, key):
                return key, "expected a non-empty string"
        if self.threads < 0:
            return "threads", f"expected 0 (automatic) or a positive number of threads, got {self.threads!r}"
        if self.backbone_size < 0 or 0 < self.backbone_size < 32:
            return "backbone_size", f"expected 0 (the backbone's own) or at least 32, got {self.backbone_size!r}"
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            return "device", f"expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}"
        return None


@dataclass
class TrainConfig:
    min_labels: int = 50                  # fewer labels: no training; the ranking uses popularity
    val_share: float = 0.15               # share of pictures (fixed by their hash) held out to validate
    faces: Literal["all", "largest"] = "all"  # which faces of a multi-face picture its label trains
    epochs: int = 12                      # the network (train --full): test Pearson 0.75 against 0.76 with 40, at 0.3x the CPU
    batch_size: int = 32
    lr: float = 0.002                     # peak learning rate (one-cycle schedule)
    weight_decay: float = 0.05            # AdamW
    mixup: float = 0.4                    # MixUp Beta(alpha, alpha) for inputs and targets; 0 = off
    rotation: float = 10.0                # degrees of random rotation
    color_jitter: float = 0.05            # brightness/contrast jitter; saturation and hue are kept
    freeze_epochs: int = 2                # with a pretrained/warm-started backbone: epochs before unfreezing
    warm_start: bool = True               # start from the active trained model (same arch and size)
    patience: int = 10                    # early stopping: epochs without validation improvement
    ema: float = 0.99                     # exponential moving average of weights; 0 = off
    promote_margin: float = 0.0           # the new model must beat the active one's Pearson by more
    schedule: str = ""                    # daemon: cron "min hour day month weekday"; "" = off
    after_new_labels: int = 0             # daemon: also retrain after this many new labels; 0 = off
    identity: bool = True                 # the taste head also uses the identity embedding when an embedder exists
    refit: bool = True                    # daemon: refit the taste head after new labels (seconds, in-process)
    refit_after: int = 5                  # ... once this many new labels or comparisons arrived
    refit_delay: float = 30.0             # ... or this many seconds after the newest one
    refit_tolerance: float = 0.01         # a refitted head is used unless its validation Pearson is lower by more
    seed: int = 0

    def check(self):
        for key in ("epochs", "batch_size", "lr", "patience", "refit_after"):
            value = getattr(self, key)
            if value <= 0:
                return key, f"expected a positive number, got {value!r}"
        for key in ("min_labels", "weight_decay", "mixup", "rotation", "color_jitter", "freeze_epochs",
                    "promote_margin", "after_new_labels", "refit_delay", "refit_tolerance"):
            value = getattr(self, key)
            if value < 0:
                return key, f"expected 0 or more, got {value!r}"
        if not 0 < self.val_share <= 0.5:
            return "val_share", f"expected a number above 0 and at most 0.5, got {self.val_share!r}"
        if not 0 <= self.ema <= 0.9999:
            return "ema", f"expected a number from 0 to 0.9999, got {self.ema!r}"
        return None


@dataclass
class IdentityConfig:
    """The ``[characters]`` table: the identity embedder (who is in a face) and recognition."""
    arch: Literal["resnet18", "resnet34", "resnet50", "alexnet"] = "resnet18"
    pretrained: str = "none"              # none | imagenet | path to a torchvision weights file
    device: str = "auto"                  # auto | cpu | cuda | cuda:N | mps
    image_size: int = 64                  # face crops are resized to this square
    embedding_dim: int = 128              # length of the L2-normalised identity embedding
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.002                     # peak learning rate (one-cycle, AdamW)
    margin: float = 0.4                   # ArcFace additive angular margin m (radians)
    scale: float = 30.0                   # ArcFace logit scale s
    mixup: float = 0.0                    # MixUp Beta(alpha, alpha) of crops and their two targets; 0 = off
    rotation: float = 15.0                # augmentation: degrees of random rotation (plus flips, shifts)
    color_jitter: float = 0.2             # brightness/contrast jitter
    blur: float = 0.3                     # share of crops blurred (Gaussian) during training
    val_share: float = 0.15               # share of named faces held out to validate and calibrate
    patience: int = 8                     # early stopping: epochs without better validation accuracy
    k: int = 5                            # k-nearest-neighbour votes over enrolled examples
    threshold_precision: float = 0.9      # the unknown threshold is calibrated to this precision
    seed: int = 0
    follow: list[str] = field(default_factory=list)  # characters whose pictures are boosted in posting
    follow_boost: float = 0.5             # added to a followed picture's predicted score (1-5) when ranking
    block: list[str] = field(default_factory=list)   # a picture with any of these characters is never posted

    def check(self):
        for key in ("image_size", "embedding_dim", "epochs", "batch_size", "lr", "scale", "patience", "k"):
            value = getattr(self, key)
            if value <= 0:
                return key, f"expected a positive number, got {value!r}"
        for key in ("margin", "mixup", "rotation", "color_jitter"):
            value = getattr(self, key)
            if value < 0:
                return key, f"expected 0 or more, got {value!r}"
        if not 0 <= self.blur <= 1:
            return "blur", f"expected a number from 0 to 1, got {self.blur!r}"
        if not 0 < self.val_share <= 0.5:
            return "val_share", f"expected a number above 0 and at most 0.5, got {self.val_share!r}"
        if not 0 < self.threshold_precision <= 1:
            return "threshold_precision", f"expected a number above 0 and at most 1, got {self.threshold_precision!r}"
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            return "device", f"expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}"
        if self.follow_boost < 0:
            return "follow_boost", f"expected 0 or more, got {self.follow_boost!r}"
        from storage.characters import CharacterNameError, check_name, name_key

        for key in ("follow", "block"):
            try:
                setattr(self, key, [check_name(name) for name in getattr(self, key)])
            except CharacterNameError as e:
                return key, str(e)
        both = {name_key(n) for n in self.follow} & {name_key(n) for n in self.block}
        if both:
            return "block", f"{sorted(both)[0]!r} is both followed and blocked"
        return None
