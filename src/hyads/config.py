"""Every hyper-parameter in one dataclass, saved as JSON with every model so a fit can be reproduced."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import HyADSError

BACKBONES = ("efficientnet_lite0", "resnet18")
SAMPLERS = ("reservoir", "coreset")
DETECTORS = ("texture", "ae", "patchcore")
INDEXES = ("auto", "flat", "ivf", "ivfpq")
SEG_LOSSES = ("ce_dice", "lovasz")


# Values of fields added after models were first saved that reproduce the earlier behaviour; a model file
# without the field loads with these (HyADSConfig.from_dict), whatever the field's default is now.
LEGACY: dict[str, Any] = {"coreset_keep": 1.0, "knn_rerank": 0.0, "knn_rerank_nprobe": 8, "seg_refine_width": 24,
                          "seg_refine_features": 0, "seg_refine_lr": 0.0}

# The bank and search settings the defaults were before 2026-12-05 (exact-er, ~3x slower kNN stage): what
# `hyads segment` keeps, because every NEU-Seg figure in RESULTS.md was measured with them (and its input
# cache is keyed on them), and what `hyads fit --accurate` selects.
ACCURATE_BANK: dict[str, Any] = {"coreset_keep": 1.0, "ivf_min_bank": 10_000, "ivf_nprobe": 4, "knn_dim": 0,
                                 "knn_rerank": 0.0, "smooth_at_grid": False}


@dataclass
class HyADSConfig:
    """Hyper-parameters of a HyADS model.

    Defaults are the ones measured in docs/RESULTS.md (MVTec AD bottle, 256x256).
    """

    image_size: int = 256
    backbone: str = "efficientnet_lite0"
    # Optional weight file: required for resnet18 (torchvision state_dict), optional override otherwise.
    weights: str | None = None
    # Patch features: neighbourhood size for local averaging, optional random projection (0 = off).
    patch_neighbourhood: int = 3
    projection_dim: int = 0
    # Memory bank.
    sampler: str = "reservoir"
    ratio: float = 0.1
    # Reservoir sampler: search a greedy coreset of this fraction of the reservoir (1 = the whole reservoir).
    # 0.25: bottle accuracy unchanged, a 4x smaller bank to search (RESULTS.md, "New defaults").
    coreset_keep: float = 0.25
    coreset_projection_dim: int = 64  # 64 vs 128: half the selection time, same bottle AUROC (RESULTS.md)
    # "auto": exact search below ivf_min_bank rows, IVF-Flat above (measured: same AUROC on bottle, ~9x faster;
    # exact search of a 2,140-row bank was slower than IVF, hence the low threshold).
    index: str = "auto"
    ivf_min_bank: int = 2_000
    ivf_nlist: int = 0  # 0 = 2 * sqrt(bank rows)
    ivf_nprobe: int = 1
    # Store the bank as float16 (in the model file and inside faiss): half the memory.
    bank_float16: bool = False
    # Search in the bank's top-k principal components (0 = full dimension): a cheaper kNN stage.
    knn_dim: int = 64
    # IVF: search each image's top fraction of patches (largest distance) again with a wider probe, so misses
    # of the narrow probe cannot make a normal image look defective.
    knn_rerank: float = 0.05
    knn_rerank_nprobe: int = 8  # IVF cells probed in that second pass
    # Which detectors make maps (fused by grid-searched weights when more than one).
    detectors: list[str] = field(default_factory=lambda: ["patchcore"])
    # U-Net autoencoder.
    ae_epochs: int = 30
    ae_lr: float = 1e-3
    ae_crop: int = 128
    ae_noise: float = 0.1
    ae_skips: list[int] = field(default_factory=lambda: [2])
    ae_patience: int = 5
    # Each epoch trains on a random subset of at most this many images (bounds CPU time on big sets).
    ae_max_images: int = 200
    # Fusion grid step on the weight simplex.
    fusion_step: float = 0.1
    # Anomaly map post-processing.
    smoothing_sigma: float = 4.0
    # Smooth on the patch grid, then upsample (much cheaper; see docs/RESULTS.md for the accuracy check).
    smooth_at_grid: bool = True
    # Threshold calibration on held-out normal images (when no defects are available).
    validation_fraction: float = 0.1
    normal_quantile: float = 0.99
    # Segmentation head (only trained by fit_segmentation, i.e. when pixel labels exist). seg_classes names
    # the defect classes (one name = binary mask); seg_features also feeds the backbone patch features.
    seg_classes: list[str] = field(default_factory=list)
    seg_features: bool = True
    # Also feed the backbone's stride-4 map (EfficientNet-Lite0 block 2, 24 ch) to the head's fine branch:
    # thin defects (NEU inclusions, scratches) are 1-3 cells wide on the stride-8 grid.
    seg_fine_features: bool = False
    seg_epochs: int = 20
    seg_lr: float = 1e-3
    seg_width: int = 64
    seg_depth: int = 3  # Conv3x3-BN-ReLU layers in the head body
    # Dilated head body (dilations 1, 2, 4, ... per layer): a wider receptive field at the same cost.
    seg_dilated: bool = False
    # Dilated context layers on the stride-8 grid branch of the head (0 = none).
    seg_context: int = 0
    # Train the head under bfloat16 autocast (about 2x faster where the CPU has native bf16; see SegHeadTrainer).
    seg_bf16: bool = False
    # Fine-tune a copy of the backbone layers between the stride-4 tap and the last patch tap inside the head
    # (fed by the cached stride-4 map; needs seg_features and seg_fine_features). The copy used by PatchCore
    # stays frozen. seg_tune_lr is its learning rate (the head uses seg_lr).
    seg_tune: bool = False
    seg_tune_lr: float = 1e-4
    # Test-time augmentation: average the head's probabilities over the 4 flips of the image (4x the cost).
    seg_tta: bool = False
    seg_patience: int = 5
    # Flip augmentation of the head from the head inputs of flipped *images* (computed once, 4x the input
    # cost and memory) instead of flipping the cached inputs: CNN features are not flip-equivariant (oriented
    # filters; stride-2 'SAME' padding puts each map half a cell off-centre), so flipped cached features are
    # inputs no real image produces, misaligned with the flipped mask.
    seg_flip_views: bool = False
    # Head loss: "ce_dice" (cross-entropy + soft Dice) or "lovasz" (cross-entropy + Lovasz-softmax per class
    # and for defect-vs-background: surrogates of the mean and binary IoU themselves, for a fine-tuning stage).
    seg_loss: str = "ce_dice"
    # A small learned refinement of the head's stride-4 logits at stride 2 from the full-resolution grey image
    # (segmentation.Refiner): most head errors are within 2 px of a mask boundary.
    seg_refine: bool = False
    # The refiner's width, how many channels of the head body's features it also sees (0 = logits + image
    # only), and its learning rate (0 = seg_lr).
    seg_refine_width: int = 24
    seg_refine_features: int = 0
    seg_refine_lr: float = 0.0
    # Cross-fitting: each half of the labelled images gets its detector maps from detectors fitted on the
    # other half, so the head never trains on maps of images whose own patches are in the bank.
    seg_crossfit: bool = True
    batch_size: int = 8
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> HyADSError:
            return HyADSError(f"config field '{name}': {why}")

        if self.backbone not in BACKBONES:
            raise bad("backbone", f"{self.backbone!r} is not one of {', '.join(BACKBONES)}")
        if not self.detectors or any(d not in DETECTORS for d in self.detectors):
            raise bad("detectors", f"{self.detectors!r}: choose a non-empty subset of {', '.join(DETECTORS)}")
        if len(set(self.detectors)) != len(self.detectors):
            raise bad("detectors", "listed twice")
        if any(k not in (1, 2) for k in self.ae_skips):
            raise bad("ae_skips", "only skip levels 1 (finest) and 2 exist")
        if self.sampler not in SAMPLERS:
            raise bad("sampler", f"{self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.index not in INDEXES:
            raise bad("index", f"{self.index!r} is not one of {', '.join(INDEXES)}")
        if not isinstance(self.image_size, int) or self.image_size < 64 or self.image_size % 32:
            # Fixed TF-"SAME" padding in the backbone is only right for sizes divisible by 32.
            raise bad("image_size", f"{self.image_size} must be a multiple of 32 and at least 64")
        if not 0.0 < self.ratio <= 1.0:
            raise bad("ratio", f"{self.ratio} must be in (0, 1]")
        if not 0.0 < self.coreset_keep <= 1.0:
            raise bad("coreset_keep", f"{self.coreset_keep} must be in (0, 1]")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise bad("validation_fraction", f"{self.validation_fraction} must be in [0, 1)")
        if not 0.0 < self.normal_quantile <= 1.0:
            raise bad("normal_quantile", f"{self.normal_quantile} must be in (0, 1]")
        if self.patch_neighbourhood < 1 or self.patch_neighbourhood % 2 == 0:
            raise bad("patch_neighbourhood", "must be an odd positive integer")
        if self.projection_dim < 0:
            raise bad("projection_dim", "must be >= 0")
        if self.seg_depth < 1:
            raise bad("seg_depth", "must be >= 1")
        if self.seg_context < 0:
            raise bad("seg_context", "must be >= 0")
        if self.seg_loss not in SEG_LOSSES:
            raise bad("seg_loss", f"must be one of {', '.join(SEG_LOSSES)}")
        if self.seg_patience < 1:
            raise bad("seg_patience", "must be >= 1")
        if self.seg_refine_width < 1:
            raise bad("seg_refine_width", "must be >= 1")
        for name in ("seg_refine_features", "seg_refine_lr"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.seg_lr <= 0 or self.seg_tune_lr <= 0:
            raise bad("seg_lr" if self.seg_lr <= 0 else "seg_tune_lr", "must be > 0")
        if self.seg_tune and not (self.seg_features and self.seg_fine_features):
            raise bad("seg_tune", "needs seg_features and seg_fine_features (the tuned layers start from the "
                      "stride-4 map and replace the frozen patch features)")
        if not 0.0 <= self.knn_rerank <= 1.0:
            raise bad("knn_rerank", f"{self.knn_rerank} must be in [0, 1]")
        if self.knn_rerank_nprobe < 1:
            raise bad("knn_rerank_nprobe", "must be >= 1")
        if self.knn_dim < 0:
            raise bad("knn_dim", "must be >= 0")
        if self.ivf_nlist < 0 or self.ivf_nprobe < 1:
            raise bad("ivf_nlist" if self.ivf_nlist < 0 else "ivf_nprobe", "ivf_nlist must be >= 0, ivf_nprobe >= 1")
        if self.batch_size < 1:
            raise bad("batch_size", "must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HyADSConfig":
        """A config read back from a model file. A field the file lacks (written before the field existed)
        takes the value that reproduces the behaviour of that time (LEGACY), not today's default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HyADSError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**{**{k: v for k, v in LEGACY.items() if k not in data}, **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HyADSConfig":
        return cls.from_dict(json.loads(text))
