"""The HyADS estimator: composes backbone -> patch embedding -> PatchCore bank -> maps -> threshold.

scikit-learn-like contract: hyper-parameters in the config, `fit(normal_images)` returns self, learned state
in attributes ending in `_`. Higher scores mean more anomalous (the PyOD convention).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from . import __version__
from .config import HyADSConfig
from .data.io import load_image, resize_rgb
from .detectors.patchcore import MemoryBank
from .errors import HyADSError, NotFittedError
from .features.backbones import build_backbone
from .features.patches import PatchEmbedder
from .thresholds import Calibration, calibrate

ImageLike = Union[str, Path, np.ndarray]


def _to_rgb(img: ImageLike, size: int) -> np.ndarray:
    if isinstance(img, (str, Path)):
        return load_image(img, size)
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise HyADSError(f"image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    else:
        arr = arr.astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise HyADSError("float image arrays must lie in [0, 1]")
    return resize_rgb(arr, size)


class HyADS:
    """Anomaly detector learned from normal images only.

    >>> model = HyADS(sampler="reservoir").fit(["good1.png", "good2.png", ...])
    >>> model.decision_function(["part.png"])   # normalised score, 0.5 = threshold
    """

    def __init__(self, config: HyADSConfig | None = None, **overrides: Any):
        cfg = (config or HyADSConfig()).to_dict()
        cfg.update(overrides)
        self.config = HyADSConfig.from_dict(cfg)
        self.progress = True
        self.runtime: Any = None  # None = eager torch; else an ONNX Runtime feature extractor (use_runtime)

    # -- building blocks -----------------------------------------------------------------------------
    def _build_features(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        self.backbone_ = build_backbone(c.backbone, c.weights)
        self.embedder_ = PatchEmbedder(
            self.backbone_.tap_channels, c.patch_neighbourhood, c.projection_dim, seed=c.seed
        ).eval()

    def _require_fitted(self) -> None:
        if getattr(self, "bank_", None) is None or self.bank_.bank_ is None:
            raise NotFittedError("this HyADS model is not fitted yet: call fit() or load a model file")

    def _batches(self, images: Sequence[ImageLike], desc: str) -> Iterator[np.ndarray]:
        bs = self.config.batch_size
        show = self.progress and len(images) > bs
        for s in tqdm(range(0, len(images), bs), desc=desc, unit="batch", disable=not show, leave=False):
            yield np.stack([_to_rgb(im, self.config.image_size) for im in images[s : s + bs]])

    def use_runtime(self, runtime: str = "torch", onnx_dir: str | Path | None = None,
                    threads: int | None = None) -> "HyADS":
        """Run the feature extractor with eager torch (default), or an ONNX export: "onnx" or "onnx-int8"."""
        if runtime == "torch":
            self.runtime = None
        elif runtime in ("onnx", "onnx-int8"):
            from .export.onnx import OnnxFeatures

            if onnx_dir is None:
                raise HyADSError(f"runtime {runtime} needs the folder written by `hyads export`")
            self.runtime = OnnxFeatures(self, onnx_dir, int8=runtime == "onnx-int8", threads=threads)
        else:
            raise HyADSError(f"unknown runtime {runtime!r}: use torch, onnx or onnx-int8")
        return self

    def _patches(self, rgb: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) float RGB -> (B, h, w, D) patch features."""
        if self.runtime is not None:
            return self.runtime(rgb)
        return self._patches_torch(rgb)

    @torch.inference_mode()
    def _patches_torch(self, rgb: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous()
        feats = self.embedder_(self.backbone_.features(x))
        return feats.permute(0, 2, 3, 1).contiguous().numpy()

    def _maps_from_patches(self, patches: np.ndarray) -> np.ndarray:
        b, h, w, d = patches.shape
        return self._upsample_smooth(self.bank_.distances(patches.reshape(-1, d)).reshape(b, 1, h, w))

    def _upsample_smooth(self, dist: np.ndarray) -> np.ndarray:
        """(B, 1, h, w) patch distances -> (B, S, S) maps: bilinear upsampling then Gaussian smoothing."""
        size = self.config.image_size
        up = F.interpolate(torch.from_numpy(dist.astype(np.float32)), size=(size, size), mode="bilinear",
                           align_corners=False)[:, 0].numpy()
        sigma = self.config.smoothing_sigma
        if sigma > 0:
            up = np.stack([ndimage.gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0) for m in up])
        return up

    # -- fitting -------------------------------------------------------------------------------------
    def fit(
        self,
        images: Sequence[ImageLike],
        val_images: Sequence[ImageLike] | None = None,
        val_labels: Sequence[int] | None = None,
    ) -> "HyADS":
        """Learn normal appearance from `images` (all defect-free).

        The threshold is calibrated on `val_images` when given (F1-max if `val_labels` contain defects),
        otherwise on a seeded held-out fraction of `images` that is not put in the bank.
        """
        c = self.config
        images = list(images)
        if not images:
            raise HyADSError("fit() needs at least one normal image")
        t0 = time.perf_counter()
        rng = np.random.default_rng(c.seed)
        if val_images is None and len(images) >= 2 and c.validation_fraction > 0:
            n_val = max(1, int(round(c.validation_fraction * len(images))))
            order = rng.permutation(len(images))
            val_images = [images[i] for i in sorted(order[:n_val])]
            val_labels = [0] * n_val
            train = [images[i] for i in sorted(order[n_val:])]
        else:
            train = images
        self._build_features()
        g = c.image_size // self.backbone_.tap_strides[0]
        self.bank_ = _new_bank(c)
        self.bank_.start(len(train) * g * g, self.embedder_.out_dim)
        for rgb in self._batches(train, "features"):
            p = self._patches(rgb)
            self.bank_.partial_fit(p.reshape(-1, p.shape[-1]))
        t_feat = time.perf_counter()
        self.bank_.finish()
        t_bank = time.perf_counter()

        if val_images:
            scores = self.score_samples(val_images)
            labels = np.asarray(val_labels if val_labels is not None else [0] * len(scores))
            if labels.shape != scores.shape or not (labels == 0).any():
                raise HyADSError("validation labels must give one 0/1 label per image, with at least one normal (0)")
            self.calibration_ = calibrate(scores[labels == 0], c.normal_quantile, scores[labels == 1])
            self.normal_scores_ = scores[labels == 0]
        else:
            # A single training image: nothing held out, so calibrate on its own (optimistic) score.
            scores = self.score_samples(train)
            self.calibration_ = calibrate(scores, c.normal_quantile)
            self.calibration_.method += " (training images: no held-out normals, threshold is optimistic)"
            self.normal_scores_ = scores
        t_end = time.perf_counter()
        self.fit_info_ = {
            "hyads_version": __version__,
            "fitted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "n_train_images": len(train),
            "n_validation_images": len(val_images or []),
            "bank_size": int(len(self.bank_.bank_)),
            "patches_seen": int(self.bank_.n_seen_),
            "seconds_features": round(t_feat - t0, 3),
            "seconds_sampling": round(t_bank - t_feat, 3),
            "seconds_calibration": round(t_end - t_bank, 3),
        }
        return self

    def add_normal(self, images: Sequence[ImageLike]) -> "HyADS":
        """Add confirmed-normal images to the bank without refitting, then re-calibrate the threshold.

        Each new image is scored against the bank *before* its own patches go in, so its score is a fair
        held-out normal score; these join the stored normal scores and the threshold is recomputed from all.
        """
        self._require_fitted()
        images = list(images)
        new_scores = []
        for rgb in self._batches(images, "update"):
            p = self._patches(rgb)
            new_scores.append(self._maps_from_patches(p).reshape(len(p), -1).max(1))
            self.bank_.add(p.reshape(-1, p.shape[-1]))
        if new_scores:
            self.normal_scores_ = np.concatenate([self.normal_scores_, *new_scores])
            method = self.calibration_.method
            if not method.startswith("validation F1"):
                self.calibration_ = calibrate(self.normal_scores_, self.config.normal_quantile)
        self.fit_info_["bank_size"] = int(len(self.bank_.bank_))
        self.fit_info_["patches_seen"] = int(self.bank_.n_seen_)
        self.fit_info_["n_added_images"] = self.fit_info_.get("n_added_images", 0) + len(images)
        return self

    # -- inference -----------------------------------------------------------------------------------
    def anomaly_map(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Per-pixel anomaly maps (N, S, S) at the model resolution, in raw distance units."""
        self._require_fitted()
        maps = [self._maps_from_patches(self._patches(rgb)) for rgb in self._batches(list(images), "predict")]
        size = self.config.image_size
        return np.concatenate(maps) if maps else np.zeros((0, size, size), np.float32)

    def score_samples(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Raw image anomaly scores (maximum of the smoothed map); higher is more anomalous."""
        return self.anomaly_map(images).reshape(len(images), -1).max(1) if len(images) else np.zeros(0)

    @property
    def threshold_(self) -> float:
        self._require_fitted()
        return self.calibration_.threshold

    def normalise(self, raw: np.ndarray | float) -> np.ndarray:
        """Map raw scores or maps to [0, 1] with the stored threshold at 0.5."""
        return self.calibration_.normalise(raw)

    def decision_function(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Normalised image scores in [0, 1]; >= 0.5 means defective."""
        return self.normalise(self.score_samples(images))

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """1 for defective, 0 for normal, at the stored threshold."""
        return (self.score_samples(images) >= self.threshold_).astype(np.int64)

    def predict_mask(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Binary defect masks (N, S, S): pixels whose map value reaches the image threshold.

        Because the image score is the map maximum, an image is predicted defective exactly when its mask
        is non-empty.
        """
        return self.anomaly_map(images) >= self.threshold_

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from .persist import save_model

        return save_model(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "HyADS":
        from .persist import load_model

        return load_model(path)


def _new_bank(c: HyADSConfig) -> MemoryBank:
    return MemoryBank(c.sampler, c.ratio, c.coreset_projection_dim, c.index, c.ivf_nlist, c.ivf_nprobe, c.seed,
                      c.ivf_min_bank, c.bank_float16)


def _restore(config: HyADSConfig, bank_tensors: dict[str, np.ndarray], state: dict[str, Any]) -> HyADS:
    """Rebuild a fitted model from persisted state (used by persist.load_model)."""
    model = HyADS(config)
    model._build_features()
    model.bank_ = _new_bank(config)
    model.bank_.set_state({"bank": bank_tensors["bank"]}, state["bank"])
    if model.bank_.bank_.shape[1] != model.embedder_.out_dim:
        raise HyADSError(
            f"bank has {model.bank_.bank_.shape[1]} features per patch but the config gives {model.embedder_.out_dim}"
        )
    cal = state["calibration"]
    model.calibration_ = Calibration(float(cal["threshold"]), float(cal["scale"]), str(cal["method"]))
    model.normal_scores_ = np.asarray(bank_tensors["normal_scores"], dtype=np.float64)
    model.fit_info_ = dict(state["fit_info"])
    return model
