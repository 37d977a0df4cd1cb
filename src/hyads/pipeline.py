"""The HyADS estimator: composes backbone -> patch embedding -> PatchCore bank -> maps -> threshold.

scikit-learn-like contract: hyper-parameters in the config, `fit(normal_images)` returns self, learned state
in attributes ending in `_`. Higher scores mean more anomalous (the PyOD convention).
"""

from __future__ import annotations

import copy
import datetime as _dt
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from . import __version__
from .config import HyADSConfig
from .data.io import load_image, load_label_mask, load_mask, resize_labels, resize_rgb
from .detectors.autoencoder import AETrainer, UNetAE, error_map
from .detectors.patchcore import MemoryBank, NearestNeighbourIndex, Reservoir
from .features import texture as tex
from .fusion import fuse, map_stats, search_weights
from .errors import HyADSError, NotFittedError
from .features.backbones import BackboneTail, build_backbone
from .features.patches import PatchEmbedder
from .kernels import upsample_bilinear
from .segmentation import FLIPS, FlipView, pack_views, unpack_views
from .thresholds import Calibration, calibrate
from .utils import thread_map

if TYPE_CHECKING:
    from .segmentation import SegHead

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
        arr = arr.astype(np.float32) / np.float32(255.0)  # float32 divisor, as data/io.py
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / np.float32(65535.0)
    else:
        arr = arr.astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise HyADSError("float image arrays must lie in [0, 1]")
    return resize_rgb(arr, size)


def rgb_batch(images: Sequence[ImageLike], size: int) -> np.ndarray:
    """Decode (B, size, size, 3) float RGB in parallel threads: PIL's decoders release the GIL, and decoding
    was the largest stage after the backbone with an INT8 extractor (docs/RESULTS.md)."""
    return np.stack(thread_map(lambda im: _to_rgb(im, size), images))


def _to_mask(m: Any, size: int) -> np.ndarray:
    """A defect mask (array or file; non-zero = defect) as bool (size, size)."""
    if isinstance(m, (str, Path)):
        return load_mask(m, size=size)
    arr = np.asarray(m)
    if arr.ndim != 2:
        raise HyADSError(f"a mask must be a 2-D array, got shape {arr.shape}")
    return resize_labels((arr > 0).astype(np.uint8), size) > 0


def _to_labels(m: Any, size: int) -> np.ndarray:
    """A class-index mask (array or file) as uint8 (size, size)."""
    if isinstance(m, (str, Path)):
        return load_label_mask(m, size)
    arr = np.asarray(m)
    if arr.ndim != 2:
        raise HyADSError(f"a mask must be a 2-D array, got shape {arr.shape}")
    return resize_labels(arr, size)


def _cell_masks(masks: np.ndarray, g: int, dilate: int) -> np.ndarray:
    """(N, S, S) pixel masks -> (N, g, g) cells that contain a defect pixel or lie within `dilate` cells of one
    (a patch feature sees its neighbours, so patches next to a defect are not clean either)."""
    n, s, _ = masks.shape
    cells = masks.reshape(n, g, s // g, g, s // g).any(axis=(2, 4))
    if dilate > 0:
        cells = ndimage.binary_dilation(cells, np.ones((1, 2 * dilate + 1, 2 * dilate + 1), bool))
    return cells


def _calibrate_pixels(maps: np.ndarray, masks: np.ndarray, seed: int,
                      n: int = 200_000) -> tuple[Calibration, np.ndarray]:
    """Threshold = pixel F1-max between (subsampled) normal and defect pixels, for validation sets in which
    every image has a defect."""
    rng = np.random.default_rng(seed)
    normal, defect = maps[~masks], maps[masks]
    normal = normal[rng.choice(normal.size, min(n, normal.size), replace=False)]
    defect = defect[rng.choice(defect.size, min(n, defect.size), replace=False)]
    cal = calibrate(normal, 0.99, defect)
    cal.method = "validation pixel F1-max (no defect-free validation image)"
    return cal, normal.astype(np.float64)


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
        self.onnx_parts: dict[str, Any] = {}  # ONNX Runtime AE / seg head / fine branch (use_runtime)

    # -- building blocks -----------------------------------------------------------------------------
    def _build_features(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        self.backbone_ = build_backbone(c.backbone, c.weights)
        self.embedder_ = PatchEmbedder(
            self.backbone_.tap_channels, c.patch_neighbourhood, c.projection_dim, seed=c.seed
        ).eval()

    def _require_fitted(self) -> None:
        if getattr(self, "weights_", None) is None:
            raise NotFittedError("this HyADS model is not fitted yet: call fit() or load a model file")

    @property
    def detectors(self) -> list[str]:
        return list(self.config.detectors)

    def _batches(self, images: Sequence[ImageLike], desc: str, flip: tuple[int, ...] = ()) -> Iterator[np.ndarray]:
        """RGB batches (B, S, S, 3); `flip`: image axes to flip (1 = vertical, 2 = horizontal).

        The next batch is decoded in a background thread while the caller works on this one: decoding is
        single-threaded per image (PIL releases the GIL), so at batch 1 it overlaps with the backbone
        instead of adding to it (INT8 at batch 1: 166 img/s with one call per image, 197 over a
        stream of 32 images, docs/RESULTS.md)."""
        bs, size = self.config.batch_size, self.config.image_size
        starts = range(0, len(images), bs)

        def load(s: int) -> np.ndarray:
            rgb = rgb_batch(images[s : s + bs], size)
            return np.ascontiguousarray(np.flip(rgb, flip)) if flip else rgb

        if len(starts) <= 1:  # nothing to overlap with: no thread
            yield from (load(s) for s in starts)
            return
        bar = tqdm(total=len(starts), desc=desc, unit="batch", disable=not self.progress, leave=False)
        with bar, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(load, starts[0])
            for i in range(len(starts)):
                rgb = pending.result()
                if i + 1 < len(starts):
                    pending = pool.submit(load, starts[i + 1])
                yield rgb
                bar.update()

    def _batches_at(self, images: Sequence[ImageLike], desc: str) -> Iterator[tuple[int, np.ndarray]]:
        """Like _batches, with each batch's start index."""
        for i, rgb in enumerate(self._batches(images, desc)):
            yield i * self.config.batch_size, rgb

    def use_runtime(self, runtime: str = "torch", onnx_dir: str | Path | None = None,
                    threads: int | None = None) -> "HyADS":
        """Run the neural parts with eager torch (default), or an ONNX export: "onnx" or "onnx-int8" (the
        feature extractor in INT8; the AE and segmentation head stay fp32)."""
        if runtime == "torch":
            self.runtime, self.onnx_parts = None, {}
        elif runtime in ("onnx", "onnx-int8"):
            from .export.onnx import OnnxFeatures, load_parts

            if onnx_dir is None:
                raise HyADSError(f"runtime {runtime} needs the folder written by `hyads export`")
            self.runtime = OnnxFeatures(self, onnx_dir, int8=runtime == "onnx-int8", threads=threads)
            self.onnx_parts = load_parts(self, onnx_dir, threads=threads)
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

    def _fused(self, rgb: np.ndarray) -> np.ndarray:
        return fuse(self._detector_maps(rgb), self.weights_, self.map_stats_)

    def _maps_from_patches(self, patches: np.ndarray) -> np.ndarray:
        b, h, w, d = patches.shape
        return self._upsample_smooth(self.bank_.distances(patches.reshape(-1, d), h * w).reshape(b, 1, h, w))

    def _upsample_smooth(self, dist: np.ndarray) -> np.ndarray:
        """(B, 1, h, w) patch distances -> (B, S, S) maps: bilinear upsampling then Gaussian smoothing.

        With `smooth_at_grid` the Gaussian runs on the patch grid (sigma divided by the grid stride) before
        upsampling: blur and linear interpolation nearly commute, and the grid has 64x fewer pixels. The
        upsampling is torch's bilinear as a single-threaded loop (kernels.py: no spinning thread pool).
        """
        size = self.config.image_size
        if self.config.smooth_at_grid:
            sigma = self.config.smoothing_sigma * dist.shape[-1] / size
            if sigma > 0:
                dist = ndimage.gaussian_filter(dist.astype(np.float32), sigma=(0, 0, sigma, sigma), mode="nearest",
                                               truncate=4.0)
            return upsample_bilinear(dist[:, 0], size)
        up = upsample_bilinear(dist[:, 0], size)
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
        masks: Sequence[Any] | None = None,
        val_masks: Sequence[Any] | None = None,
    ) -> "HyADS":
        """Learn normal appearance from `images` (all defect-free, unless `masks` says where defects are).

        The threshold is calibrated on `val_images` when given (F1-max if `val_labels` contain defects),
        otherwise on a seeded held-out fraction of `images` that is not put in the bank.

        `masks` (one per image: array or mask file, non-zero = defect) is for sets without defect-free images
        (NEU-Seg): the bank and texture bank take only patches whose neighbourhood has no labelled defect, and
        the AE loss ignores labelled pixels. Held-out images then carry their masks into calibration.
        """
        c = self.config
        images = list(images)
        if not images:
            raise HyADSError("fit() needs at least one normal image")
        t0 = time.perf_counter()
        rng = np.random.default_rng(c.seed)
        S = c.image_size
        mtrain = None if masks is None else np.stack([_to_mask(m, S) for m in masks])
        if mtrain is not None and len(mtrain) != len(images):
            raise HyADSError(f"fit() got {len(images)} images but {len(mtrain)} masks")
        mval = None if val_masks is None else np.stack([_to_mask(m, S) for m in val_masks])
        if val_images is None and len(images) >= 2 and c.validation_fraction > 0:
            n_val = max(1, int(round(c.validation_fraction * len(images))))
            order = rng.permutation(len(images))
            val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
            val_images = [images[i] for i in val_idx]
            val_labels = [0] * n_val
            train = [images[i] for i in train_idx]
            if mtrain is not None:
                mval, mtrain = mtrain[val_idx], mtrain[train_idx]
        else:
            train = images
        if mval is not None:
            val_labels = [int(m.any()) for m in mval]
        dets = self.detectors
        self.bank_ = None
        self.seghead_ = None
        self.weights_ = None
        self.calibration_ = None
        t_feat = t_bank = time.perf_counter()
        if "patchcore" in dets:
            self._build_features()
            g = c.image_size // self.backbone_.tap_strides[0]
            self.bank_ = _new_bank(c)
            keep = None if mtrain is None else ~_cell_masks(mtrain, g, c.patch_neighbourhood // 2 + 1)
            n_patches = len(train) * g * g if keep is None else int(keep.sum())
            if n_patches == 0:
                raise HyADSError("every training patch touches a labelled defect: no normal patches for the bank")
            self.bank_.start(n_patches, self.embedder_.out_dim)
            for s0, rgb in self._batches_at(train, "features"):
                p = self._patches(rgb)
                p = p.reshape(-1, p.shape[-1])
                if keep is not None:
                    p = p[keep[s0 : s0 + len(rgb)].reshape(-1)]
                self.bank_.partial_fit(p)
            t_feat = time.perf_counter()
            self.bank_.finish()
            t_bank = time.perf_counter()
        if "texture" in dets:
            self._fit_texture(train, mtrain)
        if "ae" in dets:
            self._fit_ae(train, val_images or [], mtrain)
        t_extra = time.perf_counter()

        # Normalisation statistics and fusion weights (only needed with more than one detector).
        self.weights_ = {dets[0]: 1.0} if len(dets) == 1 else {d: 1.0 / len(dets) for d in dets}
        self.map_stats_ = {d: (0.0, 1.0) for d in dets}
        self.fusion_info_: dict[str, Any] = {}
        if len(dets) > 1 and val_images:
            labels = np.asarray(val_labels if val_labels is not None else [0] * len(val_images))
            val_rgb = rgb_batch(val_images, c.image_size)
            if mval is not None:  # real masks: statistics from normal pixels, search on the real defects
                all_maps = self._detector_maps_all(val_rgb)
                normal_maps = {d: m[~mval] for d, m in all_maps.items()}
            else:
                normal_maps = self._detector_maps_all(val_rgb[labels == 0])
            self.map_stats_ = {d: map_stats(m) for d, m in normal_maps.items()}
            if mval is not None:
                search_maps, search_labels, search_masks = all_maps, labels, mval
                source = "validation images with labelled masks"
            elif (labels == 1).any():
                search_maps = self._detector_maps_all(val_rgb)
                search_labels, search_masks = labels, None
                source = "validation images"
            else:
                from .data.synth import synthetic_defects

                bad, masks = synthetic_defects(val_rgb, seed=c.seed)
                bad_maps = self._detector_maps_all(bad)
                search_maps = {d: np.concatenate([normal_maps[d], bad_maps[d]]) for d in dets}
                search_masks = np.concatenate([np.zeros_like(masks), masks])
                search_labels = np.r_[np.zeros(len(bad)), np.ones(len(bad))]
                source = f"{len(bad)} synthetic defects on held-out normal images"
            w, f1, how = search_weights(search_maps, self.map_stats_, search_labels, search_masks, c.fusion_step)
            self.weights_ = w
            self.fusion_info_ = {"objective": how, "best_f1": f1, "source": source}
            # Kept in memory (not saved) so an ablation can re-run the search for subsets of detectors.
            self._fusion_search = (search_maps, search_labels, search_masks, normal_maps)

        if val_images:
            val_maps = self.anomaly_map(val_images)
            scores = val_maps.reshape(len(val_maps), -1).max(1)
            labels = np.asarray(val_labels if val_labels is not None else [0] * len(scores))
            if mval is not None and not (labels == 0).any():
                # No defect-free validation image: pixel-level F1-max between normal and defect pixels.
                self.calibration_, self.normal_scores_ = _calibrate_pixels(val_maps, mval, c.seed)
                labels = None
            elif labels.shape != scores.shape or not (labels == 0).any():
                raise HyADSError("validation labels must give one 0/1 label per image, with at least one normal (0)")
            if labels is not None:
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
            "detectors": dets,
            "fusion_weights": self.weights_,
            **({"fusion": self.fusion_info_} if self.fusion_info_ else {}),
            "bank_size": int(len(self.bank_.bank_)) if self.bank_ is not None else 0,
            "patches_seen": int(self.bank_.n_seen_) if self.bank_ is not None else 0,
            "seconds_features": round(t_feat - t0, 3),
            "seconds_sampling": round(t_bank - t_feat, 3),
            "seconds_texture_and_ae": round(t_extra - t_bank, 3),
            "seconds_calibration": round(t_end - t_extra, 3),
            **({"ae_history": self.ae_history_} if "ae" in dets else {}),
        }
        return self

    # -- texture and autoencoder detectors ------------------------------------------------------------
    def _fit_texture(self, train: Sequence[ImageLike], masks: np.ndarray | None = None) -> None:
        c = self.config
        parts = []
        for s0, rgb in self._batches_at(train, "texture"):
            d = tex.batch_descriptors(rgb)
            if masks is not None:
                d = d[~_cell_masks(masks[s0 : s0 + len(rgb)], d.shape[1], 2)]
            parts.append(d.reshape(-1, tex.DIM))
        desc = np.concatenate(parts)
        if len(desc) == 0:
            raise HyADSError("every texture cell touches a labelled defect: nothing normal to learn from")
        self.texture_mean_ = desc.mean(0).astype(np.float32)
        self.texture_std_ = (desc.std(0) + 1e-6).astype(np.float32)
        res = Reservoir(max(1, int(round(c.ratio * len(desc)))), tex.DIM, c.seed + 1)
        res.update((desc - self.texture_mean_) / self.texture_std_)
        self.texture_reservoir_ = res
        self._texture_index = None

    def _texture_maps(self, rgb: np.ndarray, desc: np.ndarray | None = None) -> np.ndarray:
        if getattr(self, "_texture_index", None) is None:
            self._texture_index = NearestNeighbourIndex(self.texture_reservoir_.filled, "flat")
        d = tex.batch_descriptors(rgb) if desc is None else desc
        b, g = d.shape[0], d.shape[1]
        z = ((d - self.texture_mean_) / self.texture_std_).reshape(-1, tex.DIM)
        return self._upsample_smooth(self._texture_index.search(z).reshape(b, 1, g, g))

    def _fit_ae(self, train: Sequence[ImageLike], val: Sequence[ImageLike], masks: np.ndarray | None = None) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        self.ae_ = UNetAE(skips=c.ae_skips)
        x = rgb_batch(train, c.image_size)
        xv = rgb_batch(val, c.image_size) if len(val) else None
        trainer = AETrainer(epochs=c.ae_epochs, lr=c.ae_lr, batch_size=c.batch_size, crop=c.ae_crop,
                            input_noise=c.ae_noise, patience=c.ae_patience, seed=c.seed, progress=self.progress,
                            max_images=c.ae_max_images)
        weights = None if masks is None else (~ndimage.binary_dilation(masks, np.ones((1, 5, 5), bool)))
        trainer.fit(self.ae_, x, xv, None if weights is None else weights.astype(np.float32))
        self.ae_history_ = trainer.history_

    def _ae_maps(self, rgb: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32)
        ort_ae = self.onnx_parts.get("ae")
        err = ort_ae(x) if ort_ae is not None else error_map(self.ae_, torch.from_numpy(x)).numpy()
        sigma = self.config.smoothing_sigma
        if sigma > 0:
            err = np.stack([ndimage.gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0) for m in err])
        return err.astype(np.float32)

    def _detector_maps(self, rgb: np.ndarray, patches: np.ndarray | None = None,
                       desc: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Raw maps of every fitted detector for one batch of decoded images (patch features and texture
        descriptors may be passed in when the caller already computed them)."""
        out: dict[str, np.ndarray] = {}
        for d in self.detectors:
            if d == "patchcore":
                out[d] = self._maps_from_patches(self._patches(rgb) if patches is None else patches)
            elif d == "texture":
                out[d] = self._texture_maps(rgb, desc)
            else:
                out[d] = self._ae_maps(rgb)
        return out

    def _detector_maps_all(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        bs = self.config.batch_size
        parts = [self._detector_maps(rgb[i : i + bs]) for i in range(0, len(rgb), bs)]
        return {d: np.concatenate([p[d] for p in parts]) for d in self.detectors}

    def detector_maps(self, images: Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """Raw per-detector maps (before fusion), e.g. for ablations and plots."""
        self._require_fitted()
        parts = [self._detector_maps(rgb) for rgb in self._batches(list(images), "predict")]
        return {d: np.concatenate([p[d] for p in parts]) for d in self.detectors}

    def add_normal(self, images: Sequence[ImageLike]) -> "HyADS":
        """Add confirmed-normal images to the bank without refitting, then re-calibrate the threshold.

        Each new image is scored against the bank *before* its own patches go in, so its score is a fair
        held-out normal score; these join the stored normal scores and the threshold is recomputed from all.
        """
        self._require_fitted()
        images = list(images)
        new_scores = []
        for rgb in self._batches(images, "update"):
            new_scores.append(self._fused(rgb).reshape(len(rgb), -1).max(1))
            if self.bank_ is not None:
                p = self._patches(rgb)
                self.bank_.add(p.reshape(-1, p.shape[-1]))
            if "texture" in self.detectors:
                d = tex.batch_descriptors(rgb).reshape(-1, tex.DIM)
                self.texture_reservoir_.update((d - self.texture_mean_) / self.texture_std_)
                self._texture_index = None
        if new_scores:
            self.normal_scores_ = np.concatenate([self.normal_scores_, *new_scores])
            method = self.calibration_.method
            if not method.startswith("validation F1"):
                self.calibration_ = calibrate(self.normal_scores_, self.config.normal_quantile)
        if self.bank_ is not None:
            self.fit_info_["bank_size"] = int(len(self.bank_.bank_))
            self.fit_info_["patches_seen"] = int(self.bank_.n_seen_)
        self.fit_info_["n_added_images"] = self.fit_info_.get("n_added_images", 0) + len(images)
        return self

    # -- segmentation head ---------------------------------------------------------------------------
    def fit_segmentation(
        self,
        images: Sequence[ImageLike],
        masks: Sequence[Any],
        classes: Sequence[str],
        val_images: Sequence[ImageLike] | None = None,
        val_masks: Sequence[Any] | None = None,
        init_head: "HyADS | str | Path | None" = None,
        input_cache: str | Path | None = None,
    ) -> "HyADS":
        """Fit the unsupervised detectors on the normal pixels of labelled images, then the segmentation head.

        `masks` are class-index maps (0 = background, i = classes[i-1]); arrays or mask files. With
        `seg_crossfit`, the detectors kept in the model are fitted on one half of the images and the head's
        inputs for that half come from detectors fitted on the other half (no image's maps come from a bank
        holding its own patches). `val_images`/`val_masks` pick the best epoch (validation mean IoU).
        `init_head` (a fitted model or its folder) starts the head from that model's head instead of from
        scratch - a second training stage, e.g. with `seg_tune` after a frozen-feature stage; its tuned layers,
        if it has none, start from the backbone. The detectors are refitted here either way (same config and
        seed give the same detectors). `input_cache` (a folder): reuse the head inputs a previous run with the
        same images, masks and input options stored there, or store them (hyads.seg_cache).
        """
        from .segmentation import SegHeadTrainer

        c = self.config
        images, classes = list(images), [str(k) for k in classes]
        if not classes:
            raise HyADSError("fit_segmentation needs at least one defect class name")
        S = c.image_size
        y = np.stack([_to_labels(m, S) for m in masks])
        if len(y) != len(images):
            raise HyADSError(f"fit_segmentation got {len(images)} images but {len(y)} masks")
        if y.max() > len(classes):
            raise HyADSError(f"masks contain class {int(y.max())} but only {len(classes)} classes are named")
        c.seg_classes = classes
        init_name = None if init_head is None or isinstance(init_head, HyADS) else str(init_head)
        if init_name is not None:
            init_head = HyADS.load(init_name)  # a bad folder fails now, not after the long detector fit
        if init_head is not None and list(init_head.config.seg_classes) != classes:
            raise HyADSError(f"{init_name or 'init_head'}: segments {init_head.config.seg_classes}, not {classes}")
        flips = FLIPS[1:] if c.seg_flip_views else []
        has_val = val_images is not None and val_masks is not None and len(val_images) > 0
        cache = key = hit = None
        if input_cache is not None:
            from .seg_cache import InputCache, cache_key

            cache = InputCache(input_cache)
            key = cache_key(c, images, y, list(val_images) if has_val else None, flips)
            hit = cache.load(key)
            if self.progress:  # says at once whether the next ~17 minutes (NEU-Seg) are spent computing inputs
                print(f"input cache {cache.root / key}: {'found' if hit is not None else 'absent, computing inputs'}",
                      file=sys.stderr, flush=True)
        if hit is None:
            grid, low, y, views = self.fit_segmentation_inputs(images, y, flips)
            gv, lv = self.segmentation_inputs(list(val_images)) if has_val else (None, None)
            if cache is not None:
                arrays = {"grid": grid, "low": low, "y": y, **pack_views(views)}
                cache.save(key, {**arrays, **({"val_grid": gv, "val_low": lv} if has_val else {})})
        else:  # same inputs as a previous run: only the detectors this model keeps are fitted again
            self._fit_kept_detectors(images, y)
            grid, low, y = hit["grid"], hit["low"], np.asarray(hit["y"])
            views = unpack_views(hit)
            gv, lv = (hit["val_grid"], hit["val_low"]) if has_val else (None, None)
        val = (gv, lv, np.stack([_to_labels(m, S) for m in val_masks])) if has_val else None
        torch.manual_seed(c.seed)
        n_out = 1 if len(classes) == 1 else len(classes) + 1
        self.seghead_ = self._new_seghead(grid.shape[1], low.shape[1], n_out)
        if init_head is not None:
            _warm_start(self.seghead_, init_head)
        trainer = SegHeadTrainer(c.seg_epochs, c.seg_lr, patience=c.seg_patience, seed=c.seed,
                                 progress=self.progress, bf16=c.seg_bf16, tune_lr=c.seg_tune_lr, loss=c.seg_loss,
                                 refine_lr=c.seg_refine_lr)
        trainer.fit(self.seghead_, grid, low, y, val, warm_start=init_head is not None, views=views)
        self.fit_info_["segmentation"] = {"classes": classes, "n_images": len(images),
                                          "crossfit": bool(c.seg_crossfit and len(images) >= 4),
                                          "init_head": init_name, "inputs_from_cache": hit is not None,
                                          "history": trainer.history_}
        return self

    def _new_seghead(self, grid_channels: int, low_channels: int, n_out: int) -> SegHead:
        """A segmentation head for this config; with `seg_tune` it holds a trainable copy of the backbone's
        deep layers (initialised from this model's backbone, which stays frozen for PatchCore)."""
        from .segmentation import SegHead, TunedFeatures

        c = self.config
        tuned = None
        if c.seg_tune:
            if getattr(self, "backbone_", None) is None:
                self._build_features()
            tuned = TunedFeatures(BackboneTail(self.backbone_), copy.deepcopy(self.embedder_),
                                  self.backbone_.fine_channels)
        return SegHead(grid_channels, low_channels, n_out, c.seg_width, c.seg_depth, c.seg_dilated, c.seg_context,
                       tuned, c.seg_refine, c.seg_refine_width, c.seg_refine_features)

    def fit_segmentation_inputs(self, images: list[ImageLike], y: np.ndarray, flips: Sequence[tuple[int, ...]] = ()
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[FlipView]]:
        """Fit the unsupervised detectors on the normal pixels of labelled images and return the head's
        training inputs (grid, low, class maps y in the same order) and, for each image-axes tuple in `flips`,
        the inputs of the flipped images (grid, low, axes; the caller flips y). With `seg_crossfit` (and >= 4
        images) each half's inputs come from detectors fitted on the other half; this model keeps the first
        half's."""
        c = self.config
        halves = self._seg_halves(len(images))
        if halves is not None:
            a, b = halves
            other = HyADS(c)
            other.progress = self.progress
            other.fit([images[i] for i in b], masks=list(y[b]))
            self._fit_kept_detectors(images, y)
            ia, ib = [images[i] for i in a], [images[i] for i in b]
            out = []
            for flip in [(), *flips]:
                ga, la = other.segmentation_inputs(ia, flip)
                gb, lb = self.segmentation_inputs(ib, flip)
                out.append((np.concatenate([ga, gb]), np.concatenate([la, lb]), tuple(flip)))
            return out[0][0], out[0][1], np.concatenate([y[a], y[b]]), out[1:]
        self._fit_kept_detectors(images, y)
        views = [(*self.segmentation_inputs(images, flip), tuple(flip)) for flip in flips]
        return (*self.segmentation_inputs(images), y, views)

    def _fit_kept_detectors(self, images: list[ImageLike], y: np.ndarray) -> None:
        """Fit this model's detectors on the images it keeps: the first cross-fitting half, or all of them."""
        halves = self._seg_halves(len(images))
        keep = halves[0] if halves is not None else np.arange(len(images))
        self.fit([images[i] for i in keep], masks=list(y[keep]))

    def _seg_halves(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The cross-fitting halves (this model keeps the detectors of the first), or None without crossfit."""
        if not (self.config.seg_crossfit and n >= 4):
            return None
        order = np.random.default_rng(self.config.seed).permutation(n)
        return np.sort(order[::2]), np.sort(order[1::2])

    def _seg_inputs(self, rgb: np.ndarray, desc: np.ndarray | None = None, patches: np.ndarray | None = None,
                    maps: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Head inputs for one batch: grid (B, Cg, g, g) and low (B, Cl, S/4, S/4), float16. Texture
        descriptors, patch features and detector maps the caller already has may be passed in."""
        c = self.config
        desc = tex.batch_descriptors(rgb) if desc is None else desc
        grid = [desc.transpose(0, 3, 1, 2)]
        if patches is None and ("patchcore" in self.detectors or c.seg_features):
            if getattr(self, "backbone_", None) is None:
                self._build_features()
            patches = self._patches(rgb)
        if c.seg_features:
            grid.append(patches.transpose(0, 3, 1, 2))
        maps = self._detector_maps(rgb, patches, desc) if maps is None else maps
        low = np.concatenate([tex.to_gray(rgb)[:, None], np.stack([maps[d] for d in self.detectors], 1)], 1)
        low = F.avg_pool2d(torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32)), 4).numpy()
        if c.seg_fine_features:
            x = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32)
            if "fine" in self.onnx_parts:
                fine = torch.from_numpy(self.onnx_parts["fine"](x))
            else:
                if getattr(self, "backbone_", None) is None:
                    self._build_features()
                with torch.inference_mode():
                    fine = self.backbone_.features(torch.from_numpy(x), taps=(self.backbone_.fine_tap,))[0]
            low = np.concatenate([low, F.interpolate(fine, size=low.shape[-2:], mode="bilinear",
                                                     align_corners=False).numpy()], 1)
        if c.seg_refine:  # the full-resolution grey image, packed into REFINE_CHANNELS stride-4 channels
            grey = torch.from_numpy(np.ascontiguousarray(tex.to_gray(rgb)[:, None]))
            low = np.concatenate([low, F.pixel_unshuffle(grey, 4).numpy()], 1)
        return np.concatenate(grid, 1).astype(np.float16), low.astype(np.float16)

    def segmentation_inputs(self, images: Sequence[ImageLike], flip: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Head inputs (grid, low) of the images, or of the images flipped on `flip` (1 = vertical, 2 =
        horizontal)."""
        parts = [self._seg_inputs(rgb) for rgb in self._batches(list(images), "segmentation inputs", flip)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _seg_prob_batches(self, images: Sequence[ImageLike], size: tuple[int, int]) -> Iterator[torch.Tensor]:
        """Per batch: head probabilities (B, n_out, H, W), averaged over the 4 flips with `seg_tta`."""
        from .segmentation import predict_probs

        self._require_fitted()
        if getattr(self, "seghead_", None) is None:
            raise NotFittedError("this model has no segmentation head: fit it with fit_segmentation()")
        flips = FLIPS if self.config.seg_tta else [()]
        for rgb in self._batches(list(images), "segment"):
            prob = 0.0
            for axes in flips:  # image flipped on (H, W) axes; probabilities flipped back on (H, W) = (2, 3)
                x = np.ascontiguousarray(np.flip(rgb, axes)) if axes else rgb
                p = predict_probs(self.onnx_parts.get("seghead", self.seghead_), *self._seg_inputs(x), size)
                prob = prob + (p.flip([a + 1 for a in axes]) if axes else p)
            yield prob / len(flips)

    def predict_seg_probs(self, images: Sequence[ImageLike], size: tuple[int, int] | None = None) -> np.ndarray:
        """Segmentation-head class probabilities (N, n_out, H, W) float32 at `size` (default: the model
        resolution). Probabilities of several models, even of different resolutions, can be averaged into
        an ensemble (segbench.evaluate_segmentation does)."""
        size = size or (self.config.image_size, self.config.image_size)
        out = [p.numpy().astype(np.float32) for p in self._seg_prob_batches(images, size)]
        return np.concatenate(out) if out else np.zeros((0, self.seghead_.n_out, *size), np.float32)

    def predict_labels(self, images: Sequence[ImageLike], size: tuple[int, int] | None = None) -> np.ndarray:
        """Class maps (N, H, W) uint8 from the segmentation head (0 = background, i = seg_classes[i-1])."""
        from .segmentation import labels_from_probs

        size = size or (self.config.image_size, self.config.image_size)
        out = [labels_from_probs(p) for p in self._seg_prob_batches(images, size)]
        return np.concatenate(out) if out else np.zeros((0, *size), np.uint8)

    # -- inference -----------------------------------------------------------------------------------
    def anomaly_map(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Per-pixel anomaly maps (N, S, S) at the model resolution, in raw distance units."""
        self._require_fitted()
        maps = [self._fused(rgb) for rgb in self._batches(list(images), "predict")]
        size = self.config.image_size
        return np.concatenate(maps) if maps else np.zeros((0, size, size), np.float32)

    def score_samples(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Raw image anomaly scores (maximum of the smoothed map); higher is more anomalous."""
        return self.anomaly_map(images).reshape(len(images), -1).max(1) if len(images) else np.zeros(0)

    @property
    def threshold_(self) -> float:
        self._require_fitted()
        if getattr(self, "calibration_", None) is None:
            raise NotFittedError("this HyADS model has no calibrated threshold yet")
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
        """Binary defect masks (N, S, S): from the segmentation head when the model has one, otherwise the
        pixels whose map value reaches the image threshold (then an image is predicted defective exactly when
        its mask is non-empty, because the image score is the map maximum)."""
        if getattr(self, "seghead_", None) is not None:
            return self.predict_labels(images) > 0
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
                      c.ivf_min_bank, c.bank_float16, c.knn_dim, c.coreset_keep, c.knn_rerank,
                      c.knn_rerank_nprobe)


def _restore(config: HyADSConfig, tensors: dict[str, np.ndarray], state: dict[str, Any]) -> HyADS:
    """Rebuild a fitted model from persisted state (used by persist.load_model)."""
    model = HyADS(config)
    dets = model.detectors
    model.bank_ = None
    if "patchcore" in dets:
        model._build_features()
        model.bank_ = _new_bank(config)
        model.bank_.set_state({k: tensors[n] for k, n in (("bank", "bank"), ("reservoir", "bank_reservoir"))
                               if n in tensors}, state["bank"])
        if model.bank_.bank_.shape[1] != model.embedder_.out_dim:
            raise HyADSError(f"bank has {model.bank_.bank_.shape[1]} features per patch but the config gives "
                             f"{model.embedder_.out_dim}")
    if "texture" in dets:
        model.texture_mean_ = np.asarray(tensors["texture_mean"], np.float32)
        model.texture_std_ = np.asarray(tensors["texture_std"], np.float32)
        model.texture_reservoir_ = Reservoir.from_state(state["texture_reservoir"],
                                                        np.asarray(tensors["texture_bank"], np.float32))
        model._texture_index = None
    if "ae" in dets:
        model.ae_ = UNetAE(skips=config.ae_skips)
        sd = {k[3:]: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith("ae.")}
        model.ae_.load_state_dict(sd, strict=True)
        model.ae_.eval()
    model.weights_ = {k: float(v) for k, v in state.get("weights", {dets[0]: 1.0}).items()}
    model.map_stats_ = {k: (float(v[0]), float(v[1])) for k, v in state.get("map_stats", {dets[0]: (0, 1)}).items()}
    model.fusion_info_ = dict(state.get("fusion", {}))
    cal = state["calibration"]
    model.calibration_ = Calibration(float(cal["threshold"]), float(cal["scale"]), str(cal["method"]))
    model.normal_scores_ = np.asarray(tensors["normal_scores"], dtype=np.float64)
    model.fit_info_ = dict(state["fit_info"])
    if "seg" in state:
        sg = state["seg"]
        model.seghead_ = model._new_seghead(int(sg["grid_channels"]), int(sg["low_channels"]), int(sg["n_out"]))
        sd = {k[4:]: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith("seg.")}
        model.seghead_.load_state_dict(sd, strict=True)
        model.seghead_.eval()
    return model


def _warm_start(head: SegHead, source: HyADS | str | Path) -> None:
    """Copy a fitted model's segmentation head into `head` (same inputs and layout required). Tuned layers
    the source lacks keep their backbone initialisation, a refiner it lacks its zero start (the packed image
    channels only feed the refiner). A wider refiner (seg_refine_width, seg_refine_features) takes the
    source's refiner in its leading channels, with zero weights from its new input channels, so it starts
    exactly where the source was. Anything else that does not match is an error."""
    src = source if isinstance(source, HyADS) else HyADS.load(source)
    other = getattr(src, "seghead_", None)
    if other is None:
        raise HyADSError(f"{source}: has no segmentation head to start from")
    mine, theirs = head.state_dict(), dict(other.state_dict())
    for k, v in list(theirs.items()):
        if k.startswith("refiner.") and k in mine and mine[k].shape != v.shape and mine[k].dim() == v.dim() \
                and all(a >= b for a, b in zip(mine[k].shape, v.shape)):
            grown = mine[k].clone()
            if grown.dim() == 4:  # conv weight: nothing flows in from the new input channels
                grown[:, v.shape[1] :] = 0
            grown[tuple(slice(0, n) for n in v.shape)] = v
            theirs[k] = grown
    wrong = [k for k, v in theirs.items() if k not in mine or mine[k].shape != v.shape]
    missing = [k for k in mine if k not in theirs and not k.startswith(("tuned.", "refiner."))]
    if wrong or missing:
        raise HyADSError(f"{source}: its segmentation head does not fit this config (differs in "
                         f"{', '.join((wrong + missing)[:5])}); use the same head options and input features")
    head.load_state_dict(theirs, strict=False)


def export_state(model: HyADS) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Learned state as named arrays (for safetensors) and JSON-able metadata (used by persist.save_model)."""
    tensors: dict[str, np.ndarray] = {"normal_scores": np.asarray(model.normal_scores_, np.float64)}
    state: dict[str, Any] = {
        "calibration": {"threshold": model.calibration_.threshold, "scale": model.calibration_.scale,
                        "method": model.calibration_.method},
        "fit_info": model.fit_info_,
        "weights": model.weights_,
        "map_stats": {k: list(v) for k, v in model.map_stats_.items()},
        "fusion": getattr(model, "fusion_info_", {}),
    }
    if model.bank_ is not None:
        bank_tensors, state["bank"] = model.bank_.get_state()
        tensors["bank"] = bank_tensors["bank"]
        if "reservoir" in bank_tensors:
            tensors["bank_reservoir"] = bank_tensors["reservoir"]
    if "texture" in model.detectors:
        tensors["texture_bank"] = model.texture_reservoir_.filled.copy()
        tensors["texture_mean"] = model.texture_mean_
        tensors["texture_std"] = model.texture_std_
        state["texture_reservoir"] = model.texture_reservoir_.get_state()
    if "ae" in model.detectors:
        for k, v in model.ae_.state_dict().items():
            tensors["ae." + k] = v.detach().cpu().numpy().copy()
    head = getattr(model, "seghead_", None)
    if head is not None:
        state["seg"] = {"grid_channels": head.grid_channels, "low_channels": head.low_channels,
                        "n_out": head.n_out, "width": model.config.seg_width}
        for k, v in head.state_dict().items():
            tensors["seg." + k] = v.detach().cpu().numpy().copy()
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}, state
